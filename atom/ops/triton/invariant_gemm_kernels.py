"""The batch-invariant GEMM's Triton kernels (invariant_gemm.py picks the config and launches).

One kernel, specialised by constexprs that come from the weight's config only (never from M):

  TMA       the x and weight tiles arrive by TMA (host-side tensor descriptors; rows or columns
            past the tensor are zero-filled) instead of pointer loads (rows past M re-read row
            M - 1). Either way the same tl.dot runs over the same tiles in the same K order.
  SPLIT     K is cut into SPLIT fixed parts of `part_len` columns (a multiple of BLOCK_K, from K
            and the config only); each program writes its part's float32 partial to a workspace
            [SPLIT, M, N] and `_sum_parts` adds them in part order (0 + 1 + ...), then the bias:
            in sum_parts_kernel, or (FOLD) in the program that finishes a tile's last part (an
            atomic counter per tile says which one is last; no atomics on data). Either way an
            element's sum never depends on which program finished first, and both give the same bits.
  PROGRAMS  > 0: a persistent grid of PROGRAMS programs (the device's SMs) striding over the
            tiles; a tile's arithmetic is the same whichever program runs it and in what order.

Every output element is one fp32 accumulation over its K range in BLOCK_K steps, ascending,
inside a tile whose rows never mix, so a row's bits do not depend on M or on its place.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_of(tile, num_m, num_n, GROUP: tl.constexpr):
    """(row tile, column tile, K part) of a linear tile index: parts outermost, then groups of
    GROUP row tiles per column tile (a weight tile is read from HBM about once per group)."""
    tiles_mn = num_m * num_n
    part = tile // tiles_mn
    mn = tile % tiles_mn
    per_group = GROUP * num_n
    first_m = (mn // per_group) * GROUP
    gsize = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (mn % per_group) % gsize
    pid_n = (mn % per_group) // gsize
    return pid_m, pid_n, part


@triton.jit
def _tile_sum(x, w, pid_m, pid_n, k_lo, k_hi, M, N, K, sxm, swn,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              EVEN_K: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    """fp32 sum over k in [k_lo, k_hi) of the tile's x rows times its weight rows."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if TMA:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            a = x.load([pid_m * BLOCK_M, k0])
            b = w.load([pid_n * BLOCK_N, k0])
            acc = tl.dot(a, b.T, acc, input_precision=PREC)
    else:
        rk = tl.arange(0, BLOCK_K)
        rows = tl.minimum(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), M - 1).to(tl.int64)
        cols = tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1).to(tl.int64)
        a_ptrs = x + rows[:, None] * sxm + (k_lo + rk)[None, :]
        b_ptrs = w + cols[None, :] * swn + (k_lo + rk)[:, None]
        for k0 in range(k_lo, k_hi, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                km = rk < K - k0
                a = tl.load(a_ptrs, mask=km[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=km[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PREC)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
    return acc


@triton.jit
def _finish(acc, b_ptr, out_ptr, rm, rn, ok, N, som, HAS_BIAS: tl.constexpr):
    """+ bias, cast, store: the last steps of every output element, whichever path summed it."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + tl.minimum(rn, N - 1)).to(tl.float32)[None, :]
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * som + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _sum_parts(ws_ptr, offs, ok, M, N, SPLIT: tl.constexpr):
    """((part 0 + part 1) + ...) of the float32 workspace [SPLIT, M, N] at offs, in part order."""
    acc = tl.load(ws_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg")
    part_size = M.to(tl.int64) * N  # SPLIT * M * N passes 2**31 (lm_head at 8192 rows: 2.5e9)
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(ws_ptr + s * part_size + offs, mask=ok, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def _one_tile(tile, x, w, b_ptr, out_ptr, ws_ptr, count_ptr, M, N, K, sxm, swn, som, part_len, num_m, num_n,
              HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              GROUP: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
              SPLIT: tl.constexpr, FOLD: tl.constexpr):
    pid_m, pid_n, part = _tile_of(tile, num_m, num_n, GROUP)
    k_lo = part * part_len
    k_hi = tl.minimum(k_lo + part_len, K)
    acc = _tile_sum(x, w, pid_m, pid_n, k_lo, k_hi, M, N, K, sxm, swn,
                    BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PREC, TMA)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    if SPLIT == 1:
        _finish(acc, b_ptr, out_ptr, rm, rn, ok, N, som, HAS_BIAS)
    else:
        offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(ws_ptr + part.to(tl.int64) * M * N + offs, acc, mask=ok)
        if FOLD:
            # The tile's last part to arrive sums all parts in part order (its own read back: the
            # same float32 bits), so the sum never depends on the arrival order. The barrier puts
            # every thread's partial before the release.
            tl.debug_barrier()
            arrived = tl.atomic_add(count_ptr + pid_m * num_n + pid_n, 1, sem="acq_rel")
            if arrived == SPLIT - 1:
                _finish(_sum_parts(ws_ptr, offs, ok, M, N, SPLIT), b_ptr, out_ptr, rm, rn, ok, N, som, HAS_BIAS)


@triton.jit(do_not_specialize=["M"])
def gemm_kernel(x, w, b_ptr, out_ptr, ws_ptr, count_ptr, M, N, K, sxm, swn, som, part_len,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
                SPLIT: tl.constexpr, FOLD: tl.constexpr, PROGRAMS: tl.constexpr):
    """out = x @ w.T (+ bias) tile by tile; x, w are pointers or (TMA) tensor descriptors. SPLIT > 1:
    partials into ws_ptr [SPLIT, M, N] float32, summed by sum_parts_kernel or (FOLD) by the last
    part of each tile to finish (count_ptr: one zeroed int32 per output tile)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    if PROGRAMS > 0:
        for tile in tl.range(tl.program_id(0), num_m * num_n * SPLIT, PROGRAMS, flatten=True):
            _one_tile(tile, x, w, b_ptr, out_ptr, ws_ptr, count_ptr, M, N, K, sxm, swn, som, part_len, num_m,
                      num_n, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP, EVEN_K, PREC, TMA, SPLIT, FOLD)
    else:
        _one_tile(tl.program_id(0), x, w, b_ptr, out_ptr, ws_ptr, count_ptr, M, N, K, sxm, swn, som, part_len,
                  num_m, num_n, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP, EVEN_K, PREC, TMA, SPLIT, FOLD)


@triton.jit(do_not_specialize=["M"])
def sum_parts_kernel(ws_ptr, b_ptr, out_ptr, M, N, som,
                     HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out = ((part 0 + part 1) + ...) + bias, in that order for every element (float32)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    _finish(_sum_parts(ws_ptr, offs, ok, M, N, SPLIT), b_ptr, out_ptr, rm, rn, ok, N, som, HAS_BIAS)
