"""Owns the model and its KV cache on one device; turns a scheduled batch into sampled tokens."""
from __future__ import annotations

import math

import torch

from atom.config import EngineConfig
from atom.engine.block_manager import BlockManager
from atom.engine.memory import EngineMemory
from atom.engine.penalties import PenaltyState
from atom.engine.sampler import prompt_logprobs, sampling_metadata
from atom.engine.messages import ScheduledBatch, StepOutput, sampled_tokens
from atom.engine.sequence import Sequence
from atom.engine.window_blocks import kv_cache_owners
from atom.models.decoder import CausalLM
from atom.models.hf_config import ModelArgs
from atom.models.registry import model_class
from atom.models.weights import WeightMap, iter_checkpoint, load_checkpoint, load_weights
from atom.ops import ops, weights_changed
from atom.ops.metadata import AttentionMetadata

_CPU_KV_BUDGET = 512 << 20


class ModelRunner:
    def __init__(self, config: EngineConfig, args: ModelArgs, max_model_len: int) -> None:
        self.config = config
        self.args = args
        self.max_model_len = max_model_len
        # Tensor / expert parallelism: this rank's groups (TP = EP = 1: no torch.distributed at all).
        from atom.distributed import init_parallel
        self.parallel = init_parallel(config, args)
        self.device = config.torch_device()
        # Decode steps go through static buffers, CUDA graphs and the overlapped loop on one GPU
        # (config.overlap_decode=True: on the CPU too, without graphs).
        on = config.overlap_decode if config.overlap_decode is not None else self.device.type == "cuda"
        self.use_decode_runner = on and not self.parallel.is_parallel
        self._decode_runner = None
        self.dtype = config.torch_dtype(args.torch_dtype)
        ops.configure(self.device, config.op_backends, batch_invariant=config.batch_invariant)
        with torch.device(self.device):
            prev = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
            try:
                self.model: CausalLM = model_class(args.architecture)(args, self.parallel).eval()
            finally:
                torch.set_default_dtype(prev)
        self.num_kv_heads = self.model.attention_layers()[0].num_kv_heads  # this rank's (tensor parallelism)
        # Hybrid sliding / full models: layer pairs share cache tensors and sliding layers give
        # back the blocks they no longer see (atom/engine/window_blocks.py; kv_window: the window).
        self.cache_owners, self.kv_window = kv_cache_owners(self.model.attention_layers())
        # Weights and KV cache live in pools that sleep/wake can release and restore in place.
        self.memory = EngineMemory(self.device, config.enable_sleep_mode)
        self.memory.adopt_weights(self.model)
        self.weight_map = WeightMap(self.model)
        self.k_caches: list[torch.Tensor] = []
        self.v_caches: list[torch.Tensor] = []
        self.routed_buf = self._routing_capture() if config.enable_return_routed_experts else None
        # Prompt bits and generated-token counts of the sequences with penalties, on the device,
        # kept across steps (allocated at the first penalized request; atom/engine/penalties.py).
        self.penalties = PenaltyState(config.max_num_seqs, args.vocab_size, max_model_len, self.device)

    def _routing_capture(self) -> torch.Tensor:
        """A static [tokens, moe_layers, top_k] buffer every MoE layer writes its chosen experts
        into, each step (inside CUDA graphs too: its address never changes)."""
        layers = self.model.moe_layers()
        if not layers:
            raise ValueError("enable_return_routed_experts: this model has no MoE layers")
        rows = max(self.config.max_num_batched_tokens, self.config.max_num_seqs)
        buf = torch.full((rows, len(layers), layers[0].top_k), -1, dtype=torch.int16, device=self.device)
        for i, layer in enumerate(layers):
            layer.routed_out = buf[:, i, :]
        return buf

    def routed_rows(self, n: int) -> torch.Tensor | None:
        """The last step's routing of its first n tokens (on the device), or None when not captured."""
        return None if self.routed_buf is None else self.routed_buf[:n]

    # ---- weights -------------------------------------------------------------------------
    @torch.inference_mode()
    def load_checkpoint(self, model_dir: str) -> None:
        try:
            if self.parallel.is_parallel and not self.model.stream_load:  # each rank reads only its shards
                load_checkpoint(self.model, self.weight_map, model_dir)
            else:
                load_weights(self.model, self.weight_map, self.model.convert_checkpoint(iter_checkpoint(model_dir)))
        finally:
            weights_changed()

    @torch.inference_mode()
    def init_dummy_weights(self) -> None:
        """load_format="dummy": small random weights instead of a checkpoint (benchmarks)."""
        from atom.models.dummy import init_dummy_weights
        init_dummy_weights(self.model, self.config.seed)
        weights_changed()

    # ---- KV cache ------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        """Bytes of one block in every layer's cache tensors (K and V, or MLA's latent rows)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        bs = self.config.kv_block_size
        return sum(math.prod(shape) for owners in self.cache_owners
                   for shape in owners[0].kv_cache_shapes(bs).values()) * elem

    def num_kv_blocks(self) -> int:
        c = self.config
        if c.num_kv_blocks is not None:
            return c.num_kv_blocks
        if c.kv_cache_memory_bytes is not None:
            budget = c.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            headroom = 2 << 30
            if not self.parallel.is_parallel:  # measured: a warm-up step's peak (cuda_graph.py)
                from atom.engine.cuda_graph import activation_bytes
                headroom = activation_bytes(self, c.max_num_batched_tokens, c.max_num_seqs)
                free, total = torch.cuda.mem_get_info(self.device)
                used = total - free
            budget = int(total * c.gpu_memory_utilization) - used - headroom
            self.memory.keep_free = headroom
        else:
            budget = _CPU_KV_BUDGET
        blocks = budget // self.kv_bytes_per_block()
        if self.device.type == "cpu" and c.kv_cache_memory_bytes is None:
            per_seq = -(-self.max_model_len // c.kv_block_size)
            if self.kv_window is not None:
                per_seq += -(-self.kv_window // c.kv_block_size) + 1
            blocks = min(blocks, c.max_num_seqs * per_seq)
        if blocks < 1:
            raise RuntimeError(f"no memory left for the KV cache (budget {budget} bytes)")
        if self.parallel.is_parallel:  # the ranks' schedulers must agree on the pool size
            blocks = self.parallel.engine.all_reduce(torch.tensor([int(blocks)], device=self.device), "min").item()
        return int(blocks)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Each attention layer's cache tensors (`kv_cache_shapes`): k_caches holds every one but
        the V caches (MLA layers have a single latent cache)."""
        bs = self.config.kv_block_size
        self.k_caches, self.v_caches = [], []
        for owners in self.cache_owners:
            for name, shape in owners[0].kv_cache_shapes(bs).items():
                cache = self.memory.kv_zeros((num_blocks, *shape), self.dtype)
                for attn in owners:
                    setattr(attn, name, cache)
                (self.v_caches if name == "v_cache" else self.k_caches).append(cache)

    def _flush_copies(self, block_manager: BlockManager) -> None:
        """KV copies the block manager asked for (a fork's partial last block), before the step."""
        copies = block_manager.take_copies()
        if copies:
            self.copy_blocks(copies)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        for cache in self.k_caches + self.v_caches:
            cache[dst] = cache[src]

    # ---- one step ------------------------------------------------------------------------
    def _attention_metadata(self, batch: ScheduledBatch,
                            block_manager: BlockManager) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.config.kv_block_size
        ids, positions, slots, starts, seq_lens = [], [], [], [0], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            lo, hi = seq.num_computed, seq.num_computed + n
            ids += seq.token_ids[lo:hi]
            positions += range(lo, hi)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(lo, hi)]
            starts.append(starts[-1] + n)
            seq_lens.append(hi)
        width = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in batch.seqs]

        def t(values):
            return torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)

        meta = AttentionMetadata(slot_mapping=t(slots), query_start_loc=t(starts), seq_lens=t(seq_lens),
                                 block_tables=t(tables), is_decode=batch.is_decode,
                                 max_query_len=max(batch.num_new_tokens), max_seq_len=max(seq_lens),
                                 host_query_start_loc=starts, host_seq_lens=seq_lens)
        if self.kv_window is not None:  # the sliding layers' tables (given-back entries read block 0, masked)
            wtables = [[max(b, 0) for b in block_manager.window_table(s)] for s in batch.seqs]
            wslots = [wt[p // bs] * bs + p % bs for wt, s, n in zip(wtables, batch.seqs, batch.num_new_tokens)
                      for p in range(s.num_computed, s.num_computed + n)]
            width = max(len(w) for w in wtables)
            meta.window = AttentionMetadata(
                slot_mapping=t(wslots), query_start_loc=meta.query_start_loc, seq_lens=meta.seq_lens,
                block_tables=t([w + [0] * (width - len(w)) for w in wtables]), is_decode=meta.is_decode,
                max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len)
        return t(ids), t(positions), meta

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, block_manager: BlockManager) -> StepOutput:
        if not batch.seqs:  # data-parallel attention: idle here, busy elsewhere
            return self._idle_step()
        self._flush_copies(block_manager)
        input_ids, positions, meta = self._attention_metadata(batch, block_manager)
        hidden = self.model(input_ids, positions, meta)

        # Which hidden rows need logits: prompt positions whose next token is scored, and the last
        # token of every sequence that samples (once per sample when a prefill forks n ways, and
        # for each prompt twin that follows it).
        prompt_rows: list[tuple[Sequence, int, int, int]] = []  # seq, first position, row lo, row hi
        prompt_index: list[int] = []
        sample_rows: list[tuple[Sequence, int]] = []
        sample_index: list[int] = []
        start = 0
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            lo = seq.num_computed
            if seq.params.prompt_logprobs is not None and lo < seq.num_prompt_tokens - 1:
                hi = min(lo + n, seq.num_prompt_tokens - 1)
                prompt_rows.append((seq, lo, len(prompt_index), len(prompt_index) + hi - lo))
                prompt_index += range(start, start + hi - lo)
            if batch.samples(i):
                rows = seq.sample_rows()
                sample_rows += rows
                sample_index += [start + n - 1] * len(rows)
            start += n
        out = StepOutput()
        if not prompt_index and not sample_index:
            return self._with_routing(out, len(input_ids))
        rows = torch.tensor(prompt_index + sample_index, device=self.device)
        logits = self.model.compute_logits(hidden[rows])
        for seq, first, r0, r1 in prompt_rows:
            targets = seq.token_ids[first + 1: first + 1 + (r1 - r0)]
            out.prompt_logprobs.append((seq, first, *prompt_logprobs(logits[r0:r1], seq, targets)))
        if sample_rows:
            pen = self.penalties.prepare(sample_rows)
            meta_s = sampling_metadata(sample_rows, self.args.eos_token_ids, self.device, penalties=pen)
            result = ops.sample(logits[len(prompt_index):], meta_s)
            if pen is not None:
                self.penalties.count(pen, meta_s.processing.penalty_slots, result.token_ids)
            if self.parallel.debug_checks:
                self.parallel.check_same(result.token_ids, "sampled tokens")
            out.sampled = sampled_tokens(sample_rows, result)
        return self._with_routing(out, len(input_ids))

    def _with_routing(self, out: StepOutput, num_tokens: int) -> StepOutput:
        """The step's routed experts (when captured), read after the sampler's read-back (one wait
        per step); a copy: the buffer is rewritten by the next step."""
        if self.routed_buf is not None:
            out.routed = self.routed_buf[:num_tokens].to("cpu", copy=True).numpy()
        return out

    @property
    def decode_runner(self):
        """The GPU decode path (atom/engine/cuda_graph.py) once a decode step built it, else None."""
        return self._decode_runner

    def _built_decode_runner(self):
        if self._decode_runner is None:
            from atom.engine.cuda_graph import DecodeRunner
            self._decode_runner = DecodeRunner(self, self.max_model_len)
        return self._decode_runner

    @torch.inference_mode()
    def warm_up_decode(self, sizes: list[int] | None = None) -> list[int]:
        """Captures the decode path's CUDA graphs (and compiles their kernels) now: DecodeRunner.warm_up.
        [] when this engine has no decode runner (tensor / expert parallel, or the CPU without
        overlap_decode). Needs the KV cache allocated, and no step in flight."""
        if not self.use_decode_runner or not self.k_caches:
            return []
        return self._built_decode_runner().warm_up(sizes)

    @torch.inference_mode()
    def launch_decode(self, batch: ScheduledBatch, block_manager: BlockManager, prev=None):
        """Queue a pure decode step on the device without waiting for its tokens; None when the
        step needs the general path. With `prev` (a launched step), each sequence's newest token
        is prev's sampled one, fed on the device (the overlapped loop of LLMEngine.run)."""
        if not self.use_decode_runner or not batch.seqs or not batch.is_decode:
            return None
        runner = self._built_decode_runner()
        if not runner.supports(batch, lag=0 if prev is None else 1):
            return None
        self._flush_copies(block_manager)
        return runner.launch(batch, prev, getattr(block_manager, "window_table", None))

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def collect(self, inflight) -> StepOutput:
        """The sampled tokens of a launched step (waits for it)."""
        out = self.decode_runner.collect(inflight)
        out.overlapped = True
        return out

    def _idle_step(self) -> StepOutput:
        """Data-parallel attention (ep_mode="alltoall"): a rank with nothing to run this step still
        joins its MoE layers' all_to_all (in layer order) while other ranks step."""
        for moe in self.model.moe_layers():
            moe.idle(self.dtype, self.device)
        return StepOutput()
