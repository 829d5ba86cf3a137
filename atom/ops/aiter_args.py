"""Arguments of AITER kernels built from atom's metadata, in plain torch (no `import aiter`), so
that CPU tests can check them against a torch re-implementation of the kernel's semantics
(tests/test_aiter_args.py). atom/ops/aiter_ops.py passes them to the real kernels.

MLA decode (`aiter.mla.mla_decode_fwd`, aiter/mla.py): the kernel walks a page list per
sequence. atom's paged latent cache [num_blocks, block_size, 1, L + R] is viewed as pages of one
token ([num_blocks * block_size, 1, 1, L + R], as vLLM's ROCM_AITER_MLA backend does with its
kernel block size 1), so a sequence's pages are its token slots block * block_size + offset.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from atom.ops.metadata import AttentionMetadata


@dataclass
class MlaDecodeArgs:
    """The index tensors of mla_decode_fwd for one decode step, all int32 on the metadata's device.

    qo_indptr: [B+1] 0, 1, ..., B (one query token per sequence).
    kv_indptr: [B+1] where each sequence's pages start in kv_indices (page size 1: its tokens).
    kv_indices: [B * span] token slots, sequence after sequence; entries from kv_indptr[B] on are
        unused (the fixed size keeps the step's shapes independent of the lengths).
    kv_last_page_lens: [B] ones (every page holds one token).
    num_kv_splits_indptr: [B+1] b * num_kv_splits (the non-persistent kernel's split layout).
    """

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_lens: torch.Tensor
    num_kv_splits_indptr: torch.Tensor


def mla_decode_args(block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int, max_seq_len: int,
                    num_kv_splits: int) -> MlaDecodeArgs:
    """Page-size-1 page lists of a decode batch, on the device, without a host sync: every shape
    depends on (B, block_tables width, block_size, max_seq_len) only, so the construction can be
    captured in a CUDA graph. max_seq_len: a host-side bound of seq_lens (metadata's).

    A row of length 0 (a padded CUDA-graph row) gets one page (its first block's first slot) so
    that the kernel never sees an empty softmax; its output is to be discarded or zeroed."""
    batch, width = block_tables.shape
    dev = block_tables.device
    span = max(1, min(width * block_size, max_seq_len))
    lens = seq_lens.to(torch.int32).clamp(min=1)
    kv_indptr = torch.zeros(batch + 1, dtype=torch.int32, device=dev)
    kv_indptr[1:] = lens.cumsum(0, dtype=torch.int32)
    pos = torch.arange(span, dtype=torch.int32, device=dev)
    slots = block_tables.to(torch.int32)[:, (pos // block_size).long()] * block_size + pos % block_size
    # Scatter each row's first lens[b] slots to kv_indptr[b] + p; the rest go to one trash entry.
    trash = batch * span
    dest = torch.where(pos[None, :] < lens[:, None], kv_indptr[:-1, None] + pos[None, :], trash)
    packed = torch.zeros(trash + 1, dtype=torch.int32, device=dev)
    packed.scatter_(0, dest.reshape(-1).long(), slots.reshape(-1))
    rows = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    return MlaDecodeArgs(qo_indptr=rows, kv_indptr=kv_indptr, kv_indices=packed[:trash],
                         kv_last_page_lens=torch.ones(batch, dtype=torch.int32, device=dev),
                         num_kv_splits_indptr=rows * num_kv_splits)


_step_args: dict[int, tuple] = {}


def step_mla_decode_args(meta: AttentionMetadata, block_size: int, num_kv_splits: int) -> MlaDecodeArgs:
    """mla_decode_args of a step, built once per metadata and reused by every layer. Keyed by the
    index tensors' versions (the CUDA-graph runner rewrites one metadata in place each step) and
    by whether a graph is being captured: lists made during a capture are filled only when the
    graph replays, so eager calls never reuse them (and a capture builds its own, once)."""
    capturing = meta.seq_lens.is_cuda and torch.cuda.is_current_stream_capturing()
    key = (meta.block_tables.data_ptr(), meta.block_tables._version, meta.seq_lens.data_ptr(),
           meta.seq_lens._version, block_size, meta.max_seq_len, num_kv_splits, capturing)
    hit = _step_args.get(id(meta))
    if hit is not None and hit[0]() is meta and hit[1] == key:
        return hit[2]
    args = mla_decode_args(meta.block_tables, meta.seq_lens, block_size, meta.max_seq_len, num_kv_splits)
    ref = weakref.ref(meta, lambda _, k=id(meta): _step_args.pop(k, None))
    _step_args[id(meta)] = (ref, key, args)
    return args


def run_mla_decode(kernel: Callable, q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                   meta: AttentionMetadata, scale: float, args: MlaDecodeArgs, num_kv_splits: int) -> torch.Tensor:
    """atom's mla_attention_decode through an mla_decode_fwd-like `kernel` (AITER's, or a test's
    re-implementation): q = [q_latent | q_pe] [B, H, L + R], the cache as one-token pages, the
    output [B, H, L] written by the kernel in place; rows of length 0 are zeroed (as the triton
    kernel leaves them), whatever the kernel wrote there."""
    batch, heads, lat = q_latent.shape
    q = torch.cat((q_latent, q_pe), dim=-1)
    out = torch.empty(batch, heads, lat, dtype=q_latent.dtype, device=q_latent.device)
    pages = kv_cache.view(-1, 1, 1, kv_cache.shape[-1])
    # aiter/mla.py mla_decode_fwd(q, kv_buffer [pages, page_size, nhead_kv, L + R], o [B, H, L], qo_indptr,
    # kv_indptr, kv_indices, kv_last_page_lens, max_seqlen_q, page_size, nhead_kv, sm_scale, logit_cap,
    # num_kv_splits, num_kv_splits_indptr, ...): o is written in place (the return value is (logits, lse)).
    kernel(q, pages, out, args.qo_indptr, args.kv_indptr, args.kv_indices, args.kv_last_page_lens, 1,
           page_size=1, nhead_kv=1, sm_scale=scale, num_kv_splits=num_kv_splits,
           num_kv_splits_indptr=args.num_kv_splits_indptr)
    return out.masked_fill_((meta.seq_lens == 0)[:, None, None], 0)
