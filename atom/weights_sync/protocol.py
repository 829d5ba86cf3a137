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
# Metadata is ~100 bytes a tensor (a 30B MoE: ~2 MB); a header announcing more is refused unread.
MAX_METADATA_BYTES = 1 << 26

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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _tensor_meta(row, num_buckets: int) -> "TensorMeta":
    """One [name, shape, dtype, bucket, offset] row of the metadata, checked field by field."""
    if not isinstance(row, list) or len(row) != 5:
        raise ValueError(f"weight metadata: a tensor entry must be [name, shape, dtype, bucket, offset], got {row!r:.200}")
    name, shape, dtype, bucket, offset = row
    if not isinstance(name, str) or not name:
        raise ValueError(f"weight metadata: tensor name {name!r:.100} must be a non-empty string")
    if not isinstance(shape, list) or not all(_is_int(x) and x >= 0 for x in shape):
        raise ValueError(f"weight metadata: weight {name!r}: shape {shape!r:.100} must be a list of sizes >= 0")
    if not isinstance(dtype, str):
        raise ValueError(f"weight metadata: weight {name!r}: dtype {dtype!r:.100} must be a dtype name")
    if not _is_int(bucket) or not 0 <= bucket < num_buckets:
        raise ValueError(f"weight metadata: weight {name!r}: bucket {bucket!r} is not one of the "
                         f"{num_buckets} buckets")
    if not _is_int(offset) or offset < 0:
        raise ValueError(f"weight metadata: weight {name!r}: offset {offset!r} must be an integer >= 0")
    return TensorMeta(name, tuple(shape), dtype_of(dtype), bucket, offset)


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
        """Parse metadata and check its layout completely (ValueError naming the first problem), so
        that no layout, atom's or a foreign sender's, gets past here unless every tensor lies inside
        its bucket, no two overlap, names are unique and every bucket is exactly filled."""
        try:
            d = json.loads(data.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"the weight metadata is not JSON ({e})") from None
        if not isinstance(d, dict) or not {"version", "partial", "buckets", "tensors"} <= set(d):
            raise ValueError("the weight metadata must be an object with version, partial, buckets and tensors")
        version, partial, buckets, rows = d["version"], d["partial"], d["buckets"], d["tensors"]
        if version is not None and not _is_int(version):
            raise ValueError(f"weight metadata: version={version!r} must be an integer or null")
        if not isinstance(partial, bool):
            raise ValueError(f"weight metadata: partial={partial!r} must be a bool")
        if not isinstance(buckets, list) or not all(_is_int(b) and b >= 0 for b in buckets):
            raise ValueError("weight metadata: buckets must be a list of byte counts >= 0")
        if not isinstance(rows, list):
            raise ValueError("weight metadata: tensors must be a list")
        meta = UpdateMeta(version, partial, buckets, [_tensor_meta(row, len(buckets)) for row in rows])
        meta.check_layout()
        return meta

    def check_layout(self) -> None:
        """Names unique; each tensor inside its bucket; no overlaps; each bucket ends with its last tensor."""
        names: set[str] = set()
        for t in self.tensors:
            if t.name in names:
                raise ValueError(f"weight metadata: weight {t.name!r} appears twice")
            names.add(t.name)
        for b, tensors in enumerate(self.bucket_tensors()):
            end = 0
            previous = None
            for t in sorted(tensors, key=lambda t: t.offset):
                if t.offset + t.nbytes > self.buckets[b]:
                    raise ValueError(f"weight metadata: weight {t.name!r} lies at bytes [{t.offset}, "
                                     f"{t.offset + t.nbytes}) beyond the end of bucket {b} ({self.buckets[b]} bytes)")
                if t.offset < end:
                    raise ValueError(f"weight metadata: weight {t.name!r} at byte {t.offset} of bucket {b} "
                                     f"overlaps {previous!r} (which ends at byte {end})")
                end, previous = t.offset + t.nbytes, t.name
            if not tensors:
                raise ValueError(f"weight metadata: bucket {b} holds no tensor")
            if end != self.buckets[b]:
                raise ValueError(f"weight metadata: bucket {b} has {self.buckets[b]} bytes but its tensors end at "
                                 f"byte {end}")

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
