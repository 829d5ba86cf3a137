"""TRL's GRPOTrainer training with atom as its generation engine (CPU, a few steps).

    python examples/trl_grpo.py [MODEL_DIR] [--steps N]

TRL (pip install trl) runs its own GRPO loop in its vLLM colocate mode; `use_atom_for_trl_vllm()`
makes that mode build atom's vLLM-compatible `LLM` (atom.compat.vllm), so atom generates every
step, sleeps (level 2) during the optimizer step, and gets the trainer's weights after every
step through `load_weights`. TRL's own metrics report the logprob gap between atom's rollouts and
the trainer (`sampling/sampling_logp_difference/max`).

MODEL_DIR defaults to atom's embedded SmolLM2-135M-Instruct (slow on a CPU: ~1 min a step);
the tests use a tiny random Llama with SmolLM2's tokenizer.
"""
from __future__ import annotations

import argparse
import tempfile

from atom.compat.trl import use_atom_for_trl_vllm

PROMPTS = ["The capital of France is", "Write a haiku about the sea:", "2 + 2 =", "Name a color:",
           "Once upon a time", "The best programming language is", "My favourite food is", "Hello,"]


def short_answers(completions, **kwargs) -> list[float]:
    """Reward: completions near 20 characters (a task with a clear direction to learn)."""
    return [-abs(len(c) - 20) / 20.0 for c in completions]


def train(model_path: str, steps: int = 3, output_dir: str | None = None, num_generations: int = 4,
          max_completion_length: int = 8):
    """Run GRPO for `steps` steps; returns the trainer (its state.log_history holds TRL's metrics)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    use_atom_for_trl_vllm()
    args = GRPOConfig(
        output_dir=output_dir or tempfile.mkdtemp(prefix="atom_trl_"), max_steps=steps, learning_rate=1e-4,
        per_device_train_batch_size=num_generations, num_generations=num_generations,
        max_completion_length=max_completion_length, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=True, bf16=False, seed=0, use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=True,
        vllm_max_model_length=256)
    trainer = GRPOTrainer(model=model_path, reward_funcs=short_answers, args=args,
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    trainer.train()
    return trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    if a.model is None:
        from atom.rollout.default_model import ensure_default_checkpoint
        a.model = ensure_default_checkpoint()
    trainer = train(a.model, a.steps)
    for row in trainer.state.log_history:
        if "sampling/sampling_logp_difference/max" in row:
            print(f"step {row['step']}: reward {row['reward']:+.3f}, logprob gap atom vs trainer "
                  f"mean {row['sampling/sampling_logp_difference/mean']:.2e} "
                  f"max {row['sampling/sampling_logp_difference/max']:.2e}")


if __name__ == "__main__":
    main()
