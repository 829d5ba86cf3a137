"""A script written for vLLM's `LLM` API, run on atom: the only change is the import line.

    python examples/vllm_compat.py [MODEL_DIR]     (default: atom's embedded SmolLM2-135M-Instruct; CPU, ~20 s)

What an RL loop does with vLLM, step by step: generate from token ids with processed logprobs,
sleep / wake, push the trainer's weights through `load_weights` (the path TRL and verl reach
into), reset the prefix cache, generate again, and compare the engine's logprobs with the
trainer's own forward pass.
"""
from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM

from atom.compat.vllm import LLM, SamplingParams  # was: from vllm import LLM, SamplingParams

TEMPERATURE = 0.8


def trainer_logprobs(model, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
    """log p(token) under the trainer, at the sampling temperature (what GRPO trainers compute)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1: -1].float() / TEMPERATURE
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion_ids)[:, None])[:, 0].tolist()


def main(model_path: str) -> dict:
    llm = LLM(model=model_path, enable_sleep_mode=True, logprobs_mode="processed_logprobs", max_model_len=512,
              seed=0)
    tokenizer = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tokenizer.encode("The capital of France is")}, "Once upon a time"]
    params = SamplingParams(n=4, temperature=TEMPERATURE, max_tokens=12, logprobs=0, seed=1)

    first = llm.generate(prompts, params, use_tqdm=False)
    llm.sleep(level=1)  # weights to host memory, KV cache dropped
    llm.wake_up()
    again = llm.generate(prompts, params, use_tqdm=False)
    same_after_wake = [[c.token_ids for c in o.outputs] for o in first] == [[c.token_ids for c in o.outputs]
                                                                            for o in again]

    # The trainer's step (here: a small nudge of every weight), then the weight sync.
    trainer = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in trainer.parameters():
            p.mul_(1.02)
    llm.sleep(level=2)  # weights and KV cache dropped: the trainer has the device
    llm.wake_up(tags=["weights"])
    llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(trainer.named_parameters())
    llm.wake_up(tags=["kv_cache"])
    llm.reset_prefix_cache()
    outs = llm.generate(prompts, params, use_tqdm=False)

    gap = 0.0
    for out in outs:
        for c in out.outputs:
            rollout = [c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)]
            want = trainer_logprobs(trainer, out.prompt_token_ids, c.token_ids)
            gap = max(gap, max(abs(a - b) for a, b in zip(rollout, want)))
    print(f"{outs[1].prompt!r} -> {outs[1].outputs[0].text!r}")
    print(f"same tokens after sleep/wake: {same_after_wake}; max |rollout - trainer| logprob after the weight "
          f"sync: {gap:.2e}")
    return {"outputs": outs, "same_after_wake": same_after_wake, "max_logprob_gap": gap}


if __name__ == "__main__":
    if len(sys.argv) > 1:
        path = sys.argv[1]
    else:
        from atom.rollout.default_model import ensure_default_checkpoint
        path = ensure_default_checkpoint()
    main(path)
