"""Shared by the GPU tests: `python3 -m pytest -m gpu -q tests/gpu` on the device machine.

Locally, `ATOM_GPU_TESTS_ON_CPU=1 TRITON_INTERPRET=1 pytest -m gpu tests/gpu/test_triton_ops.py`
runs the kernel tests on CPU tensors in Triton's interpreter (float16/float32 only: the
interpreter has no bfloat16).
"""
from __future__ import annotations

import os

import torch

ON_CPU = os.environ.get("ATOM_GPU_TESTS_ON_CPU") == "1" and not torch.cuda.is_available()


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
