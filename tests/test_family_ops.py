"""Issue 17: the new torch reference ops against HF transformers' own functions, on fresh random
inputs (sinks / sliding-window attention, clamped SwiGLU experts, grouped routing, YaRN), and
MLA's absorbed decode against its expanded prefill."""
from __future__ import annotations

import types

import pytest
import torch

from atom.ops.metadata import AttentionMetadata
from atom.ops.torch_family_ops import (clamped_swiglu, fused_moe_biased, mla_attention_decode, mla_attention_prefill,
                                       mla_cache_write, moe_route_grouped, router_linear, sliding_sink_attention_decode,
                                       sliding_sink_attention_prefill)
from atom.ops.torch_ops import kv_cache_write, paged_attention_decode, paged_attention_prefill

G = torch.Generator().manual_seed(0)


def rand(*shape, scale=1.0):
    return torch.randn(*shape, generator=G) * scale


def paged(lengths: list[int], new: list[int], block_size: int = 4, num_blocks: int = 40):
    """Metadata for sequences of `lengths` KV tokens whose last `new` are this step's, with
    shuffled (non-contiguous) blocks; returns (meta, flat slot of every KV position per sequence)."""
    perm = torch.randperm(num_blocks, generator=G).tolist()
    tables, slots, q_slots, starts = [], [], [], [0]
    for n, k in zip(lengths, new):
        need = -(-n // block_size)
        table, perm = perm[:need], perm[need:]
        tables.append(table)
        pos = [table[p // block_size] * block_size + p % block_size for p in range(n)]
        slots.append(pos)
        q_slots += pos[n - k:]
        starts.append(starts[-1] + k)
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(q_slots), query_start_loc=torch.tensor(starts), seq_lens=torch.tensor(lengths),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]), is_decode=all(k == 1 for k in new),
        max_query_len=max(new), max_seq_len=max(lengths))
    return meta, slots


def hf_gpt_oss_attention(q, k, v, window, sinks, scale):
    """HF GPT-OSS eager attention of one whole sequence: q [T, Hq, D], k / v [T, Hk, D] -> [T, Hq, D]."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward
    t = q.shape[0]
    pos = torch.arange(t)
    visible = pos[None, :] <= pos[:, None]
    if window is not None:
        visible &= pos[None, :] > pos[:, None] - window
    mask = torch.zeros(t, t).masked_fill(~visible, float("-inf"))[None, None]
    module = types.SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], training=False,
                                   sinks=sinks if sinks is not None else torch.full((q.shape[1],), -1e30))
    out, _ = eager_attention_forward(module, q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                     v.transpose(0, 1)[None], mask, scale)
    return out[0]


@pytest.mark.parametrize("window,with_sinks", [(5, True), (None, True), (3, False), (None, False)])
def test_sliding_sink_attention_matches_hf(window, with_sinks):
    hq, hk, d, bs = 4, 2, 8, 4
    lengths, new = [13, 7, 20], [5, 7, 1]  # a chunk after a cached prefix, a whole prompt, one token
    meta, slots = paged(lengths, new, bs)
    k_cache, v_cache = torch.zeros(40, bs, hk, d), torch.zeros(40, bs, hk, d)
    sinks = rand(hq) if with_sinks else None
    seqs = [(rand(n, hq, d), rand(n, hk, d), rand(n, hk, d)) for n in lengths]
    for (q, k, v), s in zip(seqs, slots):
        kv_cache_write(k, v, k_cache, v_cache, torch.tensor(s))
    q_step = torch.cat([q[n - m:] for (q, _, _), n, m in zip(seqs, lengths, new)])
    got = sliding_sink_attention_prefill(q_step, k_cache, v_cache, meta, 0.3, window, sinks)
    want = torch.cat([hf_gpt_oss_attention(q, k, v, window, sinks, 0.3)[n - m:]
                      for (q, k, v), n, m in zip(seqs, lengths, new)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Decode: the last token of each sequence, padded block tables.
    meta_d, _ = paged(lengths, [1, 1, 1], bs)
    k2, v2 = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    for (q, k, v), s in zip(seqs, paged_slots(meta_d, lengths, bs)):
        kv_cache_write(k, v, k2, v2, torch.tensor(s))
    got_d = sliding_sink_attention_decode(torch.stack([q[-1] for q, _, _ in seqs]), k2, v2, meta_d, 0.3, window, sinks)
    want_d = torch.stack([hf_gpt_oss_attention(q, k, v, window, sinks, 0.3)[-1] for q, k, v in seqs])
    torch.testing.assert_close(got_d, want_d, atol=1e-5, rtol=1e-5)
    if window is None and sinks is None:
        torch.testing.assert_close(got, paged_attention_prefill(q_step, k_cache, v_cache, meta, 0.3))
        torch.testing.assert_close(got_d, paged_attention_decode(torch.stack([q[-1] for q, _, _ in seqs]),
                                                                 k2, v2, meta_d, 0.3))


def paged_slots(meta, lengths, bs):
    return [[int(meta.block_tables[b, p // bs]) * bs + p % bs for p in range(n)] for b, n in enumerate(lengths)]


def test_clamped_swiglu_and_biased_experts_match_hf():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    e, h, i, t, k = 4, 16, 8, 9, 2
    cfg = GptOssConfig(num_local_experts=e, hidden_size=h, intermediate_size=i, swiglu_limit=1.5)
    experts = GptOssExperts(cfg)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(rand(*p.shape, scale=0.5))
    x = rand(t, h)
    ids = torch.stack([torch.randperm(e, generator=G)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=G)
    with torch.no_grad():
        want = experts(x, ids, weights)
        gate_up = x @ experts.gate_up_proj[0] + experts.gate_up_proj_bias[0]  # interleaved gate/up columns
        act_want = experts._apply_gate(gate_up)
    act = clamped_swiglu(torch.cat((gate_up[:, 0::2], gate_up[:, 1::2]), -1), 1.5, cfg.swiglu_alpha)
    torch.testing.assert_close(act, act_want)
    assert (gate_up.abs() > 1.5).any()  # the clamp matters here
    w = experts.gate_up_proj.detach()
    w13 = torch.cat((w[:, :, 0::2], w[:, :, 1::2]), -1).transpose(1, 2)
    b = experts.gate_up_proj_bias.detach()
    b13 = torch.cat((b[:, 0::2], b[:, 1::2]), -1)
    w2, b2 = experts.down_proj.detach().transpose(1, 2), experts.down_proj_bias.detach()
    got = fused_moe_biased(x, w13, b13, w2, b2, weights, ids, 1.5, cfg.swiglu_alpha)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Expert parallelism: id -1 pairs are skipped; the rest add up to the same.
    mine = ids < 2
    part = fused_moe_biased(x, w13, b13, w2, b2, weights * mine, torch.where(mine, ids, -1), 1.5, 1.702)
    rest = fused_moe_biased(x, w13, b13, w2, b2, weights * ~mine, torch.where(~mine, ids, -1), 1.5, 1.702)
    torch.testing.assert_close(part + rest, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("groups,top_groups,renorm", [(4, 2, True), (1, 1, False), (8, 3, True)])
def test_grouped_routing_matches_hf(groups, top_groups, renorm):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    e, h, t, k = 16, 12, 33, 4
    cfg = DeepseekV3Config(n_routed_experts=e, hidden_size=h, num_experts_per_tok=k, n_group=groups,
                           topk_group=top_groups, norm_topk_prob=renorm, routed_scaling_factor=2.5)
    router = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(rand(e, h))
        router.e_score_correction_bias.copy_(rand(e, scale=0.5))
    x = rand(t, h)
    if groups == 8:  # a bf16 router over bf16 activations: HF widens both to float32 for the logits
        router, x = router.to(torch.bfloat16), x.to(torch.bfloat16)
    with torch.no_grad():
        logits_want, w_want, ids_want = router(x)
    logits = router_linear(x, router.weight)
    assert logits.dtype == torch.float32 and torch.equal(logits, logits_want.reshape(t, e))
    w, ids = moe_route_grouped(logits, router.e_score_correction_bias, k, groups, top_groups, renorm, 2.5)
    order_got, order_want = ids.sort(-1), ids_want.sort(-1)
    assert torch.equal(order_got.values, order_want.values)
    torch.testing.assert_close(w.gather(1, order_got.indices), w_want.gather(1, order_want.indices))


def test_mla_absorbed_decode_matches_expanded_prefill():
    """Two formulations of the same attention: decode over latents with W_uk folded into the
    query and W_uv applied after, and prefill with latents expanded to per-head K/V."""
    h, nope, rope, v_dim, lat, bs = 3, 8, 4, 6, 10, 4
    lengths = [9, 14]
    w_kv_b = rand(h * (nope + v_dim), lat, scale=0.3)
    meta, slots = paged(lengths, lengths, bs)
    cache = torch.zeros(40, bs, 1, lat + rope)
    latents = [rand(n, lat) for n in lengths]
    k_pes = [rand(n, rope) for n in lengths]
    mla_cache_write(torch.cat(latents), torch.cat(k_pes), cache, meta.slot_mapping)
    q_nope, q_pe = rand(sum(lengths), h, nope), rand(sum(lengths), h, rope)
    full = mla_attention_prefill(q_nope, q_pe, cache, w_kv_b, meta, 0.4)
    # A naive reference of sequence 0: expand, attend causally.
    w = w_kv_b.view(h, nope + v_dim, lat)
    k = torch.cat((torch.einsum("kl,hnl->khn", latents[0], w[:, :nope]), k_pes[0][:, None].expand(-1, h, -1)), -1)
    v = torch.einsum("kl,hvl->khv", latents[0], w[:, nope:])
    q = torch.cat((q_nope[:9], q_pe[:9]), -1)
    s = torch.einsum("qhd,khd->hqk", q, k) * 0.4
    s = s.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(full[:9], torch.einsum("hqk,khv->qhv", s.softmax(-1), v), atol=1e-5, rtol=1e-5)
    # Decode the last token of each sequence with the absorbed weights.
    last = torch.tensor([8, 22])
    meta_d = AttentionMetadata(slot_mapping=torch.tensor([slots[0][-1], slots[1][-1]]),
                               query_start_loc=torch.tensor([0, 1, 2]), seq_lens=torch.tensor(lengths),
                               block_tables=meta.block_tables, is_decode=True, max_query_len=1, max_seq_len=14)
    q_latent = torch.einsum("bhn,hnl->bhl", q_nope[last], w[:, :nope])
    out_latent = mla_attention_decode(q_latent, q_pe[last], cache, meta_d, 0.4)
    torch.testing.assert_close(torch.einsum("bhl,hvl->bhv", out_latent, w[:, nope:]), full[last], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("params", [
    dict(factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False, original_max_position_embeddings=4096),
    dict(factor=40.0, mscale=1.0, mscale_all_dim=1.0, original_max_position_embeddings=4096),
    dict(factor=8.0, mscale=0.707, mscale_all_dim=1.0, beta_fast=16, original_max_position_embeddings=128),
    dict(factor=4.0, attention_factor=1.3, original_max_position_embeddings=64),
])
def test_yarn_matches_hf(params):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from atom.models.layers.rotary import yarn_parameters
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=4096 * 4,
                      rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, **params})
    inv_want, factor_want = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    inv, factor = yarn_parameters(64, 50000.0, params, 4096 * 4)
    torch.testing.assert_close(inv.float(), inv_want, rtol=1e-5, atol=0)  # HF rounds in float32
    assert factor == pytest.approx(factor_want, rel=1e-12)
