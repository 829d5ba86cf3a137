"""atom.ray on a real local Ray cluster (CPU, gloo, tiny models): replicas, broadcast, failures.

One Ray cluster for the module (`ray.init(num_cpus=2)`); every pool is shut down by its test.
Oracle: one RolloutEngine in this process on the same prompts and seeds (tokens equal, logprobs
within float noise: batch composition differs), and HF transformers for the pushed weights.
"""
from __future__ import annotations

import asyncio
import os
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


TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def cluster():
    # Workers import this module (the Trainer actor) and its helpers: put tests/ on their path.
    path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH", "")) if p)
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                   runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ctx.address_info["gcs_address"]
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
        pool.sleep(level=1)  # fanned out; a refused generate leaves the seed stream alone
        assert pool.is_sleeping and all(s["is_sleeping"] for s in pool.replica_stats().values())
        with pytest.raises(RuntimeError, match="sleeping"):
            pool.generate(PROMPTS[:3], SAMPLED)
        pool.wake_up()
        assert not any(s["is_sleeping"] for s in pool.replica_stats().values())
        assert_same(flat(pool.generate(PROMPTS[:3], SAMPLED)), flat(engine.generate(PROMPTS[:3], SAMPLED)))


def hf_logprobs(model, prompt: list[int], tokens: list[int]) -> list[float]:
    """log p(token | prefix) under a transformers model: the oracle for the pushed weights."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)]


@ray.remote(num_cpus=0.5)
class Trainer:
    """A trainer Ray actor: builds its model and pushes it through the pool's WeightBroadcast."""

    def __init__(self, path: str, seed: int) -> None:
        torch.set_num_threads(1)
        self.model = changed_model(path, seed=seed)

    def push(self, broadcast, version: int):
        return broadcast.push(self.model, version=version)


def test_one_push_updates_every_replica(cluster, model_path):
    greedy = SamplingParams(temperature=0.0, max_tokens=6, logprobs=0, ignore_eos=True)
    with pool_of(model_path, num_replicas=2, shard_size=4) as pool:
        trainer = changed_model(model_path, seed=3)  # the driver is the trainer
        before = pool.replica_stats()
        result = pool.push(trainer, version=3)
        assert result.ok and sorted(result.updated) == [0, 1] and result.version == 3
        assert {s["weight_version"] for s in pool.replica_stats().values()} == {3}
        outs = pool.generate(PROMPTS, greedy)
        after = pool.replica_stats()
        assert all(after[r]["generated_tokens"] > before[r]["generated_tokens"] for r in (0, 1))  # both served
        for prompt, out in zip(PROMPTS, outs):
            c = out.outputs[0]
            assert c.weight_version == 3
            assert c.logprobs == pytest.approx(hf_logprobs(trainer, prompt, c.token_ids), abs=1e-4)
        # A trainer Ray actor pushes through the pool's (picklable) WeightBroadcast; the driver refreshes.
        actor = Trainer.remote(model_path, 4)
        result = ray.get(actor.push.remote(pool.weight_broadcast(), 4))
        assert result.ok and sorted(result.updated) == [0, 1]
        pool.refresh()
        assert pool.weight_version == 4
        want = flat(make_engine(model_path).generate(PROMPTS, greedy))  # v0 weights: must differ
        engine4 = make_engine(model_path)
        engine4.update_weights(ray.get(actor.__ray_call__.remote(lambda self: {
            n: p.detach().clone() for n, p in self.model.named_parameters()})))
        got = flat(pool.generate(PROMPTS, greedy))
        assert_same(got, flat(engine4.generate(PROMPTS, greedy)))
        assert [t for t, _ in got] != [t for t, _ in want]
        ray.kill(actor)


def test_killed_replica_loses_nothing(cluster, model_path):
    params = SamplingParams(n=2, temperature=1.0, max_tokens=48, logprobs=0, ignore_eos=True, seed=11)
    prompts = PROMPTS * 2
    trainer = changed_model(model_path, seed=5)
    reference = make_engine(model_path)
    reference.update_weights(trainer.named_parameters())
    want = flat(reference.generate(prompts, params))
    with pool_of(model_path, num_replicas=2, shard_size=2) as pool:
        assert pool.push(trainer, version=1).ok
        victim = pool.replica_actors(0)[0]
        box: dict = {}
        worker = threading.Thread(target=lambda: box.update(outs=pool.generate(prompts, params)))
        worker.start()
        deadline = time.monotonic() + 20
        while not ray.get(victim.ping.remote())["busy"]:  # kill it while it generates
            assert time.monotonic() < deadline
            time.sleep(0.005)
        ray.kill(victim, no_restart=False)
        worker.join(timeout=120)
        assert_same(flat(box["outs"]), want)
        events = [(e.replica, e.what) for e in pool.failures]
        assert (0, "died during generate") in events
        pool.wait_until_ready(timeout=60)  # Ray restarted it; the pool resynchronised its weights
        states = pool.replica_states()
        assert states[0] == {"status": "ready", "weight_version": 1, "restarts": 1}
        assert_same(flat(pool.generate(prompts, params)), want)
        assert pool.replica_stats()[0]["generated_tokens"] > 0  # the restarted replica served again


# ---- the Hydra job on the cluster: killed and resumed twice ---------------------------------------

def _job_args(model_path, prompts, out, *extra) -> list[str]:
    return ["model=tiny_llama", f"model.path={model_path}", f"data.path={prompts}", f"output.path={out}",
            "engine=cpu", "engine.num_kv_blocks=64", "engine.max_num_seqs=16", "engine.max_model_len=128",
            "output.progress=false", "sampling.n=2", "sampling.max_tokens=24", "sampling.ignore_eos=true",
            "data.batch_size=2", *extra]


def _lines(path) -> list[dict]:
    import json
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _kill_when(proc, out, at_least: int, total: int) -> int:
    """SIGKILL the job once `out` has at least `at_least` lines; returns the lines it left."""
    deadline = time.monotonic() + 90
    while len(_lines(out)) < at_least:
        assert proc.poll() is None, f"the job exited early: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "the job wrote nothing in time"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    done = len(_lines(out))
    assert done < total, "the job finished before it was killed: make it longer"
    return done


def test_sharded_job_killed_and_resumed_twice(cluster, model_path, tmp_path):
    import json
    import subprocess
    import sys

    from hydra import compose, initialize_config_dir

    from atom.rollout.job import run
    total = 24
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_token_ids": [3 + i % 50, 4 + i, 5, 6 + 2 * i]}) + "\n"
                               for i in range(total)))
    single = tmp_path / "single.jsonl"
    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(TESTS), "configs"), version_base="1.3"):
        run(compose("rollout", overrides=_job_args(model_path, prompts, single)))
    out = tmp_path / "ray.jsonl"
    cmd = [sys.executable, "-m", "atom.rollout", *_job_args(model_path, prompts, out, "ray.num_replicas=2",
                                                                f"ray.address={cluster}", "ray.num_cpus_per_rank=0.5")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = 0
    for _ in range(2):  # killed twice, each time after some more lines
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        done = _kill_when(proc, out, done + 2, total)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{done} already done" in proc.stdout + proc.stderr
    rows = _lines(out)
    assert sorted(r["index"] for r in rows) == list(range(total))  # exactly one line per prompt
    want = {r["index"]: r for r in _lines(single)}
    for r in rows:
        w = want[r["index"]]
        assert [c["token_ids"] for c in r["completions"]] == [c["token_ids"] for c in w["completions"]]
        for c, d in zip(r["completions"], w["completions"]):
            assert c["logprobs"] == pytest.approx(d["logprobs"], abs=1e-4)


def test_async_routing_sticky_pause_and_a_killed_replica(cluster, model_path):
    params = [SamplingParams(n=2, temperature=1.0, max_tokens=40, logprobs=0, ignore_eos=True, seed=100 + i)
              for i in range(len(PROMPTS))]
    want = flat(make_engine(model_path).generate(PROMPTS, params))

    async def scenario(pool):
        # Concurrent requests spread over both replicas; a conversation's turns stay on one replica.
        outs = await asyncio.gather(*(pool.generate_async(p, sp, request_id=f"conv{i}:turn1")
                                      for i, (p, sp) in enumerate(zip(PROMPTS, params))))
        assert_same(flat(outs), want)
        assert {pool.replica_of(f"conv{i}:turn1") for i in range(len(PROMPTS))} == {0, 1}
        turn2 = await pool.generate_async(PROMPTS[3] + outs[3].outputs[0].token_ids[:4],
                                          SamplingParams(max_tokens=4, temperature=0.0), request_id="conv3:turn2")
        assert pool.replica_of("conv3:turn2") == pool.replica_of("conv3:turn1") and turn2.outputs[0].token_ids
        # Pause (keep) mid-flight, push new weights to both, resume: every request completes, its
        # tokens before the pause from v0, after it from v1.
        long = SamplingParams(temperature=1.0, max_tokens=100, ignore_eos=True, seed=5)
        tasks = [asyncio.ensure_future(pool.generate_async(p, long)) for p in PROMPTS]
        for actor in (pool.replica_actors(0)[0], pool.replica_actors(1)[0]):
            while not (await actor.ping.remote())["busy"]:
                await asyncio.sleep(0.005)
        await pool.pause_generation("keep")
        result = pool.push(changed_model(model_path, seed=9), version=1)
        assert result.ok and sorted(result.updated) == [0, 1]
        await pool.resume_generation()
        spans = []
        for out in await asyncio.gather(*tasks):
            c = out.outputs[0]
            assert len(c.token_ids) == 100 and c.finish_reason == "length" and c.weight_version == 1
            spans.append([v for v, _, _ in c.weight_versions])
        assert all(s in ([0, 1], [1]) for s in spans) and [0, 1] in spans
        # A replica killed while it serves: its requests go to the other one, outputs unchanged.
        v1 = make_engine(model_path)
        v1.update_weights(changed_model(model_path, seed=9).named_parameters())
        want_v1 = flat(v1.generate(PROMPTS, params))
        tasks = [asyncio.ensure_future(pool.generate_async(p, sp)) for p, sp in zip(PROMPTS, params)]
        victim = pool.replica_actors(1)[0]
        while not await victim.ping.remote():
            await asyncio.sleep(0.005)
        while not (await victim.ping.remote())["busy"]:
            await asyncio.sleep(0.005)
        ray.kill(victim, no_restart=False)
        assert_same(flat(await asyncio.gather(*tasks)), want_v1)
        assert (1, "died during generate") in [(e.replica, e.what) for e in pool.failures]

    with pool_of(model_path, num_replicas=2) as pool:
        asyncio.run(scenario(pool))
        pool.wait_until_ready(timeout=60)
        assert pool.replica_states()[1] == {"status": "ready", "weight_version": 1, "restarts": 1}


def test_a_late_failure_of_a_call_to_the_old_actor_is_not_a_second_death(cluster, model_path):
    """Two requests in flight on a killed actor fail one after the other; the second may reach
    the pool once the replica is back (CI, session 10: restarts 2 where one kill happened). A
    failure of a call made before the last restart is that restart's death: not counted, and
    the restarted replica keeps serving."""
    params = SamplingParams(n=2, temperature=1.0, max_tokens=6, logprobs=0, ignore_eos=True, seed=4)
    want = flat(make_engine(model_path).generate(PROMPTS, params))
    with pool_of(model_path, num_replicas=2) as pool:
        rset = pool._rset  # the replica set's failure bookkeeping, driven as its callers do
        seen = rset.replicas[1].restarts
        ray.kill(rset.replicas[1].ranks[0], no_restart=False)
        rset.fail(1, "died during generate", "killed", restarts_seen=seen)
        pool.wait_until_ready(timeout=60)
        assert pool.replica_states()[1] == {"status": "ready", "weight_version": 0, "restarts": 1}
        rset.fail(1, "died during generate", "the same death, reported late", restarts_seen=seen)
        assert pool.replica_states()[1] == {"status": "ready", "weight_version": 0, "restarts": 1}
        assert [(e.replica, e.error) for e in pool.failures] == [(1, "killed")]
        assert_same(flat(pool.generate(PROMPTS, params)), want)


def test_tensor_parallel_replica(cluster, make_tiny_model):
    """One replica of two rank actors (TP=2, gloo): the pool sets up its group; outputs, async
    requests and a push behave as with one engine."""
    from atom.ray import PoolConfig, ReplicaPool
    path = make_tiny_model("qwen3")
    params = SamplingParams(n=2, temperature=1.0, max_tokens=8, logprobs=0, ignore_eos=True, seed=3)
    reference = make_engine(path)
    want = flat(reference.generate(PROMPTS, params))
    config = EngineConfig(model=path, tensor_parallel_size=2, dist_timeout_s=60, **engine_kwargs())
    with ReplicaPool(PoolConfig(config, num_replicas=1, num_cpus_per_rank=0.5)) as pool:
        assert_same(flat(pool.generate(PROMPTS, params)), want)

        async def requests():
            return await asyncio.gather(*(pool.generate_async(p, params) for p in PROMPTS[:3]))
        assert_same(flat(asyncio.run(requests())), want[:6])
        trainer = changed_model(path, seed=2)
        assert pool.push(trainer, version=7).updated == [0]
        reference.update_weights(trainer.named_parameters())
        assert_same(flat(pool.generate(PROMPTS, params)), flat(reference.generate(PROMPTS, params)))


def test_replica_dying_mid_transfer_keeps_out_until_resynced(cluster, model_path, monkeypatch):
    from atom.weights_sync.group import WeightSyncGroup
    greedy = SamplingParams(temperature=0.0, max_tokens=6, logprobs=0, ignore_eos=True)
    v1, v2 = changed_model(model_path, seed=21), changed_model(model_path, seed=22)
    with pool_of(model_path, num_replicas=2, weight_sync_bucket_bytes=32 << 10, weight_sync_timeout_s=30) as pool:
        assert pool.push(v1, version=1).ok
        victim = pool.replica_actors(1)[0]
        send = WeightSyncGroup.broadcast

        def dies_after_bucket_1(self, tensor, *args, what="", **kwargs):
            send(self, tensor, *args, what=what, **kwargs)
            if what.startswith("sending bucket 1 of"):
                ray.kill(victim, no_restart=False)  # the replica dies in the middle of the transfer
                time.sleep(1.0)
        monkeypatch.setattr(WeightSyncGroup, "broadcast", dies_after_bucket_1)
        result = pool.push(v2, version=2)
        monkeypatch.setattr(WeightSyncGroup, "broadcast", send)
        assert 1 in result.failed and 1 not in result.updated
        assert pool.replica_states()[1]["status"] != "ready"  # no requests for it now
        assert (1, "weight transfer failed") in [(e.replica, e.what) for e in pool.failures]
        # Replica 0 holds v1 or v2, whole either way (staged buckets): never a mix.
        version0 = pool.replica_states()[0]["weight_version"]
        assert version0 in (1, 2)
        if version0 == 1:  # the broken group failed it too: it kept v1; push again
            assert pool.push(v2, version=2).updated == [0]
        pool.wait_until_ready(timeout=60)  # replica 1: restarted, then resynchronised to v2
        assert {s["weight_version"] for s in pool.replica_states().values()} == {2}
        reference = make_engine(model_path)
        reference.update_weights(v2.named_parameters())
        assert_same(flat(pool.generate(PROMPTS, greedy)), flat(reference.generate(PROMPTS, greedy)))
        assert all(s["generated_tokens"] > 0 for s in pool.replica_stats().values())


def test_grpo_ray_example_learns_through_a_replica_kill(cluster):
    import importlib.util
    path = os.path.join(os.path.dirname(TESTS), "examples", "grpo_ray.py")
    spec = importlib.util.spec_from_file_location("grpo_ray", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    history = example.main(steps=6, kill_at=1, verbose=False)
    rewards = history["reward"]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.2, rewards
    assert max(history["logprob_diff"]) < 1e-4  # every replica serves the trainer's weights
    assert history["weight_version"] == list(range(6)) and history["failures"] >= 1
    assert {s["status"] for s in history["final_states"].values()} == {"ready"}
    assert {s["weight_version"] for s in history["final_states"].values()} == {6}


def test_raises_only_when_no_replica_is_left(cluster, model_path):
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    with pool_of(model_path, num_replicas=1, max_restarts=0) as pool:
        assert len(pool.generate(PROMPTS[:2], greedy)) == 2
        ray.kill(pool.replica_actors(0)[0], no_restart=True)
        with pytest.raises(RuntimeError, match="no replica left"):
            pool.generate(PROMPTS[:2], greedy)
        assert pool.replica_states()[0]["status"] == "dead"
        assert [e.what for e in pool.failures] == ["died during generate", "gave up"]


def test_ray_job_rejects_a_bad_prompt_before_writing(cluster, model_path, tmp_path):
    from hydra import compose, initialize_config_dir

    from atom.rollout.job import JobError, run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_token_ids": [3, 4, 5]}\n{"prompt_token_ids": [3, 999]}\n')
    out = tmp_path / "out.jsonl"
    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(TESTS), "configs"), version_base="1.3"):
        cfg = compose("rollout", overrides=_job_args(model_path, prompts, out, "ray.num_replicas=1",
                                                     "ray.num_cpus_per_rank=0.5"))
    with pytest.raises(JobError, match=r"prompts.jsonl:2: token id 999 is outside the vocabulary"):
        run(cfg)
    assert not out.exists()
    assert ray.is_initialized()  # the job joined this cluster and leaves it running


def test_replicas_on_the_trainers_placement_group(cluster, model_path):
    """Colocation: the replicas go into the bundles of a placement group made for the trainer,
    next to a trainer actor in the same bundle (fractional resources)."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
    ray.get(pg.ready(), timeout=60)
    try:
        trainer = Trainer.options(num_cpus=0.5, scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=0)).remote(model_path, 6)
        with pool_of(model_path, num_replicas=2, placement_group=pg, bundle_indices=[0, 1]) as pool:
            ids = ray.get([a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_placement_group_id())
                           for r in (0, 1) for a in pool.replica_actors(r)])
            assert set(ids) == {pg.id.hex()}
            result = ray.get(trainer.push.remote(pool.weight_broadcast(), 1))
            assert result.ok and result.updated == [0, 1]
            pool.refresh(result.version)
            assert pool.weight_version == 1 and len(pool.generate(PROMPTS[:2], SAMPLED)) == 2
        ray.kill(trainer)
    finally:
        remove_placement_group(pg)
