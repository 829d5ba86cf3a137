"""Host cost of the asynchronous front end: `python -m bench.async_rollout MODE`.

  cpu-tiny           4,096 requests of 32 tokens on a tiny random Llama (CPU): the batch call
                     against the same prompts as concurrent coroutines (goal: async >= 95%).
  cpu-grpo           grpo-moe's request structure on a tiny random Llama (CPU, the overlapped
                     decode loop): 64 prompts x n=8 as one batch call, then as 512 concurrent
                     n=1 requests (8 per prompt); --prompt-len / --output-len (default 128 / 64),
                     token budget 8 prompts per step as on the GPU. Compares steps and prompt
                     tokens computed as well as tokens/s.
  concurrent W       workload W (e.g. grpo-moe) as one batch call, then as num_prompts * n
                     concurrent n=1 requests (GPU; goal: async >= 97% of batch).
  arrival W          workload W (agent-async-moe) submitted one by one, request i at i * 5 ms;
                     throughput = tokens / seconds from the first submission to the last completion.
  late-join W        while W's batch decodes (512 sequences), one more request arrives: how many
                     engine steps were launched after its arrival before the one that ran its
                     prefill (RequestMetrics.steps_waited, engine-side; goal: at most one).

Batch and async runs alternate on fresh prompts (no prefix-cache hits between runs); the best of
each is reported.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import time

import numpy as np
from bench.report import emit


def tiny_llama_dir(max_positions: int = 256) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=max_positions,
                      bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    path = tempfile.mkdtemp(prefix="atom_bench_tiny_")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


async def run_async(engine, prompts, params, spacing_s: float = 0.0) -> tuple[list, float]:
    t0 = time.perf_counter()

    async def one(i, p):
        if spacing_s:
            await asyncio.sleep(max(0.0, t0 + i * spacing_s - time.perf_counter()))
        return await engine.generate(p, params, request_id=f"r{i}")
    outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return outs, time.perf_counter() - t0


def sync_device() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compare(engine, prompt_sets, params_batch, params_async, expand: int, spacing_s: float = 0.0) -> dict:
    """Alternate batch and async runs over fresh prompt sets; best tokens/s of each."""
    from atom import AsyncRolloutEngine
    best = {"batch": 0.0, "async": 0.0}
    front = AsyncRolloutEngine(engine)
    try:
        for k, prompts in enumerate(prompt_sets):
            mode = "batch" if k % 2 == 0 else "async"
            stats0 = dataclasses.replace(engine.stats)
            sync_device()
            if mode == "batch":
                t0 = time.perf_counter()
                outs = engine.generate(prompts, params_batch)
                sync_device()
                secs = time.perf_counter() - t0
            else:
                outs, secs = asyncio.run(run_async(front, [p for p in prompts for _ in range(expand)],
                                                   params_async, spacing_s))
            tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
            best[mode] = max(best[mode], tokens / secs)
            steps, computed = engine.stats.steps - stats0.steps, engine.stats.prompt_tokens_computed - stats0.prompt_tokens_computed
            best[f"{mode}_steps"], best[f"{mode}_prompt_tokens_computed"] = steps, computed
            print(f"  {mode:5s} run: {tokens} tokens in {secs:.2f} s = {tokens / secs:,.0f} tok/s, {steps} engine steps, "
                  f"{computed} prompt tokens computed", flush=True)
    finally:
        front.close()
    best["async_over_batch"] = best["async"] / best["batch"] if best["batch"] else None
    return best


def cpu_tiny(args) -> dict:
    from atom import RolloutEngine, SamplingParams
    engine = RolloutEngine(tiny_llama_dir(), device="cpu", max_num_seqs=256, num_kv_blocks=4096, max_model_len=64)
    rng = np.random.default_rng(0)
    sets = [rng.integers(2, 512, size=(args.requests, 16)).tolist() for _ in range(2 * args.repeats)]
    sp = SamplingParams(temperature=1.0, max_tokens=32, ignore_eos=True, logprobs=0)
    engine.generate(sets[0][:64], sp)  # warm-up
    return compare(engine, sets, sp, sp, expand=1)


def cpu_grpo(args) -> dict:
    from atom import RolloutEngine, SamplingParams
    P, O, prompts, n = args.prompt_len, args.output_len, 64, 8
    engine = RolloutEngine(tiny_llama_dir(P + O), device="cpu", max_num_seqs=prompts * n, max_model_len=P + O,
                           num_kv_blocks=(prompts * n + 8) * -(-(P + O) // 16), max_num_batched_tokens=8 * P,
                           overlap_decode=True)
    rng = np.random.default_rng(0)
    sets = [rng.integers(2, 512, size=(prompts, P)).tolist() for _ in range(2 * args.repeats + 1)]
    sp = dict(temperature=1.0, max_tokens=O, ignore_eos=True, logprobs=0)
    engine.generate(sets.pop()[:8], SamplingParams(n=n, **sp))  # warm-up
    return compare(engine, sets, SamplingParams(n=n, **sp), SamplingParams(**sp), expand=n)


def gpu_engine(name: str, max_num_seqs: int | None = None):
    from atom import RolloutEngine
    from bench.rollout import HERE, load_workloads
    w = load_workloads()[name]
    seqs = max_num_seqs or min(w["num_prompts"] * w["n"], 1024)
    engine = RolloutEngine(str(HERE / "models" / w["model"]), load_format="dummy", dtype="bfloat16",
                           max_model_len=w["prompt_len"] + w["output_len"], max_num_seqs=seqs,
                           cuda_graph_max_batch_size=seqs)
    return engine, w


def gpu_params(w, n: int, max_tokens: int | None = None):
    from atom import SamplingParams
    return SamplingParams(n=n, temperature=w["temperature"], top_p=w["top_p"], ignore_eos=True,
                          max_tokens=max_tokens or w["output_len"], logprobs=w["logprobs"])


def concurrent(args) -> dict:
    from bench.rollout import make_prompts
    engine, w = gpu_engine(args.workload)
    engine.generate(make_prompts(w, w["seed"] + 100), gpu_params(w, w["n"], 4))  # compile, capture
    sets = [make_prompts(w, w["seed"] + k) for k in range(2 * args.repeats)]
    return compare(engine, sets, gpu_params(w, w["n"]), gpu_params(w, 1), expand=w["n"])


def arrival(args) -> dict:
    from bench.rollout import make_prompts
    engine, w = gpu_engine(args.workload)
    engine.generate(make_prompts(w, w["seed"] + 100)[:64], gpu_params(w, 1, 4))
    sets = [make_prompts(w, w["seed"] + k) for k in range(2 * args.repeats)]
    return compare(engine, sets, gpu_params(w, 1), gpu_params(w, 1), expand=1, spacing_s=0.005)


def late_join(args) -> dict:
    """Per late request: engine-side, the steps launched after its arrival without it
    (RequestMetrics.steps_waited: 0 = its prefill ran in the very next step); front-end, the
    finished-step count from a command just before the submission to its first token."""
    from atom import AsyncRolloutEngine
    from bench.rollout import make_prompts
    engine, w = gpu_engine(args.workload, max_num_seqs=1024)  # seats for the late arrivals
    engine.generate(make_prompts(w, w["seed"] + 100), gpu_params(w, w["n"], 4))
    front = AsyncRolloutEngine(engine)
    waited, to_first_token, running = [], [], []

    async def main():
        bulk = asyncio.create_task(front.generate(make_prompts(w, w["seed"])[0], gpu_params(w, 512)))
        for k in range(args.repeats):
            await asyncio.sleep(0.5)
            at, seqs = await front.call(lambda e: (e.stats.steps, e.num_running_sequences))
            running.append(seqs)
            async for out in front.stream(make_prompts(w, 1000 + k)[0], gpu_params(w, 1, 2), request_id=f"late{k}"):
                to_first_token.append(await front.call(lambda e: e.stats.steps) - at)
                waited.append(out.metrics.steps_waited)
                break
        bulk.cancel()
    asyncio.run(main())
    front.close()
    return {"steps_waited": waited, "max_steps_waited": max(waited), "front_end_steps_to_first_token": to_first_token,
            "running_at_arrival": running}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["cpu-tiny", "cpu-grpo", "concurrent", "arrival", "late-join"])
    ap.add_argument("workload", nargs="?", default="grpo-moe")
    ap.add_argument("--requests", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128, help="cpu-grpo")
    ap.add_argument("--output-len", type=int, default=64, help="cpu-grpo")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    result = {"cpu-tiny": cpu_tiny, "cpu-grpo": cpu_grpo, "concurrent": concurrent, "arrival": arrival, "late-join": late_join}[args.mode](args)
    result = {"mode": args.mode, "workload": None if args.mode.startswith("cpu") else args.workload, **result}
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
