"""Weight updates over a c10d broadcast (gloo, real processes): atom.weights_sync.

Rank 0 of the weight-sync group is the trainer, rank 1 the engine. Every check runs inside the
spawned processes (an assertion there fails the test through torch.multiprocessing.spawn).
"""
from __future__ import annotations

import os
import socket
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from _rl_util import changed_model, make_engine, rollout, same

TIMEOUT = 30.0


def _free_ports(n: int) -> list[int]:
    """n distinct free ports (the sockets are held together, so no port comes back twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_port() -> int:
    return _free_ports(1)[0]


def _group(rank: int, port: int, world_size: int = 2):
    from atom.weights_sync import init_weight_sync_group
    return init_weight_sync_group("127.0.0.1", port, rank, world_size, backend="gloo", timeout=TIMEOUT)


def _die_after_first_bucket(group) -> None:
    broadcast = group.broadcast

    def wrapped(tensor, *args, what="", **kwargs):
        broadcast(tensor, *args, what=what, **kwargs)
        if what.startswith("sending bucket 1 "):
            os._exit(0)  # the trainer is killed mid-transfer

    group.broadcast = wrapped


# ---- trainer and engine of the main scenario ------------------------------------------------

def _trainer(base: str, changed_dir: str, port: int) -> None:
    from atom.weights_sync import WeightRejected, WeightSender, push
    torch.set_num_threads(1)
    model = changed_model(base)
    model.save_pretrained(changed_dir)  # the engine compares against a fresh engine built from it
    group = _group(0, port)
    sender = WeightSender(group, bucket_bytes=64 << 10)  # many buckets
    # 1. A complete update of a transformers-v5 Qwen3-MoE (fused experts), in buckets.
    assert push(model, sender, bucket_bytes=64 << 10, version=5) == 5
    # 2. Bad metadata: refused by the engine before any weight moves; the group stays usable.
    params = dict(model.named_parameters())
    with pytest.raises(WeightRejected, match="nonsense"):
        sender.send([("model.layers.0.mlp.nonsense", torch.zeros(2))] + list(params.items()), version=6)
    with pytest.raises(WeightRejected, match="shape"):
        sender.send([("model.norm.weight", torch.zeros(3))], partial=True, version=6)
    with pytest.raises(WeightRejected, match="missing"):
        sender.send([("model.norm.weight", params["model.norm.weight"])], version=6)
    # 3. Non-finite values: the receiver checks its staged buckets before committing anything.
    bad = [(n, p.detach().clone().fill_(float("inf")) if n == "lm_head.weight" else p) for n, p in params.items()]
    with pytest.raises(WeightRejected, match="non-finite"):
        sender.send(bad, version=6)
    # 4. A deliberate partial update (same values) goes through.
    assert sender.send([("model.norm.weight", params["model.norm.weight"])], partial=True, version=7) == 7
    # 5. The trainer dies after the first bucket of the next update.
    _die_after_first_bucket(group)
    sender.send([(n, p * 2) for n, p in params.items()], version=8)
    raise AssertionError("unreachable")


def _engine(base: str, changed_dir: str, port: int) -> None:
    from atom.weights_sync import WeightReceiver, WeightSyncError
    torch.set_num_threads(1)
    engine = make_engine(base)
    before = rollout(engine)
    group = _group(1, port)
    receiver = WeightReceiver(engine, group, check_finite=True)
    assert receiver.receive(timeout=120) == 5 == engine.weight_version
    after = rollout(engine)
    expected = rollout(make_engine(changed_dir))
    assert not same(before, expected)
    assert same(after, expected), "broadcast weights differ from the changed checkpoint"
    assert {v for _, _, v in after} == {5}

    snapshot = {n: p.detach().clone() for n, p in engine.named_parameters()}

    def unchanged() -> None:
        assert engine.weight_version in (5, 7) and engine.weights_complete
        for n, p in engine.named_parameters():
            assert torch.equal(p, snapshot[n]), n

    for match in ("nonsense", "shape", "missing", "non-finite"):
        with pytest.raises(ValueError, match=match):
            receiver.receive()
        unchanged()
    assert receiver.receive() == 7
    unchanged()
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match="bucket 2 of"):
        receiver.receive()
    assert time.monotonic() - t0 < TIMEOUT + 10
    unchanged()  # the previous weights keep serving
    assert engine.reset_prefix_cache()  # compute prompts as the fresh engine did
    assert same(rollout(engine), expected)


def _leave() -> None:
    """A worker that succeeded exits without interpreter teardown: destructors of live gloo
    groups sometimes abort at exit ("terminate called without an active exception")."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _main_worker(i: int, base: str, changed_dir: str, port: int) -> None:
    (_trainer if i == 0 else _engine)(base, changed_dir, port)
    _leave()


def test_broadcast_update_bad_metadata_and_killed_sender(make_tiny_model, tmp_path):
    base = make_tiny_model("qwen3_moe")
    mp.spawn(_main_worker, args=(base, str(tmp_path / "changed"), _free_port()), nprocs=2, join=True)


# ---- a sender that stalls: the receiver times out; without staging the engine then refuses ----

def _stall_worker(i: int, base: str, port: int) -> None:
    _stall_body(i, base, port)
    _leave()


def _stall_body(i: int, base: str, port: int) -> None:
    from atom import SamplingParams
    from atom.weights_sync import WeightReceiver, WeightSender, WeightSyncTimeout
    torch.set_num_threads(1)
    if i == 0:
        model = changed_model(base)
        group = _group(0, port)
        broadcast = group.broadcast

        def stall(tensor, *args, what="", **kwargs):
            broadcast(tensor, *args, what=what, **kwargs)
            if what.startswith("sending bucket 1 "):
                time.sleep(4)
                os._exit(0)

        group.broadcast = stall
        WeightSender(group).send(list(model.named_parameters()), bucket_bytes=32 << 10)
        return
    engine = make_engine(base)
    group = _group(1, port)
    t0 = time.monotonic()
    with pytest.raises(WeightSyncTimeout, match="timed out"):
        WeightReceiver(engine, group, staging="none").receive(timeout=60, bucket_timeout=1)
    assert time.monotonic() - t0 < 4
    # No staging: the first bucket was already applied, so the engine refuses to generate.
    assert not engine.weights_complete
    with pytest.raises(RuntimeError, match="incomplete"):
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2))


def test_stalled_sender_times_out(make_tiny_model):
    mp.spawn(_stall_worker, args=(make_tiny_model("llama"), _free_port()), nprocs=2, join=True)


# ---- FSDP2 trainer (2 ranks, its own default group) -> engine ---------------------------------

def _fsdp_worker(i: int, base: str, changed_dir: str, ports: tuple[int, int]) -> None:
    _fsdp_body(i, base, changed_dir, ports)
    _leave()


def _fsdp_body(i: int, base: str, changed_dir: str, ports: tuple[int, int]) -> None:
    import torch.distributed as dist
    from atom.weights_sync import WeightReceiver, WeightSender, push
    torch.set_num_threads(1)
    if i == 2:  # the engine
        engine = make_engine(base)
        group = _group(1, ports[1])
        assert WeightReceiver(engine, group).receive(timeout=120) == 3
        assert same(rollout(engine), rollout(make_engine(changed_dir)))
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=i, world_size=2)
    model = changed_model(base)
    if i == 0:
        model.save_pretrained(changed_dir)
    dist.barrier()
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert type(model.model.layers[0].mlp.experts.gate_up_proj).__name__ == "DTensor"
    if i == 0:
        sender = WeightSender(_group(0, ports[1]))
        assert push(model, sender, bucket_bytes=32 << 10, version=3) == 3
    else:
        assert push(model, None) is None
    dist.destroy_process_group()


def test_fsdp2_trainer_push(make_tiny_model, tmp_path):
    base = make_tiny_model("qwen3_moe")
    mp.spawn(_fsdp_worker, args=(base, str(tmp_path / "changed"), tuple(_free_ports(2))), nprocs=3, join=True)
