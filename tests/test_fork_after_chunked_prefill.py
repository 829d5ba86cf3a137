"""n > 1 with a prompt prefilled over several steps (chunked prefill) still gives n completions."""
from __future__ import annotations

from atom import RolloutEngine, SamplingParams
from conftest import TINY_VOCAB
from helpers import random_prompts


def test_n_samples_survive_chunked_prefill(tiny_qwen3_path):
    engine = RolloutEngine(tiny_qwen3_path, max_num_batched_tokens=16, max_num_seqs=8)
    prompts = random_prompts([37, 5, 50], TINY_VOCAB, seed=9)
    outs = engine.generate(prompts, SamplingParams(n=3, max_tokens=4, ignore_eos=True, seed=1))
    for out in outs:
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert all(len(c.token_ids) == 4 for c in out.outputs)
