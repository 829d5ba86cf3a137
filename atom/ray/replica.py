"""One engine rank inside a Ray actor (`EngineRank`); the pool wraps the class with `ray.remote`.

A replica is one engine: one rank (TP = EP = 1) or the W ranks of a TP / EP engine group, each
rank its own actor. The pool sets the ranks up (`start` with the group's rendezvous) and then
makes the same calls on every rank of a replica in the same order (SPMD, as under torchrun).

Every method that touches the engine runs in a worker thread under one asyncio lock: calls run
one at a time in the order they arrived, while the actor's event loop stays free to answer
`ping` (the pool's liveness check) during a long generate.
"""
from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass
from typing import Any, Sequence

from atom.config import EngineConfig


@dataclass(frozen=True)
class RankInfo:
    """Where a rank runs: its process, node address, and a free port there (rendezvous)."""

    pid: int
    node_ip: str
    free_port: int


def _node_ip() -> str:
    import ray
    return ray.util.get_node_ip_address()


def free_port(host: str = "") -> int:
    """A port nobody listens on right now (for a rendezvous or a weight-sync group's store)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EngineRank:
    """Hosts rank `rank` of one replica's engine. Built empty; `start` builds the engine."""

    def __init__(self, config: EngineConfig, rank: int, world: int, num_threads: int = 1) -> None:
        self.config, self.rank, self.world = config, rank, world
        self.num_threads = num_threads
        self.engine = None
        self.aengine = None  # AsyncRolloutEngine over `engine`: per-request calls (one-rank replicas)
        self._lock = asyncio.Lock()
        self._receiver = None  # WeightReceiver of the current weight-sync group
        self.sync_failure = ""  # why the last weight update failed here ("" when it did not)

    async def _run(self, fn, *args, **kwargs):
        async with self._lock:
            return await asyncio.to_thread(fn, *args, **kwargs)

    # ---- set-up --------------------------------------------------------------------------
    async def info(self) -> RankInfo:
        return RankInfo(os.getpid(), _node_ip(), free_port())

    async def ping(self) -> dict[str, Any]:
        """Cheap liveness check; answers even while a generate runs."""
        busy = self._lock.locked() or (self.engine is not None and self.engine.has_unfinished_requests())
        return {"pid": os.getpid(), "started": self.engine is not None, "busy": busy,
                "weight_version": None if self.engine is None else self.engine.weight_version,
                "weights_complete": None if self.engine is None else self.engine.weights_complete,
                "sync_failure": self.sync_failure}

    async def start(self, rendezvous: str | None = None) -> dict[str, Any]:
        """Build the engine; rendezvous ("tcp://addr:port") joins the replica's engine group first."""
        return await self._run(self._start, rendezvous)

    def _start(self, rendezvous: str | None) -> dict[str, Any]:
        import torch

        torch.set_num_threads(max(1, self.num_threads))
        if self.world > 1:
            import datetime

            import torch.distributed as dist
            if not dist.is_initialized():
                backend = "nccl" if self.config.torch_device().type == "cuda" else "gloo"
                dist.init_process_group(backend, init_method=rendezvous, rank=self.rank, world_size=self.world,
                                        timeout=datetime.timedelta(seconds=self.config.dist_timeout_s))
        from atom.rollout.engine import RolloutEngine
        self.engine = RolloutEngine(self.config)
        if self.world == 1:  # ranks of one engine must see the same requests at the same steps: batch calls only
            from atom.rollout.async_engine import AsyncRolloutEngine
            self.aengine = AsyncRolloutEngine(self.engine)
        return {"max_model_len": self.engine.max_model_len, "vocab_size": self.engine.vocab_size,
                "weight_version": self.engine.weight_version}

    def _need_engine(self):
        if self.engine is None:
            raise RuntimeError(f"engine rank {self.rank}: not started")
        return self.engine

    # ---- the engine's calls --------------------------------------------------------------
    async def generate(self, prompts: list, params: list) -> list:
        """RolloutEngine.generate on a batch (one SamplingParams per prompt)."""
        return await self._run(lambda: self._need_engine().generate(prompts, params))

    async def generate_one(self, prompt, params, request_id: str):
        """One request through the AsyncRolloutEngine: it joins the running batch at the next step."""
        return await self._need_async().generate(prompt, params, request_id=request_id)

    async def abort(self, request_ids: list[str]) -> dict:
        return await self._need_async().abort(request_ids)

    async def pause_generation(self, mode: str = "abort") -> None:
        await self._need_async().pause_generation(mode)

    async def resume_generation(self, recompute_kv: bool = False) -> None:
        await self._need_async().resume_generation(recompute_kv=recompute_kv)

    def _need_async(self):
        if self.aengine is None:
            raise RuntimeError(f"engine rank {self.rank}: per-request calls need a one-rank replica (started)")
        return self.aengine

    async def tokenize(self, prompts: list) -> list:
        """Per prompt: its token ids, or the ValueError message `generate` would raise for it."""
        def each():
            out = []
            for p in prompts:
                try:
                    out.append(self._need_engine().tokenize(p))
                except (ValueError, TypeError) as e:
                    out.append(str(e))
            return out
        return await self._run(each)

    async def stats(self) -> dict[str, Any]:
        import dataclasses
        e = self._need_engine()
        return {**dataclasses.asdict(e.stats), "weight_version": e.weight_version,
                "is_sleeping": e.is_sleeping, "weights_complete": e.weights_complete}

    async def sleep(self, level: int = 1) -> None:
        await self._run(lambda: self._need_engine().sleep(level=level))

    async def wake_up(self, tags: Sequence[str] | None = None) -> None:
        await self._run(lambda: self._need_engine().wake_up(tags))

    # ---- weight sync ---------------------------------------------------------------------
    async def join_weight_sync(self, master_addr: str, master_port: int, rank: int, world_size: int,
                               backend: str, timeout_s: float) -> None:
        """Join a weight-sync group as receiver `rank` (blocks until every member joined)."""
        def join():
            from atom.weights_sync import WeightReceiver, init_weight_sync_group
            self._close_sync()
            group = init_weight_sync_group(master_addr, master_port, rank, world_size, backend=backend,
                                           timeout=timeout_s)
            self._receiver = WeightReceiver(self._need_engine(), group)
        # not under the engine lock: the store rendezvous must not wait behind a generate
        await asyncio.to_thread(join)

    async def receive_weights(self, timeout_s: float | None = None) -> int:
        """Receive one update over the joined group; returns the new weight_version.

        A failure keeps the previous weights (staged transfer) and is remembered in
        `sync_failure` until an update succeeds; the group is dropped (it cannot be reused).
        """
        if self._receiver is None:
            raise RuntimeError(f"engine rank {self.rank}: not in a weight-sync group")
        from atom.weights_sync import WeightSyncError
        try:
            version = await self._run(self._receiver.receive, timeout=timeout_s)
        except WeightSyncError as e:
            self.sync_failure = str(e)
            self._close_sync()
            raise
        self.sync_failure = ""
        return version

    async def leave_weight_sync(self) -> None:
        self._close_sync()

    def _close_sync(self) -> None:
        if self._receiver is not None:
            self._receiver.group.close()
            self._receiver = None
