"""Mixture-of-experts for a few tokens (decode at batch 1..4): routing + experts in two kernels.

The aligned path of moe.py costs six launches per layer (route, count, scatter, two grouped
GEMMs, top-k sum) whatever the token count. Here kernel 1 (one program per (token, expert slot),
BLOCK_N intermediate columns) recomputes its token's routing from the router logits, then the
gate|up product with SiLU-and-mul; kernel 2 (one program per (token, BLOCK_N hidden columns))
applies the down projections of the token's k experts with their routing weights and sums them
in a fixed order. No sort, no host sync; grids from T only (CUDA-graph safe). `moe_forward`
takes this path for T <= SMALL_T_MAX and route + fused_moe above it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops.registry import register
from atom.ops.triton.moe import B, _route_row, fused_moe, moe_route

# moe_forward takes the small path for T <= SMALL_T_MAX tokens (to be tuned on the GPU:
# `python -m bench.small_batch`, section moe-small), the route + fused_moe path above it.
SMALL_T_MAX = 4

# Tile configs of the small path: "up" = kernel 1 (gate|up + SiLU, one (token, expert) pair per
# program row of the grid), "down" = kernel 2 (down GEMM, routing weight and top-k sum).
# USE_DOT: tl.dot on a 16-row tile whose row 0 is the activation (else an elementwise GEMV:
# multiply + sum in fp32). Not yet tuned on the GPU.
# ROUTE (kernel 1): 0 = `_route_row` (the code of `_route_kernel`), 1 = `_route_pick` (the same
# picks with fewer dependent reductions: 2.6 us of routing per program at T=1 with 0), 2 = read the
# ids already in the buffer (benchmarks only: what routing costs). GROUPED (kernel 2): load the k
# experts' tiles as one [k, BLOCK_N, BLOCK_K] tile per step (more bytes in flight per program).
# Chosen from one H200 sweep at T=1 (each kernel timed alone, weights L2-warm): kernel 1 13.3 us
# without routing with tl.dot (GEMV 16x256: 14.7), kernel 2 grouped 6.2 us (ungrouped 8.6).
SMALL_CFG = dict(
    up=dict(BLOCK_N=32, BLOCK_K=128, USE_DOT=True, ROUTE=1, num_warps=4, num_stages=4),
    down=dict(BLOCK_N=8, BLOCK_K=256, USE_DOT=False, GROUPED=True, num_warps=8, num_stages=2),
)


@triton.jit
def _route_pick(row_ptr, j, all_k, E, TOPK: tl.constexpr, RENORM: tl.constexpr, BLOCK_E: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """(weight, expert id) of one token's j-th choice, picked as `_route_row` picks (same softmax,
    arg-max rounds taking the lowest index on ties) but each round one reduction (value and index
    together), and only rounds 0..j unless `all_k` (the weight needs every round to renormalise;
    the weight is only valid when all_k)."""
    e = tl.arange(0, BLOCK_E)
    em = e < E
    x = tl.load(row_ptr + e, mask=em, other=float("-inf")).to(tl.float32)
    mx = tl.max(x, 0)
    p = tl.exp(x - mx)
    p = p / tl.sum(p, 0)
    p = tl.where(em, p, -1.0)
    kk = tl.arange(0, BLOCK_K)
    sel_w = tl.zeros([BLOCK_K], tl.float32)
    sel_i = tl.zeros([BLOCK_K], tl.int32)
    for r in tl.static_range(TOPK):
        if all_k | (r <= j):
            best, idx = tl.max(p, 0, return_indices=True, return_indices_tie_break_left=True)
            sel_w = tl.where(kk == r, best, sel_w)
            sel_i = tl.where(kk == r, idx, sel_i)
            p = tl.where(e == idx, -1.0, p)
    if RENORM:
        sel_w = sel_w / tl.sum(sel_w, 0)
    return tl.sum(tl.where(kk == j, sel_w, 0.0), 0), tl.sum(tl.where(kk == j, sel_i, 0), 0)


@triton.jit
def _moe_small_up_kernel(x_ptr, logits_ptr, w_ptr, act_ptr, tw_ptr, tid_ptr,
                         E, sx, sl, swe, swn, sa, N: tl.constexpr, K: tl.constexpr,
                         TOPK: tl.constexpr, RENORM: tl.constexpr, BLOCK_E: tl.constexpr,
                         BLOCK_TK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, USE_DOT: tl.constexpr,
                         ROUTE: tl.constexpr, PREC: tl.constexpr):
    """act[pair, n tile] = silu(x_t . W_gate[e]^T) * (x_t . W_up[e]^T) for pair = t * TOPK + j, e the
    token's j-th expert (routing recomputed here from the logits row); N = I, K = H (model shapes:
    compile-time constants)."""
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = (pair // TOPK).to(tl.int64)
    j = pair % TOPK
    if ROUTE == 0:
        sel_w, sel_i = _route_row(logits_ptr + t * sl, E, TOPK, RENORM, BLOCK_E, BLOCK_TK)
        kk = tl.arange(0, BLOCK_TK)
        e = tl.sum(tl.where(kk == j, sel_i, 0), 0)
        if pid_n == 0:
            tl.store(tw_ptr + pair, tl.sum(tl.where(kk == j, sel_w, 0.0), 0))
            tl.store(tid_ptr + pair, e)
    elif ROUTE == 1:
        wj, e = _route_pick(logits_ptr + t * sl, j, pid_n == 0, E, TOPK, RENORM, BLOCK_E, BLOCK_TK)
        if pid_n == 0:
            tl.store(tw_ptr + pair, wj)
            tl.store(tid_ptr + pair, e)
    else:
        e = tl.load(tid_ptr + pair)
    w_base = w_ptr + e.to(tl.int64) * swe
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = rn < N
    rk = tl.arange(0, BLOCK_K)
    x_row = x_ptr + t * sx
    if USE_DOT:
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
                km = (k0 + rk) < K
                a = tl.load(a_ptrs, mask=row0 & km[None, :], other=0.0)
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
        g = tl.sum(tl.where(row0, acc_g, 0.0), 0)
        u = tl.sum(tl.where(row0, acc_u, 0.0), 0)
    else:
        a_ptrs = x_row + rk
        wg_ptrs = w_base + rn[:, None].to(tl.int64) * swn + rk[None, :]  # [BLOCK_N, BLOCK_K]
        wu_ptrs = wg_ptrs + N * swn
        acc_g = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs).to(tl.float32)
            else:
                a = tl.load(a_ptrs, mask=(k0 + rk) < K, other=0.0).to(tl.float32)
            if EVEN_K and EVEN_N:
                wg = tl.load(wg_ptrs)
                wu = tl.load(wu_ptrs)
            else:
                wm = nm[:, None] & ((k0 + rk) < K)[None, :]
                wg = tl.load(wg_ptrs, mask=wm, other=0.0)
                wu = tl.load(wu_ptrs, mask=wm, other=0.0)
            acc_g += wg.to(tl.float32) * a[None, :]
            acc_u += wu.to(tl.float32) * a[None, :]
            a_ptrs += BLOCK_K
            wg_ptrs += BLOCK_K
            wu_ptrs += BLOCK_K
        g = tl.sum(acc_g, 1)
        u = tl.sum(acc_u, 1)
    # As fused_moe: gate and up rounded to the activation dtype before the SiLU.
    g = g.to(act_ptr.dtype.element_ty).to(tl.float32)
    u = u.to(act_ptr.dtype.element_ty).to(tl.float32)
    act = g / (1.0 + tl.exp(-g)) * u
    tl.store(act_ptr + pair.to(tl.int64) * sa + rn, act.to(act_ptr.dtype.element_ty), mask=nm)


@triton.jit
def _moe_small_down_kernel(act_ptr, w_ptr, tw_ptr, tid_ptr, out_ptr, sa, swe, swn, so,
                           N: tl.constexpr, K: tl.constexpr, TOPK: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr,
                           EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, USE_DOT: tl.constexpr,
                           PREC: tl.constexpr):
    """out[t, n tile] = sum over j in order of w_j * (act[t * TOPK + j] . W2[e_j][n tile]^T); N = H, K = I.
    Each expert's product is rounded to the activation dtype before the weight, as fused_moe."""
    t = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = rn < N
    rk = tl.arange(0, BLOCK_K)
    out = tl.zeros([BLOCK_N], tl.float32)
    for j in tl.static_range(TOPK):
        pair = t * TOPK + j
        e = tl.load(tid_ptr + pair).to(tl.int64)
        wj = tl.load(tw_ptr + pair)
        a_row = act_ptr + pair * sa
        w_base = w_ptr + e * swe
        if USE_DOT:
            rm = tl.arange(0, 16)
            row0 = rm[:, None] == 0
            a_ptrs = a_row + rm[:, None] * 0 + rk[None, :]
            w_ptrs = w_base + rn[None, :].to(tl.int64) * swn + rk[:, None]  # [BLOCK_K, BLOCK_N]
            acc = tl.zeros([16, BLOCK_N], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                if EVEN_K:
                    a = tl.load(a_ptrs, mask=row0, other=0.0)
                else:
                    a = tl.load(a_ptrs, mask=row0 & ((k0 + rk) < K)[None, :], other=0.0)
                if EVEN_K and EVEN_N:
                    w = tl.load(w_ptrs)
                else:
                    w = tl.load(w_ptrs, mask=((k0 + rk) < K)[:, None] & nm[None, :], other=0.0)
                acc = tl.dot(a, w, acc, input_precision=PREC)
                a_ptrs += BLOCK_K
                w_ptrs += BLOCK_K
            y = tl.sum(tl.where(row0, acc, 0.0), 0)
        else:
            a_ptrs = a_row + rk
            w_ptrs = w_base + rn[:, None].to(tl.int64) * swn + rk[None, :]  # [BLOCK_N, BLOCK_K]
            acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                if EVEN_K:
                    a = tl.load(a_ptrs).to(tl.float32)
                else:
                    a = tl.load(a_ptrs, mask=(k0 + rk) < K, other=0.0).to(tl.float32)
                if EVEN_K and EVEN_N:
                    w = tl.load(w_ptrs)
                else:
                    w = tl.load(w_ptrs, mask=nm[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
                acc += w.to(tl.float32) * a[None, :]
                a_ptrs += BLOCK_K
                w_ptrs += BLOCK_K
            y = tl.sum(acc, 1)
        out += y.to(out_ptr.dtype.element_ty).to(tl.float32) * wj
    tl.store(out_ptr + t * so + rn, out.to(out_ptr.dtype.element_ty), mask=nm)


@triton.jit
def _moe_small_down_grouped_kernel(act_ptr, w_ptr, tw_ptr, tid_ptr, out_ptr, sa, swe, swn, so,
                                   N: tl.constexpr, K: tl.constexpr, TOPK: tl.constexpr,
                                   BLOCK_TK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                   EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    """As `_moe_small_down_kernel`, the k experts loaded together: one [k, BLOCK_N, BLOCK_K] tile of
    W2 per step; the weighted products are summed over the experts by one tl.sum (fixed order)."""
    t = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = rn < N
    rk = tl.arange(0, BLOCK_K)
    jj = tl.arange(0, BLOCK_TK)
    jm = jj < TOPK
    pairs = t * TOPK + jj
    eids = tl.load(tid_ptr + pairs, mask=jm, other=0).to(tl.int64)
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
    y = acc.to(out_ptr.dtype.element_ty).to(tl.float32) * tw[:, None]
    tl.store(out_ptr + t * so + rn, tl.sum(y, 0).to(out_ptr.dtype.element_ty), mask=nm)


def _tiles(cfg: dict, n: int, k: int) -> tuple[int, int]:
    bn = min(cfg["BLOCK_N"], max(16 if cfg.get("USE_DOT") else 1, triton.next_power_of_2(n)))
    bk = min(cfg["BLOCK_K"], max(16, triton.next_power_of_2(k)))
    return bn, bk


def small_up(x, router_logits, w13, act, tw, tid, top_k: int, renormalize: bool, cfg: dict) -> None:
    """Kernel 1 of the small path: act [T*k, I], routing weights tw and ids tid [T, k] (ROUTE 2:
    reads tid instead). Inputs contiguous in their last dim."""
    t, h = x.shape
    num_e, inter = w13.shape[0], w13.shape[1] // 2
    bn, bk = _tiles(cfg, inter, h)
    _moe_small_up_kernel[(t * top_k, triton.cdiv(inter, bn))](
        x, router_logits, w13, act, tw, tid, num_e, x.stride(0), router_logits.stride(0),
        w13.stride(0), w13.stride(1), act.stride(0), N=inter, K=h,
        TOPK=top_k, RENORM=renormalize, BLOCK_E=triton.next_power_of_2(num_e),
        BLOCK_TK=triton.next_power_of_2(top_k), BLOCK_N=bn, BLOCK_K=bk, EVEN_N=inter % bn == 0,
        EVEN_K=h % bk == 0, USE_DOT=cfg.get("USE_DOT", False), ROUTE=cfg.get("ROUTE", 0),
        PREC="ieee" if x.dtype == torch.float32 else "tf32", num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])


def small_down(act, w2, tw, tid, out, top_k: int, cfg: dict) -> None:
    """Kernel 2 of the small path: out [T, H] = sum_j tw[:, j] * down_{tid[:, j]}(act rows)."""
    t, h = out.shape
    inter = w2.shape[2]
    bn, bk = _tiles(cfg, h, inter)
    grid = (t, triton.cdiv(h, bn))
    common = (act, w2, tw, tid, out, act.stride(0), w2.stride(0), w2.stride(1), out.stride(0))
    if cfg.get("GROUPED"):
        _moe_small_down_grouped_kernel[grid](
            *common, N=h, K=inter, TOPK=top_k, BLOCK_TK=triton.next_power_of_2(top_k), BLOCK_N=bn, BLOCK_K=bk,
            EVEN_N=h % bn == 0, EVEN_K=inter % bk == 0, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    else:
        _moe_small_down_kernel[grid](
            *common, N=h, K=inter, TOPK=top_k, BLOCK_N=bn, BLOCK_K=bk, EVEN_N=h % bn == 0,
            EVEN_K=inter % bk == 0, USE_DOT=cfg.get("USE_DOT", False),
            PREC="ieee" if act.dtype == torch.float32 else "tf32", num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])


def moe_small(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
              renormalize: bool, cfg: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The small-batch path of moe_forward (any T; meant for a few tokens): two kernels, no sorting.

    Returns (out [T, H], routing weights [T, k] float32, expert ids [T, k] int32); the routing is
    what kernel 1 recomputed (the same experts as `moe_route`)."""
    cfg = SMALL_CFG if cfg is None else cfg
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
