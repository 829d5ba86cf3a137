"""Shared by the GPU tests: `python3 -m pytest -m gpu -q tests/gpu` on the device machine.

Locally, `ATOM_GPU_TESTS_ON_CPU=1 TRITON_INTERPRET=1 pytest -m gpu tests/gpu/test_triton_ops.py`
runs the kernel tests on CPU tensors in Triton's interpreter (float16/float32 only: the
interpreter has no bfloat16).
"""
from __future__ import annotations

import os

import torch

ON_CPU = os.environ.get("ATOM_GPU_TESTS_ON_CPU") == "1" and not torch.cuda.is_available()


def _interpreter_numpy_shim() -> None:
    """Triton 3.6's interpreter holds scalars as 1-element arrays and turns them into loop bounds
    with int(array), which NumPy >= 2.4 refuses for arrays of ndim > 0 (every kernel with a
    `range(lo, hi)` over loaded values failed). Index through the array's single element."""
    try:
        import triton.runtime.interpreter as interp
    except ImportError:
        return
    if getattr(interp, "_atom_numpy_shim", False):
        return
    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    interp._patch_lang_tensor = patched
    interp._atom_numpy_shim = True


def _interpreter_place_free_dot() -> None:
    """The interpreter computes tl.dot with numpy's matmul, whose float32 bits depend on a row's
    place in the matrix (BLAS blocking: a 3-row block moved from rows 5-7 to 0-2 of a 64 x 32
    float32 product changed bits in 200 of 200 random trials, NumPy 2.4), so no kernel could
    show there that a row's bits do not depend on the batch (the batch-invariant tests: 94 of
    161 failed). On the GPU a tile's dot does not depend on where a row sits in it. Here: each
    product summed in float64 by einsum's own loop (a fixed order per element, no BLAS), then
    rounded to the accumulator's type, as before."""
    import numpy as np
    try:
        import triton.runtime.interpreter as interp
    except ImportError:
        return
    builder = interp.InterpreterBuilder
    if getattr(builder, "_atom_place_free_dot", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.primitive_bitwidth == 8 or b.dtype.primitive_bitwidth == 8:
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        prod = np.einsum("...ik,...kj->...ij", a.data.astype(np.float64), b.data.astype(np.float64), optimize=False)
        return interp.TensorHandle(prod.astype(d.data.dtype) + d.data, d.dtype.scalar)
    builder.create_dot = create_dot
    builder._atom_place_free_dot = True


if ON_CPU and os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_numpy_shim()
    _interpreter_place_free_dot()


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
