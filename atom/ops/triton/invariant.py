"""The batch-invariant Triton backend ("triton_invariant"; EngineConfig(batch_invariant=True) on CUDA).

A token's numbers must not depend on the rest of the batch, on its place in it, on how its prompt
was chunked or cached, or on whether it was computed in a decode step or in a prefill (a trainer
recomputes the whole sequence in one forward). The registry takes each op from here, else from
the triton backend where that op declares "batch_invariant" (norms, SiLU-and-mul, RoPE, KV write,
routing: one program per row, launch shapes from the model alone). What this backend changes:

  linear, lm_head    invariant_gemm: one tile config per weight for every M (cuBLAS and the
                     skinny kernel choose by M);
  paged attention    invariant_attention: fixed KV splits at absolute positions, the same
                     online-softmax steps in prefill, decode and the shared-prefix kernel;
  fused_moe,         one grouped-GEMM tile config for every token count (the triton backend picks
  moe_forward,       by count and takes a two-kernel path below 5 tokens); the per-token sum over
  fused_moe_biased   the top-k experts is in routing order, as there (fused_moe_biased: GPT-OSS's
                     biases and clamped SwiGLU in the same GEMMs' epilogues);
  qkv_prologue       a fixed number of heads per program (the triton op packs more heads per
                     program as the token count grows, which changes the q/k norm's reduction);
  sample             the vocabulary-split kernel at every batch size (the triton op switches at
                     256 rows), rows with top-k / top-p / min-p masked first by the torch filter
                     (row by row), and the reported logprobs taken from the same torch
                     log-softmax over the same row that prompt logprobs use, so a decode token's
                     logprob equals the prompt logprob a prefill of the sequence reports.

The families' own attention (windows, sinks) and clamped SwiGLU: invariant_families.py.
Every op is graph-safe (no host sync; grids from shapes and host-side bounds), so decode runs in
CUDA graphs as in the normal mode; padded graph rows cannot change real rows (rows never mix).
Costs: bench/batch_invariant.py.
"""
from __future__ import annotations

import torch

from atom.ops import torch_ops
from atom.ops.logits_processing import process_logits, report_source, token_ranks, top_count
from atom.ops.metadata import AttentionMetadata, SamplerOutput, SamplingMetadata
from atom.ops.registry import declare_backend, register
from atom.ops.triton import invariant_attention as attn
from atom.ops.triton import invariant_mla  # noqa: F401 (DeepSeek-V3's ops)
from atom.ops.triton import invariant_families  # noqa: F401 (registers the families' ops)
from atom.ops.triton.elementwise import qkv_prologue_launch
from atom.ops.triton.invariant_gemm import invariant_gemm
from atom.ops.triton.moe import Epilogue, experts_aligned, fused_moe_with, moe_route
from atom.ops.triton.sampling import _launch_split

B = "triton_invariant"
declare_backend(B, "graph_safe", "batch_invariant")
register("cascade_group_rows", B)(torch_ops.cascade_group_rows)  # a pure query: the generic rule

# fused_moe's tile configs for every token count: the triton backend's choice for 257..1024 tokens
# (a ~512-sequence decode step, where the rollout workloads spend their time; H200 sweep in moe.py).
MOE_UP = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)
MOE_DOWN = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)
# Heads per program of the attention prologue at every token count (the triton op's choice for
# a few hundred tokens and more).
PROLOGUE_HEADS = 8


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 2 or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"batch-invariant linear: weight {tuple(weight.shape)} {weight.dtype} on {weight.device} "
                         f"does not fit input {x.dtype} on {x.device}")


@register("linear", B)
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    _check(x, weight)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    return invariant_gemm(x2, w, b).reshape(*x.shape[:-1], weight.shape[0])


@register("lm_head", B)
def lm_head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return linear(hidden, weight)


@register("fused_moe", B, "skips_negative_ids")
def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    return fused_moe_with(x, w13, w2, topk_weights, topk_ids, MOE_UP, MOE_DOWN)


@register("fused_moe_biased", B, "skips_negative_ids")
def fused_moe_biased(x: torch.Tensor, w13: torch.Tensor, b13: torch.Tensor, w2: torch.Tensor,
                     b2: torch.Tensor | None, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     limit: float | None, alpha: float) -> torch.Tensor:
    """GPT-OSS's experts (torch_family_ops has the reference): fused_moe's aligned path and tiles
    with the bias + clamped-SwiGLU epilogues (never moe_small's path)."""
    x, w13, b13, w2 = (a if a.stride(-1) == 1 else a.contiguous() for a in (x, w13, b13, w2))
    b2 = b2 if b2 is None or b2.stride(-1) == 1 else b2.contiguous()
    ep = Epilogue(b13, b2, "clamped_swiglu", limit, alpha)
    return experts_aligned(x, w13, w2, topk_weights, topk_ids, ep, MOE_UP, MOE_DOWN)


@register("moe_forward", B)
def moe_forward(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                top_k: int, renormalize: bool) -> torch.Tensor:
    return fused_moe(x, w13, w2, *moe_route(router_logits, top_k, renormalize))


@register("qkv_prologue", B)
def qkv_prologue(qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                 q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float,
                 num_heads: int, num_kv_heads: int, head_dim: int, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    return qkv_prologue_launch(qkv, positions, cos_sin_cache, q_norm_weight, k_norm_weight, eps, num_heads,
                               num_kv_heads, head_dim, k_cache, v_cache, slot_mapping,
                               heads_per_program=PROLOGUE_HEADS)


@register("paged_attention_prefill", B)
def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float) -> torch.Tensor:
    return attn.paged_attention_prefill(q, k_cache, v_cache, meta, scale)


@register("paged_attention_decode", B, "cascade")
def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float) -> torch.Tensor:
    return attn.paged_attention_decode(q, k_cache, v_cache, meta, scale)


@register("sample", B)
def sample(logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
    """Tokens from the split kernel (the processed logits, filtered rows' excluded tokens at -inf);
    logprobs, top logprobs and ranks from torch_ops' row-wise reporting over the same values."""
    raw = logits.float()
    processed = process_logits(raw, meta)
    temperature = torch.where(meta.temperature > 0, meta.temperature, torch.ones_like(meta.temperature))
    scaled = processed / temperature[:, None]
    if meta.need_filter:  # the reference's filter (a row without filters comes out unchanged)
        scaled = torch_ops.filter_logits(scaled, meta.top_k, meta.top_p, meta.min_p)
        processed = processed.masked_fill(scaled == float("-inf"), float("-inf"))
    if processed.stride(-1) != 1:
        processed = processed.contiguous()
    rows, vocab = processed.shape
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        spare = torch.empty(rows, dtype=torch.float32, device=logits.device)  # the kernel's own logprobs, unused
        _launch_split(processed, meta.temperature.float(), meta.seeds, meta.counters, tokens, spare, spare,
                      meta.all_greedy, False)
    source = report_source(raw, scaled, None, meta)
    token_lps = source.gather(-1, tokens[:, None]).squeeze(-1)
    top_lps, top_ids = source.topk(top_count(meta, vocab), dim=-1)
    ranks = token_ranks(raw, scaled, tokens, meta) if meta.want_ranks else None
    return SamplerOutput(tokens, token_lps, top_ids, top_lps, ranks)
