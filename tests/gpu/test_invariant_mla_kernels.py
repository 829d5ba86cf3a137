"""DeepSeek-V3's ops in the batch-invariant Triton backend (atom/ops/triton/invariant_mla.py):
against the torch references on fresh random inputs, a row's bits the same whatever else is in
the call (rows of very different lengths, padded rows, any place), and a token computed by the
prefill op (one chunk or several) bitwise equal to the decode op's result for the same token.

On CPU: `ATOM_GPU_TESTS_ON_CPU=1 TRITON_INTERPRET=1 PYTHONPATH=$PWD:/work/triton_pkgs python -m pytest
-m gpu tests/gpu/test_invariant_mla_kernels.py` (small shapes, KV split shrunk to 16 tokens).
"""
from __future__ import annotations

import pytest
import torch

from atom.ops import torch_family_ops
from atom.ops.metadata import AttentionMetadata

from gpu_helpers import ON_CPU, act_dtypes, device, triton_ops  # noqa: F401 (fixtures)
from test_mla_triton import check, latent_batch

pytestmark = pytest.mark.gpu

# (heads, nope, v_dim, kv_lora_rank, rope, page): a tiny model; DeepSeek-V3 / Moonlight on one GPU.
SHAPES = [(4, 16, 16, 32, 8, 16)] if ON_CPU else [(4, 16, 16, 32, 8, 16), (16, 128, 128, 512, 64, 16)]
DTYPES = act_dtypes()


@pytest.fixture
def inv(triton_ops, monkeypatch):
    """The triton_invariant implementations; in the interpreter the split shrunk to 16 tokens so that
    short sequences span several partials. The normal op's size classes are set so that it would
    switch (batches of 4+ rows fold whole own parts, smaller ones split by 32): the invariant op
    must not follow them."""
    import atom.ops.triton.invariant  # noqa: F401
    import atom.ops.triton.invariant_mla as im
    import atom.ops.triton.mla as mla
    if ON_CPU:
        monkeypatch.setattr(im, "KV_SPLIT", 16)
    monkeypatch.setitem(mla.MLA_CFG, "whole_own_pairs", 4)  # the normal op: batches of 4+ rows whole
    monkeypatch.setitem(mla.MLA_CFG, "small_split", 32)
    return lambda name: triton_ops(name)["triton_invariant"]


def rows_of(meta: AttentionMetadata, idx: list[int], width: int) -> AttentionMetadata:
    """A decode batch of rows idx of meta (block tables padded to `width` columns)."""
    tables = torch.zeros(len(idx), width, dtype=meta.block_tables.dtype, device=meta.block_tables.device)
    tables[:, :meta.block_tables.shape[1]] = meta.block_tables[idx]
    lens = meta.seq_lens[idx]
    return AttentionMetadata(slot_mapping=meta.slot_mapping[idx], query_start_loc=meta.query_start_loc[:len(idx) + 1],
                             seq_lens=lens, block_tables=tables, is_decode=True, max_query_len=1,
                             max_seq_len=max(1, int(lens.max())))


def w_kv_b_for(device, dtype, heads, nope, v_dim, lat):
    return (torch.randn(heads * (nope + v_dim), lat, device=device) / lat ** 0.5).to(dtype)


# ---- absorb / expand -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,nope,v_dim,lat,rope,page", SHAPES)
def test_absorb_and_expand_match_torch_and_rows_do_not_depend_on_the_batch(inv, device, dtype, heads, nope,
                                                                          v_dim, lat, rope, page):
    torch.manual_seed(heads + lat)
    w = w_kv_b_for(device, dtype, heads, nope, v_dim, lat)
    n = 40 if ON_CPU else 600
    q_nope = torch.randn(n, heads, nope + rope, device=device).to(dtype)[..., :nope]  # strided, as the model's
    out_lat = torch.randn(n, heads, lat, device=device).to(dtype)
    absorb, expand = inv("mla_absorb_query"), inv("mla_expand_output")
    q_lat, vals = absorb(q_nope, w), expand(out_lat, w, nope)
    assert q_lat.shape == (n, heads, lat) and vals.shape == (n, heads, v_dim)
    check(q_lat, torch_family_ops.mla_absorb_query(q_nope.double(), w.double()), dtype)
    check(vals, torch_family_ops.mla_expand_output(out_lat.double(), w.double(), nope), dtype)
    for at, m in ((0, 1), (n - 1, 1), (5, 3), (n - 17, 17)):
        assert torch.equal(absorb(q_nope[at:at + m], w), q_lat[at:at + m]), (at, m)
        assert torch.equal(expand(out_lat[at:at + m].clone(), w, nope), vals[at:at + m]), (at, m)


# ---- decode ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,nope,v_dim,lat,rope,page", SHAPES)
def test_decode_matches_torch_and_a_row_does_not_depend_on_the_batch(inv, device, dtype, heads, nope, v_dim, lat,
                                                                    rope, page):
    torch.manual_seed(heads * 3 + lat)
    # the target (row 0) and rows far shorter and far longer; the last one a padded row.
    seq_lens = [150, 1, 3, 45, 17, 64, 1] if ON_CPU else [1000, 1, 3, 4097, 257, 512, 1]
    q_latent, q_pe, cache, meta, scale = latent_batch(device, dtype, seq_lens, heads, lat, rope, page)
    meta.seq_lens[-1] = 0
    dec = inv("mla_attention_decode")
    full = dec(q_latent, q_pe, cache, meta, scale)
    live = meta.seq_lens > 0
    check(full[live], torch_family_ops.mla_attention_decode(q_latent[live], q_pe[live], cache,
                                                            rows_of(meta, live.nonzero()[:, 0].tolist(),
                                                                    meta.block_tables.shape[1]), scale), dtype)
    assert torch.equal(full[-1], torch.zeros_like(full[-1]))
    width = meta.block_tables.shape[1]
    for idx in ([0], [1, 0], [2, 3, 4, 0], [0, 6], [5, 4, 3, 2, 1, 0], [3, 0, 3]):
        for wide in (width, width + 5):
            part = dec(q_latent[idx], q_pe[idx], cache, rows_of(meta, idx, wide), scale)
            at = idx.index(0)
            assert torch.equal(part[at], full[0]), f"row 0 in batch {idx} (table width {wide})"


def test_control_the_normal_op_changes_a_rows_bits(inv, triton_ops, device):
    """The check above can fail: the normal Triton op folds a batch's own parts in-kernel from a
    size class on, so the same row alone and in a larger batch gets other bits."""
    import atom.ops.triton.mla as mla
    dtype = torch.float32 if ON_CPU else torch.bfloat16
    heads, lat, rope, page = SHAPES[-1][0], SHAPES[-1][3], SHAPES[-1][4], SHAPES[-1][5]
    torch.manual_seed(5)
    seq_lens = [150, 3, 90] if ON_CPU else [3000, 3, 900]
    q_latent, q_pe, cache, meta, scale = latent_batch(device, dtype, seq_lens, heads, lat, rope, page)
    mla.MLA_CFG["whole_own_pairs"] = 2 * ((heads + mla.BLOCK_H - 1) // mla.BLOCK_H)  # 2+ rows: whole
    normal = triton_ops("mla_attention_decode")["triton"]
    if ON_CPU:
        mla.MLA_CFG["small_split"] = 16
    alone = normal(q_latent[:1], q_pe[:1], cache, rows_of(meta, [0], meta.block_tables.shape[1]), scale)
    full = normal(q_latent, q_pe, cache, meta, scale)
    assert not torch.equal(alone[0], full[0])


# ---- prefill = decode ------------------------------------------------------------------------

def _prefill_meta(device, start: int, end: int, table: torch.Tensor, other: int, other_table: torch.Tensor):
    """One prefill step: another sequence's `other` new tokens (its whole prompt) first, then the
    target's tokens [start, end)."""
    width = max(table.shape[0], other_table.shape[0])
    tables = torch.zeros(2, width, dtype=torch.int32, device=device)
    tables[0, :other_table.shape[0]] = other_table
    tables[1, :table.shape[0]] = table
    return AttentionMetadata(
        slot_mapping=torch.full((other + end - start,), -1, device=device),
        query_start_loc=torch.tensor([0, other, other + end - start], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([other, end], dtype=torch.int32, device=device), block_tables=tables,
        is_decode=False, max_query_len=max(other, end - start), max_seq_len=max(other, end))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,nope,v_dim,lat,rope,page", SHAPES)
def test_prefill_tokens_equal_decode_bit_for_bit(inv, device, dtype, heads, nope, v_dim, lat, rope, page):
    torch.manual_seed(heads * 11 + lat)
    n, other = (80, 21) if ON_CPU else (700, 300)
    _, _, cache, meta, scale = latent_batch(device, dtype, [n, other], heads, lat, rope, page)
    table, other_table = meta.block_tables[0, :(n + page - 1) // page], meta.block_tables[1, :(other + page - 1) // page]
    w = w_kv_b_for(device, dtype, heads, nope, v_dim, lat)
    q = torch.randn(n + other, heads, nope + rope, device=device).to(dtype)
    q_nope, q_pe = q[..., :nope], q[..., nope:]  # the target's tokens first, then the other's
    absorb, dec, expand, pre = (inv(x) for x in ("mla_absorb_query", "mla_attention_decode", "mla_expand_output",
                                                  "mla_attention_prefill"))

    def prefill(start, end):
        m = _prefill_meta(device, start, end, table, other, other_table)
        qn = torch.cat((q_nope[n:], q_nope[start:end]))
        qp = torch.cat((q_pe[n:], q_pe[start:end]))
        return pre(qn, qp, cache, w, m, scale)[other:]

    one = prefill(0, n)
    cuts = [0, 5, 6, 41, n] if ON_CPU else [0, 100, 101, 517, n]
    chunked = torch.cat([prefill(a, b) for a, b in zip(cuts, cuts[1:])])
    assert torch.equal(chunked, one), "chunked prefill differs from one chunk"
    import atom.ops.triton.invariant_mla as im  # rows in groups of 7 per launch (the partials' memory bound)
    parts = -(-max(n, other) // im.KV_SPLIT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(im, "PREFILL_PARTIAL_BYTES", 7 * heads * parts * lat * 4)
        assert torch.equal(prefill(0, n), one), "prefill rows in groups differ"
    ref = torch_family_ops.mla_attention_prefill(q_nope[:n].double(), q_pe[:n].double(), cache.double(), w.double(),
                                                 rows_single(device, n, table), scale)
    check(one, ref, dtype)
    # decode: every position as one row of a decode batch (with the other sequence's rows too), and a few alone
    tables = torch.zeros(n + 2, table.shape[0], dtype=torch.int32, device=device)
    tables[:n] = table
    tables[n:, :other_table.shape[0]] = other_table
    lens = torch.tensor(list(range(1, n + 1)) + [other, 0], dtype=torch.int32, device=device)
    dmeta = AttentionMetadata(slot_mapping=torch.full((n + 2,), -1, device=device),
                              query_start_loc=torch.arange(n + 3, dtype=torch.int32, device=device), seq_lens=lens,
                              block_tables=tables, is_decode=True, max_query_len=1, max_seq_len=n)
    rows = list(range(n)) + [n, n]
    decoded = expand(dec(absorb(q_nope[rows], w), q_pe[rows].contiguous(), cache, dmeta, scale), w, nope)[:n]
    assert torch.equal(decoded, one), "decode batch differs from prefill"
    for p in (0, n // 2, n - 1):
        alone = rows_of(dmeta, [p], table.shape[0])
        got = expand(dec(absorb(q_nope[p:p + 1], w), q_pe[p:p + 1], cache, alone, scale), w, nope)
        assert torch.equal(got[0], one[p]), f"token {p} decoded alone"


def rows_single(device, n: int, table: torch.Tensor) -> AttentionMetadata:
    """Metadata of one prefill of the target's n tokens (the torch reference's input)."""
    return AttentionMetadata(slot_mapping=torch.full((n,), -1, device=device),
                             query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
                             seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
                             block_tables=table[None].to(torch.int32), is_decode=False, max_query_len=n,
                             max_seq_len=n)


# ---- routing, cache write ----------------------------------------------------------------------

# (experts, groups, groups kept, top_k, renormalize): a tiny model, Moonlight (one group), DeepSeek-V3.
ROUTES = [(8, 4, 2, 2, True), (12, 3, 2, 3, False), (64, 1, 1, 6, True), (256, 8, 4, 8, True)]


@pytest.mark.parametrize("experts,groups,kept,top_k,renorm", ROUTES)
def test_grouped_routing_matches_torch_and_rows_do_not_depend_on_the_batch(inv, device, experts, groups, kept,
                                                                         top_k, renorm):
    torch.manual_seed(experts + top_k)
    t = 40 if ON_CPU else 1000
    logits = torch.randn(t, experts, device=device) * 3
    bias = torch.randn(experts, device=device) * 0.1
    route = inv("moe_route_grouped")
    w, ids = route(logits, bias, top_k, groups, kept, renorm, 2.5)
    rw, rids = torch_family_ops.moe_route_grouped(logits, bias, top_k, groups, kept, renorm, 2.5)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    # The kernel's sigmoid may differ from torch's in the last bit: on the GPU a near tie at the
    # selection boundary may pick the other expert in a rare row; the interpreter matches exactly.
    same = (ids == rids).all(-1)
    assert same.float().mean() >= (1.0 if ON_CPU else 0.995), f"{int((~same).sum())} rows chose other experts"
    torch.testing.assert_close(w[same], rw[same], rtol=1e-5, atol=1e-6)
    for at, m in ((0, 1), (t - 1, 1), (3, 11), (t - 20, 20)):
        pw, pids = route(logits[at:at + m].clone(), bias, top_k, groups, kept, renorm, 2.5)
        assert torch.equal(pw, w[at:at + m]) and torch.equal(pids, ids[at:at + m]), (at, m)
    with pytest.raises(ValueError, match="groups"):
        route(logits, bias, top_k, 5, kept, renorm, 2.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_write_copies_rows_whatever_the_batch(inv, device, dtype):
    torch.manual_seed(2)
    lat, rope, page, blocks, t = (32, 8, 16, 6, 30) if ON_CPU else (512, 64, 16, 64, 700)
    cache = torch.randn(blocks, page, 1, lat + rope, device=device).to(dtype)
    latent = torch.randn(t, lat, device=device).to(dtype)
    k_pe = torch.randn(t, 3, rope, device=device).to(dtype)[:, 1]
    slots = torch.randperm(blocks * page, device=device)[:t]
    slots[::7] = -1
    write = inv("mla_cache_write")
    full, want = cache.clone(), cache.clone()
    write(latent, k_pe, full, slots)
    torch_family_ops.mla_cache_write(latent, k_pe, want, slots)
    assert torch.equal(full, want)
    pieces = cache.clone()
    for a, b in ((0, 1), (1, 9), (9, t)):  # the same tokens in other batches
        write(latent[a:b], k_pe[a:b], pieces, slots[a:b])
    assert torch.equal(pieces, full)
