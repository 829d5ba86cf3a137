"""DeepSeek-V3's ops in the batch-invariant Triton backend ("triton_invariant", see
atom/ops/triton/invariant.py), with the semantics of the CPU invariant ops
(atom/ops/invariant_family_ops.py): multi-head latent attention in the ABSORBED form for every
token, in prefill as in decode, so a token's bits do not depend on the batch, on how its prompt was
chunked or cached, or on whether it was computed in a decode step or in a prompt-logprob prefill.

  mla_absorb_query,   q_nope W_uk / out_latent W_uv^T head by head through invariant_gemm (one
  mla_expand_output   tile config per weight for every M; bmm / cuBLAS choose kernels by M).
                      Cost: a launch per head (16 at DeepSeek-V3 / Moonlight's head count) and,
                      for the query, a transposed copy of W_uk per call (H x L x N values).
  mla_attention_decode  atom/ops/triton/mla.py's kernels with a fixed split of KV_SPLIT tokens at
                      absolute positions from 0, no in-kernel fold ("whole"), no shared-prefix
                      groups, partials merged in order (mla.mla_decode's fixed_split): a row's
                      result is a function of its query, its context and its length only.
  mla_attention_prefill  every new token is one row of that decode (seq_len = its position + 1,
                      its sequence's block-table row), between the two GEMMs above.
  router_linear       atom/ops/triton/router.py's kernels (their column ranges follow H only).
  moe_route_grouped   one program per token (atom/ops/triton/grouped_route.py).
  mla_cache_write     mla.py's write kernel: one program per token copies its row (no arithmetic).

All graph-safe (no host sync; grids from shapes and the host-side max_seq_len).
"""
from __future__ import annotations

import dataclasses

import torch

from atom.ops.metadata import AttentionMetadata
from atom.ops.registry import register
from atom.ops.triton import mla
from atom.ops.triton.grouped_route import grouped_route
from atom.ops.triton.invariant_gemm import invariant_gemm
from atom.ops.triton.router import router_linear

B = "triton_invariant"
KV_SPLIT = 256  # KV tokens per partial of a row (the normal op's split at large batches)
# Bytes of float32 partials one prefill launch may hold ([rows, H, parts, L]: an 8,192-token chunk
# at 8,192 tokens of context would take 8.6 GB at 16 heads): rows go in groups under this bound
# (a row's bits do not depend on its group).
PREFILL_PARTIAL_BYTES = 512 << 20


def _kv_b(w_kv_b: torch.Tensor, heads: int, nope: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj's weight [H * (N + V), L] as per-head W_uk [H, N, L] and W_uv [H, V, L] (views)."""
    if w_kv_b.dim() != 2 or w_kv_b.shape[0] % heads or w_kv_b.shape[0] // heads <= nope:
        raise ValueError(f"MLA: kv_b_proj weight {tuple(w_kv_b.shape)} is not [{heads} * ({nope} + V), L]")
    w = w_kv_b.view(heads, -1, w_kv_b.shape[-1])
    return w[:, :nope], w[:, nope:]


@register("mla_absorb_query", B)
def mla_absorb_query(q_nope: torch.Tensor, w_kv_b: torch.Tensor) -> torch.Tensor:
    """q_nope [T, H, N] -> q_nope W_uk [T, H, L], head by head."""
    heads, nope = q_nope.shape[1], q_nope.shape[2]
    w_uk, _ = _kv_b(w_kv_b, heads, nope)
    w_t = w_uk.transpose(1, 2).contiguous()  # [H, L, N]: invariant_gemm's [N_out, K] weights
    q = mla._unit_stride(q_nope)
    return torch.stack([invariant_gemm(q[:, h], w_t[h]) for h in range(heads)], dim=1)


@register("mla_expand_output", B)
def mla_expand_output(out_latent: torch.Tensor, w_kv_b: torch.Tensor, nope: int) -> torch.Tensor:
    """out_latent [T, H, L] -> out_latent W_uv^T [T, H, V], head by head."""
    heads = out_latent.shape[1]
    _, w_uv = _kv_b(w_kv_b, heads, nope)
    x = mla._unit_stride(out_latent)
    return torch.stack([invariant_gemm(x[:, h], w_uv[h]) for h in range(heads)], dim=1)


@register("mla_attention_decode", B)
def mla_attention_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                         meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The absorbed MLA decode (q_latent [B, H, L], q_pe [B, H, R] -> [B, H, L]; padded rows,
    seq_len 0, give zeros) with fixed splits at absolute positions (module doc)."""
    return mla.mla_decode(q_latent, q_pe, kv_cache, meta, scale, fixed_split=KV_SPLIT)


def token_rows(meta: AttentionMetadata, tokens: int) -> AttentionMetadata:
    """One decode row per new token of a prefill step: seq_len = the token's position + 1, its
    sequence's block-table row. Tokens past the last sequence (padding) get seq_len 0. On the
    device, without a host sync."""
    qsl, lens = meta.query_start_loc, meta.seq_lens
    n_seq = lens.shape[0]
    tok = torch.arange(tokens, dtype=qsl.dtype, device=qsl.device)
    seq = torch.searchsorted(qsl[1:].contiguous(), tok, right=True)  # qsl[seq] <= tok < qsl[seq + 1]
    real = seq < n_seq
    seq = seq.clamp(max=max(n_seq - 1, 0))
    row_lens = lens[seq].to(torch.int32) - (qsl[1:][seq].to(torch.int32) - tok.to(torch.int32)) + 1
    row_lens = torch.where(real, row_lens, torch.zeros_like(row_lens)).clamp(min=0)
    return dataclasses.replace(meta, seq_lens=row_lens, block_tables=meta.block_tables[seq],
                               query_start_loc=torch.arange(tokens + 1, dtype=qsl.dtype, device=qsl.device),
                               is_decode=True, max_query_len=1, cascade=None, host_query_start_loc=None,
                               host_seq_lens=None)


@register("mla_attention_prefill", B)
def mla_attention_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                          w_kv_b: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The prefill op's contract (q_nope [T, H, N], q_pe [T, H, R] -> [T, H, V]) in the absorbed
    form, every token through mla_attention_decode's kernels as one row (module doc)."""
    t, heads, nope = q_nope.shape
    if q_pe.shape[:2] != (t, heads) or kv_cache.shape[-1] <= q_pe.shape[2]:
        raise ValueError(f"mla_attention_prefill: q_nope {tuple(q_nope.shape)}, q_pe {tuple(q_pe.shape)} and "
                         f"cache {tuple(kv_cache.shape)} do not fit")
    q_latent = mla_absorb_query(q_nope, w_kv_b)
    if t == 0 or meta.seq_lens.shape[0] == 0:
        return mla_expand_output(torch.zeros_like(q_latent), w_kv_b, nope)
    rows = token_rows(meta, t)
    parts = max(1, -(-max(meta.max_seq_len, 1) // KV_SPLIT))
    per_call = max(1, PREFILL_PARTIAL_BYTES // (heads * parts * q_latent.shape[2] * 4))
    out_latent = torch.cat([
        mla.mla_decode(q_latent[a:a + per_call], q_pe[a:a + per_call], kv_cache,
                       dataclasses.replace(rows, seq_lens=rows.seq_lens[a:a + per_call],
                                           block_tables=rows.block_tables[a:a + per_call]), scale, fixed_split=KV_SPLIT)
        for a in range(0, t, per_call)])
    return mla_expand_output(out_latent, w_kv_b, nope)


@register("moe_route_grouped", B)
def moe_route_grouped(router_logits: torch.Tensor, correction_bias: torch.Tensor, top_k: int, num_groups: int,
                      topk_groups: int, renormalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    return grouped_route(router_logits, correction_bias, top_k, num_groups, topk_groups, renormalize, scaling)


register("mla_cache_write", B)(mla.mla_cache_write)
register("router_linear", B)(router_linear)
