"""Checks of a weight update described by names, shapes and dtypes, before any tensor moves.

The per-tensor, SGLang-style and IPC transfers (atom.weights_sync.tensor_sync / ipc) know every
tensor's name, shape and dtype before the first byte arrives: they refuse a bad update here, so
nothing of it lands in the parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from atom.models.weights import WeightMap, is_ignored


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def spec_problems(weight_map: WeightMap, specs: list[TensorSpec], partial: bool) -> list[str]:
    """What is wrong with an update of these tensors (empty: nothing), naming each tensor."""
    problems: list[str] = []
    seen: set[str] = set()
    covered: set[str] = set()
    for s in specs:
        if s.name in seen:
            problems.append(f"weight {s.name!r} appears twice")
            continue
        seen.add(s.name)
        if not s.dtype.is_floating_point:
            problems.append(f"weight {s.name!r}: expected a floating dtype, got {s.dtype}")
            continue
        if is_ignored(s.name):
            continue
        slot = weight_map.lookup(s.name)
        if slot is None:
            problems.append(f"weight {s.name!r} is not a parameter of this model")
            continue
        if tuple(s.shape) != tuple(slot.shape()):
            problems.append(f"weight {s.name!r}: shape {tuple(s.shape)} does not match the model's "
                            f"{tuple(slot.shape())}")
            continue
        covered.update(weight_map.covered_by(s.name))
    if not partial:
        missing = sorted(weight_map.required_names() - covered)
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            problems.append(f"the update is missing {len(missing)} tensor(s): {shown} (pass partial=True for "
                            "a deliberate partial update)")
    return problems


def summarize(problems: list[str]) -> str:
    return "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more problem(s)" if len(problems) > 5 else "")
