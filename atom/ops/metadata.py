"""Per-step attention metadata: tensors the attention ops read to find each sequence's KV."""
from __future__ import annotations

from dataclasses import dataclass, field

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
    cascade: shared-prefix groups of a decode step (see CascadeMetadata), or None.
    window: the sliding-window layers' own slots and block tables (hybrid models whose sliding
        layers give back blocks: atom/engine/window_blocks.py), or None: they use these.
    host_query_start_loc / host_seq_lens: the same as host lists, or None (ops that need them on
        the host, e.g. to group sequences, then read the device tensors: a sync per call).
    op_plans: what an op derives from this metadata once a step and every layer reuses (e.g.
        the MLA prefill's gather indices), keyed by the op; it lives and dies with the step's
        metadata (the eager path builds new metadata every step).
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    is_decode: bool
    max_query_len: int
    max_seq_len: int
    cascade: "CascadeMetadata | None" = None
    window: "AttentionMetadata | None" = None
    host_query_start_loc: list[int] | None = None
    host_seq_lens: list[int] | None = None
    op_plans: dict = field(default_factory=dict, repr=False)


def used_block_tables(meta: AttentionMetadata, block_size: int) -> torch.Tensor:
    """meta.block_tables without the columns past the longest sequence's last block, for ops that
    gather every entry of a row: the decode runner's static tables span max_model_len. Reads one
    length on the host (a sync on a GPU, where the ops that gather are references only)."""
    if meta.host_seq_lens is not None:
        longest = max(meta.host_seq_lens, default=0)
    else:
        longest = int(meta.seq_lens.max()) if meta.seq_lens.numel() else 0
    return meta.block_tables[:, : max(1, -(-longest // block_size))]


@dataclass
class CascadeMetadata:
    """Decode only, optional: KV blocks shared by groups of sequences (the n samples of one prompt).

    Kernels that know it read each group's shared prefix once for all members; the others ignore
    it (the maths is the same).
    group_rows: [G, MAX_N] int32 batch rows of each group's members, -1 padded.
    group_prefix_len: [G] int32 tokens of the group's shared prefix (whole blocks); 0 = no group.
    row_prefix_len: [B] int32 prefix length of the row's group (0 if none): its own KV starts there.
    max_prefix_len: host-side upper bound of group_prefix_len (sizes kernel grids).
    """

    group_rows: torch.Tensor
    group_prefix_len: torch.Tensor
    row_prefix_len: torch.Tensor
    max_prefix_len: int


@dataclass
class LogitsProcessing:
    """Per-row changes to the logits before temperature, in vLLM's order: allowed tokens, then the
    banned (row, token) pairs of SamplingMetadata, then logit bias, then the penalties.

    allowed_rows / allowed_tokens: (row, token) pairs; a row listed here keeps only its tokens.
    bias_rows / bias_tokens / bias_values: logit_bias entries, added.
    repetition / presence / frequency: [B] float32 penalties (1 / 0 / 0 = off), or None when no
        row has one.
    penalty_slots: [B] int64 row of the penalty state each logits row reads, -1 for rows without
        penalties (they carry 1 / 0 / 0; an implementation may read any slot for them, those
        values leave the logits bit for bit unchanged).
    token_counts: [slots, W] int16 / int32, how often each slot's sequence generated each token
        (W: V rounded up to a multiple of 64; the columns from V on are 0).
    prompt_mask: [slots, W / 8] uint8, bit t % 8 of byte t // 8 set when token t is in the slot's
        prompt. (The engine keeps both across steps: atom/engine/penalties.py.)
    All are tensors on the logits' device, or None.
    any_repetition / any_counted: host-side flags, whether some row has a repetition penalty /
        a presence or frequency penalty (the others' passes are skipped).
    """

    allowed_rows: torch.Tensor | None = None
    allowed_tokens: torch.Tensor | None = None
    bias_rows: torch.Tensor | None = None
    bias_tokens: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    repetition: torch.Tensor | None = None
    presence: torch.Tensor | None = None
    frequency: torch.Tensor | None = None
    penalty_slots: torch.Tensor | None = None
    token_counts: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    any_repetition: bool = True
    any_counted: bool = True

    def to(self, device) -> "LogitsProcessing":
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return LogitsProcessing(**moved)


@dataclass
class SamplingMetadata:
    """Per-row sampling settings of one step, as tensors on the logits' device.

    temperature: [B] float, 0 = greedy. top_k: [B] int, 0 = off. top_p, min_p: [B] float.
    seeds, counters: [B] int64; a row's random numbers are a pure function of
        (seed, counter, token id), so a request samples the same whatever shares its batch.
    raw_logprobs: [B] bool, report values of the unprocessed logits instead of the processed ones.
    banned_rows / banned_tokens: pairs masked to -inf before sampling (min_tokens, bad words), or None.
    need_filter / all_greedy / num_top_logprobs: host-side flags so no op needs to sync;
        num_top_logprobs -1 = the whole vocabulary.
    report_logits: [B] bool, report logits instead of logprobs (the "*_logits" modes), or None.
    processing: penalties, logit bias and allowed tokens (None when no row has any).
    want_ranks: also return each sampled token's rank.
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
    report_logits: torch.Tensor | None = None
    processing: LogitsProcessing | None = None
    want_ranks: bool = False

    @property
    def any_logits(self) -> bool:
        return self.report_logits is not None


@dataclass
class SamplerOutput:
    """token_ids, logprobs: [B]; top_ids, top_logprobs: [B, K] (K = num_top_logprobs, may be 0);
    ranks: [B] rank of each sampled token (1 = the best; tokens of equal value count as better,
    as vLLM counts), or None when not asked for. `logprobs` holds logits for rows in a logits mode."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor
    ranks: torch.Tensor | None = None
