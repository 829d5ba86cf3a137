"""vLLM's offline and asynchronous APIs over atom: code written for vLLM's `LLM` or `AsyncLLM`
runs by changing the import.

    from atom.compat.vllm import LLM, SamplingParams     # was: from vllm import LLM, SamplingParams

    llm = LLM("path/to/hf_checkpoint", enable_sleep_mode=True, logprobs_mode="processed_logprobs")
    outs = llm.generate([{"prompt_token_ids": [1, 2, 3]}, "Hello"], SamplingParams(n=4, logprobs=0))
    llm.sleep(level=2); llm.wake_up(tags=["weights"])
    llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(model.named_parameters())
    llm.wake_up(tags=["kv_cache"]); llm.reset_prefix_cache()

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model="path/to/hf_checkpoint"))
    async for out in engine.generate("Hello", SamplingParams(output_kind=RequestOutputKind.DELTA), "id-1"): ...

See README.md (vLLM compatibility) for what maps to what and what is not supported.
"""
from atom.compat.vllm.async_llm import AsyncLLM, AsyncLLMEngine
from atom.compat.vllm.engine_args import AsyncEngineArgs
from atom.compat.vllm.llm import LLM, LLMEngine
from atom.compat.vllm.outputs import CompletionOutput, Logprob, RequestOutput
from atom.compat.vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
from atom.rollout.async_engine import EngineDeadError


def TokensPrompt(prompt_token_ids: list[int], **kwargs) -> dict:  # noqa: N802 - vLLM's name (a TypedDict there)
    return {"prompt_token_ids": prompt_token_ids, **kwargs}  # as given (a TypedDict); generate converts


def TextPrompt(prompt: str, **kwargs) -> dict:  # noqa: N802
    return {"prompt": prompt, **kwargs}


__all__ = ["LLM", "LLMEngine", "AsyncLLM", "AsyncLLMEngine", "AsyncEngineArgs", "EngineDeadError", "SamplingParams",
           "RequestOutputKind", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob",
           "TokensPrompt", "TextPrompt"]
