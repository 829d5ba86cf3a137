"""Weight sync by IPC from a trainer process on the same GPU: Qwen3-30B-A3B shape (bf16, ~57 GiB).

    python -m bench.ipc_weights [--config bench/models/qwen3-30b-a3b/config.json] [--buckets-gib 1,4]
                                  [--syncs 3] [--out results.json]
    python -m bench.ipc_weights --device cpu --config tiny   # a smoke run on the CPU (shared memory)

(Run it as a module: bench/kernels.py would shadow the `kernels` package transformers looks for.)

The engine (this process, random weights, `load_format="dummy"`) and a trainer (a spawned process
holding the model's parameters as transformers names them: v5 fused experts) share one GPU. One sync
moves every parameter:

* `buckets`: `IpcBucketSender` packs the parameters into two alternating buffers of B GiB and sends
  one payload per bucket over a pipe; the engine's `update_weights_from_ipc` copies each out. The
  trainer packs bucket k+1 while the engine copies bucket k.
* `tensors`: one `serialize_tensors` payload with handles of all parameters;
  `update_weights_from_tensor` copies straight from them (no packing).

Reported per sync: seconds from the trainer's first pack to the engine's last copy (the first sync
opens the buffers' IPC handles, later ones reuse them), the engine's share, and the copy bandwidth.
Target: under 0.5 s for the 30B shape on an H200. Afterwards the engine must still generate, and the
weights it holds must equal the trainer's (`get_weights_by_name` on a sample of tensors).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

GiB = 1 << 30
_TINY = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 64,
         "intermediate_size": 128, "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "vocab_size": 256, "max_position_embeddings": 512, "norm_topk_prob": True, "decoder_sparse_step": 1,
         "mlp_only_layers": [], "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "bos_token_id": 0,
         "eos_token_id": 1}


def hf_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of the transformers model for `config` (built on the meta device)."""
    import transformers
    cfg = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def trainer(conn, shapes, device: str, buckets: list[int], syncs: int) -> None:
    """Holds the parameters; runs every sync the engine asks for and reports the timings."""
    from atom.weights_sync import IpcBucketSender, serialize_tensors
    torch.manual_seed(0)
    params = [(n, torch.randn(s, device=device, dtype=torch.bfloat16) * 0.02) for n, s in shapes]
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    sync()
    results = []

    def rpc(kind, payload):
        conn.send((kind, payload))
        return conn.recv()

    for bucket in buckets:
        sender = IpcBucketSender(bucket_bytes=bucket, device=device, num_buffers=2)
        for i in range(syncs):
            t0, engine_s, waiting = time.perf_counter(), 0.0, False
            for payload in sender.payloads(params):  # packs bucket k+1 while the engine copies bucket k
                if waiting:
                    engine_s += conn.recv()
                conn.send(("ipc", payload))
                waiting = True
            engine_s += conn.recv()
            results.append({"path": "buckets", "bucket_gib": round(bucket / GiB, 3), "sync": i,
                            "seconds": round(time.perf_counter() - t0, 4), "engine_seconds": round(engine_s, 4)})
        del sender
    for i in range(syncs):
        t0 = time.perf_counter()
        engine_s = rpc("tensor", serialize_tensors(params))
        results.append({"path": "tensors", "sync": i, "seconds": round(time.perf_counter() - t0, 4),
                        "engine_seconds": round(engine_s, 4)})
    sample = [params[i] for i in range(0, len(params), max(1, len(params) // 16))]
    results.append({"sample": {n: t.reshape(-1)[:100].cpu() for n, t in sample}})
    conn.send(("done", results))
    conn.recv()


def engine_loop(engine, conn) -> list:
    while True:
        kind, payload = conn.recv()
        if kind == "done":
            engine.release_ipc_buffers()  # before the trainer exits: its buffers are mapped here
            conn.send("bye")
            return payload
        t = time.perf_counter()
        if kind == "ipc":
            engine.update_weights_from_ipc(payload)
        else:
            engine.update_weights_from_tensor(payload)
        conn.send(time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "models", "qwen3-30b-a3b",
                                                     "config.json"), help="a config.json, or 'tiny'")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--buckets-gib", default="1,4")
    ap.add_argument("--syncs", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from atom import RolloutEngine, SamplingParams
    config = _TINY if args.config == "tiny" else json.load(open(args.config))
    model_dir = tempfile.mkdtemp(prefix="atom_bench_ipc_")
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f)
    shapes = hf_shapes(config)
    dtype = "bfloat16" if args.device != "cpu" else "float32"
    engine = RolloutEngine(model_dir, load_format="dummy", dtype=dtype, device=args.device,
                           kv_cache_memory_bytes=1 * GiB if args.device != "cpu" else 64 << 20,
                           max_model_len=256, max_num_seqs=16)
    nbytes = sum(2 * _numel(s) for _, s in shapes)
    buckets = [int(float(b) * GiB) if args.config != "tiny" else int(float(b) * (64 << 10))
               for b in args.buckets_gib.split(",")]
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=trainer, args=(there, shapes, args.device, buckets, args.syncs))
    proc.start()
    results = engine_loop(engine, here)
    proc.join(120)
    sample = results.pop()["sample"]
    for r in results:
        r["gbytes_per_s"] = round(nbytes / r["seconds"] / 1e9, 1)
        print(json.dumps(r), flush=True)
    out = engine.generate([[5, 6, 7, 8]], SamplingParams(temperature=0.0, max_tokens=4))
    report = {"device": torch.cuda.get_device_name() if args.device != "cpu" else "cpu",
              "weights_gib": round(nbytes / GiB, 2), "tensors": len(shapes), "syncs": results,
              "generates_after": len(out[0].outputs[0].token_ids) == 4, "trainer_exit": proc.exitcode,
              "best_s": min(r["seconds"] for r in results),
              "weights_match_trainer": all(torch.equal(engine.get_weights_by_name(n), t) for n, t in sample.items())}
    print(json.dumps({k: v for k, v in report.items() if k != "syncs"}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    sys.exit(main())
