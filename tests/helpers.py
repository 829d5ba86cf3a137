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
