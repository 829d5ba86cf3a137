"""AsyncRolloutEngine: the asyncio front end. Many coroutines submit requests; one loop thread
owns the engine and runs its steps; results travel back to each caller's event loop.

Every engine call happens on the loop thread (commands from callers wait in an inbox and run
between steps), so the engine keeps a single owner; the callers' coroutines only await.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import queue
import threading
import uuid
from typing import Any, AsyncIterator, Callable

from atom.config import EngineConfig
from atom.outputs import RolloutOutput
from atom.rollout.engine import Prompt, RolloutEngine
from atom.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (shutdown, or an error that ended it)."""


@dataclasses.dataclass
class _Stream:
    """One live request's channel back to its caller (touched by the loop thread only, except `queue`)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    mode: str  # "delta" | "cumulative": an output every step; "final": the last one only
    sent_tokens: dict[int, int] = dataclasses.field(default_factory=dict)  # sample index -> tokens sent
    sent_text: dict[int, int] = dataclasses.field(default_factory=dict)

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, value: Any = None,
             error: BaseException | None = None) -> None:
    def settle() -> None:
        if fut.done():  # the caller gave up (cancelled)
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)
    loop.call_soon_threadsafe(settle)


class AsyncRolloutEngine:
    """Asynchronous generation for frameworks that drive the engine from an event loop.

    Example::

        engine = AsyncRolloutEngine("path/to/checkpoint")
        out = await engine.generate([1, 2, 3], SamplingParams(max_tokens=32), request_id="a")
        async for delta in engine.stream("Hello", SamplingParams(max_tokens=32)):
            print(delta.outputs[0].token_ids)          # this step's new tokens
        await engine.pause_generation("keep")
        await engine.update_weights(state_dict.items())
        await engine.resume_generation()
        await engine.shutdown()

    Cancelling the task awaiting a request aborts it. An error caused by one request (bad
    prompt, bad parameters, duplicate id) reaches its caller only.
    """

    def __init__(self, model: str | EngineConfig | RolloutEngine, **overrides) -> None:
        self.engine = model if isinstance(model, RolloutEngine) else RolloutEngine(model, **overrides)
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._pause_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._stopping = False
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="atom-engine-loop", daemon=True)
        self._thread.start()

    # ---- requests ------------------------------------------------------------------------
    async def generate(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None) -> RolloutOutput:
        """Run one prompt to completion; returns its RolloutOutput (finish_reason "abort" if it
        was aborted, with the tokens so far)."""
        out = None
        async for out in self._submit(prompt, sampling_params, request_id, "final"):
            pass
        return out

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
               request_id: str | None = None, cumulative: bool = False) -> AsyncIterator[RolloutOutput]:
        """Yield one RolloutOutput per step that advanced the request, holding only what is new
        (token ids, logprobs, top logprobs, text), or with cumulative=True everything so far;
        the last one has finished=True and each completion's finish_reason."""
        return self._submit(prompt, sampling_params, request_id, "cumulative" if cumulative else "delta")

    async def _submit(self, prompt, params, request_id, mode: str) -> AsyncIterator[RolloutOutput]:
        self._check_alive()
        rid = request_id if request_id is not None else uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), mode)
        self._send(lambda: self._add(rid, prompt, params, stream))
        done = False
        try:
            while not done:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                done = item.finished
                yield item
        finally:
            if not done:  # cancelled, or the caller stopped iterating: free the request
                self._send(lambda: self._abort_quietly(rid, stream))

    async def abort(self, request_ids: str | list[str]) -> dict[str, RolloutOutput | None]:
        """Abort live requests; their callers get the partial output (finish_reason "abort").
        Returns {request_id: that output, or None for an unknown or finished id}."""
        return await self._call(lambda: self._abort(request_ids))

    # ---- pause / resume ------------------------------------------------------------------
    async def pause_generation(self, mode: str = "abort") -> None:
        """Pause ("abort" | "wait" | "keep", see RolloutEngine.pause_generation); returns when
        the engine is quiet, so update_weights / sleep / wake_up may run."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def begin() -> None:
            for out in self.engine._pause_begin(mode):
                self._finish_stream(out)
            self._pause_waiters.append((loop, fut))
        await self._call(begin)
        await fut

    async def resume_generation(self, recompute_kv: bool = False) -> None:
        """Continue after pause_generation (see RolloutEngine.resume_generation). A
        pause_generation still waiting for quiet (mode "wait" draining) returns at once with a
        RuntimeError in its caller: the engine never got quiet, so it must not update weights."""
        def resume() -> None:
            quiet = self.engine._pause_reached()
            self.engine.resume_generation(recompute_kv=recompute_kv)
            waiters, self._pause_waiters = self._pause_waiters, []
            for loop, fut in waiters:
                _resolve(loop, fut, error=None if quiet else RuntimeError(
                    "pause_generation: resume_generation() was called before the engine was quiet"))
        await self._call(resume)

    # ---- everything else runs on the loop thread too ---------------------------------------
    async def update_weights(self, named_tensors, **kwargs) -> int | str:
        """RolloutEngine.update_weights on the loop thread (needs no live requests, or a pause)."""
        return await self._call(lambda: self.engine.update_weights(named_tensors, **kwargs))

    async def sleep(self, level: int = 1) -> None:
        """RolloutEngine.sleep: level 1 offloads the weights and drops the KV cache, 2 drops both."""
        await self._call(lambda: self.engine.sleep(level))

    async def wake_up(self, tags=None) -> None:
        await self._call(lambda: self.engine.wake_up(tags))

    async def release_memory_occupation(self, tags=None, *, offload_weights: bool = False) -> None:
        """RolloutEngine.release_memory_occupation (SGLang's call: release the named pools)."""
        await self._call(lambda: self.engine.release_memory_occupation(tags, offload_weights=offload_weights))

    async def resume_memory_occupation(self, tags=None) -> None:
        await self._call(lambda: self.engine.resume_memory_occupation(tags))

    async def call(self, fn: Callable[[RolloutEngine], Any]) -> Any:
        """Run fn(engine) on the loop thread between steps (anything else the engine offers)."""
        return await self._call(lambda: fn(self.engine))

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the loop: requests still in flight end with finish_reason "abort"."""
        if self._thread.is_alive():
            self._send(self._stop)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """shutdown() for code without an event loop."""
        if self._thread.is_alive():
            self._send(self._stop)
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    # ---- plumbing (caller side) ----------------------------------------------------------
    def _check_alive(self) -> None:
        if self._dead is not None or self._stopping or not self._thread.is_alive():
            raise EngineDeadError("the engine loop is not running (shut down or failed)") from self._dead

    def _send(self, cmd: Callable[[], None]) -> None:
        self._inbox.put(cmd)

    async def _call(self, fn: Callable[[], Any]) -> Any:
        self._check_alive()
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            if self._stopping:
                fut.set_exception(EngineDeadError("the engine loop stopped before this call ran"))
                return
            try:
                fut.set_result(fn())
            except BaseException as e:  # the caller's error, raised in the caller
                fut.set_exception(e)
        self._send(run)
        return await asyncio.wrap_future(fut)

    # ---- the loop thread -----------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stopping:
                busy = self.engine._has_work()
                self._run_commands(block=not busy)
                if self._stopping:
                    break
                if self.engine._has_work() or self.engine._has_unclaimed():
                    self._step()
                if self._pause_waiters and self.engine._pause_reached():
                    for loop, fut in self._pause_waiters:
                        _resolve(loop, fut)
                    self._pause_waiters = []
        except BaseException as e:  # a bug in the loop itself: every caller hears of it
            self._dead = e
            self._fail_all(EngineDeadError(f"the engine loop failed: {e!r}"))
        finally:
            self._stopping = True
            self._abort_everything()

    def _run_commands(self, block: bool) -> None:
        tick = self.engine._tick_s  # an engine group's rank 0 keeps its followers from timing out
        try:
            cmd = self._inbox.get(timeout=tick) if block else self._inbox.get_nowait()
        except queue.Empty:
            if block:
                self.engine._idle_tick()
            return
        while True:
            cmd()
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        try:
            reqs = self.engine._step_requests()
        except Exception as e:  # the engine aborted everything; each caller gets the error
            self._fail_all(e)
            return
        for req in reqs:
            stream = self._streams.get(req.request_id)
            if stream is None:
                continue
            if req.finished:
                self._streams.pop(req.request_id)
            elif stream.mode == "final":
                continue
            stream.put(self._shaped(stream, self.engine._output(req)))

    def _shaped(self, stream: _Stream, full: RolloutOutput) -> RolloutOutput:
        return self._delta_of(stream, full) if stream.mode == "delta" else full

    @staticmethod
    def _delta_of(stream: _Stream, full: RolloutOutput) -> RolloutOutput:
        """What of `full` the stream has not sent yet (and note it as sent)."""
        deltas = []
        for c in full.outputs:
            t0, x0 = stream.sent_tokens.get(c.index, 0), stream.sent_text.get(c.index, 0)
            stream.sent_tokens[c.index], stream.sent_text[c.index] = len(c.token_ids), len(c.text)
            deltas.append(dataclasses.replace(
                c, token_ids=c.token_ids[t0:], text=c.text[x0:], logprobs=c.logprobs[t0:],
                top_logprobs=c.top_logprobs[t0:], logprob_ranks=c.logprob_ranks[t0:]))
        return dataclasses.replace(full, outputs=deltas)

    def _add(self, rid: str, prompt, params, stream: _Stream) -> None:
        try:
            if self._stopping:
                raise EngineDeadError("the engine loop stopped before this request was added")
            if rid in self._streams:
                raise ValueError(f"request_id {rid!r} is already in use by a live request")
            self.engine.add_request(rid, prompt, params)
        except Exception as e:  # this request's error: its caller only
            stream.put(e)
            return
        self._streams[rid] = stream

    def _abort(self, request_ids) -> dict[str, RolloutOutput | None]:
        result = self.engine.abort(request_ids)
        for out in result.values():
            if out is not None:
                self._finish_stream(out)
        return result

    def _abort_quietly(self, rid: str, stream: _Stream) -> None:
        if self._streams.get(rid) is stream:
            self._streams.pop(rid)
            self.engine.abort([rid])

    def _finish_stream(self, out: RolloutOutput) -> None:
        stream = self._streams.pop(out.request_id, None)
        if stream is not None:
            stream.put(self._shaped(stream, out))

    def _stop(self) -> None:
        self._stopping = True

    def _abort_everything(self) -> None:
        try:
            for out in self.engine.abort_all():
                self._finish_stream(out)
            self.engine.stop_followers()
        except Exception as e:
            self._fail_all(e)
        self._fail_all(EngineDeadError("the engine loop stopped"))  # anything left (e.g. not yet added)
        for loop, fut in self._pause_waiters:
            _resolve(loop, fut, error=EngineDeadError("the engine loop stopped"))
        self._pause_waiters = []
        while True:  # commands that arrived too late: their callers must not wait forever
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                break
            try:
                cmd()  # with _stopping set, each command fails its caller instead of running
            except Exception:
                pass

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(error)

