"""BlockManager: reference counts, LRU reuse of cached blocks, forks with copy-on-write of the partial block."""
from __future__ import annotations

from atom.engine.block_manager import BlockManager
from atom.engine.sequence import Request, Sequence
from atom.sampling_params import SamplingParams


def seq_of(tokens: list[int], n: int = 1) -> Sequence:
    req = Request(0, tokens, tokens, SamplingParams(n=n), seed=0)
    return Sequence(req, 0, tokens)


def run_prefill(bm: BlockManager, seq: Sequence) -> None:
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
