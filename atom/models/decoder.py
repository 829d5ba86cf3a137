"""One decoder-only transformer covering Llama, Qwen3 (q/k RMSNorm) and Qwen3-MoE (sparse MLP).

forward takes tensors only: token ids, positions and the step's attention metadata.
"""
from __future__ import annotations

import torch
from torch import nn

from atom.models.hf_config import ModelArgs
from atom.models.layers.attention import PagedAttention
from atom.models.layers.embedding import embedding, lm_head
from atom.models.layers.linear import column_linear, row_linear
from atom.models.layers.mlp import GatedMLP, SparseMoE
from atom.models.layers.norm import RMSNorm
from atom.models.layers.rotary import RotaryEmbedding
from atom.ops import ops
from atom.ops.metadata import AttentionMetadata


class SelfAttention(nn.Module):
    """Under tensor parallelism (tp) this rank holds num_heads / tp query and KV heads."""

    def __init__(self, args: ModelArgs, qk_norm: bool, rotary: RotaryEmbedding, tp=None) -> None:
        super().__init__()
        d, ways, kv = args.head_dim, 1 if tp is None else tp.size, args.num_key_value_heads
        # More ranks than KV heads: each KV head is replicated on ways / kv consecutive ranks.
        kv_replicas = ways // kv if ways > kv else 1
        self.num_heads, self.num_kv_heads = args.num_attention_heads // ways, kv * kv_replicas // ways
        self.head_dim = d
        self.qkv_proj = column_linear(args.hidden_size, [args.num_attention_heads * d, kv * d, kv * d],
                                      bias=args.attention_bias, shard_names=["q_proj", "k_proj", "v_proj"], tp=tp,
                                      replicas=[1, kv_replicas, kv_replicas])
        self.o_proj = row_linear(args.num_attention_heads * d, args.hidden_size, bias=args.attention_bias, tp=tp)
        self.q_norm = RMSNorm(d, args.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(d, args.rms_norm_eps) if qk_norm else None
        self.eps = args.rms_norm_eps
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, d)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        # One op after the qkv GEMM: q/k RMSNorm (Qwen3), RoPE, K/V into the paged cache; returns q.
        q = ops.qkv_prologue(
            self.qkv_proj(x), positions, self.rotary.cos_sin_cache,
            None if self.q_norm is None else self.q_norm.weight, None if self.k_norm is None else self.k_norm.weight,
            self.eps, self.num_heads, self.num_kv_heads, self.head_dim,
            self.attn.k_cache, self.attn.v_cache, meta.slot_mapping)
        return self.o_proj(self.attn(q, meta).reshape(n, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, qk_norm: bool, rotary: RotaryEmbedding, parallel=None) -> None:
        super().__init__()
        tp = None if parallel is None else parallel.tp
        self.self_attn = SelfAttention(args, qk_norm, rotary, tp)
        if args.is_moe_layer(layer):
            self.mlp = SparseMoE(args.hidden_size, args.moe_intermediate_size, args.num_experts,
                                 args.num_experts_per_tok, args.norm_topk_prob, parallel)
        else:
            self.mlp = GatedMLP(args.hidden_size, args.intermediate_size, tp)
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
    def __init__(self, args: ModelArgs, qk_norm: bool, parallel=None) -> None:
        super().__init__()
        rotary = RotaryEmbedding(args.head_dim, args.max_position_embeddings, args.rope_theta)
        self.embed_tokens = embedding(args.vocab_size, args.hidden_size, None if parallel is None else parallel.tp)
        self.layers = nn.ModuleList(DecoderLayer(args, i, qk_norm, rotary, parallel)
                                    for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        return self.norm(x, residual)[0]


class CausalLM(nn.Module):
    """HF-compatible module tree (`model.layers.N...`, `lm_head`) so parameter names map by rule.

    parallel: an atom.distributed ParallelState (None: one process). Its shapes are this rank's
    shards; ParallelState.unconnected(...) builds them without any process group.
    """

    qk_norm = False

    def __init__(self, args: ModelArgs, parallel=None) -> None:
        super().__init__()
        self.args = args
        if parallel is not None and not parallel.is_parallel:
            parallel = None
        if parallel is not None:
            from atom.distributed.parallel_state import check_shardable
            check_shardable(args, parallel.layout)
        self.parallel = parallel
        self.model = DecoderBody(args, self.qk_norm, parallel)
        self.lm_head = lm_head(args.vocab_size, args.hidden_size, None if parallel is None else parallel.tp)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, H] of every token of the step."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def moe_layers(self) -> list[SparseMoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, SparseMoE)]


class LlamaForCausalLM(CausalLM):
    qk_norm = False


class Qwen3ForCausalLM(CausalLM):
    qk_norm = True


class Qwen3MoeForCausalLM(CausalLM):
    qk_norm = True
