"""vLLM's SamplingParams, mapped onto atom's.

Every field vLLM's `SamplingParams` takes is accepted under its vLLM name. Fields that atom's
own `atom.SamplingParams` has are passed through (so they gain support here as soon as atom's
sampler does); `output_kind`, which only shapes streamed outputs, is handled by this layer;
`extra_args` is carried and not read, as vLLM does without a custom logits processor installed;
any other field set to something but its neutral value raises a ValueError naming it, instead of
being ignored.

Construction normalises fields as vLLM's `__post_init__` does (stop / stop_token_ids / bad_words:
None -> [], a single stop string -> [it], repeats dropped; logprobs=True -> 1; seed=-1 -> None;
greedy requests get top_p=1, top_k=0, min_p=0) and refuses what vLLM refuses (n > 1 with greedy
sampling), so code that reads the fields back sees vLLM's values.
"""
from __future__ import annotations

import copy
import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

from atom.sampling_params import SamplingParams as AtomSamplingParams

_ATOM_FIELDS = frozenset(f.name for f in dataclasses.fields(AtomSamplingParams))
# Fields this layer applies to the outputs itself.
_OUTPUT_FIELDS = frozenset({"output_kind"})
# Fields vLLM itself only carries (read by plugins atom does not have).
_CARRIED_FIELDS = frozenset({"extra_args"})
# Below this temperature vLLM samples greedily (its _SAMPLING_EPS).
_GREEDY_EPS = 1e-5


class RequestOutputKind(enum.IntEnum):
    """What AsyncLLM.generate yields per step (vLLM's values): CUMULATIVE everything so far,
    DELTA only what is new since the last output, FINAL_ONLY one output at the end. The
    offline LLM returns final outputs whatever this says."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class StructuredOutputsParams:
    """vLLM's constrained-decoding options; atom has no constrained decoding (setting one raises)."""

    json: Any = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


@dataclass
class SamplingParams:
    """vLLM's sampling parameters (same names, same defaults); see the module docstring."""

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logits_processors: Any = None
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None
    guided_decoding: Any = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    extra_args: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.output_kind is None:  # older callers passed None for "the default"
            self.output_kind = RequestOutputKind.CUMULATIVE
        self.output_kind = RequestOutputKind(self.output_kind)  # ValueError for anything else
        self._normalize()
        self.to_atom()  # ValueError now, as vLLM raises
        self._normalize_greedy()

    def _normalize(self) -> None:
        """vLLM's rewrites of what was passed (values of the wrong type are left for to_atom to refuse)."""
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop_token_ids", "bad_words"):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, [])
            elif isinstance(value, (list, tuple)):
                try:  # repeats change nothing (vLLM drops them); unhashable items are refused later
                    setattr(self, name, list(dict.fromkeys(value)))
                except TypeError:
                    pass
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is True:  # vLLM reads True as 1 (False stays 0)
                setattr(self, name, 1)
        if isinstance(self.seed, int) and self.seed == -1:  # vLLM's "no seed"
            self.seed = None

    def _normalize_greedy(self) -> None:
        """Temperature 0 means greedy: the filters do nothing then (vLLM resets them, so that
        processed logprobs are over the whole vocabulary), and n identical samples are refused."""
        if self.temperature >= _GREEDY_EPS:
            return
        if self.n > 1:
            raise ValueError(f"SamplingParams.n={self.n} is invalid: n must be 1 when using greedy sampling "
                             f"(temperature={self.temperature}), as in vLLM")
        self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def clone(self) -> "SamplingParams":
        """A deep copy, as vLLM's (the copy's lists can be changed without touching these)."""
        return copy.deepcopy(self)

    @classmethod
    def from_optional(cls, **kwargs: Any) -> "SamplingParams":
        """vLLM's constructor for callers that pass None for "the default" (the OpenAI server's
        request mapping): a None argument takes the field's default, except max_tokens, where
        None keeps its meaning (up to max_model_len); logit_bias keys become ints and its biases
        are clipped to [-100, 100], as vLLM does there."""
        values = {k: v for k, v in kwargs.items() if v is not None or k == "max_tokens"}
        if values.get("logit_bias") is not None:
            values["logit_bias"] = {int(t): min(100.0, max(-100.0, float(b))) for t, b in values["logit_bias"].items()}
        return cls(**values)

    def to_atom(self, logprobs_mode: str = "raw", max_tokens: int | None = None) -> AtomSamplingParams:
        """atom's SamplingParams for this request.

        logprobs_mode: atom's name of the LLM's logprobs_mode ("raw", "processed", "raw_logits",
            "processed_logits").
        max_tokens: used when this object's max_tokens is None (vLLM: up to max_model_len; left
            None, atom's engine reads it so too).
        """
        values: dict[str, Any] = {}
        unsupported: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _OUTPUT_FIELDS or f.name in _CARRIED_FIELDS:
                continue
            if f.name in _ATOM_FIELDS:
                values[f.name] = value
            elif value != f.default and not (f.name == "best_of" and value in (None, self.n)):
                unsupported.append(f"{f.name}={value!r}")
        if unsupported:
            raise ValueError(f"SamplingParams: {', '.join(unsupported)} not supported by atom (leave "
                             f"{'it' if len(unsupported) == 1 else 'them'} at vLLM's default)")
        # (None: fields set to None after construction mean "none", as at construction)
        for name in ("stop", "stop_token_ids", "bad_words"):
            values[name] = [] if values.get(name) is None else values[name]
        if values.get("max_tokens") is None:  # None: atom's engine too runs up to max_model_len
            values["max_tokens"] = max_tokens
        if isinstance(values.get("seed"), int) and values["seed"] == -1:  # set after construction
            values["seed"] = None
        values["logprobs_mode"] = logprobs_mode
        return AtomSamplingParams(**values)
