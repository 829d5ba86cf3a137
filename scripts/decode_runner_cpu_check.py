"""Dev check without a GPU: the GPU decode path (atom/engine/cuda_graph.py, with cascade groups)
on CPU through Triton's interpreter must give the same tokens and logprobs as the plain path.

  TRITON_INTERPRET=1 PYTHONPATH=<triton install> python scripts/decode_runner_cpu_check.py CONFIG_DIR
"""
from __future__ import annotations

import sys

import torch

from atom import RolloutEngine, SamplingParams


def run(path: str, gpu_path: bool, backends: dict):
    eng = RolloutEngine(path, load_format="dummy", max_model_len=256, max_num_seqs=16, op_backends=backends,
                        kv_block_size=4, dtype="float32")
    runner = eng._engine.runner
    if gpu_path:
        plain = runner.execute

        def execute(batch, bm):
            if batch.is_decode:
                if bm.pending_copies:
                    runner.copy_blocks(bm.pending_copies)
                    bm.pending_copies.clear()
                out = runner._gpu_decode(batch)
                if out is not None:
                    execute.hits += 1
                    return out
            return plain(batch, bm)
        execute.hits = 0
        runner.execute = execute
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [5, 6, 7, 8, 20, 21], [30, 31, 32]]
    outs = eng.generate(prompts, SamplingParams(n=3, max_tokens=20, ignore_eos=True, logprobs=0, seed=1))
    if gpu_path:
        print("decode steps through DecodeRunner:", execute.hits, "cascade:", runner.decode_runner.cascade)
    return [(c.token_ids, c.logprobs) for o in outs for c in o.outputs]


if __name__ == "__main__":
    path = sys.argv[1]
    backends = {"paged_attention_decode": "triton"}
    ref = run(path, False, backends)
    got = run(path, True, backends)
    for (t1, l1), (t2, l2) in zip(ref, got):
        assert t1 == t2, (t1, t2)
        assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-4
    print("OK: identical tokens,", len(ref), "completions")
