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
import dataclasses
import inspect
import logging
import time
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

log = logging.getLogger(__name__)

_PAUSE_MODES = ("abort", "wait", "keep")
# generate() keywords of vLLM's accepted at their default value only, and those without effect here.
_GENERATE_DEFAULTS = {"priority": 0, "session_id": None, "reasoning_ended": None, "reasoning_parser_kwargs": None}
_GENERATE_NO_EFFECT = frozenset({"trace_headers", "tokenization_kwargs"})


class LiveRequests:
    """`AsyncLLM.output_processor`, the part of vLLM's that tests and frameworks read: the
    requests whose generate() has not delivered its final output yet (aborted and cancelled
    ones leave at once, as vLLM's abort removes them before it returns)."""

    def __init__(self) -> None:
        self.request_states: dict[str, object] = {}  # request_id -> a token owned by its generate()

    def has_unfinished_requests(self) -> bool:
        return bool(self.request_states)

    def get_num_unfinished_requests(self) -> int:
        return len(self.request_states)

    def add(self, request_id: str) -> object:
        """Claim request_id for one generate(); ValueError while another one holds it."""
        if request_id in self.request_states:
            raise ValueError(f"request_id {request_id!r} is already in use by a live request")
        token = self.request_states[request_id] = object()
        return token

    def remove(self, request_id: str, token: object) -> None:
        if self.request_states.get(request_id) is token:
            del self.request_states[request_id]


class LoggingStatLogger:
    """atom's default stat logger (vLLM's LoggingStatLogger's place): logs the engine's counters
    (`RolloutEngine.stats`) when do_log_stats() runs."""

    def __init__(self, engine: RolloutEngine) -> None:
        self.engine = engine

    def log_engine_initialized(self) -> None:
        log.info("atom AsyncLLM ready: %s, %d KV blocks", self.engine.config.model, self.engine.num_kv_blocks)

    def log(self) -> None:
        st = self.engine.stats
        log.info("atom engine: %d steps, %d prompt tokens computed, %d cached, %d generated, %d preemptions",
                 st.steps, st.prompt_tokens_computed, st.prompt_tokens_cached, st.generated_tokens, st.preemptions)


class StatLoggerManager:
    """`AsyncLLM.logger_manager`: the `stat_loggers` factories given to from_engine_args /
    from_vllm_config (built as vLLM builds them: `factory(vllm_config, engine_index)`, or
    `factory(vllm_config, engine_indexes)` for an aggregating one), then atom's default logger
    unless stats logging is off. do_log_stats() calls each one's `log()`; atom has no per-step
    `record()` data in vLLM's shape, so `record` is not called."""

    def __init__(self, vllm_config: VllmConfig, engine: RolloutEngine, factories: Iterable[Any] | None,
                 enable_default_loggers: bool) -> None:
        self.stat_loggers = [_make_stat_logger(f, vllm_config) for f in factories or ()]
        if enable_default_loggers:
            self.stat_loggers.append(LoggingStatLogger(engine))

    def log_engine_initialized(self) -> None:
        for logger in self.stat_loggers:
            if hasattr(logger, "log_engine_initialized"):
                logger.log_engine_initialized()

    def log(self) -> None:
        for logger in self.stat_loggers:
            logger.log()


def _make_stat_logger(factory: Any, vllm_config: VllmConfig) -> Any:
    if not callable(factory):
        raise TypeError(f"stat_loggers: expected a logger class or factory, got {factory!r}")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: vLLM's positional call
        return factory(vllm_config, 0)
    if "engine_indexes" in params or "engine_idxs" in params:  # vLLM's aggregating loggers
        return factory(vllm_config, [0])
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    return factory(vllm_config, 0) if len(positional) >= 2 else factory(vllm_config)


class _PerIndex:
    """n > 1 streamed as vLLM streams it: every RequestOutput carries one completion (the one
    that advanced, `.index` says which), a completion's finish is reported once, and `finished`
    is set only on the last output of the request. DELTA: the prompt logprobs come with the
    first output of each index (each sample is its own request in vLLM)."""

    def __init__(self, delta: bool) -> None:
        self.delta = delta
        self.sent: dict[int, tuple[int, int]] = {}  # index -> (tokens, text chars) reported (CUMULATIVE)
        self.done: set[int] = set()                 # indices whose finish_reason was reported

    def split(self, result: RequestOutput) -> list[RequestOutput]:
        fresh = [c for c in result.outputs if c.index not in self.done and self._advanced(c)]
        outs = []
        for i, c in enumerate(fresh):
            first = c.index not in self.sent
            self.sent[c.index] = (len(c.token_ids), len(c.text))
            if c.finish_reason is not None:
                self.done.add(c.index)
            keep_prompt = not self.delta or first
            outs.append(dataclasses.replace(result, outputs=[c], finished=result.finished and i == len(fresh) - 1,
                                            prompt_logprobs=result.prompt_logprobs if keep_prompt else None))
        return outs

    def _advanced(self, c) -> bool:
        if c.finish_reason is not None:
            return True  # not reported yet (done is checked first)
        if self.delta:
            return bool(c.token_ids) or bool(c.text)
        return (len(c.token_ids), len(c.text)) != self.sent.get(c.index, (0, 0))


class AsyncLLM:
    """vLLM's AsyncLLM generating with atom: build it with `AsyncLLM.from_engine_args(
    AsyncEngineArgs(model=..., ...))` (the arguments `LLM(...)` takes) or `from_vllm_config`.

    One engine loop thread runs the steps; any number of coroutines call `generate`. Cancelling
    the task that iterates a `generate` aborts its request; `abort(ids)` ends those generators
    with a last output whose finish_reason is "abort" (the tokens so far), as vLLM does.
    """

    def __init__(self, vllm_config: VllmConfig, executor_class: Any = None, log_stats: bool = False,
                 stat_loggers: Iterable[Any] | None = None, **_launch_options: Any) -> None:
        self.vllm_config = vllm_config
        self.engine = RolloutEngine(vllm_config.engine)
        self.async_engine = AsyncRolloutEngine(self.engine)
        self.logprobs_mode = vllm_config.options.logprobs_mode
        self.model_config = ModelConfig(self.engine, self.logprobs_mode)
        self.driver_worker = make_worker(self.engine, vllm_config.options.worker_extension_cls)
        self._decode = TokenDecoder(self.engine.tokenizer)
        self._sleep_paused = False  # sleep() paused generation: wake_up() resumes it once all is awake
        self._wake_waiters: list[asyncio.Future] = []  # requests that arrived while asleep
        self.output_processor = LiveRequests()
        # As vLLM: custom loggers turn stats logging on; the default logger only with log_stats.
        self.log_stats = bool(log_stats or stat_loggers)
        self.logger_manager: StatLoggerManager | None = None
        if self.log_stats:
            self.logger_manager = StatLoggerManager(vllm_config, self.engine, stat_loggers, log_stats)
            self.logger_manager.log_engine_initialized()

    @classmethod
    def from_engine_args(cls, engine_args: AsyncEngineArgs, start_engine_loop: bool = True,
                         usage_context: Any = None, stat_loggers: Iterable[Any] | None = None,
                         **_: Any) -> "AsyncLLM":
        """Build the engine from vLLM's AsyncEngineArgs; `stat_loggers`: logger factories
        (see StatLoggerManager); `disable_log_stats=True` in the args drops atom's default one."""
        if not isinstance(engine_args, AsyncEngineArgs):
            raise TypeError(f"from_engine_args: expected atom.compat.vllm.AsyncEngineArgs, got "
                            f"{type(engine_args).__name__}")
        return cls(engine_args.create_engine_config(usage_context),
                   log_stats=not getattr(engine_args, "disable_log_stats", False), stat_loggers=stat_loggers)

    @classmethod
    def from_vllm_config(cls, vllm_config: VllmConfig, start_engine_loop: bool = True, usage_context: Any = None,
                         stat_loggers: Iterable[Any] | None = None, disable_log_stats: bool = False,
                         **_: Any) -> "AsyncLLM":
        """From `AsyncEngineArgs(...).create_engine_config()`; launch options are ignored."""
        if not isinstance(vllm_config, VllmConfig):
            raise TypeError(f"from_vllm_config: expected the VllmConfig of AsyncEngineArgs.create_engine_config(), "
                            f"got {type(vllm_config).__name__}")
        return cls(vllm_config, log_stats=not disable_log_stats, stat_loggers=stat_loggers)

    # ---- requests ------------------------------------------------------------------------
    async def generate(self, prompt: Any, sampling_params: SamplingParams | None, request_id: str, *,
                       prompt_text: str | None = None, lora_request: Any = None,
                       data_parallel_rank: int | None = None, **kwargs: Any) -> AsyncGenerator[RequestOutput, None]:
        """Yield RequestOutputs for one prompt (a string, {"prompt": ...}, TokensPrompt or token
        ids) as `sampling_params.output_kind` says: CUMULATIVE (default) everything so far at
        every step, DELTA only what is new (prompt logprobs in the first), FINAL_ONLY one at the
        end. With n > 1, CUMULATIVE and DELTA outputs carry one completion each, as vLLM's.
        request_id must not name a live request (ValueError). Cancelling the consumer (or
        closing the generator) aborts the request."""
        self._check_generate_args(request_id, lora_request, data_parallel_rank, kwargs)
        if self.errored:
            raise self.dead_error
        text, ids = parse_prompt(prompt)
        sp = sampling_params if sampling_params is not None else default_sampling_params(self.engine.config.model)
        run, params = atom_request(self.engine, text, ids, sp, self.logprobs_mode)
        shown = prompt_text if prompt_text is not None else text
        token = self.output_processor.add(request_id)
        try:
            await self._wait_while_asleep()
            async with contextlib.aclosing(self._outputs(run, params, request_id, sp, shown)) as outs:
                async for out in outs:
                    if out.finished:  # the request is over for vLLM's output processor too
                        self.output_processor.remove(request_id, token)
                    yield out
        finally:
            self.output_processor.remove(request_id, token)

    def _check_generate_args(self, request_id: Any, lora_request: Any, data_parallel_rank: Any,
                             kwargs: dict[str, Any]) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise TypeError(f"generate: request_id must be a non-empty string, got {request_id!r}")
        if lora_request is not None:
            raise ValueError("generate: LoRA adapters are not supported by atom")
        if data_parallel_rank not in (None, 0):  # one engine: rank 0 is the only one (vLLM's check)
            raise ValueError(f"generate: data_parallel_rank={data_parallel_rank!r} is out of range; this engine "
                             "has one data-parallel rank (0)")
        unsupported = sorted(k for k, v in kwargs.items() if k not in _GENERATE_NO_EFFECT
                             and (k not in _GENERATE_DEFAULTS or v != _GENERATE_DEFAULTS[k]))
        if unsupported:
            raise TypeError(f"generate: unsupported argument(s) {unsupported}")

    async def _wait_while_asleep(self) -> None:
        """vLLM queues requests that arrive while it sleeps; atom's engine refuses them, so they wait here."""
        while (self._sleep_paused or self.engine.is_sleeping) and not self.errored:
            waiter = asyncio.get_running_loop().create_future()
            self._wake_waiters.append(waiter)
            await waiter

    async def _outputs(self, run: Any, params: Any, request_id: str, sp: SamplingParams,
                       shown: str | None) -> AsyncGenerator[RequestOutput, None]:
        """The engine's outputs in vLLM's shape, as sp.output_kind and sp.n ask."""
        if sp.output_kind == RequestOutputKind.FINAL_ONLY:
            yield vllm_output(await self.async_engine.generate(run, params, request_id), request_id, shown, sp,
                              self._decode)
            return
        delta = sp.output_kind == RequestOutputKind.DELTA
        per_index = _PerIndex(delta) if sp.n > 1 else None
        first = True
        async with contextlib.aclosing(self.async_engine.stream(run, params, request_id, cumulative=not delta)) as outs:
            async for out in outs:
                result = vllm_output(out, request_id, shown, sp, self._decode)
                if per_index is not None:
                    for one in per_index.split(result):
                        yield one
                    continue
                if delta and not first:  # vLLM sends the prompt's logprobs once
                    result.prompt_logprobs = None
                first = False
                yield result

    async def abort(self, request_id: str | Iterable[str], internal: bool = False) -> None:
        """Abort live requests (unknown or finished ids are ignored): each one's generator
        yields its last output, finish_reason "abort", and ends."""
        await self.async_engine.abort([request_id] if isinstance(request_id, str) else list(request_id))

    async def wait_for_requests_to_drain(self, drain_timeout: float = 300) -> None:
        """Return once no request is live (running, waiting or held by a pause); TimeoutError
        after drain_timeout seconds."""
        deadline = time.monotonic() + drain_timeout
        while await self.async_engine.call(lambda e: e.has_unfinished_requests()):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"wait_for_requests_to_drain: requests still live after {drain_timeout} s")
            await asyncio.sleep(0.01)

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
        if clear_cache:  # kept requests too: they go on with their own KV, never cached
            await self.async_engine.call(lambda e: e.reset_prefix_cache(reset_running_requests=True))

    async def resume_generation(self) -> None:
        """Continue: kept requests go on, waiting ones start."""
        self._sleep_paused = False
        await self.async_engine.resume_generation()
        if not self.engine.is_sleeping:
            self._wake_all()

    async def is_paused(self) -> bool:
        """True from pause_generation() (or sleep()) until resume_generation() (or a full wake_up())."""
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
        pause of a level-0 sleep). Once nothing sleeps, generation resumes, whatever paused it
        (sleep() or pause_generation()), as vLLM's engine core does."""
        pools = None if tags is None else [t for t in tags if t != "scheduling"]
        if pools is None or pools:
            if self.engine.is_sleeping:
                await self.async_engine.wake_up(pools)
        if not self.engine.is_sleeping:
            await self.resume_generation()

    def _wake_all(self) -> None:
        """Let the requests that waited for a wake-up (or a shutdown) go on."""
        waiters, self._wake_waiters = self._wake_waiters, []
        for w in waiters:  # each on its own event loop
            w.get_loop().call_soon_threadsafe(lambda w=w: w.done() or w.set_result(None))

    async def is_sleeping(self) -> bool:
        """True while generation is paused (sleep(), including level 0, or pause_generation())
        or any memory is released: vLLM's engine core's meaning, so from sleep() until
        wake_up() has brought everything back."""
        return self._sleep_paused or self.engine.is_sleeping or await self.is_paused()

    async def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        """Forget cached prompt prefixes; False (nothing changed) while requests hold blocks,
        unless reset_running_requests (they go on with their own KV, never cached; see
        RolloutEngine.reset_prefix_cache). reset_connector: atom has no KV connector."""
        return await self.async_engine.call(lambda e: e.reset_prefix_cache(reset_running_requests))

    async def reset_mm_cache(self) -> None:
        """vLLM's multi-modal cache (verl empties it at start-up); atom has none."""

    async def reset_encoder_cache(self) -> None:
        """vLLM's encoder-output cache; atom has none."""

    # ---- LoRA: not supported; the queries answer "none loaded" --------------------------------
    async def add_lora(self, lora_request: Any) -> bool:
        raise ValueError("add_lora: LoRA adapters are not supported by atom")

    async def list_loras(self) -> set[int]:
        return set()

    async def remove_lora(self, lora_id: int) -> bool:
        return False

    async def pin_lora(self, lora_id: int) -> bool:
        return False

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
        """Call `log()` on every stat logger (logger_manager); nothing when stats logging is off."""
        if self.logger_manager is not None:
            self.logger_manager.log()

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
