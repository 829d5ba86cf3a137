#!/usr/bin/env bash
# GPU tests and benchmarks on the device machine; a short table last.
#
#   scripts/gpu_check.sh [tests] [tune] [bench W1,W2,...] [profile W] [hf] [kernels] [mla] [small] [sleep] [ipc]
#     tests   : python3 -m pytest -m gpu over tests/gpu tests/test_overlapped_decode.py tests/test_sleep_wake.py
#               tests/test_weight_transfer.py in groups of concurrent processes, then
#               tests/test_sleep_wake.py alone (logs pytest_{0,...,6}.log; TEST_GROUPS="0 6" runs a subset)
#     bench   : python -m bench.rollout --workload W for each W (default: all four)
#     profile W : a torch-profiler window of workload W (steps PROFILE_STEPS, default 600:603; the
#               table, the device's idle gaps by host event (gaps_W.txt) and, when under 16 MB, the
#               chrome trace in $OUT; PROFILE_STACK=1 records Python frames; uses the tuned file
#               when `tune` ran before)
#     hf      : the transformers generate baseline on decode-moe-bs1
#     tune    : sweep decode-attention / fused-MoE tile configs (bench/kernels.py --tune), then the
#               MLA decode's (bench/mla_kernels.py --tune, same file; its groups (6 since session 10) took over 170 s
#               in session 9, and it writes the file after each group), then the fused MoE's per
#               expert shape (bench/moe_tune.py: GPT-OSS-20B, Moonlight; MOE_SHAPES=gpt-oss limits it);
#               later bench steps of the same run use the result (MLA_TUNE_ARGS="--first N": only the
#               first N groups of the MLA sweep)
#     gemms   : the decode step's dense GEMMs (cuBLAS) and the shared experts folded into the fused MoE
#     kernels : micro-benchmarks of the triton kernels (bench/kernels.py)
#     mla     : the MLA decode kernel at the Moonlight shape (bench/mla_kernels.py), after `tune` with its configs,
#               then the MLA prefill (8192-token chunks, absorbed / expanded break-even)
#     ncu     : Nsight Compute (when installed) on the MLA decode kernels of the bs512 case
#     small   : small-batch kernels against the paths they replace (bench/small_batch.py)
#     sleep   : sleep / wake / update_weights timings, 30B shape (bench/sleep_wake.py, no offload cycles)
#     async   : the asynchronous front end (bench/async_rollout.py): grpo-moe as concurrent requests
#               against the batch call, a request arriving during a 512-sequence decode
#     arrival : agent-async-moe (requests 5 ms apart through the async API)
#     ipc     : weight sync by CUDA IPC from a trainer process, 30B shape (bench/ipc_weights.py; goal < 0.5 s)
#     invariant W1,W2 : the invariant GEMM sweep (--gemm grpo-dense-8b --sweep --tuned gemm_tuned.json),
#               then batch-invariant mode's cost with those tiles (bench/batch_invariant.py, normal and
#               invariant processes, --check), default grpo-moe,grpo-dense-8b
# Logs and JSON results go to $OUT (or ./gpu_out when OUT is unset).
# On the lent H200 a device call may run 10 minutes: `bench` is one call (the four workloads take
# ~75 s apiece with build and warm-up); `tests` no longer fits one (session 8: groups 0 and 2 ran
# out of 440 s with four groups sharing the GPU and the host's 16 cores), so it is three calls:
# TEST_GROUPS="0 2" TEST_TIMEOUT=540, TEST_GROUPS="3 4 5" TEST_TIMEOUT=500, then TEST_GROUPS="1 6".
# (The MLA files were one group until session 16: 265 s in session 14, then past 520 s alone with
# 288 of its ~500 cases run; session 16 ran test_mla_triton's 145 two-pass cases in 135 s beside
# three other processes.) Never run a bench in the call after a timed-out pytest: its leftover
# workers load the host (session 7 and 8 numbers spoiled). scripts/gpu_subset.sh runs chosen files.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export ATOM_BENCH_CEILINGS="$OUT/ceilings.json" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
# Wheels carried in .whl/ (run's `carry`; the device reaches no index) go ahead of the device
# image's packages: transformers 5.24, the oracle of the CPU tests, for the GPT-OSS reference.
if compgen -G ".whl/*.whl" > /dev/null; then
  WHEELS=$(mktemp -d)
  $PY -m pip install -q --no-deps --target "$WHEELS" .whl/*.whl && export PYTHONPATH="$WHEELS:$PYTHONPATH"
fi
[ $# -eq 0 ] && set -- tests bench
SECTIONS="tests tune bench profile hf gemms kernels mla ncu small sleep async arrival ipc invariant"
WORKLOADS="decode-moe-bs1,grpo-dense-small,grpo-moe,grpo-dense-8b"
summary=()
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.mem --format=csv,noheader 2>/dev/null
while [ $# -gt 0 ]; do
  case "$1" in
    tests)
      # Four pytest processes share the GPU (the suite is bound by Triton compiles on the host's
      # 16 cores, not by the device): about a third of the 530 s a single process takes.
      groups=("tests/gpu/test_moe_small.py tests/gpu/test_family_kernels.py tests/gpu/test_moe_tiles_gpu.py tests/gpu/test_router_linear.py"
              "tests/gpu/test_engine_gpu.py tests/gpu/test_families_gpu.py tests/gpu/test_gpt_oss_gpu.py tests/gpu/test_sampling_options_gpu.py tests/gpu/test_routed_gpu.py tests/test_overlapped_decode.py tests/test_weight_transfer.py tests/gpu/test_invariant_family_kernels.py"
              "tests/gpu/test_triton_ops.py tests/gpu/test_attn_prologue.py tests/gpu/test_linear.py tests/gpu/test_sampling_split.py tests/gpu/test_penalties_gpu.py tests/gpu/test_invariant_ops.py tests/gpu/test_sampling_ranks.py"
              "tests/gpu/test_mla_triton.py -k two_pass"
              "tests/gpu/test_mla_triton.py -k 'not two_pass'"
              "tests/gpu/test_mla_prefill_gpu.py tests/gpu/test_deepseek_gpu.py tests/gpu/test_batch_invariant_gpu.py tests/gpu/test_invariant_gemm.py tests/gpu/test_batch_invariant_families_gpu.py tests/gpu/test_aiter_mla.py tests/gpu/test_invariant_mla_kernels.py"
              "tests/test_sleep_wake.py")
      sleep_group=$((${#groups[@]} - 1))
      # TEST_GROUPS="0 2" re-runs only those groups (6 = sleep / wake); default all.
      run_groups=${TEST_GROUPS:-"${!groups[*]}"}
      for i in $run_groups; do
        [ "$i" -eq "$sleep_group" ] && continue
        # eval: a group's -k expression keeps its quotes
        eval timeout "${TEST_TIMEOUT:-420}" $PY -m pytest -m gpu -q -rs ${PYTEST_X--x} --durations=5 ${groups[$i]} \
          > "$OUT/pytest_$i.log" 2>&1 &
      done
      wait
      pkill -f -- "-m pytest -m gpu" 2>/dev/null  # what a timed-out pytest left running (compile workers)
      # Sleep / wake alone: its tests read the device's free memory, which the other processes move.
      if [[ " $run_groups " == *" $sleep_group "* ]]; then
        timeout "${TEST_TIMEOUT:-420}" $PY -m pytest -m gpu -q -rs ${PYTEST_X--x} --durations=5 ${groups[$sleep_group]} \
          > "$OUT/pytest_$sleep_group.log" 2>&1
      fi
      for i in $run_groups; do
        grep -E "^(FAILED|ERROR)|Error|^[0-9]+ (passed|failed)|[0-9]+ (passed|failed)" "$OUT/pytest_$i.log" | tail -25
        summary+=("tests[$i]: $(grep -E '[0-9]+ (passed|failed)' "$OUT/pytest_$i.log" | tail -1)")
      done
      ;;
    bench)
      # The next word is a workload list unless it names another section.
      if [ $# -gt 1 ] && ! [[ " $SECTIONS " == *" $2 "* ]]; then WORKLOADS=$2; shift; fi
      for w in ${WORKLOADS//,/ }; do
        timeout "${BENCH_TIMEOUT:-300}" $PY -m bench.rollout --workload "$w" --json "$OUT/bench.jsonl" ${BENCH_ARGS:-} \
          > "$OUT/bench_$w.log" 2>&1
        rc=$?
        tail -4 "$OUT/bench_$w.log" | grep -v "^RESULT" | cut -c1-600
        [ $rc -ne 0 ] && { tail -25 "$OUT/bench_$w.log"; summary+=("$w: FAILED rc=$rc"); }
      done
      ;;
    hf)
      timeout "${HF_TIMEOUT:-240}" $PY -m bench.hf_baseline --workload decode-moe-bs1 --max-new-tokens "${HF_TOKENS:-64}" \
        --json "$OUT/bench.jsonl" > "$OUT/hf.log" 2>&1 || { tail -20 "$OUT/hf.log"; summary+=("hf: FAILED"); }
      ;;
    tune)
      # TUNE_PARTS="mla moe" skips the attention / Qwen3-MoE sweep (default: all three).
      parts=" ${TUNE_PARTS:-attention mla moe} "
      [[ $parts == *" attention "* ]] && timeout "${TUNE_TIMEOUT:-150}" $PY -m bench.kernels --tune "$OUT/tuned.json" 2>&1 \
        | tee "$OUT/tune.log" | tail -12
      [[ $parts == *" mla "* ]] && timeout "${MLA_TUNE_TIMEOUT:-240}" $PY -m bench.mla_kernels --tune "$OUT/tuned.json" ${MLA_TUNE_ARGS:-} 2>&1 \
        | tee "$OUT/tune_mla.log" | tail -6
      [[ $parts == *" moe "* ]] && timeout "${MOE_TUNE_TIMEOUT:-240}" $PY -m bench.moe_tune "$OUT/tuned.json" \
        ${MOE_SHAPES:+--shapes $MOE_SHAPES} 2>&1 | tee "$OUT/tune_moe_shapes.log" | grep -E "^(best|sweep)" | cut -c1-300
      [ -f "$OUT/tuned.json" ] && BENCH_ARGS="${BENCH_ARGS:-} --tuned $OUT/tuned.json" && TUNED_ARG="--tuned $OUT/tuned.json"
      ;;
    profile)
      # profile W: a torch-profiler window (steps PROFILE_STEPS, default 600:603) of workload W.
      w=$2; shift
      timeout "${BENCH_TIMEOUT:-300}" $PY -m bench.rollout --workload "$w" ${BENCH_ARGS:-} \
        --torch-profile "$OUT/profile_$w.txt" --profile-steps "${PROFILE_STEPS:-600:603}" ${PROFILE_STACK:+--profile-stack} \
        > "$OUT/profile_$w.log" 2>&1 || summary+=("profile $w: FAILED")
      head -40 "$OUT/profile_$w.txt" 2>/dev/null | cut -c1-200
      # The device's idle gaps and the host work they wait for (bench/trace_gaps.py); a trace over
      # the 16 MiB a returned file may hold is analysed here and left behind.
      trace="$OUT/profile_$w.trace.json"
      if [ -f "$trace" ]; then
        timeout "${GAPS_TIMEOUT:-180}" $PY -m bench.trace_gaps "$trace" > "$OUT/gaps_$w.txt" 2>&1
        head -60 "$OUT/gaps_$w.txt"
        [ "$(stat -c %s "$trace")" -gt 16000000 ] && mv "$trace" "/tmp/profile_$w.trace.json"
      fi
      ;;
    gemms)
      # the decode step's dense GEMMs and the shared experts folded into the routed ones (bench/decode_gemms.py)
      timeout "${KERNEL_TIMEOUT:-240}" $PY -m bench.decode_gemms ${GEMMS_ARGS:-} --json "$OUT/decode_gemms.json" 2>&1 | tee "$OUT/decode_gemms.log" | tail -30
      ;;
    kernels)
      timeout "${KERNEL_TIMEOUT:-240}" $PY -m bench.kernels 2>&1 | tee "$OUT/kernels.log" | tail -30
      ;;
    mla)
      timeout "${KERNEL_TIMEOUT:-240}" $PY -m bench.mla_kernels ${TUNED_ARG:-} 2>&1 | tee "$OUT/mla_kernels.log" | tail -12
      ;;
    ncu)
      # Nsight Compute on the MLA decode kernels of the bs512 case (stall reasons, occupancy,
      # memory): why the own part reads at 58% of the copy ceiling (BENCHMARKS, session 12).
      if command -v ncu > /dev/null; then
        timeout "${NCU_TIMEOUT:-300}" ncu --kernel-name regex:'_mla_own_kernel|_mla_prefix_kernel|_prefix_(scores|values)_kernel' \
          --launch-skip 6 --launch-count 6 --section SpeedOfLight --section Occupancy --section WarpStateStats \
          --section MemoryWorkloadAnalysis --section SchedulerStats $PY -m bench.mla_kernels ${TUNED_ARG:-} --case bs512 \
          > "$OUT/ncu_mla.log" 2>&1
        grep -E "^  _|Duration|Throughput|Achieved Occupancy|Registers Per|Stall|Warp Cycles|Eligible|Issued" "$OUT/ncu_mla.log" | head -80
      else
        echo "ncu: not on this machine"
      fi
      summary+=("ncu: $OUT/ncu_mla.log")
      ;;
    small)
      timeout "${SMALL_TIMEOUT:-240}" $PY -m bench.small_batch 2>&1 | tee "$OUT/small.log" | tail -60
      ;;
    async)
      for mode in "concurrent grpo-moe" "late-join grpo-moe"; do
        timeout "${ASYNC_TIMEOUT:-300}" $PY -m bench.async_rollout $mode --repeats "${ASYNC_REPEATS:-1}" \
          --json "$OUT/async.jsonl" > "$OUT/async_${mode// /_}.log" 2>&1 || summary+=("async $mode: FAILED")
        grep -E "run:|RESULT" "$OUT/async_${mode// /_}.log" | cut -c1-300
      done
      ;;
    arrival)
      timeout "${ASYNC_TIMEOUT:-300}" $PY -m bench.async_rollout arrival agent-async-moe --repeats 1 \
        --json "$OUT/async.jsonl" > "$OUT/async_arrival.log" 2>&1 || summary+=("arrival: FAILED")
      grep -E "run:|RESULT" "$OUT/async_arrival.log" | cut -c1-300
      ;;
    sleep)
      timeout "${SLEEP_TIMEOUT:-240}" $PY bench/sleep_wake.py --config bench/models/qwen3-30b-a3b/config.json \
        --skip-offload --many 20 --out "$OUT/sleep_wake.json" > "$OUT/sleep_wake.log" 2>&1
      grep -E "cycles|stepwise|variants|per_expert_names.s|fused_v5_names.s|equal|drift|error" "$OUT/sleep_wake.log" | cut -c1-900
      ;;
    invariant)
      # The GEMM sweep first (every tile / TMA / split-K / persistent candidate at Qwen3-8B's
      # shapes; the workload-weighted best per weight goes to gemm_tuned.json and is printed as
      # invariant_gemm.MEASURED lines), then each workload normal vs invariant with those tiles.
      IW="grpo-moe grpo-dense-8b"
      if [ $# -gt 1 ] && ! [[ " $SECTIONS " == *" $2 "* ]]; then IW=${2//,/ }; shift; fi
      timeout "${SWEEP_TIMEOUT:-420}" $PY -m bench.batch_invariant --gemm grpo-dense-8b --sweep --tuned "$OUT/gemm_tuned.json" \
        > "$OUT/invariant_gemm.log" 2>&1 || summary+=("invariant gemm: FAILED")
      grep -vE "^RESULT" "$OUT/invariant_gemm.log" | cut -c1-400 | tail -30
      TUNED_GEMM=(); [ -f "$OUT/gemm_tuned.json" ] && TUNED_GEMM=(--tuned "$OUT/gemm_tuned.json")
      for w in $IW; do
        timeout "${INVARIANT_TIMEOUT:-420}" $PY -m bench.batch_invariant "$w" --check "${TUNED_GEMM[@]}" \
          --json "$OUT/invariant.jsonl" > "$OUT/invariant_$w.log" 2>&1 || summary+=("invariant $w: FAILED")
        grep -vE "^RESULT" "$OUT/invariant_$w.log" | tail -4
      done
      ;;
    ipc)
      timeout "${IPC_TIMEOUT:-300}" $PY -m bench.ipc_weights --config bench/models/qwen3-30b-a3b/config.json \
        --out "$OUT/ipc_weights.json" 2>&1 | tee "$OUT/ipc_weights.log" | tail -30
      ;;
  esac
  shift
done
echo "==== summary ===="
for s in "${summary[@]}"; do echo "$s"; done
if [ -f "$OUT/bench.jsonl" ]; then
  $PY - "$OUT/bench.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'workload':<18} {'engine':<22} {'tokens':>8} {'sec':>8} {'tok/s':>10} {'of limit':>9}")
for r in rows:
    frac = r.get("fraction_of_limit")
    print(f"{r['workload']:<18} {r['engine']:<22} {r['generated_tokens']:>8} {r['seconds']:>8.2f} {r['tok_per_s']:>10,.1f} "
          f"{(f'{frac:.1%}' if frac is not None else '-'):>9}")
PYEOF
fi
