"""The step loop: schedule -> run the model -> append tokens, fork samples, check stops."""
from __future__ import annotations

from typing import Callable

from atom.config import EngineConfig
from atom.distributed.dp import my_requests, share_results
from atom.engine.block_manager import BlockManager
from atom.engine.model_runner import ModelRunner, SampledToken, StepOutput
from atom.engine.scheduler import ScheduledBatch, Scheduler
from atom.engine.sequence import Request, Sequence, SeqStatus
from atom.models.hf_config import ModelArgs, load_model_args
from atom.outputs import EngineStats

_DEFAULT_MAX_MODEL_LEN = 8192


class LLMEngine:
    """Runs requests to completion. Single-threaded: one `run` at a time."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.args: ModelArgs = load_model_args(config.model)
        limit = self.args.max_position_embeddings
        self.max_model_len = config.max_model_len or min(limit, _DEFAULT_MAX_MODEL_LEN)
        if self.max_model_len > limit:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings={limit}")
        self.runner = ModelRunner(config, self.args, self.max_model_len)
        if config.load_format == "dummy":
            self.runner.init_dummy_weights()
        else:
            self.runner.load_checkpoint(config.model)
        num_blocks = self.runner.num_kv_blocks()
        self.runner.allocate_kv_cache(num_blocks)
        self.block_manager = BlockManager(num_blocks, config.kv_block_size, config.enable_prefix_caching)
        self.stats = EngineStats()
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, self.stats)
        self._detokenize: Callable[[list[int]], str] | None = None

    def max_tokens_fit(self, num_tokens: int) -> bool:
        """Whether one sequence of num_tokens tokens fits the KV pool on its own."""
        return self.block_manager.blocks_needed(num_tokens) <= self.block_manager.num_blocks

    def _no_room_message(self) -> str:
        bm = self.block_manager
        if bm.backed < bm.num_blocks:
            return (f"the KV cache cannot hold even one waiting sequence: only {bm.backed} of its {bm.num_blocks} "
                    "blocks could be given device memory after wake_up (something else holds the rest)")
        return "the KV cache cannot hold even one waiting sequence; raise num_kv_blocks / kv_cache_memory_bytes"

    # ---- the loop ------------------------------------------------------------------------
    def run(self, requests: list[Request], detokenize: Callable[[list[int]], str] | None,
            on_progress: Callable[[int], None] | None = None) -> None:
        """Generate every request's n completions; on any error, free everything and re-raise.

        Data-parallel attention (ep_mode="alltoall"): this rank runs its share of the requests, in
        lockstep with the other ranks, then every rank gets every result (atom/distributed/dp.py).
        """
        self._detokenize = detokenize
        dp = self.runner.parallel.dp
        for req in my_requests(requests, dp):
            req.sequences = [Sequence(req, 0, req.prompt_token_ids)]
            if req.params.prompt_logprobs is not None:
                req.prompt_logprobs = [None] * len(req.prompt_token_ids)
            self.scheduler.add(req.sequences[0])
        inflight = None
        try:
            while inflight is not None or (
                    self.scheduler.has_work if dp.size == 1 else dp.any(self.scheduler.has_work, self.runner.device)):
                if inflight is None:
                    batch = self.scheduler.schedule()
                    if not batch.seqs and self.scheduler.has_work:
                        raise RuntimeError(self._no_room_message())
                    inflight = self.runner.launch_decode(batch, self.block_manager)
                    if inflight is not None:
                        self._advance(batch)
                        continue
                    out = self.runner.execute(batch, self.block_manager)
                else:
                    # Overlap: queue the next decode step before reading this one's tokens, then
                    # do this step's host work while the device runs the next.
                    batch = inflight.batch
                    nxt = self.scheduler.continue_decode(batch, self.max_model_len)
                    queued = None if nxt is None else self.runner.launch_decode(nxt, self.block_manager, inflight)
                    if queued is not None:
                        self._advance(nxt)
                    out = self.runner.collect(inflight)
                    inflight = queued
                finished = self._postprocess(batch, out)
                self.stats.steps += 1
                if on_progress is not None and finished:
                    on_progress(finished)
        except BaseException:
            try:
                self.runner.synchronize()  # queued steps finish before their blocks are reused
            finally:
                self.abort_all()
            raise
        if dp.size > 1:
            arrived = share_results(requests, dp)
            if on_progress is not None and arrived:
                on_progress(arrived)

    def abort_all(self) -> None:
        for seq in list(self.scheduler.running):
            self.scheduler.finish(seq)
        self.scheduler.waiting.clear()
        self.block_manager.pending_copies.clear()

    # ---- after a step --------------------------------------------------------------------
    def _advance(self, batch: ScheduledBatch) -> None:
        """The batch's tokens are computed (or queued to be): move each sequence on."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            lo, hi = seq.num_computed, seq.num_computed + n
            prompt_part = max(0, min(hi, seq.num_prompt_tokens) - lo)
            self.stats.prompt_tokens_computed += prompt_part
            self.stats.recomputed_tokens += max(0, min(hi, len(seq) - 1) - max(lo, seq.num_prompt_tokens))
            seq.num_computed = hi
            self.block_manager.computed(seq)

    def _postprocess(self, batch: ScheduledBatch, out: StepOutput) -> int:
        """Apply a step's results; overlapped steps were advanced at launch."""
        if not out.overlapped:
            self._advance(batch)
        for seq, first, entries in out.prompt_logprobs:
            seq.request.prompt_logprobs[first + 1: first + 1 + len(entries)] = entries
        finished = 0
        # Siblings fork before the parent appends its own token: a parent that finishes at once
        # releases its blocks.
        sampled = out.sampled
        if any(st.seq.fork_pending for st in sampled):
            sampled = sorted(sampled, key=lambda st: not (st.seq.fork_pending and st.sample_index > 0))
        for st in sampled:
            if st.seq.status is SeqStatus.FINISHED:
                continue  # stopped on the token before this overlapped step: its row is dropped
            if st.seq.fork_pending and st.sample_index > 0:
                finished += self._start_sibling(st)
            else:
                finished += self._append(st.seq, st)
        # A forking prefill forks when it samples: after its last prompt chunk, not its first.
        for st in out.sampled:
            st.seq.fork_pending = False
        return finished

    def _start_sibling(self, st: SampledToken) -> int:
        parent = st.seq
        child = Sequence(parent.request, st.sample_index, parent.token_ids[: parent.num_prompt_tokens])
        child.fork_pending = False
        parent.request.sequences.append(child)
        if self._append(child, st, schedule=False):
            return 1
        if self.block_manager.fork(parent, child):
            self.stats.prompt_tokens_cached += child.num_prompt_tokens
            child.status = SeqStatus.RUNNING
            self.scheduler.running.append(child)
        else:
            self.scheduler.add(child)
        return 0

    def _append(self, seq: Sequence, st: SampledToken, schedule: bool = True) -> int:
        """Append a sampled token; returns 1 when that finishes the sequence."""
        seq.token_ids.append(st.token_id)
        if seq.params.logprobs is not None:
            seq.logprobs.append(st.logprob)
            if st.top is not None:
                seq.top_logprobs.append(st.top)
        self.stats.generated_tokens += 1
        if not self._check_stop(seq, st.token_id):
            return 0
        seq.status = SeqStatus.FINISHED
        if schedule:
            self.scheduler.finish(seq)
        return 1

    def _check_stop(self, seq: Sequence, token: int) -> bool:
        p = seq.params
        # Stops count only once min_tokens tokens came before this one (the sampler masked them until then).
        if seq.num_output_tokens > p.min_tokens:
            if token in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
                return True
            if not p.ignore_eos and token in self.args.eos_token_ids:
                seq.finish_reason = "stop"
                return True
            if p.stop and self._detokenize is not None and self._stop_string_in_tail(seq):
                text = self._detokenize(seq.output_token_ids)
                at, s = min((text.find(s), s) for s in p.stop if s in text)
                seq.finish_reason, seq.stop_reason, seq.stop_text_len = "stop", s, at
                return True
        if seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            seq.finish_reason = "length"
            return True
        return False

    def _stop_string_in_tail(self, seq: Sequence) -> bool:
        """A new stop string must end in the newest token, so decoding a short tail finds it
        (every token but special ones adds at least a character): O(1) per step, not O(length)."""
        window = max(len(s) for s in seq.params.stop) + 8
        tail = self._detokenize(seq.output_token_ids[-window:])
        return any(s in tail for s in seq.params.stop)
