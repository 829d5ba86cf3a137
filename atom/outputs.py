"""What `RolloutEngine.generate` returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Completion:
    """One sampled continuation of a prompt.

    logprobs: one float per generated token (empty when SamplingParams.logprobs is None); logits
        instead in the "*_logits" logprobs modes. Which distribution: SamplingParams.logprobs_mode
        (atom's default "processed" is the one the token was drawn from, vLLM's default is "raw").
    top_logprobs: per generated token, {token_id: logprob} of the top-k alternatives, best first
        (k > 0 only; k = -1: the whole vocabulary). Their ranks are 1, 2, ... in that order.
    logprob_ranks: per generated token, the rank of the sampled token among all tokens (1 = the
        best; tokens of equal value count as better, as vLLM counts), with logprobs only.
        Decoded strings of any of these ids: RolloutEngine.decode_tokens.
    cumulative_logprob: the sum of `logprobs` (None when SamplingParams.logprobs is None).
    finish_reason: "stop" (EOS, stop token or stop string), "length" (max_tokens / max_model_len),
        "abort" (aborted: the tokens so far), or None while it is still running.
    stop_reason: the stop string or stop token id that ended it; None for EOS and length.
    weight_version: the engine's weight version when the completion ended (the version of its
        last token).
    weight_versions: which weight version produced which tokens, as (version, first_token,
        end_token) spans over token_ids; one span unless weights changed mid-generation
        (pause_generation(mode="keep") + update_weights + resume_generation).
    routed_experts: with SamplingParams(return_routed_experts=True), a numpy int32 array
        [prompt + generated tokens - 1, moe_layers, top_k]: the experts each MoE layer chose for each
        position the engine ran (all but the last token), the prompt's included (as SGLang returns
        them); feed it to atom.fidelity.routing_replay in the trainer. None otherwise. A finished
        completion's array is a view of a host block shared with other completions (no copy when
        requests finish): np.array(...) it to keep one alone for long.
    """

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = "length"
    stop_reason: str | int | None = None
    weight_version: int | str = 0
    weight_versions: list[tuple[int | str, int, int]] = field(default_factory=list)
    logprob_ranks: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    routed_experts: Any = None


@dataclass
class RequestMetrics:
    """When a request arrived and when it first ran, in engine steps (counted as they are launched:
    step k is the k-th batch the engine ran, from 0) and in seconds (time.monotonic()).

    arrival_step: steps launched before the request was added, i.e. the index of the first step
        that could have run it.
    scheduled_step: the index of the first step whose batch held it (its first prefill chunk, or
        the prefill of the prompt twin it follows); None until then.
    steps_waited: scheduled_step - arrival_step: steps launched after its arrival without it
        (0: the very next step ran it; a step already in flight when it arrived is not counted).
    num_cached_tokens: prompt tokens whose KV the prefix cache served when it first ran (vLLM's
        RequestOutput.num_cached_tokens; a prompt twin reports its leader's); 0 until then.
    """

    arrival_step: int
    arrival_time: float
    scheduled_step: int | None = None
    scheduled_time: float | None = None
    num_cached_tokens: int = 0

    @property
    def steps_waited(self) -> int | None:
        return None if self.scheduled_step is None else self.scheduled_step - self.arrival_step


@dataclass
class RolloutOutput:
    """All completions of one prompt, in the order the prompts were given.

    prompt_logprobs: None unless asked; else one entry per prompt token, None for the first,
        {token_id: logprob} holding the actual token and the top-k alternatives for the others.
    prompt_logprob_ranks: with prompt_logprobs, the rank of each actual prompt token (None for
        the first).
    request_id: the id given to add_request / AsyncRolloutEngine.generate (batch calls: an
        internal id).
    finished: False for the partial outputs that streaming and `step` report along the way.
    metrics: when the request arrived and first ran (RequestMetrics; its scheduled_step stays
        None on rank 0 for a request another data-parallel rank runs).
    """

    prompt: str | list[int] | list[dict]
    prompt_token_ids: list[int]
    outputs: list[Completion]
    prompt_logprobs: list[dict[int, float] | None] | None = None
    request_id: str = ""
    finished: bool = True
    prompt_logprob_ranks: list[int | None] | None = None
    metrics: RequestMetrics | None = None


@dataclass
class EngineStats:
    """Counters since the engine was built (monotonic; take differences around a call)."""

    prompt_tokens_computed: int = 0   # prompt positions run through the model (recompute included)
    prompt_tokens_cached: int = 0     # prompt positions served from the prefix cache or a sibling's fork
    recomputed_tokens: int = 0        # generated positions run again after a preemption
    preemptions: int = 0
    generated_tokens: int = 0
    steps: int = 0
    overlapped_steps: int = 0         # decode steps queued before the previous step's tokens were read
    graph_steps: int = 0              # decode steps run by replaying (or capturing) a CUDA graph
