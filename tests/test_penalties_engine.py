"""Penalties through the engine with the device penalty state (atom/engine/penalties.py): every
completion's logprobs against HF's logits with the penalties computed from that completion's
own tokens, under preemption (step-by-step and overlapped loops), when an aborted request's slot
goes to a new one, and across a prefix-cache hit and a pause / release of the KV cache (which drops
the state) / resume."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from atom import RolloutEngine, SamplingParams
from conftest import TINY_VOCAB
from helpers import hf_logits, random_prompts

PEN = dict(repetition_penalty=1.4, presence_penalty=0.5, frequency_penalty=0.6)


def assert_matches_hf(path, prompt: list[int], completion, p: SamplingParams) -> None:
    """Each token's processed logprob from HF's logits, the penalties from the tokens before it."""
    tokens = completion.token_ids
    logits = hf_logits(path, prompt + tokens)
    for i, tok in enumerate(tokens):
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(
            torch.tensor([prompt + tokens[:i]]), logits[len(prompt) - 1 + i][None].clone())[0]
        for t, c in Counter(tokens[:i]).items():
            x[t] -= p.frequency_penalty * c + p.presence_penalty
        want = (x / (p.temperature or 1.0)).log_softmax(-1)[tok]
        assert abs(completion.logprobs[i] - float(want)) < 1e-4, (i, tok)


@pytest.mark.parametrize("overlapped", [False, True])
def test_penalized_samples_under_preemption_match_hf_and_a_roomy_engine(tiny_qwen3_path, overlapped):
    prompts = random_prompts([30, 18, 25], TINY_VOCAB, seed=60)
    sp = SamplingParams(n=2, temperature=1.0, max_tokens=24, ignore_eos=True, seed=8, logprobs=0, **PEN)
    kw = dict(overlap_decode=overlapped, kv_cache_memory_bytes=64 << 20)
    want = RolloutEngine(tiny_qwen3_path, **kw).generate(prompts, sp)
    tight = RolloutEngine(tiny_qwen3_path, num_kv_blocks=9, max_num_seqs=4, **kw)
    got = tight.generate(prompts, sp)
    assert tight.stats.preemptions > 0 and tight.stats.recomputed_tokens > 0
    for prompt, w, g in zip(prompts, want, got):
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in w.outputs]
        for c in g.outputs:
            assert_matches_hf(tiny_qwen3_path, prompt, c, sp)


def test_a_new_request_in_an_aborted_requests_slot_starts_clean(tiny_qwen3_path):
    a, b = random_prompts([12, 15], TINY_VOCAB, seed=61)
    sp_b = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0, **PEN)
    alone = RolloutEngine(tiny_qwen3_path).generate([b], sp_b)[0].outputs[0]
    engine = RolloutEngine(tiny_qwen3_path, max_num_seqs=1)  # one sequence at a time: b gets a's slot
    engine.add_request("a", a, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, frequency_penalty=2.0))
    for _ in range(6):
        engine.step()
    assert engine.abort("a")["a"].outputs[0].token_ids  # aborted after generating some tokens
    engine.add_request("b", b, sp_b)
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    got = done["b"].outputs[0]
    assert got.token_ids == alone.token_ids
    assert_matches_hf(tiny_qwen3_path, b, got, sp_b)


def test_penalties_continue_after_the_kv_cache_is_released_mid_request(tiny_qwen3_path):
    prompt = random_prompts([40], TINY_VOCAB, seed=62)[0]
    sp = SamplingParams(temperature=0.8, seed=4, max_tokens=20, ignore_eos=True, logprobs=0, **PEN)
    engine = RolloutEngine(tiny_qwen3_path)
    whole = engine.generate([prompt], sp)[0].outputs[0]
    cached = engine.stats.prompt_tokens_cached
    engine.add_request("r", prompt, sp)  # its prompt's full blocks come from the prefix cache
    for _ in range(8):
        engine.step()
    assert engine.stats.prompt_tokens_cached > cached
    engine.pause_generation("keep")
    engine.release_memory_occupation(["kv_cache"])  # the penalty state goes with it
    engine.resume_memory_occupation()
    engine.resume_generation()
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    got = done["r"].outputs[0]
    assert got.token_ids == whole.token_ids
    assert_matches_hf(tiny_qwen3_path, prompt, got, sp)


def test_forking_prefills_never_run_more_than_max_num_seqs(tiny_qwen3_path, monkeypatch):
    """The penalty state has max_num_seqs slots: a forking prefill's seats stay reserved until its
    samples fork, so three n=2 requests under max_num_seqs=4 run four sequences at most (six
    before the reservation counted)."""
    from atom.engine.scheduler import Scheduler
    running = []
    update = Scheduler.update

    def counted(self, *args, **kwargs):
        out = update(self, *args, **kwargs)
        running.append(len(self.running))
        return out

    monkeypatch.setattr(Scheduler, "update", counted)
    prompts = random_prompts([30, 18, 25], TINY_VOCAB, seed=63)
    sp = SamplingParams(n=2, temperature=1.0, max_tokens=6, ignore_eos=True, seed=1, **PEN)
    outs = RolloutEngine(tiny_qwen3_path, max_num_seqs=4).generate(prompts, sp)
    assert all(len(c.token_ids) == 6 for o in outs for c in o.outputs)
    assert max(running) == 4
