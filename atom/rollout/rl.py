"""RolloutEngine's RL side: sleep / wake_up (give device memory back between rollouts) and
hot weight updates. Mixed into `RolloutEngine`; see README.md (RL features).

State machine (the pools are "weights" and "kv_cache"):
* awake: generate, update_weights, sleep all allowed.
* sleep(level=1) (vLLM's meaning): the weights wait in pinned host memory and come back on
  wake; the KV cache is dropped.
* sleep(level=2): weights and KV cache dropped; the next update_weights must bring a complete
  set (generate refuses until then).
* release_memory_occupation(tags, offload_weights=False) (SGLang's meaning): release the named
  pools only, e.g. tags=["kv_cache"] keeps the weights on the device.
* wake_up(tags) / resume_memory_occupation(tags): restores the named tags (default: all
  asleep), weights first, so a trainer can `wake_up(["weights"])`, `update_weights(...)`,
  then `wake_up(["kv_cache"])`.
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

from atom.engine.memory import TAGS, WEIGHTS
from atom.weights_sync.validate import TensorSpec, spec_problems, summarize


class RLMixin:
    """Needs `self._engine` (LLMEngine) and `self._lock` (the RolloutEngine's call lock)."""

    def _init_rl(self) -> None:
        self._stale: set[str] = set()   # required checkpoint names whose parameters are not valid
        self._stale_reason = ""

    # ---- state ---------------------------------------------------------------------------
    @property
    def is_sleeping(self) -> bool:
        """True while any of the engine's memory (KV cache, weights) is released."""
        return bool(self._engine.asleep)

    @property
    def sleeping_tags(self) -> set[str]:
        """Which of "weights" / "kv_cache" are released right now."""
        return self._engine.asleep

    @property
    def weights_complete(self) -> bool:
        """False after a discarding sleep or a failed update, until a complete update succeeds."""
        return not self._stale

    def weight_check_targets(self):
        """(weight map, model class name): what an incoming update is validated against."""
        return self._engine.weight_map, self._engine.model_name

    def quiet_problem(self) -> str:
        """'' when weights and memory may change now (no live requests, or generation paused), else why not."""
        if self._engine.has_unfinished and self._engine.pause_mode is None:
            return "requests are in flight; call pause_generation() first (or wait until they finish)"
        return ""

    def weight_update_problem(self, specs: list[TensorSpec], partial: bool = True) -> str:
        """'' when an update of these tensors (name, shape, dtype) can be applied now, else why
        not: requests in flight, weights released, or each bad tensor named."""
        problem = self.quiet_problem()
        if problem:
            return problem
        if WEIGHTS in self.sleeping_tags:
            return "the weights are released (sleep); call wake_up(['weights']) first"
        return summarize(spec_problems(self._engine.weight_map, specs, partial))

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> torch.Tensor:
        """The first `truncate_size` values (flattened) of an HF-named weight as this engine holds
        it, on the CPU (SGLang's check that a sync landed). Under TP/EP: this rank's shard."""
        slot = self._engine.weight_map.lookup(name)
        if slot is None:
            raise ValueError(f"get_weights_by_name: {name!r} is not a parameter of this model")
        with self._lock:
            t = slot.target()
            if t is None:
                raise ValueError(f"get_weights_by_name: {name!r} is held by other ranks of this engine")
            flat = t.view(-1) if t.is_contiguous() else t.reshape(-1)
            return flat[:truncate_size].detach().cpu().clone()

    def named_parameters(self) -> Iterable[tuple[str, torch.Tensor]]:
        """(name, tensor) of every parameter this engine (this rank) holds, in the engine's own
        layout: fused qkv / gate_up, stacked experts, this rank's shard, so names and shapes are
        not the checkpoint's (get_weights_by_name reads a tensor by its HF name). The live
        Parameter objects, to read in checks: that an update landed, that a sleep kept the
        weights, their objects and addresses. Do not write to them: that bypasses
        update_weights' checks, the weight version and the prefix cache's invalidation."""
        return self._engine.named_parameters()

    def memory_bytes(self, tag: str | None = None, resident: bool = True) -> int:
        """Device bytes of the engine's memory pools, "weights" or "kv_cache" (None: both):
        resident=True what they hold on the device right now (0 while released by sleep), False
        what they hold when awake."""
        if tag is not None and tag not in TAGS:
            raise ValueError(f"memory_bytes: tag must be one of {sorted(TAGS)} or None, got {tag!r}")
        return self._engine.memory_bytes(tag, resident)

    @property
    def engine_rank(self) -> int:
        """This process's rank in its engine group (0 unless the engine is split over ranks)."""
        return self._engine.engine_rank

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
            total = len(self._engine.weight_map.required_names())
            raise RuntimeError(f"generate: the weights are incomplete ({self._stale_reason}; {len(self._stale)} of "
                               f"{total} tensors still need an update); call update_weights with every tensor first")

    def _mark_stale(self, reason: str) -> None:
        self._stale = set(self._engine.weight_map.required_names())
        self._stale_reason = reason

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """Forget every cached prompt prefix (their KV blocks stay free for reuse). While requests
        are in flight this returns False, changing nothing, as vLLM does, unless
        `reset_running_requests`: then the cache is emptied anyway and the running requests go on
        with their own KV, which is never cached (vLLM preempts them and recomputes instead)."""
        if not isinstance(reset_running_requests, bool):
            raise TypeError(f"reset_prefix_cache: reset_running_requests must be a bool, got {reset_running_requests!r}")
        with self._lock:
            if self._engine.has_unfinished and not reset_running_requests:
                return False
            self._engine.drain()
            self._engine.reset_prefix_cache()
            return True

    # ---- sleep / wake --------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        """Release device memory, with vLLM's meaning of the levels:

        level 1: the weights go to (pinned) host memory and come back on wake_up; the KV cache
            is dropped.
        level 2: the weights and the KV cache are both dropped; the next update_weights must
            bring a complete set (generate refuses until then).
        The prefix cache is emptied (its KV is gone). For one pool at a time, see
        release_memory_occupation.
        """
        if isinstance(level, bool) or level not in (1, 2):
            raise ValueError(f"sleep: level must be 1 (offload the weights, drop the KV cache) or 2 (drop both), "
                             f"got {level!r}")
        with self._lock:
            asleep = self.sleeping_tags
            if asleep:
                raise RuntimeError(f"sleep: the engine is already sleeping ({', '.join(sorted(asleep))} released); "
                                   "call wake_up() first")
            self._release("sleep", set(TAGS), offload_weights=level == 1)

    def release_memory_occupation(self, tags: Sequence[str] | str | None = None, *,
                                  offload_weights: bool = False) -> None:
        """Release the named pools ("weights", "kv_cache"; default both), as SGLang's call does.

        Weights are dropped (the next update_weights must bring them) unless offload_weights,
        which keeps them in pinned host memory until resume_memory_occupation / wake_up
        (SGLang's enable_weights_cpu_backup). A pool that is already released: RuntimeError.
        """
        what = "release_memory_occupation"
        with self._lock:
            wanted = _parse_tags(what, tags)
            if offload_weights and WEIGHTS not in wanted:
                raise ValueError(f"{what}: offload_weights needs the 'weights' tag")
            already = sorted(wanted & self.sleeping_tags)
            if already:
                raise RuntimeError(f"{what}: {', '.join(already)} already released; resume it first")
            self._release(what, wanted, offload_weights)

    def resume_memory_occupation(self, tags: Sequence[str] | str | None = None) -> None:
        """Take released pools back (SGLang's name for wake_up): default every released one."""
        self.wake_up(tags)

    def _release(self, what: str, tags: set[str], offload_weights: bool) -> None:
        self._check_quiet(what)
        if not self._engine.sleep_capable:
            raise RuntimeError(f"{what} on CUDA needs EngineConfig(enable_sleep_mode=True) (weights and KV cache "
                               "in CUDA virtual memory, so CUDA graphs stay valid across sleep/wake)")
        self._engine.release_memory(tags, offload_weights)
        if WEIGHTS in tags and not offload_weights:
            self._mark_stale(f"discarded by {what}")

    def wake_up(self, tags: Sequence[str] | str | None = None) -> None:
        """Restore released memory: the given tags ("weights", "kv_cache"), default all asleep.

        Weights come back before the KV cache; woken weights hold their offloaded values, or
        nothing useful after a discarding sleep (update_weights next).
        """
        with self._lock:
            self._wake_up(tags)

    def _wake_up(self, tags: Sequence[str] | str | None) -> None:
        self._check_quiet("wake_up")
        asleep = self._engine.asleep
        wanted = set(asleep) if tags is None else _parse_tags("wake_up", tags)
        if not asleep:
            raise RuntimeError("wake_up: the engine is not sleeping")
        awake = sorted(wanted - asleep)
        if awake:
            raise RuntimeError(f"wake_up: {', '.join(awake)} not asleep (asleep: {', '.join(sorted(asleep))})")
        self._engine.restore_memory(wanted)

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
        if WEIGHTS in self._engine.asleep:
            raise RuntimeError("update_weights: the weights are released (sleep); "
                               "call wake_up(['weights']) first")
        try:
            done = self._engine.apply_weights(named_tensors, partial=partial, check_finite=check_finite)
        except BaseException as e:
            if getattr(e, "weights_changed", False):
                total = len(self._engine.weight_map.required_names())
                loaded = len(getattr(e, "names_loaded", ()))
                self._mark_stale(f"an update failed after overwriting {loaded} of {total} tensors, the others hold "
                                 f"the weights from before: {e}")
            raise
        if partial:
            self._stale -= done
        else:
            self._stale = set()
        if not self._stale:
            self._stale_reason = ""
        old = self._engine.weight_version
        self._engine.weight_version = version if version is not None else (old + 1 if isinstance(old, int) else 1)
        return self._engine.weight_version


def _parse_tags(what: str, tags: Sequence[str] | str | None) -> set[str]:
    """The set of pool tags a call names (None: all of them); ValueError for an empty or unknown one."""
    if tags is None:
        return set(TAGS)
    if isinstance(tags, str):
        tags = [tags]
    wanted = set(tags)
    if not wanted:
        raise ValueError(f"{what}: tags is empty; pass None for every pool")
    unknown = sorted(wanted - set(TAGS), key=str)
    if unknown:
        raise ValueError(f"{what}: unknown tag(s) {unknown}; known: {list(TAGS)}")
    return wanted

