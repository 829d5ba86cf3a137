"""Batch-invariant Triton ops of the families with their own attention or experts (backend
"triton_invariant", imported by invariant.py; the CPU versions, whose semantics these match,
are in atom/ops/invariant_family_ops.py): GPT-OSS (sinks, sliding window, the clamped SwiGLU)
and Mixtral / Qwen3 with a sliding window. GPT-OSS's biased experts (`fused_moe_biased`) are in
invariant.py with fused_moe, whose fixed tiles they share.

  sliding_sink_attention_*  invariant_attention's kernels with WINDOW / HAS_SINKS compiled in:
                            the same KV splits at absolute positions and the same online-softmax
                            steps in prefill and decode (a token's bits do not depend on the batch,
                            the chunking, the cache or the step kind); no shared-prefix groups
                            (the op does not declare "cascade");
  clamped_swiglu            one program per (row, column block), the block width from the row
                            width alone: a row's code path never depends on the row count.

All graph-safe: no host sync, grids from shapes and host-side bounds only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops.metadata import AttentionMetadata
from atom.ops.registry import register
from atom.ops.triton import invariant_attention as attn
from atom.ops.triton.moe import gated_activation

B = "triton_invariant"


@register("sliding_sink_attention_prefill", B)
def sliding_sink_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   meta: AttentionMetadata, scale: float, window: int | None,
                                   sinks: torch.Tensor | None) -> torch.Tensor:
    return attn.paged_attention_prefill(q, k_cache, v_cache, meta, scale, window, sinks)


@register("sliding_sink_attention_decode", B)
def sliding_sink_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  meta: AttentionMetadata, scale: float, window: int | None,
                                  sinks: torch.Tensor | None) -> torch.Tensor:
    return attn.paged_attention_decode(q, k_cache, v_cache, meta, scale, window, sinks)


@triton.jit
def _clamped_swiglu_kernel(x_ptr, o_ptr, inter, sx, so, limit, alpha, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cm = cols < inter
    g = tl.load(x_ptr + t * sx + cols, mask=cm, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + t * sx + inter + cols, mask=cm, other=0.0).to(tl.float32)
    y = gated_activation(g, u, limit, alpha, "clamped_swiglu")
    tl.store(o_ptr + t * so + cols, y.to(o_ptr.dtype.element_ty), mask=cm)


@register("clamped_swiglu", B)
def clamped_swiglu(x: torch.Tensor, limit: float | None, alpha: float) -> torch.Tensor:
    """GPT-OSS's expert activation on the gate|up halves of x [..., 2I] (torch_family_ops has the
    reference)."""
    two_i = x.shape[-1]
    if two_i % 2:
        raise ValueError(f"clamped_swiglu needs gate|up halves of equal width, got a last dimension of {two_i}")
    x2 = x.reshape(-1, two_i)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], two_i // 2, dtype=x.dtype, device=x.device)
    if x2.shape[0] and two_i:
        block = min(1024, triton.next_power_of_2(two_i // 2))
        _clamped_swiglu_kernel[(x2.shape[0], triton.cdiv(two_i // 2, block))](
            x2, out, two_i // 2, x2.stride(0), out.stride(0), float("inf") if limit is None else float(limit),
            float(alpha), BLOCK=block, num_warps=4)
    return out.reshape(*x.shape[:-1], two_i // 2)
