"""Text on both sides of the engine, with vLLM's rules: bad words turned into token ids, and a
completion's text (stop strings, stop tokens and EOS left out unless asked for)."""
from __future__ import annotations

from typing import Callable

from atom.engine.detokenizer import sequence_text
from atom.engine.sequence import Sequence
from atom.sampling_params import SamplingParams


def bad_words_token_ids(tokenizer, bad_words: list[str], vocab_size: int) -> list[list[int]]:
    """Each bad word as token ids, as vLLM tokenizes them: the word without leading spaces, then
    with one leading space when that gives a different first token and as many tokens (a word
    is banned both at the start of a text and after a space)."""
    out: list[list[int]] = []
    for word in bad_words:
        plain: list[int] | None = None
        for prefix in ("", " "):
            ids = list(tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False))
            if not ids:
                if not prefix:
                    raise ValueError(f"SamplingParams.bad_words: {word!r} tokenizes to no tokens")
                continue
            if not prefix:
                plain = ids
                out.append(ids)
            elif ids[0] != plain[0] and len(ids) == len(plain):
                out.append(ids)
    bad = sorted({t for ids in out for t in ids if not 0 <= t < vocab_size})
    if bad:
        raise ValueError(f"SamplingParams.bad_words: token ids {bad} are outside the model's vocabulary "
                         f"[0, {vocab_size})")
    return out


def completion_text(detokenize: Callable[[list[int], SamplingParams], str], seq: Sequence, done: bool) -> str:
    """The text of a completion, as vLLM reports it: cut where a stop string begins (or after it
    with include_stop_str_in_output); without the text of the EOS or stop token that ended it
    unless include_stop_str_in_output; empty with detokenize=False.

    While it is running, the text is the sequence's incremental text (O(new tokens) per call:
    atom/engine/detokenizer.py) without characters still pending (a UTF-8 character whose last
    byte has not come) and without the last len(longest stop) - 1 characters (they may begin a
    stop string), so streamed text never has to be taken back. A finished completion's text is
    one decode of all its tokens."""
    p = seq.params
    if not p.detokenize:
        return ""
    hold = max((len(s) for s in p.stop), default=1) - 1
    if not done:
        live = sequence_text(seq)
        live.update(detokenize, seq.token_ids, seq.num_prompt_tokens, len(seq.token_ids), p)
        text = live.text
        if hold and not p.include_stop_str_in_output:
            return text[: max(len(text) - hold, 0)]
        return text
    ids = seq.output_token_ids
    stopped_by_token = seq.finish_reason == "stop" and not isinstance(seq.stop_reason, str)
    if stopped_by_token and not p.include_stop_str_in_output and ids:
        ids = ids[:-1]
    text = detokenize(ids, p)
    if seq.stop_text_len is not None:
        return text[: seq.stop_text_len]
    return text
