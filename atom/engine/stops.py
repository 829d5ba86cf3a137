"""When a sequence stops: EOS, stop token ids, stop strings, max_tokens and max_model_len, with
vLLM's rules (its scheduler's check_stop and its detokenizer's stop-string check)."""
from __future__ import annotations

from typing import Callable

from atom.engine.sequence import Sequence
from atom.sampling_params import SamplingParams

# Decodes output token ids to text with a request's decoding options (skip_special_tokens, ...).
Detokenize = Callable[[list[int], SamplingParams], str]


def find_stop(text: str, new_chars: int, stops: list[str]) -> tuple[str, int, int] | None:
    """The stop string that completes inside the last `new_chars` characters of `text`:
    (stop, start, end) of the one that completes first, list order breaking ties; None if none.
    A match may begin before those characters (it spans tokens)."""
    if new_chars <= 0:
        return None
    best = None
    for s in stops:
        # The earliest start whose match ends inside the new characters.
        at = text.find(s, max(len(text) + 1 - new_chars - len(s), 0))
        if at >= 0 and (best is None or at + len(s) < best[2]):
            best = (s, at, at + len(s))
    return best


def new_text(detokenize: Detokenize, ids: list[int], params: SamplingParams) -> tuple[str, int]:
    """(text of ids, how many of its trailing characters the last id added). Decoding is not
    always prefix-stable (an incomplete UTF-8 sequence decodes to U+FFFD until its last byte
    comes), so the new characters start where the two decodings first differ."""
    text, before = detokenize(ids, params), detokenize(ids[:-1], params)
    common = 0
    for a, b in zip(text, before):
        if a != b:
            break
        common += 1
    return text, len(text) - common


class StopChecker:
    """Decides, after each appended token, whether a sequence is done (and records why)."""

    def __init__(self, eos_token_ids: list[int], max_model_len: int, detokenize: Detokenize | None) -> None:
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len
        self.detokenize = detokenize

    def __call__(self, seq: Sequence, token: int) -> bool:
        p = seq.params
        n = seq.num_output_tokens
        # No stop counts for the first min_tokens tokens (the sampler also masks EOS and stop ids there).
        if n >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                seq.finish_reason = "stop"
                return True
            if token in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
                return True
        # A stop string must complete in this token, after the first min_tokens tokens.
        if p.stop and self.detokenize is not None and n > p.min_tokens and self._stop_string(seq):
            return True
        if (p.max_tokens is not None and n >= p.max_tokens) or len(seq) >= self.max_model_len:
            seq.finish_reason = "length"
            return True
        return False

    def _stop_string(self, seq: Sequence) -> bool:
        """Decode a short tail first (every token but special ones adds at least a character, so a
        window of the longest stop's length + 8 tokens holds any match ending in the newest one):
        O(1) per step. Only on a hit is the whole output decoded, once, to place the cut."""
        p = seq.params
        out = seq.output_token_ids
        window = max(len(s) for s in p.stop) + 8
        tail = self.detokenize(out[-window:], p)
        if not any(s in tail for s in p.stop):  # the common case: one decode per step
            return False
        if find_stop(*new_text(self.detokenize, out[-window:], p), p.stop) is None:
            return False
        hit = find_stop(*new_text(self.detokenize, out, p), p.stop)
        if hit is None:  # the tail decoded differently from the whole (a tokenizer's context)
            return False
        s, start, end = hit
        seq.finish_reason, seq.stop_reason = "stop", s
        seq.stop_text_len = end if p.include_stop_str_in_output else start
        return True
