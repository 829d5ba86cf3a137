"""The MLA decode's own part (atom/ops/triton/mla.py): one program per (sequence, block of
BLOCK_H = 16 heads, split) over the sequence's own cache tokens, the heads in the M dimension of
the tiles and the whole latent width in fp32 accumulators, with the online-softmax step the
shared-prefix one-pass kernel uses too (_mla_tile), and the tiles' block ids (_tile_blocks) the
two-pass prefix kernels use too.

Two forms of the step, by the latent's width:
* four column chunks (_mla_tile4, from 64 columns on): q [16, L] . cache rows^T and p . cache
  rows as sums over chunks of L / 4 columns into four accumulators. The warps split a tile's
  tokens, so a whole-width query operand sits in every warp's registers (128 a thread at
  Moonlight's 16 x 512); in chunks each dot reads its operand from shared memory (sm_90 ptxas,
  4 warps, 32-token tiles, 3 stages: 242 -> 146 registers; session 15's H200 tuner: the bs512
  decode 209 -> 195 us, the 128-head bs64 one 194 -> 171);
* whole width (_mla_tile, narrower latents: chunks would fall below tl.dot's 16 columns).
The prefix partials are folded in and the output stored one chunk at a time (_own_out), so that
the epilogue holds one [16, L / 4] partial, not a second [16, L] (the fold of whole-width
outputs alone took 214 registers).
"""
from __future__ import annotations

import triton
import triton.language as tl
from atom.ops.triton import pdl
from atom.ops.triton.pdl import grid_dependency


# ---- one online-softmax step over a tile of latent rows --------------------------------------

@triton.jit
def _tile_blocks(bt_row, n0, hi, BLOCK_N: tl.constexpr, PAGE: tl.constexpr):
    """The cache blocks of tokens [n0, n0 + BLOCK_N) of one block-table row (0 past hi)."""
    offs = n0 + tl.arange(0, BLOCK_N)
    return tl.load(bt_row + offs // PAGE, mask=offs < hi, other=0).to(tl.int64)


@triton.jit
def _softmax_step(qk, nm, scale_log2, m_i, l_i):
    """Base-2 online softmax over one tile of raw scores qk [M, N] (columns past nm masked):
    (p, the old rows' rescale alpha, the new row max, the new row sum)."""
    qk = tl.where(nm[None, :], qk * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _cols(base, col0, c, rows, L: tl.constexpr):
    """Columns col0 + c (c [1, CH]) of the rows at base ([M, 1] pointers, rows [M, 1] valid); 0 past L."""
    return tl.load(base + col0 + c, mask=rows & (col0 + c < L), other=0.0)


@triton.jit
def _mla_tile(q_lat, q_pe, c_ptr, blk, n0, hi, scb, sct, scale_log2, m_i, l_i, acc, v0,
              L: tl.constexpr, R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
              BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PREC: tl.constexpr,
              REUSE_KV: tl.constexpr = False):
    """Rows of q (q_lat [M, BLOCK_L], q_pe [M, BLOCK_R]) over cache tokens [n0, min(n0 + BLOCK_N,
    hi)) in cache blocks blk (_tile_blocks); acc holds latent columns [v0, v0 + BLOCK_DV). Base-2 softmax.
    REUSE_KV (acc holds every latent column: v0 = 0, BLOCK_DV = BLOCK_L): the latent rows are
    loaded once, as [BLOCK_N, BLOCK_L], for both the scores (transposed) and the values, instead
    of a transposed load for the scores and a second load of the same bytes for the values."""
    offs = n0 + tl.arange(0, BLOCK_N)
    nm = offs < hi
    row = blk * scb + (offs % PAGE).to(tl.int64) * sct
    lat = tl.arange(0, BLOCK_L)
    rp = tl.arange(0, BLOCK_R)
    if REUSE_KV:
        kv = tl.load(c_ptr + row[:, None] + lat[None, :], mask=nm[:, None] & (lat < L)[None, :], other=0.0)
        qk = tl.dot(q_lat, tl.trans(kv), input_precision=PREC)
    else:
        k = tl.load(c_ptr + row[None, :] + lat[:, None], mask=nm[None, :] & (lat < L)[:, None], other=0.0)
        qk = tl.dot(q_lat, k, input_precision=PREC)
    kpe = tl.load(c_ptr + row[None, :] + L + rp[:, None], mask=nm[None, :] & (rp < R)[:, None], other=0.0)
    qk = tl.dot(q_pe, kpe, acc=qk, input_precision=PREC)
    p, alpha, m_new, l_i = _softmax_step(qk, nm, scale_log2, m_i, l_i)
    if REUSE_KV:
        v = kv
    else:
        dv = v0 + tl.arange(0, BLOCK_DV)
        v = tl.load(c_ptr + row[:, None] + dv[None, :], mask=nm[:, None] & (dv < L)[None, :], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _mla_tile4(q0, q1, q2, q3, q_pe, c_ptr, blk, n0, hi, scb, sct, scale_log2, m_i, l_i, a0, a1, a2, a3,
               L: tl.constexpr, R: tl.constexpr, CH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
               PAGE: tl.constexpr, PREC: tl.constexpr):
    """_mla_tile (REUSE_KV) over the latent in four column chunks of CH: q chunk k (q_k [M, CH])
    against cache columns [k CH, (k + 1) CH), the values of those columns into a_k."""
    offs = n0 + tl.arange(0, BLOCK_N)
    nm = offs < hi
    row = (blk * scb + (offs % PAGE).to(tl.int64) * sct)[:, None]
    c = tl.arange(0, CH)[None, :]
    k0 = _cols(c_ptr + row, 0, c, nm[:, None], L)
    k1 = _cols(c_ptr + row, CH, c, nm[:, None], L)
    k2 = _cols(c_ptr + row, 2 * CH, c, nm[:, None], L)
    k3 = _cols(c_ptr + row, 3 * CH, c, nm[:, None], L)
    qk = tl.dot(q0, tl.trans(k0), input_precision=PREC)
    qk = tl.dot(q1, tl.trans(k1), acc=qk, input_precision=PREC)
    qk = tl.dot(q2, tl.trans(k2), acc=qk, input_precision=PREC)
    qk = tl.dot(q3, tl.trans(k3), acc=qk, input_precision=PREC)
    rp = tl.arange(0, BLOCK_R)
    kpe = tl.load(c_ptr + tl.trans(row) + L + rp[:, None], mask=nm[None, :] & (rp < R)[:, None], other=0.0)
    qk = tl.dot(q_pe, kpe, acc=qk, input_precision=PREC)
    p, alpha, m_new, l_i = _softmax_step(qk, nm, scale_log2, m_i, l_i)
    p = p.to(k0.dtype)
    a0 = tl.dot(p, k0, acc=a0 * alpha[:, None], input_precision=PREC)
    a1 = tl.dot(p, k1, acc=a1 * alpha[:, None], input_precision=PREC)
    a2 = tl.dot(p, k2, acc=a2 * alpha[:, None], input_precision=PREC)
    a3 = tl.dot(p, k3, acc=a3 * alpha[:, None], input_precision=PREC)
    return m_new, l_i, a0, a1, a2, a3


@triton.jit
def _own_out(acc, col0, m_i, l_i, b64, heads, hm, start, s, s_off, po_ptr, pl_ptr, o_ptr, sp0, sp1, sp2, sl0, sl1,
             so0, so1, L: tl.constexpr, W: tl.constexpr, SPLIT_P: tl.constexpr, WHOLE: tl.constexpr):
    """Latent columns [col0, col0 + W) of the own part's unnormalised output acc (row max m_i,
    row sum l_i). WHOLE: out = (acc 2^m_i + sum_j o_j 2^lse_j) / (l_i 2^m_i + sum_j 2^lse_j) over
    the s_off prefix partials (o_j normalised, lse_j its log2-sum-exp), stored; else this split's
    partial (and, with the first columns, its log-sum-exp)."""
    col = col0 + tl.arange(0, W)
    cm = hm[:, None] & (col < L)[None, :]
    if WHOLE:
        mx = m_i
        for j in range(0, s_off):  # the largest exponent first: every weight below is <= 1
            lse = tl.load(pl_ptr + b64 * sl0 + heads * sl1 + j, mask=hm & (j * SPLIT_P < start), other=float("-inf"))
            mx = tl.maximum(mx, lse)
        a = tl.exp2(m_i - mx)
        acc = acc * a[:, None]
        w = l_i * a
        for j in range(0, s_off):
            ok = hm & (j * SPLIT_P < start)
            c = tl.exp2(tl.load(pl_ptr + b64 * sl0 + heads * sl1 + j, mask=ok, other=float("-inf")) - mx)
            o = tl.load(po_ptr + b64 * sp0 + heads[:, None] * sp1 + j * sp2 + col[None, :], mask=ok[:, None] & cm,
                        other=0.0)
            acc += o * c[:, None]
            w += c
        tl.store(o_ptr + b64 * so0 + heads[:, None] * so1 + col[None, :], (acc / w[:, None]).to(o_ptr.dtype.element_ty),
                 mask=cm)
    else:
        tl.store(po_ptr + b64 * sp0 + heads[:, None] * sp1 + (s_off + s) * sp2 + col[None, :], acc / l_i[:, None],
                 mask=cm)
        if col0 == 0:
            tl.store(pl_ptr + b64 * sl0 + heads * sl1 + s_off + s, m_i + tl.log2(l_i), mask=hm)


@triton.jit
def _mla_own_kernel(ql_ptr, qp_ptr, c_ptr, bt_ptr, sl_ptr, start_ptr, po_ptr, pl_ptr, o_ptr,
                    sql0, sql1, sqp0, sqp1, scb, sct, sbt, sp0, sp1, sp2, sl0, sl1, so0, so1, s_off, scale_log2,
                    H: tl.constexpr, BH: tl.constexpr, L: tl.constexpr, R: tl.constexpr, BLOCK_L: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SPLIT: tl.constexpr,
                    HAS_START: tl.constexpr, PREC: tl.constexpr, WHOLE: tl.constexpr, SPLIT_P: tl.constexpr,
                    REUSE_KV: tl.constexpr, CHUNKS: tl.constexpr, PDL: tl.constexpr = False):
    """One (sequence, head block, split) of the sequence's own tokens. WHOLE: the split is the
    whole own part, the prefix partials are folded in here and the output stored. CHUNKS: the
    latent in four column chunks (BLOCK_L >= 64; else whole width).
    The next tile's block ids are loaded a tile ahead, so that no load of an iteration depends
    on another one's: Triton's pipeliner then gives the latent tiles num_stages - 1 buffers (with
    the ids loaded in the iteration it gave one at any num_stages, and each tile's DRAM latency
    was waited out in full; session 14's H200: 236 -> 202 us at bs512)."""
    grid_dependency(PDL)
    b = tl.program_id(0)
    heads = tl.program_id(1) * BH + tl.arange(0, BH)
    s = tl.program_id(2)
    hm = heads < H
    seq_len = tl.load(sl_ptr + b).to(tl.int32)
    start = 0
    if HAS_START:
        start = tl.load(start_ptr + b).to(tl.int32)
    lo = start + s * SPLIT
    if WHOLE:
        hi = seq_len
    else:
        hi = tl.minimum(lo + SPLIT, seq_len)
    b64 = b.to(tl.int64)
    if lo < hi:
        rp = tl.arange(0, BLOCK_R)
        q_pe = tl.load(qp_ptr + b64 * sqp0 + heads[:, None] * sqp1 + rp[None, :],
                       mask=hm[:, None] & (rp < R)[None, :], other=0.0)
        m_i = tl.full([BH], float("-inf"), tl.float32)
        l_i = tl.zeros([BH], tl.float32)
        bt_row = bt_ptr + b64 * sbt
        blk = _tile_blocks(bt_row, lo, hi, BLOCK_N, PAGE)
        if CHUNKS:
            CH: tl.constexpr = BLOCK_L // 4
            c = tl.arange(0, CH)[None, :]
            qb = ql_ptr + b64 * sql0 + heads[:, None] * sql1
            q0 = _cols(qb, 0, c, hm[:, None], L)
            q1 = _cols(qb, CH, c, hm[:, None], L)
            q2 = _cols(qb, 2 * CH, c, hm[:, None], L)
            q3 = _cols(qb, 3 * CH, c, hm[:, None], L)
            a0 = tl.zeros([BH, CH], tl.float32)
            a1 = tl.zeros([BH, CH], tl.float32)
            a2 = tl.zeros([BH, CH], tl.float32)
            a3 = tl.zeros([BH, CH], tl.float32)
            for n0 in range(lo, hi, BLOCK_N):
                blk_next = _tile_blocks(bt_row, n0 + BLOCK_N, hi, BLOCK_N, PAGE)
                m_i, l_i, a0, a1, a2, a3 = _mla_tile4(q0, q1, q2, q3, q_pe, c_ptr, blk, n0, hi, scb, sct, scale_log2,
                                                      m_i, l_i, a0, a1, a2, a3, L, R, CH, BLOCK_R, BLOCK_N, PAGE, PREC)
                blk = blk_next
            out = (b64, heads, hm, start, s, s_off, po_ptr, pl_ptr, o_ptr, sp0, sp1, sp2, sl0, sl1, so0, so1)
            _own_out(a0, 0, m_i, l_i, *out, L, CH, SPLIT_P, WHOLE)
            _own_out(a1, CH, m_i, l_i, *out, L, CH, SPLIT_P, WHOLE)
            _own_out(a2, 2 * CH, m_i, l_i, *out, L, CH, SPLIT_P, WHOLE)
            _own_out(a3, 3 * CH, m_i, l_i, *out, L, CH, SPLIT_P, WHOLE)
        else:
            lat = tl.arange(0, BLOCK_L)
            q_lat = tl.load(ql_ptr + b64 * sql0 + heads[:, None] * sql1 + lat[None, :],
                            mask=hm[:, None] & (lat < L)[None, :], other=0.0)
            acc = tl.zeros([BH, BLOCK_L], tl.float32)
            for n0 in range(lo, hi, BLOCK_N):
                blk_next = _tile_blocks(bt_row, n0 + BLOCK_N, hi, BLOCK_N, PAGE)
                m_i, l_i, acc = _mla_tile(q_lat, q_pe, c_ptr, blk, n0, hi, scb, sct, scale_log2, m_i, l_i, acc, 0,
                                          L, R, BLOCK_L, BLOCK_R, BLOCK_L, BLOCK_N, PAGE, PREC, REUSE_KV)
                blk = blk_next
            _own_out(acc, 0, m_i, l_i, b64, heads, hm, start, s, s_off, po_ptr, pl_ptr, o_ptr, sp0, sp1, sp2, sl0, sl1,
                     so0, so1, L, BLOCK_L, SPLIT_P, WHOLE)
    elif WHOLE:  # a padded row (seq_len 0): zeros, never NaN
        lat = tl.arange(0, BLOCK_L)
        tl.store(o_ptr + b64 * so0 + heads[:, None] * so1 + lat[None, :],
                 tl.zeros([BH, BLOCK_L], tl.float32).to(o_ptr.dtype.element_ty), mask=hm[:, None] & (lat < L)[None, :])
