"""atom.ray on a real local Ray cluster (CPU, gloo, tiny models): replicas, broadcast, failures.

One Ray cluster for the module (`ray.init(num_cpus=2)`); every pool is shut down by its test.
Oracle: one RolloutEngine in this process on the same prompts and seeds (tokens equal, logprobs
within float noise: batch composition differs), and HF transformers for the pushed weights.
"""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from _rl_util import changed_model, engine_kwargs, make_engine  # noqa: E402

from atom import SamplingParams  # noqa: E402
from atom.config import EngineConfig  # noqa: E402

PROMPTS = [[5 + i, 6 + i, 7 + i, 8, 9 + 2 * i] for i in range(8)]
SAMPLED = SamplingParams(n=2, temperature=1.0, max_tokens=8, logprobs=0, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_path(make_tiny_model) -> str:
    return make_tiny_model("llama")


def pool_of(path: str, num_replicas: int = 2, **options):
    from atom.ray import PoolConfig, ReplicaPool
    config = EngineConfig(model=path, **engine_kwargs())
    return ReplicaPool(PoolConfig(config, num_replicas=num_replicas, num_cpus_per_rank=0.5, **options))


def flat(outs) -> list[tuple[list[int], list[float]]]:
    return [(c.token_ids, c.logprobs) for o in outs for c in o.outputs]


def assert_same(got, want) -> None:
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-4)


def test_two_replicas_match_one_engine(cluster, model_path):
    engine = make_engine(model_path)
    # unseeded requests too: the pool draws their seeds as one engine would
    want = [flat(engine.generate(PROMPTS, SAMPLED)), flat(engine.generate(PROMPTS[:3], SAMPLED))]
    with pool_of(model_path, num_replicas=2, shard_size=3) as pool:
        got = [flat(pool.generate(PROMPTS, SAMPLED)), flat(pool.generate(PROMPTS[:3], SAMPLED))]
        for g, w in zip(got, want):
            assert_same(g, w)
        per_replica = pool.replica_stats()
        assert sorted(per_replica) == [0, 1]
        assert all(s["generated_tokens"] > 0 for s in per_replica.values())  # both served
        assert pool.stats.generated_tokens == sum(len(t) for g in got for t, _ in g)
        with pytest.raises(ValueError, match="prompt 9: token id 999"):
            pool.generate(PROMPTS + [[1, 2], [999]], SAMPLED)
        assert_same(flat(pool.generate(PROMPTS[:3], SAMPLED)), flat(engine.generate(PROMPTS[:3], SAMPLED)))
