"""The aiter backend's mla_attention_decode (aiter.mla.mla_decode_fwd) against the torch reference on
a ROCm GPU with AITER (gfx942 / gfx950). Skipped where `import aiter` fails (every NVIDIA machine:
this has never run). The argument construction itself is tested on CPU in tests/test_aiter_args.py."""
from __future__ import annotations

import pytest
import torch

from atom.ops import torch_family_ops

from test_mla_triton import check, latent_batch
from gpu_helpers import ON_CPU

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def aiter_mla():
    if ON_CPU or not torch.cuda.is_available() or not torch.version.hip:
        pytest.skip("needs a ROCm GPU")
    pytest.importorskip("aiter")
    from atom.ops import aiter_ops
    return aiter_ops.mla_attention_decode


@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("shared", [None, [((2, 3, 4), 3)]])
def test_aiter_mla_decode(aiter_mla, heads, shared):
    torch.manual_seed(heads)
    seq_lens = [1, 17, 300, 1025, 4097, 513]
    q_latent, q_pe, cache, meta, scale = latent_batch("cuda", torch.bfloat16, seq_lens, heads, 512, 64, 16,
                                                      shared=shared)
    out = aiter_mla(q_latent, q_pe, cache, meta, scale)
    check(out, torch_family_ops.mla_attention_decode(q_latent, q_pe, cache, meta, scale), torch.bfloat16)
    meta.seq_lens[0] = 0  # a padded CUDA-graph row: zeros (in place: the cached page lists are rebuilt)
    out = aiter_mla(q_latent, q_pe, cache, meta, scale)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    check(out[1:], torch_family_ops.mla_attention_decode(q_latent, q_pe, cache, meta, scale)[1:], torch.bfloat16)
