"""Diagnostics of a running engine, for benchmarks and debugging (bench/rollout.py, bench/sleep_wake.py).

`RolloutEngine.probe()` hands out an `EngineProbe`; nothing here is needed to generate, and none
of it is a stable API for RL frameworks. What it gives:

* phase timers: wall time of the engine loop's phases (schedule / execute / postprocess),
  an opt-in wrapper installed by `install_phase_timers` and taken out by `remove_phase_timers`;
* the GPU decode path's own timers and the batch sizes of its captured CUDA graphs, and a
  warm-up of chosen decode batch sizes;
* a torch profiler over a window of engine steps (vLLM's / SGLang's start_profile / stop_profile,
  with the steps given up front);
* memory-pool statistics (bytes, physical segments, the driver's mapping seconds), backing the
  rest of a lazily woken KV pool now, and the wake policy of the next wake.

Wrappers are instance attributes over the engine's own methods; each is removed by putting the
method back, and removals must come in the reverse order of installs (checked).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from atom.engine.memory import KV_CACHE, TAGS, WEIGHTS

PHASES = ("schedule", "execute", "postprocess")


@dataclass
class PhaseTimers:
    """Seconds spent in each phase of the engine loop since the timers were installed.
    `execute` is the general path's model step (prefill and mixed batches); the GPU decode
    path's launch and collect are timed by `DecodeRunnerStats.timers` instead.
    `prompt_steps_end_at`: time.perf_counter() at the end of the last step that computed prompt
    tokens (0 before one), and `decode_steps_after` the decode-only steps finished after it: a
    rollout's wall time split into its prompt part and its decode tail, whose per-step time
    (end of the call - prompt_steps_end_at) / decode_steps_after tells a slower device from a
    slower prefill."""
    schedule: float = 0.0
    execute: float = 0.0
    postprocess: float = 0.0
    prompt_steps_end_at: float = 0.0
    decode_steps_after: int = 0

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in PHASES}


@dataclass
class DecodeRunnerStats:
    """The GPU decode path (atom/engine/cuda_graph.py): its timers ("fill", "forward+sample"
    seconds, "steps", "overlapped" counts), the batch sizes of its captured CUDA graphs (sorted)
    and whether those graphs still point at the live KV cache and weights. Empty when the engine
    has not built a decode runner (CPU without overlap_decode, TP/EP, or no decode step yet)."""
    timers: dict[str, float] = field(default_factory=dict)
    graphs: list[int] = field(default_factory=list)
    graphs_current: bool = True


@dataclass
class PoolStats:
    """One memory pool: bytes when awake, bytes on the device now, whether it is released, its
    physical segments and the driver's seconds per call kind ("create", "map", "access"; both
    only for CUDA virtual-memory pools, enable_sleep_mode: 0 and {} otherwise)."""
    tag: str
    nbytes: int
    resident_bytes: int
    released: bool
    segments: int
    map_seconds: dict[str, float]


@dataclass
class MemoryStats:
    """The engine's pools by tag ("weights", "kv_cache"), whether they live in CUDA virtual
    memory, and how many of the KV pool's blocks exist and have memory behind them."""
    pools: dict[str, PoolStats]
    vmm: bool
    kv_num_blocks: int
    kv_backed_blocks: int


@dataclass
class StepProfile:
    """A torch profiler over engine steps [first, last), counted from `profile_steps` (a step is
    counted when its results are processed). `wall_s` is the window's wall time (the device
    synchronized at both ends); `profiler` holds the results once `stopped`."""
    first: int
    last: int
    profiler: torch.profiler.profile
    steps: int = 0
    started: bool = False
    stopped: bool = False
    wall_s: float = 0.0
    _t0: float = 0.0


class _Wrap:
    """Replaces obj.name by make(original) until `undo` puts the original back."""

    def __init__(self, obj, name: str, make: Callable[[Callable], Callable]) -> None:
        self.obj, self.name = obj, name
        self.had_own = name in vars(obj)
        self.original = getattr(obj, name)
        self.wrapper = make(self.original)
        setattr(obj, name, self.wrapper)

    def undo(self) -> None:
        if vars(self.obj).get(self.name) is not self.wrapper:
            raise RuntimeError(f"probe: {type(self.obj).__name__}.{self.name} was wrapped again after this "
                               "wrapper; remove wrappers in the reverse order of installing them")
        if self.had_own:
            setattr(self.obj, self.name, self.original)
        else:
            delattr(self.obj, self.name)


def _timed(timers: PhaseTimers, key: str) -> Callable[[Callable], Callable]:
    def make(fn: Callable) -> Callable:
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                setattr(timers, key, getattr(timers, key) + time.perf_counter() - t)
        return timed
    return make


def _finish_marked(timers: PhaseTimers) -> Callable[[Callable], Callable]:
    """The postprocess timer, which also marks where the prompt steps end (PhaseTimers)."""
    def make(fn: Callable) -> Callable:
        timed = _timed(timers, "postprocess")(fn)

        def marked(batch, *a, **k):
            out = timed(batch, *a, **k)
            if batch.is_decode:
                timers.decode_steps_after += 1
            else:
                timers.prompt_steps_end_at = time.perf_counter()
                timers.decode_steps_after = 0
            return out
        return marked
    return make


class EngineProbe:
    """Diagnostics of one LLMEngine (see the module docstring); from `RolloutEngine.probe()`."""

    def __init__(self, llm) -> None:
        self._llm = llm
        self._phase_wraps: list[_Wrap] = []
        self._profile_wrap: _Wrap | None = None
        self._profile: StepProfile | None = None

    # ---- model (read only) ---------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        """The engine's model (this rank's shard), to count its parameter bytes; do not write to it."""
        return self._llm.runner.model

    @property
    def model_args(self):
        """The engine's ModelArgs (atom/models/hf_config.py)."""
        return self._llm.args

    def reinit_dummy_weights(self) -> None:
        """Refill every parameter with the seeded random values of load_format="dummy" (after a
        discarding sleep: the same values as at build time). Empties the prefix cache. Does not
        mark the weights complete for RolloutEngine: a complete update_weights does that."""
        self._llm.runner.init_dummy_weights()
        self._llm.block_manager.invalidate_cache()

    # ---- phase timers --------------------------------------------------------------------
    def install_phase_timers(self) -> PhaseTimers:
        """Start timing the loop's phases; the returned PhaseTimers fills as the engine runs."""
        if self._phase_wraps:
            raise RuntimeError("install_phase_timers: the phase timers are installed already")
        timers, llm = PhaseTimers(), self._llm
        self._phase_wraps = [_Wrap(llm.scheduler, "schedule", _timed(timers, "schedule")),
                             _Wrap(llm.runner, "execute", _timed(timers, "execute")),
                             _Wrap(llm, "_finish_step", _finish_marked(timers))]
        return timers

    def remove_phase_timers(self) -> None:
        """Put the engine's own methods back (the PhaseTimers keep their values)."""
        if not self._phase_wraps:
            raise RuntimeError("remove_phase_timers: no phase timers are installed")
        for w in reversed(self._phase_wraps):
            w.undo()
        self._phase_wraps = []

    @property
    def phase_timers_installed(self) -> bool:
        return bool(self._phase_wraps)

    # ---- decode runner -------------------------------------------------------------------
    def decode_runner_stats(self) -> DecodeRunnerStats:
        dr = self._llm.runner.decode_runner
        if dr is None:
            return DecodeRunnerStats()
        return DecodeRunnerStats(dict(dr.timers), sorted(dr.graphs), dr.graphs_current)

    def warm_up_decode(self, sizes: list[int] | None = None) -> list[int]:
        """Runs the decode path at these padded batch sizes now (default: every graphed size),
        capturing their CUDA graphs on a GPU (what config.cuda_graphs_at_start does at start-up);
        the sizes run ([] without a decode path). Not while a step is in flight."""
        if self._llm.step_in_flight:
            raise RuntimeError("warm_up_decode: a decode step is in flight; call it between calls")
        if self._llm.asleep:
            raise RuntimeError(f"warm_up_decode: the engine is asleep ({sorted(self._llm.asleep)} released); "
                               "wake it first")
        return self._llm.runner.warm_up_decode(sizes)

    def reset_decode_runner_timers(self) -> None:
        dr = self._llm.runner.decode_runner
        if dr is not None:
            dr.timers.update(dict.fromkeys(dr.timers, 0))

    # ---- profiler window -----------------------------------------------------------------
    def profile_steps(self, first: int, last: int, activities=None, with_stack: bool = False) -> StepProfile:
        """Profile engine steps [first, last) counted from now (first=0: from now on) with a torch
        profiler (default activities: CPU, plus CUDA on a GPU engine). It stops by itself after
        step last - 1; `finish_profile` stops it early and takes the step counter out. with_stack:
        record Python frames too (the host's share of a step by function; slows the host)."""
        if isinstance(first, bool) or isinstance(last, bool) or not isinstance(first, int) or not isinstance(last, int):
            raise ValueError(f"profile_steps: first and last must be ints, got {first!r}, {last!r}")
        if not 0 <= first < last:
            raise ValueError(f"profile_steps: want 0 <= first < last, got first={first}, last={last}")
        if self._profile_wrap is not None:
            raise RuntimeError("profile_steps: a profile window is open already (finish_profile first)")
        from torch.profiler import ProfilerActivity, profile
        if activities is None:
            cuda = self._llm.runner.device.type == "cuda"
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        prof = StepProfile(first, last, profile(activities=activities, with_stack=with_stack))
        self._profile = prof
        if first == 0:
            self._window_start(prof)
        self._profile_wrap = _Wrap(self._llm, "_finish_step", self._counted)
        return prof

    def _counted(self, fn: Callable) -> Callable:
        def counted(*a, **k):
            out = fn(*a, **k)
            prof = self._profile
            prof.steps += 1
            if prof.steps == prof.first and not prof.started:
                self._window_start(prof)
            elif prof.steps == prof.last:
                self._window_stop(prof)
            return out
        return counted

    def _window_start(self, prof: StepProfile) -> None:
        self._llm.runner.synchronize()
        prof.profiler.start()
        prof.started, prof._t0 = True, time.perf_counter()

    def _window_stop(self, prof: StepProfile) -> None:
        self._llm.runner.synchronize()
        prof.wall_s = time.perf_counter() - prof._t0
        prof.profiler.stop()
        prof.stopped = True

    def finish_profile(self) -> StepProfile:
        """Close the profile window: stop the profiler if it still runs (fewer steps than `last`
        ran) and put the engine's step method back; returns the window."""
        if self._profile_wrap is None:
            raise RuntimeError("finish_profile: no profile window is open")
        prof = self._profile
        if prof.started and not prof.stopped:
            self._window_stop(prof)
        self._profile_wrap.undo()
        self._profile_wrap = self._profile = None
        return prof

    # ---- memory --------------------------------------------------------------------------
    def memory_stats(self) -> MemoryStats:
        memory = self._llm.runner.memory
        pools = {}
        for tag in TAGS:
            pool = memory.pools[tag]
            pools[tag] = PoolStats(tag, pool.nbytes, pool.resident_bytes, pool.released,
                                   len(getattr(pool, "segments", ())), dict(getattr(pool, "map_seconds", {})))
        return MemoryStats(pools, memory.vmm, self._llm.block_manager.num_blocks, self._llm.block_manager.backed)

    def reset_map_seconds(self) -> None:
        """Zero the driver's mapping timers of every virtual-memory pool (no-op otherwise)."""
        for pool in self._llm.runner.memory.pools.values():
            if hasattr(pool, "map_seconds"):
                pool.map_seconds = dict.fromkeys(pool.map_seconds, 0.0)

    def back_kv(self, blocks: int) -> int:
        """Give KV blocks [0, blocks) device memory now (what a rollout does a few blocks at a
        time after a lazy wake); returns the blocks backed (fewer when the device lacks the
        memory). A pool that is not backed on demand is backed whole already."""
        n = self._llm.block_manager.num_blocks
        if isinstance(blocks, bool) or not isinstance(blocks, int) or not 0 <= blocks <= n:
            raise ValueError(f"back_kv: blocks must be an int in [0, {n}], got {blocks!r}")
        memory = self._llm.runner.memory
        if memory.pools[KV_CACHE].released:
            raise RuntimeError("back_kv: the KV cache is released (sleep); wake_up first")
        if not memory.kv_on_demand:
            return n
        backed = memory.back_kv(blocks)
        self._llm.block_manager.note_backed(backed)
        return backed

    def drop_weights_host_copy(self) -> None:
        """Free the pinned host buffer that sleep(level=1) keeps for the weights between cycles
        (virtual-memory pools; no-op otherwise)."""
        pool = self._llm.runner.memory.pools[WEIGHTS]
        if hasattr(pool, "drop_host_copy"):
            pool.drop_host_copy()

    def next_kv_wake(self, lazy: bool) -> None:
        """Set how the next wake restores the sleeping KV pool: lazy (its first chunk, the rest
        on demand) or whole, for that wake only; later wakes follow config.lazy_kv_wake again
        (the config is not changed). Engines split over ranks always wake the whole pool, and a
        pool that is not backed on demand (no CUDA virtual memory) is restored whole either way."""
        if not isinstance(lazy, bool):
            raise ValueError(f"next_kv_wake: lazy must be True or False, got {lazy!r}")
        if KV_CACHE not in self._llm.asleep:
            raise RuntimeError("next_kv_wake: the KV cache is not asleep; sleep or release it first")
        self._llm.next_kv_wake_lazy = lazy

    @property
    def pending_kv_wake(self) -> bool | None:
        """The override `next_kv_wake` set for the coming wake (None: none set)."""
        return self._llm.next_kv_wake_lazy
