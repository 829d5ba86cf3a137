"""SamplingParams: what a request asks of the sampler (names follow vLLM)."""
from __future__ import annotations

from dataclasses import dataclass, field

# "processed" / "raw" are atom's names for vLLM's "processed_logprobs" / "raw_logprobs"; the
# "_logits" modes report the logits themselves instead of log-probabilities.
LOGPROBS_MODES = ("processed", "raw", "processed_logprobs", "raw_logprobs", "processed_logits", "raw_logits")


class SamplingParamsTypeError(TypeError, ValueError):
    """A SamplingParams field of the wrong type (vLLM raises TypeError there); also a ValueError,
    as every other bad parameter is."""
# Smallest temperature besides 0 (greedy): logits / temperature must stay finite in float32, and
# processed logprobs meaningful; vLLM raises smaller ones to the same 1e-2 (with a warning), atom
# refuses them, so that the logprobs it reports are those of the temperature the caller asked for.
MIN_TEMPERATURE = 1e-2


@dataclass
class SamplingParams:
    """How to sample one prompt's completions.

    n: completions per prompt (they share the prompt's KV blocks and run together, so an engine
        takes at most its EngineConfig.max_num_seqs).
    temperature: 0 means greedy; otherwise at least MIN_TEMPERATURE (1e-2).
    top_p: nucleus mass in (0, 1]; top_k: -1 or 0 disables; min_p: in [0, 1].
    max_tokens / min_tokens: bounds on generated tokens (EOS and stop token ids are masked for
        the first min_tokens tokens, and no stop counts before then). max_tokens=None: up to
        max_model_len.
    stop: strings that end a completion (not included in `text` unless include_stop_str_in_output).
        A stop string counts when it completes in the newest token (it may begin earlier, also
        inside the first min_tokens tokens); when several complete in one token, the one that
        completes first wins, list order breaking ties (vLLM's rule).
    stop_token_ids: token ids that end a completion (as EOS does; their text is left out of `text`
        unless include_stop_str_in_output).
    ignore_eos: keep going past EOS.
    seed: makes this request's samples reproducible whatever else is in the batch.
    logprobs: None = none; 0 = logprob of each sampled token; k = plus the top-k alternatives;
        -1 = the whole vocabulary. At most EngineConfig.max_logprobs (default 20, as vLLM).
    logprobs_mode: what `logprobs` reports.
        "processed" (atom's default; vLLM's "processed_logprobs"): the log-probability under the
            distribution the token was actually drawn from: logits after allowed_token_ids,
            bad_words, min_tokens, logit_bias and the penalties, divided by the temperature (1
            for greedy), after min_p, top_k and top_p, renormalised. This is what a trainer
            recomputes from its own logits under the same processing.
        "raw" ("raw_logprobs", vLLM's default!): log_softmax of the model's logits before any of
            that. A trainer comparing against these must not apply temperature or penalties.
        "processed_logits" / "raw_logits": the logits themselves at those two points.
    prompt_logprobs: None, k >= 0 (the logprob of each prompt token plus its top-k alternatives)
        or -1 (the whole vocabulary); same mode and limit as logprobs.
    presence_penalty / frequency_penalty: in [-2, 2]; subtracted from the logit of every token
        once / once per occurrence in the generated tokens so far.
    repetition_penalty: > 0 (1 = off); logits of tokens seen in the prompt or the generated
        tokens are divided by it when positive, multiplied when not (HF's / vLLM's rule).
    logit_bias: {token id: bias} added to the logits before the penalties.
    allowed_token_ids: only these tokens may be sampled (None = all).
    bad_words: words never generated: the last token of a word (tokenized with and without a
        leading space) is masked whenever the tokens before it were just generated.
    include_stop_str_in_output: keep the stop string (or stop token / EOS text) in `text`.
    skip_special_tokens / spaces_between_special_tokens: how `text` is decoded.
    detokenize: False leaves `text` empty (no stop strings then).
    truncate_prompt_tokens: keep only the last k prompt tokens (-1: the last max_model_len - 1,
        which leaves room for one generated token).
    return_routed_experts: return, per completion, the experts every MoE layer chose for every
        token the engine ran (Completion.routed_experts); needs
        EngineConfig(enable_return_routed_experts=True). Such prompts skip the prefix cache.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    logprobs_mode: str = "processed"
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    truncate_prompt_tokens: int | None = None
    return_routed_experts: bool = False

    def __post_init__(self) -> None:
        # The token ids of bad_words (not a field): the engine sets them on its private copy.
        self.bad_words_token_ids: list[list[int]] = []
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("logprobs", "prompt_logprobs"):
            if isinstance(getattr(self, name), bool):  # vLLM reads True as 1
                setattr(self, name, int(getattr(self, name)))
        for name in ("stop", "stop_token_ids", "bad_words"):
            value = getattr(self, name)
            if value is None:
                value = []
            if not isinstance(value, (list, tuple)):
                raise SamplingParamsTypeError(f"SamplingParams.{name}={value!r} is invalid: must be a list")
            try:  # repeats change nothing but cost work (vLLM drops them too)
                setattr(self, name, list(dict.fromkeys(value)) if name != "stop" else list(value))
            except TypeError:
                raise SamplingParamsTypeError(f"SamplingParams.{name}={value!r} is invalid: "
                                              "must be a list of strings / ints") from None
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, (list, tuple, set, frozenset)):
                raise SamplingParamsTypeError(f"SamplingParams.allowed_token_ids={self.allowed_token_ids!r} "
                                              "is invalid: must be None or a list of token ids")
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise SamplingParamsTypeError(f"SamplingParams.logit_bias={self.logit_bias!r} is invalid: "
                                              "must be None or a dict {token id: bias}")
            # JSON configs carry string keys ("42": 5.0); vLLM converts them too.
            self.logit_bias = {int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k: v
                               for k, v in self.logit_bias.items()}
        self.validate()

    def validate(self, vocab_size: int | None = None, max_num_seqs: int | None = None) -> None:
        """ValueError naming the first invalid field; vocab_size / max_num_seqs: the engine's limits."""
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is invalid: must be {allowed}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v

        if not is_int(self.n) or self.n < 1:
            raise bad("n", "an integer >= 1")
        if max_num_seqs is not None and self.n > max_num_seqs:
            raise bad("n", f"at most the engine's max_num_seqs={max_num_seqs} (the n samples of a prompt run "
                           "together)")
        if (not is_num(self.temperature) or not 0.0 <= self.temperature < float("inf")
                or 0.0 < self.temperature < MIN_TEMPERATURE):
            raise bad("temperature", f"0 (greedy) or a finite number >= {MIN_TEMPERATURE}")
        if not is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]")
        if not is_int(self.top_k) or (self.top_k < -1):
            raise bad("top_k", "-1 or 0 (off) or an integer >= 1")
        if not is_num(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "in [0, 1]")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "None (up to max_model_len) or an integer >= 1")
        upper = float("inf") if self.max_tokens is None else self.max_tokens
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= upper:
            raise bad("min_tokens", f"an integer in [0, max_tokens={self.max_tokens}]")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")
        if not all(is_int(t) and t >= 0 and (vocab_size is None or t < vocab_size) for t in self.stop_token_ids):
            raise bad("stop_token_ids", f"a list of token ids in [0, {vocab_size or 'vocab_size'})")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "a bool")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise bad("seed", "None or an integer in [0, 2**63)")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not is_int(k) or k < -1 or (vocab_size is not None and k > vocab_size)):
                raise bad(name, f"None, -1 (whole vocabulary) or an integer in [0, {vocab_size or 'vocab_size'}]")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise bad("logprobs_mode", f"one of {LOGPROBS_MODES}")
        self._validate_processing(vocab_size, bad, is_int, is_num)
        if not isinstance(self.return_routed_experts, bool):
            raise bad("return_routed_experts", "a bool")

    def _validate_processing(self, vocab_size, bad, is_int, is_num) -> None:
        """The logits processing and output options (penalties, bias, allowed / bad tokens, text)."""
        def token_ids_ok(ids) -> bool:
            return all(is_int(t) and t >= 0 and (vocab_size is None or t < vocab_size) for t in ids)

        vocab = f"[0, {vocab_size or 'vocab_size'})"
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_num(getattr(self, name)) or not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "a number in [-2, 2]")
        if not is_num(self.repetition_penalty) or not 0.0 < self.repetition_penalty < float("inf"):
            raise bad("repetition_penalty", "a finite number > 0 (1 = off)")
        if self.logit_bias is not None:
            if not token_ids_ok(self.logit_bias):
                raise bad("logit_bias", f"a dict whose keys are token ids in {vocab}")
            if not all(is_num(v) and abs(v) < float("inf") for v in self.logit_bias.values()):
                raise bad("logit_bias", "a dict whose values are finite numbers")
        if self.allowed_token_ids is not None and (not self.allowed_token_ids
                                                   or not token_ids_ok(self.allowed_token_ids)):
            raise bad("allowed_token_ids", f"None or a non-empty list of token ids in {vocab}")
        if not all(isinstance(w, str) and w for w in self.bad_words):
            raise bad("bad_words", "a list of non-empty strings")
        for name in ("include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
                     "detokenize"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")
        if self.stop and not self.detokenize:
            raise bad("stop", "empty when detokenize=False (stop strings are matched in the text)")
        t = self.truncate_prompt_tokens
        if t is not None and (not is_int(t) or (t < 1 and t != -1)):
            raise bad("truncate_prompt_tokens", "None, -1 (max_model_len) or an integer >= 1")

    @property
    def penalized(self) -> bool:
        """Whether a penalty applies (they need each row's prompt and generated tokens)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def processes_logits(self) -> bool:
        """Whether logits change before temperature: penalties, logit_bias, allowed or bad tokens."""
        return (self.penalized or bool(self.logit_bias) or self.allowed_token_ids is not None
                or bool(self.bad_words_token_ids))

    @property
    def reports_raw(self) -> bool:
        return self.logprobs_mode in ("raw", "raw_logprobs", "raw_logits")

    @property
    def reports_logits(self) -> bool:
        return self.logprobs_mode.endswith("_logits")

    @property
    def effective_top_k(self) -> int:
        return 0 if self.top_k in (-1, 0) else self.top_k
