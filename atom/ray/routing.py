"""Asynchronous requests across the replicas (mixed into ReplicaPool).

`await pool.generate_async(prompt, params, request_id)` picks a replica with the Router (least
outstanding requests; a request_id's sticky key keeps a conversation on the replica holding its
prefix cache) and sends the request there:

* one-rank replicas host an AsyncRolloutEngine: each request is its own call and joins the
  replica's running batch at its next step (continuous batching across callers);
* replicas of several ranks (TP / EP) must see the same requests at the same steps, so their
  requests are gathered in the pool: while a replica runs a batch, new requests wait and go
  together, to every rank, as its next batch.

If the replica dies, its requests are routed again to the others; they carry their seeds, so
their outputs do not change.

`pause_generation(mode)` / `resume_generation()`: new requests wait in the pool until resume;
requests on one-rank replicas follow the engine's modes ("abort": they return now with
finish_reason "abort" and their tokens so far; "wait": they finish first; "keep": they freeze,
KV kept, and continue after resume). On several-rank replicas a running batch cannot be stopped
midway: it finishes; "abort" fails the requests still waiting with RequestAborted.
"""
from __future__ import annotations

import asyncio
import re
import uuid

from atom.outputs import RolloutOutput
from atom.ray.replicas import READY, STALE, is_replica_failure, task_error
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
        self._live: dict[str, int] = {}  # request_id -> replica, for abort
        self._paused: str | None = None  # the pause mode while paused
        self._resumed: asyncio.Event | None = None

    def _resume_event(self) -> asyncio.Event:
        if self._resumed is None:
            self._resumed = asyncio.Event()
            self._resumed.set()
        return self._resumed

    async def generate_async(self, prompt, sampling_params: SamplingParams | None = None,
                             request_id: str | None = None) -> RolloutOutput:
        """One prompt's completions from whichever replica the router picks.

        request_id: unique among live requests; its part before `config.sticky_separator` is a
        sticky key ("conv7:turn2" and "conv7:turn3" go to the same replica while it is healthy).
        Raises the engine's ValueError for a bad request, RequestAborted when
        pause_generation(mode="abort") dropped it before it ran, and RuntimeError when no
        replica is left.
        """
        params = self._seeded(self._per_prompt_params(sampling_params, 1))[0]
        engine_id = request_id if request_id is not None else uuid.uuid4().hex
        while True:
            await self._resume_event().wait()
            self._heal()
            self._router.healthy = set(self._rset.ids(READY))
            rid = self._router.pick(request_id)
            if rid is None:
                self._rset.check_alive()
                await asyncio.sleep(0.05)
                continue
            self._router.started(rid)
            self._live[engine_id] = rid
            try:
                if self._rset.W == 1:
                    return await self._one(rid, prompt, params, engine_id)
                return await self._batched(rid, prompt, params)
            except _ReplicaFailed:
                continue
            finally:
                self._router.finished(rid)
                self._live.pop(engine_id, None)

    async def abort(self, request_ids: str | list[str]) -> dict[str, RolloutOutput | None]:
        """Abort live requests on one-rank replicas: their callers get the tokens so far
        (finish_reason "abort"). {request_id: that output, or None when unknown or finished}."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        by_replica: dict[int, list[str]] = {}
        for i in ids:
            if i in self._live and self._rset.W == 1:
                by_replica.setdefault(self._live[i], []).append(i)
        out: dict[str, RolloutOutput | None] = {i: None for i in ids}
        for rid, some in by_replica.items():
            try:
                out.update(await self._rset.replicas[rid].ranks[0].abort.remote(some))
            except Exception as e:  # noqa: BLE001 - a dead replica's requests are re-routed, not aborted
                if not is_replica_failure(e):
                    raise task_error(e) from None
        return out

    # ---- one-rank replicas: a call per request -----------------------------------------------
    async def _one(self, rid: int, prompt, params: SamplingParams, engine_id: str) -> RolloutOutput:
        rep = self._rset.replicas[rid]
        seen, ref = rep.restarts, rep.ranks[0].generate_one.remote(prompt, params, engine_id)
        try:
            return await ref
        except Exception as e:  # noqa: BLE001
            if is_replica_failure(e):
                self._rset.fail(rid, "died during generate", e, seen)
                raise _ReplicaFailed() from None
            raise task_error(e) from None

    # ---- several-rank replicas: batches gathered in the pool ---------------------------------
    async def _batched(self, rid: int, prompt, params: SamplingParams) -> RolloutOutput:
        req = _Request(prompt, params, asyncio.get_running_loop().create_future())
        self._queues[rid].append(req)
        self._kick(rid)
        return await req.future

    def _kick(self, rid: int) -> None:
        task = self._dispatchers.get(rid)
        if (task is None or task.done()) and self._queues[rid] and self._paused is None:
            self._dispatchers[rid] = asyncio.get_running_loop().create_task(self._dispatch(rid))

    async def _dispatch(self, rid: int) -> None:
        """Send the replica's queue as one batch to every rank, repeatedly, until empty or paused."""
        while self._queues[rid] and self._paused is None:
            batch, self._queues[rid] = self._queues[rid], []
            seen = self._rset.replicas[rid].restarts
            refs = self._rset.submit(rid, "generate", [r.prompt for r in batch], [r.params for r in batch])
            try:
                outs = (await asyncio.gather(*refs))[0]
            except Exception as e:  # noqa: BLE001
                self._batch_failed(rid, batch, e, seen)
                if self._rset.replicas[rid].status != READY:
                    return
                continue
            for req, out in zip(batch, outs):
                if not req.future.done():
                    req.future.set_result(out)

    def _batch_failed(self, rid: int, batch: list[_Request], exc: BaseException, restarts_seen: int) -> None:
        if is_replica_failure(exc):
            self._rset.fail(rid, "died during generate", exc, restarts_seen)
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
        batch[bad].future.set_exception(type(err)(re.sub(r"^prompt \d+", "prompt 0", str(err))))
        self._queues[rid] = [r for i, r in enumerate(batch) if i != bad] + self._queues[rid]

    # ---- pause / resume ------------------------------------------------------------------
    async def pause_generation(self, mode: str = "abort") -> None:
        """Stop serving (modes in the module docstring); returns once the replicas are quiet, so
        push / sleep / wake_up may run."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause_generation: mode must be one of {PAUSE_MODES}, got {mode!r}")
        self._resume_event().clear()
        if self._rset.W == 1:
            self._paused = mode
            await self._fan_out("pause_generation", mode)
            return
        if mode == "wait":
            while any(self._queues.values()) or self._running():
                await asyncio.gather(*self._running(), return_exceptions=True)
                await asyncio.sleep(0)
        self._paused = mode
        if mode == "abort":
            for rid, queue in self._queues.items():
                for req in queue:
                    if not req.future.done():
                        req.future.set_exception(RequestAborted("aborted by pause_generation(mode='abort')"))
                self._queues[rid] = []
        await asyncio.gather(*self._running(), return_exceptions=True)

    async def resume_generation(self, recompute_kv: bool = False) -> None:
        """Serve again: kept requests continue (recompute_kv: their KV is first recomputed under
        the new weights, see RolloutEngine.resume_generation), waiting ones are routed."""
        if self._rset.W == 1 and self._paused is not None:
            await self._fan_out("resume_generation", recompute_kv)
        self._paused = None
        self._resume_event().set()
        for rid in self._queues:
            self._kick(rid)

    async def _fan_out(self, method: str, *args) -> None:
        rids = self._rset.ids(READY, STALE)
        seen = [self._rset.replicas[r].restarts for r in rids]
        results = await asyncio.gather(*(getattr(self._rset.replicas[r].ranks[0], method).remote(*args)
                                         for r in rids), return_exceptions=True)
        for rid, res, restarts in zip(rids, results, seen):
            if isinstance(res, BaseException):
                if not is_replica_failure(res):
                    raise task_error(res)
                self._rset.fail(rid, f"died during {method}", res, restarts)

    def _running(self) -> list[asyncio.Task]:
        return [t for t in self._dispatchers.values() if not t.done()]

    def _check_quiet(self, what: str) -> None:
        busy = self._running() or any(self._router.outstanding.values())
        if busy and self._paused is None:
            raise RuntimeError(f"{what}: asynchronous requests are running; await pool.pause_generation() first")
