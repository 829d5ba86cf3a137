"""DeepSeek-V3's group-limited sigmoid routing (`moe_route_grouped`, torch reference in
atom/ops/torch_family_ops.py) in Triton, one program per token: every shape in the kernel is a
constexpr of the model (experts, groups, top-k), so a row's weights and ids are bitwise the same
whatever the number of rows or the row's place (torch's version runs a sigmoid over the whole
[T, E] tensor, top-k selections and a reduction over k whose kernels and vectorisation follow T).

Selection is by repeated arg-max (the lowest index wins a tie), so ids come out in descending
order of their biased score, as torch.topk returns them.

The triton backend's routing too (session 12): one launch where torch's runs a sigmoid, a bias
add, a top-k (gatherTopK + bitonic sort), a gather and a reduction over k, ~0.6 ms of each
grpo-mla-moe decode step on the H200 (session 12's profile) over 26 MoE layers."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops.registry import register
from atom.ops.triton import pdl
from atom.ops.triton.pdl import grid_dependency


@triton.jit
def _grouped_route_kernel(x_ptr, bias_ptr, w_ptr, id_ptr, sx, scaling, E: tl.constexpr, GROUPS: tl.constexpr,
                          PER: tl.constexpr, TOPK_GROUPS: tl.constexpr, TOP_K: tl.constexpr, RENORM: tl.constexpr,
                          BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
                          PDL: tl.constexpr = False):
    grid_dependency(PDL)
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    em = e < E
    x = tl.load(x_ptr + t * sx + e, mask=em, other=0.0).to(tl.float32)
    scores = tl.sigmoid(x)
    biased = scores + tl.load(bias_ptr + e, mask=em, other=0.0).to(tl.float32)
    biased = tl.where(em, biased, float("-inf"))
    if GROUPS > 1:
        # A group's score: the sum of its two best biased scores (its best alone for one-expert groups).
        g = tl.arange(0, BLOCK_G)
        member = ((e[None, :] // PER) == g[:, None]) & em[None, :]
        vals = tl.where(member, biased[None, :], float("-inf"))
        best = tl.max(vals, 1)
        gscore = best
        if PER > 1:
            first = tl.min(tl.where(vals == best[:, None], e[None, :], BLOCK_E), 1)
            gscore = best + tl.max(tl.where(e[None, :] == first[:, None], float("-inf"), vals), 1)
        gscore = tl.where(g < GROUPS, gscore, float("-inf"))
        keep = g < 0
        for _ in tl.static_range(TOPK_GROUPS):
            pick = tl.min(tl.where(gscore == tl.max(gscore, 0), g, BLOCK_G), 0)
            keep = keep | (g == pick)
            gscore = tl.where(g == pick, float("-inf"), gscore)
        kept = tl.max(tl.where(member & keep[:, None], 1, 0), 0) > 0
        biased = tl.where(kept, biased, float("-inf"))
    k = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_K], tl.int64)
    ws = tl.zeros([BLOCK_K], tl.float32)
    for j in tl.static_range(TOP_K):
        pick = tl.min(tl.where(biased == tl.max(biased, 0), e, BLOCK_E), 0)
        ws = tl.where(k == j, tl.sum(tl.where(e == pick, scores, 0.0), 0), ws)
        ids = tl.where(k == j, pick.to(tl.int64), ids)
        biased = tl.where(e == pick, float("-inf"), biased)
    if RENORM:
        ws = ws / (tl.sum(ws, 0) + 1e-20)  # lanes from TOP_K on hold 0
    tl.store(w_ptr + t * TOP_K + k, ws * scaling, mask=k < TOP_K)
    tl.store(id_ptr + t * TOP_K + k, ids, mask=k < TOP_K)


@register("moe_route_grouped", "triton")
def grouped_route(router_logits: torch.Tensor, correction_bias: torch.Tensor, top_k: int, num_groups: int,
                  topk_groups: int, renormalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """moe_route_grouped's contract: router_logits [T, E] -> (weights [T, k] float32, ids [T, k] int64)."""
    t, e = router_logits.shape
    if e % num_groups or not 1 <= topk_groups <= num_groups or not 1 <= top_k <= topk_groups * (e // num_groups):
        raise ValueError(f"moe_route_grouped: {e} experts in {num_groups} groups, {topk_groups} groups kept, "
                         f"top_k={top_k}: the groups must be equal and the kept ones must hold top_k experts")
    weights = torch.empty(t, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=router_logits.device)
    if t == 0:
        return weights, ids
    x = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    _grouped_route_kernel[(t,)](x, correction_bias, weights, ids, x.stride(0), float(scaling), E=e,
                                GROUPS=num_groups, PER=e // num_groups, TOPK_GROUPS=topk_groups, TOP_K=top_k,
                                RENORM=bool(renormalize), BLOCK_E=triton.next_power_of_2(e),
                                BLOCK_G=triton.next_power_of_2(num_groups),
                                BLOCK_K=max(2, triton.next_power_of_2(top_k)), num_warps=4, **pdl.options())
    return weights, ids
