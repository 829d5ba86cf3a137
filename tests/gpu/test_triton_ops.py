"""Each Triton kernel against its torch reference (atom/ops/torch_ops.py) on fresh random inputs."""
from __future__ import annotations

import math
import random

import pytest
import torch

from atom.ops import torch_ops
from atom.ops.metadata import AttentionMetadata, CascadeMetadata, SamplingMetadata

from gpu_helpers import ON_CPU, act_dtypes, device, sampling_meta, triton_ops  # noqa: F401 (fixtures)

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1.6e-2, torch.float16: 4e-3, torch.float32: 2e-5}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(out, ref, dtype, factor=1.0):
    err = rel_err(out, ref)
    assert err < TOL[dtype] * factor, f"relative error {err:.3g} over {TOL[dtype] * factor:.3g}"


def gen(seed):
    torch.manual_seed(seed)
    random.seed(seed)


# ---- norms, activations, rope, kv write -------------------------------------------------------

@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("rows,hidden", [(1, 64), (7, 1024), (300, 2048), (33, 4096)])
def test_rms_norm(triton_ops, device, dtype, rows, hidden):
    gen(rows * hidden)
    x = torch.randn(rows, hidden, device=device).to(dtype) * 3
    r = torch.randn(rows, hidden, device=device).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    tri = triton_ops("rms_norm")["triton"]
    check(tri(x, w, 1e-6), torch_ops.rms_norm(x, w, 1e-6), dtype)
    out, summed = triton_ops("fused_add_rms_norm")["triton"](x, r, w, 1e-6)
    ref_out, ref_sum = torch_ops.fused_add_rms_norm(x, r, w, 1e-6)
    check(out, ref_out, dtype)
    assert torch.equal(summed, ref_sum)


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("heads,head_dim", [(16, 128), (4, 64), (8, 16)])
def test_rms_norm_on_strided_heads(triton_ops, device, dtype, heads, head_dim):
    gen(heads)
    qkv = torch.randn(9, heads * head_dim * 2, device=device).to(dtype)
    q = qkv[:, : heads * head_dim].reshape(9, heads, head_dim)  # a strided view, as in attention
    w = (1 + 0.1 * torch.randn(head_dim, device=device)).to(dtype)
    check(triton_ops("rms_norm")["triton"](q, w, 1e-6), torch_ops.rms_norm(q, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("rows,inter", [(1, 768), (65, 3072), (5, 48)])
def test_silu_and_mul(triton_ops, device, dtype, rows, inter):
    gen(inter)
    x = torch.randn(rows, 2 * inter, device=device).to(dtype) * 2
    check(triton_ops("silu_and_mul")["triton"](x), torch_ops.silu_and_mul(x), dtype)


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("hq,hk,d,interleaved", [(16, 8, 128, False), (32, 4, 128, False), (4, 2, 16, False),
                                                 (8, 8, 64, False), (16, 1, 64, True), (4, 2, 16, True),
                                                 (3, 1, 24, True)])
def test_rotary(triton_ops, device, dtype, hq, hk, d, interleaved):
    from atom.models.layers.rotary import RotaryEmbedding
    gen(hq * d)
    rope = RotaryEmbedding(d, 4096, 1e6).to(device)
    t = 37
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=device).to(dtype)
    q = qkv[:, : hq * d].reshape(t, hq, d)
    k = qkv[:, hq * d: (hq + hk) * d].reshape(t, hk, d)
    pos = torch.randint(0, 4096, (t,), device=device)
    tq, tk = triton_ops("rotary_embedding")["triton"](pos, q, k, rope.cos_sin_cache, interleaved=interleaved)
    rq, rk = torch_ops.rotary_embedding(pos, q, k, rope.cos_sin_cache, interleaved=interleaved)
    check(tq, rq, dtype)
    check(tk, rk, dtype)


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("page", [16, 32])
def test_kv_cache_write(triton_ops, device, dtype, page):
    gen(page)
    hk, d, blocks, t = 4, 128, 20, 50
    kc = torch.randn(blocks, page, hk, d, device=device).to(dtype)
    vc = torch.randn(blocks, page, hk, d, device=device).to(dtype)
    kv = torch.randn(t, 2 * hk * d + 7, device=device).to(dtype)
    k = kv[:, : hk * d].reshape(t, hk, d)
    v = kv[:, hk * d: 2 * hk * d].reshape(t, hk, d)
    slots = torch.randperm(blocks * page, device=device)[:t]
    slots[::5] = -1
    k1, v1, k2, v2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    triton_ops("kv_cache_write")["triton"](k, v, k1, v1, slots)
    torch_ops.kv_cache_write(k, v, k2, v2, slots)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)


# ---- attention -------------------------------------------------------------------------------

def paged_batch(device, dtype, seq_lens, query_lens, hq, hk, d, page, shared=None, extra_blocks=3):
    """Random paged KV for sequences of seq_lens (each's last query_lens tokens are new).

    shared: list of (rows, prefix_blocks): those rows share their first prefix_blocks blocks.
    """
    need = [math.ceil(n / page) for n in seq_lens]
    total = sum(need) + extra_blocks
    perm = torch.randperm(total).tolist()
    tables = []
    for n in need:
        tables.append([perm.pop() for _ in range(n)])
    for rows, nb in shared or []:
        for r in rows[1:]:
            tables[r][:nb] = tables[rows[0]][:nb]
    width = max(need)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
    kc = torch.randn(total, page, hk, d, device=device).to(dtype)
    vc = torch.randn(total, page, hk, d, device=device).to(dtype)
    qsl = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
    q = torch.randn(sum(query_lens), hq, d, device=device).to(dtype)
    meta = AttentionMetadata(slot_mapping=torch.full((sum(query_lens),), -1, device=device), query_start_loc=qsl,
                             seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), block_tables=bt,
                             is_decode=all(n == 1 for n in query_lens), max_query_len=max(query_lens),
                             max_seq_len=max(seq_lens))
    return q, kc, vc, meta


ATTN_SHAPES = [  # (hq, hk, d, page)
    (8, 8, 64, 16), (16, 8, 128, 16), (32, 4, 128, 16), (32, 8, 128, 32), (4, 2, 16, 16),
]


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("hq,hk,d,page", ATTN_SHAPES)
def test_prefill_attention(triton_ops, device, dtype, hq, hk, d, page):
    gen(hq * 7 + d + page)
    if ON_CPU:
        seq_lens, qlens = [5, 40, 70, 17], [5, 12, 70, 1]
    else:
        seq_lens, qlens = [1, 100, 1000, 4096, 8192, 300], [1, 37, 1000, 512, 2000, 1]
    q, kc, vc, meta = paged_batch(device, dtype, seq_lens, qlens, hq, hk, d, page)
    scale = d ** -0.5
    out = triton_ops("paged_attention_prefill")["triton"](q, kc, vc, meta, scale)
    ref = torch_ops.paged_attention_prefill(q, kc, vc, meta, scale)
    check(out, ref, dtype)


@pytest.fixture(params=["split", "whole"])
def decode_mode(request, triton_ops, monkeypatch):
    """Decode attention in split-KV + merge mode, or one program per sequence's own part."""
    import atom.ops.triton.attention as attn
    monkeypatch.setitem(attn.DECODE_CFG, "whole_own_pairs", 1 if request.param == "whole" else 1 << 40)
    return request.param


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("hq,hk,d,page", ATTN_SHAPES)
def test_decode_attention(triton_ops, device, dtype, hq, hk, d, page, decode_mode):
    gen(hq * 11 + d + page)
    seq_lens = [1, 2, 17, 300, 33] if ON_CPU else [1, 2, 17, 300, 1025, 4097, 8192, 513]
    q, kc, vc, meta = paged_batch(device, dtype, seq_lens, [1] * len(seq_lens), hq, hk, d, page)
    scale = d ** -0.5
    out = triton_ops("paged_attention_decode")["triton"](q, kc, vc, meta, scale)
    ref = torch_ops.paged_attention_decode(q, kc, vc, meta, scale)
    check(out, ref, dtype)


@pytest.fixture(params=["small_prefix_split", "prefix_split"])
def prefix_split(request, triton_ops, monkeypatch):
    """Shared-prefix splits of either size class (on CPU shrunk so that a 40-token prompt spans several)."""
    import atom.ops.triton.attention as attn
    monkeypatch.setitem(attn.DECODE_CFG, "small_prefix_pairs", 1 << 40 if request.param == "small_prefix_split" else 1)
    if ON_CPU:
        monkeypatch.setitem(attn.DECODE_CFG, "small_prefix_split", 16)
        monkeypatch.setitem(attn.DECODE_CFG, "prefix_split", 32)
    return request.param


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("hq,hk,d,page", ATTN_SHAPES)
def test_cascade_decode_attention(triton_ops, device, dtype, hq, hk, d, page, decode_mode, prefix_split):
    """Groups sharing prefix blocks, read once per group; padded rows (seq_len 0) give zeros."""
    gen(hq * 13 + d + page)
    prompt = 40 if ON_CPU else 1024
    n = 3 if ON_CPU else 8
    gen_lens = [random.randint(1, 70 if ON_CPU else 900) for _ in range(2 * n + 2)]
    seq_lens = [prompt + g for g in gen_lens]
    nb = prompt // page
    groups = [list(range(0, n)), list(range(n, 2 * n))]
    q, kc, vc, meta = paged_batch(device, dtype, seq_lens, [1] * len(seq_lens), hq, hk, d, page,
                                  shared=[(g, nb) for g in groups])
    max_n = 4 if ON_CPU else 8
    rows = [g[i:i + max_n] for g in groups for i in range(0, len(g), max_n)]
    g_cap = len(seq_lens) // 2
    grid_rows = torch.full((g_cap, max_n), -1, dtype=torch.int32)
    plen = torch.zeros(g_cap, dtype=torch.int32)
    row_prefix = torch.zeros(len(seq_lens), dtype=torch.int32)
    for gi, members in enumerate(rows):
        grid_rows[gi, : len(members)] = torch.tensor(members, dtype=torch.int32)
        plen[gi] = nb * page
        row_prefix[members] = nb * page
    meta.cascade = CascadeMetadata(grid_rows.to(device), plen.to(device), row_prefix.to(device), nb * page)
    scale = d ** -0.5
    out = triton_ops("paged_attention_decode")["triton"](q, kc, vc, meta, scale)
    ref = torch_ops.paged_attention_decode(q, kc, vc, meta, scale)
    check(out, ref, dtype)
    # A padded row (seq_len 0) must come out as zeros, never NaN.
    meta.seq_lens[-1] = 0
    meta.cascade.row_prefix_len[-1] = 0
    out = triton_ops("paged_attention_decode")["triton"](q, kc, vc, meta, scale)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


# ---- MoE -------------------------------------------------------------------------------------

MOE_SHAPES = [  # (tokens, experts, top_k, hidden, inter)
    (1, 8, 2, 64, 32), (5, 8, 1, 128, 64), (33, 16, 4, 256, 128),
]
if not ON_CPU:
    MOE_SHAPES += [(1, 128, 8, 2048, 768), (64, 128, 8, 2048, 768), (700, 128, 8, 2048, 768),
                   (8192, 128, 8, 2048, 768), (300, 64, 6, 1024, 256)]


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 8, 1), (17, 128, 8), (64, 60, 4)])
def test_moe_route(triton_ops, device, dtype, renorm, tokens, experts, top_k):
    gen(tokens + experts)
    logits = torch.randn(tokens, experts, device=device).to(dtype)
    w, ids = triton_ops("moe_route")["triton"](logits, top_k, renorm)
    rw, rids = torch_ops.moe_route(logits, top_k, renorm)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(ids.sort(-1).values, rids.sort(-1).values)
    torch.testing.assert_close(w.sort(-1).values, rw.sort(-1).values, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter", MOE_SHAPES)
def test_fused_moe(triton_ops, device, dtype, tokens, experts, top_k, hidden, inter):
    gen(tokens * 3 + experts)
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=device) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device=device) / inter ** 0.5).to(dtype)
    weights, ids = torch_ops.moe_route(torch.randn(tokens, experts, device=device), top_k, True)
    out = triton_ops("fused_moe")["triton"](x, w13, w2, weights, ids)
    ref = torch_ops.fused_moe(x, w13, w2, weights, ids)
    check(out, ref, dtype, factor=1.5)


@pytest.mark.parametrize("dtype", act_dtypes())
def test_fused_moe_skips_negative_ids(triton_ops, device, dtype):
    """Expert parallelism passes id -1 (weight 0) for pairs another rank owns."""
    gen(99)
    tokens, experts, top_k, hidden, inter = 40, 8, 4, 128, 64
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=device) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device=device) / inter ** 0.5).to(dtype)
    weights, ids = torch_ops.moe_route(torch.randn(tokens, experts, device=device), top_k, True)
    drop = torch.rand(ids.shape, device=device) < 0.4
    weights, ids = weights.masked_fill(drop, 0.0), ids.masked_fill(drop, -1)
    out = triton_ops("fused_moe")["triton"](x, w13, w2, weights, ids)
    ref = torch_ops.fused_moe(x, w13, w2, weights, ids)  # id -1 with weight 0 adds nothing
    check(out, ref, dtype, factor=1.5)
    from atom.ops.registry import capabilities
    assert "skips_negative_ids" in capabilities("fused_moe", "triton")


@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("pairs,experts,block_m", [(3072, 64, 64), (37, 8, 16), (1500, 256, 32), (5, 6, 16)])
def test_moe_align_against_python(triton_ops, device, pairs, experts, block_m, id_dtype):
    """moe_align's layout, rebuilt in Python from the ids: per expert in order, its pairs in pair
    order padded to whole tiles with the sentinel `pairs`, each tile's expert, the padded total;
    -1 ids (expert parallelism) belong to no expert. Skewed ids so that some experts get none and
    some several tiles."""
    from atom.ops.triton.moe import moe_align
    gen(pairs + experts)
    ids = (torch.rand(pairs, device=device) ** 3 * experts).long().clamp(max=experts - 1)
    ids[torch.rand(pairs, device=device) < 0.1] = -1
    sorted_ids, tile_expert, total, max_tiles = moe_align(ids.to(id_dtype).view(-1, 1), experts, block_m)
    host = ids.tolist()
    want_sorted, want_tiles = [], []
    for e in range(experts):
        mine = [i for i, v in enumerate(host) if v == e]
        n_tiles = -(-len(mine) // block_m)
        want_sorted += mine + [pairs] * (n_tiles * block_m - len(mine))
        want_tiles += [e] * n_tiles
    assert int(total) == len(want_sorted) and len(want_tiles) <= max_tiles
    assert sorted_ids[:len(want_sorted)].tolist() == want_sorted
    assert tile_expert[:len(want_tiles)].tolist() == want_tiles


# ---- sampling --------------------------------------------------------------------------------

def test_uniform_noise_stream_matches_torch(triton_ops, device):
    """The kernel's uniforms are torch_ops.uniform_noise bit for bit, also for huge seeds/counters."""
    gen(0)
    vocab = 5000
    seeds = [0, 1, (1 << 63) - 1, 0xFFFFFFFF, 123456789012345]
    counters = [0, (1 << 32) - 1, (7 << 20) + 3, 1 << 31, 5]
    rows = len(seeds)
    meta = sampling_meta(device, rows, [1.0] * rows, seeds=seeds, counters=counters)
    # Logits of zero: the sampled token is the arg-max of the Gumbel noise alone.
    logits = torch.zeros(rows, vocab, device=device)
    out = triton_ops("sample")["triton"](logits, meta)
    u = torch_ops.uniform_noise(meta.seeds, meta.counters, vocab)
    assert torch.equal(out.token_ids, (-torch.log(-torch.log(u))).argmax(-1))


@pytest.mark.parametrize("vocab", [1000, 151936])
def test_sample_matches_torch(triton_ops, device, vocab):
    gen(vocab)
    rows = 37
    temps = [0.0, 1.0, 0.7, 1.3] * 9 + [1.0]
    raw = [i % 3 == 0 for i in range(rows)]
    logits = torch.randn(rows, vocab, device=device) * 3
    for k in (0, 3):
        meta = sampling_meta(device, rows, temps, k=k, raw=raw)
        out = triton_ops("sample")["triton"](logits, meta)
        ref = torch_ops.sample(logits, meta)
        assert torch.equal(out.token_ids, ref.token_ids)
        torch.testing.assert_close(out.logprobs, ref.logprobs, atol=2e-5, rtol=0)
        assert out.top_ids.shape == ref.top_ids.shape
        if k:
            assert torch.equal(out.top_ids, ref.top_ids)
            torch.testing.assert_close(out.top_logprobs, ref.top_logprobs, atol=2e-5, rtol=0)
    greedy = sampling_meta(device, rows, [0.0] * rows)
    assert torch.equal(triton_ops("sample")["triton"](logits, greedy).token_ids, logits.argmax(-1))


def test_one_program_sampler_skips_no_winner(triton_ops, device):
    """The one-program kernel computes the precise noise only for blocks whose bound comes near
    the best value so far: over 20 blocks of 2048 tokens it still draws torch's tokens, for
    flat rows (the noise alone decides, every block a contender), peaked rows (most blocks
    skipped), greedy rows among sampled ones with the maximum tied across blocks (the lower id)."""
    gen(29)
    rows, vocab = 24, 40000
    logits = torch.randn(rows, vocab, device=device) * 3
    logits[0:4] = 0.0                          # the noise alone
    logits[4:8, 123] += 60.0                   # one clear winner, early
    logits[8:12, vocab - 7] += 6.0             # a likely winner in the last, partial block
    logits[12, [5000, 30000]] = 40.0           # greedy: tied maximum in blocks 2 and 14
    temps = [1.0, 0.5, 1.0, 2.0] * 3 + [0.0, 1.0, 0.8, 0.0] * 3
    meta = sampling_meta(device, rows, temps)
    out = triton_ops("sample")["triton"](logits, meta, split=False)
    ref = torch_ops.sample(logits, meta)
    assert torch.equal(out.token_ids, ref.token_ids)
    assert out.token_ids[12].item() == 5000
    assert (out.token_ids[4:8] == 123).all()
    torch.testing.assert_close(out.logprobs, ref.logprobs, atol=2e-5, rtol=0)


def test_sample_on_gpu_equals_torch_on_cpu(triton_ops, device):
    """Equal logits, equal seeds: the GPU kernel draws what the CPU reference draws."""
    gen(11)
    rows, vocab = 16, 151936
    logits = torch.randn(rows, vocab, device=device) * 2
    meta = sampling_meta(device, rows, [1.0, 0.6, 0.0, 1.2] * 4)
    out = triton_ops("sample")["triton"](logits, meta)
    cpu_meta = SamplingMetadata(**{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in vars(meta).items()})
    ref = torch_ops.sample(logits.cpu(), cpu_meta)
    assert torch.equal(out.token_ids.cpu(), ref.token_ids)
    torch.testing.assert_close(out.logprobs.cpu(), ref.logprobs, atol=5e-5, rtol=0)
