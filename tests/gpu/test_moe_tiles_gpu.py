"""The fused MoE under the per-shape tile table (atom/ops/moe_tiles.py) with the configs
`bench.moe_tune` may pick, against the torch references: the registered ops read the table
(the launches use the installed configs) and stay correct under each candidate, for the plain
SiLU experts (Moonlight's path) and GPT-OSS's biased clamped SwiGLU (aligned and small paths).

GPU: every candidate at GPT-OSS-20B's and Moonlight-16B-A3B's real shapes (bf16) plus the small one.
Interpreter (ATOM_GPU_TESTS_ON_CPU=1 TRITON_INTERPRET=1, ~40 s): every candidate at a small
shape with K tails (hidden 144, intermediate 80: two and a half 64-wide K tiles)."""
from __future__ import annotations

import pytest
import torch

from atom.ops import moe_tiles, torch_family_ops as ref_ops, torch_ops
from bench.moe_tune import CANDIDATES, SMALL_CANDIDATES

from gpu_helpers import ON_CPU, act_dtypes, device, triton_ops  # noqa: F401 (fixtures)

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1.6e-2, torch.float16: 4e-3, torch.float32: 2e-5}
LIMIT, ALPHA = 7.0, 1.702

ALL = [(t, c) for t, cands in CANDIDATES.items() for c in cands[1:]]  # [0]: the default rung
# (dtype, (tokens, experts, top_k, hidden, inter)): the small shape in every dtype, the models'
# (GPT-OSS-20B, Moonlight-16B-A3B) in bf16, as they run.
SHAPES = [(dt, (9, 8, 2, 144, 80)) for dt in act_dtypes()]
if not ON_CPU:
    SHAPES += [(torch.bfloat16, (64, 32, 4, 2880, 2880)), (torch.bfloat16, (64, 64, 6, 2048, 1408))]


def fits(case, dtype) -> bool:
    """Whether both GEMMs' pipelined tiles fit the H200's 227 KiB (232,448 bytes) of shared memory at dtype's
    element size. The candidates are bf16 configs; the wider ones do not fit in float32 (Triton
    raises OutOfResources) and the table never gives them to float32 weights (its key has the
    element size)."""
    size = torch.tensor([], dtype=dtype).element_size()
    up, down = case[1]
    # Triton's pipeline holds num_stages - 1 buffers of the x tile and the weight tiles (gate
    # and up: two); 278,528 bytes is what it asked for m16n128k128 s3.
    need_up = (up["num_stages"] - 1) * (up["BLOCK_M"] + 2 * up["BLOCK_N"]) * up["BLOCK_K"] * size
    need_down = (down["num_stages"] - 1) * (down["BLOCK_M"] + down["BLOCK_N"]) * down["BLOCK_K"] * size
    return ON_CPU or max(need_up, need_down) <= 232448


def cid(case) -> str:
    up, down = case[1]
    return "T{}-m{BLOCK_M}n{BLOCK_N}k{BLOCK_K}g{GROUP_M}w{num_warps}s{num_stages}-dn{}".format(
        case[0], down["BLOCK_N"], **up)


# Every (dtype, shape, candidate) whose tiles fit shared memory in that dtype.
RUNS = [pytest.param(dt, shape, case, id=f"{cid(case)}-{dt}-{'x'.join(map(str, shape))}")
        for dt, shape in SHAPES for case in ALL if fits(case, dt)]


@pytest.fixture(autouse=True)
def clean_table():
    saved = dict(moe_tiles.TABLE)
    yield
    moe_tiles.TABLE.clear()
    moe_tiles.TABLE.update(saved)


def rel_err(out, ref) -> float:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def record_launches(monkeypatch) -> list[dict]:
    """The tile configs the aligned path's two GEMM launches get, in order."""
    from atom.ops.triton import moe
    seen, launch = [], moe._launch

    def spy(*args, **kwargs):
        seen.append(args[14])  # cfg
        return launch(*args, **kwargs)
    monkeypatch.setattr(moe, "_launch", spy)
    return seen


def routed(tokens, experts, top_k, device):
    logits = torch.randn(tokens, experts, device=device)
    weights, ids = logits.topk(top_k, dim=-1)
    return weights.softmax(-1), ids


@pytest.mark.parametrize("dtype,shape,case", RUNS)
def test_fused_moe_reads_the_table(triton_ops, device, monkeypatch, dtype, shape, case):
    tokens, experts, top_k, hidden, inter = shape
    torch.manual_seed(tokens + experts + hidden)
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=device) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device=device) / inter ** 0.5).to(dtype)
    weights, ids = routed(tokens, experts, top_k, device)
    up, down = case[1]
    moe_tiles.install(moe_tiles.shape_of(w13), tokens, up, down)  # the first rung to serve `tokens`
    seen = record_launches(monkeypatch)
    out = triton_ops("fused_moe")["triton"](x, w13, w2, weights, ids)
    assert seen == [up, down]
    err = rel_err(out, torch_ops.fused_moe(x, w13, w2, weights, ids))
    assert err < TOL[dtype] * 1.5, f"relative error {err:.3g}"


@pytest.mark.parametrize("dtype,shape,case", RUNS)
def test_fused_moe_biased_reads_the_table(triton_ops, device, monkeypatch, dtype, shape, case):
    tokens, experts, top_k, hidden, inter = shape
    torch.manual_seed(tokens * 7 + experts + hidden)
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    # Pre-activations spread to about ±3 limits: the clamp bites.
    w13 = (torch.randn(experts, 2 * inter, hidden, device=device) * 5 / hidden ** 0.5).to(dtype)
    b13 = torch.randn(experts, 2 * inter, device=device).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device=device) / inter ** 0.5 / 10).to(dtype)
    b2 = torch.randn(experts, hidden, device=device).to(dtype)
    weights, ids = routed(tokens, experts, top_k, device)
    up, down = case[1]
    moe_tiles.install(moe_tiles.shape_of(w13), tokens, up, down)
    seen = record_launches(monkeypatch)
    out = triton_ops("fused_moe_biased")["triton"](x, w13, b13, w2, b2, weights, ids, LIMIT, ALPHA)
    assert seen == [up, down]
    err = rel_err(out, ref_ops.fused_moe_biased(x, w13, b13, w2, b2, weights, ids, LIMIT, ALPHA))
    assert err < TOL[dtype] * 1.5, f"relative error {err:.3g}"


def fits_small(cfg, dtype, top_k: int = 4) -> bool:
    """`fits` for the small path: kernel 1 pipelines the gate and up weight tiles, kernel 2 the k
    experts' tiles as one (session 10: up 128x128 at 3 stages asked 278,528 bytes in float32)."""
    size = torch.tensor([], dtype=dtype).element_size()
    up, down = cfg["up"], cfg["down"]
    need_up = (up["num_stages"] - 1) * 2 * up["BLOCK_N"] * up["BLOCK_K"] * size
    need_down = (down["num_stages"] - 1) * top_k * down["BLOCK_N"] * down["BLOCK_K"] * size
    return ON_CPU or max(need_up, need_down) <= 232448


SMALL_RUNS = [pytest.param(dt, cfg, id="up{BLOCK_N}x{BLOCK_K}-".format(**cfg["up"]) + str(dt))
              for dt in act_dtypes() for cfg in SMALL_CANDIDATES[1:] if fits_small(cfg, dt)]


@pytest.mark.parametrize("dtype,cfg", SMALL_RUNS)
def test_fused_moe_biased_small_path_reads_the_table(triton_ops, device, monkeypatch, dtype, cfg):
    from atom.ops.triton import moe_small
    hidden, inter = (144, 80) if ON_CPU else (2880, 2880)
    torch.manual_seed(5)
    x = torch.randn(2, hidden, device=device).to(dtype)
    w13 = (torch.randn(8, 2 * inter, hidden, device=device) * 5 / hidden ** 0.5).to(dtype)
    b13 = torch.randn(8, 2 * inter, device=device).to(dtype)
    w2 = (torch.randn(8, hidden, inter, device=device) / inter ** 0.5 / 10).to(dtype)
    b2 = torch.randn(8, hidden, device=device).to(dtype)
    weights, ids = routed(2, 8, 4, device)
    moe_tiles.install_small(moe_tiles.shape_of(w13), cfg)
    seen, up, down = [], moe_small.small_up, moe_small.small_down
    monkeypatch.setattr(moe_small, "small_up", lambda *a, **k: (seen.append(a[8]), up(*a, **k))[1])
    monkeypatch.setattr(moe_small, "small_down", lambda *a, **k: (seen.append(a[6]), down(*a, **k))[1])
    out = triton_ops("fused_moe_biased")["triton"](x, w13, b13, w2, b2, weights, ids, LIMIT, ALPHA)
    assert seen == [cfg["up"], cfg["down"]]
    err = rel_err(out, ref_ops.fused_moe_biased(x, w13, b13, w2, b2, weights, ids, LIMIT, ALPHA))
    assert err < TOL[dtype] * 1.5, f"relative error {err:.3g}"
