"""ROCm AITER kernels behind the op registry (backend "aiter", preferred first on ROCm).

UNTESTED: no AMD GPU was available while this was written. Importing raises ImportError unless
`import aiter` works (then the registry skips this backend and ROCm uses triton → torch).
Only mappings whose AITER call is simple and well attested are registered; anything the wrapper
does not handle falls back to the next backend's implementation at call time.
"""
from __future__ import annotations

import torch

try:
    import aiter  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the machine
    raise ImportError(f"aiter is not usable: {exc}") from exc

from atom.ops.registry import implementations, register

B = "aiter"


def _fallback(name: str):
    impls = implementations(name)
    return impls.get("triton") or impls["torch"]


@register("rms_norm", B)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dim() == 2 and x.is_contiguous() and x.dtype in (torch.bfloat16, torch.float16):
        return aiter.rmsnorm2d_fwd(x, weight, eps)
    return _fallback("rms_norm")(x, weight, eps)
