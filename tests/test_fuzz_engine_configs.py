"""Engine configs that must not change a request's tokens (overlap, prefix caching off, small
chunks, few sequences, preemption, small blocks, routed-expert capture) on one random workload per
family: scripts/fuzz_engine_configs.py, which found the decode runner's stale block-table bug."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_engine_configs.py"
_spec = importlib.util.spec_from_file_location("fuzz_engine_configs", _PATH)
fuzz_engine_configs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz_engine_configs)


def test_the_comparison_reports_token_and_logprob_differences():
    base = [[([5, 6], [-1.0, -2.0], "length")]]
    assert fuzz_engine_configs._difference(base, base) is None
    assert "tokens" in fuzz_engine_configs._difference(base, [[([5, 7], [-1.0, -2.0], "length")]])
    assert "logprobs" in fuzz_engine_configs._difference(base, [[([5, 6], [-1.0, -2.001], "length")]])
    assert "tokens" in fuzz_engine_configs._difference(base, [[([5, 6], [-1.0, -2.0], "stop")]])


@pytest.mark.parametrize("arch", ["gpt_oss", "deepseek_v3"])
def test_no_engine_config_changes_a_random_workload(arch):
    assert fuzz_engine_configs.fuzz(arch, trials=1, seed=8) == []
