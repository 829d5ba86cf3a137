"""Engine side: receive weight updates from the trainer over a WeightSyncGroup."""
from __future__ import annotations

import datetime
from typing import Iterator

import torch

from atom.engine.memory import WEIGHTS
from atom.models.weights import is_ignored
from atom.weights_sync.group import WeightSyncGroup
from atom.weights_sync.protocol import MAGIC, PROTOCOL, UpdateMeta, decode_status, encode_status

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
    check_finite: reject the update if any received tensor holds nan/inf (needs staging).
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
        runner = engine._engine.runner
        busy = engine.quiet_problem()
        if busy:
            return busy
        if WEIGHTS in runner.memory.asleep():
            return "the engine's weights are released (sleep level 2); call wake_up(['weights']) first"
        wmap = runner.weight_map
        problems: list[str] = []
        seen: set[str] = set()
        covered: set[str] = set()
        for t in meta.tensors:
            if t.name in seen:
                problems.append(f"weight {t.name!r} appears twice")
                continue
            seen.add(t.name)
            if is_ignored(t.name):
                continue
            slot = wmap.lookup(t.name)
            if slot is None:
                problems.append(f"weight {t.name!r} is not a parameter of this {type(runner.model).__name__}")
                continue
            if tuple(t.shape) != slot.shape():
                problems.append(f"weight {t.name!r}: shape {tuple(t.shape)} does not match the model's {slot.shape()}")
                continue
            covered.update(wmap.covered_by(t.name))
        if not meta.partial:
            missing = sorted(wmap.required_names() - covered)
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
        previous weights keep serving; the group must be rebuilt).
        """
        g = self.group
        header = torch.zeros(3, dtype=torch.int64, device=g.device)
        g.broadcast(header, timeout=timeout, what="waiting for an update header")
        magic, protocol, n = (int(x) for x in header.tolist())
        if magic != MAGIC or protocol != PROTOCOL:
            raise RuntimeError(f"weight sync: bad header {header.tolist()} (expected magic {MAGIC:#x}, protocol "
                               f"{PROTOCOL}); is the sender an atom WeightSender of the same version?")
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

        if self.staging == "none":
            return self._apply(meta, self._stream(meta, bucket_timeout), bucket_timeout)
        staged = [self._stage(self._recv_bucket(meta, b, bucket_timeout)) for b in range(len(meta.buckets))]
        if self.check_finite:  # before anything is copied, so a bad update changes nothing
            for name, t in self._unpack(meta, staged):
                if t.is_floating_point() and not torch.isfinite(t).all():
                    problem = f"weight {name!r}: contains non-finite values (nan or inf)"
                    self.group.allgather_bytes(encode_status(False, problem), timeout=bucket_timeout,
                                               what="reporting the result")
                    raise ValueError(f"weight update refused, nothing changed: {problem}")
        return self._apply(meta, self._unpack(meta, staged), bucket_timeout)

    def _recv_bucket(self, meta: UpdateMeta, b: int, timeout) -> torch.Tensor:
        buf = torch.empty(meta.buckets[b], dtype=torch.uint8, device=self.group.device)
        self.group.broadcast(buf, timeout=timeout, what=f"receiving bucket {b + 1} of {len(meta.buckets)}")
        return buf

    def _stage(self, buf: torch.Tensor) -> torch.Tensor:
        if self.staging == "host" and buf.device.type != "cpu":
            host = torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True)
            host.copy_(buf)
            return host
        return buf

    @staticmethod
    def _views(meta: UpdateMeta, b: int, buf: torch.Tensor, by_bucket) -> Iterator[tuple[str, torch.Tensor]]:
        for t in by_bucket[b]:
            yield t.name, buf[t.offset: t.offset + t.nbytes].view(t.dtype).view(t.shape)

    def _unpack(self, meta: UpdateMeta, staged: list[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        by_bucket = meta.bucket_tensors()
        for b, buf in enumerate(staged):
            yield from self._views(meta, b, buf, by_bucket)

    def _stream(self, meta: UpdateMeta, timeout) -> Iterator[tuple[str, torch.Tensor]]:
        by_bucket = meta.bucket_tensors()
        for b in range(len(meta.buckets)):
            yield from self._views(meta, b, self._recv_bucket(meta, b, timeout), by_bucket)

    def _apply(self, meta: UpdateMeta, pairs: Iterator[tuple[str, torch.Tensor]], timeout) -> int:
        try:
            version = self.engine.update_weights(pairs, partial=meta.partial, check_finite=self.check_finite,
                                                 version=meta.version)
        except ValueError as e:  # applying failed locally (e.g. non-finite): tell the sender, then raise
            self.group.allgather_bytes(encode_status(False, str(e)), timeout=timeout, what="reporting the result")
            raise
        self.group.allgather_bytes(encode_status(True, "", version), timeout=timeout, what="reporting the result")
        return version
