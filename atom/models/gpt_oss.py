"""GPT-OSS (`GptOssForCausalLM`): attention with sinks on alternating sliding-window (128) and
full layers, biased q/k/v/o, YaRN RoPE, and MoE layers whose router has a bias (softmax over the
top-k logits) and whose experts have biases and the clamped SwiGLU
(`(clamp(up, ±limit) + 1) * g * sigmoid(alpha * g)`, g = min(gate, limit)).

Checkpoints hold every expert in one tensor in HF's layout, `experts.gate_up_proj` [E, H, 2I]
with gate and up interleaved column by column, `experts.down_proj` [E, I, H], and biases; they
are converted into our [E, 2I, H] (gate rows, then up rows) / [E, H, I] at load
(`FusedExpertTensor`). The released MXFP4 checkpoints store `*_blocks` (packed e2m1 pairs) and
`*_scales` (e8m0 exponents per 32 values) instead: they are dequantised at load
(`dequantize_mxfp4`), so the engine runs them in its own dtype.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

from atom.models.decoder import CausalLM, SelfAttention
from atom.models.hf_config import ModelArgs
from atom.models.layers.linear import Linear
from atom.models.layers.mlp import FusedExpertTensor, SparseMoE
from atom.models.layers.rotary import RotaryEmbedding
from atom.ops import ops

# e2m1 code -> value (the low nibble is the first of the two values in a byte).
_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_to_float(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 expert weights -> float32 in HF's layout of the bf16 tensor.

    blocks: [E, out, G, 16] uint8, two e2m1 values a byte (low nibble first); scales: [E, out, G]
    uint8 exponents biased by 127, one per group of 32 values. Returns [E, in, out], in = 32 G
    (the checkpoint stores each expert as [out, in]; HF's bf16 tensors are [in, out])."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} and scales {tuple(scales.shape)} "
                         f"{scales.dtype} do not fit together (want uint8 [..., G, 16] and [..., G])")
    lut = torch.tensor(_FP4_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1).flatten(-2)
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2).transpose(1, 2).contiguous()


def dequantize_mxfp4(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Replace each `X_blocks` / `X_scales` pair of a checkpoint stream by `X` (float32, HF layout);
    other tensors pass through. A pair is held until both halves arrived."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        base, _, kind = name.rpartition("_")
        if kind not in ("blocks", "scales"):
            yield name, tensor
            continue
        parts = pending.setdefault(base, {})
        parts[kind] = tensor
        if len(parts) == 2:
            del pending[base]
            yield base, mxfp4_to_float(parts["blocks"], parts["scales"])
    if pending:
        base, parts = next(iter(pending.items()))
        missing = "scales" if "blocks" in parts else "blocks"
        raise ValueError(f"checkpoint has {base}_{'blocks' if missing == 'scales' else 'scales'} but no "
                         f"{base}_{missing} (MXFP4 weights come in pairs)")


def _deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Columns g0 u0 g1 u1 ... -> g0 g1 ... u0 u1 ... along dim."""
    pairs = t.unflatten(dim, (-1, 2))
    return torch.cat((pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)), dim=dim)


class GptOssMoE(SparseMoE):
    """Router with a bias, softmax over the top-k logits (= softmax renormalised over the top k);
    experts with biases b13 [E, 2I], b2 [E, H] and the clamped SwiGLU."""

    def __init__(self, args: ModelArgs, parallel=None) -> None:
        super().__init__(args.hidden_size, args.moe_intermediate_size, args.num_experts, args.num_experts_per_tok,
                         True, parallel)
        self.gate = Linear(args.hidden_size, args.num_experts, bias=True)
        local, inter = self.w13.shape[0], self.intermediate_size
        self.b13 = nn.Parameter(torch.empty(local, 2 * inter), requires_grad=False)
        self.b2 = nn.Parameter(torch.empty(local, args.hidden_size), requires_grad=False)
        self.limit, self.alpha = args.swiglu_limit, args.swiglu_alpha
        self.full_inter, self.hidden = args.moe_intermediate_size, args.hidden_size

    def forward_local(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, *self.route_recorded(x))

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # With the intermediate dim split over ranks the partial outputs are summed: one adds b2.
        b2 = self.b2 if self.tp_rank == 0 else None
        return ops.fused_moe_biased(x, self.w13, self.b13, self.w2, b2, weights, ids, self.limit, self.alpha)

    @property
    def experts_skip_negative_ids(self) -> bool:
        return ops.supports("fused_moe_biased", "skips_negative_ids")

    def fused_tensors(self) -> list[FusedExpertTensor]:
        e, i, h = self.num_experts, self.full_inter, self.hidden
        return [
            FusedExpertTensor("experts.gate_up_proj", "w13", (e, h, 2 * i), 1, 2,
                              lambda t: _deinterleave(t.transpose(1, 2), 1)),
            FusedExpertTensor("experts.gate_up_proj_bias", "b13", (e, 2 * i), 1, 2, lambda t: _deinterleave(t, 1)),
            FusedExpertTensor("experts.down_proj", "w2", (e, i, h), 2, 1, lambda t: t.transpose(1, 2)),
            FusedExpertTensor("experts.down_proj_bias", "b2", (e, h), None),
        ]


class GptOssForCausalLM(CausalLM):
    checkpoint_renames = ((r"\.mlp\.gate\.", ".mlp.router."),)
    # Every rank streams the whole checkpoint through `convert_checkpoint` (MXFP4 pairs).
    stream_load = True
    # Decode ops a CUDA graph needs from a non-torch backend (atom/engine/cuda_graph.py).
    graph_ops = ("sliding_sink_attention_decode", "fused_moe_biased", "moe_route")
    decode_attention_op = "sliding_sink_attention_decode"  # every layer has sinks

    def __init__(self, args: ModelArgs, parallel=None) -> None:
        if args.swiglu_limit is not None and args.swiglu_limit <= 0:
            raise ValueError(f"swiglu_limit must be > 0, got {args.swiglu_limit}")
        super().__init__(args, parallel)

    def build_attention(self, args: ModelArgs, layer: int, rotary: RotaryEmbedding, parallel) -> nn.Module:
        window = args.sliding_window if args.is_sliding_layer(layer) else None
        return SelfAttention(args, False, rotary, None if parallel is None else parallel.tp, window, sinks=True)

    def build_mlp(self, args: ModelArgs, layer: int, parallel) -> nn.Module:
        return GptOssMoE(args, parallel)

    def convert_checkpoint(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        return dequantize_mxfp4(tensors)
