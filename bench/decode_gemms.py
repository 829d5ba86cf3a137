"""The decode step's GEMMs at a model's shapes, and the shared experts folded into the routed ones.

    python -m bench.decode_gemms [--model moonlight-16b-a3b] [--rows 512]

1. Every dense GEMM of one decode step (cuBLAS through F.linear), µs a call and TFLOP/s, with
   the tile count a 128 x 128 tiling gives against the SMs (a GEMM of fewer tiles than SMs
   leaves the rest idle).
2. DeepSeek-V3's MoE layer two ways (CUDA graphs of 20 calls, median a call):
   separate  the routed experts (fused_moe, top-k) + the shared experts (gate|up GEMM,
             SiLU-and-mul, down GEMM) + the add: what the model runs today;
   folded    the shared experts cut into n_shared experts of moe_intermediate_size each and
             appended to the routed ones, every token routed to them with weight 1: one fused
             MoE of top-k + n_shared experts (SGLang's "shared experts fusion").
   The two outputs are compared (bf16 sums in different orders: a small difference).
   Measured on the H200 (session 20): folded is slower (352.6 against 336.5 us a layer at 512
   rows), so the model keeps the shared experts apart.
3. With --sweep: the Triton GEMM (atom/ops/triton/invariant_gemm.py) over bench.batch_invariant's
   tile candidates and a few narrower tiles, for the GEMMs of fewer 128 x 128 tiles than SMs
   (does a tile count that fills the SMs beat cuBLAS there?).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

MODELS = Path(__file__).resolve().parent / "models"


def _graph_us(fn, calls: int = 20) -> float:
    from bench.timing import cuda_median_s, graph_of
    return cuda_median_s(graph_of(fn, calls).replay, reps=10) / calls * 1e6


def _config(model: str) -> dict:
    return json.loads((MODELS / model / "config.json").read_text())


def dense_gemms(c: dict, rows: int, dev, dt) -> list[dict]:
    import torch
    import torch.nn.functional as F
    h = c["hidden_size"]
    heads = c["num_attention_heads"]
    q_cols = heads * (c["qk_nope_head_dim"] + c["qk_rope_head_dim"])
    shapes = {"qkv_a (q_proj | kv_a)": (q_cols + c["kv_lora_rank"] + c["qk_rope_head_dim"], h),
              "o_proj": (h, heads * c["v_head_dim"]),
              "shared gate|up": (2 * c["moe_intermediate_size"] * c["n_shared_experts"], h),
              "shared down": (h, c["moe_intermediate_size"] * c["n_shared_experts"]),
              "dense gate|up (first layers)": (2 * c["intermediate_size"], h),
              "dense down (first layers)": (h, c["intermediate_size"]),
              "lm_head": (c["vocab_size"], h)}
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    out = []
    for name, (n, k) in shapes.items():
        x = torch.randn(rows, k, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt) * k ** -0.5
        us = _graph_us(lambda: F.linear(x, w))
        tiles = -(-rows // 128) * -(-n // 128)
        out.append({"gemm": name, "n": n, "k": k, "us": round(us, 2), "tflops": round(2 * rows * n * k / us / 1e6, 1),
                    "tiles_128": tiles, "sms": sms})
        print(f"{name:30s} [{rows} x {k}] x [{k} x {n}]  {us:8.2f} us  {out[-1]['tflops']:6.1f} TFLOP/s  "
              f"{tiles} tiles of 128x128 / {sms} SMs", flush=True)
    return out


# Narrower tiles than bench.batch_invariant's: 2-4x the 128 x 128 tile count.
_NARROW = [(64, 64, 64, 4, 4), (64, 64, 128, 4, 3), (64, 128, 128, 4, 3), (32, 128, 128, 4, 4), (64, 32, 128, 4, 4)]


def sweep(c: dict, rows: int, dense: list[dict], dev, dt) -> dict:
    """µs of each candidate config on the GEMMs that leave SMs idle at 128 x 128 tiles."""
    import torch

    from atom.ops.triton.invariant_gemm import invariant_gemm
    from bench.batch_invariant import CANDIDATES, as_config
    cands = CANDIDATES + [(*t, {}) for t in _NARROW]
    out = {}
    for row in dense:
        if row["tiles_128"] >= 2 * row["sms"]:
            continue
        x = torch.randn(rows, row["k"], device=dev, dtype=dt)
        w = torch.randn(row["n"], row["k"], device=dev, dtype=dt) * row["k"] ** -0.5
        times = {}
        for cand in cands:
            try:
                times[str(cand)] = round(_graph_us(lambda: invariant_gemm(x, w, config=as_config(cand))), 2)
            except Exception as exc:  # a config the shape cannot take (shared memory): skipped, said
                times[str(cand)] = f"failed: {type(exc).__name__}"
        ok = {k: v for k, v in times.items() if isinstance(v, float)}
        best = min(ok, key=ok.get)
        out[row["gemm"]] = {"cublas_us": row["us"], "best": best, "best_us": ok[best], "all": times}
        print(f"{row['gemm']:30s} rows {rows}: cuBLAS {row['us']:.2f} us, best Triton {ok[best]:.2f} us {best}",
              flush=True)
    return out


def shared_fold(c: dict, rows: int, dev, dt, experts=None, timer=None) -> dict:
    """The two forms' outputs compared and timed. `experts(x, w13, w2, weights, ids, up_cfg, down_cfg)`
    is the fused MoE (default: the Triton one); `timer(fn)` gives us a call (default: CUDA graphs)."""
    import torch

    from atom.ops import ops
    from atom.ops.moe_tiles import moe_configs, shape_of
    if experts is None:
        from atom.ops.triton.moe import fused_moe_with as experts
    fused_moe_with, timer = experts, timer or _graph_us
    h, inter, e = c["hidden_size"], c["moe_intermediate_size"], c["n_routed_experts"]
    ns, k = c["n_shared_experts"], c["num_experts_per_tok"]
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(rows, h, device=dev, dtype=dt, generator=g)
    w13 = torch.randn(e + ns, 2 * inter, h, device=dev, dtype=dt, generator=g) * h ** -0.5
    w2 = torch.randn(e + ns, h, inter, device=dev, dtype=dt, generator=g) * inter ** -0.5
    ids = torch.rand(rows, e, device=dev, generator=g).argsort(dim=1)[:, :k].contiguous()
    weights = torch.rand(rows, k, device=dev, generator=g)
    weights = weights / weights.sum(1, keepdim=True) * c.get("routed_scaling_factor", 1.0)
    # The shared experts as one gated MLP: gate rows [g_0 .. g_ns-1], up rows likewise.
    sg = torch.cat([w13[e + j, :inter] for j in range(ns)] + [w13[e + j, inter:] for j in range(ns)])
    sd = torch.cat([w2[e + j] for j in range(ns)], dim=1)
    r13, r2 = w13[:e], w2[:e]
    up, down = moe_configs(rows, shape_of(r13))
    ids_f = torch.cat([ids, torch.arange(e, e + ns, device=dev).expand(rows, ns)], 1).contiguous()
    w_f = torch.cat([weights, torch.ones(rows, ns, device=dev)], 1).contiguous()

    def separate():
        y = fused_moe_with(x, r13, r2, weights, ids, up, down)
        return y + ops.linear(ops.silu_and_mul(ops.linear(x, sg)), sd)

    def folded():
        return fused_moe_with(x, w13, w2, w_f, ids_f, up, down)

    def routed():
        return fused_moe_with(x, r13, r2, weights, ids, up, down)

    def shared():
        return ops.linear(ops.silu_and_mul(ops.linear(x, sg)), sd)

    a, b = separate(), folded()
    diff = (a.float() - b.float()).abs().max().item()
    scale = a.float().abs().max().item()
    res = {"rows": rows, "up_cfg": up, "down_cfg": down, "max_abs_diff": diff, "max_abs": scale}
    for name, fn in (("separate", separate), ("folded", folded), ("routed only", routed), ("shared only", shared)):
        res[name + "_us"] = round(timer(fn), 2)
        print(f"MoE layer {name:12s} {res[name + '_us']:8.2f} us", flush=True)
    print(f"folded vs separate: max |diff| {diff:.3g} of max |y| {scale:.3g}", flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="moonlight-16b-a3b")
    ap.add_argument("--rows", type=int, nargs="+", default=[512, 256])
    ap.add_argument("--sweep", action="store_true", help="also the Triton GEMM's tile candidates")
    ap.add_argument("--no-fold", action="store_true", help="skip the shared-experts fold comparison")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    from atom.ops import ops
    c = _config(args.model)
    dev, dt = torch.device("cuda"), torch.bfloat16
    ops.configure(dev)
    result = {"model": args.model, "device": torch.cuda.get_device_name(dev), "runs": []}
    for rows in args.rows:
        dense = dense_gemms(c, rows, dev, dt)
        fold = not args.no_fold and c.get("n_shared_experts")
        result["runs"].append({"rows": rows, "dense": dense, "moe": shared_fold(c, rows, dev, dt) if fold else None,
                               "sweep": sweep(c, rows, dense, dev, dt) if args.sweep else None})
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
