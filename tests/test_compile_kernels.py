"""scripts/compile_kernels.py as a test: every Triton kernel launch of the GPT-OSS and MLA ops
(model and test shapes, bf16 and float32, every MLA tuner candidate) and of the batch-invariant
GEMM (every sweep candidate: TMA, persistent, split-K; one kernel for every M) and of the fused MoE
under every tile config bench/moe_tune.py may install (GPT-OSS-20B's and Moonlight's shapes) and of
the sampler with its rank count compiles for an H200
(sm_90) and fits its shared memory, checked on the CPU. Runs where Triton is importable (not
in CI: `PYTHONPATH=$PWD:/work/triton_pkgs pytest tests/test_compile_kernels.py`); the first run
compiles some 300 kernels (minutes), later ones read Triton's cache (seconds)."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family", ["mla", "mla_invariant", "gpt_oss", "gemm", "moe_tune", "sampling"])
def test_kernels_compile_for_sm90_within_shared_memory(family):
    triton = pytest.importorskip("triton")
    path = os.pathsep.join([str(ROOT), str(pathlib.Path(triton.__file__).parents[1])])
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("TRITON_INTERPRET", None)  # the interpreter compiles nothing
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_kernels.py"), "--only", family],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = re.search(r"(\d+) launches compiled for sm_90; largest shared memory (\d+) B of (\d+)", run.stdout)
    assert summary, run.stdout[-2000:]
    launches, worst, limit = map(int, summary.groups())
    assert launches > {"mla": 500, "sampling": 30}.get(family, 100) and 0 < worst <= limit
