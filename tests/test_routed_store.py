"""atom/engine/routing.py's RoutedStore against a plain reference (a dict of rows per sequence,
the latest write of a position wins, a fork copies its parent's prompt rows when it forks), over
random schedules: prefill chunks (owed rows), decode steps from a reused staging buffer, forks,
recomputes after preemption, aborts, max_tokens=None growth, several slabs, partial drains,
pickling, and outputs read mid-way."""
from __future__ import annotations

import pickle
import random

import numpy as np
import pytest

from atom import SamplingParams
from atom.engine import routing
from atom.engine.routing import RoutedStore, routed_experts
from atom.engine.sequence import Request, Sequence, SeqStatus

L, K = 3, 2


class Reference:
    def __init__(self) -> None:
        self.rows: dict[int, dict[int, np.ndarray]] = {}

    def record(self, seqs, starts, counts, routed) -> None:
        r = 0
        for seq, s, c in zip(seqs, starts, counts):
            if seq.params.return_routed_experts:
                book = self.rows.setdefault(id(seq), {})
                for j in range(c):
                    book[s + j] = routed[r + j].astype(np.int32)
            r += c

    def fork(self, parent, child) -> None:
        self.rows[id(child)] = {p: v for p, v in self.rows[id(parent)].items() if p < child.num_prompt_tokens}

    def output(self, seq):
        if id(seq) not in self.rows:
            return None
        out = np.full((max(len(seq) - 1, 0), L, K), -1, dtype=np.int32)
        for p, v in self.rows[id(seq)].items():
            if p < len(out):
                out[p] = v
        return out


class Sim:
    """Sequences moving through prefill chunks and decode steps, recorded in both books."""

    def __init__(self, rng: random.Random, store: RoutedStore) -> None:
        self.rng, self.store, self.ref = rng, store, Reference()
        self.staging = np.zeros((64, L, K), dtype=np.int16)  # the runner's buffer, rewritten each step
        self.seqs: list[Sequence] = []
        self.pos: dict[int, int] = {}  # next position each sequence computes

    def rows(self, n: int) -> np.ndarray:
        return np.array([[[self.rng.randrange(100) for _ in range(K)] for _ in range(L)] for _ in range(n)],
                        dtype=np.int16)

    def add(self, prompt_len: int, max_tokens, capture: bool = True) -> Sequence:
        p = SamplingParams(max_tokens=max_tokens, ignore_eos=True, return_routed_experts=capture)
        seq = Sequence(Request(len(self.seqs), None, list(range(prompt_len)), p, seed=0), 0, list(range(prompt_len)))
        self.seqs.append(seq)
        self.pos[id(seq)] = 0
        return seq

    def both(self, seqs, starts, counts, routed, owned: bool) -> None:
        self.store.record(seqs, starts, counts, routed, owned)
        self.ref.record(seqs, starts, counts, routed)

    def prefill(self, seq, chunk: int) -> None:
        s = self.pos[id(seq)]
        c = min(chunk, len(seq) - s)
        self.both([seq], [s], [c], self.rows(c), owned=True)  # the execute path's own array
        self.pos[id(seq)] = s + c
        if s + c == len(seq):
            seq.token_ids.append(7)  # sampled

    def decode(self, seqs) -> None:
        starts = [self.pos[id(s)] for s in seqs]
        n = len(seqs)
        self.staging[:n] = self.rows(n)
        self.both(seqs, starts, [1] * n, self.staging[:n], owned=False)
        self.staging[:n] = -5  # the runner reuses the buffer: nothing may still read it
        for seq, s in zip(seqs, starts):
            self.pos[id(seq)] = s + 1
            if seq.status is not SeqStatus.FINISHED:
                seq.token_ids.append(7)
                mt = seq.params.max_tokens
                if mt is not None and seq.num_output_tokens >= mt:
                    seq.status = SeqStatus.FINISHED

    def recompute(self, seq, other) -> None:
        """After a preemption: positions [0, len - 1) again in chunks of 1-5 tokens, next to
        another sequence's 2-token chunk (a 1-token chunk is scattered, the others are owed)."""
        self.pos[id(seq)] = 0
        while self.pos[id(seq)] < len(seq) - 1:
            s = self.pos[id(seq)]
            c = min(self.rng.randrange(1, 6), len(seq) - 1 - s)
            self.both([other, seq], [0, s], [2, c], self.rows(2 + c), owned=True)
            self.pos[id(seq)] = s + c

    def fork(self, parent) -> Sequence:
        child = Sequence(parent.request, 1, parent.token_ids[: parent.num_prompt_tokens])
        child.token_ids.append(9)
        self.store.fork(parent, child)
        self.ref.fork(parent, child)
        self.seqs.append(child)
        self.pos[id(child)] = parent.num_prompt_tokens
        return child

    def check(self, seq) -> np.ndarray | None:
        got, want = routed_experts(seq), self.ref.output(seq)
        if want is None:
            assert got is None
            return None
        assert got is not None and got.dtype == np.int32
        np.testing.assert_array_equal(got, want)
        return got


@pytest.fixture
def small_slabs(monkeypatch):
    """Slabs of a few ranges and short first ranges for max_tokens=None: several slabs per step, growth."""
    monkeypatch.setattr(routing, "_MIN_SLAB_BYTES", 2 * 4 * L * K * 40)
    monkeypatch.setattr(routing, "_UNBOUNDED_ROWS", 3)


@pytest.mark.parametrize("seed", range(6))
def test_store_matches_the_reference_on_random_schedules(small_slabs, seed):
    rng = random.Random(seed)
    sim = Sim(rng, RoutedStore(L, K, max_model_len=200))
    parents = [sim.add(rng.randrange(3, 30), rng.choice([None, 5, 12]), capture=rng.random() < 0.8) for _ in range(6)]
    for seq in parents:  # chunked prefill
        while sim.pos[id(seq)] < len(seq) - 1:
            sim.prefill(seq, rng.randrange(1, 9))
    running = list(parents)
    other = sim.add(4, 1, capture=False)  # shares the recomputes' steps
    for seq in parents:  # the last prompt token through a decode step (a 1-token chunk), then forks
        if seq.params.return_routed_experts and rng.random() < 0.6:
            sim.decode([seq])
            running.append(sim.fork(seq))
        else:
            sim.prefill(seq, 1)
    early = {}
    for step in range(40):
        live = [s for s in running if s.status is not SeqStatus.FINISHED]
        if not live:
            break
        if rng.random() < 0.15:  # preempted and recomputed: its prompt and outputs again, other values
            sim.recompute(rng.choice(live), other)
        batch = live + [s for s in running if s.status is SeqStatus.FINISHED and rng.random() < 0.1]  # late rows
        rng.shuffle(batch)
        sim.decode(batch)
        if rng.random() < 0.5:
            sim.store.drain(rng.choice([0.0, 1.0]))
        if step == 5:  # a running sequence's output mid-way is a copy: later steps leave it alone
            seq = live[0]
            early[id(seq)] = (seq, sim.check(seq), sim.check(seq).copy() if seq.routed else None)
    for seq in running:
        seq.status = SeqStatus.FINISHED
        sim.check(seq)
    for seq, got, snapshot in early.values():
        if got is not None:
            np.testing.assert_array_equal(got, snapshot)


def test_fork_keeps_the_prompt_rows_it_forked_with(small_slabs):
    """A parent recomputed (other routing) before its fork's owed copy: the fork keeps the rows its
    KV came from, the parent gets the new ones."""
    sim = Sim(random.Random(0), RoutedStore(L, K, max_model_len=64))
    parent = sim.add(10, 6)
    sim.prefill(parent, 10)
    child = sim.fork(parent)
    assert child.routed.source is not None  # owed, not copied yet
    sim.pos[id(parent)] = 0
    sim.both([parent], [0], [10], sim.rows(10), owned=True)
    sim.pos[id(parent)] = 10
    sim.decode([parent, child])
    sim.check(child)
    sim.check(parent)


def test_aborted_mid_prompt_and_never_run_positions_are_minus_one():
    sim = Sim(random.Random(1), RoutedStore(L, K, max_model_len=64))
    seq = sim.add(12, 4)
    sim.prefill(seq, 5)
    seq.status = SeqStatus.FINISHED  # aborted: positions 5..10 never ran
    got = sim.check(seq)
    assert (got[5:] == -1).all() and (got[:5] >= 0).all()
    gap = sim.add(12, 4)  # positions 3..5 skipped (none in the engine): -1
    sim.prefill(gap, 3)
    sim.pos[id(gap)] = 6
    sim.decode([gap])
    gap.status = SeqStatus.FINISHED
    assert (sim.check(gap)[3:6] == -1).all()
    never = sim.add(8, 4)  # aborted before any step: nothing recorded
    never.status = SeqStatus.FINISHED
    assert routed_experts(never) is None


def test_finished_output_is_a_view_running_one_a_copy_and_pickling_keeps_the_rows():
    sim = Sim(random.Random(2), RoutedStore(L, K, max_model_len=64))
    seq = sim.add(6, 3)
    sim.prefill(seq, 6)
    running = sim.check(seq)
    assert running.base is None or not np.shares_memory(running, seq.routed.slab)
    sim.decode([seq])
    sim.decode([seq])
    done = sim.check(seq)
    assert seq.status is SeqStatus.FINISHED and np.shares_memory(done, seq.routed.slab)
    back = pickle.loads(pickle.dumps(seq.routed))
    assert len(pickle.dumps(seq.routed)) < 4 * L * K * 64  # its rows, not its slab
    np.testing.assert_array_equal(back.array(len(seq) - 1, copy=False), done)


def test_owed_rows_are_written_by_drain_within_its_budget():
    sim = Sim(random.Random(3), RoutedStore(L, K, max_model_len=64))
    seqs = [sim.add(20, 4) for _ in range(3)]
    for seq in seqs:
        sim.prefill(seq, 20)
    assert all(s.routed.owed for s in seqs)
    sim.store.drain(seconds=0)  # the oldest sequence's rows, at least
    assert [bool(s.routed.owed) for s in seqs] == [False, True, True]
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(seqs[1].routed)).array(20, copy=False),
                                  sim.ref.output(seqs[1])[:20])  # pickling writes owed rows first
    seqs[2].status = SeqStatus.FINISHED
    sim.check(seqs[2])  # so does reading them
    sim.store.drain()
    assert not any(s.routed.owed for s in seqs)
    for seq in seqs:
        seq.status = SeqStatus.FINISHED
        sim.check(seq)


def test_host_benchmark_runs_and_both_bookkeepings_agree(capsys):
    """bench/routing_host.py at a tiny shape: the old chunk bookkeeping and the store return the
    same rows for every completion."""
    import json

    from bench.routing_host import main
    main(["--prompts", "3", "--n", "3", "--prompt-len", "16", "--output-len", "9", "--layers", "2", "--top-k", "2",
          "--prefill-tokens", "32"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["same_rows"] is True and result["after"]["outputs_cpu_s"] >= 0
