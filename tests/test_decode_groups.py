"""The decode runner's shared-prefix groups (DecodeRunner._groups, vectorised over the host
block-table rows) against the rule written out row by row: rows whose tables start with the same
block, sharing the whole blocks every member has (not its last block, not past the first row's
prompt) that equal the first row's, in chunks of at most max_n rows, at most `cap` groups."""
from __future__ import annotations

import random
import types

import numpy as np
import pytest

from atom.engine.cuda_graph import DecodeRunner

PAGE, MAX_BLOCKS = 4, 24


def reference(seqs, by_first, cap, max_n):
    plen, grows, row_prefix, g = [0] * cap, {}, [0] * len(seqs), 0
    for rows in by_first.values():
        if len(rows) < 2:
            continue
        t0 = seqs[rows[0]].block_table
        shared = min(len(seqs[r].block_table) for r in rows) - 1
        shared = min(shared, seqs[rows[0]].num_prompt_tokens // PAGE)
        for r in rows[1:]:
            k = 0
            while k < shared and seqs[r].block_table[k] == t0[k]:
                k += 1
            shared = k
        if shared < 1:
            continue
        for c0 in range(0, len(rows), max_n):
            chunk = rows[c0: c0 + max_n]
            if len(chunk) < 2 or g >= cap:
                continue
            grows[g] = chunk
            plen[g] = shared * PAGE
            for r in chunk:
                row_prefix[r] = shared * PAGE
            g += 1
    return plen, grows, row_prefix


def random_batch(rng: random.Random, n_prompts: int):
    seqs, next_block = [], 1000
    for _ in range(n_prompts):
        prompt_blocks = rng.randint(1, 10)
        prompt = [rng.randrange(1, 999) for _ in range(prompt_blocks)]
        for _ in range(rng.randint(1, 7)):
            table = list(prompt)  # each sequence its own list, as the block manager gives them
            if rng.random() < 0.3:  # a copy-on-write or recomputed block somewhere in the prompt
                table[rng.randrange(prompt_blocks)] = next_block
                next_block += 1
            own = rng.randint(0, MAX_BLOCKS - prompt_blocks)
            table += list(range(next_block, next_block + own))
            next_block += own
            tokens = prompt_blocks * PAGE - rng.randint(0, PAGE - 1)
            seqs.append(types.SimpleNamespace(block_table=table, num_prompt_tokens=tokens))
    rng.shuffle(seqs)
    return seqs


@pytest.mark.parametrize("seed", range(20))
def test_groups_match_the_row_by_row_rule(seed):
    rng = random.Random(seed)
    seqs = random_batch(rng, rng.randint(1, 12))
    n = len(seqs)
    bs, max_n = n + rng.randint(0, 3), rng.choice([2, 3, 8])
    cap = max(1, bs // 2) if seed % 3 else 2  # some batches run out of groups
    by_first: dict[int, list[int]] = {}
    bt = np.full((bs, MAX_BLOCKS), 7, dtype=np.int32)  # stale values past n, as another layout leaves them
    for i, s in enumerate(seqs):
        bt[i] = 0
        bt[i, : len(s.block_table)] = s.block_table
        if len(s.block_table) > 1:
            by_first.setdefault(s.block_table[0], []).append(i)
    host = {"plen": np.full(cap, 5, np.int32), "grows": np.full((cap, max_n), 9, np.int32),
            "row_prefix": np.full(bs, 3, np.int32), "bt": bt}
    runner = types.SimpleNamespace(page=PAGE, max_n=max_n)
    DecodeRunner._groups(runner, seqs, by_first, bs, host, [len(s.block_table) for s in seqs])
    plen, grows, row_prefix = reference(seqs, by_first, cap, max_n)
    assert host["plen"].tolist() == plen
    assert host["row_prefix"][:n].tolist() == row_prefix[:n] and not host["row_prefix"][n:].any()
    for g, chunk in grows.items():
        assert host["grows"][g].tolist() == chunk + [-1] * (max_n - len(chunk))
    assert any(plen) or not grows


def test_prompts_shorter_than_a_block_make_no_group():
    seqs = [types.SimpleNamespace(block_table=[5, 10 + i], num_prompt_tokens=PAGE - 1) for i in range(3)]
    host = {"plen": np.full(2, 5, np.int32), "grows": np.full((2, 2), 9, np.int32),
            "row_prefix": np.full(3, 3, np.int32), "bt": np.array([s.block_table + [0] * 4 for s in seqs], np.int32)}
    DecodeRunner._groups(types.SimpleNamespace(page=PAGE, max_n=2), seqs, {5: [0, 1, 2]}, 3, host, [2, 2, 2])
    assert not host["plen"].any() and not host["row_prefix"].any()


def test_host_fill_bench_runs_at_a_small_shape(capsys):
    """bench/host_fill.py (the numbers in BENCHMARKS.md) runs end to end and reports both costs."""
    import re

    from bench import host_fill
    assert host_fill.main(["--prompts", "3", "--n", "2", "--prompt-len", "40", "--max-tokens", "5"]) == 0
    line = capsys.readouterr().out
    got = re.search(r"3 x 2 rows: decode runner fill ([0-9.]+) ms a step \((\d+) steps.*shared-prefix groups ([0-9.]+) ms",
                    line)
    assert got, line
    assert float(got[1]) > 0 and int(got[2]) >= 3 and float(got[3]) > 0
