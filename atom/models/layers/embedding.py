"""Token embedding and LM head; their vocabulary-parallel variants split the vocab rows over TP."""
from __future__ import annotations

import torch
from torch import nn

from atom.ops import ops


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight)


class LMHead(nn.Module):
    """Logits in float32 (sampling and logprobs want the precision); may share the embedding's weight."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, hidden: torch.Tensor, widen: bool = True) -> torch.Tensor:
        """widen=False: logits in the weights' dtype, for a sampler that reads them as they are
        (ops capability low_precision_logits): the float32 copy costs a pass over [rows, vocab]."""
        logits = ops.lm_head(hidden, self.weight)
        return logits.float() if widen else logits


def _vocab_shard(vocab_size: int, tp) -> int:
    if vocab_size % tp.size:
        raise ValueError(f"cannot shard the vocabulary: tensor_parallel_size={tp.size} does not divide "
                         f"vocab_size={vocab_size}")
    return vocab_size // tp.size


class VocabParallelEmbedding(Embedding):
    """Rank r holds vocab rows [r*V/tp, (r+1)*V/tp); other ids embed to 0; one all-reduce sums."""

    tp_shard_dims = {"weight": 0}

    def __init__(self, vocab_size: int, hidden_size: int, *, tp) -> None:
        super().__init__(_vocab_shard(vocab_size, tp), hidden_size)
        self.tp, self.tp_rank, self.tp_size = tp, tp.rank, tp.size
        self.vocab_start = tp.rank * self.weight.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(outside[:, None], 0))


class ParallelLMHead(LMHead):
    """Rank r computes the logits of its vocab rows; they are all-gathered so every rank samples
    from the full [T, V] logits (and so samples the same tokens)."""

    tp_shard_dims = {"weight": 0}

    def __init__(self, vocab_size: int, hidden_size: int, *, tp) -> None:
        super().__init__(_vocab_shard(vocab_size, tp), hidden_size)
        self.tp, self.tp_rank, self.tp_size = tp, tp.rank, tp.size

    def forward(self, hidden: torch.Tensor, widen: bool = True) -> torch.Tensor:
        logits = ops.lm_head(hidden, self.weight)
        return self.tp.all_gather(logits.float() if widen else logits, dim=-1)


def embedding(vocab_size: int, hidden_size: int, tp=None) -> Embedding:
    if tp is None or tp.size == 1:
        return Embedding(vocab_size, hidden_size)
    return VocabParallelEmbedding(vocab_size, hidden_size, tp=tp)


def lm_head(vocab_size: int, hidden_size: int, tp=None) -> LMHead:
    if tp is None or tp.size == 1:
        return LMHead(vocab_size, hidden_size)
    return ParallelLMHead(vocab_size, hidden_size, tp=tp)
