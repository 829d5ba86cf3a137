"""Rollout routing replay in the trainer: make an HF MoE model route each token to the experts the
rollout engine chose for it (captured with `SamplingParams(return_routed_experts=True)`), so the
trainer's logprobs are computed by the same experts that produced the rollout's tokens.

The experts' weights are still the trainer's own router's: softmax over its router logits,
gathered at the replayed experts (renormalised when the model does), so gradients reach the
router through them, as in rollout routing replay (R3, arXiv:2510.11370).

    from atom.fidelity import routing_replay
    with routing_replay(model, routed):      # routed: [batch, seq, moe_layers, top_k], -1 = own routing
        loss = compute_loss(model(input_ids))
        loss.backward()

Supported: transformers' Qwen3-MoE (`Qwen3MoeTopKRouter`) and Mixtral-style routers (a module
with `weight`, `top_k`, optional `norm_topk_prob`, returning (logits, scores, indices)); the
modules may be wrapped by FSDP2 (fully_shard), which keeps module forwards.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def moe_routers(model: nn.Module) -> list[nn.Module]:
    """The model's top-k routers in layer order (one per MoE layer)."""
    routers = [m for m in model.modules()
               if type(m).__name__.endswith("TopKRouter") or (hasattr(m, "top_k") and hasattr(m, "weight")
                                                              and type(m).__name__.endswith("Router"))]
    if not routers:
        raise ValueError(f"routing_replay: {type(model).__name__} has no top-k router modules (supported: "
                         "transformers' Qwen3-MoE / Mixtral-style TopKRouter)")
    return routers


def _replayed_forward(router: nn.Module, replay: torch.Tensor):
    """A router forward that routes token t to replay[t] (its own top-k where replay[t] has a -1)."""
    def forward(hidden_states: torch.Tensor):
        h = hidden_states.reshape(-1, router.weight.shape[1])
        logits = F.linear(h, router.weight, getattr(router, "bias", None))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        if replay.shape[0] != h.shape[0] or replay.shape[1] != router.top_k:
            raise ValueError(f"routing_replay: the forward has {h.shape[0]} tokens x top_k {router.top_k}, the "
                             f"replayed routing {tuple(replay.shape)}")
        ids = replay.to(h.device)
        own = torch.topk(probs, router.top_k, dim=-1).indices
        ids = torch.where((ids < 0).any(-1, keepdim=True), own, ids)
        scores = probs.gather(-1, ids)
        if getattr(router, "norm_topk_prob", True):
            scores = scores / scores.sum(-1, keepdim=True)
        return logits, scores.to(logits.dtype), ids
    return forward


@contextlib.contextmanager
def routing_replay(model: nn.Module, routed_experts: torch.Tensor) -> Iterator[None]:
    """Inside the block, every forward of `model` routes with `routed_experts`.

    routed_experts: int tensor [batch, seq, num_moe_layers, top_k] (or [seq, layers, top_k] for a
        batch of one) aligned with the forward's input_ids; rows with a -1 (padding, the last token
        of a completion, which the engine never ran) use the trainer's own routing.
    """
    routers = moe_routers(model)
    routed = torch.as_tensor(routed_experts)
    if routed.dim() == 3:
        routed = routed[None]
    if routed.dim() != 4 or routed.shape[2] != len(routers):
        raise ValueError(f"routing_replay: routed_experts must be [batch, seq, {len(routers)} layers, top_k], "
                         f"got {tuple(routed.shape)}")
    saved = []
    try:
        for layer, router in enumerate(routers):
            replay = routed[:, :, layer, :].reshape(-1, routed.shape[3]).long()
            saved.append((router, router.__dict__.get("forward")))
            router.forward = _replayed_forward(router, replay)
        yield
    finally:
        for router, previous in saved:
            if previous is None:
                del router.forward
            else:
                router.forward = previous


def pad_routed(rows: list, seq_len: int, num_layers: int, top_k: int) -> torch.Tensor:
    """Stack per-sequence routed experts ([len_i, layers, top_k] each, e.g. Completion.routed_experts)
    into [batch, seq_len, layers, top_k], -1 where a sequence has none."""
    out = torch.full((len(rows), seq_len, num_layers, top_k), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        r = torch.as_tensor(r)
        out[i, : r.shape[0]] = r[:seq_len]
    return out
