"""TRL's GRPOTrainer generating with atom, through TRL's own vLLM colocate path.

TRL's colocate mode (`GRPOConfig(use_vllm=True, vllm_mode="colocate")`) builds a vLLM `LLM` in
the trainer's process, generates from token ids with processed logprobs, sleeps it during the
optimizer step, and after every step streams the trainer's parameters into it with
`llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights`. With vLLM not
installed, `use_atom_for_trl_vllm()` points that code at `atom.compat.vllm` instead; nothing
else of TRL changes, and its importance-sampling metrics
(`sampling/sampling_logp_difference/mean` and `/max`) then report the gap between atom's
rollout logprobs and the trainer's.

    from atom.compat.trl import use_atom_for_trl_vllm
    use_atom_for_trl_vllm()
    trainer = GRPOTrainer(model=path, reward_funcs=..., train_dataset=...,
                          args=GRPOConfig(use_vllm=True, vllm_mode="colocate", ...))
    trainer.train()
"""
from __future__ import annotations

from atom.compat import vllm


def use_atom_for_trl_vllm() -> None:
    """Make TRL's vLLM generation backend (trl.generation.vllm_generation) use atom's vLLM layer.

    Call before building the trainer. Only the colocate mode is served: the server mode talks
    HTTP to a `vllm serve` process, which atom does not provide.
    """
    try:
        import trl.generation.vllm_generation as backend
    except ImportError as e:
        raise ImportError("use_atom_for_trl_vllm needs TRL (pip install trl)") from e
    backend.is_vllm_available = lambda min_version=None: True
    backend.LLM = vllm.LLM
    backend.SamplingParams = vllm.SamplingParams
    backend.RequestOutput = vllm.RequestOutput
    backend.StructuredOutputsParams = vllm.StructuredOutputsParams
