#!/usr/bin/env bash
# A / B of a change on one machine (instances of the lent H200 differ by ~3% run to run, more
# than most changes: session 18), in two steps:
#
#   here, before the device call:   scripts/ab.sh --save COMMIT FILE...
#       writes each FILE as it was at COMMIT under ab_old/ (untracked, so the device gets it)
#   on the device:                  scripts/ab.sh CMD [ROUNDS]
#       runs CMD on the tree as it is (B) and with ab_old/'s files in place (A), alternating
#       B A B A ... ROUNDS times each (default 2), the tree restored after; prints the lines of
#       each log matching AB_GREP (default: bench/rollout.py's and bench/mla_kernels.py's results).
#
# Logs ab_{A,B}_{i}.log in $OUT (or ./gpu_out). Delete ab_old/ once measured.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "${1:-}" = "--save" ]; then
  [ $# -ge 3 ] || { echo "usage: scripts/ab.sh --save COMMIT FILE..." >&2; exit 2; }
  commit=$2
  shift 2
  for f in "$@"; do
    mkdir -p "ab_old/$(dirname "$f")"
    git show "$commit:$f" > "ab_old/$f" || exit 1
  done
  echo "saved $# file(s) of $commit under ab_old/"
  exit 0
fi
[ $# -ge 1 ] || { echo "usage: scripts/ab.sh CMD [ROUNDS] | --save COMMIT FILE..." >&2; exit 2; }
[ -d ab_old ] || { echo "ab.sh: no ab_old/ (scripts/ab.sh --save COMMIT FILE... first)" >&2; exit 2; }
cmd=$1
rounds=${2:-2}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
pattern=${AB_GREP:-"tokens in|bs512"}
mapfile -t files < <(cd ab_old && find . -type f | sed 's|^\./||')
backup=$(mktemp -d)
for f in "${files[@]}"; do
  mkdir -p "$backup/$(dirname "$f")"
  cp "$f" "$backup/$f"
done
use() {  # use A | B: put that side's files in place
  local src=$backup
  [ "$1" = A ] && src=ab_old
  for f in "${files[@]}"; do cp "$src/$f" "$f"; done
}
trap 'use B' EXIT
for ((i = 1; i <= rounds; i++)); do
  for side in B A; do
    use "$side"
    (eval "$cmd") > "$OUT/ab_${side}_$i.log" 2>&1
    rc=$?
    echo "[$side $i, rc $rc] $(grep -E "$pattern" "$OUT/ab_${side}_$i.log" | tail -3 | cut -c1-300)"
  done
done
