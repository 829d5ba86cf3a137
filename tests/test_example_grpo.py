"""examples/grpo_colocated.py runs to completion on CPU and its reward rises."""
from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "grpo_colocated.py"


def test_grpo_example_reward_rises():
    spec = importlib.util.spec_from_file_location("grpo_colocated", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    history = example.main(steps=8, verbose=False)
    rewards = history["reward"]
    assert len(rewards) == 8
    assert sum(rewards[-3:]) / 3 > sum(rewards[:2]) / 2 + 0.2, rewards
    # The engine's logprobs are the trainer's (same fp32 weights, pushed after every step).
    assert max(history["logprob_diff"]) < 1e-4, history["logprob_diff"]
    assert history["weight_version"] == list(range(8))
