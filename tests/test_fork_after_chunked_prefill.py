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


def test_siblings_fork_even_when_the_first_sample_stops_at_once(make_tiny_model):
    """Sample 0 hitting EOS on its first token must not take the shared prompt blocks with it."""
    path = make_tiny_model("qwen3")
    prompt = random_prompts([40], TINY_VOCAB, seed=4)[0]
    greedy_first = RolloutEngine(path).generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0]
    eos = greedy_first.outputs[0].token_ids[0]
    engine = RolloutEngine(make_tiny_model("qwen3", eos_token_id=eos))
    out = engine.generate([prompt], SamplingParams(n=6, temperature=0.5, max_tokens=5, seed=0))[0]
    lengths = [len(c.token_ids) for c in out.outputs]
    assert lengths[0] == 1 and 5 in lengths                  # sample 0 stops at once, others run on
    assert engine.stats.prompt_tokens_computed == 40          # the prompt was still computed once
    assert engine.num_free_kv_blocks == engine.num_kv_blocks
