"""Mixture-of-experts for a few tokens (decode at batch 1..4): routing + experts in two kernels.

The aligned path of moe.py costs six launches per layer (route, count, scatter, two grouped
GEMMs, top-k sum) whatever the token count. Here kernel 1 (one program per (token, expert slot),
BLOCK_N intermediate columns) recomputes its token's routing from the router logits, then the
gate|up product with SiLU-and-mul; kernel 2 (one program per (token, BLOCK_N hidden columns))
applies the down projections of the token's k experts with their routing weights and sums them
in a fixed order. No sort, no host sync; grids from T only (CUDA-graph safe). `moe_forward`
takes this path for T <= SMALL_T_MAX and route + fused_moe above it.

`fused_moe_biased` (GPT-OSS) takes the same split: here with the routing given (ROUTED: kernel 1
reads the pair's expert instead of routing; an id outside [0, E) is skipped, as expert
parallelism needs) and moe.py's epilogue switches (biases, the clamped SwiGLU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops.moe_tiles import shape_of, small_configs
from atom.ops.registry import register
from atom.ops.triton.moe import (B, SILU, Epilogue, _route_row, add_bias, experts_aligned, fused_moe,
                                 gated_activation, moe_route)

# moe_forward takes the small path for T <= SMALL_T_MAX tokens (to be tuned on the GPU:
# `python -m bench.small_batch`, section moe-small), the route + fused_moe path above it.
SMALL_T_MAX = 4

# Tile configs of the small path: "up" = kernel 1 (gate|up + SiLU), "down" = kernel 2 (down GEMM,
# routing weight and top-k sum). From one H200 sweep at T=1 (each kernel alone, weights L2-warm):
# kernel 1 with tl.dot 13.3 us before routing (an elementwise GEMV: 14.7), kernel 2 with the k
# experts loaded as one tile 6.2 us (one expert after another: 8.6). `python -m bench.small_batch`
# sweeps the tiles.
SMALL_CFG = dict(
    up=dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4),
    down=dict(BLOCK_N=8, BLOCK_K=256, num_warps=8, num_stages=2),
)


@triton.jit
def _small_up_tile(x_row, w_base, act_row, b_row, pid_n, swn, limit, alpha, N: tl.constexpr, K: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                   PREC: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
    """One BLOCK_N tile of one pair's activation: x_row . W_gate^T and x_row . W_up^T of the
    expert at w_base, then (biases and) the activation into act_row."""
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = rn < N
    rk = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, 16)
    row0 = rm[:, None] == 0
    a_ptrs = x_row + rm[:, None] * 0 + rk[None, :]
    wg_ptrs = w_base + rn[None, :].to(tl.int64) * swn + rk[:, None]  # [BLOCK_K, BLOCK_N]
    wu_ptrs = wg_ptrs + N * swn
    acc_g = tl.zeros([16, BLOCK_N], tl.float32)
    acc_u = tl.zeros([16, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row0, other=0.0)
        else:
            a = tl.load(a_ptrs, mask=row0 & ((k0 + rk) < K)[None, :], other=0.0)
        if EVEN_K and EVEN_N:
            wg = tl.load(wg_ptrs)
            wu = tl.load(wu_ptrs)
        else:
            wm = ((k0 + rk) < K)[:, None] & nm[None, :]
            wg = tl.load(wg_ptrs, mask=wm, other=0.0)
            wu = tl.load(wu_ptrs, mask=wm, other=0.0)
        acc_g = tl.dot(a, wg, acc_g, input_precision=PREC)
        acc_u = tl.dot(a, wu, acc_u, input_precision=PREC)
        a_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    # As fused_moe: gate and up rounded to the activation dtype before the activation.
    dt = act_row.dtype.element_ty
    g = tl.sum(tl.where(row0, acc_g, 0.0), 0).to(dt).to(tl.float32)
    u = tl.sum(tl.where(row0, acc_u, 0.0), 0).to(dt).to(tl.float32)
    if HAS_BIAS:
        g = add_bias(g, b_row, rn, nm, dt)
        u = add_bias(u, b_row + N, rn, nm, dt)
    act = gated_activation(g, u, limit, alpha, ACT)
    tl.store(act_row + rn, act.to(dt), mask=nm)


@triton.jit
def _moe_small_up_kernel(x_ptr, logits_ptr, w_ptr, act_ptr, tw_ptr, tid_ptr, b_ptr,
                         E, sx, sl, swe, swn, sa, sbe, limit, alpha, N: tl.constexpr, K: tl.constexpr,
                         TOPK: tl.constexpr, RENORM: tl.constexpr, BLOCK_E: tl.constexpr,
                         BLOCK_TK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr, ROUTED: tl.constexpr,
                         HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
    """act[pair, n tile] = act(x_t . W_gate[e]^T, x_t . W_up[e]^T) for pair = t * TOPK + j, e the
    token's j-th expert (routing recomputed here from the logits row, and the n-tile-0 programs
    store the pair's weight and expert; ROUTED: e read from tid, a pair whose id is outside
    [0, E) computes nothing). The activation is row 0 of a 16-row tl.dot tile. N = I, K = H
    (model shapes: compile-time constants)."""
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = (pair // TOPK).to(tl.int64)
    if ROUTED:
        e = tl.load(tid_ptr + pair).to(tl.int32)
        ok = (e >= 0) & (e < E)  # expert parallelism: -1 = an expert another rank holds
    else:
        j = pair % TOPK
        rounds = tl.where(pid_n == 0, TOPK, j + 1)  # the weight needs every choice (renormalisation)
        sel_w, sel_i = _route_row(logits_ptr + t * sl, E, rounds, TOPK, RENORM, BLOCK_E, BLOCK_TK)
        kk = tl.arange(0, BLOCK_TK)
        e = tl.sum(tl.where(kk == j, sel_i, 0), 0)
        if pid_n == 0:
            tl.store(tw_ptr + pair, tl.sum(tl.where(kk == j, sel_w, 0.0), 0))
            tl.store(tid_ptr + pair, e)
        ok = True
    if ok:
        _small_up_tile(x_ptr + t * sx, w_ptr + e.to(tl.int64) * swe, act_ptr + pair.to(tl.int64) * sa,
                       b_ptr + e.to(tl.int64) * sbe, pid_n, swn, limit, alpha, N, K, BLOCK_N, BLOCK_K, EVEN_N,
                       EVEN_K, PREC, HAS_BIAS, ACT)


@triton.jit
def _moe_small_down_kernel(act_ptr, w_ptr, tw_ptr, tid_ptr, out_ptr, b_ptr, E, sa, swe, swn, so, sbe,
                           N: tl.constexpr, K: tl.constexpr, TOPK: tl.constexpr,
                           BLOCK_TK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """out[t, n tile] = sum_j w_j * (act[t * TOPK + j] . W2[e_j][n tile]^T (+ b2[e_j])), N = H,
    K = I: the k experts loaded as one [k, BLOCK_N, BLOCK_K] tile per step; each expert's product
    is rounded to the activation dtype before its bias and weight (as fused_moe), then summed by
    one tl.sum (fixed order). Pairs whose id is outside [0, E) add nothing."""
    t = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = rn < N
    rk = tl.arange(0, BLOCK_K)
    jj = tl.arange(0, BLOCK_TK)
    pairs = t * TOPK + jj
    eids = tl.load(tid_ptr + pairs, mask=jj < TOPK, other=-1).to(tl.int64)
    jm = (jj < TOPK) & (eids >= 0) & (eids < E)
    eids = tl.where(jm, eids, 0)
    tw = tl.load(tw_ptr + pairs, mask=jm, other=0.0)
    a_ptrs = act_ptr + pairs[:, None] * sa + rk[None, :]  # [TK, BLOCK_K]
    w_ptrs = (w_ptr + eids[:, None, None] * swe + rn[None, :, None].to(tl.int64) * swn
              + rk[None, None, :])  # [TK, BLOCK_N, BLOCK_K]
    acc = tl.zeros([BLOCK_TK, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=jm[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=jm[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
        if EVEN_K and EVEN_N:
            w = tl.load(w_ptrs, mask=jm[:, None, None], other=0.0)
        else:
            wm = jm[:, None, None] & nm[None, :, None] & ((k0 + rk) < K)[None, None, :]
            w = tl.load(w_ptrs, mask=wm, other=0.0)
        acc += tl.sum(w.to(tl.float32) * a.to(tl.float32)[:, None, :], 2)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
    if HAS_BIAS:
        y = add_bias(y, b_ptr, eids[:, None] * sbe + rn[None, :], jm[:, None] & nm[None, :],
                     out_ptr.dtype.element_ty)
    y = y * tw[:, None]
    tl.store(out_ptr + t * so + rn, tl.sum(y, 0).to(out_ptr.dtype.element_ty), mask=nm)


def _tiles(cfg: dict, n: int, k: int, min_n: int) -> tuple[int, int]:
    bn = min(cfg["BLOCK_N"], max(min_n, triton.next_power_of_2(n)))
    bk = min(cfg["BLOCK_K"], max(16, triton.next_power_of_2(k)))
    return bn, bk


def small_up(x, router_logits, w13, act, tw, tid, top_k: int, renormalize: bool, cfg: dict,
             ep: Epilogue = SILU, routed: bool = False) -> None:
    """Kernel 1 of the small path: act [T*k, I], routing weights tw and ids tid [T, k] (written;
    with `routed`, read: router_logits is then unused). Inputs contiguous in their last dim."""
    t, h = x.shape
    num_e, inter = w13.shape[0], w13.shape[1] // 2
    bn, bk = _tiles(cfg, inter, h, 16)  # a tl.dot tile is at least 16 wide
    _moe_small_up_kernel[(t * top_k, triton.cdiv(inter, bn))](
        x, router_logits, w13, act, tw, tid, w13 if ep.b13 is None else ep.b13, num_e, x.stride(0),
        router_logits.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        0 if ep.b13 is None else ep.b13.stride(0), ep.clamp, float(ep.alpha), N=inter, K=h,
        TOPK=top_k, RENORM=renormalize, BLOCK_E=triton.next_power_of_2(num_e),
        BLOCK_TK=triton.next_power_of_2(top_k), BLOCK_N=bn, BLOCK_K=bk, EVEN_N=inter % bn == 0,
        EVEN_K=h % bk == 0, PREC="ieee" if x.dtype == torch.float32 else "tf32", ROUTED=routed,
        HAS_BIAS=ep.b13 is not None, ACT=ep.act, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def small_down(act, w2, tw, tid, out, top_k: int, cfg: dict, ep: Epilogue = SILU) -> None:
    """Kernel 2 of the small path: out [T, H] = sum_j tw[:, j] * (down_{tid[:, j]}(act rows) + b2)."""
    t, h = out.shape
    inter = w2.shape[2]
    bn, bk = _tiles(cfg, h, inter, 1)
    _moe_small_down_kernel[(t, triton.cdiv(h, bn))](
        act, w2, tw, tid, out, w2 if ep.b2 is None else ep.b2, w2.shape[0], act.stride(0), w2.stride(0),
        w2.stride(1), out.stride(0), 0 if ep.b2 is None else ep.b2.stride(0),
        N=h, K=inter, TOPK=top_k, BLOCK_TK=triton.next_power_of_2(top_k), BLOCK_N=bn, BLOCK_K=bk,
        EVEN_N=h % bn == 0, EVEN_K=inter % bk == 0, HAS_BIAS=ep.b2 is not None, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])


def moe_small(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
              renormalize: bool, cfg: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The small-batch path of moe_forward (any T; meant for a few tokens): two kernels, no sorting.

    Returns (out [T, H], routing weights [T, k] float32, expert ids [T, k] int32); the routing is
    what kernel 1 recomputed (the same experts as `moe_route`). Tile configs: cfg, else the
    experts' shape's in moe_tiles' table, else SMALL_CFG."""
    cfg = small_configs(shape_of(w13), SMALL_CFG) if cfg is None else cfg
    t, h = x.shape
    inter = w13.shape[1] // 2
    dev = x.device
    x, router_logits, w13, w2 = (a if a.stride(-1) == 1 else a.contiguous() for a in (x, router_logits, w13, w2))
    act = torch.empty(t * top_k, inter, dtype=x.dtype, device=dev)
    tw = torch.empty(t, top_k, dtype=torch.float32, device=dev)
    tid = torch.empty(t, top_k, dtype=torch.int32, device=dev)
    out = torch.empty(t, h, dtype=x.dtype, device=dev)
    if t:
        small_up(x, router_logits, w13, act, tw, tid, top_k, renormalize, cfg["up"])
        small_down(act, w2, tw, tid, out, top_k, cfg["down"])
    return out, tw, tid


@register("moe_forward", B)
def moe_forward(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
                renormalize: bool) -> torch.Tensor:
    """Routing + experts (no expert parallelism): the small path for 1 <= T <= SMALL_T_MAX, else
    moe_route + fused_moe. The choice depends on T only (CUDA-graph safe)."""
    t = x.shape[0]
    if 0 < t <= SMALL_T_MAX:
        return moe_small(x, router_logits, w13, w2, top_k, renormalize)[0]
    return fused_moe(x, w13, w2, *moe_route(router_logits, top_k, renormalize))


def _contiguous(*tensors):
    return tuple(a if a is None or a.stride(-1) == 1 else a.contiguous() for a in tensors)


@register("fused_moe_biased", B, "skips_negative_ids")
def fused_moe_biased(x: torch.Tensor, w13: torch.Tensor, b13: torch.Tensor, w2: torch.Tensor,
                     b2: torch.Tensor | None, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     limit: float | None, alpha: float) -> torch.Tensor:
    """GPT-OSS's experts (torch_family_ops has the reference): the small path's two kernels for
    1 <= T <= SMALL_T_MAX, else the aligned path, both with the bias + clamped-SwiGLU epilogue.
    The choice depends on T only (CUDA-graph safe)."""
    x, w13, b13, w2, b2 = _contiguous(x, w13, b13, w2, b2)
    ep = Epilogue(b13, b2, "clamped_swiglu", limit, alpha)
    t, top_k = topk_ids.shape
    if not 0 < t <= SMALL_T_MAX:
        return experts_aligned(x, w13, w2, topk_weights, topk_ids, ep)
    tw = topk_weights if topk_weights.dtype == torch.float32 else topk_weights.float()
    tw, tid = tw.contiguous(), topk_ids.contiguous()
    act = torch.empty(t * top_k, w13.shape[1] // 2, dtype=x.dtype, device=x.device)
    out = torch.empty(t, w2.shape[1], dtype=x.dtype, device=x.device)
    cfg = small_configs(shape_of(w13), SMALL_CFG)
    small_up(x, x, w13, act, tw, tid, top_k, False, cfg["up"], ep, routed=True)
    small_down(act, w2, tw, tid, out, top_k, cfg["down"], ep)
    return out
