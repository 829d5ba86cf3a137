"""Issue 15 on the triton backend: logits processing (penalties, logit bias, allowed and banned
tokens), the logprobs modes, ranks and whole-vocabulary logprobs give what the torch reference
gives, for the same metadata (the engine's own builder from real sequences).

On the device machine: `python3 -m pytest -m gpu -q tests/gpu/test_sampling_options_gpu.py`;
locally in Triton's interpreter: ATOM_GPU_TESTS_ON_CPU=1 TRITON_INTERPRET=1 (vocab 1000 only)."""
from __future__ import annotations

import random

import pytest
import torch

from atom import SamplingParams
from atom.engine.penalties import PenaltyState
from atom.engine.sampler import sampling_metadata
from atom.engine.sequence import Request, Sequence
from atom.ops import torch_ops
from atom.ops.metadata import SamplingMetadata
from gpu_helpers import ON_CPU, device, triton_ops  # noqa: F401  (fixtures)

pytestmark = pytest.mark.gpu


def mixed_rows(vocab: int, rows: int, seed: int):
    """A batch mixing every option with plain rows."""
    rng = random.Random(seed)
    out = []
    for r in range(rows):
        kind = r % 8
        kw = dict(temperature=[0.0, 1.0, 0.7][r % 3], seed=rng.getrandbits(40), logprobs=[None, 0, 3, -1][r % 4])
        if kind == 1:
            kw.update(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3)
        elif kind == 2:
            kw.update(logit_bias={rng.randrange(vocab): 5.0, rng.randrange(vocab): -3.0})
        elif kind == 3:
            kw.update(allowed_token_ids=rng.sample(range(vocab), 20))
        elif kind == 4:
            kw.update(min_tokens=50, max_tokens=100, stop_token_ids=[rng.randrange(vocab)])
        elif kind == 5:
            kw.update(logprobs_mode=rng.choice(["raw_logprobs", "raw_logits", "processed_logits"]), logprobs=2)
        elif kind == 6:
            kw.update(repetition_penalty=0.8, logprobs_mode="raw", logprobs=1)
        p = SamplingParams(**kw)
        if kind == 7:
            p.bad_words_token_ids = [[rng.randrange(vocab)], [5, rng.randrange(vocab)]]
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(3, 40))]
        generated = [rng.randrange(2, vocab) for _ in range(rng.randint(0, 30))] + [5]
        seq = Sequence(Request(r, None, prompt, p, seed=rng.getrandbits(40)), 0, prompt + generated)
        seq.fork_pending = False
        out.append((seq, 0))
    return out


def to_cpu(meta: SamplingMetadata) -> SamplingMetadata:
    fields = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in vars(meta).items()}
    if meta.processing is not None:
        fields["processing"] = meta.processing.to("cpu")
    return SamplingMetadata(**fields)


@pytest.mark.parametrize("vocab", [1000] if ON_CPU else [1000, 151936])
def test_processed_sampling_matches_torch(triton_ops, device, vocab):  # noqa: F811
    torch.manual_seed(vocab)
    rows = mixed_rows(vocab, 24, seed=vocab)
    logits = torch.randn(len(rows), vocab, device=device) * 3
    pen = PenaltyState(len(rows), vocab, 1024, device).prepare(rows)
    meta = sampling_metadata(rows, [1], device, penalties=pen)
    assert meta.processing is not None and meta.banned_rows is not None and meta.any_logits
    out = triton_ops("sample")["triton"](logits, meta)
    ref = torch_ops.sample(logits.cpu(), to_cpu(meta))
    assert torch.equal(out.token_ids.cpu(), ref.token_ids)
    torch.testing.assert_close(out.logprobs.cpu(), ref.logprobs, atol=5e-5, rtol=0)
    assert torch.equal(out.ranks.cpu(), ref.ranks)
    assert out.top_ids.shape == ref.top_ids.shape == (len(rows), vocab)  # a row asked for -1
    torch.testing.assert_close(out.top_logprobs.cpu(), ref.top_logprobs, atol=5e-5, rtol=0)


def test_in_flight_tokens_count_for_the_penalties(device):  # noqa: F811
    """The overlapped decode counts each sampled token into the penalty state on the device before
    the host appends it: the next step (lag 1) reads the same state as a step built after the
    append (here, a fresh state filled from the host's tokens)."""
    vocab = 300
    rows = [r for r in mixed_rows(vocab, 16, seed=3) if r[0].params.penalized]
    state = PenaltyState(len(rows), vocab, 1024, device)
    pen = state.prepare(rows)
    flight = torch.arange(len(rows), device=device) + 7
    state.count(pen, torch.as_tensor(pen.slots, device=device), flight)  # what the step after sampling does
    meta = sampling_metadata(rows, [1], device, lag=1, penalties=state.prepare(rows, lag=1))
    for (seq, _), tok in zip(rows, flight.tolist()):
        seq.token_ids.append(tok)
    fresh = [(seq, j) for seq, j in rows]
    for seq, _ in fresh:
        seq.penalty_slot = None
    want = sampling_metadata(fresh, [1], device, penalties=PenaltyState(len(rows), vocab, 1024, device).prepare(fresh))
    logits = torch.randn(len(rows), vocab, device=device)
    a, b = torch_ops.sample(logits, meta), torch_ops.sample(logits, want)
    assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.token_ids, b.token_ids)
