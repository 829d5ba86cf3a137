"""The triton `linear` op (skinny GEMM for decode batches) against F.linear on fresh random inputs.

Locally: ATOM_GPU_TESTS_ON_CPU=1 TRITON_INTERPRET=1 pytest -m gpu tests/gpu/test_linear.py (small
shapes only; the H200 shapes run on CUDA).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpu_helpers import ON_CPU, act_dtypes, device, triton_ops  # noqa: F401 (fixtures)

pytestmark = pytest.mark.gpu

# Max |error| over max |reference| (the output's scale): one rounding of the output to the dtype
# (half an ulp: 2^-9 bf16, 2^-12 fp16) plus float32 accumulation, with margin.
TOL = {torch.bfloat16: 8e-3, torch.float16: 1.5e-3, torch.float32: 2e-5}

SMALL = [(96, 64), (1000, 72), (128, 2048)]
BIG = [(5120, 2048), (2048, 4096)]
SHAPES = SMALL if ON_CPU else SMALL + BIG
# Every M of the skinny range on CUDA; two in the interpreter (each program runs in Python there).
MS = [1, 5] if ON_CPU else list(range(1, 9))


def skinny():
    from atom.ops.triton import linear as sk
    return sk


def inputs(device, dtype, m, n, k, bias, seed, lead=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, m, k, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device=device, dtype=dtype)
    b = torch.randn(n, generator=g).to(device=device, dtype=dtype) if bias else None
    return x, w, b


def check(out, x, w, b, dtype):
    """out against F.linear in float64 on the same (rounded) inputs, and against F.linear itself."""
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], w.shape[0])
    assert torch.isfinite(out).all(), "non-finite output"
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    if ref.numel() == 0:
        return
    scale = ref.abs().max().clamp_min(1e-30)
    err = ((out.double() - ref).abs().max() / scale).item()
    assert err < TOL[dtype], f"max error {err:.3g} of the output scale, over {TOL[dtype]:.3g}"
    torch_out = F.linear(x, w, b)  # the torch backend: cuBLAS rounds too
    err_t = ((out.double() - torch_out.double()).abs().max() / scale).item()
    assert err_t < 2 * TOL[dtype], f"max difference {err_t:.3g} to F.linear, over {2 * TOL[dtype]:.3g}"


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,k", SHAPES)
def test_linear_matches_torch(triton_ops, device, dtype, bias, n, k):
    op = triton_ops("linear")["triton"]
    sk = skinny()
    for i, m in enumerate(MS + [sk.SKINNY_M_MAX + 5]):  # the last one is above the threshold (F.linear)
        x, w, b = inputs(device, dtype, m, n, k, bias, seed=n * 7 + k * 3 + m + 100 * i + bias)
        check(op(x, w, b), x, w, b, dtype)
        if m <= sk.SKINNY_M_MAX and not sk.use_skinny(m, n, k, x.element_size()):
            check(sk.skinny_linear(x, w, b), x, w, b, dtype)  # the kernel, where the op chose F.linear


@pytest.mark.parametrize("dtype", act_dtypes())
def test_linear_leading_dims_and_strides(triton_ops, device, dtype):
    op = triton_ops("linear")["triton"]
    x, w, b = inputs(device, dtype, 3, 96, 64, True, seed=5, lead=(2,))  # [2, 3, 64]: 6 rows
    check(op(x, w, b), x, w, b, dtype)
    wide = torch.randn(5, 160, device=device).to(dtype)
    xs = wide[:, 16:80]  # a row stride of 160
    check(op(xs, w, b), xs, w, b, dtype)
    check(op(xs[:0], w, b), xs[:0], w, b, dtype)  # no rows


# Explicit configs: N and K tails of the tiles, split-K with an uneven last split, one row per program.
CONFIGS = [
    (1000, 72, dict(block_n=16, block_k=32, split_k=2, num_warps=1)),   # 1000 % 16, 72 % 32, steps 3 -> 2 + 1
    (96, 64, dict(block_n=4, block_k=16, split_k=3, num_warps=1)),      # steps 4 -> splits 2 + 2
    (130, 1024, dict(block_n=2, block_k=256, split_k=4, num_warps=2)),  # even split, N not a power of 2
    (77, 200, dict(block_n=8, block_k=64, split_k=1, num_warps=2)),     # masked K, N tail
]


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("n,k,cfg", CONFIGS)
def test_skinny_configs(triton_ops, device, dtype, n, k, cfg):
    sk = skinny()
    for m in (1, 5):
        x, w, b = inputs(device, dtype, m, n, k, m == 5, seed=n + k + m)
        check(sk.skinny_linear(x, w, b, cfg), x, w, b, dtype)


def test_split_k_chosen_for_few_rows(triton_ops):
    sk = skinny()
    assert sk.skinny_config(64, 2048, 2, 132)["split_k"] > 1
    assert sk.skinny_config(5120, 2048, 2, 132)["split_k"] == 1


def test_use_skinny_threshold(triton_ops):
    sk = skinny()
    assert not sk.use_skinny(sk.SKINNY_M_MAX + 1, 128, 2048, 2)
    assert sk.use_skinny(1, 5120, 2048, 2)
    assert sk.use_skinny(sk.SKINNY_M_MAX, 128, 2048, 2)  # the router gate: small, every M <= SKINNY_M_MAX
    assert sk.use_skinny(sk.SKINNY_LARGE_M_MAX, 2048, 4096, 2)
    assert not sk.use_skinny(sk.SKINNY_LARGE_M_MAX + 1, 2048, 4096, 2)


# ---- batch invariance: a row's result does not depend on the other rows of the call ----------

INVARIANCE = [(96, 64, None), (1000, 72, dict(block_n=16, block_k=32, split_k=2, num_warps=1))]
if not ON_CPU:
    INVARIANCE += [(1000, 72, None), (128, 2048, None), (5120, 2048, None), (2048, 4096, None), (64, 2048, None)]


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("n,k,cfg", INVARIANCE)
def test_batch_invariance(triton_ops, device, dtype, n, k, cfg):
    """Row i of an M=8 call equals, bitwise, the same row computed alone (M=1) and in M=2..7 calls."""
    sk = skinny()
    x, w, b = inputs(device, dtype, 8, n, k, True, seed=n * k)
    full = sk.skinny_linear(x, w, b, cfg)
    for i in (0, 7):
        assert torch.equal(sk.skinny_linear(x[i: i + 1], w, b, cfg)[0], full[i]), f"row {i} alone != in M=8"
    for m in ((3,) if ON_CPU else range(2, 8)):
        assert torch.equal(sk.skinny_linear(x[8 - m:], w, b, cfg), full[8 - m:]), f"last {m} rows differ"
    if cfg is None and sk.use_skinny(8, n, k, x.element_size()):  # the op itself, where it runs the kernel
        op = triton_ops("linear")["triton"]
        assert torch.equal(op(x[2:3], w, b)[0], op(x, w, b)[2])


@pytest.mark.skipif(ON_CPU, reason="CUDA graphs need a GPU")
def test_linear_in_cuda_graph(triton_ops, device):
    """Captured once, replayed on new inputs (static buffers), both with and without split-K."""
    op = triton_ops("linear")["triton"]
    for n, k in ((5120, 2048), (64, 2048)):
        x, w, b = inputs(device, torch.bfloat16, 4, n, k, True, seed=n)
        static_x = x.clone()
        op(static_x, w, b)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = op(static_x, w, b)
        for seed in (1, 2):
            fresh, _, _ = inputs(device, torch.bfloat16, 4, n, k, False, seed=seed)
            static_x.copy_(fresh)
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, op(fresh, w, b))
