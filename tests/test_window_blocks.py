"""WindowBlockManager (issue 17): sliding-window layers of hybrid models give back the blocks
their window no longer sees; prefix hits are kept only as far as the window's blocks are cached."""
from __future__ import annotations

from atom.engine.block_manager import BlockManager
from atom.engine.window_blocks import WindowBlockManager
from test_block_manager import run_prefill, seq_of


def decode(bm: WindowBlockManager, seq, tokens: list[int]) -> None:
    for t in tokens:
        seq.token_ids.append(t)
        assert bm.can_grow(seq, 1)
        bm.grow(seq, 1)
        seq.num_computed += 1
        bm.computed(seq)


def test_window_blocks_are_given_back_as_the_sequence_grows():
    bm = WindowBlockManager(num_blocks=64, block_size=4, enable_prefix_caching=True, window=6)
    a = seq_of(list(range(2, 22)))  # 20 tokens
    run_prefill(bm, a)
    # The next query (position 20) sees 15..20: blocks 3 and 4 of the window table; 0-2 given back.
    assert [b >= 0 for b in bm.window_table(a)] == [False, False, False, True, True]
    assert bm.num_blocks - bm.num_free == 5 + 2
    decode(bm, a, list(range(30, 50)))  # 40 tokens
    table = bm.window_table(a)
    assert len(a.block_table) == 10 and len(table) == 10
    assert [i for i, b in enumerate(table) if b >= 0] == [8, 9]  # 35..40 are in blocks 8 and 9
    assert bm.num_blocks - bm.num_free == 10 + 2
    assert not set(table) & set(a.block_table)
    bm.release(a)
    assert bm.num_free == 64 and not bm.tables


def test_prefix_hit_needs_the_window_blocks_and_forks_share_them():
    bm = WindowBlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True, window=6)
    prompt = list(range(2, 30))  # 28 tokens: 7 full blocks
    a = seq_of(prompt)
    run_prefill(bm, a)
    bm.release(a)
    # A hit of all 7 blocks: the next query (position 28) sees 23..28, the sliding layers' blocks 5, 6.
    b = seq_of(prompt + [99])
    matched = bm.match_prefix(b)
    assert len(matched) == 7 and bm.can_start(b, matched, 1)
    bm.start(b, matched)
    assert [i for i, x in enumerate(bm.window_table(b)) if x >= 0] == [5, 6]
    bm.grow(b, 1)
    b.num_computed = len(b)
    bm.computed(b)
    # Fork: the child shares b's blocks of both kinds; the partial last ones are copied.
    child = seq_of(prompt + [99])
    assert bm.fork(b, child)
    assert len(bm.pending_copies) == 2
    shared = [x for x in bm.window_table(child)[:-1] if x >= 0]
    assert shared == [x for x in bm.window_table(b)[:-1] if x >= 0] and bm.blocks[shared[0]].ref_count == 2
    bm.release(child)
    bm.release(b)
    # Another prompt evicts the least recently freed blocks: the sliding ones given back first,
    # including block 6. The full layers' 7 blocks are still cached, but a hit needs block 6.
    d = seq_of(list(range(100, 116)))
    run_prefill(bm, d)
    c = seq_of(prompt + [7])
    assert len(BlockManager.match_prefix(bm, c)) == 7
    assert bm.match_prefix(c) == []
