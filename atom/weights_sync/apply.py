"""Engine side of a weight update: stream (HF name, tensor) pairs into the model's parameters."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from atom.models.weights import WeightMap, is_ignored, load_weights


class _Tracked:
    """Wraps the pairs: remembers which names went through `load_weights` completely."""

    def __init__(self, pairs: Iterable[tuple[str, torch.Tensor]], weight_map: WeightMap) -> None:
        self._pairs = pairs
        self._map = weight_map
        self.done: set[str] = set()  # checkpoint names filled
        self.applied = 0             # tensors copied into parameters

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        # Resumed only once load_weights is done with the previous pair: count it first, then
        # fetch the next (whose fetch may fail: a broken transfer).
        pairs = iter(self._pairs)
        while True:
            try:
                name, tensor = next(pairs)
            except StopIteration:
                return
            yield name, tensor
            self._finish(name)

    def _finish(self, name: str) -> None:
        if not is_ignored(name):
            self.done.update(self._map.covered_by(name))
            self.applied += 1


@torch.no_grad()
def apply_weights(model: torch.nn.Module, weight_map: WeightMap, named_tensors: Iterable[tuple[str, torch.Tensor]],
                  partial: bool = False, check_finite: bool = False) -> set[str]:
    """Copy every pair into its slot (casting dtype and device); returns the checkpoint names filled.

    Raises ValueError naming the offending tensor on an unknown name, a wrong shape, a
    non-floating or (check_finite) non-finite tensor, or, unless `partial`, when required
    tensors are missing at the end. Errors of the iterable itself (a transfer that broke off)
    propagate as they are. Either way the exception gets `weights_changed`: whether some
    parameters were already overwritten when it happened.
    """
    tracked = _Tracked(named_tensors, weight_map)
    try:
        load_weights(model, weight_map, tracked, check_finite=check_finite, require_all=not partial)
    except BaseException as e:
        e.weights_changed = tracked.applied > 0
        raise
    finally:
        params = next(model.parameters(), None)
        if params is not None and params.device.type == "cuda":
            torch.cuda.current_stream(params.device).synchronize()  # copies were non_blocking
    return tracked.done
