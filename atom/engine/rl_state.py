"""The engine's RL state behind one small facade: which memory is released, releasing and
restoring it, and applying new weights. RolloutEngine (atom/rollout/rl.py) checks the caller's
intent and state; the mechanics, which touch the runner's pools, the block manager and the
weight map, live here, inside the engine. Mixed into LLMEngine."""
from __future__ import annotations

from typing import Iterable

import torch

from atom.engine.memory import KV_CACHE, WEIGHTS
from atom.weights_sync.apply import apply_weights

_ATTENTION_OPS = ("paged_attention_decode", "paged_attention_prefill", "sliding_sink_attention_decode",
                  "sliding_sink_attention_prefill", "mla_attention_decode", "mla_attention_prefill")


class EngineRLState:
    """Needs `runner`, `block_manager`, `config`, `next_kv_wake_lazy`, `kept_through_discard` and
    `release_kv` (LLMEngine)."""

    @property
    def asleep(self) -> set[str]:
        """Which of "weights" / "kv_cache" are released right now."""
        return self.runner.memory.asleep()

    @property
    def sleep_capable(self) -> bool:
        return self.runner.memory.sleep_capable

    @property
    def model_name(self) -> str:
        return type(self.runner.model).__name__

    def named_parameters(self) -> Iterable[tuple[str, torch.Tensor]]:
        """The model's parameters in the engine's layout (the live Parameter objects)."""
        return self.runner.model.named_parameters()

    def memory_bytes(self, tag: str | None, resident: bool) -> int:
        memory = self.runner.memory
        if resident:
            return memory.resident_bytes(tag)
        return sum(memory.nbytes(t) for t in ((KV_CACHE, WEIGHTS) if tag is None else (tag,)))

    @property
    def num_cuda_graphs(self) -> int:
        decode = self.runner.decode_runner
        return 0 if decode is None else len(decode.graphs)

    def release_memory(self, tags: set[str], offload_weights: bool) -> None:
        """Give the named pools back to the device (weights offloaded to pinned host memory or
        discarded). The KV pool goes first; kept requests recompute their KV after the wake."""
        memory = self.runner.memory
        if KV_CACHE in tags:
            self.release_kv()
            self.block_manager.invalidate_cache()
            memory.pools[KV_CACHE].release()
        if WEIGHTS in tags:
            # A discarding release keeps what trainers do not push: the tensors that are buffers in
            # HF models (DeepSeek's e_score_correction_bias), absent from their named_parameters(),
            # would otherwise come back as garbage and route tokens wrongly without an error.
            kept = {} if offload_weights else {
                name: t.detach().to("cpu", copy=True) for name, t in self.runner.weight_map.unpushed_tensors().items()}
            try:
                memory.pools[WEIGHTS].release(offload=offload_weights)
            except BaseException:
                if KV_CACHE in tags:
                    self.restore_kv(lazy=False)
                raise
            if not memory.vmm:  # released storage would stay alive in the cached views
                self.runner.weight_map.forget_views()
            self.kept_through_discard = kept

    def restore_memory(self, tags: set[str]) -> None:
        """Take released pools back: weights first (their offloaded values, or garbage after a
        discarding release), then the KV pool (lazily where the config allows)."""
        if WEIGHTS in tags:
            self.runner.memory.pools[WEIGHTS].restore(zero=False)
            kept, self.kept_through_discard = self.kept_through_discard, {}
            for name, target in self.runner.weight_map.unpushed_tensors().items():
                if name in kept:
                    target.copy_(kept[name])
        if KV_CACHE in tags:
            lazy = self.config.lazy_kv_wake if self.next_kv_wake_lazy is None else self.next_kv_wake_lazy
            self.next_kv_wake_lazy = None  # a one-shot override (EngineProbe.next_kv_wake)
            # Ranks of one engine schedule in lockstep: each must have the same blocks, so no lazy wake there.
            self.restore_kv(lazy=lazy and not self.runner.parallel.is_parallel)

    def restore_kv(self, lazy: bool) -> None:
        """Restore the KV pool (lazy: its first chunk; the block manager backs the rest on demand)."""
        memory = self.runner.memory
        backed = memory.wake_kv(zero=_attention_reads_whole_blocks(), blocks=1 if lazy else None)
        self.block_manager.set_backing(backed, memory.back_kv)

    def apply_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, partial: bool,
                      check_finite: bool) -> set[str]:
        """Copy new weights into the model (atom/weights_sync/apply.py); the prefix cache is
        emptied whenever a parameter may have changed. Returns the names loaded."""
        try:
            done = apply_weights(self.runner.model, self.runner.weight_map, named_tensors, partial=partial,
                                 check_finite=check_finite)
        except BaseException as e:
            if getattr(e, "weights_changed", False):
                self.block_manager.invalidate_cache()
            raise
        self.block_manager.invalidate_cache()
        return done


def _attention_reads_whole_blocks() -> bool:
    """Whether woken KV memory must be zeroed: the torch reference decode reads whole blocks (and
    masks scores, so a NaN left in unwritten slots would leak through 0 * NaN); the triton kernels
    load only slots below each sequence's length, all written before they are read."""
    from atom.ops import ops
    return any(ops.supports(name, "reads_whole_blocks") for name in _ATTENTION_OPS)
