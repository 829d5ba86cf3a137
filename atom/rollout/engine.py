"""RolloutEngine: the public entry point trainers build inside their own processes."""
from __future__ import annotations

import dataclasses
import itertools
import os
import random
import threading
from typing import Iterable, Sequence as Seq

from tqdm.auto import tqdm

from atom.config import EngineConfig
from atom.engine.cpu_threads import apply_cpu_threads
from atom.engine.llm_engine import LLMEngine
from atom.engine.probe import EngineProbe
from atom.engine.routing import routed_experts
from atom.engine.sequence import Request, Sequence
from atom.outputs import Completion, EngineStats, RolloutOutput
from atom.chat import ChatOptions, chat_token_ids
from atom.rollout.inputs import normalize_prompts, prompt_type_error, sampling_params_list, token_ids
from atom.rollout.rl import RLMixin
from atom.rollout.transfer import TransferMixin
from atom.rollout.text import bad_words_token_ids, completion_text
from atom.sampling_params import SamplingParams

Prompt = str | list[int] | list[dict]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _load_tokenizer(path: str):
    if not path or not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


class RolloutEngine(RLMixin, TransferMixin):
    """Generates completions with per-token logprobs from a HF checkpoint.

    Example::

        engine = RolloutEngine("path/to/checkpoint", max_num_seqs=64)
        outs = engine.generate(["Hello"], SamplingParams(n=8, temperature=1.0, logprobs=0))

    RL: `sleep` / `wake_up` / `is_sleeping` release device memory between rollouts and
    `update_weights` loads new weights in place (see atom/rollout/rl.py); weights also arrive as
    per-tensor broadcasts or IPC handles (atom/rollout/transfer.py).

    Requests one at a time: `add_request(request_id, prompt, params)`, `step()`, `abort(ids)`,
    `pause_generation(mode)` / `resume_generation()` (the core the asynchronous front end,
    atom.AsyncRolloutEngine, drives). Thread-safe: calls from several threads take turns.
    """

    def __init__(self, model: str | EngineConfig, **overrides) -> None:
        config = model.replace(**overrides) if isinstance(model, EngineConfig) else EngineConfig(model=model, **overrides)
        self.config = config
        if config.torch_device().type == "cpu":
            # Batch invariance needs one thread: BLAS splits work between threads by the batch's shape.
            apply_cpu_threads(1 if config.batch_invariant else config.cpu_threads)
        self.tokenizer = _load_tokenizer(config.tokenizer if config.tokenizer is not None else config.model)
        self._engine = LLMEngine(config, self._detokenize if self.tokenizer is not None else None)
        self._chat_options = ChatOptions(chat_template_kwargs=dict(config.chat_template_kwargs))
        self._rng = random.Random(config.seed)
        self._lock = threading.RLock()
        self._batch_ids = itertools.count()
        self._unclaimed: dict[str, Request] = {}  # requests a batch call's steps touched, for `step`
        self._init_rl()
        self._init_transfer()

    # ---- properties ----------------------------------------------------------------------
    @property
    def stats(self) -> EngineStats:
        """Counters since construction: prompt tokens computed / served from cache, preemptions, ..."""
        return self._engine.stats

    @property
    def weight_version(self) -> int | str:
        """The version of the weights serving now (update_weights sets it)."""
        return self._engine.weight_version

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    @property
    def num_kv_blocks(self) -> int:
        """Size of the KV pool in blocks (of kv_block_size tokens)."""
        return self._engine.num_kv_blocks

    @property
    def num_free_kv_blocks(self) -> int:
        """KV blocks no sequence holds right now (cached prefixes count as free: they are evictable)."""
        return self._engine.num_free_kv_blocks

    @property
    def step_in_flight(self) -> bool:
        """Whether a decode step is queued on the device with its tokens not read yet (the
        overlapped loop; abort / pause / weight calls read it first)."""
        return self._engine.step_in_flight

    @property
    def num_running_sequences(self) -> int:
        """Sequences that hold KV blocks right now (the n samples of a request count one each)."""
        return self._engine.num_running

    @property
    def num_cuda_graphs(self) -> int:
        """Decode batch sizes captured as CUDA graphs so far (0 on the CPU or with enforce_eager;
        every size up to cuda_graph_max_batch_size from the start with cuda_graphs_at_start)."""
        return self._engine.num_cuda_graphs

    def probe(self) -> EngineProbe:
        """Diagnostics for benchmarks and debugging (atom/engine/probe.py): loop phase timers,
        the decode path's timers and CUDA graphs, a profiler over engine steps, memory-pool
        statistics and explicit KV backing / wake policy. Not needed to generate, and not a
        stable API; call it between calls, not while another thread runs the engine."""
        return EngineProbe(self._engine)

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
        Requests added with add_request progress too; their outputs wait for the next `step`.
        """
        with self._lock:
            self._check_can_generate()
            prompts = normalize_prompts(prompts)
            params = self._per_prompt_params(sampling_params, len(prompts))
            requests = [self._make_request(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
            call = next(self._batch_ids)
            for req in requests:  # only once every prompt passed: a rejected call leaves the stream alone
                req.seed = req.params.seed if req.params.seed is not None else self._rng.getrandbits(63)
                req.request_id = f"\0batch-{call}-{req.index}"  # never a caller's id
            bar = tqdm(total=sum(r.params.n for r in requests), desc="rollout", unit="seq", disable=not use_tqdm)
            try:
                for req in self._engine.run(requests, bar.update):
                    self._unclaimed[req.request_id] = req
            finally:
                bar.close()
            return [self._output(r) for r in requests]

    # ---- requests one at a time ----------------------------------------------------------
    def add_request(self, request_id: str, prompt: Prompt, sampling_params: SamplingParams | None = None) -> None:
        """Queue one prompt under `request_id` (unique among live requests); `step` runs it.

        Raises ValueError for an invalid prompt or parameters, or a request_id already live.
        """
        with self._lock:
            self._add(request_id, prompt, sampling_params)

    def _add(self, request_id: str, prompt: Prompt, sampling_params: SamplingParams | None) -> Request:
        if not isinstance(request_id, str) or not request_id or request_id.startswith("\0"):
            raise TypeError(f"request_id must be a non-empty string, got {request_id!r}")
        self._check_can_generate(paused_ok=True)
        (params,) = self._per_prompt_params(sampling_params, 1)
        req = self._make_request(0, prompt, params)
        req.request_id = request_id
        if self._engine.is_live(request_id):  # before a seed is drawn: a rejected call changes nothing
            raise ValueError(f"request_id {request_id!r} is already in use by a live request")
        req.seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        self._engine.add_request(req)
        return req

    def step(self) -> list[RolloutOutput]:
        """Run one engine step; returns an output for every request it advanced (finished=False
        while running, cumulative), including requests a batch `generate` advanced meanwhile."""
        with self._lock:  # outputs read live requests: no other thread may step meanwhile
            return [self._output(r) for r in self._step_requests()]

    def _step_requests(self) -> list[Request]:
        with self._lock:
            touched = {id(r): r for r in self._unclaimed.values()}
            self._unclaimed = {}
            if self._engine.has_unfinished:
                self._check_can_generate(paused_ok=True)
                try:
                    touched.update((id(r), r) for r in self._engine.step())
                except BaseException:
                    self._engine.fail()
                    raise
            return list(touched.values())

    def has_unfinished_requests(self) -> bool:
        """Whether requests added with add_request are still running, waiting or held."""
        return self._engine.has_unfinished

    def abort(self, request_ids: str | Iterable[str]) -> dict[str, RolloutOutput | None]:
        """Abort live requests: each comes back with its tokens, logprobs and text so far and
        finish_reason "abort", its KV blocks freed at once. Unknown or already finished ids map
        to None (nothing happens to them)."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        with self._lock:
            done = {r.request_id: self._output(r) for r in self._engine.abort(ids)}
        return {i: done.get(i) for i in ids}

    def abort_all(self) -> list[RolloutOutput]:
        """Abort every live request (see abort)."""
        with self._lock:
            return [self._output(r) for r in self._engine.abort_all()]

    def pause_generation(self, mode: str = "abort") -> list[RolloutOutput]:
        """Stop generating, for a weight update or a sleep in between:

        * "abort": abort every live request (their partial outputs are returned);
        * "wait": run the admitted requests to completion first (their outputs come from `step`);
        * "keep": freeze them where they are, KV cache included; resume_generation continues them.

        While paused, update_weights, sleep and wake_up are allowed, and new requests wait.
        """
        with self._lock:
            aborted = self._pause_begin(mode)
            while not self._engine.paused:
                for req in self._engine.step():
                    self._unclaimed[req.request_id] = req
            return aborted

    # The asynchronous front end's view of the core (called on its loop thread).
    def _pause_begin(self, mode: str) -> list[RolloutOutput]:
        with self._lock:
            return [self._output(r) for r in self._engine.pause(mode)]

    def _pause_reached(self) -> bool:
        return self._engine.paused

    def _has_work(self) -> bool:
        return self._engine.has_unfinished and not self._engine.paused

    def _has_unclaimed(self) -> bool:
        return bool(self._unclaimed)

    def resume_generation(self, recompute_kv: bool = False) -> None:
        """Continue after pause_generation; requests that arrived meanwhile start.

        recompute_kv=False (default, as vLLM and SGLang do): kept requests continue on the KV
        their tokens got under the old weights, so later tokens come from the new weights
        reading old-weight keys and values (no extra work). True: their KV (prompt and tokens
        so far) is recomputed under the new weights first, so every later token is drawn from
        exactly the new policy; costs one prefill of each kept sequence.
        """
        with self._lock:
            self._engine.resume(recompute_kv=recompute_kv)

    # ---- engine groups (TP / EP): requests enter on rank 0 ------------------------------
    def follow(self) -> None:
        """Ranks 1.. of an engine group whose requests enter on rank 0 (add_request, step, the
        asynchronous front end): run them in lockstep with rank 0 until it calls
        stop_followers(). The SPMD batch generate (every rank calls it) needs no follow."""
        with self._lock:
            self._engine.follow()

    def stop_followers(self) -> None:
        """Rank 0 of an engine group: end the other ranks' follow() (live requests are aborted)."""
        with self._lock:
            self._engine.stop_followers()

    def _idle_tick(self) -> None:
        """Rank 0 of an idle engine group: let the followers hear from it before they time out."""
        with self._lock:
            self._engine.heartbeat()

    @property
    def _tick_s(self) -> float | None:
        return self.config.dist_timeout_s / 4 if self.config.tensor_parallel_size * self.config.expert_parallel_size > 1 else None

    @property
    def is_paused(self) -> bool:
        return self._engine.pause_mode is not None

    def _per_prompt_params(self, sampling_params, count: int) -> list[SamplingParams]:
        params = sampling_params_list(sampling_params, count)
        frozen: dict[int, SamplingParams] = {}
        for sp in params:
            sp.validate(self.vocab_size, max_num_seqs=self.config.max_num_seqs)
            if sp.return_routed_experts and not self.config.enable_return_routed_experts:
                raise ValueError("SamplingParams.return_routed_experts needs "
                                 "EngineConfig(enable_return_routed_experts=True)")
            if id(sp) not in frozen:
                frozen[id(sp)] = self._private_params(sp)
        return [frozen[id(sp)] for sp in params]

    def _private_params(self, sp: SamplingParams) -> SamplingParams:
        """A private copy of validated params for one call (the caller may change its object later;
        the run must not see it), with what needs this engine checked and resolved: the logprobs
        limit, the tokenizer for stop strings and bad words, bad words' token ids."""
        limit = self.config.max_logprobs if self.config.max_logprobs >= 0 else self.vocab_size
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(sp, name)
            if k is not None and (self.vocab_size if k < 0 else k) > limit:
                raise ValueError(f"SamplingParams.{name}={k} is invalid: must be at most max_logprobs={limit} "
                                 "(EngineConfig.max_logprobs; -1 there allows the whole vocabulary)")
        for name in ("stop", "bad_words"):
            if getattr(sp, name) and self.tokenizer is None:
                raise ValueError(f"SamplingParams.{name} needs a tokenizer; this checkpoint has none")
        private = dataclasses.replace(sp)
        private.bad_words_token_ids = bad_words_token_ids(self.tokenizer, sp.bad_words, self.vocab_size)
        return private

    def tokenize(self, prompt: Prompt) -> list[int]:
        """The token ids `generate` would run for one prompt (text, token ids or a chat).

        Raises the ValueError `generate` would raise for it (no tokenizer, empty, ids outside the
        vocabulary, too long for max_model_len), or TypeError for a value that is no prompt at all,
        so callers can check a data set up front.
        """
        return self._prompt_ids("prompt", prompt)

    def _prompt_ids(self, label: str, prompt: Prompt, truncate: int | None = None) -> list[int]:
        ids = self._raw_ids(label, prompt)
        if truncate is not None:  # SamplingParams.truncate_prompt_tokens: keep the last tokens
            ids = ids[-(self.max_model_len - 1 if truncate == -1 else truncate):]
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
            return chat_token_ids(self.tokenizer, list(prompt), label, self._chat_options)
        ids = token_ids(prompt)
        if ids is not None:
            vocab = self.vocab_size
            if ids and (min(ids) < 0 or max(ids) >= vocab):  # C-speed scans: prompts are long
                bad = next(t for t in ids if not 0 <= t < vocab)
                raise ValueError(f"{label}: token id {bad} is outside the vocabulary [0, {vocab})")
            return ids
        raise prompt_type_error(label, prompt)

    def _make_request(self, index: int, prompt: Prompt, params: SamplingParams) -> Request:
        ids = self._prompt_ids(f"prompt {index}", prompt, params.truncate_prompt_tokens)
        longest = self.max_model_len if params.max_tokens is None else min(len(ids) + params.max_tokens,
                                                                            self.max_model_len)
        if not self._engine.max_tokens_fit(longest):
            raise ValueError(f"prompt {index}: {longest} tokens (prompt {len(ids)} + max_tokens={params.max_tokens}, "
                             f"at most max_model_len={self.max_model_len}) do not fit the KV cache of "
                             f"{self.num_kv_blocks} blocks of {self.config.kv_block_size} tokens; lower max_tokens or raise "
                             "num_kv_blocks / kv_cache_memory_bytes")
        return Request(index, prompt, ids, params, seed=0)

    def _detokenize(self, ids: list[int], params: SamplingParams | None = None) -> str:
        if params is None:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens,
                                     spaces_between_special_tokens=params.spaces_between_special_tokens)

    def decode_tokens(self, token_ids: Iterable[int]) -> list[str]:
        """Each token id decoded on its own (special tokens kept), as vLLM's Logprob.decoded_token:
        the strings of the sampled tokens and of the top_logprobs alternatives."""
        if self.tokenizer is None:
            raise ValueError("decode_tokens needs a tokenizer; this checkpoint has none")
        return [self.tokenizer.decode([t]) for t in token_ids]

    def _output(self, req: Request) -> RolloutOutput:
        completions = [self._completion(seq) for seq in sorted(req.sequences, key=lambda s: s.sample_index)]
        return RolloutOutput(prompt=req.prompt, prompt_token_ids=req.prompt_token_ids, outputs=completions,
                             prompt_logprobs=req.prompt_logprobs, request_id=req.request_id, finished=req.finished,
                             prompt_logprob_ranks=req.prompt_logprob_ranks,
                             metrics=dataclasses.replace(req.metrics) if req.metrics is not None else None)

    def _completion(self, seq: Sequence) -> Completion:
        ids = seq.output_token_ids
        done = seq.finish_reason is not None and seq.status.value == "finished"
        text = completion_text(self._detokenize, seq, done) if self.tokenizer is not None else ""
        spans = [tuple(s) for s in seq.weight_spans]
        return Completion(
            index=seq.sample_index, token_ids=ids, text=text, logprobs=seq.logprobs,
            top_logprobs=seq.top_logprobs, finish_reason=seq.finish_reason if done else None,
            stop_reason=seq.stop_reason, weight_version=spans[-1][0] if spans else self.weight_version,
            weight_versions=spans, logprob_ranks=seq.logprob_ranks,
            cumulative_logprob=float(sum(seq.logprobs)) if seq.params.logprobs is not None else None,
            routed_experts=routed_experts(seq) if seq.params.return_routed_experts else None)
