"""Fused mixture-of-experts in Triton.

route: softmax over experts, top-k by repeated arg-max, optional renormalisation (one kernel).
fused_moe:
  1. align: the T*k (token, expert) pairs are sorted by expert (stable: by pair index within an
     expert) and each expert's run is padded to a multiple of BLOCK_M, so every M tile of the
     grouped GEMMs belongs to one expert (two small kernels, no host sync).
  2. grouped GEMM gate|up over the sorted pairs with SiLU(gate) * up fused in the epilogue: each
     program keeps two accumulators, the gate and the up columns of one output tile.
  3. grouped GEMM down with the routing weight applied in the epilogue, one row per pair.
  4. sum over the top-k rows of each token.
fused_moe_biased (GPT-OSS) is the same pipeline with two compile-time switches in the GEMM
epilogues: HAS_BIAS (each expert's gate|up bias, then down bias, added where the torch reference
adds them: after rounding the product to the activation dtype) and ACT="clamped_swiglu"
((clamp(up, ±limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)) instead of SiLU-and-mul.
Everything is launched with grids sized from T alone, so the op is CUDA-graph safe.
moe_forward (routing + experts) lives in moe_small.py: two kernels for a few tokens, else
moe_route + fused_moe.
Tile configs (BLOCK_M/N/K, GROUP_M, warps, stages) are chosen by expert shape and token count
(atom/ops/moe_tiles.py: a table keyed by experts, 2I, H, dtype size and device, each with a
token-count ladder; shapes not in it get the ladder tuned for Qwen3-30B-A3B).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from atom.ops.moe_tiles import moe_configs, shape_of  # moe_configs: re-exported (bench, tests)
from atom.ops.registry import register
from atom.ops.triton import pdl
from atom.ops.triton.pdl import grid_dependency

B = "triton"


# ---- routing ----------------------------------------------------------------------------------

@triton.jit
def _route_row(row_ptr, E, rounds, TOPK: tl.constexpr, RENORM: tl.constexpr, BLOCK_E: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """One token's routing from its logits row: (weights [BLOCK_K] fp32, expert ids [BLOCK_K] int32),
    entries >= TOPK unused. Softmax in fp32, top-k by repeated arg-max (lowest index on ties),
    optional renormalisation. Only the first `rounds` choices are made (the small-batch MoE kernel
    needs choices 0..j of a pair; the weights are valid only when rounds == TOPK). Shared by
    `_route_kernel` and moe_small's kernel so that both pick the same experts."""
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
    for j in tl.static_range(TOPK):
        if j < rounds:
            best, idx = tl.max(p, 0, return_indices=True, return_indices_tie_break_left=True)
            sel_w = tl.where(kk == j, best, sel_w)
            sel_i = tl.where(kk == j, idx, sel_i)
            p = tl.where(e == idx, -1.0, p)
    if RENORM:
        sel_w = sel_w / tl.sum(sel_w, 0)
    return sel_w, sel_i


@triton.jit
def _route_kernel(logits_ptr, w_ptr, id_ptr, E, sl, TOPK: tl.constexpr, RENORM: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    grid_dependency(PDL)
    t = tl.program_id(0).to(tl.int64)
    sel_w, sel_i = _route_row(logits_ptr + t * sl, E, TOPK, TOPK, RENORM, BLOCK_E, BLOCK_K)
    kk = tl.arange(0, BLOCK_K)
    km = kk < TOPK
    tl.store(w_ptr + t * TOPK + kk, sel_w, mask=km)
    tl.store(id_ptr + t * TOPK + kk, sel_i.to(tl.int64), mask=km)


@register("moe_route", B, "batch_invariant")  # one program per token, shapes from E and k
def moe_route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    t, e = router_logits.shape
    weights = torch.empty(t, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=router_logits.device)
    if t:
        logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
        _route_kernel[(t,)](logits, weights, ids, e, logits.stride(0), TOPK=top_k, RENORM=renormalize,
                            BLOCK_E=triton.next_power_of_2(e), BLOCK_K=triton.next_power_of_2(top_k), num_warps=1 if e <= 256 else 4,
                            **pdl.options())
    return weights, ids


# ---- align ----------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["N"])
def _count_kernel(ids_ptr, counts_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    grid_dependency(PDL)
    e = tl.program_id(0)
    c = tl.zeros([BLOCK], tl.int32)
    for i0 in range(0, N, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        v = tl.load(ids_ptr + i, mask=i < N, other=-1)
        c += (v == e).to(tl.int32)
    tl.store(counts_ptr + e, tl.sum(c, 0))


@triton.jit(do_not_specialize=["N"])
def _scatter_kernel(ids_ptr, counts_ptr, sorted_ptr, expert_ptr, total_ptr, N, E,
                    BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr = False):
    grid_dependency(PDL)
    e = tl.program_id(0)
    ee = tl.arange(0, BLOCK_E)
    cnt = tl.load(counts_ptr + ee, mask=ee < E, other=0)
    padded = (cnt + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.sum(tl.where(ee < e, padded, 0), 0)
    mine = tl.sum(tl.where(ee == e, padded, 0), 0)
    count = tl.sum(tl.where(ee == e, cnt, 0), 0)
    if e == 0:
        tl.store(total_ptr, tl.sum(padded, 0))
    # Tiles of this expert.
    for m0 in range(0, mine, BLOCK_M):
        tl.store(expert_ptr + (start + m0) // BLOCK_M, e)
    # Padding slots get the sentinel N.
    for p0 in range(count, mine, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        tl.store(sorted_ptr + start + p, N, mask=p < mine)
    # This expert's pairs, in pair order.
    run = start - start
    for i0 in range(0, N, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        v = tl.load(ids_ptr + i, mask=i < N, other=-1)
        hit = (v == e).to(tl.int32)
        rank = tl.cumsum(hit, 0) - hit
        tl.store(sorted_ptr + start + run + rank, i, mask=hit > 0)
        run += tl.sum(hit, 0)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """(sorted pair ids [max_tiles*block_m], tile experts [max_tiles], padded total [1]) on device."""
    flat = topk_ids.reshape(-1)  # int32 or int64: the kernels compare the ids as loaded (no cast copy)
    n = flat.numel()
    max_tiles = triton.cdiv(n, block_m) + min(num_experts, n)
    dev = topk_ids.device
    counts = torch.empty(num_experts, dtype=torch.int32, device=dev)
    sorted_ids = torch.empty(max_tiles * block_m, dtype=torch.int32, device=dev)
    tile_expert = torch.empty(max_tiles, dtype=torch.int32, device=dev)
    total = torch.empty(1, dtype=torch.int32, device=dev)
    block = min(1024, triton.next_power_of_2(max(n, 16)))
    _count_kernel[(num_experts,)](flat, counts, n, BLOCK=block, num_warps=4, **pdl.options())
    _scatter_kernel[(num_experts,)](flat, counts, sorted_ids, tile_expert, total, n, num_experts,
                                    BLOCK_M=block_m, BLOCK=block, BLOCK_E=triton.next_power_of_2(num_experts),
                                    num_warps=4, **pdl.options())
    return sorted_ids, tile_expert, total, max_tiles


# ---- grouped GEMMs ----------------------------------------------------------------------------

@triton.jit
def gated_activation(g, u, limit, alpha, ACT: tl.constexpr):
    """The expert activation of gate and up (float32, already rounded as the reference rounds
    them): "silu" = silu(g) * u; "clamped_swiglu" = GPT-OSS's (clamp(u, ±limit) + 1) * g' *
    sigmoid(alpha * g'), g' = min(g, limit) (limit = inf: no clamp)."""
    if ACT == "clamped_swiglu":
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        return (u + 1.0) * g / (1.0 + tl.exp(-alpha * g))
    return g / (1.0 + tl.exp(-g)) * u


@triton.jit
def add_bias(x, b_ptr, cols, mask, dt: tl.constexpr):
    """x + bias[cols] rounded to dt (the reference adds a bias to the rounded product in the
    activation dtype), as float32; mask: the columns (or rows x columns) that exist."""
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return (x + b).to(dt).to(tl.float32)


@triton.jit(do_not_specialize=["num_pairs", "max_tiles"])
def _moe_gemm_kernel(a_ptr, w_ptr, out_ptr, sorted_ptr, expert_ptr, total_ptr, tw_ptr, b_ptr,
                     N, K, num_pairs, max_tiles, sa, swe, swn, so, sbe, limit, alpha,
                     A_DIV: tl.constexpr, GATED: tl.constexpr, MUL_W: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, PREC: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                     PDL: tl.constexpr = False):
    grid_dependency(PDL)
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    gsize = tl.minimum(max_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % gsize
    pid_n = (pid % group) // gsize
    total = tl.load(total_ptr)
    if pid_m * BLOCK_M < total:
        e = tl.load(expert_ptr + pid_m).to(tl.int64)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + rm)
        valid = pair < num_pairs
        arow = tl.where(valid, pair // A_DIV, 0).to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + arow[:, None] * sa + rk[None, :]
        w_base = w_ptr + e * swe
        wg_ptrs = w_base + rn[None, :].to(tl.int64) * swn + rk[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if GATED:
            wu_ptrs = w_base + (N + rn[None, :]).to(tl.int64) * swn + rk[:, None]
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            km = (k0 + rk) < K
            a = tl.load(a_ptrs, mask=valid[:, None] & km[None, :], other=0.0)
            wg = tl.load(wg_ptrs, mask=km[:, None] & nmask[None, :], other=0.0)
            acc += tl.dot(a, wg, input_precision=PREC)
            if GATED:
                wu = tl.load(wu_ptrs, mask=km[:, None] & nmask[None, :], other=0.0)
                acc_u += tl.dot(a, wu, input_precision=PREC)
                wu_ptrs += BLOCK_K
            a_ptrs += BLOCK_K
            wg_ptrs += BLOCK_K
        dt = out_ptr.dtype.element_ty
        if GATED:
            # The reference rounds gate and up to the activation dtype before the activation.
            g = acc.to(dt).to(tl.float32)
            u = acc_u.to(dt).to(tl.float32)
            if HAS_BIAS:
                g = add_bias(g, b_ptr + e * sbe, rn[None, :], nmask[None, :], dt)
                u = add_bias(u, b_ptr + e * sbe + N, rn[None, :], nmask[None, :], dt)
            acc = gated_activation(g, u, limit, alpha, ACT)
        elif HAS_BIAS:
            acc = add_bias(acc.to(dt).to(tl.float32), b_ptr + e * sbe, rn[None, :], nmask[None, :], dt)
        if MUL_W:
            tw = tl.load(tw_ptr + tl.where(valid, pair, 0), mask=valid, other=0.0)
            acc = acc.to(dt).to(tl.float32) * tw[:, None]
        orow = tl.where(valid, pair, 0).to(tl.int64)
        tl.store(out_ptr + orow[:, None] * so + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & nmask[None, :])


@dataclass(frozen=True)
class Epilogue:
    """What the expert GEMMs do after the products: bias tensors (b13 [E, 2I] for gate|up, b2
    [E, H] for down; None: none) and the activation ("silu" or "clamped_swiglu" with its limit,
    None = no clamp, and alpha)."""

    b13: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    act: str = "silu"
    limit: float | None = None
    alpha: float = 1.0

    @property
    def clamp(self) -> float:
        return float("inf") if self.limit is None else float(self.limit)


SILU = Epilogue()


def _launch(a, w, out, sorted_ids, tile_expert, total, max_tiles, tw, n, k, num_pairs, a_div, gated, mul_w, cfg,
            ep: Epilogue = SILU):
    c = dict(cfg)
    bm, bn = c["BLOCK_M"], c["BLOCK_N"]
    bk = min(c["BLOCK_K"], max(16, triton.next_power_of_2(k)))
    grid = (max_tiles * triton.cdiv(n, bn),)
    bias = ep.b13 if gated else ep.b2
    _moe_gemm_kernel[grid](a, w, out, sorted_ids, tile_expert, total, tw, w if bias is None else bias,
                           n, k, num_pairs, max_tiles, a.stride(0), w.stride(0), w.stride(1), out.stride(0),
                           0 if bias is None else bias.stride(0), ep.clamp, float(ep.alpha),
                           A_DIV=a_div, GATED=gated, MUL_W=mul_w, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                           GROUP_M=c["GROUP_M"], PREC="ieee" if a.dtype == torch.float32 else "tf32",
                           HAS_BIAS=bias is not None, ACT=ep.act, num_warps=c["num_warps"],
                           num_stages=c["num_stages"], **pdl.options())


@register("fused_moe", B, "skips_negative_ids")
def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """The grouped-GEMM path with the tile configs of its shape and token count (moe_configs)."""
    return experts_aligned(x, w13, w2, topk_weights, topk_ids, SILU)


def fused_moe_with(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, up_cfg: dict, down_cfg: dict) -> torch.Tensor:
    """fused_moe with given tile configs of the gate|up and the down GEMM (same BLOCK_M)."""
    return experts_aligned(x, w13, w2, topk_weights, topk_ids, SILU, up_cfg, down_cfg)


def experts_aligned(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor, ep: Epilogue, up_cfg: dict | None = None,
                    down_cfg: dict | None = None) -> torch.Tensor:
    """The aligned path (any T): align, gate|up GEMM + activation, down GEMM + routing weight,
    top-k sum; `ep` holds fused_moe_biased's biases and activation (SILU: fused_moe). Tile
    configs: those of the experts' shape and the token count (moe_configs) unless given."""
    if up_cfg is None:
        up_cfg, down_cfg = moe_configs(x.shape[0], shape_of(w13))
    t, h = x.shape
    e, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    if t == 0:
        return torch.empty(0, w2.shape[1], dtype=x.dtype, device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    topk_ids = topk_ids.contiguous()
    assert up_cfg["BLOCK_M"] == down_cfg["BLOCK_M"]
    sorted_ids, tile_expert, total, max_tiles = moe_align(topk_ids, e, up_cfg["BLOCK_M"])
    num_pairs = t * top_k
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    tw = topk_weights.reshape(-1)
    if tw.dtype != torch.float32:
        tw = tw.float()
    _launch(x, w13, act, sorted_ids, tile_expert, total, max_tiles, tw, inter, h, num_pairs, top_k, True, False,
            up_cfg, ep)
    # Rows of pairs with an id outside [0, E) (expert parallelism passes -1) stay unwritten; the
    # sum skips them.
    out_k = torch.empty(num_pairs, w2.shape[1], dtype=x.dtype, device=x.device)
    _launch(act, w2, out_k, sorted_ids, tile_expert, total, max_tiles, tw, w2.shape[1], inter, num_pairs, 1,
            False, True, down_cfg, ep)
    out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(h))
    _topk_sum_kernel[(t, triton.cdiv(h, block))](out_k, topk_ids, out, h, e, TOPK=top_k, BLOCK=block, num_warps=4,
                                                 **pdl.options())
    return out


@triton.jit
def _topk_sum_kernel(y_ptr, ids_ptr, out_ptr, H, E, TOPK: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    grid_dependency(PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cm = cols < H
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(TOPK):
        eid = tl.load(ids_ptr + t * TOPK + j)
        ok = (eid >= 0) & (eid < E)
        y = tl.load(y_ptr + (t * TOPK + j) * H + cols, mask=cm & ok, other=0.0)
        acc += y.to(tl.float32)
    tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=cm)


