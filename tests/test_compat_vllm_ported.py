"""atom.compat.vllm against what vLLM's own tests of its offline API assert (tests/entrypoints/llm,
tests/samplers, tests/detokenizer, tests/v1/sample): the same behaviours, checked here with
atom's tiny random model and independent oracles (HF transformers, the tokenizer, arithmetic).

Written for atom, not copied: each test names the vLLM behaviour it pins down."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from atom.compat.vllm import LLM, SamplingParams, TokensPrompt
from helpers import hf_greedy, hf_logits

KW = dict(num_kv_blocks=128, max_model_len=256, max_num_seqs=16)
PROMPTS = ["Hello, my name is", "The president of the United States is", "The capital of France is",
           "The future of AI is"]
STORY = "A story about vLLM:\n"


@pytest.fixture(scope="module")
def llm(tiny_chat_model_path):
    # max_logprobs=-1: whole-vocabulary logprobs allowed (vLLM's test_all_logprobs engine)
    return LLM(tiny_chat_model_path, max_logprobs=-1, **KW)


@pytest.fixture(scope="module")
def tok(llm):
    return llm.get_tokenizer()


def _gen(llm, prompt, **kw):
    """The one completion of one prompt."""
    return llm.generate(prompt, SamplingParams(**kw), use_tqdm=False)[0].outputs[0]


def _assert_serves(llm):
    """A bad call must leave the engine usable."""
    out = _gen(llm, [5, 6, 7], temperature=0.0, max_tokens=3, ignore_eos=True)
    assert len(out.token_ids) == 3 and llm.engine.num_free_kv_blocks == llm.engine.num_kv_blocks


def _hf_rank(row: torch.Tensor, token: int, tol: float = 1e-4) -> tuple[int, int]:
    """The range of ranks `token` may have in a reference logprob row (values within tol tie)."""
    v = row[token].item()
    return int((row > v + tol).sum()) + 1, int((row >= v - tol).sum())


# ---- SamplingParams: vLLM's normalisation and validation ------------------------------------------

def test_sampling_params_normalise_fields_as_vllm():
    sp = SamplingParams()
    assert (sp.stop, sp.stop_token_ids, sp.bad_words) == ([], [], [])
    sp = SamplingParams(stop="END", stop_token_ids=[3, 3, 7, 3], bad_words=["x", "x"], logprobs=True,
                        prompt_logprobs=True, seed=-1)
    assert sp.stop == ["END"] and sp.stop_token_ids == [3, 7] and sp.bad_words == ["x"]
    assert (sp.logprobs, sp.prompt_logprobs, sp.seed) == (1, 1, None)
    # Greedy: the filters are reset (they change nothing there), n > 1 is refused.
    greedy = SamplingParams(temperature=0.0, top_p=0.5, top_k=5, min_p=0.2)
    assert (greedy.top_p, greedy.top_k, greedy.min_p) == (1.0, 0, 0.0)
    with pytest.raises(ValueError, match="n must be 1 when using greedy sampling"):
        SamplingParams(n=2, temperature=0.0)
    # clone / deepcopy are independent copies; a field set afterwards is what the request uses.
    base = SamplingParams(stop=["a"])
    twin = base.clone()
    twin.stop.append("b")
    assert base.stop == ["a"] and copy.deepcopy(base) == base
    late = SamplingParams(max_tokens=4)
    late.seed = -1  # set after construction: still "no seed"
    assert late.to_atom().seed is None
    assert SamplingParams(max_tokens=None, min_tokens=5).min_tokens == 5  # no upper bound to check against
    assert SamplingParams.from_optional() == SamplingParams()
    nones = SamplingParams.from_optional(**{f: None for f in SamplingParams.__dataclass_fields__})
    assert (nones.n, nones.temperature, nones.top_p, nones.max_tokens, nones.stop) == (1, 1.0, 1.0, None, [])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(stop=123), TypeError, "stop"),
    (dict(stop_token_ids="abc"), TypeError, "stop_token_ids"),
    (dict(bad_words={"bad": "word"}), TypeError, "bad_words"),
    (dict(stop=["END", ""]), ValueError, "stop"),
    (dict(bad_words=["bad", ""]), ValueError, "bad_words"),
    (dict(stop_token_ids=[1, "x", 3]), ValueError, "stop_token_ids"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(repetition_penalty=float("inf")), ValueError, "repetition_penalty"),
    (dict(repetition_penalty=float("nan")), ValueError, "repetition_penalty"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_k=-2), ValueError, "top_k"),
    (dict(min_p=1.5), ValueError, "min_p"),
    (dict(max_tokens=0), ValueError, "max_tokens"),
    (dict(min_tokens=5, max_tokens=3), ValueError, "min_tokens"),
    (dict(logprobs=-2), ValueError, "logprobs"),
    (dict(presence_penalty=3.0), ValueError, "presence_penalty"),
    (dict(n=2, best_of=3), ValueError, "best_of"),
    (dict(logits_processors=[lambda ids, logits: logits]), ValueError, "logits_processors"),
    (dict(detokenize=False, stop=["x"]), ValueError, "stop"),
])
def test_bad_sampling_params_raise_naming_the_field(kwargs, error, match):
    with pytest.raises(error, match=match):
        SamplingParams(**kwargs)


def test_bad_request_values_raise_and_the_engine_survives(llm):
    for allowed in ([], [-1], [10_000_000]):  # empty, negative, outside the vocabulary
        with pytest.raises(ValueError, match="allowed_token_ids"):
            llm.generate(STORY, SamplingParams(allowed_token_ids=allowed), use_tqdm=False)
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate(STORY, SamplingParams(stop_token_ids=[10_000_000]), use_tqdm=False)
    with pytest.raises(TypeError, match="sampling_params"):
        llm.generate(STORY, "greedy", use_tqdm=False)
    with pytest.raises(TypeError, match="sampling_params"):
        llm.generate([STORY], [object()], use_tqdm=False)
    _assert_serves(llm)


# ---- generate(): prompts, per-prompt params, priority -------------------------------------------

def test_multiple_sampling_params_and_priority(llm):
    per_prompt = [SamplingParams(temperature=t, top_p=0.95, max_tokens=4) for t in (0.01, 0.3, 0.7, 0.99)]
    assert len(llm.generate(PROMPTS, per_prompt, use_tqdm=False)) == len(PROMPTS)
    with pytest.raises(ValueError, match="3 SamplingParams for 4 prompts"):
        llm.generate(PROMPTS, per_prompt[:3], use_tqdm=False)
    one = SamplingParams(temperature=0.3, top_p=0.95, max_tokens=4)
    assert len(llm.generate(PROMPTS, one, use_tqdm=False)) == len(PROMPTS)
    assert len(llm.generate(PROMPTS, None, use_tqdm=False)) == len(PROMPTS)  # the model's defaults
    assert len(llm.generate(PROMPTS, one, priority=None, use_tqdm=False)) == len(PROMPTS)
    assert len(llm.generate(PROMPTS, one, priority=[0] * 4, use_tqdm=False)) == len(PROMPTS)
    assert len(llm.generate(PROMPTS[0], one, priority=[0], use_tqdm=False)) == 1  # one prompt, one priority
    for bad in ([0] * 3, []):  # a priority list must have one value per prompt
        with pytest.raises(ValueError, match="priorit"):
            llm.generate(PROMPTS, one, priority=bad, use_tqdm=False)
    _assert_serves(llm)


def test_prompt_validation_uses_vllms_wording(llm):
    with pytest.raises(ValueError, match="Prompt cannot be empty"):
        llm.generate([""], use_tqdm=False)
    with pytest.raises(ValueError, match="Prompt cannot be empty"):
        llm.generate(TokensPrompt(prompt_token_ids=[]), use_tqdm=False)
    with pytest.raises(ValueError, match="out of vocabulary"):
        llm.generate({"prompt_token_ids": [999_999]}, use_tqdm=False)
    with pytest.raises(ValueError, match="out of vocabulary"):
        llm.generate([[5, -1]], use_tqdm=False)
    _assert_serves(llm)


def test_legacy_prompt_token_ids_keyword(llm):
    sp = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    ids = [[1, 504, 3575], [282, 4649]]
    want = [o.outputs[0].token_ids for o in llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], sp,
                                                         use_tqdm=False)]
    got = llm.generate(prompt_token_ids=ids, sampling_params=sp, use_tqdm=False)
    assert [o.prompt_token_ids for o in got] == ids and [o.outputs[0].token_ids for o in got] == want
    single = llm.generate(prompt_token_ids=ids[0], sampling_params=sp, use_tqdm=False)
    assert len(single) == 1 and single[0].outputs[0].token_ids == want[0]
    with pytest.raises(ValueError, match="not both"):
        llm.generate("x", sp, prompt_token_ids=ids[0])


def test_greedy_matches_hf_and_lengths_follow_max_tokens(tiny_chat_model_path, llm, tok):
    ids = tok(STORY).input_ids
    out = llm.generate(STORY, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    want = hf_greedy(tiny_chat_model_path, ids, 12)
    assert out.prompt == STORY and out.prompt_token_ids == ids and out.finished
    c = out.outputs[0]
    assert c.token_ids == want and c.text == tok.decode(want, skip_special_tokens=True)
    assert c.finish_reason == "length" and c.stop_reason is None and c.index == 0 and c.finished()
    # max_tokens beyond max_model_len: prompt + completion never exceed it (here: exactly it).
    for o in llm.generate(PROMPTS, SamplingParams(max_tokens=300, ignore_eos=True), use_tqdm=False):
        assert len(o.prompt_token_ids) + len(o.outputs[0].token_ids) == KW["max_model_len"]
        assert o.outputs[0].finish_reason == "length"


def test_request_output_fields(llm, tok):
    outs = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len({o.request_id for o in outs}) == 2 and all(isinstance(o.request_id, str) for o in outs)
    for o, p in zip(outs, PROMPTS):
        assert o.prompt == p and o.prompt_token_ids == tok(p).input_ids and o.finished
        assert o.prompt_logprobs is None and o.outputs[0].logprobs is None and o.outputs[0].cumulative_logprob is None
        assert o.num_cached_tokens is None or 0 <= o.num_cached_tokens <= len(o.prompt_token_ids)
        assert o.metrics is not None


# ---- stops (tests/samplers/test_stop_reason.py, tests/detokenizer/test_stop_strings.py) ------------

@pytest.fixture(scope="module")
def free_run(tiny_chat_model_path, llm, tok):
    """STORY's greedy continuation without stops, as HF computes it: (token ids, text)."""
    ids = hf_greedy(tiny_chat_model_path, tok(STORY).input_ids, 24)
    return ids, tok.decode(ids, skip_special_tokens=True)


def test_stop_token_ids_and_their_text(llm, tok, free_run):
    ids, _ = free_run
    pos = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])  # a first occurrence
    t = ids[pos]
    for keep, upto in ((False, pos), (True, pos + 1)):  # the stop token's text only when asked for
        c = _gen(llm, STORY, temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=[t],
                 include_stop_str_in_output=keep)
        assert c.token_ids == ids[:pos + 1] and (c.finish_reason, c.stop_reason) == ("stop", t)
        assert c.text == tok.decode(ids[:upto], skip_special_tokens=True)
    # Whichever listed id comes first in the output stops it, whatever the list order.
    later = next(x for x in ids[pos + 1:] if x not in ids[:pos + 1])
    for order in ([later, t], [t, later]):
        c = _gen(llm, STORY, temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=order)
        assert c.token_ids[-1] == t and c.stop_reason == t


def test_stop_strings_cut_the_text(llm, free_run):
    ids, text = free_run
    words = text.split()
    stop = next(w for w in words[3:] if text.index(w) > 0)
    start = text.index(stop)  # the first completion of the stop string is where it first occurs
    cut = _gen(llm, STORY, temperature=0.0, max_tokens=24, ignore_eos=True, stop=stop)
    kept = _gen(llm, STORY, temperature=0.0, max_tokens=24, ignore_eos=True, stop=stop,
                include_stop_str_in_output=True)
    assert (cut.finish_reason, cut.stop_reason, cut.text) == ("stop", stop, text[:start])
    assert (kept.stop_reason, kept.text) == (stop, text[:start + len(stop)])
    assert cut.token_ids == kept.token_ids == ids[:len(cut.token_ids)]
    # A stop string split across tokens ("partial token" in vLLM's tests): it ends where it completes.
    piece = text[start + 1:start + 3] if len(stop) >= 3 else None
    if piece and piece not in text[:start + 1]:
        part = _gen(llm, STORY, temperature=0.0, max_tokens=24, ignore_eos=True, stop=[piece, "\x00never"])
        assert (part.stop_reason, part.text) == (piece, text[:start + 1])


def test_stop_string_inside_a_stop_token(llm, tok, free_run):
    """vLLM checks stop strings in the text of a stop token only when that text is kept
    (include_stop_str_in_output): then the string wins and the text is cut after it."""
    ids, _ = free_run
    for pos in range(2, len(ids)):
        t, before = ids[pos], tok.decode(ids[:pos], skip_special_tokens=True)
        full = tok.decode(ids[:pos + 1], skip_special_tokens=True)
        piece = full[len(before):].strip()[:2]
        if t not in ids[:pos] and len(piece) == 2 and piece not in before and full.startswith(before):
            break
    else:
        pytest.fail("no token with fresh text in the greedy run")
    kept = _gen(llm, STORY, temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=[t], stop=[piece],
                include_stop_str_in_output=True)
    assert kept.token_ids == ids[:pos + 1]
    assert (kept.stop_reason, kept.text) == (piece, full[:full.index(piece) + 2])
    dropped = _gen(llm, STORY, temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=[t], stop=[piece])
    assert (dropped.stop_reason, dropped.text) == (t, before)


def test_eos_stop_reason_ignore_eos_and_min_tokens(llm, tok):
    eos = tok.eos_token_id
    other = 10
    # Only EOS allowed: it ends the completion at once; its stop_reason is None, its text empty.
    c = _gen(llm, STORY, allowed_token_ids=[eos], max_tokens=8)
    assert (c.token_ids, c.finish_reason, c.stop_reason, c.text) == ([eos], "stop", None, "")
    # min_tokens masks EOS for that many tokens (and stop ids), so the other allowed token comes.
    c = _gen(llm, STORY, allowed_token_ids=[eos, other], min_tokens=3, max_tokens=8, temperature=0.0,
             logit_bias={eos: 100.0})
    assert c.token_ids == [other] * 3 + [eos] and c.finish_reason == "stop"
    c = _gen(llm, STORY, allowed_token_ids=[other, 11], min_tokens=2, max_tokens=8, temperature=0.0,
             logit_bias={11: 100.0}, stop_token_ids=[11])
    assert c.token_ids == [other] * 2 + [11] and c.stop_reason == 11
    c = _gen(llm, STORY, allowed_token_ids=[eos, other], min_tokens=5, max_tokens=None, temperature=0.0,
             logit_bias={eos: 100.0})
    assert c.token_ids == [other] * 5 + [eos]
    # ignore_eos: exactly max_tokens tokens, EOS among them.
    c = _gen(llm, STORY, allowed_token_ids=[eos], max_tokens=7, ignore_eos=True)
    assert c.token_ids == [eos] * 7 and c.finish_reason == "length"


# ---- detokenize=False (tests/v1/sample/test_sampling_params_e2e.py, tests/detokenizer) --------------

def test_detokenize_false(llm):
    plain = _gen(llm, STORY, temperature=0.0, max_tokens=10)
    sp = SamplingParams(temperature=0.0, max_tokens=10, detokenize=False, logprobs=3, prompt_logprobs=3)
    out = llm.generate(STORY, sp, use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.text == "" and c.token_ids == plain.token_ids and plain.text != ""
    assert len(out.prompt_logprobs) > 1 and len(c.logprobs) == 10
    for position in out.prompt_logprobs[1:] + c.logprobs:
        assert 3 <= len(position) <= 4
        assert all(lp.decoded_token is None for lp in position.values())
    sp.detokenize = True  # changed after construction: the next request decodes again
    again = llm.generate(STORY, sp, use_tqdm=False)[0].outputs[0]
    assert again.text == plain.text and all(isinstance(lp.decoded_token, str) for lp in again.logprobs[0].values())


# ---- logprobs (tests/v1/sample/test_logprobs.py, tests/samplers/test_ranks.py) ------------------------

def _check_positions(dicts, tokens, k, rows, tok):
    """vLLM's logprob structure at each position, its values against HF's log_softmax rows."""
    for d, t, row in zip(dicts, tokens, rows):
        assert t in d and next(iter(d)) == t
        lo, hi = _hf_rank(row, t)
        assert lo <= d[t].rank <= hi
        assert len(d) == (k if d[t].rank <= k and k != 0 else k + 1)
        assert {lp.rank for tid, lp in d.items() if tid != t} | ({d[t].rank} if d[t].rank <= k else set()) \
            == set(range(1, k + 1))
        for tid, lp in d.items():
            assert lp.logprob == pytest.approx(row[tid].item(), abs=1e-4)
            assert lp.decoded_token == tok.decode([tid])


@pytest.mark.parametrize("temperature", [0.0, 2.0])
def test_logprobs_and_prompt_logprobs_match_hf(tiny_chat_model_path, llm, tok, temperature):
    k, pk, n_tok = 5, 3, 6
    out = llm.generate(STORY, SamplingParams(temperature=temperature, max_tokens=n_tok, logprobs=k, prompt_logprobs=pk,
                                             seed=1984, ignore_eos=True), use_tqdm=False)[0]
    c, ids = out.outputs[0], out.prompt_token_ids
    ref = hf_logits(tiny_chat_model_path, ids + c.token_ids).log_softmax(-1)
    assert len(c.logprobs) == n_tok
    _check_positions(c.logprobs, c.token_ids, k, ref[len(ids) - 1:-1], tok)
    if temperature == 0.0:
        assert all(d[t].rank == 1 for d, t in zip(c.logprobs, c.token_ids))
        assert c.token_ids == hf_greedy(tiny_chat_model_path, ids, n_tok)
    # cumulative_logprob: the sum of the sampled tokens' logprobs
    assert c.cumulative_logprob == pytest.approx(sum(d[t].logprob for d, t in zip(c.logprobs, c.token_ids)), abs=1e-5)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    _check_positions(out.prompt_logprobs[1:], ids[1:], pk, ref[:len(ids) - 1], tok)


def test_zero_none_and_whole_vocabulary_logprobs(tiny_chat_model_path, llm):
    zero = llm.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=4, logprobs=0, prompt_logprobs=0),
                        use_tqdm=False)
    for o in zero:
        c = o.outputs[0]
        assert len(c.logprobs) == len(c.token_ids) and all(len(d) == 1 for d in c.logprobs)
        assert c.cumulative_logprob is not None and len(o.prompt_logprobs) == len(o.prompt_token_ids)
    with open(os.path.join(tiny_chat_model_path, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    assert llm.llm_engine.get_model_config().get_vocab_size() == vocab
    whole = llm.generate(PROMPTS[0], SamplingParams(max_tokens=2, logprobs=-1, prompt_logprobs=-1), use_tqdm=False)[0]
    for d in whole.outputs[0].logprobs + whole.prompt_logprobs[1:]:
        assert len(d) == vocab and sorted(lp.rank for lp in d.values()) == list(range(1, vocab + 1))
        assert sum(torch.tensor([lp.logprob for lp in d.values()]).exp()).item() == pytest.approx(1.0, abs=1e-3)


def test_max_logprobs_limits_requests(tiny_chat_model_path):
    small = LLM(tiny_chat_model_path, max_logprobs=1, num_kv_blocks=32, max_model_len=64, max_num_seqs=4)
    ok = small.generate("Hello world", SamplingParams(logprobs=1, max_tokens=2), use_tqdm=False)[0].outputs[0]
    assert all(len(d) in (1, 2) for d in ok.logprobs)
    for kw in (dict(logprobs=2), dict(prompt_logprobs=2), dict(logprobs=-1)):
        with pytest.raises(ValueError, match="logprobs"):
            small.generate("Hello world", SamplingParams(max_tokens=2, **kw), use_tqdm=False)
    _assert_serves(small)


# ---- seeds, n > 1, penalties (tests/samplers/test_seeded_generate.py, test_sampling_params_e2e.py) -----

def test_seeded_generation_is_reproducible(llm):
    base = SamplingParams(temperature=2.0, top_p=0.8, top_k=12, n=3, presence_penalty=1, max_tokens=8,
                          ignore_eos=True)
    seeded = copy.deepcopy(base)
    seeded.seed = 100  # set after construction, as vLLM's test does
    other = copy.deepcopy(base)
    other.seed = 200
    runs = [llm.generate(PROMPTS[:2], sp, use_tqdm=False) for sp in (base, seeded, other, base, seeded, other)]
    tokens = [[[c.token_ids for c in o.outputs] for o in run] for run in runs]
    assert tokens[1] == tokens[4] and tokens[2] == tokens[5]
    for a in range(4):  # no two unseeded or differently seeded runs agree
        for b in range(a + 1, 4):
            assert tokens[a] != tokens[b]
    for o in runs[1]:
        assert [c.index for c in o.outputs] == [0, 1, 2] and all(len(c.token_ids) == 8 for c in o.outputs)
        assert len({tuple(c.token_ids) for c in o.outputs}) == 3  # the n samples differ
    same = [_gen(llm, STORY, seed=42).text for _ in range(2)]
    assert same[0] == same[1] != _gen(llm, STORY, seed=43).text


def test_penalties_and_filters_run(llm):
    sp = SamplingParams(temperature=1.2, presence_penalty=1.2, frequency_penalty=1.2, repetition_penalty=1.2,
                        min_p=0.5, top_p=0.5, top_k=3, max_tokens=9, ignore_eos=True, seed=7)
    out = llm.generate(STORY, sp, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 9 and out.finish_reason == "length"
    # top_k=1 is greedy whatever the temperature
    assert _gen(llm, STORY, top_k=1, max_tokens=6, ignore_eos=True, seed=3).token_ids == \
        _gen(llm, STORY, temperature=0.0, max_tokens=6, ignore_eos=True).token_ids
    only = _gen(llm, STORY, allowed_token_ids=[10], max_tokens=5)
    assert only.token_ids == [10] * 5


def test_raw_logits_mode_reports_the_models_logits(tiny_chat_model_path):
    """vLLM's logprobs_mode="raw_logits": each position's values are the model's logits before
    any processing (HF's), ranked by them; the sampled token is among them."""
    llm = LLM(tiny_chat_model_path, logprobs_mode="raw_logits", **KW)
    assert llm.llm_engine.get_model_config().logprobs_mode == "raw_logits"
    out = llm.generate(STORY, SamplingParams(temperature=0.8, max_tokens=4, logprobs=2, seed=3, ignore_eos=True,
                                             repetition_penalty=1.3), use_tqdm=False)[0]
    c, ids = out.outputs[0], out.prompt_token_ids
    ref = hf_logits(tiny_chat_model_path, ids + c.token_ids)[len(ids) - 1:-1]
    for step, (d, t) in enumerate(zip(c.logprobs, c.token_ids)):
        assert t in d
        for token, lp in d.items():
            assert lp.logprob == pytest.approx(ref[step, token].item(), abs=1e-4)
            assert lp.rank == 1 + int((ref[step] > ref[step, token]).sum())


def test_empty_multi_modal_keys_are_ignored(llm):
    """verl passes TokensPrompt(prompt_token_ids=ids, multi_modal_data={}) for text-only models:
    the empty keys change nothing; non-empty multi-modal data is refused by name."""
    sp = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    plain = llm.generate([TokensPrompt(prompt_token_ids=[5, 6, 7])], sp, use_tqdm=False)[0]
    extras = llm.generate([{"prompt_token_ids": [5, 6, 7], "multi_modal_data": {}, "mm_processor_kwargs": None}],
                          sp, use_tqdm=False)[0]
    assert extras.outputs[0].token_ids == plain.outputs[0].token_ids
    with pytest.raises(ValueError, match="multi-modal"):
        llm.generate([{"prompt_token_ids": [5, 6, 7], "multi_modal_data": {"image": [1]}}], sp, use_tqdm=False)
    _assert_serves(llm)
