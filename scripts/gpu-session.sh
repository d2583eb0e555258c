#!/usr/bin/env bash
# The whole GPU suite as ONE command for a lent GPU machine with a short device budget (the
# project's `run` tool: one command at a time, about eight files brought back per call):
#
#   bash scripts/gpu-session.sh [PACK_DIR (default .gpu-suite)]
#
# runs, each under its own time budget (seconds; 0 skips the phase), the phases of
# scripts/gpu-suite-remote.sh with their outputs in separate folders:
#   SEGATTN_SESSION_WGMMA_S   (default 0)    wgmma/    first: the wgmma probe, both Hopper kernels'
#                                                      tests and their timing at the target shapes
#   SEGATTN_SESSION_TEST_S    (default 250)  test/     property tests on the GPU, the sanitizers
#   SEGATTN_SESSION_BENCH_S   (default 150)  bench/    our benchmark, PINE, mass, the peers
#   SEGATTN_SESSION_EXTRA_S   (default 0)    extra/    further attention shapes and their peers only
#                                                      (SEGATTN_SESSION_EXTRA_FILTER, e.g. "L8192 B2 H32/8")
#   SEGATTN_SESSION_PROFILE_S (default 120)  profile/  ncu (and nsys where installed)
# The bench phase's shape filters are the suite's own (SEGATTN_BENCH_FILTER,
# SEGATTN_PEERS_FILTER; this script defaults them to the target shapes, "H16/16 D128" and
# "L8192 B2 H16/16 D128"). Everything, with the per-test and sanitizer logs, is packed into
# $OUT/gpu-session.tgz (one file) after each phase, so a call cut short still returns what ran.
# A pack built with SEGATTN_SUITE_BASELINE="REV..." (scripts/gpu-suite.sh) also times each REV's benchmark
# in the bench phase: before / after on the same machine. The phases' summaries go to stdout
# (the call's output tail). The budgets add up to the call's
# time: pass the run a timeout of their sum plus a minute.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PACK="${1:-.gpu-suite}"
RESULT="${OUT:-${SEGATTN_SUITE_OUT:-/tmp/segattn-gpu-out}}"
STAGE="$(mktemp -d)"
mkdir -p "$RESULT"
status=0

pack_results() {
  # The suite's work folder holds the per-binary test and sanitizer logs.
  local work
  for work in "${TMPDIR:-/tmp}"/segattn-gpu-suite-*; do
    [ -d "$work" ] && cp "$work"/*.log "$STAGE/" 2>/dev/null
  done
  tar czf "$RESULT/gpu-session.tgz.part" -C "$STAGE" . && mv "$RESULT/gpu-session.tgz.part" "$RESULT/gpu-session.tgz"
}

phase() {
  local name=$1 seconds=$2
  shift 2
  if [ "$seconds" -le 0 ]; then
    echo "== $name: skipped (budget 0)"
    return 0
  fi
  mkdir -p "$STAGE/$name"
  echo "== $name (budget $seconds s)"
  env "$@" OUT="$STAGE/$name" SEGATTN_SUITE_BUDGET_S="$seconds" \
    bash scripts/gpu-suite-remote.sh "${PHASE_OF[$name]}" "$PACK" >"$STAGE/$name/console.log" 2>&1
  local rc=$?
  [ "$rc" = 0 ] || status=1
  cut -c1-300 "$STAGE/$name/summary.md" 2>/dev/null
  pack_results
}

declare -A PHASE_OF=([wgmma]=wgmma [test]=test [bench]=bench [extra]=bench [profile]=profile)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$STAGE/card.txt" 2>&1
phase wgmma "${SEGATTN_SESSION_WGMMA_S:-0}"
phase test "${SEGATTN_SESSION_TEST_S:-250}" SEGATTN_GPU_CASES="${SEGATTN_GPU_CASES:-100}"
phase bench "${SEGATTN_SESSION_BENCH_S:-150}" \
  SEGATTN_BENCH_FILTER="${SEGATTN_BENCH_FILTER-H16/16 D128}" \
  SEGATTN_PEERS_FILTER="${SEGATTN_PEERS_FILTER-L8192 B2 H16/16 D128}"
if [ -n "${SEGATTN_SESSION_EXTRA_FILTER:-}" ]; then
  phase extra "${SEGATTN_SESSION_EXTRA_S:-0}" SEGATTN_BENCH_SHAPES_ONLY=1 \
    SEGATTN_BENCH_FILTER="$SEGATTN_SESSION_EXTRA_FILTER" SEGATTN_PEERS_FILTER="$SEGATTN_SESSION_EXTRA_FILTER"
fi
phase profile "${SEGATTN_SESSION_PROFILE_S:-120}"
echo "== packed: $RESULT/gpu-session.tgz ($(du -h "$RESULT/gpu-session.tgz" | cut -f1)), status $status"
rm -rf "$STAGE"
exit "$status"
