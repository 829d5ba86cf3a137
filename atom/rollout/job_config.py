"""Typed schema of a rollout job (`python -m atom.rollout`), registered with Hydra's ConfigStore.

The YAML files under the repo's `configs/` fill these dataclasses: `configs/rollout.yaml` lists
`rollout_schema` first in its defaults, so every group option and every command-line override is
checked against these types when Hydra composes the config. A misspelt key (`sampling.temprature=1`)
or a wrong type (`sampling.n=eight`) fails at start with Hydra's own message.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from atom.config import EngineConfig
from atom.rollout.schema import derive_schema
from atom.sampling_params import SamplingParams


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


SamplingConfig = derive_schema(
    SamplingParams, "SamplingConfig",
    """`atom.SamplingParams`, field for field (see atom/sampling_params.py for each field's meaning).

    Differences: `logprobs` defaults to 0 (a rollout job records every sampled token's logprob),
    `max_tokens` to 256, and `seed` is the job's base seed: prompt i gets its own seed derived from
    (seed, i), so results do not depend on chunking or resuming (null: derived from `engine.seed`).
    """, defaults={"max_tokens": 256, "logprobs": 0})

EngineJobConfig = derive_schema(
    EngineConfig, "EngineJobConfig",
    """`atom.EngineConfig`, field for field, but model/tokenizer (they come from `model`); see
    atom/config.py for each field's meaning.""", exclude=("model", "tokenizer"))


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
class RayJobConfig:
    """Run the job on engine replicas on a Ray cluster (`pip install 'atom[ray]'`); see atom/ray.

    num_replicas: 0 runs one engine in this process (no Ray); N > 0 shards the prompts over N
        replicas (each an engine of `engine.tensor_parallel_size` x ... ranks, one Ray actor each).
    address: null starts a local cluster; "auto" joins the running one (`ray start --head`);
        or a cluster address (host:port, ray://host:port).
    num_cpus: CPUs of a local cluster (null: Ray's default, every core).
    num_cpus_per_rank / num_gpus_per_rank / placement_strategy / max_restarts / shard_size:
        the `atom.ray.PoolConfig` fields of the same names.
    """

    num_replicas: int = 0
    address: Optional[str] = None
    num_cpus: Optional[int] = None
    num_cpus_per_rank: float = 1.0
    num_gpus_per_rank: Optional[float] = None
    placement_strategy: str = "PACK"
    max_restarts: int = 3
    shard_size: Optional[int] = None


@dataclass
class RolloutJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    engine: EngineJobConfig = field(default_factory=EngineJobConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayJobConfig = field(default_factory=RayJobConfig)


def register_configs() -> None:
    """Register the root schema `rollout_schema` (idempotent). Group options (model/, sampling/, ...)
    are merged into its typed nodes, so they are checked against ModelConfig, SamplingConfig, ..."""
    ConfigStore.instance().store(name="rollout_schema", node=RolloutJobConfig)


register_configs()
