"""Torch reference ops of the issue-17 families: attention with sinks and a sliding window
(GPT-OSS, Mixtral), experts with biases and the clamped SwiGLU (GPT-OSS), group-limited sigmoid
routing (DeepSeek-V3). Registered by importing atom.ops.torch_ops (the torch backend).

Backends without these ops get the torch op on every device (the registry falls back to it).
"""
from __future__ import annotations

import torch

from atom.ops.metadata import AttentionMetadata, used_block_tables
from atom.ops.registry import register
from atom.ops import torch_ops
from atom.ops.torch_ops import _gather_kv, attention_decode, attention_prefill

B = "torch"


@register("sliding_sink_attention_prefill", B, "reads_whole_blocks")
def sliding_sink_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   meta: AttentionMetadata, scale: float, window: int | None,
                                   sinks: torch.Tensor | None) -> torch.Tensor:
    """paged_attention_prefill where query position p sees keys (p - window, p] only (window None:
    all of [0, p]) and each head h adds sinks[h] as a logit without a value (None: no sinks).

    q: [T, Hq, D]; caches [num_blocks, block_size, Hk, D]; sinks [Hq] (float32 maths)."""
    return attention_prefill(q, k_cache, v_cache, meta, scale, window, sinks)


@register("sliding_sink_attention_decode", B, "reads_whole_blocks")
def sliding_sink_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  meta: AttentionMetadata, scale: float, window: int | None,
                                  sinks: torch.Tensor | None) -> torch.Tensor:
    """paged_attention_decode (one new token per sequence, q [B, Hq, D]) with the window and the
    sinks of sliding_sink_attention_prefill."""
    return attention_decode(q, k_cache, v_cache, meta, scale, window, sinks)


@register("clamped_swiglu", B)
def clamped_swiglu(x: torch.Tensor, limit: float | None, alpha: float) -> torch.Tensor:
    """GPT-OSS's expert activation on gate|up halves of x [..., 2I]: gate clamped above at limit,
    up clamped to [-limit, limit] (None: no clamp), then (up + 1) * gate * sigmoid(alpha * gate)."""
    gate, up = x.float().chunk(2, dim=-1)
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return ((up + 1) * gate * torch.sigmoid(gate * alpha)).to(x.dtype)


@register("fused_moe_biased", B, "skips_negative_ids")
def fused_moe_biased(x: torch.Tensor, w13: torch.Tensor, b13: torch.Tensor, w2: torch.Tensor,
                     b2: torch.Tensor | None, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     limit: float | None, alpha: float) -> torch.Tensor:
    """Sum over the chosen experts of weight * (down(clamped_swiglu(gate_up(x) + b13)) + b2).

    x: [T, H]; w13: [E, 2I, H] (gate rows then up rows), b13: [E, 2I]; w2: [E, H, I], b2: [E, H]
    (None: no down bias, e.g. on the ranks that do not add it under tensor parallelism). An id
    of -1 is skipped (expert parallelism)."""
    def expert(e: int, h: torch.Tensor) -> torch.Tensor:
        y = clamped_swiglu(h @ w13[e].t() + b13[e], limit, alpha) @ w2[e].t()
        return y if b2 is None else y + b2[e]
    return torch_ops.expert_sum(x, w2.shape[1], topk_weights, topk_ids, expert)




@register("router_linear", B, "graph_safe")
def router_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits in float32: x [T, H] @ weight [E, H].T with both widened to float32 first, as
    HF's DeepSeek-V3 router computes them (its expert choice follows these bits)."""
    return torch.nn.functional.linear(x.float(), weight.float())


@register("moe_route_grouped", B, "graph_safe")  # no host sync: sizes never depend on values
def moe_route_grouped(router_logits: torch.Tensor, correction_bias: torch.Tensor, top_k: int, num_groups: int,
                      topk_groups: int, renormalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 `noaux_tc` routing: sigmoid scores; experts are chosen by score + correction
    bias within the `topk_groups` groups (of `num_groups` equal groups) whose two best biased
    scores sum highest; weights are the chosen unbiased scores (renormalised if asked) times
    `scaling`. Returns (weights [T, k] float32, ids [T, k] int64)."""
    scores = router_logits.float().sigmoid()
    biased = scores + correction_bias.float()
    t, e = biased.shape
    if num_groups > 1:
        per_group = biased.view(t, num_groups, e // num_groups)
        group_scores = per_group.topk(min(2, e // num_groups), dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_groups, dim=-1).indices, True)
        keep = keep[:, :, None].expand(t, num_groups, e // num_groups).reshape(t, e)
        biased = biased.masked_fill(~keep, float("-inf"))
    ids = biased.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


# ---- multi-head latent attention (DeepSeek-V3) ------------------------------------------------

@register("mla_cache_write", B)
def mla_cache_write(latent: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """latent [T, L] | k_pe [T, R] (roped) into kv_cache [num_blocks, block_size, 1, L + R] at
    slot_mapping (-1 = skip): the compressed KV of MLA, one row per token for all heads."""
    keep = slot_mapping >= 0
    row = torch.cat((latent, k_pe), dim=-1)[keep].to(kv_cache.dtype)
    kv_cache.view(-1, kv_cache.shape[-1])[slot_mapping[keep]] = row


@register("mla_attention_prefill", B, "reads_whole_blocks")
def mla_attention_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                          w_kv_b: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal MLA of each sequence's new tokens over its cached latents, latents expanded to
    per-head K/V: k = [latent @ W_uk_h, k_pe], v = latent @ W_uv_h.

    q_nope [T, H, N], q_pe [T, H, R]; kv_cache [num_blocks, block_size, 1, L + R]; w_kv_b
    [H * (N + V), L] (kv_b_proj's weight, this rank's heads). Returns [T, H, V]."""
    heads, nope, rope = q_nope.shape[1], q_nope.shape[2], q_pe.shape[2]
    v_dim = w_kv_b.shape[0] // heads - nope
    lat_dim = kv_cache.shape[-1] - rope
    out = q_nope.new_empty(q_nope.shape[0], heads, v_dim)
    starts, lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
    w = w_kv_b.float().view(heads, nope + v_dim, lat_dim)
    for b, ctx in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        if e == s:
            continue
        kv = _gather_kv(kv_cache, meta.block_tables[b], ctx)[:, 0].float()
        latent, k_pe = kv[:, :lat_dim], kv[:, lat_dim:]
        k_nope = torch.einsum("kl,hnl->khn", latent, w[:, :nope])
        v = torch.einsum("kl,hvl->khv", latent, w[:, nope:])
        scores = (torch.einsum("qhn,khn->hqk", q_nope[s:e].float(), k_nope)
                  + torch.einsum("qhr,kr->hqk", q_pe[s:e].float(), k_pe)) * scale
        q_pos = torch.arange(ctx - (e - s), ctx, device=q_nope.device)
        scores.masked_fill_(torch.arange(ctx, device=q_nope.device)[None, None, :] > q_pos[None, :, None],
                            float("-inf"))
        out[s:e] = torch.einsum("hqk,khv->qhv", scores.softmax(-1), v).to(out.dtype)
    return out


@register("mla_absorb_query", B, "graph_safe")
def mla_absorb_query(q_nope: torch.Tensor, w_kv_b: torch.Tensor) -> torch.Tensor:
    """The decode query in latent space: q_nope [T, H, N] -> q_nope W_uk [T, H, L] (W_uk: the
    first N rows of each head's block of kv_b_proj's weight w_kv_b [H * (N + V), L])."""
    heads, nope = q_nope.shape[1], q_nope.shape[2]
    w = w_kv_b.view(heads, -1, w_kv_b.shape[-1])
    return torch.einsum("thn,hnl->thl", q_nope, w[:, :nope])


@register("mla_expand_output", B, "graph_safe")
def mla_expand_output(out_latent: torch.Tensor, w_kv_b: torch.Tensor, nope: int) -> torch.Tensor:
    """mla_attention_decode's output [T, H, L] to per-head values [T, H, V] with W_uv (the rows
    after the first `nope` of each head's block of w_kv_b)."""
    t, heads = out_latent.shape[:2]
    w = w_kv_b.view(heads, -1, w_kv_b.shape[-1])[:, nope:]
    # written per head into [T, H, V] rows (a strided batched GEMM), so that the caller's
    # [T, H * V] view for o_proj needs no copy (einsum returned a [H, T, V] permutation)
    out = out_latent.new_empty(t, heads, w.shape[1])
    torch.bmm(out_latent.transpose(0, 1), w.transpose(1, 2), out=out.transpose(0, 1))
    return out


@register("mla_attention_decode", B, "reads_whole_blocks")
def mla_attention_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                         meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """MLA decode in the absorbed form: attention straight over the cached latents.

    q_latent [B, H, L] = q_nope @ W_uk (the key up-projection folded into the query), q_pe
    [B, H, R]; scores = q_latent . latent + q_pe . k_pe; returns softmax . latent [B, H, L]
    (the caller applies W_uv)."""
    _, block_size, _, width_lr = kv_cache.shape
    tables = used_block_tables(meta, block_size)
    batch, width = tables.shape
    lat_dim = q_latent.shape[-1]
    kv = kv_cache[tables].reshape(batch, width * block_size, width_lr).float()
    latent, k_pe = kv[..., :lat_dim], kv[..., lat_dim:]
    scores = (torch.einsum("bhl,bkl->bhk", q_latent.float(), latent)
              + torch.einsum("bhr,bkr->bhk", q_pe.float(), k_pe)) * scale
    valid = torch.arange(width * block_size, device=q_latent.device)[None, :] < meta.seq_lens[:, None]
    scores.masked_fill_(~valid[:, None, :], float("-inf"))
    return torch.einsum("bhk,bkl->bhl", scores.softmax(-1), latent).to(q_latent.dtype)
