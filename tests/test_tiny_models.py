"""The tiny random models from conftest's make_tiny_model factory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_ARCHS, TINY_EOS, TINY_VOCAB


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_loads_with_healthy_logits(make_tiny_model, arch):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(arch)
    config = json.loads((Path(path) / "config.json").read_text())
    assert config["vocab_size"] == TINY_VOCAB and config["eos_token_id"] == TINY_EOS
    model = AutoModelForCausalLM.from_pretrained(path)
    assert next(model.parameters()).dtype == torch.float32

    ids = torch.randint(0, TINY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = model(ids).logits.softmax(-1)
    # Well above uniform (1/256): greedy decoding is not a coin toss on ties.
    assert probs.max(-1).values.mean() > 10 / TINY_VOCAB


def test_tiny_model_factory_is_deterministic_and_cached(make_tiny_model):
    from safetensors.torch import load_file

    a = make_tiny_model("llama", num_hidden_layers=1)
    assert make_tiny_model("llama", num_hidden_layers=1) == a
    b = make_tiny_model("llama", num_hidden_layers=1, seed=0, weight_std=0.2)
    assert b != a
    wa, wb = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads(Path(a, "config.json").read_text())["num_hidden_layers"] == 1


@pytest.mark.gpu
def test_gpu_marker_is_skipped_without_cuda():
    assert torch.cuda.is_available()
