"""Requests that enter an engine group (TP / EP ranks of one engine) on rank 0 alone.

Rank 0, the leader, takes add_request / abort / pause / resume as a single engine does and logs
them; before every step it hands the log to the other ranks in one collective, so that every
rank schedules the same batch (ep_mode="allreduce": every rank runs every request) or its own
share of it (ep_mode="alltoall": the leader assigns each request to a data-parallel rank, and the
ranks report their requests' progress back in the same collective). The other ranks run
`LLMEngine.follow()` until the leader stops them.

Remote requests (alltoall) are mirrored on the leader: their tokens arrive one step late, so an
abort returns what the leader has heard of so far.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from atom.engine.sequence import Request, Sequence, SeqStatus

_SEQ_FIELDS = ("token_ids", "logprobs", "top_logprobs", "finish_reason", "stop_reason", "stop_text_len",
               "weight_spans", "routed")


@dataclass
class GroupPlan:
    """The leader's word before a step: the calls since the last one, and whether to step."""

    commands: list[tuple] = field(default_factory=list)
    step: bool = False
    stop: bool = False


def new_request_copy(req: Request) -> Request:
    """What travels to the other ranks: the request as submitted, no engine state."""
    return Request(req.index, req.prompt, list(req.prompt_token_ids), req.params, req.seed,
                   request_id=req.request_id)


def report(requests: list[Request]) -> list[tuple]:
    """A follower's news of its own requests for the leader (alltoall)."""
    return [(r.request_id, r.prompt_logprobs, r.num_finished,
             [(s.sample_index, s.status.value, *(getattr(s, f) for f in _SEQ_FIELDS)) for s in r.sequences])
            for r in requests]


def apply_report(mirrors: dict[str, Request], news: list[tuple]) -> list[Request]:
    """Update the leader's mirrors of remote requests; returns those that changed."""
    changed = []
    for rid, prompt_logprobs, num_finished, seqs in news:
        req = mirrors.get(rid)
        if req is None:  # aborted on the leader meanwhile
            continue
        req.prompt_logprobs, req.num_finished, req.sequences = prompt_logprobs, num_finished, []
        for sample_index, status, *values in seqs:
            seq = Sequence(req, sample_index, req.prompt_token_ids)
            for name, value in zip(_SEQ_FIELDS, values):
                setattr(seq, name, value)
            # Mirrors are never in the leader's scheduler: WAITING lets finish() just mark them.
            seq.status = SeqStatus.FINISHED if status == SeqStatus.FINISHED.value else SeqStatus.WAITING
            seq.fork_pending = False
            req.sequences.append(seq)
        changed.append(req)
    return changed


class GroupSync:
    """The leader's log of calls and the other ranks' side of the per-step collective."""

    def __init__(self, group: Any, dp_size: int, dp_rank: int) -> None:
        self.group = group
        self.dp_size, self.dp_rank = dp_size, dp_rank
        self.is_leader = group.rank == 0
        self.log: list[tuple] = []
        self.remote: dict[str, Request] = {}   # leader (alltoall): requests other ranks run
        self._next_dp = 0

    def assign(self) -> int:
        """Data-parallel rank for a new request (round robin)."""
        rank = self._next_dp % self.dp_size
        self._next_dp += 1
        return rank

    def exchange(self, plan: GroupPlan | None, news: list[tuple]) -> tuple[GroupPlan, list[list[tuple]]]:
        """One collective: every rank gets the leader's plan and every rank's news."""
        gathered = self.group.all_gather_object((plan, news))
        return gathered[0][0], [n for _, n in gathered]
