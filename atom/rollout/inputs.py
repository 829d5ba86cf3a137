"""The shape of what `RolloutEngine.generate` is given, checked before anything else looks at it.

Wrong types raise TypeError naming what was expected (as vLLM does); wrong values are left to
the per-prompt checks (ValueError naming the prompt). A token-id prompt may also be a 1-D integer
numpy array or torch tensor, or a list of numpy integers: trainers hold their ids so.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from atom.sampling_params import SamplingParams

_PROMPT_KINDS = "a string, a list of token ids or a chat conversation ([{'role': ..., 'content': ...}, ...])"


def _is_chat(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def normalize_prompts(prompts: Any) -> list:
    """One prompt or a list of prompts -> a list of prompts (each checked later, one by one)."""
    if isinstance(prompts, str) or _is_chat(prompts):
        return [prompts]
    if isinstance(prompts, (np.ndarray, torch.Tensor)):  # as a flat list of ids is: no guessing
        raise TypeError(f"generate: prompts as a {prompts.ndim}-D {type(prompts).__name__}: pass a list of "
                        "prompts, each a 1-D token-id array or list ([ids] for one; a padded 2-D batch "
                        "would generate from its padding)")
    if isinstance(prompts, (bytes, bytearray, dict)) or not _iterable(prompts):
        raise TypeError(f"generate: prompts must be a prompt ({_PROMPT_KINDS}) or a list of prompts, "
                        f"got {type(prompts).__name__}")
    return list(prompts)


def token_ids(prompt: Any) -> list[int] | None:
    """A token-id prompt as a new list of Python ints: a list or tuple of ints (numpy integers
    too: what `list(array)` gives), or a 1-D integer numpy array or torch tensor; None for
    anything else (bools are not token ids)."""
    if isinstance(prompt, torch.Tensor):
        ok = prompt.ndim == 1 and not prompt.dtype.is_floating_point and not prompt.dtype.is_complex \
            and prompt.dtype != torch.bool
        return prompt.tolist() if ok else None
    if isinstance(prompt, np.ndarray):
        return prompt.tolist() if prompt.ndim == 1 and prompt.dtype.kind in "iu" else None
    if not isinstance(prompt, (list, tuple)):
        return None
    if set(map(type, prompt)) <= {int}:  # the usual case, at C speed: prompts are long
        return list(prompt)
    if all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
        return [int(t) for t in prompt]
    return None


def _iterable(value: Any) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


def prompt_type_error(label: str, prompt: Any) -> TypeError:
    """The error for a prompt of the wrong type (an int hints at token ids given unwrapped)."""
    hint = ""
    if isinstance(prompt, int) and not isinstance(prompt, bool):
        hint = " (a token-id prompt is a list inside the list of prompts: [[1, 2, 3]])"
    elif isinstance(prompt, (list, tuple)) and any(isinstance(m, dict) for m in prompt):
        odd = next(m for m in prompt if not isinstance(m, dict))
        hint = f" (a chat conversation holds message dicts only; found {type(odd).__name__})"
    elif isinstance(prompt, (list, tuple)):
        odd = next(t for t in prompt if not (isinstance(t, (int, np.integer)) and not isinstance(t, bool)))
        hint = f" (a token-id list holds ints only; found {type(odd).__name__} {odd!r:.40})"
    return TypeError(f"{label}: expected {_PROMPT_KINDS}, got {type(prompt).__name__}{hint}")


def sampling_params_list(sampling_params: Any, count: int) -> list[SamplingParams]:
    """None, one SamplingParams, or one per prompt -> one per prompt (not yet validated)."""
    if sampling_params is None:
        sampling_params = SamplingParams()
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    if not isinstance(sampling_params, (list, tuple)):
        raise TypeError("sampling_params must be a SamplingParams, a list of them (one per prompt) or None, "
                        f"got {type(sampling_params).__name__}")
    params = list(sampling_params)
    for i, sp in enumerate(params):
        if not isinstance(sp, SamplingParams):
            raise TypeError(f"sampling_params[{i}] must be a SamplingParams, got {type(sp).__name__}")
    if len(params) != count:
        raise ValueError(f"got {len(params)} SamplingParams for {count} prompts")
    return params
