"""One registry of named ops; a backend per op, chosen from the device and the config.

Model code calls `ops.NAME(...)` and never names a backend. Backends register with
`@register("NAME", "BACKEND", *capabilities)`; `configure(device, overrides)` picks, for each op,
the override if given, else the first backend of the device's preference list that has it.

Callers ask what the chosen implementation can do, never which backend it is:
`ops.supports("paged_attention_decode", "cascade")`. Capabilities:
  graph_safe          no host synchronisation: may run inside a CUDA graph (every op of a backend
                      that declares it with `declare_backend`, or one op registered with it)
  cascade             paged decode attention reads the shared-prefix groups (CascadeMetadata)
  reads_whole_blocks  paged attention reads every slot of a sequence's blocks (masking the unused
                      ones), so freshly mapped KV memory must be zeroed
  skips_negative_ids  fused MoE skips expert id -1 (an expert another rank holds)
  batch_invariant     a row's result is bitwise the same whatever other rows share the call, how
                      many, and where the row sits; attention also gives a token the same bits
                      however its sequence was chunked or cached and in decode as in prefill
  low_precision_logits  the sampler reads bf16 / fp16 logits as they are and gives what it gives
                      for their float32 copy (no [rows, vocab] float32 copy needed before it)

Batch-invariant mode (`configure(..., batch_invariant=True)`, from EngineConfig.batch_invariant):
each op takes the first backend of the platform's invariant list that registers it with the
"batch_invariant" capability; an op none of them has is bound to a stub that raises ValueError
when called (e.g. a family's own attention), so nothing silently runs a batch-dependent kernel.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

_IMPLS: dict[str, dict[str, Callable]] = {}
_CAPS: dict[tuple[str, str], frozenset[str]] = {}      # (op, backend) -> capabilities
_BACKEND_CAPS: dict[str, frozenset[str]] = {}          # capabilities of every op of a backend
_WEIGHT_LISTENERS: list[Callable[[], None]] = []   # see weights_changed
CAPABILITIES = ("graph_safe", "cascade", "reads_whole_blocks", "skips_negative_ids", "batch_invariant",
                "low_precision_logits")

# Backends by preference per platform; a backend module that fails to import is skipped.
_PREFERENCE = {
    "cpu": ("cpu", "torch"),
    "cuda": ("triton", "torch"),
    "rocm": ("aiter", "triton", "torch"),
}
# Batch-invariant mode: the backends an op may come from, by platform, in order (see the module doc).
_INVARIANT_PREFERENCE = {
    "cpu": ("invariant", "cpu"),
    "cuda": ("triton_invariant", "triton"),
}
_BACKEND_MODULES = {
    "torch": ("atom.ops.torch_ops", "atom.ops.torch_family_ops"),
    "cpu": "atom.ops.cpu_ops",
    "triton": "atom.ops.triton",
    "aiter": "atom.ops.aiter_ops",
    "invariant": ("atom.ops.invariant_ops", "atom.ops.invariant_family_ops"),  # batch-invariant mode (CPU)
    "triton_invariant": "atom.ops.triton.invariant",    # only in batch-invariant mode (CUDA)
}
_MISSING = "missing"  # backend_of entry of an op that batch-invariant mode has no implementation of


def register(name: str, backend: str, *capabilities: str) -> Callable[[Callable], Callable]:
    unknown = set(capabilities) - set(CAPABILITIES)
    if unknown:
        raise ValueError(f"register({name!r}, {backend!r}): unknown capabilities {sorted(unknown)}")

    def deco(fn: Callable) -> Callable:
        _IMPLS.setdefault(name, {})[backend] = fn
        _CAPS[(name, backend)] = frozenset(capabilities)
        return fn
    return deco


def on_weights_changed(fn: Callable[[], None]) -> Callable[[], None]:
    """Register a backend's callback for `weights_changed` (it drops what it derived from weights)."""
    _WEIGHT_LISTENERS.append(fn)
    return fn


def weights_changed() -> None:
    """Parameters were written in place or given new memory (a load, an update, sleep / wake):
    backends that keep forms derived from weights (the CPU backend's packed copies) drop them."""
    for fn in _WEIGHT_LISTENERS:
        fn()


def declare_backend(backend: str, *capabilities: str) -> None:
    """Capabilities every op of `backend` has (e.g. the triton backend: graph_safe)."""
    _BACKEND_CAPS[backend] = frozenset(capabilities)


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

    def configure(self, device: torch.device, overrides: dict[str, str] | None = None,
                  batch_invariant: bool = False) -> None:
        """Choose every op's backend for `device`; `overrides` (op -> backend) win. With
        batch_invariant, only implementations with that capability are chosen (module doc)."""
        overrides = dict(overrides or {})
        platform = _platform(device)
        if batch_invariant and platform not in _INVARIANT_PREFERENCE:
            raise ValueError(f"EngineConfig.batch_invariant: no batch-invariant backend for {platform} "
                             f"(available for {sorted(_INVARIANT_PREFERENCE)})")
        order = _INVARIANT_PREFERENCE[platform] if batch_invariant else _PREFERENCE[platform]
        available = [b for b in order if _load_backend(b)]
        if batch_invariant and not available:
            raise ValueError(f"EngineConfig.batch_invariant: none of the backends {list(order)} loads on {platform} "
                             "(the CUDA one needs Triton)")
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
            elif batch_invariant:
                backend = next((b for b in available if b in impls and "batch_invariant" in capabilities(name, b)),
                               _MISSING)
            else:
                backend = next(b for b in available + ["torch"] if b in impls)
            chosen[name] = _not_invariant(name, platform) if backend == _MISSING else _IMPLS[name][backend]
            backend_of[name] = backend
        self._chosen, self.backend_of = chosen, backend_of

    def supports(self, name: str, capability: str) -> bool:
        """Whether the chosen implementation of op `name` has `capability` (see the module doc)."""
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown capability {capability!r}; known: {CAPABILITIES}")
        backend = self.backend_of.get(name)
        if backend is None:
            return False
        return capability in capabilities(name, backend)

    def __getattr__(self, name: str) -> Callable:
        try:
            return self.__dict__["_chosen"][name]
        except KeyError:
            raise AttributeError(f"no op named {name!r}; known ops: {sorted(_IMPLS)}") from None


def _not_invariant(name: str, platform: str) -> Callable:
    def missing(*args, **kwargs):
        raise ValueError(f"EngineConfig.batch_invariant: op {name!r} has no batch-invariant implementation on "
                         f"{platform} (backends tried: {list(_INVARIANT_PREFERENCE[platform])})")
    return missing


def capabilities(name: str, backend: str) -> frozenset[str]:
    """What the `backend` implementation of op `name` declares it can do."""
    return _CAPS.get((name, backend), frozenset()) | _BACKEND_CAPS.get(backend, frozenset())


def implementations(name: str) -> dict[str, Callable]:
    """All registered backends of one op (tests compare them against 'torch')."""
    return dict(_IMPLS[name])
