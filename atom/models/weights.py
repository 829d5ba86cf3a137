"""HF tensor names -> slices of our (fused, stacked) parameters, and loading into them.

`WeightMap` is built once per model: a dict from every accepted HF name to the slot it fills,
so each incoming tensor is placed in O(1) whatever the checkpoint's size.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from atom.models.layers.linear import Linear
from atom.models.layers.mlp import SparseMoE

# Tensors some checkpoints carry that are derived, not learned.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class WeightSlot:
    """Where one HF tensor lands: param[expert][row_offset : row_offset + rows] (None = whole)."""

    param: nn.Parameter
    expert: int | None = None
    row_offset: int = 0
    rows: int | None = None

    def target(self) -> torch.Tensor:
        t = self.param.data if self.expert is None else self.param.data[self.expert]
        return t if self.rows is None else t.narrow(0, self.row_offset, self.rows)

    def shape(self) -> tuple[int, ...]:
        return tuple(self.target().shape)


class WeightMap:
    def __init__(self, model: nn.Module) -> None:
        self.slots: dict[str, WeightSlot] = {}
        # Names accepted besides the checkpoint's own, and the checkpoint names each one fills.
        self.alternatives: dict[str, WeightSlot] = {}
        self.fills: dict[str, list[str]] = {}
        # A tied LM head is the embedding's Parameter: the HF checkpoint may or may not repeat it.
        self.optional: set[str] = set()
        seen: dict[int, str] = {}
        for module_name, module in model.named_modules():
            prefix = f"{module_name}." if module_name else ""
            if isinstance(module, Linear):
                for pname in ("weight", "bias"):
                    p = getattr(module, pname)
                    if p is None:
                        continue
                    if id(p) in seen:
                        self.optional.add(f"{prefix}{pname}")
                        self.slots[f"{prefix}{pname}"] = self.slots[seen[id(p)]]
                        continue
                    if len(module.shard_sizes) == 1:
                        self._add(f"{prefix}{pname}", WeightSlot(p))
                    else:
                        parent = prefix.rsplit(".", 2)[0] + "."
                        for shard in module.shard_sizes:
                            off, rows = module.shard_offset(shard)
                            self._add(f"{parent}{shard}.{pname}", WeightSlot(p, None, off, rows))
                    seen[id(p)] = f"{prefix}{pname}"
            elif isinstance(module, SparseMoE):
                self._add_experts(prefix, module)
            else:
                for pname, p in module.named_parameters(recurse=False):
                    name = f"{prefix}{pname}"
                    if id(p) in seen:  # tied embedding/lm_head
                        self.optional.add(name)
                        self.slots[name] = self.slots[seen[id(p)]]
                        continue
                    seen[id(p)] = name
                    self._add(name, WeightSlot(p))

    def _add(self, name: str, slot: WeightSlot) -> None:
        self.slots[name] = slot

    def _add_experts(self, prefix: str, moe: SparseMoE) -> None:
        inter, num_experts = moe.intermediate_size, moe.w13.shape[0]
        for e in range(num_experts):
            base = f"{prefix}experts.{e}."
            self._add(f"{base}gate_proj.weight", WeightSlot(moe.w13, e, 0, inter))
            self._add(f"{base}up_proj.weight", WeightSlot(moe.w13, e, inter, inter))
            self._add(f"{base}down_proj.weight", WeightSlot(moe.w2, e))
        # transformers >= 5 keeps experts fused in memory: accept that layout too (weight updates
        # from a trainer holding a v5 model arrive this way).
        gate_up, down = f"{prefix}experts.gate_up_proj", f"{prefix}experts.down_proj"
        self.alternatives[gate_up] = WeightSlot(moe.w13)
        self.alternatives[down] = WeightSlot(moe.w2)
        self.fills[gate_up] = [f"{prefix}experts.{e}.{p}_proj.weight" for e in range(num_experts) for p in ("gate", "up")]
        self.fills[down] = [f"{prefix}experts.{e}.down_proj.weight" for e in range(num_experts)]

    def lookup(self, name: str) -> WeightSlot | None:
        slot = self.slots.get(name)
        return slot if slot is not None else self.alternatives.get(name)

    def required_names(self) -> set[str]:
        return set(self.slots) - self.optional

    def covered_by(self, name: str) -> list[str]:
        """Checkpoint names one accepted name fills (a fused expert tensor fills all experts)."""
        return self.fills.get(name, [name])


def is_ignored(name: str) -> bool:
    return name.endswith(_IGNORED_SUFFIXES)


def check_and_copy(name: str, slot: WeightSlot, tensor: torch.Tensor, check_finite: bool = False) -> None:
    """Copy one HF tensor into its slot, casting dtype and device; ValueError naming it if wrong."""
    if not tensor.is_floating_point():
        raise ValueError(f"weight {name!r}: expected a floating tensor, got {tensor.dtype}")
    target = slot.target()
    if tuple(tensor.shape) != tuple(target.shape):
        raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)} does not match the model's {tuple(target.shape)}")
    if check_finite and not torch.isfinite(tensor).all():
        raise ValueError(f"weight {name!r}: contains non-finite values (nan or inf)")
    target.copy_(tensor, non_blocking=True)


def checkpoint_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, f) for f in files]
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_dir!r}")
    return files


def iter_checkpoint(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a safetensors checkpoint, one tensor in memory at a time."""
    for path in checkpoint_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_weights(model: nn.Module, weight_map: WeightMap, tensors: Iterable[tuple[str, torch.Tensor]],
                 check_finite: bool = False, require_all: bool = True) -> int:
    """Place every tensor; unknown names, bad shapes and (if require_all) missing ones raise ValueError.

    Returns the number of tensors loaded.
    """
    loaded: set[str] = set()
    count = 0
    for name, tensor in tensors:
        if is_ignored(name):
            continue
        slot = weight_map.lookup(name)
        if slot is None:
            raise ValueError(f"weight {name!r} is not a parameter of this {type(model).__name__}")
        check_and_copy(name, slot, tensor, check_finite)
        loaded.update(weight_map.covered_by(name))
        count += 1
    if require_all:
        missing = sorted(weight_map.required_names() - loaded)
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")
    return count
