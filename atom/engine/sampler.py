"""Builds the per-row sampling tensors of a step and turns logits into prompt logprobs."""
from __future__ import annotations

import torch

from atom.engine.penalties import PenaltyRows
from atom.engine.sequence import Sequence, stream_counter
from atom.ops.logits_processing import report_source, token_ranks
from atom.ops.metadata import LogitsProcessing, SamplingMetadata
from atom.ops.torch_ops import filter_logits


def sampling_metadata(rows: list[tuple[Sequence, int]], eos_ids: list[int], device: torch.device,
                      lag: int = 0, penalties: PenaltyRows | None = None) -> SamplingMetadata:
    """rows: (sequence, sample index) per logits row; the sample index picks the random stream
    (a forking prefill samples all n first tokens from one row of logits). lag: tokens each
    sequence has in flight (sampled, not yet appended) in an overlapped decode step (the penalty
    state counts them on the device already). penalties: the rows' penalty inputs
    (PenaltyState.prepare), needed when a row has a penalty."""
    temps, top_ks, top_ps, min_ps, seeds, counters, raw, logits_mode = [], [], [], [], [], [], [], []
    banned_rows, banned_tokens = [], []
    num_top, want_ranks, processing = 0, False, False
    for r, (seq, sample_index) in enumerate(rows):
        p = seq.params
        temps.append(float(p.temperature))
        top_ks.append(p.effective_top_k)
        top_ps.append(float(p.top_p))
        min_ps.append(float(p.min_p))
        seeds.append(seq.request.seed)
        num_output = seq.num_output_tokens + lag
        counters.append(stream_counter(sample_index, num_output))
        raw.append(p.reports_raw)
        logits_mode.append(p.reports_logits)
        if p.logprobs is not None:
            want_ranks = True
            num_top = -1 if p.logprobs < 0 or num_top < 0 else max(num_top, p.logprobs)
        processing = processing or p.processes_logits
        banned = _banned_tokens(seq, num_output, lag, eos_ids)
        if banned:
            banned_rows += [r] * len(banned)
            banned_tokens += banned

    def t(values, dtype):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    return SamplingMetadata(
        temperature=t(temps, torch.float32), top_k=t(top_ks, torch.int64), top_p=t(top_ps, torch.float32),
        min_p=t(min_ps, torch.float32), seeds=t(seeds, torch.int64), counters=t(counters, torch.int64),
        raw_logprobs=t(raw, torch.bool),
        banned_rows=t(banned_rows, torch.int64) if banned_rows else None,
        banned_tokens=t(banned_tokens, torch.int64) if banned_rows else None,
        need_filter=any(k > 0 for k in top_ks) or any(x < 1.0 for x in top_ps) or any(x > 0 for x in min_ps),
        all_greedy=all(x == 0.0 for x in temps), any_raw=any(raw), num_top_logprobs=num_top,
        report_logits=t(logits_mode, torch.bool) if any(logits_mode) else None,
        processing=logits_processing(rows, device, penalties) if processing else None, want_ranks=want_ranks,
    )


def _banned_tokens(seq: Sequence, num_output: int, lag: int, eos_ids: list[int]) -> list[int]:
    """Tokens this row may not sample now: EOS and stop token ids for the first min_tokens tokens
    (EOS even with ignore_eos, as vLLM does), and the last token of every bad word whose other
    tokens the sequence just generated."""
    p = seq.params
    if num_output >= p.min_tokens and not p.bad_words_token_ids:
        return []
    out: set[int] = set()
    if num_output < p.min_tokens:
        out.update(p.stop_token_ids)
        out.update(eos_ids)
    if p.bad_words_token_ids:
        generated = seq.num_output_tokens
        for word in p.bad_words_token_ids:
            prefix = len(word) - 1
            if prefix and lag:
                raise RuntimeError("multi-token bad words need every generated token on the host (no overlap)")
            if prefix > generated:
                continue
            if not prefix or seq.token_ids[len(seq.token_ids) - prefix:] == word[:-1]:
                out.add(word[-1])
    return sorted(out)


def logits_processing(rows: list[tuple[Sequence, int]], device: torch.device,
                      penalties: PenaltyRows | None) -> LogitsProcessing:
    """The LogitsProcessing tensors of a step: (row, token) pairs for allowed tokens and logit bias,
    and the per-row penalties with the state slots they read (PenaltyState.prepare)."""
    allowed_r, allowed_t, bias_r, bias_t, bias_v = [], [], [], [], []
    for r, (seq, _) in enumerate(rows):
        p = seq.params
        if p.allowed_token_ids is not None:
            allowed_r += [r] * len(p.allowed_token_ids)
            allowed_t += p.allowed_token_ids
        if p.logit_bias:
            bias_r += [r] * len(p.logit_bias)
            bias_t += list(p.logit_bias)
            bias_v += [float(v) for v in p.logit_bias.values()]
        if p.penalized and penalties is None:
            raise ValueError("sampling_metadata: penalized rows need the penalty state's rows (PenaltyState.prepare)")

    def t(values, dtype):
        return torch.as_tensor(values, dtype=dtype).to(device, non_blocking=True)

    proc = LogitsProcessing()
    if allowed_r:
        proc.allowed_rows, proc.allowed_tokens = t(allowed_r, torch.int64), t(allowed_t, torch.int64)
    if bias_r:
        proc.bias_rows, proc.bias_tokens = t(bias_r, torch.int64), t(bias_t, torch.int64)
        proc.bias_values = t(bias_v, torch.float32)
    if penalties is not None:
        pen = penalties
        proc.repetition, proc.presence, proc.frequency = (
            t(x, torch.float32) for x in (pen.repetition, pen.presence, pen.frequency))
        proc.penalty_slots = t(pen.slots, torch.int64)
        proc.token_counts, proc.prompt_mask = pen.counts, pen.prompt_mask
        proc.any_repetition, proc.any_counted = pen.any_repetition, pen.any_counted
    return proc


def prompt_logprobs(logits: torch.Tensor, seq: Sequence,
                    targets: list[int]) -> tuple[list[dict[int, float]], list[int]]:
    """One {token: logprob} per row, the actual next prompt token plus the top-k alternatives
    (k = -1: the whole vocabulary), under the processing the request's samples get (raw, or
    temperature + filters; logits instead of logprobs in the "*_logits" modes); and the rank of
    each actual token."""
    p = seq.params
    raw = logits.float()
    n, vocab = raw.shape
    scaled = raw
    if not p.reports_raw:
        if p.temperature > 0:  # a true division by a tensor, as the samplers do (CUDA's tensor / Python
            # scalar multiplies by the reciprocal instead: other bits than the decode step's logprobs)
            scaled = scaled / torch.full((n, 1), float(p.temperature), device=raw.device)
        if p.effective_top_k > 0 or p.top_p < 1.0 or p.min_p > 0:
            scaled = filter_logits(scaled, torch.full((n,), p.effective_top_k, device=raw.device),
                                   torch.full((n,), p.top_p, device=raw.device),
                                   torch.full((n,), p.min_p, device=raw.device))
    meta = _row_modes(p, n, raw.device)
    values = report_source(raw, scaled, None, meta)
    target = torch.tensor(targets, device=raw.device)
    chosen = values.gather(-1, target[:, None]).squeeze(-1).tolist()
    ranks = token_ranks(raw, scaled, target, meta).tolist()
    k = vocab if p.prompt_logprobs is not None and p.prompt_logprobs < 0 else (p.prompt_logprobs or 0)
    top_vals, top_ids = values.topk(k, dim=-1)
    top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    out = []
    for r, tok in enumerate(targets):
        entry = dict(zip(top_ids[r], top_vals[r]))
        entry[tok] = chosen[r]
        out.append(entry)
    return out, ranks


def _row_modes(p, n: int, device) -> SamplingMetadata:
    """A SamplingMetadata carrying only what report_source / token_ranks read, for n rows of one request."""
    full = torch.full((n,), True, device=device)
    return SamplingMetadata(
        temperature=None, top_k=None, top_p=None, min_p=None, seeds=None, counters=None,
        raw_logprobs=full if p.reports_raw else ~full, banned_rows=None, banned_tokens=None,
        need_filter=False, all_greedy=False, any_raw=p.reports_raw, num_top_logprobs=0,
        report_logits=full if p.reports_logits else None)
