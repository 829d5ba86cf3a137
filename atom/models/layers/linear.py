"""Linear layers whose parameters may be fused from several HF tensors (q|k|v, gate|up), and
their tensor-parallel variants (column: output rows split; row: input columns split + all-reduce)."""
from __future__ import annotations

import torch
from torch import nn

from atom.ops import ops


class Linear(nn.Module):
    """y = x @ W.T (+ b). `shards` names the HF tensors stacked along the output dim, with their sizes."""

    # Tensor parallelism (WeightMap reads these): parameter name -> dim split across tp_size ranks.
    tp_shard_dims: dict[str, int] = {}
    tp_replicas: dict[str, int] = {}
    tp_rank = 0
    tp_size = 1

    def __init__(self, in_features: int, out_features: int | list[int], bias: bool = False,
                 shard_names: list[str] | None = None) -> None:
        super().__init__()
        sizes = out_features if isinstance(out_features, list) else [out_features]
        self.shard_sizes = dict(zip(shard_names or [""], sizes))
        self.weight = nn.Parameter(torch.empty(sum(sizes), in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(sum(sizes)), requires_grad=False) if bias else None

    def shard_offset(self, shard: str) -> tuple[int, int]:
        """(row offset, rows) of one fused shard inside the weight."""
        offset = 0
        for name, size in self.shard_sizes.items():
            if name == shard:
                return offset, size
            offset += size
        raise KeyError(shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


def _split(size: int, ways: int, what: str) -> int:
    if size % ways:
        raise ValueError(f"cannot shard {what}: tensor_parallel_size={ways} does not divide {size}")
    return size // ways


class ColumnParallelLinear(Linear):
    """Each rank holds rows [rank*n/tp, (rank+1)*n/tp) of every fused shard; output stays split.

    replicas: per fused shard, how many consecutive ranks hold the same rows (KV heads when
    tp > num_key_value_heads: rank r holds block r // replicas of n * replicas / tp rows).
    """

    tp_shard_dims = {"weight": 0, "bias": 0}

    def __init__(self, in_features: int, out_features: int | list[int], bias: bool = False,
                 shard_names: list[str] | None = None, *, tp, replicas: list[int] | None = None) -> None:
        sizes = out_features if isinstance(out_features, list) else [out_features]
        replicas = replicas or [1] * len(sizes)
        local = [_split(s * r, tp.size, "the output features of a column-parallel linear") for s, r in zip(sizes, replicas)]
        super().__init__(in_features, local if isinstance(out_features, list) else local[0], bias, shard_names)
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.tp_replicas = dict(zip(shard_names or [""], replicas))


class RowParallelLinear(Linear):
    """Each rank holds input columns [rank*n/tp, ...); the partial products are all-reduced, then
    the (replicated) bias is added."""

    tp_shard_dims = {"weight": 1}

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, tp) -> None:
        super().__init__(_split(in_features, tp.size, "the input features of a row-parallel linear"),
                         out_features, bias)
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(ops.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


def column_linear(in_features: int, out_features: int | list[int], bias: bool = False,
                  shard_names: list[str] | None = None, tp=None, replicas: list[int] | None = None) -> Linear:
    """A plain Linear without tensor parallelism, else a ColumnParallelLinear."""
    if tp is None or tp.size == 1:
        return Linear(in_features, out_features, bias, shard_names)
    return ColumnParallelLinear(in_features, out_features, bias, shard_names, tp=tp, replicas=replicas)


def row_linear(in_features: int, out_features: int, bias: bool = False, tp=None) -> Linear:
    """A plain Linear without tensor parallelism, else a RowParallelLinear."""
    if tp is None or tp.size == 1:
        return Linear(in_features, out_features, bias)
    return RowParallelLinear(in_features, out_features, bias, tp=tp)
