"""ops.linear_add (residual + x @ W.T, the shared experts' down GEMM with the routed sum as its
residual) on the CPU backends against float64, and the layer that uses it against the plain sum."""
from __future__ import annotations

import pytest
import torch

from atom.models.layers.mlp import GatedMLP
from atom.ops import implementations, ops


@pytest.mark.parametrize("backend", ["torch", "cpu", "invariant"])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_linear_add_matches_float64(backend, m):
    import atom.ops.cpu_ops  # noqa: F401 (registers the cpu and invariant backends)
    import atom.ops.invariant_ops  # noqa: F401
    g = torch.Generator().manual_seed(m)
    x, w, res = torch.randn(m, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(m, 40, generator=g)
    out = implementations("linear_add")[backend](x, w, res)
    want = torch.addmm(res.double(), x.double(), w.double().t())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_gated_mlp_with_a_residual_adds_it():
    ops.configure(torch.device("cpu"))
    torch.manual_seed(0)
    mlp = GatedMLP(16, 24)
    for p in mlp.parameters():
        p.data.normal_()
    x, res = torch.randn(5, 16), torch.randn(5, 16)
    torch.testing.assert_close(mlp(x, residual=res), res + mlp(x), rtol=1e-5, atol=1e-5)
