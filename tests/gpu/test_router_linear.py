"""The float32 router logits (`router_linear`, atom/ops/triton/router.py) against a float64
product of the same inputs, and its batch invariance: a row's bits alone, in any batch, at any
place, and in row blocks split across launches."""
from __future__ import annotations

import pytest
import torch

from atom.ops import torch_family_ops as ref_ops

from gpu_helpers import ON_CPU, act_dtypes, device, triton_ops  # noqa: F401 (fixtures)

pytestmark = pytest.mark.gpu

# (rows, hidden, experts): tiny models, a hidden size not a multiple of the tiles, Moonlight's
# decode (2,048 columns in 16 ranges), DeepSeek-V3's 256 experts over 7,168 columns.
SHAPES = [(1, 64, 8), (37, 200, 12), (130, 640, 64)] if ON_CPU else \
    [(1, 64, 8), (37, 200, 12), (512, 2048, 64), (300, 7168, 256), (2049, 2048, 64)]


def ref64(x, w):
    return (x.double() @ w.double().t())


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("t,h,e", SHAPES)
def test_router_linear_equals_a_float64_product(triton_ops, device, dtype, t, h, e):
    torch.manual_seed(t + h + e)
    x = torch.randn(t, h, device=device).to(dtype)
    w = (0.05 * torch.randn(e, h, device=device)).to(dtype)
    out = triton_ops("router_linear")["triton"](x, w)
    want = ref64(x, w)
    assert out.dtype == torch.float32 and out.shape == (t, e)
    # float32 sums of exact products: within a few float32 ulps of the float64 sum's scale
    scale = (x.double().abs() @ w.double().abs().t()).max().item()
    assert (out.double() - want).abs().max().item() <= 1e-6 * scale
    ref = ref_ops.router_linear(x, w)
    assert (out - ref).abs().max().item() <= 1e-6 * scale


@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16])
def test_router_linear_mixed_dtypes_widen(triton_ops, device, wdtype):
    """x and weight of different dtypes (a float32 gate over 16-bit activations) are both widened."""
    torch.manual_seed(3)
    x = torch.randn(20, 96, device=device).to(torch.float16 if wdtype == torch.float32 else torch.float32)
    w = torch.randn(16, 96, device=device).to(wdtype)
    out = triton_ops("router_linear")["triton"](x, w)
    scale = (x.double().abs() @ w.double().abs().t()).max().item()
    assert (out.double() - ref64(x, w)).abs().max().item() <= 1e-6 * scale


@pytest.mark.parametrize("dtype", act_dtypes())
def test_router_linear_rows_are_batch_invariant(triton_ops, device, dtype, monkeypatch):
    """Rows alone, in a batch, shifted, and with row blocks split across launches (a small
    partial budget) give the same bits."""
    from atom.ops.triton import router  # after triton_ops: CI's CPU machine has no triton
    torch.manual_seed(7)
    h, e = (640, 24) if ON_CPU else (2048, 64)
    x = torch.randn(150, h, device=device).to(dtype)
    w = torch.randn(e, h, device=device).to(dtype)
    fn = triton_ops("router_linear")["triton"]
    batch = fn(x, w)
    for i in (0, 63, 64, 149):
        assert torch.equal(fn(x[i:i + 1], w), batch[i:i + 1])
    assert torch.equal(fn(x[5:], w), batch[5:])
    assert torch.equal(fn(torch.cat([x[100:], x[:100]]), w), torch.cat([batch[100:], batch[:100]]))
    monkeypatch.setattr(router, "PART_BYTES", 64 * e * 4 * router._splits(h)[1])  # 64-row launches
    assert torch.equal(fn(x, w), batch)


def test_router_linear_rejects_bad_shapes_and_handles_empty(triton_ops, device):
    fn = triton_ops("router_linear")["triton"]
    with pytest.raises(ValueError, match="router_linear"):
        fn(torch.randn(4, 32, device=device), torch.randn(8, 16, device=device))
    assert fn(torch.randn(0, 32, device=device), torch.randn(8, 32, device=device)).shape == (0, 8)
    strided = torch.randn(6, 64, device=device)[:, ::2]
    w = torch.randn(8, 32, device=device)
    assert torch.allclose(fn(strided, w), ref_ops.router_linear(strided, w), rtol=1e-5, atol=1e-5)
