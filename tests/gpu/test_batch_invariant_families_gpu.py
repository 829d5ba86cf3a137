"""EngineConfig(batch_invariant=True) on CUDA with the families that have their own ops.

GPT-OSS (sinks, sliding window, biased experts), Mixtral and Qwen3 with a sliding window run on the
triton_invariant backend (atom/ops/triton/invariant_families.py and invariant.py): one request's
tokens and logprobs are bitwise the same alone and in a batch, chunked or not, and a decode
token's raw logprob equals what a prompt-logprob prefill of the sequence reports. DeepSeek-V3's
ops (MLA, grouped routing) have no Triton batch-invariant version yet: nothing runs a
batch-dependent kernel silently; the op raises a ValueError that names it.

The registry check and the engine checks of those families also run in Triton's interpreter on the
CPU (float32, every op from the Triton backends the way the registry takes them on CUDA):
`ATOM_GPU_TESTS_ON_CPU=1 TRITON_INTERPRET=1 PYTHONPATH=$PWD:/work/triton_pkgs python -m pytest -m gpu
tests/gpu/test_batch_invariant_families_gpu.py`; the DeepSeek-V3 check needs a GPU.
"""
from __future__ import annotations

import pytest
import torch

from atom import RolloutEngine, SamplingParams
from atom.ops.invariant_family_ops import FAMILY_INVARIANT_OPS
from conftest import TINY_VOCAB
from helpers import random_prompts

from gpu_helpers import ON_CPU, triton_ops  # noqa: F401 (fixture)
from test_batch_invariant_gpu import SP, engine, result, small_split  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.gpu
FAMILY_OPS = FAMILY_INVARIANT_OPS + ("mla_cache_write",)
# What the triton_invariant backend now has of the families' ops (GPT-OSS, sliding windows).
TRITON_FAMILY_OPS = ("sliding_sink_attention_prefill", "sliding_sink_attention_decode", "clamped_swiglu",
                     "fused_moe_biased")
MISSING = r"op '(moe_route_grouped|mla_\w+)' has no batch-invariant implementation on cuda"


def test_family_ops_on_cuda_are_invariant_or_raise(triton_ops):
    from atom.ops import OpTable
    from atom.ops.registry import capabilities
    table = OpTable()
    table.configure(torch.device("cuda"), batch_invariant=True)  # the choice only: no kernel runs
    for name in TRITON_FAMILY_OPS:
        assert table.backend_of[name] == "triton_invariant", name
    for name in FAMILY_OPS:
        backend = table.backend_of[name]
        if backend == "missing":
            assert name not in TRITON_FAMILY_OPS
            with pytest.raises(ValueError, match=f"op '{name}' has no batch-invariant implementation on cuda"):
                getattr(table, name)()
        else:
            assert "batch_invariant" in capabilities(name, backend), (name, backend)


# The families the triton_invariant backend runs: GPT-OSS (sliding window 6, sinks, biased experts;
# conftest), Mixtral with a window shorter than the prompts, Qwen3 with sliding upper layers.
FAMILIES = [("gpt_oss", {}), ("mixtral", dict(sliding_window=5)),
            ("qwen3", dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=5, max_window_layers=1))]


@pytest.fixture(scope="module", params=FAMILIES, ids=["gpt_oss", "mixtral_window", "qwen3_sliding"])
def family(request, make_tiny_model):
    """(arch, path of its tiny model)."""
    arch, overrides = request.param
    return arch, make_tiny_model(arch, **overrides)


def test_a_family_request_is_bitwise_the_same_in_any_batch(family):
    from atom.ops import ops
    arch, family_path = family
    target = random_prompts([29], TINY_VOCAB, seed=11)[0]
    others = random_prompts([5, 40, 17, 23, 9], TINY_VOCAB, seed=12)
    alone = result(engine(family_path).generate([target], SP)[0])
    for name in TRITON_FAMILY_OPS[:2] + (("fused_moe_biased",) if arch == "gpt_oss" else ()):
        assert ops.backend_of[name] == "triton_invariant", name
    runs = {
        "first of 4": engine(family_path).generate([target] + others[:3], SP)[0],
        "last of 6": engine(family_path).generate(others + [target], SP)[-1],
        "chunked prefill": engine(family_path, max_num_batched_tokens=7).generate(others[:2] + [target], SP)[-1],
        "eager, step by step": engine(family_path, enforce_eager=True, overlap_decode=False).generate(
            others[:3] + [target], SP)[-1],
    }
    for name, out in runs.items():
        assert result(out) == alone, name


def test_a_family_decode_logprob_equals_a_prompt_logprob_prefill(family):
    """A trainer's recomputation (one forward over prompt + completion) gives the decode steps'
    raw logprobs to the bit, past the sliding window."""
    prompt = random_prompts([40], TINY_VOCAB, seed=13)[0]
    eng = engine(family[1])
    sp = SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=SP.max_tokens, logprobs=0, logprobs_mode="raw",
                        ignore_eos=True)
    for c in eng.generate([prompt], sp)[0].outputs:
        again = eng.generate([prompt + c.token_ids], SamplingParams(max_tokens=1, prompt_logprobs=0,
                                                                    logprobs_mode="raw"))[0]
        assert [again.prompt_logprobs[len(prompt) + i][t] for i, t in enumerate(c.token_ids)] == c.logprobs


@pytest.mark.skipif(ON_CPU, reason="a CUDA engine")
def test_deepseek_without_triton_invariant_ops_raises_naming_the_op(make_tiny_model):
    from atom.ops import ops
    path = make_tiny_model("deepseek_v3")
    try:
        with pytest.raises(ValueError, match=MISSING):
            eng = RolloutEngine(path, device="cuda", batch_invariant=True, num_kv_blocks=64, max_num_seqs=4)
            eng.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=2))
    finally:
        ops.configure(torch.device("cpu"))  # the process-wide table back to its default
