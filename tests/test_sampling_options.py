"""Issue 15: vLLM's sampler options in the batched sampler, each against a reference computed
independently (HF transformers' logits processors where one exists, else by hand with Counter):
repetition / presence / frequency penalties, logit bias, allowed tokens, bad words, min_tokens,
the logprobs modes, whole-vocabulary logprobs and ranks. The sampler is fed through the engine's
own metadata builder (sampling_metadata) from real Sequence objects."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor, NoBadWordsLogitsProcessor, RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor, SuppressTokensLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper)

from atom import SamplingParams
from atom.engine.penalties import PenaltyState, pack_token_sets
from atom.engine.sampler import sampling_metadata
from atom.engine.sequence import Request, Sequence
from atom.ops.logits_processing import state_width
from atom.ops.metadata import LogitsProcessing, SamplingMetadata
from atom.ops.torch_ops import sample

V = 64
EOS = [1]
CPU = torch.device("cpu")


def rows_of(params: list[SamplingParams], prompts: list[list[int]], outputs: list[list[int]], seed: int = 0):
    rows = []
    for i, (p, prompt, out) in enumerate(zip(params, prompts, outputs)):
        seq = Sequence(Request(i, None, prompt, p, seed=seed + i), 0, prompt + out)
        seq.fork_pending = False
        rows.append((seq, 0))
    return rows


def run(params, prompts, outputs, logits, seed=0):
    rows = rows_of(params, prompts, outputs, seed)
    pen = PenaltyState(len(rows), V, 1024, CPU).prepare(rows)  # slots filled from the sequences' tokens
    return sample(logits.clone(), sampling_metadata(rows, EOS, CPU, penalties=pen))


def full_vector(out, r: int) -> torch.Tensor:
    """Row r's whole-vocabulary values from a logprobs=-1 result, indexed by token id."""
    v = torch.empty(V)
    v[out.top_ids[r]] = out.top_logprobs[r]
    return v


def random_case(rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, V, generator=g) * 3
    prompts = [torch.randint(2, V, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in range(rows)]
    outputs = [torch.randint(2, V, (int(torch.randint(0, 10, (1,), generator=g)),), generator=g).tolist()
               for _ in range(rows)]
    return logits, prompts, outputs


def hf(processor, input_ids: list[int], logits_row: torch.Tensor) -> torch.Tensor:
    return processor(torch.tensor([input_ids], dtype=torch.long), logits_row[None].clone())[0]


def test_repetition_penalty_matches_hf_over_prompt_and_output():
    penalties = [1.0, 1.3, 0.7, 2.0, 1.15]
    logits, prompts, outputs = random_case(len(penalties), seed=1)
    params = [SamplingParams(temperature=0, repetition_penalty=p, logprobs=-1) for p in penalties]
    out = run(params, prompts, outputs, logits)
    for r, pen in enumerate(penalties):
        want = hf(RepetitionPenaltyLogitsProcessor(pen), prompts[r] + outputs[r], logits[r]).log_softmax(-1)
        torch.testing.assert_close(full_vector(out, r), want, atol=1e-5, rtol=0)
        assert out.token_ids[r] == want.argmax()
        assert abs(out.logprobs[r] - want[out.token_ids[r]]) < 1e-5


def test_presence_and_frequency_count_generated_tokens_only():
    cases = [(0.0, 0.0, 1.0), (0.5, 0.0, 1.0), (0.0, 0.8, 1.0), (-0.7, 1.2, 1.0), (1.5, -0.4, 1.25), (2.0, 2.0, 0.8)]
    logits, prompts, outputs = random_case(len(cases), seed=2)
    outputs[1] = outputs[1] + outputs[1][:2] + [prompts[1][0]]  # repeats, and a prompt token generated too
    params = [SamplingParams(temperature=0, presence_penalty=pp, frequency_penalty=fp, repetition_penalty=rp,
                             logprobs=-1) for pp, fp, rp in cases]
    out = run(params, prompts, outputs, logits)
    for r, (pp, fp, rp) in enumerate(cases):
        # vLLM's order: repetition (prompt + output) first, then frequency and presence (output only).
        want = hf(RepetitionPenaltyLogitsProcessor(rp), prompts[r] + outputs[r], logits[r])
        for tok, count in Counter(outputs[r]).items():
            want[tok] -= fp * count + pp
        torch.testing.assert_close(full_vector(out, r), want.log_softmax(-1), atol=1e-5, rtol=0)


def test_logit_bias_comes_before_the_penalties_and_the_temperature_and_top_k():
    logits, prompts, outputs = random_case(3, seed=3)
    biases = [{5: 4.0, 9: -2.5}, {}, {int(logits[2].argmax()): -100.0, 7: 0.5}]
    params = [SamplingParams(temperature=0.7, top_k=5, logit_bias=b, repetition_penalty=1.4, logprobs=-1,
                             seed=11) for b in biases]
    out = run(params, prompts, outputs, logits)
    for r, bias in enumerate(biases):
        x = logits[r]
        if bias:
            x = hf(SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()]), prompts[r] + outputs[r], x)
        x = hf(RepetitionPenaltyLogitsProcessor(1.4), prompts[r] + outputs[r], x)
        x = hf(TopKLogitsWarper(5), [0], hf(TemperatureLogitsWarper(0.7), [0], x))
        want = x.log_softmax(-1)
        torch.testing.assert_close(full_vector(out, r), want, atol=1e-5, rtol=0)
        assert torch.isfinite(want[out.token_ids[r]])  # drawn from inside the processed support
    assert out.token_ids[2] != logits[2].argmax()


def test_allowed_token_ids_keep_only_those_tokens():
    logits, prompts, outputs = random_case(3, seed=4)
    allowed = [[3, 17, 40], None, [int(logits[2].argmin())]]
    params = [SamplingParams(temperature=1.0, allowed_token_ids=a, logprobs=-1, seed=5) for a in allowed]
    out = run(params, prompts, outputs, logits)
    for r, keep in enumerate(allowed):
        want = logits[r]
        if keep is not None:
            want = hf(SuppressTokensLogitsProcessor(sorted(set(range(V)) - set(keep))), [0], want)
        torch.testing.assert_close(full_vector(out, r), want.log_softmax(-1), atol=1e-5, rtol=0)
    assert out.token_ids[0] in (3, 17, 40) and out.token_ids[2] == allowed[2][0]


def test_bad_words_ban_the_last_token_after_the_generated_prefix():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(4, V, generator=g) * 3
    prompts = [[10, 11, 12]] * 4
    outputs = [[20, 21, 22, 23], [20, 21, 22, 23], [30], []]
    words = [
        [[22, 23, 50], [21, 51], [52], [9, 22, 23, 53]],  # 50, 51? no: 22 23 | 50 matches, 21 51 does not
        [[23, 44], [60, 45], [22, 23, 46, 47]],            # 44 banned; 45 not; a 4-token word not yet
        [[2, 3, 4, 5, 6]],                                   # longer than output + 1: skipped
        [[12, 33]],                                          # prefix in the prompt only: vLLM does not ban
    ]
    params = []
    for w in words:
        p = SamplingParams(temperature=0, logprobs=-1)
        p.bad_words_token_ids = w  # what the engine sets from the tokenizer
        params.append(p)
    out = run(params, prompts, outputs, logits)
    for r in range(3):
        want = hf(NoBadWordsLogitsProcessor(words[r]), outputs[r], logits[r])  # output tokens only, as vLLM
        torch.testing.assert_close(full_vector(out, r), want.log_softmax(-1), atol=1e-5, rtol=0)
    assert torch.isinf(full_vector(out, 0)[[50, 52]]).all() and torch.isfinite(full_vector(out, 0)[[51, 53]]).all()
    assert torch.isinf(full_vector(out, 1)[44]) and torch.isfinite(full_vector(out, 1)[[45, 46]]).all()
    torch.testing.assert_close(full_vector(out, 3), logits[3].log_softmax(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_bans_eos_and_stop_ids_like_hf(ignore_eos):
    """vLLM bans EOS for the first min_tokens tokens even with ignore_eos (its all_stop_token_ids)."""
    logits, prompts, _ = random_case(3, seed=7)
    logits[:, EOS[0]] = 10.0
    outputs = [[5] * 2, [5] * 3, [5] * 4]
    params = [SamplingParams(temperature=0, min_tokens=4, stop_token_ids=[8], ignore_eos=ignore_eos, logprobs=-1)
              for _ in range(3)]
    out = run(params, prompts, outputs, logits)
    for r in range(3):
        proc = MinNewTokensLengthLogitsProcessor(len(prompts[r]), 4, EOS + [8])
        want = hf(proc, prompts[r] + outputs[r], logits[r]).log_softmax(-1)
        torch.testing.assert_close(full_vector(out, r), want, atol=1e-5, rtol=0)
    assert out.token_ids.tolist()[2] == EOS[0] and EOS[0] not in out.token_ids.tolist()[:2]


def test_ranks_and_logprobs_modes():
    logits, prompts, outputs = random_case(4, seed=8)
    modes = ["processed_logprobs", "raw_logprobs", "raw_logits", "processed_logits"]
    params = [SamplingParams(temperature=0.8, repetition_penalty=1.5, logprobs=3, logprobs_mode=m, seed=r)
              for r, m in enumerate(modes)]
    out = run(params, prompts, outputs, logits)
    for r, mode in enumerate(modes):
        processed = hf(TemperatureLogitsWarper(0.8), [0],
                       hf(RepetitionPenaltyLogitsProcessor(1.5), prompts[r] + outputs[r], logits[r]))
        basis = logits[r] if mode.startswith("raw") else processed
        values = basis if mode.endswith("logits") else basis.log_softmax(-1)
        tok = int(out.token_ids[r])
        assert abs(float(out.logprobs[r]) - float(values[tok])) < 1e-5
        want_top = values.topk(3)
        assert out.top_ids[r].tolist() == want_top.indices.tolist()
        torch.testing.assert_close(out.top_logprobs[r], want_top.values, atol=1e-5, rtol=0)
        assert int(out.ranks[r]) == 1 + int((values > values[tok]).sum())


def test_no_ranks_without_logprobs_and_whole_vocabulary_with_minus_one():
    logits, prompts, outputs = random_case(2, seed=9)
    out = run([SamplingParams(temperature=0)] * 2, prompts, outputs, logits)
    assert out.ranks is None and out.top_ids.shape == (2, 0)
    out = run([SamplingParams(temperature=0, logprobs=-1), SamplingParams(temperature=0, logprobs=2)],
              prompts, outputs, logits)
    assert out.top_ids.shape == (2, V) and sorted(out.top_ids[0].tolist()) == list(range(V))
    assert out.ranks.tolist() == [1, 1]


def test_identity_processing_keeps_the_seeded_stream():
    """A zero bias runs the processing step but changes no logit: the seeded draws are the same
    tokens as without it (the noise depends on seed, sample index, position and token only), and
    rows without options are untouched by their neighbours' options."""
    logits, prompts, outputs = random_case(6, seed=10)
    plain = [SamplingParams(temperature=1.0, seed=100 + r) for r in range(6)]
    with_zero_bias = [SamplingParams(temperature=1.0, seed=100 + r, logit_bias={3: 0.0}) for r in range(6)]
    mixed = plain[:3] + [SamplingParams(temperature=1.0, seed=103, repetition_penalty=3.0,
                                        presence_penalty=2.0)] + plain[4:]
    a, b, c = (run(p, prompts, outputs, logits) for p in (plain, with_zero_bias, mixed))
    assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.logprobs, b.logprobs)
    keep = [0, 1, 2, 4, 5]
    assert torch.equal(a.token_ids[keep], c.token_ids[keep]) and torch.equal(a.logprobs[keep], c.logprobs[keep])


def test_samples_follow_the_processed_distribution():
    """Gumbel-max draws from softmax((logits + bias - penalties) / T): 40000 draws."""
    rows = 40000
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    logits = base.repeat(rows, 1)
    counts = torch.zeros(1, state_width(6), dtype=torch.int16)
    counts[0, 2] = 2  # every row reads slot 0: prompt [0], token 2 generated twice
    proc = LogitsProcessing(
        bias_rows=torch.arange(rows), bias_tokens=torch.full((rows,), 4), bias_values=torch.full((rows,), 2.5),
        repetition=torch.full((rows,), 2.0), presence=torch.full((rows,), 0.5), frequency=torch.full((rows,), 0.25),
        penalty_slots=torch.zeros(rows, dtype=torch.int64), token_counts=counts,
        prompt_mask=pack_token_sets([[0]], 6, CPU))
    meta = SamplingMetadata(
        temperature=torch.full((rows,), 0.8), top_k=torch.zeros(rows, dtype=torch.int64),
        top_p=torch.ones(rows), min_p=torch.zeros(rows), seeds=torch.full((rows,), 77, dtype=torch.int64),
        counters=torch.arange(rows, dtype=torch.int64), raw_logprobs=torch.zeros(rows, dtype=torch.bool),
        banned_rows=None, banned_tokens=None, need_filter=False, all_greedy=False, any_raw=False,
        num_top_logprobs=0, processing=proc)
    out = sample(logits, meta)
    # By hand: bias on 4; token 0 (prompt) and 2 (generated twice) divided by 2 (positive logits);
    # token 2 also loses 2 * 0.25 + 0.5.
    want = base.clone().double()
    want[4] += 2.5
    want[0] /= 2.0
    want[2] = want[2] / 2.0 - 2 * 0.25 - 0.5
    want = (want / 0.8).softmax(-1)
    freq = torch.bincount(out.token_ids, minlength=6).double() / rows
    assert (freq - want).abs().max() < 0.01
    assert torch.allclose(out.logprobs.double(), want.log()[out.token_ids], atol=1e-5)
