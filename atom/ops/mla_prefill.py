"""Fast MLA prefill (DeepSeek-V3 / Moonlight) in torch, for the GPU backends: the semantics of
torch_family_ops.mla_attention_prefill (causal attention of each sequence's new tokens over all
its cached latents, bottom-right aligned), without its float32 einsums and [H, q, ctx] scores.

A sequence with many new tokens (> ABSORB_MAX_Q) is expanded, as HF does: its latent rows are
gathered from the paged cache and one GEMM per group of sequences turns [latent | k_pe] into
per-head [v | k_nope | k_pe] in the model dtype (tensor cores). The GEMM's weight is kv_b_proj's
with the value rows first and an identity block that copies k_pe into every head, so K =
columns V: and V = columns :V of one buffer: no concatenation, no padding copy. The group then
runs flash attention over it: on CUDA in half precision one varlen call for the whole group
(causal there means bottom-right aligned); otherwise (CPU, float32, head dims flash refuses)
scaled_dot_product_attention per sequence with a lower-right causal bias. V is read as the
first qk-width columns of the buffer when flash needs equal head dims: the extra columns are
k_nope values whose outputs are dropped.

A sequence with few new tokens (a decode row in a mixed step, a short chunk over a long prefix)
would pay the whole expansion GEMM of its context for a handful of queries; it goes through the
absorbed form instead: q_nope W_uk as a latent query per token, the backend's MLA decode kernel
with one row per token (its position + 1 as the length), W_uv after.

The gather indices, groups and the short rows' metadata depend on the step only: the first
layer builds them (`_Plan`, kept in meta.op_plans), the others reuse them. Host syncs: none when
the metadata carries its host lists (the engine's does), else one per step (the query starts and
lengths); prefill is never graph-captured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from atom.ops.metadata import AttentionMetadata

# New tokens up to which a sequence takes the absorbed path. Estimated at Moonlight's shape on an
# H200 as 32 (the expansion costs ctx * 5.9 MFLOP, ~10 ns per context token at 600 TFLOP/s; the
# absorbed decode reads 1152 bytes per (query, context token) pair, ~0.3 ns at 4 TB/s), measured
# (`bench.mla_kernels --prefill`, 8 sequences over 2,048 tokens, 2026-12-02): absorbed / expanded
# 980 / 1,051 us at 8 new tokens, 1,033 / 978 at 16, 1,029 / 966 at 32. The absorbed kernel
# reads each context row once per query row, not once per sequence as estimated.
ABSORB_MAX_Q = 8
# Bytes of expanded K/V (plus the gathered latents) one group may hold: sequences are grouped
# until their contexts fill it (a single longer sequence forms a group alone).
EXPAND_BUDGET_BYTES = 1 << 30

DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor]
_FLASH = getattr(torch.ops.aten, "_flash_attention_forward", None)


@dataclass
class _Group:
    """Sequences expanded together: their query rows [row_lo, row_hi) (consecutive sequences),
    the cache slots of their contexts one after another, and flash's varlen bounds."""
    row_lo: int
    row_hi: int
    q_lens: list[int]
    k_lens: list[int]
    slots: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor


@dataclass
class _Plan:
    """What mla_prefill derives from a step's metadata, once for all its layers: built from the
    metadata's tensors `sources` (held, compared by identity) under `settings`."""
    sources: tuple
    settings: tuple
    short_rows: torch.Tensor | None
    short_meta: AttentionMetadata | None
    groups: list[_Group]


def mla_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, w_kv_b: torch.Tensor,
                meta: AttentionMetadata, scale: float, decode: DecodeFn, use_flash: bool = True) -> torch.Tensor:
    """mla_attention_prefill (q_nope [T, H, N], q_pe [T, H, R]; kv_cache [num_blocks, block_size,
    1, L + R]; w_kv_b [H * (N + V), L]; returns [T, H, V] in q's dtype). `decode` is the
    backend's mla_attention_decode, used for sequences of at most ABSORB_MAX_Q new tokens;
    use_flash False forces the per-sequence SDPA path (tests)."""
    t, heads, nope = q_nope.shape
    rope, lat = q_pe.shape[-1], kv_cache.shape[-1] - q_pe.shape[-1]
    if q_pe.shape[:2] != (t, heads) or kv_cache.dim() != 4 or kv_cache.shape[2] != 1 or lat < 1:
        raise ValueError(f"mla_attention_prefill: q_nope {tuple(q_nope.shape)}, q_pe {tuple(q_pe.shape)} and "
                         f"kv_cache {tuple(kv_cache.shape)} do not fit [T, H, N], [T, H, R], [blocks, page, 1, L + R]")
    if w_kv_b.shape[1] != lat or w_kv_b.shape[0] % heads or w_kv_b.shape[0] // heads <= nope:
        raise ValueError(f"mla_attention_prefill: w_kv_b {tuple(w_kv_b.shape)} is not [{heads} * ({nope} + V), {lat}]")
    v_dim = w_kv_b.shape[0] // heads - nope
    out = q_nope.new_empty(t, heads, v_dim)
    if t == 0 or meta.seq_lens.shape[0] == 0:
        return out
    per_token = (heads * (v_dim + nope + rope) + lat + rope) * w_kv_b.element_size()
    plan = _plan(meta, kv_cache.shape[1], max(1, EXPAND_BUDGET_BYTES // per_token), q_nope.device)
    if plan.short_rows is not None:
        _absorbed(q_nope, q_pe, kv_cache, w_kv_b, plan, scale, decode, out)
    if plan.groups:
        w_aug = _augmented_weight(w_kv_b, heads, nope, v_dim, lat, rope)
        for group in plan.groups:
            _expanded(q_nope, q_pe, kv_cache, w_aug, scale, group, v_dim, out, use_flash)
    return out


def _plan(meta: AttentionMetadata, page: int, cap_tokens: int, dev: torch.device) -> _Plan:
    """meta's plan for these settings: built by the step's first layer, reused by the others
    (a copy of meta with other tensors, sharing op_plans, never reads a stale plan)."""
    sources = (meta.query_start_loc, meta.seq_lens, meta.block_tables)
    settings = (page, cap_tokens, ABSORB_MAX_Q, dev)
    plan = meta.op_plans.get("mla_prefill")
    if (plan is not None and plan.settings == settings
            and all(a is b for a, b in zip(plan.sources, sources))):
        return plan
    nseq = meta.seq_lens.shape[0]
    starts, ctx = meta.host_query_start_loc, meta.host_seq_lens
    if starts is None or ctx is None:  # one host sync
        host = torch.cat((meta.query_start_loc[:nseq + 1].long(), meta.seq_lens.long())).tolist()
        starts, ctx = host[:nseq + 1], host[nseq + 1:]
    qlens = [starts[b + 1] - starts[b] for b in range(nseq)]
    short = [b for b in range(nseq) if 0 < qlens[b] <= ABSORB_MAX_Q]
    short_rows = short_meta = None
    if short:
        lens = [qlens[b] for b in short]
        short_rows, which = _ranges([starts[b] for b in short], lens, dev)
        tok_lens, _ = _ranges([ctx[b] - n + 1 for b, n in zip(short, lens)], lens, dev)
        short_meta = AttentionMetadata(
            slot_mapping=torch.full_like(short_rows, -1),
            query_start_loc=torch.arange(short_rows.shape[0] + 1, device=dev),
            seq_lens=tok_lens.to(meta.seq_lens.dtype), block_tables=meta.block_tables[_to_device(short, dev)[which]],
            is_decode=True, max_query_len=1, max_seq_len=max(ctx[b] for b in short))
    long_seqs = [b for b in range(nseq) if qlens[b] > ABSORB_MAX_Q]
    groups = [_group(meta, page, run, starts, ctx, dev) for run in _groups(long_seqs, ctx, cap_tokens)]
    plan = _Plan(sources, settings, short_rows, short_meta, groups)
    meta.op_plans["mla_prefill"] = plan
    return plan


def _group(meta: AttentionMetadata, page: int, seqs: list[int], starts: list[int], ctx: list[int],
           dev: torch.device) -> _Group:
    q_lens = [starts[b + 1] - starts[b] for b in seqs]
    k_lens = [ctx[b] for b in seqs]
    pos, which = _ranges([0] * len(seqs), k_lens, dev)
    seq_ids = _to_device(seqs, dev)[which]
    slots = meta.block_tables[seq_ids, pos // page].long() * page + pos % page
    cu_q = _to_device([0] + q_lens, dev, torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = _to_device([0] + k_lens, dev, torch.int32).cumsum(0, dtype=torch.int32)
    return _Group(starts[seqs[0]], starts[seqs[-1] + 1], q_lens, k_lens, slots, cu_q, cu_k)


def _augmented_weight(w_kv_b: torch.Tensor, heads: int, nope: int, v_dim: int, lat: int, rope: int) -> torch.Tensor:
    """[H * (V + N + R), L + R]: per head the W_uv rows, the W_uk rows (both zero on the k_pe
    columns), then an identity on the k_pe columns, so that [latent | k_pe] @ W.T = [v | k_nope | k_pe]."""
    w = w_kv_b.view(heads, nope + v_dim, lat)
    aug = w_kv_b.new_zeros(heads, v_dim + nope + rope, lat + rope)
    aug[:, :v_dim, :lat] = w[:, nope:]
    aug[:, v_dim:v_dim + nope, :lat] = w[:, :nope]
    aug[:, v_dim + nope:, lat:] = torch.eye(rope, dtype=w_kv_b.dtype, device=w_kv_b.device)
    return aug.view(heads * (v_dim + nope + rope), lat + rope)


def _groups(seqs: list[int], ctx: list[int], cap_tokens: int) -> list[list[int]]:
    """Runs of consecutive sequences (so that their query rows are one range) in seqs whose
    contexts sum to at most cap_tokens (a longer one alone)."""
    groups: list[list[int]] = []
    held = cap_tokens
    for b in seqs:
        if held + ctx[b] > cap_tokens or groups[-1][-1] != b - 1:
            groups.append([])
            held = 0
        groups[-1].append(b)
        held += ctx[b]
    return groups


def _to_device(values: list[int], device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A host list on the device without waiting for the device's queue (non_blocking from
    pageable memory is staged at once; a blocking copy would synchronise with the stream)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _ranges(begins: list[int], lens: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated ranges [begin, begin + len): (values, index of the range of each value)."""
    total = sum(lens)
    lens_t = _to_device(lens, device)
    which = torch.repeat_interleave(torch.arange(len(lens), device=device), lens_t, output_size=total)
    first = torch.cumsum(lens_t, 0) - lens_t
    begin_t = _to_device(begins, device)
    return begin_t[which] + torch.arange(total, device=device) - first[which], which


def _expanded(q_nope, q_pe, kv_cache, w_aug, scale, group: _Group, v_dim, out, use_flash) -> None:
    """Expand the latents of `group`'s sequences (one GEMM) and attend; writes out's rows."""
    heads = q_nope.shape[1]
    qk = q_nope.shape[2] + q_pe.shape[2]
    lo, hi = group.row_lo, group.row_hi
    kv = kv_cache.view(-1, kv_cache.shape[-1])[group.slots].to(w_aug.dtype)
    x = F.linear(kv, w_aug).view(kv.shape[0], heads, -1)   # [ctx, H, V + N + R]
    q = torch.cat((q_nope[lo:hi], q_pe[lo:hi]), dim=-1).to(w_aug.dtype)
    if use_flash and _flash_ok(q, v_dim):
        o = _FLASH(q, x[..., v_dim:], x[..., :qk], group.cu_q, group.cu_k, max(group.q_lens), max(group.k_lens),
                   0.0, True, False, scale=scale)[0]
        out[lo:hi] = o[..., :v_dim]
        return
    qa = ka = 0
    for ql, kl in zip(group.q_lens, group.k_lens):
        xs = x[ka:ka + kl].transpose(0, 1)
        out[lo + qa:lo + qa + ql] = _sdpa_lower_right(q[qa:qa + ql].transpose(0, 1), xs[..., v_dim:],
                                                      xs[..., :v_dim], scale).transpose(0, 1)
        qa, ka = qa + ql, ka + kl


def _flash_ok(q: torch.Tensor, v_dim: int) -> bool:
    """Flash attention (equal q/k/v head dims, V read as the first qk columns) can run this."""
    d = q.shape[-1]
    return (_FLASH is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and d <= 256 and d % 8 == 0 and v_dim % 8 == 0 and v_dim <= d)


def _sdpa_lower_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """[H, q, D] x [H, ctx, D] -> [H, q, V]: query i sits at position ctx - q + i."""
    from torch.nn.attention.bias import causal_lower_right
    mask = causal_lower_right(q.shape[1], k.shape[1])
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale)[0]


def _absorbed(q_nope, q_pe, kv_cache, w_kv_b, plan: _Plan, scale, decode, out) -> None:
    """Short sequences: one decode row per new token over its causal prefix (length position + 1)."""
    heads, nope = q_nope.shape[1], q_nope.shape[2]
    w = w_kv_b.view(heads, -1, kv_cache.shape[-1] - q_pe.shape[-1])
    rows = plan.short_rows
    q_lat = torch.einsum("thn,hnl->thl", q_nope[rows], w[:, :nope])
    o_lat = decode(q_lat, q_pe[rows].contiguous(), kv_cache, plan.short_meta, scale)
    out[rows] = torch.einsum("thl,hvl->thv", o_lat, w[:, nope:]).to(out.dtype)
