"""Rollout throughput benchmark: `python -m bench.rollout --workload NAME`.

Workloads (bench/workloads.json, copied from the project's shared definitions): prompts are
numpy.random.default_rng(seed).integers(0, 150000, size=(num_prompts, prompt_len)), each sampled
n times at temperature 1 with logprobs=0, ignore_eos, exactly output_len tokens each. Weights are
random (load_format="dummy") in the shapes of bench/models/<model>/config.json.

Prints generated tokens, seconds, tokens/s and the fraction of the physical limit:
  decode: bytes a step must read (weights it touches + KV of every sequence, a shared prompt read
          once per group) over the measured device copy bandwidth (bytes read + written / s);
  prefill: FLOPs over the measured bf16 matmul rate.
The limit is the sum over the steps of an ideal schedule (all sequences at once when they fit).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from bench.report import emit

HERE = Path(__file__).resolve().parent


def load_workloads() -> dict:
    data = json.loads((HERE / "workloads.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def measure_ceilings(cache: str | None) -> dict:
    """Device copy bandwidth (bytes read + written per s) and bf16 matmul rate, medians of events."""
    if cache and os.path.isfile(cache):
        return json.loads(Path(cache).read_text())
    import torch

    def timed(fn, reps):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return float(np.median(times))

    n = 1 << 30  # 2 GiB of bf16 per buffer: far past L2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), 10)
    copy_bw = 2 * src.numel() * 2 / t
    del src, dst
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    t = timed(lambda: a @ b, 10)
    flops = 2 * m ** 3 / t
    del a, b
    torch.cuda.empty_cache()
    out = {"copy_bytes_per_s": copy_bw, "bf16_flops_per_s": flops, "gpu": torch.cuda.get_device_name()}
    if cache:
        Path(cache).write_text(json.dumps(out))
    return out


def model_bytes(model) -> dict:
    """Parameter bytes by role: dense (read every step), per-layer expert stacks, embedding."""
    import torch

    seen, dense, experts, embed = set(), 0, [], 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        nbytes = p.numel() * p.element_size()
        if name.endswith(("w13", "w2")):
            experts.append((name, nbytes, p.shape[0]))
        elif "embed_tokens" in name:
            embed = nbytes
        else:
            dense += nbytes
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    return {"dense": dense + (embed if tied else 0), "experts": experts, "embed": embed, "tied": tied,
            "dtype_bytes": torch.empty((), dtype=next(model.parameters()).dtype).element_size()}


def physical_limit(w: dict, args, mb: dict, ceil: dict, max_num_seqs: int) -> dict:
    """Seconds an ideal engine needs: decode bytes / copy bandwidth + prefill FLOPs / matmul rate."""
    bw, rate = ceil["copy_bytes_per_s"], ceil["bf16_flops_per_s"]
    layers, hk, d = args.num_hidden_layers, args.num_key_value_heads, args.head_dim
    kv_token = 2 * layers * hk * d * mb["dtype_bytes"]
    total_seqs = w["num_prompts"] * w["n"]
    per_wave = max(1, min(total_seqs, max_num_seqs) // w["n"]) * w["n"]
    decode_s = 0.0
    left = total_seqs
    while left > 0:
        b = min(per_wave, left)
        groups = b // w["n"]
        for j in range(w["output_len"]):
            kv = groups * w["prompt_len"] * kv_token + b * j * kv_token
            weights = mb["dense"]
            for _, nbytes, e in mb["experts"]:
                touched = e * (1 - (1 - args.num_experts_per_tok / e) ** b)
                weights += nbytes * touched / e
            decode_s += (weights + kv) / bw
        left -= b
    # Prefill: 2 FLOPs per weight per token (experts: top-k of E), causal attention 2 * 2 * ctx/2.
    # Per prompt token: every dense weight but the LM head (applied to the last token only).
    active_params = (mb["dense"] - args.vocab_size * args.hidden_size * mb["dtype_bytes"]) / mb["dtype_bytes"]
    for _, nbytes, e in mb["experts"]:
        active_params += nbytes / mb["dtype_bytes"] * args.num_experts_per_tok / e
    tokens = w["num_prompts"] * w["prompt_len"]
    attn = 4 * layers * args.num_attention_heads * d * w["num_prompts"] * w["prompt_len"] ** 2 / 2
    prefill_s = (2 * active_params * tokens + attn) / rate
    return {"decode_s": decode_s, "prefill_s": prefill_s, "total_s": decode_s + prefill_s,
            "kv_bytes_per_token": kv_token}


def make_prompts(w: dict, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 150000, size=(w["num_prompts"], w["prompt_len"])).tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", required=True, choices=sorted(load_workloads()))
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: all sequences, at most 1024")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--op", action="append", default=[], help="op_backends override NAME=BACKEND")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--ceilings", default=os.environ.get("ATOM_BENCH_CEILINGS", "/tmp/atom_ceilings.json"))
    ap.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    ap.add_argument("--profile", action="store_true", help="print per-phase timers of the engine loop")
    ap.add_argument("--torch-profile", default=None,
                    help="profile the timed call (torch.profiler, CUDA kernels incl. graph replays); table -> FILE")
    ap.add_argument("--profile-steps", default=None, metavar="A:B",
                    help="with --torch-profile: profile only engine steps [A, B) (CPU + CUDA, chrome trace "
                         "next to the table)")
    ap.add_argument("--tuned", default=None, help="kernel configs from `python -m bench.kernels --tune FILE`")
    # Multi-GPU (launch with torchrun; every rank runs the same workload, SPMD; rank 0 reports).
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--expert-parallel-size", type=int, default=1)
    ap.add_argument("--ep-mode", default="allreduce", choices=["allreduce", "alltoall"])
    # What the options cost: routed-expert capture (issue 18) and extra sampling options (issue 15).
    ap.add_argument("--routed-experts", action="store_true", help="capture the routed experts of every token")
    ap.add_argument("--sampling", action="append", default=[], metavar="KEY=JSON",
                    help="an extra SamplingParams option, e.g. repetition_penalty=1.1")
    opts = ap.parse_args(argv)

    import torch

    from atom import RolloutEngine, SamplingParams
    from atom.config import EngineConfig

    w = load_workloads()[opts.workload]
    if opts.tuned and os.path.isfile(opts.tuned):
        from bench.kernels import apply_tuned
        apply_tuned(opts.tuned)
    rank = int(os.environ.get("RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one GPU per rank
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    ceil = measure_ceilings(opts.ceilings)
    total_seqs = w["num_prompts"] * w["n"]
    max_num_seqs = opts.max_num_seqs or min(total_seqs, 1024)
    cfg = EngineConfig(model=str(HERE / "models" / w["model"]), load_format="dummy", dtype="bfloat16",
                       max_model_len=w["prompt_len"] + w["output_len"], max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=opts.max_num_batched_tokens, cuda_graph_max_batch_size=max_num_seqs,
                       enforce_eager=opts.enforce_eager, op_backends=dict(o.split("=", 1) for o in opts.op),
                       tensor_parallel_size=opts.tensor_parallel_size, expert_parallel_size=opts.expert_parallel_size,
                       ep_mode=opts.ep_mode, enable_return_routed_experts=opts.routed_experts)
    extra = {k: json.loads(v) for k, v in (o.split("=", 1) for o in opts.sampling)}
    if opts.routed_experts:
        extra["return_routed_experts"] = True
    t0 = time.perf_counter()
    engine = RolloutEngine(cfg)
    build_s = time.perf_counter() - t0
    runner = engine._engine.runner
    params = SamplingParams(n=w["n"], temperature=w["temperature"], top_p=w["top_p"], max_tokens=w["output_len"],
                            ignore_eos=True, logprobs=w["logprobs"], seed=None, **extra)
    warm_s = 0.0
    if not opts.no_warmup:  # other prompts (no prefix-cache hits later), few tokens: compiles and captures
        t0 = time.perf_counter()
        warm = SamplingParams(n=w["n"], temperature=w["temperature"], top_p=w["top_p"], max_tokens=4,
                              ignore_eos=True, logprobs=w["logprobs"], **extra)
        engine.generate(make_prompts(w, w["seed"] + 1), warm)
        torch.cuda.synchronize()
        warm_s = time.perf_counter() - t0
    prompts = make_prompts(w, w["seed"])
    phases = instrument(engine._engine)
    dr = getattr(runner, "decode_runner", None)
    if dr is not None:
        dr.timers.update({k: 0 for k in dr.timers})
    stats0 = dict(vars(engine.stats))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if opts.torch_profile and opts.profile_steps:
        prof, window = profile_window(engine._engine, *map(int, opts.profile_steps.split(":")))
        outs = engine.generate(prompts, params)
        torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=70)
        head = (f"steps {opts.profile_steps}: wall {window['wall_s'] * 1e3:.2f} ms, GPU kernels {busy * 1e3:.2f} ms "
                f"({busy / max(window['wall_s'], 1e-9):.1%} busy)\n")
        Path(opts.torch_profile).write_text(head + table)
        prof.export_chrome_trace(str(Path(opts.torch_profile).with_suffix(".trace.json")))
        print(head + table)
    elif opts.torch_profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            outs = engine.generate(prompts, params)
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=70)
        Path(opts.torch_profile).write_text(table)
        print(table)
    else:
        outs = engine.generate(prompts, params)
        torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    stats = {k: v - stats0.get(k, 0) for k, v in vars(engine.stats).items() if isinstance(v, (int, float))}
    generated = sum(len(c.token_ids) for o in outs for c in o.outputs)
    assert all(len(c.token_ids) == w["output_len"] for o in outs for c in o.outputs)
    assert all(len(c.logprobs) == w["output_len"] for o in outs for c in o.outputs)
    mb = model_bytes(runner.model)
    limit = physical_limit(w, runner.args, mb, ceil, max_num_seqs)
    result = {
        "workload": opts.workload, "engine": "+".join(["atom", *sorted(extra)]), "generated_tokens": generated, "seconds": round(secs, 3),
        "tok_per_s": round(generated / secs, 1), "fraction_of_limit": round(limit["total_s"] / secs, 3),
        "limit_s": round(limit["total_s"], 3), "limit_decode_s": round(limit["decode_s"], 3),
        "limit_prefill_s": round(limit["prefill_s"], 3), "build_s": round(build_s, 1), "warmup_s": round(warm_s, 1),
        "max_num_seqs": max_num_seqs, "num_kv_blocks": engine._engine.block_manager.num_blocks,
        "enforce_eager": opts.enforce_eager, "backends": sorted(set(runner_backends().values())),
        "ceilings": ceil, "stats": stats, "gpu": torch.cuda.get_device_name(),
        "tensor_parallel_size": opts.tensor_parallel_size, "expert_parallel_size": opts.expert_parallel_size,
        "ep_mode": opts.ep_mode,
        "phases_s": {k: round(v, 3) for k, v in phases.items()},
        "decode_runner_s": {k: round(v, 3) for k, v in (dr.timers.items() if dr is not None else [])},
        "graphs": sorted(dr.graphs) if dr is not None else [],
    }
    if rank != 0:  # multi-GPU: rank 0 reports (the limit above counts this rank's weight shards on one GPU)
        return 0
    print(f"{opts.workload}: {generated} tokens in {secs:.2f} s = {generated / secs:,.0f} tok/s; "
          f"physical limit {limit['total_s']:.2f} s (decode {limit['decode_s']:.2f} + prefill "
          f"{limit['prefill_s']:.2f}) -> {limit['total_s'] / secs:.1%} of it")
    print("phases (s):", result["phases_s"], "decode runner:", result["decode_runner_s"], "graphs:", result["graphs"])
    emit(result, opts.json)
    return 0


def profile_window(llm, first: int, last: int):
    """A torch profiler (CPU + CUDA) that runs from engine step `first` to step `last` (steps
    counted by post-processing calls); returns it and a dict that receives the window's wall time."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    window = {"wall_s": 0.0}
    post, count = llm._finish_step, [0]

    def counted(*a, **k):
        out = post(*a, **k)
        count[0] += 1
        if count[0] == first:
            torch.cuda.synchronize()
            prof.start()
            window["t0"] = time.perf_counter()
        elif count[0] == last:
            torch.cuda.synchronize()
            window["wall_s"] = time.perf_counter() - window["t0"]
            prof.stop()
        return out
    llm._finish_step = counted
    return prof, window


def instrument(llm) -> dict:
    """Wall time of the engine loop's phases (schedule / execute / postprocess), accumulated."""
    timers = {"schedule": 0.0, "execute": 0.0, "postprocess": 0.0}

    def wrap(obj, name, key):
        fn = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[key] += time.perf_counter() - t
        setattr(obj, name, timed)
    wrap(llm.scheduler, "schedule", "schedule")
    wrap(llm.runner, "execute", "execute")
    wrap(llm, "_finish_step", "postprocess")
    return timers


def runner_backends() -> dict:
    from atom.ops import ops
    return dict(ops.backend_of)


if __name__ == "__main__":
    sys.exit(main())
