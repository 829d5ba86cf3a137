"""The rollout job on Ray: `python -m atom.rollout ray.num_replicas=N [ray.address=auto] ...`.

`make_engine` gives the job what it generates with: one RolloutEngine in this process
(`ray.num_replicas=0`, the default) or an `atom.ray.ReplicaPool` of N replicas, which offers the
same calls the job makes (tokenize, generate, stats). Everything else about the job stays as it
is: prompt i is seeded from (seed, i) and the pool passes seeds through unchanged, so the lines
equal a single-engine run's; lines are appended per chunk with fsync, so kills and resumes leave
exactly one line per prompt.
"""
from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger("atom.rollout")
_STARTED_CLUSTER: set[int] = set()  # ids of pools whose job started the local Ray cluster


class RayJobError(Exception):
    """A bad `ray.*` setting or a cluster that cannot host the replicas (reported as a JobError)."""


def uses_ray(job) -> bool:
    return job.ray.num_replicas > 0


def check(job) -> None:
    """Validate the `ray` settings before anything is built."""
    r = job.ray
    if r.num_replicas < 0:
        raise RayJobError(f"ray.num_replicas must be >= 0, got {r.num_replicas}")
    if not uses_ray(job):
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        raise RayJobError("ray.num_replicas needs Ray: pip install 'atom[ray]'") from None
    from atom.ray.config import STRATEGIES
    if r.placement_strategy not in STRATEGIES:
        raise RayJobError(f"ray.placement_strategy must be one of {STRATEGIES}, got {r.placement_strategy!r}")
    if r.shard_size is not None and r.shard_size < 1:
        raise RayJobError(f"ray.shard_size must be >= 1 or null, got {r.shard_size}")


def make_engine(job, engine_cfg):
    """A RolloutEngine, or a ReplicaPool of `ray.num_replicas` replicas (joining or starting a cluster)."""
    if not uses_ray(job):
        from atom.rollout.engine import RolloutEngine
        return RolloutEngine(engine_cfg)
    import ray

    from atom.ray import PoolConfig, ReplicaPool
    r = job.ray
    started = not ray.is_initialized()
    if started:
        kwargs = {"num_cpus": r.num_cpus} if r.address is None and r.num_cpus is not None else {}
        try:
            ray.init(address=r.address, log_to_driver=False, **kwargs)
        except (ConnectionError, RuntimeError) as e:
            raise ValueError(f"ray.address={r.address!r}: cannot start or join the cluster: {e}") from None
    try:
        pool = ReplicaPool(PoolConfig(engine_cfg, num_replicas=r.num_replicas, num_cpus_per_rank=r.num_cpus_per_rank,
                                      num_gpus_per_rank=r.num_gpus_per_rank, placement_strategy=r.placement_strategy,
                                      max_restarts=r.max_restarts, shard_size=r.shard_size))
    except BaseException:
        if started:
            ray.shutdown()
        raise
    if started:
        _STARTED_CLUSTER.add(id(pool))
    log.info("ray: %d replicas x %d rank(s) on %s", r.num_replicas, pool.config.ranks_per_replica,
             r.address or "a local cluster")
    return pool


def generate(engine, prompts: list, params: list, on_progress: Callable[[int], None]) -> list:
    """engine.generate; a pool reports each finished shard's prompts to on_progress as they come."""
    from atom.rollout.engine import RolloutEngine
    if isinstance(engine, RolloutEngine):
        return engine.generate(prompts, params, use_tqdm=False)
    return engine.generate(prompts, params, on_progress=on_progress)


def prompt_problems(engine, prompts: list) -> list[str]:
    """Per prompt: the ValueError message `generate` would raise for it, or "" (a pool checks them
    all in one call to a replica)."""
    many = getattr(engine, "prompt_problems", None)
    if many is not None:
        return many(prompts)
    problems = []
    for p in prompts:
        try:
            engine.tokenize(p)
            problems.append("")
        except (ValueError, TypeError) as e:
            problems.append(str(e))
    return problems


class ChunkProgress:
    """Advances the job's bar: a pool reports each shard as it completes, the rest at the chunk's end."""

    def __init__(self, bar) -> None:
        self.bar, self.shown = bar, 0

    def __call__(self, k: int) -> None:
        self.shown += k
        self.bar.update(k)

    def finish(self, chunk_size: int) -> None:
        self.bar.update(chunk_size - self.shown)
        self.shown = 0


def close(engine) -> None:
    """Shut a pool down (and the local cluster the job started); nothing for a RolloutEngine."""
    shutdown = getattr(engine, "shutdown", None)
    if shutdown is None:
        return
    shutdown()
    if id(engine) in _STARTED_CLUSTER:
        _STARTED_CLUSTER.discard(id(engine))
        import ray
        ray.shutdown()
