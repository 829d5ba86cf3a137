"""Model classes by the HF `architectures` name in config.json."""
from __future__ import annotations

from atom.models.decoder import (CausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
                                 Qwen3ForCausalLM, Qwen3MoeForCausalLM)
from atom.models.deepseek_v3 import DeepseekV3ForCausalLM
from atom.models.gpt_oss import GptOssForCausalLM
from atom.models.mixtral import MixtralForCausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
}


def model_class(architecture: str) -> type[CausalLM]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {architecture!r}; supported: {sorted(MODEL_REGISTRY)}") from None
