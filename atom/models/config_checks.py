"""Checks of a HF config.json before a model is built from it: every field the models read is
present (or has a default) and has a sane type and range, and the sizes it gives are not larger
than the checkpoint next to it, so a wrong or hand-edited config fails with a ValueError naming
the field instead of a KeyError, or an allocation of a model that cannot exist."""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

_REQUIRED_POSITIVE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
_OPTIONAL_POSITIVE = ("num_key_value_heads", "head_dim", "max_position_embeddings", "num_experts_per_tok",
                      "moe_intermediate_size", "decoder_sparse_step", "num_experts", "num_local_experts",
                      "intermediate_size",
                      # issue-17 families: sliding windows (Mixtral, GPT-OSS), MLA and routing (DeepSeek-V3)
                      "sliding_window", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                      "v_head_dim", "n_routed_experts", "n_shared_experts", "n_group", "topk_group",
                      "first_k_dense_replace", "num_nextn_predict_layers")
_LAYER_TYPES = ("full_attention", "sliding_attention")
_ACTIVATIONS = ("silu", "swish")  # the gated MLPs' activation (GPT-OSS's clamped SwiGLU ignores the field)
_OPTIONAL_REAL = ("rms_norm_eps", "rope_theta")
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a file's JSON header


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_config(cfg: Any, path: str) -> None:
    """ValueError naming the first field of config.json the models cannot use."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    for key in _REQUIRED_POSITIVE:
        if key not in cfg or cfg[key] is None:
            raise ValueError(f"{path}: {key!r} is missing (required for a decoder model)")
    for key in (*_REQUIRED_POSITIVE, *_OPTIONAL_POSITIVE):
        value = cfg.get(key)
        # 0 means "none" for the MoE counts and a dense model's sizes: the model checks below catch misuse.
        low = 1 if key in _REQUIRED_POSITIVE else 0
        if value is not None and (not _is_int(value) or value < low):
            raise ValueError(f"{path}: {key}={value!r} must be an integer >= {low}")
    for key in _OPTIONAL_REAL:
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < math.inf):
            raise ValueError(f"{path}: {key}={value!r} must be a positive finite number")
    eos = cfg.get("eos_token_id")
    if eos is not None and not _is_int(eos) and not (isinstance(eos, list) and all(_is_int(t) for t in eos)):
        raise ValueError(f"{path}: eos_token_id={eos!r} must be an integer or a list of integers")
    act = cfg.get("hidden_act")
    if act is not None and act not in _ACTIVATIONS:
        raise ValueError(f"{path}: hidden_act={act!r} is not supported (the MLPs are SwiGLU: {list(_ACTIVATIONS)})")
    types = cfg.get("layer_types")
    if types is not None and not (isinstance(types, list) and all(t in _LAYER_TYPES for t in types)):
        raise ValueError(f"{path}: layer_types must be a list of {list(_LAYER_TYPES)}, got {types!r}")
    layers = cfg.get("mlp_only_layers")
    if layers is not None and not (isinstance(layers, list) and all(_is_int(x) for x in layers)):
        raise ValueError(f"{path}: mlp_only_layers={layers!r} must be a list of layer indices")


def check_args(args, model_dir: str) -> None:
    """(args: the ModelArgs read from it.) Consistency of the fields read, then the sizes against the checkpoint's tensors."""
    where = os.path.join(model_dir, "config.json")
    if args.num_attention_heads % args.num_key_value_heads:
        raise ValueError(f"{where}: num_attention_heads={args.num_attention_heads} is not a multiple of "
                         f"num_key_value_heads={args.num_key_value_heads}")
    kinds = {args.is_moe_layer(layer) for layer in range(min(args.num_hidden_layers, 1 << 16))}
    if False in kinds and args.intermediate_size < 1:
        raise ValueError(f"{where}: intermediate_size={args.intermediate_size} must be >= 1 for the dense MLP layers")
    if True in kinds:
        if args.moe_intermediate_size < 1:
            raise ValueError(f"{where}: moe_intermediate_size={args.moe_intermediate_size} must be >= 1 "
                             "for the MoE layers")
        if not 1 <= args.num_experts_per_tok <= args.num_experts:
            raise ValueError(f"{where}: num_experts_per_tok={args.num_experts_per_tok} must be in "
                             f"[1, num_experts={args.num_experts}]")
    held = checkpoint_numel(model_dir)
    needed = min_parameters(args)
    if held is not None and needed > held:
        raise ValueError(f"{where}: describes a model of at least {needed:,} parameters (vocab_size="
                         f"{args.vocab_size}, hidden_size={args.hidden_size}, num_hidden_layers="
                         f"{args.num_hidden_layers}, intermediate_size={args.intermediate_size}), but the "
                         f"checkpoint holds {held:,}: the config does not describe these weights")
    if args.layer_types and len(args.layer_types) != args.num_hidden_layers:
        raise ValueError(f"{where}: layer_types lists {len(args.layer_types)} layers, num_hidden_layers="
                         f"{args.num_hidden_layers}")


def min_parameters(args) -> int:
    """A lower bound on the parameters any decoder with this config has: the embedding, one norm
    per layer, and each layer's MLP (two of its matrices; a MoE layer counted as the smaller of
    its experts and a dense MLP, so that the bound holds whichever way a family splits layers)."""
    dense = 2 * args.hidden_size * args.intermediate_size
    moe = 2 * args.num_experts * args.hidden_size * args.moe_intermediate_size
    mlp = dense if args.num_experts == 0 else min(dense, moe)
    return args.vocab_size * args.hidden_size + args.num_hidden_layers * (args.hidden_size + mlp)


def checkpoint_numel(model_dir: str) -> int | None:
    """Elements in the checkpoint's safetensors files, from their headers alone (None: there are
    none, as for load_format="dummy")."""
    from atom.models.weights import checkpoint_files  # weights imports the model layers
    try:
        files = checkpoint_files(model_dir)
    except ValueError:
        if os.path.isfile(os.path.join(model_dir, "model.safetensors.index.json")):
            raise
        return None
    total = 0
    for path in files:
        total += _header_numel(path)
    return total


def _header_numel(path: str) -> int:
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > _MAX_HEADER_BYTES:
                raise ValueError("header too large")
            header = json.loads(f.read(size))
        return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    except FileNotFoundError:
        raise ValueError(f"checkpoint file {path!r} (named in the index) does not exist") from None
    except (ValueError, struct.error, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
