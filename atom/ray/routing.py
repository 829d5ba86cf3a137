"""Asynchronous requests across the replicas (mixed into ReplicaPool).

`await pool.generate_async(prompt, params, request_id)` picks a replica with the Router (least
outstanding requests; a request_id's sticky key keeps a conversation on the replica holding its
prefix cache) and queues the request there. Each replica has one dispatcher: while the replica
runs a batch, new requests wait in its queue and go together as the next batch (the replicas
host the batch RolloutEngine, which runs one generate call at a time). If the replica dies, its
requests are routed again to the others; they carry their seeds, so their outputs do not change.

`pause_generation(mode)` / `resume_generation()` gate the dispatchers of every replica:
  "wait": requests already queued or running finish; new ones wait for resume.
  "abort": queued requests fail with RequestAborted; running batches finish (a batch engine
           call cannot be stopped midway); new ones wait for resume.
  "keep": queued requests stay queued until resume; running batches finish.
"""
from __future__ import annotations

import asyncio
import re

from atom.outputs import RolloutOutput
from atom.ray.replicas import READY, is_replica_failure, task_error
from atom.ray.router import Router
from atom.sampling_params import SamplingParams

PAUSE_MODES = ("abort", "wait", "keep")


class RequestAborted(RuntimeError):
    """The request was dropped by pause_generation(mode="abort") before it ran."""


class _ReplicaFailed(Exception):
    """Internal: the replica holding the request died; route it again."""


class _Request:
    __slots__ = ("prompt", "params", "future")

    def __init__(self, prompt, params: SamplingParams, future: asyncio.Future) -> None:
        self.prompt, self.params, self.future = prompt, params, future


def _bad_index(exc: BaseException, count: int) -> int | None:
    m = re.match(r"prompt (\d+)\b", str(exc))
    return int(m.group(1)) if m and int(m.group(1)) < count else None


class AsyncRouting:
    """Needs ReplicaPool's `_rset`, `_heal`, `_per_prompt_params`, `_seeded` and `config`."""

    def _init_routing(self) -> None:
        c = self.config
        self._router = Router(self._rset.replicas, c.sticky_separator, c.sticky_capacity)
        self._queues: dict[int, list[_Request]] = {rid: [] for rid in self._rset.replicas}
        self._dispatchers: dict[int, asyncio.Task] = {}
        self._paused = False
        self._resumed: asyncio.Event | None = None

    def _resume_event(self) -> asyncio.Event:
        if self._resumed is None:
            self._resumed = asyncio.Event()
            self._resumed.set()
        return self._resumed

    async def generate_async(self, prompt, sampling_params: SamplingParams | None = None,
                             request_id: str | None = None) -> RolloutOutput:
        """One prompt's completions from whichever replica the router picks.

        request_id: its part before `config.sticky_separator` is a sticky key ("conv7:turn2" and
        "conv7:turn3" go to the same replica while it is healthy). Raises the engine's ValueError
        for a bad request, RequestAborted when pause_generation(mode="abort") dropped it, and
        RuntimeError when no replica is left.
        """
        params = self._seeded(self._per_prompt_params(sampling_params, 1))[0]
        loop = asyncio.get_running_loop()
        while True:
            await self._resume_event().wait()
            self._heal()
            self._router.healthy = set(self._rset.ids(READY))
            rid = self._router.pick(request_id)
            if rid is None:
                self._rset.check_alive()
                await asyncio.sleep(0.05)
                continue
            req = _Request(prompt, params, loop.create_future())
            self._queues[rid].append(req)
            self._router.started(rid)
            self._kick(rid)
            try:
                return await req.future
            except _ReplicaFailed:
                continue
            finally:
                self._router.finished(rid)

    def _kick(self, rid: int) -> None:
        task = self._dispatchers.get(rid)
        if (task is None or task.done()) and self._queues[rid] and not self._paused:
            self._dispatchers[rid] = asyncio.get_running_loop().create_task(self._dispatch(rid))

    async def _dispatch(self, rid: int) -> None:
        """Send the replica's queue as one batch, repeatedly, until it is empty or paused."""
        while self._queues[rid] and not self._paused:
            batch, self._queues[rid] = self._queues[rid], []
            refs = self._rset.submit(rid, "generate", [r.prompt for r in batch], [r.params for r in batch])
            try:
                outs = (await asyncio.gather(*refs))[0]
            except Exception as e:  # noqa: BLE001
                self._batch_failed(rid, batch, e)
                if self._rset.replicas[rid].status != READY:
                    return
                continue
            for req, out in zip(batch, outs):
                if not req.future.done():
                    req.future.set_result(out)

    def _batch_failed(self, rid: int, batch: list[_Request], exc: BaseException) -> None:
        if is_replica_failure(exc):
            self._rset.fail(rid, "died during generate", exc)
            for req in batch + self._queues[rid]:
                if not req.future.done():
                    req.future.set_exception(_ReplicaFailed())
            self._queues[rid] = []
            return
        err = task_error(exc)
        bad = _bad_index(err, len(batch))
        if bad is None:  # not one request's fault: every request of the batch gets the error
            for req in batch:
                if not req.future.done():
                    req.future.set_exception(err)
            return
        msg = re.sub(r"^prompt \d+", "prompt 0", str(err))
        batch[bad].future.set_exception(type(err)(msg))
        self._queues[rid] = [r for i, r in enumerate(batch) if i != bad] + self._queues[rid]

    # ---- pause / resume ------------------------------------------------------------------
    async def pause_generation(self, mode: str = "wait") -> None:
        """Stop serving (see the module docstring for the modes); returns once nothing runs."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause_generation: mode must be one of {PAUSE_MODES}, got {mode!r}")
        self._resume_event().clear()
        if mode == "wait":
            while any(self._queues.values()) or self._running():
                await asyncio.gather(*self._running(), return_exceptions=True)
                await asyncio.sleep(0)
        self._paused = True
        if mode == "abort":
            for rid, queue in self._queues.items():
                for req in queue:
                    if not req.future.done():
                        req.future.set_exception(RequestAborted("aborted by pause_generation(mode='abort')"))
                self._queues[rid] = []
        await asyncio.gather(*self._running(), return_exceptions=True)

    async def resume_generation(self) -> None:
        """Serve again: queued requests are dispatched, waiting ones routed."""
        self._paused = False
        self._resume_event().set()
        for rid in self._queues:
            self._kick(rid)

    def _running(self) -> list[asyncio.Task]:
        return [t for t in self._dispatchers.values() if not t.done()]

    def _check_no_async_work(self, what: str) -> None:
        if self._running():
            raise RuntimeError(f"{what}: asynchronous requests are running; await pool.pause_generation() first")
