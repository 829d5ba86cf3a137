"""Batch-invariant dense GEMM: y = x @ W.T (+ b) with one tile shape per weight for every M.

cuBLAS picks its kernel (tiles, split-K, stream-K) by the problem's M, and the skinny kernel
(linear.py) sums K in another order than any tensor-core tile, so in the normal backend a row's
bits depend on how many rows share the call. Here every output element is one tl.dot
accumulation over K in BLOCK_K steps, in ascending order, inside a tile whose shape (BLOCK_M,
BLOCK_N, BLOCK_K, warps, stages) is a function of (N, K, dtype) only (`gemm_config`): M = 1 and
M = 8192 run the same compiled kernel, and the rows of a tensor-core tile never mix, so row i
gets the same bits wherever it sits and whatever else is in the batch. No split-K. Rows past M
in the last tile re-read row M - 1 (loads stay unmasked along M; those rows are not stored).
Programs go in groups of GROUP_M row tiles per weight tile so that a weight tile is read from
HBM about once per group (the others hit L2).

The table is a starting point for the H200 (bench/batch_invariant.py --gemm sweeps it at the
workloads' shapes; `TUNED` takes per-(N, K, dtype) overrides without touching invariance: any
choice that does not look at M keeps it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

GROUP_M = 8
# Per-weight overrides {(n, k, element size): config}, e.g. from the sweep (checked by _check_cfg).
TUNED: dict[tuple[int, int, int], dict] = {}


@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, sxm, swn, som,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * num_n
    first_m = (pid // per_group) * GROUP
    gsize = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % gsize
    pid_n = (pid % per_group) // gsize
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rows = tl.minimum(rm, M - 1).to(tl.int64)
    cols = tl.minimum(rn, N - 1).to(tl.int64)
    a_ptrs = x_ptr + rows[:, None] * sxm + rk[None, :]
    b_ptrs = w_ptr + cols[None, :] * swn + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
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
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * som + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


def gemm_config(n: int, k: int, elem_size: int) -> dict:
    """Tile config of an [M, k] x [n, k]^T product: a function of (n, k, dtype) only, never of M.

    16-bit: 128-row tiles (two warpgroups) with BLOCK_N by the weight's width, so that a decode
    batch of ~512 rows still gives about a wave of tiles on 132 SMs (o_proj of a 2048-wide model:
    4 x 32 tiles of 64 columns) while wide weights (MLP, LM head) get 256-column tiles; BLOCK_K 64.
    float32 (tests, fp32 engines): ieee dots on 64 x 64 x 32 tiles.
    """
    tuned = TUNED.get((n, k, elem_size))
    if tuned is not None:
        return dict(tuned)
    if elem_size >= 4:
        cfg = dict(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=3)
    elif n >= 16384:
        cfg = dict(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3)
    elif n >= 4096:
        cfg = dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4)
    else:
        cfg = dict(block_m=128, block_n=64, block_k=64, num_warps=4, num_stages=4)
    # Small weights (tiny test models, routers): tiles no wider than the weight (tl.dot needs >= 16).
    cfg["block_n"] = min(cfg["block_n"], max(16, triton.next_power_of_2(n)))
    cfg["block_k"] = min(cfg["block_k"], max(16, triton.next_power_of_2(k)))
    return cfg


def _check_cfg(cfg: dict) -> None:
    for key in ("block_m", "block_n", "block_k"):
        v = cfg[key]
        if v < 16 or v & (v - 1):
            raise ValueError(f"invariant GEMM config: {key} must be a power of two >= 16, got {v}")


def invariant_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   config: dict | None = None) -> torch.Tensor:
    """x [M, K] (unit last stride) @ weight [N, K].T (unit last stride) + bias, in x's dtype.
    `config` replaces gemm_config (benchmarks, tests); the op never passes one."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    cfg = config or gemm_config(n, k, weight.element_size())
    _check_cfg(cfg)
    bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _gemm_kernel[grid](x, weight, bias if bias is not None else weight, out, m, n, k,
                       x.stride(0), weight.stride(0), out.stride(0),
                       HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=GROUP_M,
                       EVEN_K=k % bk == 0, PREC="ieee" if x.dtype == torch.float32 else "tf32",
                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
