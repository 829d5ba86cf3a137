"""Oracles shared by the engine tests: HF transformers on the same checkpoint."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def hf_model(path: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logits(path: str, token_ids: list[int]) -> torch.Tensor:
    """[len, vocab] float32 logits of the HF forward over one sequence."""
    return hf_model(path)(torch.tensor([token_ids])).logits[0].float()


@torch.no_grad()
def hf_greedy(path: str, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = hf_model(path).generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Ids >= 2 keep bos/eos (0, 1) out of prompts.
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def teacher_forced(engine, prompt: list[int], tokens: list[int]) -> list[dict[int, float]]:
    """The engine's raw prompt logprobs of `tokens` after `prompt` (one dict per token, holding
    at least the token and the engine's best)."""
    from atom import SamplingParams
    scored = engine.generate([prompt + tokens], SamplingParams(max_tokens=1, prompt_logprobs=1, logprobs_mode="raw"))
    return scored[0].prompt_logprobs[len(prompt):]


def bf16_distance(path: str, prompts: list[list[int]], outs, reference) -> tuple[float, float]:
    """(mean |logprob - reference's| of every sample's sampled tokens, the same mean for the CPU
    engine's bfloat16 prompt logprobs of those tokens): the distance of a bf16 run from the
    float32 `reference` engine, and the bf16 noise floor of the same tokens to judge it by."""
    from atom import RolloutEngine
    noisy = RolloutEngine(path, device="cpu", dtype="bfloat16", max_num_batched_tokens=32)
    diffs, noise = [], []
    for prompt, out in zip(prompts, outs):
        for sample in out.outputs:
            want = teacher_forced(reference, prompt, sample.token_ids)
            base = teacher_forced(noisy, prompt, sample.token_ids)
            for step, tok in enumerate(sample.token_ids):
                diffs.append(abs(sample.logprobs[step] - want[step][tok]))
                noise.append(abs(base[step][tok] - want[step][tok]))
    return sum(diffs) / len(diffs), sum(noise) / len(noise)
