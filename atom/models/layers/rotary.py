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


def default_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """Plain RoPE's inverse frequencies [dim/2], float64."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def linear_parameters(dim: int, theta: float, scaling: dict, max_position: int) -> tuple[torch.Tensor, float]:
    """Position interpolation ("linear"): every frequency divided by `factor`."""
    return default_inv_freq(dim, theta) / float(scaling["factor"]), 1.0


def llama3_parameters(dim: int, theta: float, scaling: dict, max_position: int) -> tuple[torch.Tensor, float]:
    """Llama 3.1's RoPE ("llama3"), as HF computes it: wavelengths longer than
    original / low_freq_factor are interpolated by `factor`, those shorter than
    original / high_freq_factor kept, a smooth blend in between."""
    inv_freq = default_inv_freq(dim, theta)
    factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, blended, scaled), 1.0


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
    pos_freqs = 1.0 / default_inv_freq(dim, theta)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


# rope_type -> (inverse frequencies, cos/sin multiplier); hf_config checks the type and its fields.
ROPE_PARAMETERS = {"linear": linear_parameters, "llama3": llama3_parameters, "yarn": yarn_parameters}


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE with a precomputed [max_pos, head_dim] cos|sin table (a buffer, not a weight).

    `scaling` (ModelArgs.rope_scaling): the frequencies of its rope_type (linear, llama3, YaRN), and
    YaRN's attention factor folded into the table (HF multiplies cos and sin by it).
    """

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None = None) -> None:
        super().__init__()
        if scaling is None:
            inv_freq, mult = default_inv_freq(head_dim, theta), 1.0
        else:
            inv_freq, mult = ROPE_PARAMETERS[scaling["rope_type"]](head_dim, theta, scaling, max_position)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)
        self.register_buffer("cos_sin_cache", (torch.cat((freqs.cos(), freqs.sin()), dim=-1) * mult).float(),
                             persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return ops.rotary_embedding(positions, q, k, self.cos_sin_cache)
