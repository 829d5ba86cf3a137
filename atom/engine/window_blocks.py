"""KV blocks of hybrid models (GPT-OSS: sliding-window layers alternating with full ones): the
blocks a sliding layer no longer sees are given back.

Both kinds of layer draw blocks from the one pool. The runner gives full layer j and sliding
layer j the same cache tensors, so a block id is a block of either kind, whichever took it.
Every sequence has two tables: `seq.block_table` (full layers: every token, as for any model)
and its window table here (sliding layers: only the blocks that hold the last `window` tokens
before the next query; entries below are given back, -1). A sequence of L tokens then holds
ceil(L / block_size) + about window / block_size blocks instead of two per L / block_size.

Prefix caching: a full block of a sliding layer is cached under the same chain key as the
full layer's block of the same tokens (its own dict; given-back blocks stay cached in LRU order
until evicted). A prefix hit of k blocks is kept only as far as the sliding layers' blocks of
its last `window` tokens are cached too; otherwise the hit is shortened until they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from atom.engine.block_manager import Block, BlockManager
from atom.engine.sequence import Sequence


@dataclass
class _WindowTable:
    blocks: list[int] = field(default_factory=list)  # per block index; -1: given back (or never held)
    given_back: int = 0                               # entries [0, given_back) are -1


class WindowBlockManager(BlockManager):
    """BlockManager for models whose sliding-window layers keep only their window's blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, window: int) -> None:
        super().__init__(num_blocks, block_size, enable_prefix_caching)
        self.window = window
        self.tables: dict[int, _WindowTable] = {}   # id(seq) -> its sliding layers' table
        self.window_cached: dict[int, int] = {}     # chain key -> block id (sliding layers' blocks)
        self.window_keyed: set[int] = set()         # ids of the blocks keyed in window_cached

    def window_table(self, seq: Sequence) -> list[int]:
        """The sliding layers' block table of seq (-1 where given back)."""
        table = self.tables.get(id(seq))
        return [] if table is None else table.blocks

    def _first_seen(self, position: int) -> int:
        """Index of the first block a query at `position` sees."""
        return max(0, position - self.window + 1) // self.block_size

    def _missing(self, seq: Sequence, lo: int, hi: int) -> list[int]:
        """Window-table indices a step computing positions [lo, hi) needs and seq does not hold."""
        blocks = self.window_table(seq)
        return [i for i in range(self._first_seen(lo), self.blocks_needed(hi)) if i >= len(blocks) or blocks[i] < 0]

    # ---- growth ------------------------------------------------------------------------
    def blocks_to_grow(self, seq: Sequence, num_new_tokens: int) -> int:
        lo = seq.num_computed
        return super().blocks_to_grow(seq, num_new_tokens) + len(self._missing(seq, lo, lo + num_new_tokens))

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        lo = seq.num_computed
        missing = self._missing(seq, lo, lo + num_new_tokens)
        super().grow(seq, num_new_tokens)
        table = self.tables.setdefault(id(seq), _WindowTable())
        table.blocks.extend([-1] * (self.blocks_needed(lo + num_new_tokens) - len(table.blocks)))
        for i in missing:
            table.blocks[i] = self._take_free().id

    def computed(self, seq: Sequence) -> None:
        """Newly full blocks join the caches; blocks the next query no longer sees are given back."""
        super().computed(seq)
        table = self.tables.get(id(seq))
        if table is None:
            return
        keys = [] if id(seq) in self.stale else self.block_keys.get(id(seq), [])
        bs = self.block_size
        for i in range(table.given_back, min(len(keys), len(table.blocks))):
            block = self.blocks[table.blocks[i]] if table.blocks[i] >= 0 else None
            if block is not None and block.key is None and keys[i] not in self.window_cached:
                block.key, block.tokens = keys[i], tuple(seq.token_ids[i * bs:(i + 1) * bs])
                self.window_cached[block.key] = block.id
                self.window_keyed.add(block.id)
        for i in range(table.given_back, min(self._first_seen(seq.num_computed), len(table.blocks))):
            if table.blocks[i] >= 0:
                self._unref(table.blocks[i])
                table.blocks[i] = -1
        table.given_back = max(table.given_back, min(self._first_seen(seq.num_computed), len(table.blocks)))

    def release(self, seq: Sequence) -> None:
        table = self.tables.pop(id(seq), None)
        if table is not None:
            for block_id in reversed(table.blocks):
                if block_id >= 0:
                    self._unref(block_id)
        super().release(seq)

    # ---- prefix cache ------------------------------------------------------------------
    def _window_hits(self, matched: list[int]) -> list[int] | None:
        """The cached sliding-layer blocks a hit of `matched` needs (indices from the first block
        its next query sees), or None when one of them is no longer cached."""
        hits = []
        for i in range(self._first_seen(len(matched) * self.block_size), len(matched)):
            full = self.blocks[matched[i]]
            block_id = self.window_cached.get(full.key)
            if block_id is None or self.blocks[block_id].tokens != full.tokens:
                return None
            hits.append(block_id)
        return hits

    def match_prefix(self, seq: Sequence) -> list[int]:
        matched = super().match_prefix(seq)
        while matched and self._window_hits(matched) is None:
            matched = matched[:-1]
        return matched

    def can_start(self, seq: Sequence, matched: list[int], num_new_tokens: int) -> bool:
        hits = self._window_hits(matched) or []
        fresh = self.blocks_needed(len(matched) * self.block_size + num_new_tokens) - len(matched)
        revived = sum(1 for b in matched + hits if self.blocks[b].ref_count == 0)
        return self.reserve(2 * fresh + revived)

    def start(self, seq: Sequence, matched: list[int]) -> None:
        hits = self._window_hits(matched) or []
        super().start(seq, matched)
        first = len(matched) - len(hits)
        table = _WindowTable([-1] * first, first)
        for block_id in hits:
            if self.blocks[block_id].ref_count == 0:
                self._take_free(block_id)
            else:
                self.blocks[block_id].ref_count += 1
            table.blocks.append(block_id)
        self.tables[id(seq)] = table

    def _forget_key(self, block: Block) -> None:
        if block.id in self.window_keyed:
            self.window_keyed.discard(block.id)
            del self.window_cached[block.key]
        else:
            super()._forget_key(block)

    def invalidate_cache(self) -> None:
        super().invalidate_cache()
        self.window_cached.clear()
        self.window_keyed.clear()

    # ---- forks -------------------------------------------------------------------------
    def fork(self, parent: Sequence, child: Sequence) -> bool:
        """The child shares the parent's blocks of both kinds; each partial last block is copied."""
        full = parent.num_computed // self.block_size
        partial = parent.num_computed % self.block_size != 0
        if partial and not self.reserve(2):
            return False
        if not super().fork(parent, child):
            return False
        source = self.tables[id(parent)]
        blocks = source.blocks[:full]
        for block_id in blocks:
            if block_id >= 0:
                self.blocks[block_id].ref_count += 1
        if partial:
            dst = self._take_free().id
            self.queue_copy(source.blocks[full], dst)
            blocks = blocks + [dst]
        self.tables[id(child)] = _WindowTable(blocks, source.given_back)
        return True


def make_block_manager(num_blocks: int, block_size: int, enable_prefix_caching: bool,
                       window: int | None) -> BlockManager:
    """A WindowBlockManager when the model's sliding layers have a window group (ModelRunner.kv_window)."""
    if window is None:
        return BlockManager(num_blocks, block_size, enable_prefix_caching)
    return WindowBlockManager(num_blocks, block_size, enable_prefix_caching, window)


def kv_cache_owners(layers: list) -> tuple[list[list], int | None]:
    """Which attention layers share one set of cache tensors, and the window of the window group.

    Hybrid models (full and sliding layers, one window, the same cache shapes): full layer j and
    sliding layer j share tensors (their blocks come from one pool, WindowBlockManager). Otherwise
    every layer has its own tensors and sliding layers keep all their blocks (None)."""
    full = [a for a in layers if getattr(a, "window", None) is None]
    sliding = [a for a in layers if getattr(a, "window", None) is not None]
    windows = {a.window for a in sliding}
    if not full or not sliding or len(windows) != 1 or any(
            a.kv_cache_shapes(1) != layers[0].kv_cache_shapes(1) for a in layers):
        return [[a] for a in layers], None
    owners = [[a for a in (full[j] if j < len(full) else None, sliding[j] if j < len(sliding) else None) if a]
              for j in range(max(len(full), len(sliding)))]
    return owners, windows.pop()
