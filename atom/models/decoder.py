"""One decoder-only transformer covering Llama, Qwen3 (q/k RMSNorm) and Qwen3-MoE (sparse MLP).

forward takes tensors only: token ids, positions and the step's attention metadata.
"""
from __future__ import annotations

import torch
from torch import nn

from atom.models.hf_config import ModelArgs
from atom.models.layers.attention import PagedAttention
from atom.models.layers.embedding import Embedding, LMHead
from atom.models.layers.linear import Linear
from atom.models.layers.mlp import GatedMLP, SparseMoE
from atom.models.layers.norm import RMSNorm
from atom.models.layers.rotary import RotaryEmbedding
from atom.ops.metadata import AttentionMetadata


class SelfAttention(nn.Module):
    def __init__(self, args: ModelArgs, qk_norm: bool, rotary: RotaryEmbedding) -> None:
        super().__init__()
        d = args.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, d
        self.qkv_proj = Linear(args.hidden_size, [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d],
                               bias=args.attention_bias, shard_names=["q_proj", "k_proj", "v_proj"])
        self.o_proj = Linear(self.num_heads * d, args.hidden_size)
        self.q_norm = RMSNorm(d, args.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(d, args.rms_norm_eps) if qk_norm else None
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, d)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim], -1)
        q = q.reshape(n, self.num_heads, self.head_dim)
        k = k.reshape(n, self.num_kv_heads, self.head_dim)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, meta).reshape(n, -1))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, qk_norm: bool, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = SelfAttention(args, qk_norm, rotary)
        if args.is_moe_layer(layer):
            self.mlp = SparseMoE(args.hidden_size, args.moe_intermediate_size, args.num_experts,
                                 args.num_experts_per_tok, args.norm_topk_prob)
        else:
            self.mlp = GatedMLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderBody(nn.Module):
    def __init__(self, args: ModelArgs, qk_norm: bool) -> None:
        super().__init__()
        rotary = RotaryEmbedding(args.head_dim, args.max_position_embeddings, args.rope_theta)
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i, qk_norm, rotary) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        return self.norm(x, residual)[0]


class CausalLM(nn.Module):
    """HF-compatible module tree (`model.layers.N...`, `lm_head`) so parameter names map by rule."""

    qk_norm = False

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = DecoderBody(args, self.qk_norm)
        self.lm_head = LMHead(args.vocab_size, args.hidden_size)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, H] of every token of the step."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]


class LlamaForCausalLM(CausalLM):
    qk_norm = False


class Qwen3ForCausalLM(CausalLM):
    qk_norm = True


class Qwen3MoeForCausalLM(CausalLM):
    qk_norm = True
