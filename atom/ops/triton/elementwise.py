"""Row-wise kernels: RMSNorm (with fused residual add), SiLU-and-mul, RoPE, KV-cache write, and the
attention prologue (q/k RMSNorm + RoPE + KV-cache write in one kernel).

Each matches its torch reference in atom/ops/torch_ops.py: float32 maths, one rounding to the
output dtype, the same order of roundings where the reference rounds an intermediate.

Batch invariance: the norms, SiLU-and-mul, RoPE and the KV write run one program per row (or
token) with launch shapes from the model's sizes alone ("batch_invariant"); the prologue packs
more heads per program as the token count grows, which changes its q/k norm's reduction layout,
so the batch-invariant backend launches it with a fixed count (triton/invariant.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops.registry import register
from atom.ops.triton import INTERPRET
from atom.ops.triton import pdl
from atom.ops.triton.pdl import grid_dependency

B = "triton"


def _rows(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows, inner rows, outer stride, inner stride) of x viewed as rows of its last dim.

    Handles [T, N] and [T, H, N] with any strides on the leading dims (last dim contiguous).
    """
    if x.dim() == 2:
        return x.shape[0], 1, x.stride(0), 0
    if x.dim() == 3:
        return x.shape[0] * x.shape[1], x.shape[1], x.stride(0), x.stride(1)
    raise ValueError(f"expected a 2-D or 3-D tensor, got shape {tuple(x.shape)}")


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, rout_ptr, n_inner, sx0, sx1, sr0, N, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    grid_dependency(PDL)
    row = tl.program_id(0)
    xo = (row // n_inner).to(tl.int64) * sx0 + (row % n_inner).to(tl.int64) * sx1
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + xo + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(r_ptr + row.to(tl.int64) * sr0 + cols, mask=mask, other=0.0).to(tl.float32)
        # The reference rounds the sum to the activation dtype before normalising it.
        s = (x + r).to(rout_ptr.dtype.element_ty)
        tl.store(rout_ptr + row.to(tl.int64) * N + cols, s, mask=mask)
        x = s.to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(var + eps) * w
    tl.store(out_ptr + row.to(tl.int64) * N + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    n = x.shape[-1]
    rows, inner, s0, s1 = _rows(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
        rows, inner, s0, s1 = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rout = None
    if residual is not None:
        if residual.stride(-1) != 1 or residual.dim() != 2:
            residual = residual.reshape(-1, n).contiguous()
        rout = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out, rout
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows,)](
        x, residual if residual is not None else x, weight, out, rout if rout is not None else out,
        inner, s0, s1, residual.stride(0) if residual is not None else 0, n, eps,
        HAS_RES=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)), **pdl.options())
    return out, rout


@register("rms_norm", B, "batch_invariant")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm(x, None, weight, eps)[0]


@register("fused_add_rms_norm", B, "batch_invariant")
def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm(x, residual, weight, eps)


# ---- SiLU(gate) * up ----------------------------------------------------------------------

@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, I, sx, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    grid_dependency(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * sx + I + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * I + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@register("silu_and_mul", B, "batch_invariant")
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    inter = shape[-1] // 2
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](x2, out, inter, x2.stride(0), BLOCK=block,
                                                                    num_warps=4, **pdl.options())
    return out.reshape(*shape[:-1], inter)


# ---- RoPE (neox) ----------------------------------------------------------------------------

@triton.jit
def _rope_kernel(pos_ptr, q_ptr, k_ptr, cs_ptr, qo_ptr, ko_ptr, sq0, sq1, sk0, sk1, scs,
                 HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, INTERLEAVED: tl.constexpr, PDL: tl.constexpr = False):
    grid_dependency(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < HALF
    cos = tl.load(cs_ptr + pos * scs + d, mask=dm, other=0.0)[None, :]
    sin = tl.load(cs_ptr + pos * scs + HALF + d, mask=dm, other=0.0)[None, :]
    h = tl.arange(0, BLOCK_H)
    _rope_heads(q_ptr + t * sq0, sq1, qo_ptr + t * (HQ * 2 * HALF), h, HQ, d, dm, cos, sin, HALF, INTERLEAVED,
                BLOCK_D)
    _rope_heads(k_ptr + t * sk0, sk1, ko_ptr + t * (HK * 2 * HALF), h, HK, d, dm, cos, sin, HALF, INTERLEAVED,
                BLOCK_D)


@triton.jit
def _rope_heads(src, s_head, dst, h, H, d, dm, cos, sin, HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Neox RoPE of one token's H heads (src rows s_head apart) into contiguous dst rows; with
    INTERLEAVED the pairs are (x[2i], x[2i + 1]) and the output holds them as (evens | odds)."""
    m = (h < H)[:, None] & dm[None, :]
    if INTERLEAVED:  # one contiguous load of the pairs, split into evens and odds in registers
        c = tl.arange(0, 2 * BLOCK_D)
        x = tl.load(src + h[:, None] * s_head + c[None, :], mask=(h < H)[:, None] & (c < 2 * HALF)[None, :],
                    other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, [x.shape[0], BLOCK_D, 2]))
    else:
        base = src + h[:, None] * s_head + d[None, :]
        x1 = tl.load(base, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF, mask=m, other=0.0).to(tl.float32)
    ob = dst + h[:, None] * (2 * HALF) + d[None, :]
    tl.store(ob, (x1 * cos - x2 * sin).to(dst.dtype.element_ty), mask=m)
    tl.store(ob + HALF, (x2 * cos + x1 * sin).to(dst.dtype.element_ty), mask=m)


@register("rotary_embedding", B, "batch_invariant")
def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """torch_ops.rotary_embedding; interleaved pairs are read in place (no de-interleaving copy)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    t, hq, d = q.shape
    hk = k.shape[1]
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if t:
        cs = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
        _rope_kernel[(t,)](positions, q, k, cs, qo, ko, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                           cs.stride(0), HQ=hq, HK=hk, HALF=d // 2,
                           BLOCK_H=triton.next_power_of_2(max(hq, hk)), BLOCK_D=triton.next_power_of_2(d // 2),
                           INTERLEAVED=interleaved, num_warps=4, **pdl.options())
    return qo, ko


# ---- KV-cache write ---------------------------------------------------------------------------

@triton.jit
def _kv_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, sk0, sk1, sv0, sv1, sc_slot, sc_head,
                     HK: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        m = (h < HK)[:, None] & (d < D)[None, :]
        kv = tl.load(k_ptr + t * sk0 + h[:, None] * sk1 + d[None, :], mask=m)
        vv = tl.load(v_ptr + t * sv0 + h[:, None] * sv1 + d[None, :], mask=m)
        dst = slot * sc_slot + h[:, None] * sc_head + d[None, :]
        tl.store(kc_ptr + dst, kv.to(kc_ptr.dtype.element_ty), mask=m)
        tl.store(vc_ptr + dst, vv.to(vc_ptr.dtype.element_ty), mask=m)


@register("kv_cache_write", B, "batch_invariant")
def kv_cache_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    t, hk, d = k.shape
    if t == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    _kv_write_kernel[(t,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0),
                           v.stride(1), k_cache.stride(1), k_cache.stride(2), HK=hk, D=d,
                           BLOCK_H=triton.next_power_of_2(hk), BLOCK_D=triton.next_power_of_2(d), num_warps=4)


# ---- attention prologue: q/k RMSNorm + RoPE + KV-cache write, one kernel -----------------------

@triton.jit
def _scale_heads(x1, x2, rs, w_ptr, rows, d, dm, act, HALF: tl.constexpr):
    """The RMSNorm of the selected rows (halves x1 | x2, 1/rms in rs) times the weight, rounded to
    the activation dtype as the separate rms_norm kernel rounds; other rows unchanged."""
    w1 = tl.load(w_ptr + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + HALF + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    x1 = tl.where(rows[:, None], (x1 * rs * w1).to(act).to(tl.float32), x1)
    x2 = tl.where(rows[:, None], (x2 * rs * w2).to(act).to(tl.float32), x2)
    return x1, x2


@triton.jit
def _qkv_prologue_kernel(qkv_ptr, pos_ptr, cs_ptr, qw_ptr, kw_ptr, q_ptr, kc_ptr, vc_ptr, slot_ptr,
                         s_qkv, s_cs, page, skc0, skc1, skc2, svc0, svc1, svc2, eps,
                         HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                         Q_NORM: tl.constexpr, K_NORM: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (token t, block of BLOCK_H heads of the q | k | v heads of qkv's row t).

    Rows are handled as two halves [BLOCK_H, HALF] (x1 | x2), the shape RoPE wants. Roundings
    follow the separate kernels: norm -> activation dtype -> RoPE -> activation dtype -> cache dtype.
    """
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    dm = d < HALF
    is_q = h < HQ
    is_k = (h >= HQ) & (h < HQ + HK)
    is_v = (h >= HQ + HK) & (h < HQ + 2 * HK)
    m = (h < HQ + 2 * HK)[:, None] & dm[None, :]
    src = qkv_ptr + t * s_qkv + h[:, None] * D + d[None, :]
    xa1 = tl.load(src, mask=m, other=0.0)
    xa2 = tl.load(src + HALF, mask=m, other=0.0)
    x1 = xa1.to(tl.float32)
    x2 = xa2.to(tl.float32)
    act = qkv_ptr.dtype.element_ty
    if Q_NORM or K_NORM:
        var = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D
        rs = tl.rsqrt(var + eps)[:, None]
        if Q_NORM:
            x1, x2 = _scale_heads(x1, x2, rs, qw_ptr, is_q, d, dm, act, HALF)
        if K_NORM:
            x1, x2 = _scale_heads(x1, x2, rs, kw_ptr, is_k, d, dm, act, HALF)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cs_ptr + pos * s_cs + d, mask=dm, other=0.0)[None, :]
    sin = tl.load(cs_ptr + pos * s_cs + HALF + d, mask=dm, other=0.0)[None, :]
    y1 = (x1 * cos - x2 * sin).to(act)
    y2 = (x2 * cos + x1 * sin).to(act)
    # q: a new [T, HQ, D] tensor.
    qm = m & is_q[:, None]
    qdst = q_ptr + t * (HQ * D) + h[:, None] * D + d[None, :]
    tl.store(qdst, y1.to(q_ptr.dtype.element_ty), mask=qm)
    tl.store(qdst + HALF, y2.to(q_ptr.dtype.element_ty), mask=qm)
    # k and v: into the paged caches at this token's slot (-1: no write).
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // page
        off = slot % page
        km = m & is_k[:, None]
        kh = tl.where(is_k, h - HQ, 0).to(tl.int64)
        kdst = kc_ptr + blk * skc0 + off * skc1 + kh[:, None] * skc2 + d[None, :]
        tl.store(kdst, y1.to(kc_ptr.dtype.element_ty), mask=km)
        tl.store(kdst + HALF, y2.to(kc_ptr.dtype.element_ty), mask=km)
        vm = m & is_v[:, None]
        vh = tl.where(is_v, h - HQ - HK, 0).to(tl.int64)
        vdst = vc_ptr + blk * svc0 + off * svc1 + vh[:, None] * svc2 + d[None, :]
        tl.store(vdst, xa1.to(vc_ptr.dtype.element_ty), mask=vm)
        tl.store(vdst + HALF, xa2.to(vc_ptr.dtype.element_ty), mask=vm)


# Programs per launch above which heads are packed several to a program (tuning knob). H200, Qwen3-30B
# shapes (40 heads of 128), bf16, in a CUDA graph: T=1 one head per program 1.8 us (2 to 16: 2.2-2.9 us);
# T=64 1 head 3.7 us, 8 heads 2.8 us; T=512 1 head 14.4 us, 8 heads 5.8 us, 16 heads 5.4 us.
QKV_PROLOGUE_MAX_PROGRAMS = 512


def qkv_prologue_heads_per_program(tokens: int, heads: int) -> int:
    """1 head per program while that gives at most QKV_PROLOGUE_MAX_PROGRAMS programs, else 2, 4, 8, 16.

    In Triton's interpreter (CPU) a program costs the same whatever its size: one per token.
    """
    if INTERPRET:
        return triton.next_power_of_2(heads)
    bh = 1
    while bh < 16 and tokens * triton.cdiv(heads, bh) > QKV_PROLOGUE_MAX_PROGRAMS:
        bh *= 2
    return bh


def qkv_prologue_launch(qkv, positions, cos_sin_cache, q_norm_weight, k_norm_weight, eps, num_heads,
                        num_kv_heads, head_dim, k_cache, v_cache, slot_mapping,
                        heads_per_program: int | None = None) -> torch.Tensor:
    """The registered op with an optional explicit heads_per_program (tests and benchmarks)."""
    t, d = qkv.shape[0], head_dim
    heads = num_heads + 2 * num_kv_heads
    if qkv.shape[-1] != heads * d:
        raise ValueError(f"qkv has {qkv.shape[-1]} columns, expected ({num_heads} + 2 * {num_kv_heads}) * {d}")
    if d % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {d}")
    q = torch.empty(t, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    if t == 0:
        return q
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cs = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV caches' last dim must be contiguous")
    bh = heads_per_program or qkv_prologue_heads_per_program(t, heads)
    block_d = triton.next_power_of_2(d // 2)
    _qkv_prologue_kernel[(t, triton.cdiv(heads, bh))](
        qkv, positions, cs, q_norm_weight if q_norm_weight is not None else cs,
        k_norm_weight if k_norm_weight is not None else cs, q, k_cache, v_cache, slot_mapping,
        qkv.stride(0), cs.stride(0), k_cache.shape[1], k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), eps,
        HQ=num_heads, HK=num_kv_heads, D=d, HALF=d // 2,
        Q_NORM=q_norm_weight is not None, K_NORM=k_norm_weight is not None,
        BLOCK_H=bh, BLOCK_D=block_d, num_warps=max(1, min(4, bh * block_d // 128)))
    return q


@register("qkv_prologue", B)
def qkv_prologue(qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                 q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float,
                 num_heads: int, num_kv_heads: int, head_dim: int, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    return qkv_prologue_launch(qkv, positions, cos_sin_cache, q_norm_weight, k_norm_weight, eps, num_heads,
                               num_kv_heads, head_dim, k_cache, v_cache, slot_mapping)
