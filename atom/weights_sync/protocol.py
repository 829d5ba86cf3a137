"""Wire format of one weight update over a WeightSyncGroup (rank 0 sends, every other rank receives).

1. header: int64[3] = [MAGIC, PROTOCOL, n] then n bytes of JSON metadata:
   {"version": int | null, "partial": bool, "buckets": [nbytes, ...],
    "tensors": [[name, shape, dtype, bucket, offset], ...]}
2. status: every rank's verdict on the metadata (allgather); anything but "" aborts the update
   on every rank before any weight moves.
3. buckets: one uint8 broadcast per bucket; tensor i lies at bytes [offset, offset + nbytes) of
   its bucket, contiguous, in its dtype.
4. status again: every engine rank's result of applying the update (its new version or error).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

MAGIC = 0x41544F4D  # "ATOM"
PROTOCOL = 1
ALIGN = 64
DEFAULT_BUCKET_BYTES = 1 << 30

_DTYPES = {str(dt).removeprefix("torch."): dt for dt in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype} cannot be sent (floating dtypes only: {sorted(_DTYPES)})")
    return name


def dtype_of(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} in the weight metadata") from None


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    bucket: int
    offset: int

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class UpdateMeta:
    version: int | None
    partial: bool
    buckets: list[int]
    tensors: list[TensorMeta]

    def encode(self) -> bytes:
        return json.dumps({"version": self.version, "partial": self.partial, "buckets": self.buckets,
                           "tensors": [[t.name, list(t.shape), dtype_name(t.dtype), t.bucket, t.offset]
                                       for t in self.tensors]}).encode()

    @staticmethod
    def decode(data: bytes) -> "UpdateMeta":
        d = json.loads(data.decode())
        tensors = [TensorMeta(n, tuple(int(x) for x in s), dtype_of(dt), int(b), int(o)) for n, s, dt, b, o in d["tensors"]]
        return UpdateMeta(d["version"], bool(d["partial"]), [int(b) for b in d["buckets"]], tensors)

    def bucket_tensors(self) -> list[list[TensorMeta]]:
        out: list[list[TensorMeta]] = [[] for _ in self.buckets]
        for t in self.tensors:
            out[t.bucket].append(t)
        return out


def plan_buckets(entries: list[tuple[str, tuple[int, ...], torch.dtype]], bucket_bytes: int,
                 version: int | None, partial: bool) -> UpdateMeta:
    """Pack tensors in order into buckets of at most bucket_bytes (a bigger tensor gets its own)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets: list[int] = []
    tensors: list[TensorMeta] = []
    used = None
    for name, shape, dtype in entries:
        meta = TensorMeta(name, tuple(int(d) for d in shape), dtype, 0, 0)
        size = meta.nbytes
        offset = -(-used // ALIGN) * ALIGN if used is not None else 0
        if used is None or (offset + size > bucket_bytes and used > 0):
            buckets.append(0)
            offset = 0
        used = offset + size
        buckets[-1] = used
        tensors.append(TensorMeta(meta.name, meta.shape, dtype, len(buckets) - 1, offset))
    return UpdateMeta(version, partial, buckets, tensors)


def encode_status(ok: bool, message: str = "", version: int | None = None) -> bytes:
    return json.dumps({"ok": ok, "error": message[:3000], "version": version}).encode()


def decode_status(data: bytes) -> dict:
    if not data:
        return {"ok": True, "error": "", "version": None}
    return json.loads(data.decode())
