"""Handing trainer tensors to an engine in another process on the same device, without a copy
through the network: CUDA IPC on a GPU (shared memory on the CPU), through the handles
`torch.multiprocessing` puts in a pickle.

Two shapes, as verl, slime and NeMo-RL use them:

* buckets (`IpcBucketSender` -> `RolloutEngine.update_weights_from_ipc`): the trainer packs
  tensors into a few reusable flat buffers and sends one payload per bucket; the engine opens
  each buffer once and copies out of it;
* tensors (`serialize_tensors` -> `RolloutEngine.update_weights_from_tensor`): handles of the
  trainer's own tensors, one pickle for a list of (name, tensor) pairs (SGLang's shape).

A payload is a pickle: load only payloads from your own trainer (as with SGLang's and vLLM's).
"""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Iterable, Iterator

import torch
import torch.multiprocessing  # noqa: F401 - registers the tensor reducers with ForkingPickler

from atom.weights_sync.sender import materialize
from atom.weights_sync.validate import TensorSpec

FORMAT = "atom-ipc-bucket-1"
ALIGN = 256  # bytes: every tensor of a bucket starts aligned for any dtype and vector loads


def dumps(obj) -> bytes:
    """Pickle with torch.multiprocessing's reducers (tensors travel as IPC / shared-memory handles)."""
    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def serialize_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """Trainer side of update_weights_from_tensor: handles of these tensors (no copy). They must
    stay alive and unchanged until the engine's call returns."""
    pairs = [(str(n), materialize(t)) for n, t in named_tensors]
    if any(t.is_cuda for _, t in pairs):
        torch.cuda.current_stream().synchronize()  # the engine reads them on its own stream
    return dumps(pairs)


def load_tensors(payload) -> list[tuple[str, torch.Tensor]]:
    """Engine side: the (name, tensor) pairs of a serialize_tensors payload, or pairs as they are."""
    pairs = pickle.loads(payload) if isinstance(payload, (bytes, bytearray, memoryview)) else payload
    try:
        pairs = [(n, t) for n, t in pairs]
    except (TypeError, ValueError):
        raise ValueError("update_weights_from_tensor: expected (name, tensor) pairs") from None
    for n, t in pairs:
        if not isinstance(n, str) or not isinstance(t, torch.Tensor):
            raise ValueError(f"update_weights_from_tensor: expected (name, tensor) pairs, got ({type(n).__name__}, "
                             f"{type(t).__name__})")
    return pairs


@dataclass(frozen=True)
class BucketEntry:
    spec: TensorSpec
    offset: int

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.spec.shape:
            n *= d
        return n * torch.empty((), dtype=self.spec.dtype).element_size()


@dataclass
class Bucket:
    """One received bucket: the shared flat buffer and where each tensor lies in it."""

    buffer: torch.Tensor
    entries: list[BucketEntry]

    def problems(self) -> list[str]:
        b = self.buffer
        if b.dtype != torch.uint8 or b.dim() != 1 or not b.is_contiguous():
            return [f"the bucket buffer must be a flat contiguous uint8 tensor, got {b.dtype} {tuple(b.shape)}"]
        out = []
        for e in self.entries:
            size = torch.empty((), dtype=e.spec.dtype).element_size()
            if e.offset < 0 or e.offset % size or e.offset + e.nbytes > b.numel():
                out.append(f"weight {e.spec.name!r}: bytes [{e.offset}, {e.offset + e.nbytes}) do not fit an "
                           f"aligned place in the {b.numel()}-byte bucket")
        return out

    def views(self) -> Iterator[tuple[str, torch.Tensor]]:
        for e in self.entries:
            yield e.spec.name, self.buffer[e.offset: e.offset + e.nbytes].view(e.spec.dtype).view(e.spec.shape)


def load_bucket(payload) -> Bucket:
    """Engine side: open one IpcBucketSender payload (ValueError if it is not one)."""
    d = pickle.loads(payload) if isinstance(payload, (bytes, bytearray, memoryview)) else payload
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ValueError(f"update_weights_from_ipc: not an atom IPC bucket (format {FORMAT!r}); build payloads "
                         "with atom.weights_sync.IpcBucketSender")
    from atom.weights_sync.tensor_sync import parse_dtype
    entries = [BucketEntry(TensorSpec(str(n), tuple(int(x) for x in s), parse_dtype(dt)), int(o))
               for n, dt, s, o in d["tensors"]]
    return Bucket(d["buffer"], entries)


class IpcBucketSender:
    """Trainer side of update_weights_from_ipc: packs (name, tensor) pairs into flat buffers on
    the trainer's device and yields one payload per bucket.

    bucket_bytes: target bucket size (a bigger tensor gets a bucket of its own).
    num_buffers: buffers used in turn. A buffer is packed again `num_buffers` payloads later:
        the engine's call for a payload must have returned by then (a synchronous call per
        payload, as in the example, always has).
    dtype: cast every tensor to this dtype (e.g. torch.bfloat16 from fp32 masters).

    The engine keeps the last two buffers it opened mapped, so later syncs skip opening them;
    `RolloutEngine.release_ipc_buffers()` lets go of them (before the trainer exits, or to give
    their memory back).

    Example (trainer and engine in two processes on one GPU)::

        sender = IpcBucketSender(bucket_bytes=1 << 30, device="cuda")
        for payload in sender.payloads(model.named_parameters()):
            engine_rpc("update_weights_from_ipc", payload)   # returns once the engine has copied it

    With num_buffers=2 the trainer may pack bucket k+1 while the engine copies bucket k: send
    payload k+1 only after the engine's answer for payload k (bench/ipc_weights.py does this).
    """

    def __init__(self, bucket_bytes: int = 1 << 30, device: torch.device | str | None = None,
                 num_buffers: int = 2, dtype: torch.dtype | None = None) -> None:
        if bucket_bytes < 1 or num_buffers < 1:
            raise ValueError("IpcBucketSender: bucket_bytes and num_buffers must be >= 1")
        self.bucket_bytes, self.num_buffers, self.dtype = bucket_bytes, num_buffers, dtype
        self.device = torch.device(device) if device is not None else None
        self._buffers: list[torch.Tensor | None] = [None] * num_buffers
        self._turn = 0

    def payloads(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[bytes]:
        pending: list[tuple[str, torch.Tensor, int]] = []
        used = 0
        for name, t in named_tensors:
            t = materialize(t)
            if self.dtype is not None:
                t = t.to(self.dtype)
            nbytes = t.numel() * t.element_size()
            offset = -(-used // ALIGN) * ALIGN
            if pending and offset + nbytes > self.bucket_bytes:
                yield self._pack(pending, used)
                pending, offset = [], 0
            pending.append((name, t, offset))
            used = offset + nbytes
        if pending:
            yield self._pack(pending, used)

    def _pack(self, pending: list[tuple[str, torch.Tensor, int]], used: int) -> bytes:
        device = self.device if self.device is not None else pending[0][1].device
        i = self._turn % self.num_buffers
        self._turn += 1
        buf = self._buffers[i]
        if buf is None or buf.numel() < used or buf.device != device:
            buf = self._buffers[i] = torch.empty(max(used, self.bucket_bytes), dtype=torch.uint8, device=device)
        meta = []
        for name, t, offset in pending:
            flat = t.contiguous().reshape(-1).view(torch.uint8)
            buf[offset: offset + flat.numel()].copy_(flat, non_blocking=True)
            meta.append((name, str(t.dtype).removeprefix("torch."), list(t.shape), offset))
        if buf.is_cuda:
            torch.cuda.current_stream(buf.device).synchronize()
        return dumps({"format": FORMAT, "buffer": buf[:used], "tensors": meta})
