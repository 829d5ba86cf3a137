"""Batch-invariant dense GEMM: y = x @ W.T (+ b) with one tile config per weight for every M.

cuBLAS picks its kernel (tiles, split-K, stream-K) by the problem's M, and the skinny kernel
(linear.py) sums K in another order than any tensor-core tile, so in the normal backend a row's
bits depend on how many rows share the call. Here every output element is one tl.dot
accumulation over K in BLOCK_K steps, in ascending order, inside a tile whose config is a
function of (N, K, dtype, device) only (`gemm_config`): M = 1 and M = 8192 run the same compiled
kernel, and the rows of a tensor-core tile never mix, so row i gets the same bits wherever it sits
and whatever else is in the batch. Programs go in groups of GROUP_M row tiles per weight tile so
that a weight tile is read from HBM about once per group (the others hit L2).

A config is block_m, block_n, block_k, num_warps, num_stages and three variant keys (defaults in
VARIANT_DEFAULTS; invariant_gemm_kernels.py has the kernels):
  tma         tiles loaded by TMA (host-side tensor descriptors) instead of pointer loads; a
              weight TMA cannot address (base or row stride not 16-byte aligned) or a GPU before
              Hopper takes the pointer loads of the same tile, whatever M; an input it cannot
              address is copied to an aligned one first (so its rows take the same path).
  split_k     S > 1: K cut into S fixed parts (from K and block_k only), float32 partials
              summed in part order (never atomics on data) by a second kernel, or
  fold_last   by the program that finishes a tile's last part (a counter per tile; same bits);
  persistent  one program per SM, each striding over the tiles.
None of them looks at M, so any config keeps the invariance.

The config rule is a starting point for the H200 (bench/batch_invariant.py --gemm --sweep times
candidates at the workloads' shapes; `TUNED` takes per-(N, K, dtype) overrides; MEASURED holds
what the sweep found per device).
"""
from __future__ import annotations

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from atom.ops.triton.invariant_gemm_kernels import gemm_kernel, sum_parts_kernel
from atom.ops.device import device_name
from atom.ops.triton.linear import _num_sms, gemm_output

GROUP_M = 8
# Per-weight overrides {(n, k, element size): config}, e.g. from the sweep (checked by _check_cfg).
TUNED: dict[tuple[int, int, int], dict] = {}


VARIANT_DEFAULTS = dict(tma=False, split_k=1, fold_last=False, persistent=False)


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, **variant) -> dict:
    return dict(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                **{**VARIANT_DEFAULTS, **variant})


# Measured per device: {device name: {(n, k, element size): config}}, the workload-weighted best
# of `bench.batch_invariant --gemm grpo-dense-8b --sweep` (29 tile / TMA / split-K / persistent
# candidates; 1,024 calls at M = 512 and 16 at M = 8192 per rollout) on the H200 (2026-12-02).
# Seconds per grpo-dense-8b rollout, all layers, chosen / cuBLAS: qkv 3.69 / 2.12, o_proj
# 2.60 / 1.64, gate_up 9.10 / 7.03, down 4.94 / 3.58, lm_head 1.07 / 0.86. With them the
# batch-invariant mode costs 19.1% of grpo-dense-8b (13,779 vs 17,041 tok/s). Others take the rule.
MEASURED: dict[str, dict[tuple[int, int, int], dict]] = {
    "NVIDIA H200": {
        (6144, 4096, 2): _cfg(128, 128, 64, 8, 4),      # Qwen3-8B qkv
        (4096, 4096, 2): _cfg(128, 128, 64, 8, 4),      # o_proj
        (24576, 4096, 2): _cfg(128, 128, 64, 8, 4),     # gate_up
        (4096, 12288, 2): _cfg(128, 128, 64, 8, 4),     # down
        (151936, 4096, 2): _cfg(128, 128, 64, 8, 4, tma=True, persistent=True),  # lm_head
    },
}


def _device_name(device: torch.device) -> str:
    # the interpreter (CPU tensors) gets the configs an H200 would get, as _num_sms does
    return device_name(device) if device.type == "cuda" else "NVIDIA H200"


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
    The rule's configs take VARIANT_DEFAULTS (pointer loads, no split, a tile per program).
    """
    tuned = TUNED.get((n, k, elem_size)) or MEASURED.get(device_name, {}).get((n, k, elem_size))
    if tuned is not None:
        return {**VARIANT_DEFAULTS, **tuned}
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
    return {**cfg, **VARIANT_DEFAULTS}


def _check_cfg(cfg: dict) -> None:
    for key in ("block_m", "block_n", "block_k"):
        v = cfg[key]
        if v < 16 or v & (v - 1):
            raise ValueError(f"invariant GEMM config: {key} must be a power of two >= 16, got {v}")
    if not isinstance(cfg["split_k"], int) or cfg["split_k"] < 1:
        raise ValueError(f"invariant GEMM config: split_k must be an integer >= 1, got {cfg['split_k']!r}")
    for key in ("tma", "fold_last", "persistent"):
        if not isinstance(cfg[key], bool):
            raise ValueError(f"invariant GEMM config: {key} must be a bool, got {cfg[key]!r}")


def split_parts(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(columns per K part, number of parts) of a config: whole BLOCK_K steps per part, no empty
    part (K = 4096 in 64-wide steps split 3 ways: 22 + 22 + 20 steps). From K and the config only."""
    steps = triton.cdiv(k, block_k)
    per = triton.cdiv(steps, min(split_k, steps))
    return per * block_k, triton.cdiv(steps, per)


_TMA_CAPABLE: dict[int, bool] = {}


def _tma_capable(device: torch.device) -> bool:
    """Hopper or later (the interpreter emulates TMA)."""
    if device.type != "cuda":
        return True
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _TMA_CAPABLE:
        _TMA_CAPABLE[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return _TMA_CAPABLE[idx]


def _aligned(t: torch.Tensor) -> bool:
    """TMA addresses t's rows: 16-byte aligned base and row stride."""
    return t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def invariant_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   config: dict | None = None) -> torch.Tensor:
    """x [M, K] (unit last stride) @ weight [N, K].T (unit last stride) + bias, in x's dtype.
    `config` replaces gemm_config (benchmarks, tests); the op never passes one."""
    out, done = gemm_output(x, weight, bias)
    if done:
        return out
    (m, k), n = x.shape, weight.shape[0]
    cfg = {**VARIANT_DEFAULTS, **(config or gemm_config(n, k, weight.element_size(), _num_sms(x.device),
                                                       _device_name(x.device)))}
    _check_cfg(cfg)
    bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    part_len, split = split_parts(k, bk, cfg["split_k"])
    # Whether TMA runs depends on the weight, K and the device only; an x TMA cannot address (a
    # view at an odd offset) is copied to a fresh, aligned tensor rather than loaded another way.
    tma = cfg["tma"] and _tma_capable(x.device) and _aligned(weight) and (k * x.element_size()) % 16 == 0
    if tma and not _aligned(x):
        x = x.clone()
    xa = TensorDescriptor(x, [m, k], [x.stride(0), 1], [bm, bk]) if tma else x
    wa = TensorDescriptor(weight, [n, k], [weight.stride(0), 1], [bn, bk]) if tma else weight
    # Split: float32 partials [split, M, N], summed (with the bias) by sum_parts_kernel or in-kernel.
    ws = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    fold = split > 1 and cfg["fold_last"]
    # fold_last: one arrival counter per output tile (zeroed per call: graph-safe, a memset node).
    count = torch.zeros(triton.cdiv(m, bm) * triton.cdiv(n, bn), dtype=torch.int32, device=x.device) if fold else out
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn) * split
    programs = _num_sms(x.device) if cfg["persistent"] else 0
    b = bias if bias is not None else out  # never read without a bias
    gemm_kernel[(min(tiles, programs) if programs else tiles,)](
        xa, wa, b, out, ws, count, m, n, k, x.stride(0), weight.stride(0), out.stride(0), part_len,
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=GROUP_M, EVEN_K=k % bk == 0,
        PREC="ieee" if x.dtype == torch.float32 else "tf32", TMA=tma, SPLIT=split, FOLD=fold, PROGRAMS=programs,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split > 1 and not fold:
        sum_parts_kernel[(triton.cdiv(m, SUM_BLOCK[0]), triton.cdiv(n, SUM_BLOCK[1]))](
            ws, b, out, m, n, out.stride(0), HAS_BIAS=bias is not None, SPLIT=split,
            BLOCK_M=SUM_BLOCK[0], BLOCK_N=SUM_BLOCK[1], num_warps=4)
    return out


SUM_BLOCK = (16, 256)  # sum_parts_kernel's tile (elementwise: any tile gives the same bits)
