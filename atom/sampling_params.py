"""SamplingParams: what a request asks of the sampler (names follow vLLM)."""
from __future__ import annotations

from dataclasses import dataclass, field

LOGPROBS_MODES = ("processed", "raw")
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
    max_tokens / min_tokens: bounds on generated tokens (EOS and stops are masked before min_tokens).
    stop: strings that end a completion (not included in `text`).
    stop_token_ids: token ids that end a completion (as EOS does).
    ignore_eos: keep going past EOS.
    seed: makes this request's samples reproducible whatever else is in the batch.
    logprobs: None = none; 0 = logprob of each sampled token; k = plus the top-k alternatives.
    logprobs_mode: "processed" (distribution the token was drawn from: after temperature and
        top-k/top-p/min-p filtering, renormalised) or "raw" (log_softmax of the unscaled logits).
    prompt_logprobs: None, or k >= 0 for the logprob of each prompt token plus its top-k alternatives.
    return_routed_experts: return, per completion, the experts every MoE layer chose for every
        token the engine ran (Completion.routed_experts); needs
        EngineConfig(enable_return_routed_experts=True). Such prompts skip the prefix cache.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    logprobs_mode: str = "processed"
    prompt_logprobs: int | None = None
    return_routed_experts: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if value is None:
                value = []
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"SamplingParams.{name}={value!r} is invalid: must be a list")
            setattr(self, name, list(value))
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
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "an integer >= 1")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", f"an integer in [0, max_tokens={self.max_tokens}]")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")
        if not all(is_int(t) and t >= 0 and (vocab_size is None or t < vocab_size) for t in self.stop_token_ids):
            raise bad("stop_token_ids", f"a list of token ids in [0, {vocab_size or 'vocab_size'})")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "a bool")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise bad("seed", "None or an integer in [0, 2**63)")
        if self.logprobs is not None and (not is_int(self.logprobs) or self.logprobs < 0
                                          or (vocab_size is not None and self.logprobs > vocab_size)):
            raise bad("logprobs", f"None or an integer in [0, {vocab_size or 'vocab_size'}]")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise bad("logprobs_mode", f"one of {LOGPROBS_MODES}")
        if self.prompt_logprobs is not None and (not is_int(self.prompt_logprobs) or self.prompt_logprobs < 0
                                                 or (vocab_size is not None and self.prompt_logprobs > vocab_size)):
            raise bad("prompt_logprobs", f"None or an integer in [0, {vocab_size or 'vocab_size'}]")
        if not isinstance(self.return_routed_experts, bool):
            raise bad("return_routed_experts", "a bool")

    @property
    def effective_top_k(self) -> int:
        return 0 if self.top_k in (-1, 0) else self.top_k
