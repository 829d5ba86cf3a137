"""atom.ray's routing and sharding arithmetic, without Ray: least outstanding, sticky keys, shards."""
from __future__ import annotations

from atom.ray.batch import shards_of
from atom.ray.router import Router, sticky_key


def test_sticky_key():
    assert sticky_key("conv7:turn2", ":") == "conv7" == sticky_key("conv7", ":")
    assert sticky_key("a/b:c", "/") == "a" and sticky_key(None, ":") is None


def test_least_outstanding_then_sticky():
    r = Router([0, 1, 2])
    picks = []
    for _ in range(6):  # no ids: fill the least loaded, lowest id on ties
        picks.append(r.pick())
        r.started(picks[-1])
    assert picks == [0, 1, 2, 0, 1, 2]
    r.finished(1, 2)
    assert r.pick("c:1") == 1                 # least outstanding, and now bound
    r.started(1, 5)
    assert r.pick("c:2") == 1                 # sticky beats load
    assert r.pick("d:1") in (0, 2)
    r.healthy.discard(1)                      # its replica failed: re-bound elsewhere
    new = r.pick("c:3")
    assert new in (0, 2) and r.bound_to("c:9") == new
    assert r.pick("c:4", exclude=[0, 2]) is None


def test_sticky_capacity_forgets_least_recent():
    r = Router([0, 1], capacity=2)
    r.pick("a"), r.pick("b"), r.pick("a"), r.pick("c")
    assert r.bound_to("a") is not None and r.bound_to("c") is not None and r.bound_to("b") is None


def test_shards_cover_every_prompt_once():
    for count in (0, 1, 7, 8, 9):
        for replicas in (1, 2, 3):
            for size in (None, 1, 4):
                shards = shards_of(count, replicas, size)
                covered = [i for s, e in shards for i in range(s, e)]
                assert covered == list(range(count))
                if size is None and count:
                    assert len(shards) <= replicas
