"""Weight transfers in the frameworks' shapes (atom/rollout/transfer.py, weights_sync/tensor_sync.py,
ipc.py): per-tensor broadcasts with the trainer first (OpenRLHF, SGLang) or last (TRL), and handles of
a trainer's tensors in another process (shared memory on CPU, CUDA IPC on a GPU). A refused update
must change nothing and leave the group in step."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from _rl_util import changed_model, engine_kwargs, make_engine, rollout, same
from test_weights_sync import TIMEOUT, _free_port, _leave

KW = engine_kwargs()


def _pairs(model) -> list[tuple[str, torch.Tensor]]:
    return [(n, p.detach()) for n, p in model.named_parameters()]


def _rollout(engine) -> list:
    engine.reset_prefix_cache()  # prompts computed as a fresh engine computes them
    return rollout(engine)


def _specs(path: str) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    from atom.models.weights import iter_checkpoint
    return [(n, t.dtype, tuple(t.shape)) for n, t in iter_checkpoint(path)]


# ---- per-tensor broadcasts, trainer = rank 0 (OpenRLHF through the vLLM layer, SGLang's batch call) ----

def _first_worker(i: int, base: str, changed_dir: str, port: int) -> None:
    torch.set_num_threads(1)
    (_first_trainer if i == 0 else _first_engine)(base, changed_dir, port)
    _leave()


def _first_trainer(base: str, changed_dir: str, port: int) -> None:
    from atom.models.weights import iter_checkpoint
    from atom.weights_sync import init_weight_sync_group, send_tensors
    model = changed_model(base)
    model.save_pretrained(changed_dir)
    group = init_weight_sync_group("127.0.0.1", port, 0, 2, backend="gloo", timeout=TIMEOUT, group_name="openrlhf")
    pairs = dict(_pairs(model))
    send_tensors(group, [(n, pairs[n]) for n, _, _ in _specs(base)])   # 1. one update_weight call per tensor
    send_tensors(group, [("model.nonsense.weight", torch.zeros(3))])    # 2. unknown name
    send_tensors(group, [("model.norm.weight", torch.zeros(5))])        # 3. wrong shape
    bad = [(n, t.clone().fill_(float("inf")) if n == "lm_head.weight" else t) for n, t in iter_checkpoint(base)]
    send_tensors(group, bad)                                            # 4. SGLang batch, non-finite
    send_tensors(group, iter_checkpoint(base))                          # 5. SGLang batch: back to base


def _first_engine(base: str, changed_dir: str, port: int) -> None:
    from atom.compat.vllm import LLM
    llm = LLM(base, **KW)
    engine = llm.engine
    base_rollout = _rollout(engine)
    # OpenRLHF's engine side: rank_offset 1 of a group of 2 (the trainer is rank 0 and hosts it).
    llm.collective_rpc("init_process_group", args=("127.0.0.1", port, 1, 2, "openrlhf", "gloo"))
    specs = _specs(base)
    for name, dtype, shape in specs:
        llm.collective_rpc("update_weight", args=(name, str(dtype), shape))  # dtype as "torch.float32"
    expected = _rollout(make_engine(changed_dir))
    assert not same(base_rollout, expected)
    assert same(_rollout(engine), expected) and engine.weight_version == 0

    def refused(match: str, call) -> None:
        with pytest.raises(ValueError, match=match):
            call()
        assert same(_rollout(engine), expected) and engine.weights_complete
    refused("'model.nonsense.weight' is not a parameter",
            lambda: llm.collective_rpc("update_weight", args=("model.nonsense.weight", "float32", (3,))))
    refused(r"shape \(5,\) does not match",
            lambda: llm.collective_rpc("update_weight", args=("model.norm.weight", torch.float32, [5])))
    names, dtypes, shapes = (list(x) for x in zip(*specs))
    refused("'lm_head.weight' contains non-finite", lambda: engine.update_weights_from_distributed(
        names, dtypes, shapes, check_finite=True))
    assert engine.update_weights_from_distributed(names, dtypes, shapes, partial=False, weight_version="v2") == "v2"
    assert same(_rollout(engine), base_rollout)
    assert {v for _, _, v in rollout(engine)} == {"v2"}
    engine.destroy_weights_update_group()


def test_per_tensor_broadcast_trainer_first(make_tiny_model, tmp_path):
    mp.spawn(_first_worker, args=(make_tiny_model("qwen3"), str(tmp_path / "changed"), _free_port()),
             nprocs=2, join=True)


# ---- trainer = last rank (TRL's layout), two engines --------------------------------------------------

def _last_worker(i: int, base: str, changed_dir: str, port: int) -> None:
    torch.set_num_threads(1)
    if i == 2:
        from atom.weights_sync import init_weight_sync_group, send_tensors
        model = changed_model(base)
        model.save_pretrained(changed_dir)
        group = init_weight_sync_group("127.0.0.1", port, 2, 3, backend="gloo", timeout=TIMEOUT)
        pairs = dict(_pairs(model))
        send_tensors(group, [(n, pairs[n]) for n, _, _ in _specs(base)])
        send_tensors(group, [("model.norm.weight", torch.zeros(7))])
    elif i == 0:  # TRL's vllm-serve worker extension calls, through the vLLM layer
        from atom.compat.vllm import LLM
        llm = LLM(base, **KW)
        llm.collective_rpc("init_communicator", args=("127.0.0.1", port, 3))
        for name, dtype, shape in _specs(base):
            llm.collective_rpc("update_named_param", args=(name, dtype, shape))
        with pytest.raises(ValueError, match="shape"):
            llm.collective_rpc("update_named_param", args=("model.norm.weight", "float32", (7,)))
        assert same(_rollout(llm.engine), _rollout(make_engine(changed_dir)))
        llm.collective_rpc("close_communicator")
    else:  # a second engine, on RolloutEngine's own call
        engine = make_engine(base)
        engine.init_weights_update_group("127.0.0.1", port, 1, 3, src=2, timeout=TIMEOUT)
        for name, dtype, shape in _specs(base):
            engine.update_weights_from_distributed([name], [dtype], [shape])
        with pytest.raises(ValueError, match="shape"):
            engine.update_weights_from_distributed(["model.norm.weight"], ["float32"], [(7,)])
        assert same(_rollout(engine), _rollout(make_engine(changed_dir)))
        engine.destroy_weights_update_group()
    _leave()


def test_per_tensor_broadcast_trainer_last(make_tiny_model, tmp_path):
    mp.spawn(_last_worker, args=(make_tiny_model("llama"), str(tmp_path / "changed"), _free_port()),
             nprocs=3, join=True)


# ---- IPC: the trainer in another process hands over handles -------------------------------------------

def _ipc_trainer(base: str, changed_dir: str, conn, device: str) -> None:
    from atom.weights_sync import IpcBucketSender, serialize_tensors
    torch.set_num_threads(1)
    model = changed_model(base).to(device)
    model.save_pretrained(changed_dir)
    pairs = _pairs(model)
    sender = IpcBucketSender(bucket_bytes=24 << 10, device=device, num_buffers=2)  # many buckets
    for payload in sender.payloads(pairs):
        conn.send(("ipc", payload))
        assert conn.recv() == "ok"
    conn.send(("ipc", next(sender.payloads([("model.nonsense.weight", torch.zeros(4, device=device))]))))
    assert conn.recv().startswith("refused")
    from atom.models.weights import iter_checkpoint
    base_pairs = [(n, t.to(device)) for n, t in iter_checkpoint(base)]
    conn.send(("tensor", serialize_tensors(base_pairs)))  # SGLang's update_weights_from_tensor
    assert conn.recv() == "ok"
    conn.send(("stop", None))
    conn.recv()


def _ipc_engine(engine, conn, changed_dir: str, device: str) -> None:
    calls = {"ipc": engine.update_weights_from_ipc, "tensor": engine.update_weights_from_tensor}
    checked = False
    while True:
        kind, payload = conn.recv()
        if kind == "stop":
            engine.release_ipc_buffers()  # before the trainer exits: its buffers are mapped here
            conn.send("bye")
            return
        if kind == "tensor" and not checked:  # every bucket landed: the changed weights serve
            want = _rollout(make_engine(changed_dir, device=device))
            assert same(_rollout(engine), want) and engine.weight_version == 0
            checked = True
        try:
            calls[kind](payload)
            conn.send("ok")
        except ValueError as e:
            assert "nothing changed" in str(e) and "model.nonsense.weight" in str(e)
            conn.send(f"refused: {e}")


def _run_ipc(base: str, changed_dir: str, device: str) -> None:
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    engine = make_engine(base, device=device)
    base_rollout = _rollout(engine)
    trainer = ctx.Process(target=_ipc_trainer, args=(base, changed_dir, there, device))
    trainer.start()
    try:
        _ipc_engine(engine, here, changed_dir, device)
    finally:
        trainer.join(60)
    assert trainer.exitcode == 0
    assert same(_rollout(engine), base_rollout)  # the last update brought the base weights back


def test_ipc_buckets_and_tensor_handles_from_another_process(make_tiny_model, tmp_path):
    _run_ipc(make_tiny_model("qwen3_moe"), str(tmp_path / "changed"), "cpu")


# ---- checks in one process ---------------------------------------------------------------------------

def test_transfer_checks_refuse_before_anything_lands(make_tiny_model):
    from atom.weights_sync.ipc import FORMAT
    base = make_tiny_model("llama")
    engine = make_engine(base)
    want = _rollout(engine)
    norm = torch.ones(64)
    with pytest.raises(RuntimeError, match="init_weights_update_group first"):
        engine.update_weights_from_distributed(["model.norm.weight"], ["float32"], [(64,)])
    with pytest.raises(ValueError, match="unknown dtype 'float33'"):  # checked before anything is received
        engine.update_weights_from_distributed(["model.norm.weight"], ["float33"], [(64,)])
    with pytest.raises(ValueError, match="one entry per tensor"):
        engine.update_weights_from_distributed(["a", "b"], ["float32"], [(1,)])
    cases = [
        ([("model.norm.weight", norm), ("model.nonsense", norm)], "not a parameter"),
        ([("model.norm.weight", norm), ("model.norm.weight", norm)], "appears twice"),
        ([("model.norm.weight", torch.ones(64, dtype=torch.int32))], "floating dtype"),
        ([("model.norm.weight", torch.ones(63))], "shape"),
    ]
    for pairs, match in cases:
        with pytest.raises(ValueError, match=match):
            engine.update_weights_from_tensor(pairs)
    with pytest.raises(ValueError, match="missing"):
        engine.update_weights_from_tensor([("model.norm.weight", norm)], partial=False)
    buf = torch.zeros(1024, dtype=torch.uint8)
    bad_buckets = [
        ({"format": FORMAT, "buffer": buf, "tensors": [["model.norm.weight", "float32", [64], 800]]}, "do not fit"),
        ({"format": FORMAT, "buffer": buf, "tensors": [["model.norm.weight", "float32", [64], 2]]}, "aligned"),
        ({"format": FORMAT, "buffer": buf.view(torch.int32), "tensors": []}, "flat contiguous uint8"),
        ({"format": "other", "buffer": buf, "tensors": []}, "not an atom IPC bucket"),
    ]
    for payload, match in bad_buckets:
        with pytest.raises(ValueError, match=match):
            engine.update_weights_from_ipc(payload)
    engine.release_memory_occupation(["weights"], offload_weights=True)
    with pytest.raises(ValueError, match="weights are released"):
        engine.update_weights_from_tensor([("model.norm.weight", norm)])
    engine.wake_up()
    engine.add_request("live", [3, 4, 5], None)
    with pytest.raises(ValueError, match="pause_generation"):
        engine.update_weights_from_tensor([("model.norm.weight", norm)])
    engine.abort("live")
    assert same(_rollout(engine), want) and engine.weights_complete and engine.weight_version == 0
    # Accepted: a bucket in its unpickled form, the version set on request.
    good = torch.zeros(512, dtype=torch.uint8)
    good[:256].view(torch.float32).copy_(torch.full((64,), 2.0))
    assert engine.update_weights_from_ipc(
        {"format": FORMAT, "buffer": good, "tensors": [["model.norm.weight", "float32", [64], 0]]},
        weight_version=3) == 3
    assert not same(_rollout(engine), want)
    assert engine.get_weights_by_name("model.norm.weight", truncate_size=3).tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="not a parameter"):
        engine.get_weights_by_name("model.nonsense")


# ---- GPU: CUDA IPC, NCCL -------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_ipc_buckets_and_tensor_handles(make_tiny_model, tmp_path):
    _run_ipc(make_tiny_model("qwen3_moe"), str(tmp_path / "changed"), "cuda")


def _nccl_worker(i: int, base: str, changed_dir: str, port: int) -> None:
    torch.cuda.set_device(i)
    if i == 1:
        from atom.weights_sync import init_weight_sync_group, send_tensors
        model = changed_model(base).cuda()
        model.save_pretrained(changed_dir)
        group = init_weight_sync_group("127.0.0.1", port, 1, 2, backend="nccl", timeout=TIMEOUT)
        pairs = dict(_pairs(model))
        send_tensors(group, [(n, pairs[n]) for n, _, _ in _specs(base)])
    else:
        engine = make_engine(base, device="cuda:0")
        engine.init_weights_update_group("127.0.0.1", port, 0, 2, backend="nccl", src=1, timeout=TIMEOUT)
        names, dtypes, shapes = (list(x) for x in zip(*_specs(base)))
        engine.update_weights_from_distributed(names, dtypes, shapes, partial=False)
        assert same(_rollout(engine), _rollout(make_engine(changed_dir, device="cuda:0")))
    _leave()


@pytest.mark.gpu
def test_nccl_per_tensor_broadcast_trainer_last(make_tiny_model, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs the trainer and the engine on two GPUs (one rank per device)")
    mp.spawn(_nccl_worker, args=(make_tiny_model("qwen3"), str(tmp_path / "changed"), _free_port()),
             nprocs=2, join=True)
