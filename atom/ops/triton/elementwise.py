"""Row-wise kernels: RMSNorm (with fused residual add), SiLU-and-mul, RoPE, KV-cache write.

Each matches its torch reference in atom/ops/torch_ops.py: float32 maths, one rounding to the
output dtype, the same order of roundings where the reference rounds an intermediate.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops.registry import register

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
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
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
        HAS_RES=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return out, rout


@register("rms_norm", B)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm(x, None, weight, eps)[0]


@register("fused_add_rms_norm", B)
def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm(x, residual, weight, eps)


# ---- SiLU(gate) * up ----------------------------------------------------------------------

@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, I, sx, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * sx + I + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * I + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@register("silu_and_mul", B)
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
                                                                    num_warps=4)
    return out.reshape(*shape[:-1], inter)


# ---- RoPE (neox) ----------------------------------------------------------------------------

@triton.jit
def _rope_kernel(pos_ptr, q_ptr, k_ptr, cs_ptr, qo_ptr, ko_ptr, sq0, sq1, sk0, sk1, scs,
                 HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < HALF
    cos = tl.load(cs_ptr + pos * scs + d, mask=dm, other=0.0)[None, :]
    sin = tl.load(cs_ptr + pos * scs + HALF + d, mask=dm, other=0.0)[None, :]
    h = tl.arange(0, BLOCK_H)
    # q heads
    m = (h < HQ)[:, None] & dm[None, :]
    base = q_ptr + t * sq0 + h[:, None] * sq1 + d[None, :]
    x1 = tl.load(base, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=m, other=0.0).to(tl.float32)
    ob = qo_ptr + t * (HQ * 2 * HALF) + h[:, None] * (2 * HALF) + d[None, :]
    tl.store(ob, (x1 * cos - x2 * sin).to(qo_ptr.dtype.element_ty), mask=m)
    tl.store(ob + HALF, (x2 * cos + x1 * sin).to(qo_ptr.dtype.element_ty), mask=m)
    # k heads
    m = (h < HK)[:, None] & dm[None, :]
    base = k_ptr + t * sk0 + h[:, None] * sk1 + d[None, :]
    x1 = tl.load(base, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=m, other=0.0).to(tl.float32)
    ob = ko_ptr + t * (HK * 2 * HALF) + h[:, None] * (2 * HALF) + d[None, :]
    tl.store(ob, (x1 * cos - x2 * sin).to(ko_ptr.dtype.element_ty), mask=m)
    tl.store(ob + HALF, (x2 * cos + x1 * sin).to(ko_ptr.dtype.element_ty), mask=m)


@register("rotary_embedding", B)
def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
                           num_warps=4)
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


@register("kv_cache_write", B)
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
