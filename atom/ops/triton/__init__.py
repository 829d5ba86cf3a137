"""Triton kernels behind the op registry (backend "triton").

Importing this package registers every op it implements. It raises ImportError when Triton is
missing or no CUDA device is visible, so the registry falls back to the torch backend. Setting
TRITON_INTERPRET=1 lets the kernels run on CPU tensors in Triton's interpreter (for debugging;
bf16 is not supported there).
"""
from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the machine
    raise ImportError(f"triton is not usable: {exc}") from exc

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    raise ImportError("the triton backend needs a CUDA device")

from atom.ops.registry import declare_backend  # noqa: E402

declare_backend("triton", "graph_safe")  # no kernel syncs with the host

from atom.ops.triton import (attention, elementwise, grouped_route, linear, mla, moe, moe_small,  # noqa: E402,F401
                             router, sampling)

__all__ = ["attention", "elementwise", "grouped_route", "linear", "mla", "moe", "moe_small", "router", "sampling", "INTERPRET"]
