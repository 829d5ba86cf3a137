"""Batch-invariant paged attention: a token gets the same bits in prefill and in decode, chunked or
not, with its prefix cached or not, in any batch, with or without shared-prefix (cascade) groups.

The reduction order over KV positions is fixed by the positions alone:
  * KV is cut into splits of KV_SPLIT tokens at absolute positions (0, S, 2S, ...);
  * a split's partial (m, l, acc) (running max, sum of exponentials, unnormalised output, base 2)
    is an online softmax over BLOCK_N-token blocks from the split's start, from a fresh state;
  * the partials are folded in split order, (M, L, ACC) <- fold(M, L, ACC, partial j), and the
    output is ACC / L.
Every kernel below runs those steps through the same helpers (`_split_partial`, `_fold`,
`_finish`) on tiles of the same shape: ROWS query rows (16, or the GQA group rounded up to a power
of two when larger), D, BLOCK_N, the same warps, and fp contraction off (so that no kernel fuses a
multiply-add that another rounds twice). The rows of a tensor-core tile do not mix, so a row's
numbers depend on its own query and KV only, not on which rows share its tile:
  * prefill: one program per (sequence, kv head, tile of TOK tokens), rows = TOK tokens x GROUP
    query heads; the splits up to the tile's last position are folded in order (a split or block
    past a row's position is masked for it and leaves its state bit for bit unchanged);
  * decode: rows = the GROUP query heads of one token. Large batches: one program per (sequence,
    kv head) folds every split; small ones: one program per split writes its partial and a fold
    kernel folds them in order (same numbers: partials are stored in float32 as computed);
  * cascade: the whole splits below a group's shared prefix are computed once per chunk of
    TOK members (rows = members x GROUP heads, programs of one split next to each other so the
    KV comes from L2 after the first chunk) and stored as those members' partials; each member's
    own splits start at the next split boundary.
Windows and sinks (`sliding_sink_attention_*`, registered in invariant_families.py): WINDOW > 0:
a query at p sees keys [p - WINDOW + 1, p]. The splits and blocks stay at the same absolute
positions; those wholly below the window of a tile's first row are skipped (for every row of the
tile they would leave the state bit for bit as it is) and no key below it is read (a sliding
layer's block table holds -1 there); a windowed decode takes no shared-prefix groups. HAS_SINKS:
each head's sink logit is folded in last, as a partial with l = 1 and a zero output.
Which path runs (whole or split, cascade or not) depends on the batch; the numbers do not.
Grids depend on shapes and host-side bounds only (CUDA-graph safe); padded decode rows (length 0)
get zeros.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops.metadata import AttentionMetadata
from atom.ops.triton.attention import DECODE_CFG, LOG2E, _check_head_dim, _check_window_sinks, _prec

KV_SPLIT = 512  # tokens per KV split (changing it changes the bits, not the invariance)
NUM_WARPS = 4
NUM_STAGES = 2
_BIG_POS = tl.constexpr(1 << 30)  # a position past every key of a shared-prefix split
LOG2E_C = tl.constexpr(LOG2E)  # sinks are natural-log logits, the kernels work in base 2


def tile_shape(group: int) -> tuple[int, int]:
    """(ROWS, TOK): query rows of every tile and tokens per prefill tile (= members per prefix tile)."""
    rows = max(16, triton.next_power_of_2(group))
    return rows, rows // group


def block_n(head_dim: int) -> int:
    return 64 if head_dim <= 128 else 32


# ---- the shared steps -------------------------------------------------------------------------

@triton.jit
def _block(q, kc_ptr, vc_ptr, bt_row, n0, kv_lo, hi, kvh, skb, skt, skh, scale_log2, m_i, l_i, acc, pos,
           D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PREC: tl.constexpr, WINDOW: tl.constexpr):
    """One online-softmax step over KV tokens [n0, min(n0 + BLOCK_N, hi)), only those >= kv_lo read
    (a sliding layer's table holds -1 below its window); row r sees tokens <= pos[r] (and with
    WINDOW > 0 none before pos[r] - WINDOW + 1). A row that sees nothing of the block keeps its
    state bit for bit (from a fresh state: m = -inf, l = 0, acc = 0, no NaN)."""
    d = tl.arange(0, D)
    offs = n0 + tl.arange(0, BLOCK_N)
    nm = (offs >= kv_lo) & (offs < hi)
    blk = tl.load(bt_row + offs // PAGE, mask=nm, other=0).to(tl.int64)
    kv_off = blk * skb + (offs % PAGE).to(tl.int64) * skt + kvh * skh
    k = tl.load(kc_ptr + kv_off[None, :] + d[:, None], mask=nm[None, :], other=0.0)
    qk = tl.dot(q, k, input_precision=PREC) * scale_log2
    seen = (offs[None, :] <= pos[:, None]) & nm[None, :]
    if WINDOW > 0:
        seen = seen & (offs[None, :] > pos[:, None] - WINDOW)
    qk = tl.where(seen, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(qk - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(vc_ptr + kv_off[:, None] + d[None, :], mask=nm[:, None], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _split_partial(q, kc_ptr, vc_ptr, bt_row, lo, kv_lo, hi, kvh, skb, skt, skh, scale_log2, pos,
                   ROWS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                   PREC: tl.constexpr, WINDOW: tl.constexpr):
    """(m, l, acc) of q's rows over KV tokens [lo, hi) of one split, from a fresh state, in blocks
    at lo + i * BLOCK_N. Blocks wholly below kv_lo (seen by no row) are skipped: running them
    would leave the state as it is."""
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    for n0 in range(lo + (tl.maximum(kv_lo, lo) - lo) // BLOCK_N * BLOCK_N, hi, BLOCK_N):
        m_i, l_i, acc = _block(q, kc_ptr, vc_ptr, bt_row, n0, kv_lo, hi, kvh, skb, skt, skh, scale_log2, m_i, l_i,
                               acc, pos, D, BLOCK_N, PAGE, PREC, WINDOW)
    return m_i, l_i, acc


@triton.jit
def _fold(M, L, ACC, m, l, acc):
    """Fold the next split's partial into the running state (M = -inf: nothing folded yet)."""
    m_new = tl.maximum(M, m)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    a = tl.exp2(M - m_use)
    b = tl.exp2(m - m_use)
    return m_new, L * a + l * b, ACC * a[:, None] + acc * b[:, None]


@triton.jit
def _finish(M, L, ACC, sink_ptr, heads, hm, HAS_SINKS: tl.constexpr):
    """The attention output: ACC / L, zeros for a row that saw nothing. HAS_SINKS: each head's
    sink logit (natural log, at sink_ptr + heads) folded in last, as a partial with l = 1 and a
    zero output (it joins the denominator only)."""
    if HAS_SINKS:
        s2 = tl.load(sink_ptr + heads, mask=hm, other=0.0).to(tl.float32) * LOG2E_C
        M, L, ACC = _fold(M, L, ACC, s2, tl.zeros_like(s2) + 1.0, tl.zeros_like(ACC))
    return tl.where((L > 0.0)[:, None], ACC / tl.where(L > 0.0, L, 1.0)[:, None], 0.0)


@triton.jit
def _window_start(pos, WINDOW: tl.constexpr):
    """The first key position a query at pos sees (0 without a window). Splits and blocks wholly
    below it are skipped: for that query they would leave the state as it is."""
    if WINDOW > 0:
        return tl.maximum(pos - WINDOW + 1, 0)
    return pos * 0


@triton.jit
def _fold_stored(M, L, ACC, pm_ptr, pl_ptr, pa_ptr, row_off, j, hm, D: tl.constexpr):
    """Fold a stored partial (split j of the rows at row_off) into the running state."""
    d = tl.arange(0, D)
    m = tl.load(pm_ptr + row_off + j, mask=hm, other=float("-inf"))
    l = tl.load(pl_ptr + row_off + j, mask=hm, other=0.0)
    acc = tl.load(pa_ptr + (row_off + j)[:, None] * D + d[None, :], mask=hm[:, None], other=0.0)
    return _fold(M, L, ACC, m, l, acc)


# ---- prefill ----------------------------------------------------------------------------------

@triton.jit
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, qsl_ptr, sl_ptr, o_ptr, sink_ptr,
                    sq0, sq1, so0, so1, skb, skt, skh, sbt, scale_log2,
                    GROUP: tl.constexpr, TOK: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
                    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
                    WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr):
    mt = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b).to(tl.int32)
    q_len = tl.load(qsl_ptr + b + 1).to(tl.int32) - q_start
    if mt * TOK < q_len:
        seq_len = tl.load(sl_ptr + b).to(tl.int32)
        first = seq_len - q_len
        r = tl.arange(0, ROWS)
        t = mt * TOK + r // GROUP
        rm = (r < TOK * GROUP) & (t < q_len)
        heads = kvh * GROUP + r % GROUP
        pos = tl.where(rm, first + t, -1)
        d = tl.arange(0, D)
        qrow = (q_start + tl.where(rm, t, 0)).to(tl.int64)
        q = tl.load(q_ptr + qrow[:, None] * sq0 + heads[:, None] * sq1 + d[None, :], mask=rm[:, None], other=0.0)
        hi = tl.minimum(seq_len, first + (mt + 1) * TOK)  # past the tile's last position
        bt_row = bt_ptr + b.to(tl.int64) * sbt
        kv_lo = _window_start(first + mt * TOK, WINDOW)  # what the tile's first row sees first
        M = tl.full([ROWS], float("-inf"), tl.float32)
        L = tl.zeros([ROWS], tl.float32)
        ACC = tl.zeros([ROWS, D], tl.float32)
        for lo in range(kv_lo // SPLIT * SPLIT, hi, SPLIT):
            m, l, acc = _split_partial(q, kc_ptr, vc_ptr, bt_row, lo, kv_lo, tl.minimum(lo + SPLIT, hi), kvh, skb,
                                       skt, skh, scale_log2, pos, ROWS, D, BLOCK_N, PAGE, PREC, WINDOW)
            M, L, ACC = _fold(M, L, ACC, m, l, acc)
        out = _finish(M, L, ACC, sink_ptr, heads, rm, HAS_SINKS)
        tl.store(o_ptr + qrow[:, None] * so0 + heads[:, None] * so1 + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=rm[:, None])


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float, window: int | None = None,
                            sinks: torch.Tensor | None = None) -> torch.Tensor:
    """window: a query at position p sees keys [p - window + 1, p] only (None: all of [0, p]);
    sinks [Hq]: one logit per query head in the softmax denominator (None: none)."""
    t, hq, d = q.shape
    _check_head_dim(d)
    _check_window_sinks(q, window, sinks)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    nseq = meta.seq_lens.shape[0]
    if t == 0 or nseq == 0:
        return out
    hk, page = k_cache.shape[2], k_cache.shape[1]
    group = hq // hk
    rows, tok = tile_shape(group)
    grid = (triton.cdiv(meta.max_query_len, tok), hk, nseq)
    _prefill_kernel[grid](q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, out,
                          q if sinks is None else sinks, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                          k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
                          scale * LOG2E, GROUP=group, TOK=tok, ROWS=rows, D=d, BLOCK_N=block_n(d), PAGE=page,
                          SPLIT=KV_SPLIT, PREC=_prec(q.dtype), WINDOW=window or 0, HAS_SINKS=sinks is not None,
                          num_warps=NUM_WARPS, num_stages=NUM_STAGES, enable_fp_fusion=False)
    return out


# ---- decode -----------------------------------------------------------------------------------
# Partials: pm, pl [B, Hq, NS] and pa [B, Hq, NS, D] float32, contiguous; (b, h, split j) at
# (b * Hq + h) * NS + j.

@triton.jit
def _store_partial(pm_ptr, pl_ptr, pa_ptr, row_off, j, m, l, acc, rm, D: tl.constexpr):
    d = tl.arange(0, D)
    tl.store(pm_ptr + row_off + j, m, mask=rm)
    tl.store(pl_ptr + row_off + j, l, mask=rm)
    tl.store(pa_ptr + (row_off + j)[:, None] * D + d[None, :], acc, mask=rm[:, None])


@triton.jit
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, sl_ptr, start_ptr, pm_ptr, pl_ptr, pa_ptr, o_ptr, sink_ptr,
                   sq0, sq1, skb, skt, skh, sbt, so0, so1, hq, ns, scale_log2,
                   GROUP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                   PAGE: tl.constexpr, SPLIT: tl.constexpr, HAS_START: tl.constexpr, WHOLE: tl.constexpr,
                   PREC: tl.constexpr, WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr):
    """(sequence, kv head, split j) of the sequence's own splits (those from the split holding its
    cascade start on; with WINDOW > 0, from the split holding its window's first key, counted from
    there: j = 0 is that split). WHOLE: j = 0 only; the program folds the stored prefix partials,
    then every own split, and stores the output. Else: it stores split j's partial (_fold_kernel
    folds)."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    j = tl.program_id(2)
    seq_len = tl.load(sl_ptr + b).to(tl.int32)
    own0 = 0
    if HAS_START:
        own0 = tl.load(start_ptr + b).to(tl.int32) // SPLIT * SPLIT
    r = tl.arange(0, ROWS)
    hm = r < GROUP
    heads = kvh * GROUP + r
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b.to(tl.int64) * sq0 + heads[:, None] * sq1 + d[None, :], mask=hm[:, None], other=0.0)
    pos = tl.where(hm, seq_len - 1, -1)
    bt_row = bt_ptr + b.to(tl.int64) * sbt
    row_off = (b.to(tl.int64) * hq + heads) * ns
    kv_lo = _window_start(seq_len - 1, WINDOW)
    if WHOLE:
        M = tl.full([ROWS], float("-inf"), tl.float32)
        L = tl.zeros([ROWS], tl.float32)
        ACC = tl.zeros([ROWS, D], tl.float32)
        for i in range(0, own0 // SPLIT):
            M, L, ACC = _fold_stored(M, L, ACC, pm_ptr, pl_ptr, pa_ptr, row_off, i, hm, D)
        for lo in range(tl.maximum(own0, kv_lo // SPLIT * SPLIT), seq_len, SPLIT):
            m, l, acc = _split_partial(q, kc_ptr, vc_ptr, bt_row, lo, kv_lo, tl.minimum(lo + SPLIT, seq_len), kvh,
                                       skb, skt, skh, scale_log2, pos, ROWS, D, BLOCK_N, PAGE, PREC, WINDOW)
            M, L, ACC = _fold(M, L, ACC, m, l, acc)
        tl.store(o_ptr + b.to(tl.int64) * so0 + heads[:, None] * so1 + d[None, :],
                 _finish(M, L, ACC, sink_ptr, heads, hm, HAS_SINKS).to(o_ptr.dtype.element_ty), mask=hm[:, None])
    else:
        lo = (kv_lo // SPLIT + j) * SPLIT
        if (lo >= own0) & (lo < seq_len):
            m, l, acc = _split_partial(q, kc_ptr, vc_ptr, bt_row, lo, kv_lo, tl.minimum(lo + SPLIT, seq_len), kvh,
                                       skb, skt, skh, scale_log2, pos, ROWS, D, BLOCK_N, PAGE, PREC, WINDOW)
            _store_partial(pm_ptr, pl_ptr, pa_ptr, row_off, j, m, l, acc, hm, D)


@triton.jit
def _fold_kernel(pm_ptr, pl_ptr, pa_ptr, sl_ptr, o_ptr, sink_ptr, so0, so1, hq, ns,
                 GROUP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr,
                 WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr):
    """(sequence, kv head): fold the stored partials of every split of the sequence (with WINDOW >
    0: from the one holding its window's first key), in order, then the sinks."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    seq_len = tl.load(sl_ptr + b).to(tl.int32)
    r = tl.arange(0, ROWS)
    hm = r < GROUP
    heads = kvh * GROUP + r
    row_off = (b.to(tl.int64) * hq + heads) * ns
    M = tl.full([ROWS], float("-inf"), tl.float32)
    L = tl.zeros([ROWS], tl.float32)
    ACC = tl.zeros([ROWS, D], tl.float32)
    for i in range(0, tl.cdiv(seq_len, SPLIT) - _window_start(seq_len - 1, WINDOW) // SPLIT):
        M, L, ACC = _fold_stored(M, L, ACC, pm_ptr, pl_ptr, pa_ptr, row_off, i, hm, D)
    d = tl.arange(0, D)
    tl.store(o_ptr + b.to(tl.int64) * so0 + heads[:, None] * so1 + d[None, :],
             _finish(M, L, ACC, sink_ptr, heads, hm, HAS_SINKS).to(o_ptr.dtype.element_ty), mask=hm[:, None])


@triton.jit
def _prefix_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, rows_ptr, plen_ptr, pm_ptr, pl_ptr, pa_ptr,
                   sq0, sq1, skb, skt, skh, sbt, srow, hq, ns, hk, scale_log2,
                   GROUP: tl.constexpr, TOK: tl.constexpr, MAX_N: tl.constexpr, ROWS: tl.constexpr,
                   D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SPLIT: tl.constexpr,
                   PREC: tl.constexpr):
    """(chunk of TOK members, split j, group x kv head): split j of the group's shared prefix (whole
    splits only) for the chunk's members, stored as their partials. Chunks of one split are
    adjacent programs: after the first, the split's KV comes from L2."""
    c = tl.program_id(0)
    j = tl.program_id(1)
    g = tl.program_id(2) // hk
    kvh = tl.program_id(2) % hk
    lo = j * SPLIT
    if lo + SPLIT <= tl.load(plen_ptr + g).to(tl.int32):
        r = tl.arange(0, ROWS)
        member = c * TOK + r // GROUP
        rm = (r < TOK * GROUP) & (member < MAX_N)
        mrow = tl.load(rows_ptr + g.to(tl.int64) * srow + member, mask=rm, other=-1)
        rm = rm & (mrow >= 0)
        mrow = tl.where(rm, mrow, 0).to(tl.int64)
        heads = kvh * GROUP + r % GROUP
        d = tl.arange(0, D)
        q = tl.load(q_ptr + mrow[:, None] * sq0 + heads[:, None] * sq1 + d[None, :], mask=rm[:, None], other=0.0)
        pos = tl.where(rm, _BIG_POS, -1)  # the whole split lies below every member's position
        first = tl.load(rows_ptr + g.to(tl.int64) * srow).to(tl.int64)  # members share these blocks
        m, l, acc = _split_partial(q, kc_ptr, vc_ptr, bt_ptr + first * sbt, lo, lo, lo + SPLIT, kvh, skb, skt, skh,
                                   scale_log2, pos, ROWS, D, BLOCK_N, PAGE, PREC, 0)
        _store_partial(pm_ptr, pl_ptr, pa_ptr, (mrow * hq + heads) * ns, j, m, l, acc, rm, D)


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float, window: int | None = None,
                           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """window and sinks as in paged_attention_prefill. A windowed decode reads only the splits of
    each row's window and takes no shared-prefix groups (meta.cascade is not read)."""
    bsz, hq, d = q.shape
    _check_head_dim(d)
    _check_window_sinks(q, window, sinks)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if bsz == 0:
        return out
    hk, page = k_cache.shape[2], k_cache.shape[1]
    group = hq // hk
    rows, tok = tile_shape(group)
    casc = getattr(meta, "cascade", None) if window is None else None
    whole = bsz * hk >= DECODE_CFG["whole_own_pairs"]  # (the path, not the numbers, follows the batch)
    n_prefix = casc.max_prefix_len // KV_SPLIT if casc is not None else 0
    ns = triton.cdiv(max(meta.max_seq_len, 1), KV_SPLIT)
    if window is not None:  # the splits a window of `window` keys can touch
        ns = min(ns, triton.cdiv(window - 1, KV_SPLIT) + 1)
    ns = n_prefix if whole else ns
    dev = q.device
    pm = torch.empty(max(bsz * hq * ns, 1), dtype=torch.float32, device=dev)
    pl = torch.empty_like(pm)
    pa = torch.empty(max(bsz * hq * ns, 1) * d, dtype=torch.float32, device=dev)
    common = dict(GROUP=group, ROWS=rows, D=d, BLOCK_N=block_n(d), PAGE=page, SPLIT=KV_SPLIT, PREC=_prec(q.dtype),
                  num_warps=NUM_WARPS, num_stages=NUM_STAGES, enable_fp_fusion=False)
    opts = dict(WINDOW=window or 0, HAS_SINKS=sinks is not None)
    sink_arg = q if sinks is None else sinks
    kv_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0))
    if n_prefix:
        groups = casc.group_rows
        _prefix_kernel[(triton.cdiv(groups.shape[1], tok), n_prefix, groups.shape[0] * hk)](
            q, k_cache, v_cache, meta.block_tables, groups, casc.group_prefix_len, pm, pl, pa,
            q.stride(0), q.stride(1), *kv_strides, groups.stride(0), hq, ns, hk, scale * LOG2E,
            TOK=tok, MAX_N=groups.shape[1], **common)
    start = casc.row_prefix_len if casc is not None else meta.seq_lens
    _decode_kernel[(bsz, hk, 1 if whole else ns)](
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, start, pm, pl, pa, out, sink_arg,
        q.stride(0), q.stride(1), *kv_strides, out.stride(0), out.stride(1), hq, ns, scale * LOG2E,
        HAS_START=casc is not None, WHOLE=whole, **opts, **common)
    if not whole:
        _fold_kernel[(bsz, hk)](pm, pl, pa, meta.seq_lens, out, sink_arg, out.stride(0), out.stride(1), hq, ns,
                                GROUP=group, ROWS=rows, D=d, SPLIT=KV_SPLIT, **opts, num_warps=NUM_WARPS,
                                enable_fp_fusion=False)
    return out
