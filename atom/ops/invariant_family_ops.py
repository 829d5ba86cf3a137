"""Batch-invariant CPU ops of the families with their own attention or experts (backend
"invariant", see atom/ops/invariant_ops.py): GPT-OSS (sinks, sliding window, biased experts),
Mixtral / Qwen3 with a sliding window, DeepSeek-V3 (multi-head latent attention, grouped routing).

Taken from the torch reference as it is: `mla_cache_write` (one cache row per token).

Rewritten here:

* `clamped_swiglu`, `moe_route_grouped`: row by row. Their sigmoid runs over a contiguous
  [T, width] tensor, which torch treats as one flat loop: vectorised in chunks, the remainder in
  scalar code with other bits (measured: grouped routing of 8 experts gives a row other bits at
  T = 11, 17, 18, 19 than at T = 20). One call per row gives every row the same loop.
* `sliding_sink_attention_*`: every query token attends over exactly the keys its window lets it
  see, with the sinks as one extra logit per head, the same ops in prefill and in decode (the
  reference masks a chunk-wide or padded score matrix, whose reduction length follows the batch).
* `fused_moe_biased`: the experts' GEMMs on at least 4 rows (CPU BLAS: 1-3 rows differ).
* MLA: the reference expands the latents to per-head K/V in prefill and attends in latent space
  (the absorbed form) in decode: equal maths, different bits. Here every token takes the absorbed
  form: q_nope W_uk per head on >= 4 rows (`mla_absorb_query`), its own context of latents
  (`_attend_latent`), W_uv per head on >= 4 rows (`mla_expand_output`), in prefill as in decode,
  so a decode token's logprob equals what a prompt-logprob prefill reports.
"""
from __future__ import annotations

import torch

from atom.ops import torch_family_ops, torch_ops
from atom.ops.invariant_ops import B, linear
from atom.ops.metadata import AttentionMetadata
from atom.ops.registry import register


def _gather_positions(cache: torch.Tensor, block_table: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Cache rows of absolute positions [lo, hi) (a sliding layer's table may hold stale entries
    before its window: only the blocks of the range are read)."""
    block_size = cache.shape[1]
    first, last = lo // block_size, (hi - 1) // block_size
    rows = cache[block_table[first:last + 1]].reshape(-1, *cache.shape[2:])
    return rows[lo - first * block_size: hi - first * block_size]


def _attend_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       sinks: torch.Tensor | None) -> torch.Tensor:
    """One query token q [Hq, D] over k, v [L, Hk, D] (L >= 1), sinks [Hq] as extra logits."""
    group = q.shape[0] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = (q.float()[None] * k).sum(-1) * scale          # [L, Hq]
    if sinks is not None:
        scores = torch.cat((scores, sinks.float()[None]))
    probs = scores.softmax(0)[: k.shape[0]]
    return (probs[..., None] * v).sum(0).to(q.dtype)        # [Hq, D]


def _sliding_each_token(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                        scale: float, window: int | None, sinks: torch.Tensor | None) -> torch.Tensor:
    out = torch.zeros_like(q)  # a padded row (no context) stays zero
    starts, lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
    for b, ctx in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        for i in range(e - s):
            p = ctx - (e - s) + i  # the token's position: it sees keys (p - window, p]
            if p < 0:
                continue
            lo = 0 if window is None else max(0, p - window + 1)
            k = _gather_positions(k_cache, meta.block_tables[b], lo, p + 1)
            v = _gather_positions(v_cache, meta.block_tables[b], lo, p + 1)
            out[s + i] = _attend_with_sinks(q[s + i], k, v, scale, sinks)
    return out


@register("sliding_sink_attention_prefill", B, "reads_whole_blocks")
def sliding_sink_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   meta: AttentionMetadata, scale: float, window: int | None,
                                   sinks: torch.Tensor | None) -> torch.Tensor:
    return _sliding_each_token(q, k_cache, v_cache, meta, scale, window, sinks)


@register("sliding_sink_attention_decode", B, "reads_whole_blocks")
def sliding_sink_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  meta: AttentionMetadata, scale: float, window: int | None,
                                  sinks: torch.Tensor | None) -> torch.Tensor:
    return _sliding_each_token(q, k_cache, v_cache, meta, scale, window, sinks)


def _row_by_row(fn, x: torch.Tensor, *args):
    """fn on each row of x alone (as a [1, ...] batch), the results concatenated (tuples too)."""
    if x.shape[0] <= 1:
        return fn(x, *args)
    rows = [fn(x[i:i + 1], *args) for i in range(x.shape[0])]
    if isinstance(rows[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*rows))
    return torch.cat(rows)


@register("clamped_swiglu", B)
def clamped_swiglu(x: torch.Tensor, limit: float | None, alpha: float) -> torch.Tensor:
    return _row_by_row(torch_family_ops.clamped_swiglu, x.reshape(-1, x.shape[-1]), limit, alpha).reshape(
        *x.shape[:-1], x.shape[-1] // 2)


@register("router_linear", B)
def router_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return linear(x.float(), weight.float())


@register("moe_route_grouped", B)
def moe_route_grouped(router_logits: torch.Tensor, correction_bias: torch.Tensor, top_k: int, num_groups: int,
                      topk_groups: int, renormalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _row_by_row(torch_family_ops.moe_route_grouped, router_logits, correction_bias, top_k, num_groups,
                       topk_groups, renormalize, scaling)


@register("fused_moe_biased", B, "skips_negative_ids")
def fused_moe_biased(x: torch.Tensor, w13: torch.Tensor, b13: torch.Tensor, w2: torch.Tensor,
                     b2: torch.Tensor | None, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     limit: float | None, alpha: float) -> torch.Tensor:
    """torch_family_ops.fused_moe_biased with each expert's GEMMs on at least 4 rows."""
    def expert(e: int, h: torch.Tensor) -> torch.Tensor:
        y = linear(clamped_swiglu(linear(h, w13[e]) + b13[e], limit, alpha), w2[e])
        return y if b2 is None else y + b2[e]
    return torch_ops.expert_sum(x, w2.shape[1], topk_weights, topk_ids, expert)


def _kv_b(w_kv_b: torch.Tensor, heads: int, nope: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj's weight [H * (N + V), L] as per-head W_uk [H, N, L] and W_uv [H, V, L]."""
    w = w_kv_b.view(heads, -1, w_kv_b.shape[-1])
    return w[:, :nope], w[:, nope:]


@register("mla_absorb_query", B)
def mla_absorb_query(q_nope: torch.Tensor, w_kv_b: torch.Tensor) -> torch.Tensor:
    """q_nope [T, H, N] -> q_nope W_uk [T, H, L], head by head on >= 4 rows."""
    w_uk, _ = _kv_b(w_kv_b, q_nope.shape[1], q_nope.shape[2])
    return torch.stack([linear(q_nope[:, h], w_uk[h].t().contiguous()) for h in range(q_nope.shape[1])], dim=1)


@register("mla_expand_output", B)
def mla_expand_output(out_latent: torch.Tensor, w_kv_b: torch.Tensor, nope: int) -> torch.Tensor:
    """out_latent [T, H, L] -> out_latent W_uv^T [T, H, V], head by head on >= 4 rows."""
    _, w_uv = _kv_b(w_kv_b, out_latent.shape[1], nope)
    return torch.stack([linear(out_latent[:, h], w_uv[h]) for h in range(out_latent.shape[1])], dim=1)


def _attend_latent(q_latent: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, scale: float) -> torch.Tensor:
    """One token's absorbed MLA: q_latent [H, L], q_pe [H, R] over its context kv [n, L + R]."""
    lat_dim = q_latent.shape[-1]
    kv = kv.float()
    latent, k_pe = kv[:, None, :lat_dim], kv[:, None, lat_dim:]
    scores = ((q_latent.float()[None] * latent).sum(-1) + (q_pe.float()[None] * k_pe).sum(-1)) * scale  # [n, H]
    probs = scores.softmax(0)
    return (probs[..., None] * latent).sum(0).to(q_latent.dtype)  # [H, L]


def _latent_each_token(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                       meta: AttentionMetadata, scale: float) -> torch.Tensor:
    out = torch.zeros_like(q_latent)  # a padded row (no context) stays zero
    starts, lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
    for b, ctx in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        if e == s or ctx == 0:
            continue
        kv = torch_ops._gather_kv(kv_cache, meta.block_tables[b], ctx)[:, 0]
        first = ctx - (e - s)
        for i in range(e - s):
            out[s + i] = _attend_latent(q_latent[s + i], q_pe[s + i], kv[: first + i + 1], scale)
    return out


@register("mla_attention_prefill", B, "reads_whole_blocks")
def mla_attention_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                          w_kv_b: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The reference's semantics in the absorbed form decode uses (module doc)."""
    q_latent = mla_absorb_query(q_nope, w_kv_b)
    out_latent = _latent_each_token(q_latent, q_pe, kv_cache, meta, scale)
    return mla_expand_output(out_latent, w_kv_b, q_nope.shape[2])


@register("mla_attention_decode", B, "reads_whole_blocks")
def mla_attention_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                         meta: AttentionMetadata, scale: float) -> torch.Tensor:
    return _latent_each_token(q_latent, q_pe, kv_cache, meta, scale)


FAMILY_INVARIANT_OPS = ("sliding_sink_attention_prefill", "sliding_sink_attention_decode", "clamped_swiglu",
                        "router_linear", "moe_route_grouped", "fused_moe_biased", "mla_absorb_query", "mla_expand_output",
                        "mla_attention_prefill", "mla_attention_decode")

# One cache row per token: the reference as it is.
register("mla_cache_write", B)(torch_family_ops.mla_cache_write)
