"""Issue 2, test 8: bad input raises a clear error, and the engine still serves the next valid call."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from atom import EngineConfig, RolloutEngine, SamplingParams
from conftest import TINY_VOCAB

BAD_PARAMS = [
    ("n", 0), ("n", 1.5), ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("top_k", 2.5), ("min_p", -0.1), ("min_p", 1.1), ("max_tokens", 0), ("min_tokens", -1),
    ("min_tokens", 99), ("stop", [""]), ("stop_token_ids", [-1]), ("ignore_eos", "yes"), ("seed", -5),
    ("logprobs", -2), ("logprobs_mode", "softmax"), ("prompt_logprobs", -2), ("stop", 5), ("stop_token_ids", 5),
    ("repetition_penalty", 0.0), ("presence_penalty", 2.5), ("frequency_penalty", -3), ("logit_bias", {3: float("inf")}),
    ("logit_bias", {-1: 1.0}), ("allowed_token_ids", []), ("bad_words", [""]), ("detokenize", 0),
    ("truncate_prompt_tokens", 0), ("max_tokens", 0), ("bad_words", "word"),
]
# vLLM raises TypeError for these (atom's error is both a TypeError and a ValueError).
TYPE_ERRORS = [("stop", 123), ("stop_token_ids", 5), ("logit_bias", [1, 2]), ("allowed_token_ids", 7)]


@pytest.mark.parametrize("field,value", BAD_PARAMS, ids=[f"{f}={v!r}" for f, v in BAD_PARAMS])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field,value", TYPE_ERRORS, ids=[f"{f}={v!r}" for f, v in TYPE_ERRORS])
def test_wrong_types_raise_type_error_as_vllm(field, value):
    with pytest.raises(TypeError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


@pytest.fixture(scope="module")
def engine(tiny_qwen3_path):
    return RolloutEngine(tiny_qwen3_path, max_model_len=64)


def assert_still_serves(engine):
    out = engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
    assert engine.num_free_kv_blocks == engine.num_kv_blocks and not engine.has_unfinished_requests()


@pytest.mark.parametrize("prompts,params,match", [
    ([[]], None, "prompt 0 is empty"),
    ([[3, 4], list(range(2, 66))], None, "prompt 1 has 64 tokens; max_model_len=64"),
    ([[3, TINY_VOCAB]], None, f"token id {TINY_VOCAB} is outside the vocabulary"),
    ([[3, -1]], None, "token id -1 is outside"),
    (["text prompt"], None, "text prompts need a tokenizer"),
    ([[3, 4]], SamplingParams(stop_token_ids=[TINY_VOCAB + 5]), "SamplingParams.stop_token_ids"),
    ([[3, 4]], SamplingParams(logprobs=TINY_VOCAB + 1), "SamplingParams.logprobs"),
    ([[3, 4]], SamplingParams(logprobs=21), "SamplingParams.logprobs=21 .*max_logprobs=20"),
    ([[3, 4]], SamplingParams(prompt_logprobs=-1), "SamplingParams.prompt_logprobs=-1 .*max_logprobs=20"),
    ([[3, 4]], SamplingParams(allowed_token_ids=[3, TINY_VOCAB]), "SamplingParams.allowed_token_ids"),
    ([[3, 4]], SamplingParams(logit_bias={TINY_VOCAB: 1.0}), "SamplingParams.logit_bias"),
    ([[3, 4]], SamplingParams(stop=["x"]), "SamplingParams.stop needs a tokenizer"),
    ([[3, 4], [5]], [SamplingParams()], "got 1 SamplingParams for 2 prompts"),
])
def test_bad_generate_input_is_rejected_and_engine_survives(engine, prompts, params, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(prompts, params)
    assert_still_serves(engine)


@pytest.mark.parametrize("prompts,params,match", [
    ([3.5], None, "prompt 0: expected a string, a list of token ids or a chat conversation"),
    ([1, 2, 3], None, r"a token-id prompt is a list inside the list of prompts"),
    (None, None, "generate: prompts must be a prompt .* or a list of prompts, got NoneType"),
    ([[3, 4]], "greedy", "sampling_params must be a SamplingParams, a list of them .* got str"),
    ([[3, 4]], [None], r"sampling_params\[0\] must be a SamplingParams, got NoneType"),
    ([[3, "4"]], None, "prompt 0: .*a token-id list holds ints only; found str '4'"),
    (torch.tensor([[3, 4], [5, 6]]), None, "prompts as a 2-D Tensor: pass a list of prompts"),
    (np.array([3, 4]), None, "prompts as a 1-D ndarray: pass a list of prompts"),
    ([torch.tensor([3.0, 4.0])], None, "prompt 0: expected a string, a list of token ids"),
    ([np.array([True, False])], None, "prompt 0: expected a string, a list of token ids"),
    ([[np.int64(3), True]], None, "prompt 0: .*found bool True"),
])
def test_wrong_types_are_type_errors_and_engine_survives(engine, prompts, params, match):
    with pytest.raises(TypeError, match=match):
        engine.generate(prompts, params)
    assert_still_serves(engine)


def test_token_ids_as_arrays_and_numpy_ints_equal_lists(engine):
    """What trainers hold (a row of a tensor, numpy ids) generates exactly what the list does."""
    ids = [3, 17, 42, 9]
    sp = SamplingParams(n=2, temperature=1.0, max_tokens=5, seed=11, logprobs=1)
    want = engine.generate([ids], sp)[0]
    for prompt in (torch.tensor(ids), torch.tensor(ids, dtype=torch.int32), np.array(ids),
                   np.array(ids, dtype=np.uint16), [np.int64(t) for t in ids], tuple(np.array(ids))):
        got = engine.generate([prompt], sp)[0]
        assert got.prompt_token_ids == ids and all(type(t) is int for t in got.prompt_token_ids)
        assert [c.token_ids for c in got.outputs] == [c.token_ids for c in want.outputs]
        assert [c.logprobs for c in got.outputs] == [c.logprobs for c in want.outputs]
    with pytest.raises(ValueError, match="token id 256 is outside the vocabulary"):
        engine.generate([np.array([3, TINY_VOCAB])])
    assert_still_serves(engine)


def copy_checkpoint(src: str, dst: Path, edit) -> str:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def test_missing_tensor(tiny_qwen3_path, tmp_path):
    path = copy_checkpoint(tiny_qwen3_path, tmp_path / "m",
                           lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match="missing 1 tensor.*model.layers.1.self_attn.k_proj.weight"):
        RolloutEngine(path)


def test_misshapen_tensor(tiny_qwen3_path, tmp_path):
    def edit(t):
        t["model.layers.0.mlp.down_proj.weight"] = torch.randn(64, 100)
    path = copy_checkpoint(tiny_qwen3_path, tmp_path / "m", edit)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj.weight.*shape \(64, 100\).*\(64, 128\)"):
        RolloutEngine(path)


def test_unknown_tensor(tiny_qwen3_path, tmp_path):
    def edit(t):
        t["model.layers.0.mlp.extra.weight"] = torch.randn(4, 4)
    path = copy_checkpoint(tiny_qwen3_path, tmp_path / "m", edit)
    with pytest.raises(ValueError, match="model.layers.0.mlp.extra.weight.*not a parameter"):
        RolloutEngine(path)


def test_unknown_architecture(tiny_qwen3_path, tmp_path):
    shutil.copytree(tiny_qwen3_path, tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = ["MysteryForCausalLM"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown architecture 'MysteryForCausalLM'"):
        RolloutEngine(str(tmp_path / "m"))


def test_bad_engine_config(tiny_qwen3_path):
    with pytest.raises(ValueError, match="max_num_seqs"):
        RolloutEngine(tiny_qwen3_path, max_num_seqs=0)
    with pytest.raises(ValueError, match="unknown EngineConfig field"):
        RolloutEngine(EngineConfig(model=tiny_qwen3_path), max_num_sequences=4)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        RolloutEngine(tiny_qwen3_path, max_model_len=10_000)
    with pytest.raises(ValueError, match="'/nonexistent/checkpoint': no such directory"):
        RolloutEngine("/nonexistent/checkpoint")
    with pytest.raises(ValueError, match="no config.json"):
        RolloutEngine(os.path.dirname(tiny_qwen3_path))  # a directory, but no checkpoint
    with pytest.raises(ValueError, match="is a file, not a checkpoint directory"):
        RolloutEngine(os.path.join(tiny_qwen3_path, "config.json"))


def test_cuda_on_a_cpu_only_torch_is_one_clear_error(tiny_qwen3_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"device='{device}', but this torch is a CPU-only build") as e:
            RolloutEngine(tiny_qwen3_path, device=device)
        assert "\n" not in str(e.value) and "install a CUDA build of torch" in str(e.value)


def test_kv_too_small_for_one_sequence(tiny_qwen3_path):
    engine = RolloutEngine(tiny_qwen3_path, num_kv_blocks=2, max_model_len=256)
    with pytest.raises(ValueError, match="do not fit the KV cache of 2 blocks"):
        engine.generate([[3] * 20], SamplingParams(max_tokens=40))
    assert engine.generate([[3] * 5], SamplingParams(max_tokens=4))[0].outputs[0].token_ids


def test_rejected_call_leaves_the_seed_stream_alone(tiny_qwen3_path):
    """Unseeded requests draw seeds only once the whole call is valid."""
    sp = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True)
    a = RolloutEngine(tiny_qwen3_path, seed=3)
    b = RolloutEngine(tiny_qwen3_path, seed=3)
    with pytest.raises(ValueError):
        b.generate([[5, 6], [7, TINY_VOCAB]], sp)
    assert a.generate([[5, 6]], sp)[0].outputs[0].token_ids == b.generate([[5, 6]], sp)[0].outputs[0].token_ids


def test_params_changed_after_a_call_apply_to_the_next_call_only(tiny_qwen3_path):
    engine = RolloutEngine(tiny_qwen3_path)
    sp = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=1)
    engine.generate([[5, 6, 7]], sp)
    sp.temperature = 0.0
    greedy = engine.generate([[5, 6, 7]], sp)[0].outputs[0].token_ids
    want = RolloutEngine(tiny_qwen3_path).generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8,
                                                                                ignore_eos=True))
    assert greedy == want[0].outputs[0].token_ids


def test_tokenize_matches_generate_and_its_errors(engine):
    assert engine.tokenize([5, 6, 7]) == [5, 6, 7]
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.tokenize([])
    with pytest.raises(ValueError, match="prompt has 64 tokens; max_model_len=64"):
        engine.tokenize(list(range(2, 66)))
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        engine.tokenize("hello")
