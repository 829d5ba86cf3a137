"""Checkpoint loading: sharded safetensors with an index, and both config spellings transformers has used."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from atom import RolloutEngine, SamplingParams
from conftest import TINY_VOCAB, build_tiny_model
from helpers import random_prompts

SP = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)


def greedy(path: str, prompts):
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in RolloutEngine(path).generate(prompts, SP)]


def test_sharded_checkpoint_with_index_loads_the_same_weights(tmp_path, tiny_qwen3_moe_path):
    model = build_tiny_model("qwen3_moe")
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 3 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    prompts = random_prompts([12, 30], TINY_VOCAB, seed=40)
    assert greedy(str(tmp_path / "sharded"), prompts) == greedy(tiny_qwen3_moe_path, prompts)


def test_old_config_spellings(tmp_path, tiny_qwen3_moe_path):
    """num_experts (not num_local_experts) and a top-level rope_theta (not rope_parameters)."""
    old = tmp_path / "old"
    shutil.copytree(tiny_qwen3_moe_path, old)
    cfg = json.loads((old / "config.json").read_text())
    cfg["num_experts"] = cfg.pop("num_local_experts")
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg["rope_scaling"] = None
    (old / "config.json").write_text(json.dumps(cfg))
    prompts = random_prompts([12, 30], TINY_VOCAB, seed=41)
    assert greedy(str(old), prompts) == greedy(tiny_qwen3_moe_path, prompts)


def test_unsupported_rope_scaling_is_a_clear_error(tmp_path, tiny_llama_path):
    import pytest
    bad = Path(tmp_path / "bad")
    shutil.copytree(tiny_llama_path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope type 'longrope' is not supported"):
        RolloutEngine(str(bad))


def test_attention_bias_checkpoints_match_hf(make_tiny_model):
    """attention_bias puts biases on q, k, v and o (HF Llama / Qwen3)."""
    import torch

    from helpers import hf_greedy, hf_logits
    for arch in ("llama", "qwen3"):
        path = make_tiny_model(arch, attention_bias=True, weight_std=0.2)
        prompt = random_prompts([19], TINY_VOCAB, seed=42)[0]
        out = RolloutEngine(path).generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                                     logprobs=0, logprobs_mode="raw"))[0].outputs[0]
        assert out.token_ids == hf_greedy(path, prompt, 8)
        ref = hf_logits(path, prompt + out.token_ids).log_softmax(-1)[len(prompt) - 1:-1]
        want = ref.gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(out.logprobs), want, atol=1e-4, rtol=0)
