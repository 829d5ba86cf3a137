"""Multi-head latent attention (DeepSeek-V2/V3) with the compressed KV in the paged cache.

Per token the cache holds one row of kv_lora_rank + qk_rope_head_dim values for all heads: the
normalised latent c = RMSNorm(x W_kv_a) and the roped shared key k_pe. Heads are recovered from
c by kv_b_proj (W_uk for the keys' no-RoPE part, W_uv for the values):

* prefill expands the sequence's latents to per-head K/V (`mla_attention_prefill`), as HF does;
* decode uses the absorbed form: q_nope W_uk is a query in latent space (`mla_absorb_query`), the
  attention reads the latents directly (`mla_attention_decode`), and W_uv is applied to its
  [H, L] output (`mla_expand_output`). (Batch-invariant mode's prefill takes this form too.)

Under tensor parallelism the heads are split (q_proj / q_b_proj, kv_b_proj column-parallel,
o_proj row-parallel); q_a_proj, kv_a_proj_with_mqa and the latent cache are replicated.
"""
from __future__ import annotations

import torch
from torch import nn

from atom.models.hf_config import ModelArgs
from atom.models.layers.linear import Linear, column_linear, row_linear
from atom.models.layers.norm import RMSNorm
from atom.models.layers.rotary import RotaryEmbedding, yarn_factor, yarn_mscale
from atom.ops import ops
from atom.ops.metadata import AttentionMetadata

# HF builds q_a_layernorm / kv_a_layernorm without passing rms_norm_eps (as DeepSeek's own code).
_LATENT_NORM_EPS = 1e-6


class LatentCache(nn.Module):
    """The paged latent cache of one MLA layer ([num_blocks, block_size, 1, L + R], set by the
    runner) and its attention ops."""

    def __init__(self, num_heads: int, latent_dim: int, rope_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, 1
        self.latent_dim, self.rope_dim, self.scale = latent_dim, rope_dim, scale
        self.kv_cache = torch.empty(0)

    def kv_cache_shapes(self, block_size: int) -> dict[str, tuple[int, ...]]:
        return {"kv_cache": (block_size, 1, self.latent_dim + self.rope_dim)}


def mla_softmax_scale(args: ModelArgs) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (HF's yarn_apply_mscale)."""
    scale = (args.qk_nope_head_dim + args.qk_rope_head_dim) ** -0.5
    scaling = args.rope_scaling
    if scaling is not None and scaling.get("mscale_all_dim"):
        m = yarn_mscale(yarn_factor(scaling, args.max_position_embeddings), scaling["mscale_all_dim"])
        scale *= m * m
    return scale


class MultiLatentAttention(nn.Module):
    """DeepSeek-V3 `self_attn`: HF parameter names (q_proj or q_a_proj / q_a_layernorm / q_b_proj,
    kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj); q_proj or q_a_proj and
    kv_a_proj_with_mqa are rows of one fused qkv_a_proj (the loader's shard names)."""

    def __init__(self, args: ModelArgs, rotary: RotaryEmbedding, tp=None) -> None:
        super().__init__()
        ways = 1 if tp is None else tp.size
        heads = args.num_attention_heads
        self.num_heads = heads // ways
        self.nope, self.rope, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.latent_dim, self.interleaved = args.kv_lora_rank, args.rope_interleave
        qk = self.nope + self.rope
        bias = args.attention_bias
        lora = args.q_lora_rank
        kv_a = self.latent_dim + self.rope
        # q_proj (or q_a_proj) and kv_a_proj_with_mqa read the same x: one GEMM for both (at a
        # 512-row decode step kv_a's 576 columns alone fill few of the GPU's SMs). HF gives
        # q_proj no bias and kv_a attention_bias's: with a bias and no q_lora they stay two.
        if lora is not None or not bias:
            self.q_out = self.num_heads * qk if lora is None else lora
            self.qkv_a_proj = column_linear(
                args.hidden_size, [heads * qk if lora is None else lora, kv_a], bias,
                shard_names=["q_proj" if lora is None else "q_a_proj", "kv_a_proj_with_mqa"], tp=tp,
                replicas=[1 if lora is None else ways, ways])  # under TP: q_proj's heads split, the rest whole
        else:
            self.q_proj = column_linear(args.hidden_size, heads * qk, tp=tp)
            self.kv_a_proj_with_mqa = Linear(args.hidden_size, kv_a, bias=bias)
        if lora is not None:
            self.q_a_layernorm = RMSNorm(lora, _LATENT_NORM_EPS)
            self.q_b_proj = column_linear(lora, heads * qk, tp=tp)
        self.kv_a_layernorm = RMSNorm(self.latent_dim, _LATENT_NORM_EPS)
        self.kv_b_proj = column_linear(self.latent_dim, heads * (self.nope + self.v_dim), tp=tp)
        self.o_proj = row_linear(heads * self.v_dim, args.hidden_size, bias=bias, tp=tp)
        self.rotary = rotary
        self.attn = LatentCache(self.num_heads, self.latent_dim, self.rope, mla_softmax_scale(args))

    def _rope(self, positions: torch.Tensor, q_pe: torch.Tensor, k_pe: torch.Tensor):
        # interleaved: pairs (x0, x1), (x2, x3), ..., rotated as HF does, as neox halves of (evens | odds)
        return ops.rotary_embedding(positions, q_pe, k_pe, self.rotary.cos_sin_cache, interleaved=self.interleaved)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        if hasattr(self, "qkv_a_proj"):
            q, latent, k_pe = self.qkv_a_proj(x).split([self.q_out, self.latent_dim, self.rope], dim=-1)
        else:
            q = self.q_proj(x)
            latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.latent_dim, self.rope], dim=-1)
        if hasattr(self, "q_b_proj"):
            q = self.q_b_proj(self.q_a_layernorm(q))  # the norm ops read strided rows: no copy
        q_nope, q_pe = q.view(t, self.num_heads, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_pe, k_pe = self._rope(positions, q_pe, k_pe.reshape(t, 1, self.rope))
        ops.mla_cache_write(latent, k_pe[:, 0], self.attn.kv_cache, meta.slot_mapping)
        # kv_b_proj rows per head: the no-RoPE key part (W_uk) then the value part (W_uv).
        w_kv_b = self.kv_b_proj.weight
        if meta.is_decode:
            q_latent = ops.mla_absorb_query(q_nope, w_kv_b)
            out_latent = ops.mla_attention_decode(q_latent, q_pe, self.attn.kv_cache, meta, self.attn.scale)
            out = ops.mla_expand_output(out_latent, w_kv_b, self.nope)
        else:
            out = ops.mla_attention_prefill(q_nope, q_pe, self.attn.kv_cache, w_kv_b, meta, self.attn.scale)
        return self.o_proj(out.reshape(t, self.num_heads * self.v_dim))
