"""A sequence's output text kept up to date a few tokens at a time (vLLM's incremental
detokenizer): O(new tokens) per update instead of decoding the whole output again.

The text of tokens [0, read_offset) is final. New tokens are decoded in a window that starts a
little before them, at prefix_offset (the previous read_offset), so that a tokenizer's rules for
the start of a text (SentencePiece drops the first token's leading space) apply to the window's
own start and cancel out: the new text is decode(window) minus decode(ids[prefix_offset:
read_offset]). While the window's text ends in U+FFFD (a UTF-8 character whose bytes are split
across tokens, byte-fallback tokens among them) it stays pending: the characters are final only
once their last byte has come. `full` is always the whole output's text, pending part included,
as a decode of every token at once would give it.
"""
from __future__ import annotations

from typing import Callable

# Decodes token ids to text with a request's decoding options (skip_special_tokens, ...).
Decode = Callable[[list[int], object], str]

_REPLACEMENT = "\ufffd"
# A UTF-8 character has at most 4 bytes, so at most 4 tokens. A window pending longer than this
# (a run of bytes that never form a character) is cut into final text up to its last 4 tokens.
_MAX_PENDING_TOKENS = 16
_UTF8_MAX_TOKENS = 4


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class IncrementalText:
    """The output text of one sequence, extended as its tokens come (see the module docstring)."""

    __slots__ = ("text", "pending", "prefix_offset", "read_offset", "prefix_text", "num_tokens")

    def __init__(self) -> None:
        self.text = ""           # final text of output tokens [0, read_offset)
        self.pending = ""        # text of [read_offset, num_tokens) as decoded so far (may end in U+FFFD)
        self.prefix_offset = 0
        self.read_offset = 0
        self.prefix_text = ""    # decode(ids[prefix_offset:read_offset])
        self.num_tokens = 0      # output tokens seen

    @property
    def full(self) -> str:
        return self.text + self.pending

    def tail(self, n: int) -> tuple[int, str]:
        """(offset, the last n characters of `full`), without building the whole string."""
        length = len(self.text) + len(self.pending)
        base = max(0, length - n)
        if base >= len(self.text):
            return base, self.pending[base - len(self.text):]
        return base, self.text[base:] + self.pending

    def update(self, decode: Decode, token_ids: list[int], first: int, end: int, params) -> int:
        """Bring the text up to output tokens token_ids[first:end] (first: where the output
        starts); returns how many trailing characters of `full` changed or were added (the
        characters the new tokens brought, as comparing two whole decodes would find)."""
        count = end - first
        if count < self.num_tokens:  # fewer tokens than seen (never in the engine): start over
            self.__init__()
        if count == self.num_tokens:
            return 0
        region = self._window(decode, token_ids, first, end, params)
        changed = len(region) - _common_prefix(self.pending, region)
        self.num_tokens = count
        if region and not region.endswith(_REPLACEMENT):
            self._confirm(decode, token_ids, first, count, region, params)
        elif count - self.read_offset > _MAX_PENDING_TOKENS:
            self._confirm_stable_part(decode, token_ids, first, count, region, params)
        else:
            self.pending = region
        return changed

    def _window(self, decode: Decode, token_ids: list[int], first: int, end: int, params) -> str:
        """Text of output tokens [read_offset, end), decoded with [prefix_offset, read_offset) before them."""
        return decode(token_ids[first + self.prefix_offset: end], params)[len(self.prefix_text):]

    def _confirm(self, decode: Decode, token_ids: list[int], first: int, upto: int, region: str, params) -> None:
        """Tokens [read_offset, upto) decode to `region`, which is final."""
        self.text += region
        self.prefix_offset, self.read_offset = self.read_offset, upto
        self.prefix_text = decode(token_ids[first + self.prefix_offset: first + upto], params)
        self.pending = ""

    def _confirm_stable_part(self, decode: Decode, token_ids: list[int], first: int, count: int, region: str,
                             params) -> None:
        """A long pending window: its text up to the last few tokens is final when it is a prefix of
        the whole window's text (no later byte can complete a character that begins that early)."""
        cut = count - _UTF8_MAX_TOKENS
        head = self._window(decode, token_ids, first, first + cut, params)
        if head and region.startswith(head):
            self._confirm(decode, token_ids, first, cut, head, params)
            self.pending = self._window(decode, token_ids, first, first + count, params)
        else:
            self.pending = region


def sequence_text(seq) -> IncrementalText:
    """A sequence's incremental output text (atom.engine.sequence.Sequence.detok), made on first use."""
    if seq.detok is None:
        seq.detok = IncrementalText()
    return seq.detok
