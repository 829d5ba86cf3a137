"""Continuous batching with chunked prefill: each step mixes decodes and prefill chunks under a
token budget; when KV blocks run out the newest running sequence is preempted (freed, recomputed later).

The scheduler is the one owner of sequence state: it admits, grows, preempts and finishes
sequences (`schedule`), and applies a step's results (`advance` when the step is launched,
`update` when its tokens are known: append, fork the n samples, check stops)."""
from __future__ import annotations

from collections import deque

from atom.engine.block_manager import BlockManager
from atom.engine.messages import SampledToken, ScheduledBatch, StepOutput
from atom.engine.routing import RoutedStore
from atom.engine.sequence import Sequence, SeqStatus
from atom.engine.stops import StopChecker
from atom.outputs import EngineStats


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 stats: EngineStats, stop: StopChecker, routing: RoutedStore | None = None) -> None:
        self.bm = block_manager
        self.stop = stop
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.stats = stats
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.routing = routing  # routed experts (enable_return_routed_experts)
        self.num_following = 0  # seats of the prompt twins waiting on a running leader's prefill

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = SeqStatus.WAITING
        (self.waiting.appendleft if front else self.waiting.append)(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self._release_followers(seq)
        self.running.remove(seq)
        self.bm.release(seq)
        self.stats.preemptions += 1
        self.add(seq, front=True)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        # Running sequences first, oldest first; the newest are preempted when blocks run out.
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING or budget == 0:
                continue
            n = min(seq.num_uncomputed, budget)
            while not self.bm.can_grow(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue
            self.bm.grow(seq, n)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        self._admit_waiting(budget, seqs, counts)
        return ScheduledBatch(seqs, counts)

    def _admit_waiting(self, budget: int, seqs: list[Sequence], counts: list[int]) -> None:
        """Waiting sequences join the batch while there is room; never preempt for them.

        A request whose prompt equals that of a sequence still prefilling (a prompt twin: the
        samples of a GRPO group sent as separate requests) follows it: it samples its first
        token from the same prefill and forks its KV, as the n samples of one request do. A
        sequence whose next block another is computing right now (a shared prefix) waits a step
        and then takes it from the prefix cache: repeated prefixes are prefilled once."""
        twins = self._prefilling_prompts() if self.waiting and self.bm.enable_prefix_caching else None
        computing = self._blocks_being_computed() if self.waiting else set()
        deferred: list[Sequence] = []
        # A forking prefill reserves seats for its n samples until they fork: the unforked samples
        # of running prefills (admitted this step or earlier, chunked prompts) count against the
        # limit too, so that at most max_num_seqs sequences ever run at once.
        reserved = sum(s.params.n - 1 for s in self.running if s.fork_pending) if self.waiting else 0
        while self.waiting:
            seq = self.waiting[0]
            seats = seq.params.n if seq.fork_pending else 1
            if self.running and len(self.running) + self.num_following + reserved + seats > self.max_num_seqs:
                break
            # Prompt logprobs and routed experts are only known for positions this engine computes.
            wants_prompt_logprobs = seq.num_output_tokens == 0 and (
                seq.params.prompt_logprobs is not None or seq.params.return_routed_experts)
            if twins is not None and not wants_prompt_logprobs and self._follow(seq, twins):
                self.waiting.popleft()  # following costs no token budget
                continue
            if budget == 0:
                break
            matched = [] if wants_prompt_logprobs else self.bm.match_prefix(seq)
            ahead = [] if wants_prompt_logprobs or not self.bm.enable_prefix_caching else self.bm.keys_ahead(seq, matched)
            # Only a block the cache could serve is worth waiting for (the last token is always
            # computed: a prompt of whole blocks recomputes its last block).
            if ahead and ahead[0] in computing and len(matched) < (len(seq) - 1) // self.bm.block_size:
                deferred.append(self.waiting.popleft())
                continue
            n = min(len(seq) - len(matched) * self.bm.block_size, budget)
            if not self.bm.can_start(seq, matched, n):
                break
            computing.update(ahead)
            self.waiting.popleft()
            self.bm.start(seq, matched)
            self.stats.prompt_tokens_cached += min(seq.num_computed, seq.num_prompt_tokens)
            self.bm.grow(seq, n)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            reserved += seats - 1
            seqs.append(seq)
            counts.append(n)
            budget -= n
            if twins is not None and seq.num_output_tokens == 0:
                twins.setdefault(seq.request.prompt_key, seq)
        self.waiting.extendleft(reversed(deferred))  # they keep their place in the queue

    # ---- prompt twins --------------------------------------------------------------------
    def _prefilling_prompts(self) -> dict[int, Sequence]:
        """Running sequences that have yet to sample their first token, by prompt."""
        out: dict[int, Sequence] = {}
        for seq in self.running:
            if seq.num_output_tokens == 0:
                out.setdefault(seq.request.prompt_key, seq)
        return out

    def _follow(self, seq: Sequence, twins: dict[int, Sequence]) -> bool:
        """Attach a fresh waiting seq to a running twin of its prompt (it leaves the queue)."""
        if seq.num_output_tokens or seq.block_table:
            return False
        leader = twins.get(seq.request.prompt_key)
        if leader is None or leader.request.prompt_token_ids != seq.request.prompt_token_ids:
            return False
        leader.followers.append(seq)
        seq.leader = leader
        self.num_following += seq.params.n if seq.fork_pending else 1
        return True

    def _unfollow(self, seq: Sequence) -> None:
        seq.leader.followers.remove(seq)
        seq.leader = None
        self.num_following -= seq.params.n if seq.fork_pending else 1

    def _release_followers(self, leader: Sequence) -> None:
        """The leader stops before it samples (preempted, aborted): its followers wait again, at
        the front of the queue, in their order."""
        followers = list(leader.followers)
        for f in followers:
            self._unfollow(f)
        self.waiting.extendleft(reversed(followers))

    def _join(self, seq: Sequence) -> bool:
        """seq's leader has sampled: seq takes the leader's prompt KV (its full blocks shared, the
        partial last one copied). False when no block is free for that copy: seq waits again
        (and samples later the same tokens: they depend only on its seed and positions)."""
        leader = seq.leader
        self._unfollow(seq)
        if leader.status is not SeqStatus.RUNNING or not self.bm.fork(leader, seq):
            self.add(seq, front=True)
            return False
        self.stats.prompt_tokens_cached += seq.num_prompt_tokens
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        return True

    def _blocks_being_computed(self) -> set[int]:
        """Chain keys of prompt blocks that running prefills have yet to finish."""
        if not self.bm.enable_prefix_caching:
            return set()
        keys: set[int] = set()
        for seq in self.running:
            if seq.num_computed < seq.num_prompt_tokens:
                keys.update(self.bm.keys_ahead(seq))
        return keys

    def continue_decode(self, batch: ScheduledBatch, max_model_len: int) -> ScheduledBatch | None:
        """The next decode step of a decode batch still in flight, scheduled before its tokens are
        known (each sequence's newest token is in flight). None when the step needs decisions
        that depend on them: a waiting sequence could be admitted, or blocks run short
        (preemption). Sequences that surely finish on the token in flight (length) are left out;
        those that stop on it (EOS, stop ids) waste their row, and their result is dropped."""
        if self.waiting and len(self.running) < self.max_num_seqs:
            return None
        live = [seq for seq in batch.seqs if seq.status is SeqStatus.RUNNING]
        if len(live) != len(self.running):  # some wait for token budget: the scheduler decides
            return None
        seqs = [seq for seq in live
                if (seq.params.max_tokens is None or seq.num_output_tokens + 1 < seq.params.max_tokens)
                and len(seq) + 1 < max_model_len]
        if not seqs:
            return None
        bm = self.bm
        growing = [(seq, k) for seq in seqs if (k := bm.blocks_to_grow(seq, 1))]  # about one in a block's tokens
        if not bm.reserve(sum(k for _, k in growing)):
            return None
        for seq, _ in growing:
            bm.grow(seq, 1)
        return ScheduledBatch(seqs, [1] * len(seqs))

    def finish(self, seq: Sequence, reason: str | None = None) -> None:
        """End seq now (reason overrides its finish_reason, e.g. "abort"); its blocks are freed at once."""
        if seq.status is SeqStatus.FINISHED:
            return
        self._release_followers(seq)
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self.bm.release(seq)
        elif seq.leader is not None:
            self._unfollow(seq)
        elif seq in self.waiting:  # a sibling that just sampled its first token is in neither list
            self.waiting.remove(seq)
        if reason is not None:
            seq.finish_reason = reason
        seq.status = SeqStatus.FINISHED
        seq.request.num_finished += 1

    def preempt_all(self) -> None:
        """Free every running sequence's KV (sleep, or recompute under new weights); they are
        recomputed, in their order, when scheduled again."""
        for seq in reversed(list(self.running)):
            self._preempt(seq)

    # ---- after a step --------------------------------------------------------------------
    def advance(self, batch: ScheduledBatch) -> None:
        """The batch's tokens are computed (or queued to be): move each sequence on."""
        batch.starts = starts = [seq.num_computed for seq in batch.seqs]
        prompt_tokens = recomputed = 0  # (per-row work of every decode step: kept to plain locals)
        computed = self.bm.computed
        for seq, lo, n in zip(batch.seqs, starts, batch.num_new_tokens):
            hi, prompt = lo + n, seq.num_prompt_tokens
            if lo < prompt:
                prompt_tokens += min(hi, prompt) - lo
            again = min(hi, len(seq.token_ids) - 1) - max(lo, prompt)
            if again > 0:
                recomputed += again
            seq.num_computed = hi
            computed(seq)
        self.stats.prompt_tokens_computed += prompt_tokens
        self.stats.recomputed_tokens += recomputed

    def update(self, batch: ScheduledBatch, out: StepOutput, version) -> list[Sequence]:
        """Apply a step's results (tokens from weights `version`); returns the sequences it
        touched (appended to, forked or finished). Overlapped steps were advanced at launch."""
        if not out.overlapped:
            self.advance(batch)
        if out.routed is not None:  # (rows of sequences finished meanwhile land past their end)
            self.routing.record(batch.seqs, batch.starts, batch.num_new_tokens, out.routed, owned=not out.overlapped)
            if out.overlapped:  # the device runs the next step meanwhile: write owed prompt rows
                self.routing.drain()
        for seq, first, entries, ranks in out.prompt_logprobs:
            seq.request.prompt_logprobs[first + 1: first + 1 + len(entries)] = entries
            seq.request.prompt_logprob_ranks[first + 1: first + 1 + len(ranks)] = ranks
        touched = []
        # Prompt twins take their leader's KV first, then siblings fork before their parent
        # appends its own token (a parent that finishes at once releases its blocks).
        sampled, waiting_again = out.sampled, set()
        for st in sampled:
            if st.seq.leader is not None and not self._join(st.seq):
                waiting_again.add(id(st.seq))
        if waiting_again:
            sampled = [st for st in sampled if id(st.seq) not in waiting_again]
        if any(st.seq.fork_pending for st in sampled):
            sampled = sorted(sampled, key=lambda st: not (st.seq.fork_pending and st.sample_index > 0))
        for st in sampled:
            if st.seq.status is SeqStatus.FINISHED:
                continue  # stopped on the token before this overlapped step, or aborted: row dropped
            if st.seq.fork_pending and st.sample_index > 0:
                touched.append(self._start_sibling(st, version))
            else:
                self._append(st.seq, st, version)
                touched.append(st.seq)
        # A forking prefill forks when it samples: after its last prompt chunk, not its first.
        for st in sampled:
            st.seq.fork_pending = False
        return touched

    def _start_sibling(self, st: SampledToken, version) -> Sequence:
        parent = st.seq
        child = Sequence(parent.request, st.sample_index, parent.token_ids[: parent.num_prompt_tokens])
        child.fork_pending = False
        if parent.routed is not None:  # the shared prompt's routing
            self.routing.fork(parent, child)
        parent.request.sequences.append(child)
        if self._append(child, st, version):
            return child
        if self.bm.fork(parent, child):
            self.stats.prompt_tokens_cached += child.num_prompt_tokens
            child.status = SeqStatus.RUNNING
            self.running.append(child)
        else:
            self.add(child)
        return child

    def _append(self, seq: Sequence, st: SampledToken, version) -> bool:
        """Append a sampled token; True when that finishes the sequence."""
        seq.token_ids.append(st.token_id)
        seq.record_version(version)
        if seq.params.logprobs is not None:
            seq.logprobs.append(st.logprob)
            if st.rank is not None:
                seq.logprob_ranks.append(st.rank)
            if st.top is not None:
                seq.top_logprobs.append(st.top)
        self.stats.generated_tokens += 1
        if not self.stop(seq, st.token_id):
            return False
        self.finish(seq)
        return True
