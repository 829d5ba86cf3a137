"""Model classes by the HF `architectures` name in config.json."""
from __future__ import annotations

from atom.models.decoder import CausalLM, LlamaForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def model_class(architecture: str) -> type[CausalLM]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {architecture!r}; supported: {sorted(MODEL_REGISTRY)}") from None
