"""The vocabulary-parallel (split) sampling path against the one-program kernel and torch.

The split path (atom/ops/triton/sampling.py, kernels A/B/C) must draw the very tokens the
one-program kernel and torch_ops.sample draw, lowest token id on exact ties, with logprobs
within 1e-5: only the order of its sum of exponentials differs.
"""
from __future__ import annotations

import random

import pytest
import torch

from atom.ops import torch_ops
from atom.ops.metadata import SamplingMetadata

from gpu_helpers import ON_CPU, device, sampling_meta, triton_ops  # noqa: F401 (fixtures)

pytestmark = pytest.mark.gpu

VOCABS = [1000, 32000] + ([] if ON_CPU else [151936])
TEMPS = (0.0, 0.5, 1.0, 1.7)
ATOL = 1e-5


@pytest.fixture
def sampler(triton_ops):
    from atom.ops.triton import sampling
    return sampling


def make_meta(device, temps, raw=None, seeds=None, counters=None) -> SamplingMetadata:
    return sampling_meta(device, len(temps), temps, raw=raw, seeds=seeds, counters=counters)


def check_all_agree(sampler, logits, meta):
    """Split path == one-program kernel == torch reference (tokens exactly, logprobs to ATOL)."""
    split = sampler.sample(logits, meta, split=True)
    whole = sampler.sample(logits, meta, split=False)
    ref = torch_ops.sample(logits, meta)
    assert torch.equal(split.token_ids, ref.token_ids), (split.token_ids, ref.token_ids)
    assert torch.equal(split.token_ids, whole.token_ids), (split.token_ids, whole.token_ids)
    torch.testing.assert_close(split.logprobs, ref.logprobs, atol=ATOL, rtol=0)
    torch.testing.assert_close(split.logprobs, whole.logprobs, atol=ATOL, rtol=0)
    return split


@pytest.mark.parametrize("vocab", VOCABS)
def test_split_matches_one_program_and_torch(sampler, device, vocab):
    gen = torch.Generator(device=device).manual_seed(vocab)
    random.seed(vocab)
    for rows in range(1, 9):
        # Fresh logits per batch size, with an offset so that nothing relies on a zero mean.
        logits = torch.randn(rows, vocab, device=device, generator=gen) * 3 + 5
        temps = [TEMPS[(i + rows) % len(TEMPS)] for i in range(rows)]
        for raw in ([False] * rows, [i % 2 == 0 for i in range(rows)]):
            check_all_agree(sampler, logits, make_meta(device, temps, raw))
        out = check_all_agree(sampler, logits, make_meta(device, [0.0] * rows, [True] * rows))
        assert torch.equal(out.token_ids, logits.argmax(-1))


@pytest.mark.parametrize("vocab", VOCABS)
def test_split_greedy_ties_take_lowest_id(sampler, device, vocab):
    """Many exactly tied maximal logits, spread over chunks: the lowest tied id wins."""
    rng = random.Random(vocab + 1)
    rows = 6
    logits = torch.randn(rows, vocab, device=device) * 2
    expected = []
    for r in range(rows):
        tied = rng.sample(range(vocab), min(40, vocab // 4))
        if vocab > 8192 and r in (1, 4):  # ties at chunk boundaries (chunks of 2048 tokens)
            tied = [2047, 2048, 4095, 8000] if r == 1 else [2048, 2049, 4096, 6143]
        logits[r, tied] = 30.0  # above any of the randn * 2 logits
        expected.append(min(tied))
    temps = [0.0, 0.0, 0.0, 1.0, 0.0, 0.7]  # sampled rows too, so that greedy rows see mx/logsum
    out = check_all_agree(sampler, logits, make_meta(device, temps, [True, False] * 3))
    greedy = [r for r in range(rows) if temps[r] == 0.0]
    assert out.token_ids.cpu()[greedy].tolist() == [expected[r] for r in greedy]
    out = check_all_agree(sampler, logits, make_meta(device, [0.0] * rows))
    assert out.token_ids.cpu().tolist() == expected


@pytest.mark.parametrize("vocab", [v for v in VOCABS if v >= 32000])
def test_split_sampled_ties_take_lowest_id(sampler, device, vocab):
    """Exact ties of logprob + noise: tokens with equal logits and equal 24-bit uniforms."""
    rng = random.Random(vocab + 2)
    rows, temps = 4, [1.0, 0.5, 1.7, 1.0]
    seeds = [rng.getrandbits(63) for _ in range(rows)]
    counters = [rng.randint(0, 1 << 30) for _ in range(rows)]
    meta = make_meta(device, temps, [False, True, False, True], seeds, counters)
    u = torch_ops.uniform_noise(meta.seeds.cpu(), meta.counters.cpu(), vocab)
    logits = torch.randn(rows, vocab) * 2
    expected = []
    for r in range(rows):
        # Groups of token ids whose uniforms are equal (birthday collisions of the 24-bit draws).
        vals, inverse, counts = torch.unique(u[r], return_inverse=True, return_counts=True)
        groups = [torch.nonzero(inverse == g).flatten().tolist()
                  for g in torch.nonzero(counts > 1).flatten()]
        groups = [g for g in groups if g[-1] // 2048 != g[0] // 2048] or groups  # across chunks
        assert groups, "no equal uniforms in this row"
        group = groups[rng.randrange(len(groups))]
        logits[r, group] = 60.0  # beyond any noise: the group's noisy values tie at the top
        expected.append(group[0])
    out = check_all_agree(sampler, logits.to(device), meta)
    assert out.token_ids.cpu().tolist() == expected


def test_split_row_keys_of_extreme_seeds(sampler, device):
    """The kernels compute torch_ops.row_keys themselves: huge seeds and counters, carries too."""
    vocab = 32000
    seeds = [0, 1, (1 << 63) - 1, 0xFFFFFFFF, 123456789012345, 0x61C8864680B583EA]
    counters = [0, (1 << 32) - 1, (7 << 20) + 3, 1 << 31, 5, (1 << 40) + 17]
    logits = torch.randn(len(seeds), vocab, device=device) * 0.1  # the noise decides
    for split in (True, False):
        meta = make_meta(device, [1.0] * len(seeds), seeds=seeds, counters=counters)
        out = sampler.sample(logits, meta, split=split)
        u = torch_ops.uniform_noise(meta.seeds.cpu(), meta.counters.cpu(), vocab)
        ref = (logits.cpu().log_softmax(-1) - torch.log(-torch.log(u))).argmax(-1)
        assert torch.equal(out.token_ids.cpu(), ref)
    check_all_agree(sampler, logits, meta)


def test_split_dead_chunks(sampler, device):
    """Whole chunks at -inf (their partial sums are 0) and a row that is -inf but for one token."""
    vocab, rows = 32000, 4
    logits = torch.randn(rows, vocab, device=device) * 3
    logits[:, 2048:6144] = float("-inf")
    logits[:, vocab - 100:] = float("-inf")
    logits[3] = float("-inf")
    logits[3, 5000] = 1.0
    meta = make_meta(device, [1.0, 0.0, 0.5, 1.3], [True, False, True, True])
    out = check_all_agree(sampler, logits, meta)
    assert out.token_ids[3].item() == 5000 and abs(out.logprobs[3].item()) < ATOL


def test_split_dispatch(sampler):
    assert sampler.use_split(1, 151936) and sampler.use_split(sampler.SPLIT_BELOW_ROWS - 1, 151936)
    assert not sampler.use_split(sampler.SPLIT_BELOW_ROWS, 151936)
    assert not sampler.use_split(0, 151936) and not sampler.use_split(4, 1000)


@pytest.mark.skipif(ON_CPU, reason="CUDA graphs need a GPU")
def test_split_in_cuda_graph(sampler, device):
    """Captured once, replayed on new logits: the same tokens as an eager call."""
    rows, vocab = 4, 151936
    logits = torch.randn(rows, vocab, device=device) * 3
    meta = make_meta(device, [1.0, 0.0, 0.7, 1.3], [True, False, False, True])
    sampler.sample(logits, meta, split=True)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = sampler.sample(logits, meta, split=True)
    for _ in range(3):
        logits.copy_(torch.randn(rows, vocab, device=device) * 3)
        g.replay()
        eager = sampler.sample(logits, meta, split=True)
        assert torch.equal(captured.token_ids, eager.token_ids)
        assert torch.equal(captured.logprobs, eager.logprobs)
