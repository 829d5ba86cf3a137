"""Per-shape fused-MoE tile sweep: `python -m bench.moe_tune FILE [--shapes gpt-oss,moonlight]`.

For each expert shape of the benchmark models beyond Qwen3-30B-A3B (whose tiles are the default
ladder, swept by `bench.kernels --tune`): GPT-OSS-20B (32 experts, 2880 x 2880, top-4, through
fused_moe_biased with both biases and the clamped SwiGLU) and Moonlight-16B-A3B (64 experts,
2048 x 1408, top-6, through fused_moe), at T = 1 (decode at batch 1: the small path where the op
takes it), T = 512 (a 512-sequence decode step) and T = 8192 (a prefill chunk). Each candidate is
timed inside a CUDA graph (launch overhead out, as in decode) and checked against the current
config's output; the winners go into FILE's "moe_shapes" (merged with what is there), which
`bench.kernels.apply_tuned` installs into atom/ops/moe_tiles.py's table.

Prints per shape and T the time, the bandwidth of the expert weights read (bytes of the experts
the routing used / time) as a fraction of the copy ceiling, and the matmul rate, plus each
candidate's first-call (compile) cost, so the sweep reads as a fraction of the physical limit.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import torch

from atom.ops import moe_tiles
from atom.ops.moe_tiles import TOP, tiles

COPY_CEILING = 4.15e12  # H200 copy bandwidth, bytes/s (ATOM_BENCH_CEILINGS overrides)
MATMUL_CEILING = 7.8e14  # bf16 dense matmul, FLOP/s (8192^3, BENCHMARKS.md)


@dataclass(frozen=True)
class ExpertShape:
    """An MoE layer to tune: experts, hidden, intermediate, top-k, GPT-OSS's biased epilogue."""

    name: str
    experts: int
    hidden: int
    inter: int
    top_k: int
    biased: bool


SHAPES = {
    "gpt-oss": ExpertShape("gpt-oss-20b", 32, 2880, 2880, 4, True),
    "moonlight": ExpertShape("moonlight-16b-a3b", 64, 2048, 1408, 6, False),
}
# Token count swept -> the ladder rung (token bound) its winner fills.
RUNGS = {1: 1, 512: 1024, 8192: TOP}

# Candidates per token count as (gate|up, down). The first is the default ladder's rung (the
# baseline every other is checked against). Pruned for large H / I: at T=512 an expert gets
# ~64 (GPT-OSS) / ~48 (Moonlight) pairs, so BLOCK_M 64..128 reads each expert's weights once
# per M tile (GROUP_M 8 keeps a second M tile's weights in L2); BLOCK_N 64..256 and BLOCK_K
# 64/128 trade programs (waves on 132 SMs) for bytes in flight. At T=8192 the GEMMs are
# compute-bound: large tiles, 8 warps. Everything fits sm_90's shared memory
# (scripts/compile_kernels.py --only moe_tune checks).
CANDIDATES: dict[int, list[tuple[dict, dict]]] = {
    1: [(tiles(16, 32, 128, 1, 4, 4), tiles(16, 64, 128, 1, 4, 4)),
        (tiles(16, 64, 128, 1, 4, 4), tiles(16, 128, 128, 1, 4, 4)),
        (tiles(16, 32, 256, 1, 4, 3), tiles(16, 64, 256, 1, 4, 3)),
        (tiles(16, 64, 64, 1, 4, 5), tiles(16, 128, 64, 1, 4, 5)),
        (tiles(16, 128, 128, 1, 8, 3), tiles(16, 256, 128, 1, 8, 3))],
    512: [(tiles(64, 64, 64, 1, 4, 3), tiles(64, 128, 64, 1, 4, 3)),
          (tiles(64, 64, 64, 8, 4, 4), tiles(64, 128, 64, 8, 4, 4)),
          (tiles(64, 64, 128, 8, 4, 3), tiles(64, 128, 128, 8, 4, 3)),
          (tiles(64, 128, 64, 8, 8, 4), tiles(64, 256, 64, 8, 8, 4)),
          (tiles(128, 64, 64, 1, 8, 4), tiles(128, 128, 64, 1, 8, 4)),
          (tiles(128, 64, 128, 1, 8, 3), tiles(128, 128, 128, 1, 8, 3)),
          (tiles(128, 32, 128, 1, 4, 4), tiles(128, 64, 128, 1, 4, 4)),
          (tiles(32, 64, 128, 8, 4, 4), tiles(32, 128, 128, 8, 4, 4)),
          (tiles(32, 128, 64, 8, 4, 5), tiles(32, 256, 64, 8, 4, 5)),
          (tiles(16, 64, 128, 1, 4, 3), tiles(16, 128, 128, 1, 4, 3))],
    8192: [(tiles(128, 64, 64, 8, 8, 4), tiles(128, 128, 64, 8, 8, 4)),
           (tiles(128, 64, 64, 8, 8, 3), tiles(128, 256, 64, 8, 8, 3)),
           (tiles(128, 64, 128, 8, 8, 3), tiles(128, 128, 128, 8, 8, 3)),
           (tiles(64, 128, 64, 8, 8, 4), tiles(64, 256, 64, 8, 8, 4)),
           (tiles(128, 128, 64, 8, 8, 3), tiles(128, 128, 64, 1, 8, 3)),
           (tiles(64, 64, 64, 8, 4, 4), tiles(64, 128, 64, 8, 4, 4))],
}


def small(bn_up, bk_up, w_up, s_up, bn_down, bk_down, w_down, s_down) -> dict:
    """A small-path config (moe_small.SMALL_CFG's layout)."""
    return dict(up=dict(BLOCK_N=bn_up, BLOCK_K=bk_up, num_warps=w_up, num_stages=s_up),
                down=dict(BLOCK_N=bn_down, BLOCK_K=bk_down, num_warps=w_down, num_stages=s_down))


# The small path (fused_moe_biased at T <= SMALL_T_MAX): the first is SMALL_CFG's value.
SMALL_CANDIDATES = [small(32, 128, 4, 4, 8, 256, 8, 2), small(64, 128, 4, 4, 8, 128, 4, 2),
                    small(32, 256, 4, 3, 16, 256, 8, 2), small(64, 64, 4, 5, 8, 256, 8, 3),
                    small(128, 128, 8, 3, 4, 256, 4, 2)]


def graph_time(fn, reps: int) -> float:
    """Seconds per call of fn, replayed `reps` times in one CUDA graph."""
    import triton

    from bench.timing import graph_of
    g = graph_of(fn, reps)
    return triton.testing.do_bench(g.replay, warmup=10, rep=60, return_mode="median") / 1e3 / reps


@dataclass
class Case:
    """One (shape, T) point: the inputs, the op under a config, the bytes / FLOPs it must do."""

    shape: ExpertShape
    tokens: int
    run: object  # run(cfg) -> output; cfg: (up, down) or a small-path dict
    expert_bytes: int
    flops: float
    small: bool
    key: moe_tiles.MoeShape  # the table's key for these experts


def make_case(s: ExpertShape, t: int) -> Case:
    from atom.ops import implementations
    from atom.ops.triton import moe, moe_small
    dev, dt = "cuda", torch.bfloat16
    w13 = torch.randn(s.experts, 2 * s.inter, s.hidden, device=dev, dtype=dt) * 0.02
    w2 = torch.randn(s.experts, s.hidden, s.inter, device=dev, dtype=dt) * 0.02
    b13 = torch.randn(s.experts, 2 * s.inter, device=dev, dtype=dt) if s.biased else None
    b2 = torch.randn(s.experts, s.hidden, device=dev, dtype=dt) if s.biased else None
    x = torch.randn(t, s.hidden, device=dev, dtype=dt)
    wts, ids = implementations("moe_route")["triton"](torch.randn(t, s.experts, device=dev), s.top_k, True)
    used = ids.unique().numel()
    per_expert = 3 * s.hidden * s.inter * 2 + ((2 * s.inter + s.hidden) * 2 if s.biased else 0)
    flops = 2.0 * t * s.top_k * 3 * s.hidden * s.inter
    is_small = s.biased and t <= moe_small.SMALL_T_MAX
    shape = moe_tiles.shape_of(w13)
    if s.biased:
        op = implementations("fused_moe_biased")["triton"]
        ep = moe.Epilogue(b13, b2, "clamped_swiglu", 7.0, 1.702)

        def run(cfg):
            if is_small:  # the op reads the table: install, call, restore
                saved = moe_tiles.TABLE.get(shape)
                moe_tiles.install_small(shape, cfg)
                try:
                    return op(x, w13, b13, w2, b2, wts, ids, 7.0, 1.702)
                finally:
                    moe_tiles.TABLE.pop(shape)
                    if saved is not None:
                        moe_tiles.TABLE[shape] = saved
            return moe.experts_aligned(x, w13, w2, wts, ids, ep, *cfg)
    else:
        def run(cfg):
            return moe.fused_moe_with(x, w13, w2, wts, ids, *cfg)
    return Case(s, t, run, used * per_expert, flops, is_small, shape)


def sweep(case: Case, bw: float) -> tuple[dict | tuple, float]:
    """Time every candidate of the case; returns the fastest (config, seconds)."""
    cands = SMALL_CANDIDATES if case.small else CANDIDATES[case.tokens]
    reps = 2 if case.tokens >= 4096 else 10
    ref, best = None, None
    for cfg in cands:
        start = time.perf_counter()
        try:
            out = case.run(cfg)
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            ref = out if ref is None else ref
            err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-6)).item()
            if err > 2e-2:
                print(f"  {case.shape.name} T={case.tokens} WRONG (rel err {err:.1e}): {cfg}")
                continue
            sec = graph_time(lambda: case.run(cfg), reps)
        except Exception as exc:  # a config that does not compile / fit
            print(f"  {case.shape.name} T={case.tokens} skip {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        print(f"  {case.shape.name} T={case.tokens} {sec * 1e6:9.1f} us {case.expert_bytes / sec / bw:6.1%} of copy bw "
              f"{case.flops / sec / 1e12:6.0f} TFLOP/s  first call {first:5.1f} s  {cfg}", flush=True)
        if best is None or sec < best[1]:
            best = (cfg, sec)
    return best


def tune(out_path: str, names: list[str]) -> None:
    import atom.ops.triton  # noqa: F401 (registers the triton ops)
    ceil_path = os.environ.get("ATOM_BENCH_CEILINGS", "")
    bw = json.load(open(ceil_path))["copy_bytes_per_s"] if os.path.isfile(ceil_path) else COPY_CEILING
    entries, summary, t0 = [], [], time.perf_counter()
    for name in names:
        s = SHAPES[name]
        rungs, small_cfg, shape = [], None, None
        for t, bound in RUNGS.items():
            case = make_case(s, t)
            shape = case.key
            best = sweep(case, bw)
            if best is None:
                continue
            cfg, sec = best
            if case.small:
                small_cfg = cfg
            else:
                rungs.append((bound, cfg[0], cfg[1]))
            summary.append(f"{s.name} T={t}: {sec * 1e6:.1f} us, {case.expert_bytes / 1e9:.2f} GB of experts, "
                           f"{case.expert_bytes / sec / 1e12:.2f} TB/s = {case.expert_bytes / sec / bw:.1%} of copy "
                           f"{bw / 1e12:.2f} TB/s, {case.flops / sec / 1e12:.0f} TFLOP/s "
                           f"({case.flops / sec / MATMUL_CEILING:.0%} of matmul)")
            del case
            torch.cuda.empty_cache()
        entries.append(moe_tiles.to_json(shape, rungs, small_cfg))
    tuned = json.load(open(out_path)) if os.path.isfile(out_path) else {}
    keep = [e for e in tuned.get("moe_shapes", []) if all(
        (e["experts"], e["n"], e["k"]) != (n["experts"], n["n"], n["k"]) for n in entries)]
    tuned["moe_shapes"] = keep + entries
    json.dump(tuned, open(out_path, "w"))
    for line in summary:
        print("best", line)
    print(f"sweep {time.perf_counter() - t0:.0f} s; tuned -> {out_path}", json.dumps({"moe_shapes": entries}))


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        raise SystemExit("usage: python -m bench.moe_tune FILE [--shapes gpt-oss,moonlight]")
    names = list(SHAPES)
    if "--shapes" in sys.argv:
        names = sys.argv[sys.argv.index("--shapes") + 1].split(",")
        bad = [n for n in names if n not in SHAPES]
        if bad:
            raise SystemExit(f"unknown shapes {bad}; known: {sorted(SHAPES)}")
    tune(sys.argv[1], names)


if __name__ == "__main__":
    main()
