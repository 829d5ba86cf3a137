#!/usr/bin/env bash
# One device call for the session-4 tree: the GPU tests of the code changed since the last full
# run (engine core, overlapped loop, sleep levels, families, routed experts), then grpo-moe as a
# batch and as concurrent async requests, and the late-arrival wait. Results under $OUT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD"
git log -1 --format=%h
timeout 260 python3 -m pytest -m gpu -q -rs -p no:cacheprovider --durations=5 tests/gpu/test_engine_gpu.py \
  tests/gpu/test_families_gpu.py tests/test_overlapped_decode.py tests/test_sleep_wake.py \
  tests/gpu/test_sampling_split.py 2>&1 | tee "$OUT/pytest.log" | tail -25
timeout 120 python3 -m pytest -q -p no:cacheprovider -x tests/test_async_core.py tests/test_routed_experts.py \
  -k "not job" 2>&1 | tail -3   # the CPU-device tests, on this machine's torch (GPU visible)
export ATOM_BENCH_CEILINGS="$OUT/ceilings.json"
OUT=$OUT ASYNC_TIMEOUT=200 scripts/gpu_check.sh async bench grpo-moe 2>&1 | tail -20
