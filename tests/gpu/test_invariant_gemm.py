"""The batch-invariant GEMM's variant configs (atom/ops/triton/invariant_gemm.py: TMA loads, fixed
split-K, persistent grid): each matches F.linear in float64, a row's bits are the same alone and
anywhere in any batch, and what is launched never depends on M.

On CPU: `ATOM_GPU_TESTS_ON_CPU=1 TRITON_INTERPRET=1 PYTHONPATH=$PWD:/work/triton_pkgs python -m pytest
-m gpu tests/gpu/test_invariant_gemm.py` (tiny shapes; the persistent grid shrunk to 3 programs so
that each program runs several tiles).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpu_helpers import ON_CPU, act_dtypes, device, triton_ops  # noqa: F401 (fixtures)
from test_triton_ops import check, gen

pytestmark = pytest.mark.gpu

# Every variant key alone and all together; split 3 of K = 96 in 32-wide steps: three equal parts,
# of K = 40: two uneven ones (the last masked), of 12288 in 64-wide steps: 64 + 64 + 64 steps.
VARIANTS = [dict(tma=True), dict(split_k=2), dict(split_k=3), dict(split_k=3, fold_last=True), dict(persistent=True),
            dict(tma=True, split_k=2, persistent=True), dict(tma=True, split_k=2, fold_last=True, persistent=True),
            dict(tma=True, persistent=True)]
SHAPES = [(200, 96), (16, 40)] if ON_CPU else [(6144, 4096), (4096, 4096), (4096, 12288), (200, 96), (16, 40)]
ROWS = [1, 3, 37, 130] if ON_CPU else [1, 3, 64, 130, 512, 1000, 8192]


@pytest.fixture
def ig(triton_ops, monkeypatch):
    """invariant_gemm, with a 3-program persistent grid in the interpreter (tiny shapes have
    fewer tiles than an H200's 132 SMs)."""
    import atom.ops.triton.invariant_gemm as module
    if ON_CPU:
        monkeypatch.setattr(module, "_num_sms", lambda device: 3)
    return module


def _variant(ig, n, k, dtype, variant):
    return {**ig.gemm_config(n, k, torch.tensor([], dtype=dtype).element_size()), **variant}


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("n,k", SHAPES)
def test_variant_matches_torch_and_rows_do_not_depend_on_the_batch(ig, device, dtype, n, k, variant):
    gen(n + k + len(variant))
    cfg = _variant(ig, n, k, dtype, variant)
    assert max(ROWS) > cfg["block_m"]
    w = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype)
    bias = torch.randn(n, device=device).to(dtype)
    x = torch.randn(max(ROWS), k, device=device).to(dtype)
    full = ig.invariant_gemm(x, w, bias, config=cfg)
    check(full, F.linear(x.double(), w.double(), bias.double()), dtype)
    check(ig.invariant_gemm(x, w, config=cfg), F.linear(x.double(), w.double()), dtype)
    for m in ROWS:
        for at in (0, max(ROWS) - m):  # the same rows at the start and at the end of the batch
            part = ig.invariant_gemm(x[at: at + m].contiguous(), w, bias, config=cfg)
            assert torch.equal(part, full[at: at + m]), f"rows {at}..{at + m} differ alone (M={m}, {variant})"


class _Recorder:
    """Stands in for a Triton kernel: records each launch's grid-independent arguments (types,
    constexprs, tile shapes of tensor descriptors) and forwards it."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            shape_of = [getattr(a, "block_shape", None) or type(a).__name__ for a in args]
            self.calls.append((self.kernel.fn.__name__, tuple(map(str, shape_of)), tuple(sorted(kwargs.items()))))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("variant", [{}] + VARIANTS, ids=str)
def test_the_launched_kernel_never_depends_on_m(ig, device, monkeypatch, variant):
    """The linear op takes its config from the weight (here TUNED holding the variant): every M
    launches the same kernels with the same constexprs, warps, stages and tile shapes."""
    import atom.ops.triton.invariant  # noqa: F401 (registers the backend)
    from atom.ops import implementations
    n, k, dtype = 200, 96, torch.float32
    gen(7)
    w = torch.randn(n, k, device=device).to(dtype)
    monkeypatch.setitem(ig.TUNED, (n, k, 4), _variant(ig, n, k, dtype, variant))
    calls: list = []
    monkeypatch.setattr(ig, "gemm_kernel", _Recorder(ig.gemm_kernel, calls))
    monkeypatch.setattr(ig, "sum_parts_kernel", _Recorder(ig.sum_parts_kernel, calls))
    linear = implementations("linear")["triton_invariant"]
    per_m = []
    for m in (1, 37, 130, 300):
        calls.clear()
        linear(torch.randn(m, k, device=device).to(dtype), w)
        per_m.append(list(calls))
    assert all(c == per_m[0] for c in per_m), per_m
    assert len(per_m[0]) == (2 if variant.get("split_k", 1) > 1 and not variant.get("fold_last") else 1)


def test_bad_variant_config_is_refused(ig, device):
    x, w = torch.randn(4, 32, device=device), torch.randn(16, 32, device=device)
    base = ig.gemm_config(16, 32, 4)
    for bad in (dict(split_k=0), dict(split_k=1.5), dict(tma="yes"), dict(persistent=1), dict(fold_last=None)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ig.invariant_gemm(x, w, config={**base, **bad})


def test_split_parts_depend_on_k_and_the_config_only(ig):
    assert ig.split_parts(4096, 64, 3) == (22 * 64, 3)  # 22 + 22 + 20 steps
    assert ig.split_parts(4096, 64, 1) == (4096, 1)
    assert ig.split_parts(40, 32, 4) == (32, 2)  # never an empty part
    assert ig.split_parts(12288, 64, 2) == (6144, 2)


@pytest.mark.parametrize("n,k", [(200, 96), (16, 40)] if ON_CPU else [(6144, 4096), (4096, 12288), (16, 40)])
@pytest.mark.parametrize("tma", [False, True])
def test_both_split_sums_give_the_same_bits(ig, device, n, k, tma):
    """The second kernel and the last-arriving program add the same float32 partials in the same
    order: the same bits (with a persistent grid too, where programs finish tiles in any order)."""
    gen(k)
    dtype = act_dtypes()[0]
    w, x = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype), torch.randn(300, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype)
    cfg = _variant(ig, n, k, dtype, dict(tma=tma, split_k=3))
    by_kernel = ig.invariant_gemm(x, w, bias, config=cfg)
    for persistent in (False, True):
        assert torch.equal(by_kernel, ig.invariant_gemm(x, w, bias, config={**cfg, "fold_last": True,
                                                                              "persistent": persistent}))


@pytest.mark.parametrize("n,k", [(200, 96)] if ON_CPU else [(6144, 4096), (4096, 12288), (200, 96)])
def test_an_input_tma_cannot_address_gets_the_same_bits(ig, device, n, k):
    """x at an odd offset (not 16-byte aligned) under a TMA config is copied, not loaded another
    way: the same bits as the aligned input, alone or as a slice of a batch."""
    gen(n)
    dtype = act_dtypes()[0]
    w = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype)
    x = torch.randn(300, k, device=device).to(dtype)
    cfg = _variant(ig, n, k, dtype, dict(tma=True))
    via_tma = ig.invariant_gemm(x, w, config=cfg)
    unaligned = torch.empty(300 * k + 1, device=device, dtype=dtype)[1:].view(300, k).copy_(x)
    assert not ig._aligned(unaligned)
    assert torch.equal(via_tma, ig.invariant_gemm(unaligned, w, config=cfg))
    assert torch.equal(via_tma[7:40], ig.invariant_gemm(unaligned[7:40], w, config=cfg))
