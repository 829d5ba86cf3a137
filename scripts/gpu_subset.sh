#!/usr/bin/env bash
# Chosen GPU test files in three concurrent pytest processes (one device call, a bench may follow):
#   scripts/gpu_subset.sh "FILES_OR_ARGS_1" "FILES_OR_ARGS_2" ...   (each quoted argument: one process;
#   quotes inside one keep a -k expression whole: "tests/gpu/test_mla_triton.py -k 'two_pass and partial'")
# Logs subset_{i}.log in $OUT (or ./gpu_out); TEST_TIMEOUT (default 250) bounds each process, and
# whatever a timed-out process left running is killed before this script returns (a bench after
# it must not share the host with compile workers).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  WHEELS=$(mktemp -d)
  $PY -m pip install -q --no-deps --target "$WHEELS" .whl/*.whl && export PYTHONPATH="$WHEELS:$PYTHONPATH"
fi
i=0
for args in "$@"; do
  eval timeout "${TEST_TIMEOUT:-250}" $PY -m pytest -m gpu -q -rs --durations=3 "$args" > "$OUT/subset_$i.log" 2>&1 &
  i=$((i + 1))
done
wait
pkill -f -- "-m pytest -m gpu" 2>/dev/null
sleep 1
for ((j = 0; j < i; j++)); do echo "subset[$j]: $(tail -1 "$OUT/subset_$j.log")"; done
