"""The batch-invariant Triton backend (atom/ops/triton/invariant*.py), op by op: against the torch
references on fresh random inputs, and a row's bits the same whatever else is in the call.

On CPU: `ATOM_GPU_TESTS_ON_CPU=1 TRITON_INTERPRET=1 PYTHONPATH=$PWD:/work/triton_pkgs python -m pytest
-m gpu tests/gpu/test_invariant_ops.py` (small shapes, KV splits shrunk so short sequences span several).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from atom.ops import torch_ops
from atom.ops.metadata import AttentionMetadata, CascadeMetadata

from gpu_helpers import ON_CPU, act_dtypes, device, sampling_meta, triton_ops  # noqa: F401 (fixtures)
from test_triton_ops import check, gen

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def inv(triton_ops):
    """The triton_invariant backend's implementations (registers it)."""
    import atom.ops.triton.invariant  # noqa: F401
    return lambda name: triton_ops(name)["triton_invariant"]


# ---- GEMM --------------------------------------------------------------------------------------

# Every tile-width class of gemm_config: narrow (< 1024), 64 / 128 / 256 columns, float32; uneven K.
GEMM_SHAPES = [(48, 64), (200, 96), (16, 40), (1024, 48)] + ([] if ON_CPU else [
    (4096, 4096), (6144, 4096), (24576, 4096), (2048, 4096), (128, 2048), (5120, 2048), (151936, 2048),
    (4096, 12288), (151936, 4096)])  # with the first three: invariant_gemm.MEASURED's H200 shapes
GEMM_ROWS = [1, 3, 37, 130] if ON_CPU else [1, 3, 64, 130, 512, 1000, 8192]


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("n,k", GEMM_SHAPES)
def test_gemm_matches_torch_and_rows_do_not_depend_on_the_batch(inv, device, dtype, n, k):
    gen(n + k)
    w = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype)
    bias = torch.randn(n, device=device).to(dtype)
    x = torch.randn(max(GEMM_ROWS), k, device=device).to(dtype)
    linear = inv("linear")
    full = linear(x, w, bias)
    check(full, F.linear(x.double(), w.double(), bias.double()), dtype)
    for m in GEMM_ROWS:
        for at in (0, max(GEMM_ROWS) - m):  # the same rows at the start and at the end of the batch
            part = linear(x[at: at + m].contiguous(), w, bias)
            assert torch.equal(part, full[at: at + m]), f"rows {at}..{at + m} differ alone (M={m})"
    assert torch.equal(inv("lm_head")(x[:5], w), linear(x[:5], w))


# ---- attention ---------------------------------------------------------------------------------

ATTN_SHAPES = [(4, 2, 16, 16), (16, 2, 32, 8)] if ON_CPU else \
    [(4, 2, 16, 16), (32, 4, 128, 16), (32, 8, 128, 16), (16, 8, 64, 32), (40, 8, 128, 16)]


@pytest.fixture
def small_split(inv, monkeypatch):
    """KV splits shrunk in the interpreter so that short sequences span several."""
    import atom.ops.triton.invariant_attention as ia
    if ON_CPU:
        monkeypatch.setattr(ia, "KV_SPLIT", 32)
    return ia.KV_SPLIT


@pytest.fixture(params=["split", "whole"])
def mode(request, small_split, monkeypatch):
    """Decode attention as per-split partials + fold, or one program per sequence."""
    import atom.ops.triton.attention as attn
    monkeypatch.setitem(attn.DECODE_CFG, "whole_own_pairs", 1 if request.param == "whole" else 1 << 40)
    return request.param


class Paged:
    """Sequences with fixed random queries and KV in a paged cache, run through the attention ops
    in any grouping: each (sequence, position) has one query and one K/V, whatever the step."""

    def __init__(self, device, dtype, lens, hq, hk, d, page, shared_blocks=0):
        self.device, self.page, self.hq, self.d = device, page, hq, d
        need = [-(-n // page) for n in lens]
        perm = torch.randperm(sum(need) + 2).tolist()
        self.tables = [[perm.pop() for _ in range(n)] for n in need]
        for t in self.tables[1:]:  # every sequence shares the first one's first shared_blocks blocks
            t[:shared_blocks] = self.tables[0][:shared_blocks]
        self.kc = torch.randn(sum(need) + 2, page, hk, d, device=device).to(dtype)
        self.vc = torch.randn_like(self.kc)
        self.q = [torch.randn(n, hq, d, device=device).to(dtype) for n in lens]
        if shared_blocks:  # shared blocks hold the same tokens, so those positions share queries too
            for q in self.q[1:]:
                q[: shared_blocks * page] = self.q[0][: shared_blocks * page]

    def meta(self, seqs, starts, ends):
        width = max(len(self.tables[s]) for s in seqs)
        bt = [self.tables[s] + [0] * (width - len(self.tables[s])) for s in seqs]
        qlens = [e - s for s, e in zip(starts, ends)]
        qsl = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
        return AttentionMetadata(
            slot_mapping=torch.full((sum(qlens),), -1, device=self.device), query_start_loc=qsl.to(self.device),
            seq_lens=torch.tensor(ends, dtype=torch.int32, device=self.device),
            block_tables=torch.tensor(bt, dtype=torch.int32, device=self.device),
            is_decode=all(n == 1 for n in qlens), max_query_len=max(qlens), max_seq_len=max(ends))

    def run(self, op, seqs, starts, ends, cascade=None):
        """Outputs of positions [starts[i], ends[i]) of sequence seqs[i], as a list of [n, hq, d]."""
        meta = self.meta(seqs, starts, ends)
        meta.cascade = cascade
        q = torch.cat([self.q[s][a:b] for s, a, b in zip(seqs, starts, ends)])
        out = op(q, self.kc, self.vc, meta, self.d ** -0.5)
        cut = torch.tensor([0] + [e - s for s, e in zip(starts, ends)]).cumsum(0).tolist()
        return [out[cut[i]: cut[i + 1]] for i in range(len(seqs))]


def lens_for(page):
    return [70, 45, 9, 81] if ON_CPU else [1300, 700, 9, 2100, 513]


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("hq,hk,d,page", ATTN_SHAPES)
def test_attention_prefill_matches_torch_and_chunking_does_not_change_bits(inv, device, dtype, hq, hk, d, page,
                                                                         small_split):
    gen(hq + d + page)
    lens = lens_for(page)
    p = Paged(device, dtype, lens, hq, hk, d, page)
    prefill = inv("paged_attention_prefill")
    whole = p.run(prefill, range(len(lens)), [0] * len(lens), lens)
    ref = p.run(torch_ops.paged_attention_prefill, range(len(lens)), [0] * len(lens), lens)
    check(torch.cat(whole), torch.cat(ref), dtype)
    # The same tokens in chunks (cached prefix + new tokens), other batches and orders.
    cuts = [n // 3 for n in lens]
    first = p.run(prefill, [3, 1, 0, 2][: len(lens)], [0] * 4, [cuts[i] for i in (3, 1, 0, 2)][: len(lens)])
    rest = p.run(prefill, range(len(lens)), cuts, lens)
    for i, s in enumerate([3, 1, 0, 2][: len(lens)]):
        assert torch.equal(first[i], whole[s][: cuts[s]]), f"sequence {s}: first chunk differs"
    for s in range(len(lens)):
        assert torch.equal(rest[s], whole[s][cuts[s]:]), f"sequence {s}: second chunk differs"


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("hq,hk,d,page", ATTN_SHAPES)
def test_attention_decode_equals_prefill_bit_for_bit(inv, device, dtype, hq, hk, d, page, mode):
    """A token computed in a decode step (any batch) has the bits the prefill of its sequence gave it."""
    gen(hq * 3 + d + page)
    lens = lens_for(page)
    p = Paged(device, dtype, lens, hq, hk, d, page)
    whole = p.run(inv("paged_attention_prefill"), range(len(lens)), [0] * len(lens), lens)
    decode = inv("paged_attention_decode")
    for pos_of in (lambda n: n - 1, lambda n: n // 2, lambda n: 0):
        ends = [pos_of(n) + 1 for n in lens]
        outs = p.run(decode, range(len(lens)), [e - 1 for e in ends], ends)
        alone = p.run(decode, [1], [ends[1] - 1], [ends[1]])[0]
        assert torch.equal(alone, outs[1])
        for s, o in enumerate(outs):
            assert torch.equal(o[0], whole[s][ends[s] - 1]), f"sequence {s} position {ends[s] - 1}"


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("hq,hk,d,page", ATTN_SHAPES)
def test_attention_cascade_decode_equals_plain_decode(inv, device, dtype, hq, hk, d, page, mode):
    """Shared-prefix groups (read once per chunk of members) change no bit of any member's output;
    a padded row (length 0) gives zeros."""
    import atom.ops.triton.invariant_attention as ia
    gen(hq * 5 + d + page)
    prompt = 80 if ON_CPU else 1100  # spans whole KV splits and a part of one
    gens = [13, 40, 2, 31, 7] if ON_CPU else [500, 13, 900, 64, 1]
    lens = [prompt + g for g in gens]
    nb = prompt // page
    p = Paged(device, dtype, lens, hq, hk, d, page, shared_blocks=nb)
    decode = inv("paged_attention_decode")
    rows = list(range(len(lens)))
    plain = p.run(decode, rows, [n - 1 for n in lens], lens)
    max_n = 4
    grows = torch.full((2, max_n), -1, dtype=torch.int32)
    grows[0, :4], grows[1, :1] = torch.tensor([0, 1, 2, 3]), torch.tensor([4])
    plen = torch.tensor([nb * page, 0], dtype=torch.int32)
    row_prefix = torch.tensor([nb * page] * 4 + [0], dtype=torch.int32)
    casc = CascadeMetadata(grows.to(device), plen.to(device), row_prefix.to(device), nb * page)
    assert nb * page >= ia.KV_SPLIT, "the shared prefix must hold a whole KV split"
    shared = p.run(decode, rows, [n - 1 for n in lens], lens, cascade=casc)
    for s in rows:
        assert torch.equal(shared[s], plain[s]), f"member {s} differs with the shared-prefix kernel"
    check(torch.cat(plain), torch.cat(p.run(torch_ops.paged_attention_decode, rows, [n - 1 for n in lens], lens)),
          dtype)
    meta = p.meta(rows, [n - 1 for n in lens], lens)
    meta.seq_lens[-1] = 0
    meta.cascade = casc
    q = torch.cat([p.q[s][n - 1: n] for s, n in zip(rows, lens)])
    out = decode(q, p.kc, p.vc, meta, d ** -0.5)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


@pytest.mark.parametrize("dtype", act_dtypes())
def test_control_the_normal_backend_does_change_bits(triton_ops, inv, device, dtype, small_split):
    """The checks above can fail: the triton backend's decode reduces in other splits than its
    prefill, so some tokens get other bits there."""
    gen(99)
    lens = lens_for(16)
    p = Paged(device, dtype, lens, 16, 2, 32, 16)
    normal = triton_ops("paged_attention_prefill")["triton"], triton_ops("paged_attention_decode")["triton"]
    whole = p.run(normal[0], range(len(lens)), [0] * len(lens), lens)
    outs = p.run(normal[1], range(len(lens)), [n - 1 for n in lens], lens)
    assert any(not torch.equal(o[0], w[-1]) for o, w in zip(outs, whole))


# ---- MoE, prologue, sampling -------------------------------------------------------------------

MOE = [(8, 2, 64, 32), (16, 4, 128, 64)] + ([] if ON_CPU else [(128, 8, 2048, 768)])


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("experts,top_k,hidden,inter", MOE)
def test_moe_matches_torch_and_tokens_do_not_depend_on_the_batch(triton_ops, inv, device, dtype, experts, top_k,
                                                                  hidden, inter):
    gen(experts + hidden)
    t = 40 if ON_CPU else 700
    x = torch.randn(t, hidden, device=device).to(dtype)
    logits = torch.randn(t, experts, device=device).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=device) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device=device) / inter ** 0.5).to(dtype)
    forward = inv("moe_forward")
    full = forward(x, logits, w13, w2, top_k, True)
    weights, ids = triton_ops("moe_route")["triton"](logits, top_k, True)
    check(full, torch_ops.fused_moe(x, w13, w2, weights, ids), dtype)
    for m in (1, 3, 17):
        for at in (0, t - m):
            part = forward(x[at: at + m].contiguous(), logits[at: at + m].contiguous(), w13, w2, top_k, True)
            assert torch.equal(part, full[at: at + m]), f"tokens {at}..{at + m} differ with {m} tokens"
    assert torch.equal(inv("fused_moe")(x, w13, w2, weights, ids), full)


@pytest.mark.parametrize("dtype", act_dtypes())
def test_prologue_matches_torch_and_tokens_do_not_depend_on_the_batch(inv, device, dtype):
    from atom.models.layers.rotary import RotaryEmbedding
    gen(5)
    hq, hk, d, page = 16, 4, 32, 16
    rope = RotaryEmbedding(d, 1024, 1e6).to(device)
    t = 40
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=device).to(dtype)
    pos = torch.randint(0, 1000, (t,), device=device)
    qw, kw = (1 + 0.1 * torch.randn(2, d, device=device)).to(dtype)
    caches = [torch.zeros(8, page, hk, d, device=device, dtype=dtype) for _ in range(4)]
    slots = torch.randperm(8 * page, device=device)[:t]
    args = (rope.cos_sin_cache.to(dtype), qw, kw, 1e-6, hq, hk, d)
    full = inv("qkv_prologue")(qkv, pos, *args, caches[0], caches[1], slots)
    check(full, torch_ops.qkv_prologue(qkv, pos, *args, caches[2], caches[3], slots), dtype)
    for m, at in ((1, 7), (5, 0), (3, t - 3)):
        part = inv("qkv_prologue")(qkv[at: at + m], pos[at: at + m], *args, caches[2], caches[3], slots[at: at + m])
        assert torch.equal(part, full[at: at + m])
        for new, old in ((caches[2], caches[0]), (caches[3], caches[1])):  # K and V written as in the batch
            s = slots[at: at + m]
            assert torch.equal(new.view(-1, hk, d)[s], old.view(-1, hk, d)[s])


def _filtered(meta, row, top_k):
    """meta with a top-k filter on one row (need_filter for the whole batch)."""
    meta.top_k = meta.top_k.clone()
    meta.top_k[row] = top_k
    meta.need_filter = True
    return meta


@pytest.mark.parametrize("vocab", [300, 5000] if ON_CPU else [300, 151936])
def test_sample_rows_do_not_depend_on_the_batch_and_report_the_prompt_logprob(triton_ops, inv, device, vocab):
    """Each row's token, logprob and top logprobs are the same alone, in any batch (with or without
    another row's filter, whatever the size: the triton op switches paths at 256 rows); the token is
    the normal split kernel's, its logprob exactly the log-softmax a prompt-logprob row reports."""
    gen(vocab)
    rows = 6 if ON_CPU else 300
    logits = torch.randn(rows, vocab, device=device) * 3
    temps = [0.0, 0.7, 1.0, 1.3, 1.0, 0.5] * (rows // 6)
    meta = sampling_meta(device, rows, temps, k=2)
    sample = inv("sample")
    full = sample(logits, meta)
    ref = triton_ops("sample")["triton"](logits, meta, split=True)
    assert torch.equal(full.token_ids, ref.token_ids)
    for r in range(rows):
        t = temps[r] if temps[r] > 0 else 1.0
        # what prompt_logprobs computes for the row: a true division by a tensor (CUDA's tensor /
        # Python scalar multiplies by the reciprocal, other bits)
        lp = (logits[r: r + 1] / torch.full((1, 1), t, device=device)).log_softmax(-1)[0]
        assert full.logprobs[r].item() == lp[full.token_ids[r]].item()
    picks = [[1], [rows - 1, 0, 2], list(range(rows))[::-1]]
    for sel in picks:
        idx = torch.tensor(sel, device=device)
        part = sample(logits[idx], sampling_meta(device, len(sel), [temps[i] for i in sel], k=2,
                                                 seeds=meta.seeds[idx].tolist(), counters=meta.counters[idx].tolist()))
        for j, i in enumerate(sel):
            assert part.token_ids[j] == full.token_ids[i] and part.logprobs[j] == full.logprobs[i]
            assert torch.equal(part.top_logprobs[j], full.top_logprobs[i])
    other = sample(logits, _filtered(sampling_meta(device, rows, temps, k=2, seeds=meta.seeds.tolist(),
                                                   counters=meta.counters.tolist()), 3, 5))
    keep = [r for r in range(rows) if r != 3]
    assert torch.equal(other.token_ids[keep], full.token_ids[keep])
    assert torch.equal(other.logprobs[keep], full.logprobs[keep])
    assert other.token_ids[3] in (logits[3] / temps[3]).topk(5).indices
