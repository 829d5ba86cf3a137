"""vLLM's offline API over atom: code written for vLLM's `LLM` runs by changing the import.

    from atom.compat.vllm import LLM, SamplingParams     # was: from vllm import LLM, SamplingParams

    llm = LLM("path/to/hf_checkpoint", enable_sleep_mode=True, logprobs_mode="processed_logprobs")
    outs = llm.generate([{"prompt_token_ids": [1, 2, 3]}, "Hello"], SamplingParams(n=4, logprobs=0))
    llm.sleep(level=2); llm.wake_up(tags=["weights"])
    llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(model.named_parameters())
    llm.wake_up(tags=["kv_cache"]); llm.reset_prefix_cache()

See README.md (vLLM compatibility) for what maps to what and what is not supported.
"""
from atom.compat.vllm.llm import LLM, LLMEngine
from atom.compat.vllm.outputs import CompletionOutput, Logprob, RequestOutput
from atom.compat.vllm.sampling_params import SamplingParams, StructuredOutputsParams


def TokensPrompt(prompt_token_ids: list[int], **kwargs) -> dict:  # noqa: N802 - vLLM's name (a TypedDict there)
    return {"prompt_token_ids": list(prompt_token_ids), **kwargs}


def TextPrompt(prompt: str, **kwargs) -> dict:  # noqa: N802
    return {"prompt": prompt, **kwargs}


__all__ = ["LLM", "LLMEngine", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput",
           "Logprob", "TokensPrompt", "TextPrompt"]
