"""The MLA decode's shared-prefix part in two passes (MLA_CFG["prefix_two_pass"]), for groups of
many query rows (one prompt's samples x a block of heads: 8 x 16 = 128 at Moonlight's shape).

Why: the one-pass prefix program (atom/ops/triton/mla.py) holds a [64, 512] fp32 accumulator
over two warpgroups, so Triton splits the scores' N over them and sm_90 runs the scores as
`wgmma m64n16k16` (session 11's compile), about a quarter of the tensor cores' rate; a larger
tile does not fit. Two kernels with small accumulators each get full-size tiles:

* scores: one program per (group, tile of T prefix tokens, head block) computes
  S = q [BLOCK_M, L + R] . cache rows^T with a loop over the latent width (each warpgroup 64
  rows x T tokens), and writes p = 2^(S - m) in the cache dtype with the tile's row max m and
  row sum l (the one-pass kernel rounds p to the same dtype before its value product);
* values: one program per (group, split, head block x value chunk of `two_pass_dv` columns)
  sums p . values over its split in steps of `two_pass_value_tile` tokens, rescaling each score
  tile from its own max to the running one, and writes the same (output, log-sum-exp) partials
  as the one-pass kernel, which the own-part / merge kernels fold in unchanged.

The p scratch ([groups, head blocks, BLOCK_M, tiles x T]) is sized by the grid (groups of the
padded batch, max_prefix_len), like the partials: CUDA-graph safe; above MAX_SCRATCH_BYTES the
one-pass kernel runs.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from atom.ops.triton.mla_own import _tile_blocks
from atom.ops.triton import pdl
from atom.ops.triton.pdl import grid_dependency


@triton.jit
def prefix_tile_rows(rows_ptr, g, srow, hb, HB: tl.constexpr, MAX_N: tl.constexpr, BLOCK_M: tl.constexpr,
                     H: tl.constexpr):
    """A shared-prefix tile's rows (both prefix forms): row r is head hb * HB + r % HB of group
    g's member r // HB. Returns (batch row, head, valid) per row (invalid rows read row 0) and
    the group's first member, whose block-table row holds the prefix."""
    r = tl.arange(0, BLOCK_M)
    member = r // HB
    heads = hb * HB + r % HB
    mrow = tl.load(rows_ptr + g.to(tl.int64) * srow + member, mask=member < MAX_N, other=-1)
    rm = (mrow >= 0) & (heads < H)
    first = tl.load(rows_ptr + g.to(tl.int64) * srow).to(tl.int64)
    return tl.where(rm, mrow, 0).to(tl.int64), heads, rm, first


@triton.jit
def prefix_split_program(plen_ptr, N_DV: tl.constexpr, BLOCK_DV: tl.constexpr, SPLIT: tl.constexpr):
    """This program's place in a (head blocks x value chunks, splits, groups) prefix grid (both
    prefix forms): group, split, head block, first value column, and its tokens [lo, hi). The
    value chunks of one (group, split) come first in launch order, next to each other, so the
    ones after the first find its p tiles (the two-pass values kernel) in L2: with groups first,
    a whole sweep of every group's p and latents (~50 MB at grpo-mla-moe's bs512) came between."""
    z = tl.program_id(0)
    s = tl.program_id(1)
    g = tl.program_id(2)
    lo = s * SPLIT
    hi = tl.minimum(lo + SPLIT, tl.load(plen_ptr + g).to(tl.int32))
    return g, s, z // N_DV, (z % N_DV) * BLOCK_DV, lo, hi


@triton.jit
def _prefix_scores_kernel(ql_ptr, qp_ptr, c_ptr, bt_ptr, rows_ptr, plen_ptr, p_ptr, st_ptr,
                          sql0, sql1, sqp0, sqp1, scb, sct, sbt, srow, spg, sph, spr, ssg, ssh, sss, sst,
                          scale_log2, H: tl.constexpr, HB: tl.constexpr, MAX_N: tl.constexpr,
                          BLOCK_M: tl.constexpr, L: tl.constexpr, R: tl.constexpr, BLOCK_L: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, T: tl.constexpr, PAGE: tl.constexpr,
                          PREC: tl.constexpr, PDL: tl.constexpr = False):
    """A grid of (groups, tiles, head blocks): score tile t (tokens [t T, (t + 1) T)) of group g,
    head block hb. The graphs' grids are sized by the padded batch's bs / 2 groups and
    max_model_len (at grpo-mla-moe's bs512, 8,192 programs of which 1,024 have work); session
    16's H200 tuner measured a persistent form over the items with tokens (two programs an SM)
    slower by 4.5-8%: removed."""
    grid_dependency(PDL)
    g = tl.program_id(0)
    t = tl.program_id(1)
    hb = tl.program_id(2)
    plen = tl.load(plen_ptr + g).to(tl.int32)
    n0 = t * T
    if n0 < plen:
        mrow, heads, rm, first = prefix_tile_rows(rows_ptr, g, srow, hb, HB, MAX_N, BLOCK_M, H)
        offs = n0 + tl.arange(0, T)
        nm = offs < plen
        crow = _tile_blocks(bt_ptr + first * sbt, n0, plen, T, PAGE) * scb + (offs % PAGE).to(tl.int64) * sct
        s = tl.zeros([BLOCK_M, T], tl.float32)
        for k0 in tl.range(0, BLOCK_L, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            q = tl.load(ql_ptr + mrow[:, None] * sql0 + heads[:, None] * sql1 + kk[None, :],
                        mask=rm[:, None] & (kk < L)[None, :], other=0.0)
            k = tl.load(c_ptr + crow[None, :] + kk[:, None], mask=nm[None, :] & (kk < L)[:, None], other=0.0)
            s = tl.dot(q, k, acc=s, input_precision=PREC)
        rp = tl.arange(0, BLOCK_R)
        q_pe = tl.load(qp_ptr + mrow[:, None] * sqp0 + heads[:, None] * sqp1 + rp[None, :],
                       mask=rm[:, None] & (rp < R)[None, :], other=0.0)
        kpe = tl.load(c_ptr + crow[None, :] + L + rp[:, None], mask=nm[None, :] & (rp < R)[:, None], other=0.0)
        s = tl.dot(q_pe, kpe, acc=s, input_precision=PREC)
        s = tl.where(nm[None, :], s * scale_log2, float("-inf"))
        m = tl.max(s, 1)
        p = tl.exp2(s - m[:, None])
        r = tl.arange(0, BLOCK_M)
        base = g.to(tl.int64) * spg + hb * sph
        tl.store(p_ptr + base + r[:, None] * spr + offs[None, :], p.to(p_ptr.dtype.element_ty))
        sbase = st_ptr + g.to(tl.int64) * ssg + hb * ssh + t * sst + r
        tl.store(sbase, m)
        tl.store(sbase + sss, tl.sum(p, 1))


@triton.jit
def _values_tile(c_ptr, bt_row, p_ptr, sbase, n0, hi, scb, sct, spr, sss, sst, r, dv, L: tl.constexpr,
                 T: tl.constexpr, TV: tl.constexpr, PAGE: tl.constexpr):
    """The values kernel's inputs for tokens [n0, n0 + TV): the value rows' cache offsets, their
    mask, p, and the row max / sum of the score tile of T tokens they are in (the sum only at a
    score tile's first step, zeros elsewhere; all masked past hi)."""
    offs = n0 + tl.arange(0, TV)
    nm = offs < hi
    crow = _tile_blocks(bt_row, n0, hi, TV, PAGE) * scb + (offs % PAGE).to(tl.int64) * sct
    # p is read whole tiles at a time (no token mask): the scores kernel wrote every column of a
    # tile it ran (0 past the prefix), and columns past hi meet masked (zero) value rows. A mask
    # along the tokens kept Triton from vectorising: 32 scalar 16-bit loads a thread a step.
    p = tl.load(p_ptr + r[:, None] * spr + offs[None, :], mask=n0 < hi, other=0.0)
    t = n0 // T
    live = (r >= 0) & (n0 < hi)
    m_t = tl.load(sbase + t * sst, mask=live, other=0.0)
    l_t = tl.load(sbase + t * sst + sss, mask=live & (n0 % T == 0), other=0.0)
    return crow, nm, p, m_t, l_t


@triton.jit
def _prefix_values_kernel(c_ptr, bt_ptr, rows_ptr, plen_ptr, p_ptr, st_ptr, po_ptr, pl_ptr,
                          scb, sct, sbt, srow, spg, sph, spr, ssg, ssh, sss, sst, sp0, sp1, sp2, sl0, sl1,
                          H: tl.constexpr, HB: tl.constexpr, MAX_N: tl.constexpr, N_DV: tl.constexpr,
                          BLOCK_M: tl.constexpr, L: tl.constexpr, BLOCK_DV: tl.constexpr, T: tl.constexpr,
                          TV: tl.constexpr, PAGE: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
                          PDL: tl.constexpr = False):
    """Steps of TV tokens (T, the score tile, a multiple of TV). The next step's p, row
    statistics and block ids are loaded a step ahead, into registers: p is rescaled before its
    product, so Triton's pipeliner never staged it (session 14's H200: 216 -> 202 us at bs512)."""
    grid_dependency(PDL)
    g, s, hb, v0, lo, hi = prefix_split_program(plen_ptr, N_DV, BLOCK_DV, SPLIT)
    if lo < hi:
        mrow, heads, rm, first = prefix_tile_rows(rows_ptr, g, srow, hb, HB, MAX_N, BLOCK_M, H)
        r = tl.arange(0, BLOCK_M)
        dv = v0 + tl.arange(0, BLOCK_DV)
        pg = p_ptr + g.to(tl.int64) * spg + hb * sph
        sbase = st_ptr + g.to(tl.int64) * ssg + hb * ssh + r
        bt_row = bt_ptr + first * sbt
        m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_run = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        crow, nm, p, m_t, l_t = _values_tile(c_ptr, bt_row, pg, sbase, lo, hi, scb, sct, spr, sss, sst, r, dv,
                                             L, T, TV, PAGE)
        for n0 in range(lo, hi, TV):
            nxt = _values_tile(c_ptr, bt_row, pg, sbase, n0 + TV, hi, scb, sct, spr, sss, sst, r, dv, L, T, TV, PAGE)
            v = tl.load(c_ptr + crow[:, None] + dv[None, :], mask=nm[:, None] & (dv < L)[None, :], other=0.0)
            m_new = tl.maximum(m_run, m_t)
            a = tl.exp2(m_run - m_new)
            c = tl.exp2(m_t - m_new)
            # p rescaled to the running max before the product, so that the dot accumulates
            # into acc (a separate [BLOCK_M, BLOCK_DV] product spilled at 128 x 256 on sm_90)
            pv = (p.to(tl.float32) * c[:, None]).to(v.dtype)
            acc = tl.dot(pv, v, acc=acc * a[:, None], input_precision=PREC)
            l_run = l_run * a + l_t * c
            m_run = m_new
            crow, nm, p, m_t, l_t = nxt
        tl.store(po_ptr + mrow[:, None] * sp0 + heads[:, None] * sp1 + s * sp2 + dv[None, :], acc / l_run[:, None],
                 mask=rm[:, None] & (dv < L)[None, :])
        tl.store(pl_ptr + mrow * sl0 + heads * sl1 + s, m_run + tl.log2(l_run), mask=rm & (v0 == 0))


# The most p scratch one call may take. The KV budget's graph term (cuda_graph.activation_bytes)
# keeps 512 MB of slack and does not count this scratch, so a call that would need more (e.g.
# 128 heads at batch 512: 1 GB) runs the one-pass kernel instead: a choice from shapes only.
MAX_SCRATCH_BYTES = 256 << 20


def _rows(cfg: dict, wide: int, heads: int, max_n: int) -> tuple[int, int, int]:
    """(heads per row block, head blocks, rows per tile)."""
    hb = min(heads, max(1, cfg["two_pass_heads"] // wide))
    return hb, triton.cdiv(heads, hb), max(16, triton.next_power_of_2(max_n * hb))


def tile_tokens(cfg: dict, wide: int, split_p: int, heads: int, groups: int, max_n: int, max_prefix_len: int,
                batch: int = 0) -> int:
    """Prefix tokens per score tile, or 0 for the one-pass kernel: cfg's size for 2-byte elements
    (`two_pass_wide_tile` from `two_pass_wide_rows` batch rows x heads on, else `two_pass_tile`;
    batch 0: the narrow one),
    divided by `wide`, and a divisor of the split (a value program sums whole tiles); 0 when that
    is below tl.dot's 16 or the p scratch would pass MAX_SCRATCH_BYTES."""
    size = cfg["two_pass_wide_tile"] if batch * heads >= cfg["two_pass_wide_rows"] else cfg["two_pass_tile"]
    t = math.gcd(max(16, size // wide), split_p)
    _, n_hb, block_m = _rows(cfg, wide, heads, max_n)
    scratch = groups * n_hb * block_m * triton.cdiv(max(max_prefix_len, 1), t) * t * 2 * wide
    return t if t >= 16 and scratch <= MAX_SCRATCH_BYTES else 0


def launch_prefix(q_latent, q_pe, kv_cache, meta, po, pl, common, scale_log2, split_p, n_prefix, dims, cfg,
                  wide: int, tile: int) -> None:
    """The two passes over meta.cascade's groups; po / pl as mla.py's one-pass prefix kernel
    fills them. `common`: mla.py's stride tuple (queries, cache, block table, partials)."""
    sql0, sql1, sqp0, sqp1, scb, sct, sbt, sp0, sp1, sp2, sl0, sl1 = common
    heads = q_latent.shape[1]
    rows, casc = meta.cascade.group_rows, meta.cascade
    groups, max_n = rows.shape
    hb, n_hb, block_m = _rows(cfg, wide, heads, max_n)
    n_tiles = triton.cdiv(max(casc.max_prefix_len, 1), tile)
    p = torch.empty((groups, n_hb, block_m, n_tiles * tile), dtype=kv_cache.dtype, device=kv_cache.device)
    st = torch.empty((groups, n_hb, 2, n_tiles, block_m), dtype=torch.float32, device=kv_cache.device)
    block_l = dims["BLOCK_L"]
    warps, stages = cfg["two_pass_warps"], cfg["two_pass_stages"]
    scratch = (p.stride(0), p.stride(1), p.stride(2), st.stride(0), st.stride(1), st.stride(2), st.stride(3))
    _prefix_scores_kernel[(groups, n_tiles, n_hb)](
        q_latent, q_pe, kv_cache, meta.block_tables, rows, casc.group_prefix_len, p, st,
        sql0, sql1, sqp0, sqp1, scb, sct, sbt, rows.stride(0), *scratch, scale_log2, H=heads, HB=hb, MAX_N=max_n,
        BLOCK_M=block_m, L=dims["L"], R=dims["R"], BLOCK_L=block_l, BLOCK_K=min(64 // wide, block_l),
        BLOCK_R=dims["BLOCK_R"], T=tile, PAGE=dims["PAGE"], PREC=dims["PREC"], num_warps=warps, num_stages=stages,
        **pdl.options())
    tv = min(tile, max(16, cfg["two_pass_value_tile"] // wide))
    if tile % tv or split_p % tv:  # the values kernel reads p in whole steps of a score tile and of a split
        raise ValueError(f"MLA_CFG: two_pass_value_tile {tv} must divide two_pass_tile {tile} and the prefix "
                         f"split {split_p}")
    block_dv = min(max(16, triton.next_power_of_2(cfg["two_pass_dv"] // wide)), block_l)
    n_dv = triton.cdiv(dims["L"], block_dv)
    _prefix_values_kernel[(n_hb * n_dv, n_prefix, groups)](
        kv_cache, meta.block_tables, rows, casc.group_prefix_len, p, st, po, pl, scb, sct, sbt, rows.stride(0),
        *scratch, sp0, sp1, sp2, sl0, sl1, H=heads, HB=hb, MAX_N=max_n, N_DV=n_dv, BLOCK_M=block_m, L=dims["L"],
        BLOCK_DV=block_dv, T=tile, TV=tv, PAGE=dims["PAGE"],
        SPLIT=split_p, PREC=dims["PREC"], num_warps=warps, num_stages=stages, **pdl.options())
