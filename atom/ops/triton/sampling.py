"""Sampling on the GPU: one program per row, two passes over the vocabulary, no host sync.

Pass 1 takes the row's max and sum of exponentials of logits / temperature (and of the raw
logits when raw logprobs are asked for); pass 2 takes the arg-max of processed logprob + Gumbel
noise, the noise being exactly the counter-based stream of torch_ops.uniform_noise: the same
32-bit hashes of (row key, token id) computed in uint32, the same uniforms, -log(-log(u)) through
libdevice's log as torch's CUDA log. So CPU and GPU draw the same tokens from equal logits,
except where two candidates tie to the last bit of rounding.

Rows with top-k / top-p / min-p filters or banned tokens take the torch reference path (the
filters need a sort of the vocabulary); top-k logprobs come from a torch top-k over the row's
log-softmax.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from atom.ops import torch_ops
from atom.ops.metadata import SamplerOutput, SamplingMetadata
from atom.ops.registry import register

try:  # libdevice's precise logf, what torch's CUDA kernels use
    from triton.language.extra import libdevice
    _PRECISE_LOG = os.environ.get("TRITON_INTERPRET") != "1"
except Exception:  # pragma: no cover
    libdevice = None
    _PRECISE_LOG = False

B = "triton"


@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * tl.full([], 0x85EBCA6B, tl.uint32)
    h = h ^ (h >> 13)
    h = h * tl.full([], 0xC2B2AE35, tl.uint32)
    return h ^ (h >> 16)


@triton.jit
def _sample_kernel(logits_ptr, temp_ptr, key_ptr, tok_ptr, lp_ptr, raw_ptr, V, sl,
                   ALL_GREEDY: tl.constexpr, NEED_RAW: tl.constexpr, PRECISE_LOG: tl.constexpr,
                   BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    row = logits_ptr + r * sl
    t = tl.load(temp_ptr + r)
    greedy = t <= 0.0
    tt = tl.where(greedy, 1.0, t)
    lanes = tl.arange(0, BLOCK)
    # Pass 1: max and sum of exp, per lane, then combined.
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    mr = tl.full([BLOCK], float("-inf"), tl.float32)
    sr = tl.zeros([BLOCK], tl.float32)
    for v0 in range(0, V, BLOCK):
        i = v0 + lanes
        x = tl.load(row + i, mask=i < V, other=float("-inf"))
        y = x / tt
        m_new = tl.maximum(m, y)
        dead = m_new == float("-inf")
        s = tl.where(dead, 0.0, s * tl.exp(m - m_new) + tl.exp(y - m_new))
        m = m_new
        if NEED_RAW:
            mr_new = tl.maximum(mr, x)
            dead_r = mr_new == float("-inf")
            sr = tl.where(dead_r, 0.0, sr * tl.exp(mr - mr_new) + tl.exp(x - mr_new))
            mr = mr_new
    mx = tl.max(m, 0)
    logsum = tl.log(tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - mx)), 0))
    # Pass 2: arg-max of (processed + gumbel), or of the logits for greedy rows.
    key = tl.load(key_ptr + r).to(tl.uint32)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    bidx = tl.zeros([BLOCK], tl.int32)
    for v0 in range(0, V, BLOCK):
        i = v0 + lanes
        im = i < V
        x = tl.load(row + i, mask=im, other=float("-inf"))
        y = x / tt
        if ALL_GREEDY:
            val = y
        else:
            ih = _fmix32(i.to(tl.uint32) * tl.full([], 0x2545F491, tl.uint32))
            bits = _fmix32(key ^ ih) >> 8
            u = (bits.to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            if PRECISE_LOG:
                g = -libdevice.log(-libdevice.log(u))
            else:
                g = -tl.log(-tl.log(u))
            val = tl.where(greedy, y, ((y - mx) - logsum) + g)
        val = tl.where(im, val, float("-inf"))
        upd = val > best
        best = tl.where(upd, val, best)
        bidx = tl.where(upd, i, bidx)
    top = tl.max(best, 0)
    tok = tl.min(tl.where(best == top, bidx, 2147483647), 0)
    xt = tl.load(row + tok)
    tl.store(tok_ptr + r, tok.to(tl.int64))
    tl.store(lp_ptr + r, (xt / tt - mx) - logsum)
    if NEED_RAW:
        mxr = tl.max(mr, 0)
        logsum_r = tl.log(tl.sum(tl.where(mr == float("-inf"), 0.0, sr * tl.exp(mr - mxr)), 0))
        tl.store(raw_ptr + r, (xt - mxr) - logsum_r)


@register("sample", B)
def sample(logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
    if meta.need_filter or meta.banned_rows is not None:
        return torch_ops.sample(logits, meta)
    logits = logits.float()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    dev = logits.device
    tokens = torch.empty(rows, dtype=torch.int64, device=dev)
    lps = torch.empty(rows, dtype=torch.float32, device=dev)
    raw = torch.empty(rows if meta.any_raw else 1, dtype=torch.float32, device=dev)
    if rows:
        keys = meta.seeds if meta.all_greedy else torch_ops.row_keys(meta.seeds, meta.counters)
        temp = meta.temperature.float()
        _sample_kernel[(rows,)](logits, temp, keys, tokens, lps, raw, vocab, logits.stride(0),
                                ALL_GREEDY=meta.all_greedy, NEED_RAW=meta.any_raw,
                                PRECISE_LOG=_PRECISE_LOG, BLOCK=2048, num_warps=8)
    token_lps = torch.where(meta.raw_logprobs, raw, lps) if meta.any_raw else lps
    k = meta.num_top_logprobs
    if k > 0:
        temperature = torch.where(meta.temperature > 0, meta.temperature, torch.ones_like(meta.temperature))
        source = (logits / temperature[:, None]).log_softmax(-1)
        if meta.any_raw:
            source = torch.where(meta.raw_logprobs[:, None], logits.log_softmax(-1), source)
        top_lps, top_ids = source.topk(k, dim=-1)
    else:
        top_lps = torch.empty(rows, 0, dtype=torch.float32, device=dev)
        top_ids = torch.empty(rows, 0, dtype=torch.int64, device=dev)
    return SamplerOutput(tokens, token_lps, top_ids, top_lps)
