"""Engine side: receive weight updates from the trainer over a WeightSyncGroup."""
from __future__ import annotations

import datetime
from typing import Iterator

import torch

from atom.engine.memory import WEIGHTS
from atom.models.weights import UpdateCheck
from atom.weights_sync.group import WeightSyncError, WeightSyncGroup
from atom.weights_sync.protocol import (MAGIC, MAX_METADATA_BYTES, PROTOCOL, UpdateMeta, decode_status,
                                        encode_status)

_STAGING = ("auto", "host", "none")


class WeightReceiver:
    """Receives updates for one engine rank (every engine rank runs one).

    staging: where buckets wait until the last one arrived, so that a transfer that breaks off
        leaves the previous weights serving:
        "auto": as they arrive (device memory for nccl, host memory for gloo);
        "host": copied to (pinned) host memory, so GPU memory holds one bucket at a time;
        "none": no staging: each bucket is applied on arrival (no extra memory); a transfer
            that breaks off then leaves the engine refusing to generate until a complete
            update succeeds.
    check_finite: reject the update if any received tensor holds nan/inf (with staging, before
        anything is copied).
    """

    def __init__(self, engine, group: WeightSyncGroup, *, staging: str = "auto", check_finite: bool = False) -> None:
        if staging not in _STAGING:
            raise ValueError(f"WeightReceiver: staging must be one of {_STAGING}, got {staging!r}")
        if group.rank == 0:
            raise ValueError("WeightReceiver: rank 0 of the group is the sender")
        self.engine = engine
        self.group = group
        self.staging = staging
        self.check_finite = check_finite

    # ---- metadata ------------------------------------------------------------------------
    def _validate(self, meta: UpdateMeta) -> str:
        """'' when the engine can take this update as described, else why not (names the tensors)."""
        engine = self.engine
        busy = engine.quiet_problem()
        if busy:
            return busy
        if WEIGHTS in engine.sleeping_tags:
            return "the engine's weights are released (sleep); call wake_up(['weights']) first"
        # The same checks as update_weights: known names and shapes, no checkpoint tensor filled twice.
        check = UpdateCheck(*engine.weight_check_targets())
        problems: list[str] = []
        for t in meta.tensors:
            try:
                check.accept(t.name, t.shape)
            except ValueError as e:
                problems.append(str(e))
        if not meta.partial:
            missing = check.missing()
            if missing:
                shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
                problems.append(f"the update is missing {len(missing)} tensor(s): {shown} (send partial=True for a "
                                "deliberate partial update)")
        if not problems:
            return ""
        return "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more problem(s)" if len(problems) > 5 else "")

    # ---- receive -------------------------------------------------------------------------
    def receive(self, timeout: float | datetime.timedelta | None = None,
                bucket_timeout: float | datetime.timedelta | None = None) -> int:
        """Wait for one update and apply it; returns the engine's new weight_version.

        timeout: how long to wait for the update to start (default: the group's timeout).
        bucket_timeout: how long each later step may take (default: the group's timeout).
        Raises ValueError (bad metadata: nothing changed, the group stays usable),
        WeightSyncError / WeightSyncTimeout (the sender died or stalled: with staging the
        previous weights keep serving; the group must be rebuilt). Any other failure while
        applying the update is reported to the sender (its `send` raises WeightRejected naming
        the cause) before it is raised here.
        """
        meta = self._receive_meta(timeout, bucket_timeout)
        buckets = _Buckets(self.group, meta, bucket_timeout)
        try:
            if self.staging == "none":
                version = self._apply(meta, buckets.stream(meta))
            else:
                staged = [self._stage(buckets.next()) for _ in meta.buckets]
                # Every view is built before anything is copied, and update_weights checks a list
                # whole first: a bad update changes nothing.
                version = self._apply(meta, list(self._unpack(meta, staged)))
        except WeightSyncError:
            raise  # the transfer broke off: the group is unusable, nobody to tell
        except Exception as e:
            buckets.drain()  # keep in step with the sender, which sends every bucket before it listens
            self._report(encode_status(False, str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"),
                         bucket_timeout)
            raise
        self._report(encode_status(True, "", version), bucket_timeout)
        return version

    def _receive_meta(self, timeout, bucket_timeout) -> UpdateMeta:
        """The update's header and metadata, checked here and exchanged with the other ranks' verdicts."""
        g = self.group
        header = torch.zeros(3, dtype=torch.int64, device=g.device)
        g.broadcast(header, timeout=timeout, what="waiting for an update header")
        magic, protocol, n = (int(x) for x in header.tolist())
        if magic != MAGIC or protocol != PROTOCOL:
            raise RuntimeError(f"weight sync: bad header {header.tolist()} (expected magic {MAGIC:#x}, protocol "
                               f"{PROTOCOL}); is the sender an atom WeightSender of the same version?")
        if not 0 <= n <= MAX_METADATA_BYTES:
            raise RuntimeError(f"weight sync: the header announces {n} bytes of metadata (at most "
                               f"{MAX_METADATA_BYTES}); the group is out of step and must be rebuilt")
        raw = torch.empty(n, dtype=torch.uint8, device=g.device)
        g.broadcast(raw, timeout=bucket_timeout, what="receiving the update metadata")
        try:
            meta = UpdateMeta.decode(raw.cpu().numpy().tobytes())
            problem = self._validate(meta)
        except ValueError as e:
            meta, problem = None, str(e)
        statuses = g.allgather_bytes(encode_status(not problem, problem), timeout=bucket_timeout,
                                     what="exchanging metadata verdicts")
        if problem:
            raise ValueError(f"weight update refused, nothing changed: {problem}")
        others = [r for r, s in enumerate(statuses) if r > 0 and not decode_status(s)["ok"]]
        if others:
            raise ValueError(f"weight update refused by engine rank {others[0]}, nothing changed here either")
        return meta

    def _stage(self, buf: torch.Tensor) -> torch.Tensor:
        if self.staging == "host" and buf.device.type != "cpu":
            host = torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True)
            host.copy_(buf)
            return host
        return buf

    @staticmethod
    def _views(b: int, buf: torch.Tensor, by_bucket) -> Iterator[tuple[str, torch.Tensor]]:
        for t in by_bucket[b]:
            yield t.name, buf[t.offset: t.offset + t.nbytes].view(t.dtype).view(t.shape)

    def _unpack(self, meta: UpdateMeta, staged: list[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        by_bucket = meta.bucket_tensors()
        for b, buf in enumerate(staged):
            yield from self._views(b, buf, by_bucket)

    def _apply(self, meta: UpdateMeta, pairs) -> int:
        return self.engine.update_weights(pairs, partial=meta.partial, check_finite=self.check_finite,
                                          version=meta.version)

    def _report(self, status: bytes, timeout) -> None:
        self.group.allgather_bytes(status, timeout=timeout, what="reporting the result")


class _Buckets:
    """An update's buckets, received in order. Remembers how far it got, so that an update that
    fails half-way still receives (and drops) the rest: the sender broadcasts every bucket
    before it waits for the result, and the group's collectives must stay in step."""

    def __init__(self, group: WeightSyncGroup, meta: UpdateMeta, timeout) -> None:
        self.group, self.meta, self.timeout = group, meta, timeout
        self.received = 0

    def next(self) -> torch.Tensor:
        b = self.received
        buf = torch.empty(self.meta.buckets[b], dtype=torch.uint8, device=self.group.device)
        self._broadcast(buf, b)
        return buf

    def stream(self, meta: UpdateMeta) -> Iterator[tuple[str, torch.Tensor]]:
        by_bucket = meta.bucket_tensors()
        for b in range(len(meta.buckets)):
            yield from WeightReceiver._views(b, self.next(), by_bucket)

    def drain(self) -> None:
        rest = self.meta.buckets[self.received:]
        if rest:
            scratch = torch.empty(max(rest), dtype=torch.uint8, device=self.group.device)
            while self.received < len(self.meta.buckets):
                self._broadcast(scratch[: self.meta.buckets[self.received]], self.received)

    def _broadcast(self, buf: torch.Tensor, b: int) -> None:
        self.group.broadcast(buf, timeout=self.timeout, what=f"receiving bucket {b + 1} of {len(self.meta.buckets)}")
        self.received = b + 1
