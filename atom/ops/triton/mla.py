"""Multi-head latent attention (DeepSeek-V3 / Moonlight) decode over the paged latent cache, and
the latent cache write, in Triton.

Cache: [num_blocks, block_size, 1, L + R], one row per token for all heads: the latent c (L =
kv_lora_rank) then the roped shared key k_pe (R = qk_rope_head_dim). The absorbed decode is
multi-query attention with one KV "head" of width L + R whose values are its first L columns:
score[h, t] = q_latent[h] . c_t + q_pe[h] . k_pe_t, out[h] = softmax(score[h]) . c (latent space;
the caller applies W_uv).

The programs follow the paged decode of atom/ops/triton/attention.py:
* own part (atom/ops/triton/mla_own.py): one program per (sequence, block of BLOCK_H = 16
  heads, split), the heads in the M dimension of the tiles and the whole latent width in the
  accumulator (four [16, L / 4] fp32 chunks; below 64 columns one [16, L]);
* shared prefix (`meta.cascade`, the n samples of a prompt): one program per (group, split,
  head block x value chunk) stacks the query heads of every member (up to the runner's MAX_N) in
  M, so the prompt's latents are read once per group. A [64, 512] fp32 accumulator would not fit
  the registers: each program keeps `prefix_dv` latent columns of the output and recomputes the
  scores (the programs of a group's chunks run side by side and share the tiles through L2);
* partial (output, log-sum-exp) pairs combined by a merge kernel, or, from
  MLA_CFG["whole_own_pairs"] (sequence, head block) pairs on, folded in by own-part programs that
  cover the whole own part.
Grids depend on (batch, heads, max_seq_len, max_prefix_len, group rows) only: CUDA-graph safe.
Dimensions below 16 (tiny test models) are padded with masked lanes (tl.dot's minimum).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops import torch_ops
from atom.ops.metadata import AttentionMetadata
from atom.ops.mla_prefill import mla_prefill
from atom.ops.registry import register
from atom.ops.triton import mla_two_pass as two_pass
from atom.ops.triton.mla_own import _mla_own_kernel, _mla_tile, _tile_blocks
from atom.ops.triton.mla_two_pass import prefix_split_program, prefix_tile_rows
from atom.ops.triton.attention import LOG2E, MAX_OWN_SPLITS, _prec
from atom.ops.triton import pdl
from atom.ops.triton.pdl import grid_dependency

B = "triton"

# Tile config for 2-byte activations (`python -m bench.mla_kernels --tune` sweeps it in bf16;
# `_widen` scales it for float32; scripts/compile_kernels.py checks every candidate fits).
# reuse_kv / prefix_reuse_kv: one load of each latent tile for the scores and the values
# (_mla_tile) in the own-part / prefix programs (the prefix's only when prefix_dv covers the
# latent). Session 8's H200 tuner: the whole latent per prefix program with one load per tile
# took the Moonlight bs512 decode from 377 to 283 us. Session 9's: the own part's one load per
# tile, 274 -> 248 us at bs512 and 356 -> 329 us at 128 heads (session 8's sweep: 378 -> 351).
# (Own-part programs holding a chunk of the latent columns, sessions 8-9, lost at every chunk
# size: 352 us at 256 columns, 527 at 128; removed. The own part with the heads in N, so that
# sm_90 runs wgmma m64n16k16 instead of mma.sync, session 10: 296-301 us against 250 at bs512
# on the H200 in session 11, and an illegal address at 20 heads; removed.)
# prefix_group: sequences per shared-prefix group (the decode runner asks cascade_group_rows;
# None: the generic 64 query rows, 4 at 16 heads, 2 at 128). Each group's prefix programs read
# the prompt's latents; with 8 (one GRPO prompt's samples) and prefix_heads 8, a group's two
# head-block programs read the same tiles side by side, so the prompt comes from DRAM about once
# instead of once per 4 samples, at the same tile shape and FLOPs. Session 12's H200 tuner: the
# 128-head bs64 decode 328 -> 236 us (the old rule's groups of 2 read each prompt 4x as often),
# Moonlight's 16 heads at bs512 249 -> 248 us (its prefix is bound by the scores' wgmma shape,
# not by DRAM); never a loss, so the default.
# prefix_two_pass / two_pass_*: the shared prefix as a scores kernel and a values kernel
# (atom/ops/triton/mla_two_pass.py: heads per row block, tokens per score tile, value columns
# per program, warps, stages), where the one-pass kernel's scores run as wgmma m64n16k16.
# The default since session 13's H200 tuner (64-token tiles, 256 value columns, 8 warps, 3
# stages): Moonlight's bs512 decode 248 -> 236 us, bs64 73 -> 66, the 128-head bs64 236 -> 210;
# grpo-mla-moe's prefix 120 -> 113 us a layer (51 scores + 62 values; predicted 55-75). Its p
# scratch is groups x head blocks x 128 rows x max_prefix_len in the cache dtype (CUDA graphs:
# bs / 2 groups, max_model_len: 134 MB at Moonlight's bs512 and 2,048 tokens, 8x at 128 heads);
# a call needing more than two_pass.MAX_SCRATCH_BYTES runs one pass.
# stages 3 and two_pass_value_tile: session 14's H200 tuner, with the own part's block ids and
# the values kernel's p loaded a tile ahead (without, Triton staged one tile at a time; ncu: 12%
# occupancy, no eligible warp in 69-76% of cycles): bs512 236 -> 202 us, bs64 66 -> 61, 128
# heads 210 -> 187; grpo-mla-moe 51.7% -> 52.5-54.5% (two runs).
# The own part's latent in four column chunks from 64 latent columns on (mla_own.py; sm_90
# ptxas 242 -> 146 registers at 32-token tiles): session 15's H200 tuner, bs512 209 -> 195 us,
# bs64 61 -> 60, 128 heads 194 -> 171 (16-token tiles, 8 warps or 4 stages all lost). Neither a
# register cap on the two-pass scores kernel (80 / 72: [189, 62, 171] against [195, 60, 171]) nor
# the values kernel taking each split's row max first ([194, 60, 170]) beat the tuner's margin:
# both removed. Session 15 also tried the values kernel as 64-row, 4-warp programs two to an SM
# (its wgmma waits right after issue; one 8-warp program an SM): [201-217, 56-58, 167-179] us
# against [189, 57, 161]; removed. Session 16: the scores kernel persistent over the items with
# tokens (two or three programs an SM) against its padded grid: [196, 60, 171] / [207, 60, 179]
# against [184, 60, 161]; removed. Score tiles of 128 tokens against 64: [179, 61, 156] against
# [188, 57, 162]: a program reads its query rows once per tile, fewer tiles read them less often,
# but at bs64 x 16 heads (8 groups) half the SMs then idle: two_pass_wide_tile from
# two_pass_wide_rows batch rows x heads on (bs512 x 16, bs64 x 128).
MLA_CFG = {"split": 256, "small_split": 64, "small_batch_pairs": 64, "block_n": 32, "warps": 4, "stages": 3,
           "prefix_split": 1024, "small_prefix_split": 256, "small_prefix_pairs": 64, "prefix_block_n": 32,
           "prefix_dv": 512, "prefix_heads": 8, "prefix_warps": 8, "prefix_stages": 2,
           "whole_own_pairs": 256, "reuse_kv": True, "prefix_reuse_kv": True, "prefix_group": 8,
           "prefix_two_pass": True, "two_pass_heads": 16, "two_pass_tile": 64, "two_pass_dv": 256,
           "two_pass_warps": 8, "two_pass_stages": 3, "two_pass_value_tile": 64,
           "two_pass_wide_tile": 128, "two_pass_wide_rows": 4096}
BLOCK_H = 16  # query heads of one sequence per own-part program


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _widen(dtype: torch.dtype) -> int:
    """How many times the bytes of the 2-byte elements MLA_CFG's tiles are sized for: float32
    divides the query rows and the cache tokens of a tile by it, so that every tile keeps its
    bytes. (An H200 block has 227 KiB of shared memory; at Moonlight's shape the float32 query
    tile of 64 rows x 512 latents alone took 128 KiB and the prefix kernel 256 KiB.)"""
    return max(1, dtype.itemsize // 2)


# ---- shared prefix ----------------------------------------------------------------------------

@triton.jit
def _mla_prefix_kernel(ql_ptr, qp_ptr, c_ptr, bt_ptr, rows_ptr, plen_ptr, po_ptr, pl_ptr,
                       sql0, sql1, sqp0, sqp1, scb, sct, sbt, sp0, sp1, sp2, sl0, sl1, srow, scale_log2,
                       H: tl.constexpr, HB: tl.constexpr, MAX_N: tl.constexpr, N_DV: tl.constexpr,
                       BLOCK_M: tl.constexpr, L: tl.constexpr, R: tl.constexpr, BLOCK_L: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                       SPLIT: tl.constexpr, PREC: tl.constexpr, REUSE_KV: tl.constexpr, PDL: tl.constexpr = False):
    """One (group, split, head block x value chunk) of a shared prefix: HB heads of every member
    in one tile of BLOCK_M rows (member = row // HB)."""
    grid_dependency(PDL)
    g, s, hb, v0, lo, hi = prefix_split_program(plen_ptr, N_DV, BLOCK_DV, SPLIT)
    if lo < hi:
        mrow, heads, rm, first = prefix_tile_rows(rows_ptr, g, srow, hb, HB, MAX_N, BLOCK_M, H)
        lat = tl.arange(0, BLOCK_L)
        rp = tl.arange(0, BLOCK_R)
        q_lat = tl.load(ql_ptr + mrow[:, None] * sql0 + heads[:, None] * sql1 + lat[None, :],
                        mask=rm[:, None] & (lat < L)[None, :], other=0.0)
        q_pe = tl.load(qp_ptr + mrow[:, None] * sqp0 + heads[:, None] * sqp1 + rp[None, :],
                       mask=rm[:, None] & (rp < R)[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        bt_row = bt_ptr + first * sbt
        for n0 in range(lo, hi, BLOCK_N):
            blk = _tile_blocks(bt_row, n0, hi, BLOCK_N, PAGE)
            m_i, l_i, acc = _mla_tile(q_lat, q_pe, c_ptr, blk, n0, hi, scb, sct, scale_log2, m_i, l_i, acc, v0,
                                      L, R, BLOCK_L, BLOCK_R, BLOCK_DV, BLOCK_N, PAGE, PREC, REUSE_KV)
        dv = v0 + tl.arange(0, BLOCK_DV)
        tl.store(po_ptr + mrow[:, None] * sp0 + heads[:, None] * sp1 + s * sp2 + dv[None, :], acc / l_i[:, None],
                 mask=rm[:, None] & (dv < L)[None, :])
        tl.store(pl_ptr + mrow * sl0 + heads * sl1 + s, m_i + tl.log2(l_i), mask=rm & (v0 == 0))


# ---- merge ------------------------------------------------------------------------------------

@triton.jit
def _mla_merge_kernel(po_ptr, pl_ptr, sl_ptr, start_ptr, o_ptr, sp0, sp1, sp2, sl0, sl1, so0, so1,
                      n_prefix, n_own, L: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr,
                      SPLIT: tl.constexpr, SPLIT_P: tl.constexpr, HAS_START: tl.constexpr,
                      ORDERED: tl.constexpr = False, PDL: tl.constexpr = False):
    """One (sequence, head): the weighted sum of its valid partials (a row without any: zeros).
    ORDERED (batch-invariant mode): the weights' total summed one partial at a time in partial
    order, as the values are (tl.sum's tree follows BLOCK_S, i.e. the batch's max_seq_len)."""
    grid_dependency(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    seq_len = tl.load(sl_ptr + b).to(tl.int32)
    start = 0
    if HAS_START:
        start = tl.load(start_ptr + b).to(tl.int32)
    s = tl.arange(0, BLOCK_S)
    own = s - n_prefix
    valid = ((s < n_prefix) & (s * SPLIT_P < start)) | ((s >= n_prefix) & (own < n_own) & (start + own * SPLIT < seq_len))
    lse = tl.load(pl_ptr + b * sl0 + h * sl1 + s, mask=valid, other=float("-inf"))
    mx = tl.max(lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    total = tl.sum(tl.where(valid, tl.exp2(lse - mx), 0.0), 0)
    lat = tl.arange(0, BLOCK_L)
    acc = tl.zeros([BLOCK_L], tl.float32)
    run = mx * 0.0
    for j in range(0, n_prefix + n_own):  # one partial at a time: [parts, L] would not fit the registers
        if j < n_prefix:
            ok = j * SPLIT_P < start
        else:
            ok = start + (j - n_prefix) * SPLIT < seq_len
        if ok:
            wj = tl.exp2(tl.load(pl_ptr + b * sl0 + h * sl1 + j) - mx)
            acc += wj * tl.load(po_ptr + b * sp0 + h * sp1 + j * sp2 + lat, mask=lat < L, other=0.0)
            if ORDERED:
                run += wj
    if ORDERED:
        total = run
    tl.store(o_ptr + b * so0 + h * so1 + lat, (acc / tl.maximum(total, 1e-30)).to(o_ptr.dtype.element_ty),
             mask=lat < L)


# ---- the op -----------------------------------------------------------------------------------

@register("cascade_group_rows", B)
def cascade_group_rows(decode_op: str, heads_per_kv: int) -> int:
    """torch_ops.cascade_group_rows, but MLA_CFG["prefix_group"] for this backend's MLA decode."""
    if decode_op == "mla_attention_decode" and MLA_CFG["prefix_group"]:
        return MLA_CFG["prefix_group"]
    return torch_ops.cascade_group_rows(decode_op, heads_per_kv)


def _own_split(pairs: int, max_seq_len: int) -> int:
    """KV tokens per own-part split: by the batch's size class and the context bound only."""
    split = MLA_CFG["small_split"] if pairs < MLA_CFG["small_batch_pairs"] else MLA_CFG["split"]
    floor = triton.cdiv(triton.cdiv(max(max_seq_len, 1), MAX_OWN_SPLITS), 64) * 64
    return max(split, floor)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@register("mla_attention_decode", B, "cascade")
def mla_attention_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                         meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The torch op's absorbed MLA decode (q_latent [B, H, L], q_pe [B, H, R], kv_cache
    [num_blocks, block_size, 1, L + R]; returns [B, H, L]), reading shared prefixes once per
    group when `meta.cascade` is set; padded rows (seq_len 0) give zeros. Loads past a
    sequence's length are masked, so unlike the torch op it needs no zeroed blocks."""
    return mla_decode(q_latent, q_pe, kv_cache, meta, scale)


def mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, fixed_split: int | None = None) -> torch.Tensor:
    """mla_attention_decode; with `fixed_split` (batch-invariant mode, atom/ops/triton/invariant_mla.py)
    every row's own part is cut into splits of that many tokens at absolute positions from 0, never
    folded in-kernel, no shared-prefix groups, and the merge sums a row's valid partials in order:
    a row's bits then depend on its own query, context and seq_len only."""
    bsz, heads, lat_dim = q_latent.shape
    rope = q_pe.shape[2]
    if kv_cache.shape[-1] != lat_dim + rope or kv_cache.shape[2] != 1:
        raise ValueError(f"mla_attention_decode: cache rows {tuple(kv_cache.shape)} do not hold a latent of "
                         f"{lat_dim} and a rope key of {rope}")
    out = torch.empty(q_latent.shape, dtype=q_latent.dtype, device=q_latent.device)
    if bsz == 0:
        return out
    q_latent, q_pe = _unit_stride(q_latent), _unit_stride(q_pe)
    cfg, page, wide = MLA_CFG, kv_cache.shape[1], _widen(q_latent.dtype)
    casc = getattr(meta, "cascade", None) if fixed_split is None else None
    n_hb = triton.cdiv(heads, BLOCK_H)
    whole = fixed_split is None and bsz * n_hb >= cfg["whole_own_pairs"]
    split = fixed_split or _own_split(bsz * n_hb, meta.max_seq_len)
    n_own = 1 if whole else max(1, triton.cdiv(max(meta.max_seq_len, 1), split))
    n_prefix, split_p = 0, 1
    if casc is not None:
        small = casc.group_rows.shape[0] * n_hb < cfg["small_prefix_pairs"]
        split_p = cfg["small_prefix_split"] if small else cfg["prefix_split"]
        n_prefix = triton.cdiv(casc.max_prefix_len, split_p)
    n_parts = n_prefix if whole else n_prefix + n_own
    shape = (bsz, heads, n_parts) if n_parts else (1, 1, 1)  # whole own parts, no prefix: no partials
    po = torch.empty((*shape, lat_dim), dtype=torch.float32, device=q_latent.device)
    pl = torch.empty(shape, dtype=torch.float32, device=q_latent.device)
    dims = dict(L=lat_dim, R=rope, BLOCK_L=_pow2(lat_dim), BLOCK_R=_pow2(rope), PAGE=page, PREC=_prec(q_latent.dtype))
    common = (q_latent.stride(0), q_latent.stride(1), q_pe.stride(0), q_pe.stride(1), kv_cache.stride(0),
              kv_cache.stride(1), meta.block_tables.stride(0), po.stride(0), po.stride(1), po.stride(2),
              pl.stride(0), pl.stride(1))
    scale_log2 = scale * LOG2E
    if n_prefix:
        _launch_prefix(q_latent, q_pe, kv_cache, meta, po, pl, common, scale_log2, split_p, n_prefix, dims)
    start = casc.row_prefix_len if casc is not None else meta.seq_lens
    _mla_own_kernel[(bsz, n_hb, n_own)](
        q_latent, q_pe, kv_cache, meta.block_tables, meta.seq_lens, start, po, pl, out, *common,
        out.stride(0), out.stride(1), n_prefix, scale_log2, H=heads, BH=BLOCK_H,
        BLOCK_N=max(16, cfg["block_n"] // wide), SPLIT=split, HAS_START=casc is not None, WHOLE=whole,
        SPLIT_P=split_p, REUSE_KV=cfg["reuse_kv"], CHUNKS=dims["BLOCK_L"] >= 64,
        num_warps=cfg["warps"], num_stages=cfg["stages"], **dims, **pdl.options())
    if not whole:
        _mla_merge_kernel[(bsz, heads)](
            po, pl, meta.seq_lens, start, out, po.stride(0), po.stride(1), po.stride(2), pl.stride(0), pl.stride(1),
            out.stride(0), out.stride(1), n_prefix, n_own, L=lat_dim, BLOCK_L=dims["BLOCK_L"],
            BLOCK_S=triton.next_power_of_2(n_prefix + n_own), SPLIT=split, SPLIT_P=split_p,
            HAS_START=casc is not None, ORDERED=fixed_split is not None, num_warps=4, **pdl.options())
    return out


def _launch_prefix(q_latent, q_pe, kv_cache, meta, po, pl, common, scale_log2, split_p, n_prefix, dims) -> None:
    cfg, heads, wide = MLA_CFG, q_latent.shape[1], _widen(q_latent.dtype)
    rows = meta.cascade.group_rows
    tile = two_pass.tile_tokens(cfg, wide, split_p, heads, *rows.shape, meta.cascade.max_prefix_len,
                                q_latent.shape[0]) \
        if cfg["prefix_two_pass"] else 0
    if tile:
        two_pass.launch_prefix(q_latent, q_pe, kv_cache, meta, po, pl, common, scale_log2, split_p, n_prefix, dims,
                               cfg, wide, tile)
        return
    max_n = rows.shape[1]
    hb = min(heads, max(1, cfg["prefix_heads"] // wide))
    block_dv = min(_pow2(cfg["prefix_dv"]), dims["BLOCK_L"])
    n_dv = triton.cdiv(dims["L"], block_dv)
    grid = (triton.cdiv(heads, hb) * n_dv, n_prefix, rows.shape[0])  # prefix_split_program's order
    _mla_prefix_kernel[grid](
        q_latent, q_pe, kv_cache, meta.block_tables, rows, meta.cascade.group_prefix_len, po, pl, *common,
        rows.stride(0), scale_log2, H=heads, HB=hb, MAX_N=max_n, N_DV=n_dv, BLOCK_M=_pow2(max_n * hb),
        BLOCK_DV=block_dv, BLOCK_N=max(16, cfg["prefix_block_n"] // wide), SPLIT=split_p,
        REUSE_KV=cfg["prefix_reuse_kv"] and n_dv == 1, num_warps=cfg["prefix_warps"], num_stages=cfg["prefix_stages"],
        **dims, **pdl.options())


# ---- cache write ------------------------------------------------------------------------------

@triton.jit
def _mla_write_kernel(lat_ptr, pe_ptr, c_ptr, slot_ptr, sl0, sp0, scb, sct, L: tl.constexpr, R: tl.constexpr,
                      BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, PAGE: tl.constexpr, PDL: tl.constexpr = False):
    grid_dependency(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        dst = c_ptr + (slot // PAGE) * scb + (slot % PAGE) * sct
        lat = tl.arange(0, BLOCK_L)
        rp = tl.arange(0, BLOCK_R)
        x = tl.load(lat_ptr + t * sl0 + lat, mask=lat < L)
        tl.store(dst + lat, x.to(c_ptr.dtype.element_ty), mask=lat < L)
        y = tl.load(pe_ptr + t * sp0 + rp, mask=rp < R)
        tl.store(dst + L + rp, y.to(c_ptr.dtype.element_ty), mask=rp < R)


@register("mla_cache_write", B)
def mla_cache_write(latent: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """The torch op's write (latent [T, L] | k_pe [T, R] into the row of each slot; -1 = skip),
    without its boolean indexing (a host sync): CUDA-graph safe."""
    t, lat_dim = latent.shape
    rope = k_pe.shape[1]
    if kv_cache.shape[-1] != lat_dim + rope:
        raise ValueError(f"mla_cache_write: cache rows of {kv_cache.shape[-1]} values, latent {lat_dim} + rope {rope}")
    if t == 0:
        return
    latent, k_pe = _unit_stride(latent), _unit_stride(k_pe)
    _mla_write_kernel[(t,)](latent, k_pe, kv_cache, slot_mapping, latent.stride(0), k_pe.stride(0),
                            kv_cache.stride(0), kv_cache.stride(1), L=lat_dim, R=rope, BLOCK_L=_pow2(lat_dim),
                            BLOCK_R=_pow2(rope), PAGE=kv_cache.shape[1], num_warps=4, **pdl.options())


# ---- prefill ----------------------------------------------------------------------------------

@register("mla_attention_prefill", B)
def mla_attention_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, w_kv_b: torch.Tensor,
                          meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The torch op's expanded MLA prefill (q_nope [T, H, N], q_pe [T, H, R]; returns [T, H, V]),
    fast: per group of sequences one expansion GEMM and one flash attention call; sequences with
    few new tokens take the absorbed decode above, one row per token (atom/ops/mla_prefill.py).
    Reads only each sequence's first seq_len slots: no zeroed blocks needed."""
    return mla_prefill(q_nope, q_pe, kv_cache, w_kv_b, meta, scale, mla_attention_decode)
