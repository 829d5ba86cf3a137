"""Trainer-side hook: after optimizer.step(), push the model's weights to the rollout engine(s)."""
from __future__ import annotations

import re
from typing import Callable, Iterator

import torch
from torch import nn

from atom.weights_sync.protocol import DEFAULT_BUCKET_BYTES
from atom.weights_sync.sender import WeightSender, materialize

# Wrapper prefixes that training frameworks insert into parameter names.
_WRAPPERS = re.compile(r"(^|\.)(_orig_mod|module|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")


def hf_name(name: str) -> str:
    """A trainer parameter name with torch.compile / DDP / FSDP1 / checkpointing wrappers removed."""
    while True:
        stripped = _WRAPPERS.sub(r"\1", name)
        if stripped == name:
            return name
        name = stripped


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def _release_peers(accepted: bool, src: int, group) -> None:
    import torch.distributed as dist
    flag = torch.tensor([1 if accepted else 0], dtype=torch.int32)
    if dist.get_backend(group) == "nccl":
        flag = flag.cuda()
    dist.broadcast(flag, src=src, group=group)


def _wait_for_source(src: int, group) -> bool:
    import torch.distributed as dist
    flag = torch.zeros(1, dtype=torch.int32)
    if dist.get_backend(group) == "nccl":
        flag = flag.cuda()
    dist.broadcast(flag, src=src, group=group)
    return bool(flag.item())


@torch.no_grad()
def push(model: nn.Module, target, rename: Callable[[str], str | None] | None = None,
         bucket_bytes: int = DEFAULT_BUCKET_BYTES, *, dtype: torch.dtype | None = None, version: int | None = None,
         partial: bool = False, src: int = 0, trainer_group=None) -> int | None:
    """Send `model`'s parameters to `target`; returns the engines' new weight_version.

    target: a RolloutEngine in this process (update_weights, streamed tensor by tensor), a
        WeightSender (over its group, in buckets of bucket_bytes), or None on trainer ranks
        that only help gather sharded parameters.
    rename: trainer name -> HF name, or None to skip that parameter (default: strip
        torch.compile / DDP / FSDP wrapper prefixes; a transformers model's names are HF names).
    FSDP2 / DTensor parameters are gathered one at a time with full_tensor(), never the whole
    model at once; every rank of the trainer group must then call push in the same step
    (ranks without a target pass None). Rank `src` of `trainer_group` (default: WORLD) tells
    the others whether the engines accepted the update before any gathering starts.
    """
    rename = rename or hf_name
    items = []
    for name, p in model.named_parameters():
        new = rename(name)
        if new is not None:
            items.append((new, p))
    coordinate = is_src = False
    if any(_is_dtensor(p) for _, p in items):
        import torch.distributed as dist
        coordinate = dist.is_available() and dist.is_initialized() and dist.get_world_size(trainer_group) > 1
        is_src = coordinate and dist.get_rank(trainer_group) == src

    if coordinate and not is_src:
        if not _wait_for_source(src, trainer_group):
            return None  # the engines refused the update (the source rank raised)
    if target is None:
        if not coordinate:
            raise ValueError("push: target is None, which only makes sense on a non-source rank of a sharded model")
        for _, p in items:
            if _is_dtensor(p):
                materialize(p)
        return None
    if isinstance(target, WeightSender):
        on_accepted = (lambda ok: _release_peers(ok, src, trainer_group)) if is_src else None
        return target.send(items, version=version, partial=partial, dtype=dtype, bucket_bytes=bucket_bytes,
                           on_accepted=on_accepted)
    if hasattr(target, "update_weights"):
        if is_src:
            _release_peers(True, src, trainer_group)
        return target.update_weights(_stream(items, dtype), partial=partial, version=version)
    raise TypeError(f"push: target must be a RolloutEngine, a WeightSender or None, got {type(target).__name__}")


def _stream(items, dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for name, p in items:
        t = materialize(p)
        yield name, (t if dtype is None else t.to(dtype))
