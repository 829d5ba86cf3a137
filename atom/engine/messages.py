"""The typed messages between the steps of the engine loop: the scheduler's batch, the runner's
results. The scheduler owns sequence state; the runner only reads it and returns a StepOutput."""
from __future__ import annotations

from dataclasses import dataclass, field

from atom.engine.sequence import Sequence
from atom.ops.metadata import SamplerOutput


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]
    starts: list[int] | None = None  # each sequence's first position in this step (set when advanced)

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.num_new_tokens)

    def samples(self, i: int) -> bool:
        """Whether seq i reaches its last token this step (so the step samples its next one)."""
        seq = self.seqs[i]
        return seq.num_computed + self.num_new_tokens[i] == len(seq)


@dataclass
class SampledToken:
    seq: Sequence
    sample_index: int
    token_id: int
    logprob: float
    top: dict[int, float] | None
    rank: int | None = None  # of the sampled token among the row's values (1 = best)


@dataclass
class StepOutput:
    sampled: list[SampledToken] = field(default_factory=list)
    # (seq, first prompt position scored, one dict per position, the rank of each actual token)
    prompt_logprobs: list[tuple[Sequence, int, list[dict[int, float]], list[int]]] = field(default_factory=list)
    overlapped: bool = False  # launched ahead (the scheduler advanced its sequences at launch)
    # [tokens, moe_layers, top_k] int16 experts each token of the step went to
    # (enable_return_routed_experts). A decode step's is a view of the runner's staging buffer:
    # read it (Scheduler.update) before the runner launches its second step after this one.
    routed: "numpy.ndarray | None" = None


def sampled_tokens(rows: list[tuple[Sequence, int]], result: SamplerOutput) -> list[SampledToken]:
    """The host-side view of a sampler result, one per (sequence, sample index) row: the step's
    one device-to-host sync."""
    tokens, lps = result.token_ids.tolist(), result.logprobs.tolist()
    want_top = any(seq.params.logprobs for seq, _ in rows)
    top_ids, top_lps = (result.top_ids.tolist(), result.top_logprobs.tolist()) if want_top else ([], [])
    ranks = result.ranks.tolist() if result.ranks is not None else None
    out = []
    for r, (seq, j) in enumerate(rows):
        k = seq.params.logprobs or 0
        if k < 0:  # the whole vocabulary
            k = len(top_ids[r])
        top = dict(zip(top_ids[r][:k], top_lps[r][:k])) if k > 0 else None
        out.append(SampledToken(seq, j, tokens[r], lps[r], top, ranks[r] if ranks is not None else None))
    return out
