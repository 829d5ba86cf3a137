"""vLLM's offline `LLM` class over atom's RolloutEngine."""
from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

from atom.chat import ChatOptions, render_chat
from atom.compat.vllm.convert import (TokenDecoder, as_list, atom_request, default_sampling_params, parse_prompt,
                                      vllm_output)
from atom.compat.vllm.engine_args import engine_config
from atom.compat.vllm.outputs import RequestOutput
from atom.compat.vllm.sampling_params import SamplingParams
from atom.compat.vllm.worker import call_worker, make_worker
from atom.rollout.engine import RolloutEngine


class ModelConfig:
    """The parts of vLLM's model_config that frameworks read."""

    def __init__(self, engine: RolloutEngine, logprobs_mode: str) -> None:
        self.model = engine.config.model
        self.max_model_len = engine.max_model_len
        self.max_logprobs = engine.config.max_logprobs
        self.logprobs_mode = {"raw": "raw_logprobs", "processed": "processed_logprobs"}.get(logprobs_mode, logprobs_mode)
        self._vocab_size = engine.vocab_size

    def get_vocab_size(self) -> int:
        """The model's vocabulary size (logprobs=-1 returns this many per position)."""
        return self._vocab_size


class _Executor:
    def __init__(self, worker) -> None:
        self.driver_worker = worker


class LLMEngine:
    """`llm.llm_engine`: the parts of vLLM's engine that frameworks reach into."""

    def __init__(self, engine: RolloutEngine, worker, logprobs_mode: str) -> None:
        self.model_config = ModelConfig(engine, logprobs_mode)
        self.model_executor = _Executor(worker)
        self._rollout = engine

    def get_tokenizer(self):
        return self._rollout.tokenizer

    def get_model_config(self) -> ModelConfig:
        return self.model_config

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        return self._rollout.reset_prefix_cache(reset_running_requests)


class LLM:
    """vLLM's `LLM`, generating with atom: change `from vllm import LLM, SamplingParams` to
    `from atom.compat.vllm import LLM, SamplingParams`.

    Arguments are vLLM's (model, dtype, seed, tensor_parallel_size, gpu_memory_utilization,
    max_model_len, max_num_seqs, max_num_batched_tokens, enable_prefix_caching, block_size,
    enable_sleep_mode, enforce_eager, logprobs_mode, worker_extension_cls, ...) plus any atom
    EngineConfig field (e.g. num_kv_blocks, device). Launch-time options atom has no use for
    (trust_remote_code, model_impl, distributed_executor_backend, ...) are accepted and do
    nothing; unsupported values (quantization, pipeline parallelism, ...) raise ValueError.
    `logprobs_mode`: "raw_logprobs" (vLLM's default), "processed_logprobs", or "raw_logits" /
    "processed_logits" (the logits themselves at those two points).
    """

    def __init__(self, model: str, **kwargs: Any) -> None:
        config, opts = engine_config(model, kwargs)
        self.engine = RolloutEngine(config)
        self.logprobs_mode = opts.logprobs_mode
        self.llm_engine = LLMEngine(self.engine, make_worker(self.engine, opts.worker_extension_cls),
                                    opts.logprobs_mode)
        self._ids = itertools.count()
        self._decode = TokenDecoder(self.engine.tokenizer)

    # ---- generation ----------------------------------------------------------------------
    def generate(self, prompts: Any = None, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool | Callable = True, lora_request: Any = None, *,
                 prompt_token_ids: Any = None, **kwargs: Any) -> list[RequestOutput]:
        """Completions for each prompt, in order. A prompt is a string, {"prompt": text},
        {"prompt_token_ids": [...]} or a list of token ids; `prompts` is one of those or a list.
        `prompt_token_ids` (vLLM <= 0.10's keyword: one list of ids or a list of them) stands for
        `prompts` when that is not given. `priority`: 0 for every prompt (one value or one per prompt)."""
        if lora_request is not None:
            raise ValueError("generate: LoRA adapters are not supported by atom")
        unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in ("priority", "tokenization_kwargs"))
        if unknown:
            raise TypeError(f"generate: unsupported argument(s) {unknown}")
        items = [parse_prompt(p) for p in as_list(_legacy_prompts(prompts, prompt_token_ids))]
        _check_priority(kwargs.get("priority"), len(items))
        return self._run(items, sampling_params, bool(use_tqdm))

    def chat(self, messages: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool | Callable = True, lora_request: Any = None, chat_template: str | None = None,
             chat_template_content_format: str = "auto", add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None, mm_processor_kwargs: Any = None,
             **kwargs: Any) -> list[RequestOutput]:
        """Completions for one conversation ([{"role", "content"}, ...]) or a list of them,
        rendered as vLLM renders them (atom/chat.py): the tokenizer's chat template or
        `chat_template`, with `tools`, `chat_template_kwargs` (e.g. {"enable_thinking": False}),
        and the generation prompt or the final (assistant) message continued.
        `chat_template_content_format`: "auto" (from the template, as vLLM), "string" or "openai".
        `RequestOutput.prompt` is the rendered text. Every conversation is rendered before any
        is generated, so a bad one fails the call with nothing run."""
        if lora_request is not None:
            raise ValueError("chat: LoRA adapters are not supported by atom")
        if mm_processor_kwargs is not None:
            raise ValueError("chat: mm_processor_kwargs: multi-modal input is not supported by atom")
        unknown = sorted(k for k, v in kwargs.items() if v is not None)
        if unknown:
            raise TypeError(f"chat: unsupported argument(s) {unknown}")
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise TypeError(f"chat: chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
        options = ChatOptions(chat_template, add_generation_prompt, continue_final_message, tools,
                              {**self.engine.config.chat_template_kwargs, **(chat_template_kwargs or {})},
                              chat_template_content_format)
        tok = self.engine.tokenizer
        items = []
        for i, conv in enumerate(_conversations(messages)):
            text = render_chat(tok, conv, f"conversation {i}", options)
            # (add_special_tokens=False: the template wrote them; vLLM's "no double BOS")
            items.append((text, list(tok(text, add_special_tokens=False).input_ids)))
        return self._run(items, sampling_params, bool(use_tqdm))

    def _run(self, items: list[tuple[str | None, Any]], sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(items)
        elif isinstance(sampling_params, (list, tuple)):
            params = list(sampling_params)
        else:
            raise TypeError(f"generate: sampling_params must be a SamplingParams, a list of them or None, got "
                            f"{type(sampling_params).__name__}")
        if len(params) != len(items):
            raise ValueError(f"generate: got {len(params)} SamplingParams for {len(items)} prompts")
        if not items:
            return []
        prompts, atom_params = zip(*(atom_request(self.engine, text, ids, sp, self.logprobs_mode, f"prompt {i}")
                                     for i, ((text, ids), sp) in enumerate(zip(items, params))))
        outs = self.engine.generate(list(prompts), list(atom_params), use_tqdm=use_tqdm)
        return [vllm_output(o, str(next(self._ids)), text, sp, self._decode)
                for o, (text, _), sp in zip(outs, items, params)]

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json defaults, as vLLM applies them
        (keys atom cannot honour are left out, with a warning)."""
        return default_sampling_params(self.engine.config.model)

    # ---- RL calls --------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        """Level 1: weights to host memory, KV cache dropped; level 2: both dropped."""
        self.engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore "weights" and/or "kv_cache" (default: all that sleeps)."""
        self.engine.wake_up(tags)

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        """Forget cached prompt prefixes (see RolloutEngine.reset_prefix_cache); reset_connector:
        atom has no KV connector."""
        return self.engine.reset_prefix_cache(reset_running_requests)

    def collective_rpc(self, method: str | Callable, timeout: float | None = None, args: tuple = (),
                       kwargs: dict | None = None) -> list[Any]:
        """Call a worker method (by name, or a function taking the worker first) on every worker:
        one here (an engine split over ranks has one per process). Returns the results as a list."""
        return [call_worker(self.llm_engine.model_executor.driver_worker, method, args, kwargs)]

    def get_tokenizer(self):
        return self.engine.tokenizer


def _legacy_prompts(prompts: Any, prompt_token_ids: Any) -> Any:
    """`prompts`, or vLLM <= 0.10's `prompt_token_ids` keyword in its place."""
    if prompt_token_ids is None:
        if prompts is None:
            raise TypeError("generate: prompts is required")
        return prompts
    if prompts is not None:
        raise ValueError("generate: pass either prompts or prompt_token_ids, not both")
    ids = list(prompt_token_ids)
    if ids and all(hasattr(t, "__len__") for t in ids):  # a list of prompts (lists, arrays)
        return [{"prompt_token_ids": one} for one in ids]
    return [{"prompt_token_ids": ids}]


def _conversations(messages: Any) -> list[Any]:
    """`messages` as a list of conversations: vLLM takes one conversation (a list of message
    dicts) or a list of them; an empty list is no conversation at all."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"chat: messages must be a list of message dicts or a list of such lists, got "
                        f"{type(messages).__name__}")
    if messages and isinstance(messages[0], (list, tuple)):
        return list(messages)
    return [messages] if messages else []


def _check_priority(priority: Any, count: int) -> None:
    """vLLM's rules for `priority` (one value, or one per prompt), and atom's: only 0, since atom
    schedules first come, first served (vLLM too refuses others unless its scheduler runs the
    priority policy)."""
    if priority is None:
        return
    values = list(priority) if isinstance(priority, (list, tuple)) else [priority]
    if isinstance(priority, (list, tuple)) and len(values) != count:
        raise ValueError(f"generate: got {len(values)} priorities for {count} prompts (priority is one value or "
                         "one per prompt)")
    if any(p != 0 for p in values):
        raise ValueError(f"generate: priority={priority!r}: atom schedules first come, first served "
                         "(leave priority at 0)")
