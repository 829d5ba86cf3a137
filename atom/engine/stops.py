"""When a sequence stops: EOS, stop token ids, stop strings, max_tokens and max_model_len, with
vLLM's rules (its scheduler's check_stop and its detokenizer's stop-string check)."""
from __future__ import annotations

from typing import Callable

from atom.engine.detokenizer import sequence_text
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
                if not self._stop_string_in_stop_token(seq, n):
                    seq.finish_reason = "stop"
                return True
            if token in p.stop_token_ids:
                if not self._stop_string_in_stop_token(seq, n):
                    seq.finish_reason, seq.stop_reason = "stop", token
                return True
        # A stop string must complete in this token, after the first min_tokens tokens (the text
        # is kept up to date on every token, so that "this token" is exactly its characters).
        if p.stop and self.detokenize is not None and self._stop_string(seq, check=n > p.min_tokens):
            return True
        if (p.max_tokens is not None and n >= p.max_tokens) or len(seq) >= self.max_model_len:
            seq.finish_reason = "length"
            return True
        return False

    def _stop_string_in_stop_token(self, seq: Sequence, n: int) -> bool:
        """A stop token (or EOS) that ends the sequence: with include_stop_str_in_output its text
        is part of the output, so a stop string completing in it wins (stop_reason is the string,
        the text is cut after it), as vLLM's detokenizer decides; without, its text is left out
        and never matched."""
        p = seq.params
        return (p.include_stop_str_in_output and bool(p.stop) and self.detokenize is not None
                and self._stop_string(seq, check=n > p.min_tokens))

    def _stop_string(self, seq: Sequence, check: bool) -> bool:
        """Extend the sequence's incremental text by its newest token (O(1) per step) and look for
        a stop string that completes in the characters that token added."""
        p = seq.params
        text = sequence_text(seq)
        changed = text.update(self.detokenize, seq.token_ids, seq.num_prompt_tokens, len(seq.token_ids), p)
        if not check or not changed:
            return False
        # Only the tail can hold a match that ends in the new characters.
        base, tail = text.tail(changed + max(len(s) for s in p.stop))
        hit = find_stop(tail, changed, p.stop)
        if hit is None:
            return False
        s, start, end = hit
        seq.finish_reason, seq.stop_reason = "stop", s
        seq.stop_text_len = base + (end if p.include_stop_str_in_output else start)
        return True
