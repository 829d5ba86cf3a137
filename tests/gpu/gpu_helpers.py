"""Shared by the GPU tests: `python3 -m pytest -m gpu -q tests/gpu` on the device machine.

Locally, `ATOM_GPU_TESTS_ON_CPU=1 TRITON_INTERPRET=1 pytest -m gpu tests/gpu/test_triton_ops.py`
runs the kernel tests on CPU tensors in Triton's interpreter (float16/float32 only: the
interpreter has no bfloat16).
"""
from __future__ import annotations

import os

import torch

ON_CPU = os.environ.get("ATOM_GPU_TESTS_ON_CPU") == "1" and not torch.cuda.is_available()


def _interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter holds scalars as 1-element arrays and turns them into Python ints
    (range bounds, indices) with int(array), which numpy 2.4 refuses for arrays with a dimension:
    every kernel with a runtime loop bound failed in the interpreter. Index with .item() instead."""
    try:
        import triton.runtime.interpreter as interp
    except Exception:  # no triton: the kernel tests skip
        return
    patch = interp._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    if not getattr(patch, "_atom_scalar_index", False):
        patched._atom_scalar_index = True
        interp._patch_lang_tensor = patched


if ON_CPU and os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_scalar_index()


def act_dtypes() -> list[torch.dtype]:
    """Activation dtypes the kernels are tested in (the interpreter has no bfloat16)."""
    return [torch.float16, torch.float32] if ON_CPU else [torch.bfloat16, torch.float32]


# Fixtures (test modules import them by name: a second conftest.py would shadow tests/conftest.py).
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cpu" if ON_CPU else "cuda")


@pytest.fixture(scope="session")
def triton_ops():
    """Import the triton backend (registers its ops); skip if it cannot load."""
    try:
        import atom.ops.triton  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"triton backend unavailable: {exc}")
    from atom.ops import implementations
    return implementations


def sampling_meta(device, rows, temps, k=0, raw=None, seeds=None, counters=None):
    """SamplingMetadata without filters: per-row temperatures, random seeds / counters unless given."""
    import random

    from atom.ops.metadata import SamplingMetadata
    temps = torch.tensor(temps, dtype=torch.float32, device=device)
    raw = torch.tensor(raw if raw is not None else [False] * rows, device=device)
    return SamplingMetadata(
        temperature=temps, top_k=torch.zeros(rows, dtype=torch.int64, device=device),
        top_p=torch.ones(rows, device=device), min_p=torch.zeros(rows, device=device),
        seeds=torch.tensor(seeds or [random.getrandbits(63) for _ in range(rows)], device=device),
        counters=torch.tensor(counters or [random.randint(0, 1 << 30) for _ in range(rows)], device=device),
        raw_logprobs=raw, banned_rows=None, banned_tokens=None, need_filter=False,
        all_greedy=bool((temps == 0).all()), any_raw=bool(raw.any()), num_top_logprobs=k)
