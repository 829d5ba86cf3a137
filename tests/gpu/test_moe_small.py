"""moe_forward (routing + experts in one op) of the triton backend against the torch reference,
on both of its paths: the two-kernel small-batch path (T <= SMALL_T_MAX) and moe_route + fused_moe."""
from __future__ import annotations

import pytest
import torch

from atom.ops import torch_ops

from gpu_helpers import ON_CPU, act_dtypes, device, triton_ops  # noqa: F401 (fixtures)

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1.6e-2, torch.float16: 4e-3, torch.float32: 2e-5}

SHAPES = [(64, 32), (72, 40)]  # (hidden, inter); the second is ragged for every tile size
if not ON_CPU:
    SHAPES += [(2048, 768)]  # Qwen3-30B-A3B

ROUTES = [(e, k) for e in (8, 64, 128) for k in (1, 2, 8)]  # (experts, top_k)


def forward_cases() -> list[tuple]:
    """(tokens, experts, top_k, renorm, hidden, inter). On the GPU every combination of T in 1..8,
    the routes, renorm and the shapes. In the interpreter (slow) a covering subset: each T with three
    routes, every route at three T of which at least one takes each path (SMALL_T_MAX = 4), renorm
    and the shapes alternating."""
    if not ON_CPU:
        return [(t, e, k, r, h, i) for t in range(1, 9) for e, k in ROUTES for r in (True, False)
                for h, i in SHAPES]
    cases = []
    for n, t in enumerate(range(1, 9)):
        for m in range(3):
            e, k = ROUTES[(3 * n + m) % len(ROUTES)]
            h, i = SHAPES[(n // 2 + m) % len(SHAPES)]
            cases.append((t, e, k, (n + m) % 2 == 0, h, i))
    return cases


@pytest.fixture(autouse=True)
def _interpreter_scalar_index(monkeypatch):
    """Triton 3.6's interpreter turns a scalar kernel argument into a 1-element 1-d array and its
    `__index__` calls int() on it, which NumPy >= 2.4 refuses: every loop over a runtime bound
    (fused_moe's `range(0, N, BLOCK)`) fails there. Take the element instead (interpreter only)."""
    if not ON_CPU:
        return
    from triton.runtime import interpreter
    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patched)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(out, ref, dtype, factor=1.5):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    err = rel_err(out, ref)
    assert err < TOL[dtype] * factor, f"relative error {err:.3g} over {TOL[dtype] * factor:.3g}"


def distinct_logits(tokens: int, experts: int, device, dtype) -> torch.Tensor:
    """Random router logits with no ties in any row (distinct multiples of 2/E in [-4, 4), exact in
    fp16/bf16), so that torch.topk and the kernels' lowest-index rule pick the same experts."""
    rows = [torch.randperm(4 * experts)[:experts] for _ in range(tokens)]
    return ((torch.stack(rows).float() - 2 * experts) / (experts / 2)).to(device=device, dtype=dtype)


def make(seed, tokens, experts, hidden, inter, dtype, device):
    torch.manual_seed(seed)
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=device) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device=device) / inter ** 0.5).to(dtype)
    return x, w13, w2, distinct_logits(tokens, experts, device, dtype)


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("tokens,experts,top_k,renorm,hidden,inter", forward_cases())
def test_moe_forward(triton_ops, device, dtype, tokens, experts, top_k, renorm, hidden, inter):
    x, w13, w2, logits = make(tokens * 1000 + experts * 10 + top_k, tokens, experts, hidden, inter, dtype, device)
    out = triton_ops("moe_forward")["triton"](x, logits, w13, w2, top_k, renorm)
    ref = torch_ops.moe_forward(x, logits, w13, w2, top_k, renorm)
    check(out, ref, dtype)


def test_torch_moe_forward_is_route_then_fused_moe():
    torch.manual_seed(0)
    x, w13, w2, logits = make(1, 5, 8, 64, 32, torch.float32, "cpu")
    got = torch_ops.moe_forward(x, logits, w13, w2, 2, True)
    assert torch.equal(got, torch_ops.fused_moe(x, w13, w2, *torch_ops.moe_route(logits, 2, True)))


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("small_t_max", [0, 8])
@pytest.mark.parametrize("tokens", [1, 8])
def test_moe_forward_either_path(triton_ops, device, monkeypatch, dtype, small_t_max, tokens):
    """Both paths at any T (the threshold is a tuning knob)."""
    from atom.ops.triton import moe_small as moe
    monkeypatch.setattr(moe, "SMALL_T_MAX", small_t_max)
    x, w13, w2, logits = make(7 + tokens, tokens, 64, 64, 32, dtype, device)
    out = triton_ops("moe_forward")["triton"](x, logits, w13, w2, 8, True)
    check(out, torch_ops.moe_forward(x, logits, w13, w2, 8, True), dtype)


SMALL_TILES = dict(up=dict(BLOCK_N=16, BLOCK_K=16, num_warps=2, num_stages=1),
                   down=dict(BLOCK_N=4, BLOCK_K=16, num_warps=1, num_stages=1))
WIDE_K = dict(up=dict(BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=2),
              down=dict(BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=2))


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("cfg", [None, SMALL_TILES, WIDE_K], ids=["default", "small-tiles", "wide-k"])
@pytest.mark.parametrize("hidden,inter", SHAPES)
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 128, 8), (4, 8, 2)])
def test_moe_small_tile_configs(triton_ops, device, dtype, cfg, hidden, inter, tokens, experts, top_k):
    """Other tile configs than the default (K and N tails, several K tiles per row)."""
    from atom.ops.triton import moe_small as moe
    x, w13, w2, logits = make(3 + tokens, tokens, experts, hidden, inter, dtype, device)
    out = moe.moe_small(x, logits, w13, w2, top_k, True, cfg=cfg)[0]
    check(out, torch_ops.moe_forward(x, logits, w13, w2, top_k, True), dtype)


PICK_CASES = [(e, k, r) for e, k in [(8, 1), (8, 8), (64, 2), (128, 8)] for r in (True, False)]
if ON_CPU:  # the interpreter is slow
    PICK_CASES = [(8, 8, True), (64, 2, False), (128, 8, True)]


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("experts,top_k,renorm", PICK_CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_small_path_picks_moe_route_experts(triton_ops, device, dtype, experts, top_k, renorm, ties):
    """With T <= SMALL_T_MAX the experts (in order) and weights are those of the triton moe_route,
    ties (lowest index first) included."""
    from atom.ops.triton import moe_small as moe
    tokens = max(1, moe.SMALL_T_MAX)
    torch.manual_seed(experts + top_k + 100 * ties)
    if ties:  # few distinct values: many exact ties, also across the top-k boundary
        logits = torch.randint(-2, 2, (tokens, experts), device=device).to(dtype)
    else:
        logits = (torch.randn(tokens, experts, device=device) * 2).to(dtype)
    x, w13, w2, _ = make(5, tokens, experts, 64, 32, dtype, device)
    out, w, ids = moe.moe_small(x, logits, w13, w2, top_k, renorm)
    rw, rids = triton_ops("moe_route")["triton"](logits, top_k, renorm)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids.long(), rids)
    torch.testing.assert_close(w, rw, atol=1e-6, rtol=1e-6)
    if not ties:  # torch.topk breaks ties its own way
        tw, tids = torch_ops.moe_route(logits, top_k, renorm)
        assert torch.equal(ids.long().sort(-1).values, tids.sort(-1).values)
    check(out, torch_ops.fused_moe(x, w13, w2, rw, rids), dtype)
