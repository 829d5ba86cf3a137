"""The one typed configuration of an engine. Hydra configs (configs/) fill it; nothing reads env vars."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from atom.chat import ChatOptions

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    """Everything that shapes a `RolloutEngine`.

    model: path to a HF checkpoint directory (config.json + *.safetensors [+ tokenizer files]).
    tokenizer: tokenizer directory when it differs from `model` (None: same as model; "" or
        missing tokenizer files: the engine works on token ids only).
    dtype: "auto" (checkpoint's torch_dtype on GPU, float32 on CPU), "float32", "bfloat16", "float16".
    device: "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:N".
    max_model_len: longest prompt + completion (None: the model's max_position_embeddings, capped at 8192).
    max_num_seqs: sequences running at once.
    max_num_batched_tokens: tokens computed in one step (prefill chunks + decodes).
    kv_block_size: tokens per KV-cache block.
    num_kv_blocks: exact KV pool size in blocks (None: from the memory budget below).
    kv_cache_memory_bytes: KV pool budget on CPU, or on GPU when set (None: gpu_memory_utilization).
    gpu_memory_utilization: fraction of GPU memory the engine may use in all.
    enable_prefix_caching: share prompt KV blocks between requests.
    seed: seeds the per-request random streams of requests that bring no seed of their own.
    enforce_eager: on GPU, never capture CUDA graphs.
    cuda_graph_max_batch_size: largest decode batch captured in a graph (larger ones run eagerly).
    cuda_graphs_at_start: on GPU, capture every decode batch size's graph (compiling its kernels)
        when the engine starts, as vLLM does; False: each size on its first use (a faster start,
        slower first steps at each new batch size).
    op_backends: per-op backend overrides for debugging, e.g. {"fused_moe": "torch"}.
    tensor_parallel_size: ranks that split attention heads, dense MLPs and the vocabulary.
    expert_parallel_size: ranks that split the MoE experts (each holds num_experts / EP).
    ep_mode: "allreduce" (every rank runs the same requests; one engine group of max(TP, EP)
        ranks; MoE outputs summed by an all-reduce) or "alltoall" (EP ranks with TP = 1, each
        running its own share of the requests; tokens sent to their experts' ranks and back).
        TP = EP = 1 runs in this process alone. See atom/distributed and README.md (tensor and expert parallelism).
    dist_timeout_s: how long a rank waits for the others (start-up, any collective) before it
        raises instead of hanging.
    enable_sleep_mode: on CUDA, place weights and KV cache in CUDA virtual memory so that
        `RolloutEngine.sleep` really returns them to the driver while keeping their addresses
        (CUDA graphs stay valid); needs the cuda-python bindings. On CPU sleep always works.
    lazy_kv_wake: with sleep mode on CUDA, `wake_up` maps only the first chunk (1/16) of the KV
        pool and the rest as the scheduler first needs the blocks, so waking costs what the next
        rollouts use rather than the whole pool. The memory is then claimed during generate; if
        something else took it since the wake, the engine runs with the blocks it could back
        (fewer sequences at once). False: wake maps the whole pool.
    batch_invariant: a request's tokens and logprobs are bitwise identical whatever else is in the
        batch, wherever it sits, however its prompt was chunked or cached, and whether a token was
        computed in decode or in a prefill (so a trainer's one-forward recomputation can match).
        The registry takes every op from an implementation with the "batch_invariant" capability:
        on CPU atom/ops/invariant_ops.py (GEMMs on >= 4 rows, attention per query token; sets torch
        to one intra-op thread, process-wide: multithreaded BLAS splits its work by the batch's
        shape), on CUDA atom/ops/triton/invariant.py (fixed-tile GEMMs, fixed KV splits, CUDA
        graphs kept). Needs tensor_parallel_size = expert_parallel_size = 1; ops a family has no
        invariant implementation of raise ValueError when called.
    overlap_decode: pure decode steps through the static-buffer decode path, step N+1 queued before
        step N's tokens are read (atom/engine/cuda_graph.py). None: on a single GPU only. True on
        the CPU runs the same host logic without graphs (tests of the GPU path's bookkeeping).
    enable_return_routed_experts: record which experts every MoE layer chose for every token, so
        that requests with SamplingParams(return_routed_experts=True) get them back (vLLM's and
        SGLang's name). Costs a small device buffer and a copy per step; nothing when False.
    load_format: "auto" (read the checkpoint's safetensors) or "dummy" (random weights from
        config.json alone: benchmarks; `model` then needs only a config.json).
    cpu_threads: threads of a CPU engine (torch's intra-op threads, for the whole process):
        0 (default) the cores the machine's load leaves free (unless OMP_NUM_THREADS is set),
        n > 0 exactly n, -1 leave torch's setting. See atom/engine/cpu_threads.py.
    max_logprobs: the most logprobs / prompt_logprobs a request may ask for (vLLM's limit and
        default, 20); -1: no limit (whole-vocabulary logprobs=-1 needs it).
    chat_template_kwargs: template variables for every chat conversation this engine renders,
        e.g. {"enable_thinking": False} for Qwen3 (vLLM serve's --default-chat-template-kwargs;
        the compatible LLM.chat's own chat_template_kwargs override them key by key).
    """

    model: str = ""
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    kv_block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    seed: int = 0
    enforce_eager: bool = False
    cuda_graph_max_batch_size: int = 512
    cuda_graphs_at_start: bool = True
    op_backends: dict[str, str] = field(default_factory=dict)
    tensor_parallel_size: int = 1
    expert_parallel_size: int = 1
    ep_mode: str = "allreduce"
    dist_timeout_s: float = 600.0
    enable_sleep_mode: bool = False
    lazy_kv_wake: bool = True
    batch_invariant: bool = False
    overlap_decode: bool | None = None
    enable_return_routed_experts: bool = False
    load_format: str = "auto"
    cpu_threads: int = 0
    max_logprobs: int = 20
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("EngineConfig.model: a checkpoint directory is required")
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_block_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"EngineConfig.dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"EngineConfig.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"EngineConfig.num_kv_blocks must be >= 1 or None, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"EngineConfig.max_model_len must be >= 2 or None, got {self.max_model_len}")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < -1:
            raise ValueError(f"EngineConfig.max_logprobs must be -1 (no limit) or an int >= 0, got {self.max_logprobs!r}")
        if not isinstance(self.chat_template_kwargs, Mapping):
            raise ValueError(f"EngineConfig.chat_template_kwargs must be a dict, got {self.chat_template_kwargs!r}")
        self.chat_template_kwargs = dict(self.chat_template_kwargs)
        ChatOptions(chat_template_kwargs=self.chat_template_kwargs)  # ValueError naming a reserved key
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"EngineConfig.load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        for name in ("tensor_parallel_size", "expert_parallel_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.cpu_threads, int) or self.cpu_threads < -1:
            raise ValueError(f"EngineConfig.cpu_threads must be -1 (keep), 0 (auto) or a thread count, "
                             f"got {self.cpu_threads!r}")
        if not self.dist_timeout_s > 0:
            raise ValueError(f"EngineConfig.dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None and torch.version.hip is None
                   else "no CUDA device is visible")
            raise ValueError(f"EngineConfig.device={self.device!r}, but {why} (torch {torch.__version__}); install "
                             "a CUDA build of torch (README, Set-up) or use device='cpu' or 'auto'")
        if self.batch_invariant and (self.tensor_parallel_size > 1 or self.expert_parallel_size > 1):
            # The collectives' reduction order (NCCL picks ring or tree by message size) follows the batch.
            raise ValueError("EngineConfig.batch_invariant needs tensor_parallel_size = expert_parallel_size = 1")
        from atom.distributed.parallel_state import EngineLayout
        EngineLayout.build(self.tensor_parallel_size, self.expert_parallel_size, self.ep_mode)  # ValueError if invalid

    def replace(self, **overrides) -> "EngineConfig":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown EngineConfig field(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, checkpoint_dtype: str | None) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if self.torch_device().type == "cpu":
            return torch.float32
        return _DTYPES.get(checkpoint_dtype or "bfloat16", torch.bfloat16)
