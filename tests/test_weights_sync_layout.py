"""Issue 13: weight-sync metadata is checked completely before any byte moves, and a transfer
that fails on the engine is reported to the sender, whoever the sender is.

The unit tests craft metadata by hand (what a sender that is not atom's could send); the spawned
test runs a raw sender, a failing apply and a mid-stream failure against a real engine over gloo.
"""
from __future__ import annotations

import copy
import json
import types

import pytest
import torch
import torch.multiprocessing as mp

from _rl_util import changed_model, make_engine, rollout, rollout_from_scratch, same
from atom.weights_sync.protocol import MAGIC, PROTOCOL, UpdateMeta, decode_status, plan_buckets
from test_weights_sync import _free_port, _group, _leave


def _layout() -> dict:
    entries = [("a", (10, 8), torch.float32), ("b", (3,), torch.bfloat16), ("c", (401, 80), torch.float32),
               ("d", (7, 5), torch.float16)]
    return json.loads(plan_buckets(entries, 1024, 3, False).encode())


def test_atoms_own_layouts_decode_unchanged():
    d = _layout()
    meta = UpdateMeta.decode(json.dumps(d).encode())
    assert json.loads(meta.encode()) == d and len(meta.buckets) == 3


def _edit(fn) -> bytes:
    d = copy.deepcopy(_layout())
    fn(d)
    return json.dumps(d).encode()


def _set(d: dict, tensor: int, field: int, value) -> None:
    d["tensors"][tensor][field] = value


CRAFTED = [
    # The case: the last tensor's offset past its bucket's end.
    (lambda d: _set(d, 3, 4, d["buckets"][2]), r"weight 'd' lies at bytes \[\d+, \d+\) beyond the end of bucket 2"),
    (lambda d: _set(d, 1, 4, 0), r"weight 'b' at byte 0 of bucket 0 overlaps 'a'"),
    (lambda d: _set(d, 1, 0, "a"), r"weight 'a' appears twice"),
    (lambda d: _set(d, 0, 3, 7), r"weight 'a': bucket 7 is not one of the 3 buckets"),
    (lambda d: _set(d, 0, 3, -1), r"weight 'a': bucket -1 is not one of the 3 buckets"),
    (lambda d: _set(d, 0, 4, -64), r"weight 'a': offset -64 must be an integer >= 0"),
    (lambda d: _set(d, 0, 4, 1.5), r"weight 'a': offset 1.5 must be an integer >= 0"),
    (lambda d: _set(d, 0, 1, [10, -8]), r"weight 'a': shape \[10, -8\] must be a list of sizes >= 0"),
    (lambda d: _set(d, 0, 1, "10x8"), r"weight 'a': shape '10x8' must be a list"),
    (lambda d: _set(d, 0, 2, "int8"), r"unknown dtype 'int8'"),
    (lambda d: _set(d, 0, 0, 5), r"tensor name 5 must be a non-empty string"),
    (lambda d: d["tensors"][0].pop(), r"a tensor entry must be \[name, shape, dtype, bucket, offset\]"),
    (lambda d: d["buckets"].__setitem__(0, d["buckets"][0] + 4096), r"bucket 0 has \d+ bytes but its tensors end"),
    (lambda d: d["buckets"].append(0), r"bucket 3 holds no tensor"),
    (lambda d: d["buckets"].__setitem__(1, 10**12), r"bucket 1 has 1000000000000 bytes but its tensors end at byte 128320"),
    (lambda d: d.update(buckets="many"), r"buckets must be a list of byte counts"),
    (lambda d: d.update(version="v2"), r"version='v2' must be an integer or null"),
    (lambda d: d.update(partial="yes"), r"partial='yes' must be a bool"),
    (lambda d: d.update(tensors={"a": 1}), r"tensors must be a list"),
    (lambda d: d.pop("buckets"), r"must be an object with version, partial, buckets and tensors"),
]


@pytest.mark.parametrize("edit,match", CRAFTED, ids=[m[:40] for _, m in CRAFTED])
def test_crafted_layouts_are_refused_on_decode(edit, match):
    with pytest.raises(ValueError, match=match):
        UpdateMeta.decode(_edit(edit))


def test_metadata_that_is_not_json_is_refused():
    with pytest.raises(ValueError, match="not JSON"):
        UpdateMeta.decode(b"\xff\x00garbage")


def test_sender_refuses_what_the_engines_would_refuse_before_sending():
    """Nothing reaches the group (a stand-in that fails on any use) when the pairs are unsendable."""
    from atom.weights_sync import WeightSender

    class NoGroup(types.SimpleNamespace):
        def __getattr__(self, name):
            raise AssertionError(f"the group was used ({name}) for an update that cannot be sent")

    sender = WeightSender(NoGroup(rank=0))
    t = torch.zeros(4)
    for pairs, exc, match in [
        ([("x", t), ("x", t)], ValueError, "'x' appears twice"),
        ([(3, t)], TypeError, "the name must be a str, got int"),
        ([("x", [0.0] * 4)], TypeError, "expected a torch.Tensor, got list"),
        ([("x",)], TypeError, r"expected a \(name, tensor\) pair"),
        ([("x", torch.empty(4, device="meta"))], ValueError, "meta tensor"),
        ([("x", torch.zeros(4, dtype=torch.int64))], ValueError, "only floating tensors"),
    ]:
        with pytest.raises(exc, match=match):
            sender.send(pairs)


# ---- over a real group ----------------------------------------------------------------------------

def _send_raw(group, meta: dict) -> list[bytes]:
    """What a sender that is not atom's does: header, metadata, then wait for the verdicts."""
    payload = json.dumps(meta).encode()
    group.broadcast(torch.tensor([MAGIC, PROTOCOL, len(payload)], dtype=torch.int64), what="header")
    group.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), what="metadata")
    return group.allgather_bytes(b"", what="verdicts")


def _trainer(base: str, changed_dir: str, port: int) -> None:
    from atom.weights_sync import WeightRejected, WeightSender
    torch.set_num_threads(1)
    model = changed_model(base)
    model.save_pretrained(changed_dir)
    params = [(n, p.detach()) for n, p in model.named_parameters()]
    group = _group(0, port)
    # 1. A foreign sender's layout: the last tensor's offset at its bucket's end.
    meta = json.loads(plan_buckets([(n, tuple(p.shape), p.dtype) for n, p in params], 32 << 10, 5, False).encode())
    last = meta["tensors"][-1]
    last[4] = meta["buckets"][last[3]]
    status = decode_status(_send_raw(group, meta)[1])
    assert not status["ok"] and "beyond the end of bucket" in status["error"], status
    sender = WeightSender(group, bucket_bytes=32 << 10)
    # 2. Applying fails on the engine for a reason of its own: the sender is told which.
    with pytest.raises(WeightRejected, match="failed to apply the update: RuntimeError: disk on fire"):
        sender.send(params, version=6)
    # 3. No staging, a non-finite tensor early in the stream: the engine drains the other buckets
    #    and reports; the group stays in step.
    bad = [(n, p.clone().fill_(float("nan")) if i == 1 else p) for i, (n, p) in enumerate(params)]
    with pytest.raises(WeightRejected, match="non-finite"):
        sender.send(bad, version=7)
    # 4. A complete update then goes through.
    assert sender.send(params, version=9) == 9


def _engine(base: str, changed_dir: str, port: int) -> None:
    from atom.weights_sync import WeightReceiver
    torch.set_num_threads(1)
    engine = make_engine(base)
    before = rollout(engine)

    def unchanged() -> None:
        assert engine.weight_version == 0 and engine.weights_complete
        assert same(rollout_from_scratch(engine), before)

    group = _group(1, port)
    staged = WeightReceiver(engine, group, check_finite=True)
    with pytest.raises(ValueError, match="refused, nothing changed: .*beyond the end of bucket"):
        staged.receive(timeout=120)
    unchanged()

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    engine.update_weights = boom
    with pytest.raises(RuntimeError, match="disk on fire"):
        staged.receive()
    del engine.update_weights
    unchanged()

    streamed = WeightReceiver(engine, group, staging="none", check_finite=True)
    with pytest.raises(ValueError, match="non-finite"):
        streamed.receive()
    assert not engine.weights_complete  # no staging: the first buckets were applied (documented)
    assert streamed.receive() == 9 == engine.weight_version and engine.weights_complete
    assert same(rollout(engine), rollout(make_engine(changed_dir)))


def _worker(i: int, base: str, changed_dir: str, port: int) -> None:
    (_trainer if i == 0 else _engine)(base, changed_dir, port)
    _leave()


def test_foreign_layout_and_engine_failures_reach_the_sender(make_tiny_model, tmp_path):
    mp.spawn(_worker, args=(make_tiny_model("llama"), str(tmp_path / "changed"), _free_port()), nprocs=2, join=True)
