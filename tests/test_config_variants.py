"""Config variants real checkpoints use (Kimi / Moonlight routing, Llama-3 RoPE, dense-first
Qwen3-MoE, GPT-OSS layer patterns, ...), each on a tiny random model: fp32 greedy tokens, raw
logprobs and prompt logprobs equal HF transformers'; variants atom does not run fail at load
with a ValueError naming the field."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from atom import RolloutEngine, SamplingParams
from helpers import hf_logits, random_prompts

_YARN_V3 = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                mscale_all_dim=1.0, original_max_position_embeddings=8)  # DeepSeek-V3's (window shrunk)
_YARN_KIMI = dict(rope_type="yarn", rope_theta=50000.0, factor=32.0, beta_fast=1.0, beta_slow=1.0, mscale=1.0,
                  mscale_all_dim=1.0, original_max_position_embeddings=8)
_YARN_MSCALE = dict(rope_type="yarn", rope_theta=10000.0, factor=16.0, beta_fast=32.0, beta_slow=1.0,
                    mscale=0.707, mscale_all_dim=1.2, original_max_position_embeddings=16)
_PLAIN = dict(rope_type="default", rope_theta=10000.0)
_LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=16)
# original_max_position_embeddings large enough that truncating the correction range changes the ramp
_YARN_NO_TRUNCATE = dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
                         truncate=False, original_max_position_embeddings=4096)
_DS_4L = dict(num_hidden_layers=3)

VARIANTS: dict[str, tuple[str, dict]] = {
    # ---- DeepSeek-V3 (MLA) --------------------------------------------------------------------
    "ds-kimi": ("deepseek_v3", dict(n_group=1, topk_group=1, routed_scaling_factor=2.827, first_k_dense_replace=1,
                                    rope_parameters=_YARN_KIMI, **_DS_4L)),
    "ds-moonlight": ("deepseek_v3", dict(n_group=1, topk_group=1, routed_scaling_factor=2.446, q_lora_rank=None,
                                         first_k_dense_replace=1, rope_parameters=_PLAIN, **_DS_4L)),
    "ds-groups-8-3": ("deepseek_v3", dict(n_routed_experts=16, n_group=8, topk_group=3, num_experts_per_tok=4,
                                          first_k_dense_replace=0, **_DS_4L)),
    "ds-nonorm-scale1": ("deepseek_v3", dict(norm_topk_prob=False, routed_scaling_factor=1.0, **_DS_4L)),
    "ds-all-dense-but-last": ("deepseek_v3", dict(first_k_dense_replace=2, **_DS_4L)),
    "ds-no-shared": ("deepseek_v3", dict(n_shared_experts=0, first_k_dense_replace=0, **_DS_4L)),
    "ds-2-shared-v3-yarn": ("deepseek_v3", dict(n_shared_experts=2, rope_parameters=_YARN_V3, first_k_dense_replace=1,
                                                **_DS_4L)),
    "ds-mscale-differ": ("deepseek_v3", dict(rope_parameters=_YARN_MSCALE, rope_interleave=False, **_DS_4L)),
    "ds-dims-tied-bias": ("deepseek_v3", dict(qk_nope_head_dim=24, qk_rope_head_dim=4, head_dim=4, v_head_dim=12,
                                                  kv_lora_rank=24, q_lora_rank=20, tie_word_embeddings=True,
                                                  attention_bias=True, **_DS_4L)),
    # no q_lora with biases: q_proj (no bias in HF) and kv_a_proj_with_mqa (biased) stay two GEMMs
    "ds-no-qlora-bias": ("deepseek_v3", dict(q_lora_rank=None, attention_bias=True, n_group=2, topk_group=1,
                                             **_DS_4L)),
    # ---- Mixtral ------------------------------------------------------------------------------
    "mixtral-4x-top1-headdim": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=1, rope_theta=1e6,
                                                head_dim=24)),
    "mixtral-8x-top2-window-tied": ("mixtral", dict(sliding_window=5, tie_word_embeddings=True,
                                                    rope_parameters=dict(rope_type="default", rope_theta=500.0))),
    "mixtral-4x-top2-theta": ("mixtral", dict(num_local_experts=4, rope_parameters=dict(rope_type="default",
                                                                                         rope_theta=1e6))),
    # ---- GPT-OSS ------------------------------------------------------------------------------
    "gptoss-all-sliding": ("gpt_oss", dict(num_hidden_layers=2, layer_types=["sliding_attention"] * 2,
                                           sliding_window=4)),
    "gptoss-all-full-nobias": ("gpt_oss", dict(num_hidden_layers=2, layer_types=["full_attention"] * 2,
                                               attention_bias=False)),
    "gptoss-full-first-4x-top2": ("gpt_oss", dict(num_hidden_layers=3, sliding_window=8, num_local_experts=4,
                                                  layer_types=["full_attention", "sliding_attention",
                                                               "full_attention"],
                                                  rope_parameters=_YARN_NO_TRUNCATE)),
    "gptoss-default-types-truncate": ("gpt_oss", dict(
        num_hidden_layers=2, layer_types=None, head_dim=24, swiglu_limit=0.5,
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
                             truncate=True, original_max_position_embeddings=4096))),
    # ---- Qwen3-MoE ----------------------------------------------------------------------------
    "qwen3moe-sparse-step2": ("qwen3_moe", dict(num_hidden_layers=4, decoder_sparse_step=2)),
    "qwen3moe-mlp-only-nonorm": ("qwen3_moe", dict(num_hidden_layers=3, mlp_only_layers=[0, 2],
                                                   norm_topk_prob=False)),
    # ---- Llama --------------------------------------------------------------------------------
    "llama-llama3-rope": ("llama", dict(rope_parameters=_LLAMA3)),
    "llama-biases-headdim-tied": ("llama", dict(attention_bias=True, mlp_bias=True, head_dim=24,
                                                tie_word_embeddings=True)),
    "llama-linear-rope": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "llama-mqa-odd-vocab-eps": ("llama", dict(num_key_value_heads=1, vocab_size=250, rms_norm_eps=1e-5)),
    "qwen3-mha": ("qwen3", dict(num_key_value_heads=4)),
    "qwen3-bias-headdim": ("qwen3", dict(attention_bias=True, head_dim=8)),
    "qwen3-sliding-upper-layers": ("qwen3", dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=5,
                                                 max_window_layers=1)),
}

# config.json as the hub's checkpoints spell it (transformers < 5): rope_theta at the top, RoPE
# scaling in rope_scaling with "type", no layer_types (Qwen derives them from max_window_layers).
LEGACY: dict[str, tuple[str, dict]] = {
    "legacy-deepseek-v3-yarn": ("deepseek_v3", dict(rope_parameters=_YARN_V3, **_DS_4L)),
    "legacy-kimi-yarn": ("deepseek_v3", dict(rope_parameters=_YARN_KIMI, n_group=1, topk_group=1, **_DS_4L)),
    "legacy-llama3": ("llama", dict(rope_parameters=_LLAMA3)),
    "legacy-qwen3-sliding": ("qwen3", dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=5,
                                           max_window_layers=2)),
    "legacy-mixtral-window": ("mixtral", dict(sliding_window=5)),
}

LENGTHS = [5, 21]  # one prompt inside a KV block, one across two with chunked prefill (16-token steps)
MAX_NEW = 6


def _legacy_copy(path: str, dest) -> str:
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    if rope.pop("rope_type") != "default":
        cfg["rope_scaling"] = {"type": "yarn", **rope} if "beta_fast" in rope else {"rope_type": "llama3", **rope}
    cfg.pop("layer_types", None)
    shutil.copytree(path, dest)
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(dest)


@pytest.mark.parametrize("arch,overrides", list(VARIANTS.values()), ids=list(VARIANTS))
def test_variant_matches_hf(make_tiny_model, arch, overrides):
    _check_parity(make_tiny_model(arch, **overrides))


@pytest.mark.parametrize("arch,overrides", list(LEGACY.values()), ids=list(LEGACY))
def test_legacy_config_matches_hf(make_tiny_model, tmp_path, arch, overrides):
    _check_parity(_legacy_copy(make_tiny_model(arch, **overrides), tmp_path / "model"))


def _check_parity(path: str) -> None:
    engine = RolloutEngine(path, max_num_batched_tokens=16, max_num_seqs=4)
    with open(os.path.join(path, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    prompts = random_prompts(LENGTHS, vocab, seed=7)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=2,
                                                   logprobs_mode="raw", prompt_logprobs=1))
    for prompt, out in zip(prompts, outs):
        done = out.outputs[0]
        # One HF forward over prompt + generated: the greedy choice at every step (by induction the
        # same tokens HF's greedy decoding makes), the sampled logprobs and the prompt logprobs.
        ref = hf_logits(path, prompt + done.token_ids).log_softmax(-1)
        gen = ref[len(prompt) - 1:-1]
        assert done.token_ids == gen.argmax(-1).tolist()
        want = gen.gather(-1, torch.tensor(done.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(done.logprobs), want, atol=1e-4, rtol=0)
        for step, alts in enumerate(done.top_logprobs):
            assert set(alts) == set(gen[step].topk(2).indices.tolist())
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        got = torch.tensor([out.prompt_logprobs[i][prompt[i]] for i in range(1, len(prompt))])
        torch.testing.assert_close(got, ref[torch.arange(len(prompt) - 1), prompt[1:]], atol=1e-4, rtol=0)


# Variants atom does not run: a ValueError at load naming the field (config.json edited after saving).
UNSUPPORTED: dict[str, tuple[str, dict, str]] = {
    "llama-gelu": ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    "llama-dynamic-rope": ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
                           "dynamic"),
    "llama-longrope": ("llama", {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8,
                                                  "long_factor": [2.0] * 8}}, "longrope"),
    "llama-partial-rotary": ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                           "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    "llama3-missing-field": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
                             "low_freq_factor"),
    "ds-softmax-routing": ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func"),
    "ds-greedy-topk": ("deepseek_v3", {"topk_method": "greedy"}, "topk_method"),
    "qwen2-moe-shared-expert": ("qwen3_moe", {"architectures": ["Qwen2MoeForCausalLM"],
                                              "shared_expert_intermediate_size": 64}, "Qwen2MoeForCausalLM"),
    "qwen3-bad-max-window-layers": ("qwen3", {"use_sliding_window": True, "sliding_window": 4, "layer_types": None,
                                              "max_window_layers": "2"}, "max_window_layers"),
}


@pytest.mark.parametrize("arch,edits,field", list(UNSUPPORTED.values()), ids=list(UNSUPPORTED))
def test_unsupported_variant_is_a_clear_error(make_tiny_model, tmp_path, arch, edits, field):
    path = make_tiny_model(arch)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(edits)
    shutil.copytree(path, tmp_path / "model")
    with open(tmp_path / "model" / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=field):
        RolloutEngine(str(tmp_path / "model"))
