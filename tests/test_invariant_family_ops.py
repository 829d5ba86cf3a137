"""The CPU batch-invariant family ops (atom/ops/invariant_family_ops.py) on fresh random inputs:
close to the torch reference, each row's bits the same alone and in batches of any size, and
attention's bits the same for a token in one prefill, in chunks, and in decode (MLA: the
prefill's output equal to absorb -> decode -> expand, the path the model takes in decode)."""
from __future__ import annotations

import pytest
import torch

from atom.ops import invariant_family_ops as inv
from atom.ops import torch_family_ops as ref
from atom.ops.metadata import AttentionMetadata

G = torch.Generator().manual_seed(0)
BS, BLOCKS = 4, 64


def rand(*shape, scale=1.0):
    return torch.randn(*shape, generator=G) * scale


def step(tables: list[list[int]], lengths: list[int], new: list[int]) -> AttentionMetadata:
    """Metadata of one step: sequence b has lengths[b] KV tokens, its last new[b] this step's."""
    starts = [0]
    for k in new:
        starts.append(starts[-1] + k)
    width = max(len(t) for t in tables)
    slots = [t[p // BS] * BS + p % BS for t, n, k in zip(tables, lengths, new) for p in range(n - k, n)]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(starts), seq_lens=torch.tensor(lengths),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]), is_decode=all(k == 1 for k in new),
        max_query_len=max(new), max_seq_len=max(lengths))


def tables_for(lengths: list[int]) -> list[list[int]]:
    perm = torch.randperm(BLOCKS, generator=G).tolist()
    out = []
    for n in lengths:
        need = -(-n // BS)
        out.append(perm[:need])
        perm = perm[need:]
    return out


def chunked(op, q: torch.Tensor, table: list[int], n: int, chunks: list[int], *args) -> torch.Tensor:
    """One sequence of n tokens through `op` in prefill chunks of the given sizes (1 = decode-like)."""
    out, done = [], 0
    for c in chunks:
        meta = step([table], [done + c], [c])
        out.append(op(q[done:done + c], *args[:-1], meta, *args[-1]))
        done += c
    assert done == n
    return torch.cat(out)


@pytest.mark.parametrize("window,with_sinks", [(5, True), (None, True), (3, False)])
def test_sliding_sink_attention(window, with_sinks):
    hq, hk, d, n = 4, 2, 8, 14
    table = tables_for([n])[0]
    k_cache, v_cache = rand(BLOCKS, BS, hk, d), rand(BLOCKS, BS, hk, d)
    q, sinks = rand(n, hq, d), (rand(hq) if with_sinks else None)
    extra = (k_cache, v_cache, (0.3, window, sinks))
    whole = chunked(inv.sliding_sink_attention_prefill, q, table, n, [n], *extra)
    want = ref.sliding_sink_attention_prefill(q, k_cache, v_cache, step([table], [n], [n]), 0.3, window, sinks)
    torch.testing.assert_close(whole, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(chunked(inv.sliding_sink_attention_prefill, q, table, n, [5, 2, 7], *extra), whole)
    assert torch.equal(chunked(inv.sliding_sink_attention_decode, q, table, n, [1] * n, *extra), whole)
    # Its last token in a decode batch with others, at either end.
    others = tables_for([9, 3])
    length = {id(table): n, id(others[0]): 9, id(others[1]): 3}
    for lay in ([table] + others, others + [table]):
        lens = [length[id(t)] for t in lay]
        batch_q = torch.stack([q[-1] if t is table else rand(hq, d) for t in lay])
        got = inv.sliding_sink_attention_decode(batch_q, k_cache, v_cache, step(lay, lens, [1] * 3), 0.3, window,
                                                sinks)
        assert torch.equal(got[lay.index(table)], whole[-1])


def test_rows_are_the_same_alone_and_in_any_batch():
    t, e, h, i = 24, 8, 16, 12
    logits, bias = rand(t, e), rand(e, scale=0.1)
    weights, ids = inv.moe_route_grouped(logits, bias, 2, 4, 2, True, 2.5)
    w_ref, id_ref = ref.moe_route_grouped(logits, bias, 2, 4, 2, True, 2.5)
    assert torch.equal(ids, id_ref)
    torch.testing.assert_close(weights, w_ref)
    gate_up = rand(t, 2 * i)
    swiglu = inv.clamped_swiglu(gate_up, 0.7, 1.702)
    torch.testing.assert_close(swiglu, ref.clamped_swiglu(gate_up, 0.7, 1.702))
    x, w13, b13, w2, b2 = rand(t, h), rand(e, 2 * i, h, scale=0.3), rand(e, 2 * i), rand(e, h, i, scale=0.3), rand(e, h)
    moe = inv.fused_moe_biased(x, w13, b13, w2, b2, weights, ids, 0.7, 1.702)
    torch.testing.assert_close(moe, ref.fused_moe_biased(x, w13, b13, w2, b2, weights, ids, 0.7, 1.702))
    heads, nope, lat, v = 4, 16, 32, 16
    w_kv_b = rand(heads * (nope + v), lat, scale=0.2)
    q_nope, out_lat = rand(t, heads, nope), rand(t, heads, lat)
    absorbed, expanded = inv.mla_absorb_query(q_nope, w_kv_b), inv.mla_expand_output(out_lat, w_kv_b, nope)
    gate = rand(e, h).to(torch.bfloat16)
    router_logits = inv.router_linear(x.to(torch.bfloat16), gate)
    assert router_logits.dtype == torch.float32
    torch.testing.assert_close(router_logits, x.to(torch.bfloat16).double() @ gate.double().t(), check_dtype=False)
    torch.testing.assert_close(absorbed, ref.mla_absorb_query(q_nope, w_kv_b))
    torch.testing.assert_close(expanded, ref.mla_expand_output(out_lat, w_kv_b, nope))
    for m in range(1, t):
        for a, b in ((m - 1, m), (0, m), (t - m, t)):
            route = inv.moe_route_grouped(logits[a:b], bias, 2, 4, 2, True, 2.5)
            assert torch.equal(route[0], weights[a:b]) and torch.equal(route[1], ids[a:b]), (a, b)
            assert torch.equal(inv.clamped_swiglu(gate_up[a:b], 0.7, 1.702), swiglu[a:b])
            assert torch.equal(inv.fused_moe_biased(x[a:b], w13, b13, w2, b2, weights[a:b], ids[a:b], 0.7, 1.702),
                               moe[a:b]), (a, b)
            assert torch.equal(inv.mla_absorb_query(q_nope[a:b], w_kv_b), absorbed[a:b])
            assert torch.equal(inv.router_linear(x[a:b].to(torch.bfloat16), gate), router_logits[a:b])
            assert torch.equal(inv.mla_expand_output(out_lat[a:b], w_kv_b, nope), expanded[a:b])


def test_the_reference_routing_is_not_row_invariant():
    """Why moe_route_grouped is rewritten: the reference's sigmoid over [T, E] changes a row's
    bits with T (the vectorised loop's scalar remainder), so the check above can fail."""
    logits, bias = rand(64, 8), torch.zeros(8)
    full = ref.moe_route_grouped(logits, bias, 2, 4, 2, True, 2.5)[0]
    assert any(not torch.equal(ref.moe_route_grouped(logits[:m], bias, 2, 4, 2, True, 2.5)[0], full[:m])
               for m in range(1, 64))


def test_mla_prefill_chunks_and_decode_give_the_same_bits():
    heads, nope, rope, lat, v, n = 4, 16, 8, 32, 16, 13
    w_kv_b = rand(heads * (nope + v), lat, scale=0.2)
    table = tables_for([n])[0]
    kv_cache = rand(BLOCKS, BS, 1, lat + rope)
    q_nope, q_pe = rand(n, heads, nope), rand(n, heads, rope)
    meta = step([table], [n], [n])
    whole = inv.mla_attention_prefill(q_nope, q_pe, kv_cache, w_kv_b, meta, 0.2)
    torch.testing.assert_close(whole, ref.mla_attention_prefill(q_nope, q_pe, kv_cache, w_kv_b, meta, 0.2),
                               atol=1e-5, rtol=1e-5)
    done, parts = 0, []
    for c in (4, 1, 8):
        m = step([table], [done + c], [c])
        parts.append(inv.mla_attention_prefill(q_nope[done:done + c], q_pe[done:done + c], kv_cache, w_kv_b, m, 0.2))
        done += c
    assert torch.equal(torch.cat(parts), whole)
    # Decode as the model runs it, the token in a batch of three.
    others = tables_for([7, 10])
    for i in (0, 5, n - 1):
        lay = [others[0], table, others[1]]
        meta_d = step(lay, [7, i + 1, 10], [1, 1, 1])
        qn = torch.stack([rand(heads, nope), q_nope[i], rand(heads, nope)])
        qp = torch.stack([rand(heads, rope), q_pe[i], rand(heads, rope)])
        out_lat = inv.mla_attention_decode(inv.mla_absorb_query(qn, w_kv_b), qp, kv_cache, meta_d, 0.2)
        assert torch.equal(inv.mla_expand_output(out_lat, w_kv_b, nope)[1], whole[i]), i
