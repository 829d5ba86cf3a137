"""The engine core: requests arrive at any time, every `step` runs one batch of the step pipeline
(schedule -> run the model -> scheduler.update), requests can be aborted, and generation can be
paused around weight updates.

One thread drives a core at a time (RolloutEngine holds a lock; AsyncRolloutEngine runs it on
its own loop thread). On one GPU a pure decode step is launched before the previous one's
tokens are read (overlap); the core keeps that step in flight across `step` calls and drains
it before anything that changes the running set from outside (abort of a running request,
pause, weights, sleep).
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

from atom.config import EngineConfig
from atom.distributed.dp import my_requests, share_results
from atom.engine.group_sync import GroupPlan, GroupSync, apply_report, new_request_copy, report
from atom.engine.messages import ScheduledBatch, StepOutput
from atom.engine.model_runner import ModelRunner
from atom.engine.rl_state import EngineRLState
from atom.engine.routing import RoutedStore
from atom.engine.scheduler import Scheduler
from atom.engine.sequence import Request, Sequence, SeqStatus
from atom.engine.stops import StopChecker
from atom.engine.window_blocks import make_block_manager
from atom.models.hf_config import ModelArgs, load_model_args
from atom.outputs import EngineStats, RequestMetrics

_DEFAULT_MAX_MODEL_LEN = 8192
PAUSE_MODES = ("abort", "wait", "keep")


class LLMEngine(EngineRLState):
    """Runs requests to completion, a step at a time (and holds the RL state: rl_state.py)."""

    def __init__(self, config: EngineConfig, detokenize: Callable[[list[int]], str] | None = None) -> None:
        self.config = config
        self.args: ModelArgs = load_model_args(config.model)
        limit = self.args.max_position_embeddings
        self.max_model_len = config.max_model_len or min(limit, _DEFAULT_MAX_MODEL_LEN)
        if self.max_model_len > limit:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings={limit}")
        self.runner = ModelRunner(config, self.args, self.max_model_len)
        if config.load_format == "dummy":
            self.runner.init_dummy_weights()
        else:
            self.runner.load_checkpoint(config.model)
        num_blocks = self.runner.num_kv_blocks()
        self.runner.allocate_kv_cache(num_blocks)
        if config.cuda_graphs_at_start and self.runner.device.type == "cuda":
            self.runner.warm_up_decode()
        self.block_manager = make_block_manager(num_blocks, config.kv_block_size, config.enable_prefix_caching,
                                                self.runner.kv_window)
        self.stats = EngineStats()
        stop = StopChecker(self.args.eos_token_ids, self.max_model_len, detokenize)
        routed = self.runner.routed_buf  # [tokens, moe_layers, top_k] (enable_return_routed_experts)
        routing = None if routed is None else RoutedStore(routed.shape[1], routed.shape[2], self.max_model_len)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.stats, stop, routing)
        self.weight_version: int | str = 0
        self.requests: dict[str, Request] = {}  # live requests by id (held ones included)
        self._held: list[Request] = []           # arrived while paused: admitted on resume
        self._inflight = None                    # a launched decode step whose tokens are unread
        self._pause_mode: str | None = None
        self._outbox: dict[int, Request] = {}   # requests touched since the last `step` returned
        # The KV wake policy of the next wake only (None: config.lazy_kv_wake); set through
        # EngineProbe.next_kv_wake, so the config keeps saying what the engine was built with.
        self.next_kv_wake_lazy: bool | None = None
        # Host copies of the tensors a discarding sleep must not lose (rl_state.release_memory).
        self.kept_through_discard: dict[str, torch.Tensor] = {}
        par = self.runner.parallel
        # Engine groups: requests enter on rank 0 and reach the others before each step (group_sync.py).
        self.group = GroupSync(par.engine, par.dp.size, par.dp.rank) if par.is_parallel else None

    # ---- requests ------------------------------------------------------------------------
    def max_tokens_fit(self, num_tokens: int) -> bool:
        """Whether one sequence of num_tokens tokens fits the KV pool on its own."""
        return self.block_manager.blocks_needed(num_tokens) <= self.block_manager.num_blocks

    def add_request(self, req: Request) -> None:
        """Queue a validated request; it joins the next step (or waits while paused). In an
        engine group only rank 0 takes requests; the others run `follow`."""
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use by a live request")
        if self.group is None:
            self._admit(req)
            return
        if not self.group.is_leader:
            raise RuntimeError("add_request: in an engine group requests enter on rank 0; the other ranks "
                               "call follow()")
        dest = self.group.assign() if self.group.dp_size > 1 else 0
        self.group.log.append(("add", dest, new_request_copy(req)))
        self._admit(req)
        if dest != self.group.dp_rank:  # another rank runs it: keep a mirror (no KV here)
            req.sequences[0].status = SeqStatus.WAITING
            self.group.remote[req.request_id] = req
            if req in self._held:
                self._held.remove(req)
            else:
                self.scheduler.waiting.remove(req.sequences[0])

    def _admit(self, req: Request) -> None:
        req.sequences = [Sequence(req, 0, req.prompt_token_ids)]
        req.metrics = RequestMetrics(self.steps_launched, time.monotonic())
        if req.params.prompt_logprobs is not None:
            req.prompt_logprobs = [None] * len(req.prompt_token_ids)
            req.prompt_logprob_ranks = [None] * len(req.prompt_token_ids)
        self.requests[req.request_id] = req
        if self._pause_mode is not None:
            self._held.append(req)
        else:
            self.scheduler.add(req.sequences[0])

    def abort(self, request_ids: Iterable[str]) -> list[Request]:
        """Finish the named live requests now with finish_reason "abort" (their KV freed at
        once); returns them, with the tokens generated so far. Unknown or finished ids are skipped."""
        found = [self.requests[i] for i in dict.fromkeys(request_ids) if i in self.requests]
        if not found:
            return []
        if self.group is not None and self.group.is_leader:
            self.group.log.append(("abort", [r.request_id for r in found]))
        if self._inflight is not None and any(s.status is SeqStatus.RUNNING for r in found for s in r.sequences):
            self.drain()  # its tokens land first; then the running set changes
        for req in found:
            self._abort(req)
            self._outbox.pop(id(req), None)
        return found

    def _abort(self, req: Request) -> None:
        for seq in req.sequences:
            self.scheduler.finish(seq, "abort")
        if req in self._held:
            self._held.remove(req)
        # Samples never forked (aborted during the prompt) come back as empty completions.
        for j in range(len(req.sequences), req.params.n):
            seq = Sequence(req, j, req.prompt_token_ids)
            seq.status, seq.finish_reason, seq.fork_pending = SeqStatus.FINISHED, "abort", False
            req.sequences.append(seq)
        req.num_finished = req.params.n
        self.requests.pop(req.request_id, None)
        if self.group is not None:
            self.group.remote.pop(req.request_id, None)

    def abort_all(self) -> list[Request]:
        return self.abort(list(self.requests))

    @property
    def num_kv_blocks(self) -> int:
        return self.block_manager.num_blocks

    @property
    def num_free_kv_blocks(self) -> int:
        return self.block_manager.num_free

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def step_in_flight(self) -> bool:
        """A decode step is queued on the device and its tokens are not read yet (overlap)."""
        return self._inflight is not None

    def reset_prefix_cache(self) -> None:
        self.block_manager.invalidate_cache()

    @property
    def weight_map(self):
        """HF name -> parameter slot (what weight updates are checked against)."""
        return self.runner.weight_map

    @property
    def engine_rank(self) -> int:
        """This process's rank in its engine group (0 for a single-process engine)."""
        return self.runner.parallel.engine.rank

    def is_live(self, request_id: str) -> bool:
        return request_id in self.requests

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- pause / resume ------------------------------------------------------------------
    def pause(self, mode: str = "abort") -> list[Request]:
        """Stop generating: "abort" finishes every live request now (returned); "wait" lets the
        admitted ones run to completion (`step` goes on until `paused`); "keep" freezes them
        where they are, KV and all. Requests added while paused wait for `resume`."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause: mode must be one of {PAUSE_MODES}, got {mode!r}")
        if self.group is not None and self.group.is_leader:
            self.group.log.append(("pause", mode))
        self._pause_mode = mode
        if mode == "abort":
            return self.abort_all()
        if mode == "keep":
            self.drain()
        return []

    @property
    def paused(self) -> bool:
        """Paused and quiet: nothing runs until resume (a "wait" pause gets there when the
        admitted requests are done)."""
        if self._pause_mode is None:
            return False
        admitted = len(self.requests) - len(self._held)  # remote requests (mirrors) count too
        return self._inflight is None and (self._pause_mode == "keep" or admitted == 0)

    @property
    def pause_mode(self) -> str | None:
        return self._pause_mode

    def resume(self, recompute_kv: bool = False) -> None:
        """Continue after pause. recompute_kv: kept requests drop the KV computed under the old
        weights and recompute it (prompt and generated tokens) under the current ones before
        their next token, so every later token is sampled from exactly the new policy."""
        if self._pause_mode is None:
            return
        if self.group is not None and self.group.is_leader:
            self.group.log.append(("resume", recompute_kv))
        if recompute_kv:
            self.scheduler.preempt_all()
        self._pause_mode = None
        remote = self.group.remote if self.group is not None else {}
        for req in self._held:
            if req.request_id not in remote:
                self.scheduler.add(req.sequences[0])
        self._held = []

    def release_kv(self) -> None:
        """Free the KV of kept requests (before sleep): they are recomputed when they run again
        (and refill their penalty state, which goes too)."""
        self.drain()
        self.scheduler.preempt_all()
        self.runner.penalties.release()

    # ---- the loop ------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one step; returns the live requests touched since the last call (new tokens or
        finished; a finished request has `finished` set and has left the core). Aborted
        requests are not in it: `abort` returned them."""
        if self.group is not None:
            return self._leader_step()
        if not self.paused:
            self._step()
        return self._take_outbox()

    def _take_outbox(self) -> list[Request]:
        out = list(self._outbox.values())
        self._outbox = {}
        return out

    # ---- engine groups (group_sync.py) ---------------------------------------------------
    def _leader_step(self, stop: bool = False) -> list[Request]:
        if not self.group.is_leader:
            raise RuntimeError("step: in an engine group only rank 0 steps; the other ranks call follow()")
        plan = GroupPlan(self.group.log, step=bool(self.requests) and not self.paused and not stop, stop=stop)
        self.group.log = []
        plan, news = self.group.exchange(plan, [])
        for rank_news in news[1:]:
            for req in apply_report(self.group.remote, rank_news):
                self._outbox[id(req)] = req
                if req.finished:
                    self.requests.pop(req.request_id, None)
                    self.group.remote.pop(req.request_id, None)
        if plan.step:
            self._group_step()
        return self._take_outbox()

    def _group_step(self) -> None:
        """This rank's part of a group step: its own batch, or (alltoall) an idle step that joins
        the MoE collectives when it has nothing to run."""
        if self.scheduler.has_work and not self.paused:
            self._step()
        elif self.group.dp_size > 1:
            self.runner.execute(ScheduledBatch([], []), self.block_manager)

    def follow(self) -> None:
        """Ranks 1.. of an engine group: run the requests rank 0 takes, step by step, until rank 0
        calls stop_followers (or a collective fails: CollectiveError)."""
        if self.group is None or self.group.is_leader:
            raise RuntimeError("follow: only ranks other than 0 of an engine group follow")
        while True:
            news = report(self._take_outbox()) if self.group.dp_size > 1 else []
            plan, _ = self.group.exchange(None, news)
            if plan.stop:
                return
            for cmd in plan.commands:
                self._apply(cmd)
            if plan.step:
                self._group_step()

    def _apply(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            if cmd[1] == self.group.dp_rank:
                self._admit(cmd[2])
        elif kind == "abort":
            for rid in cmd[1]:
                if rid in self.requests:
                    self._abort(self.requests[rid])
        elif kind == "pause":
            self.pause(cmd[1])
        elif kind == "resume":
            self.resume(cmd[1])

    def stop_followers(self) -> None:
        """Rank 0 of an engine group: end the other ranks' follow() (live requests are aborted)."""
        if self.group is not None and self.group.is_leader:
            self.abort_all()
            self._leader_step(stop=True)

    def heartbeat(self) -> None:
        """Rank 0 of an idle engine group: pass the calls made since the last step to the others
        without stepping, so that they do not time out waiting."""
        if self.group is not None and self.group.is_leader and (self.paused or not self.requests):
            self._leader_step()

    def _step(self) -> None:
        if self._pause_mode == "keep" or (self._inflight is None and not self.scheduler.has_work):
            self.drain()
            return
        if self._inflight is None:
            batch = self.scheduler.schedule()
            if not batch.seqs:
                raise RuntimeError(self._no_room_message())
            self._note_first_runs(batch)
            inflight = self.runner.launch_decode(batch, self.block_manager)
            if inflight is not None:
                self.stats.graph_steps += inflight.graphed
                self.scheduler.advance(batch)
                self._inflight = inflight
                return
            self._finish_step(batch, self.runner.execute(batch, self.block_manager))
            return
        # Overlap: queue the next decode step before reading this one's tokens, then do this
        # step's host work while the device runs the next.
        batch = self._inflight.batch
        nxt = self.scheduler.continue_decode(batch, self.max_model_len)
        queued = None if nxt is None else self.runner.launch_decode(nxt, self.block_manager, self._inflight)
        if queued is not None:
            self.scheduler.advance(nxt)
            self.stats.overlapped_steps += 1
            self.stats.graph_steps += queued.graphed
        out = self.runner.collect(self._inflight)
        self._inflight = queued
        self._finish_step(batch, out)

    @property
    def steps_launched(self) -> int:
        """Steps run or queued so far (the index of the next step to launch): the finished ones
        and the one in flight."""
        return self.stats.steps + (self._inflight is not None)

    def _note_first_runs(self, batch: ScheduledBatch) -> None:
        """Requests that run for the first time in this step (a fresh schedule) note its index
        (RequestMetrics.scheduled_step; prompt twins with their leader)."""
        step, now = self.steps_launched, None
        for seq in batch.seqs:
            for s in (seq, *seq.followers) if seq.followers else (seq,):
                m = s.request.metrics
                if m is not None and m.scheduled_step is None:
                    now = now or time.monotonic()
                    m.scheduled_step, m.scheduled_time = step, now
                    # schedule() has just matched the prefix (a twin: its leader's)
                    m.num_cached_tokens = min(seq.num_computed, seq.num_prompt_tokens)

    def drain(self) -> None:
        """Read the step in flight, launching nothing after it (before weights or memory change)."""
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            self._finish_step(inflight.batch, self.runner.collect(inflight))

    def _finish_step(self, batch: ScheduledBatch, out: StepOutput) -> None:
        touched = self.scheduler.update(batch, out, self.weight_version)
        self.stats.steps += 1
        for seq in touched:
            req = seq.request
            self._outbox[id(req)] = req
            if req.finished:
                self.requests.pop(req.request_id, None)

    def run(self, requests: list[Request], on_progress: Callable[[int], None] | None = None) -> list[Request]:
        """Generate every request's n completions (the SPMD batch call: every rank gets the same
        requests); on any error, free everything and re-raise.

        Data-parallel attention (ep_mode="alltoall"): this rank runs its share of the requests, in
        lockstep with the other ranks, then every rank gets every result (atom/distributed/dp.py).
        Returns the other live requests (added with add_request) that this call's steps touched.
        """
        dp = self.runner.parallel.dp
        foreign: dict[int, Request] = {}
        mine = my_requests(requests, dp)
        for req in mine:
            if req.request_id in self.requests:
                raise ValueError(f"request_id {req.request_id!r} is already in use by a live request")
            self._admit(req)
        pending = {r.request_id for r in mine}
        try:
            while pending if dp.size == 1 else dp.any(bool(pending) or self._inflight is not None, self.runner.device):
                if not pending and self._inflight is None:
                    self.runner.execute(ScheduledBatch([], []), self.block_manager)  # idle rank: join the MoE collectives
                    continue
                if not self.paused:
                    self._step()
                touched = self._take_outbox()
                done = [r for r in touched if r.finished and r.request_id in pending]
                foreign.update((id(r), r) for r in touched if r.request_id not in pending)
                pending.difference_update(r.request_id for r in done)
                if on_progress is not None and done:
                    on_progress(sum(r.params.n for r in done))
            if not self.requests:
                self.drain()  # a step launched for sequences that then stopped: nothing may stay queued
        except BaseException:
            self.fail()
            raise
        if dp.size > 1:
            arrived = share_results(requests, dp)
            if on_progress is not None and arrived:
                on_progress(arrived)
        return list(foreign.values())

    def fail(self) -> None:
        """After an error: wait for queued device work (its blocks are about to be reused), then
        abort every live request."""
        self._inflight = None
        self._outbox = {}
        try:
            self.runner.synchronize()
        finally:
            for req in list(self.requests.values()):
                self._abort(req)
            self._held = []

    def _no_room_message(self) -> str:
        bm = self.block_manager
        if bm.backed < bm.num_blocks:
            return (f"the KV cache cannot hold even one waiting sequence: only {bm.backed} of its {bm.num_blocks} "
                    "blocks could be given device memory after wake_up (something else holds the rest)")
        return "the KV cache cannot hold even one waiting sequence; raise num_kv_blocks / kv_cache_memory_bytes"
