"""EngineConfig(batch_invariant=True) on CUDA with the families that have their own ops.

GPT-OSS (sinks, sliding window, biased experts), Mixtral and Qwen3 with a sliding window
(atom/ops/triton/invariant_families.py, invariant.py) and DeepSeek-V3 (MLA with fixed splits,
absorbed prefill, per-head invariant GEMMs, grouped routing: atom/ops/triton/invariant_mla.py) run on
the triton_invariant backend: one request's tokens and logprobs are bitwise the same alone and in a
batch, chunked or not, cached or not, and a decode token's raw logprob equals what a prompt-logprob
prefill of the sequence reports. Every family op is bound there: nothing falls back to a
batch-dependent kernel.

These tests also run in Triton's interpreter on the CPU (float32, no graphs, every op from the
Triton backends the way the registry takes them on CUDA): `ATOM_GPU_TESTS_ON_CPU=1
TRITON_INTERPRET=1 PYTHONPATH=$PWD:/work/triton_pkgs python -m pytest -m gpu
tests/gpu/test_batch_invariant_families_gpu.py`.
"""
from __future__ import annotations

import pytest
import torch

from atom import SamplingParams
from atom.ops.invariant_family_ops import FAMILY_INVARIANT_OPS
from conftest import TINY_VOCAB
from helpers import random_prompts

from gpu_helpers import ON_CPU, triton_ops  # noqa: F401 (fixture)
from test_batch_invariant_gpu import SP, TARGET, batch_runs, engine, result, small_split  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.gpu
FAMILY_OPS = FAMILY_INVARIANT_OPS + ("mla_cache_write",)


def test_every_family_op_on_cuda_is_bound_to_triton_invariant(triton_ops):
    from atom.ops import OpTable
    from atom.ops.registry import capabilities
    table = OpTable()
    table.configure(torch.device("cuda"), batch_invariant=True)  # the choice only: no kernel runs
    for name in FAMILY_OPS:
        backend = table.backend_of[name]
        assert backend == "triton_invariant", (name, backend)
        assert "batch_invariant" in capabilities(name, backend), name


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
    alone = result(engine(family_path).generate([TARGET], SP)[0])
    for name in ("sliding_sink_attention_prefill", "sliding_sink_attention_decode") + (
            ("fused_moe_biased",) if arch == "gpt_oss" else ()):
        assert ops.backend_of[name] == "triton_invariant", name
    others = random_prompts([5, 40, 17, 23, 9], TINY_VOCAB, seed=12)
    for name, out in batch_runs(family_path, others, cached=False).items():
        assert result(out) == alone, name


def assert_decode_logprobs_equal_a_prefill(path) -> None:
    """Two samples' raw decode logprobs equal, to the bit, the prompt logprobs of one forward over
    prompt + completion (what a trainer's recomputation reports)."""
    prompt = random_prompts([40], TINY_VOCAB, seed=13)[0]
    eng = engine(path)
    sp = SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=SP.max_tokens, logprobs=0, logprobs_mode="raw",
                        ignore_eos=True)
    for c in eng.generate([prompt], sp)[0].outputs:
        again = eng.generate([prompt + c.token_ids], SamplingParams(max_tokens=1, prompt_logprobs=0,
                                                                    logprobs_mode="raw"))[0]
        assert [again.prompt_logprobs[len(prompt) + i][t] for i, t in enumerate(c.token_ids)] == c.logprobs


def test_a_family_decode_logprob_equals_a_prompt_logprob_prefill(family):
    """A trainer's recomputation (one forward over prompt + completion) gives the decode steps'
    raw logprobs to the bit, past the sliding window."""
    assert_decode_logprobs_equal_a_prefill(family[1])


# ---- DeepSeek-V3 (MLA, grouped routing): bound to triton_invariant, bitwise alone and in batches ----

DEEPSEEK_OPS = ("mla_absorb_query", "mla_expand_output", "mla_attention_prefill", "mla_attention_decode",
                "mla_cache_write", "moe_route_grouped")


def test_deepseek_ops_on_cuda_are_bound_to_triton_invariant(triton_ops):
    from atom.ops import OpTable
    table = OpTable()
    table.configure(torch.device("cuda"), batch_invariant=True)  # the choice only: no kernel runs
    assert {name: table.backend_of[name] for name in DEEPSEEK_OPS} == dict.fromkeys(DEEPSEEK_OPS, "triton_invariant")
    assert all(table.supports(name, "graph_safe") and table.supports(name, "batch_invariant") for name in DEEPSEEK_OPS)
    assert not table.supports("mla_attention_decode", "cascade")  # no shared-prefix groups in this mode


@pytest.fixture
def deepseek(make_tiny_model, triton_ops, monkeypatch):
    """The tiny DeepSeek-V3, MLA's KV split shrunk so that its prompts span several partials
    (the CPU run takes every op from the Triton backends as the registry does on CUDA)."""
    import atom.ops.triton.invariant_mla as im
    from atom.ops import ops
    monkeypatch.setattr(im, "KV_SPLIT", 16)
    yield make_tiny_model("deepseek_v3")
    ops.configure(torch.device("cpu"))  # the process-wide table back to its default


def test_deepseek_v3_request_is_bitwise_the_same_in_any_batch(deepseek):
    from atom.ops import ops
    alone = result(engine(deepseek).generate([TARGET], SP)[0])
    assert ops.backend_of["mla_attention_decode"] == ops.backend_of["moe_route_grouped"] == "triton_invariant"
    others = random_prompts([5, 40, 17, 9], TINY_VOCAB, seed=12)
    for name, out in batch_runs(deepseek, others, eager=not ON_CPU).items():
        assert result(out) == alone, name


def test_deepseek_v3_decode_logprobs_equal_a_prompt_logprob_prefill(deepseek):
    """A trainer's recomputation (one forward over prompt + completion) gives the decode steps'
    raw logprobs to the bit: the prefill takes the absorbed form through the decode kernels."""
    assert_decode_logprobs_equal_a_prefill(deepseek)
