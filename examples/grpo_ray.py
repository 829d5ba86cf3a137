"""GRPO with rollout replicas on a Ray cluster: the loop of grpo_colocated.py, scaled out.

Each step the driver (the trainer here) has a ReplicaPool of N engine replicas (Ray actors on a
placement group) sample n completions per prompt, the prompts sharded over the replicas; it takes
a policy-gradient step and broadcasts the new weights to every replica with one `pool.push`
(atom.weights_sync: gloo on CPU, NCCL on GPUs). With --kill-at STEP, one replica's actor is
killed in the middle of that step's rollout: its shard goes to the other replica, Ray restarts
the actor and the pool resynchronises its weights before it serves again; the run goes on.

    python examples/grpo_ray.py [--replicas 2] [--steps 8] [--kill-at 3]

Runs on a local cluster (`ray.init(num_cpus=2)`) with a tiny random Qwen3 on CPU in well under a
minute; --address auto joins a running cluster instead (`ray start --head`).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from grpo_colocated import reward, sequence_logprobs, tiny_checkpoint  # noqa: E402

from atom import SamplingParams  # noqa: E402
from atom.config import EngineConfig  # noqa: E402
from atom.ray import PoolConfig, ReplicaPool  # noqa: E402


def _kill_when_busy(pool: ReplicaPool, replica: int) -> None:
    import ray
    actor = pool.replica_actors(replica)[0]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not ray.get(actor.ping.remote())["busy"]:
        time.sleep(0.005)
    ray.kill(actor, no_restart=False)


def main(steps: int = 8, replicas: int = 2, num_prompts: int = 8, n: int = 8, prompt_len: int = 8,
         max_tokens: int = 16, lr: float = 5e-2, seed: int = 0, kill_at: int | None = None,
         address: str | None = None, verbose: bool = True) -> dict:
    import ray
    from transformers import AutoModelForCausalLM

    if not ray.is_initialized():
        ray.init(address=address, **({} if address else {"num_cpus": 2}), log_to_driver=False)
    torch.manual_seed(seed)
    tmp = tempfile.TemporaryDirectory(prefix="atom_grpo_ray_")
    model = tiny_checkpoint(tmp.name, seed)
    engine = EngineConfig(model=model, device="cpu", dtype="float32", max_num_seqs=num_prompts * n,
                          max_model_len=prompt_len + max_tokens + 1, seed=seed)
    pool = ReplicaPool(PoolConfig(engine, num_replicas=replicas, num_cpus_per_rank=0.5))
    trainer = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    trainer.train()
    opt = torch.optim.Adam(trainer.parameters(), lr=lr)
    rng = random.Random(seed)
    history = {"reward": [], "logprob_diff": [], "weight_version": [], "failures": 0}
    try:
        for step in range(steps):
            t0 = time.perf_counter()
            prompts = [[rng.randrange(2, pool.vocab_size) for _ in range(prompt_len)] for _ in range(num_prompts)]
            params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0,
                                    seed=rng.getrandbits(32))
            killer = threading.Thread(target=_kill_when_busy, args=(pool, 0)) if step == kill_at else None
            if killer is not None:
                killer.start()
            outs = pool.generate(prompts, params)
            if killer is not None:
                killer.join()
            rewards, diffs, losses = [], [], []
            for prompt, out in zip(prompts, outs):
                comps = [c.token_ids for c in out.outputs]
                r = torch.tensor([reward(c, pool.vocab_size) for c in comps])
                adv = (r - r.mean()) / (r.std() + 1e-4)
                logp = sequence_logprobs(trainer, prompt, comps, "cpu")
                diffs.append((logp.detach() - torch.tensor([c.logprobs for c in out.outputs])).abs().max().item())
                losses.append(-(adv[:, None] * logp).mean())
                rewards.append(r.mean().item())
            opt.zero_grad()
            torch.stack(losses).mean().backward()
            opt.step()
            result = pool.push(trainer)  # one broadcast to every replica
            history["reward"].append(sum(rewards) / len(rewards))
            history["logprob_diff"].append(max(diffs))
            history["weight_version"].append(outs[0].outputs[0].weight_version)
            if verbose:
                states = " ".join(f"r{i}:{s['status']}/v{s['weight_version']}" for i, s in pool.replica_states().items())
                print(f"step {step:2d}  reward {history['reward'][-1]:.3f}  max |rollout - trainer logprob| "
                      f"{max(diffs):.1e}  pushed v{result.version} to {result.updated}  [{states}]  "
                      f"({time.perf_counter() - t0:.2f} s)")
        history["failures"] = len(pool.failures)
        if kill_at is not None:  # the killed replica: restarted by Ray, resynchronised to the last push
            pool.wait_until_ready(timeout=120)
        history["final_states"] = pool.replica_states()
        if verbose:
            print("reward curve:", " ".join(f"{r:.2f}" for r in history["reward"]))
            for e in pool.failures:
                print(f"replica {e.replica}: {e.what}: {e.error[:100]}")
            print("replicas at the end:", history["final_states"])
    finally:
        pool.shutdown()
        tmp.cleanup()
    return history


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--kill-at", type=int, default=None, help="kill replica 0 during this step's rollout")
    ap.add_argument("--address", default=None, help="a running cluster ('auto'); default: a local one")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(steps=a.steps, replicas=a.replicas, kill_at=a.kill_at, address=a.address, seed=a.seed)
