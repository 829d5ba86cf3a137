"""vLLM's engine arguments (`LLM(...)` keywords, `AsyncEngineArgs`) -> atom's EngineConfig."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from atom.config import EngineConfig

# vLLM's logprobs_mode -> atom's (the *_logits modes report the logits themselves, as vLLM's do)
_LOGPROBS_MODES = {"raw_logprobs": "raw", "processed_logprobs": "processed", "raw_logits": "raw_logits",
                   "processed_logits": "processed_logits"}
_DTYPES = {"auto": "auto", "float32": "float32", "float": "float32", "bfloat16": "bfloat16",
           "float16": "float16", "half": "float16"}
# vLLM names whose meaning atom has under another name.
_RENAMED = {"block_size": "kv_block_size"}
# Accepted and without effect here: how vLLM finds, builds or launches a model, which atom does
# one way (HF safetensors, its own decoder, in this process).
_NO_EFFECT = frozenset({
    "trust_remote_code", "model_impl", "distributed_executor_backend", "revision", "tokenizer_revision",
    "tokenizer_mode", "swap_space", "disable_custom_all_reduce", "disable_log_stats", "hf_token",
    "compilation_config", "max_seq_len_to_capture", "enable_chunked_prefill", "disable_async_output_proc",
    "allowed_local_media_path", "hf_overrides", "mm_processor_kwargs", "override_pooler_config",
    "worker_cls", "async_scheduling", "enable_prompt_embeds", "served_model_name", "download_dir",
    "enable_log_requests", "disable_log_requests", "enable_log_outputs", "stream_interval",
})
# Accepted only at their neutral value.
_NEUTRAL = {"quantization": None, "cpu_offload_gb": 0, "pipeline_parallel_size": 1, "data_parallel_size": 1,
            "kv_cache_dtype": "auto", "enable_lora": False, "speculative_config": None, "calculate_kv_scales": False}


@dataclasses.dataclass
class CompatOptions:
    """What the layer itself keeps of the arguments."""

    logprobs_mode: str = "raw"
    worker_extension_cls: Any = None
    skip_tokenizer_init: bool = False


def engine_config(model: str, kwargs: dict[str, Any], who: str = "LLM") -> tuple[EngineConfig, CompatOptions]:
    """Split vLLM's engine arguments into atom's EngineConfig and what this layer keeps.

    Every EngineConfig field may also be passed under its own name (e.g. num_kv_blocks).
    Unknown names: TypeError; unsupported values: ValueError naming them (`who` opens the message).
    """
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    config: dict[str, Any] = {}
    opts = CompatOptions()
    for name, value in kwargs.items():
        if name in _NO_EFFECT:
            continue
        if name in _NEUTRAL:
            if value != _NEUTRAL[name]:
                raise ValueError(f"{who}: {name}={value!r} is not supported by atom (only {_NEUTRAL[name]!r})")
            continue
        if name == "logprobs_mode":
            if value not in _LOGPROBS_MODES:
                raise ValueError(f"{who}: logprobs_mode={value!r} is not supported by atom; use one of "
                                 f"{sorted(_LOGPROBS_MODES)}")
            opts.logprobs_mode = _LOGPROBS_MODES[value]
        elif name == "worker_extension_cls":
            opts.worker_extension_cls = value
        elif name == "skip_tokenizer_init":
            opts.skip_tokenizer_init = bool(value)
        elif name == "dtype":
            config["dtype"] = _dtype(value)
        elif name == "enable_expert_parallel":
            if value:
                config["expert_parallel_size"] = kwargs.get("tensor_parallel_size", 1)
        elif name in _RENAMED:
            if value is not None:
                config[_RENAMED[name]] = value
        elif name in fields:
            if value is not None:  # vLLM's None means "the default"
                config[name] = value
        else:
            raise TypeError(f"{who} got an unexpected keyword argument {name!r} (atom maps vLLM's engine "
                            "arguments and every EngineConfig field)")
    if config.get("load_format") in ("safetensors", "hf"):
        config["load_format"] = "auto"
    if opts.skip_tokenizer_init:
        config["tokenizer"] = ""
    return EngineConfig(model=model, **config), opts


@dataclasses.dataclass
class VllmConfig:
    """What `AsyncEngineArgs.create_engine_config()` returns and `AsyncLLM.from_vllm_config` takes."""

    engine: EngineConfig
    options: CompatOptions


class AsyncEngineArgs:
    """vLLM's AsyncEngineArgs (also EngineArgs): `AsyncEngineArgs(model=..., **engine arguments)`,
    the same names `LLM(...)` takes (see engine_config). Checked when the engine is built
    (create_engine_config / AsyncLLM.from_engine_args), as vLLM checks them."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.model = model
        self.__dict__.update(kwargs)

    def create_engine_config(self, usage_context: Any = None, **_: Any) -> VllmConfig:
        kwargs = {k: v for k, v in vars(self).items() if k != "model"}
        if not self.model:
            raise ValueError("AsyncEngineArgs: model (a checkpoint directory) is required")
        return VllmConfig(*engine_config(self.model, kwargs, who="AsyncEngineArgs"))


def _dtype(value) -> str:
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    if value not in _DTYPES:
        raise ValueError(f"dtype={value!r} is not supported; use one of {sorted(_DTYPES)}")
    return _DTYPES[value]
