"""Issue 17, point 4: the network weight receiver (atom.weights_sync over a real gloo group, a
trainer process and an engine process) for the MoE families: a trainer's whole update in
transformers-v5 names, then a partial update of one MoE layer's experts in per-expert names
(the older checkpoints' layout) where the family's format has them. After each, the engine's
rollout equals a local engine given the same tensors through update_weights, bitwise."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from _rl_util import changed_model, make_engine, rollout, same
from test_weights_sync import _free_port, _group, _leave

# family -> (tiny arch, the config key of an expert's intermediate size, or None where the
# format has fused experts only)
FAMILIES = {
    "mixtral": ("mixtral", "intermediate_size"),
    "deepseek_v3": ("deepseek_v3", "moe_intermediate_size"),
    "gpt_oss": ("gpt_oss", None),
}


def _expert_pairs(base: str, family: str) -> list[tuple[str, torch.Tensor]]:
    """The partial update: expert 1 of the first MoE layer in per-expert names (new random
    values), or, where the format has only fused experts, that layer's fused tensors."""
    inter_key = FAMILIES[family][1]
    cfg = json.load(open(os.path.join(base, "config.json")))
    prefix = f"model.layers.{cfg.get('first_k_dense_replace', 0)}.mlp.experts."
    if inter_key is None:
        model = changed_model(base, seed=4, scale=0.2)
        return [(n, p.detach().clone()) for n, p in model.named_parameters() if n.startswith(prefix)]
    g = torch.Generator().manual_seed(3)
    hidden, inter = cfg["hidden_size"], cfg[inter_key]
    return [(prefix + "1.gate_proj.weight", 0.1 * torch.randn(inter, hidden, generator=g)),
            (prefix + "1.up_proj.weight", 0.1 * torch.randn(inter, hidden, generator=g)),
            (prefix + "1.down_proj.weight", 0.1 * torch.randn(hidden, inter, generator=g))]


def _trainer(family: str, base: str, changed_dir: str, port: int) -> None:
    from atom.weights_sync import WeightSender, push
    torch.set_num_threads(1)
    model = changed_model(base, scale=0.1)
    model.save_pretrained(changed_dir)
    sender = WeightSender(_group(0, port), bucket_bytes=32 << 10)  # many buckets
    assert push(model, sender, bucket_bytes=32 << 10, version=3) == 3
    assert sender.send(_expert_pairs(base, family), partial=True, version=4) == 4


def _engine(family: str, base: str, changed_dir: str, port: int) -> None:
    from atom.weights_sync import WeightReceiver
    torch.set_num_threads(1)
    engine = make_engine(base)
    before = rollout(engine)
    receiver = WeightReceiver(engine, _group(1, port), check_finite=True)
    assert receiver.receive(timeout=120) == 3 == engine.weight_version
    local = make_engine(changed_dir)
    after = rollout(engine)
    assert not same(before, after)
    assert same(after, rollout(local)), "broadcast weights differ from the trainer's checkpoint"
    assert receiver.receive(timeout=120) == 4
    assert local.update_weights(iter(_expert_pairs(base, family)), partial=True) is not None
    partial = rollout(engine)
    assert not same(partial, after), "the partial update changed nothing"
    assert same(partial, rollout(local)), "a partial update by the network differs from update_weights"


def _worker(i: int, family: str, base: str, changed_dir: str, port: int) -> None:
    (_trainer if i == 0 else _engine)(family, base, changed_dir, port)
    _leave()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_weights_over_the_network_equal_update_weights(make_tiny_model, tmp_path, family):
    base = make_tiny_model(FAMILIES[family][0])
    mp.spawn(_worker, args=(family, base, str(tmp_path / "changed"), _free_port()), nprocs=2, join=True)
