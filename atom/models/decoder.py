"""One decoder-only transformer covering Llama, Mistral (every layer slides when config.json sets
a window), Qwen2 (biases on q / k / v only), Qwen3 (q/k RMSNorm) and Qwen3-MoE (sparse MLP);
other families (atom/models/mixtral.py, gpt_oss.py, deepseek_v3.py) subclass `CausalLM` and
override its `build_*` hooks for the layers they do differently.

forward takes tensors only: token ids, positions and the step's attention metadata.
"""
from __future__ import annotations

from typing import Iterable

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
    """Under tensor parallelism (tp) this rank holds num_heads / tp query and KV heads.

    window: sliding-window layer (None: full attention); sinks: a learned per-head logit in the
    softmax (GPT-OSS), split with the query heads under tensor parallelism. qkv_bias / o_bias:
    biases on the q / k / v and on the output projections (None: config.json's attention_bias).
    """

    def __init__(self, args: ModelArgs, qk_norm: bool, rotary: RotaryEmbedding, tp=None,
                 window: int | None = None, sinks: bool = False, qkv_bias: bool | None = None,
                 o_bias: bool | None = None) -> None:
        super().__init__()
        d, ways, kv = args.head_dim, 1 if tp is None else tp.size, args.num_key_value_heads
        # More ranks than KV heads: each KV head is replicated on ways / kv consecutive ranks.
        kv_replicas = ways // kv if ways > kv else 1
        self.num_heads, self.num_kv_heads = args.num_attention_heads // ways, kv * kv_replicas // ways
        self.head_dim = d
        self.qkv_proj = column_linear(args.hidden_size, [args.num_attention_heads * d, kv * d, kv * d],
                                      bias=args.attention_bias if qkv_bias is None else qkv_bias,
                                      shard_names=["q_proj", "k_proj", "v_proj"], tp=tp,
                                      replicas=[1, kv_replicas, kv_replicas])
        self.o_proj = row_linear(args.num_attention_heads * d, args.hidden_size,
                                 bias=args.attention_bias if o_bias is None else o_bias, tp=tp)
        self.q_norm = RMSNorm(d, args.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(d, args.rms_norm_eps) if qk_norm else None
        self.eps = args.rms_norm_eps
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, d, window)
        self.tp_shard_dims, self.tp_rank, self.tp_size = {"sinks": 0}, (0 if tp is None else tp.rank), ways
        self.sinks = nn.Parameter(torch.empty(self.num_heads), requires_grad=False) if sinks else None

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        meta = self.attn.layer_meta(meta)
        # One op after the qkv GEMM: q/k RMSNorm (Qwen3), RoPE, K/V into the paged cache; returns q.
        q = ops.qkv_prologue(
            self.qkv_proj(x), positions, self.rotary.cos_sin_cache,
            None if self.q_norm is None else self.q_norm.weight, None if self.k_norm is None else self.k_norm.weight,
            self.eps, self.num_heads, self.num_kv_heads, self.head_dim,
            self.attn.k_cache, self.attn.v_cache, meta.slot_mapping)
        return self.o_proj(self.attn(q, meta, self.sinks).reshape(n, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, family: "CausalLM", rotary: RotaryEmbedding,
                 parallel=None) -> None:
        super().__init__()
        self.self_attn = family.build_attention(args, layer, rotary, parallel)
        self.mlp = family.build_mlp(args, layer, parallel)
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
    def __init__(self, args: ModelArgs, family: "CausalLM", parallel=None) -> None:
        super().__init__()
        rotary = family.build_rotary(args)
        self.embed_tokens = embedding(args.vocab_size, args.hidden_size, None if parallel is None else parallel.tp)
        self.layers = nn.ModuleList(DecoderLayer(args, i, family, rotary, parallel)
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

    A family differs from the Llama / Qwen3 layer in `build_rotary`, `build_attention` and
    `build_mlp`; `checkpoint_renames` (regex, replacement) turn our parameter names into its
    checkpoint's (WeightMap accepts both), `checkpoint_skips` are checkpoint name prefixes
    (regexes) that are not loaded, and `convert_checkpoint` may rewrite the checkpoint's
    (name, tensor) stream (e.g. dequantise) before it is loaded.
    """

    qk_norm = False
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    stream_load = False  # True: sharded ranks read whole tensors through convert_checkpoint too
    graph_ops: tuple[str, ...] = ()  # family decode ops that must be graph_safe for CUDA graphs
    decode_attention_op = "paged_attention_decode"  # whose "cascade" capability the decode runner asks
    optional_weights: tuple[str, ...] = ()  # regexes of names a complete weight update may leave out
    # Attention projection biases fixed by the family (None: config.json's attention_bias).
    qkv_bias: bool | None = None
    o_proj_bias: bool | None = None

    def __init__(self, args: ModelArgs, parallel=None) -> None:
        super().__init__()
        self.args = args
        if parallel is not None and not parallel.is_parallel:
            parallel = None
        if parallel is not None:
            from atom.distributed.parallel_state import check_shardable
            check_shardable(args, parallel.layout)
        self.parallel = parallel
        self.model = DecoderBody(args, self, parallel)
        self.lm_head = lm_head(args.vocab_size, args.hidden_size, None if parallel is None else parallel.tp)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if any(args.is_sliding_layer(i) for i in range(args.num_hidden_layers)):
            self.graph_ops = (*self.graph_ops, "sliding_sink_attention_decode")  # Mixtral with a window
            self.decode_attention_op = "sliding_sink_attention_decode"

    # ---- what a family may change -----------------------------------------------------------
    def build_rotary(self, args: ModelArgs) -> RotaryEmbedding:
        return RotaryEmbedding(args.head_dim, args.max_position_embeddings, args.rope_theta, args.rope_scaling)

    def build_attention(self, args: ModelArgs, layer: int, rotary: RotaryEmbedding, parallel) -> nn.Module:
        window = args.sliding_window if args.is_sliding_layer(layer) else None
        return SelfAttention(args, self.qk_norm, rotary, None if parallel is None else parallel.tp, window,
                             qkv_bias=self.qkv_bias, o_bias=self.o_proj_bias)

    def build_mlp(self, args: ModelArgs, layer: int, parallel) -> nn.Module:
        if args.is_moe_layer(layer):
            return SparseMoE(args.hidden_size, args.moe_intermediate_size, args.num_experts,
                             args.num_experts_per_tok, args.norm_topk_prob, parallel)
        return GatedMLP(args.hidden_size, args.intermediate_size, None if parallel is None else parallel.tp,
                        args.mlp_bias)

    def checkpoint_skips(self) -> tuple[str, ...]:
        return ()

    def convert_checkpoint(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        return tensors

    # ---- running ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, H] of every token of the step."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor, widen: bool = True) -> torch.Tensor:
        """Logits of hidden's rows: float32, or with widen=False in the model's dtype (LMHead)."""
        return self.lm_head(hidden, widen)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def moe_layers(self) -> list[SparseMoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, SparseMoE)]


class LlamaForCausalLM(CausalLM):
    qk_norm = False


class MistralForCausalLM(CausalLM):
    """Llama's layer; config.json's sliding_window (when set) makes every layer slide."""

    qk_norm = False


class Qwen2ForCausalLM(CausalLM):
    """Llama's layer with biases on q / k / v (none on o_proj), whatever attention_bias says;
    use_sliding_window / max_window_layers as Qwen configs define them (hf_config.py)."""

    qk_norm = False
    qkv_bias = True
    o_proj_bias = False


class Qwen3ForCausalLM(CausalLM):
    qk_norm = True


class Qwen3MoeForCausalLM(CausalLM):
    qk_norm = True
