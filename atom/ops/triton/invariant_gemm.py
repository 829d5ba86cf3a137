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

The config rule is a starting point for the H200 (bench/batch_invariant.py --gemm --sweep times
candidates at the workloads' shapes; `TUNED` takes per-(N, K, dtype) overrides: any choice that
does not look at M keeps the invariance; MEASURED holds what the sweep found per device).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops.triton.linear import _num_sms

GROUP_M = 8
# Per-weight overrides {(n, k, element size): config}, e.g. from the sweep (checked by _check_cfg).
TUNED: dict[tuple[int, int, int], dict] = {}


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> dict:
    return dict(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)


# Measured per device: {device name: {(n, k, element size): config}}, the fastest candidate at
# M = 512 (a rollout's decode batch, most of its GEMM time) of `bench.batch_invariant --gemm
# grpo-dense-8b --sweep` on the H200 (2026-12-02): Qwen3-8B's weights, 1.3-2x faster than the
# rule's choice there (qkv 145 -> 93 us, o_proj 75 -> 37 us). Shapes not listed take the rule.
MEASURED: dict[str, dict[tuple[int, int, int], dict]] = {
    "NVIDIA H200": {
        (6144, 4096, 2): _cfg(128, 128, 32, 4, 4),      # Qwen3-8B qkv
        (4096, 4096, 2): _cfg(64, 128, 64, 4, 4),       # o_proj
        (24576, 4096, 2): _cfg(128, 128, 64, 8, 4),     # gate_up
        (4096, 12288, 2): _cfg(128, 128, 64, 8, 4),     # down
        (151936, 4096, 2): _cfg(256, 128, 64, 8, 3),    # lm_head
    },
}
_NAMES: dict[int, str] = {}


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "NVIDIA H200"  # the interpreter: the configs an H200 would get (as _num_sms)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NAMES:
        _NAMES[idx] = torch.cuda.get_device_name(idx)
    return _NAMES[idx]


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


REF_ROWS = 512  # the decode batch the tile widths are chosen for (a rollout's ~512 sequences)
_WIDE = {256: dict(num_warps=8, num_stages=3), 128: dict(num_warps=8, num_stages=4),
         64: dict(num_warps=4, num_stages=4)}


def _wave_efficiency(tiles: int, num_sms: int) -> float:
    return tiles / (triton.cdiv(tiles, num_sms) * num_sms)


def gemm_config(n: int, k: int, elem_size: int, num_sms: int = 132, device_name: str = "NVIDIA H200") -> dict:
    """Tile config of an [M, k] x [n, k]^T product: a function of (n, k, dtype, device) only, never
    of M (that is the invariance). Keys: block_m, block_n, block_k, num_warps, num_stages.
    TUNED overrides first, then the device's MEASURED table, then this rule:

    16-bit weights: 128-row tiles (two warpgroups) and the widest of 256 / 128 / 64 columns whose
    last wave of tiles at REF_ROWS rows fills the SMs within 5% of the best width (8B qkv, 6144
    wide: 64 columns give 384 tiles, 2.9 full waves on 132 SMs, where 128 give 1.45); BLOCK_K 64.
    Narrow weights (routers) take 64 x 32 tiles. float32 (tests, fp32 engines): 64 x 64 x 32, ieee.
    """
    tuned = TUNED.get((n, k, elem_size)) or MEASURED.get(device_name, {}).get((n, k, elem_size))
    if tuned is not None:
        return dict(tuned)
    if elem_size >= 4:
        cfg = dict(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=3)
    elif n < 1024:
        cfg = dict(block_m=64, block_n=32, block_k=64, num_warps=4, num_stages=4)
    else:
        row_tiles = triton.cdiv(REF_ROWS, 128)
        eff = {bn: _wave_efficiency(row_tiles * triton.cdiv(n, bn), num_sms) for bn in _WIDE}
        best = max(eff.values())
        bn = next(bn for bn in _WIDE if eff[bn] >= best - 0.05)
        cfg = dict(block_m=128, block_n=bn, block_k=64, **_WIDE[bn])
    # Small weights (tiny test models): tiles no wider than the weight (tl.dot needs >= 16).
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
    cfg = config or gemm_config(n, k, weight.element_size(), _num_sms(x.device), _device_name(x.device))
    _check_cfg(cfg)
    bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _gemm_kernel[grid](x, weight, bias if bias is not None else weight, out, m, n, k,
                       x.stride(0), weight.stride(0), out.stride(0),
                       HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=GROUP_M,
                       EVEN_K=k % bk == 0, PREC="ieee" if x.dtype == torch.float32 else "tf32",
                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
