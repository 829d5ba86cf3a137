"""vLLM's output shapes (RequestOutput, CompletionOutput, Logprob), built from atom's outputs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from atom.outputs import Completion, RolloutOutput

Decode = Callable[[int], str | None]


@dataclass
class Logprob:
    """One token's log-probability, as vLLM reports it.

    rank: 1 for the most likely token: the sampled token's exact rank among all tokens (the engine
    reports it), 1..k for the top-k alternatives in their order.
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: Any = None  # atom's RequestMetrics (arrival / first scheduled step and time)
    lora_request: None = None
    encoder_prompt: None = None
    encoder_prompt_token_ids: None = None
    num_cached_tokens: int | None = None
    kv_transfer_params: None = None
    multi_modal_placeholders: dict = field(default_factory=dict)


def position_logprobs(token: int, logprob: float, top: dict[int, float] | None, k: int,
                      decode: Decode, rank: int | None = None) -> dict[int, Logprob]:
    """vLLM's per-position dict: the chosen token first (with its exact rank among all tokens when
    the engine reported it, as vLLM's), then the top-k alternatives, ranked 1..k (k = -1: every
    token of the vocabulary, as the engine reported them)."""
    ranked = sorted((top or {}).items(), key=lambda kv: -kv[1])
    if k >= 0:
        ranked = ranked[:k]
    ranks = {tid: r for r, (tid, _) in enumerate(ranked, 1)}
    if rank is None:
        rank = ranks.get(token, len(ranked) + 1 if ranked else None)
    out = {token: Logprob(logprob, rank, decode(token))}
    for tid, lp in ranked:
        if tid != token:
            out[tid] = Logprob(lp, ranks[tid], decode(tid))
    return out


def completion_output(c: Completion, k: int | None, decode: Decode) -> CompletionOutput:
    """One completion in vLLM's shape; `k`: the request's `logprobs` (None: no logprobs)."""
    if k is None:
        logprobs, cumulative = None, None
    else:
        tops = c.top_logprobs or [None] * len(c.token_ids)
        exact = c.logprob_ranks if len(c.logprob_ranks) == len(c.token_ids) else [None] * len(c.token_ids)
        logprobs = [position_logprobs(t, lp, top, k, decode, r)
                    for t, lp, top, r in zip(c.token_ids, c.logprobs, tops, exact)]
        # atom's running total: in a streamed delta it covers every token so far, as vLLM's does
        cumulative = float(c.cumulative_logprob if c.cumulative_logprob is not None else sum(c.logprobs))
    return CompletionOutput(index=c.index, text=c.text, token_ids=list(c.token_ids), cumulative_logprob=cumulative,
                            logprobs=logprobs, finish_reason=c.finish_reason, stop_reason=c.stop_reason)


def _no_text(token_id: int) -> None:
    return None


def request_output(out: RolloutOutput, request_id: str, prompt: str | None, k: int | None, prompt_k: int | None,
                   decode: Decode, detokenize: bool = True) -> RequestOutput:
    """atom's output for one request in vLLM's shape. The engine already applied the text options
    (detokenize, include_stop_str_in_output); detokenize=False also leaves every
    Logprob.decoded_token None, as vLLM does."""
    if not detokenize:
        decode = _no_text
    prompt_logprobs = None
    if out.prompt_logprobs is not None:
        ranks = out.prompt_logprob_ranks or [None] * len(out.prompt_token_ids)
        prompt_logprobs = [None if d is None else position_logprobs(tok, d[tok], d, prompt_k or 0, decode, r)
                           for tok, d, r in zip(out.prompt_token_ids, out.prompt_logprobs, ranks)]
    return RequestOutput(
        request_id=request_id, prompt=prompt, prompt_token_ids=list(out.prompt_token_ids),
        prompt_logprobs=prompt_logprobs, finished=out.finished, metrics=out.metrics,
        # prompt tokens the prefix cache served (0 before the request first ran)
        num_cached_tokens=0 if out.metrics is None else out.metrics.num_cached_tokens,
        outputs=[completion_output(c, k, decode) for c in out.outputs])
