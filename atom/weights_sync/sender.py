"""Trainer side: send (HF name, tensor) pairs to every engine rank of a WeightSyncGroup."""
from __future__ import annotations

import datetime
from typing import Callable, Iterable

import torch

from atom.models.weights import check_pair
from atom.weights_sync.group import WeightSyncGroup
from atom.weights_sync.protocol import (DEFAULT_BUCKET_BYTES, MAGIC, PROTOCOL, decode_status,
                                        plan_buckets)


def materialize(tensor) -> torch.Tensor:
    """A plain local tensor: DTensors (FSDP2, TP) are gathered with full_tensor() here."""
    full = getattr(tensor, "full_tensor", None)
    if full is not None and type(tensor).__name__ == "DTensor":
        tensor = full()
    return tensor.detach()


def _entries(items: list[tuple[str, torch.Tensor]], dtype: torch.dtype | None) -> list[tuple]:
    """(name, shape, wire dtype) of each tensor, refusing what the engines would refuse only later."""
    entries, seen = [], set()
    for name, t in items:
        if name in seen:
            raise ValueError(f"weight {name!r} appears twice in one update")
        seen.add(name)
        if t.is_meta:
            raise ValueError(f"weight {name!r} is a meta tensor (a shape without data); materialize it first")
        dt = dtype or t.dtype
        if not dt.is_floating_point:
            raise ValueError(f"weight {name!r}: only floating tensors can be sent, got {dt}")
        entries.append((name, tuple(t.shape), dt))
    return entries


class WeightRejected(ValueError):
    """An engine rank refused the update's metadata (or failed to apply it); nothing changed there."""


class WeightSender:
    """Sends weight updates from rank 0 of a WeightSyncGroup.

    Example (trainer, after optimizer.step())::

        group = init_weight_sync_group("10.0.0.1", 29600, rank=0, world_size=1 + engine_ranks)
        sender = WeightSender(group)
        sender.send(model.named_parameters(), version=step)
    """

    def __init__(self, group: WeightSyncGroup, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        if group.rank != 0:
            raise ValueError(f"WeightSender must be rank 0 of its group, got rank {group.rank}")
        self.group = group
        self.bucket_bytes = bucket_bytes

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, version: int | None = None,
             partial: bool = False, dtype: torch.dtype | None = None, bucket_bytes: int | None = None,
             timeout: float | datetime.timedelta | None = None,
             on_accepted: Callable[[bool], None] | None = None) -> int | None:
        """Send one update; returns the engines' new weight_version once every rank applied it.

        named_tensors: (HF name, tensor) pairs; tensors may be DTensors, gathered one at a time
            while their bucket is packed (so never the whole model at once). Only their
            shapes and dtypes are read before the engines accept the metadata.
        version: the weight_version engines adopt (default: each engine's current + 1).
        partial: a deliberate update of some tensors only.
        dtype: cast everything to this dtype on the wire (default: each tensor's own).
        on_accepted: called with True once every engine accepted the metadata (False when one
            refused), before any tensor is gathered; `push` uses it to release FSDP peers.

        Raises TypeError / ValueError for what cannot be sent (not a (str, tensor) pair, a name twice,
        a meta or non-floating tensor) before anything is sent, WeightRejected (a ValueError) when an
        engine refuses the metadata or fails to apply the update (naming the cause), WeightSyncError
        when the transfer breaks off.
        """
        items = [check_pair(item, i) for i, item in enumerate(named_tensors)]
        meta = plan_buckets(_entries(items, dtype), bucket_bytes or self.bucket_bytes, version, partial)
        g = self.group
        payload = meta.encode()
        header = torch.tensor([MAGIC, PROTOCOL, len(payload)], dtype=torch.int64, device=g.device)
        g.broadcast(header, timeout=timeout, what="sending the update header")
        g.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(g.device), timeout=timeout,
                    what="sending the update metadata")
        self._check_statuses(g.allgather_bytes(b"", timeout=timeout, what="metadata verdicts"), "refused the update",
                             on_accepted)
        if on_accepted is not None:
            on_accepted(True)

        # Buckets hold consecutive tensors, in order: pack each, then broadcast it.
        buf = torch.empty(max(meta.buckets, default=0), dtype=torch.uint8, device=g.device)
        nb = len(meta.buckets)
        for i, ((_, tensor), tm) in enumerate(zip(items, meta.tensors)):
            flat = materialize(tensor).to(tm.dtype).contiguous().reshape(-1).view(torch.uint8)
            buf[tm.offset: tm.offset + tm.nbytes].copy_(flat)
            del flat
            if i + 1 == len(meta.tensors) or meta.tensors[i + 1].bucket != tm.bucket:
                g.broadcast(buf[: meta.buckets[tm.bucket]], timeout=timeout,
                            what=f"sending bucket {tm.bucket + 1} of {nb}")
        statuses = g.allgather_bytes(b"", timeout=timeout, what="results of the update")
        self._check_statuses(statuses, "failed to apply the update", None)
        versions = {decode_status(s).get("version") for s in statuses[1:]}
        versions.discard(None)
        return versions.pop() if len(versions) == 1 else (version if version is not None else None)

    @staticmethod
    def _check_statuses(statuses: list[bytes], what: str, on_accepted: Callable[[bool], None] | None) -> None:
        errors = [(r, decode_status(s)["error"]) for r, s in enumerate(statuses) if r > 0 and not decode_status(s)["ok"]]
        if errors:
            if on_accepted is not None:
                on_accepted(False)
            r, msg = errors[0]
            more = f" (and {len(errors) - 1} more rank(s))" if len(errors) > 1 else ""
            raise WeightRejected(f"engine rank {r}{more} {what}: {msg}")

