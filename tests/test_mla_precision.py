"""DeepSeek-V3's MLA in bfloat16 on the CPU (torch ops): the absorbed decode (q_nope W_uk as a
latent query, attention over the cached latents, W_uv after) is no further from the float32
reference than the expanded prefill (HF's order: per-head K/V from the latents) on the same
tokens. Dense layers only, so that no near-tied router choice flips under bf16 rounding and
the comparison sees MLA alone. The bf16 bound of tests/gpu/test_deepseek_gpu.py (the Triton
decode against the same noise floor) rests on this."""
from __future__ import annotations

import pytest

from atom import RolloutEngine, SamplingParams
from conftest import TINY_VOCAB
from helpers import bf16_distance, random_prompts


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None}], ids=["qlora", "no-qlora"])
def test_absorbed_bf16_decode_within_expanded_prefill_noise(make_tiny_model, overrides):
    path = make_tiny_model("deepseek_v3", first_k_dense_replace=4, **overrides)
    prompts = random_prompts([40, 70, 9], TINY_VOCAB, seed=8)
    params = SamplingParams(n=2, temperature=0, max_tokens=20, ignore_eos=True, logprobs=0, logprobs_mode="raw")
    # Room for every prompt in the first step: later steps are pure decodes (the absorbed form).
    outs = RolloutEngine(path, device="cpu", dtype="bfloat16", max_num_batched_tokens=256).generate(prompts, params)
    ref = RolloutEngine(path, device="cpu", dtype="float32", max_num_batched_tokens=32)
    dist, floor = bf16_distance(path, prompts, outs, ref)
    # Measured 2026-12-02 (3 prompt seeds): decode 0.034-0.046, prefill 0.034-0.042, HF bf16 0.040-0.062.
    assert 0.005 < floor < 0.1, f"bf16 prefill {floor:.3g} from float32"
    assert dist < 1.25 * floor, f"bf16 absorbed decode {dist:.3g} from float32, expanded prefill {floor:.3g}"
