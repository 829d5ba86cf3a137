"""Read a HF config.json into the few typed fields our models use, accepting both spellings
transformers has used over time (num_experts / num_local_experts, rope_theta / rope_parameters)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from atom.models.config_checks import check_args, check_config


@dataclass
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False  # Llama: biases on gate / up / down
    torch_dtype: str | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # MoE (Qwen3-MoE)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    # RoPE scaling (rope_scaling / rope_parameters without rope_theta; None: plain RoPE), e.g. YaRN.
    rope_scaling: dict | None = None
    # Sliding-window attention (Mixtral, GPT-OSS): window in tokens, and each layer's type
    # ("sliding_attention" / "full_attention"; empty: every layer slides when a window is set).
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)
    # GPT-OSS experts: clamped SwiGLU.
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    # DeepSeek-V3: multi-head latent attention ...
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True
    # ... and its MoE: shared experts, group-limited sigmoid routing, dense first layers.
    n_shared_experts: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    num_nextn_predict_layers: int = 0

    def is_moe_layer(self, layer: int) -> bool:
        return (self.num_experts > 0 and layer not in self.mlp_only_layers and layer >= self.first_k_dense_replace
                and (layer + 1) % self.decoder_sparse_step == 0)

    def is_sliding_layer(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        return not self.layer_types or self.layer_types[layer] == "sliding_attention"


# rope_type -> the fields it needs (atom/models/layers/rotary.py computes its frequencies).
_ROPE_FIELDS = {"default": (), "linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                "yarn": ()}


def _rope_scaling(cfg: dict) -> dict | None:
    """The RoPE scaling parameters (rope_type "yarn": factor, original_max_position_embeddings,
    beta_fast, beta_slow, mscale, mscale_all_dim, attention_factor, truncate; "llama3": factor,
    low_freq_factor, high_freq_factor, original_max_position_embeddings; "linear": factor); None
    for plain RoPE."""
    params = dict(cfg.get("rope_parameters") or {})
    params.update(cfg.get("rope_scaling") or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in _ROPE_FIELDS:
        raise ValueError(f"rope type {rope_type!r} is not supported yet (supported: {list(_ROPE_FIELDS)})")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"rope partial_rotary_factor={params['partial_rotary_factor']!r} is not supported "
                         "(only 1.0: RoPE over the whole head)")
    missing = [k for k in _ROPE_FIELDS[rope_type] if params.get(k) is None]
    if missing:
        raise ValueError(f"rope type {rope_type!r} needs {missing} in rope_scaling / rope_parameters")
    if rope_type == "default":
        return None
    params["rope_type"] = rope_type
    params.pop("rope_theta", None)
    if rope_type == "yarn" and params.get("factor") is None and params.get("original_max_position_embeddings") is None:
        raise ValueError("rope type 'yarn' needs 'factor' or 'original_max_position_embeddings' in rope_scaling")
    return params


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise ValueError("config.json has neither rope_theta nor rope_parameters.rope_theta")
    return float(theta)


def _layer_types(cfg: dict) -> list[str]:
    """config.json's layer_types; Qwen configs without them (transformers < 5) slide only the
    layers from max_window_layers on, as transformers derives them."""
    types = cfg.get("layer_types")
    if types or not cfg.get("use_sliding_window") or cfg.get("sliding_window") is None:
        return list(types or [])
    first = cfg.get("max_window_layers")
    if first is None:
        return []
    if not isinstance(first, int) or isinstance(first, bool) or first < 0:
        raise ValueError(f"max_window_layers={first!r} must be an integer >= 0")
    layers = min(cfg["num_hidden_layers"], 1 << 16)  # an absurd count fails check_args, not here
    return ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]


def load_model_args(model_dir: str) -> ModelArgs:
    if not os.path.isdir(model_dir):
        what = "is a file, not a checkpoint directory" if os.path.exists(model_dir) else "no such directory"
        raise ValueError(f"model {model_dir!r}: {what}")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"no config.json in {model_dir!r}: not a HF checkpoint directory")
    with open(path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    check_config(cfg, path)
    archs = cfg.get("architectures") or []
    if len(archs) != 1:
        raise ValueError(f"{path}: expected exactly one entry in 'architectures', got {archs}")
    heads = cfg["num_attention_heads"]
    eos = cfg.get("eos_token_id")
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    num_experts = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts") or 0
    args = ModelArgs(
        architecture=archs[0],
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg.get("intermediate_size", 0),
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(cfg),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        eos_token_ids=eos_ids,
        num_experts=num_experts,
        num_experts_per_tok=cfg.get("num_experts_per_tok", 0),
        # Mixtral and GPT-OSS size their experts with intermediate_size.
        moe_intermediate_size=cfg.get("moe_intermediate_size") or (cfg.get("intermediate_size", 0) if num_experts else 0),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        decoder_sparse_step=cfg.get("decoder_sparse_step", 1) or 1,
        mlp_only_layers=list(cfg.get("mlp_only_layers") or []),
        rope_scaling=_rope_scaling(cfg),
        # Qwen configs carry a sliding_window that only use_sliding_window turns on.
        sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
        layer_types=_layer_types(cfg),
        swiglu_limit=cfg.get("swiglu_limit"),
        swiglu_alpha=cfg.get("swiglu_alpha", 1.702),
        q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=cfg.get("kv_lora_rank") or 0,
        qk_nope_head_dim=cfg.get("qk_nope_head_dim") or 0,
        qk_rope_head_dim=cfg.get("qk_rope_head_dim") or 0,
        v_head_dim=cfg.get("v_head_dim") or 0,
        rope_interleave=bool(cfg.get("rope_interleave", True)),
        n_shared_experts=cfg.get("n_shared_experts") or 0,
        n_group=cfg.get("n_group") or 1,
        topk_group=cfg.get("topk_group") or 1,
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        first_k_dense_replace=cfg.get("first_k_dense_replace") or 0,
        scoring_func=cfg.get("scoring_func") or ("sigmoid" if "n_routed_experts" in cfg else "softmax"),
        topk_method=cfg.get("topk_method") or ("noaux_tc" if "n_routed_experts" in cfg else "greedy"),
        num_nextn_predict_layers=cfg.get("num_nextn_predict_layers") or 0,
    )
    check_args(args, model_dir)
    return args
