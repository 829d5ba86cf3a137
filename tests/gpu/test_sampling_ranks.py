"""The sampled token's rank (vLLM's Logprob.rank) counted inside the Triton sampler, both paths.

A rank is how many tokens have a value >= the sampled token's, over the logits / temperature
(raw-logprob rows: the logits). The one-program kernel counts in a third pass over the row, the
split path in a fourth launch (a count per chunk); both must equal the definition computed here
in torch (exactly: ties created by quantised logits count as better, temperatures such as 0.7
make the division round) and torch_ops.sample's ranks, without the torch token_ranks pass running.
Raw rows whose logits were processed (a bias) keep the torch pass: the kernel sees only the
processed logits.
"""
from __future__ import annotations

import pytest
import torch

from atom.ops import torch_ops
from atom.ops.metadata import LogitsProcessing

from gpu_helpers import ON_CPU, device, sampling_meta, triton_ops  # noqa: F401 (fixtures)

pytestmark = pytest.mark.gpu

VOCABS = [1000, 20000] + ([] if ON_CPU else [151936, 201088])
TEMPS = (0.0, 0.7, 1.0, 1.3)


@pytest.fixture
def sampler(triton_ops):  # noqa: F811
    from atom.ops.triton import sampling
    return sampling


def definition(logits: torch.Tensor, temps: list[float], raw: list[bool], tokens: torch.Tensor) -> torch.Tensor:
    """count(value >= value of the sampled token) per row, value = logits (raw rows) or logits /
    temperature (1 for greedy rows), in float32 as torch divides."""
    out = []
    for r, (t, is_raw) in enumerate(zip(temps, raw)):
        row = logits[r].float().cpu()
        basis = row if is_raw else row / torch.tensor(t if t > 0 else 1.0)
        out.append(int((basis >= basis[int(tokens[r])]).sum()))
    return torch.tensor(out)


def quantised_logits(rows: int, vocab: int, gen: torch.Generator, device) -> torch.Tensor:
    """Logits on a 1/8 grid with an offset: many exact ties, also at the sampled token."""
    return ((torch.randn(rows, vocab, device=device, generator=gen) * 2 + 3) * 8).round() / 8


@pytest.mark.parametrize("split", [False, True], ids=["one-program", "split"])
@pytest.mark.parametrize("vocab", VOCABS)
def test_kernel_ranks_match_the_definition_and_torch(sampler, device, monkeypatch, vocab, split):
    gen = torch.Generator(device=device).manual_seed(vocab + split)

    def no_torch_ranks(*a, **k):
        raise AssertionError("token_ranks ran: the kernel should have counted")
    monkeypatch.setattr(sampler, "token_ranks", no_torch_ranks)
    for rows in (1, 3, 8):
        temps = [TEMPS[(i + rows) % len(TEMPS)] for i in range(rows)]
        for raw in ([False] * rows, [i % 2 == 1 for i in range(rows)]):
            for logits in (quantised_logits(rows, vocab, gen, device),
                           torch.randn(rows, vocab, device=device, generator=gen) * 3 + 5):
                meta = sampling_meta(device, rows, temps, raw=raw)
                meta.want_ranks = True
                out = sampler.sample(logits, meta, split=split)
                assert out.ranks is not None and out.ranks.dtype == torch.int64
                want = definition(logits, temps, raw, out.token_ids)
                assert torch.equal(out.ranks.cpu(), want), (out.ranks.cpu(), want)
                assert (out.ranks >= 1).all()
                ref = torch_ops.sample(logits.cpu(), _to_cpu(meta))
                assert torch.equal(out.token_ids.cpu(), ref.token_ids)
                assert torch.equal(out.ranks.cpu(), ref.ranks)
    # Greedy rows on unquantised logits: the arg-max, rank 1.
    logits = torch.randn(4, vocab, device=device, generator=gen)
    meta = sampling_meta(device, 4, [0.0] * 4)
    meta.want_ranks = True
    assert torch.equal(sampler.sample(logits, meta, split=split).ranks.cpu(), torch.ones(4, dtype=torch.int64))


def test_raw_rows_of_processed_logits_rank_over_the_raw_logits(sampler, device):
    """A logit bias moves a token up in the processed values; a raw-logprob row still ranks it
    among the unprocessed logits (the torch pass), a processed row among the biased ones."""
    vocab, rows = 1000, 2
    gen = torch.Generator(device=device).manual_seed(3)
    logits = torch.randn(rows, vocab, device=device, generator=gen)
    weakest = logits.argmin(-1)
    meta = sampling_meta(device, rows, [0.0, 0.0], raw=[True, False])
    meta.want_ranks = True
    meta.processing = LogitsProcessing(
        bias_rows=torch.arange(rows, device=device), bias_tokens=weakest,
        bias_values=torch.full((rows,), 100.0, device=device))
    out = sampler.sample(logits, meta)
    assert torch.equal(out.token_ids, weakest)  # greedy picks the biased token
    assert out.ranks.tolist() == [vocab, 1]  # raw: the lowest logit of all; processed: the best


def _to_cpu(meta):
    from atom.ops.metadata import SamplingMetadata
    fields = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in vars(meta).items()}
    if meta.processing is not None:
        fields["processing"] = meta.processing.to("cpu")
    return SamplingMetadata(**fields)


@pytest.mark.parametrize("split", [False, True], ids=["one-program", "split"])
@pytest.mark.parametrize("k", [0, 3])
def test_low_precision_logits_sample_as_their_float32_copy(sampler, device, monkeypatch, split, k):
    """The kernels read bf16 / fp16 logits directly (a load widens them to the float32 a copy
    would hold): tokens, ranks and top-k ids are those of the float32 copy, logprobs (processed
    and raw) within a few float32 ulps (on the GPU the compiler lays a 2-byte row out across the
    threads differently from a 4-byte one, so the row's sum of exponentials is added in another
    order; seen on the H200: last-bit differences), and no float32 copy of the whole logits is
    made on the way."""
    dtype = torch.float16 if ON_CPU else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(11 + split + k)
    rows, vocab = 6, 20000
    temps = [TEMPS[i % len(TEMPS)] for i in range(rows)]
    raw = [i % 3 == 1 for i in range(rows)]
    seeds, counters = [i * 7919 + 1 for i in range(rows)], [i * 31 for i in range(rows)]
    low = (torch.randn(rows, vocab, device=device, generator=gen) * 3 + 5).to(dtype)

    def run(logits):
        meta = sampling_meta(device, rows, temps, k=k, raw=raw, seeds=seeds, counters=counters)
        meta.want_ranks = True
        return sampler.sample(logits, meta, split=split)
    want = run(low.float())
    widened = []
    real_float = torch.Tensor.float

    def spy(t):
        widened.append(t.shape)
        return real_float(t)
    monkeypatch.setattr(torch.Tensor, "float", spy)
    got = run(low)
    monkeypatch.undo()
    for name in ("token_ids", "ranks", "top_ids"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for name in ("logprobs", "top_logprobs"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=1e-5, msg=name)
    assert widened.count(tuple(low.shape)) == (1 if k else 0)  # only _report's top-k path widens
