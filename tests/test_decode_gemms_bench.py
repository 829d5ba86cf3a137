"""bench/decode_gemms.py's shared-experts fold is the same layer: the shared MLP cut into
n_shared experts of moe_intermediate_size, routed to with weight 1, gives the routed sum plus the
shared MLP (checked here with the torch reference MoE on the CPU; the bench times it on CUDA)."""
from __future__ import annotations

import torch

from atom.ops import implementations, ops
from bench.decode_gemms import shared_fold


def test_fold_equals_routed_plus_shared_mlp():
    ops.configure(torch.device("cpu"))
    ref = implementations("fused_moe")["torch"]
    c = dict(hidden_size=64, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2,
             num_experts_per_tok=3, routed_scaling_factor=2.4)
    calls = []
    res = shared_fold(c, 16, torch.device("cpu"), torch.float32,
                      experts=lambda x, w13, w2, w, ids, up, down: ref(x, w13, w2, w, ids),
                      timer=lambda fn: (calls.append(fn()), 0.0)[1])
    assert res["max_abs"] > 0.1 and res["max_abs_diff"] < 1e-5 * res["max_abs"]
    assert len(calls) == 4 and all(y.shape == (16, 64) for y in calls)
