"""Per-step attention metadata: tensors the attention ops read to find each sequence's KV."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Tokens of one step, laid out sequence after sequence.

    slot_mapping: [T] KV slot (block * block_size + offset) each new token writes; -1 = skip.
    query_start_loc: [B+1] where each sequence's new tokens start in the flat token batch.
    seq_lens: [B] KV length of each sequence after this step (cached prefix + new tokens).
    block_tables: [B, max_blocks] KV blocks of each sequence, padded with 0.
    is_decode: every sequence has exactly one new token (the CUDA-graph path).
    max_query_len / max_seq_len: host-side bounds for kernels that size their grids.
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    is_decode: bool
    max_query_len: int
    max_seq_len: int


@dataclass
class SamplingMetadata:
    """Per-row sampling settings of one step, as tensors on the logits' device.

    temperature: [B] float, 0 = greedy. top_k: [B] int, 0 = off. top_p, min_p: [B] float.
    seeds, counters: [B] int64; a row's random numbers are a pure function of
        (seed, counter, token id), so a request samples the same whatever shares its batch.
    raw_logprobs: [B] bool, report log_softmax of the unscaled logits instead of the processed ones.
    banned_rows / banned_tokens: pairs masked to -inf before sampling (min_tokens), or None.
    need_filter / all_greedy / num_top_logprobs: host-side flags so no op needs to sync.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    seeds: torch.Tensor
    counters: torch.Tensor
    raw_logprobs: torch.Tensor
    banned_rows: torch.Tensor | None
    banned_tokens: torch.Tensor | None
    need_filter: bool
    all_greedy: bool
    any_raw: bool
    num_top_logprobs: int


@dataclass
class SamplerOutput:
    """token_ids, logprobs: [B]; top_ids, top_logprobs: [B, K] (K = num_top_logprobs, may be 0)."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor
