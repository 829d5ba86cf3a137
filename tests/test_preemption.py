"""Issue 2, test 4: a KV pool too small for the batch preempts and recomputes; greedy output is unchanged."""
from __future__ import annotations

from atom import RolloutEngine, SamplingParams
from conftest import TINY_VOCAB
from helpers import random_prompts


def test_preemption_keeps_greedy_outputs(tiny_qwen3_moe_path):
    prompts = random_prompts([20, 33, 9, 27, 14, 40], TINY_VOCAB, seed=11)
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=0)
    roomy = RolloutEngine(tiny_qwen3_moe_path)
    want = roomy.generate(prompts, sp)
    assert roomy.stats.preemptions == 0

    # 12 blocks of 16 tokens: each sequence needs up to 5 blocks, six of them need 23.
    tight = RolloutEngine(tiny_qwen3_moe_path, num_kv_blocks=12, max_num_batched_tokens=32)
    got = tight.generate(prompts, sp)
    assert tight.stats.preemptions > 0
    assert tight.stats.recomputed_tokens > 0
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert max(abs(a - b) for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs)) < 1e-4
    # Everything was given back: the next call still works and nothing leaked.
    assert tight.num_free_kv_blocks == 12


def test_n_samples_under_pressure_match_unconstrained(tiny_qwen3_path):
    prompts = random_prompts([30, 18], TINY_VOCAB, seed=12)
    sp = SamplingParams(n=4, temperature=0.9, max_tokens=24, ignore_eos=True, seed=3)
    want = RolloutEngine(tiny_qwen3_path).generate(prompts, sp)
    tight = RolloutEngine(tiny_qwen3_path, num_kv_blocks=9)
    got = tight.generate(prompts, sp)
    assert tight.stats.preemptions > 0
    for w, g in zip(want, got):
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in w.outputs]
