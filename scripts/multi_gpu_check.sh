#!/usr/bin/env bash
# Tensor / expert parallelism on N GPUs with NCCL (RCCL on ROCm), launched by torchrun:
#   1. tests/parallel_checks.py: TP=2 (dense, MoE), EP=2 allreduce, EP=2 alltoall, TP=2+EP=2 on
#      2 GPUs (and TP=2+EP=4, TP=4+EP=2, EP=4 alltoall, two TP=2 engines on 4 GPUs when there
#      are 4): greedy/seeded tokens identical to a single-GPU engine, logprobs within ATOL,
#      identical outputs on every rank, update_weights leaving each rank its exact shard.
#   2. a rank that stops calling the engine: the others raise within dist_timeout_s.
#   3. bench/rollout.py --workload grpo-moe (Qwen3-30B-A3B shapes, random weights) with TP=2,
#      EP=2 (allreduce), EP=2 (alltoall), next to the single-GPU run.
#
# Usage: scripts/multi_gpu_check.sh [NGPUS]        (default: every visible GPU; needs >= 2)
#   SKIP_BENCH=1   only the checks;  ATOL=...   logprob tolerance (default 1e-4 on GPU, fp32)
#   BENCH_ARGS='--max-num-seqs 256'  extra bench/rollout.py arguments
#   DEVICE=cpu SKIP_BENCH=1 scripts/multi_gpu_check.sh 2   dry run of steps 1-2 on CPU with gloo
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
NGPUS=${1:-$($PY -c 'import torch; print(torch.cuda.device_count())')}
if [ "$NGPUS" -lt 2 ]; then
  echo "multi_gpu_check: needs at least 2 GPUs, found $NGPUS" >&2
  exit 2
fi
ATOL=${ATOL:-1e-4}
DEVICE=${DEVICE:-cuda}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# NCCL: make a collective that times out raise in Python (CollectiveError) instead of the
# watchdog tearing the process down (docs_parallel.md, "Failures and timeouts").
export TORCH_NCCL_BLOCKING_WAIT=${TORCH_NCCL_BLOCKING_WAIT:-1}
TORCHRUN=("$PY" -m torch.distributed.run --standalone)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "== tiny checkpoints"
"$PY" - "$WORK" <<'EOF'
import json, os, sys
sys.path.insert(0, "tests")
from conftest import build_tiny_model  # the same tiny models as the CPU tests

work = sys.argv[1]
models, updates = {}, {}
for arch, kw in (("qwen3", dict(tie_word_embeddings=True)), ("qwen3_moe", {})):
    for seed, table in ((0, models), (1, updates)):
        path = os.path.join(work, f"{arch}_{seed}")
        build_tiny_model(arch, seed=seed, **kw).save_pretrained(path)
        table[arch] = path
json.dump({"models": models, "updates": updates}, open(os.path.join(work, "models.json"), "w"))
EOF
MODELS=$("$PY" -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))['models']))" "$WORK/models.json")
UPDATES=$("$PY" -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))['updates']))" "$WORK/models.json")

echo "== correctness, 2 GPUs"
"${TORCHRUN[@]}" --nproc-per-node 2 tests/parallel_checks.py --device "$DEVICE" --atol "$ATOL" \
  --models "$MODELS" --update-models "$UPDATES"
if [ "$NGPUS" -ge 4 ]; then
  echo "== correctness, 4 GPUs"
  "${TORCHRUN[@]}" --nproc-per-node 4 tests/parallel_checks.py --device "$DEVICE" --atol "$ATOL" --models "$MODELS"
fi

echo "== a rank that stops calling the engine: rank 0 must raise CollectiveError within ~10 s"
"${TORCHRUN[@]}" --nproc-per-node 2 tests/parallel_checks.py --device "$DEVICE" --models "$MODELS" \
  --failure collective --timeout 10 --out "$WORK"

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== grpo-moe benchmark"
  "$PY" -m bench.rollout --workload grpo-moe ${BENCH_ARGS:-}
  "${TORCHRUN[@]}" --nproc-per-node 2 -m bench.rollout --workload grpo-moe --tensor-parallel-size 2 ${BENCH_ARGS:-}
  "${TORCHRUN[@]}" --nproc-per-node 2 -m bench.rollout --workload grpo-moe --expert-parallel-size 2 ${BENCH_ARGS:-}
  "${TORCHRUN[@]}" --nproc-per-node 2 -m bench.rollout --workload grpo-moe --tensor-parallel-size 2 \
    --expert-parallel-size 2 ${BENCH_ARGS:-}
  "${TORCHRUN[@]}" --nproc-per-node 2 -m bench.rollout --workload grpo-moe --expert-parallel-size 2 \
    --ep-mode alltoall ${BENCH_ARGS:-}
fi
echo "multi_gpu_check: OK"
