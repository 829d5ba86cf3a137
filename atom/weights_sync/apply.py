"""Engine side of a weight update: stream (HF name, tensor) pairs into the model's parameters."""
from __future__ import annotations

import gc
from typing import Iterable

import torch

from atom.models.weights import LoadProgress, WeightMap, load_weights
from atom.ops import weights_changed


@torch.no_grad()
def apply_weights(model: torch.nn.Module, weight_map: WeightMap, named_tensors: Iterable[tuple[str, torch.Tensor]],
                  partial: bool = False, check_finite: bool = False) -> set[str]:
    """Copy every pair into its slot (casting dtype and device); returns the checkpoint names filled.

    Raises ValueError naming the offending tensor on an unknown name, a wrong shape, a
    non-floating or (check_finite) non-finite tensor, or, unless `partial`, when required
    tensors are missing at the end. Errors of the iterable itself (a transfer that broke off)
    propagate as they are. Either way the exception gets `weights_changed` (whether some
    parameters were already overwritten when it happened) and `names_loaded` (the checkpoint
    names that were).
    """
    progress = LoadProgress()
    # ~19k tensor views of a MoE update would trigger full garbage collections of the
    # trainer's whole heap mid-update (each one costing more than all the copies).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        load_weights(model, weight_map, named_tensors, check_finite=check_finite, require_all=False,
                     progress=progress)
        if not partial:
            _check_complete(weight_map, progress.loaded)
    except BaseException as e:
        e.weights_changed = progress.count > 0
        e.names_loaded = set(progress.loaded)
        raise
    finally:
        weights_changed()  # backends drop what they derived from the old weights
        if gc_was_enabled:
            gc.enable()
        params = next(model.parameters(), None)
        if params is not None and params.device.type == "cuda":
            torch.cuda.current_stream(params.device).synchronize()  # copies were non_blocking
    return progress.loaded


def _check_complete(weight_map: WeightMap, loaded: set[str]) -> None:
    missing = sorted(weight_map.required_names() - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"the update is missing {len(missing)} tensor(s): {shown} (pass partial=True for a "
                         "deliberate partial update)")
