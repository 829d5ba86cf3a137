from __future__ import annotations

import torch
from torch import nn

from atom.ops import ops
from atom.ops.metadata import AttentionMetadata


class PagedAttention(nn.Module):
    """Attends over each sequence's blocks of the paged KV cache.

    The step's own K/V must already be in the cache: the model writes them with `ops.qkv_prologue`
    (fused with q/k norm and RoPE), or `write_kv` does it for callers that hold k and v.
    The runner assigns k_cache / v_cache ([num_blocks, block_size, kv_heads, head_dim]) after
    sizing the KV pool (`kv_cache_shapes`); until then they are empty.

    window: a sliding-window layer's window in tokens (None: full attention); `forward`'s sinks:
    per-head sink logits (GPT-OSS). Either one selects the sliding_sink_attention ops.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, window: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.window = window
        self.k_cache = self.v_cache = torch.empty(0)

    def kv_cache_shapes(self, block_size: int) -> dict[str, tuple[int, ...]]:
        """The cache tensors this layer needs (attribute -> shape of one block)."""
        shape = (block_size, self.num_kv_heads, self.head_dim)
        return {"k_cache": shape, "v_cache": shape}

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """k, v: [T, kv_heads, head_dim] into the cache at meta.slot_mapping (-1 = skip)."""
        ops.kv_cache_write(k, v, self.k_cache, self.v_cache, self.layer_meta(meta).slot_mapping)

    def layer_meta(self, meta: AttentionMetadata) -> AttentionMetadata:
        """The metadata this layer reads and writes the cache with: a sliding layer's own tables
        when the runner gave it a window group, else the step's."""
        return meta.window if self.window is not None and meta.window is not None else meta

    def forward(self, q: torch.Tensor, meta: AttentionMetadata, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """q: [T, Hq, D]; meta: from layer_meta."""
        if self.window is None and sinks is None:
            attend = ops.paged_attention_decode if meta.is_decode else ops.paged_attention_prefill
            return attend(q, self.k_cache, self.v_cache, meta, self.scale)
        attend = ops.sliding_sink_attention_decode if meta.is_decode else ops.sliding_sink_attention_prefill
        return attend(q, self.k_cache, self.v_cache, meta, self.scale, self.window, sinks)
