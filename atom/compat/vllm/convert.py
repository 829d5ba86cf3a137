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


_EMPTY_PROMPT_EXTRAS = ("multi_modal_data", "mm_processor_kwargs", "multi_modal_uuids")


def parse_prompt(p: Any, who: str = "generate") -> tuple[str | None, Any]:
    """(text shown in the output, token ids or None) of one vLLM prompt: a string,
    {"prompt": text}, {"prompt_token_ids": [...]} (TokensPrompt) or a list of token ids."""
    if isinstance(p, str):
        return p, None
    if isinstance(p, dict):
        # Keys verl and others always pass, empty for a text-only model
        # (TokensPrompt(prompt_token_ids=ids, multi_modal_data={})): ignored when empty.
        extra = sorted(k for k in set(p) - {"prompt", "prompt_token_ids"}
                       if not (k in _EMPTY_PROMPT_EXTRAS and not p[k]))
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


def check_prompt(engine, text: str | None, ids: list[int] | None, label: str = "prompt") -> None:
    """vLLM's prompt checks, with its wording (its tests match on it): an empty prompt and a
    token id outside the vocabulary raise ValueError before anything runs (anything else the
    engine checks itself)."""
    if ids is None and text is not None and not text.strip() and engine.tokenizer is not None:
        ids = list(engine.tokenizer(text).input_ids)  # "" may still be [BOS], which vLLM runs
    if ids is None:
        return
    if len(ids) == 0:
        raise ValueError(f"Prompt cannot be empty ({label} has no tokens)")
    vocab = engine.vocab_size
    try:  # C-speed scans first: prompts are long
        inside = 0 <= min(ids) and max(ids) < vocab
    except TypeError:  # not numbers: the engine's TypeError names them
        return
    if not inside:
        bad = next(t for t in ids if not 0 <= t < vocab)
        raise ValueError(f"{label}: Token id {bad} is out of vocabulary [0, {vocab})")


def atom_request(engine, text: str | None, ids: list[int] | None, sp: SamplingParams,
                 logprobs_mode: str, label: str = "prompt") -> tuple[Any, AtomSamplingParams]:
    """(what the engine runs, atom's SamplingParams) for one parsed prompt. max_tokens=None is
    vLLM's "up to the context length": the engine ends a sequence at max_model_len anyway."""
    if not isinstance(sp, SamplingParams):
        raise TypeError(f"{label}: sampling_params must be atom.compat.vllm.SamplingParams, got {type(sp).__name__}")
    check_prompt(engine, text, ids, label)
    prompt = ids if ids is not None else text
    return prompt, sp.to_atom(logprobs_mode, engine.max_model_len if sp.max_tokens is None else None)


def vllm_output(out: RolloutOutput, request_id: str, text: str | None, sp: SamplingParams,
                decode: "TokenDecoder") -> RequestOutput:
    """atom's output for one request in vLLM's shape, as `sp` asks (logprobs, detokenize, ...)."""
    return request_output(out, request_id, text, sp.logprobs, sp.prompt_logprobs, decode, sp.detokenize)


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
