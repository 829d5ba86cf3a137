"""Router logits in float32 (`router_linear`, torch reference in atom/ops/torch_family_ops.py):
x [T, H] @ weight [E, H]^T with float32 products and sums, as HF's DeepSeek-V3 routes
(`F.linear(x.float(), weight.float())`), without the float32 copies of x and the weight.

16-bit inputs of one dtype go through the tensor cores as they are: a product of two bf16 (or
fp16) values is exact in float32 and the MMA sums in float32, so the result is the float32 GEMM's
up to the order of the sums. Other inputs are widened to float32 in registers ("ieee" dot).

The sum over H runs in N_SPLIT fixed column ranges (a program each, so that a decode batch of
512 rows fills the SMs: Moonlight's [512, 2048] x [64, 2048] is 8 row blocks x 1 expert block),
added up in order by a second kernel. The ranges follow H only, so a row's bits do not depend on
T or on the row's place: the kernel is batch-invariant. Session 11's H200 profile: the float32
copies and cuBLAS's sgemm took ~0.35 ms of each grpo-mla-moe decode step (26 MoE layers).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops.registry import register
from atom.ops.triton import pdl
from atom.ops.triton.pdl import grid_dependency

BLOCK_M, BLOCK_E, BLOCK_K = 64, 64, 64
MAX_SPLITS = 16               # column ranges of the sum over H at most
PART_BYTES = 32 << 20         # float32 partials one launch may hold; more rows go in several launches


@triton.jit
def _router_part_kernel(x_ptr, w_ptr, p_ptr, T, E, K, KS, sx, sw, sp0, sp1,
                        BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, WIDEN: tl.constexpr,
                        PDL: tl.constexpr = False):
    """Rows [m0, m0 + BLOCK_M) x experts [e0, e0 + BLOCK_E) over columns [s KS, (s + 1) KS)."""
    grid_dependency(PDL)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    s = tl.program_id(2)
    mm, em = m < T, e < E
    acc = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
    hi = tl.minimum((s + 1) * KS, K)
    for k0 in range(s * KS, hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < hi
        xt = tl.load(x_ptr + m[:, None].to(tl.int64) * sx + k[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        wt = tl.load(w_ptr + e[:, None].to(tl.int64) * sw + k[None, :], mask=em[:, None] & km[None, :], other=0.0)
        if WIDEN:
            acc = tl.dot(xt.to(tl.float32), tl.trans(wt.to(tl.float32)), acc=acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(wt), acc=acc)
    tl.store(p_ptr + s.to(tl.int64) * sp0 + m[:, None].to(tl.int64) * sp1 + e[None, :], acc,
             mask=mm[:, None] & em[None, :])


@triton.jit
def _sum_parts_kernel(p_ptr, o_ptr, n, S, sp0, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """o = sum over s of p[s], s in order (n values each)."""
    grid_dependency(PDL)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    im = i < n
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(0, S):
        acc += tl.load(p_ptr + s * sp0 + i, mask=im, other=0.0)
    tl.store(o_ptr + i, acc, mask=im)


def _splits(k: int) -> tuple[int, int]:
    """(columns per range, ranges) for a sum over k columns: a function of k alone."""
    n = min(MAX_SPLITS, triton.cdiv(k, 128))
    ks = triton.cdiv(triton.cdiv(k, n), BLOCK_K) * BLOCK_K
    return ks, triton.cdiv(k, ks)


@register("router_linear", "triton", "batch_invariant")
def router_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """router_linear's contract: x [T, H], weight [E, H] (any float dtypes) -> [T, E] float32."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"router_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} are not [T, H] and [E, H]")
    t, k = x.shape
    e = weight.shape[0]
    out = torch.empty(t, e, dtype=torch.float32, device=x.device)
    if t == 0 or e == 0:
        return out
    if k == 0:
        return out.zero_()
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    widen = x.dtype != w.dtype or x.dtype == torch.float32
    ks, n_split = _splits(k)
    rows = t if n_split == 1 else max(BLOCK_M, PART_BYTES // (n_split * e * 4) // BLOCK_M * BLOCK_M)
    parts = None if n_split == 1 else torch.empty(n_split, min(rows, t), e, dtype=torch.float32, device=x.device)
    for a in range(0, t, rows):  # row blocks never change a row's bits
        xa, oa = x[a:a + rows], out[a:a + rows]
        ta = xa.shape[0]
        p = oa if parts is None else parts[:, :ta]
        sp0 = 0 if parts is None else p.stride(0)
        _router_part_kernel[(triton.cdiv(ta, BLOCK_M), triton.cdiv(e, BLOCK_E), n_split)](
            xa, w, p, ta, e, k, ks, xa.stride(0), w.stride(0), sp0, e, BLOCK_M=BLOCK_M, BLOCK_E=BLOCK_E,
            BLOCK_K=BLOCK_K, WIDEN=widen, num_warps=4, num_stages=3, **pdl.options())
        if parts is not None:
            n = ta * e
            # 256 values a program: Moonlight's decode has 32,768 (1,024 a program: 32 programs, 6 us on the H200)
            _sum_parts_kernel[(triton.cdiv(n, 256),)](p, oa, n, n_split, p.stride(0), BLOCK=256, num_warps=2,
                                                      **pdl.options())
    return out
