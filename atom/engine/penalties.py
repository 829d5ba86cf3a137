"""Device state of the repetition / presence / frequency penalties, kept across steps.

Per sequence slot (one row per sequence that may sample at once: EngineConfig.max_num_seqs):
  counts       [slots, width] int16 (int32 when max_model_len > 32767): how often the sequence
               generated each token;
  prompt_mask  [slots, width / 8] uint8: bit t % 8 of byte t // 8 is set when token t is in the
               prompt;
  width: the vocabulary rounded up to a multiple of 64 (the padding stays 0; whole 8-byte words
  per row let the CPU backend scan rows a word at a time).
A slot is filled from the sequence's tokens when it first samples (its prompt, and its generated
tokens: none for a new sequence, all of them for one recomputed after preemption), then grows by
one `index_put_` of the sampled tokens after every sampling step, on the device, so that the
overlapped decode loop's token still in flight is already counted when the next step samples.
Nothing per step is proportional to the history; the penalty op reads the slots (one fused pass
over [rows, vocab] on the triton backend: atom/ops/triton/penalties.py).

Memory, allocated at the first penalized request and kept until `release` (sleep): at
max_num_seqs 1024 and vocabulary 151,936, 311.2 MB of int16 counts + 19.4 MB of prompt bits =
330.6 MB (641.8 MB of counts with int32); `nbytes` computes it.

Slots belong to sequences lazily: the host knows, per slot, its owner and how many generated
tokens the device rows hold. A sampling row whose sequence has no slot, or whose slot's count
differs from what the sequence should have (its tokens + the one in flight), gets the slot
refilled from its tokens: preemption with recompute, a fork's sibling sampling for the first
time, a slot taken over after an abort, a step whose tokens were dropped, all take this one path.
Slots of sequences no longer running are reclaimed when a new sequence needs one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from atom.engine.sequence import Sequence, SeqStatus
from atom.ops.logits_processing import state_width

_INT16_MAX = 32767


@dataclass
class PenaltyRows:
    """The penalty inputs of one sampling step, per logits row, on the host.

    slots: int64 [B] state row the logits row reads (-1: the row has no penalty; it then carries
        repetition 1, presence 0, frequency 0).
    write: int64 [B] state row the row's sampled token is counted in (-1: none; differs from
        `slots` only for the n first tokens of a forking prefill, which all read the parent's
        slot while only the parent's own sample is the parent's token).
    any_repetition / any_counted: whether some row has a repetition / a presence or frequency penalty.
    counts / prompt_mask: the state's tensors (PenaltyState), which the penalty op reads.
    """

    slots: np.ndarray
    write: np.ndarray
    repetition: np.ndarray
    presence: np.ndarray
    frequency: np.ndarray
    any_repetition: bool
    any_counted: bool
    counts: torch.Tensor
    prompt_mask: torch.Tensor

    @property
    def write_is_read(self) -> bool:
        return bool(np.array_equal(self.slots, self.write))


@dataclass
class _Refill:
    slot: int
    seq: Sequence
    num_host: int      # generated tokens on the host to count
    row: int           # logits row (for the token in flight)
    new_owner: bool    # the slot changes hands: its prompt bits are rewritten too


class PenaltyState:
    """Per-slot prompt bits and generated-token counts on `device` (see the module docstring)."""

    def __init__(self, capacity: int, vocab: int, max_model_len: int, device: torch.device) -> None:
        self.capacity, self.vocab, self.device = capacity, vocab, torch.device(device)
        self.width = state_width(vocab)
        self.count_dtype = torch.int16 if max_model_len <= _INT16_MAX else torch.int32
        self.counts: torch.Tensor | None = None
        self.prompt_mask: torch.Tensor | None = None
        self._reset()

    @staticmethod
    def nbytes(capacity: int, vocab: int, max_model_len: int) -> int:
        """Device bytes of the state for these sizes."""
        per_count = 2 if max_model_len <= _INT16_MAX else 4
        width = state_width(vocab)
        return capacity * (width * per_count + width // 8)

    def _reset(self) -> None:
        self._owner: list[Sequence | None] = [None] * self.capacity
        self._counted = [0] * self.capacity  # generated tokens the device row holds
        self._free = list(range(self.capacity - 1, -1, -1))
        self._prompt_of: dict[int, int] = {}  # id(request) -> a slot holding its prompt bits

    def release(self) -> None:
        """Free the device tensors (sleep); every sequence refills its slot when it samples again."""
        self.counts = self.prompt_mask = None
        self._reset()

    def _allocate(self) -> None:
        if self.counts is None:
            self.counts = torch.zeros(self.capacity, self.width, dtype=self.count_dtype, device=self.device)
            self.prompt_mask = torch.zeros(self.capacity, self.width // 8, dtype=torch.uint8, device=self.device)

    # ---- a step --------------------------------------------------------------------------
    def prepare(self, rows: list[tuple[Sequence, int]], lag: int = 0,
                in_flight: Callable[[], torch.Tensor] | None = None) -> PenaltyRows | None:
        """The step's PenaltyRows (None when no row is penalized), after queueing the refills of
        slots that do not hold their sequence's tokens. rows: (sequence, sample index) per logits
        row. lag: tokens each sequence has in flight (sampled by the step before, not yet
        appended; already counted on the device); in_flight() gives them per row, on the device,
        should a slot need refilling then."""
        if not any(seq.params.penalized for seq, _ in rows):  # the common case: one cheap scan
            return None
        penalized = [r for r, (seq, _) in enumerate(rows) if seq.params.penalized]
        self._allocate()
        n = len(rows)
        slots, write, rep, pres, freq = [-1] * n, [-1] * n, [1.0] * n, [0.0] * n, [0.0] * n
        owned = {id(seq): seq.penalty_slot for seq in (rows[r][0] for r in penalized) if self._owns(seq)}
        busy = set(owned.values())
        refills: list[_Refill] = []
        checked: set[int] = set()
        for r in penalized:
            seq, sample_index = rows[r]
            if id(seq) not in checked:  # once per sequence (a forking prefill has n rows of one)
                checked.add(id(seq))
                slot, want = owned.get(id(seq)), seq.num_output_tokens + lag
                if slot is None:
                    slot = owned[id(seq)] = self._take(seq, busy)
                    refills.append(_Refill(slot, seq, seq.num_output_tokens, r, new_owner=True))
                elif self._counted[slot] != want:
                    refills.append(_Refill(slot, seq, seq.num_output_tokens, r, new_owner=False))
                self._counted[slot] = want
            slot = owned[id(seq)]
            p = seq.params
            slots[r] = slot
            rep[r], pres[r], freq[r] = p.repetition_penalty, p.presence_penalty, p.frequency_penalty
            if sample_index == seq.sample_index:  # the row samples this sequence's own next token
                write[r] = slot
                self._counted[slot] += 1
        if refills:
            self._refill(refills, lag, in_flight)
        return PenaltyRows(np.array(slots, dtype=np.int64), np.array(write, dtype=np.int64),
                           np.array(rep, dtype=np.float32), np.array(pres, dtype=np.float32),
                           np.array(freq, dtype=np.float32), any_repetition=any(x != 1.0 for x in rep),
                           any_counted=any(x != 0.0 for x in pres) or any(x != 0.0 for x in freq),
                           counts=self.counts, prompt_mask=self.prompt_mask)

    def count(self, pen: PenaltyRows, read_slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Add each row's sampled token to its write slot (after sampling; queued on the device).
        read_slots: pen.slots on the device, reused when the write slots are the same."""
        write = read_slots if pen.write_is_read else torch.as_tensor(pen.write).to(self.device, non_blocking=True)
        write = write.long()
        self.counts.index_put_((write.clamp(min=0), tokens.long()), (write >= 0).to(self.count_dtype),
                               accumulate=True)

    # ---- slots ---------------------------------------------------------------------------
    def _owns(self, seq: Sequence) -> bool:
        slot = seq.penalty_slot
        return slot is not None and 0 <= slot < self.capacity and self._owner[slot] is seq

    def _take(self, seq: Sequence, busy: set[int]) -> int:
        if not self._free:
            self._reclaim(busy)
        if not self._free:
            raise RuntimeError(f"penalty state: all {self.capacity} slots are held by running sequences "
                               "(more sequences sample at once than max_num_seqs)")
        slot = self._free.pop()
        self._owner[slot] = seq
        seq.penalty_slot = slot
        busy.add(slot)
        return slot

    def _reclaim(self, busy: set[int]) -> None:
        """Slots of sequences that no longer run (finished, aborted, preempted) become free."""
        for slot, owner in enumerate(self._owner):
            if slot not in busy and (owner is None or owner.status is not SeqStatus.RUNNING):
                self._owner[slot] = None
                self._free.append(slot)
        if len(self._prompt_of) > 4 * self.capacity:
            self._prompt_of = {k: s for k, s in self._prompt_of.items() if self._owner[s] is not None}

    def _refill(self, refills: list[_Refill], lag: int, in_flight: Callable[[], torch.Tensor] | None) -> None:
        """Rewrite these slots from their sequences' tokens (+ the token in flight when lag)."""
        dev = self.device
        idx = torch.tensor([f.slot for f in refills], dtype=torch.int64).to(dev, non_blocking=True)
        self.counts.index_fill_(0, idx, 0)
        outs = [f.seq.token_ids[f.seq.num_prompt_tokens: f.seq.num_prompt_tokens + f.num_host] for f in refills]
        if any(outs):
            owners = np.repeat([f.slot for f in refills], [len(o) for o in outs])
            tokens = np.fromiter((t for o in outs for t in o), dtype=np.int64)
            self._add(torch.as_tensor(owners), torch.as_tensor(tokens))
        if lag:
            if in_flight is None:
                raise RuntimeError("penalty state: a slot needs refilling while its token is in flight")
            rows = torch.tensor([f.row for f in refills], dtype=torch.int64).to(dev, non_blocking=True)
            self._add(idx, in_flight().long().index_select(0, rows))
        self._fill_prompts([f for f in refills if f.new_owner])

    def _add(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        slots, tokens = slots.to(self.device, non_blocking=True), tokens.to(self.device, non_blocking=True)
        self.counts.index_put_((slots, tokens), torch.ones((), dtype=self.count_dtype, device=self.device),
                               accumulate=True)

    def _fill_prompts(self, refills: list[_Refill]) -> None:
        """Prompt bits of each refilled slot: copied from a slot that holds the same request's
        prompt (a fork's siblings, a recomputed sequence), else packed once per request."""
        dst, src, build = [], [], {}
        rewritten = {f.slot for f in refills}
        for f in refills:
            req = f.seq.request
            donor = self._prompt_of.get(id(req))
            owner = None if donor is None else self._owner[donor]
            if owner is not None and owner.request is req and donor not in rewritten:
                dst.append(f.slot)
                src.append(donor)
            else:
                build.setdefault(id(req), (req, []))[1].append(f.slot)
        for f in refills:
            self._prompt_of[id(f.seq.request)] = f.slot
        dev = self.device
        if dst:
            self.prompt_mask[torch.tensor(dst, device=dev)] = self.prompt_mask[torch.tensor(src, device=dev)]
        if build:
            reqs = [req for req, _ in build.values()]
            packed = pack_token_sets([req.prompt_token_ids for req in reqs], self.vocab, dev)
            which = [i for i, (_, slots) in enumerate(build.values()) for _ in slots]
            targets = [s for _, slots in build.values() for s in slots]
            self.prompt_mask[torch.tensor(targets, device=dev)] = packed[torch.tensor(which, device=dev)]

    # ---- for tests -----------------------------------------------------------------------
    def slot_of(self, seq: Sequence) -> int | None:
        """seq's slot, or None when it holds none."""
        return seq.penalty_slot if self._owns(seq) else None


def pack_token_sets(token_lists: list[list[int]], vocab: int, device) -> torch.Tensor:
    """[len(token_lists), state_width(vocab) / 8] uint8 bit masks: bit t % 8 of byte t // 8 set
    for each token t. Built from the distinct (list, token) pairs: one byte per 8 tokens is all
    the device ever holds (no [lists, vocab] temporary)."""
    width = state_width(vocab)
    rows = np.repeat(np.arange(len(token_lists)), [len(t) for t in token_lists])
    tokens = np.fromiter((t for ts in token_lists for t in ts), dtype=np.int64, count=len(rows))
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab):
        raise ValueError(f"pack_token_sets: token ids must lie in [0, {vocab})")
    at = np.unique(rows * width + tokens)
    packed = torch.zeros(len(token_lists) * width // 8, dtype=torch.uint8, device=device)
    if len(at):  # distinct bits of one byte add up to their OR
        bits = torch.as_tensor((1 << (at & 7)).astype(np.uint8)).to(device)
        packed.index_put_((torch.as_tensor(at >> 3).to(device),), bits, accumulate=True)
    return packed.view(len(token_lists), width // 8)
