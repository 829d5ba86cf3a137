"""The CPU backend (atom/ops/cpu_ops.py): each op against its torch reference on fresh random
inputs, and the packed weight copies never outliving the weights they were made from."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from atom.ops import cpu_ops, implementations, torch_ops, weights_changed
from atom.ops.metadata import AttentionMetadata

TOL = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(out, ref, dtype=torch.float32):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.3g} over {TOL[dtype]:.3g}"


def test_cpu_backend_registered_for_the_hot_ops():
    for name in ("linear", "lm_head", "rms_norm", "fused_add_rms_norm", "silu_and_mul", "qkv_prologue",
                 "kv_cache_write", "paged_attention_decode", "paged_attention_prefill"):
        assert implementations(name)["cpu"] is getattr(cpu_ops, name)


# ---- dense layers on packed weights ---------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 7, 16, 300])
@pytest.mark.parametrize("n,k", [(96, 64), (1000, 48)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear(rows, n, k, bias):
    torch.manual_seed(rows * n + k)
    w = torch.nn.Parameter(torch.randn(n, k) / math.sqrt(k), requires_grad=False)
    b = torch.randn(n) if bias else None
    x = torch.randn(rows, k)
    check(cpu_ops.linear(x, w, b), torch_ops.linear(x, w, b))
    x3 = torch.randn(2, rows, 2 * k)[..., ::2]  # 3-d and strided, as views of activations come
    check(cpu_ops.linear(x3, w, b), torch_ops.linear(x3, w, b))
    check(cpu_ops.lm_head(x, w), torch_ops.lm_head(x, w))


def test_linear_without_a_packable_weight_is_plain_linear():
    torch.manual_seed(1)
    w, x = torch.randn(32, 16), torch.randn(5, 16)
    assert torch.equal(cpu_ops.linear(x, w), F.linear(x, w))  # not a Parameter: nothing cached on it
    wb = torch.nn.Parameter(w.bfloat16(), requires_grad=False)
    assert torch.equal(cpu_ops.linear(x.bfloat16(), wb), F.linear(x.bfloat16(), wb))
    assert not hasattr(wb, "_atom_cpu_packed")


def test_packed_copy_follows_the_weights():
    """Written in place + weights_changed(), or given new memory (sleep / wake): the next call
    uses the new values; weights_changed() also frees the copies at once."""
    torch.manual_seed(2)
    w = torch.nn.Parameter(torch.randn(64, 32), requires_grad=False)
    x = torch.randn(4, 32)
    check(cpu_ops.linear(x, w), F.linear(x, w))
    assert hasattr(w, "_atom_cpu_packed")
    with torch.no_grad():
        w.data.copy_(torch.randn(64, 32))  # an update writes through .data: no version bump to see
    weights_changed()
    assert not hasattr(w, "_atom_cpu_packed")
    check(cpu_ops.linear(x, w), F.linear(x, w))
    w.data = torch.randn(64, 32)  # new storage, as a restored pool gives it
    check(cpu_ops.linear(x, w), F.linear(x, w))


def test_engine_update_and_sleep_reach_the_packed_weights(tiny_llama_path):
    """A CPU engine given new weights (update_weights) or woken from a level-2 sleep generates
    what a fresh engine on those weights does."""
    from atom import RolloutEngine, SamplingParams
    from atom.models.weights import iter_checkpoint
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompt = [[5, 9, 14, 3, 7]]
    engine = RolloutEngine(tiny_llama_path, device="cpu", num_kv_blocks=16)
    before = engine.generate(prompt, sp)[0].outputs[0].token_ids
    scaled = [(n, t * 1.5 if t.ndim == 2 else t) for n, t in iter_checkpoint(tiny_llama_path)]
    engine.update_weights(scaled)
    after = engine.generate(prompt, sp)[0].outputs[0].token_ids
    fresh = RolloutEngine(tiny_llama_path, device="cpu", num_kv_blocks=16)
    fresh.update_weights(scaled)
    assert after == fresh.generate(prompt, sp)[0].outputs[0].token_ids
    assert after != before, "the scaled weights must change the greedy tokens"
    engine.sleep(level=2)
    engine.wake_up()
    engine.update_weights(iter_checkpoint(tiny_llama_path))
    assert engine.generate(prompt, sp)[0].outputs[0].token_ids == before


# ---- norms, rope, kv write ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(1, 64), (16, 576), (300, 96)])
def test_rms_norms(dtype, rows, hidden):
    torch.manual_seed(rows + hidden)
    x = (torch.randn(rows, hidden) * 3).to(dtype)
    r = torch.randn(rows, hidden).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden)).to(dtype)
    check(cpu_ops.rms_norm(x, w, 1e-6), torch_ops.rms_norm(x, w, 1e-6), dtype)
    out, summed = cpu_ops.fused_add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_sum = torch_ops.fused_add_rms_norm(x, r, w, 1e-6)
    check(out, ref_out, dtype)
    assert torch.equal(summed, ref_sum)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,inter", [(1, 48), (16, 1536)])
def test_silu_and_mul(dtype, rows, inter):
    torch.manual_seed(rows + inter)
    x = (torch.randn(rows, 2 * inter) * 2).to(dtype)
    check(cpu_ops.silu_and_mul(x), torch_ops.silu_and_mul(x), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("hq,hk,d", [(9, 3, 64), (4, 4, 16)])
def test_qkv_prologue(dtype, qk_norm, hq, hk, d):
    from atom.models.layers.rotary import RotaryEmbedding
    torch.manual_seed(hq * d + qk_norm)
    t, blocks, page = 21, 6, 8
    cache = RotaryEmbedding(d, 512, 1e4).cos_sin_cache
    qkv = torch.randn(t, (hq + 2 * hk) * d).to(dtype)
    pos = torch.randint(0, 512, (t,))
    qw, kw = ((1 + 0.1 * torch.randn(d)).to(dtype) for _ in range(2)) if qk_norm else (None, None)
    slots = torch.randperm(blocks * page)[:t]
    slots[::4] = -1
    kc, vc = torch.randn(blocks, page, hk, d).to(dtype), torch.randn(blocks, page, hk, d).to(dtype)
    k1, v1, k2, v2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    q = cpu_ops.qkv_prologue(qkv, pos, cache, qw, kw, 1e-6, hq, hk, d, k1, v1, slots)
    ref = torch_ops.qkv_prologue(qkv, pos, cache, qw, kw, 1e-6, hq, hk, d, k2, v2, slots)
    check(q, ref, dtype)
    check(k1, k2, dtype)
    assert torch.equal(v1, v2)


def test_kv_cache_write():
    torch.manual_seed(3)
    kc, vc = torch.randn(10, 16, 2, 8), torch.randn(10, 16, 2, 8)
    k, v = torch.randn(30, 2, 8), torch.randn(30, 2, 8)
    for slots in (torch.randperm(160)[:30], torch.cat([torch.full((5,), -1), torch.randperm(160)[:25]]),
                  torch.randperm(160)[:30].int()):  # int32: the static decode buffers' slots
        k1, v1, k2, v2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
        cpu_ops.kv_cache_write(k, v, k1, v1, slots)
        torch_ops.kv_cache_write(k, v, k2, v2, slots)
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


# ---- paged attention ------------------------------------------------------------------------------

def paged_batch(dtype, seq_lens, query_lens, hq, hk, d, page):
    """Random paged KV (blocks in random order, tables padded with 0) and queries: sequence b's
    last query_lens[b] tokens are new."""
    need = [math.ceil(n / page) for n in seq_lens]
    total = sum(need) + 2
    perm = torch.randperm(total).tolist()
    tables = [[perm.pop() for _ in range(n)] for n in need]
    width = max(need)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    kc, vc = torch.randn(total, page, hk, d).to(dtype), torch.randn(total, page, hk, d).to(dtype)
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(query_lens), hq, d).to(dtype)
    meta = AttentionMetadata(slot_mapping=torch.full((sum(query_lens),), -1), query_start_loc=qsl,
                             seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=bt,
                             is_decode=all(n == 1 for n in query_lens), max_query_len=max(query_lens),
                             max_seq_len=max(seq_lens))
    return q, kc, vc, meta


ATTN_SHAPES = [(9, 3, 64, 16), (8, 8, 32, 16), (4, 2, 16, 8)]  # (hq, hk, d, page)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hk,d,page", ATTN_SHAPES)
def test_decode_attention(dtype, hq, hk, d, page):
    torch.manual_seed(hq * 11 + d + page)
    q, kc, vc, meta = paged_batch(dtype, [1, 2, 17, 130, 33], [1] * 5, hq, hk, d, page)
    check(cpu_ops.paged_attention_decode(q, kc, vc, meta, d ** -0.5),
          torch_ops.paged_attention_decode(q, kc, vc, meta, d ** -0.5), dtype)


def test_decode_ops_read_no_column_past_the_longest_sequence():
    """The decode runner's static tables span max_model_len: the columns past the batch's longest
    sequence (here ids of blocks that do not exist) are never gathered, and the result is that
    of the tight table, for the CPU op, the torch reference, the windowed / sink op and MLA."""
    from atom.ops import torch_family_ops
    torch.manual_seed(5)
    hq, hk, d, page = 4, 2, 16, 8
    q, kc, vc, meta = paged_batch(torch.float32, [1, 9, 17, 30], [1] * 4, hq, hk, d, page)
    wide = dataclasses.replace(meta, block_tables=torch.cat(
        [meta.block_tables, torch.full((4, 60), kc.shape[0] + 1000, dtype=torch.int32)], 1), max_seq_len=512)
    sinks = torch.randn(hq)
    for op, args in ((cpu_ops.paged_attention_decode, ()), (torch_ops.paged_attention_decode, ()),
                     (torch_family_ops.sliding_sink_attention_decode, (12, sinks))):
        assert torch.equal(op(q, kc, vc, wide, d ** -0.5, *args), op(q, kc, vc, meta, d ** -0.5, *args)), op
    cache = torch.randn(kc.shape[0], page, 1, 24)  # latent 16 + rope 8
    ql, qp = torch.randn(4, hq, 16), torch.randn(4, hq, 8)
    mla = torch_family_ops.mla_attention_decode
    assert torch.equal(mla(ql, qp, cache, wide, 0.2), mla(ql, qp, cache, meta, 0.2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hk,d,page", ATTN_SHAPES)
def test_prefill_attention(dtype, hq, hk, d, page):
    """Whole prompts, chunks after a cached prefix, single tokens and an idle row, in one batch."""
    torch.manual_seed(hq * 7 + d + page)
    q, kc, vc, meta = paged_batch(dtype, [5, 40, 70, 17, 9], [5, 12, 70, 1, 0], hq, hk, d, page)
    check(cpu_ops.paged_attention_prefill(q, kc, vc, meta, d ** -0.5),
          torch_ops.paged_attention_prefill(q, kc, vc, meta, d ** -0.5), dtype)
