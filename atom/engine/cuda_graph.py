"""The GPU decode step: static input buffers, one host-to-device copy, CUDA graphs.

`DecodeRunner.launch(batch, prev)` queues a pure decode step (every sequence adds one token and
samples once) on a CUDA device and `collect` reads its tokens back; with `prev`, the step's input
tokens are the previous step's samples, still on the device (the overlapped engine loop):

* Inputs (token ids, positions, slots, lengths, block tables and the shared-prefix groups of
  cascade attention) are written by the host into one pinned int32 buffer laid out for the
  padded batch size and reach the device in a single asynchronous copy into a static buffer.
* The batch is padded to the next size of a ladder (1, 2, 4, 8, then steps of 16 to 256, of 32
  to 512, of 64 beyond). For each size the model forward is captured once into a CUDA graph
  and replayed afterwards; all graphs share one memory pool, and the LM head runs eagerly after
  the replay (a graph's output lives as long as the graph: logits for every size would take
  GBs). `warm_up` captures every size when the engine starts (config.cuda_graphs_at_start,
  largest first, as vLLM does), which also compiles each size's kernel variants; otherwise a
  size is captured the first time it occurs.
  Padded rows write no KV (slot -1) and attend to nothing (length 0).
* With `enforce_eager` (or sizes above `cuda_graph_max_batch_size`) the same padded inputs run
  eagerly, so graph and eager steps compute identical numbers.
* Cascade groups: rows whose block tables start with the same blocks (the n samples of one
  prompt, forked by the block manager) form groups of up to MAX_N rows; decode attention reads
  their shared prefix once per group.
* Hybrid sliding / full models (GPT-OSS, `runner.kv_window`): the sliding layers' own slots and
  block tables (atom/engine/window_blocks.py) live in the same static buffer (`meta.window`).
  Only the entries of the blocks a row's window covers are written each step; the kernels read
  no others (the rest of a row may hold stale ids, never read: blocks given back are not touched).

The only host sync of a step is reading back the sampled tokens and logprobs (steps with a row
whose min_tokens still bans tokens, or that needs logit bias, allowed / bad tokens or a logits
mode, build their sampling tensors with the generic builder's pageable copies, which do wait).
Penalties stay on this path: each row's penalties and penalty-state slot travel in the pinned
sampling buffer, the state (atom/engine/penalties.py) lives on the device, and the sampled
tokens are counted into it right after sampling, so the token in flight is counted when the
next step samples.
Graphs hold the addresses of the KV cache and of the weights: if either changes (KV
re-allocated, weights re-created) they are dropped and captured again.
"""
from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from atom.engine.penalties import PenaltyRows, PenaltyState
from atom.engine.sampler import sampling_metadata
from atom.engine.messages import ScheduledBatch, StepOutput, sampled_tokens
from atom.engine.sequence import stream_counter
from atom.ops import ops
from atom.ops.metadata import AttentionMetadata, CascadeMetadata, LogitsProcessing, SamplerOutput, SamplingMetadata

log = logging.getLogger(__name__)

# Ops a decode graph runs: each must be graph_safe (no host sync) for graphs to be captured.
_GRAPH_OPS = ("paged_attention_decode", "qkv_prologue")  # qkv_prologue writes the KV cache
_GRAPH_OPS_MOE = ("moe_forward",)  # the non-parallel MoE path (graphs are off under EP)


_SAMPLING_FIELDS = (("seeds", np.int64), ("counters", np.int64), ("top_k", np.int64), ("pen_slots", np.int64),
                    ("temperature", np.float32), ("top_p", np.float32), ("min_p", np.float32),
                    ("repetition", np.float32), ("presence", np.float32), ("frequency", np.float32),
                    ("raw", np.bool_))
_TORCH_DTYPES = {np.int64: torch.int64, np.float32: torch.float32, np.bool_: torch.bool}


def _sampling_views(buf, cap: int, view) -> dict:
    """Named per-row arrays laid one after another in a byte buffer (numpy or torch)."""
    out, at = {}, 0
    for name, dt in _SAMPLING_FIELDS:
        size = np.dtype(dt).itemsize * cap
        out[name] = view(buf[at: at + size], dt)
        at += size
    return out


def batch_ladder(max_bs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 513, 32)) + list(range(576, 4097, 64))
    sizes = [s for s in sizes if s < max_bs] + [max_bs]
    return sorted(set(sizes))


class DecodeRunner:
    def __init__(self, runner, max_model_len: int) -> None:
        self.runner = runner
        self.model = runner.model
        self.device = runner.device
        cfg = runner.config
        self.page = cfg.kv_block_size
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // self.page)
        self.capacity = cfg.max_num_seqs
        self.window = runner.kv_window  # sliding layers with their own block tables, or None
        is_moe = runner.args.num_experts > 0
        needed = _GRAPH_OPS + (_GRAPH_OPS_MOE if is_moe else ()) + tuple(getattr(self.model, "graph_ops", ()))
        self.graph_capable = all(ops.supports(name, "graph_safe") for name in needed)
        # Padding only pays where graphs may be used; eager-only runs keep exact sizes.
        self.ladder = batch_ladder(self.capacity) if self.graph_capable else []
        use_graphs = self.device.type == "cuda" and self.graph_capable and not cfg.enforce_eager
        self.graph_max = min(cfg.cuda_graph_max_batch_size, self.capacity) if use_graphs else 0
        layer0 = self.model.attention_layers()[0]
        group = max(1, layer0.num_heads // layer0.num_kv_heads)
        self.cascade = ops.supports(self.model.decode_attention_op, "cascade")
        # bf16 logits straight to a sampler that reads them as they are (no float32 copy: ~300 us
        # a step at batch 512 and GPT-OSS's vocabulary on the H200).
        self.widen_logits = not ops.supports("sample", "low_precision_logits")
        self.max_n = ops.cascade_group_rows(self.model.decode_attention_op, group) if self.cascade else 2
        _, total = self._layout(self.capacity)
        pin = self.device.type == "cuda"
        # Two sets of pinned host buffers, used in turn: while step N's copy may still be queued,
        # the host fills step N+1's (overlapped loop); the step before N is complete by then.
        self.hosts = [torch.zeros(total, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self.dev = torch.zeros(total, dtype=torch.int32, device=self.device)
        self._views: dict[tuple[int, int], tuple] = {}
        self._parity = 0
        # Per-row sampling inputs (all but min_tokens' banned tokens) in one pinned buffer, one copy.
        cap = self.capacity
        nbytes = sum(np.dtype(dt).itemsize for _, dt in _SAMPLING_FIELDS) * cap
        self.s_hosts = [torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.s_dev = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
        self.s_nps = [_sampling_views(h.numpy(), cap, lambda a, dt: a.view(dt)) for h in self.s_hosts]
        self.s_t = _sampling_views(self.s_dev, cap, lambda a, dt: a.view(_TORCH_DTYPES[dt]))
        self._param_cache: dict[int, tuple] = {}
        # Routed experts (enable_return_routed_experts): each step's rows land in one of two pinned
        # buffers used in turn, like the inputs (no allocation per step: a fresh pinned block
        # costs a cudaHostAlloc); the scheduler reads them before the buffer's next turn.
        routed = runner.routed_buf
        self.routed_hosts = None if routed is None else [
            torch.empty((cap, *routed.shape[1:]), dtype=routed.dtype, pin_memory=pin) for _ in range(2)]
        self.timers = {"fill": 0.0, "forward+sample": 0.0, "steps": 0, "overlapped": 0}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self._graph_key = None
        self._bt_cache: dict[int, tuple[list[int], np.ndarray, int]] = {}

    # ---- layout ----------------------------------------------------------------------------
    def _layout(self, bs: int) -> tuple[dict[str, int], int]:
        groups = max(1, bs // 2)
        win = 0 if self.window is None else bs
        fields = [("ids", bs), ("src", bs), ("pos", bs), ("slots", bs), ("seq_lens", bs), ("row_prefix", bs),
                  ("qsl", bs + 1), ("plen", groups), ("grows", groups * self.max_n), ("bt", bs * self.max_blocks),
                  ("wslots", win), ("wbt", win * self.max_blocks)]
        offsets, at = {}, 0
        for name, size in fields:
            offsets[name] = at
            at += size
        return offsets, at

    def _get_views(self, bs: int, parity: int = 0):
        v = self._views.get((bs, parity))
        if v is not None:
            return v
        off, total = self._layout(bs)
        groups = max(1, bs // 2)

        def cut(buf, name, n):
            return buf[off[name]: off[name] + n]

        d, h = self.dev, self.hosts[parity].numpy()
        meta = AttentionMetadata(
            slot_mapping=cut(d, "slots", bs), query_start_loc=cut(d, "qsl", bs + 1), seq_lens=cut(d, "seq_lens", bs),
            block_tables=cut(d, "bt", bs * self.max_blocks).view(bs, self.max_blocks), is_decode=True,
            max_query_len=1, max_seq_len=self.max_model_len,
            cascade=CascadeMetadata(cut(d, "grows", groups * self.max_n).view(groups, self.max_n),
                                    cut(d, "plen", groups), cut(d, "row_prefix", bs), self.max_model_len)
            if self.cascade and bs > 1 else None)
        host = {name: cut(h, name, n) for name, n in
                (("ids", bs), ("src", bs), ("pos", bs), ("slots", bs), ("seq_lens", bs), ("row_prefix", bs),
                 ("qsl", bs + 1), ("plen", groups))}
        host["grows"] = cut(h, "grows", groups * self.max_n).reshape(groups, self.max_n)
        host["bt"] = cut(h, "bt", bs * self.max_blocks).reshape(bs, self.max_blocks)
        host["qsl"][:] = np.arange(bs + 1, dtype=np.int32)
        if self.window is not None:
            meta.window = AttentionMetadata(
                slot_mapping=cut(d, "wslots", bs), query_start_loc=meta.query_start_loc, seq_lens=meta.seq_lens,
                block_tables=cut(d, "wbt", bs * self.max_blocks).view(bs, self.max_blocks), is_decode=True,
                max_query_len=1, max_seq_len=self.max_model_len)
            host["wslots"] = cut(h, "wslots", bs)
            host["wbt"] = cut(h, "wbt", bs * self.max_blocks).reshape(bs, self.max_blocks)
        v = (cut(d, "ids", bs), cut(d, "pos", bs), meta, host, total, cut(d, "src", bs))
        self._views[(bs, parity)] = v
        return v

    # ---- the step ----------------------------------------------------------------------------
    def supports(self, batch: ScheduledBatch, lag: int = 0) -> bool:
        """Pure decode: each sequence computes exactly its newest token (lag: in flight) and samples."""
        if len(batch.seqs) > self.capacity:
            return False
        for seq in batch.seqs:
            p = seq.params
            if seq.fork_pending or seq.followers or seq.num_computed + 1 != len(seq.token_ids) + lag:
                return False
            if p.prompt_logprobs is not None and seq.num_computed < seq.num_prompt_tokens - 1:
                return False
            if lag and p.bad_words_token_ids and any(len(word) > 1 for word in p.bad_words_token_ids):
                return False  # a bad word's prefix may end in the token still in flight
        return True

    def _padded(self, n: int) -> int:
        if not self.ladder or n > self.ladder[-1]:
            return n
        return self.ladder[bisect.bisect_left(self.ladder, n)]

    def _block_row(self, seq) -> tuple[list[int], np.ndarray, int]:
        """(table, seq's block table as an int32 array, its length); cached: tables only grow
        until replaced."""
        table = seq.block_table
        c = self._bt_cache.get(id(seq))
        if c is None or c[0] is not table or len(table) < c[2]:
            arr = np.zeros(self.max_blocks, dtype=np.int32)
            arr[: len(table)] = table
            c = (table, arr, len(table))
            self._bt_cache[id(seq)] = c
        elif len(table) > c[2]:
            c[1][c[2]: len(table)] = table[c[2]:]
            c = (table, c[1], len(table))
            self._bt_cache[id(seq)] = c
        return c

    def _params(self, p) -> tuple:
        """(params, filters, top_k, top_p, min_p, temperature, raw, top logprobs, generic, ranks) of
        a SamplingParams, cached (the engine gives each call private copies, so a cached object never
        changes). generic: options this fast path leaves to the generic builder (logit bias,
        allowed and bad tokens, logits modes, whole-vocabulary logprobs; penalties stay here)."""
        c = self._param_cache.get(id(p))
        if c is None or c[0] is not p:
            filters = p.effective_top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0
            masks = bool(p.logit_bias) or p.allowed_token_ids is not None or bool(p.bad_words_token_ids)
            generic = masks or p.reports_logits or (p.logprobs is not None and p.logprobs < 0)
            c = (p, filters, p.effective_top_k, float(p.top_p), float(p.min_p), float(p.temperature),
                 p.reports_raw, p.logprobs or 0, generic, p.logprobs is not None)
            if len(self._param_cache) > 4096:
                self._param_cache.clear()
            self._param_cache[id(p)] = c
        return c

    def _fill_window(self, seqs, bs: int, host: dict, lag: int, window_table) -> None:
        """The sliding layers' slots and the table entries of the blocks each row's window covers
        (positions p - window + 1 .. p; the kernels read no other entry)."""
        page, wbt, wslots = self.page, host["wbt"], host["wslots"]
        wbt[: len(seqs)] = 0  # entries outside the window: block 0, never another layout's fields
        for i, seq in enumerate(seqs):
            p = len(seq.token_ids) - 1 + lag
            table = window_table(seq)
            first, last = max(0, p - self.window + 1) // page, p // page
            wbt[i, first:last + 1] = table[first:last + 1]
            wslots[i] = table[last] * page + p % page
        wslots[len(seqs):bs] = -1

    def _fill(self, seqs, bs: int, host: dict, lag: int, parity: int, pen: PenaltyRows | None):
        """Writes the step's attention and sampling inputs; returns the SamplingMetadata, or None
        when a row still has tokens banned by min_tokens or needs logits processing other than
        penalties (then the generic builder runs). pen: the rows' penalties (PenaltyState.prepare).

        lag = 1: each sequence's last token is still in flight (sampled by the step before, not
        yet appended): positions move one on, and the token ids come from the device.
        """
        n, page = len(seqs), self.page
        # One pass over the rows collecting plain lists (the per-request sampling values as one
        # cached tuple a row, transposed below), then a few bulk writes: ~4 us a row of Python
        # at 1,024 rows was a host cost the overlapped loop must hide behind every decode step.
        ids, pos, slots, lens, seeds, counters, params, tables, num_blocks = [], [], [], [], [], [], [], [], []
        min_tokens_rows = False
        by_first: dict[int, list[int]] = {}
        params_of, params_get = self._params, self._param_cache.get
        block_row, rows_get = self._block_row, self._bt_cache.get
        for i, seq in enumerate(seqs):
            toks, table = seq.token_ids, seq.block_table
            p = len(toks) - 1 + lag
            sp = seq.params
            c = params_get(id(sp))  # the cached tuple (a call to _params only on a miss)
            if c is None or c[0] is not sp:
                c = params_of(sp)
            params.append(c)
            out_len = p + 1 - seq.num_prompt_tokens
            if out_len < c[0].min_tokens:
                min_tokens_rows = True
            seeds.append(seq.request.seed)
            counters.append(stream_counter(seq.sample_index, out_len))
            ids.append(toks[-1])  # (lag: replaced on the device by the token in flight)
            pos.append(p)
            lens.append(p + 1)
            slots.append(table[p // page] * page + p % page)
            r = rows_get(id(seq))  # the cached row while the table has not changed (_block_row)
            if r is None or r[0] is not table or r[2] != len(table):
                r = block_row(seq)
            tables.append(r[1])
            num_blocks.append(r[2])
            if r[2] > 1:
                by_first.setdefault(table[0], []).append(i)
        # Whole rows: the cached arrays are zero past the table, and this buffer may hold another
        # batch size's fields there (the layouts share it), which the torch ops, that gather every
        # entry of a row, would read as block ids. (One concatenate: a fifth of n row writes.)
        if tables:
            np.concatenate(tables, out=host["bt"][:n].reshape(-1))
        _, filters, top_ks, top_ps, min_ps, temps, raws, ks, generic, ranks = zip(*params) if params else ((),) * 10
        generic_rows = min_tokens_rows or any(generic)
        host["ids"][:n] = ids
        host["pos"][:n] = pos
        host["slots"][:n] = slots
        host["seq_lens"][:n] = lens
        if bs > n:
            for name, value in (("ids", 0), ("pos", 0), ("slots", -1), ("seq_lens", 0)):
                host[name][n:] = value
        if self.cascade and bs > 1:
            self._groups(seqs, by_first, bs, host, num_blocks)
        if len(self._bt_cache) > 4 * self.capacity:
            live = {id(s) for s in seqs}
            self._bt_cache = {k: v for k, v in self._bt_cache.items() if k in live}
        if generic_rows:
            return None
        h = self.s_nps[parity]
        h["seeds"][:n], h["counters"][:n], h["top_k"][:n] = seeds, counters, top_ks
        h["temperature"][:n], h["top_p"][:n], h["min_p"][:n], h["raw"][:n] = temps, top_ps, min_ps, raws
        if pen is not None:
            h["pen_slots"][:n], h["repetition"][:n] = pen.slots, pen.repetition
            h["presence"][:n], h["frequency"][:n] = pen.presence, pen.frequency
        self.s_dev.copy_(self.s_hosts[parity], non_blocking=True)
        d = self.s_t
        processing = None if pen is None else LogitsProcessing(
            repetition=d["repetition"][:n], presence=d["presence"][:n], frequency=d["frequency"][:n],
            penalty_slots=d["pen_slots"][:n], token_counts=pen.counts, prompt_mask=pen.prompt_mask,
            any_repetition=pen.any_repetition, any_counted=pen.any_counted)
        return SamplingMetadata(
            temperature=d["temperature"][:n], top_k=d["top_k"][:n], top_p=d["top_p"][:n], min_p=d["min_p"][:n],
            seeds=d["seeds"][:n], counters=d["counters"][:n], raw_logprobs=d["raw"][:n], banned_rows=None,
            banned_tokens=None, need_filter=any(filters), all_greedy=all(t == 0.0 for t in temps),
            any_raw=any(raws), num_top_logprobs=max(ks, default=0), want_ranks=any(ranks), processing=processing)

    def _groups(self, seqs, by_first: dict[int, list[int]], bs: int, host: dict, num_blocks: list[int]) -> None:
        """The shared-prefix groups: rows whose tables start with the same block, their shared
        prefix the whole blocks every member has (a row's last block is its own, and no further
        than the first row's prompt) equal to the first row's, in chunks of max_n rows. The
        comparisons run on the block-table rows just written to host["bt"] (one numpy pass; per
        row in Python they took ~2.3 ms a step at 1,024 rows)."""
        plen, grows, row_prefix = host["plen"], host["grows"], host["row_prefix"]
        plen[:] = 0
        row_prefix[:] = 0
        groups = [rows for rows in by_first.values() if len(rows) > 1]
        if not groups:
            return
        sizes = [len(rows) for rows in groups]
        members = np.fromiter((r for rows in groups for r in rows), np.int64, sum(sizes))
        starts = np.cumsum([0] + sizes[:-1])
        cap, page, max_n = len(plen), self.page, self.max_n
        prompt_blocks = [seqs[rows[0]].num_prompt_tokens // page for rows in groups]
        if max(prompt_blocks) < 1:
            return
        bt = host["bt"][:, : max(prompt_blocks)]  # no prefix reaches past its first row's prompt
        same = bt[members] == bt[np.repeat(members[starts], sizes)]
        first_diff = np.where(same.all(1), same.shape[1], same.argmin(1))
        shared_of = np.minimum(np.minimum.reduceat(first_diff, starts),
                               np.minimum.reduceat(np.asarray(num_blocks)[members], starts) - 1).tolist()
        chunks, lengths, chunk_rows, prefixes = [], [], [], []
        for rows, shared, prompt in zip(groups, shared_of, prompt_blocks):
            shared = min(shared, prompt)
            if shared < 1:
                continue
            for c0 in range(0, len(rows), max_n):
                chunk = rows[c0: c0 + max_n]
                if len(chunk) < 2 or len(chunks) >= cap:
                    continue
                chunks.append(chunk + [-1] * (max_n - len(chunk)))
                lengths.append(shared * page)
                chunk_rows += chunk
                prefixes += [shared * page] * len(chunk)
        if chunks:  # a few bulk writes (one numpy call per group and field was ~1 ms a step)
            grows[: len(chunks)] = chunks
            plen[: len(chunks)] = lengths
            row_prefix[chunk_rows] = prefixes

    def _forward(self, bs: int) -> torch.Tensor:
        """The model body (what a graph holds): hidden states [bs, hidden]."""
        ids, pos, meta = self._get_views(bs)[:3]
        return self.model(ids, pos, meta)

    @property
    def graphs_current(self) -> bool:
        """Whether the captured graphs still point at the live KV cache and weights (False: the
        next step re-captures them, e.g. after a sleep that moved the memory)."""
        return self._graph_key is None or self._graph_key == self._graph_state()

    def _graph_state(self) -> tuple:
        caches = self.runner.k_caches
        first_param = next(self.model.parameters())
        return (caches[0].data_ptr() if caches else 0, first_param.data_ptr())

    def _run(self, bs: int) -> torch.Tensor:
        """The step's logits: the body replayed from its graph (or run eagerly), then the LM head
        eagerly, as vLLM does: a graph's output stays allocated in the pool for as long as the
        graph lives, and [bs, vocab] float32 logits for every captured size would take GBs
        (the ladder to 512 sums to 5,391 rows: 4.3 GB at GPT-OSS's 201,088 tokens)."""
        return self.model.compute_logits(self._body(bs), widen=self.widen_logits)

    def _body(self, bs: int) -> torch.Tensor:
        if bs > self.graph_max:
            return self._forward(bs)
        key = self._graph_state()
        if key != self._graph_key:
            self.graphs.clear()
            self.pool = None
            self._graph_key = key
        entry = self.graphs.get(bs)
        if entry is None:
            hidden = self._forward(bs)  # warm-up: compiles kernels, and is this step's result
            torch.cuda.synchronize(self.device)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self.pool):
                    out = self._forward(bs)
            except Exception as exc:  # pragma: no cover - depends on the ops in use
                log.warning("CUDA graph capture failed (%s); decoding eagerly from now on", exc)
                self.graph_max = 0
                return hidden
            self.graphs[bs] = (graph, out)
            return hidden
        graph, out = entry
        graph.replay()
        return out

    def warm_up(self, sizes: list[int] | None = None) -> list[int]:
        """Runs each padded decode batch size once on rows that are all padding (no KV written,
        nothing attended), largest first: sizes up to graph_max are captured as graphs, larger
        ones run eagerly; either way their kernel variants compile now rather than inside a rollout.
        sizes: default every ladder size up to graph_max. Returns the sizes run. Call only with no
        step in flight (it writes the static buffers)."""
        order = sorted(set(sizes if sizes is not None else (s for s in self.ladder if s <= self.graph_max)),
                       reverse=True)
        bad = [bs for bs in order if not 1 <= bs <= self.capacity]
        if bad:
            raise ValueError(f"warm_up: batch sizes {bad} are outside 1..max_num_seqs={self.capacity}")
        for bs in order:
            *_, host, total, _ = self._get_views(bs, 0)
            for name, value in (("ids", 0), ("src", 0), ("pos", 0), ("slots", -1), ("seq_lens", 0),
                                ("row_prefix", 0), ("plen", 0), ("grows", -1), ("bt", 0),
                                ("wslots", -1), ("wbt", 0)):
                if name in host:
                    host[name][...] = value
            self.dev[:total].copy_(self.hosts[0][:total])
            self._run(bs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return order

    def launch(self, batch: ScheduledBatch, prev: "InFlight | None" = None, window_table=None) -> "InFlight":
        """Queue the step on the device without waiting for it. With `prev` (the step still in
        flight), every sequence's newest token is prev's sampled token, fed on the device.
        window_table: seq -> the sliding layers' block table (WindowBlockManager.window_table),
        needed when the model has a window group."""
        t0 = time.perf_counter()
        seqs = batch.seqs
        n = len(seqs)
        bs = self._padded(n)
        lag = 0 if prev is None else 1
        parity = self._parity = 1 - self._parity
        ids_dev, _, _, host, total, src_dev = self._get_views(bs, parity)
        src = None
        if prev is not None:
            row_of = {id(seq): r for r, seq in enumerate(prev.batch.seqs)}
            src = [row_of[id(seq)] for seq in seqs]
        rows = [(seq, seq.sample_index) for seq in seqs]

        def in_flight() -> torch.Tensor:  # each row's token in flight (a penalty slot to refill)
            return prev.result.token_ids.index_select(0, torch.tensor(src, device=self.device))

        pen = self.runner.penalties.prepare(rows, lag, in_flight if prev is not None else None)
        meta_s = self._fill(seqs, bs, host, lag, parity, pen)
        if self.window is not None:
            self._fill_window(seqs, bs, host, lag, window_table)
        if src is not None:
            host["src"][:n] = src
            host["src"][n:] = 0
        if meta_s is None:  # banned tokens / logits processing: the generic builder (before the forward:
            # its pageable copies wait for the GPU)
            meta_s = sampling_metadata(rows, self.runner.args.eos_token_ids, self.device, lag=lag, penalties=pen)
        self.dev[:total].copy_(self.hosts[parity][:total], non_blocking=True)
        if prev is not None:
            ids_dev.copy_(prev.result.token_ids.index_select(0, src_dev.long()))
        t1 = time.perf_counter()
        logits = self._run(bs)
        graphed = bs <= self.graph_max  # (a failed capture sets graph_max to 0)
        result = ops.sample(logits[:n], meta_s)
        if pen is not None:  # counted now: the next step, launched before these tokens are read, sees them
            self.runner.penalties.count(pen, meta_s.processing.penalty_slots, result.token_ids)
        tm = self.timers
        tm["fill"] += t1 - t0
        tm["forward+sample"] += time.perf_counter() - t1
        tm["steps"] += 1
        tm["overlapped"] += lag
        routed = None
        if self.routed_hosts is not None:  # queued before the event _copy_to_host records
            routed = self.routed_hosts[parity][:n]
            routed.copy_(self.runner.routed_rows(n), non_blocking=True)
        return InFlight(batch, result, *_copy_to_host(result), routed, graphed)

    def collect(self, inflight: "InFlight"):
        """Wait for a launched step's samples and turn them into a StepOutput. Waits on the
        step's own event: a blocking read of `result` would also wait for the step queued
        after it, and the host work that should overlap the device would not."""
        if inflight.ready is not None:
            inflight.ready.synchronize()
        rows = [(seq, seq.sample_index) for seq in inflight.batch.seqs]
        routed = None if inflight.routed is None else inflight.routed.numpy()
        return StepOutput(sampled=sampled_tokens(rows, inflight.host), routed=routed)


def _copy_to_host(result: SamplerOutput) -> tuple[SamplerOutput, torch.cuda.Event | None]:
    """Queue the copy of a sampler result into pinned host memory; the event marks its arrival.
    (Pinned blocks come from torch's caching host allocator, which keeps each one until the
    copies queued on it are done.) On the CPU the result is already there."""
    if result.token_ids.device.type != "cuda":
        return result, None
    host = SamplerOutput(*(None if t is None else
                           torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                           for t in (result.token_ids, result.logprobs, result.top_ids, result.top_logprobs,
                                     result.ranks)))
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


@dataclass
class InFlight:
    """A decode step queued on the device whose sampled tokens the host has not read yet."""

    batch: ScheduledBatch
    result: SamplerOutput        # on the device: the next step reads its tokens there
    host: SamplerOutput          # pinned copy, valid once `ready` has fired
    ready: torch.cuda.Event | None  # None on the CPU
    # The step's routed experts (when captured): rows of a pinned staging buffer, valid once
    # `ready` fired and until the second launch after this one reuses the buffer.
    routed: torch.Tensor | None = None
    graphed: bool = False        # the forward ran as a CUDA graph


# ---- KV-cache sizing ---------------------------------------------------------------------------

@torch.inference_mode()
def activation_bytes(runner, max_num_batched_tokens: int, max_num_seqs: int) -> int:
    """Peak bytes a step may allocate beyond weights and KV cache: one forward over
    max_num_batched_tokens prompt tokens (one sequence), logits and sampling for max_num_seqs
    rows, on a scratch KV cache just large enough; plus what the decode graphs keep."""
    from atom.engine.sequence import Request, Sequence
    from atom.sampling_params import SamplingParams

    dev, page = runner.device, runner.config.kv_block_size
    layers = runner.model.attention_layers()
    a = runner.args
    t = max_num_batched_tokens
    blocks = -(-t // page) + 1
    saved = [{name: getattr(attn, name) for name in attn.kv_cache_shapes(page)} for attn in layers]
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    try:
        for attn in layers:
            for name, shape in attn.kv_cache_shapes(page).items():
                setattr(attn, name, torch.zeros((blocks, *shape), dtype=runner.dtype, device=dev))
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        ids = torch.randint(0, a.vocab_size, (t,), device=dev)
        pos = torch.arange(t, device=dev)
        meta = AttentionMetadata(
            slot_mapping=pos.clone(), query_start_loc=torch.tensor([0, t], device=dev),
            seq_lens=torch.tensor([t], device=dev),
            block_tables=torch.arange(blocks, device=dev)[None, :], is_decode=False, max_query_len=t, max_seq_len=t)
        hidden = runner.model(ids, pos, meta)
        rows = min(t, max_num_seqs)
        logits = runner.model.compute_logits(hidden[:rows])
        # With every logits-processing pass on (penalties, bias, allowed tokens; ranks): its
        # [rows, vocab] temporaries are the sampler's peak.
        params = SamplingParams(temperature=1.0, max_tokens=1, logprobs=0, repetition_penalty=1.1,
                                presence_penalty=0.1, logit_bias={0: 0.0}, allowed_token_ids=[0, 1])
        # The penalty state at its full size is allocated inside the measured window: part of the peak.
        state = PenaltyState(max_num_seqs, a.vocab_size, runner.max_model_len, dev)
        seqs = [(Sequence(Request(i, None, [1], params, seed=0), 0, [1]), 0) for i in range(rows)]
        pen = state.prepare(seqs)
        meta_s = sampling_metadata(seqs, a.eos_token_ids, dev, penalties=pen)
        ops.sample(logits, meta_s)
        del hidden, logits, state, pen, meta_s
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
    finally:
        for attn, caches in zip(layers, saved):
            for name, cache in caches.items():
                setattr(attn, name, cache)
        torch.cuda.empty_cache()
    graph_bs = 0 if runner.config.enforce_eager else min(runner.config.cuda_graph_max_batch_size, max_num_seqs)
    # Each captured size keeps its hidden states [bs, hidden] in the graph pool (all of the ladder
    # once warm_up ran; the logits are computed outside the graphs); intermediates are shared, the
    # largest graph's counted in `peak` above; one step's logits: 2 x [bs, vocab] float32 for slack.
    rows = sum(s for s in batch_ladder(max_num_seqs) if s <= graph_bs)
    graphs = rows * a.hidden_size * runner.dtype.itemsize + 2 * graph_bs * a.vocab_size * 4 + (256 << 20)
    return int(peak + graphs + (256 << 20))
