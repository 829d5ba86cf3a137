"""Paged attention in Triton: varlen prefill over a cached prefix, split-KV decode with GQA packing,
and shared-prefix (cascade) decode.

KV cache layout: [num_blocks, block_size, kv_heads, head_dim], a token's slot is
block * block_size + offset and block_tables[b] lists sequence b's blocks.

Decode works in fixed-size KV splits (`own_split` tokens each, counted from where the sequence's own
part starts): 256 for batches of 32+ sequences (with 4 KV heads), 64 below, so the reduction order
depends on the sequence and the batch's size class, not on its contents, and the grid depends
only on (batch, max context): CUDA-graph safe. Every (sequence, kv head, split) program
packs the GROUP query heads that share a kv head into the M dimension of one tensor-core tile.
With `meta.cascade`, the KV blocks that several sequences share (the n samples of one prompt)
are read once per group: one program per (group, kv head, split) stacks every member's query
heads into the M dimension; its splits (`prefix_split`) are 1024 tokens from 256 (group, kv head)
pairs on, 256 below. Both kinds write partial (output, log-sum-exp) pairs that a small
merge kernel combines; from DECODE_CFG["whole_own_pairs"] (sequence, kv head) pairs on, each
own-part program covers the whole own part and folds the prefix partials in itself instead.

The same kernels serve `sliding_sink_attention_*` (GPT-OSS, Mixtral with a window) through two
compile-time options: WINDOW (> 0: a query at position p sees keys (p - WINDOW, p] only; decode
reads just the last WINDOW tokens of a sequence, so blocks a sliding layer gave back
(atom/engine/window_blocks.py) are never touched; a windowed decode skips the shared-prefix
groups) and HAS_SINKS (a per-head logit that joins the softmax denominator and attends to
nothing: one more partial with a zero output where the partials are combined).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops.metadata import AttentionMetadata
from atom.ops.registry import register

B = "triton"
LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # inside kernels (sinks are natural-log logits, the kernels work in base 2)

# Decode tile config (bench/kernels.py --tune sweeps it): split = KV tokens per split of a
# sequence's own part, prefix_split = per split of a shared prefix; tiles, warps and stages of the
# own-part kernel and of the shared-prefix kernel.
DECODE_CFG = {"split": 256, "block_n": 64, "warps": 4, "stages": 2,
              "prefix_split": 1024, "prefix_block_n": 64, "prefix_warps": 0, "prefix_stages": 3,
              # Fewer (group, kv head) pairs than this: `small_prefix_split`, so that a few groups
              # with a long shared prompt still spread over the SMs.
              "small_prefix_pairs": 256, "small_prefix_split": 256, "small_prefix_stages": 2,
              # Batches with fewer (sequence, kv head) pairs than this use `small_split`: at batch 1
              # a 256-token split is ~4 dependent loop trips on a handful of SMs.
              "small_batch_pairs": 128, "small_split": 64,
              # From this many (sequence, kv head) pairs on, one program covers a sequence's whole
              # own part and merges the shared-prefix partials itself (no merge kernel): the grid
              # is already large enough to fill the GPU.
              "whole_own_pairs": 1024}
MAX_OWN_SPLITS = 64  # the merge kernel holds every split of a row at once


def own_split(batch: int, kv_heads: int, max_seq_len: int) -> int:
    """KV tokens per split of a sequence's own part: depends on the batch's size class and the
    context bound only, never on the batch's contents."""
    cfg = DECODE_CFG
    split = cfg["small_split"] if batch * kv_heads < cfg["small_batch_pairs"] else cfg["split"]
    floor = triton.cdiv(triton.cdiv(max(max_seq_len, 1), MAX_OWN_SPLITS), 64) * 64
    return max(split, floor)


def prefix_split(groups: int, kv_heads: int) -> tuple[int, int]:
    """(KV tokens per split, pipeline stages) of the shared-prefix kernel, by the size class of
    the (padded) group count."""
    cfg = DECODE_CFG
    if groups * kv_heads < cfg["small_prefix_pairs"]:
        return cfg["small_prefix_split"], cfg["small_prefix_stages"]
    return cfg["prefix_split"], cfg["prefix_stages"]


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_head_dim(d: int) -> None:
    if d < 16 or d & (d - 1):
        raise ValueError(f"triton attention needs a power-of-two head_dim >= 16, got {d}")


# ---- shared: one step of online softmax over paged KV ------------------------------------------

@triton.jit
def _attend_block(q, kc_ptr, vc_ptr, bt_row, n0, hi, kvh, skb, skt, skh, scale_log2, m_i, l_i, acc, pos,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PREC: tl.constexpr,
                  CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """One online-softmax step of q's query rows over KV tokens [n0, min(n0 + BLOCK_N, hi)) of one
    block-table row and one kv head; (m, l, acc) = running max, sum of exponentials and
    unnormalised output, base 2. CAUSAL: row r sees tokens up to its position pos[r] only, and
    with WINDOW > 0 none before pos[r] - WINDOW + 1 (callers without CAUSAL bound n0 instead)."""
    d = tl.arange(0, D)
    offs = n0 + tl.arange(0, BLOCK_N)
    nm = offs < hi
    blk = tl.load(bt_row + offs // PAGE, mask=nm, other=0).to(tl.int64)
    kv_off = blk * skb + (offs % PAGE).to(tl.int64) * skt + kvh * skh
    k = tl.load(kc_ptr + kv_off[None, :] + d[:, None], mask=nm[None, :], other=0.0)
    qk = tl.dot(q, k, input_precision=PREC) * scale_log2
    if CAUSAL:
        seen = (offs[None, :] <= pos[:, None]) & nm[None, :]
        if WINDOW > 0:
            seen = seen & (offs[None, :] > pos[:, None] - WINDOW)
        qk = tl.where(seen, qk, float("-inf"))
    else:
        qk = tl.where(nm[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if WINDOW > 0:
        # A row may see no key of this block yet (its window starts later than the tile's first
        # row's): keep its running state at zero instead of exp2(-inf - -inf) = NaN.
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(vc_ptr + kv_off[:, None] + d[None, :], mask=nm[:, None], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


# ---- prefill ----------------------------------------------------------------------------------

@triton.jit
def _finish_row(acc, m_i, l_i, sink_ptr, heads, hm, HAS_SINKS: tl.constexpr):
    """acc / l, with each head's sink logit (natural log, loaded at sink_ptr + heads) added to
    the denominator l when HAS_SINKS; (m, l) in base 2 as _attend_block keeps them."""
    if HAS_SINKS:
        s2 = tl.load(sink_ptr + heads, mask=hm, other=0.0).to(tl.float32) * _LOG2E
        m_f = tl.maximum(m_i, s2)
        a = tl.exp2(m_i - m_f)
        return acc * a[:, None] / (l_i * a + tl.exp2(s2 - m_f))[:, None]
    return acc / l_i[:, None]


@triton.jit
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, qsl_ptr, sl_ptr, o_ptr, sink_ptr,
                    sq0, sq1, so0, so1, skb, skt, skh, sbt, scale_log2,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                    PAGE: tl.constexpr, PREC: tl.constexpr, WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr):
    h = tl.program_id(0)
    mt = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b).to(tl.int32)
    q_len = tl.load(qsl_ptr + b + 1).to(tl.int32) - q_start
    if mt * BLOCK_M < q_len:
        seq_len = tl.load(sl_ptr + b).to(tl.int32)
        first = seq_len - q_len
        i = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        im = i < q_len
        pos = first + i
        d = tl.arange(0, D)
        rows = (q_start + i).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * sq0 + h * sq1 + d[None, :], mask=im[:, None], other=0.0)
        kvh = h // GROUP
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        hi = tl.minimum(seq_len, first + (mt + 1) * BLOCK_M)
        if WINDOW > 0:  # the tile's first row sees nothing before this
            lo = tl.maximum(first + mt * BLOCK_M - WINDOW + 1, 0)
        else:
            lo = 0
        bt_row = bt_ptr + b.to(tl.int64) * sbt
        for n0 in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _attend_block(q, kc_ptr, vc_ptr, bt_row, n0, hi, kvh, skb, skt, skh, scale_log2,
                                          m_i, l_i, acc, pos, D, BLOCK_N, PAGE, PREC, True, WINDOW)
        out = _finish_row(acc, m_i, l_i, sink_ptr, h + i * 0, im, HAS_SINKS)
        tl.store(o_ptr + rows[:, None] * so0 + h * so1 + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=im[:, None])


def _check_window_sinks(q: torch.Tensor, window: int | None, sinks: torch.Tensor | None) -> None:
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"sliding window must be a positive int or None, got {window!r}")
    if sinks is not None and (sinks.shape != (q.shape[1],) or sinks.device != q.device):
        raise ValueError(f"sinks must be one logit per query head, [{q.shape[1]}] on {q.device}; got "
                         f"{tuple(sinks.shape)} on {sinks.device}")


def _prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
             scale: float, window: int | None, sinks: torch.Tensor | None) -> torch.Tensor:
    t, hq, d = q.shape
    _check_head_dim(d)
    _check_window_sinks(q, window, sinks)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    nseq = meta.seq_lens.shape[0]
    if t == 0 or nseq == 0:
        return out
    hk, page = k_cache.shape[2], k_cache.shape[1]
    block_m = 64 if meta.max_query_len > 16 else 16
    block_n = 64 if d <= 128 else 32
    grid = (hq, triton.cdiv(meta.max_query_len, block_m), nseq)
    _prefill_kernel[grid](q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, out,
                          q if sinks is None else sinks,
                          q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                          k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
                          scale * LOG2E, GROUP=hq // hk, BLOCK_M=block_m, BLOCK_N=block_n, D=d, PAGE=page,
                          PREC=_prec(q.dtype), WINDOW=window or 0, HAS_SINKS=sinks is not None,
                          num_warps=4, num_stages=2)
    return out


@register("paged_attention_prefill", B)
def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float) -> torch.Tensor:
    return _prefill(q, k_cache, v_cache, meta, scale, None, None)


@register("sliding_sink_attention_prefill", B)
def sliding_sink_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   meta: AttentionMetadata, scale: float, window: int | None,
                                   sinks: torch.Tensor | None) -> torch.Tensor:
    """paged_attention_prefill with a sliding window and per-head sinks (torch_family_ops has the
    reference): the same kernel, both compiled in."""
    return _prefill(q, k_cache, v_cache, meta, scale, window, sinks)


# ---- decode -----------------------------------------------------------------------------------

@triton.jit
def _own_start(start_ptr, b, seq_len, HAS_START: tl.constexpr, WINDOW: tl.constexpr):
    """Where row b's own KV part starts: after its group's shared prefix (HAS_START), at the
    first token of its window (WINDOW > 0), else 0."""
    if WINDOW > 0:
        start = tl.maximum(seq_len - WINDOW, 0)
    elif HAS_START:
        start = tl.load(start_ptr + b).to(tl.int32)
    else:
        start = 0
    return start


@triton.jit
def _decode_split_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, sl_ptr, start_ptr, po_ptr, pl_ptr, o_ptr, sink_ptr,
                         sq0, sq1, skb, skt, skh, sbt, sp0, sp1, sp2, sl0, sl1, so0, so1, s_off, scale_log2,
                         GROUP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                         PAGE: tl.constexpr, SPLIT: tl.constexpr, HAS_START: tl.constexpr, PREC: tl.constexpr,
                         WHOLE: tl.constexpr, SPLIT_P: tl.constexpr, WINDOW: tl.constexpr,
                         HAS_SINKS: tl.constexpr):
    """One (sequence, kv head, split): the split's tokens of the sequence's own KV part (with
    WINDOW > 0: of its last WINDOW tokens; never with a shared prefix).

    WHOLE: one split covers the whole own part and the program finishes the row itself: it folds
    in the s_off shared-prefix partials the prefix kernel wrote (and the sinks) and stores the
    output (no merge kernel, no partials of its own)."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(sl_ptr + b).to(tl.int32)
    start = _own_start(start_ptr, b, seq_len, HAS_START, WINDOW)
    lo = start + s * SPLIT
    if WHOLE:
        hi = seq_len
    else:
        hi = tl.minimum(lo + SPLIT, seq_len)
    if lo < hi:
        hh = tl.arange(0, BLOCK_H)
        hm = hh < GROUP
        heads = kvh * GROUP + hh
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b.to(tl.int64) * sq0 + heads[:, None] * sq1 + d[None, :], mask=hm[:, None], other=0.0)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, D], tl.float32)
        bt_row = bt_ptr + b.to(tl.int64) * sbt
        for n0 in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _attend_block(q, kc_ptr, vc_ptr, bt_row, n0, hi, kvh, skb, skt, skh, scale_log2,
                                          m_i, l_i, acc, 0, D, BLOCK_N, PAGE, PREC, False, 0)
        if WHOLE:
            # out = sum_j o_j 2^lse_j / sum_j 2^lse_j over the prefix partials and the own part
            # (never empty: the newest token is the row's own), kept relative to a running max.
            mx = m_i
            w = l_i
            for j in range(0, s_off):
                ok = hm & (j * SPLIT_P < start)
                lse = tl.load(pl_ptr + b.to(tl.int64) * sl0 + heads * sl1 + j, mask=ok, other=float("-inf"))
                o = tl.load(po_ptr + b.to(tl.int64) * sp0 + heads[:, None] * sp1 + j * sp2 + d[None, :],
                            mask=ok[:, None], other=0.0)
                m_new = tl.maximum(mx, lse)
                a = tl.exp2(mx - m_new)
                c = tl.exp2(lse - m_new)
                acc = acc * a[:, None] + o * c[:, None]
                w = w * a + c
                mx = m_new
            out = _finish_row(acc, mx, w, sink_ptr, heads, hm, HAS_SINKS)
            tl.store(o_ptr + b.to(tl.int64) * so0 + heads[:, None] * so1 + d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=hm[:, None])
        else:
            po = po_ptr + b.to(tl.int64) * sp0 + heads[:, None] * sp1 + (s_off + s) * sp2 + d[None, :]
            tl.store(po, acc / l_i[:, None], mask=hm[:, None])
            pl = pl_ptr + b.to(tl.int64) * sl0 + heads * sl1 + s_off + s
            tl.store(pl, m_i + tl.log2(l_i), mask=hm)
    elif WHOLE:  # a padded row (seq_len 0): zeros, so no NaN reaches the layers after attention
        hh = tl.arange(0, BLOCK_H)
        d = tl.arange(0, D)
        tl.store(o_ptr + b.to(tl.int64) * so0 + (kvh * GROUP + hh)[:, None] * so1 + d[None, :],
                 tl.zeros([BLOCK_H, D], tl.float32).to(o_ptr.dtype.element_ty), mask=(hh < GROUP)[:, None])


@triton.jit
def _decode_prefix_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, rows_ptr, plen_ptr, po_ptr, pl_ptr,
                          sq0, sq1, skb, skt, skh, sbt, sp0, sp1, sp2, sl0, sl1, srow, scale_log2,
                          GROUP: tl.constexpr, MAX_N: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr,
                          BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    """One (group, kv head, split) of a shared prefix: every member's query heads in one tile."""
    g = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    plen = tl.load(plen_ptr + g).to(tl.int32)
    lo = s * SPLIT
    hi = tl.minimum(lo + SPLIT, plen)
    if lo < hi:
        r = tl.arange(0, BLOCK_M)
        member = r // GROUP
        heads = kvh * GROUP + r % GROUP
        mrow = tl.load(rows_ptr + g.to(tl.int64) * srow + member, mask=member < MAX_N, other=-1)
        rm = mrow >= 0
        mrow = tl.where(rm, mrow, 0).to(tl.int64)
        first = tl.load(rows_ptr + g.to(tl.int64) * srow).to(tl.int64)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + mrow[:, None] * sq0 + heads[:, None] * sq1 + d[None, :], mask=rm[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        bt_row = bt_ptr + first * sbt
        for n0 in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _attend_block(q, kc_ptr, vc_ptr, bt_row, n0, hi, kvh, skb, skt, skh, scale_log2,
                                          m_i, l_i, acc, 0, D, BLOCK_N, PAGE, PREC, False, 0)
        po = po_ptr + mrow[:, None] * sp0 + heads[:, None] * sp1 + s * sp2 + d[None, :]
        tl.store(po, acc / l_i[:, None], mask=rm[:, None])
        tl.store(pl_ptr + mrow * sl0 + heads * sl1 + s, m_i + tl.log2(l_i), mask=rm)


@triton.jit
def _merge_kernel(po_ptr, pl_ptr, sl_ptr, start_ptr, o_ptr, sink_ptr, sp0, sp1, sp2, sl0, sl1, so0, so1,
                  n_prefix, n_own,
                  D: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT: tl.constexpr, SPLIT_P: tl.constexpr,
                  HAS_START: tl.constexpr, HAS_SINKS: tl.constexpr):
    """Combines a row's partials (and its head's sink). Windowed rows need no window here: a
    row longer than the window fills all n_own = cdiv(window, SPLIT) splits, a shorter one
    starts at 0."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(sl_ptr + b).to(tl.int32)
    start = _own_start(start_ptr, b, seq_len, HAS_START, 0)
    s = tl.arange(0, BLOCK_S)
    valid_p = (s < n_prefix) & (s * SPLIT_P < start)
    own = s - n_prefix
    valid_o = (s >= n_prefix) & (own < n_own) & (start + own * SPLIT < seq_len)
    valid = valid_p | valid_o
    base = b.to(tl.int64) * sl0 + h * sl1
    lse = tl.load(pl_ptr + base + s, mask=valid, other=float("-inf"))
    mx = tl.max(lse, 0)
    if HAS_SINKS:  # one more partial: the sink's logit, with a zero output
        s2 = tl.load(sink_ptr + h).to(tl.float32) * _LOG2E
        mx = tl.maximum(mx, s2)
    w = tl.where(valid, tl.exp2(lse - mx), 0.0)
    total = tl.sum(w, 0)
    if HAS_SINKS:
        total += tl.exp2(s2 - mx)
    d = tl.arange(0, D)
    parts = tl.load(po_ptr + b.to(tl.int64) * sp0 + h * sp1 + s[:, None] * sp2 + d[None, :],
                    mask=valid[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.maximum(total, 1e-30)
    tl.store(o_ptr + b.to(tl.int64) * so0 + h * so1 + d, out.to(o_ptr.dtype.element_ty))


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
            scale: float, window: int | None, sinks: torch.Tensor | None) -> torch.Tensor:
    bsz, hq, d = q.shape
    _check_head_dim(d)
    _check_window_sinks(q, window, sinks)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if bsz == 0:
        return out
    hk, page = k_cache.shape[2], k_cache.shape[1]
    group = hq // hk
    # A window reads each row's last `window` tokens only: no shared prefix to group by.
    casc = getattr(meta, "cascade", None) if window is None else None
    span = meta.max_seq_len if window is None else min(meta.max_seq_len, window)  # own tokens, at most
    cfg = DECODE_CFG
    split = own_split(bsz, hk, span)
    # A window that fits one split: one program per (row, kv head) finishes the row (no merge).
    whole = bsz * hk >= cfg["whole_own_pairs"] or (window is not None and window <= split)
    split_p, stages_p = prefix_split(casc.group_rows.shape[0], hk) if casc is not None else (1, 1)
    n_prefix = triton.cdiv(casc.max_prefix_len, split_p) if casc is not None else 0
    n_own = 1 if whole else max(1, triton.cdiv(max(span, 1), split))
    n_parts = n_prefix if whole else n_prefix + n_own
    if n_parts:
        po = torch.empty(bsz, hq, n_parts, d, dtype=torch.float32, device=q.device)
        pl = torch.empty(bsz, hq, n_parts, dtype=torch.float32, device=q.device)
    else:  # whole own parts, no shared prefix: the kernel writes the output directly
        po = pl = torch.empty(1, 1, 1, 1, dtype=torch.float32, device=q.device)
    prec = _prec(q.dtype)
    scale_log2 = scale * LOG2E
    start = casc.row_prefix_len if casc is not None else meta.seq_lens
    sink_arg = q if sinks is None else sinks
    if n_prefix:
        _decode_prefix(q, k_cache, v_cache, meta, casc, po, pl, scale_log2, n_prefix, split_p, stages_p)
    _decode_split_kernel[(bsz, hk, n_own)](
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, start, po, pl, out, sink_arg,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        meta.block_tables.stride(0), po.stride(0), po.stride(1), po.stride(2), pl.stride(0), pl.stride(1),
        out.stride(0), out.stride(1), n_prefix, scale_log2, GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)), D=d, BLOCK_N=cfg["block_n"] if d <= 128 else 32,
        PAGE=page, SPLIT=split, HAS_START=casc is not None, PREC=prec, WHOLE=whole, SPLIT_P=split_p,
        WINDOW=window or 0, HAS_SINKS=sinks is not None,
        num_warps=cfg["warps"], num_stages=cfg["stages"])
    if not whole:
        _merge_kernel[(bsz, hq)](
            po, pl, meta.seq_lens, start, out, sink_arg, po.stride(0), po.stride(1), po.stride(2), pl.stride(0),
            pl.stride(1), out.stride(0), out.stride(1), n_prefix, n_own, D=d,
            BLOCK_S=triton.next_power_of_2(n_prefix + n_own), SPLIT=split, SPLIT_P=split_p,
            HAS_START=casc is not None, HAS_SINKS=sinks is not None, num_warps=4)
    return out


def _decode_prefix(q, k_cache, v_cache, meta, casc, po, pl, scale_log2, n_prefix, split_p, stages_p) -> None:
    """The shared-prefix partials of the cascade groups (one program per group, kv head, split)."""
    cfg = DECODE_CFG
    hk, d = k_cache.shape[2], q.shape[2]
    group = q.shape[1] // hk
    rows = casc.group_rows
    max_n = rows.shape[1]
    block_m = max(16, triton.next_power_of_2(max_n * group))
    _decode_prefix_kernel[(rows.shape[0], hk, n_prefix)](
        q, k_cache, v_cache, meta.block_tables, rows, casc.group_prefix_len, po, pl,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        meta.block_tables.stride(0), po.stride(0), po.stride(1), po.stride(2), pl.stride(0), pl.stride(1),
        rows.stride(0), scale_log2, GROUP=group, MAX_N=max_n, BLOCK_M=block_m, D=d,
        BLOCK_N=cfg["prefix_block_n"] if d <= 128 else 32, PAGE=k_cache.shape[1], SPLIT=split_p,
        PREC=_prec(q.dtype), num_warps=cfg["prefix_warps"] or (4 if block_m <= 64 else 8), num_stages=stages_p)


@register("paged_attention_decode", B, "cascade")
def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float) -> torch.Tensor:
    return _decode(q, k_cache, v_cache, meta, scale, None, None)


@register("sliding_sink_attention_decode", B, "cascade")
def sliding_sink_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  meta: AttentionMetadata, scale: float, window: int | None,
                                  sinks: torch.Tensor | None) -> torch.Tensor:
    """paged_attention_decode with a sliding window (reads only each row's last `window` tokens:
    never a block a sliding layer gave back; no shared-prefix grouping) and per-head sinks; full
    layers (window None) keep the shared-prefix groups."""
    return _decode(q, k_cache, v_cache, meta, scale, window, sinks)
