from __future__ import annotations

import torch
from torch import nn

from atom.ops import ops


class RMSNorm(nn.Module):
    """RMSNorm; with a residual it adds first and returns (normed, new residual) in one op."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
