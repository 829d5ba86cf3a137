"""TRL's GRPOTrainer (from PyPI) trains with atom generating, through TRL's vLLM colocate path."""
from __future__ import annotations

import importlib.util
import os


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example():
    spec = importlib.util.spec_from_file_location("trl_grpo", os.path.join(ROOT, "examples", "trl_grpo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grpo_trainer_trains_with_atom_and_weights_follow_every_step(tiny_chat_model_path, tmp_path, monkeypatch):
    import atom.compat.vllm.worker as worker
    loads: list[int] = []
    load = worker.Model.load_weights

    def counting_load(self, weights):
        names = load(self, weights)
        loads.append(len(names))
        return names
    monkeypatch.setattr(worker.Model, "load_weights", counting_load)

    trainer = _example().train(tiny_chat_model_path, steps=3, output_dir=str(tmp_path))
    rows = [r for r in trainer.state.log_history if "sampling/sampling_logp_difference/max" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # TRL's own report of the gap between atom's rollout logprobs and the trainer's (fp32):
    # a sync that lagged one step behind shows up as 4e-2 and more here.
    for r in rows:
        assert r["sampling/sampling_logp_difference/max"] < 1e-4, r
        assert r["completions/mean_length"] > 0 and "reward" in r
    # Every step streamed every parameter into atom (TRL: one load_weights call per tensor).
    n_params = len(list(trainer.model.named_parameters()))
    assert len(loads) == 3 * n_params and set(loads) == {1}
    assert trainer.vllm_generation.llm.engine.weight_version == 0  # load_weights keeps the version
