"""bench/batch_invariant.py --gemm --sweep's choice: per weight, the candidate with the least time
per rollout over the workload's M (not the fastest at one M), printed as a line that pastes into
invariant_gemm.MEASURED. Synthetic timings, no GPU."""
from __future__ import annotations

import re

from bench import batch_invariant as bi


def _sweep(fast_at_512, fast_at_8192):
    """µs per candidate: fast_at_512 wins M = 512 by a little, fast_at_8192 wins M = 8192 by a lot."""
    sweep = {m: {str(c): 100.0 for c in bi.CANDIDATES} for m in bi.SWEEP_ROWS}
    sweep[512][str(fast_at_512)] = 99.0
    sweep[8192][str(fast_at_8192)] = 10.0
    return sweep


def test_the_sweep_weighs_candidates_by_the_workload_and_prints_a_measured_line(capsys):
    split, tma = bi.CANDIDATES[-1], bi.CANDIDATES[len(bi.CANDIDATES) // 2]
    assert split[5].get("split_k", 1) > 1 and split != tma
    rows = {m: {"invariant_us": 120.0, "cublas_us": 80.0} for m in bi.SWEEP_ROWS}
    # 1,024 calls at M = 512 save 1 us each (1 ms), 16 at M = 8192 save 90 us each (1.44 ms).
    best = bi._weigh("down", 4096, 12288, _sweep(tma, split), bi.WORKLOAD_CALLS, rows, 1)
    assert best["candidate"] == split
    assert abs(best["best_s"] - (1024 * 100 + 16 * 10) / 1e6) < 1e-9
    assert abs(best["now_s"] - (1024 + 16) * 120 / 1e6) < 1e-9
    # The LM head only runs decode rows: M = 512 decides.
    assert bi._weigh("lm_head", 151936, 4096, _sweep(tma, split), bi.LM_HEAD_CALLS, rows, 1)["candidate"] == tma
    bi._print_best({"down": best})
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "_cfg(" in ln)
    key, call = re.match(r"\s*(\(\d+, \d+, 2\)): (_cfg\(.*\)),\s+# down", line).groups()

    def _cfg(bm, bn, bk, warps, stages, **variant):
        return (bm, bn, bk, warps, stages, variant)
    assert eval(key) == (4096, 12288, 2) and eval(call) == split


def test_every_candidate_is_a_valid_distinct_config():
    assert len({str(c) for c in bi.CANDIDATES}) == len(bi.CANDIDATES)
    for c in bi.CANDIDATES:
        assert all(v >= 16 and v & (v - 1) == 0 for v in c[:3]) and set(c[5]) <= {"tma", "split_k", "fold_last", "persistent"}


def test_same_bits_groups_candidates_by_equal_outputs():
    import torch
    outs = {str(c): torch.tensor([float(i % 3)]) for i, c in enumerate(bi.CANDIDATES)}
    groups = bi.same_bits(lambda c: outs[str(c)])
    n = len(bi.CANDIDATES)
    assert groups == [list(range(r, n, 3)) for r in range(3)]
