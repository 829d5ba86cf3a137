"""Issue 2, test 1: tokens and logprobs equal HF transformers (fp32) for Llama, Qwen3, Qwen3-MoE;
issue 17: Mixtral, GPT-OSS and DeepSeek-V3 on tiny configs that exercise each family's features."""
from __future__ import annotations

import pytest
import torch

from atom import RolloutEngine, SamplingParams
from conftest import TINY_VOCAB
from helpers import hf_greedy, hf_logits, random_prompts

MODELS = [
    ("llama", {}),
    ("qwen3", {}),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 32}}),
    ("qwen3_moe", {"num_experts_per_tok": 2, "norm_topk_prob": True}),
    ("qwen3_moe", {"num_experts_per_tok": 4, "norm_topk_prob": False}),
    ("qwen3_moe", {"num_experts_per_tok": 4, "norm_topk_prob": True, "num_experts": 6}),
    ("mixtral", {}),
    ("mixtral", {"sliding_window": 6}),  # every layer slides (HF Mixtral's sliding_window)
    ("gpt_oss", {}),  # sliding window 6 < prompts, sinks, swiglu_limit reached, YaRN, biases
    # MLA + q_lora, 4 groups (top 2), 2 dense-first layers, shared expert, YaRN with mscale
    ("deepseek_v3", {}),
    # q_lora off, non-interleaved RoPE, no renormalisation, 2 groups (top 1), 1 dense layer, plain RoPE
    ("deepseek_v3", {"q_lora_rank": None, "rope_interleave": False, "norm_topk_prob": False, "n_group": 2,
                     "topk_group": 1, "first_k_dense_replace": 1, "n_shared_experts": 2,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
]
IDS = ["llama", "qwen3", "llama-yarn", "moe-top2-norm", "moe-top4-nonorm", "moe-6x-top4-norm", "mixtral",
       "mixtral-sliding", "gpt-oss", "deepseek-v3", "deepseek-v3-no-qlora"]
# Lengths straddle the 16-token KV block; a 16-token step budget forces chunked prefill.
LENGTHS = [5, 16, 37]
MAX_NEW = 12


@pytest.fixture(scope="module", params=list(zip(IDS, MODELS)), ids=IDS)
def model(request, make_tiny_model):
    _, (arch, overrides) = request.param
    path = make_tiny_model(arch, **overrides)
    return path, RolloutEngine(path, max_num_batched_tokens=16, max_num_seqs=4)


def test_greedy_tokens_and_raw_logprobs_match_hf(model):
    path, engine = model
    prompts = random_prompts(LENGTHS, TINY_VOCAB, seed=1)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True,
                                                   logprobs=3, logprobs_mode="raw"))
    for prompt, out in zip(prompts, outs):
        done = out.outputs[0]
        assert done.token_ids == hf_greedy(path, prompt, MAX_NEW)
        assert done.finish_reason == "length" and len(done.logprobs) == MAX_NEW
        ref = hf_logits(path, prompt + done.token_ids).log_softmax(-1)[len(prompt) - 1:-1]
        want = ref.gather(-1, torch.tensor(done.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(done.logprobs), want, atol=1e-4, rtol=0)
        top_vals, top_ids = ref.topk(3, dim=-1)
        for step, alts in enumerate(done.top_logprobs):
            assert set(alts) == set(top_ids[step].tolist())
            for tok, lp in alts.items():
                assert abs(lp - ref[step, tok].item()) < 1e-4


def test_processed_logprobs_follow_temperature(model):
    path, engine = model
    prompts = random_prompts(LENGTHS, TINY_VOCAB, seed=2)
    outs = engine.generate(prompts, SamplingParams(temperature=0.7, max_tokens=MAX_NEW, ignore_eos=True,
                                                   logprobs=0, seed=5))
    for prompt, out in zip(prompts, outs):
        done = out.outputs[0]
        ref = (hf_logits(path, prompt + done.token_ids) / 0.7).log_softmax(-1)[len(prompt) - 1:-1]
        want = ref.gather(-1, torch.tensor(done.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(done.logprobs), want, atol=1e-4, rtol=0)
        assert done.top_logprobs == []


@pytest.mark.parametrize("mode", ["raw", "processed"])
def test_prompt_logprobs_match_hf(model, mode):
    path, engine = model
    prompts = random_prompts(LENGTHS, TINY_VOCAB, seed=3)
    outs = engine.generate(prompts, SamplingParams(temperature=0.7, max_tokens=2, prompt_logprobs=2,
                                                   logprobs_mode=mode))
    for prompt, out in zip(prompts, outs):
        logits = hf_logits(path, prompt)
        ref = (logits if mode == "raw" else logits / 0.7).log_softmax(-1)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for i in range(1, len(prompt)):
            entry = out.prompt_logprobs[i]
            assert abs(entry[prompt[i]] - ref[i - 1, prompt[i]].item()) < 1e-4
            top = ref[i - 1].topk(2).indices.tolist()
            assert set(top) <= set(entry) and len(entry) <= 3
