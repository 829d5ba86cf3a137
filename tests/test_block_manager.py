"""BlockManager: reference counts, LRU reuse of cached blocks, forks with copy-on-write of the partial block."""
from __future__ import annotations

from atom.engine.block_manager import BlockManager
from atom.engine.sequence import Request, Sequence
from atom.sampling_params import SamplingParams


def seq_of(tokens: list[int], n: int = 1) -> Sequence:
    req = Request(0, tokens, tokens, SamplingParams(n=n), seed=0)
    return Sequence(req, 0, tokens)


def run_prefill(bm: BlockManager, seq: Sequence) -> None:
    assert bm.free_cached == sum(bm.blocks[i].key is not None for i in bm.free)
    matched = bm.match_prefix(seq)
    assert bm.can_start(seq, matched, len(seq) - len(matched) * bm.block_size)
    bm.start(seq, matched)
    bm.grow(seq, seq.num_uncomputed)
    seq.num_computed = len(seq)
    bm.computed(seq)


def test_cached_blocks_survive_release_and_are_reused():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq_of(list(range(10)))
    run_prefill(bm, a)
    assert len(a.block_table) == 3 and bm.num_free == 5
    first_two = a.block_table[:2]
    bm.release(a)
    assert bm.num_free == 8
    b = seq_of(list(range(10)) + [99])
    assert bm.match_prefix(b) == first_two          # two full blocks cached; the partial one is not
    c = seq_of(list(range(8)))
    assert bm.match_prefix(c) == first_two[:1]     # always leaves one token to compute


def test_eviction_takes_uncached_then_the_tail_of_a_chain():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq_of([1, 2, 3, 4, 5])
    run_prefill(bm, a)
    chain, partial = a.block_table[:2], a.block_table[2]
    bm.release(a)
    # Two allocations take the never-used block and the uncached partial one: the chain survives.
    d = seq_of([7, 7, 7])
    run_prefill(bm, d)
    assert sorted(d.block_table) == sorted({0, 1, 2, 3} - set(chain))
    assert partial in d.block_table
    assert bm.match_prefix(seq_of([1, 2, 3, 4, 5])) == chain
    # The next allocation evicts the chain's tail (freed first), keeping its head.
    e = seq_of([9, 9])
    run_prefill(bm, e)
    assert e.block_table == [chain[1]]
    assert bm.match_prefix(seq_of([1, 2, 3, 4, 5])) == chain[:1]


def test_fork_shares_full_blocks_and_copies_partial():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = seq_of(list(range(6)), n=2)
    run_prefill(bm, parent)
    child = Sequence(parent.request, 1, parent.token_ids)
    assert bm.fork(parent, child)
    assert child.block_table[0] == parent.block_table[0]
    assert child.block_table[1] != parent.block_table[1]
    assert bm.pending_copies == [(parent.block_table[1], child.block_table[1])]
    assert bm.blocks[parent.block_table[0]].ref_count == 2
    bm.release(parent)
    bm.release(child)
    assert bm.num_free == 8 and all(b.ref_count == 0 for b in bm.blocks)


def test_invalidate_forgets_every_prefix():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq_of(list(range(9)))
    run_prefill(bm, a)
    bm.release(a)
    bm.invalidate_cache()
    assert bm.match_prefix(seq_of(list(range(9)))) == []



def test_sequences_live_across_an_invalidation_never_enter_the_cache():
    """A request kept across a weight update (no recompute) holds KV of the old weights, and every
    block it computes afterwards attends to it: none of them may serve a later request, nor may
    a fork's; a sequence started after the update caches as usual."""
    bm = BlockManager(num_blocks=16, block_size=4)
    kept = seq_of(list(range(6)), n=2)
    run_prefill(bm, kept)
    bm.invalidate_cache()
    child = Sequence(kept.request, 1, kept.token_ids)
    assert bm.fork(kept, child)
    for seq in (kept, child):  # decode on: two more full blocks each, computed after the update
        seq.token_ids = seq.token_ids + [40 + seq.sample_index] * 6
        bm.grow(seq, len(seq) - seq.num_computed)
        seq.num_computed = len(seq)
        bm.computed(seq)
        assert bm.keys_ahead(seq) == []  # nothing for a waiting prompt to wait for either
    assert bm.cached == {} and all(b.key is None for b in bm.blocks)
    for seq in (kept, child):
        bm.release(seq)
        assert bm.match_prefix(seq_of(seq.token_ids + [1])) == []
    fresh = seq_of(list(range(6)))
    run_prefill(bm, fresh)
    assert len(bm.cached) == 1 and bm.match_prefix(seq_of(list(range(6)))) == fresh.block_table[:1]

class Backing:
    """Device memory for blocks [0, n), granted two blocks at a time up to `limit` (the rest of
    the device taken by something else)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.calls = limit, []

    def __call__(self, n: int) -> int:
        self.calls.append(n)
        return min(-(-n // 2) * 2, self.limit)


def test_blocks_are_backed_on_demand_lowest_first():
    bm = BlockManager(num_blocks=16, block_size=4)
    backing = Backing(limit=16)
    bm.set_backing(2, backing)
    assert bm.num_free == 2 and bm.backed == 2
    a = seq_of(list(range(10)))          # 3 blocks: one more must be backed
    run_prefill(bm, a)
    assert backing.calls == [3] and bm.backed == 4
    assert sorted(a.block_table) == [0, 1, 2] and bm.num_free == 1
    b = seq_of(list(range(100, 117)))    # 5 blocks
    run_prefill(bm, b)
    assert bm.backed == 8 and sorted(b.block_table) == [3, 4, 5, 6, 7]
    bm.release(a)
    bm.release(b)
    assert bm.num_free == 8 and bm.backed == 8   # backing is kept until the next sleep


def test_fresh_blocks_come_before_evicting_cached_ones():
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.set_backing(2, Backing(limit=8))
    a = seq_of([1, 2, 3, 4, 5])
    run_prefill(bm, a)
    cached = a.block_table[:2]
    bm.release(a)
    b = seq_of([9, 8, 7, 6, 5])          # nothing in common: new blocks are backed, the cache stays
    run_prefill(bm, b)
    assert not set(b.block_table) & set(cached)
    assert bm.match_prefix(seq_of([1, 2, 3, 4, 5])) == cached


def test_backing_refused_leaves_everything_consistent():
    bm = BlockManager(num_blocks=16, block_size=4)
    bm.set_backing(2, Backing(limit=4))  # the device has room for 4 blocks only
    a = seq_of(list(range(12)))          # 3 blocks: fits
    run_prefill(bm, a)
    b = seq_of(list(range(50, 62)))      # 3 more: only 1 can be backed
    assert not bm.can_start(b, [], len(b))
    assert bm.backed == 4 and bm.num_free == 1 and b.block_table == []
    bm.release(a)
    assert bm.can_start(b, [], len(b))   # what was backed serves once it is free again
    run_prefill(bm, b)
    assert bm.backed == 4 and bm.num_free == 1


def test_set_backing_needs_every_block_free():
    import pytest
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq_of([1, 2, 3])
    run_prefill(bm, a)
    with pytest.raises(RuntimeError, match="in use"):
        bm.set_backing(1, Backing(limit=4))
    bm.release(a)
    bm.set_backing(4)
    assert bm.num_free == 4 and bm.match_prefix(seq_of([1, 2, 3])) == []
