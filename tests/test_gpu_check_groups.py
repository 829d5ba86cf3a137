"""scripts/gpu_check.sh runs every GPU test file: each tests/gpu/test_*.py is named in one of its
pytest groups (a file left out never runs on the device, as test_batch_invariant_families_gpu.py
did for a session)."""
from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_gpu_test_file_is_in_a_group():
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    groups = re.search(r"groups=\((.*?)\)\n", script, re.S)
    assert groups, "gpu_check.sh: no groups=( ... ) array"
    named = set(re.findall(r"tests/[\w/]+\.py", groups.group(1)))
    files = {str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "gpu").glob("test_*.py")}
    assert files, "no GPU test files found"
    assert not files - named, f"GPU test files no gpu_check.sh group runs: {sorted(files - named)}"
    assert all((ROOT / f).is_file() for f in named), f"groups name missing files: {sorted(f for f in named if not (ROOT / f).is_file())}"
