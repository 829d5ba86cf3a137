"""Builds the per-row sampling tensors of a step and turns logits into prompt logprobs."""
from __future__ import annotations

import torch

from atom.engine.sequence import Sequence, stream_counter
from atom.ops.metadata import SamplingMetadata
from atom.ops.torch_ops import filter_logits


def sampling_metadata(rows: list[tuple[Sequence, int]], eos_ids: list[int],
                      device: torch.device, lag: int = 0) -> SamplingMetadata:
    """rows: (sequence, sample index) per logits row; the sample index picks the random stream
    (a forking prefill samples all n first tokens from one row of logits). lag: tokens each
    sequence has in flight (sampled, not yet appended) in an overlapped decode step."""
    temps, top_ks, top_ps, min_ps, seeds, counters, raw = [], [], [], [], [], [], []
    banned_rows, banned_tokens = [], []
    num_top = 0
    for r, (seq, sample_index) in enumerate(rows):
        p = seq.params
        temps.append(float(p.temperature))
        top_ks.append(p.effective_top_k)
        top_ps.append(float(p.top_p))
        min_ps.append(float(p.min_p))
        seeds.append(seq.request.seed)
        num_output = seq.num_output_tokens + lag
        counters.append(stream_counter(sample_index, num_output))
        raw.append(p.logprobs_mode == "raw")
        num_top = max(num_top, p.logprobs or 0)
        if num_output < p.min_tokens:
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_ids))
            banned_rows += [r] * len(stops)
            banned_tokens += sorted(stops)

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
    )


def prompt_logprobs(logits: torch.Tensor, seq: Sequence, targets: list[int]) -> list[dict[int, float]]:
    """One {token: logprob} per row: the actual next prompt token plus the top-k alternatives,
    under the same processing the request's samples get (raw, or temperature + filters)."""
    p = seq.params
    logits = logits.float()
    if p.logprobs_mode == "processed":
        if p.temperature > 0:
            logits = logits / p.temperature
        n = logits.shape[0]
        if p.effective_top_k > 0 or p.top_p < 1.0 or p.min_p > 0:
            logits = filter_logits(logits, torch.full((n,), p.effective_top_k, device=logits.device),
                                   torch.full((n,), p.top_p, device=logits.device),
                                   torch.full((n,), p.min_p, device=logits.device))
    logprobs = logits.log_softmax(-1)
    target = torch.tensor(targets, device=logits.device)
    chosen = logprobs.gather(-1, target[:, None]).squeeze(-1).tolist()
    k = p.prompt_logprobs or 0
    top_vals, top_ids = logprobs.topk(k, dim=-1)
    top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    out = []
    for r, tok in enumerate(targets):
        entry = dict(zip(top_ids[r], top_vals[r]))
        entry[tok] = chosen[r]
        out.append(entry)
    return out
