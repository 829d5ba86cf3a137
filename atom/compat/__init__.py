"""Drop-in layers that let code written for other engines drive atom.

* `atom.compat.vllm`: vLLM's offline `LLM` API (generate, sleep / wake_up, load_weights,
  collective_rpc) over a RolloutEngine: change `from vllm import ...` to
  `from atom.compat.vllm import ...`.
* `atom.compat.trl`: TRL's vLLM colocate path (GRPOTrainer(use_vllm=True,
  vllm_mode="colocate")) generating with atom through that layer.
"""
