"""Per-tensor broadcasts, as OpenRLHF, TRL and SGLang send weights.

The trainer announces each tensor (name, dtype, shape) to the engine by its own RPC (Ray,
HTTP, a queue) and broadcasts it over a process group in which it holds any rank: OpenRLHF
and SGLang put the trainer first (rank 0), TRL last. The engine side
(`RolloutEngine.update_weights_from_distributed`) checks every announced tensor before
receiving, receives them all, and only then loads them, so a refused update changes nothing.
"""
from __future__ import annotations

import datetime
from typing import Iterable, Sequence

import torch

from atom.weights_sync.group import WeightSyncGroup
from atom.weights_sync.validate import TensorSpec


def parse_dtype(dtype) -> torch.dtype:
    """A torch dtype from a torch.dtype, "bfloat16" or "torch.bfloat16" (how frameworks send it)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        found = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(found, torch.dtype):
            return found
    raise ValueError(f"unknown dtype {dtype!r} (expected a torch.dtype or a name like 'bfloat16')")


def tensor_specs(names: Sequence[str], dtypes: Sequence, shapes: Sequence) -> list[TensorSpec]:
    """The specs of an announced update; ValueError when the three lists do not line up."""
    if not (len(names) == len(dtypes) == len(shapes)):
        raise ValueError(f"names, dtypes and shapes must have one entry per tensor, got {len(names)}, "
                         f"{len(dtypes)} and {len(shapes)}")
    return [TensorSpec(str(n), tuple(int(d) for d in s), parse_dtype(dt)) for n, dt, s in zip(names, dtypes, shapes)]


def receive_tensors(group: WeightSyncGroup, src: int, specs: list[TensorSpec],
                    timeout: float | datetime.timedelta | None = None) -> list[torch.Tensor]:
    """One broadcast from rank `src` per spec, in order, each into a fresh tensor on the group's device."""
    out = []
    for i, s in enumerate(specs):
        buf = torch.empty(s.shape, dtype=s.dtype, device=group.device)
        group.broadcast(buf, src=src, timeout=timeout, what=f"receiving {s.name!r} ({i + 1} of {len(specs)})")
        out.append(buf)
    return out


def send_tensors(group: WeightSyncGroup, named_tensors: Iterable[tuple[str, torch.Tensor]],
                 timeout: float | datetime.timedelta | None = None) -> int:
    """Trainer side: broadcast each tensor from this rank, in order (the engine must have been
    told their names, dtypes and shapes, and call update_weights_from_distributed). Returns the count."""
    n = 0
    for name, t in named_tensors:
        t = t.detach().to(group.device).contiguous()
        group.broadcast(t, src=group.rank, timeout=timeout, what=f"sending {name!r}")
        n += 1
    return n
