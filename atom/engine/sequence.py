"""A Sequence is one completion being generated: prompt + output tokens, its KV blocks, its state."""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field

from atom.outputs import RequestMetrics
from atom.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One prompt submitted to the engine; its n completions are Sequences forked after prefill.

    index: position in a batch generate call (output order); request_id: the caller's key (unique
    among live requests). The engine core owns the request from add_request until it finishes.
    """

    index: int
    prompt: object
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    sequences: list["Sequence"] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_logprob_ranks: list[int | None] | None = None  # rank of each prompt token (None for the first)
    request_id: str = ""
    num_finished: int = 0  # sequences finished (n when the request is done)
    metrics: RequestMetrics | None = None  # set when the engine core takes it

    @property
    def finished(self) -> bool:
        return self.num_finished >= self.params.n

    @functools.cached_property
    def prompt_key(self) -> int:
        """A hash of the prompt's token ids (prompt twins are found by it, then compared)."""
        return hash(tuple(self.prompt_token_ids))


class Sequence:
    """Token state of one completion. The KV of the first `num_computed` tokens is in `block_table`
    (or queued to be: an overlapped decode step counts its input token, which may still be in
    flight and not yet in `token_ids`)."""

    def __init__(self, request: Request, sample_index: int, token_ids: list[int]) -> None:
        self.request = request
        self.sample_index = sample_index
        self.params = request.params
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_computed = 0
        self.block_table: list[int] = []
        self.status = SeqStatus.WAITING
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []
        self.logprob_ranks: list[int] = []  # rank of each sampled token (with logprobs)
        self.penalty_slot: int | None = None  # its row in the runner's PenaltyState (penalties only)
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.stop_text_len: int | None = None  # text cut where a stop string begins
        self.detok = None  # the output's incremental text (atom/engine/detokenizer.py), made on first use
        # Which weight version produced which output tokens: [version, first, end) spans.
        self.weight_spans: list[list] = []
        # Routed experts (return_routed_experts): a RoutedRows, its rows in the engine's store (routing.py).
        self.routed = None
        # The first sequence of a request with n > 1 samples all n first tokens from its one
        # prefill, then forks the others off its KV blocks.
        self.fork_pending = request.params.n > 1 and sample_index == 0
        # Prompt twins: other requests' fresh sequences with the same prompt that sample their
        # first tokens from this one's prefill and then fork its KV (scheduler._follow).
        self.followers: list[Sequence] = []
        self.leader: Sequence | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    def sample_rows(self) -> list[tuple["Sequence", int]]:
        """(sequence, sample index) of each token drawn from this sequence's next logits: its
        own, or its n samples' when its prefill forks, and its prompt twins' (with their forks)."""
        rows = [(self, j) for j in range(self.params.n)] if self.fork_pending else [(self, self.sample_index)]
        for twin in self.followers:
            rows += twin.sample_rows()
        return rows

    def record_version(self, version) -> None:
        """The newest output token came from weights `version`: extend or open a span."""
        n = self.num_output_tokens
        if self.weight_spans and self.weight_spans[-1][0] == version:
            self.weight_spans[-1][2] = n
        else:
            self.weight_spans.append([version, n - 1, n])


def stream_counter(sample_index: int, num_output_tokens: int) -> int:
    """Position in a request's random stream of the next token of one sample (see torch_ops.row_keys)."""
    return (sample_index << 20) + num_output_tokens
