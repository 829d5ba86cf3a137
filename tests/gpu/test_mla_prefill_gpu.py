"""The triton backend's MLA prefill (atom/ops/mla_prefill.py via atom/ops/triton/mla.py) against
the torch reference on fresh random inputs at the GPU's shapes: Moonlight-16B-A3B (16 heads,
latent 512, nope 128, rope 64, v 128) in bf16 with 8192-token chunks of fresh prompts and over a
cached prefix of 1024, decode rows mixed in, odd lengths; DeepSeek-V3's 128 heads; small dims
that are not powers of two. On the GPU in bf16 the expanded path must run flash attention
(one varlen call per group) and agree with the per-sequence SDPA path. The interpreter run
(ATOM_GPU_TESTS_ON_CPU=1 TRITON_INTERPRET=1) covers the small shape only."""
from __future__ import annotations

import pytest
import torch

from atom.ops import mla_prefill as mp
from atom.ops import torch_family_ops

from gpu_helpers import ON_CPU, act_dtypes, device, triton_ops  # noqa: F401 (fixtures)
from test_mla_prefill import mla_case

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1.6e-2, torch.float16: 4e-3, torch.float32: 2e-5}  # relative Frobenius error

# (heads, nope, rope, v, latent, page)
SMALL = (3, 24, 8, 20, 40, 7)
MOONLIGHT = (16, 128, 64, 128, 512, 16)
DEEPSEEK = (128, 128, 64, 128, 512, 16)

# name: (ctx, new) per sequence
CASES = {
    "small mixed": ([45, 70, 38, 90], [45, 1, 30, 50]),
    "8x1024 fresh (one 8192 chunk)": ([1024] * 8, [1024] * 8),
    "8x1024 over a 1024 prefix": ([2048] * 8, [1024] * 8),
    "chunk tail + decode rows + odd lengths": ([1023, 3000, 777, 2049, 1500], [1023, 1, 700, 5, 1024]),
}


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(out).all(), "non-finite output"
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < TOL[dtype], f"relative error {err:.3g} over {TOL[dtype]:.3g}"


def _params():
    out = [(SMALL, "small mixed")]
    if not ON_CPU:
        out += [(MOONLIGHT, name) for name in CASES if name != "small mixed"]
        out += [(DEEPSEEK, "8x1024 over a 1024 prefix")]
    return out


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("shape,case", _params(), ids=lambda p: p if isinstance(p, str) else "x".join(map(str, p)))
def test_mla_prefill_matches_reference(triton_ops, device, dtype, shape, case):
    heads, nope, rope, v_dim, lat, page = shape
    ctx, new = CASES[case]
    args = mla_case(ctx, new, heads, nope, rope, v_dim, lat, page, dtype, seed=heads + len(ctx), device=str(device))
    scale = (nope + rope) ** -0.5
    fast = triton_ops("mla_attention_prefill")["triton"]
    out = fast(*args, scale)
    ref = torch_family_ops.mla_attention_prefill(*args, scale)
    check(out, ref, dtype)
    if device.type == "cuda" and dtype != torch.float32 and v_dim % 8 == 0:
        q = torch.empty(1, heads, nope + rope, device=device, dtype=dtype)
        assert mp._flash_ok(q, v_dim), "the expanded path must use flash attention here"
        sdpa = mp.mla_prefill(*args, scale, triton_ops("mla_attention_decode")["triton"], use_flash=False)
        check(sdpa, ref, dtype)


@pytest.mark.parametrize("dtype", act_dtypes())
def test_mla_prefill_all_absorbed_and_all_expanded_agree(triton_ops, device, dtype, monkeypatch):
    """The same call with every sequence through the absorbed decode, then through the expansion."""
    shape = SMALL if ON_CPU else MOONLIGHT
    ctx, new = ([40, 61], [12, 30]) if ON_CPU else ([1500, 900], [40, 200])
    args = mla_case(ctx, new, *shape, dtype, seed=9, device=str(device))
    scale = 0.1
    fast = triton_ops("mla_attention_prefill")["triton"]
    ref = torch_family_ops.mla_attention_prefill(*args, scale)
    monkeypatch.setattr(mp, "ABSORB_MAX_Q", 1 << 30)
    check(fast(*args, scale), ref, dtype)
    monkeypatch.setattr(mp, "ABSORB_MAX_Q", 0)
    check(fast(*args, scale), ref, dtype)
