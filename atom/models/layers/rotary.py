from __future__ import annotations

import math

import torch
from torch import nn

from atom.ops import ops


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature factor 0.1 * mscale * ln(scale) + 1 (1 when not stretched)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_factor(scaling: dict, max_position: int) -> float:
    """The context stretch factor; DeepSeek-style configs may give it only implicitly."""
    factor = scaling.get("factor")
    return float(factor if factor is not None else max_position / scaling["original_max_position_embeddings"])


def yarn_parameters(dim: int, theta: float, scaling: dict, max_position: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim/2] float64, cos/sin multiplier) of YaRN RoPE (arXiv:2309.00071),
    as HF transformers computes them: frequencies below the `beta_slow` rotation count are
    interpolated by `factor`, those above `beta_fast` are kept, a linear ramp in between."""
    factor = yarn_factor(scaling, max_position)
    original = scaling.get("original_max_position_embeddings") or max_position
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE with a precomputed [max_pos, head_dim] cos|sin table (a buffer, not a weight).

    `scaling` (ModelArgs.rope_scaling): YaRN frequencies, and its attention factor folded into
    the table (HF multiplies cos and sin by it).
    """

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None = None) -> None:
        super().__init__()
        if scaling is None:
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
            mult = 1.0
        else:
            inv_freq, mult = yarn_parameters(head_dim, theta, scaling, max_position)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)
        self.register_buffer("cos_sin_cache", (torch.cat((freqs.cos(), freqs.sin()), dim=-1) * mult).float(),
                             persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return ops.rotary_embedding(positions, q, k, self.cos_sin_cache)
