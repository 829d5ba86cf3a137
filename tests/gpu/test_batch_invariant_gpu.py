"""EngineConfig(batch_invariant=True) on the Triton path (backend triton_invariant): the cases of
tests/test_batch_invariant.py, bitwise, on a tiny Qwen3 and a tiny Qwen3-MoE in bf16, with CUDA
graphs (padded batches) and shared-prefix decode (n samples of a prompt).

On CPU (Triton's interpreter, float32, no graphs): `ATOM_GPU_TESTS_ON_CPU=1 TRITON_INTERPRET=1
PYTHONPATH=$PWD:/work/triton_pkgs python -m pytest -m gpu tests/gpu/test_batch_invariant_gpu.py`
runs the same engine on CPU tensors with every op taken from the Triton backends the way the
registry takes them on CUDA, and the GPU decode path (static buffers, padded batches, shared-prefix
groups) without graphs.
"""
from __future__ import annotations

import pytest

from atom import RolloutEngine, SamplingParams
from conftest import TINY_VOCAB
from helpers import random_prompts

from gpu_helpers import ON_CPU, triton_ops  # noqa: F401 (fixture)

pytestmark = pytest.mark.gpu

SP = SamplingParams(temperature=1.0, seed=3, max_tokens=6 if ON_CPU else 10, logprobs=2, ignore_eos=True)
SPLIT = 32  # KV tokens per split in these tests: the tiny models' prompts then span several


def triton_choices() -> dict[str, str]:
    """op -> backend as the registry's batch-invariant mode picks them on CUDA (for CPU engines)."""
    import atom.ops.triton.invariant  # noqa: F401
    from atom.ops.registry import _IMPLS, capabilities
    out = {}
    for name, impls in _IMPLS.items():
        b = next((b for b in ("triton_invariant", "triton") if b in impls
                  and "batch_invariant" in capabilities(name, b)), None)
        if b is not None:
            out[name] = b
    return out


@pytest.fixture(autouse=True)
def small_split(triton_ops, monkeypatch):
    import atom.ops.triton.invariant_attention as ia
    monkeypatch.setattr(ia, "KV_SPLIT", SPLIT)


def engine(path, invariant=True, **kw):
    kw.setdefault("num_kv_blocks", 128)
    kw.setdefault("max_num_seqs", 16)
    if ON_CPU:
        kw.update(device="cpu", dtype="float32", overlap_decode=kw.get("overlap_decode", True))
        if invariant:
            kw["op_backends"] = {**triton_choices(), **kw.get("op_backends", {})}
    else:
        kw.update(device="cuda", dtype="bfloat16")
    return RolloutEngine(path, batch_invariant=invariant, **kw)


@pytest.fixture(scope="module", params=["qwen3", "qwen3_moe"])
def path(request, make_tiny_model):
    return make_tiny_model(request.param)


def result(out):
    c = out.outputs[0]
    return c.token_ids, c.logprobs, [sorted(t.items()) for t in c.top_logprobs]


TARGET = random_prompts([29], TINY_VOCAB, seed=11)[0]


def batch_runs(path, others: list[list[int]], eager: bool = True, cached: bool = True) -> dict:
    """TARGET's output in other batches: first of a few, last of all, in a chunked prefill, eager
    step by step (eager), and with its first blocks from the prefix cache (cached)."""
    runs = {
        "first of a few": engine(path).generate([TARGET] + others[:len(others) // 2], SP)[0],
        "last of all": engine(path).generate(others + [TARGET], SP)[-1],
        "chunked prefill": engine(path, max_num_batched_tokens=7).generate(others[:2] + [TARGET], SP)[-1],
    }
    if eager:
        runs["eager, step by step"] = engine(path, enforce_eager=True, overlap_decode=False).generate(
            others[:-2] + [TARGET], SP)[-1]
    if cached:
        eng = engine(path)
        eng.generate([TARGET[:24] + [3, 4]], SamplingParams(max_tokens=1))  # its first blocks, cached
        runs["prefix from the cache"] = eng.generate([TARGET, others[1]], SP)[0]
        assert eng.stats.prompt_tokens_cached >= 16
    return runs


def test_one_request_is_bitwise_the_same_in_any_batch(path):
    from atom.ops import ops
    alone = result(engine(path).generate([TARGET], SP)[0])
    assert ops.backend_of["linear"] == ops.backend_of["paged_attention_decode"] == "triton_invariant"
    for name, out in batch_runs(path, random_prompts([5, 40, 17, 23, 9, 33, 12], TINY_VOCAB, seed=12)).items():
        assert result(out) == alone, name


def test_decode_logprobs_equal_a_prompt_logprob_prefill(path):
    """What a trainer does: one forward over prompt + completion. The raw logprobs of the sampled
    tokens must be the decode steps' to the bit, also for n samples decoded with their shared
    prompt read once per group (the prompt spans whole KV splits)."""
    prompt = random_prompts([100], TINY_VOCAB, seed=13)[0]
    eng = engine(path)
    sp = SamplingParams(n=4, temperature=1.0, seed=4, max_tokens=SP.max_tokens, logprobs=0, logprobs_mode="raw",
                        ignore_eos=True)
    outs = eng.generate([prompt], sp)[0].outputs
    from atom.ops import ops
    assert ops.supports("paged_attention_decode", "cascade")  # the decode path groups the 4 samples
    for c in outs:
        full = prompt + c.token_ids
        again = eng.generate([full], SamplingParams(max_tokens=1, prompt_logprobs=0, logprobs_mode="raw"))[0]
        recomputed = [again.prompt_logprobs[len(prompt) + i][t] for i, t in enumerate(c.token_ids)]
        assert recomputed == c.logprobs
    # Processed logprobs at a temperature: the prompt logprobs divide as the sampler does.
    c = eng.generate([prompt], SamplingParams(temperature=0.7, seed=5, max_tokens=SP.max_tokens, logprobs=0,
                                              ignore_eos=True))[0].outputs[0]
    again = eng.generate([prompt + c.token_ids], SamplingParams(temperature=0.7, max_tokens=1, prompt_logprobs=0))[0]
    assert [again.prompt_logprobs[len(prompt) + i][t] for i, t in enumerate(c.token_ids)] == c.logprobs


@pytest.mark.skipif(ON_CPU, reason="CUDA graphs")
def test_graph_and_eager_decode_agree(path):
    outs = [engine(path, enforce_eager=eager).generate(random_prompts([9, 30, 17], TINY_VOCAB, seed=2), SP)
            for eager in (False, True)]
    assert [result(o) for o in outs[0]] == [result(o) for o in outs[1]]


def test_without_the_mode_decode_and_prefill_differ(path):
    """The checks above can fail: on the normal Triton path a trainer's recomputation (one prefill)
    does not give the decode steps' logprobs (skinny GEMM at decode batch, cuBLAS at prefill size)."""
    if ON_CPU:
        pytest.skip("the normal mode's CPU ops are the reference; tests/test_batch_invariant.py covers them")
    prompt = random_prompts([21], TINY_VOCAB, seed=13)[0]
    eng = engine(path, invariant=False)
    c = eng.generate([prompt], SamplingParams(temperature=1.0, seed=4, max_tokens=12, logprobs=0,
                                              logprobs_mode="raw", ignore_eos=True))[0].outputs[0]
    again = eng.generate([prompt + c.token_ids], SamplingParams(max_tokens=1, prompt_logprobs=0,
                                                                logprobs_mode="raw"))[0]
    assert [again.prompt_logprobs[len(prompt) + i][t] for i, t in enumerate(c.token_ids)] != c.logprobs
