"""RolloutEngine's RL side: sleep / wake_up (give device memory back between rollouts) and
hot weight updates. Mixed into `RolloutEngine`; see README.md (RL features).

State machine:
* awake: generate, update_weights, sleep all allowed.
* sleep(level=1): the KV cache is released ("kv_cache" asleep); weights stay.
* sleep(level=2): KV cache and weights released ("weights" and "kv_cache" asleep); with
  offload_weights=True the weights wait in pinned host memory and come back on wake,
  otherwise they are discarded and the next update_weights must bring a complete set.
* wake_up(tags): restores the named tags (default: all asleep), weights first, so a trainer
  can `wake_up(["weights"])`, `update_weights(...)`, then `wake_up(["kv_cache"])`.
* generate needs everything awake and complete weights; sleep needs everything awake; a call
  in the wrong state raises RuntimeError and changes nothing.
* update_weights, sleep and wake_up need the engine quiet: no live requests, or generation
  paused (pause_generation). Sleeping while requests are kept frees their KV; they recompute
  it after wake_up and resume_generation.

Failed updates: `update_weights` streams, so a failure can come after some parameters were
overwritten. Then the engine marks its weights incomplete and refuses to generate until an
update that brings every required tensor succeeds (a failure before any copy changes nothing).
The network path (atom.weights_sync.WeightReceiver) validates all metadata first and stages the
buckets, so there a failed or broken-off transfer leaves the previous weights serving.
"""
from __future__ import annotations

from collections.abc import Mapping

from typing import Iterable, Sequence

import torch

from atom.engine.memory import KV_CACHE, TAGS, WEIGHTS
from atom.weights_sync.apply import apply_weights


class RLMixin:
    """Needs `self._engine` (LLMEngine) and `self._lock` (the RolloutEngine's call lock)."""

    def _init_rl(self) -> None:
        self._stale: set[str] = set()   # required checkpoint names whose parameters are not valid
        self._stale_reason = ""

    # ---- state ---------------------------------------------------------------------------
    @property
    def is_sleeping(self) -> bool:
        """True while any of the engine's memory (KV cache, weights) is released."""
        return bool(self._engine.runner.memory.asleep())

    @property
    def sleeping_tags(self) -> set[str]:
        """Which of "weights" / "kv_cache" are released right now."""
        return self._engine.runner.memory.asleep()

    @property
    def weights_complete(self) -> bool:
        """False after a discarding sleep or a failed update, until a complete update succeeds."""
        return not self._stale

    def quiet_problem(self) -> str:
        """'' when weights and memory may change now (no live requests, or generation paused), else why not."""
        if self._engine.has_unfinished and self._engine.pause_mode is None:
            return "requests are in flight; call pause_generation() first (or wait until they finish)"
        return ""

    def _check_quiet(self, what: str) -> None:
        problem = self.quiet_problem()
        if problem:
            raise RuntimeError(f"{what}: {problem}")
        self._engine.drain()

    def _check_can_generate(self, paused_ok: bool = False) -> None:
        if not paused_ok and self._engine.pause_mode is not None:
            raise RuntimeError("generate: generation is paused; call resume_generation() first")
        asleep = self.sleeping_tags
        if asleep:
            raise RuntimeError(f"generate: the engine is sleeping ({', '.join(sorted(asleep))} released); "
                               "call wake_up() first")
        if self._stale:
            total = len(self._engine.runner.weight_map.required_names())
            raise RuntimeError(f"generate: the weights are incomplete ({self._stale_reason}; {len(self._stale)} of "
                               f"{total} tensors not loaded); call update_weights with every tensor first")

    def _mark_stale(self, reason: str) -> None:
        self._stale = set(self._engine.runner.weight_map.required_names())
        self._stale_reason = reason

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt prefix (their KV blocks stay free for reuse). Returns False,
        changing nothing, while requests are in flight (their blocks are in use), as vLLM does."""
        with self._lock:
            if self._engine.has_unfinished:
                return False
            self._engine.drain()
            self._engine.reset_prefix_cache()
            return True

    # ---- sleep / wake --------------------------------------------------------------------
    def sleep(self, level: int = 1, offload_weights: bool = False) -> None:
        """Release device memory: level 1 the KV cache, level 2 the weights too.

        offload_weights (level 2 only): keep the weights in pinned host memory and bring them
        back on wake_up; otherwise they are discarded and the next update_weights must carry a
        complete set. The prefix cache is emptied (its KV is gone).
        """
        with self._lock:
            self._sleep(level, offload_weights)

    def _sleep(self, level: int, offload_weights: bool) -> None:
        self._check_quiet("sleep")
        if isinstance(level, bool) or level not in (1, 2):
            raise ValueError(f"sleep: level must be 1 or 2, got {level!r}")
        if offload_weights and level != 2:
            raise ValueError("sleep: offload_weights applies to level 2 (level 1 keeps the weights)")
        memory = self._engine.runner.memory
        if not memory.sleep_capable:
            raise RuntimeError("sleep on CUDA needs EngineConfig(enable_sleep_mode=True) (weights and KV cache "
                               "in CUDA virtual memory, so CUDA graphs stay valid across sleep/wake)")
        if memory.asleep():
            raise RuntimeError(f"sleep: the engine is already sleeping ({', '.join(sorted(memory.asleep()))} "
                               "released); call wake_up() first")
        self._engine.release_kv()  # kept requests (paused) recompute their KV after the wake
        self._engine.block_manager.invalidate_cache()
        memory.pools[KV_CACHE].release()
        if level == 2:
            try:
                memory.pools[WEIGHTS].release(offload=offload_weights)
            except BaseException:
                self._wake_kv(lazy=False)
                raise
            if not memory.vmm:  # released storage would stay alive in the cached views
                self._engine.runner.weight_map.forget_views()
            if not offload_weights:
                self._mark_stale("discarded by sleep(level=2)")

    def wake_up(self, tags: Sequence[str] | str | None = None) -> None:
        """Restore released memory: the given tags ("weights", "kv_cache"), default all asleep.

        Weights come back before the KV cache; woken weights hold their offloaded values, or
        nothing useful after a discarding sleep (update_weights next).
        """
        with self._lock:
            self._wake_up(tags)

    def _wake_up(self, tags: Sequence[str] | str | None) -> None:
        self._check_quiet("wake_up")
        memory = self._engine.runner.memory
        asleep = memory.asleep()
        if isinstance(tags, str):
            tags = [tags]
        wanted = set(asleep) if tags is None else set(tags)
        if tags is not None and not wanted:
            raise ValueError("wake_up: tags is empty; pass None to wake everything that sleeps")
        unknown = sorted(wanted - set(TAGS))
        if unknown:
            raise ValueError(f"wake_up: unknown tag(s) {unknown}; known: {list(TAGS)}")
        if not asleep:
            raise RuntimeError("wake_up: the engine is not sleeping")
        awake = sorted(wanted - asleep)
        if awake:
            raise RuntimeError(f"wake_up: {', '.join(awake)} not asleep (asleep: {', '.join(sorted(asleep))})")
        if WEIGHTS in wanted:  # weights first
            memory.pools[WEIGHTS].restore(zero=False)
        if KV_CACHE in wanted:
            # Ranks of one engine schedule in lockstep: each must have the same blocks, so no lazy wake there.
            self._wake_kv(lazy=self._engine.config.lazy_kv_wake and not self._engine.runner.parallel.is_parallel)

    def _wake_kv(self, lazy: bool) -> None:
        """Restore the KV pool (lazy: its first chunk; the block manager backs the rest on demand)."""
        memory = self._engine.runner.memory
        backed = memory.wake_kv(zero=_attention_reads_whole_blocks(), blocks=1 if lazy else None)
        self._engine.block_manager.set_backing(backed, memory.back_kv)

    # ---- weights -------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, partial: bool = False,
                       check_finite: bool = False, version: int | str | None = None) -> int | str:
        """Load new weights in place; returns the new `weight_version`.

        named_tensors: (HF name, tensor) pairs in any order, consumed one at a time (a generator
            never needs all weights in memory); any floating dtype (cast to the engine's), any
            device. Per-expert and transformers-v5 fused expert names are both accepted.
        partial: accept an update of some tensors only (otherwise every required one must come).
        check_finite: reject tensors holding nan/inf.
        version: the new weight_version, an int or a string as vLLM / SGLang use (default: the
            current one + 1, or 1 after a string version).

        ValueError names the offending tensor (unknown name, wrong shape, non-finite, missing).
        If parameters were already overwritten when an update fails, the engine refuses to
        generate until a complete update succeeds. The prefix cache is emptied by any update.
        """
        with self._lock:
            return self._update_weights(named_tensors, partial, check_finite, version)

    def _update_weights(self, named_tensors, partial: bool, check_finite: bool, version) -> int | str:
        if version is not None and (isinstance(version, bool) or not isinstance(version, (int, str))):
            raise TypeError(f"update_weights: version must be an int or a str, got {version!r}")
        self._check_quiet("update_weights")
        if isinstance(named_tensors, Mapping):  # a state_dict
            named_tensors = named_tensors.items()
        memory = self._engine.runner.memory
        if WEIGHTS in memory.asleep():
            raise RuntimeError("update_weights: the weights are released (sleep level 2); "
                               "call wake_up(['weights']) first")
        runner = self._engine.runner
        try:
            done = apply_weights(runner.model, runner.weight_map, named_tensors, partial=partial,
                                 check_finite=check_finite)
        except BaseException as e:
            if getattr(e, "weights_changed", False):
                self._engine.block_manager.invalidate_cache()
                self._mark_stale(f"an update failed after overwriting some parameters: {e}")
            raise
        self._engine.block_manager.invalidate_cache()
        if partial:
            self._stale -= done
        else:
            self._stale = set()
        if not self._stale:
            self._stale_reason = ""
        old = self._engine.weight_version
        self._engine.weight_version = version if version is not None else (old + 1 if isinstance(old, int) else 1)
        return self._engine.weight_version


def _attention_reads_whole_blocks() -> bool:
    """Whether woken KV memory must be zeroed: the torch reference decode reads whole blocks (and
    masks scores, so a NaN left in unwritten slots would leak through 0 * NaN); the triton kernels
    load only slots below each sequence's length, all written before they are read."""
    from atom.ops import ops
    return any(ops.backend_of.get(name) == "torch" for name in ("paged_attention_decode", "paged_attention_prefill"))
