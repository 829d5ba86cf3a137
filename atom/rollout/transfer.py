"""RolloutEngine's weight transfers in the frameworks' own shapes (mixed into RolloutEngine):

* per-tensor broadcasts over a process group where the trainer holds any rank (OpenRLHF, TRL,
  SGLang's `init_weights_update_group` / `update_weights_from_distributed`);
* handles of trainer tensors in another process on the same device (CUDA IPC; shared memory
  on CPU): `update_weights_from_ipc` (bucketed) and `update_weights_from_tensor` (SGLang).

Each checks every announced tensor (name, shape, dtype, bounds) and the engine's state before
any of it lands in the parameters, as atom.weights_sync.WeightReceiver does: a refused update
raises ValueError and changes nothing. The default keeps the weight version (per-tensor
protocols send a model in many calls); pass weight_version to set it.
"""
from __future__ import annotations

import collections
import datetime
from typing import Any, Sequence

import torch

from atom.weights_sync.group import DEFAULT_TIMEOUT_S, WeightSyncGroup, init_weight_sync_group
from atom.weights_sync.ipc import load_bucket, load_tensors
from atom.weights_sync.tensor_sync import receive_tensors, tensor_specs
from atom.weights_sync.validate import TensorSpec, spec_problems, summarize

# Opened IPC buffers kept alive, so a trainer cycling through its buffers is not re-opened
# (cudaIpcOpenMemHandle) on every bucket; two = IpcBucketSender's default num_buffers.
_KEEP_IPC_BUFFERS = 2


class TransferMixin:
    """Needs RolloutEngine's `_lock`, `update_weights`, `weight_update_problem`, `engine_rank`, `weight_version`."""

    def _init_transfer(self) -> None:
        self._weight_group: WeightSyncGroup | None = None
        self._weight_src = 0
        self._ipc_buffers: collections.deque = collections.deque(maxlen=_KEEP_IPC_BUFFERS)

    # ---- per-tensor broadcasts -----------------------------------------------------------
    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "atom_weight_sync", backend: str = "gloo", *, src: int = 0,
                                  timeout: float | datetime.timedelta = DEFAULT_TIMEOUT_S) -> None:
        """Join the trainer's weight-update group as rank `rank_offset + engine_rank`.

        src: the trainer's rank in the group (0 for OpenRLHF / SGLang, world_size - 1 for TRL).
        Rank 0 hosts the group's TCPStore at master_address:master_port. backend: "gloo" (CPU
        tensors) or "nccl". Every process of the group calls its side at the same time.
        """
        rank = rank_offset + self.engine_rank
        if self._weight_group is not None:
            raise RuntimeError("init_weights_update_group: already in a group; destroy_weights_update_group() first")
        if not 0 <= src < world_size or src == rank:
            raise ValueError(f"init_weights_update_group: the trainer's rank src={src} must be another rank of the "
                             f"group of {world_size} (this engine is rank {rank})")
        self._weight_group = init_weight_sync_group(master_address, master_port, rank, world_size, backend=backend,
                                                    timeout=timeout, group_name=group_name)
        self._weight_src = src

    def destroy_weights_update_group(self, group_name: str | None = None) -> None:
        """Leave the weight-update group (a later init_weights_update_group may join another)."""
        group, self._weight_group = self._weight_group, None
        if group is not None:
            group.close()

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence, shapes: Sequence,
                                        group_name: str | None = None, flush_cache: bool = True, *,
                                        weight_version: int | str | None = None, partial: bool = True,
                                        check_finite: bool = False,
                                        timeout: float | datetime.timedelta | None = None) -> int | str:
        """Receive one broadcast per named tensor from the trainer (in this order) and load them.

        dtypes: torch dtypes or their names; shapes: full HF shapes. Every tensor is received
        before any is loaded; a bad name, shape or dtype (or the engine's state) is reported as
        ValueError after the broadcasts were taken off the wire, so the group stays in step and
        nothing changed. Returns the weight version (unchanged unless weight_version is given).
        A dtype name or shape that cannot be parsed raises at once, before anything is
        received (the trainer's broadcast then times out: rebuild the group).
        flush_cache is accepted for SGLang's signature: the prefix cache is always emptied.
        """
        specs = tensor_specs(names, dtypes, shapes)
        with self._lock:
            group = self._weight_group
            if group is None:
                raise RuntimeError("update_weights_from_distributed: no weight-update group; call "
                                   "init_weights_update_group first")
            problem = self.weight_update_problem(specs, partial)
            received = receive_tensors(group, self._weight_src, specs, timeout)
            if problem:
                raise ValueError(f"weight update refused, nothing changed: {problem}")
            return self._load_checked(list(zip([s.name for s in specs], received)), weight_version, partial,
                                      check_finite)

    # ---- IPC -------------------------------------------------------------------------------
    def update_weights_from_tensor(self, named_tensors: Any, load_format: str | None = None, flush_cache: bool = True,
                                   *, weight_version: int | str | None = None, partial: bool = True,
                                   check_finite: bool = False) -> int | str:
        """Load (name, tensor) pairs handed over from another process: a `serialize_tensors`
        payload, a list of such payloads (one per engine rank, SGLang's shape), or the pairs.
        All are checked before any is loaded. Returns the weight version."""
        if load_format not in (None, "direct"):
            raise ValueError(f"update_weights_from_tensor: load_format={load_format!r} is not supported (None)")
        if isinstance(named_tensors, (list, tuple)) and named_tensors and isinstance(named_tensors[0], bytes):
            named_tensors = named_tensors[self.engine_rank if len(named_tensors) > 1 else 0]
        pairs = load_tensors(named_tensors)
        with self._lock:
            problem = self.weight_update_problem([TensorSpec(n, tuple(t.shape), t.dtype) for n, t in pairs], partial)
            if problem:
                raise ValueError(f"weight update refused, nothing changed: {problem}")
            return self._load_checked(pairs, weight_version, partial, check_finite)

    def update_weights_from_ipc(self, payloads: Any, *, weight_version: int | str | None = None,
                                partial: bool = True, check_finite: bool = False) -> int | str:
        """Load the buckets of one or more IpcBucketSender payloads (all checked first; the
        buffers stay the trainer's: they are copied out before this returns)."""
        if isinstance(payloads, (bytes, bytearray, memoryview, dict)):
            payloads = [payloads]
        buckets = [load_bucket(p) for p in payloads]
        with self._lock:
            problems = [p for b in buckets for p in b.problems()]
            specs = [e.spec for b in buckets for e in b.entries]
            problem = summarize(problems) or self.weight_update_problem(specs, partial)
            if problem:
                raise ValueError(f"weight update refused, nothing changed: {problem}")
            pairs = [pair for b in buckets for pair in b.views()]
            version = self._load_checked(pairs, weight_version, partial, check_finite)
        for b in buckets:
            self._keep_ipc_buffer(b.buffer)
        return version

    def _keep_ipc_buffer(self, buffer: torch.Tensor) -> None:
        ptrs = {t.untyped_storage().data_ptr() for t in self._ipc_buffers}
        if buffer.untyped_storage().data_ptr() not in ptrs:
            self._ipc_buffers.append(buffer)

    def release_ipc_buffers(self) -> None:
        """Drop the trainer buffers kept open (the trainer's memory is freed once it drops them too)."""
        self._ipc_buffers.clear()

    # ---- shared ----------------------------------------------------------------------------
    def _load_checked(self, pairs: list[tuple[str, torch.Tensor]], weight_version, partial: bool,
                      check_finite: bool) -> int | str:
        if check_finite:  # before anything is copied, so a bad update changes nothing
            bad = [n for n, t in pairs if not bool(torch.isfinite(t).all())]
            if bad:
                raise ValueError(f"weight update refused, nothing changed: weight {bad[0]!r} contains non-finite "
                                 "values (nan or inf)")
        version = self.weight_version if weight_version is None else weight_version
        return self.update_weights(pairs, partial=partial, version=version)
