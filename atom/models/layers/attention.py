from __future__ import annotations

import torch
from torch import nn

from atom.ops import ops
from atom.ops.metadata import AttentionMetadata


class PagedAttention(nn.Module):
    """Writes the step's K/V into the paged cache, then attends over each sequence's blocks.

    The runner assigns k_cache / v_cache ([num_blocks, block_size, kv_heads, head_dim]) after
    sizing the KV pool; until then they are empty.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        ops.kv_cache_write(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        attend = ops.paged_attention_decode if meta.is_decode else ops.paged_attention_prefill
        return attend(q, self.k_cache, self.v_cache, meta, self.scale)
