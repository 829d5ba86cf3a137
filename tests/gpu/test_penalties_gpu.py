"""The fused penalty kernel (atom/ops/triton/penalties.py) against the torch reference
(logits_processing.apply_penalties), bit for bit, on fresh random states: int16 and int32 counts,
rows without a slot, -inf and zero logits, each penalty alone and all together; and the engine's
penalty state driven through the triton sampler for a few steps against the same steps on CPU.

On the device machine: `python3 -m pytest -m gpu -q tests/gpu/test_penalties_gpu.py`; locally in
Triton's interpreter: ATOM_GPU_TESTS_ON_CPU=1 TRITON_INTERPRET=1 (small vocabularies only)."""
from __future__ import annotations

import functools
import random

import pytest
import torch

from atom import SamplingParams
from atom.engine.penalties import PenaltyState, pack_token_sets
from atom.engine.sampler import sampling_metadata
from atom.engine.sequence import Request, Sequence, SeqStatus
from atom.ops import torch_ops
from atom.ops.logits_processing import apply_penalties as reference
from atom.ops.logits_processing import state_width
from atom.ops.metadata import LogitsProcessing
from gpu_helpers import ON_CPU, device, triton_ops  # noqa: F401  (fixtures)

pytestmark = pytest.mark.gpu


def random_state(device, rows: int, slots_n: int, vocab: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 4
    logits[0, : vocab // 3] = float("-inf")
    logits[1, ::7] = 0.0
    counts = torch.zeros(slots_n, state_width(vocab), dtype=dtype)
    for s in range(slots_n):
        n = int(torch.randint(0, 400, (1,), generator=g))
        counts[s, :vocab] = torch.randint(0, vocab, (n,), generator=g).bincount(minlength=vocab).to(dtype)
    prompts = [torch.randint(0, vocab, (int(torch.randint(1, 300, (1,), generator=g)),), generator=g).tolist()
               for _ in range(slots_n)]
    mask = pack_token_sets(prompts, vocab, torch.device("cpu"))
    slots = torch.randperm(slots_n, generator=g)[:rows]
    slots[1::4] = -1
    on = slots >= 0
    rep = torch.where(on, torch.rand(rows, generator=g) * 1.5 + 0.5, 1.0)
    pres = torch.where(on, torch.rand(rows, generator=g) * 4 - 2, 0.0)
    freq = torch.where(on, torch.rand(rows, generator=g) * 4 - 2, 0.0)
    to = {"device": device}
    return (logits.to(**to), slots.to(**to), rep.to(**to), pres.to(**to), freq.to(**to), counts.to(**to),
            mask.to(**to))


@pytest.mark.parametrize("vocab", [37, 1000] if ON_CPU else [37, 1000, 151936])
@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("flags", [(True, True), (True, False), (False, True)])
def test_penalty_kernel_equals_the_reference(triton_ops, device, vocab, dtype, flags):  # noqa: F811
    from atom.ops.triton.penalties import apply_penalties
    rows = 6 if ON_CPU else 64
    logits, slots, rep, pres, freq, counts, mask = random_state(device, rows, rows + 5, vocab, dtype, seed=vocab)
    rep_on, counted_on = flags
    proc = LogitsProcessing(
        repetition=rep if rep_on else torch.ones_like(rep), presence=pres if counted_on else torch.zeros_like(pres),
        frequency=freq if counted_on else torch.zeros_like(freq), penalty_slots=slots, token_counts=counts,
        prompt_mask=mask, any_repetition=rep_on, any_counted=counted_on)
    got = apply_penalties(logits, proc)
    want = reference(logits, proc)
    assert got.dtype == torch.float32 and got.shape == logits.shape
    assert torch.equal(got, want)
    assert torch.equal(got[slots < 0], logits[slots < 0])
    assert not torch.equal(got[slots >= 0], logits[slots >= 0])  # the penalties did something
    # A strided view of the logits (every other row) reads the same numbers.
    wide = torch.stack([logits, torch.zeros_like(logits)], 1).view(-1, vocab)[::2]
    assert torch.equal(apply_penalties(wide, proc), want)


def test_penalty_state_through_the_triton_sampler_matches_cpu(triton_ops, device):  # noqa: F811
    """Decode steps with state on the device and on the CPU: same tokens, same logprobs."""
    vocab = 300
    runs = []
    for dev in (device, torch.device("cpu")):
        seqs = []
        for i in range(6):
            kw = [dict(repetition_penalty=1.3, presence_penalty=0.5), dict(frequency_penalty=0.8),
                  dict(repetition_penalty=0.7, frequency_penalty=-0.4), dict()][i % 4]
            p = SamplingParams(temperature=[0.0, 1.0][i % 2], seed=i, logprobs=0, **kw)
            prompt = [random.Random(i).randrange(2, vocab) for _ in range(12)]
            seq = Sequence(Request(i, None, prompt, p, seed=100 + i), 0, prompt)
            seq.status = SeqStatus.RUNNING
            seqs.append(seq)
        state = PenaltyState(8, vocab, 256, dev)
        sample = torch_ops.sample if runs else triton_ops("sample")["triton"]
        if ON_CPU and not runs:  # the interpreter runs the split kernels (not the one-program one)
            sample = functools.partial(sample, split=True)
        g = torch.Generator().manual_seed(1)
        out = []
        for _ in range(12):
            rows = [(s, 0) for s in seqs]
            logits = (torch.randn(len(rows), vocab, generator=g) * 2).to(dev)
            pen = state.prepare(rows)
            meta = sampling_metadata(rows, [1], dev, penalties=pen)
            res = sample(logits, meta)
            state.count(pen, meta.processing.penalty_slots, res.token_ids)
            for s, t in zip(seqs, res.token_ids.tolist()):
                s.token_ids.append(t)
            out.append((res.token_ids.cpu(), res.logprobs.cpu()))
        runs.append(out)
    for (ta, la), (tb, lb) in zip(*runs):
        assert torch.equal(ta, tb)
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=0)
