"""ReplicaPool: engine replicas as Ray actors, one front for generate, weights, sleep and stats."""
from __future__ import annotations

import dataclasses
import random
import time
from typing import Any, Callable, Iterable, Sequence

import torch

from atom.config import EngineConfig
from atom.outputs import EngineStats, RolloutOutput
from atom.ray.batch import run_sharded
from atom.ray.config import PoolConfig
from atom.ray.replicas import READY, RESTARTING, STALE, STARTING, FailureEvent, Replica, ReplicaSet, task_error
from atom.ray.routing import AsyncRouting
from atom.ray.weights import PushResult, WeightBroadcast
from atom.sampling_params import SamplingParams

_RESYNC_RETRY_S = 5.0


class ReplicaPool(AsyncRouting):
    """N engine replicas on a Ray cluster behind the RolloutEngine calls.

    Example::

        ray.init()                                   # or ray.init(address="auto")
        pool = ReplicaPool(PoolConfig(EngineConfig(model=ckpt), num_replicas=4))
        outs = pool.generate(prompts, SamplingParams(n=8, temperature=1.0, logprobs=0))
        pool.push(trainer_model, version=step)      # one broadcast to every replica
        out = await pool.generate_async(prompt, params, request_id="conv7:turn2")

    Seeds: requests without a seed get one from random.Random(config.seed) in call order, as
    one RolloutEngine would draw them, so the outputs equal one engine's whatever the replica
    count, sharding or failures. A replica that dies is restarted by Ray, resynchronised to the
    pool's weight version and served again; its in-flight work goes to the other replicas.
    """

    def __init__(self, config: PoolConfig | EngineConfig | str, **pool_options) -> None:
        if not isinstance(config, PoolConfig):
            engine = config if isinstance(config, EngineConfig) else EngineConfig(model=config)
            config = PoolConfig(engine=engine, **pool_options)
        elif pool_options:
            config = dataclasses.replace(config, **pool_options)
        self.config = config
        seed = config.seed if config.seed is not None else config.engine.seed
        self._rng = random.Random(seed)
        self.weight_version = 0
        self._source: tuple | None = None      # what resynchronises a stale replica (see push)
        self._sleeping: set[str] = set()
        self._resync_tried: dict[int, float] = {}
        self._final_stats: EngineStats | None = None
        self._rset = ReplicaSet(config, on_event=self._on_failure)
        self._rset.on_started = lambda rep: self._admit(rep.id, fresh=True)
        self._bcast = self.weight_broadcast(all_replicas=True)
        info = self._rset.replicas[0].info
        self.max_model_len, self.vocab_size = info["max_model_len"], info["vocab_size"]
        self._init_routing()

    # ---- state ---------------------------------------------------------------------------
    @property
    def num_replicas(self) -> int:
        return len(self._rset.replicas)

    @property
    def failures(self) -> list[FailureEvent]:
        """Every replica failure so far (deaths, failed transfers, restarts given up), oldest first."""
        return list(self._rset.failures)

    def replica_states(self) -> dict[int, dict[str, Any]]:
        """Per replica: status (ready / stale / starting / restarting / dead), weight version, restarts."""
        return {i: {"status": r.status, "weight_version": r.weight_version, "restarts": r.restarts}
                for i, r in self._rset.replicas.items()}

    def replica_actors(self, replica_id: int) -> list:
        """The Ray actor handles of one replica's ranks (rank 0 first): for custom calls and fault injection."""
        return list(self._rset.replicas[replica_id].ranks)

    def replica_of(self, request_id: str) -> int | None:
        """The replica a request_id's sticky key is bound to (None: not seen, or forgotten)."""
        return self._router.bound_to(request_id)

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Block until every replica that is not given up serves (restarted ones resynchronised).

        RuntimeError when no replica is left, TimeoutError after `timeout` seconds.
        """
        deadline = time.monotonic() + (self.config.ready_timeout_s if timeout is None else timeout)
        while True:
            self._heal()
            self._rset.check_alive()
            waiting = self._rset.ids(STARTING, RESTARTING, STALE)
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"ReplicaPool.wait_until_ready: replicas {waiting} not ready: "
                                   f"{ {r: self._rset.replicas[r].status for r in waiting} }")
            self._rset.wait_for_any(timeout=0.2)

    def _on_failure(self, event: FailureEvent) -> None:
        self._bcast.close()  # the group's members changed: the next push builds a new one

    # ---- health: admit (re)started replicas, resynchronise stale ones ----------------------
    def _heal(self) -> None:
        self._rset.poll()
        now = time.monotonic()
        for rid in self._rset.ids(STALE):
            if now - self._resync_tried.get(rid, -1e9) > _RESYNC_RETRY_S:
                self._admit(rid)

    def _admit(self, rid: int, fresh: bool = False) -> None:
        """A started replica serves once its weights are at the pool's version (resync if needed);
        a freshly (re)started one first takes the pool's sleep and pause state."""
        rep = self._rset.replicas[rid]
        self._resync_tried[rid] = time.monotonic()
        if fresh and self._sleeping and not self._sleep_like_pool(rep):
            return
        if fresh and self._paused is not None and self._rset.W == 1:  # it waits like the others
            self._rset.call([rid], "pause_generation", self._paused)
        if rep.weight_version != self.weight_version and self._source is not None and "weights" not in self._sleeping:
            self._resync(rep)
        rep.status = READY if rep.weight_version == self.weight_version else STALE

    def _sleep_like_pool(self, rep: Replica) -> bool:
        level = 2 if "weights" in self._sleeping else 1
        try:
            self._rset.call([rep.id], "sleep", level)
        except Exception as e:  # noqa: BLE001
            self._rset.record(rep.id, "could not sleep like the pool", e)
            return False
        return True

    def _resync(self, rep: Replica) -> None:
        source, rename, dtype = self._source
        one = self._broadcast_to([rep.id])
        try:
            result = one.push(source() if callable(source) and not isinstance(source, torch.nn.Module) else source,
                              version=self.weight_version, rename=rename, dtype=dtype)
        except Exception as e:  # noqa: BLE001
            self._rset.record(rep.id, "resynchronisation failed", task_error(e))
            return
        finally:
            one.close()
        if rep.id in result.updated:
            rep.weight_version = result.version
        else:
            self._rset.record(rep.id, "resynchronisation failed", result.failed.get(rep.id, "?"))

    def refresh(self, version: int | str | None = None) -> None:
        """Re-read every replica's weight version after a push from a trainer actor through
        `weight_broadcast()`. The pool's version becomes `version` (the PushResult's), or else the
        highest one reported (the most reported one for string versions); replicas not at it
        stop serving until resynchronised."""
        self._heal()
        self._reread_versions(self._rset.ids(READY, STALE), adopt=True)
        if version is not None:
            self.weight_version = version
            self._reread_versions([])

    def _reread_versions(self, rids: list[int], adopt: bool = False) -> None:
        states = self._rset.call([r for r in rids if self._rset.replicas[r].status in (READY, STALE)], "ping")
        for rid, st in list(states.items()):
            if not st["started"]:  # Ray restarted the actor (it died meanwhile): start it again
                self._rset.fail(rid, "found restarted", "its engine is gone")
                del states[rid]
            else:
                self._rset.replicas[rid].weight_version = st["weight_version"]
        if adopt and states:
            seen = [self._rset.replicas[r].weight_version for r in states]
            ints = all(isinstance(v, int) for v in seen)
            self.weight_version = max(seen) if ints else max(set(seen), key=seen.count)
        for rep in self._rset.replicas.values():
            if rep.status in (READY, STALE):
                rep.status = READY if rep.weight_version == self.weight_version else STALE

    # ---- batch generate --------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False, on_progress: Callable[[int], None] | None = None) -> list[RolloutOutput]:
        """RolloutEngine.generate over the replicas: outputs in input order.

        on_progress(k): called as each shard's k prompts complete. use_tqdm: a progress bar over prompts.
        """
        prompts = self._as_list(prompts)
        checked = self._per_prompt_params(sampling_params, len(prompts))
        state = self._rng.getstate()
        params = self._seeded(checked)
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(prompts), desc="rollout", unit="prompt")

        def progress(k: int) -> None:
            if bar is not None:
                bar.update(k)
            if on_progress is not None:
                on_progress(k)
        try:
            self._heal()
            return run_sharded(self._rset, prompts, params, self.config.shard_size, self._heal, progress)
        except (ValueError, RuntimeError):
            self._rng.setstate(state)  # a rejected call leaves the seed stream alone
            raise
        finally:
            if bar is not None:
                bar.close()

    @staticmethod
    def _as_list(prompts) -> list:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)):
            return [prompts]
        return list(prompts)

    def _per_prompt_params(self, sampling_params, count: int) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * count if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != count:
            raise ValueError(f"got {len(params)} SamplingParams for {count} prompts")
        for sp in params:
            if not isinstance(sp, SamplingParams):
                raise ValueError(f"sampling_params entries must be SamplingParams, got {type(sp).__name__}")
            sp.validate(self.vocab_size)
        return params

    def _seeded(self, params: list[SamplingParams]) -> list[SamplingParams]:
        """Private copies with every seed set, drawn as RolloutEngine draws them (request order)."""
        return [dataclasses.replace(sp, seed=sp.seed if sp.seed is not None else self._rng.getrandbits(63))
                for sp in params]

    def tokenize(self, prompt) -> list[int]:
        """The token ids `generate` would run for one prompt; the ValueError it would raise."""
        return self.tokenize_many([prompt])[0]

    def tokenize_many(self, prompts: list) -> list[list[int]]:
        """tokenize for many prompts in one call to a replica; raises for the first bad one."""
        out = self._tokenize_or_problem(prompts)
        for item in out:
            if isinstance(item, str):
                raise ValueError(item)
        return out

    def prompt_problems(self, prompts: list) -> list[str]:
        """Per prompt: the ValueError message `generate` would raise for it, or "" (one call)."""
        return [item if isinstance(item, str) else "" for item in self._tokenize_or_problem(prompts)]

    def _tokenize_or_problem(self, prompts: list) -> list:
        self._heal()
        rids = self._rset.ids(READY)
        if not rids:
            self._rset.check_alive()
            raise RuntimeError("ReplicaPool.tokenize: no replica is ready yet")
        return self._rset.call(rids[:1], "tokenize", list(prompts))[rids[0]]

    # ---- weights ---------------------------------------------------------------------------
    def weight_broadcast(self, all_replicas: bool = False) -> WeightBroadcast:
        """A WeightBroadcast to the pool's replicas (ready and stale ones; all with all_replicas),
        for a trainer that is a Ray actor: pass it to the actor and call `push` there, then call
        `pool.refresh()` in the driver."""
        return self._broadcast_to(list(self._rset.replicas) if all_replicas else self._rset.ids(READY, STALE))

    def _broadcast_to(self, rids: list[int]) -> WeightBroadcast:
        c = self.config
        return WeightBroadcast({rid: self._rset.replicas[rid].ranks for rid in rids}, c.weight_sync_backend,
                               c.weight_sync_timeout_s, c.weight_sync_bucket_bytes, replicas_on_gpu=self._rset.gpus > 0)

    def push(self, source: torch.nn.Module | Callable[[], Iterable] | Iterable, *, version: int | str | None = None,
             rename: Callable[[str], str | None] | None = None, dtype: torch.dtype | None = None,
             partial: bool = False) -> PushResult:
        """Broadcast new weights to every live replica from this process; returns who got them.

        source: a trainer model (its parameters, HF names after `rename`), a callable returning
            (HF name, tensor) pairs, or the pairs themselves. A model or callable is kept (by
            reference) to resynchronise replicas that restart later: it must hold the pushed
            weights while the pool serves them (true between optimizer steps).
        version: default the pool's version + 1. Replicas that failed keep their old weights
            and serve nothing until resynchronised (`PushResult.failed` names them).
        """
        self._check_quiet("push")
        self._heal()
        if version is None:
            version = self.weight_version + 1 if isinstance(self.weight_version, int) else 1
        targets = self._rset.ids(READY, STALE)
        if not targets:
            self._rset.check_alive()
            raise RuntimeError("ReplicaPool.push: no replica is up yet")
        pairs = source() if callable(source) and not isinstance(source, torch.nn.Module) else source
        result = self._bcast.push(pairs, version=version, replica_ids=targets, rename=rename, dtype=dtype,
                                  partial=partial)
        self._settle_push(result, version)
        if result.updated and not partial and (isinstance(source, torch.nn.Module) or callable(source)):
            self._source = (source, rename, dtype)
        elif not result.updated:
            self._source = None  # nobody serves what the source now holds: it cannot resynchronise
        return result

    def _settle_push(self, result: PushResult, version) -> None:
        """Adopt the version if any replica holds it; failed replicas are asked what they hold.

        A replica reports a version only after applying the complete update (buckets are staged),
        so one that applied it and then lost the group on the final status exchange is updated.
        """
        for rid, why in result.failed.items():
            self._rset.record(rid, "weight transfer failed", why)
        for rid in result.updated:
            self._rset.replicas[rid].weight_version = version
        self._reread_versions(sorted(result.failed))
        for rid in sorted(result.failed):
            if self._rset.replicas[rid].status in (READY, STALE) and self._rset.replicas[rid].weight_version == version:
                result.failed.pop(rid)
                result.updated.append(rid)
        result.updated.sort()
        if result.updated:
            self.weight_version = result.version = version
        for rep in self._rset.replicas.values():
            if rep.status in (READY, STALE):
                rep.status = READY if rep.weight_version == self.weight_version else STALE

    # ---- sleep / wake / stats fan-out -------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        """RolloutEngine.sleep on every live replica."""
        self._check_quiet("sleep")
        self._heal()
        self._rset.call(self._rset.ids(READY, STALE), "sleep", level)
        self._sleeping = {"kv_cache", "weights"} if level == 2 else {"kv_cache"}

    def wake_up(self, tags: Sequence[str] | str | None = None) -> None:
        """RolloutEngine.wake_up on every live replica."""
        self._check_quiet("wake_up")
        self._heal()
        self._rset.call(self._rset.ids(READY, STALE), "wake_up", tags)
        self._sleeping -= set(self._sleeping if tags is None else ([tags] if isinstance(tags, str) else tags))

    @property
    def is_sleeping(self) -> bool:
        return bool(self._sleeping)

    def replica_stats(self) -> dict[int, dict[str, Any]]:
        """Each live replica's engine counters, weight version and sleep state."""
        return self._rset.call(self._rset.ids(READY, STALE), "stats")

    @property
    def stats(self) -> EngineStats:
        """EngineStats summed over the live replicas (a restarted replica starts from zero); after
        shutdown, the totals at shutdown."""
        if self._final_stats is not None:
            return self._final_stats
        fields = [f.name for f in dataclasses.fields(EngineStats)]
        total = EngineStats()
        for st in self.replica_stats().values():
            for f in fields:
                setattr(total, f, getattr(total, f) + st[f])
        return total

    def shutdown(self) -> None:
        """Kill the replicas' actors and release the placement group (if the pool made it)."""
        if self._final_stats is None:
            try:
                self._final_stats = self.stats
            except Exception:  # noqa: BLE001 - no replica left to ask
                self._final_stats = EngineStats()
        self._bcast.close()
        self._rset.shutdown()

    def __enter__(self) -> "ReplicaPool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
