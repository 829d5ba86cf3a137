"""Sleep / wake / weight-reload timings on one GPU, for a Qwen3-30B-A3B-shaped model (random weights).

    python bench/sleep_wake.py [--config path/to/config.json] [--out results.json]

Measures, with `EngineConfig(enable_sleep_mode=True, load_format="dummy")`:
* release_memory_occupation(["kv_cache"]) / wake_up() (the KV cache alone; atom's level 1
  before the levels took vLLM's meaning): seconds, how much of the KV memory held comes back
  in torch.cuda.mem_get_info(), how much a (lazy) wake maps, and the release after the pool
  was backed step by step as a rollout backs it;
* lazy and whole-pool level-2 wakes alternated, with the driver's share and what backing the
  rest of the pool costs later (the generate that needs it pays that);
* sleep(level=2) discarding the weights: seconds, memory returned (KV + weights), memory
  still held while asleep (against the free memory measured before the engine existed);
* sleep(level=1) / wake_up() (vLLM's level 1: weights offloaded to pinned host memory, KV
  cache dropped): seconds per cycle (the first cycle also allocates the pinned host buffer,
  later ones reuse it);
* update_weights of every parameter from GPU tensors: HF per-expert names and transformers-v5
  fused expert names;
* greedy generations after every wake equal the ones before the first sleep (CUDA graphs
  captured before sleeping are replayed after waking, with no re-capture);
* device memory after many sleep/wake cycles.
Reference (vLLM, same model class, H200): sleep discard 0.10 s, wake 0.16 s; offload sleep 54.6 s,
wake 1.4 s; weight reload 2.27 s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

_QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
    "bos_token_id": 151643, "eos_token_id": 151645, "decoder_sparse_step": 1, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "mlp_only_layers": [], "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32,
    "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "vocab_size": 151936,
}
GiB = 1 << 30


def free_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


class Report:
    def __init__(self, path: str | None) -> None:
        self.path, self.data = path, {}

    def __setitem__(self, key, value) -> None:
        self.data[key] = value
        print(f"{key}: {value}", flush=True)
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self.data, f, indent=1)


def section(report: Report, name: str):
    class _S:
        def __enter__(self):
            print(f"== {name}", flush=True)
            self.t = time.perf_counter()

        def __exit__(self, typ, exc, tb):
            report[f"{name}.wall_s"] = round(time.perf_counter() - self.t, 3)
            if exc is not None and not isinstance(exc, KeyboardInterrupt):
                report[f"{name}.error"] = "".join(traceback.format_exception(typ, exc, tb))[-3000:]
                return True
    return _S()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(Path(__file__).resolve().parent / "models" / "qwen3-30b-a3b" / "config.json"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--many", type=int, default=30, help="KV-cache release cycles for the memory-drift check")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--skip-offload", action="store_true")
    args = ap.parse_args()
    report = Report(args.out)
    from atom import RolloutEngine, SamplingParams

    model_dir = tempfile.mkdtemp(prefix="atom_bench_30b_")
    config = _QWEN3_30B_A3B
    if os.path.isfile(args.config):
        with open(args.config) as f:
            config = json.load(f)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f)
    report["device"] = torch.cuda.get_device_name()
    torch.cuda.init()
    baseline = free_bytes()
    report["free_before_engine_gib"] = round(baseline / GiB, 2)

    t = time.perf_counter()
    engine = RolloutEngine(model_dir, load_format="dummy", enable_sleep_mode=True, dtype="bfloat16",
                           gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=2048, max_num_seqs=64,
                           max_num_batched_tokens=4096, cuda_graph_max_batch_size=16)
    report["engine_build_s"] = round(time.perf_counter() - t, 2)
    probe = engine.probe()
    wmap, _ = engine.weight_check_targets()
    pools = probe.memory_stats().pools
    report["kv_pool_gib"] = round(pools["kv_cache"].nbytes / GiB, 2)
    report["weights_gib"] = round(pools["weights"].nbytes / GiB, 2)
    report["weight_segments"] = pools["weights"].segments
    report["kv_segments"] = pools["kv_cache"].segments

    def kv_resident() -> int:
        return engine.memory_bytes("kv_cache")

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, engine.vocab_size, (24,), generator=g).tolist() for _ in range(4)]
    sp = SamplingParams(temperature=0.0, max_tokens=12, logprobs=0, ignore_eos=True)

    def gen():
        engine.reset_prefix_cache()
        return [(c.token_ids, c.logprobs) for r in engine.generate(prompts, sp) for c in r.outputs]

    def reload_discarded_weights():
        """Regenerate the same (seeded) values in place, then a complete update_weights (each
        tensor copied onto itself) marks them complete again."""
        probe.reinit_dummy_weights()
        engine.update_weights((n, wmap.lookup(n).target().clone()) for n in sorted(wmap.required_names()))

    def release_kv():
        engine.release_memory_occupation(["kv_cache"])

    t = time.perf_counter()
    expected = gen()
    report["first_generate_s"] = round(time.perf_counter() - t, 2)
    n_graphs = engine.num_cuda_graphs
    report["cuda_graphs_before_sleep"] = n_graphs
    report["generate_again_equal"] = gen() == expected

    with section(report, "release_kv"):
        rows = []
        for _ in range(args.cycles):
            held = kv_resident()  # the whole pool before the first sleep
            before = free_bytes()
            ts = timed(release_kv)
            freed = free_bytes() - before
            tw = timed(engine.wake_up)
            rows.append({"sleep_s": round(ts, 4), "wake_s": round(tw, 4), "kv_held_gib": round(held / GiB, 2),
                         "freed_frac_of_held": round(freed / held, 4),
                         "kv_mapped_after_wake_gib": round(kv_resident() / GiB, 2)})
        report["release_kv.cycles"] = rows
        # A rollout backs the pool step by step (the block manager asks for a few blocks more at
        # a time): sleep then unmaps every segment that growth created. Same calls, without
        # running the 700k-token rollout that fills 67 GiB.
        release_kv()
        engine.wake_up()
        for k in range(1, 257):
            probe.back_kv(engine.num_kv_blocks * k // 256)
        report["release_kv.after_stepwise_backing"] = {
            "segments": probe.memory_stats().pools["kv_cache"].segments, "held_gib": round(kv_resident() / GiB, 2),
            "sleep_s": round(timed(release_kv), 4), "wake_s": round(timed(engine.wake_up), 4)}
        report["release_kv.generate_equal_after_wake"] = gen() == expected
        report["release_kv.cuda_graphs_recaptured"] = (engine.num_cuda_graphs != n_graphs
                                                       or not probe.decode_runner_stats().graphs_current)

    with section(report, "level2_discard"):
        rows = []
        for _ in range(args.cycles):
            held = engine.memory_bytes()
            before = free_bytes()
            ts = timed(lambda: engine.sleep(level=2))
            asleep = free_bytes()
            tw = timed(engine.wake_up)
            rows.append({"sleep_s": round(ts, 4), "wake_s": round(tw, 4), "held_gib": round(held / GiB, 2),
                         "freed_frac_of_held": round((asleep - before) / held, 4),
                         "held_while_asleep_gib": round((baseline - asleep) / GiB, 3)})
        report["level2_discard.cycles"] = rows
        reload_discarded_weights()
        report["level2_discard.generate_equal_after_reload"] = gen() == expected

    with section(report, "update_weights"):
        fused_names = [n for n in wmap.required_names() if ".experts." not in n]
        fused_names += list(wmap.alternatives)
        per_expert = sorted(wmap.required_names())
        biggest = max(wmap.lookup(n).target().numel() for n in per_expert + fused_names)
        source = torch.randn(biggest, device="cuda", dtype=torch.bfloat16)

        def pairs(names):
            for n in names:
                shape = wmap.lookup(n).shape()
                numel = 1
                for d in shape:
                    numel *= d
                yield n, source[:numel].view(shape)

        for label, names in (("fused_v5_names", fused_names), ("per_expert_names", per_expert)):
            times = [timed(lambda: engine.update_weights(pairs(names))) for _ in range(3)]
            report[f"update_weights.{label}.tensors"] = len(names)
            report[f"update_weights.{label}.s"] = [round(x, 3) for x in times]
        del source
        probe.reinit_dummy_weights()
        report["update_weights.generate_equal_after_reinit"] = gen() == expected

    with section(report, "wake_compare"):
        # Lazy and whole-pool wakes alternated (driver mapping time varies from call to call),
        # each level 2 with the weights discarded, with the driver's share; the lazy rows also
        # time backing the rest of the pool afterwards. The wake policy is set per wake through
        # the probe (one-shot): engine.config keeps the value the engine was built with.
        rows = []
        for i in range(2 * args.cycles):
            lazy = i % 2 == 1
            engine.sleep(level=2)
            probe.next_kv_wake(lazy)
            probe.reset_map_seconds()
            row = {"lazy": lazy, "wake_s": round(timed(engine.wake_up), 4)}
            if lazy:
                row["back_rest_s"] = round(timed(lambda: probe.back_kv(engine.num_kv_blocks)), 4)
            seconds = [p.map_seconds for p in probe.memory_stats().pools.values()]
            row.update({k: round(sum(m[k] for m in seconds), 4) for k in seconds[0]})
            rows.append(row)
        report["wake_compare.cycles"] = rows
        reload_discarded_weights()

    with section(report, "many_cycles"):
        release_kv()  # one cycle first: it also hands torch's cached blocks back
        engine.wake_up()
        start = free_bytes()
        t = time.perf_counter()
        for _ in range(args.many):
            release_kv()
            engine.wake_up()
        report["many_cycles.n"] = args.many
        report["many_cycles.mean_cycle_s"] = round((time.perf_counter() - t) / max(args.many, 1), 4)
        report["many_cycles.drift_mib"] = round((start - free_bytes()) / (1 << 20), 1)
        report["many_cycles.generate_equal"] = gen() == expected
    if not args.skip_offload:
        with section(report, "level1_offload"):
            rows = []
            for _ in range(args.cycles):
                ts = timed(lambda: engine.sleep(level=1))
                tw = timed(engine.wake_up)
                rows.append({"sleep_s": round(ts, 3), "wake_s": round(tw, 3)})
            report["level1_offload.cycles"] = rows
            report["level1_offload.generate_equal_after_wake"] = gen() == expected
            probe.drop_weights_host_copy()

    print(json.dumps(report.data, indent=1))


if __name__ == "__main__":
    sys.exit(main())
