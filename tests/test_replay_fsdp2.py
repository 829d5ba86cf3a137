"""Routing replay on a trainer model really wrapped by FSDP2 (fully_shard over a 2-rank gloo
mesh, parameters sharded as DTensors): logprobs and router gradients equal those of the same
replay on the plain model. Qwen3-MoE and DeepSeek-V3 (the grouped sigmoid router)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from atom import RolloutEngine, SamplingParams
from atom.fidelity import moe_routers, routing_replay
from conftest import TINY_VOCAB, build_tiny_model
from helpers import random_prompts
from test_replay_families import drift, logprobs, padded
from test_weights_sync import _free_ports, _leave

CASES = {"qwen3_moe": ("qwen3_moe", {}, 2), "deepseek_v3": ("deepseek_v3", {}, 2)}


def _trainer(arch: str, overrides: dict):
    model = build_tiny_model(arch, **overrides)
    drift(model)  # the trainer's routers moved since the rollout: its own picks differ on some tokens
    return model


def _replayed(model, ids: list[int], first: int, routed: np.ndarray) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Replayed logprobs of ids[first:] and each router weight's gradient of their sum."""
    with routing_replay(model, routed):
        lp = logprobs(model, ids, first)
        lp.sum().backward()
    grads = []
    for r in moe_routers(model):
        g = r.weight.grad
        grads.append((g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone())
    return lp.detach(), grads


def _worker(rank: int, port: int, arch: str, overrides: dict, ids: list[int], first: int, routed: np.ndarray,
            out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = _trainer(arch, overrides)
        mesh = init_device_mesh("cpu", (2,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert type(moe_routers(model)[0].weight).__name__ == "DTensor", "the router weight is sharded"
        lp, grads = _replayed(model, ids, first, routed)
        if rank == 0:
            torch.save({"logprobs": lp, "grads": grads}, out)
        dist.barrier()  # FSDP2's last collectives done on both ranks before either tears down
    finally:
        dist.destroy_process_group()
    # About one run in ten, a rank aborted at interpreter teardown ("terminate called without an
    # active exception") after its work was done and saved: leave without it, as the weight-sync
    # workers do.
    _leave()


@pytest.mark.parametrize("case", list(CASES))
def test_replay_under_fully_shard_equals_the_plain_model(case, make_tiny_model, tmp_path):
    arch, overrides, moe_layers = CASES[case]
    engine = RolloutEngine(make_tiny_model(arch, **overrides), device="cpu", num_kv_blocks=32, max_model_len=64,
                           enable_return_routed_experts=True)
    prompt = random_prompts([12], TINY_VOCAB, seed=41)[0]
    c = engine.generate([prompt], SamplingParams(temperature=1.0, seed=2, max_tokens=8, ignore_eos=True, logprobs=0,
                                                 logprobs_mode="raw", return_routed_experts=True))[0].outputs[0]
    ids, routed = prompt + c.token_ids, padded(c, moe_layers).numpy()
    plain = _trainer(arch, overrides)
    with torch.no_grad():  # the drift changes some picks: replay is not the trainer's own routing
        own = logprobs(plain, ids, len(prompt))
    want_lp, want_grads = _replayed(plain, ids, len(prompt), routed)
    assert (own - want_lp).abs().max() > 1e-4, "the drifted routers should route some token differently"
    out = str(tmp_path / "fsdp.pt")
    mp.spawn(_worker, args=(_free_ports(1)[0], arch, overrides, ids, len(prompt), routed, out), nprocs=2, join=True)
    got = torch.load(out)
    torch.testing.assert_close(got["logprobs"], want_lp, rtol=0, atol=1e-5)
    assert len(got["grads"]) == len(want_grads) == moe_layers
    for g, w in zip(got["grads"], want_grads):
        assert w.abs().max() > 0, "replay passes gradients to the router"
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
