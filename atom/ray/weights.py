"""One weight broadcast from a trainer to every rank of every replica (atom.weights_sync).

The trainer process (the driver, or a Ray actor the `WeightBroadcast` was handed to) is rank 0
of one weight-sync group; every rank of every target replica is a receiver. One `push` sends
each bucket once (a c10d broadcast: NCCL on GPUs, gloo on CPU) and every replica applies it.

A replica that fails during the transfer (its actor dies, or the broken group makes its receive
fail) keeps its previous weights (the receivers stage every bucket before applying) and is
reported in `PushResult.failed`; the pool gives it no requests until it is resynchronised. A
broken group is closed and the next push builds a new one.
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from atom.ray.replica import free_port
from atom.weights_sync import WeightRejected, WeightSender, WeightSyncError, init_weight_sync_group
from atom.weights_sync.protocol import DEFAULT_BUCKET_BYTES

log = logging.getLogger("atom.ray")


@dataclass
class PushResult:
    """What one broadcast did. updated: replica ids now at `version`; failed: replica id -> why."""

    version: int | str | None
    updated: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def _node_ip() -> str:
    import ray
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


class WeightBroadcast:
    """Trainer side of the weight-sync group spanning every rank of the given replicas.

    replicas: replica id -> its rank actors (rank 0 first). Picklable: hand it to a trainer Ray
    actor and call `push` there (its process becomes rank 0); the group is built on first use
    and rebuilt whenever the members change or a transfer broke it. backend "auto": nccl when
    the replicas are on GPUs and the pushing process has CUDA, else gloo.
    """

    def __init__(self, replicas: dict[int, list], backend: str = "auto", timeout_s: float = 600.0,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, replicas_on_gpu: bool = False) -> None:
        self.replicas = dict(replicas)
        self.backend, self.timeout_s, self.bucket_bytes = backend, timeout_s, bucket_bytes
        self.replicas_on_gpu = replicas_on_gpu
        self._group = None
        self._members: tuple = ()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_group"], state["_members"] = None, ()
        return state

    # ---- the group -----------------------------------------------------------------------
    def _ensure_group(self, rids: list[int]) -> list[tuple[int, Any]]:
        import ray

        members = [(rid, a) for rid in rids for a in self.replicas[rid]]
        key = tuple(rids)
        if self._group is not None and key == self._members:
            return members
        self.close()
        backend = self.backend
        if backend == "auto":
            backend = "nccl" if self.replicas_on_gpu and torch.cuda.is_available() else "gloo"
        addr, port = _node_ip(), free_port()
        joins = [a.join_weight_sync.remote(addr, port, i + 1, len(members) + 1, backend, self.timeout_s)
                 for i, (_, a) in enumerate(members)]
        self._group = init_weight_sync_group(addr, port, 0, len(members) + 1, backend=backend,
                                             timeout=self.timeout_s)
        ray.get(joins, timeout=self.timeout_s)
        self._members = key
        return members

    def close(self) -> None:
        """Leave the group (the replicas drop theirs on their next join)."""
        if self._group is None:
            return
        self._group.close()
        self._group, self._members = None, ()
        gc.collect()  # drop the process group now: its connections close, peers stop waiting

    # ---- push ----------------------------------------------------------------------------
    def push(self, source: torch.nn.Module | Iterable[tuple[str, torch.Tensor]], *, version: int | str | None = None,
             replica_ids: list[int] | None = None, rename: Callable[[str], str | None] | None = None,
             dtype: torch.dtype | None = None, partial: bool = False) -> PushResult:
        """Send `source` (a model, or (HF name, tensor) pairs) to the replicas in one broadcast.

        Raises WeightRejected when the replicas refuse the metadata (nothing changed anywhere),
        and RuntimeError when no replica could take part. Replica failures are reported in the
        result, not raised.
        """
        import ray

        rids = sorted(self.replicas if replica_ids is None else replica_ids)
        if not rids:
            raise RuntimeError("WeightBroadcast.push: no replica to update")
        result = PushResult(version)
        alive = self._alive(rids, result)
        if not alive:
            raise RuntimeError(f"WeightBroadcast.push: no replica could take part ({result.failed})")
        try:
            members = self._ensure_group(alive)
        except Exception as e:  # noqa: BLE001 - a member died while joining
            self.close()
            for rid in alive:
                result.failed.setdefault(rid, f"could not join the weight-sync group: {e}")
            return result
        receives = [a.receive_weights.remote(self.timeout_s) for _, a in members]
        sent_error = None
        try:
            result.version = self._send(source, version, rename, dtype, partial)
        except WeightRejected:
            self._drain(receives)
            raise
        except WeightSyncError as e:
            # Keep only the text: the traceback's frames hold the group, and its connections must
            # close now so that the receivers still waiting on them fail at once, not after a timeout.
            sent_error = str(e)
        if sent_error is not None:
            self.close()
        self._collect(members, receives, result, sent_error)
        return result

    def _alive(self, rids: list[int], result: PushResult) -> list[int]:
        import ray

        pings = {rid: [a.ping.remote() for a in self.replicas[rid]] for rid in rids}
        alive = []
        for rid, refs in pings.items():
            try:
                states = ray.get(refs, timeout=min(self.timeout_s, 60.0))
            except Exception as e:  # noqa: BLE001 - dead, restarting or unreachable
                result.failed[rid] = f"not reachable: {str(e).strip().splitlines()[0] if str(e).strip() else e}"
                continue
            if not all(s["started"] for s in states):
                result.failed[rid] = "its engine is not started (restarting)"
                continue
            alive.append(rid)
        return alive

    def _send(self, source, version, rename, dtype, partial) -> int | str | None:
        from atom.weights_sync import push as push_model

        sender = WeightSender(self._group, bucket_bytes=self.bucket_bytes)
        if isinstance(source, torch.nn.Module):
            return push_model(source, sender, rename=rename, bucket_bytes=self.bucket_bytes, dtype=dtype,
                              version=version, partial=partial)
        return sender.send(source, version=version, partial=partial, dtype=dtype)

    def _drain(self, refs: list) -> None:
        import ray
        for ref in refs:
            try:
                ray.get(ref, timeout=self.timeout_s)
            except Exception:  # noqa: BLE001 - the refusal is raised on the sender side
                pass

    def _collect(self, members, receives, result: PushResult, sent_error: str | None) -> None:
        import ray

        per_replica: dict[int, list] = {}
        for (rid, _), ref in zip(members, receives):
            try:
                # no timeout here: every step of a receive is bounded by the group's timeout
                per_replica.setdefault(rid, []).append(ray.get(ref))
            except Exception as e:  # noqa: BLE001 - a dead rank, or the broken group
                text = str(getattr(e, "cause", None) or e).strip().splitlines()
                per_replica.setdefault(rid, []).append(RuntimeError(text[-1] if text else type(e).__name__))
        for rid, outs in per_replica.items():
            errors = [o for o in outs if isinstance(o, BaseException)]
            if errors:
                result.failed[rid] = str(errors[0])
            elif len(set(outs)) == 1:
                result.updated.append(rid)
                result.version = outs[0]
            else:
                result.failed[rid] = f"its ranks report different versions {outs}"
        if sent_error is not None:
            log.warning("weight push: the transfer broke off: %s", sent_error)
        if result.failed:
            log.warning("weight push: replicas %s failed: %s", sorted(result.failed), result.failed)
