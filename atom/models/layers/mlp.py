from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from atom.models.layers.linear import Linear, column_linear, row_linear
from atom.ops import ops


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate|up fused into one matmul (column / row parallel under TP);
    bias: all three projections have one (Llama's mlp_bias)."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp=None, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = column_linear(hidden_size, [intermediate_size] * 2, bias,
                                          shard_names=["gate_proj", "up_proj"], tp=tp)
        self.down_proj = row_linear(intermediate_size, hidden_size, bias, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


@dataclass(frozen=True)
class FusedExpertTensor:
    """One HF tensor that holds every expert's copy of something, and where it goes.

    A MoE module whose checkpoint has only such tensors (GPT-OSS) lists them in
    `fused_tensors()`; WeightMap makes them the required names and shards them by rule: experts
    on dim 0, this rank's intermediate rows on `inter_dim` (of `parts` equal blocks, 2 for gate|up).
    """

    name: str                      # after the MoE module's prefix, e.g. "experts.gate_up_proj"
    param: str                     # the MoE module's attribute it fills
    hf_shape: tuple[int, ...]      # shape of the full HF tensor
    inter_dim: int | None          # dim of the converted tensor that holds the intermediate size
    parts: int = 1
    convert: Callable[[torch.Tensor], torch.Tensor] | None = None  # HF layout -> ours (all experts)


class SparseMoE(nn.Module):
    """Softmax top-k router over stacked experts: w13 [E, 2I, H] (gate|up), w2 [E, H, I].

    With expert parallelism (`parallel`, an atom.distributed ParallelState) this rank stores only
    experts [expert_start, expert_start + E/EP), each with its intermediate dim split `tp_size`
    ways at `tp_rank` (allreduce mode with more ranks than EP); see atom/distributed/moe.py.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool, parallel=None) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.num_experts = num_experts
        self.mode = None if parallel is None else parallel.ep_mode
        local_experts, inter = num_experts, intermediate_size
        self.expert_start, self.tp_rank, self.tp_size = 0, 0, 1
        if self.mode is not None:
            layout = parallel.layout
            local_experts, inter = num_experts // layout.ep, intermediate_size // layout.moe_tp
            self.expert_start = layout.ep_rank * local_experts
            self.tp_rank, self.tp_size = layout.moe_tp_rank, layout.moe_tp
            self.group = parallel.moe
            self.dispatcher = None
        self.intermediate_size = inter  # this rank's share
        self.gate = Linear(hidden_size, num_experts)  # the router is replicated
        self.routed_out: torch.Tensor | None = None  # [tokens, top_k] view the runner reads (routing capture)
        self.w13 = nn.Parameter(torch.empty(local_experts, 2 * inter, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(local_experts, hidden_size, inter), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is None:
            return self.forward_local(x)
        return self._forward_parallel(x, *self.route_recorded(x))

    def route_recorded(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """route(x), its expert ids written into routed_out when routing is captured."""
        weights, ids = self.route(x)
        if self.routed_out is not None:
            self._record(ids)
        return weights, ids

    def _record(self, ids: torch.Tensor) -> None:
        self.routed_out[: ids.shape[0]].copy_(ids)

    # ---- what a family may change (GPT-OSS, DeepSeek-V3) ------------------------------------
    def forward_local(self, x: torch.Tensor) -> torch.Tensor:
        """No expert parallelism: routing + experts in one op (few kernels at small batch)."""
        logits = self.gate(x)
        if self.routed_out is not None:  # routing capture: the experts moe_forward picks from these logits
            self._record(ops.moe_route(logits, self.top_k, self.renormalize)[1])
        return ops.moe_forward(x, logits, self.w13, self.w2, self.top_k, self.renormalize)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] float32, global expert ids [T, k])."""
        return ops.moe_route(self.gate(x), self.top_k, self.renormalize)

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Weighted sum of this rank's experts (ids local, -1 = skip when the op can)."""
        return ops.fused_moe(x, self.w13, self.w2, weights, ids)

    @property
    def experts_skip_negative_ids(self) -> bool:
        return ops.supports("fused_moe", "skips_negative_ids")

    def idle(self, dtype: torch.dtype, device: torch.device) -> None:
        """Join this layer's all_to_all with no tokens (alltoall mode, a rank with no requests this
        step): only the exchange runs, no kernel sees an empty batch."""
        x = torch.empty(0, self.w13.shape[2], dtype=dtype, device=device)
        ids = torch.empty(0, self.top_k, dtype=torch.int64, device=device)
        self._forward_parallel(x, torch.empty(0, self.top_k, dtype=torch.float32, device=device), ids)

    def _forward_parallel(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        from atom.distributed import moe as ep

        local = self.w13.shape[0]
        if self.mode == "alltoall":
            if self.dispatcher is None:
                self.dispatcher = ep.make_dispatcher(self.group, local, x.device)
            recv_x, recv_ids, handle = self.dispatcher.dispatch(x, ids)
            if recv_x.shape[0] == 0:  # nothing routed here this step (kernels need not handle empty input)
                y = recv_x
            else:
                ones = torch.ones(recv_ids.shape[0], 1, dtype=torch.float32, device=x.device)
                y = self.experts(recv_x, ones, recv_ids[:, None])
            return self.dispatcher.combine(y, weights, handle)
        if local != self.num_experts:
            weights, ids = ep.local_routing(weights, ids, self.expert_start, local, self.experts_skip_negative_ids)
        return self.group.all_reduce(self.experts(x, weights, ids))
