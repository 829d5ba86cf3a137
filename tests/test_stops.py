"""Issue 2, test 7: stop strings, stop token ids, EOS, ignore_eos, max_tokens and min_tokens."""
from __future__ import annotations

from atom import RolloutEngine, SamplingParams
from conftest import TINY_VOCAB
from helpers import random_prompts

GREEDY = dict(temperature=0, max_tokens=20)


def first_new_token(tokens: list[int], start: int) -> tuple[int, int]:
    """(position, token) of the first token at or after start that did not occur before it."""
    for i in range(start, len(tokens)):
        if tokens[i] not in tokens[:i]:
            return i, tokens[i]
    raise AssertionError("no fresh token in the greedy output; pick another prompt")


def test_stop_token_ids_max_tokens_and_eos(make_tiny_model):
    path = make_tiny_model("qwen3")
    prompt = random_prompts([11], TINY_VOCAB, seed=30)[0]
    free = RolloutEngine(path).generate([prompt], SamplingParams(**GREEDY, ignore_eos=True))[0].outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 20 and free.stop_reason is None

    pos, tok = first_new_token(free.token_ids, 4)
    engine = RolloutEngine(path)
    stopped = engine.generate([prompt], SamplingParams(**GREEDY, ignore_eos=True, stop_token_ids=[tok]))[0].outputs[0]
    assert stopped.token_ids == free.token_ids[:pos + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", tok)

    short = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].outputs[0]
    assert short.token_ids == free.token_ids[:3] and short.finish_reason == "length"

    # The same weights with that token as EOS: generation ends there, unless ignore_eos.
    eos_path = make_tiny_model("qwen3", eos_token_id=tok)
    eos_engine = RolloutEngine(eos_path)
    at_eos = eos_engine.generate([prompt], SamplingParams(**GREEDY))[0].outputs[0]
    assert at_eos.token_ids == free.token_ids[:pos + 1]
    assert (at_eos.finish_reason, at_eos.stop_reason) == ("stop", None)
    past = eos_engine.generate([prompt], SamplingParams(**GREEDY, ignore_eos=True))[0].outputs[0]
    assert past.token_ids == free.token_ids

    # min_tokens masks EOS and stop ids until that many tokens exist.
    held = eos_engine.generate([prompt], SamplingParams(temperature=0, max_tokens=20, min_tokens=pos + 3,
                                                        stop_token_ids=[tok]))[0].outputs[0]
    assert len(held.token_ids) >= pos + 3
    assert tok not in held.token_ids[:pos + 2]
    assert held.token_ids[:pos] == free.token_ids[:pos]


def test_stop_strings_cut_text(smollm2_path):
    engine = RolloutEngine(smollm2_path, max_model_len=256)
    chat = [{"role": "user", "content": "Count from one to ten in words, separated by commas."}]
    free = engine.generate([chat], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    text = free.text
    # Pick a stop string from the middle of the free-running text.
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), text
    cut = engine.generate([chat], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                 stop=["@@never@@", stop]))[0].outputs[0]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop)
    assert cut.text == text[:text.find(stop)]
    assert cut.token_ids == free.token_ids[:len(cut.token_ids)] and len(cut.token_ids) < len(free.token_ids)
    # The stop string appears in the decoded tokens for the first time at the last token.
    assert stop in engine.tokenizer.decode(cut.token_ids, skip_special_tokens=True)
    assert stop not in engine.tokenizer.decode(cut.token_ids[:-1], skip_special_tokens=True)
