"""EngineConfig(batch_invariant=True) on the CPU: one request's tokens and logprobs are bitwise the
same alone, in batches of several sizes and positions, chunked or not, cached or not, and a token
computed in decode has the logprob a prompt-logprob prefill of the whole sequence gives it. Every
family: Qwen3, Qwen3-MoE, GPT-OSS (sinks, sliding layers, biased experts), Mixtral with a sliding
window, DeepSeek-V3 with and without q_lora (MLA, grouped routing)."""
from __future__ import annotations

import pytest
import torch

from atom import RolloutEngine, SamplingParams
from conftest import TINY_VOCAB
from helpers import random_prompts

SP = SamplingParams(temperature=1.0, seed=3, max_tokens=10, logprobs=2, ignore_eos=True)


def engine(path, **kw):
    kw.setdefault("num_kv_blocks", 128)
    return RolloutEngine(path, device="cpu", batch_invariant=True, max_num_seqs=16, **kw)


# Mixtral without a window takes the plain ops; the families with their own ops
# (atom/ops/invariant_family_ops.py): sinks and a sliding window with biased experts (GPT-OSS), a
# sliding window alone (Mixtral; Qwen3's upper layers), MLA with and without q_lora and grouped
# routing (DeepSeek-V3).
MODELS = {
    "qwen3": ("qwen3", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "gpt_oss": ("gpt_oss", {}),
    "mixtral": ("mixtral", {}),
    "mixtral_window": ("mixtral", dict(sliding_window=5)),
    "qwen3_sliding": ("qwen3", dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=5,
                                    max_window_layers=1)),
    "deepseek_v3": ("deepseek_v3", {}),
    "deepseek_v3_no_q_lora": ("deepseek_v3", dict(q_lora_rank=None)),
}


@pytest.fixture(scope="module", params=list(MODELS))
def path(request, make_tiny_model):
    arch, overrides = MODELS[request.param]
    return make_tiny_model(arch, **overrides)


def result(out):
    c = out.outputs[0]
    return c.token_ids, c.logprobs, [sorted(t.items()) for t in c.top_logprobs]


def test_one_request_is_bitwise_the_same_in_any_batch(path):
    target = random_prompts([29], TINY_VOCAB, seed=11)[0]
    others = random_prompts([5, 40, 17, 23, 9, 33, 12], TINY_VOCAB, seed=12)
    alone = result(engine(path).generate([target], SP)[0])
    runs = {
        "first of 4": engine(path).generate([target] + others[:3], SP)[0],
        "last of 8": engine(path).generate(others + [target], SP)[-1],
        "chunked prefill": engine(path, max_num_batched_tokens=7).generate(others[:2] + [target], SP)[-1],
    }
    cached = engine(path)
    cached.generate([target[:24] + [3, 4]], SamplingParams(max_tokens=1))  # its first blocks, cached
    runs["prefix from the cache"] = cached.generate([target, others[1]], SP)[0]
    assert cached.stats.prompt_tokens_cached >= 16
    for name, out in runs.items():
        assert result(out) == alone, name


def test_decode_logprobs_equal_a_prompt_logprob_prefill(path):
    """What a trainer does: one forward over prompt + completion. The raw logprobs of the sampled
    tokens must be the decode steps' to the bit."""
    prompt = random_prompts([21], TINY_VOCAB, seed=13)[0]
    eng = engine(path)
    c = eng.generate([prompt], SamplingParams(temperature=1.0, seed=4, max_tokens=12, logprobs=0,
                                              logprobs_mode="raw", ignore_eos=True))[0].outputs[0]
    full = prompt + c.token_ids
    again = eng.generate([full], SamplingParams(max_tokens=1, prompt_logprobs=0, logprobs_mode="raw"))[0]
    recomputed = [again.prompt_logprobs[len(prompt) + i][t] for i, t in enumerate(c.token_ids)]
    assert recomputed == c.logprobs
    # The processed logprobs at a temperature too (the prompt logprobs divide as the sampler does).
    sp = SamplingParams(temperature=0.7, seed=4, max_tokens=12, logprobs=0, ignore_eos=True)
    c = eng.generate([prompt], sp)[0].outputs[0]
    again = eng.generate([prompt + c.token_ids], SamplingParams(temperature=0.7, max_tokens=1, prompt_logprobs=0))[0]
    assert [again.prompt_logprobs[len(prompt) + i][t] for i, t in enumerate(c.token_ids)] == c.logprobs


def test_without_the_mode_batches_do_change_the_bits(path):
    """The check above can fail: the reference ops differ across batch sizes for the same request.
    (The CPU backend's oneDNN GEMMs happen to give this tiny model the same bits in any batch,
    but not every shape: a single row at K=1536 differs. Nothing promises it.)"""
    from atom.ops.invariant_ops import INVARIANT_OPS
    target = random_prompts([29], TINY_VOCAB, seed=11)[0]
    others = random_prompts([5, 40, 17, 23, 9, 33, 12], TINY_VOCAB, seed=12)
    plain = dict(device="cpu", num_kv_blocks=128, max_num_seqs=16,
                 op_backends={name: "torch" for name in INVARIANT_OPS})
    alone = result(RolloutEngine(path, **plain).generate([target], SP)[0])
    batched = result(RolloutEngine(path, **plain).generate(others + [target], SP)[-1])
    assert alone[0] == batched[0] and alone[1] != batched[1]


def test_the_registry_takes_only_invariant_implementations(make_tiny_model, monkeypatch):
    """Each op of the mode declares the capability, and on the CPU every op has one (the families'
    too); an op without an invariant implementation on the platform raises, naming itself, when
    called instead of running unchecked (tests/gpu/test_batch_invariant_families_gpu.py: the
    families' ops on CUDA); the mode refuses tensor / expert parallelism (the collectives' order
    follows the batch)."""
    from atom.ops import OpTable, registry
    from atom.ops.registry import capabilities
    table = OpTable()
    table.configure(torch.device("cpu"), batch_invariant=True)
    for name in ("linear", "lm_head", "paged_attention_prefill", "paged_attention_decode", "fused_moe", "sample",
                 "sliding_sink_attention_prefill", "fused_moe_biased", "moe_route_grouped", "mla_attention_prefill",
                 "mla_attention_decode", "mla_absorb_query", "mla_expand_output"):
        assert table.backend_of[name] == "invariant", name
    assert "missing" not in table.backend_of.values()
    for name, backend in table.backend_of.items():
        assert "batch_invariant" in capabilities(name, backend), name
        assert table.supports(name, "batch_invariant")
    assert table.backend_of["rms_norm"] == "cpu"
    # A platform whose invariant backends lack an op: here the CPU without the "invariant" backend.
    monkeypatch.setitem(registry._INVARIANT_PREFERENCE, "cpu", ("cpu",))
    table.configure(torch.device("cpu"), batch_invariant=True)
    assert table.backend_of["mla_attention_decode"] == "missing" and table.backend_of["rms_norm"] == "cpu"
    with pytest.raises(ValueError, match="op 'sliding_sink_attention_prefill' has no batch-invariant implementation"):
        table.sliding_sink_attention_prefill()
    with pytest.raises(ValueError, match="batch_invariant needs tensor_parallel_size"):
        RolloutEngine(make_tiny_model("qwen3"), device="cpu", batch_invariant=True, tensor_parallel_size=2)


def test_the_cpu_mode_survives_the_gpu_decode_path(path):
    """The static-buffer decode path (padded batches) on the CPU keeps the bits too."""
    target = random_prompts([29], TINY_VOCAB, seed=11)[0]
    others = random_prompts([5, 40, 17], TINY_VOCAB, seed=12)
    alone = result(engine(path).generate([target], SP)[0])
    assert result(engine(path, overlap_decode=True).generate(others + [target], SP)[-1]) == alone
