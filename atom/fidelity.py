"""Rollout routing replay in the trainer: make an HF MoE model route each token to the experts the
rollout engine chose for it (captured with `SamplingParams(return_routed_experts=True)`), so the
trainer's logprobs are computed by the same experts that produced the rollout's tokens.

The experts' weights are still the trainer's own router's, computed as HF computes them for the ids
it picks, but at the replayed ids, so gradients reach the router through them, as in rollout
routing replay (R3, arXiv:2510.11370):

* Qwen3-MoE, Mixtral: softmax over all router logits, gathered, renormalised (Qwen3: if
  norm_topk_prob).
* GPT-OSS: softmax over the replayed experts' logits (the router's bias included).
* DeepSeek-V3 (noaux_tc): sigmoid scores gathered, without e_score_correction_bias (it only picks
  experts; under replay the rollout picked them), renormalised if norm_topk_prob, times
  routed_scaling_factor. Group limits only pick, too: nothing to replay there.

Rows with a -1 keep the router's own ids and weights, untouched.

    from atom.fidelity import routing_replay
    with routing_replay(model, routed):      # routed: [batch, seq, moe_layers, top_k], -1 = own routing
        loss = compute_loss(model(input_ids))
        loss.backward()

Supported: transformers >= 5 router modules (forward returns (logits, weights, ids); checked
against transformers 5.24), by class name: see ROUTER_WEIGHTS. The router instances' forwards are patched for the block (restored on
exit, exceptions included); a module wrapped by FSDP2 (fully_shard) keeps its class name in its
MRO and its forward, so sharded models work too.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

# (router module, its logits [T, E], expert ids [T, k]) -> the experts' weights [T, k]
WeightFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _softmax_weights(router: nn.Module, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    w = torch.softmax(logits, dim=-1, dtype=torch.float).gather(-1, ids)
    return w / w.sum(-1, keepdim=True) if getattr(router, "norm_topk_prob", True) else w  # Mixtral: always


def _topk_softmax_weights(router: nn.Module, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.gather(-1, ids), dim=-1)


def _sigmoid_weights(router: nn.Module, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    w = logits.float().sigmoid().gather(-1, ids)
    if router.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * router.routed_scaling_factor


# HF router class name -> how it weighs the experts it picks.
ROUTER_WEIGHTS: dict[str, WeightFn] = {
    "Qwen3MoeTopKRouter": _softmax_weights,
    "MixtralTopKRouter": _softmax_weights,
    "GptOssTopKRouter": _topk_softmax_weights,
    "DeepseekV3TopkRouter": _sigmoid_weights,
}


def _weight_fn(module: nn.Module) -> WeightFn | None:
    # The MRO, not the class itself: fully_shard makes a subclass named FSDP<Class>.
    return next((ROUTER_WEIGHTS[c.__name__] for c in type(module).__mro__ if c.__name__ in ROUTER_WEIGHTS), None)


def moe_routers(model: nn.Module) -> list[nn.Module]:
    """The model's top-k routers in layer order (one per MoE layer)."""
    routers = [m for m in model.modules() if _weight_fn(m) is not None]
    if not routers:
        other = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.lower().endswith("router")})
        found = f"its router modules {other} are not supported" if other else "it has no MoE router modules"
        raise ValueError(f"routing_replay: {type(model).__name__} cannot be replayed: {found} (supported: "
                         f"transformers >= 5 routers {sorted(ROUTER_WEIGHTS)})")
    return routers


def _replayed_forward(router: nn.Module, replay: torch.Tensor, original: Callable | None = None) -> Callable:
    """A router forward that routes token t to replay[t] (its own top-k where replay[t] has a -1),
    weighing them as the router weighs its own picks."""
    weigh, original = _weight_fn(router), original or router.forward

    def forward(hidden_states: torch.Tensor):
        out = original(hidden_states)
        if not (isinstance(out, tuple) and len(out) == 3):  # other transformers versions split routing otherwise
            raise ValueError(f"routing_replay: {type(router).__name__}.forward returned {type(out).__name__}, not "
                             "(logits, weights, ids) as transformers >= 5 routers do: this version is not supported")
        logits, own_weights, own_ids = out
        if tuple(replay.shape) != tuple(own_ids.shape):
            raise ValueError(f"routing_replay: the forward has {own_ids.shape[0]} tokens x top_k {own_ids.shape[1]}, "
                             f"the replayed routing {tuple(replay.shape)} (routed_experts must match input_ids)")
        ids = replay.to(own_ids.device)
        own = (ids < 0).any(-1, keepdim=True)
        ids = torch.where(own, own_ids, ids)
        weights = torch.where(own, own_weights, weigh(router, logits, ids).to(own_weights.dtype))
        return logits, weights, ids
    return forward


def _check(routed: torch.Tensor, routers: list[nn.Module]) -> torch.Tensor:
    if routed.dtype.is_floating_point or routed.dtype == torch.bool:
        raise TypeError(f"routing_replay: routed_experts must hold integer expert ids, got {routed.dtype}")
    if routed.dim() == 3:
        routed = routed[None]
    if routed.dim() != 4 or routed.shape[2] != len(routers):
        raise ValueError(f"routing_replay: routed_experts must be [batch, seq, {len(routers)} MoE layers, top_k], "
                         f"got {tuple(routed.shape)}")
    for layer, router in enumerate(routers):
        experts, ids = router.weight.shape[0], routed[:, :, layer]
        if routed.shape[3] != router.top_k:
            raise ValueError(f"routing_replay: routed_experts has top_k {routed.shape[3]}, MoE layer {layer}'s "
                             f"router picks {router.top_k}")
        if ids.numel() and (ids.min() < -1 or ids.max() >= experts):
            raise ValueError(f"routing_replay: MoE layer {layer} has expert ids in [{ids.min()}, {ids.max()}], "
                             f"its router has {experts} experts (-1 = own routing)")
    return routed.long()


@contextlib.contextmanager
def routing_replay(model: nn.Module, routed_experts: torch.Tensor) -> Iterator[None]:
    """Inside the block, every forward of `model` routes with `routed_experts`.

    routed_experts: int tensor [batch, seq, num_moe_layers, top_k] (or [seq, layers, top_k] for a
        batch of one) aligned with the forward's input_ids; rows with a -1 (padding, the last token
        of a completion, which the engine never ran) use the trainer's own routing.
    """
    routers = moe_routers(model)
    routed = _check(torch.as_tensor(routed_experts), routers)
    saved = []
    try:
        for layer, router in enumerate(routers):
            replay = routed[:, :, layer, :].reshape(-1, routed.shape[3])
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
