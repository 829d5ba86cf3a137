"""A Sequence is one completion being generated: prompt + output tokens, its KV blocks, its state."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from atom.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One prompt of a generate call; its n completions are Sequences forked after prefill."""

    index: int
    prompt: object
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    sequences: list["Sequence"] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def finished(self) -> bool:
        return len(self.sequences) == self.params.n and all(s.is_finished for s in self.sequences)


class Sequence:
    """Token state of one completion. `num_computed` tokens have KV in `block_table`."""

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
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.stop_text_len: int | None = None  # text cut where a stop string begins
        # Number of tokens this sequence may share with its siblings before forking: the first
        # sequence of a request with n > 1 samples all n first tokens from one prefill.
        self.fork_pending = request.params.n > 1 and sample_index == 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def random_stream(self) -> tuple[int, int]:
        """(seed, counter) for the next sampled token: a pure function of request seed, sample and position."""
        return self.request.seed, (self.sample_index << 20) + self.num_output_tokens

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = SeqStatus.FINISHED
        self.finish_reason, self.stop_reason = reason, stop_reason
