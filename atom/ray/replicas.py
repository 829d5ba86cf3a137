"""The replicas of a pool: their Ray actors, placement, start-up, health and restarts.

States of a replica:
  starting   -> its ranks are building their engines
  ready      -> serving (weights at the pool's version)
  stale      -> alive but its weights are behind (a restart, a failed transfer): no requests
                until it is resynchronised
  restarting -> a rank died; Ray restarts the rank actors (max_restarts), then the pool starts
                the engine again
  dead       -> out of restarts, or it did not come back within ready_timeout_s
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from atom.ray.config import PoolConfig
from atom.ray.replica import EngineRank

log = logging.getLogger("atom.ray")

STARTING, READY, STALE, RESTARTING, DEAD = "starting", "ready", "stale", "restarting", "dead"


@dataclass
class FailureEvent:
    """Something went wrong with a replica (the pool keeps a list, newest last)."""

    replica: int
    what: str      # e.g. "died during generate", "weight transfer failed", "gave up"
    error: str
    time: float = field(default_factory=time.time)


@dataclass
class Replica:
    id: int
    ranks: list               # Ray actor handles, rank 0 first
    status: str = STARTING
    weight_version: int | str = 0
    restarts: int = 0
    pending: list = field(default_factory=list)   # refs of start / ping calls in flight
    since: float = field(default_factory=time.monotonic)
    retry_at: float = 0.0     # restarting: when to ask again whether the actors are back
    info: dict = field(default_factory=dict)       # max_model_len, vocab_size from start()


def is_replica_failure(exc: BaseException) -> bool:
    """A dead or unreachable rank, or an engine group broken by one (not a bad request)."""
    import ray.exceptions as rex

    from atom.distributed.parallel_state import CollectiveError
    if isinstance(exc, rex.RayActorError):
        return True
    cause = getattr(exc, "cause", None)
    return isinstance(exc, rex.RayTaskError) and isinstance(cause, CollectiveError)


def task_error(exc: BaseException) -> BaseException:
    """The exception a replica's method raised (Ray wraps it in RayTaskError)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class ReplicaSet:
    """Creates the rank actors on a placement group, starts the engines, watches their health."""

    def __init__(self, config: PoolConfig, on_event: Callable[[FailureEvent], None] | None = None) -> None:
        import ray

        if not ray.is_initialized():
            ray.init()
        self.config = config
        self.W = config.ranks_per_replica
        self.gpus = self._gpus_per_rank()
        self.failures: list[FailureEvent] = []
        self._on_event = on_event
        self._own_pg = config.placement_group is None
        self.pg = self._placement_group()
        self.on_started: Callable[[Replica], None] | None = None  # the pool's hook (sleep state, resync)
        self.replicas = {i: Replica(i, [self._rank_actor(i, r) for r in range(self.W)])
                         for i in range(config.num_replicas)}
        for rep in self.replicas.values():
            self._start(rep)
        self._wait_started()

    # ---- placement -----------------------------------------------------------------------
    def _gpus_per_rank(self) -> float:
        if self.config.num_gpus_per_rank is not None:
            return float(self.config.num_gpus_per_rank)
        device = self.config.engine.device
        if device.startswith("cuda"):
            return 1.0
        if device == "auto":
            import ray
            return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        return 0.0

    def _placement_group(self):
        import ray
        from ray.util.placement_group import placement_group

        c = self.config
        if c.placement_group is not None:
            return c.placement_group
        bundle = {k: v for k, v in (("CPU", c.num_cpus_per_rank), ("GPU", self.gpus)) if v > 0}
        if not bundle:
            raise ValueError("PoolConfig: a rank needs num_cpus_per_rank > 0 or GPUs for its placement bundle")
        pg = placement_group([dict(bundle) for _ in range(c.num_replicas * self.W)], strategy=c.placement_strategy)
        ready, _ = ray.wait([pg.ready()], timeout=c.ready_timeout_s)
        if not ready:
            ray.util.remove_placement_group(pg)
            raise RuntimeError(f"ReplicaPool: the cluster cannot place {c.num_replicas} replicas x {self.W} ranks of "
                               f"{bundle} ({c.placement_strategy}) within {c.ready_timeout_s:g} s; cluster "
                               f"resources: {ray.cluster_resources()}")
        return pg

    def _rank_actor(self, replica: int, rank: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        c = self.config
        index = replica * self.W + rank
        bundle = c.bundle_indices[index] if c.bundle_indices is not None else index
        opts: dict[str, Any] = dict(num_cpus=c.num_cpus_per_rank, num_gpus=self.gpus, max_restarts=c.max_restarts,
                                    max_task_retries=0, max_concurrency=64,
                                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                                        self.pg, placement_group_bundle_index=bundle))
        opts.update(c.actor_options or {})
        threads = max(1, int(c.num_cpus_per_rank))
        return ray.remote(EngineRank).options(**opts).remote(c.engine, rank, self.W, threads)

    # ---- start-up ------------------------------------------------------------------------
    def _start(self, rep: Replica) -> None:
        """Ask every rank to build its engine (non-blocking: `poll` collects the results)."""
        import ray

        rendezvous = None
        if self.W > 1:  # the engine group's store lives on rank 0's node
            info = ray.get(rep.ranks[0].info.remote(), timeout=self.config.ready_timeout_s)
            rendezvous = f"tcp://{info.node_ip}:{info.free_port}"
        rep.status, rep.since = STARTING, time.monotonic()
        rep.pending = [a.start.remote(rendezvous) for a in rep.ranks]

    def _wait_started(self) -> None:
        """Construction: every replica must start; the first error is raised as it is."""
        import ray

        for rep in self.replicas.values():
            try:
                infos = ray.get(rep.pending, timeout=self.config.ready_timeout_s)
            except Exception as e:
                self.shutdown()
                raise task_error(e) from None
            rep.info, rep.pending = infos[0], []
            rep.status, rep.weight_version = READY, infos[0]["weight_version"]

    # ---- health --------------------------------------------------------------------------
    def ids(self, *states: str) -> list[int]:
        return [i for i, r in self.replicas.items() if r.status in states]

    def record(self, replica: int, what: str, error: BaseException | str) -> None:
        text = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        ev = FailureEvent(replica, what, text)
        self.failures.append(ev)
        log.warning("replica %d: %s: %s", replica, what, text)
        if self._on_event is not None:
            self._on_event(ev)

    def fail(self, rid: int, what: str, error: BaseException | str, restarts_seen: int | None = None) -> None:
        """A rank of replica `rid` died or its group broke: restart every rank of it.
        restarts_seen: the replica's restart count when the failed call was made. A call made
        before the last restart reports the death that restart handled (two requests in flight
        on a killed actor fail one after the other, the second maybe once the replica is back):
        it is not counted again, nor does it restart the new actors."""
        import ray

        rep = self.replicas[rid]
        if rep.status in (RESTARTING, DEAD):
            return
        if restarts_seen is not None and restarts_seen != rep.restarts:
            log.info("replica %d: %s before its restart %d: already handled", rid, what, rep.restarts)
            return
        self.record(rid, what, error)
        if rep.restarts >= self.config.max_restarts:
            self._give_up(rep, f"out of restarts ({self.config.max_restarts})")
            return
        rep.restarts += 1
        if self.W > 1:  # the survivors' engine group is broken: they restart too
            for a in rep.ranks:
                ray.kill(a, no_restart=False)
        rep.status, rep.since = RESTARTING, time.monotonic()
        rep.pending = [a.ping.remote() for a in rep.ranks]  # answered once the restarted actors are up

    def _give_up(self, rep: Replica, why: str) -> None:
        import ray

        rep.status, rep.pending = DEAD, []
        self.record(rep.id, "gave up", why)
        for a in rep.ranks:
            ray.kill(a, no_restart=True)

    def poll(self) -> None:
        """Move restarting / starting replicas along without blocking."""
        import ray

        for rep in self.replicas.values():
            if rep.status == RESTARTING and not rep.pending and time.monotonic() >= rep.retry_at:
                rep.pending = [a.ping.remote() for a in rep.ranks]
            if rep.status not in (RESTARTING, STARTING) or not rep.pending:
                continue
            done, _ = ray.wait(rep.pending, num_returns=len(rep.pending), timeout=0)
            if len(done) < len(rep.pending):
                if time.monotonic() - rep.since > self.config.ready_timeout_s:
                    self._give_up(rep, f"not back within {self.config.ready_timeout_s:g} s")
                continue
            try:
                results = ray.get(rep.pending)
            except Exception as e:  # noqa: BLE001
                self._poll_failed(rep, e)
                continue
            if rep.status == RESTARTING:
                self._start(rep)
            else:
                rep.info, rep.pending = results[0], []
                rep.weight_version = results[0]["weight_version"]
                rep.status = STALE  # the pool decides (weight version, sleep state) before it serves
                if self.on_started is not None:
                    self.on_started(rep)

    def _poll_failed(self, rep: Replica, e: BaseException) -> None:
        import ray.exceptions as rex

        rep.pending = []
        if isinstance(e, rex.ActorDiedError):  # out of Ray restarts
            self._give_up(rep, f"its actor is gone: {task_error(e)}")
        elif isinstance(e, rex.ActorUnavailableError):  # still restarting: ask again shortly
            rep.status, rep.retry_at = RESTARTING, time.monotonic() + 0.1
        elif rep.restarts >= self.config.max_restarts:
            self._give_up(rep, f"start failed: {task_error(e)}")
        else:
            rep.status = STARTING  # not dead yet: fail() restarts it
            self.fail(rep.id, "failed to start", task_error(e))

    def wait_for_any(self, timeout: float) -> None:
        """Block until some starting / restarting replica's calls finish (or timeout)."""
        import ray

        pending = [ref for r in self.replicas.values() if r.status in (RESTARTING, STARTING) for ref in r.pending]
        if any(r.status == RESTARTING and not r.pending for r in self.replicas.values()):
            timeout = min(timeout, 0.1)  # one is due to be asked again (poll)
        if pending:
            ray.wait(pending, num_returns=1, timeout=timeout)
        else:
            time.sleep(min(timeout, 0.05))

    def check_alive(self) -> None:
        """RuntimeError when no replica is serving or on its way back (stale ones need a resync)."""
        if self.ids(READY, STARTING, RESTARTING):
            return
        reasons = "; ".join(f"replica {e.replica}: {e.what}: {e.error}" for e in self.failures[-5:])
        stale = self.ids(STALE)
        if stale:
            raise RuntimeError(f"ReplicaPool: no replica can serve: {stale} are alive but their weights are behind "
                               f"the pool's version; push the weights again ({reasons})")
        raise RuntimeError(f"ReplicaPool: no replica left ({reasons})")

    # ---- calls ---------------------------------------------------------------------------
    def submit(self, rid: int, method: str, *args, **kwargs) -> list:
        """Call `method` on every rank of replica `rid` (same arguments, same order): refs, rank 0 first."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.replicas[rid].ranks]

    def call(self, rids: list[int], method: str, *args, timeout: float | None = None, **kwargs) -> dict[int, Any]:
        """Fan `method` out to replicas; their rank-0 results. Failed replicas are restarted, other errors raised."""
        import ray

        seen = {rid: self.replicas[rid].restarts for rid in rids}
        refs = {rid: self.submit(rid, method, *args, **kwargs) for rid in rids}
        out, error = {}, None
        for rid, rs in refs.items():
            try:
                out[rid] = ray.get(rs, timeout=timeout)[0]
            except Exception as e:  # noqa: BLE001
                if is_replica_failure(e):
                    self.fail(rid, f"died during {method}", e, seen[rid])
                elif error is None:
                    error = task_error(e)
        if error is not None:
            raise error
        return out

    def shutdown(self) -> None:
        import ray

        for rep in self.replicas.values():
            for a in rep.ranks:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            rep.status = DEAD
        if self._own_pg and self.pg is not None:
            try:
                ray.util.remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001
                pass
            self.pg = None
