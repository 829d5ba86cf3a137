"""Mixtral (`MixtralForCausalLM`): the Llama layer with a sparse MoE MLP in every layer.

Routing is softmax top-k renormalised over the chosen experts (HF always renormalises, there is
no norm_topk_prob). Checkpoints name the MoE `block_sparse_moe` with experts `w1` (gate), `w3`
(up), `w2` (down); transformers >= 5 models name it `mlp` with fused `experts.gate_up_proj` /
`experts.down_proj`: both are accepted (`checkpoint_renames`, WeightMap).
"""
from __future__ import annotations

import dataclasses

from atom.models.decoder import CausalLM
from atom.models.hf_config import ModelArgs


class MixtralForCausalLM(CausalLM):
    qk_norm = False
    checkpoint_renames = (
        (r"\.mlp\.experts\.(\d+)\.gate_proj\.", r".block_sparse_moe.experts.\1.w1."),
        (r"\.mlp\.experts\.(\d+)\.up_proj\.", r".block_sparse_moe.experts.\1.w3."),
        (r"\.mlp\.experts\.(\d+)\.down_proj\.", r".block_sparse_moe.experts.\1.w2."),
        (r"\.mlp\.gate\.", ".block_sparse_moe.gate."),
    )

    def __init__(self, args: ModelArgs, parallel=None) -> None:
        super().__init__(dataclasses.replace(args, norm_topk_prob=True), parallel)
