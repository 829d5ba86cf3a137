"""Rollout throughput of N engine replicas on Ray: `python -m bench.ray_replicas --replicas 1,2,4,8`.

For each replica count N: a ReplicaPool of N one-GPU replicas (PACK placement) runs the workload
(default grpo-dense-small: 128 prompts x 8 samples, 512 + 512 tokens, random bf16 weights in the
shapes of bench/models/<model>), its prompts sharded over the replicas, after a short warm-up.
Prints generated tokens/s, the speed-up over N=1 and the scaling efficiency (speed-up / N).
With --push, a trainer Ray actor (one more GPU) holding a transformers model of the same shapes
broadcasts its weights to every replica once (NCCL), and the push time is reported.

Needs N (+1 with --push) GPUs in the cluster (--address auto joins a running one). On CPU, for a
smoke run: --device cpu --num-prompts 4 --prompt-len 16 --output-len 4 --replicas 1,2.
"""
from __future__ import annotations

import argparse
import time

from bench.rollout import HERE, load_workloads, make_prompts
from bench.report import emit


def _trainer_actor(model_dir: str, gpus: float):
    import ray

    @ray.remote(num_gpus=gpus, num_cpus=1 if gpus > 0 else 0)  # CPU smoke runs: the replicas hold every CPU
    class Trainer:
        """A stand-in trainer: a transformers model with the benchmark model's shapes."""

        def __init__(self) -> None:
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM
            config = AutoConfig.from_pretrained(model_dir)
            device = "cuda" if gpus > 0 else "cpu"
            dtype = torch.bfloat16 if gpus > 0 else torch.float32
            self.model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype).to(device)

        def push(self, broadcast, version: int) -> tuple[float, dict]:
            t0 = time.perf_counter()
            result = broadcast.push(self.model, version=version)
            return time.perf_counter() - t0, {"updated": result.updated, "failed": result.failed}

    return Trainer.remote()


def run_one(n: int, w: dict, opts) -> dict:
    from atom import SamplingParams
    from atom.config import EngineConfig
    from atom.ray import PoolConfig, ReplicaPool

    on_gpu = opts.device != "cpu"
    max_num_seqs = opts.max_num_seqs or min(w["num_prompts"] * w["n"], 1024)
    engine = EngineConfig(model=str(HERE / "models" / w["model"]), load_format="dummy",
                          dtype="bfloat16" if on_gpu else "float32", device=opts.device,
                          max_model_len=w["prompt_len"] + w["output_len"], max_num_seqs=max_num_seqs,
                          cuda_graph_max_batch_size=max_num_seqs, num_kv_blocks=None if on_gpu else 256)
    t0 = time.perf_counter()
    pool = ReplicaPool(PoolConfig(engine, num_replicas=n, num_gpus_per_rank=1.0 if on_gpu else 0.0,
                                  num_cpus_per_rank=1.0, placement_strategy=opts.placement))
    build_s = time.perf_counter() - t0
    try:
        params = SamplingParams(n=w["n"], temperature=w["temperature"], top_p=w["top_p"], max_tokens=w["output_len"],
                                ignore_eos=True, logprobs=w["logprobs"])
        warm = SamplingParams(n=w["n"], temperature=w["temperature"], max_tokens=4, ignore_eos=True)
        pool.generate(make_prompts(w, w["seed"] + 1)[: max(n, 1) * 8], warm)  # every replica compiles / captures
        prompts = make_prompts(w, w["seed"])
        t0 = time.perf_counter()
        outs = pool.generate(prompts, params)
        secs = time.perf_counter() - t0
        generated = sum(len(c.token_ids) for o in outs for c in o.outputs)
        assert all(len(c.token_ids) == w["output_len"] for o in outs for c in o.outputs)
        result = {"replicas": n, "generated_tokens": generated, "seconds": round(secs, 3),
                  "tok_per_s": round(generated / secs, 1), "build_s": round(build_s, 1),
                  "per_replica_generated": {r: s["generated_tokens"] for r, s in pool.replica_stats().items()}}
        if opts.push:
            import ray
            trainer = _trainer_actor(str(HERE / "models" / w["model"]), 1.0 if on_gpu else 0.0)
            push_s, outcome = ray.get(trainer.push.remote(pool.weight_broadcast(), 1))
            pool.refresh()
            result.update(push_s=round(push_s, 3), push=outcome, weight_version=pool.weight_version)
            ray.kill(trainer)
        return result
    finally:
        pool.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="grpo-dense-small", choices=sorted(load_workloads()))
    ap.add_argument("--replicas", default="1,2", help="comma-separated replica counts, e.g. 1,2,4,8")
    ap.add_argument("--address", default=None, help="Ray cluster address ('auto': the running one; default local)")
    ap.add_argument("--placement", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
    ap.add_argument("--device", default="cuda", help="cuda (one GPU per replica) or cpu (smoke runs)")
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--push", action="store_true", help="also time one weight broadcast to every replica")
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--output-len", type=int, default=None)
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--json", default=None, help="append each result as one JSON line to this file")
    opts = ap.parse_args(argv)

    import ray

    w = dict(load_workloads()[opts.workload])
    for key in ("num_prompts", "prompt_len", "output_len", "n"):
        if getattr(opts, key) is not None:
            w[key] = getattr(opts, key)
    ray.init(address=opts.address, log_to_driver=False)
    base = None
    for n in (int(x) for x in opts.replicas.split(",")):
        result = {"workload": opts.workload, **run_one(n, w, opts)}
        base = base or result["tok_per_s"] / n  # per-replica throughput of the first (smallest) count
        result["scaling_efficiency"] = round(result["tok_per_s"] / (base * n), 3)
        print(f"{opts.workload} x {n} replicas: {result['generated_tokens']} tokens in {result['seconds']:.2f} s = "
              f"{result['tok_per_s']:,.0f} tok/s (efficiency {result['scaling_efficiency']:.0%})"
              + (f"; push to all: {result['push_s']:.2f} s" if "push_s" in result else ""))
        emit(result, opts.json)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
