"""DeepSeek-V3 (`DeepseekV3ForCausalLM`; also Moonlight / Kimi-style checkpoints of it).

* Attention: multi-head latent attention with the compressed KV cache (atom/models/layers/mla.py),
  q_lora_rank set (q_a_proj -> norm -> q_b_proj) or null (q_proj), YaRN RoPE on the
  qk_rope_head_dim part (interleaved pairs unless rope_interleave is false) and YaRN's mscale in
  the softmax scale.
* MLP: dense for the first `first_k_dense_replace` layers, then MoE: `noaux_tc` routing (sigmoid
  scores, `e_score_correction_bias` for the choice only, `n_group` / `topk_group` group-limited
  top-k, optional renormalisation, `routed_scaling_factor`) plus always-on shared experts.
* The multi-token-prediction layers some checkpoints carry (model.layers.{num_hidden_layers}...,
  `num_nextn_predict_layers`) are for speculative decoding; they are not loaded.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from atom.models.decoder import CausalLM
from atom.models.hf_config import ModelArgs
from atom.models.layers.mla import MultiLatentAttention
from atom.models.layers.mlp import GatedMLP, SparseMoE
from atom.models.layers.rotary import RotaryEmbedding
from atom.ops import ops

log = logging.getLogger(__name__)


class DeepseekMoE(SparseMoE):
    """Group-limited sigmoid routing over the routed experts, plus the shared experts (a dense
    gated MLP every token goes through, added after the routed experts are combined)."""

    def __init__(self, args: ModelArgs, parallel=None) -> None:
        super().__init__(args.hidden_size, args.moe_intermediate_size, args.num_experts, args.num_experts_per_tok,
                         args.norm_topk_prob, parallel)
        self.num_groups, self.topk_groups = args.n_group, args.topk_group
        self.scaling = args.routed_scaling_factor
        # A buffer in HF (not in named_parameters): optional in weight updates, see the model class.
        self.e_score_correction_bias = nn.Parameter(torch.zeros(args.num_experts), requires_grad=False)
        self.shared_experts = None
        if args.n_shared_experts:
            self.shared_experts = GatedMLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts,
                                           None if parallel is None else parallel.tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if self.shared_experts is None else out + self.shared_experts(x)

    def forward_local(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, *self.route_recorded(x))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = ops.router_linear(x, self.gate.weight)  # float32, as HF routes
        return ops.moe_route_grouped(logits, self.e_score_correction_bias, self.top_k, self.num_groups,
                                     self.topk_groups, self.renormalize, self.scaling)


def _check_routing(args: ModelArgs) -> None:
    if args.scoring_func != "sigmoid" or args.topk_method != "noaux_tc":
        raise ValueError(f"DeepseekV3ForCausalLM: routing scoring_func={args.scoring_func!r}, "
                         f"topk_method={args.topk_method!r} is not supported (only 'sigmoid' with 'noaux_tc')")
    e, groups, top = args.num_experts, args.n_group, args.topk_group
    if e % groups or not 1 <= top <= groups or args.num_experts_per_tok > top * (e // groups):
        raise ValueError(f"DeepseekV3ForCausalLM: n_group={groups} must divide n_routed_experts={e}, and "
                         f"topk_group={top} groups must hold num_experts_per_tok={args.num_experts_per_tok} experts")
    if args.kv_lora_rank < 1 or args.qk_rope_head_dim < 2 or args.v_head_dim < 1:
        raise ValueError("DeepseekV3ForCausalLM: kv_lora_rank, qk_rope_head_dim and v_head_dim must be set")


class DeepseekV3ForCausalLM(CausalLM):
    checkpoint_renames = ((r"\.mlp\.e_score_correction_bias$", ".mlp.gate.e_score_correction_bias"),)
    # e_score_correction_bias is a buffer in HF models: trainers' named_parameters() do not carry it.
    optional_weights = (r"\.mlp\.gate\.e_score_correction_bias$",)
    graph_ops = ("mla_cache_write", "mla_attention_decode", "fused_moe", "router_linear", "moe_route_grouped")
    decode_attention_op = "mla_attention_decode"

    def __init__(self, args: ModelArgs, parallel=None) -> None:
        _check_routing(args)
        tp = 1 if parallel is None or not parallel.is_parallel else parallel.layout.tp
        shared = args.moe_intermediate_size * args.n_shared_experts
        if shared % tp:
            raise ValueError(f"cannot shard the model: tensor_parallel_size={tp} does not divide the shared experts' "
                             f"intermediate size {shared}")
        if args.num_nextn_predict_layers:
            log.info("DeepSeek-V3: the checkpoint's %d multi-token-prediction layer(s) (model.layers.%d...) are "
                     "not loaded (they serve speculative decoding)", args.num_nextn_predict_layers,
                     args.num_hidden_layers)
        super().__init__(args, parallel)

    def build_rotary(self, args: ModelArgs) -> RotaryEmbedding:
        return RotaryEmbedding(args.qk_rope_head_dim, args.max_position_embeddings, args.rope_theta, args.rope_scaling)

    def build_attention(self, args: ModelArgs, layer: int, rotary: RotaryEmbedding, parallel) -> nn.Module:
        return MultiLatentAttention(args, rotary, None if parallel is None else parallel.tp)

    def build_mlp(self, args: ModelArgs, layer: int, parallel) -> nn.Module:
        if args.is_moe_layer(layer):
            return DeepseekMoE(args, parallel)
        return GatedMLP(args.hidden_size, args.intermediate_size, None if parallel is None else parallel.tp)

    def checkpoint_skips(self) -> tuple[str, ...]:
        a = self.args
        skips = []
        layers = "|".join(str(i) for i in range(a.num_hidden_layers, a.num_hidden_layers + a.num_nextn_predict_layers))
        if layers:
            skips.append(rf"model\.layers\.({layers})\.")
        if not a.n_shared_experts:  # HF builds (and saves) zero-sized shared experts for n_shared_experts=0
            skips.append(r"model\.layers\.\d+\.mlp\.shared_experts\.")
        return tuple(skips)
