"""Linear layers whose parameters may be fused from several HF tensors (q|k|v, gate|up)."""
from __future__ import annotations

import torch
from torch import nn


class Linear(nn.Module):
    """y = x @ W.T (+ b). `shards` names the HF tensors stacked along the output dim, with their sizes."""

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
        return nn.functional.linear(x, self.weight, self.bias)
