"""The fast MLA prefill (atom/ops/mla_prefill.py: expansion GEMM + attention per group of
sequences, the absorbed decode for sequences with few new tokens) against the torch reference
(torch_family_ops.mla_attention_prefill) and an independent float64 oracle, on fresh random
inputs: several sequences in one call, cached prefixes, chunk continuations, block sizes that
divide nothing, head dims that are not powers of two. The GPU kernels' shapes are in
tests/gpu/test_mla_prefill_gpu.py."""
from __future__ import annotations

import pytest
import torch

from atom.ops import mla_prefill as mp
from atom.ops.metadata import AttentionMetadata
from atom.ops.torch_family_ops import mla_attention_decode, mla_attention_prefill


def mla_case(ctx: list[int], new: list[int], heads: int, nope: int, rope: int, v_dim: int, lat: int, page: int,
             dtype: torch.dtype, seed: int, device: str = "cpu"):
    """Random latent cache (every slot finite, shuffled blocks), queries of `new` tokens at the
    end of each `ctx`, kv_b_proj weight and metadata."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // page) for n in ctx]
    total = sum(need) + 2
    perm = torch.randperm(total, generator=g).tolist()
    tables = [[perm.pop() for _ in range(n)] for n in need]
    width = max(need)
    starts = [0]
    for k in new:
        starts.append(starts[-1] + k)
    t = starts[-1]
    meta = AttentionMetadata(
        slot_mapping=torch.full((t,), -1), query_start_loc=torch.tensor(starts), seq_lens=torch.tensor(ctx),
        block_tables=torch.tensor([r + [0] * (width - len(r)) for r in tables]), is_decode=False,
        max_query_len=max(new), max_seq_len=max(ctx))
    meta = AttentionMetadata(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(meta).items()})
    cache = torch.randn(total, page, 1, lat + rope, generator=g).to(device, dtype)
    q_nope = torch.randn(t, heads, nope, generator=g).to(device, dtype)
    q_pe = torch.randn(t, heads, rope, generator=g).to(device, dtype)
    w_kv_b = (torch.randn(heads * (nope + v_dim), lat, generator=g) * lat ** -0.5).to(device, dtype)
    return q_nope, q_pe, cache, w_kv_b, meta


def oracle(q_nope, q_pe, cache, w_kv_b, meta, scale) -> torch.Tensor:
    """float64, dense, straight from the definition: token i of a sequence with ctx KV tokens
    and q new ones sits at position ctx - q + i and sees positions 0..itself."""
    heads, nope = q_nope.shape[1:]
    lat = w_kv_b.shape[1]
    w = w_kv_b.double().view(heads, -1, lat)
    out = []
    starts, lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
    page = cache.shape[1]
    for b, n in enumerate(lens):
        slots = [int(meta.block_tables[b, p // page]) * page + p % page for p in range(n)]
        rows = cache.view(-1, cache.shape[-1])[slots].double()
        c, k_pe = rows[:, :lat], rows[:, lat:]
        k = torch.cat((torch.einsum("kl,hnl->khn", c, w[:, :nope]), k_pe[:, None].expand(-1, heads, -1)), -1)
        v = torch.einsum("kl,hvl->khv", c, w[:, nope:])
        s, e = starts[b], starts[b + 1]
        q = torch.cat((q_nope[s:e], q_pe[s:e]), -1).double()
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        pos = torch.arange(n - (e - s), n)
        scores = scores.masked_fill(torch.arange(n)[None, None, :] > pos[None, :, None], float("-inf"))
        out.append(torch.einsum("hqk,khv->qhv", scores.softmax(-1), v))
    return torch.cat(out)


# (ctx, new): several sequences of different lengths, fresh prompts, cached prefixes (ctx >
# new), a chunk continuing a sequence, short rows that take the absorbed path (1 and 5 new
# tokens) next to long ones.
CASES = {
    "fresh": ([45, 70, 38], [45, 70, 38]),
    "cached_prefix": ([90, 77], [40, 35]),
    "mixed_short_long": ([60, 33, 81, 17], [1, 33, 50, 5]),
    "short_between_long": ([60, 45, 70], [40, 1, 30]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_prefill_matches_reference(case, dtype, monkeypatch):
    monkeypatch.setattr(mp, "ABSORB_MAX_Q", 8)  # the short rows of the cases above go absorbed
    ctx, new = CASES[case]
    heads, nope, rope, v_dim, lat, page = 3, 24, 8, 20, 40, 7   # nothing a power of two; 7 divides no length
    args = mla_case(ctx, new, heads, nope, rope, v_dim, lat, page, dtype, seed=len(case))
    scale = 0.15
    got = mp.mla_prefill(*args, scale, mla_attention_decode)
    ref = mla_attention_prefill(*args, scale)
    want = oracle(*args, scale)
    assert got.dtype == dtype and got.shape == ref.shape == (sum(new), heads, v_dim)
    assert torch.isfinite(got).all()
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    else:
        # bf16 rounds K, V, the probabilities and the output (the reference only the output): the
        # error from float64 may be a few bf16 ulps of the output's scale, and no more than 4x
        # the reference's own.
        err = (got.double() - want).abs().max().item()
        ref_err = (ref.double() - want).abs().max().item()
        scale_out = want.abs().max().item()
        assert err < 4 * 2 ** -8 * scale_out, f"bf16 max error {err:.3g} at output scale {scale_out:.3g}"
        assert err < 4 * ref_err + 1e-3, f"bf16 error {err:.3g}, reference's own {ref_err:.3g}"


def test_groups_bound_the_expansion(monkeypatch):
    """A small expansion budget splits the sequences into several groups: same result."""
    args = mla_case([50, 64, 41, 90], [50, 40, 41, 60], 2, 16, 8, 16, 24, 16, torch.float32, seed=3)
    whole = mp.mla_prefill(*args, 0.2, mla_attention_decode)
    per_token = (2 * (16 + 16 + 8) + 24 + 8) * 4
    monkeypatch.setattr(mp, "EXPAND_BUDGET_BYTES", 70 * per_token)  # at most one sequence per group
    assert mp._groups([0, 1, 2, 3], [50, 64, 41, 90], 70) == [[0], [1], [2], [3]]
    split = mp.mla_prefill(*args, 0.2, mla_attention_decode)
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(whole, mla_attention_prefill(*args, 0.2), atol=2e-5, rtol=2e-5)
    meta = args[-1]  # the engine's metadata carries host lists (no sync): the same result
    meta.host_query_start_loc, meta.host_seq_lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
    torch.testing.assert_close(mp.mla_prefill(*args, 0.2, mla_attention_decode), split, atol=0, rtol=0)


def test_plan_is_built_once_a_step(monkeypatch):
    """Every layer of a step shares the plan the first one built (same result, no rebuild); a
    copy of the metadata with other lengths (dataclasses.replace shares op_plans) gets its own."""
    import dataclasses
    monkeypatch.setattr(mp, "ABSORB_MAX_Q", 8)
    args = mla_case([60, 45, 70], [40, 1, 30], 2, 16, 8, 16, 24, 8, torch.float32, seed=7)
    meta = args[-1]
    first = mp.mla_prefill(*args, 0.2, mla_attention_decode)
    plan = meta.op_plans["mla_prefill"]
    assert [(g.row_lo, g.row_hi) for g in plan.groups] == [(0, 40), (41, 71)]  # the short row splits them
    calls = []
    monkeypatch.setattr(mp, "_group", lambda *a: calls.append(a))
    again = mp.mla_prefill(*args, 0.2, mla_attention_decode)
    assert calls == [] and meta.op_plans["mla_prefill"] is plan
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    monkeypatch.undo()
    monkeypatch.setattr(mp, "ABSORB_MAX_Q", 8)
    shorter = dataclasses.replace(meta, seq_lens=torch.tensor([59, 45, 70]))  # one cached token fewer
    got = mp.mla_prefill(*args[:-1], shorter, 0.2, mla_attention_decode)
    torch.testing.assert_close(got, mla_attention_prefill(*args[:-1], shorter, 0.2), atol=2e-5, rtol=2e-5)
    assert not torch.equal(got[:40], first[:40])


def test_only_the_sequence_slots_are_read(monkeypatch):
    """NaN in every slot past a sequence's length (fresh, unzeroed blocks) does not reach the
    output of the expanded path (the absorbed one reads what its decode kernel reads: the
    Triton one masks those slots, the torch reference used here does not)."""
    monkeypatch.setattr(mp, "ABSORB_MAX_Q", 0)
    q_nope, q_pe, cache, w, meta = mla_case([20, 35], [20, 10], 2, 16, 8, 16, 24, 8, torch.float32, seed=5)
    want = mp.mla_prefill(q_nope, q_pe, cache, w, meta, 0.2, mla_attention_decode)
    flat = cache.view(-1, cache.shape[-1])
    used = set()
    for b, n in enumerate(meta.seq_lens.tolist()):
        used |= {int(meta.block_tables[b, p // 8]) * 8 + p % 8 for p in range(n)}
    for slot in set(range(flat.shape[0])) - used:
        flat[slot] = float("nan")
    got = mp.mla_prefill(q_nope, q_pe, cache, w, meta, 0.2, mla_attention_decode)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_bad_shapes_are_clear_errors():
    q_nope, q_pe, cache, w, meta = mla_case([9], [9], 2, 16, 8, 16, 24, 8, torch.float32, seed=1)
    with pytest.raises(ValueError, match="w_kv_b"):
        mp.mla_prefill(q_nope, q_pe, cache, w[:, :-1], meta, 0.2, mla_attention_decode)
    with pytest.raises(ValueError, match="kv_cache"):
        mp.mla_prefill(q_nope, q_pe, cache[..., 0, :], w, meta, 0.2, mla_attention_decode)


def test_engine_tokens_with_fast_prefill_equal_reference(make_tiny_model, monkeypatch):
    """A tiny DeepSeek-V3 through the engine with the fast prefill (CPU: registered under a test
    backend name, the torch decode for its short rows) against the torch reference op: chunked
    prompts (chunks over cached prefixes), prefix caching (n samples), decode rows in mixed
    steps: the same greedy tokens, logprobs within float32 noise."""
    from atom import RolloutEngine, SamplingParams
    from atom.ops import registry
    from conftest import TINY_VOCAB
    from helpers import random_prompts
    monkeypatch.setattr(mp, "ABSORB_MAX_Q", 3)  # decode rows and 2-3 token chunk tails go absorbed
    calls = {"short": 0, "long": 0}

    def counted(q_nope, q_pe, kv_cache, w_kv_b, meta, scale):
        lens = (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).tolist()
        calls["short"] += sum(0 < n <= mp.ABSORB_MAX_Q for n in lens)
        calls["long"] += sum(n > mp.ABSORB_MAX_Q for n in lens)
        return mp.mla_prefill(q_nope, q_pe, kv_cache, w_kv_b, meta, scale, mla_attention_decode)
    monkeypatch.setitem(registry._IMPLS["mla_attention_prefill"], "fast_test", counted)
    path = make_tiny_model("deepseek_v3")
    prompts = random_prompts([30, 17, 45], TINY_VOCAB, seed=4)
    params = SamplingParams(n=2, temperature=0, max_tokens=6, ignore_eos=True, logprobs=0, logprobs_mode="raw")
    engine = dict(device="cpu", num_kv_blocks=96, kv_block_size=8, max_num_seqs=6, max_num_batched_tokens=22)
    fast = RolloutEngine(path, op_backends={"mla_attention_prefill": "fast_test"}, **engine).generate(prompts, params)
    assert calls["short"] > 0 and calls["long"] > 0, calls   # both paths ran
    ref = RolloutEngine(path, op_backends={"mla_attention_prefill": "torch"}, **engine).generate(prompts, params)
    for a, b in zip(fast, ref):
        for x, y in zip(a.outputs, b.outputs):
            assert x.token_ids == y.token_ids
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4, rtol=0)
