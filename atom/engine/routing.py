"""Routed experts kept on the host (EngineConfig.enable_return_routed_experts).

Each sequence owns a range of rows in one of a few large int32 slabs, laid out as
Completion.routed_experts ([positions, moe_layers * top_k]); a finished sequence's routed_experts
is a view of its range: nothing is assembled or copied when a request finishes (at the end of a
batch call all of them finish at once, where the old per-step chunks took seconds to assemble).

What a step costs the host:
* a decode step (one row per sequence, a view of the runner's pinned staging buffer, reused two
  steps later) goes into the ranges with one vectorised scatter per slab: no numpy call per
  sequence;
* a prefill chunk's rows (an array the step owns) are owed, not copied, and a forked sample owes
  the parent's prompt rows: `drain` writes owed rows for a few ms from the overlapped decode
  loop, while the GPU runs the next step; anything that reads or rewrites owed rows
  writes them first (`RoutedRows.settle`).
Writing rows is mostly first-touch page faults (slabs are anonymous mappings: the OS commits pages
as they are written, in 4 KiB pages, so a range is sized for the sequence's max_tokens up front);
that is why the fork and prompt copies are moved off the critical path rather than done at once.
Ranges are never reused (a returned view may still read one); a slab is freed when the last
sequence and view using it are gone.
"""
from __future__ import annotations

import mmap
import time
from collections import deque

import numpy as np

from atom.engine.sequence import SeqStatus

_MIN_SLAB_BYTES = 256 << 20  # slabs are address space until written: they may be large
_MAX_SLAB_BYTES = 4 << 30
_UNBOUNDED_ROWS = 1024     # first range beyond the current length when max_tokens is None (grows)
_DRAIN_SECONDS = 0.004     # writing owed rows per overlapped decode step (the GPU's step: ~30 ms)
_SNO_SHIFT = 40            # addr = slab serial number << 40 | base row


class RoutedRows:
    """One sequence's routing: rows [base, base + cap) of `slab` ([rows, layers * top_k] int32)
    hold its positions [0, cap). Positions [0, filled) are recorded (written or owed) or -1
    (never run). Owed: `source` (a fork's first n rows, to copy from its parent), then `owed`
    ((position, rows) chunks of arrays nobody writes to), written in that order by `settle`."""

    __slots__ = ("slab", "addr", "base", "cap", "filled", "shape", "owed", "owed_end", "source", "forks")

    def __init__(self, slab: np.ndarray, sno: int, base: int, cap: int, shape: tuple[int, int]) -> None:
        self.shape = shape
        self.place(slab, sno, base, cap)
        self.filled = 0
        self.owed: list[tuple[int, np.ndarray]] = []
        self.owed_end = 0      # owed rows lie below this position
        self.source: tuple[RoutedRows, int] | None = None
        self.forks: list[RoutedRows] = []  # forks whose source is this one, not yet copied

    def place(self, slab: np.ndarray, sno: int, base: int, cap: int) -> None:
        self.slab, self.base, self.cap = slab, base, cap
        self.addr = (sno << _SNO_SHIFT) | base

    def settle(self) -> int:
        """Write every owed row; returns how many."""
        done = 0
        if self.source is not None:
            parent, n = self.source
            self.source = None
            parent.forks.remove(self)
            parent.settle()
            self.slab[self.base: self.base + n] = parent.slab[parent.base: parent.base + n]
            done += n
        for pos, rows in self.owed:
            self.slab[self.base + pos: self.base + pos + len(rows)] = rows
            done += len(rows)
        self.owed, self.owed_end = [], 0
        return done

    def before_rewrite(self) -> None:
        """Rows of this one are about to change: forks copying them copy them first."""
        while self.forks:
            self.forks[0].settle()

    def array(self, n: int, copy: bool) -> np.ndarray:
        """Positions [0, n) as [n, layers, top_k] int32, -1 where none was recorded; a view of the
        slab unless `copy` (a running sequence's rows may still be rewritten by a recompute)."""
        self.settle()
        if n > self.cap:  # more than its range ever held (positions never run): a new array
            out = np.full((n, *self.shape), -1, dtype=np.int32)
            out[: self.filled] = self.array(self.filled, copy=False)
            return out
        if n > self.filled:  # positions never run (e.g. aborted mid-prompt)
            self.slab[self.base + self.filled: self.base + n] = -1
            self.filled = n
        rows = self.slab[self.base: self.base + n].reshape(n, *self.shape)
        return rows.copy() if copy else rows

    def __reduce__(self):
        """Pickled (engine groups send sequences to rank 0) as its recorded rows alone."""
        self.settle()
        return _standalone, (self.slab[self.base: self.base + self.filled].copy(), self.shape)


def _fresh_rows(rows: int, width: int) -> np.ndarray:
    """An uninitialised [rows, width] int32 array whose memory the OS commits in 4 KiB pages as
    it is written. (np.empty asks for transparent huge pages on large arrays, and the first write
    into a 2 MiB page zeroes all of it: a decode step writing one row into each of 512 ranges
    would zero 1 GiB at once, seconds on a VM, instead of ~0.8 MB a step.)"""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    buf = mmap.mmap(-1, rows * width * 4, flags=flags)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype=np.int32).reshape(rows, width)


def _standalone(rows: np.ndarray, shape: tuple[int, int]) -> RoutedRows:
    out = RoutedRows(rows, 0, 0, len(rows), shape)
    out.filled = len(rows)
    return out


class RoutedStore:
    """The engine's routed-expert rows: per-sequence ranges of int32 slabs (see the module doc)."""

    def __init__(self, layers: int, top_k: int, max_model_len: int) -> None:
        self.shape = (layers, top_k)
        self.width = layers * top_k
        self.max_model_len = max_model_len
        self._slab: np.ndarray | None = None
        self._sno = 0          # serial number of the current slab (rows are scattered per slab)
        self._top = 0          # first free row of the current slab
        self._slab_bytes = _MIN_SLAB_BYTES // 2
        self._owing: deque[RoutedRows] = deque()  # ranges with owed rows, oldest first

    # ---- ranges ------------------------------------------------------------------------------
    def _take(self, rows: int) -> tuple[np.ndarray, int, int]:
        """(slab, its serial number, first row) of `rows` fresh rows."""
        if self._slab is None or self._top + rows > len(self._slab):
            # Each slab twice the last (up to 4 GiB): a batch's sequences land in a few slabs.
            self._slab_bytes = min(_MAX_SLAB_BYTES, 2 * self._slab_bytes)
            self._slab = _fresh_rows(max(rows, self._slab_bytes // (4 * self.width)), self.width)
            self._sno += 1
            self._top = 0
        base = self._top
        self._top += rows
        return self._slab, self._sno, base

    def open(self, seq) -> RoutedRows:
        """Give `seq` a range sized for its longest possible length (max_tokens)."""
        p = seq.params
        left = p.max_tokens - seq.num_output_tokens if p.max_tokens is not None else _UNBOUNDED_ROWS
        cap = max(1, min(len(seq) + max(left, 1), self.max_model_len))
        seq.routed = RoutedRows(*self._take(cap), cap, self.shape)
        return seq.routed

    def fork(self, parent, child) -> None:
        """A sample forked off `parent`'s prompt owes the prompt's rows (copied by `drain`)."""
        src = parent.routed
        h = self.open(child)
        n = min(src.filled, child.num_prompt_tokens, h.cap)
        if n:
            h.source, h.owed_end, h.filled = (src, n), n, n
            src.forks.append(h)
            self._owing.append(h)

    def _grow(self, h: RoutedRows, need: int) -> None:
        """Move `h` to a range of at least `need` rows (max_tokens=None outgrew its first range)."""
        cap = max(need, min(2 * h.cap, self.max_model_len))
        slab, sno, base = self._take(cap)
        slab[base: base + h.filled] = h.slab[h.base: h.base + h.filled]  # owed rows land later, here
        h.place(slab, sno, base, cap)

    def drain(self, seconds: float = _DRAIN_SECONDS) -> None:
        """Write owed rows, oldest first, for about `seconds` (at least one sequence's): the
        overlapped loop calls this while the device runs the next step. A time budget, since
        what writing costs (mostly mapping fresh pages) differs by an order of magnitude between
        hosts."""
        end = time.perf_counter() + seconds
        while self._owing:
            if self._owing.popleft().settle() and time.perf_counter() >= end:
                return

    # ---- one step ----------------------------------------------------------------------------
    def record(self, seqs: list, starts: list[int], counts: list[int], routed: np.ndarray,
               owned: bool = False) -> None:
        """Rows [sum(counts[:i]), + counts[i]) of routed ([tokens, layers, top_k]) are positions
        [starts[i], + counts[i]) of seqs[i]; kept for the sequences that capture (a recomputed
        position's later rows win). owned: nobody writes to `routed` later (its multi-row chunks
        are owed, not copied now)."""
        hs = [s.routed for s in seqs]
        if None in hs:
            hs = [h if h is not None or not s.params.return_routed_experts else self.open(s) for s, h in zip(seqs, hs)]
        src = routed.reshape(len(routed), self.width)
        if len(src) == len(hs):  # one row each (a decode step)
            self._scatter(hs, starts, src)
            return
        first = np.cumsum(counts) - np.asarray(counts)
        single = []
        for i, (h, s, c, r) in enumerate(zip(hs, starts, counts, first.tolist())):
            if c == 1:
                single.append(i)
            elif h is not None:
                self._prepare(h, s, s + c)
                if owned:
                    h.owed.append((s, src[r: r + c]))
                    h.owed_end = max(h.owed_end, s + c)
                    self._owing.append(h)
                else:
                    h.slab[h.base + s: h.base + s + c] = src[r: r + c]
        if single:
            self._scatter([hs[i] for i in single], [starts[i] for i in single], src[first[single]])

    def _prepare(self, h: RoutedRows, start: int, end: int) -> None:
        """Before positions [start, end) of `h` are written: room, order, gaps, `filled`."""
        if end > h.cap:
            self._grow(h, end)
        if start < h.owed_end:  # older owed rows there land first
            h.settle()
        if start < h.filled:  # a recompute
            h.before_rewrite()
        elif start > h.filled:  # positions never run in between (none in practice)
            h.slab[h.base + h.filled: h.base + start] = -1
        h.filled = max(h.filled, end)

    def _scatter(self, hs: list, starts: list[int], src: np.ndarray) -> None:
        """src[i] is position starts[i] of hs[i] (None: not kept): one scatter per slab."""
        if None in hs:
            keep = [i for i, h in enumerate(hs) if h is not None]
            if not keep:
                return
            hs, starts, src = [hs[i] for i in keep], [starts[i] for i in keep], src[keep]
        for h, s in zip(hs, starts):
            if s != h.filled or s >= h.cap:  # (s == filled: no owed rows there, filled >= owed_end)
                self._prepare(h, s, s + 1)  # a recompute, a gap, or no room
            else:
                h.filled = s + 1
        src = src.astype(np.int32)  # (a fancy assignment that casts is ~20x slower)
        addr = np.fromiter((h.addr for h in hs), dtype=np.int64, count=len(hs))
        sno = addr >> _SNO_SHIFT
        dest = (addr & ((1 << _SNO_SHIFT) - 1)) + np.asarray(starts, dtype=np.int64)
        if sno.min() == sno.max():  # one slab
            hs[0].slab[dest] = src
            return
        numbers, first = np.unique(sno, return_index=True)
        for s, i in zip(numbers, first.tolist()):
            rows = sno == s
            hs[i].slab[dest[rows]] = src[rows]


def routed_experts(seq) -> np.ndarray | None:
    """Completion.routed_experts of `seq`: [positions, moe_layers, top_k] int32 of positions
    [0, len - 1) (the last token was never run), -1 where none were recorded; None when it does
    not capture. A view of the store when the sequence is finished, else a copy."""
    h = seq.routed
    if h is None:
        return None
    return h.array(max(len(seq) - 1, 0), copy=seq.status is not SeqStatus.FINISHED)
