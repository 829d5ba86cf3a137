"""Typed schema of a rollout job (`python -m atom.rollout`), registered with Hydra's ConfigStore.

The YAML files under the repo's `configs/` fill these dataclasses: `configs/rollout.yaml` lists
`rollout_schema` first in its defaults, so every group option and every command-line override is
checked against these types when Hydra composes the config. A misspelt key (`sampling.temprature=1`)
or a wrong type (`sampling.n=eight`) fails at start with Hydra's own message.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class ModelConfig:
    """Which checkpoint to roll out.

    name: a label (the `model/` option name); `smollm2_135m` with no path uses the embedded default.
    path: HF checkpoint directory (config.json + *.safetensors [+ tokenizer]); null only for smollm2_135m.
    tokenizer: tokenizer directory when it differs from `path` (null: same as path).
    """

    name: str = "smollm2_135m"
    path: Optional[str] = None
    tokenizer: Optional[str] = None


@dataclass
class SamplingConfig:
    """Mirrors `atom.SamplingParams` (see atom/sampling_params.py for each field's meaning).

    Differences: `logprobs` defaults to 0 (a rollout job records every sampled token's logprob), and
    `seed` is the job's base seed: prompt i gets its own seed derived from (seed, i), so results do
    not depend on chunking or resuming (null: derived from `engine.seed`).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: Optional[int] = 256
    min_tokens: int = 0
    stop: List[str] = field(default_factory=list)
    stop_token_ids: List[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: Optional[int] = None
    logprobs: Optional[int] = 0
    logprobs_mode: str = "processed"
    prompt_logprobs: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Optional[Dict[int, float]] = None
    allowed_token_ids: Optional[List[int]] = None
    bad_words: List[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    truncate_prompt_tokens: Optional[int] = None


@dataclass
class EngineJobConfig:
    """The `atom.EngineConfig` fields a job sets (model/tokenizer come from `model`); see
    atom/config.py for each field's meaning."""

    device: str = "auto"
    dtype: str = "auto"
    max_model_len: Optional[int] = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    kv_block_size: int = 16
    num_kv_blocks: Optional[int] = None
    kv_cache_memory_bytes: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    cuda_graph_max_batch_size: int = 512
    seed: int = 0
    op_backends: Dict[str, str] = field(default_factory=dict)
    tensor_parallel_size: int = 1
    expert_parallel_size: int = 1
    ep_mode: str = "allreduce"
    dist_timeout_s: float = 600.0
    load_format: str = "auto"
    max_logprobs: int = 20


@dataclass
class DataConfig:
    """Where the prompts come from.

    path: a .jsonl or .parquet file (null: the packaged atom/rollout/data/default_prompts.jsonl).
    format: auto (from the file extension), jsonl or parquet.
    Each row holds one prompt, looked up in this order (set a key to null to disable it):
      messages_key: a chat conversation, a list of {"role", "content"} (chat template applied);
      prompt_key: a plain text prompt (or a list of token ids);
      token_ids_key: a list of token ids.
    batch_size: prompts per engine call; results are appended and fsync'ed after each batch.
    limit: only the first `limit` prompts (null: all).
    """

    path: Optional[str] = None
    format: str = "auto"
    prompt_key: Optional[str] = "prompt"
    messages_key: Optional[str] = "messages"
    token_ids_key: Optional[str] = "prompt_token_ids"
    batch_size: int = 64
    limit: Optional[int] = None


@dataclass
class OutputConfig:
    """Where results go.

    path: the results JSONL (null: `rollouts.jsonl` in Hydra's run directory).
    resume: skip prompts already in the results file (false: start the file anew).
    progress: show a tqdm progress bar.
    """

    path: Optional[str] = None
    resume: bool = True
    progress: bool = True


@dataclass
class RolloutJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    engine: EngineJobConfig = field(default_factory=EngineJobConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def register_configs() -> None:
    """Register the root schema `rollout_schema` (idempotent). Group options (model/, sampling/, ...)
    are merged into its typed nodes, so they are checked against ModelConfig, SamplingConfig, ..."""
    ConfigStore.instance().store(name="rollout_schema", node=RolloutJobConfig)


register_configs()
