"""Host cost of the decode runner's step inputs at GRPO's batch shape (CPU, no GPU needed).

Two numbers a decode step at `--prompts` x `--n` sequences:
* `fill`: DecodeRunner's own timer (penalties, the rows' inputs, the copies queued) over a
  rollout of a one-layer tiny Qwen3 on the CPU with the overlapped decode path on;
* `groups`: the shared-prefix groups (`DecodeRunner._groups`, run on CUDA where the decode
  attention reads groups; the CPU's torch attention does not) on synthetic tables of that shape.

The overlapped loop must hide this host work behind every decode step; where it does not
(grpo-dense-small, 1,024 rows of a 0.6B model) it is the step's time.

    python -m bench.host_fill [--prompts 128] [--n 8] [--prompt-len 512] [--max-tokens 32]
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
import types

import numpy as np
import torch


def rollout_fill(prompts: int, n: int, prompt_len: int, max_tokens: int) -> dict:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from atom import RolloutEngine, SamplingParams

    cfg = Qwen3Config(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, intermediate_size=32,
                      max_position_embeddings=prompt_len + max_tokens + 16, bos_token_id=0, eos_token_id=1,
                      tie_word_embeddings=False)
    path = tempfile.mkdtemp()
    torch.manual_seed(0)
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    eng = RolloutEngine(path, overlap_decode=True, max_num_seqs=prompts * n, max_num_batched_tokens=16384,
                        max_model_len=prompt_len + max_tokens + 8, kv_cache_memory_bytes=256 << 20)
    rng = random.Random(0)
    batch = [[rng.randrange(2, 256) for _ in range(prompt_len)] for _ in range(prompts)]
    eng.generate(batch[:2], SamplingParams(n=n, max_tokens=4, ignore_eos=True))  # warm-up
    probe = eng.probe()
    probe.reset_decode_runner_timers()
    t = time.perf_counter()
    eng.generate(batch, SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=1))
    wall = time.perf_counter() - t
    timers = probe.decode_runner_stats().timers
    return {"wall_s": wall, "decode_steps": timers["steps"], "fill_ms_per_step": 1e3 * timers["fill"] / timers["steps"]}


def groups_cost(prompts: int, n: int, prompt_blocks: int, own_blocks: int, page: int = 16) -> float:
    from atom.engine.cuda_graph import DecodeRunner

    seqs, by_first, next_block = [], {}, 1 << 20
    for g in range(prompts):
        prompt = list(range(g * prompt_blocks + 1, (g + 1) * prompt_blocks + 1))
        for _ in range(n):
            seqs.append(types.SimpleNamespace(block_table=list(prompt) + list(range(next_block, next_block + own_blocks)),
                                              num_prompt_tokens=prompt_blocks * page + 1))
            next_block += own_blocks
            by_first.setdefault(prompt[0], []).append(len(seqs) - 1)
    bs = len(seqs)
    bt = np.zeros((bs, 2 * (prompt_blocks + own_blocks)), np.int32)
    for i, s in enumerate(seqs):
        bt[i, : len(s.block_table)] = s.block_table
    host = {"plen": np.zeros(bs // 2, np.int32), "grows": np.zeros((bs // 2, n), np.int32),
            "row_prefix": np.zeros(bs, np.int32), "bt": bt}
    runner = types.SimpleNamespace(page=page, max_n=n)
    blocks = [len(s.block_table) for s in seqs]
    DecodeRunner._groups(runner, seqs, by_first, bs, host, blocks)
    reps = 100
    t = time.perf_counter()
    for _ in range(reps):
        DecodeRunner._groups(runner, seqs, by_first, bs, host, blocks)
    return 1e3 * (time.perf_counter() - t) / reps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    fill = rollout_fill(args.prompts, args.n, args.prompt_len, args.max_tokens)
    groups = groups_cost(args.prompts, args.n, args.prompt_len // 16, 40)
    print(f"{args.prompts} x {args.n} rows: decode runner fill {fill['fill_ms_per_step']:.2f} ms a step "
          f"({fill['decode_steps']} steps, rollout {fill['wall_s']:.2f} s); shared-prefix groups "
          f"{groups:.2f} ms a step")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)  # one thread: the host path as the engine's process runs it
    raise SystemExit(main())
