"""What EngineConfig(batch_invariant=True) costs: `python -m bench.batch_invariant W [W ...]`.

Rollouts: for each workload (bench/workloads.json: random weights in the model's shapes, bf16,
bench/rollout.py's engine settings), one process per mode (the op registry is per process) runs a
warm-up call on other prompts and one timed `generate`; normal and batch-invariant processes
alternate (--rounds R pairs); best tokens/s of each, cost = 1 - invariant / normal.
--check: the invariant process also generates its first 8 prompts (seeded, 64 tokens), then the
first alone, and reports whether that prompt's logprobs came out bitwise the same.

--gemm W: the batch-invariant GEMM against F.linear (cuBLAS) at the dense shapes of W's model and
M = 1, 8, 64, 512, 8192 (µs, median of CUDA events); with --sweep, every candidate config of
CANDIDATES (tiles with pointer or TMA loads, persistent grids, split-K) at M = 1, 64, 512 and
8192, then per weight the candidate with the least time per rollout (WORKLOAD_CALLS), printed as
lines for invariant_gemm.MEASURED; --tuned FILE writes those.
Rollouts with --tuned FILE use those configs (`invariant_gemm.TUNED`; still one config per
weight for every M, so still invariant).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench.report import emit
from bench.timing import cuda_median_s
from bench.rollout import HERE, load_workloads, make_prompts

# Tile configs the sweep times: (block_m, block_n, block_k, warps, stages) with pointer loads, then
# the variants (invariant_gemm.VARIANT_DEFAULTS): TMA loads, TMA + a persistent grid, TMA + a fixed
# split-K summed by a second kernel or by each tile's last part (fold_last). Every one is a function of the weight alone (any of them keeps the invariance).
_TILES = [(128, 64, 64, 4, 4), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (64, 256, 64, 4, 3),
          (128, 128, 32, 4, 4), (256, 128, 64, 8, 3)]
CANDIDATES = [(*t, {}) for t in _TILES] + [
    (*t, {"tma": True}) for t in _TILES + [(128, 128, 64, 4, 4), (128, 256, 64, 8, 4)]] + [
    (*t, {"tma": True, "persistent": True}) for t in
    [(128, 64, 64, 4, 4), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3)]] + [
    (128, 128, 64, 8, 3, {"persistent": True})] + [  # pointer loads, persistent (Thinking Machines' bf16 choice)
    (*t, {"tma": True, "split_k": s, "fold_last": fold}) for t, s in
    [((128, 128, 64, 8, 4), 2), ((128, 256, 64, 8, 3), 2), ((64, 128, 64, 4, 4), 2), ((64, 128, 64, 4, 4), 4)]
    for fold in (False, True)]


def load_tuned(path: str | None) -> None:
    """Fill invariant_gemm.TUNED from a --tuned file ({"N,K": config}, bf16 weights)."""
    import os
    if not path or not os.path.isfile(path):
        return
    from atom.ops.triton import invariant_gemm
    for key, cfg in json.loads(open(path).read()).items():
        n, k = map(int, key.split(","))
        invariant_gemm.TUNED[(n, k, 2)] = cfg


def one(workload: str, invariant: bool, check: bool, tuned: str | None = None) -> dict:
    """One mode of one workload in this process: build, warm up, time one generate."""
    import torch

    from atom import RolloutEngine, SamplingParams
    load_tuned(tuned)
    w = load_workloads()[workload]
    seqs = min(w["num_prompts"] * w["n"], 1024)
    t0 = time.perf_counter()
    engine = RolloutEngine(str(HERE / "models" / w["model"]), load_format="dummy", dtype="bfloat16",
                           max_model_len=w["prompt_len"] + w["output_len"], max_num_seqs=seqs,
                           cuda_graph_max_batch_size=seqs, batch_invariant=invariant)
    build_s = time.perf_counter() - t0

    def params(max_tokens, seed=None):
        return SamplingParams(n=w["n"], temperature=w["temperature"], top_p=w["top_p"], max_tokens=max_tokens,
                              ignore_eos=True, logprobs=w["logprobs"], seed=seed)
    engine.generate(make_prompts(w, w["seed"] + 1), params(4))  # compiles kernels, captures graphs
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = engine.generate(make_prompts(w, w["seed"]), params(w["output_len"]))
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    result = {"workload": workload, "batch_invariant": invariant, "tokens": tokens, "seconds": round(secs, 3),
              "tok_per_s": round(tokens / secs, 1), "build_s": round(build_s, 1),
              "stats": {k: v for k, v in vars(engine.stats).items() if isinstance(v, (int, float))}}
    if check and invariant:
        prompts = make_prompts(w, w["seed"] + 2)[:8]
        batch = engine.generate(prompts, params(64, seed=7))[0]
        alone = engine.generate(prompts[:1], params(64, seed=7))[0]
        result["alone_equals_batch"] = all(a.token_ids == b.token_ids and a.logprobs == b.logprobs
                                           for a, b in zip(alone.outputs, batch.outputs))
    return result


def rollouts(args) -> list[dict]:
    results = []
    for workload in args.workloads:
        best = {False: None, True: None}
        for _ in range(args.rounds):
            for invariant in (False, True):
                cmd = [sys.executable, "-m", "bench.batch_invariant", workload, "--one",
                       "invariant" if invariant else "normal"] + (["--check"] if args.check else []) \
                    + (["--tuned", args.tuned] if args.tuned else [])
                run = subprocess.run(cmd, capture_output=True, text=True)
                lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
                if run.returncode or not lines:
                    print(run.stdout[-3000:], run.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{workload} ({'invariant' if invariant else 'normal'}) failed")
                res = json.loads(lines[-1][len("RESULT "):])
                print(f"  {workload} {'invariant' if invariant else 'normal   '}: {res['tok_per_s']:,.0f} tok/s "
                      f"({res['seconds']} s)" + (f", alone == batch: {res['alone_equals_batch']}"
                                                  if "alone_equals_batch" in res else ""), flush=True)
                if best[invariant] is None or res["tok_per_s"] > best[invariant]["tok_per_s"]:
                    best[invariant] = res
        cost = 1 - best[True]["tok_per_s"] / best[False]["tok_per_s"]
        print(f"{workload}: normal {best[False]['tok_per_s']:,.0f} tok/s, batch-invariant "
              f"{best[True]['tok_per_s']:,.0f} tok/s: costs {cost:.1%}")
        results.append({"workload": workload, "normal": best[False], "invariant": best[True], "cost": round(cost, 4)})
    return results


def dense_shapes(workload: str) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of the dense GEMMs of the workload's model."""
    cfg = json.loads((HERE / "models" / load_workloads()[workload]["model"] / "config.json").read_text())
    h, d = cfg["hidden_size"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    hq, hk = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {"qkv": ((hq + 2 * hk) * d, h), "o_proj": (h, hq * d), "lm_head": (cfg["vocab_size"], h)}
    if cfg.get("num_experts"):
        shapes["router"] = (cfg["num_experts"], h)
    else:
        shapes.update(gate_up=(2 * cfg["intermediate_size"], h), down=(h, cfg["intermediate_size"]))
    return shapes


# The rollout's GEMM calls per weight the sweep weighs configs by (grpo-dense-8b as profiled: a
# decode batch of 512 for 1,024 steps, 16 prefill chunks of 8,192 tokens; the LM head sees only the
# decode rows, a prefill keeps the last token's logits).
WORKLOAD_CALLS = {512: 1024, 8192: 16}
LM_HEAD_CALLS = {512: 1024}
SWEEP_ROWS = (1, 64, 512, 8192)


def _timed(fn, reps=20) -> float:
    """Median µs of fn over reps CUDA-event-timed calls, after 3 warm-up calls."""
    return cuda_median_s(fn, reps) * 1e6


def gemm(args) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from atom.ops.triton.invariant_gemm import gemm_config, invariant_gemm
    rows, best = [], {}
    layers = _num_layers(args.gemm)
    for name, (n, k) in dense_shapes(args.gemm).items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        sweep = {}
        for m in sorted({1, 8, 64, 512, 8192} | set(SWEEP_ROWS)):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"shape": name, "n": n, "k": k, "m": m, "cublas_us": round(_timed(lambda: F.linear(x, w)), 1),
                   "invariant_us": round(_timed(lambda: invariant_gemm(x, w)), 1), "config": gemm_config(n, k, 2)}
            if args.sweep and m in SWEEP_ROWS:
                row["sweep_us"] = sweep[m] = {str(c): round(_timed(lambda: invariant_gemm(x, w, config=as_config(c))), 1)
                                              for c in CANDIDATES}
                if m == 512:
                    row["same_bits"] = same_bits(lambda c: invariant_gemm(x, w, config=as_config(c)))
                    print(f"{name}: candidates with bitwise-equal outputs at M=512: {row['same_bits']}")
            print(f"{name:8s} N={n:6d} K={k:5d} M={m:5d}: cuBLAS {row['cublas_us']:8.1f} us, invariant "
                  f"{row['invariant_us']:8.1f} us ({row['invariant_us'] / row['cublas_us']:.2f}x)"
                  + (f"  sweep {row['sweep_us']}" if "sweep_us" in row else ""), flush=True)
            rows.append(row)
        if sweep:
            calls = LM_HEAD_CALLS if name == "lm_head" else WORKLOAD_CALLS
            times = {m: {r["m"]: r for r in rows if r["shape"] == name}[m] for m in calls}
            best[name] = _weigh(name, n, k, sweep, calls, times, 1 if name == "lm_head" else layers)
    if best:
        _print_best(best)
        if args.tuned:
            with open(args.tuned, "w") as f:
                json.dump({f"{b['n']},{b['k']}": as_config(b["candidate"]) for b in best.values()}, f, indent=1)
            print(f"fastest configs weighted by the workload -> {args.tuned}")
    return rows


def same_bits(run) -> list[list[int]]:
    """CANDIDATES indices grouped by bitwise-equal output (run(candidate) -> tensor). Which
    variants compute the same bits (TMA vs pointer loads, persistent or not, 64- vs 128-row
    tiles) says which could be swapped by M without breaking the invariance (not done: the
    engine's choice never looks at M)."""
    groups: list[tuple[object, list[int]]] = []
    for i, c in enumerate(CANDIDATES):
        out = run(c)
        for first, members in groups:
            if out.shape == first.shape and bool((out == first).all()):
                members.append(i)
                break
        else:
            groups.append((out, [i]))
    return [members for _, members in groups]


def _num_layers(workload: str) -> int:
    cfg = json.loads((HERE / "models" / load_workloads()[workload]["model"] / "config.json").read_text())
    return cfg["num_hidden_layers"]


def _weigh(name, n, k, sweep, calls, rows, layers) -> dict:
    """The candidate with the least time per rollout (Σ calls x µs over the workload's M), with
    the engine's current config's and cuBLAS's seconds per rollout (x layers) beside it."""
    def secs(us_at):
        return layers * sum(c * us_at(m) for m, c in calls.items()) / 1e6
    cand = min(CANDIDATES, key=lambda c: secs(lambda m: sweep[m][str(c)]))
    return {"n": n, "k": k, "candidate": cand, "best_s": secs(lambda m: sweep[m][str(cand)]),
            "now_s": secs(lambda m: rows[m]["invariant_us"]), "cublas_s": secs(lambda m: rows[m]["cublas_us"]),
            "at": {m: (sweep[m][str(cand)], rows[m]["invariant_us"], rows[m]["cublas_us"]) for m in calls},
            "small": {m: sweep[m][str(cand)] for m in SWEEP_ROWS if m not in calls}}


def _print_best(best: dict) -> None:
    """Per weight: the best candidate as a line for invariant_gemm.MEASURED, and what it saves."""
    print(f"best config per weight, weighted by the workload ({WORKLOAD_CALLS} calls at M; lm_head "
          f"{LM_HEAD_CALLS}), seconds per rollout (all layers): best / engine now / cuBLAS")
    total = [0.0, 0.0, 0.0]
    for name, b in best.items():
        c = b["candidate"]
        variant = "".join(f", {key}={v!r}" for key, v in (c[5] if len(c) > 5 else {}).items())
        at = "; ".join(f"M={m}: {t[0]} / {t[1]} / {t[2]} us" for m, t in b["at"].items())
        args = ", ".join(map(str, c[:5])) + variant
        print(f"        ({b['n']}, {b['k']}, 2): _cfg({args}),  # {name}: {b['best_s']:.2f} / "
              f"{b['now_s']:.2f} / {b['cublas_s']:.2f} s ({at}; M={list(b['small'])}: {list(b['small'].values())} us)")
        total = [t + v for t, v in zip(total, (b["best_s"], b["now_s"], b["cublas_s"]))]
    print(f"all weights: best {total[0]:.2f} s / engine now {total[1]:.2f} s / cuBLAS {total[2]:.2f} s per rollout")


def as_config(c: tuple) -> dict:
    """A CANDIDATES entry as an invariant_gemm config."""
    from atom.ops.triton.invariant_gemm import VARIANT_DEFAULTS
    return dict(block_m=c[0], block_n=c[1], block_k=c[2], num_warps=c[3], num_stages=c[4],
                **{**VARIANT_DEFAULTS, **(c[5] if len(c) > 5 else {})})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workloads", nargs="*", default=["grpo-moe", "grpo-dense-8b"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--check", action="store_true", help="also check one prompt's bits alone vs in the batch")
    ap.add_argument("--one", choices=["normal", "invariant"], help=argparse.SUPPRESS)  # a child process
    ap.add_argument("--gemm", metavar="W", default=None, help="GEMM micro-benchmark at W's model shapes")
    ap.add_argument("--sweep", action="store_true", help="with --gemm: every candidate tile config")
    ap.add_argument("--tuned", default=None, help="GEMM configs file: written by --gemm --sweep, read by rollouts")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.one:
        emit(one(args.workloads[0], args.one == "invariant", args.check, args.tuned), None)
        return 0
    result = {"gemm": gemm(args)} if args.gemm else {"rollouts": rollouts(args)}
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
