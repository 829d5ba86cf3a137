"""One registry of named ops; a backend per op, chosen from the device and the config.

Model code calls `ops.NAME(...)` and never names a backend. Backends register with
`@register("NAME", "BACKEND")`; `configure(device, overrides)` picks, for each op, the
override if given, else the first backend of the device's preference list that has it.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

_IMPLS: dict[str, dict[str, Callable]] = {}

# Backends by preference per platform; a backend module that fails to import is skipped.
_PREFERENCE = {
    "cpu": ("torch",),
    "cuda": ("triton", "torch"),
    "rocm": ("aiter", "triton", "torch"),
}
_BACKEND_MODULES = {
    "torch": ("atom.ops.torch_ops", "atom.ops.torch_family_ops"),
    "triton": "atom.ops.triton",
    "aiter": "atom.ops.aiter_ops",
}


def register(name: str, backend: str) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        _IMPLS.setdefault(name, {})[backend] = fn
        return fn
    return deco


def _platform(device: torch.device) -> str:
    if device.type == "cuda":
        return "rocm" if torch.version.hip else "cuda"
    return "cpu"


def _load_backend(backend: str) -> bool:
    if backend not in _BACKEND_MODULES:
        return False
    modules = _BACKEND_MODULES[backend]
    try:
        for module in (modules,) if isinstance(modules, str) else modules:
            importlib.import_module(module)
        return True
    except ImportError:
        return False


class OpTable:
    """Attribute access resolves to the chosen implementation of each op."""

    def __init__(self) -> None:
        self._chosen: dict[str, Callable] = {}
        self.backend_of: dict[str, str] = {}
        self.configure(torch.device("cpu"))

    def configure(self, device: torch.device, overrides: dict[str, str] | None = None) -> None:
        overrides = dict(overrides or {})
        available = [b for b in _PREFERENCE[_platform(device)] if _load_backend(b)]
        unknown = sorted(set(overrides) - set(_IMPLS))
        if unknown:
            raise ValueError(f"op_backends names unknown op(s) {unknown}; known ops: {sorted(_IMPLS)}")
        chosen, backend_of = {}, {}
        for name, impls in _IMPLS.items():
            want = overrides.get(name)
            if want is not None:
                if want not in impls:
                    if not _load_backend(want) or want not in _IMPLS[name]:
                        raise ValueError(f"op {name!r} has no backend {want!r}; it has {sorted(impls)}")
                backend = want
            else:
                backend = next(b for b in available + ["torch"] if b in impls)
            chosen[name], backend_of[name] = _IMPLS[name][backend], backend
        self._chosen, self.backend_of = chosen, backend_of

    def __getattr__(self, name: str) -> Callable:
        try:
            return self.__dict__["_chosen"][name]
        except KeyError:
            raise AttributeError(f"no op named {name!r}; known ops: {sorted(_IMPLS)}") from None


def implementations(name: str) -> dict[str, Callable]:
    """All registered backends of one op (tests compare them against 'torch')."""
    return dict(_IMPLS[name])
