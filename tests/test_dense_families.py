"""The dense families RL recipes start from besides Llama / Qwen3: Qwen2 / Qwen2.5 (biases on
q / k / v, none on o_proj; Qwen's optional sliding layers) and Mistral (every layer slides when
config.json sets a window). HF transformers on the same checkpoint is the oracle."""
from __future__ import annotations

import json

import pytest
import torch

import parallel_checks
from atom import RolloutEngine
from conftest import TINY_VOCAB
from helpers import hf_model, random_prompts
from test_families import ENGINE, GREEDY, assert_matches_hf, assert_trainer_update_restores_parity
from test_parallel import _spawn

# name -> (tiny arch, overrides); the prompts (up to 21 tokens) are longer than every window
FAMILIES = {
    "qwen2": ("qwen2", {}),
    "qwen2_sliding": ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}),
    "mistral": ("mistral", {}),
}


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def family(request, make_tiny_model):
    arch, overrides = FAMILIES[request.param]
    return request.param, make_tiny_model(arch, **overrides)


def test_checkpoint_has_what_makes_the_family(family):
    """The tiny checkpoints carry the feature under test (else parity would prove nothing)."""
    name, path = family
    hf = hf_model(path)
    names = {n for n, _ in hf.named_parameters()}
    if name.startswith("qwen2"):
        assert "model.layers.0.self_attn.q_proj.bias" in names and "model.layers.0.self_attn.o_proj.bias" not in names
    if name == "qwen2_sliding":
        assert hf.config.layer_types == ["full_attention", "sliding_attention"]
    if name == "mistral":
        assert hf.config.sliding_window == 6


def test_greedy_and_logprobs_match_hf_through_chunks_and_the_cache(family):
    """Prompts longer than the windows, prefilled in 24-token chunks, twice (the second time
    from the prefix cache): HF's greedy tokens and raw logprobs within 1e-4."""
    _, path = family
    engine = RolloutEngine(path, **ENGINE)
    prompts = random_prompts([7, 21, 40], TINY_VOCAB, seed=21)
    for _ in range(2):
        assert_matches_hf(hf_model(path), prompts, engine.generate(prompts, GREEDY))


def test_update_weights_from_trainer_restores_parity(family):
    """A trainer's named_parameters() (q/k/v biases included), shuffled: the changed model's tokens."""
    engine = assert_trainer_update_restores_parity(family[1], random_prompts([9, 20], TINY_VOCAB, seed=22), 1)
    with pytest.raises(ValueError, match="o_proj.bias"):  # Qwen2 / Mistral have none
        engine.update_weights([("model.layers.0.self_attn.o_proj.bias", torch.zeros(64))], partial=True)


def test_unknown_architecture_names_the_supported_ones(make_tiny_model, tmp_path):
    path = make_tiny_model("qwen2")
    cfg = json.loads(open(f"{path}/config.json").read())
    cfg["architectures"] = ["Qwen2MoeForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="Qwen2ForCausalLM"):
        RolloutEngine(str(tmp_path), device="cpu")


def test_qwen2_tp2_matches_one_process(make_tiny_model, tmp_path):
    """TP=2 over gloo: the q / k / v biases split with their heads; tokens identical to one
    process, logprobs within 1e-4; an update leaves each rank its shard."""
    path, updated = make_tiny_model("qwen2"), make_tiny_model("qwen2", seed=1)
    argv = ["--models", json.dumps({"qwen2": path}), "--update-models", json.dumps({"qwen2": updated}),
            "--out", str(tmp_path), "--atol", "1e-4", "--scenarios", "qwen2_tp2"]
    _spawn(parallel_checks.spawned_checks, (argv,))
    results = {r["scenario"]: r for r in json.loads((tmp_path / "rank0.json").read_text())}
    assert set(results) == {"qwen2_tp2"} and results["qwen2_tp2"]["weight_version"] == 1
