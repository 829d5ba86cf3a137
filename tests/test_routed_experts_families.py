"""Routed-expert capture (return_routed_experts) for every MoE family atom runs besides Qwen3-MoE
(tests/test_routed_experts.py covers its paths): Mixtral, GPT-OSS and DeepSeek-V3 (groups,
dense-first layers so MoE layers != layers, q_lora on and off). The oracle is HF transformers'
own router modules on the same tokens in fp32: the indices they return (hooked, not recomputed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from atom import RolloutEngine, SamplingParams
from conftest import TINY_VOCAB
from helpers import hf_model, random_prompts

# name -> (tiny arch, config overrides, MoE layers); the overrides of tests/test_families.py plus
# a DeepSeek with one dense-first layer of three (MoE layers 1 and 2) and groups of 4 experts.
FAMILIES = {
    "mixtral": ("mixtral", {}, 2),
    "gpt_oss": ("gpt_oss", {}, 4),
    "deepseek_v3": ("deepseek_v3", {}, 2),
    "deepseek_v3_no_qlora": ("deepseek_v3", {"q_lora_rank": None, "n_group": 2, "topk_group": 1,
                                             "num_hidden_layers": 3, "first_k_dense_replace": 1}, 2),
}
# HF's router classes (transformers >= 5): forward returns (logits, weights, indices).
HF_ROUTERS = ("MixtralTopKRouter", "GptOssTopKRouter", "DeepseekV3TopkRouter")
TOP_K = 2


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def family(request, make_tiny_model):
    arch, overrides, moe_layers = FAMILIES[request.param]
    return request.param, make_tiny_model(arch, **overrides), moe_layers


@torch.no_grad()
def hf_picks(model, token_ids: list[int]) -> np.ndarray:
    """[len - 1, moe_layers, top_k] experts HF's routers return for positions [0, len - 1), sorted."""
    picks = []
    routers = [m for m in model.modules() if type(m).__name__ in HF_ROUTERS]
    hooks = [r.register_forward_hook(lambda mod, args, out: picks.append(out[2])) for r in routers]
    try:
        model(torch.tensor([token_ids]))
    finally:
        for h in hooks:
            h.remove()
    assert len(picks) == len(routers)
    return np.sort(torch.stack(picks, 1).numpy()[: len(token_ids) - 1], axis=-1)


@pytest.mark.parametrize("overlap", [False, True], ids=["eager", "overlapped"])
def test_capture_equals_hf_routers(family, overlap):
    """Prompt and completion positions, chunked prefill (8-token chunks), n=2 sharing the prompt;
    the plain step loop and the overlapped static-buffer decode path (the GPU's, run on the CPU)."""
    name, path, moe_layers = family
    engine = RolloutEngine(path, device="cpu", num_kv_blocks=64, max_model_len=128, max_num_batched_tokens=8,
                           enable_return_routed_experts=True, overlap_decode=overlap)
    prompts = random_prompts([19, 6], TINY_VOCAB, seed=21)
    sp = SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=10, ignore_eos=True, return_routed_experts=True)
    model = hf_model(path)
    for out in engine.generate(prompts, sp):
        for c in out.outputs:
            ids = out.prompt_token_ids + c.token_ids
            r = c.routed_experts
            assert r is not None and r.shape == (len(ids) - 1, moe_layers, TOP_K)
            np.testing.assert_array_equal(np.sort(r, axis=-1), hf_picks(model, ids))
    assert engine.stats.overlapped_steps > 0 if overlap else engine.stats.overlapped_steps == 0
