"""The batched logits steps every sampling backend shares (plain torch, one pass per feature over
[rows, vocab], no per-row Python): the processing before temperature (allowed tokens, banned
tokens, logit bias, penalties), and what is reported back (logprobs or logits, raw or processed,
ranks). The triton backend runs its kernel on the processed logits these return. The penalties
read the engine's penalty state (prompt bits and generated-token counts per sequence slot,
atom/engine/penalties.py); `apply_penalties` here is their reference, which the CPU backend and
the triton kernel are tested against.
"""
from __future__ import annotations

from typing import Callable

import torch

from atom.ops.metadata import LogitsProcessing, SamplingMetadata

_NEG_INF = float("-inf")


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim. On the CPU as x - logsumexp(x): torch's float32 log_softmax
    there sums a row's exponentials ~10x less exactly (3.4e-5 off float64's at a 151,936-token row
    of std-4 logits, against logsumexp's 2.9e-6, about the output's own rounding), at the same speed.
    On CUDA torch's log_softmax stays: one block reduces one row whatever the row count, so a
    prompt-logprob pass and a decode step give the same bits (batch-invariant mode's promise), which
    logsumexp's generic reductions (split by the tensor's shape) do not."""
    if x.is_cuda:
        return x.log_softmax(-1)
    return x - x.logsumexp(-1, keepdim=True)


def process_logits(logits: torch.Tensor, meta: SamplingMetadata,
                   penalize: Callable[[torch.Tensor, LogitsProcessing], torch.Tensor] | None = None) -> torch.Tensor:
    """logits [B, V] -> the float32 logits the request samples from before temperature, in vLLM's
    order: allowed_token_ids, banned tokens (bad words, min_tokens), logit_bias, then repetition,
    frequency and presence penalties (`penalize`, the backend's form of apply_penalties; this
    reference by default). Returns `logits` itself (whatever its dtype) when no row asks for any
    of it, so a backend reading bf16 logits directly never widens them for nothing."""
    proc = meta.processing
    sparse = meta.banned_rows is not None or (proc is not None and (proc.allowed_rows is not None
                                                                    or proc.bias_rows is not None))
    penalized = proc is not None and proc.penalty_slots is not None
    if not (sparse or penalized):
        return logits
    if logits.dtype != torch.float32:
        logits = logits.float()  # a fresh tensor: the in-place steps below may write it
    elif sparse:
        logits = logits.clone()
    if proc is not None and proc.allowed_rows is not None:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep[proc.allowed_rows, proc.allowed_tokens] = True
        restricted = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        restricted[proc.allowed_rows] = True
        logits.masked_fill_(restricted[:, None] & ~keep, _NEG_INF)
    if meta.banned_rows is not None:
        logits.index_put_((meta.banned_rows, meta.banned_tokens),
                          torch.tensor(_NEG_INF, device=logits.device))
    if proc is not None and proc.bias_rows is not None:
        logits.index_put_((proc.bias_rows, proc.bias_tokens), proc.bias_values, accumulate=True)
    if penalized:
        logits = (penalize or apply_penalties)(logits, proc)
    return logits


def apply_penalties(logits: torch.Tensor, proc: LogitsProcessing) -> torch.Tensor:
    """The reference: `logits` (not written) with repetition over prompt + generated tokens
    (positive logits divided, the others multiplied), then frequency (per occurrence) and presence
    (once) over generated tokens subtracted, each row from its slot of the penalty state. Rows
    without penalties (1 / 0 / 0) come out bit for bit unchanged."""
    check_penalty_state(logits, proc)
    slots = proc.penalty_slots.long().clamp(min=0)  # rows at -1 are neutral: any slot will do
    counts = proc.token_counts.index_select(0, slots)[:, :logits.shape[-1]]
    generated = counts > 0
    if proc.any_repetition:
        seen = generated | unpack_prompt_mask(proc.prompt_mask.index_select(0, slots), logits.shape[-1])
        rep = proc.repetition[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    if proc.any_counted:
        logits = logits - proc.frequency[:, None] * counts.float() - proc.presence[:, None] * generated.float()
    return logits


def unpack_prompt_mask(mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, ceil(V / 8)] uint8 bit masks -> [B, V] bool (bit t % 8 of byte t // 8 is token t)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    bits = (mask[:, :, None] >> shifts) & 1
    return bits.view(mask.shape[0], -1)[:, :vocab] != 0


def state_width(vocab: int) -> int:
    """Columns of the penalty state for a vocabulary: rounded up to a multiple of 64, so that
    every row of the counts and of the prompt bits is whole 8-byte words."""
    return 64 * -(-vocab // 64)


def check_penalty_state(logits: torch.Tensor, proc: LogitsProcessing) -> None:
    """The state must cover the logits' vocabulary (a mismatch would read other tokens' counts)."""
    vocab = logits.shape[-1]
    width = state_width(vocab)
    if proc.token_counts.shape[-1] != width or proc.prompt_mask.shape[-1] != width // 8:
        raise ValueError(f"penalty state is {proc.token_counts.shape[-1]} tokens wide; logits of {vocab} "
                         f"tokens need {width}")


def report_source(raw: torch.Tensor, scaled: torch.Tensor, processed: torch.Tensor | None,
                  meta: SamplingMetadata) -> torch.Tensor:
    """[B, V] values each row reports: processed logprobs (log_softmax of `scaled`, the logits
    after processing, temperature and filters), processed logits (`scaled`), raw logprobs or raw
    logits (`raw`, the model's logits), per the row's logprobs_mode."""
    if processed is None:
        processed = log_softmax(scaled)
    source = processed
    if meta.report_logits is not None:
        source = torch.where(meta.report_logits[:, None], scaled, processed)
    if meta.any_raw:
        raw_values = log_softmax(raw)
        if meta.report_logits is not None:
            raw_values = torch.where(meta.report_logits[:, None], raw, raw_values)
        source = torch.where(meta.raw_logprobs[:, None], raw_values, source)
    return source


def token_ranks(raw: torch.Tensor, scaled: torch.Tensor, token_ids: torch.Tensor,
                meta: SamplingMetadata) -> torch.Tensor:
    """[B] rank of each sampled token: the number of tokens whose value is >= its own (vLLM's
    count), over the logits the row reports on (log_softmax keeps the order, so logits and
    logprobs rank alike; only exact ties that rounding creates in log_softmax could differ)."""
    basis = scaled if not meta.any_raw else torch.where(meta.raw_logprobs[:, None], raw, scaled)
    own = basis.gather(-1, token_ids[:, None])
    return (basis >= own).sum(-1)


def top_count(meta: SamplingMetadata, vocab: int) -> int:
    """How many top alternatives to gather: num_top_logprobs, -1 meaning the whole vocabulary."""
    return vocab if meta.num_top_logprobs < 0 else min(meta.num_top_logprobs, vocab)
