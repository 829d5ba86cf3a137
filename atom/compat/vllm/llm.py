"""vLLM's offline `LLM` class over atom's RolloutEngine."""
from __future__ import annotations

import itertools
import json
import logging
import os
from typing import Any, Callable, Sequence

from atom.compat.vllm.engine_args import engine_config
from atom.compat.vllm.outputs import RequestOutput, request_output
from atom.compat.vllm.sampling_params import SamplingParams
from atom.compat.vllm.worker import make_worker
from atom.rollout.engine import RolloutEngine

log = logging.getLogger(__name__)

# generation_config.json keys vLLM applies when generate() gets no SamplingParams.
_GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                        "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


class _ModelConfig:
    def __init__(self, engine: RolloutEngine) -> None:
        self.model = engine.config.model
        self.max_model_len = engine.max_model_len
        self.logprobs_mode = None


class _Executor:
    def __init__(self, worker) -> None:
        self.driver_worker = worker


class LLMEngine:
    """`llm.llm_engine`: the parts of vLLM's engine that frameworks reach into."""

    def __init__(self, engine: RolloutEngine, worker) -> None:
        self.model_config = _ModelConfig(engine)
        self.model_executor = _Executor(worker)
        self._rollout = engine

    def get_tokenizer(self):
        return self._rollout.tokenizer

    def reset_prefix_cache(self) -> bool:
        return self._rollout.reset_prefix_cache()


class LLM:
    """vLLM's `LLM`, generating with atom: change `from vllm import LLM, SamplingParams` to
    `from atom.compat.vllm import LLM, SamplingParams`.

    Arguments are vLLM's (model, dtype, seed, tensor_parallel_size, gpu_memory_utilization,
    max_model_len, max_num_seqs, max_num_batched_tokens, enable_prefix_caching, block_size,
    enable_sleep_mode, enforce_eager, logprobs_mode, worker_extension_cls, ...) plus any atom
    EngineConfig field (e.g. num_kv_blocks, device). Launch-time options atom has no use for
    (trust_remote_code, model_impl, distributed_executor_backend, ...) are accepted and do
    nothing; unsupported values (quantization, pipeline parallelism, ...) raise ValueError.
    `logprobs_mode`: "raw_logprobs" (vLLM's default) or "processed_logprobs".
    """

    def __init__(self, model: str, **kwargs: Any) -> None:
        config, opts = engine_config(model, kwargs)
        self.engine = RolloutEngine(config)
        self.logprobs_mode = opts.logprobs_mode
        self.llm_engine = LLMEngine(self.engine, make_worker(self.engine, opts.worker_extension_cls))
        self.llm_engine.model_config.logprobs_mode = {"raw": "raw_logprobs", "processed": "processed_logprobs"}[
            opts.logprobs_mode]
        self._ids = itertools.count()
        self._decoded: dict[int, str] = {}

    # ---- generation ----------------------------------------------------------------------
    def generate(self, prompts: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool | Callable = True, lora_request: Any = None, **kwargs: Any) -> list[RequestOutput]:
        """Completions for each prompt, in order. A prompt is a string, {"prompt": text},
        {"prompt_token_ids": [...]} or a list of token ids; `prompts` is one of those or a list."""
        if lora_request is not None:
            raise ValueError("generate: LoRA adapters are not supported by atom")
        unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in ("priority", "tokenization_kwargs"))
        if unknown:
            raise TypeError(f"generate: unsupported argument(s) {unknown}")
        items = [_parse_prompt(p) for p in _as_list(prompts)]
        return self._run(items, sampling_params, bool(use_tqdm))

    def chat(self, messages: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool | Callable = True, add_generation_prompt: bool = True, **kwargs: Any) -> list[RequestOutput]:
        """Completions for one conversation ([{"role", "content"}, ...]) or a list of them,
        rendered with the tokenizer's chat template."""
        if not add_generation_prompt:
            raise ValueError("chat: add_generation_prompt=False is not supported by atom")
        if kwargs.get("chat_template") is not None:
            raise ValueError("chat: a custom chat_template is not supported by atom (the tokenizer's is used)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.engine.tokenizer
        items = []
        for conv in conversations:
            ids = self.engine.tokenize(conv)
            items.append((tok.decode(ids) if tok is not None else None, ids))
        return self._run(items, sampling_params, bool(use_tqdm))

    def _run(self, items: list[tuple[str | None, Any]], sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = ([sampling_params] * len(items) if isinstance(sampling_params, SamplingParams)
                  else list(sampling_params))
        if len(params) != len(items):
            raise ValueError(f"generate: got {len(params)} SamplingParams for {len(items)} prompts")
        prompts, atom_params = [], []
        for (text, ids), sp in zip(items, params):
            prompt = ids if ids is not None else text
            room = None
            if sp.max_tokens is None:  # vLLM: up to the context length
                room = self.engine.max_model_len - len(self.engine.tokenize(prompt))
            prompts.append(prompt)
            atom_params.append(sp.to_atom(self.logprobs_mode, room))
        outs = self.engine.generate(prompts, atom_params, use_tqdm=use_tqdm)
        return [request_output(o, str(next(self._ids)), text, sp.logprobs, sp.prompt_logprobs, self._decode,
                               sp.include_stop_str_in_output, sp.detokenize)
                for o, (text, _), sp in zip(outs, items, params)]

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json defaults, as vLLM applies them
        (keys atom cannot honour are left out, with a warning)."""
        path = os.path.join(self.engine.config.model, "generation_config.json")
        if not os.path.isfile(path):
            return SamplingParams()
        with open(path) as f:
            gen = json.load(f)
        defaults = {}
        for key, field in _GENERATION_DEFAULTS.items():
            if gen.get(key) is not None:
                defaults[field] = gen[key]
        try:
            return SamplingParams(**defaults)
        except ValueError as e:
            log.warning("generation_config.json defaults not applied: %s", e)
            return SamplingParams()

    def _decode(self, token_id: int) -> str | None:
        tok = self.engine.tokenizer
        if tok is None:
            return None
        text = self._decoded.get(token_id)
        if text is None:
            text = self._decoded[token_id] = tok.decode([token_id])
        return text

    # ---- RL calls --------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        """Level 1: weights to host memory, KV cache dropped; level 2: both dropped."""
        self.engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore "weights" and/or "kv_cache" (default: all that sleeps)."""
        self.engine.wake_up(tags)

    def reset_prefix_cache(self, *args: Any) -> bool:
        return self.engine.reset_prefix_cache()

    def collective_rpc(self, method: str | Callable, timeout: float | None = None, args: tuple = (),
                       kwargs: dict | None = None) -> list[Any]:
        """Call a worker method (by name, or a function taking the worker first) on every worker:
        one here (an engine split over ranks has one per process). Returns the results as a list."""
        worker = self.llm_engine.model_executor.driver_worker
        kwargs = kwargs or {}
        if callable(method):
            return [method(worker, *args, **kwargs)]
        fn = getattr(worker, method, None)
        if fn is None or method.startswith("_"):
            raise AttributeError(f"collective_rpc: the worker has no method {method!r}")
        return [fn(*args, **kwargs)]

    def get_tokenizer(self):
        return self.engine.tokenizer


def _as_list(prompts: Any) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # one token-id prompt
    return prompts


def _parse_prompt(p: Any) -> tuple[str | None, Any]:
    """(text shown in the output, what the engine runs)."""
    if isinstance(p, str):
        return p, p
    if isinstance(p, dict):
        extra = sorted(set(p) - {"prompt", "prompt_token_ids"})
        if extra:
            raise ValueError(f"generate: prompt keys {extra} are not supported by atom (multi-modal data, "
                             "embeddings)")
        if "prompt_token_ids" in p:
            return p.get("prompt"), list(p["prompt_token_ids"])
        if "prompt" in p:
            return p["prompt"], p["prompt"]
        raise ValueError("generate: a prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(p, (list, tuple)):
        return None, list(p)
    raise ValueError(f"generate: a prompt is a string, a dict or a list of token ids, got {type(p).__name__}")
