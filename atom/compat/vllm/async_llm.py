"""vLLM's asynchronous engine (`vllm.v1.engine.async_llm.AsyncLLM`, alias `AsyncLLMEngine`) over
atom's AsyncRolloutEngine: the shape verl's agent loop, SkyRL and OpenRLHF's async paths drive.

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=path, enable_sleep_mode=True))
    async for out in engine.generate({"prompt_token_ids": ids}, SamplingParams(...), "req-1"):
        ...                                   # RequestOutput, as SamplingParams.output_kind says
    await engine.pause_generation(mode="keep"); await engine.collective_rpc("update_weight", ...)
    await engine.resume_generation()

See README.md (vLLM compatibility) for what maps to what and what is not supported.
"""
from __future__ import annotations

import asyncio
import contextlib
import warnings
from typing import Any, AsyncGenerator, Callable, Iterable

from atom.compat.vllm.convert import TokenDecoder, atom_request, default_sampling_params, parse_prompt, vllm_output
from atom.compat.vllm.engine_args import AsyncEngineArgs, VllmConfig
from atom.compat.vllm.llm import ModelConfig
from atom.compat.vllm.outputs import RequestOutput
from atom.compat.vllm.sampling_params import RequestOutputKind, SamplingParams
from atom.compat.vllm.worker import call_worker, make_worker
from atom.rollout.async_engine import AsyncRolloutEngine, EngineDeadError
from atom.rollout.engine import RolloutEngine

_PAUSE_MODES = ("abort", "wait", "keep")
# generate() keywords of vLLM's accepted at their default value only, and those without effect here.
_GENERATE_DEFAULTS = {"priority": 0, "data_parallel_rank": None, "session_id": None, "reasoning_ended": None,
                      "reasoning_parser_kwargs": None}
_GENERATE_NO_EFFECT = frozenset({"trace_headers", "tokenization_kwargs"})


class AsyncLLM:
    """vLLM's AsyncLLM generating with atom: build it with `AsyncLLM.from_engine_args(
    AsyncEngineArgs(model=..., ...))` (the arguments `LLM(...)` takes) or `from_vllm_config`.

    One engine loop thread runs the steps; any number of coroutines call `generate`. Cancelling
    the task that iterates a `generate` aborts its request; `abort(ids)` ends those generators
    with a last output whose finish_reason is "abort" (the tokens so far), as vLLM does.
    """

    def __init__(self, vllm_config: VllmConfig, executor_class: Any = None, log_stats: bool = False,
                 **_launch_options: Any) -> None:
        self.vllm_config = vllm_config
        self.engine = RolloutEngine(vllm_config.engine)
        self.async_engine = AsyncRolloutEngine(self.engine)
        self.logprobs_mode = vllm_config.options.logprobs_mode
        self.model_config = ModelConfig(self.engine, self.logprobs_mode)
        self.driver_worker = make_worker(self.engine, vllm_config.options.worker_extension_cls)
        self._decode = TokenDecoder(self.engine.tokenizer)
        self._sleep_paused = False  # sleep() paused generation: wake_up() resumes it once all is awake
        self._wake_waiters: list[asyncio.Future] = []  # requests that arrived while asleep

    @classmethod
    def from_engine_args(cls, engine_args: AsyncEngineArgs, start_engine_loop: bool = True,
                         usage_context: Any = None, stat_loggers: Any = None, **_: Any) -> "AsyncLLM":
        if not isinstance(engine_args, AsyncEngineArgs):
            raise TypeError(f"from_engine_args: expected atom.compat.vllm.AsyncEngineArgs, got "
                            f"{type(engine_args).__name__}")
        return cls(engine_args.create_engine_config(usage_context))

    @classmethod
    def from_vllm_config(cls, vllm_config: VllmConfig, **_: Any) -> "AsyncLLM":
        """From `AsyncEngineArgs(...).create_engine_config()`; logging and launch options are ignored."""
        return cls(vllm_config)

    # ---- requests ------------------------------------------------------------------------
    async def generate(self, prompt: Any, sampling_params: SamplingParams | None, request_id: str, *,
                       prompt_text: str | None = None, lora_request: Any = None,
                       **kwargs: Any) -> AsyncGenerator[RequestOutput, None]:
        """Yield RequestOutputs for one prompt (a string, {"prompt": ...}, TokensPrompt or token
        ids) as `sampling_params.output_kind` says: CUMULATIVE (default) everything so far at
        every step, DELTA only what is new (prompt logprobs in the first), FINAL_ONLY one at the
        end. request_id must not name a live request (ValueError)."""
        if lora_request is not None:
            raise ValueError("generate: LoRA adapters are not supported by atom")
        unsupported = sorted(k for k, v in kwargs.items() if k not in _GENERATE_NO_EFFECT
                             and (k not in _GENERATE_DEFAULTS or v != _GENERATE_DEFAULTS[k]))
        if unsupported:
            raise TypeError(f"generate: unsupported argument(s) {unsupported}")
        text, ids = parse_prompt(prompt)
        sp = sampling_params if sampling_params is not None else default_sampling_params(self.engine.config.model)
        run, params = atom_request(self.engine, text, ids, sp, self.logprobs_mode)
        shown = prompt_text if prompt_text is not None else text
        # vLLM queues requests that arrive while it sleeps; atom's engine refuses them, so they wait here.
        while (self._sleep_paused or self.engine.is_sleeping) and not self.errored:
            waiter = asyncio.get_running_loop().create_future()
            self._wake_waiters.append(waiter)
            await waiter
        if sp.output_kind == RequestOutputKind.FINAL_ONLY:
            yield vllm_output(await self.async_engine.generate(run, params, request_id), request_id, shown, sp,
                              self._decode)
            return
        delta = sp.output_kind == RequestOutputKind.DELTA
        first = True
        async with contextlib.aclosing(self.async_engine.stream(run, params, request_id, cumulative=not delta)) as outs:
            async for out in outs:
                result = vllm_output(out, request_id, shown, sp, self._decode)
                if delta and not first:  # vLLM sends the prompt's logprobs once
                    result.prompt_logprobs = None
                first = False
                yield result

    async def abort(self, request_id: str | Iterable[str], internal: bool = False) -> None:
        """Abort live requests (unknown or finished ids are ignored): each one's generator
        yields its last output, finish_reason "abort", and ends."""
        await self.async_engine.abort([request_id] if isinstance(request_id, str) else list(request_id))

    # ---- pause / sleep ------------------------------------------------------------------------
    async def pause_generation(self, *, mode: str = "abort", wait_for_inflight_requests: bool | None = None,
                               clear_cache: bool = True) -> None:
        """Stop generating, for a weight update: "abort" the live requests (their generators end
        with finish_reason "abort"), "wait" for them to finish, or "keep" them frozen, KV and all,
        to continue on resume_generation(). New requests wait. clear_cache: empty the prefix
        cache once quiet (kept requests' blocks stay; any weight update empties it anyway)."""
        if wait_for_inflight_requests:  # older vLLM's flag
            warnings.warn("pause_generation: wait_for_inflight_requests is deprecated; use mode='wait'",
                          DeprecationWarning, stacklevel=2)
            mode = "wait"
        if mode not in _PAUSE_MODES:
            raise ValueError(f"pause_generation: mode={mode!r} is not one of {_PAUSE_MODES}")
        await self.async_engine.pause_generation(mode)
        if clear_cache:
            await self.async_engine.call(lambda e: e.reset_prefix_cache())

    async def resume_generation(self) -> None:
        """Continue: kept requests go on, waiting ones start."""
        self._sleep_paused = False
        await self.async_engine.resume_generation()
        if not self.engine.is_sleeping:
            self._wake_all()

    async def is_paused(self) -> bool:
        return await self.async_engine.call(lambda e: e.is_paused)

    async def sleep(self, level: int = 1, mode: str = "abort") -> None:
        """Pause generation (`mode` as in pause_generation), then release device memory: level 1
        offloads the weights and drops the KV cache, level 2 drops both, level 0 only pauses.
        wake_up() resumes generation once everything is back."""
        if level not in (0, 1, 2):
            raise ValueError(f"sleep: level must be 0, 1 or 2, got {level!r}")
        # Set first: a request arriving while the pause drains waits for wake_up() here instead
        # of reaching an engine that is about to sleep.
        was_sleep_paused, self._sleep_paused = self._sleep_paused, True
        try:
            if not await self.is_paused():
                await self.pause_generation(mode=mode, clear_cache=level >= 1)
        except BaseException:
            self._sleep_paused = was_sleep_paused
            raise
        if level >= 1:
            await self.async_engine.sleep(level)

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore "weights" and/or "kv_cache" (default: all that sleeps; "scheduling" names the
        pause of a level-0 sleep); generation resumes when nothing sleeps any more."""
        pools = None if tags is None else [t for t in tags if t != "scheduling"]
        if pools is None or pools:
            if self.engine.is_sleeping:
                await self.async_engine.wake_up(pools)
        if self._sleep_paused and not self.engine.is_sleeping:
            await self.resume_generation()
        if not self.engine.is_sleeping:
            self._wake_all()

    def _wake_all(self) -> None:
        """Let the requests that waited for a wake-up (or a shutdown) go on."""
        waiters, self._wake_waiters = self._wake_waiters, []
        for w in waiters:  # each on its own event loop
            w.get_loop().call_soon_threadsafe(lambda w=w: w.done() or w.set_result(None))

    async def is_sleeping(self) -> bool:
        """True from sleep() until wake_up() has brought everything back (vLLM's meaning)."""
        return self._sleep_paused or self.engine.is_sleeping

    async def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        """Forget cached prompt prefixes; False (nothing changed) while requests hold blocks."""
        return await self.async_engine.call(lambda e: e.reset_prefix_cache())

    async def collective_rpc(self, method: str | Callable, timeout: float | None = None, args: tuple = (),
                             kwargs: dict | None = None) -> list[Any]:
        """Call a worker method (the worker-extension methods of atom.compat.vllm.worker, or the
        engine's `worker_extension_cls`) between engine steps; returns [result] (one worker)."""
        return [await self.async_engine.call(lambda e: call_worker(self.driver_worker, method, args, kwargs))]

    # ---- state ---------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    async def get_model_config(self) -> ModelConfig:
        return self.model_config

    async def get_supported_tasks(self) -> tuple[str, ...]:
        return ("generate",)

    async def check_health(self) -> None:
        if self.errored:
            raise self.dead_error

    async def do_log_stats(self) -> None:
        """vLLM logs its throughput here; atom's counters are `engine.stats`."""

    async def is_tracing_enabled(self) -> bool:
        return False

    @property
    def is_running(self) -> bool:
        return self.async_engine.is_running

    @property
    def errored(self) -> bool:
        return not self.async_engine.is_running

    @property
    def is_stopped(self) -> bool:
        return self.errored

    @property
    def dead_error(self) -> BaseException:
        return EngineDeadError("the engine loop is not running (shut down or failed)")

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the engine loop: requests in flight end with finish_reason "abort"; later calls
        raise EngineDeadError."""
        self.async_engine.close(5.0 if timeout is None else timeout)
        self._wake_all()  # requests waiting for a wake-up now meet EngineDeadError


AsyncLLMEngine = AsyncLLM
