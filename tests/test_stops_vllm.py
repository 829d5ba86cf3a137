"""Issue 15: stops exactly as vLLM (its scheduler's check_stop and its detokenizer's stop-string
check): stop strings with min_tokens, several stop strings completing in one token, the text of
stop tokens and EOS, include_stop_str_in_output, streamed text holding back a possible stop.

The StopChecker tests use a table tokenizer (each id is a fixed piece of text), so every expected
text below is worked out by hand; the engine tests use SmolLM2's real tokenizer."""
from __future__ import annotations

import pytest

from atom import RolloutEngine, SamplingParams
from atom.engine.sequence import Request, Sequence
from atom.engine.stops import StopChecker
from atom.rollout.text import completion_text

EOS = 2
PIECES = {2: "<eos>", 10: "a", 11: "b", 12: "c", 13: "x", 14: "abcd", 15: "d", 16: "y"}
SPECIAL = {EOS}


def detok(ids: list[int], params: SamplingParams) -> str:
    return "".join(PIECES[i] for i in ids if not (params.skip_special_tokens and i in SPECIAL))


def generate(tokens: list[int], **kw) -> tuple[Sequence, str]:
    """Feed `tokens` one at a time as the scheduler does; returns the sequence and its final text."""
    params = SamplingParams(**{"max_tokens": 20, **kw})
    seq = Sequence(Request(0, None, [5, 6], params, seed=0), 0, [5, 6])
    checker = StopChecker([EOS], max_model_len=100, detokenize=detok)
    for tok in tokens:
        seq.token_ids.append(tok)
        if checker(seq, tok):
            break
    done = seq.finish_reason is not None
    return seq, completion_text(detok, seq, done)


def test_stop_string_inside_min_tokens_neither_cuts_nor_stops():
    # "ab" completes at token 2, inside min_tokens=3: it does not count, not even one token later.
    seq, text = generate([10, 11, 12, 13, 16], min_tokens=3, stop=["ab"], max_tokens=5)
    assert (seq.finish_reason, seq.stop_reason, seq.num_output_tokens, text) == ("length", None, 5, "abcxy")
    # Completing again after min_tokens, it stops there and cuts where it begins.
    seq, text = generate([10, 11, 12, 10, 11, 13], min_tokens=3, stop=["ab"])
    assert (seq.finish_reason, seq.stop_reason, seq.num_output_tokens, text) == ("stop", "ab", 5, "abc")


def test_stop_string_may_begin_inside_min_tokens():
    seq, text = generate([10, 11, 12, 13], min_tokens=2, stop=["bc"])
    assert (seq.stop_reason, seq.num_output_tokens, text) == ("bc", 3, "a")


def test_several_stops_in_one_token_earliest_completion_wins_then_list_order():
    # "x" + "abcd": "bc" completes at 4, "abcd" at 5 (though it begins first).
    seq, text = generate([13, 14], stop=["abcd", "bc"])
    assert (seq.stop_reason, text) == ("bc", "xa")
    # "bcd" and "abcd" both complete at 5: list order decides.
    assert generate([13, 14], stop=["bcd", "abcd"])[0].stop_reason == "bcd"
    assert generate([13, 14], stop=["abcd", "bcd"])[0].stop_reason == "abcd"


def test_include_stop_str_in_output_keeps_it_and_drops_what_follows():
    seq, text = generate([13, 14, 10], stop=["bc"], include_stop_str_in_output=True)
    assert (seq.num_output_tokens, text) == (2, "xabc")


def test_stop_token_and_eos_text_left_out_unless_asked():
    seq, text = generate([10, 13, 11], stop_token_ids=[13])
    assert (seq.finish_reason, seq.stop_reason, seq.output_token_ids, text) == ("stop", 13, [10, 13], "a")
    assert generate([10, 13, 11], stop_token_ids=[13], include_stop_str_in_output=True)[1] == "ax"
    assert generate([10, EOS], skip_special_tokens=False)[1] == "a"
    assert generate([10, EOS], skip_special_tokens=False, include_stop_str_in_output=True)[1] == "a<eos>"
    # EOS is checked first (vLLM): a token that is both ends with stop_reason None.
    assert generate([10, EOS], stop_token_ids=[EOS])[0].stop_reason is None
    assert generate([10, EOS, 11], ignore_eos=True, max_tokens=3)[0].finish_reason == "length"


def test_a_stop_on_the_last_allowed_token_is_a_stop():
    seq, _ = generate([10, 11], stop=["ab"], max_tokens=2)
    assert (seq.finish_reason, seq.stop_reason) == ("stop", "ab")


def test_running_text_holds_back_a_possible_stop_string_start():
    params = SamplingParams(stop=["abc", "d"])
    seq = Sequence(Request(0, None, [5], params, seed=0), 0, [5, 13, 10, 11])
    assert completion_text(detok, seq, done=False) == "x"   # "ab" may begin "abc"
    assert completion_text(detok, seq, done=True) == "xab"
    seq.params = SamplingParams(stop=["abc"], include_stop_str_in_output=True)
    assert completion_text(detok, seq, done=False) == "xab"
    seq.params = SamplingParams(detokenize=False)
    assert completion_text(detok, seq, done=True) == ""


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return RolloutEngine(smollm2_path, max_model_len=128)


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_real_tokenizer_stop_token_eos_and_bad_words(smollm2):
    tok = smollm2.tokenizer
    free = smollm2.generate([CHAT], SamplingParams(temperature=0, max_tokens=30))[0].outputs[0]
    assert free.finish_reason == "stop" and free.token_ids[-1] == tok.eos_token_id
    # EOS text: left out, also when special tokens are kept, unless asked for.
    keep = dict(temperature=0, max_tokens=30, skip_special_tokens=False)
    assert smollm2.generate([CHAT], SamplingParams(**keep))[0].outputs[0].text == \
        tok.decode(free.token_ids[:-1], skip_special_tokens=False)
    assert smollm2.generate([CHAT], SamplingParams(**keep, include_stop_str_in_output=True))[0].outputs[0].text == \
        tok.decode(free.token_ids, skip_special_tokens=False)
    # A plain (non-special) stop token: its text is left out of `text`.
    stop_id = free.token_ids[3]
    cut = smollm2.generate([CHAT], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id]))[0].outputs[0]
    assert cut.token_ids == free.token_ids[:4] and cut.stop_reason == stop_id
    assert cut.text == tok.decode(free.token_ids[:3], skip_special_tokens=True)
    # bad_words: neither "Paris" nor " Paris" is generated (HF's tokenization of both, by hand).
    word = "Paris"
    banned = [tok.encode(word, add_special_tokens=False), tok.encode(" " + word, add_special_tokens=False)]
    assert " Paris" in free.text

    def contains(ids, sub):
        return any(ids[i:i + len(sub)] == sub for i in range(len(ids) - len(sub) + 1))
    assert any(contains(free.token_ids, b) for b in banned)
    out = smollm2.generate([CHAT], SamplingParams(temperature=0, max_tokens=30, bad_words=[word]))[0].outputs[0]
    assert not any(contains(out.token_ids, b) for b in banned)
    assert out.token_ids[:5] == free.token_ids[:5]  # the same until the banned word


def test_real_tokenizer_stop_string_with_min_tokens(smollm2):
    free = smollm2.generate([CHAT], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    text = smollm2.tokenizer.decode(free.token_ids, skip_special_tokens=True)
    assert text.startswith("The capital")
    # " capital" is generated by token 2: with min_tokens=3 it never counts, and generation runs on.
    late = smollm2.generate([CHAT], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[" capital"],
                                                   min_tokens=3))[0].outputs[0]
    assert late.token_ids == free.token_ids and late.finish_reason == "length"
    early = smollm2.generate([CHAT], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                    stop=[" capital"]))[0].outputs[0]
    assert (early.token_ids, early.text, early.stop_reason) == (free.token_ids[:2], "The", " capital")
