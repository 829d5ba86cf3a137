"""What the offline `LLM` and the asynchronous `AsyncLLM` share: reading vLLM's prompt forms,
vLLM SamplingParams -> atom's for one prompt, atom's outputs -> vLLM's RequestOutput, and the
model's generation_config.json defaults."""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from atom.compat.vllm.outputs import RequestOutput, request_output
from atom.compat.vllm.sampling_params import SamplingParams
from atom.outputs import RolloutOutput
from atom.rollout.inputs import token_ids
from atom.sampling_params import SamplingParams as AtomSamplingParams

log = logging.getLogger(__name__)

# generation_config.json keys vLLM applies when generate() gets no SamplingParams.
_GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                        "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def as_list(prompts: Any) -> list:
    """vLLM's `prompts` argument as a list of prompts."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # one token-id prompt
    return prompts


def parse_prompt(p: Any, who: str = "generate") -> tuple[str | None, Any]:
    """(text shown in the output, token ids or None) of one vLLM prompt: a string,
    {"prompt": text}, {"prompt_token_ids": [...]} (TokensPrompt) or a list of token ids."""
    if isinstance(p, str):
        return p, None
    if isinstance(p, dict):
        extra = sorted(set(p) - {"prompt", "prompt_token_ids"})
        if extra:
            raise ValueError(f"{who}: prompt keys {extra} are not supported by atom (multi-modal data, "
                             "embeddings)")
        if "prompt_token_ids" in p:
            ids = p["prompt_token_ids"]
            as_ints = token_ids(ids)  # a tensor / numpy row: list() would give 0-d elements
            return p.get("prompt"), as_ints if as_ints is not None else list(ids)
        if "prompt" in p:
            return p["prompt"], None
        raise ValueError(f"{who}: a prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(p, (list, tuple)):
        return None, list(p)
    raise ValueError(f"{who}: a prompt is a string, a dict or a list of token ids, got {type(p).__name__}")


def atom_request(engine, text: str | None, ids: list[int] | None, sp: SamplingParams,
                 logprobs_mode: str) -> tuple[Any, AtomSamplingParams]:
    """(what the engine runs, atom's SamplingParams) for one parsed prompt. max_tokens=None is
    vLLM's "up to the context length"."""
    prompt = ids if ids is not None else text
    room = None
    if sp.max_tokens is None:
        room = engine.max_model_len - len(engine.tokenize(prompt))
    return prompt, sp.to_atom(logprobs_mode, room)


def vllm_output(out: RolloutOutput, request_id: str, text: str | None, sp: SamplingParams,
                decode: "TokenDecoder") -> RequestOutput:
    """atom's output for one request in vLLM's shape, as `sp` asks (logprobs, detokenize, ...)."""
    return request_output(out, request_id, text, sp.logprobs, sp.prompt_logprobs, decode,
                          sp.include_stop_str_in_output, sp.detokenize)


class TokenDecoder:
    """token id -> its text (cached), as vLLM's Logprob.decoded_token; None without a tokenizer."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str | None:
        if self._tokenizer is None:
            return None
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tokenizer.decode([token_id])
        return text


def default_sampling_params(model_dir: str) -> SamplingParams:
    """SamplingParams() with the model's generation_config.json defaults, as vLLM applies them
    (keys atom cannot honour are left out, with a warning)."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return SamplingParams()
    with open(path) as f:
        gen = json.load(f)
    defaults = {field: gen[key] for key, field in _GENERATION_DEFAULTS.items() if gen.get(key) is not None}
    try:
        return SamplingParams(**defaults)
    except ValueError as e:
        log.warning("generation_config.json defaults not applied: %s", e)
        return SamplingParams()
