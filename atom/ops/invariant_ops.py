"""Batch-invariant ops on the CPU (backend "invariant"; `EngineConfig(batch_invariant=True)`).

A token's numbers must not depend on what else is in the batch, where it sits, how its prompt was
chunked, whether its prefix came from the cache, or whether it was computed in a decode step or
in a prefill. The torch reference already computes most ops row by row (norms, RoPE, sampling,
the per-token order of the MoE sum); two kinds of op are not invariant there:

* GEMMs: CPU BLAS picks another kernel for 1-3 rows than for 4 or more (measured on this torch:
  every M >= 4 gives each row the same bits; M = 1, 2, 3 differ), so every matmul here runs on at
  least 4 rows (padded with zeros, then cut).
* Attention: the reference prefill and decode reduce over different lengths (a causal mask over
  the chunk, a padded block table). Here every query token attends over exactly its own context
  with the same sequence of ops, in prefill and in decode alike.

The cost is a Python loop over query tokens in attention: meant for checking a trainer's
recomputation and for small runs, not for throughput.

Every op here has the "batch_invariant" capability (the registry's invariant mode on the CPU
takes ops from this backend, then from the CPU backend's ops that declare it). The reference's
RoPE, routing and sampler are used as they are: they compute row by row. The families' own ops
(sliding window and sinks, biased experts, grouped routing, MLA): atom/ops/invariant_family_ops.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from atom.ops import torch_ops
from atom.ops.metadata import AttentionMetadata
from atom.ops.registry import declare_backend, register

B = "invariant"
declare_backend(B, "batch_invariant")
_MIN_ROWS = 4


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    m = x.shape[0]
    if m >= _MIN_ROWS:
        return x, m
    return torch.cat([x, x.new_zeros(_MIN_ROWS - m, *x.shape[1:])]), m


register("cascade_group_rows", B)(torch_ops.cascade_group_rows)  # a pure query: the generic rule


@register("linear", B)
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).contiguous()  # BLAS may take another path for a strided input
    padded, m = _rows(flat)
    return F.linear(padded, weight, bias)[:m].reshape(*x.shape[:-1], weight.shape[0])


@register("lm_head", B)
def lm_head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return linear(hidden, weight)


@register("fused_moe", B, "skips_negative_ids")
def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """torch_ops.fused_moe with each expert's GEMMs on at least 4 rows (the per-token sum keeps
    the reference's order: by expert id)."""
    return torch_ops.expert_sum(x, w2.shape[1], topk_weights, topk_ids,
                                lambda e, h: linear(torch_ops.silu_and_mul(linear(h, w13[e])), w2[e]))


@register("moe_forward", B)
def moe_forward(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                top_k: int, renormalize: bool) -> torch.Tensor:
    return fused_moe(x, w13, w2, *torch_ops.moe_route(router_logits, top_k, renormalize))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token q [Hq, D] over its own context k, v [L, Hk, D]: the same ops whatever the step."""
    group = q.shape[0] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = (q.float()[None] * k).sum(-1) * scale          # [L, Hq]
    probs = scores.softmax(0)
    return (probs[..., None] * v).sum(0).to(q.dtype)         # [Hq, D]


def _each_token(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    starts, lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
    for b, ctx in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        if e == s:
            continue
        k = torch_ops._gather_kv(k_cache, meta.block_tables[b], ctx)
        v = torch_ops._gather_kv(v_cache, meta.block_tables[b], ctx)
        first = ctx - (e - s)  # position of the chunk's first token
        for i in range(e - s):
            n = first + i + 1
            out[s + i] = _attend(q[s + i], k[:n], v[:n], scale)
    return out


@register("paged_attention_prefill", B, "reads_whole_blocks")
def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float) -> torch.Tensor:
    return _each_token(q, k_cache, v_cache, meta, scale)


@register("paged_attention_decode", B, "reads_whole_blocks")
def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float) -> torch.Tensor:
    return _each_token(q, k_cache, v_cache, meta, scale)


INVARIANT_OPS = ("linear", "lm_head", "fused_moe", "moe_forward", "paged_attention_prefill", "paged_attention_decode")

# The reference's row-by-row ops, taken as they are.
for _name in ("rotary_embedding", "moe_route", "sample"):
    register(_name, B)(getattr(torch_ops, _name))
