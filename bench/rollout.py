"""Rollout throughput benchmark: `python -m bench.rollout --workload NAME`.

Workloads (bench/workloads.json, copied from the project's shared definitions): prompts are
numpy.random.default_rng(seed).integers(0, 150000, size=(num_prompts, prompt_len)), each sampled
n times at temperature 1 with logprobs=0, ignore_eos, exactly output_len tokens each. Weights are
random (load_format="dummy") in the shapes of bench/models/<model>/config.json.

Prints generated tokens, seconds, tokens/s and the fraction of the physical limit:
  decode: bytes a step must read (weights it touches + KV of every sequence, a shared prompt read
          once per group) over the measured device copy bandwidth (bytes read + written / s);
  prefill: FLOPs over the measured bf16 matmul rate.
The limit is the sum over the steps of an ideal schedule (all sequences at once when they fit);
bench/limits.py says how each family's weights and KV are counted (MLA's latent rows, sliding
windows, experts).

A smoke run on the CPU at a small scale (same code path, a shrunk config, no ceilings cache):
  python -m bench.rollout --workload grpo-mla-moe --device cpu --model-dir DIR --set num_prompts=2 ...
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from bench.compile_watch import CompileWatch
from bench.limits import active_bytes_per_token, model_bytes, physical_limit
from bench.report import emit
from bench.timing import cuda_median_s

HERE = Path(__file__).resolve().parent


def load_workloads() -> dict:
    data = json.loads((HERE / "workloads.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def cpu_ceilings() -> dict:
    """The CPU's copy bandwidth and bf16 matmul rate (small buffers, best of a few: a smoke run's
    fraction of the limit, never cached next to the GPU's)."""
    import torch

    def best(fn, reps=5):
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)
    src = torch.randn(1 << 24)
    dst = torch.empty_like(src)
    a = torch.randn(512, 512, dtype=torch.bfloat16)
    return {"copy_bytes_per_s": 2 * src.numel() * 4 / best(lambda: dst.copy_(src)),
            "bf16_flops_per_s": 2 * 512 ** 3 / best(lambda: a @ a), "gpu": "cpu"}


def measure_ceilings(cache: str | None) -> dict:
    """Device copy bandwidth (bytes read + written per s) and bf16 matmul rate, medians of events."""
    if cache and os.path.isfile(cache):
        return json.loads(Path(cache).read_text())
    import torch

    n = 1 << 30  # 2 GiB of bf16 per buffer: far past L2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = cuda_median_s(lambda: dst.copy_(src), 10)
    copy_bw = 2 * src.numel() * 2 / t
    src = dst = None  # free the 4 GiB before the matmul
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    t = cuda_median_s(lambda: a @ b, 10)
    flops = 2 * m ** 3 / t
    a = b = None
    torch.cuda.empty_cache()
    out = {"copy_bytes_per_s": copy_bw, "bf16_flops_per_s": flops, "gpu": torch.cuda.get_device_name()}
    if cache:
        Path(cache).write_text(json.dumps(out))
    return out


SIZE_KEYS = ("num_prompts", "n", "prompt_len", "output_len")


def resized(w: dict, overrides: list[str]) -> dict:
    """The workload with KEY=INT size changes (a smoke run at a small scale)."""
    w = dict(w)
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in SIZE_KEYS or not value.isdigit() or int(value) < 1:
            raise SystemExit(f"--set {item!r}: want KEY=INT with KEY one of {SIZE_KEYS} and INT >= 1")
        w[key] = int(value)
    return w


def make_prompts(w: dict, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 150000, size=(w["num_prompts"], w["prompt_len"])).tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", required=True, choices=sorted(load_workloads()))
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: all sequences, at most 1024")
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384,
                    help="tokens a step (configs/engine/gpu.yaml's 16,384; 8,192 until session 19)")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--op", action="append", default=[], help="op_backends override NAME=BACKEND")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--ceilings", default=os.environ.get("ATOM_BENCH_CEILINGS", "/tmp/atom_ceilings.json"))
    ap.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    ap.add_argument("--torch-profile", default=None,
                    help="profile the timed call (torch.profiler, CUDA kernels incl. graph replays); table -> FILE")
    ap.add_argument("--profile-steps", default=None, metavar="A:B",
                    help="with --torch-profile: profile only engine steps [A, B) (CPU + CUDA, chrome trace "
                         "next to the table)")
    ap.add_argument("--profile-stack", action="store_true",
                    help="with --profile-steps: record Python frames too (host time by function; slows the host)")
    ap.add_argument("--engine", action="append", default=[], metavar="KEY=JSON",
                    help="an extra EngineConfig field, e.g. enable_prefix_caching=false")
    ap.add_argument("--no-pdl", action="store_true",
                    help="launch the Triton kernels without programmatic dependent launch (atom/ops/triton/pdl.py)")
    ap.add_argument("--tuned", default=None, help="kernel configs from `python -m bench.kernels --tune FILE`")
    # Multi-GPU (launch with torchrun; every rank runs the same workload, SPMD; rank 0 reports).
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--expert-parallel-size", type=int, default=1)
    ap.add_argument("--ep-mode", default="allreduce", choices=["allreduce", "alltoall"])
    # What the options cost: routed-expert capture (issue 18) and extra sampling options (issue 15).
    ap.add_argument("--routed-experts", action="store_true", help="capture the routed experts of every token")
    ap.add_argument("--sampling", action="append", default=[], metavar="KEY=JSON",
                    help="an extra SamplingParams option, e.g. repetition_penalty=1.1")
    # Smoke runs at a small scale (e.g. on the CPU with a shrunk config; tests/test_bench_limits.py).
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--model-dir", default=None, help="a config directory instead of bench/models/<model>")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=INT", dest="overrides",
                    help=f"change a workload size: {', '.join(SIZE_KEYS)}")
    opts = ap.parse_args(argv)
    steps = profile_range(opts.profile_steps) if opts.profile_steps else None  # bad input fails before the build

    import torch

    from atom import RolloutEngine, SamplingParams
    from atom.config import EngineConfig

    w = resized(load_workloads()[opts.workload], opts.overrides)
    cuda = opts.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if opts.no_pdl:
        from atom.ops.triton import pdl
        pdl.set_enabled(False)
    if opts.tuned and os.path.isfile(opts.tuned):
        from bench.kernels import apply_tuned
        apply_tuned(opts.tuned)
    rank = int(os.environ.get("RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one GPU per rank
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    ceil = measure_ceilings(opts.ceilings) if cuda else cpu_ceilings()
    total_seqs = w["num_prompts"] * w["n"]
    max_num_seqs = opts.max_num_seqs or min(total_seqs, 1024)
    cfg = EngineConfig(model=opts.model_dir or str(HERE / "models" / w["model"]), device=opts.device,
                       load_format="dummy", dtype="bfloat16",
                       max_model_len=w["prompt_len"] + w["output_len"], max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=opts.max_num_batched_tokens, cuda_graph_max_batch_size=max_num_seqs,
                       enforce_eager=opts.enforce_eager, op_backends=dict(o.split("=", 1) for o in opts.op),
                       tensor_parallel_size=opts.tensor_parallel_size, expert_parallel_size=opts.expert_parallel_size,
                       ep_mode=opts.ep_mode, enable_return_routed_experts=opts.routed_experts,
                       **key_json(opts.engine))
    extra = key_json(opts.sampling)
    if opts.routed_experts:
        extra["return_routed_experts"] = True
    t0 = time.perf_counter()
    engine = RolloutEngine(cfg)
    build_s = time.perf_counter() - t0
    probe = engine.probe()
    params = SamplingParams(n=w["n"], temperature=w["temperature"], top_p=w["top_p"], max_tokens=w["output_len"],
                            ignore_eos=True, logprobs=w["logprobs"], seed=None, **extra)
    warm_s = 0.0
    if not opts.no_warmup:  # other prompts (no prefix-cache hits later), few tokens: compiles what the
        # start-up graph capture does not (prefill, mixed steps); 16 tokens keep rows decoding through
        # every prefill step, so the mixed steps' eager decode kernels see the run's batch sizes
        t0 = time.perf_counter()
        warm = SamplingParams(n=w["n"], temperature=w["temperature"], top_p=w["top_p"],
                              max_tokens=min(16, w["output_len"]),
                              ignore_eos=True, logprobs=w["logprobs"], **extra)
        engine.generate(make_prompts(w, w["seed"] + 1), warm)
        sync()
        warm_s = time.perf_counter() - t0
    prompts = make_prompts(w, w["seed"])
    phases = probe.install_phase_timers()
    probe.reset_decode_runner_timers()
    stats0 = dict(vars(engine.stats))
    graphs0 = probe.decode_runner_stats().graphs
    watch = CompileWatch().__enter__()  # kernels the warm-up left to the timed run
    sync()
    t0 = time.perf_counter()
    if opts.torch_profile and steps:
        window = probe.profile_steps(*steps, with_stack=opts.profile_stack)
        outs = engine.generate(prompts, params)
        sync()
        secs = time.perf_counter() - t0
        probe.finish_profile()
        if not window.started:
            raise SystemExit(f"--profile-steps {opts.profile_steps}: the run had only {window.steps} steps")
        prof = window.profiler
        busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=70)
        head = (f"steps {opts.profile_steps}: wall {window.wall_s * 1e3:.2f} ms, GPU kernels {busy * 1e3:.2f} ms "
                f"({busy / max(window.wall_s, 1e-9):.1%} busy)\n")
        Path(opts.torch_profile).write_text(head + table)
        prof.export_chrome_trace(str(Path(opts.torch_profile).with_suffix(".trace.json")))
        print(head + table)
    elif opts.torch_profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            outs = engine.generate(prompts, params)
            sync()
        secs = time.perf_counter() - t0
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=70)
        Path(opts.torch_profile).write_text(table)
        print(table)
    else:
        outs = engine.generate(prompts, params)
        sync()
        secs = time.perf_counter() - t0
    watch.__exit__()
    probe.remove_phase_timers()
    decode = probe.decode_runner_stats()
    stats = {k: v - stats0.get(k, 0) for k, v in vars(engine.stats).items() if isinstance(v, (int, float))}
    generated = sum(len(c.token_ids) for o in outs for c in o.outputs)
    assert all(len(c.token_ids) == w["output_len"] for o in outs for c in o.outputs)
    assert all(len(c.logprobs) == w["output_len"] for o in outs for c in o.outputs)
    prompt_end = phases.prompt_steps_end_at - t0
    mb = model_bytes(probe.model)
    limit = physical_limit(w, probe.model_args, mb, ceil, max_num_seqs)
    weights = {"dense": mb["dense"], "experts": sum(nbytes for _, nbytes, _ in mb["experts"]),
               "active_per_token": round(active_bytes_per_token(probe.model_args, mb)),
               "kv_per_token": limit["kv_bytes_per_token"]}
    result = {
        "workload": opts.workload, "engine": "+".join(["atom", *sorted(extra)]), "generated_tokens": generated, "seconds": round(secs, 3),
        "tok_per_s": round(generated / secs, 1), "fraction_of_limit": round(limit["total_s"] / secs, 3),
        "limit_s": round(limit["total_s"], 3), "limit_decode_s": round(limit["decode_s"], 3),
        "limit_prefill_s": round(limit["prefill_s"], 3), "build_s": round(build_s, 1), "warmup_s": round(warm_s, 1),
        "max_num_seqs": max_num_seqs, "num_kv_blocks": engine.num_kv_blocks,
        "enforce_eager": opts.enforce_eager, "backends": sorted(set(runner_backends().values())),
        "ceilings": ceil, "stats": stats, "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "model_bytes": weights, "workload_sizes": {k: w[k] for k in SIZE_KEYS},
        "tensor_parallel_size": opts.tensor_parallel_size, "expert_parallel_size": opts.expert_parallel_size,
        "ep_mode": opts.ep_mode,
        "phases_s": {k: round(v, 3) for k, v in phases.as_dict().items()},
        "prompt_steps_end_s": round(prompt_end, 3),
        "decode_tail_ms_per_step": round((secs - prompt_end) * 1e3 / max(phases.decode_steps_after, 1), 3),
        "decode_runner_s": {k: round(v, 3) for k, v in decode.timers.items()},
        "graphs": decode.graphs,
        "in_run": {"triton_compiles": watch.summary(), "graphs_captured": sorted(set(decode.graphs) - set(graphs0))},
    }
    if rank != 0:  # multi-GPU: rank 0 reports (the limit above counts this rank's weight shards on one GPU)
        return 0
    print(f"{opts.workload}: {generated} tokens in {secs:.2f} s = {generated / secs:,.0f} tok/s; "
          f"physical limit {limit['total_s']:.2f} s (decode {limit['decode_s']:.2f} + prefill "
          f"{limit['prefill_s']:.2f}) -> {limit['total_s'] / secs:.1%} of it")
    print(f"prompt steps done at {prompt_end:.2f} s; then {phases.decode_steps_after} decode steps, "
          f"{result['decode_tail_ms_per_step']:.2f} ms a step")
    print("phases (s):", result["phases_s"], "decode runner:", result["decode_runner_s"], "graphs:", result["graphs"])
    print("inside the timed run:", result["in_run"])
    emit(result, opts.json)
    return 0


def key_json(items: list[str]) -> dict:
    """KEY=JSON options (--engine, --sampling) as a dict."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{item!r}: want KEY=JSON")
        out[key] = json.loads(value)
    return out


def profile_range(text: str) -> tuple[int, int]:
    """--profile-steps A:B as (A, B), engine steps [A, B) of the timed call."""
    a, sep, b = text.partition(":")
    if not sep or not a.isdigit() or not b.isdigit() or int(a) >= int(b):
        raise SystemExit(f"--profile-steps {text!r}: want A:B with integers 0 <= A < B")
    return int(a), int(b)


def runner_backends() -> dict:
    from atom.ops import ops
    return dict(ops.backend_of)


if __name__ == "__main__":
    sys.exit(main())
