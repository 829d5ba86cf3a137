"""The one typed configuration of a `ReplicaPool`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from atom.config import EngineConfig

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class PoolConfig:
    """How many engine replicas, where they run, and how the pool treats failures.

    engine: the EngineConfig every replica builds (its tensor / expert parallel sizes give the
        ranks per replica, one Ray actor each).
    num_replicas: engines serving requests side by side.
    num_gpus_per_rank: GPUs each rank actor takes (None: 1 when the engine's device is cuda, or is
        "auto" on a cluster with GPUs; else 0);
        a fraction (e.g. 0.5) shares a GPU with a trainer actor in the same bundle, as
        OpenRLHF's hybrid engine colocates vLLM with its trainer.
    num_cpus_per_rank: CPUs each rank actor takes (logical, for Ray's scheduler; torch uses
        max(1, int(num_cpus_per_rank)) threads).
    placement_strategy: PACK (fill nodes first), SPREAD (across nodes), STRICT_PACK, STRICT_SPREAD;
        one bundle per rank, a replica's ranks in consecutive bundles.
    placement_group: an existing Ray placement group to place the ranks on (e.g. the trainer's,
        for colocation) instead of creating one; `bundle_indices` then names the bundle of each
        rank (replica 0's ranks first; default 0, 1, 2, ...).
    max_restarts: Ray restarts of a rank actor that died (then the replica is given up).
    shard_size: prompts per shard of a batch `generate` (None: an even split over the replicas).
    sticky_separator: a request_id's part before the first separator is its sticky key: requests
        with the same key go to the same replica while it is healthy (its prefix cache holds the
        conversation). A request_id without the separator is its own key.
    sticky_capacity: sticky keys remembered (least recently used ones are forgotten).
    seed: the pool draws the seed of each request that brings none from random.Random(seed)
        in call order, exactly as one RolloutEngine would (None: engine.seed); so a pool gives
        the same samples as one engine whatever the replica count.
    weight_sync_backend: "auto" (nccl when the replicas have GPUs and the pushing process has
        CUDA, else gloo), "gloo" or "nccl".
    weight_sync_timeout_s: timeout of each step of a weight broadcast.
    weight_sync_bucket_bytes: bytes per broadcast bucket (the receivers stage whole updates).
    ready_timeout_s: how long to wait for a replica to start (or restart) before giving up on it.
    actor_options: extra `ray.remote` options for the rank actors (e.g. runtime_env).
    """

    engine: EngineConfig
    num_replicas: int = 1
    num_gpus_per_rank: float | None = None
    num_cpus_per_rank: float = 1.0
    placement_strategy: str = "PACK"
    placement_group: Any = None
    bundle_indices: list[int] | None = None
    max_restarts: int = 3
    shard_size: int | None = None
    sticky_separator: str = ":"
    sticky_capacity: int = 100_000
    seed: int | None = None
    weight_sync_backend: str = "auto"
    weight_sync_timeout_s: float = 600.0
    weight_sync_bucket_bytes: int = 1 << 30
    ready_timeout_s: float = 600.0
    actor_options: dict | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.engine, EngineConfig):
            raise TypeError(f"PoolConfig.engine must be an EngineConfig, got {type(self.engine).__name__}")
        if isinstance(self.num_replicas, bool) or not isinstance(self.num_replicas, int) or self.num_replicas < 1:
            raise ValueError(f"PoolConfig.num_replicas must be an int >= 1, got {self.num_replicas!r}")
        if self.placement_strategy not in STRATEGIES:
            raise ValueError(f"PoolConfig.placement_strategy must be one of {STRATEGIES}, "
                             f"got {self.placement_strategy!r}")
        if self.num_gpus_per_rank is not None and self.num_gpus_per_rank < 0:
            raise ValueError(f"PoolConfig.num_gpus_per_rank must be >= 0, got {self.num_gpus_per_rank}")
        if self.num_cpus_per_rank < 0:
            raise ValueError(f"PoolConfig.num_cpus_per_rank must be >= 0, got {self.num_cpus_per_rank}")
        if self.max_restarts < 0:
            raise ValueError(f"PoolConfig.max_restarts must be >= 0, got {self.max_restarts}")
        if self.shard_size is not None and self.shard_size < 1:
            raise ValueError(f"PoolConfig.shard_size must be >= 1 or None, got {self.shard_size}")
        if not self.sticky_separator:
            raise ValueError("PoolConfig.sticky_separator must be a non-empty string")
        if self.weight_sync_backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"PoolConfig.weight_sync_backend must be 'auto', 'gloo' or 'nccl', "
                             f"got {self.weight_sync_backend!r}")
        if self.bundle_indices is not None:
            if self.placement_group is None:
                raise ValueError("PoolConfig.bundle_indices needs placement_group")
            if len(self.bundle_indices) != self.num_replicas * self.ranks_per_replica:
                raise ValueError(f"PoolConfig.bundle_indices: {len(self.bundle_indices)} given for "
                                 f"{self.num_replicas} replicas x {self.ranks_per_replica} ranks")

    @property
    def ranks_per_replica(self) -> int:
        from atom.distributed.parallel_state import EngineLayout
        e = self.engine
        return EngineLayout.build(e.tensor_parallel_size, e.expert_parallel_size, e.ep_mode).world
