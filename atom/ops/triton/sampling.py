"""Sampling on the GPU: one program per row, two passes over the vocabulary, no host sync.

Pass 1 takes the row's max and sum of exponentials of logits / temperature (and of the raw
logits when raw logprobs are asked for); pass 2 takes the arg-max of processed logprob + Gumbel
noise, the noise being exactly the counter-based stream of torch_ops.uniform_noise: the same
row key (torch_ops.row_keys, computed in the kernel from the seed and counter), the same 32-bit
hashes of (row key, token id) computed in uint32, the same uniforms, -log(-log(u)) through
libdevice's log as torch's CUDA log. So CPU and GPU draw the same tokens from equal logits,
except where two candidates tie to the last bit of rounding.

Rows with top-k / top-p / min-p filters take the torch reference path (the filters need a sort
of the vocabulary). Logits processing runs first (atom/ops/logits_processing.py: allowed / banned
tokens and logit bias as sparse torch ops, the penalties in one kernel, penalties.py) and the
kernel samples from its result; top-k logprobs and logits modes come from torch over the row's
values. The sampled token's rank (vLLM's Logprob.rank: how many tokens have a value >= its own)
is counted in the kernel by a third pass over the row (the split path: a fourth launch, a count
per chunk), comparing what torch's token_ranks compares with torch's division rounding.

Small batches (fewer than SPLIT_BELOW_ROWS rows, vocabulary of at least SPLIT_MIN_VOCAB) split
each row into SPLIT_CHUNK-token chunks instead, so that the whole GPU works on a few rows (one
program per row keeps one SM busy: 114 us at batch 1 on an H200, against 6.3 us split). Three
launches, grids from the row count and vocabulary size alone (no host sync; CUDA-graph safe):
  A (rows, chunks): per chunk, max and sum of exp of the processed (and raw) logits;
  B (rows, chunks): every program combines its row's chunk partials, in one fixed order, into the
     global max and logsum (all programs of a row get the same bits), then takes its chunk's
     arg-max of ((y - mx) - logsum) + g exactly as the one-program kernel does; chunk 0 stores
     the row's max and logsum;
  C (rows,): the largest chunk winner, lowest token id on exact ties, as the one-program kernel
     does; token, processed logprob (with B's max and logsum) and raw logprob.
The per-token arg-max values and tie rule are the one-program kernel's; only the order in which
the exponentials are summed differs (per chunk, then over chunks, against per lane, then over
lanes), so logsum, and so each logprob, may differ from the one-program kernel's in the last bits
(a few fp32 rounding steps of logsum, ~1e-6 for logsums of order 10; the tests hold the logprobs
of both paths and of torch to 1e-5 of each other). The sampled token can change only where the
two best candidates' values lie within that rounding of each other, as it already can between
the one-program kernel and torch; the tests check token identity.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from atom.ops import torch_ops
from atom.ops.logits_processing import process_logits, report_source, token_ranks, top_count
from atom.ops.metadata import SamplerOutput, SamplingMetadata
from atom.ops.registry import register
from atom.ops.triton.penalties import apply_penalties
from atom.ops.triton import pdl
from atom.ops.triton.pdl import grid_dependency

try:  # libdevice's precise logf, what torch's CUDA kernels use
    from triton.language.extra import libdevice
    _PRECISE_LOG = os.environ.get("TRITON_INTERPRET") != "1"
except Exception:  # pragma: no cover
    libdevice = None
    _PRECISE_LOG = False

B = "triton"

# The split (vocabulary-parallel) path: rows below SPLIT_BELOW_ROWS with a vocabulary of at least
# SPLIT_MIN_VOCAB tokens; each row in chunks of SPLIT_CHUNK tokens (151,936 -> 75 chunks).
# H200, vocabulary 151,936, kernels alone, us (one program per row / split): rows 1: 114 / 6.3,
# 16: 116 / 18, 64: 118 / 51, 128: 154 / 101, 256: 201 / 194, 384: 277 / 287, 512: 348 / 379.
# Both are arithmetic-bound from about 64 rows on (hashes, two precise logs and a division per
# token); chunks of 4096 were within 3% of 2048 everywhere, 6.3 against 7.1 us at one row.
SPLIT_BELOW_ROWS = 256
SPLIT_MIN_VOCAB = 16384
SPLIT_CHUNK = 2048
_INT_MAX = tl.constexpr(2147483647)


@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * tl.full([], 0x85EBCA6B, tl.uint32)
    h = h ^ (h >> 13)
    h = h * tl.full([], 0xC2B2AE35, tl.uint32)
    return h ^ (h >> 16)


@triton.jit
def _fmix32_i64(h):
    """torch_ops._fmix32 as torch computes it: int64, products wrap, masked to 32 bits."""
    m32 = tl.full([], 0xFFFFFFFF, tl.int64)
    h = h ^ (h >> 16)
    h = (h * tl.full([], 0x85EBCA6B, tl.int64)) & m32
    h = h ^ (h >> 13)
    h = (h * tl.full([], 0xC2B2AE35, tl.int64)) & m32
    return h ^ (h >> 16)


@triton.jit
def _row_key(seed_ptr, counter_ptr, r):
    """torch_ops.row_keys of row r, bit for bit (in int64: the unmasked sums' carries count)."""
    m32 = tl.full([], 0xFFFFFFFF, tl.int64)
    seed = tl.load(seed_ptr + r).to(tl.int64)
    counter = tl.load(counter_ptr + r).to(tl.int64)
    lo, hi = seed & m32, (seed >> 32) & m32
    k = _fmix32_i64(_fmix32_i64(lo ^ _fmix32_i64(hi + tl.full([], 0x9E3779B9, tl.int64)))
                    ^ _fmix32_i64((counter & m32) + tl.full([], 0x7F4A7C15, tl.int64)))
    return k.to(tl.uint32)


@triton.jit
def _uniform_bits(key, i):
    """The 23 random bits of token ids i under a row key (torch_ops.uniform_noise's)."""
    ih = _fmix32(i.to(tl.uint32) * tl.full([], 0x2545F491, tl.uint32))
    return _fmix32(key ^ ih) >> 9


@triton.jit
def _uniform(bits):
    return (bits.to(tl.float32) + 0.5) * (1.0 / 8388608.0)


@triton.jit
def _gumbel_of(u, PRECISE_LOG: tl.constexpr):
    """-log(-log(u)) as torch computes it (libdevice's precise logf on the GPU)."""
    if PRECISE_LOG:
        g = -libdevice.log(-libdevice.log(u))
    else:
        g = -tl.log(-tl.log(u))
    return g


@triton.jit
def _gumbel(key, i, PRECISE_LOG: tl.constexpr):
    """Gumbel noise of token ids i under a row key: torch_ops.uniform_noise, then -log(-log(u))."""
    return _gumbel_of(_uniform(_uniform_bits(key, i)), PRECISE_LOG)


@triton.jit
def _gumbel_bound(bits, PRECISE_LOG: tl.constexpr):
    """_gumbel_of's value within GUMBEL_SLACK, from two hardware log2 approximations (lg2.approx:
    absolute error 2^-22.6): +inf where u > 1 - 2^-16 (-log(u) below 1.5e-5, where that error
    is no longer small against it). Elsewhere -log(u) >= 1.5e-5 is off by at most 7.3e-3 of
    itself, so the noise by at most ~7.4e-3 (plus fp32 rounding, ~1e-6): a sixteenth bounds it."""
    u = _uniform(bits)
    if PRECISE_LOG:
        g = -libdevice.fast_log2f(-libdevice.fast_log2f(u) * 0.6931471805599453) * 0.6931471805599453
    else:  # the interpreter: its log is numpy's
        g = -tl.log(-tl.log(u))
    return tl.where(bits >= 8388480, float("inf"), g)


GUMBEL_SLACK = tl.constexpr(0.0625)


@triton.jit
def _argmax_step(val, i, best, bidx):
    """Per-lane running arg-max: a lane keeps its first (lowest) id on equal values."""
    upd = val > best
    return tl.where(upd, val, best), tl.where(upd, i, bidx)


@triton.jit
def _rank_basis(x, tt, raw_row):
    """What token_ranks compares for a row: the logits for raw-logprob rows, else logits /
    temperature rounded as torch divides (div_rn: Triton's `/` is div.full, up to 2 ulp off)."""
    return tl.where(raw_row, x, tl.math.div_rn(x, tt))


@triton.jit
def _count_at_least(row, lo, hi, own, tt, raw_row, BLOCK: tl.constexpr):
    """How many of the row's tokens in [lo, hi) have a rank basis >= own. Rows whose basis is the
    logits themselves (raw rows, temperature 1: x / 1 == x) skip the division."""
    lanes = tl.arange(0, BLOCK)
    cnt = tl.zeros([BLOCK], tl.int32)
    if raw_row | (tt == 1.0):
        for v0 in range(lo, hi, BLOCK):
            i = v0 + lanes
            im = i < hi
            x = tl.load(row + i, mask=im, other=float("-inf")).to(tl.float32)
            cnt += (im & (x >= own)).to(tl.int32)
    else:
        for v0 in range(lo, hi, BLOCK):
            i = v0 + lanes
            im = i < hi
            x = tl.load(row + i, mask=im, other=float("-inf")).to(tl.float32)
            cnt += (im & (tl.math.div_rn(x, tt) >= own)).to(tl.int32)
    return tl.sum(cnt, 0)


@triton.jit
def _online_add(m, s, y):
    """y into a per-lane running (max, sum of exp(. - max)) with one exponential a value:
    exp(m - y) rescales the sum when y is the new max, else exp(y - m) is added: the values of
    the two-exponential form s * exp(m - max) + exp(y - max), whose other factor is exp(0) = 1."""
    d = y - m
    up = d > 0.0
    e = tl.exp(tl.where(up, -d, d))
    s = tl.where(up, s * e + 1.0, s + e)
    m = tl.maximum(m, y)
    return m, tl.where(m == float("-inf"), 0.0, s)


@triton.jit
def _scaled(x, tt, UNIT_T: tl.constexpr):
    """logits / temperature; UNIT_T rows (temperature 1, greedy rows) skip the division, whose
    result would be x itself (about a tenth of the kernel's instructions a token)."""
    if UNIT_T:
        y = x
    else:
        y = x / tt
    return y


@triton.jit
def _stats_pass(row, V, tt, NEED_RAW: tl.constexpr, UNIT_T: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1: per lane, max and sum of exp of logits / temperature (and of the raw logits)."""
    lanes = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    mr = tl.full([BLOCK], float("-inf"), tl.float32)
    sr = tl.zeros([BLOCK], tl.float32)
    for v0 in range(0, V, BLOCK):
        i = v0 + lanes
        x = tl.load(row + i, mask=i < V, other=float("-inf")).to(tl.float32)
        m, s = _online_add(m, s, _scaled(x, tt, UNIT_T))
        if NEED_RAW:
            mr, sr = _online_add(mr, sr, x)
    return m, s, mr, sr


@triton.jit
def _argmax_pass(row, V, tt, greedy, mx, logsum, key, ALL_GREEDY: tl.constexpr,
                 PRECISE_LOG: tl.constexpr, UNIT_T: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2: per lane, the arg-max of (processed logprob + Gumbel noise), or of the logits for
    greedy rows. The precise noise (two libdevice logs a token: most of the kernel's arithmetic)
    is computed only for blocks whose bound (_gumbel_bound) comes within GUMBEL_SLACK of the best
    value so far: no token of a skipped block can reach it, so the arg-max and its ties are the
    exact ones."""
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    bidx = tl.zeros([BLOCK], tl.int32)
    top = tl.max(best, 0)
    for v0 in range(0, V, BLOCK):
        i = v0 + lanes
        im = i < V
        y = _scaled(tl.load(row + i, mask=im, other=float("-inf")).to(tl.float32), tt, UNIT_T)
        if ALL_GREEDY:
            best, bidx = _argmax_step(tl.where(im, y, float("-inf")), i, best, bidx)
        else:
            z = (y - mx) - logsum
            bits = _uniform_bits(key, i)
            bound = tl.where(im, tl.where(greedy, y, z + _gumbel_bound(bits, PRECISE_LOG)), float("-inf"))
            if tl.max(bound, 0) > top - GUMBEL_SLACK:
                val = tl.where(im, tl.where(greedy, y, z + _gumbel_of(_uniform(bits), PRECISE_LOG)), float("-inf"))
                best, bidx = _argmax_step(val, i, best, bidx)
                top = tl.maximum(top, tl.max(val, 0))
    return best, bidx


@triton.jit
def _sample_kernel(logits_ptr, temp_ptr, seed_ptr, counter_ptr, tok_ptr, lp_ptr, raw_ptr, rawrow_ptr,
                   rank_ptr, V, sl, ALL_GREEDY: tl.constexpr, NEED_RAW: tl.constexpr,
                   PRECISE_LOG: tl.constexpr, WANT_RANK: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    grid_dependency(PDL)
    r = tl.program_id(0).to(tl.int64)
    row = logits_ptr + r * sl
    t = tl.load(temp_ptr + r)
    greedy = t <= 0.0
    tt = tl.where(greedy, 1.0, t)
    unit_t = tt == 1.0
    if unit_t:
        m, s, mr, sr = _stats_pass(row, V, tt, NEED_RAW, True, BLOCK)
    else:
        m, s, mr, sr = _stats_pass(row, V, tt, NEED_RAW, False, BLOCK)
    mx = tl.max(m, 0)
    logsum = tl.log(tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - mx)), 0))
    key = _row_key(seed_ptr, counter_ptr, r)
    if unit_t:
        best, bidx = _argmax_pass(row, V, tt, greedy, mx, logsum, key, ALL_GREEDY, PRECISE_LOG, True, BLOCK)
    else:
        best, bidx = _argmax_pass(row, V, tt, greedy, mx, logsum, key, ALL_GREEDY, PRECISE_LOG, False, BLOCK)
    top = tl.max(best, 0)
    tok = tl.min(tl.where(best == top, bidx, 2147483647), 0)
    xt = tl.load(row + tok).to(tl.float32)
    tl.store(tok_ptr + r, tok.to(tl.int64))
    tl.store(lp_ptr + r, (xt / tt - mx) - logsum)
    if NEED_RAW:
        mxr = tl.max(mr, 0)
        logsum_r = tl.log(tl.sum(tl.where(mr == float("-inf"), 0.0, sr * tl.exp(mr - mxr)), 0))
        tl.store(raw_ptr + r, (xt - mxr) - logsum_r)
    if WANT_RANK:  # pass 3: the sampled token's rank (a compare per token: cheap next to pass 2)
        raw_row = tl.load(rawrow_ptr + r) != 0
        tl.store(rank_ptr + r, _count_at_least(row, 0, V, _rank_basis(xt, tt, raw_row), tt, raw_row, BLOCK))


# ---- the split path (small batches): kernels A, B, C of the module docstring ---------------------

@triton.jit
def _chunk_stats(x):
    """Max and sum of exp(x - max) over one chunk; sum 0 where the whole chunk is -inf."""
    m = tl.max(x, 0)
    s = tl.sum(tl.exp(x - m), 0)
    return m, tl.where(m == float("-inf"), 0.0, s)


@triton.jit
def _row_stats(part_ptr, NCH, NCH_P: tl.constexpr):
    """Global max and log-sum-exp of one row from its chunk partials (max row, then sum row)."""
    j = tl.arange(0, NCH_P)
    jm = j < NCH
    pm = tl.load(part_ptr + j, mask=jm, other=float("-inf"))
    ps = tl.load(part_ptr + NCH + j, mask=jm, other=0.0)
    mx = tl.max(pm, 0)
    logsum = tl.log(tl.sum(tl.where(pm == float("-inf"), 0.0, ps * tl.exp(pm - mx)), 0))
    return mx, logsum


@triton.jit
def _split_stats_kernel(logits_ptr, temp_ptr, part_ptr, V, sl, NCH,
                        NEED_RAW: tl.constexpr, KP: tl.constexpr, CHUNK: tl.constexpr):
    """A: part[r] = [max, sumexp of logits / temperature (, max, sumexp of logits)] per chunk."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    t = tl.load(temp_ptr + r)
    tt = tl.where(t <= 0.0, 1.0, t)
    i = c * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(logits_ptr + r * sl + i, mask=i < V, other=float("-inf")).to(tl.float32)
    part = part_ptr + r * (KP * NCH) + c
    m, s = _chunk_stats(x / tt)
    tl.store(part, m)
    tl.store(part + NCH, s)
    if NEED_RAW:
        mr, sr = _chunk_stats(x)
        tl.store(part + 2 * NCH, mr)
        tl.store(part + 3 * NCH, sr)


@triton.jit
def _split_argmax_kernel(logits_ptr, temp_ptr, seed_ptr, counter_ptr, part_ptr, best_ptr,
                         bidx_ptr, stat_ptr, V, sl, NCH, ALL_GREEDY: tl.constexpr,
                         PRECISE_LOG: tl.constexpr, KP: tl.constexpr, CHUNK: tl.constexpr,
                         NCH_P: tl.constexpr):
    """B: the row's max and logsum from the partials, then this chunk's best value and token."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    t = tl.load(temp_ptr + r)
    greedy = t <= 0.0
    tt = tl.where(greedy, 1.0, t)
    mx, logsum = _row_stats(part_ptr + r * (KP * NCH), NCH, NCH_P)
    i = c * CHUNK + tl.arange(0, CHUNK)
    im = i < V
    x = tl.load(logits_ptr + r * sl + i, mask=im, other=float("-inf")).to(tl.float32)
    y = x / tt
    if ALL_GREEDY:
        val = y
    else:
        key = _row_key(seed_ptr, counter_ptr, r)
        g = _gumbel(key, i, PRECISE_LOG)
        val = tl.where(greedy, y, ((y - mx) - logsum) + g)
    # As the one-program kernel: NaN never wins, the lowest token id wins exact ties; a chunk
    # with nothing above -inf reports its first token, so a row with nothing gets token 0.
    val = tl.where(im & (val == val), val, float("-inf"))
    top = tl.max(val, 0)
    idx = tl.min(tl.where(val == top, i, _INT_MAX), 0)
    tl.store(best_ptr + r * NCH + c, top)
    tl.store(bidx_ptr + r * NCH + c, idx)
    first = c == 0
    tl.store(stat_ptr + 2 * r, mx, mask=first)
    tl.store(stat_ptr + 2 * r + 1, logsum, mask=first)


@triton.jit
def _split_final_kernel(logits_ptr, temp_ptr, part_ptr, best_ptr, bidx_ptr, stat_ptr, tok_ptr,
                        lp_ptr, raw_ptr, sl, NCH, NEED_RAW: tl.constexpr, KP: tl.constexpr,
                        NCH_P: tl.constexpr):
    """C: the best chunk winner (lowest token id on exact ties), its token and logprobs."""
    r = tl.program_id(0).to(tl.int64)
    t = tl.load(temp_ptr + r)
    tt = tl.where(t <= 0.0, 1.0, t)
    j = tl.arange(0, NCH_P)
    jm = j < NCH
    best = tl.load(best_ptr + r * NCH + j, mask=jm, other=float("-inf"))
    bidx = tl.load(bidx_ptr + r * NCH + j, mask=jm, other=_INT_MAX)
    top = tl.max(best, 0)
    tok = tl.min(tl.where(best == top, bidx, _INT_MAX), 0)
    row = logits_ptr + r * sl
    xt = tl.load(row + tok).to(tl.float32)
    mx = tl.load(stat_ptr + 2 * r)
    logsum = tl.load(stat_ptr + 2 * r + 1)
    tl.store(tok_ptr + r, tok.to(tl.int64))
    tl.store(lp_ptr + r, (xt / tt - mx) - logsum)
    if NEED_RAW:
        mxr, logsum_r = _row_stats(part_ptr + r * (KP * NCH) + 2 * NCH, NCH, NCH_P)
        tl.store(raw_ptr + r, (xt - mxr) - logsum_r)


@triton.jit
def _split_rank_kernel(logits_ptr, temp_ptr, tok_ptr, rawrow_ptr, cnt_ptr, V, sl, NCH, CHUNK: tl.constexpr):
    """D (rows, chunks), after C: how many of this chunk's tokens rank at or above the sampled one."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    t = tl.load(temp_ptr + r)
    tt = tl.where(t <= 0.0, 1.0, t)
    raw_row = tl.load(rawrow_ptr + r) != 0
    row = logits_ptr + r * sl
    own = _rank_basis(tl.load(row + tl.load(tok_ptr + r)).to(tl.float32), tt, raw_row)
    lo = c * CHUNK
    tl.store(cnt_ptr + r * NCH + c, _count_at_least(row, lo, tl.minimum(lo + CHUNK, V), own, tt, raw_row, CHUNK))


def use_split(rows: int, vocab: int) -> bool:
    """Whether `sample` takes the vocabulary-parallel path for this shape."""
    return 0 < rows < SPLIT_BELOW_ROWS and vocab >= SPLIT_MIN_VOCAB


def _launch_split(logits, temp, seeds, counters, tokens, lps, raw, all_greedy: bool,
                  need_raw: bool, chunk: int = SPLIT_CHUNK, raw_rows=None) -> torch.Tensor | None:
    """Kernels A, B, C; with raw_rows (the rows' raw-logprob flags), D too: returns the ranks."""
    rows, vocab = logits.shape
    nch = triton.cdiv(vocab, chunk)
    nch_p = max(triton.next_power_of_2(nch), 2)
    kp = 4 if need_raw else 2
    dev = logits.device
    ws = torch.empty(rows * (kp * nch + nch + 2), dtype=torch.float32, device=dev)
    part = ws[: rows * kp * nch]
    best = ws[rows * kp * nch: rows * (kp + 1) * nch]
    stat = ws[rows * (kp + 1) * nch:]
    bidx = torch.empty(rows * nch, dtype=torch.int32, device=dev)
    sl = logits.stride(0)
    warps = 4 if chunk <= 2048 else 8
    _split_stats_kernel[(rows, nch)](logits, temp, part, vocab, sl, nch,
                                     NEED_RAW=need_raw, KP=kp, CHUNK=chunk, num_warps=warps)
    _split_argmax_kernel[(rows, nch)](logits, temp, seeds, counters, part, best, bidx, stat, vocab,
                                      sl, nch, ALL_GREEDY=all_greedy, PRECISE_LOG=_PRECISE_LOG,
                                      KP=kp, CHUNK=chunk, NCH_P=nch_p, num_warps=warps)
    _split_final_kernel[(rows,)](logits, temp, part, best, bidx, stat, tokens, lps, raw, sl, nch,
                                 NEED_RAW=need_raw, KP=kp, NCH_P=nch_p, num_warps=4)
    if raw_rows is None:
        return None
    counts = torch.empty(rows, nch, dtype=torch.int32, device=dev)
    _split_rank_kernel[(rows, nch)](logits, temp, tokens, raw_rows, counts, vocab, sl, nch, CHUNK=chunk,
                                    num_warps=warps)
    return counts.sum(-1)  # int64, as token_ranks


@register("sample", B, "low_precision_logits")
def sample(logits: torch.Tensor, meta: SamplingMetadata,
           split: bool | None = None) -> SamplerOutput:
    """split: None picks the path from the shape (use_split); True / False forces the split /
    one-program path (tests and benchmarks). Logits processing (bias, allowed and banned tokens,
    then the penalty kernel) runs first; the kernel samples from what it returns."""
    if meta.need_filter:
        return torch_ops.sample(logits, meta, penalize=apply_penalties)
    # bf16 / fp16 logits go to the kernels as they are (every load widens to float32, the values
    # a float32 copy would hold): process_logits widens them only when a row processes them.
    raw_logits = logits
    logits = process_logits(raw_logits, meta, apply_penalties)
    processed_in = logits is not raw_logits
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    dev = logits.device
    tokens = torch.empty(rows, dtype=torch.int64, device=dev)
    lps = torch.empty(rows, dtype=torch.float32, device=dev)
    raw = torch.empty(rows if meta.any_raw else 1, dtype=torch.float32, device=dev)
    # Ranks in the kernel unless a raw-logprob row's logits were processed (the kernel sees only
    # the processed ones; token_ranks then counts over the raw logits in torch).
    kernel_ranks = meta.want_ranks and not (meta.any_raw and processed_in)
    ranks = None
    if rows:
        temp = meta.temperature.float()
        raw_rows = meta.raw_logprobs if kernel_ranks else None
        if use_split(rows, vocab) if split is None else split:
            ranks = _launch_split(logits, temp, meta.seeds, meta.counters, tokens, lps, raw,
                                  meta.all_greedy, meta.any_raw, raw_rows=raw_rows)
        else:
            ranks = torch.empty(rows, dtype=torch.int64, device=dev) if kernel_ranks else None
            _sample_kernel[(rows,)](logits, temp, meta.seeds, meta.counters, tokens, lps, raw,
                                    raw_rows if kernel_ranks else tokens, ranks if kernel_ranks else tokens,
                                    vocab, logits.stride(0), ALL_GREEDY=meta.all_greedy,
                                    NEED_RAW=meta.any_raw, PRECISE_LOG=_PRECISE_LOG,
                                    WANT_RANK=kernel_ranks, BLOCK=2048, num_warps=8, **pdl.options())
    elif kernel_ranks:
        ranks = torch.empty(0, dtype=torch.int64, device=dev)
    return _report(raw_logits, logits, processed_in, tokens, lps, raw, meta, ranks)


def _report(raw_logits: torch.Tensor, logits: torch.Tensor, processed_in: bool, tokens: torch.Tensor,
            lps: torch.Tensor, raw: torch.Tensor, meta: SamplingMetadata,
            ranks: torch.Tensor | None = None) -> SamplerOutput:
    """The kernel's token logprobs (processed, and raw of what it was given), corrected where the
    kernel could not know: raw values when the logits were processed before it, logits modes;
    then top-k alternatives and ranks from torch over the same values torch_ops reports."""
    rows, vocab = logits.shape
    k = top_count(meta, vocab)
    need_values = meta.any_logits or (meta.any_raw and processed_in)
    if not (need_values or k > 0 or (meta.want_ranks and ranks is None)):
        token_lps = torch.where(meta.raw_logprobs, raw, lps) if meta.any_raw else lps
        empty = torch.empty(rows, 0, device=logits.device)
        return SamplerOutput(tokens, token_lps, empty.long(), empty, ranks)
    raw_logits = raw_logits.float()  # (low-precision logits the kernel read as they are)
    logits = logits if processed_in else raw_logits
    temperature = torch.where(meta.temperature > 0, meta.temperature, torch.ones_like(meta.temperature))
    scaled = logits / temperature[:, None]
    token_lps = torch.where(meta.raw_logprobs, raw, lps) if meta.any_raw and not processed_in else lps
    source = None
    if need_values or k > 0:
        source = report_source(raw_logits, scaled, None, meta)
    if need_values:
        # Kernel values stay where they are right (processed logprobs; raw ones of unprocessed logits).
        exact = source.gather(-1, tokens[:, None]).squeeze(-1)
        redo = meta.raw_logprobs if meta.any_raw and processed_in else torch.zeros_like(meta.raw_logprobs)
        if meta.any_logits:
            redo = redo | meta.report_logits
        token_lps = torch.where(redo, exact, token_lps)
    if k > 0:
        top_lps, top_ids = source.topk(k, dim=-1)
    else:
        top_lps = torch.empty(rows, 0, dtype=torch.float32, device=logits.device)
        top_ids = torch.empty(rows, 0, dtype=torch.int64, device=logits.device)
    if meta.want_ranks and ranks is None:
        ranks = token_ranks(raw_logits, scaled, tokens, meta)
    return SamplerOutput(tokens, token_lps, top_ids, top_lps, ranks)
