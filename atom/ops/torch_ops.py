"""Reference implementations of every op in plain torch: the CPU backend and the oracle for kernels.

Clarity over speed: loops over sequences and experts are fine here.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from atom.ops.logits_processing import log_softmax, process_logits, report_source, token_ranks, top_count
from atom.ops.metadata import AttentionMetadata, SamplerOutput, SamplingMetadata, used_block_tables
from atom.ops.registry import register

B = "torch"


@register("rms_norm", B)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


@register("fused_add_rms_norm", B)
def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    summed = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(summed, weight, eps), summed


@register("rotary_embedding", B)
def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (rotate-half) RoPE. q: [T, Hq, D], k: [T, Hk, D]; cache: [max_pos, D] = cos | sin.
    interleaved: q and k hold pairs (x0, x1), (x2, x3), ... as DeepSeek's checkpoints do; they are
    de-interleaved into (evens | odds) first, as HF does, and the result stays in that layout."""
    if interleaved:
        q = torch.cat((q[..., 0::2], q[..., 1::2]), dim=-1)
        k = torch.cat((k[..., 0::2], k[..., 1::2]), dim=-1)
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


@register("kv_cache_write", B)
def kv_cache_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hk, D] into caches [num_blocks, block_size, Hk, D] at slot_mapping (-1 = skip)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


@register("qkv_prologue", B)
def qkv_prologue(qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                 q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float,
                 num_heads: int, num_kv_heads: int, head_dim: int, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """The attention prologue after the qkv GEMM; returns q [T, Hq, D] and writes K/V into the cache.

    qkv: [T, (Hq + 2 Hk) * D] = q | k | v heads. Per head, in this order: rms_norm of q and of k
    over D (only those whose weight is given; Qwen3), neox RoPE at positions (cos|sin cache
    [max_pos, D]), then k and v go to k_cache / v_cache [num_blocks, block_size, Hk, D] at
    slot_mapping (-1 = skip). Each step rounds to the activation dtype as the separate ops do.
    """
    t, d = qkv.shape[0], head_dim
    q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], -1)
    q, k, v = q.reshape(t, num_heads, d), k.reshape(t, num_kv_heads, d), v.reshape(t, num_kv_heads, d)
    if q_norm_weight is not None:
        q = rms_norm(q, q_norm_weight, eps)
    if k_norm_weight is not None:
        k = rms_norm(k, k_norm_weight, eps)
    q, k = rotary_embedding(positions, q, k, cos_sin_cache)
    kv_cache_write(k, v, k_cache, v_cache, slot_mapping)
    return q


def _gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    block_size = cache.shape[1]
    blocks = block_table[: (length + block_size - 1) // block_size]
    return cache[blocks].reshape(-1, *cache.shape[2:])[:length]


def softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """softmax over the last dim of scores [H, ..., K], with one extra per-head logit (the sink)
    in the denominator that attends to nothing (GPT-OSS); no sinks: a plain softmax."""
    if sinks is None:
        return scores.softmax(-1)
    sink = sinks.float().reshape(-1, *([1] * (scores.dim() - 1))).expand(*scores.shape[:-1], 1)
    return torch.cat((scores, sink), dim=-1).softmax(-1)[..., :-1]


def attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                      scale: float, window: int | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached prefix and themselves
    (float32 maths). q: [T, Hq, D]; the new tokens of sequence b sit at the end of its seq_lens[b]
    KV positions. window: query position p sees keys (p - window, p] only; sinks [Hq]: one logit
    per head without a value (softmax_with_sinks)."""
    out = torch.empty_like(q)
    starts, lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
    group = q.shape[1] // k_cache.shape[2]
    for b, ctx in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        if e == s:
            continue
        k = _gather_kv(k_cache, meta.block_tables[b], ctx).float().repeat_interleave(group, dim=1)
        v = _gather_kv(v_cache, meta.block_tables[b], ctx).float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), k) * scale
        q_pos = torch.arange(ctx - (e - s), ctx, device=q.device)[:, None]
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        hidden = k_pos > q_pos
        if window is not None:
            hidden |= k_pos <= q_pos - window
        scores.masked_fill_(hidden[None], float("-inf"))
        out[s:e] = torch.einsum("hqk,khd->qhd", softmax_with_sinks(scores, sinks), v).to(q.dtype)
    return out


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float, window: int | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per sequence: q [B, Hq, D]; all sequences at once over padded block tables;
    window and sinks as in attention_prefill."""
    _, block_size, kv_heads, dim = k_cache.shape
    tables = used_block_tables(meta, block_size)
    batch, width = tables.shape
    k = k_cache[tables].reshape(batch, width * block_size, kv_heads, dim).float()
    v = v_cache[tables].reshape(batch, width * block_size, kv_heads, dim).float()
    qg = q.float().reshape(batch, kv_heads, q.shape[1] // kv_heads, dim)
    scores = torch.einsum("bhgd,bkhd->bhgk", qg, k) * scale
    k_pos = torch.arange(width * block_size, device=q.device)[None, :]
    valid = k_pos < meta.seq_lens[:, None]
    if window is not None:
        valid &= k_pos >= meta.seq_lens[:, None] - window
    scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    if sinks is None:
        probs = scores.softmax(-1)
    else:  # heads first for the sinks: [Hk, G, B, K] so that sinks [Hq] = [Hk * G] line up
        probs = softmax_with_sinks(scores.permute(1, 2, 0, 3).reshape(q.shape[1], batch, -1), sinks)
        probs = probs.reshape(kv_heads, -1, batch, probs.shape[-1]).permute(2, 0, 1, 3)
    out = torch.einsum("bhgk,bkhd->bhgd", probs, v)
    return out.reshape(q.shape).to(q.dtype)


@register("cascade_group_rows", B)
def cascade_group_rows(decode_op: str, heads_per_kv: int) -> int:
    """How many sequences of one shared prompt the decode runner stacks into a shared-prefix group
    (CascadeMetadata.group_rows' width) for decode attention op `decode_op`: the backend's answer
    for its kernels. Here: up to 64 query rows per KV head (n rows x heads_per_kv), 2 to 16."""
    return max(2, min(16, 64 // max(1, heads_per_kv)))


@register("paged_attention_prefill", B, "reads_whole_blocks")
def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached prefix and themselves."""
    return attention_prefill(q, k_cache, v_cache, meta, scale)


@register("paged_attention_decode", B, "reads_whole_blocks")
def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One new token per sequence: q [B, Hq, D]; all sequences at once over padded block tables."""
    return attention_decode(q, k_cache, v_cache, meta, scale)


@register("linear", B)
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias; x [..., K], weight [N, K] (a dense layer)."""
    return F.linear(x, weight, bias)


@register("lm_head", B)
def lm_head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits of the rows that need them: hidden [T, H] @ weight [V, H].T (every backend uses this
    one but the batch-invariant one: it is a single large GEMM)."""
    return F.linear(hidden, weight)


@register("silu_and_mul", B)
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate.float()).mul(up.float()).to(x.dtype)


@register("moe_route", B)
def moe_route(router_logits: torch.Tensor, top_k: int,
              renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing: returns (weights [T, k] float32, expert ids [T, k] int64)."""
    probs = router_logits.float().softmax(dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


@register("fused_moe", B, "skips_negative_ids")
def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """Sum over the chosen experts of weight * down(silu(gate(x)) * up(x)).

    x: [T, H]; w13: [E, 2I, H] (gate rows then up rows); w2: [E, H, I]. An id of -1 is skipped
    (expert parallelism: an expert another rank holds): the "skips_negative_ids" capability.
    """
    return expert_sum(x, w2.shape[1], topk_weights, topk_ids,
                      lambda e, h: silu_and_mul(h @ w13[e].t()) @ w2[e].t())


def expert_sum(x: torch.Tensor, out_dim: int, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
               expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Sum over each token's chosen experts of weight * expert(e, its rows of x), accumulated in
    float32 expert by expert (ascending ids: a token's order never depends on the batch); -1 skipped."""
    out = torch.zeros(x.shape[0], out_dim, dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)
    token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(topk_ids.shape[1])
    weight_of = topk_weights.reshape(-1).float()
    for e in flat_ids.unique().tolist():
        if e < 0:
            continue
        sel = (flat_ids == e).nonzero(as_tuple=True)[0]
        tokens = token_of[sel]
        out.index_add_(0, tokens, expert(e, x[tokens]).float() * weight_of[sel, None])
    return out.to(x.dtype)


@register("moe_forward", B)
def moe_forward(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                top_k: int, renormalize: bool) -> torch.Tensor:
    """Routing + experts in one op (no expert parallelism): fused_moe(x, w13, w2, *moe_route(...))."""
    return fused_moe(x, w13, w2, *moe_route(router_logits, top_k, renormalize))


# ---- sampling -------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser on int64 tensors holding 32-bit values (products wrap; the mask keeps 32 bits)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def row_keys(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """A 32-bit key per row from a 63-bit seed and a counter (a position in the request's stream)."""
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    return _fmix32(_fmix32(lo ^ _fmix32(hi + 0x9E3779B9)) ^ _fmix32((counters & _M32) + 0x7F4A7C15))


def uniform_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, V] float32 uniforms in (0, 1): (23 random bits + 0.5) * 2^-23, exact in float32, so never
    0 or 1 (with 24 bits the top value rounds to 1.0, whose Gumbel noise is +inf: that token would
    win whatever its probability)."""
    keys = row_keys(seeds, counters)
    idx = _fmix32(torch.arange(vocab, device=seeds.device, dtype=torch.int64) * 0x2545F491 & _M32)
    bits = _fmix32(keys[:, None] ^ idx[None, :]) >> 9
    return (bits.float() + 0.5) * (1.0 / (1 << 23))


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf what min_p, then top_k, then top_p (over what is left) exclude; never the best token."""
    probs = logits.softmax(-1)
    logits = logits.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), float("-inf"))
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    sorted_probs = sorted_logits.softmax(-1)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    # Rows with top_p = 1 skip the mask: their rounded cumulative sum may pass 1 in the tail.
    nucleus = (mass_before > top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(nucleus, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


@register("sample", B)
def sample(logits: torch.Tensor, meta: SamplingMetadata, penalize: Callable | None = None) -> SamplerOutput:
    """Greedy or seeded Gumbel-max sampling for every row at once, with logprobs.

    Processed logprobs come from the distribution the token is drawn from (logits processing,
    temperature, then the filters, renormalised); greedy rows use temperature 1 for them.
    penalize: another backend's form of logits_processing.apply_penalties (the reference by default).
    """
    raw = logits.float()
    logits = process_logits(raw, meta, penalize)
    temperature = torch.where(meta.temperature > 0, meta.temperature, torch.ones_like(meta.temperature))
    scaled = logits / temperature[:, None]
    if meta.need_filter:
        scaled = filter_logits(scaled, meta.top_k, meta.top_p, meta.min_p)
    processed = log_softmax(scaled)
    token_ids = scaled.argmax(-1)
    if not meta.all_greedy:
        gumbel = -torch.log(-torch.log(uniform_noise(meta.seeds, meta.counters, logits.shape[-1])))
        sampled = (processed + gumbel).argmax(-1)
        token_ids = torch.where(meta.temperature > 0, sampled, token_ids)
    source = processed if not (meta.any_raw or meta.any_logits) else report_source(raw, scaled, processed, meta)
    token_logprobs = source.gather(-1, token_ids[:, None]).squeeze(-1)
    top_logprobs, top_ids = source.topk(top_count(meta, logits.shape[-1]), dim=-1)
    ranks = token_ranks(raw, scaled, token_ids, meta) if meta.want_ranks else None
    return SamplerOutput(token_ids, token_logprobs, top_ids, top_logprobs, ranks)
