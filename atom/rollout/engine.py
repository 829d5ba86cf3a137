"""RolloutEngine: the public entry point trainers build inside their own processes."""
from __future__ import annotations

import dataclasses
import os
import random
from typing import Sequence as Seq

from tqdm.auto import tqdm

from atom.config import EngineConfig
from atom.engine.llm_engine import LLMEngine
from atom.engine.sequence import Request
from atom.outputs import Completion, EngineStats, RolloutOutput
from atom.rollout.inputs import normalize_prompts, prompt_type_error, sampling_params_list
from atom.rollout.rl import RLMixin
from atom.sampling_params import SamplingParams

Prompt = str | list[int] | list[dict]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _load_tokenizer(path: str):
    if not path or not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


class RolloutEngine(RLMixin):
    """Generates completions with per-token logprobs from a HF checkpoint.

    Example::

        engine = RolloutEngine("path/to/checkpoint", max_num_seqs=64)
        outs = engine.generate(["Hello"], SamplingParams(n=8, temperature=1.0, logprobs=0))

    RL: `sleep` / `wake_up` / `is_sleeping` release device memory between rollouts and
    `update_weights` loads new weights in place (see atom/rollout/rl.py).
    """

    def __init__(self, model: str | EngineConfig, **overrides) -> None:
        config = model.replace(**overrides) if isinstance(model, EngineConfig) else EngineConfig(model=model, **overrides)
        self.config = config
        self._engine = LLMEngine(config)
        self.tokenizer = _load_tokenizer(config.tokenizer if config.tokenizer is not None else config.model)
        self._rng = random.Random(config.seed)
        self._busy = False
        self.weight_version = 0
        self._init_rl()

    # ---- properties ----------------------------------------------------------------------
    @property
    def stats(self) -> EngineStats:
        """Counters since construction: prompt tokens computed / served from cache, preemptions, ..."""
        return self._engine.stats

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self._engine.args.vocab_size

    # ---- generate ------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RolloutOutput]:
        """Sample completions for each prompt; outputs come back in input order.

        prompts: strings, token-id lists, or chat conversations ([{"role", "content"}, ...]).
        sampling_params: one SamplingParams for all prompts, or one per prompt (default: SamplingParams()).
        Raises TypeError (an argument of the wrong type) or ValueError (a bad value, a request larger than
        the engine can ever run: n > max_num_seqs, a sequence the KV pool cannot hold) before anything
        is started, and RuntimeError in the wrong state.
        """
        self._check_ready("generate")
        self._check_can_generate()
        prompts = normalize_prompts(prompts)
        params = self._per_prompt_params(sampling_params, len(prompts))
        requests = [self._make_request(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
        for req in requests:  # only once every prompt passed: a rejected call leaves the stream alone
            req.seed = req.params.seed if req.params.seed is not None else self._rng.getrandbits(63)
        bar = tqdm(total=sum(r.params.n for r in requests), desc="rollout", unit="seq", disable=not use_tqdm)
        self._busy = True
        try:
            self._engine.run(requests, self._detokenize if self.tokenizer is not None else None,
                             bar.update)
        finally:
            self._busy = False
            bar.close()
        return [self._output(r) for r in requests]

    def _check_ready(self, what: str) -> None:
        if self._busy:
            raise RuntimeError(f"{what}: the engine is already running a generate call")

    def _per_prompt_params(self, sampling_params, count: int) -> list[SamplingParams]:
        params = sampling_params_list(sampling_params, count)
        frozen: dict[int, SamplingParams] = {}
        for sp in params:
            sp.validate(self.vocab_size, max_num_seqs=self.config.max_num_seqs)
            if sp.stop and self.tokenizer is None:
                raise ValueError("SamplingParams.stop needs a tokenizer; this checkpoint has none")
            # A private copy per call: the caller may change its object later, the run must not see it.
            frozen.setdefault(id(sp), dataclasses.replace(sp))
        return [frozen[id(sp)] for sp in params]

    def tokenize(self, prompt: Prompt) -> list[int]:
        """The token ids `generate` would run for one prompt (text, token ids or a chat).

        Raises the ValueError `generate` would raise for it (no tokenizer, empty, ids outside the
        vocabulary, too long for max_model_len), or TypeError for a value that is no prompt at all,
        so callers can check a data set up front.
        """
        return self._prompt_ids("prompt", prompt)

    def _prompt_ids(self, label: str, prompt: Prompt) -> list[int]:
        ids = self._raw_ids(label, prompt)
        if not ids:
            raise ValueError(f"{label} is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"{label} has {len(ids)} tokens; max_model_len={self.max_model_len} "
                             "leaves no room to generate")
        return ids

    def _raw_ids(self, label: str, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{label}: text prompts need a tokenizer; pass token ids instead")
            return list(self.tokenizer(prompt).input_ids)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            if self.tokenizer is None:
                raise ValueError(f"{label}: chat prompts need a tokenizer with a chat template")
            for m in prompt:
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise ValueError(f"{label}: each chat message needs string 'role' and 'content'")
            text = self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False).input_ids)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"{label}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
            return list(prompt)
        raise prompt_type_error(label, prompt)

    def _make_request(self, index: int, prompt: Prompt, params: SamplingParams) -> Request:
        ids = self._prompt_ids(f"prompt {index}", prompt)
        longest = min(len(ids) + params.max_tokens, self.max_model_len)
        if not self._engine.max_tokens_fit(longest):
            bm = self._engine.block_manager
            raise ValueError(f"prompt {index}: {longest} tokens (prompt {len(ids)} + max_tokens={params.max_tokens}, "
                             f"at most max_model_len={self.max_model_len}) do not fit the KV cache of "
                             f"{bm.num_blocks} blocks of {bm.block_size} tokens; lower max_tokens or raise "
                             "num_kv_blocks / kv_cache_memory_bytes")
        return Request(index, prompt, ids, params, seed=0)

    def _detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _output(self, req: Request) -> RolloutOutput:
        completions = []
        for seq in sorted(req.sequences, key=lambda s: s.sample_index):
            ids = seq.output_token_ids
            text = self._detokenize(ids) if self.tokenizer is not None else ""
            if seq.stop_text_len is not None:
                text = text[: seq.stop_text_len]
            completions.append(Completion(
                index=seq.sample_index, token_ids=ids, text=text, logprobs=seq.logprobs,
                top_logprobs=seq.top_logprobs, finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason, weight_version=self.weight_version))
        return RolloutOutput(prompt=req.prompt, prompt_token_ids=req.prompt_token_ids, outputs=completions,
                             prompt_logprobs=req.prompt_logprobs)
