"""Paged KV blocks with reference counts and prefix caching by hash chains over full blocks.

A full block's key is hash(previous block's key, its tokens); the block also keeps its tokens,
so a hash collision can never hand a request someone else's KV. Freed blocks stay cached
(LRU order) until a new allocation needs them.

Backing: only blocks [0, backed) have device memory behind them and can be handed out. After a
wake the KV pool is backed on demand (atom/engine/memory.py, KvVmmPool): when the free blocks
run short, `reserve` asks `back(n)` for more and gets them, or fewer when the device is out of
memory; then the scheduler waits and preempts as with a full pool.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from atom.engine.sequence import Sequence


@dataclass
class Block:
    id: int
    ref_count: int = 0
    key: int | None = None
    tokens: tuple[int, ...] | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks that were used since the last wake: uncached ones at the front, cached ones
        # behind them in LRU order. Blocks [next_fresh, num_blocks) were not used yet; they are
        # handed out after the uncached free ones and before any cached block is evicted.
        self.free: OrderedDict[int, None] = OrderedDict()
        self.free_cached = 0  # how many of them hold a cached prefix
        self.next_fresh = 0
        self.cached: dict[int, int] = {}          # chain key -> block id
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) KV copies the runner must do
        self.block_keys: dict[int, list[int]] = {}       # id(seq) -> chain keys of its full blocks
        # id(seq) of live sequences whose KV predates the last invalidation (a request kept across
        # a weight update without recompute): none of their blocks may enter the prefix cache,
        # those computed after the update included, since those attend to the old KV.
        self.stale: set[int] = set()
        self.backed = num_blocks                         # blocks [0, backed) have memory behind them
        self._back: Callable[[int], int] | None = None   # backs blocks [0, n); returns the blocks backed

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Free blocks with memory behind them (more may be backed on demand: `reserve`)."""
        return len(self.free) + self.backed - self.next_fresh

    # ---- backing -------------------------------------------------------------------------
    def set_backing(self, backed: int, back: Callable[[int], int] | None = None) -> None:
        """Start over with blocks [0, backed) backed (after a wake; every block must be free);
        `back(n)` backs blocks [0, n) on demand and returns how many are backed then."""
        if any(b.ref_count for b in self.blocks):
            raise RuntimeError("set_backing: blocks are still in use")
        self.invalidate_cache()
        self.backed = min(backed, self.num_blocks)
        self._back = back if self.backed < self.num_blocks else None
        self.free = OrderedDict()
        self.free_cached = self.next_fresh = 0

    def note_backed(self, backed: int) -> None:
        """Blocks [0, backed) got memory behind them outside `reserve` (an explicit back of the
        pool, atom/engine/probe.py): hand them out without asking the pool again."""
        self.backed = max(self.backed, min(backed, self.num_blocks))
        if self.backed == self.num_blocks:
            self._back = None

    def reserve(self, n: int) -> bool:
        """Whether n blocks are free, backing more blocks first if that is what it takes."""
        # Like a fully backed pool: new blocks before evicting cached prefixes.
        short = n - (self.num_free - self.free_cached)
        if short > 0 and self._back is not None:
            self.backed = max(self.backed, min(self._back(self.backed + short), self.num_blocks))
            if self.backed == self.num_blocks:
                self._back = None
        return self.num_free >= n

    def queue_copy(self, src: int, dst: int) -> None:
        """Queue a KV block copy for the runner. A source that is itself the destination of a copy
        still queued (a prompt twin's sibling forking off the twin) is read from that copy's
        source: the runner copies every pair at once."""
        src = next((s for s, d in self.pending_copies if d == src), src)
        self.pending_copies.append((src, dst))

    def take_copies(self) -> list[tuple[int, int]]:
        """The (src, dst) KV block copies queued by forks, for the runner to do before the next step."""
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache --------------------------------------------------------------------
    @staticmethod
    def chain_key(prev: int | None, tokens: tuple[int, ...]) -> int:
        return hash((prev, tokens))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of seq's tokens (at least one token is left to compute)."""
        if not self.enable_prefix_caching:
            return []
        matched, key, bs = [], None, self.block_size
        for i in range((len(seq) - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            key = self.chain_key(key, tokens)
            block_id = self.cached.get(key)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            matched.append(block_id)
        return matched

    def keys_ahead(self, seq: Sequence, matched: list[int] | None = None) -> list[int]:
        """Chain keys of the full blocks seq has yet to compute: after `matched` (a waiting seq's
        cache hits) or after its registered blocks (a running one)."""
        if matched is not None:
            first, prev = len(matched), (self.blocks[matched[-1]].key if matched else None)
        elif id(seq) in self.stale:  # its blocks will never be cached: nothing to wait for
            return []
        else:
            done = self.block_keys.get(id(seq), [])
            first, prev = len(done), (done[-1] if done else None)
        keys, bs = [], self.block_size
        for i in range(first, len(seq) // bs):
            prev = self.chain_key(prev, tuple(seq.token_ids[i * bs:(i + 1) * bs]))
            keys.append(prev)
        return keys

    def _register_full_blocks(self, seq: Sequence) -> None:
        if not self.enable_prefix_caching:
            return
        keys = self.block_keys.setdefault(id(seq), [])
        bs = self.block_size
        # Tokens of an overlapped step's input may still be in flight: only blocks whose tokens are known.
        cacheable = id(seq) not in self.stale
        for i in range(len(keys), min(seq.num_computed, len(seq.token_ids)) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            key = self.chain_key(keys[-1] if keys else None, tokens)
            keys.append(key)
            block = self.blocks[seq.block_table[i]]
            if cacheable and block.key is None and key not in self.cached:
                block.key, block.tokens = key, tokens
                self.cached[key] = block.id

    def invalidate_cache(self) -> None:
        """Forget every cached prefix (weights changed: old KV must never serve a request)."""
        for block in self.blocks:
            block.key = block.tokens = None
        self.cached.clear()
        self.free_cached = 0
        # Live sequences keep their chain keys (token hashes, still right) but not their KV's
        # right to be shared: the next `computed` would otherwise cache their old blocks again.
        self.stale.update(self.block_keys)

    # ---- allocation ----------------------------------------------------------------------
    def _take_free(self, block_id: int | None = None) -> Block:
        if block_id is None:
            head = next(iter(self.free), None)
            if (head is None or self.blocks[head].key is not None) and self.next_fresh < self.backed:
                block_id, self.next_fresh = self.next_fresh, self.next_fresh + 1
            else:
                block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.key is not None:  # evict: the least recently freed cached block goes first
                self._forget_key(block)
                block.key = block.tokens = None
                self.free_cached -= 1
        else:
            del self.free[block_id]
            block = self.blocks[block_id]
            self.free_cached -= block.key is not None
        block.ref_count = 1
        return block

    def _forget_key(self, block: Block) -> None:
        del self.cached[block.key]

    def _unref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free[block_id] = None
            if block.key is None:  # uncached blocks are reused before cached ones
                self.free.move_to_end(block_id, last=False)
            else:
                self.free_cached += 1

    def can_start(self, seq: Sequence, matched: list[int], num_new_tokens: int) -> bool:
        """Room for a waiting seq: fresh blocks plus matched blocks that sit in the free list."""
        fresh = self.blocks_needed(len(matched) * self.block_size + num_new_tokens) - len(matched)
        revived = sum(1 for b in matched if self.blocks[b].ref_count == 0)
        return self.reserve(fresh + revived)

    def start(self, seq: Sequence, matched: list[int]) -> None:
        """Give a waiting seq the matched prefix blocks; its computed count jumps past them."""
        assert not seq.block_table
        for block_id in matched:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self._take_free(block_id)
            else:
                block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_computed = len(matched) * self.block_size
        self.block_keys[id(seq)] = [self.blocks[b].key for b in matched]

    def blocks_to_grow(self, seq: Sequence, num_new_tokens: int) -> int:
        """Free blocks `grow(seq, num_new_tokens)` takes."""
        return max(0, self.blocks_needed(seq.num_computed + num_new_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.reserve(self.blocks_to_grow(seq, num_new_tokens))

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make seq's block table cover its next num_new_tokens tokens."""
        for _ in range(self.blocks_needed(seq.num_computed + num_new_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take_free().id)

    def computed(self, seq: Sequence) -> None:
        """Called after a step advanced seq.num_computed: newly full blocks join the prefix cache."""
        self._register_full_blocks(seq)

    def release(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            self._unref(block_id)
        seq.block_table = []
        seq.num_computed = 0
        self.block_keys.pop(id(seq), None)
        self.stale.discard(id(seq))

    def fork(self, parent: Sequence, child: Sequence) -> bool:
        """Share parent's full blocks with child; copy the partial last block. False if no room."""
        full = parent.num_computed // self.block_size
        partial = parent.num_computed % self.block_size != 0
        if partial and not self.reserve(1):
            return False
        for block_id in parent.block_table[:full]:
            self.blocks[block_id].ref_count += 1
        child.block_table = parent.block_table[:full]
        if partial:
            dst = self._take_free().id
            self.queue_copy(parent.block_table[full], dst)
            child.block_table.append(dst)
        child.num_computed = parent.num_computed
        self.block_keys[id(child)] = list(self.block_keys.get(id(parent), []))
        if id(parent) in self.stale:
            self.stale.add(id(child))
        return True
