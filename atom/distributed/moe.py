"""Expert parallelism: which (token, expert) pairs a rank computes, and the all_to_all exchange.

allreduce mode: tokens are replicated; `local_routing` keeps this rank's pairs (others get
weight 0 and id -1, or a clamped id where the fused_moe backend cannot skip), and the caller
all-reduces the partial outputs.

alltoall mode: a `Dispatcher` sends each pair's token to the rank owning its expert
(`dispatch`), the rank runs its local experts on what it received, and `combine` sends the
outputs back and sums them with the routing weights. `TorchAllToAll` does it with
torch.distributed.all_to_all_single (NCCL / RCCL / gloo). `MoriDispatcher` is the hook for
ROCm's MORI EP kernels: same interface, selected by `make_dispatcher` once implemented.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from atom.distributed.parallel_state import ParallelGroup


def local_routing(weights: torch.Tensor, ids: torch.Tensor, start: int, count: int,
                  can_skip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Global expert ids [T, k] -> ids of this rank's experts [start, start+count) and weights
    zeroed for the pairs it does not own (id -1 when the kernel skips negative ids, else 0)."""
    local = ids - start
    owned = (local >= 0) & (local < count)
    return weights * owned, torch.where(owned, local, -1 if can_skip else 0)


@dataclass
class DispatchHandle:
    """What combine needs to route outputs back: pair order and per-rank counts."""

    order: torch.Tensor        # [T*k] pair indices sorted by destination rank
    token_of: torch.Tensor     # [T*k] token of each sorted pair
    send_counts: list[int]
    recv_counts: list[int]
    num_tokens: int


class Dispatcher:
    """dispatch(x, ids) -> (received tokens [N, H], their local expert ids [N], handle);
    combine(y [N, H], weights [T, k], handle) -> [T, H] (x's dtype)."""

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
        raise NotImplementedError

    def combine(self, y: torch.Tensor, weights: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        raise NotImplementedError


class TorchAllToAll(Dispatcher):
    """Variable-size all_to_all_single; counts are exchanged first (one host sync per layer, so
    this path is eager-only: no CUDA graphs)."""

    def __init__(self, group: ParallelGroup, experts_per_rank: int) -> None:
        self.group, self.experts_per_rank = group, experts_per_rank

    def dispatch(self, x, ids):
        W, k = self.group.size, ids.shape[1]
        flat = ids.reshape(-1).long()  # every rank must send the same dtype
        dest = torch.div(flat, self.experts_per_rank, rounding_mode="floor")
        order = torch.argsort(dest, stable=True)
        token_of = torch.div(order, k, rounding_mode="floor")
        send = torch.bincount(dest, minlength=W)
        recv = self.group.all_to_all(send, [1] * W, [1] * W)  # one count to and from every rank
        send_counts, recv_counts = send.tolist(), recv.tolist()
        recv_x = self.group.all_to_all(x[token_of], recv_counts, send_counts)
        local_ids = flat[order] - dest[order] * self.experts_per_rank
        recv_ids = self.group.all_to_all(local_ids, recv_counts, send_counts)
        return recv_x, recv_ids, DispatchHandle(order, token_of, send_counts, recv_counts, x.shape[0])

    def combine(self, y, weights, handle):
        back = self.group.all_to_all(y, handle.send_counts, handle.recv_counts)
        w = weights.reshape(-1)[handle.order].float()
        out = torch.zeros(handle.num_tokens, y.shape[1], dtype=torch.float32, device=y.device)
        out.index_add_(0, handle.token_of, back.float() * w[:, None])
        return out.to(y.dtype)


class MoriDispatcher(Dispatcher):
    """Hook for ROCm MORI (https://github.com/ROCm/mori) EP dispatch/combine kernels.

    To enable: build MORI's EpDispatchCombineOp for the engine group here, implement dispatch /
    combine with the same contract as TorchAllToAll, and set `implemented = True`.
    """

    implemented = False

    def __init__(self, group: ParallelGroup, experts_per_rank: int) -> None:
        raise NotImplementedError("MoriDispatcher is a hook: MORI EP kernels are not wired in yet")


def mori_available() -> bool:
    return bool(torch.version.hip) and importlib.util.find_spec("mori") is not None


def make_dispatcher(group: ParallelGroup, experts_per_rank: int, device: torch.device) -> Dispatcher:
    if device.type == "cuda" and MoriDispatcher.implemented and mori_available():
        return MoriDispatcher(group, experts_per_rank)
    return TorchAllToAll(group, experts_per_rank)
