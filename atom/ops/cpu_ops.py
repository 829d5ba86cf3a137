"""The CPU backend: the hot ops of a CPU engine in faster formulations than the torch reference.

The registry prefers it on CPU (("cpu", "torch")); ops it does not register come from the
reference. Every op here is tested against its torch reference on random inputs
(tests/test_cpu_ops.py), as the GPU backends are.

Dense layers: oneDNN with each weight packed once into its blocked layout
(`mkldnn._reorder_linear_weight`). The plain `F.linear` reads the [N, K] weight as it is stored
on every call; the packed copy streams through the cache in the order the kernel wants it, which
on the 2-core development machine (AVX-512, fp32, SmolLM2-135M) made a decode step's matmuls
~1.8x faster (BENCHMARKS.md, "CPU against HF generate"). The copy costs memory (one more copy of
every linear weight) and must never go stale: it is keyed on the weight's storage address and a
global epoch that `atom.ops.weights_changed()` advances. Every path that writes parameters in
place calls it (checkpoint load, dummy init, update_weights, the weights pool's sleep / wake).

Norms, SiLU-and-mul, the attention prologue and the KV write compute each row on its own (with
the one thread batch-invariant mode sets): they carry the "batch_invariant" capability.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from atom.ops import torch_ops
from atom.ops.logits_processing import check_penalty_state
from atom.ops.metadata import (AttentionMetadata, LogitsProcessing, SamplerOutput, SamplingMetadata,
                               used_block_tables)
from atom.ops.registry import on_weights_changed, register

B = "cpu"

_PACK_BATCH = 16   # the batch the packed layout is tuned for; any batch runs on it
_PACKED_ATTR = "_atom_cpu_packed"


class _PackedWeights:
    """oneDNN-packed copies of parameters, stored on the parameter itself (freed with it)."""

    def __init__(self) -> None:
        self.epoch = 0
        self.holders: dict[int, weakref.ref] = {}   # parameters holding a packed copy
        self.enabled = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

    def drop_all(self) -> None:
        self.epoch += 1
        for ref in list(self.holders.values()):
            param = ref()
            if param is not None and hasattr(param, _PACKED_ATTR):
                delattr(param, _PACKED_ATTR)
        self.holders.clear()

    def get(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The packed copy of a float32 parameter (made now if missing or stale), else None."""
        entry = getattr(weight, _PACKED_ATTR, None)
        if entry is not None and entry[0] == self.epoch and entry[1] == weight.data_ptr():
            return entry[2]
        if not self.enabled or weight.dtype != torch.float32 or not isinstance(weight, torch.nn.Parameter):
            return None
        epoch = self.epoch  # read before packing: a change meanwhile leaves this copy stale
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_BATCH)
        except RuntimeError:  # a build whose oneDNN cannot pack: plain F.linear from now on
            self.enabled = False
            return None
        setattr(weight, _PACKED_ATTR, (epoch, weight.data_ptr(), packed))
        ident = id(weight)
        self.holders[ident] = weakref.ref(weight, lambda _, ident=ident: self.holders.pop(ident, None))
        return packed


_PACKED = _PackedWeights()
on_weights_changed(_PACKED.drop_all)


@register("linear", B)
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias on the packed weight (a float32 parameter), else F.linear."""
    packed = _PACKED.get(weight) if x.dtype == torch.float32 and x.numel() else None
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise.default(x, packed, bias, "none", [], "")


@register("lm_head", B)
def lm_head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return linear(hidden, weight)


# ---- norms ---------------------------------------------------------------------------------

@register("rms_norm", B, "batch_invariant")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch's fused rms_norm in float32 (the reference's maths, bit for bit on float32)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return F.rms_norm(x.float(), weight.shape, weight.float(), eps).to(x.dtype)


@register("fused_add_rms_norm", B, "batch_invariant")
def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    summed = x + residual if x.dtype == torch.float32 else (x.float() + residual.float()).to(x.dtype)
    return rms_norm(summed, weight, eps), summed


@register("silu_and_mul", B, "batch_invariant")
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with one temporary (float32: the reference's bits)."""
    gate, up = x.chunk(2, dim=-1)
    if x.dtype != torch.float32:
        return F.silu(gate.float()).mul_(up.float()).to(x.dtype)
    return F.silu(gate).mul_(up)


# ---- attention prologue: q/k norms, RoPE on q and k at once, K/V into the cache -----------------

def _rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [T, H, D] (float32) with cos / sin [T, 1, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@register("qkv_prologue", B, "batch_invariant")
def qkv_prologue(qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                 q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float,
                 num_heads: int, num_kv_heads: int, head_dim: int, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """The reference's qkv_prologue with q and k rotated in one pass (when neither is normed) and
    the cache written with index_copy_."""
    t, d, hq, hk = qkv.shape[0], head_dim, num_heads, num_kv_heads
    cos, sin = cos_sin_cache.index_select(0, positions).float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    v = qkv[:, (hq + hk) * d:].reshape(t, hk, d)
    if q_norm_weight is None and k_norm_weight is None:
        qk = _rotate_neox(qkv[:, : (hq + hk) * d].reshape(t, hq + hk, d).float(), cos, sin).to(qkv.dtype)
        q, k = qk[:, :hq], qk[:, hq:]
    else:
        q, k = qkv[:, : hq * d].reshape(t, hq, d), qkv[:, hq * d: (hq + hk) * d].reshape(t, hk, d)
        if q_norm_weight is not None:
            q = rms_norm(q, q_norm_weight, eps)
        if k_norm_weight is not None:
            k = rms_norm(k, k_norm_weight, eps)
        q = _rotate_neox(q.float(), cos, sin).to(qkv.dtype)
        k = _rotate_neox(k.float(), cos, sin).to(qkv.dtype)
    kv_cache_write(k, v, k_cache, v_cache, slot_mapping)
    return q


@register("kv_cache_write", B, "batch_invariant")
def kv_cache_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hk, D] into caches [num_blocks, block_size, Hk, D] at slot_mapping (-1 = skip)."""
    slots = slot_mapping.long()  # index_copy_ takes int64 only (static decode buffers hold int32)
    if bool((slots < 0).any()):
        keep = slots >= 0
        k, v, slots = k[keep], v[keep], slots[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


# ---- paged attention: index_select the blocks, then torch's fused attention ------------------

@register("paged_attention_decode", B, "reads_whole_blocks")
def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One new token per sequence, q [B, Hq, D]: every sequence's blocks gathered with one
    index_select (advanced indexing is several times slower on CPU), then one
    scaled_dot_product_attention with each KV head's query group as its query rows."""
    _, block_size, kv_heads, dim = k_cache.shape
    tables = used_block_tables(meta, block_size)
    batch, width = tables.shape
    blocks = tables.reshape(-1)
    k = k_cache.index_select(0, blocks).view(batch, width * block_size, kv_heads, dim).transpose(1, 2)
    v = v_cache.index_select(0, blocks).view(batch, width * block_size, kv_heads, dim).transpose(1, 2)
    valid = torch.arange(width * block_size, device=q.device)[None, :] < meta.seq_lens[:, None]
    qg = q.reshape(batch, kv_heads, q.shape[1] // kv_heads, dim)
    out = F.scaled_dot_product_attention(qg.float(), k.float(), v.float(), attn_mask=valid[:, None, None, :],
                                         scale=scale)
    return out.reshape(q.shape).to(q.dtype)


@register("paged_attention_prefill", B, "reads_whole_blocks")
def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached prefix and themselves (the
    new tokens of sequence b are the last of its seq_lens[b] positions): per sequence, its
    blocks by index_select and one scaled_dot_product_attention."""
    out = torch.empty_like(q)
    starts, lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
    _, block_size, kv_heads, dim = k_cache.shape
    for b, ctx in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        if e == s:
            continue
        blocks = meta.block_tables[b, : -(-ctx // block_size)]
        k = k_cache.index_select(0, blocks).view(-1, kv_heads, dim)[:ctx].transpose(0, 1).float()
        v = v_cache.index_select(0, blocks).view(-1, kv_heads, dim)[:ctx].transpose(0, 1).float()
        qb = q[s:e].transpose(0, 1).float()  # [Hq, n, D]
        if ctx == e - s:  # no cached prefix: plain causal
            o = F.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            q_pos = torch.arange(ctx - (e - s), ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[s:e] = o.transpose(0, 1).to(q.dtype)
    return out


# ---- sampling ---------------------------------------------------------------------------------

@register("sample", B)
def sample(logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
    """The reference sampler with the penalties computed where they apply (apply_penalties_sparse)."""
    return torch_ops.sample(logits, meta, penalize=apply_penalties_sparse)


def apply_penalties_sparse(logits: torch.Tensor, proc: LogitsProcessing) -> torch.Tensor:
    """logits_processing.apply_penalties evaluated only at the (row, token) pairs a penalty
    touches (the row's prompt and generated tokens: a few hundred of the vocabulary), found by
    scanning the counts and the prompt bits a 64-bit word at a time. The reference makes ~14
    float passes over [B, V]; this one copies the logits and scans the state's rows once. The
    same numbers: the reference's untouched entries are x - 0 * c - 0 * p = x (only a -0.0 logit
    may come back there as +0.0, which compares equal)."""
    check_penalty_state(logits, proc)
    out = logits.clone(memory_format=torch.contiguous_format)
    rows = (proc.penalty_slots >= 0).nonzero().squeeze(1)
    if not len(rows):
        return out
    slots = proc.penalty_slots.long()[rows]
    counts = proc.token_counts.index_select(0, slots)
    width = counts.shape[1]
    at = _nonzero_flat(counts)  # generated tokens: row * width + token
    if proc.any_repetition:  # and the prompt's: the set bits of the non-zero bytes
        packed = proc.prompt_mask.index_select(0, slots)
        byte_at = _nonzero_flat(packed)
        bits = (packed.view(-1)[byte_at][:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
        k, bit = bits.nonzero(as_tuple=True)
        row, byte = byte_at[k] // packed.shape[1], byte_at[k] % packed.shape[1]
        at = torch.cat([at, row * width + byte * 8 + bit]).unique()
    r, t = at // width, at % width
    flat = rows[r] * out.shape[1] + t
    x, c = out.view(-1)[flat], counts.view(-1)[at].float()
    if proc.any_repetition:
        rep = proc.repetition[rows][r]
        x = torch.where(x > 0, x / rep, x * rep)
    if proc.any_counted:
        x = x - proc.frequency[rows][r] * c - proc.presence[rows][r] * (c > 0).float()
    out.view(-1)[flat] = x
    return out


def _nonzero_flat(t: torch.Tensor) -> torch.Tensor:
    """Flat indices of the non-zero entries of a contiguous [R, W] integer tensor whose rows are
    whole 64-bit words: nonzero over the words, then over the few entries of those words."""
    per = 8 // t.element_size()
    words = t.view(torch.int64).view(-1).nonzero().squeeze(1)
    at = (words[:, None] * per + torch.arange(per)).view(-1)
    return at[t.view(-1)[at] != 0]
