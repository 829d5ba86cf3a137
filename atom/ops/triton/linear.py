"""Skinny GEMM for decode batches: y = x @ W.T (+ b) for up to SKINNY_M_MAX rows of x.

At M <= 8 a dense layer is a stream over W (N x K, read once) and cuBLAS leaves a good share of
the bandwidth unused there. Each program takes BLOCK_N rows of W and walks its K range in
BLOCK_K steps. The W tile [BLOCK_N, BLOCK_K] is loaded with 16-byte vectors along K (VEC
elements per thread, 32 lanes x num_warps side by side along K, the rows of the tile repeated in
each thread), so x is loaded once per thread for all its W rows; the products are summed inside
the thread over its VEC elements and accumulated in float32 per (row of x, row of W, vector
slot); one cross-lane sum at the end, the bias added there, one rounding to x's dtype. Where
N / BLOCK_N programs would leave most SMs idle, SPLIT_K programs share a row tile's K range and
a second small kernel adds their float32 partials in a fixed order, then the bias
(deterministic, no atomics).

Batch invariance: each row of x has its own accumulator and its own code (`_fma_row`, written
once per row), the tile shape, split and layout are functions of (N, K, dtype) only
(skinny_config), and split partials are summed in a fixed order, so row i of
skinny_linear(x, W) is bitwise the same whether the call has M = 1 or M = 8 rows
(tests/gpu/test_linear.py checks it). The op `linear` keeps that over the M range where it runs
the kernel for a weight (use_skinny: M <= SKINNY_M_MAX for weights up to SKINNY_LARGE_BYTES,
M <= SKINNY_LARGE_M_MAX above); past it the op is F.linear (cuBLAS), whose results may differ in
the last bits.

CUDA-graph safe: no host synchronisation, launch parameters depend on shapes only; the split-K
workspace is a fresh allocation from the caching allocator (the graph's pool under capture).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from atom.ops.registry import register
from atom.ops.triton import INTERPRET

B = "triton"

SKINNY_M_MAX = 8  # rows of x up to which the Triton kernel may run; above it, F.linear
# Weights larger than this stream from HBM and the kernel's FMA work grows with M: it beats cuBLAS
# there only up to SKINNY_LARGE_M_MAX rows. Smaller weights (the MoE router) are latency-bound and
# take the kernel up to SKINNY_M_MAX. (H200 numbers: bench/small_batch.py, section skinny-gemm.)
SKINNY_LARGE_BYTES = 4 << 20
SKINNY_LARGE_M_MAX = 2
_ROWS = 8  # accumulators written out in the FMA kernel (BLOCK_M <= _ROWS)
assert SKINNY_M_MAX <= _ROWS


@triton.jit
def _fma_row(acc, w, x_ptr, m, M, sxm, k0, koff, kmask, EVEN_K: tl.constexpr, VEC: tl.constexpr):
    """acc[n, j] += sum over the VEC elements v of w[n, j * VEC + v] * x[m, k0 + j * VEC + v]."""
    xrow = x_ptr + tl.minimum(m, M - 1).to(tl.int64) * sxm + k0  # rows past M repeat the last (not stored)
    if EVEN_K:
        xv = tl.load(xrow + koff[None, :], eviction_policy="evict_last")
    else:
        xv = tl.load(xrow + koff[None, :], mask=kmask[None, :], other=0.0, eviction_policy="evict_last")
    p = w * xv.to(tl.float32)
    return acc + tl.sum(tl.reshape(p, [p.shape[0], p.shape[1] // VEC, VEC]), axis=2)


@triton.jit
def _store_row(out_ptr, b_ptr, acc, m, M, som, rows, N, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr):
    y = tl.sum(acc, axis=1)
    ok = (rows < N) & (m < M)
    if PARTIAL:  # float32 partial of one K split; bias and rounding in the reduce kernel
        tl.store(out_ptr + m * som + rows, y, mask=ok)
    else:
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * som + rows, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, sxm, swn, som, split_stride,
                   HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, ITERS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr, EVEN_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.minimum(rows, N - 1)  # the tail tile re-reads the last row: loads stay unmasked along N
    koff = tl.arange(0, BLOCK_K)
    w_base = w_ptr + rows_c.to(tl.int64)[:, None] * swn + koff[None, :]
    k_start = pid_k * (ITERS * BLOCK_K)

    a0 = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    a1 = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    a3 = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    a4 = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    a5 = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    a6 = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    a7 = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    for i in range(ITERS):  # a constant trip count (the K range of one split)
        k0 = k_start + i * BLOCK_K
        kmask = koff < K - k0
        if EVEN_K:
            w = tl.load(w_base + k0, eviction_policy="evict_first")
        else:
            w = tl.load(w_base + k0, mask=kmask[None, :], other=0.0, eviction_policy="evict_first")
        w = w.to(tl.float32)
        a0 = _fma_row(a0, w, x_ptr, 0, M, sxm, k0, koff, kmask, EVEN_K, VEC)
        if BLOCK_M > 1:
            a1 = _fma_row(a1, w, x_ptr, 1, M, sxm, k0, koff, kmask, EVEN_K, VEC)
        if BLOCK_M > 2:
            a2 = _fma_row(a2, w, x_ptr, 2, M, sxm, k0, koff, kmask, EVEN_K, VEC)
            a3 = _fma_row(a3, w, x_ptr, 3, M, sxm, k0, koff, kmask, EVEN_K, VEC)
        if BLOCK_M > 4:
            a4 = _fma_row(a4, w, x_ptr, 4, M, sxm, k0, koff, kmask, EVEN_K, VEC)
            a5 = _fma_row(a5, w, x_ptr, 5, M, sxm, k0, koff, kmask, EVEN_K, VEC)
            a6 = _fma_row(a6, w, x_ptr, 6, M, sxm, k0, koff, kmask, EVEN_K, VEC)
            a7 = _fma_row(a7, w, x_ptr, 7, M, sxm, k0, koff, kmask, EVEN_K, VEC)

    out_ptr += pid_k * split_stride
    _store_row(out_ptr, b_ptr, a0, 0, M, som, rows, N, HAS_BIAS, SPLIT_K > 1)
    if BLOCK_M > 1:
        _store_row(out_ptr, b_ptr, a1, 1, M, som, rows, N, HAS_BIAS, SPLIT_K > 1)
    if BLOCK_M > 2:
        _store_row(out_ptr, b_ptr, a2, 2, M, som, rows, N, HAS_BIAS, SPLIT_K > 1)
        _store_row(out_ptr, b_ptr, a3, 3, M, som, rows, N, HAS_BIAS, SPLIT_K > 1)
    if BLOCK_M > 4:
        _store_row(out_ptr, b_ptr, a4, 4, M, som, rows, N, HAS_BIAS, SPLIT_K > 1)
        _store_row(out_ptr, b_ptr, a5, 5, M, som, rows, N, HAS_BIAS, SPLIT_K > 1)
        _store_row(out_ptr, b_ptr, a6, 6, M, som, rows, N, HAS_BIAS, SPLIT_K > 1)
        _store_row(out_ptr, b_ptr, a7, 7, M, som, rows, N, HAS_BIAS, SPLIT_K > 1)


@triton.jit
def _split_reduce_kernel(ws_ptr, b_ptr, out_ptr, total, N, split_stride, HAS_BIAS: tl.constexpr,
                         SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = sum over s = 0, 1, ... of ws[s, i] (in that order) + bias[i % N]."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < total
    y = tl.load(ws_ptr + idx, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        y += tl.load(ws_ptr + s * split_stride + idx, mask=ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + idx % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + idx, y.to(out_ptr.dtype.element_ty), mask=ok)


# ---- configuration --------------------------------------------------------------------------

_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: pick the configs an H200 would get
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def skinny_config(n: int, k: int, elem_size: int, num_sms: int = 132) -> dict:
    """Tile config for an [M, k] x [n, k]^T product: a function of (n, k, dtype) only, never of M
    (batch invariance). Keys: block_n, block_k, split_k, num_warps.

    Picked on the H200 at M = 1 (bench/small_batch.py, section skinny-gemm): 16-byte vectors on
    32 lanes x num_warps all along K (each thread then holds its vector of every W row of the
    tile and loads x once for them), 4 warps up to K = 2048 and 8 above; 4 rows of W per program
    while that leaves >= one program per SM, else 2 or 1; split-K only when even 1 row per
    program leaves more than half the SMs idle.
    """
    vec = 16 // elem_size
    num_warps = 8 if k > 2048 else 4
    block_k = max(vec, min(triton.next_power_of_2(k), 32 * vec * num_warps))
    num_warps = max(1, min(num_warps, block_k // (32 * vec)))
    block_n = 1
    for bn in (4, 2):
        if triton.cdiv(n, bn) >= num_sms:
            block_n = bn
            break
    tiles = triton.cdiv(n, block_n)
    steps = triton.cdiv(k, block_k)
    split_k = 1
    if tiles < num_sms // 2 and steps > 1:  # too few programs: split K over idle SMs
        split_k = min(steps, max(1, num_sms // tiles))
    return dict(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=num_warps)


def gemm_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """The [M, N] output of x [M, K] @ weight [N, K].T (+ bias) in x's dtype, and whether it is
    already final: M or N empty, or K empty (just the bias), so no kernel has anything to do."""
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out, True
    if k == 0:
        return (out.zero_() if bias is None else out.copy_(bias.expand(m, n))), True
    return out, False


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """The Triton kernel for any M (callers gate on SKINNY_M_MAX); x [M, K] with unit last stride,
    weight [N, K] with unit last stride. `config` overrides skinny_config (benchmarks, tests)."""
    out, done = gemm_output(x, weight, bias)
    if done:
        return out
    (m, k), n = x.shape, weight.shape[0]
    cfg = config or skinny_config(n, k, weight.element_size(), _num_sms(x.device))
    block_n, block_k, split_k = cfg["block_n"], cfg["block_k"], cfg["split_k"]
    vec = min(16 // weight.element_size(), block_k)
    steps = triton.cdiv(k, block_k)
    iters = triton.cdiv(steps, min(split_k, steps))  # K steps per split
    split_k = triton.cdiv(steps, iters)  # no empty splits
    # Unmasked loads when every step of every split lies inside K.
    even_k = k % block_k == 0 and steps % iters == 0
    has_bias = bias is not None
    b = bias if has_bias else weight  # a valid pointer, never read
    for m0 in range(0, m, _ROWS):  # a single pass for M <= SKINNY_M_MAX
        xs, os_ = x[m0: m0 + _ROWS], out[m0: m0 + _ROWS]
        mm = xs.shape[0]
        grid = (triton.cdiv(n, block_n), split_k)
        dst, dst_stride, split_stride = os_, os_.stride(0), 0
        if split_k > 1:
            dst = torch.empty(split_k, mm, n, dtype=torch.float32, device=x.device)
            dst_stride, split_stride = n, mm * n
        _skinny_kernel[grid](xs, weight, b, dst, mm, n, k, xs.stride(0), weight.stride(0), dst_stride, split_stride,
                             HAS_BIAS=has_bias, SPLIT_K=split_k, ITERS=iters, BLOCK_M=triton.next_power_of_2(mm),
                             BLOCK_N=block_n, BLOCK_K=block_k, VEC=vec, EVEN_K=even_k, num_warps=cfg["num_warps"])
        if split_k > 1:
            total = mm * n
            _split_reduce_kernel[(triton.cdiv(total, 1024),)](dst, b, os_, total, n, mm * n, HAS_BIAS=has_bias,
                                                               SPLIT_K=split_k, BLOCK=1024, num_warps=4)
    return out


def _kernel_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if not (x.is_cuda or (INTERPRET and x.device.type == "cpu")):
        return False
    if weight.dim() != 2 or weight.stride(1) != 1 or weight.dtype != x.dtype or weight.device != x.device:
        return False
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return bias is None or (bias.dim() == 1 and bias.is_contiguous() and bias.device == x.device)


def use_skinny(m: int, n: int, k: int, elem_size: int) -> bool:
    """Whether the op runs the Triton kernel for an [m, k] x [n, k]^T product."""
    if m > SKINNY_M_MAX:
        return False
    return m <= SKINNY_LARGE_M_MAX or n * k * elem_size <= SKINNY_LARGE_BYTES


@register("linear", B)
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias: the skinny kernel where use_skinny says it wins, else F.linear."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if rows == 0 or not use_skinny(rows, weight.shape[0], k, weight.element_size()) \
            or not _kernel_ok(x, weight, bias):
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return skinny_linear(x2, weight, bias).reshape(*x.shape[:-1], weight.shape[0])
