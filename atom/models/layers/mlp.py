from __future__ import annotations

import torch
from torch import nn

from atom.models.layers.linear import Linear
from atom.ops import ops


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate|up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, [intermediate_size] * 2, shard_names=["gate_proj", "up_proj"])
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class SparseMoE(nn.Module):
    """Softmax top-k router over stacked experts: w13 [E, 2I, H] (gate|up), w2 [E, H, I]."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.intermediate_size = intermediate_size
        self.gate = Linear(hidden_size, num_experts)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = ops.moe_route(self.gate(x), self.top_k, self.renormalize)
        return ops.fused_moe(x, self.w13, self.w2, weights, ids)
