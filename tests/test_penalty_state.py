"""The penalty state (atom/engine/penalties.py): per-slot prompt bits and generated-token counts kept
on the device across steps. Every check compares the processed logits with a reference computed
from the sequence's own token history (HF's repetition processor over prompt + generated tokens,
then frequency * count + presence subtracted per generated token, with collections.Counter):
step by step, with the overlapped loop's token in flight, n > 1 forks, preemption, an abort
whose slot a new request takes, a dropped token, and the CPU backend's sparse form against the
reference op."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from atom import SamplingParams
from atom.engine.penalties import PenaltyState, pack_token_sets
from atom.engine.sampler import sampling_metadata
from atom.engine.sequence import Request, Sequence, SeqStatus
from atom.ops.cpu_ops import apply_penalties_sparse
from atom.ops.logits_processing import apply_penalties, process_logits, state_width
from atom.ops.metadata import LogitsProcessing

V = 70  # not a multiple of 8 or 64: the state's padding is exercised
CPU = torch.device("cpu")
PENALTIES = [dict(repetition_penalty=1.4), dict(presence_penalty=0.6, frequency_penalty=0.3),
             dict(repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=1.1), dict()]


def new_seq(i: int, prompt: list[int], n: int = 1, **kw) -> Sequence:
    seq = Sequence(Request(i, None, prompt, SamplingParams(n=n, **kw), seed=i), 0, prompt)
    seq.status = SeqStatus.RUNNING
    return seq


def expected(seq: Sequence, logits_row: torch.Tensor, in_flight: list[int] = ()) -> torch.Tensor:
    """The processed logits from the sequence's tokens alone (+ tokens sampled, not yet appended)."""
    p = seq.params
    outputs = seq.output_token_ids + list(in_flight)
    x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(
        torch.tensor([seq.token_ids[: seq.num_prompt_tokens] + outputs]), logits_row[None].clone())[0]
    for tok, count in Counter(outputs).items():
        x[tok] -= p.frequency_penalty * count + p.presence_penalty
    return x


def processed(state: PenaltyState, rows, logits, lag: int = 0, in_flight=None):
    pen = state.prepare(rows, lag, in_flight)
    meta = sampling_metadata(rows, [1], CPU, lag=lag, penalties=pen)
    return pen, meta, process_logits(logits, meta)


def check(rows, logits, got, in_flight=None):
    for r, (seq, _) in enumerate(rows):
        extra = [] if in_flight is None else [int(in_flight[r])]
        torch.testing.assert_close(got[r], expected(seq, logits[r], extra), atol=1e-5, rtol=0)


def test_state_follows_each_sequence_step_by_step_and_through_the_token_in_flight():
    g = torch.Generator().manual_seed(0)
    seqs = [new_seq(i, torch.randint(2, V, (5 + 3 * i,), generator=g).tolist(), **kw) for i, kw in enumerate(PENALTIES)]
    rows = [(s, 0) for s in seqs]
    state = PenaltyState(8, V, 64, CPU)
    for step in range(8):
        logits = torch.randn(len(rows), V, generator=g) * 3
        pen, meta, got = processed(state, rows, logits)
        check(rows, logits, got)
        # Repeats, prompt tokens and fresh ones; counted on the device before the host appends them.
        tokens = [torch.tensor([s.token_ids[(step + k) % len(s.token_ids)] if step % 3 else 60 + step for s in seqs])
                  for k in range(2)]
        state.count(pen, meta.processing.penalty_slots, tokens[0])
        if step % 2:  # the overlapped loop: the next step samples with these tokens still in flight
            logits = torch.randn(len(rows), V, generator=g)
            pen, meta, got = processed(state, rows, logits, lag=1)
            check(rows, logits, got, in_flight=tokens[0])
            state.count(pen, meta.processing.penalty_slots, tokens[1])
        for k in range(1 + step % 2):
            for s, t in zip(seqs, tokens[k].tolist()):
                s.token_ids.append(t)


def test_fork_rows_read_the_parent_and_each_sample_then_counts_its_own_tokens():
    prompt = [3, 4, 5, 4, 9]
    parent = new_seq(0, prompt, n=3, repetition_penalty=1.5, frequency_penalty=0.7)
    assert parent.fork_pending
    state = PenaltyState(4, V, 64, CPU)
    rows = [(parent, j) for j in range(3)]  # one prefill row of logits, sampled three times
    logits = torch.randn(1, V).repeat(3, 1)
    pen, meta, got = processed(state, rows, logits)
    check(rows, logits, got)
    assert len(set(pen.slots.tolist())) == 1 and pen.write.tolist() == [pen.slots[0], -1, -1]
    state.count(pen, meta.processing.penalty_slots, torch.tensor([7, 4, 7]))
    parent.fork_pending = False
    parent.token_ids.append(7)
    children = []
    for j, tok in ((1, 4), (2, 7)):  # as Scheduler._start_sibling forks them
        child = Sequence(parent.request, j, prompt)
        child.status = SeqStatus.RUNNING
        child.token_ids.append(tok)
        children.append(child)
    rows = [(parent, 0)] + [(c, c.sample_index) for c in children]
    for _ in range(3):
        logits = torch.randn(3, V) * 2
        pen, meta, got = processed(state, rows, logits)
        check(rows, logits, got)
        state.count(pen, meta.processing.penalty_slots, torch.tensor([4, 4, 9]))
        for s in (parent, *children):
            s.token_ids.append(4 if s is not children[1] else 9)
    slots = [state.slot_of(s) for s in (parent, *children)]
    assert len(set(slots)) == 3  # the prompt bits were copied from the parent's slot
    assert all(torch.equal(state.prompt_mask[s], state.prompt_mask[slots[0]]) for s in slots)


def test_preempted_sequence_keeps_its_slot_or_refills_it_and_a_new_request_starts_clean():
    state = PenaltyState(2, V, 64, CPU)
    a = new_seq(0, [2, 3, 4], repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2)
    b = new_seq(1, [5, 6], frequency_penalty=0.9)

    def run(seqs, steps, token):
        rows = [(s, 0) for s in seqs]
        for _ in range(steps):
            logits = torch.randn(len(rows), V) * 2
            pen, meta, got = processed(state, rows, logits)
            check(rows, logits, got)
            state.count(pen, meta.processing.penalty_slots, torch.full((len(rows),), token))
            for s in seqs:
                s.token_ids.append(token)

    run([a, b], 3, token=11)
    slot_a = state.slot_of(a)
    a.status = SeqStatus.WAITING  # preempted: its KV is freed, its tokens stay
    run([b], 2, token=12)
    a.status = SeqStatus.RUNNING  # recomputed: nobody needed its slot, which is still right
    run([a, b], 1, token=13)
    assert state.slot_of(a) == slot_a
    a.status = SeqStatus.WAITING
    c = new_seq(2, [11, 13, 40], repetition_penalty=2.0, frequency_penalty=1.0)  # takes a's slot
    run([b, c], 2, token=14)
    assert state.slot_of(c) == slot_a and state.slot_of(a) is None
    b.status = SeqStatus.FINISHED  # aborted: a, recomputed, takes b's slot from its whole history
    a.status = SeqStatus.RUNNING
    run([a, c], 2, token=11)
    d = new_seq(3, [7], repetition_penalty=1.2, presence_penalty=2.0)
    c.status = SeqStatus.FINISHED
    run([a, d], 1, token=7)
    assert int(state.counts[state.slot_of(d)].sum()) == 1  # nothing of c's tokens left


def test_a_dropped_token_and_a_released_state_are_refilled_from_the_tokens():
    state = PenaltyState(2, V, 64, CPU)
    s = new_seq(0, [2, 3], repetition_penalty=1.5, frequency_penalty=0.4)
    rows = [(s, 0)]
    pen, meta, _ = processed(state, rows, torch.randn(1, V))
    state.count(pen, meta.processing.penalty_slots, torch.tensor([3]))  # counted, never appended
    logits = torch.randn(1, V)
    _, _, got = processed(state, rows, logits)
    check(rows, logits, got)
    state.release()  # sleep; the step after the wake has a token in flight
    s.token_ids += [5, 5]
    flight = torch.tensor([5])
    _, _, got = processed(state, rows, logits, lag=1, in_flight=lambda: flight)
    check(rows, logits, got, in_flight=flight)
    with pytest.raises(RuntimeError, match="in flight"):
        state.release()
        processed(state, rows, logits, lag=1)


def test_more_running_sequences_than_slots_is_an_error():
    state = PenaltyState(1, V, 64, CPU)
    rows = [(new_seq(i, [2, 3], presence_penalty=1.0), 0) for i in range(2)]
    with pytest.raises(RuntimeError, match="slots are held by running sequences"):
        state.prepare(rows)


def test_memory_and_count_width():
    assert PenaltyState.nbytes(1024, 151936, 2048) == 1024 * (151936 * 2 + 151936 // 8)  # 330.6 MB
    assert PenaltyState.nbytes(1024, 151936, 40960) == 1024 * (151936 * 4 + 151936 // 8)
    state = PenaltyState(3, V, 64, CPU)
    state.prepare([(new_seq(0, [2], presence_penalty=1.0), 0)])
    assert state.counts.dtype == torch.int16 and PenaltyState(3, V, 1 << 15, CPU).count_dtype == torch.int32
    assert state.counts.nbytes + state.prompt_mask.nbytes == PenaltyState.nbytes(3, V, 64)


@pytest.mark.parametrize("vocab", [37, 1000, 4099])
@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
def test_cpu_sparse_penalties_equal_the_reference(vocab, dtype):
    g = torch.Generator().manual_seed(vocab)
    rows, slots_n = 9, 12
    logits = torch.randn(rows, vocab, generator=g) * 3
    logits[0, :5] = float("-inf")
    logits[1, :3] = 0.0
    counts = torch.zeros(slots_n, state_width(vocab), dtype=dtype)
    for s in range(slots_n):
        counts[s, :vocab] = torch.randint(0, vocab, (30,), generator=g).bincount(minlength=vocab).to(dtype)
    mask = pack_token_sets([torch.randint(0, vocab, (20,), generator=g).tolist() for _ in range(slots_n)], vocab, CPU)
    slots = torch.randperm(slots_n, generator=g)[:rows]
    slots[::3] = -1
    for rep_on, counted_on in ((True, True), (True, False), (False, True)):
        rep = torch.where(slots >= 0, torch.rand(rows, generator=g) + 0.5, 1.0) if rep_on else torch.ones(rows)
        pres = torch.where(slots >= 0, torch.randn(rows, generator=g), 0.0) if counted_on else torch.zeros(rows)
        freq = torch.where(slots >= 0, torch.randn(rows, generator=g), 0.0) if counted_on else torch.zeros(rows)
        proc = LogitsProcessing(repetition=rep, presence=pres, frequency=freq, penalty_slots=slots, token_counts=counts,
                                prompt_mask=mask, any_repetition=rep_on, any_counted=counted_on)
        ref = apply_penalties(logits, proc)
        assert torch.equal(apply_penalties_sparse(logits, proc), ref)
        assert torch.equal(ref[slots < 0], logits[slots < 0])
    with pytest.raises(ValueError, match="wide"):
        apply_penalties(torch.cat([logits, logits], 1), proc)


def test_prompt_bits_hold_exactly_the_prompt_tokens():
    from atom.ops.logits_processing import unpack_prompt_mask
    g = torch.Generator().manual_seed(3)
    lists = [torch.randint(0, V, (n,), generator=g).tolist() for n in (0, 1, 40, 200)]  # with repeats
    bits = unpack_prompt_mask(pack_token_sets(lists, V, CPU), V)
    want = torch.zeros(len(lists), V, dtype=torch.bool)
    for r, tokens in enumerate(lists):
        want[r, sorted(set(tokens))] = True
    assert torch.equal(bits, want)
    with pytest.raises(ValueError, match="token ids"):
        pack_token_sets([[V]], V, CPU)
