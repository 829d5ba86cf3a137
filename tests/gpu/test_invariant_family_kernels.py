"""The batch-invariant Triton ops of GPT-OSS and the sliding-window families
(atom/ops/triton/invariant_families.py, fused_moe_biased in invariant.py): against the torch
references on fresh random inputs, and bitwise: a row alone equals the same row in batches of
several sizes and places; a token's attention output is the same bits in a one-chunk prefill, a
chunked one and a decode step, with windows shorter than the prompts, sinks on and off.

On CPU: `ATOM_GPU_TESTS_ON_CPU=1 TRITON_INTERPRET=1 PYTHONPATH=$PWD:/work/triton_pkgs python -m pytest
-m gpu tests/gpu/test_invariant_family_kernels.py` (small shapes, KV splits shrunk to 32 tokens).
"""
from __future__ import annotations

import pytest
import torch

from atom.ops import torch_family_ops as ref_ops

from gpu_helpers import ON_CPU, act_dtypes, device, triton_ops  # noqa: F401 (fixtures)
from test_family_kernels import ALPHA, LIMIT, assert_clamp_reached, biased_experts
from test_invariant_ops import Paged, inv, lens_for, mode, small_split  # noqa: F401 (fixtures)
from test_triton_ops import check, gen

pytestmark = pytest.mark.gpu

# (hq, hk, d, page): GPT-OSS-20B's heads (64 / 8, head_dim 64) on the GPU.
SHAPES = [(4, 2, 16, 16), (16, 2, 32, 8)] if ON_CPU else [(4, 2, 16, 16), (64, 8, 64, 16), (32, 4, 128, 16)]
# Windows shorter than the prompts (lens_for: up to 81 tokens on CPU, 2100 on the GPU), within one
# KV split and across several; None: a full layer with sinks (GPT-OSS's other half).
WINDOWS = [5, 45, None] if ON_CPU else [128, 700, None]
# Sinks on and off with each window; no window without sinks (plain attention: test_invariant_ops.py).
WINDOW_SINKS = [(w, s) for w in WINDOWS for s in (True, False) if w is not None or s]


def windowed(op, window, sinks):
    """op as Paged.run calls it (q, k_cache, v_cache, meta, scale)."""
    return lambda q, kc, vc, meta, scale: op(q, kc, vc, meta, scale, window, sinks)


def poison_below(p: Paged, seq: int, first_pos: int, window: int | None) -> None:
    """Point sequence seq's blocks that hold no key its queries from first_pos on can see at a
    block of NaN (a sliding layer gives them back; another sequence may refill them): reading
    any of them would turn the output into NaN."""
    if window is None:
        return
    if p.kc[-1].isfinite().all():
        p.kc = torch.cat([p.kc, torch.full_like(p.kc[:1], float("nan"))])
        p.vc = torch.cat([p.vc, torch.full_like(p.vc[:1], float("nan"))])
    below = max(0, first_pos - window + 1) // p.page
    p.tables[seq][:below] = [p.kc.shape[0] - 1] * below


def sinks_for(with_sinks, hq, device, dtype):
    return (torch.randn(hq, device=device) * 2).to(dtype) if with_sinks else None


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("hq,hk,d,page", SHAPES)
@pytest.mark.parametrize("window,with_sinks", WINDOW_SINKS)
def test_sliding_prefill_matches_torch_and_chunking_does_not_change_bits(inv, device, dtype, hq, hk, d, page,
                                                                        window, with_sinks, small_split):
    gen(hq + d + page + (window or 0))
    lens = lens_for(page)
    p = Paged(device, dtype, lens, hq, hk, d, page)
    sinks = sinks_for(with_sinks, hq, device, dtype)
    prefill = windowed(inv("sliding_sink_attention_prefill"), window, sinks)
    n = len(lens)
    whole = p.run(prefill, range(n), [0] * n, lens)
    ref = p.run(windowed(ref_ops.sliding_sink_attention_prefill, window, sinks), range(n), [0] * n, lens)
    check(torch.cat(whole), torch.cat(ref), dtype)
    # Three chunks (the later ones over a cached prefix whose blocks below the window are gone), in
    # other batches and orders.
    cuts = [(0, c // 3, 2 * c // 3, c) for c in lens]
    order = [3, 1, 0, 2][:n]
    for k in range(3):
        seqs = order if k != 1 else list(range(n))
        for s in seqs:
            poison_below(p, s, cuts[s][k], window)
        outs = p.run(prefill, seqs, [cuts[s][k] for s in seqs], [cuts[s][k + 1] for s in seqs])
        for i, s in enumerate(seqs):
            assert torch.equal(outs[i], whole[s][cuts[s][k]: cuts[s][k + 1]]), f"sequence {s}: chunk {k} differs"
    if window is not None:  # the window matters: without it the last tokens get other numbers
        full = p.run(windowed(ref_ops.sliding_sink_attention_prefill, None, sinks), [0], [0], [lens[0]])[0]
        assert not torch.allclose(full[-1].float(), whole[0][-1].float(), atol=1e-2)


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("hq,hk,d,page", SHAPES)
@pytest.mark.parametrize("window,with_sinks", WINDOW_SINKS)
def test_sliding_decode_equals_prefill_bit_for_bit(inv, device, dtype, hq, hk, d, page, window, with_sinks,
                                                   mode):
    """A token computed in a decode step (in a batch or alone, split or whole path) has the bits the
    one-chunk prefill of its sequence gave it, and never reads a block below its window."""
    gen(hq * 3 + d + page + (window or 0))
    lens = lens_for(page)
    p = Paged(device, dtype, lens, hq, hk, d, page)
    sinks = sinks_for(with_sinks, hq, device, dtype)
    whole = p.run(windowed(inv("sliding_sink_attention_prefill"), window, sinks), range(len(lens)),
                  [0] * len(lens), lens)
    decode = windowed(inv("sliding_sink_attention_decode"), window, sinks)
    ref = windowed(ref_ops.sliding_sink_attention_decode, window, sinks)
    rows = list(range(len(lens)))
    for pos_of in (lambda n: n - 1, lambda n: n // 2, lambda n: 0):
        ends = [pos_of(n) + 1 for n in lens]
        check(torch.cat(p.run(decode, rows, [e - 1 for e in ends], ends)),
              torch.cat(p.run(ref, rows, [e - 1 for e in ends], ends)), dtype)
    for s, n in enumerate(lens):  # from here on: the decode of each sequence's last token
        poison_below(p, s, n - 1, window)
    outs = p.run(decode, rows, [n - 1 for n in lens], lens)
    backwards = p.run(decode, rows[::-1], [n - 1 for n in lens[::-1]], lens[::-1])[::-1]
    alone = p.run(decode, [1], [lens[1] - 1], [lens[1]])[0]
    assert torch.equal(alone, outs[1])
    for s, o in enumerate(outs):
        assert torch.equal(o[0], whole[s][-1]), f"sequence {s} position {lens[s] - 1}"
        assert torch.equal(backwards[s], o), f"sequence {s} elsewhere in the batch"
    meta = p.meta(rows, [n - 1 for n in lens], lens)  # a padded row (length 0) gives zeros
    meta.seq_lens[-1] = 0
    q = torch.cat([p.q[s][n - 1: n] for s, n in zip(rows, lens)])
    out = inv("sliding_sink_attention_decode")(q, p.kc, p.vc, meta, d ** -0.5, window, sinks)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


@pytest.mark.parametrize("dtype", act_dtypes())
def test_control_the_normal_backend_does_change_bits(triton_ops, device, dtype, small_split):
    """The checks above can fail: the triton backend's windowed decode reduces in other splits (from
    the window's first key on) than its prefill, so some tokens get other bits there."""
    gen(98)
    lens = lens_for(16)
    p = Paged(device, dtype, lens, 16, 2, 32, 16)
    sinks = sinks_for(True, 16, device, dtype)
    window = 70 if ON_CPU else 700  # more than a block: the two group the window's keys differently
    ops = triton_ops("sliding_sink_attention_prefill")["triton"], triton_ops("sliding_sink_attention_decode")["triton"]
    whole = p.run(windowed(ops[0], window, sinks), range(len(lens)), [0] * len(lens), lens)
    outs = p.run(windowed(ops[1], window, sinks), range(len(lens)), [n - 1 for n in lens], lens)
    assert any(not torch.equal(o[0], w[-1]) for o, w in zip(outs, whole))


# ---- clamped SwiGLU, biased experts --------------------------------------------------------------

@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("inter", [40, 1100] if ON_CPU else [40, 2880])
@pytest.mark.parametrize("limit", [LIMIT, None])
def test_clamped_swiglu_matches_torch_and_rows_do_not_depend_on_the_batch(inv, device, dtype, inter, limit):
    gen(inter)
    t = 37 if ON_CPU else 700
    x = (torch.randn(t, 2 * inter, device=device) * 4).to(dtype)  # the clamp bites
    assert (x[:, :inter] > LIMIT).any() and (x[:, inter:].abs() > LIMIT).any()
    op = inv("clamped_swiglu")
    full = op(x, limit, ALPHA)
    check(full, ref_ops.clamped_swiglu(x, limit, ALPHA), dtype)
    for m in (1, 3, 17):
        for at in (0, t - m, t // 2):
            assert torch.equal(op(x[at: at + m].contiguous(), limit, ALPHA), full[at: at + m]), (m, at)
    assert torch.equal(op(x.view(1, t, -1), limit, ALPHA)[0], full)  # leading dimensions kept


MOE = [(8, 2, 48, 40), (16, 4, 96, 80)] + ([] if ON_CPU else [(32, 4, 2880, 2880)])  # GPT-OSS-20B's


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("experts,top_k,hidden,inter", MOE)
def test_fused_moe_biased_matches_torch_and_tokens_do_not_depend_on_the_batch(inv, device, dtype, experts, top_k,
                                                                              hidden, inter):
    """At any token count (the triton backend's small path below 5 tokens, its tiles by count
    above) a token's sum is the same bits; with and without the down bias, -1 ids skipped."""
    gen(experts + hidden)
    t = 40 if ON_CPU else 700
    x, w13, b13, w2, b2, weights, ids = biased_experts(device, dtype, t, experts, top_k, hidden, inter)
    assert_clamp_reached(x, w13, b13, ids, inter)
    drop = torch.rand(ids.shape, device=device) < 0.2
    weights, ids = weights.masked_fill(drop, 0.0), ids.masked_fill(drop, -1)
    op = inv("fused_moe_biased")
    for down_bias, limit in ((b2, LIMIT), (None, None)):
        full = op(x, w13, b13, w2, down_bias, weights, ids, limit, ALPHA)
        check(full, ref_ops.fused_moe_biased(x, w13, b13, w2, down_bias, weights, ids, limit, ALPHA), dtype,
              factor=1.5)
        for m in (1, 3, 4, 5, 17):
            for at in (0, t - m):
                part = op(x[at: at + m].contiguous(), w13, b13, w2, down_bias, weights[at: at + m].contiguous(),
                          ids[at: at + m].contiguous(), limit, ALPHA)
                assert torch.equal(part, full[at: at + m]), f"tokens {at}..{at + m} differ with {m} tokens"


def test_the_families_ops_are_registered_invariant_and_graph_safe(inv):
    from atom.ops.registry import capabilities
    for name in ("sliding_sink_attention_prefill", "sliding_sink_attention_decode", "clamped_swiglu",
                 "fused_moe_biased"):
        inv(name)  # registered for the backend
        assert {"batch_invariant", "graph_safe"} <= capabilities(name, "triton_invariant"), name
    assert "cascade" not in capabilities("sliding_sink_attention_decode", "triton_invariant")
    assert "skips_negative_ids" in capabilities("fused_moe_biased", "triton_invariant")
