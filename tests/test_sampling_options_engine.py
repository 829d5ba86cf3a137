"""Issue 15 through the engine: the new SamplingParams options end to end on a tiny model, each
against HF transformers (its generate / logits processors on the same checkpoint), and the new
outputs (cumulative_logprob, logprob_ranks, whole-vocabulary logprobs, prompt ranks)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from atom import RolloutEngine, SamplingParams
from conftest import TINY_VOCAB
from helpers import hf_logits, hf_model, random_prompts

PROMPT = random_prompts([9], TINY_VOCAB, seed=41)[0]


@pytest.fixture(scope="module")
def engine(tiny_qwen3_path):
    return RolloutEngine(tiny_qwen3_path, max_model_len=64)


def greedy(engine, n_tokens=12, **kw):
    params = SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True, logprobs=0, **kw)
    return engine.generate([PROMPT], params)[0].outputs[0]


@torch.no_grad()
def test_repetition_penalty_matches_hf_generate_and_its_logprobs(engine, tiny_qwen3_path):
    plain = greedy(engine)
    out = greedy(engine, repetition_penalty=1.8)
    hf_ids = hf_model(tiny_qwen3_path).generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False,
                                                repetition_penalty=1.8, eos_token_id=None, pad_token_id=0)
    assert out.token_ids == hf_ids[0, len(PROMPT):].tolist()
    assert out.token_ids != plain.token_ids  # the penalty mattered for this prompt
    logits = hf_logits(tiny_qwen3_path, PROMPT + out.token_ids)
    proc = RepetitionPenaltyLogitsProcessor(1.8)
    for i, tok in enumerate(out.token_ids):
        ids = torch.tensor([PROMPT + out.token_ids[:i]])
        want = proc(ids, logits[len(PROMPT) - 1 + i][None].clone())[0].log_softmax(-1)
        assert abs(out.logprobs[i] - float(want[tok])) < 1e-4
        assert out.logprob_ranks[i] == 1  # greedy: the best token under the processed logits


def test_presence_and_frequency_penalties_follow_the_openai_formula(engine, tiny_qwen3_path):
    out = greedy(engine, presence_penalty=0.6, frequency_penalty=0.9)
    logits = hf_logits(tiny_qwen3_path, PROMPT + out.token_ids)
    for i, tok in enumerate(out.token_ids):
        x = logits[len(PROMPT) - 1 + i].clone()
        for t, c in Counter(out.token_ids[:i]).items():
            x[t] -= 0.9 * c + 0.6
        assert tok == int(x.argmax())
        assert abs(out.logprobs[i] - float(x.log_softmax(-1)[tok])) < 1e-4


def test_bias_and_allowed_tokens_steer_greedy_decoding(engine):
    out = greedy(engine, allowed_token_ids=[7, 8, 9], logit_bias={9: 50.0})
    assert out.token_ids == [9] * 12
    out = greedy(engine, allowed_token_ids=[7, 8, 9], logprobs_mode="raw")
    assert set(out.token_ids) <= {7, 8, 9}


def test_seeded_penalized_request_is_the_same_alone_and_in_a_batch(engine):
    sp = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=5, repetition_penalty=1.3,
                        frequency_penalty=0.5, logit_bias={4: 1.0}, logprobs=0)
    alone = engine.generate([PROMPT], sp)[0].outputs[0]
    others = random_prompts([5, 13, 7], TINY_VOCAB, seed=42)
    batch = engine.generate(others[:2] + [PROMPT] + others[2:],
                            [SamplingParams(temperature=1.0, max_tokens=10, seed=9)] * 2 + [sp]
                            + [SamplingParams(temperature=0.7, max_tokens=6, presence_penalty=1.0)])
    got = batch[2].outputs[0]
    assert got.token_ids == alone.token_ids
    assert got.logprobs == pytest.approx(alone.logprobs, abs=1e-5)


def test_n_samples_each_count_their_own_tokens(engine, tiny_qwen3_path):
    outs = engine.generate([PROMPT], SamplingParams(n=3, temperature=1.0, max_tokens=8, ignore_eos=True, seed=3,
                                                    frequency_penalty=1.5, logprobs=0))[0].outputs
    for c in outs:
        logits = hf_logits(tiny_qwen3_path, PROMPT + c.token_ids)
        for i, tok in enumerate(c.token_ids):
            x = logits[len(PROMPT) - 1 + i].clone()
            for t, k in Counter(c.token_ids[:i]).items():
                x[t] -= 1.5 * k
            assert abs(c.logprobs[i] - float(x.log_softmax(-1)[tok])) < 1e-4


def test_whole_vocabulary_logprobs_ranks_and_cumulative(tiny_qwen3_path):
    with pytest.raises(ValueError, match="max_logprobs=20"):
        RolloutEngine(tiny_qwen3_path, max_model_len=64).generate([PROMPT], SamplingParams(logprobs=-1))
    engine = RolloutEngine(tiny_qwen3_path, max_model_len=64, max_logprobs=-1)
    out = engine.generate([PROMPT], SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=2,
                                                   logprobs=-1, logprobs_mode="raw", prompt_logprobs=-1))[0]
    c = out.outputs[0]
    logits = hf_logits(tiny_qwen3_path, PROMPT + c.token_ids)
    for i, tok in enumerate(c.token_ids):
        want = logits[len(PROMPT) - 1 + i].log_softmax(-1)
        top = c.top_logprobs[i]
        assert len(top) == TINY_VOCAB and list(top)[0] == int(want.argmax())
        got = torch.tensor([top[t] for t in range(TINY_VOCAB)])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert c.logprob_ranks[i] == 1 + int((want > want[tok]).sum())
    assert c.cumulative_logprob == pytest.approx(sum(c.logprobs), abs=1e-9)
    assert out.prompt_logprobs[0] is None and out.prompt_logprob_ranks[0] is None
    for pos in range(1, len(PROMPT)):
        want = logits[pos - 1].log_softmax(-1)
        assert len(out.prompt_logprobs[pos]) == TINY_VOCAB
        assert out.prompt_logprob_ranks[pos] == 1 + int((want > want[PROMPT[pos]]).sum())
    plain = engine.generate([PROMPT], SamplingParams(max_tokens=3))[0].outputs[0]
    assert plain.cumulative_logprob is None and plain.logprob_ranks == []


def test_logits_modes_report_logits(engine, tiny_qwen3_path):
    c = greedy(engine, n_tokens=5, logprobs_mode="raw_logits")
    logits = hf_logits(tiny_qwen3_path, PROMPT + c.token_ids)
    for i, tok in enumerate(c.token_ids):
        assert abs(c.logprobs[i] - float(logits[len(PROMPT) - 1 + i][tok])) < 1e-4
    c = engine.generate([PROMPT], SamplingParams(temperature=0.5, max_tokens=5, ignore_eos=True, seed=1, logprobs=0,
                                                 logprobs_mode="processed_logits"))[0].outputs[0]
    logits = hf_logits(tiny_qwen3_path, PROMPT + c.token_ids)
    for i, tok in enumerate(c.token_ids):
        assert abs(c.logprobs[i] - float(logits[len(PROMPT) - 1 + i][tok]) / 0.5) < 1e-4


def test_max_tokens_none_runs_to_max_model_len_and_truncation_keeps_the_tail(tiny_qwen3_path):
    engine = RolloutEngine(tiny_qwen3_path, max_model_len=24)
    c = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0].outputs[0]
    assert len(c.token_ids) == 24 - len(PROMPT) and c.finish_reason == "length"
    cut = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                   truncate_prompt_tokens=4))[0]
    direct = engine.generate([PROMPT[-4:]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert cut.prompt_token_ids == PROMPT[-4:] and cut.outputs[0].token_ids == direct.outputs[0].token_ids
    long_prompt = random_prompts([40], TINY_VOCAB, seed=43)[0]
    kept = engine.generate([long_prompt], SamplingParams(max_tokens=1, truncate_prompt_tokens=-1))[0]
    assert kept.prompt_token_ids == long_prompt[-23:]


def test_stop_and_bad_words_need_a_tokenizer(engine):
    with pytest.raises(ValueError, match="SamplingParams.bad_words needs a tokenizer"):
        engine.generate([PROMPT], SamplingParams(bad_words=["x"]))
    assert greedy(engine, n_tokens=2).token_ids
