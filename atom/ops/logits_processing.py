"""The batched logits steps every sampling backend shares (plain torch, one pass per feature over
[rows, vocab], no per-row Python): the processing before temperature (allowed tokens, banned
tokens, logit bias, penalties), and what is reported back (logprobs or logits, raw or processed,
ranks). The triton backend runs its kernel on the processed logits these return.
"""
from __future__ import annotations

import torch

from atom.ops.metadata import LogitsProcessing, SamplingMetadata

_NEG_INF = float("-inf")


def process_logits(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """float32 logits [B, V] -> the logits the request samples from before temperature, in vLLM's
    order: allowed_token_ids, banned tokens (bad words, min_tokens), logit_bias, then repetition,
    frequency and presence penalties. Returns `logits` itself when no row asks for any of it."""
    proc = meta.processing
    if proc is None and meta.banned_rows is None:
        return logits
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
    if proc is not None and proc.repetition is not None:
        logits = _apply_penalties(logits, proc)
    return logits


def _apply_penalties(logits: torch.Tensor, proc: LogitsProcessing) -> torch.Tensor:
    """Repetition over prompt + generated tokens (divide positive logits, multiply the others);
    frequency (per occurrence) and presence (once) over generated tokens. Rows without penalties
    have 1 / 0 / 0 and come out bit for bit unchanged."""
    has_outputs = proc.output_rows is not None and proc.output_rows.numel() > 0
    counts = generated = None
    if proc.any_counted:
        counts = torch.zeros_like(logits)
        if has_outputs:
            counts.index_put_((proc.output_rows, proc.output_tokens),
                              torch.ones_like(proc.output_tokens, dtype=logits.dtype), accumulate=True)
        generated = counts > 0
    if proc.any_repetition:
        if generated is not None:
            seen = generated.clone()
        else:
            seen = torch.zeros_like(logits, dtype=torch.bool)
            if has_outputs:
                seen[proc.output_rows, proc.output_tokens] = True
        if proc.prompt_rows is not None and proc.prompt_rows.numel():
            seen[proc.prompt_rows, proc.prompt_tokens] = True
        rep = proc.repetition[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    if proc.any_counted:
        logits = logits - proc.frequency[:, None] * counts - proc.presence[:, None] * generated
    return logits


def report_source(raw: torch.Tensor, scaled: torch.Tensor, processed: torch.Tensor | None,
                  meta: SamplingMetadata) -> torch.Tensor:
    """[B, V] values each row reports: processed logprobs (log_softmax of `scaled`, the logits
    after processing, temperature and filters), processed logits (`scaled`), raw logprobs or raw
    logits (`raw`, the model's logits), per the row's logprobs_mode."""
    if processed is None:
        processed = scaled.log_softmax(-1)
    source = processed
    if meta.report_logits is not None:
        source = torch.where(meta.report_logits[:, None], scaled, processed)
    if meta.any_raw:
        raw_values = raw.log_softmax(-1)
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
