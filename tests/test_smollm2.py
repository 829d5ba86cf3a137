"""Issue 2, test 2: the real SmolLM2-135M-Instruct, greedy, token for token against transformers."""
from __future__ import annotations

from atom import RolloutEngine, SamplingParams
from helpers import hf_greedy


def test_smollm2_greedy_equals_transformers(smollm2_path):
    engine = RolloutEngine(smollm2_path, max_model_len=512)
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Write a haiku about the sea."}],
             [{"role": "user", "content": "List three prime numbers."}]]
    outs = engine.generate(chats, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for out in outs:
        want = hf_greedy(smollm2_path, out.prompt_token_ids, 24)
        assert out.outputs[0].token_ids == want
        assert out.outputs[0].text.strip()  # real text, decoded by the checkpoint's tokenizer
    # Text prompts go through the same tokenizer.
    text_out = engine.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=5))[0]
    assert text_out.prompt_token_ids == engine.tokenizer("The capital of France is").input_ids
