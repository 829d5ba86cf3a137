"""When a sequence stops: EOS, stop token ids, stop strings, max_tokens and max_model_len."""
from __future__ import annotations

from typing import Callable

from atom.engine.sequence import Sequence

Detokenize = Callable[[list[int]], str]


class StopChecker:
    """Decides, after each appended token, whether a sequence is done (and records why)."""

    def __init__(self, eos_token_ids: list[int], max_model_len: int, detokenize: Detokenize | None) -> None:
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len
        self.detokenize = detokenize

    def __call__(self, seq: Sequence, token: int) -> bool:
        p = seq.params
        # Stops count only once min_tokens tokens came before this one (the sampler masked them until then).
        if seq.num_output_tokens > p.min_tokens:
            if token in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
                return True
            if not p.ignore_eos and token in self.eos_token_ids:
                seq.finish_reason = "stop"
                return True
            if p.stop and self.detokenize is not None and self._stop_string_in_tail(seq):
                text = self.detokenize(seq.output_token_ids)
                at, s = min((text.find(s), s) for s in p.stop if s in text)
                seq.finish_reason, seq.stop_reason, seq.stop_text_len = "stop", s, at
                return True
        if seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            seq.finish_reason = "length"
            return True
        return False

    def _stop_string_in_tail(self, seq: Sequence) -> bool:
        """A new stop string must end in the newest token, so decoding a short tail finds it
        (every token but special ones adds at least a character): O(1) per step, not O(length)."""
        window = max(len(s) for s in seq.params.stop) + 8
        tail = self.detokenize(seq.output_token_ids[-window:])
        return any(s in tail for s in seq.params.stop)
