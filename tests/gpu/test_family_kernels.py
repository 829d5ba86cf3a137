"""The issue-17 Triton kernels against their torch references (atom/ops/torch_family_ops.py) on
fresh random inputs: paged attention with a sliding window and sinks (GPT-OSS, Mixtral), and the
biased experts with the clamped SwiGLU (GPT-OSS).

Blocks a sliding layer gave back are replaced by a block full of NaN in the kernels' cache (the
reference reads a zero block there): a kernel that touched one would return NaN."""
from __future__ import annotations

import math
import random

import pytest
import torch

from atom.ops import torch_family_ops as ref_ops
from atom.ops.metadata import AttentionMetadata, CascadeMetadata

from gpu_helpers import ON_CPU, act_dtypes, device, triton_ops  # noqa: F401 (fixtures)

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1.6e-2, torch.float16: 4e-3, torch.float32: 2e-5}


def gen(seed):
    torch.manual_seed(seed)
    random.seed(seed)


def check(out, ref, dtype, factor=1.0):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all(), "non-finite output (a given-back block was read?)"
    err = ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    assert err < TOL[dtype] * factor, f"relative error {err:.3g} over {TOL[dtype] * factor:.3g}"


# ---- attention -------------------------------------------------------------------------------

def windowed_batch(device, dtype, seq_lens, query_lens, hq, hk, d, page, window):
    """Random paged KV as the engine lays it out for a sliding layer: each sequence's blocks
    shuffled; table entries of blocks no query of the step sees (window) point at a poisoned
    block. Returns q, (k, v) for the kernel (poison = NaN), (k, v) for the reference (poison =
    0) and the metadata."""
    need = [math.ceil(n / page) for n in seq_lens]
    total = sum(need) + 3
    perm = torch.randperm(total).tolist()
    poison = total  # one extra block
    tables = []
    for n, qn in zip(seq_lens, query_lens):
        table = [perm.pop() for _ in range(math.ceil(n / page))]
        if window is not None:
            first_seen = max(0, n - qn - window + 1) // page  # the step's first query sees from here
            table[:first_seen] = [poison] * first_seen
        tables.append(table)
    width = max(need)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
    kc = torch.randn(total + 1, page, hk, d, device=device).to(dtype)
    vc = torch.randn(total + 1, page, hk, d, device=device).to(dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    kc_ref[poison] = vc_ref[poison] = 0
    kc[poison] = vc[poison] = float("nan")
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = torch.randn(sum(query_lens), hq, d, device=device).to(dtype)
    meta = AttentionMetadata(slot_mapping=torch.full((sum(query_lens),), -1, device=device), query_start_loc=qsl,
                             seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), block_tables=bt,
                             is_decode=all(n == 1 for n in query_lens), max_query_len=max(query_lens),
                             max_seq_len=max(seq_lens))
    return q, (kc, vc), (kc_ref, vc_ref), meta


# (hq, hk, d, page, window): GPT-OSS-20B's attention (64 / 8 heads of 64, window 128) on the GPU.
if ON_CPU:
    WINDOW_SHAPES = [(4, 2, 16, 4, 5), (8, 2, 32, 16, 80)]  # 80: more than one 64-token split
else:
    WINDOW_SHAPES = [(64, 8, 64, 16, 128), (4, 2, 16, 16, 6), (32, 4, 128, 32, 100)]


def sinks_for(hq, device, dtype):
    """Sink logits large enough to take a real share of the softmax (also the dominant share)."""
    return (torch.randn(hq, device=device) * 2 + 1).to(dtype)


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("hq,hk,d,page,window", WINDOW_SHAPES)
@pytest.mark.parametrize("kind", ["window+sinks", "sinks", "window"])
def test_sliding_sink_prefill(triton_ops, device, dtype, hq, hk, d, page, window, kind):
    gen(hq * 7 + d + page + len(kind))
    window = None if kind == "sinks" else window
    if ON_CPU:
        seq_lens, qlens = [5, 40, 70, 23, 150], [5, 12, 70, 1, 30]
    else:
        seq_lens, qlens = [1, 100, 1000, 4096, 300, 129], [1, 37, 1000, 512, 1, 129]
    q, kv, kv_ref, meta = windowed_batch(device, dtype, seq_lens, qlens, hq, hk, d, page, window)
    sinks = sinks_for(hq, device, dtype) if "sinks" in kind else None
    scale = d ** -0.5
    out = triton_ops("sliding_sink_attention_prefill")["triton"](q, *kv, meta, scale, window, sinks)
    ref = ref_ops.sliding_sink_attention_prefill(q, *kv_ref, meta, scale, window, sinks)
    check(out, ref, dtype)
    if sinks is not None:  # the sinks matter in these inputs
        plain = ref_ops.sliding_sink_attention_prefill(q, *kv_ref, meta, scale, window, None)
        assert (plain - ref).abs().max() > 0.1


@pytest.fixture(params=["split", "whole"])
def decode_mode(request, triton_ops, monkeypatch):
    """Decode attention in split-KV + merge mode, or one program per sequence's own part."""
    import atom.ops.triton.attention as attn
    monkeypatch.setitem(attn.DECODE_CFG, "whole_own_pairs", 1 if request.param == "whole" else 1 << 40)
    return request.param


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("hq,hk,d,page,window", WINDOW_SHAPES)
@pytest.mark.parametrize("kind", ["window+sinks", "sinks", "window"])
def test_sliding_sink_decode(triton_ops, device, dtype, hq, hk, d, page, window, kind, decode_mode):
    """Windows shorter and longer than the context; a padded row (seq_len 0) gives zeros.
    A window within one split always runs whole (one program per row and kv head)."""
    gen(hq * 11 + d + page + len(kind))
    window = None if kind == "sinks" else window
    seq_lens = [1, 2, 5, 17, 40, 150, 70] if ON_CPU else [1, 2, 127, 128, 129, 300, 1025, 4097, 8192, 513]
    q, kv, kv_ref, meta = windowed_batch(device, dtype, seq_lens, [1] * len(seq_lens), hq, hk, d, page, window)
    sinks = sinks_for(hq, device, dtype) if "sinks" in kind else None
    scale = d ** -0.5
    out = triton_ops("sliding_sink_attention_decode")["triton"](q, *kv, meta, scale, window, sinks)
    ref = ref_ops.sliding_sink_attention_decode(q, *kv_ref, meta, scale, window, sinks)
    check(out, ref, dtype)
    meta.seq_lens[-1] = 0
    out = triton_ops("sliding_sink_attention_decode")["triton"](q, *kv, meta, scale, window, sinks)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


def grouped(meta, groups, prefix_len, max_n, device):
    """Cascade metadata for `groups` (lists of rows) sharing `prefix_len` tokens of blocks."""
    rows = [g[i:i + max_n] for g in groups for i in range(0, len(g), max_n)]
    cap = meta.seq_lens.shape[0] // 2
    grid_rows = torch.full((cap, max_n), -1, dtype=torch.int32)
    plen = torch.zeros(cap, dtype=torch.int32)
    row_prefix = torch.zeros(meta.seq_lens.shape[0], dtype=torch.int32)
    for gi, members in enumerate(rows):
        grid_rows[gi, : len(members)] = torch.tensor(members, dtype=torch.int32)
        plen[gi] = prefix_len
        row_prefix[members] = prefix_len
    return CascadeMetadata(grid_rows.to(device), plen.to(device), row_prefix.to(device), prefix_len)


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("hq,hk,d,page,window", WINDOW_SHAPES)
def test_sink_decode_with_shared_prefix(triton_ops, device, dtype, hq, hk, d, page, window, decode_mode):
    """GRPO: n samples share a prompt's blocks. Full layers (window None, sinks) read the shared
    prefix once per group; a sliding layer given the same metadata ignores the groups."""
    gen(hq * 13 + d + page)
    prompt, n = (40, 3) if ON_CPU else (1024, 8)
    seq_lens = [prompt + random.randint(1, 70 if ON_CPU else 900) for _ in range(2 * n + 2)]
    nb = prompt // page
    groups = [list(range(0, n)), list(range(n, 2 * n))]
    for w in (None, window):
        q, kv, kv_ref, meta = windowed_batch(device, dtype, seq_lens, [1] * len(seq_lens), hq, hk, d, page, None)
        bt = meta.block_tables
        for g in groups:  # the members share the first member's prompt blocks
            bt[g[1:], :nb] = bt[g[0], :nb]
        meta.cascade = grouped(meta, groups, nb * page, 4 if ON_CPU else 8, device)
        sinks = sinks_for(hq, device, dtype)
        out = triton_ops("sliding_sink_attention_decode")["triton"](q, *kv, meta, d ** -0.5, w, sinks)
        ref = ref_ops.sliding_sink_attention_decode(q, *kv_ref, meta, d ** -0.5, w, sinks)
        check(out, ref, dtype)


def test_attention_rejects_bad_window_and_sinks(triton_ops, device):
    q, kv, _, meta = windowed_batch(device, torch.float32, [5, 9], [1, 1], 4, 2, 16, 4, None)
    op = triton_ops("sliding_sink_attention_decode")["triton"]
    with pytest.raises(ValueError, match="window"):
        op(q, *kv, meta, 0.25, 0, None)
    with pytest.raises(ValueError, match="sinks"):
        op(q, *kv, meta, 0.25, None, torch.zeros(3, device=device))


# ---- experts with biases and the clamped SwiGLU ------------------------------------------------

# (tokens, experts, top_k, hidden, inter): the small path (T <= 4) and the aligned one; hidden
# and intermediate sizes that are not powers of two (GPT-OSS-20B: 2880).
MOE_SHAPES = [(1, 8, 2, 48, 40), (3, 8, 4, 80, 48), (9, 8, 2, 48, 40), (33, 16, 4, 96, 80)]
if not ON_CPU:
    MOE_SHAPES += [(t, 32, 4, 2880, 2880) for t in (1, 2, 4, 5, 64, 700, 4096)]
LIMIT, ALPHA = 7.0, 1.702


def biased_experts(device, dtype, tokens, experts, top_k, hidden, inter):
    """Inputs whose gate / up pre-activations spread to about ±3 limits (the clamp bites)."""
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=device) * 5 / hidden ** 0.5).to(dtype)
    b13 = torch.randn(experts, 2 * inter, device=device).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device=device) / inter ** 0.5 / 10).to(dtype)
    b2 = torch.randn(experts, hidden, device=device).to(dtype)
    logits = torch.randn(tokens, experts, device=device)
    weights, ids = logits.topk(top_k, dim=-1)
    return x, w13, b13, w2, b2, weights.softmax(-1), ids


def assert_clamp_reached(x, w13, b13, ids, inter):
    # Every expert's pre-activations, then the chosen ones (a gather of [T, K, 2I, H] weights
    # would not fit in memory at 4096 tokens of the GPT-OSS shape).
    every = torch.einsum("th,eih->tei", x.float(), w13.float()) + b13.float()
    pre = every.gather(1, ids[..., None].expand(-1, -1, every.shape[-1]))
    assert (pre[..., :inter] > LIMIT).any(), "no gate value above the limit"
    assert (pre[..., inter:].abs() > LIMIT).any(), "no up value beyond ±limit"


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter", MOE_SHAPES)
def test_fused_moe_biased(triton_ops, device, dtype, tokens, experts, top_k, hidden, inter):
    gen(tokens * 5 + experts + hidden)
    x, w13, b13, w2, b2, weights, ids = biased_experts(device, dtype, tokens, experts, top_k, hidden, inter)
    assert_clamp_reached(x, w13, b13, ids, inter)
    op = triton_ops("fused_moe_biased")["triton"]
    check(op(x, w13, b13, w2, b2, weights, ids, LIMIT, ALPHA),
          ref_ops.fused_moe_biased(x, w13, b13, w2, b2, weights, ids, LIMIT, ALPHA), dtype, factor=1.5)
    # No down bias (tensor-parallel ranks but the first) and no clamp (swiglu_limit None).
    check(op(x, w13, b13, w2, None, weights, ids, None, ALPHA),
          ref_ops.fused_moe_biased(x, w13, b13, w2, None, weights, ids, None, ALPHA), dtype, factor=1.5)


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("tokens", [3, 40])
def test_fused_moe_biased_skips_negative_ids(triton_ops, device, dtype, tokens):
    """Expert parallelism passes id -1 (weight 0) for pairs another rank owns: they add nothing,
    not even their bias, on both paths."""
    gen(tokens + 77)
    x, w13, b13, w2, b2, weights, ids = biased_experts(device, dtype, tokens, 8, 4, 48, 40)
    drop = torch.rand(ids.shape, device=device) < 0.4
    weights, ids = weights.masked_fill(drop, 0.0), ids.masked_fill(drop, -1)
    out = triton_ops("fused_moe_biased")["triton"](x, w13, b13, w2, b2, weights, ids, LIMIT, ALPHA)
    check(out, ref_ops.fused_moe_biased(x, w13, b13, w2, b2, weights, ids, LIMIT, ALPHA), dtype, factor=1.5)
    from atom.ops.registry import capabilities
    assert "skips_negative_ids" in capabilities("fused_moe_biased", "triton")
