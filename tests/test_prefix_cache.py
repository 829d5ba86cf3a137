"""Issue 2, test 3: the n samples of a prompt and repeated prompts share prompt KV."""
from __future__ import annotations

import dataclasses

import pytest

from atom import RolloutEngine, SamplingParams
from atom.engine.block_manager import BlockManager
from conftest import TINY_VOCAB
from helpers import random_prompts


def delta(before, after) -> dict:
    return {k: getattr(after, k) - v for k, v in dataclasses.asdict(before).items()}


def test_n_samples_compute_prompt_once_and_reuse_across_calls(tiny_qwen3_path):
    engine = RolloutEngine(tiny_qwen3_path)
    prompt = random_prompts([40], TINY_VOCAB, seed=7)[0]  # 2 full blocks of 16 + 8 tokens
    sp = SamplingParams(n=8, temperature=1.0, max_tokens=6, ignore_eos=True, seed=1)

    s0 = dataclasses.replace(engine.stats)
    first = engine.generate([prompt], sp)[0]
    d = delta(s0, engine.stats)
    assert len(first.outputs) == 8 and [c.index for c in first.outputs] == list(range(8))
    assert d["prompt_tokens_computed"] == 40          # once, not 8 times
    assert d["prompt_tokens_cached"] == 7 * 40        # the 7 forks share it
    assert d["generated_tokens"] == 8 * 6
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1  # samples differ

    s1 = dataclasses.replace(engine.stats)
    second = engine.generate([prompt], sp)[0]
    d = delta(s1, engine.stats)
    # The two full blocks come from the cache; only the 8-token tail is computed again.
    assert d["prompt_tokens_computed"] == 8
    assert d["prompt_tokens_cached"] == 32 + 7 * 40
    # Same seed, same samples, whether the prefix came from cache or not.
    assert [c.token_ids for c in second.outputs] == [c.token_ids for c in first.outputs]


@pytest.mark.parametrize("budget", [64, 8192])
def test_repeated_prompts_in_one_call_are_prefilled_once(tiny_llama_path, budget):
    """Copies of a prompt still being prefilled follow it (prompt twins): they sample their first
    token from its prefill and fork its KV, as n samples do: the prompt is computed once, even
    when the token budget ran out before the last copy (following costs no budget)."""
    engine = RolloutEngine(tiny_llama_path, max_num_batched_tokens=budget)
    prompt = random_prompts([48], TINY_VOCAB, seed=8)[0]
    other = random_prompts([20], TINY_VOCAB, seed=9)[0]
    s0 = dataclasses.replace(engine.stats)
    outs = engine.generate([prompt, prompt, other, prompt],
                           SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len({tuple(outs[i].outputs[0].token_ids) for i in (0, 1, 3)}) == 1
    d = delta(s0, engine.stats)
    assert d["prompt_tokens_computed"] == 48 + 20
    assert d["prompt_tokens_cached"] == 2 * 48


def test_long_repeated_prompt_follows_the_chunks_in_progress(tiny_qwen3_path):
    """A prompt prefilled over several chunks: its copy waits on it and forks it after the last."""
    engine = RolloutEngine(tiny_qwen3_path, max_num_batched_tokens=32)
    prompt = random_prompts([100], TINY_VOCAB, seed=10)[0]
    outs = engine.generate([prompt, prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert engine.stats.prompt_tokens_computed == 100
    assert engine.stats.prompt_tokens_cached == 100


def test_shared_prefix_waits_for_the_chunks_in_progress(tiny_qwen3_path):
    """Prompts that share a prefix but not their end: the second follows the first block by block
    from the cache (waiting a step while a block it needs is being computed)."""
    engine = RolloutEngine(tiny_qwen3_path, max_num_batched_tokens=32)
    prompt = random_prompts([100], TINY_VOCAB, seed=10)[0]
    other = prompt[:96] + random_prompts([4], TINY_VOCAB, seed=11)[0]
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    outs = engine.generate([prompt, other], sp)
    assert engine.stats.prompt_tokens_computed == 100 + (100 - 96)
    alone = RolloutEngine(tiny_qwen3_path, enable_prefix_caching=False).generate([other], sp)
    assert outs[1].outputs[0].token_ids == alone[0].outputs[0].token_ids


def test_hash_collisions_never_share_wrong_kv(tiny_qwen3_path, monkeypatch):
    """Every block hashes to the same key: token comparison must refuse all false matches."""
    prompts = random_prompts([40, 40, 40], TINY_VOCAB, seed=9)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    honest = [o.outputs[0].token_ids for o in RolloutEngine(tiny_qwen3_path).generate(prompts, sp)]
    monkeypatch.setattr(BlockManager, "chain_key", staticmethod(lambda prev, tokens: 42))
    colliding = RolloutEngine(tiny_qwen3_path)
    for p, want in zip(prompts, honest):  # one at a time so each could (wrongly) hit the last one's blocks
        assert colliding.generate([p], sp)[0].outputs[0].token_ids == want


def test_prefix_caching_off_computes_everything(tiny_qwen3_path):
    engine = RolloutEngine(tiny_qwen3_path, enable_prefix_caching=False)
    prompt = random_prompts([40], TINY_VOCAB, seed=10)[0]
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.generate([prompt], sp)
    before = engine.stats.prompt_tokens_computed
    engine.generate([prompt], sp)
    assert engine.stats.prompt_tokens_computed - before == 40


def test_request_kept_across_a_weight_update_serves_no_stale_prefix(tiny_llama_path, tmp_path):
    """A request kept running through pause("keep") / update_weights / resume (no recompute)
    holds KV of the old weights; a later request with the same prompt must not be served it:
    its greedy tokens are HF's under the new weights, with nothing taken from the cache."""
    import asyncio

    from _rl_util import changed_model
    from atom import AsyncRolloutEngine
    from helpers import hf_greedy

    new = changed_model(tiny_llama_path, seed=3)
    new.save_pretrained(tmp_path, safe_serialization=True)
    prompt = random_prompts([48], TINY_VOCAB, seed=1)[0]
    engine = AsyncRolloutEngine(tiny_llama_path, device="cpu", num_kv_blocks=64, max_model_len=128)
    greedy = dict(temperature=0, ignore_eos=True)

    async def run():
        kept = asyncio.create_task(engine.generate(prompt, SamplingParams(max_tokens=40, **greedy), request_id="kept"))
        while not await engine.call(lambda e: e.num_running_sequences):
            await asyncio.sleep(0.001)
        await engine.pause_generation("keep")
        await engine.update_weights([(n, p.detach()) for n, p in new.named_parameters()])
        await engine.resume_generation()
        await asyncio.wait_for(kept, 120)
        before = await engine.call(lambda e: e.stats.prompt_tokens_cached)
        later = await engine.generate(prompt, SamplingParams(max_tokens=8, **greedy), request_id="later")
        return later, await engine.call(lambda e: e.stats.prompt_tokens_cached) - before

    try:
        later, cached = asyncio.run(run())
    finally:
        engine.close()
    assert cached == 0
    assert later.outputs[0].token_ids == hf_greedy(str(tmp_path), prompt, 8)


def test_reset_prefix_cache_with_requests_running(tiny_llama_path):
    """vLLM's answer while requests hold blocks is False, nothing changed; with
    reset_running_requests the cache is emptied anyway, the running request finishes with the
    tokens it would have had, and nothing it computed is served to a later request."""
    import asyncio

    from atom import AsyncRolloutEngine
    from helpers import hf_greedy

    prompt = random_prompts([48], TINY_VOCAB, seed=2)[0]
    engine = AsyncRolloutEngine(tiny_llama_path, device="cpu", num_kv_blocks=64, max_model_len=128)
    greedy = dict(temperature=0, ignore_eos=True)

    async def run():
        await engine.generate(prompt, SamplingParams(max_tokens=1, **greedy), request_id="warm")  # cached now
        running = asyncio.create_task(engine.generate(prompt, SamplingParams(max_tokens=40, **greedy), request_id="r"))
        while not await engine.call(lambda e: e.num_running_sequences):
            await asyncio.sleep(0.001)
        await engine.pause_generation("keep")  # so that it is surely still running below
        refused = await engine.call(lambda e: e.reset_prefix_cache())
        with pytest.raises(TypeError, match="reset_running_requests"):
            await engine.call(lambda e: e.reset_prefix_cache(reset_running_requests="yes"))
        done = await engine.call(lambda e: e.reset_prefix_cache(reset_running_requests=True))
        await engine.resume_generation()
        first = await asyncio.wait_for(running, 120)
        before = await engine.call(lambda e: e.stats.prompt_tokens_cached)
        later = await engine.generate(prompt, SamplingParams(max_tokens=4, **greedy), request_id="later")
        return refused, done, first, later, await engine.call(lambda e: e.stats.prompt_tokens_cached) - before

    try:
        refused, done, first, later, cached = asyncio.run(run())
    finally:
        engine.close()
    assert refused is False and done is True
    assert first.outputs[0].token_ids == hf_greedy(tiny_llama_path, prompt, 40)
    assert cached == 0 and later.outputs[0].token_ids == first.outputs[0].token_ids[:4]
