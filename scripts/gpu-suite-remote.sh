#!/usr/bin/env bash
# The one-command GPU suite, THERE half: runs on a GPU machine (H100 / H200, driver >= 580 = CUDA
# 13.0, a Python with torch cu130; no Rust, no network needed) from the repository root, with the
# pack that scripts/gpu-suite.sh built here:
#
#   bash scripts/gpu-suite-remote.sh [wgmma|test|bench|all|profile] [PACK_DIR (default .gpu-suite)]
#
#   wgmma  (0) a first look at the Hopper (wgmma) kernels, about 3 minutes: the probe, then both
#              kernels against the reference and timed at the target shapes with the mma.sync
#              kernels and SDPA's flash / cuDNN backends -> probe.log, wgmma-bench.txt,
#              wgmma-peers.txt (not part of "all"; for a change to the wgmma kernels)
#   test   (1) every GPU test binary of the pack (tests/gpu_*.rs: the kernels' property tests on
#              the GPU against the f64 reference; SEGATTN_REQUIRE_GPU=1: no silent skip),
#              (2) compute-sanitizer memcheck, racecheck, synccheck and initcheck on small cases of
#              the forward kernel (tests/gpu_fwd.rs; our kernels only)
#   bench  (3) our benchmark (examples/gpu_bench.rs) and bench/peers.py (SDPA flash / cuDNN / math,
#              FlexAttention) on identical shapes and masks, (4) the results table
#   all    both
#   profile (5) Nsight Compute (ncu, hardware counters; Firecracker machines), what is open first:
#              the duration of every kernel of steady PINE decode steps (gpu_bench
#              --pine-decode-trace; also each packed baseline's), the mass kernel's pass after
#              the forward beyond 64 segments and the standalone one (documents100), the decode
#              importance; then one launch of each kernel the performance targets depend on: the
#              forward kernel at causal, documents8 and pine, L 8k, D 128 (causal also with the
#              mma.sync kernel on a Hopper GPU), the mass kernel and the fused forward (gpu_bench --mass), the rope
#              kernel (gpu_bench --pine): throughput, occupancy, warp stall reasons ->
#              $OUT/profile.txt (not part of "all"; give it about 150 s)
#
# Writes under $OUT (or $SEGATTN_SUITE_OUT, default /tmp/segattn-gpu-out): summary.md, tests.log,
# sanitizer.log, segattn.jsonl (plain attention's kernels: on an H100 / H200 the 64-row wgmma
# one), mma-sync.txt and segattn-mma-sync.jsonl (the mma.sync kernels, SEGATTN_FWD_HOPPER=0: what
# other GPUs run; RESULTS-mma-sync.md their table), hopper128.txt (the 128-row wgmma kernel),
# narrow.txt (the 64-row mma.sync kernel for every mask, on gpu_bench's shapes), wide.txt (the wide
# mma.sync kernel for every mask, L 8k D 128), wide32.txt (the same with 32-key tiles at D 128),
# pine.md (pine-mma-sync.md: the mma.sync kernels on an H100 / H200),
# mass.md (mass-mma-sync.md: the mma.sync kernels on an H100 / H200), pine-wide64.md, mass-wide.md
# and mass-wide64.md (the mass kernel's wide rows, with 32- or 64-key tiles), backward.md (the
# attention's backward pass: gpu_bench --backward), (with baselines
# in the pack, for each revision REV: baseline-REV.txt, baseline-REV-pine.md,
# baseline-REV-mass.md; and ours-again.txt, the target shapes once more after them), peers.jsonl,
# RESULTS.md (the table, with card, driver, date and commit: copy it to bench/RESULTS.md). Each
# step runs under a time budget so that a partial run still writes what it measured:
# SEGATTN_SUITE_BUDGET_S (default 570 s per invocation).
#
# Environment: SEGATTN_GPU_CASES (random property cases, default: each test file's), SEGATTN_PEERS_FILTER
# (peers.py shape filter, a substring of the shape label; default "H16/16 D128": 30 shapes, 5
# FlexAttention compilations, fits one 10-minute call next to our benchmark; "H32/8 D128", "D64",
# "D256" (head dim 256, L 8k) ... in further calls; "" = all 126), SEGATTN_BENCH_FILTER (gpu_bench shape filter, default all), SEGATTN_CUDA_LIBS
# (directory with libcublas / libcurand / libnvrtc 13; default: the Python env's nvidia/cu13/lib),
# PYTHON (default python3), SEGATTN_BENCH_SHAPES_ONLY=1 (bench: the attention shapes and their
# peers only, for a further call with other filters), SEGATTN_SUITE_SMOKE=1 (tiny shapes, 2k tokens: a dry run of the
# bench half).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PHASE="${1:-all}"
PACK="${2:-.gpu-suite}"
OUTDIR="${OUT:-${SEGATTN_SUITE_OUT:-/tmp/segattn-gpu-out}}"
BUDGET="${SEGATTN_SUITE_BUDGET_S:-570}"
PYTHON="${PYTHON:-python3}"
# The shapes of issue 4's targets (a gpu_bench / peers.py label filter): L 8k, H 16 / 16, D 128.
TARGET="L8192 B2 H16/16 D128"
START=$SECONDS
mkdir -p "$OUTDIR"
SUMMARY="$OUTDIR/summary.md"
: >"$SUMMARY"

log() { echo "gpu-suite-remote [$((SECONDS - START)) s]: $*"; }
note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - (SECONDS - START))); }
# Runs "$@" with at most min($1, time left - reserve) seconds.
budgeted() {
  local want=$1 reserve=$2
  shift 2
  local t
  t=$(left)
  t=$((t - reserve))
  [ "$t" -gt "$want" ] && t=$want
  if [ "$t" -lt 10 ]; then
    log "no time left for: $*"
    return 124
  fi
  timeout --signal=INT --kill-after=10 "$t" "$@"
}

case "$PHASE" in wgmma | test | bench | all | profile) ;; *)
  echo "usage: $0 [wgmma|test|bench|all|profile] [PACK_DIR]" >&2
  exit 2
  ;;
esac
[ -f "$PACK/MANIFEST" ] || { echo "no $PACK/MANIFEST: build the pack with scripts/gpu-suite.sh and carry it" >&2; exit 2; }
# Per pack: results of earlier calls with the same pack on this machine are merged into the table.
WORK="${TMPDIR:-/tmp}/segattn-gpu-suite-$(sha256sum "$PACK/MANIFEST" | cut -c1-12)"
mkdir -p "$WORK"

# --- setup: binaries, libraries, machine ---------------------------------------------------
read -r -a GPU_TESTS <<<"$(sed -n 's/^tests=//p' "$PACK/MANIFEST")"
# A rerun of part of the suite: SEGATTN_SUITE_TESTS (test binaries, default every one packed),
# SEGATTN_SUITE_SANITIZERS (default all four tools; empty: none), SEGATTN_SUITE_VARIANTS=0 (skip the kernel
# variants' reruns).
read -r -a SAN_TOOLS <<<"${SEGATTN_SUITE_SANITIZERS-memcheck racecheck synccheck initcheck}"
for name in "${GPU_TESTS[@]}" gpu_bench; do
  xz -dc "$PACK/$name.xz" >"$WORK/$name" || { echo "cannot unpack $PACK/$name.xz" >&2; exit 2; }
  chmod +x "$WORK/$name"
done
[ -n "${SEGATTN_SUITE_TESTS:-}" ] && read -r -a GPU_TESTS <<<"$SEGATTN_SUITE_TESTS"
# Baseline revisions' benchmarks (scripts/gpu-suite.sh with SEGATTN_SUITE_BASELINE), if packed.
read -r -a BASELINE_REVS <<<"$(sed -n 's/^baselines=//p' "$PACK/MANIFEST")"
for rev in "${BASELINE_REVS[@]}"; do
  xz -dc "$PACK/gpu_bench_base_$rev.xz" >"$WORK/gpu_bench_base_$rev" && chmod +x "$WORK/gpu_bench_base_$rev"
done
if [ -z "${SEGATTN_CUDA_LIBS:-}" ]; then
  SEGATTN_CUDA_LIBS="$("$PYTHON" - <<'EOF' 2>/dev/null
import os
try:
    import nvidia
    for p in nvidia.__path__:
        d = os.path.join(p, "cu13", "lib")
        if os.path.isdir(d):
            print(d)
            break
except ImportError:
    pass
EOF
)"
fi
export LD_LIBRARY_PATH="${SEGATTN_CUDA_LIBS:+$SEGATTN_CUDA_LIBS:}${LD_LIBRARY_PATH:-}"
note "# segattn GPU suite ($PHASE)"
note ""
note "- pack: $(grep -E '^(commit|built|nvcc)=' "$PACK/MANIFEST" | tr '\n' ' ')"
note "- card: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
note "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); CUDA libraries: ${SEGATTN_CUDA_LIBS:-<none found>}"
missing="$(ldd "$WORK/gpu_bench" | grep 'not found' || true)"
if [ -n "$missing" ]; then
  note "- ERROR: libraries not found: $missing (set SEGATTN_CUDA_LIBS)"
  exit 1
fi

status=0
# --- (0) wgmma: the first look at the Hopper kernels, ~3 minutes -----------------------------
# For the first call of a session after a change to the wgmma kernels (bench/NOTES.md CUDA 34-38):
# the probe of the emulator's reading of wgmma on the card; if it passes, both wgmma kernels
# against the reference (a few cases of every mask), then the target shape (causal and the other
# masks, L 8k, D 128) on the default (the 64-row wgmma kernel), the mma.sync kernels
# (SEGATTN_FWD_HOPPER=0), the 128-row wgmma kernel (SEGATTN_FWD_WIDE=1) and the peers' SDPA flash
# / cuDNN there. A failing probe ends the phase: its message names the descriptor fix, for a
# rebuilt pack and another call.
if [ "$PHASE" = wgmma ]; then
  : >"$OUTDIR/tests.log"
  log "(0) the wgmma probe"
  SEGATTN_REQUIRE_GPU=1 budgeted 60 0 "$WORK/gpu_fwd" --test-threads 1 wgmma_reading_matches_the_card \
    --nocapture >"$OUTDIR/probe.log" 2>&1
  rc=$?
  tail -30 "$OUTDIR/probe.log"
  note "- (0) wgmma probe: $(grep -E '^test result' "$OUTDIR/probe.log" | tail -1 || echo 'no result line') (exit $rc)"
  if [ "$rc" != 0 ]; then
    note "- (0) the probe failed: the wgmma kernels are not run (probe.log names the fix)"
    exit 1
  fi
  for wide in 0 1; do
    SEGATTN_FWD_WIDE=$wide SEGATTN_FWD_HOPPER=1 SEGATTN_REQUIRE_GPU=1 SEGATTN_GPU_CASES=20 budgeted 40 0 \
      "$WORK/gpu_fwd" --test-threads "$(nproc)" gpu_kernel_matches_reference every_mask_kind_every_instantiation \
      tile_multiples_and_tiny_lengths fully_masked_rows >"$WORK/wgmma-tests-$wide.log" 2>&1
    rc=$?
    { echo "=== gpu_fwd, SEGATTN_FWD_HOPPER=1 SEGATTN_FWD_WIDE=$wide (exit $rc) ==="; cat "$WORK/wgmma-tests-$wide.log"; } >>"$OUTDIR/tests.log"
    tail -15 "$WORK/wgmma-tests-$wide.log"
    note "- (0) gpu_fwd on the $([ "$wide" = 1 ] && echo 128 || echo 64)-row wgmma kernel: $(grep -E '^test result' "$WORK/wgmma-tests-$wide.log" | tail -1 || echo 'no result line') (exit $rc)"
    [ "$rc" = 0 ] || status=1
  done
  [ "$status" = 0 ] || { note "- (0) a wgmma kernel failed its tests: not timed"; exit 1; }
  # In order of what a cut budget should keep: the default (the 64-row wgmma kernel), the
  # mma.sync kernels, the peers, then the 128-row wgmma kernel.
  wgmma_bench() {
    local run=$1
    local run_env=()
    [ "$run" = default ] || read -r -a run_env <<<"$run"
    log "(0) the target shapes: $run"
    env "${run_env[@]}" timeout "$(( $(left) > 40 ? 40 : $(left) ))" "$WORK/gpu_bench" --filter "$TARGET" \
      2>&1 | tee -a "$OUTDIR/wgmma-bench.txt"
    note "- (0) gpu_bench at the targets, $run: exit ${PIPESTATUS[0]} (wgmma-bench.txt)"
  }
  wgmma_bench default
  wgmma_bench "SEGATTN_FWD_HOPPER=0"
  "$WORK/gpu_bench" --export-masks "$WORK/masks.json" || exit 1
  PYTHONUNBUFFERED=1 budgeted 60 0 "$PYTHON" bench/peers.py --masks "$WORK/masks.json" --filter "$TARGET" \
    --impls sdpa_flash,sdpa_cudnn 2>&1 | grep -v '^{' | tee "$OUTDIR/wgmma-peers.txt"
  note "- (0) peers.py (SDPA flash, cuDNN) at the targets: exit ${PIPESTATUS[0]} (wgmma-peers.txt)"
  wgmma_bench "SEGATTN_FWD_WIDE=1"
  exit "$status"
fi

# --- (1) + (2): tests and sanitizers -------------------------------------------------------
if [ "$PHASE" = test ] || [ "$PHASE" = all ]; then
  : >"$OUTDIR/tests.log"
  per_test=$((300 / ${#GPU_TESTS[@]}))
  # Time kept for the sanitizers: 250 s, or 2/5 of a smaller budget (tests come first).
  san_reserve=$((BUDGET * 2 / 5))
  [ "$san_reserve" -gt 250 ] && san_reserve=250
  for name in "${GPU_TESTS[@]}"; do
    log "(1) property tests on the GPU: $name"
    t=$SECONDS
    SEGATTN_REQUIRE_GPU=1 budgeted "$per_test" "$san_reserve" "$WORK/$name" --test-threads "$(nproc)" >"$WORK/$name.log" 2>&1
    rc=$?
    { echo "=== $name (exit $rc) ==="; cat "$WORK/$name.log"; } >>"$OUTDIR/tests.log"
    tail -25 "$WORK/$name.log"
    note "- (1) $name: $(grep -E '^test result' "$WORK/$name.log" | tail -1 || echo 'no result line') (exit $rc, $((SECONDS - t)) s)"
    [ "$rc" = 0 ] || status=1
  done
  # The other kernel variants (other registers and spills, the same source) against the reference
  # too, a few cases each: the wide mma.sync kernel on every mask and length (SEGATTN_FWD_HOPPER=0
  # SEGATTN_FWD_WIDE=1: 64-key tiles at D = 128), the same with its 32-key tiles
  # (SEGATTN_FWD_WIDE_KEYS=32), and the mass kernel with three blocks per SM (SEGATTN_SCORES_BLOCKS=3).
  variant_keys=(64 32)
  [ "${SEGATTN_SUITE_VARIANTS:-1}" = 0 ] && variant_keys=()
  # First, on an H100 / H200 (where plain attention runs on the wgmma kernels, the 64-row one by
  # default; bench/NOTES.md CUDA 34-38): the mma.sync kernels as their rule picks them
  # (SEGATTN_FWD_HOPPER=0: what every other GPU runs), then the 128-row wgmma kernel forced
  # (SEGATTN_FWD_WIDE=1: segattn_fwd_hopper128_*), on every mask and length.
  if [ "${SEGATTN_SUITE_VARIANTS:-1}" != 0 ]; then
    for run in hopper0 wide1; do
      run_env=(SEGATTN_FWD_HOPPER=0)
      [ "$run" = wide1 ] && run_env=(SEGATTN_FWD_WIDE=1)
      env "${run_env[@]}" SEGATTN_REQUIRE_GPU=1 SEGATTN_GPU_CASES=45 budgeted 70 "$san_reserve" \
        "$WORK/gpu_fwd" --test-threads "$(nproc)" gpu_kernel_matches_reference every_mask_kind_every_instantiation \
        tile_multiples_and_tiny_lengths fully_masked_rows large_shapes_match_cpu_path deterministic \
        >"$WORK/gpu_fwd_$run.log" 2>&1
      rc=$?
      { echo "=== gpu_fwd, ${run_env[*]} (exit $rc) ==="; cat "$WORK/gpu_fwd_$run.log"; } >>"$OUTDIR/tests.log"
      tail -25 "$WORK/gpu_fwd_$run.log"
      what='the mma.sync kernels'
      [ "$run" = wide1 ] && what='the 128-row wgmma kernel'
      note "- (1) gpu_fwd (${run_env[*]}: $what on every mask): $(grep -E '^test result' "$WORK/gpu_fwd_$run.log" | tail -1 || echo 'no result line') (exit $rc)"
      [ "$rc" = 0 ] || status=1
    done
  fi
  for keys in "${variant_keys[@]}"; do
    SEGATTN_FWD_HOPPER=0 SEGATTN_FWD_WIDE=1 SEGATTN_FWD_WIDE_KEYS=$keys SEGATTN_REQUIRE_GPU=1 SEGATTN_GPU_CASES=40 \
      budgeted 90 "$san_reserve" \
      "$WORK/gpu_fwd" --test-threads "$(nproc)" gpu_kernel_matches_reference every_mask_kind_every_instantiation \
      tile_multiples_and_tiny_lengths fully_masked_rows >"$WORK/gpu_fwd_wide$keys.log" 2>&1
    rc=$?
    { echo "=== gpu_fwd, SEGATTN_FWD_WIDE=1 SEGATTN_FWD_WIDE_KEYS=$keys (exit $rc) ==="; cat "$WORK/gpu_fwd_wide$keys.log"; } >>"$OUTDIR/tests.log"
    note "- (1) gpu_fwd (wide kernel on every mask, $keys-key tiles at D 128): $(grep -E '^test result' "$WORK/gpu_fwd_wide$keys.log" | tail -1 || echo 'no result line') (exit $rc)"
    [ "$rc" = 0 ] || status=1
  done
  if [ -x "$WORK/gpu_scores" ] && [ "${SEGATTN_SUITE_VARIANTS:-1}" != 0 ]; then
    # The mma.sync mass kernels as every other GPU runs them (on an H100 / H200 the one pass and
    # the fused mass take the wgmma kernels by default, bench/NOTES.md CUDA 39, 42): the four-block
    # kernel and the 64-row fused mass, then the three-block kernel.
    for blocks in 4 3; do
      SEGATTN_FWD_HOPPER=0 SEGATTN_SCORES_BLOCKS=$blocks SEGATTN_REQUIRE_GPU=1 SEGATTN_GPU_CASES=20 \
        budgeted 60 "$san_reserve" "$WORK/gpu_scores" --test-threads "$(nproc)" gpu_scores_match_reference \
        gpu_fused_mass_matches_reference >"$WORK/gpu_scores_b$blocks.log" 2>&1
      rc=$?
      { echo "=== gpu_scores, SEGATTN_FWD_HOPPER=0 SEGATTN_SCORES_BLOCKS=$blocks (exit $rc) ==="; cat "$WORK/gpu_scores_b$blocks.log"; } >>"$OUTDIR/tests.log"
      note "- (1) gpu_scores (mma.sync kernels, $blocks-block mass kernel): $(grep -E '^test result' "$WORK/gpu_scores_b$blocks.log" | tail -1 || echo 'no result line') (exit $rc)"
      [ "$rc" = 0 ] || status=1
    done
    # PINE on the mma.sync rope and mass kernels (on an H100 / H200 the wgmma ones by default).
    if [ -x "$WORK/gpu_pine" ]; then
      SEGATTN_FWD_HOPPER=0 SEGATTN_REQUIRE_GPU=1 SEGATTN_GPU_CASES=6 budgeted 40 "$san_reserve" \
        "$WORK/gpu_pine" --test-threads "$(nproc)" --skip decode_steps_from_several_threads >"$WORK/gpu_pine_mma.log" 2>&1
      rc=$?
      { echo "=== gpu_pine, SEGATTN_FWD_HOPPER=0 (exit $rc) ==="; cat "$WORK/gpu_pine_mma.log"; } >>"$OUTDIR/tests.log"
      note "- (1) gpu_pine (mma.sync kernels): $(grep -E '^test result' "$WORK/gpu_pine_mma.log" | tail -1 || echo 'no result line') (exit $rc)"
      [ "$rc" = 0 ] || status=1
    fi
    # The attention's fused mass in the 128 x 64 kernel (segattn_fwd_wide64_mass_*: the rows' sums
    # in shared memory) and the mass kernel's 64-key wide tiles (segattn_scores_wide64_*, opt-in),
    # which small shapes reach only with the wide kernels forced.
    SEGATTN_FWD_HOPPER=0 SEGATTN_FWD_WIDE=1 SEGATTN_SCORES_WIDE_KEYS=64 SEGATTN_REQUIRE_GPU=1 SEGATTN_GPU_CASES=60 \
      budgeted 60 "$san_reserve" "$WORK/gpu_scores" --test-threads "$(nproc)" gpu_fused_mass_matches_reference \
      gpu_scores_match_reference >"$WORK/gpu_scores_wide.log" 2>&1
    rc=$?
    { echo "=== gpu_scores, SEGATTN_FWD_HOPPER=0 SEGATTN_FWD_WIDE=1 SEGATTN_SCORES_WIDE_KEYS=64 (exit $rc) ==="; cat "$WORK/gpu_scores_wide.log"; } >>"$OUTDIR/tests.log"
    note "- (1) gpu_scores (wide kernels forced: fused mass in the 128 x 64 kernel, mass kernel's 64-key tiles): $(grep -E '^test result' "$WORK/gpu_scores_wide.log" | tail -1 || echo 'no result line') (exit $rc)"
    [ "$rc" = 0 ] || status=1
  fi

  log "(2) compute-sanitizer on small cases"
  SAN="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1 || true)"
  : >"$OUTDIR/sanitizer.log"
  if [ -z "$SAN" ]; then
    note "- (2) compute-sanitizer: NOT FOUND"
    status=1
  else
    # (gradients_match_reference: the fused backward kernel.)
    small=(tile_multiples_and_tiny_lengths fully_masked_rows empty_inputs misaligned_views gpu_kernel_matches_reference
      gradients_match_reference)
    for tool in "${SAN_TOOLS[@]}"; do
      t=$SECONDS
      # Our kernels only, except initcheck: it tracks the writes of instrumented kernels alone, so
      # with the filter the outputs of candle's copy / cast kernels read as uninitialised (the
      # 2026-11-26 findings in empty_inputs, misaligned_views and the fused mass test; clean without).
      kn=(--kernel-name kns=segattn_)
      [ "$tool" = initcheck ] && kn=()
      # Small cases only (the sanitizers slow kernels down 10-100x); our kernels only.
      SEGATTN_REQUIRE_GPU=1 SEGATTN_GPU_CASES=8 \
        budgeted 60 15 "$SAN" --tool "$tool" --error-exitcode 99 "${kn[@]}" \
        "$WORK/gpu_fwd" --test-threads 1 "${small[@]}" >"$WORK/san-$tool.log" 2>&1
      rc=$?
      # PINE (the rope kernels, the shifts kernel, split-K and its merge) and the per-segment mass
      # (the mass kernel, the fused forward variant, the LSE path): every segattn_ kernel.
      # (gpu_scores without its 2500-segment case, too slow under the sanitizers.)
      # (gpu_pine without its four-thread test: the sanitizers serialise it past their budget,
      # and it launches the kernels the other PINE tests check.)
      for extra in "gpu_pine --skip decode_steps_from_several_threads" "gpu_scores gpu_scores_match_reference gpu_fused_mass_matches_reference gpu_errors"; do
        read -r -a run <<<"$extra"
        [ -x "$WORK/${run[0]}" ] || continue
        SEGATTN_REQUIRE_GPU=1 SEGATTN_GPU_CASES=4 \
          budgeted 60 15 "$SAN" --tool "$tool" --error-exitcode 99 "${kn[@]}" \
          "$WORK/${run[0]}" --test-threads 1 "${run[@]:1}" >>"$WORK/san-$tool.log" 2>&1
        rc2=$?
        [ "$rc" = 0 ] && rc=$rc2
      done
      # On an H100 / H200 the run above was on the 64-row wgmma kernel: the mma.sync kernels
      # (SEGATTN_FWD_HOPPER=0), then the 128-row wgmma kernel (SEGATTN_FWD_WIDE=1).
      for run in SEGATTN_FWD_HOPPER=0 SEGATTN_FWD_WIDE=1; do
        env "$run" SEGATTN_REQUIRE_GPU=1 SEGATTN_GPU_CASES=4 \
          budgeted 45 15 "$SAN" --tool "$tool" --error-exitcode 99 "${kn[@]}" \
          "$WORK/gpu_fwd" --test-threads 1 tile_multiples_and_tiny_lengths fully_masked_rows gpu_kernel_matches_reference \
          >>"$WORK/san-$tool.log" 2>&1
        rc2=$?
        [ "$rc" = 0 ] && rc=$rc2
      done
      # The fused mass in the 128 x 64 kernel (its rows' sums in shared memory) and the mass
      # kernel's 64-key wide tiles: the wide kernels forced, as small shapes do not reach them.
      if [ -x "$WORK/gpu_scores" ]; then
        SEGATTN_FWD_HOPPER=0 SEGATTN_FWD_WIDE=1 SEGATTN_SCORES_WIDE_KEYS=64 SEGATTN_REQUIRE_GPU=1 SEGATTN_GPU_CASES=4 \
          budgeted 60 15 "$SAN" --tool "$tool" --error-exitcode 99 "${kn[@]}" \
          "$WORK/gpu_scores" --test-threads 1 gpu_fused_mass_matches_reference gpu_scores_match_reference \
          >>"$WORK/san-$tool.log" 2>&1
        rc2=$?
        [ "$rc" = 0 ] && rc=$rc2
      fi
      { echo "=== $tool (exit $rc) ==="; cat "$WORK/san-$tool.log"; } >>"$OUTDIR/sanitizer.log"
      summary_line="$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|^test result' "$WORK/san-$tool.log" | tr '\n' ' ')"
      if grep -q 'Device not supported' "$WORK/san-$tool.log"; then
        # compute-sanitizer refuses the device under gVisor (works on Firecracker machines).
        note "- (2) $tool: NOT RUN: compute-sanitizer does not support this machine's device (gVisor?)"
        status=1
        break
      fi
      note "- (2) $tool: exit $rc, $((SECONDS - t)) s: ${summary_line:-no summary}"
      [ "$rc" = 0 ] || status=1
    done
  fi
fi

# --- (3) + (4): benchmarks and the table ----------------------------------------------------
if [ "$PHASE" = bench ] || [ "$PHASE" = all ]; then
  smoke=()
  [ "${SEGATTN_SUITE_SMOKE:-0}" = 1 ] && smoke=(--smoke)
  log "(3) shapes: ours and the peers' must be the same list"
  "$WORK/gpu_bench" --list "${smoke[@]}" >"$WORK/shapes-ours.txt"
  "$PYTHON" bench/peers.py --list "${smoke[@]}" >"$WORK/shapes-peers.txt"
  if ! diff -q "$WORK/shapes-ours.txt" "$WORK/shapes-peers.txt" >/dev/null; then
    note "- ERROR: gpu_bench and peers.py shape lists differ"
    diff "$WORK/shapes-ours.txt" "$WORK/shapes-peers.txt" | head
    exit 1
  fi
  "$WORK/gpu_bench" --export-masks "$WORK/masks.json" "${smoke[@]}" || exit 1

  log "(3) our benchmark"
  t=$SECONDS
  bench_filter=()
  [ -n "${SEGATTN_BENCH_FILTER:-}" ] && bench_filter=(--filter "$SEGATTN_BENCH_FILTER")
  budgeted 200 60 "$WORK/gpu_bench" --json "$OUTDIR/segattn.jsonl" "${smoke[@]}" "${bench_filter[@]}" 2>&1 | tee "$WORK/bench.log"
  rc=${PIPESTATUS[0]}
  note "- (3) gpu_bench: exit $rc, $(wc -l <"$OUTDIR/segattn.jsonl" 2>/dev/null || echo 0) shapes, $((SECONDS - t)) s"
  [ "$rc" = 0 ] || status=1

  # On an H100 / H200 the default is the 64-row wgmma kernel: the mma.sync kernels on every shape
  # too (SEGATTN_FWD_HOPPER=0: their rule's choice, named in the kernel column; what other GPUs
  # run), then the 128-row wgmma kernel (SEGATTN_FWD_WIDE=1), to compare one warpgroup a block
  # with two.
  log "(3) the mma.sync kernels (SEGATTN_FWD_HOPPER=0) on the same shapes"
  SEGATTN_FWD_HOPPER=0 budgeted 90 60 "$WORK/gpu_bench" --json "$OUTDIR/segattn-mma-sync.jsonl" "${smoke[@]}" \
    "${bench_filter[@]}" 2>&1 | tee "$OUTDIR/mma-sync.txt"
  note "- (3) SEGATTN_FWD_HOPPER=0 gpu_bench (mma.sync kernels): exit ${PIPESTATUS[0]} (mma-sync.txt)"
  SEGATTN_FWD_WIDE=1 budgeted 60 60 "$WORK/gpu_bench" "${smoke[@]}" "${bench_filter[@]}" \
    2>&1 | tee "$OUTDIR/hopper128.txt"
  note "- (3) SEGATTN_FWD_WIDE=1 gpu_bench (the 128-row wgmma kernel): exit ${PIPESTATUS[0]} (hopper128.txt)"

  # SEGATTN_BENCH_SHAPES_ONLY=1: a further call for more shapes (e.g. GQA 32/8): the attention
  # shapes and their peers only, not the fixed-shape runs below (64-row kernel, PINE, mass).
  if [ "${SEGATTN_BENCH_SHAPES_ONLY:-0}" != 1 ]; then
  if [ "${#BASELINE_REVS[@]}" -gt 0 ]; then
    # The same shapes, PINE and mass with each baseline's build, on this machine, right after ours.
    for rev in "${BASELINE_REVS[@]}"; do
      log "(3) the baseline $rev at the target shapes, PINE and mass: the changes' before / after"
      budgeted 60 60 "$WORK/gpu_bench_base_$rev" --filter "$TARGET" 2>&1 | tee "$OUTDIR/baseline-$rev.txt"
      budgeted 60 50 "$WORK/gpu_bench_base_$rev" --pine 2>&1 | tee "$OUTDIR/baseline-$rev-pine.md"
      budgeted 60 40 "$WORK/gpu_bench_base_$rev" --mass 2>&1 | tee "$OUTDIR/baseline-$rev-mass.md"
      note "- (3) baseline $rev gpu_bench (target shapes, --pine, --mass): baseline-$rev*.txt / .md"
    done
    budgeted 60 30 "$WORK/gpu_bench" --filter "$TARGET" 2>&1 | tee "$OUTDIR/ours-again.txt"
  fi
  # The mma.sync kernels' variants (SEGATTN_FWD_HOPPER=0): the 64-row kernel on the same shapes
  # (SEGATTN_FWD_WIDE=0), the wide kernel for every mask (SEGATTN_FWD_WIDE=1; at D = 128 their
  # rule already takes it from 128 rows on), then with its 32-key tiles at D = 128
  # (bench/NOTES.md CUDA 23 and 25).
  log "(3) the 64-row mma.sync kernel on the same shapes (SEGATTN_FWD_HOPPER=0 SEGATTN_FWD_WIDE=0)"
  SEGATTN_FWD_HOPPER=0 SEGATTN_FWD_WIDE=0 budgeted 90 60 "$WORK/gpu_bench" "${smoke[@]}" "${bench_filter[@]}" 2>&1 |
    tee "$OUTDIR/narrow.txt"
  note "- (3) SEGATTN_FWD_HOPPER=0 SEGATTN_FWD_WIDE=0 gpu_bench (64-row mma.sync kernel): exit ${PIPESTATUS[0]}"
  SEGATTN_FWD_HOPPER=0 SEGATTN_FWD_WIDE=1 budgeted 90 60 "$WORK/gpu_bench" --filter "$TARGET" 2>&1 | tee "$OUTDIR/wide.txt"
  note "- (3) SEGATTN_FWD_HOPPER=0 SEGATTN_FWD_WIDE=1 gpu_bench (wide mma.sync kernel for every mask, L 8k D 128): exit ${PIPESTATUS[0]}"
  SEGATTN_FWD_HOPPER=0 SEGATTN_FWD_WIDE=1 SEGATTN_FWD_WIDE_KEYS=32 budgeted 90 60 "$WORK/gpu_bench" --filter "$TARGET" 2>&1 |
    tee "$OUTDIR/wide32.txt"
  note "- (3) SEGATTN_FWD_HOPPER=0 SEGATTN_FWD_WIDE=1 SEGATTN_FWD_WIDE_KEYS=32 gpu_bench (128 x 32 tiles, L 8k D 128): exit ${PIPESTATUS[0]}"

  log "(3) PINE layer (gpu_bench --pine)"
  t=$SECONDS
  budgeted 100000 20 "$WORK/gpu_bench" --pine 2>&1 | tee "$OUTDIR/pine.md"
  note "- (3) gpu_bench --pine: exit ${PIPESTATUS[0]}, $((SECONDS - t)) s"
  # On an H100 / H200 the wgmma kernels (plain attention, PINE's rotation); the mma.sync ones for
  # the before / after (bench/NOTES.md CUDA 40).
  SEGATTN_FWD_HOPPER=0 budgeted 100000 20 "$WORK/gpu_bench" --pine 2>&1 | tee "$OUTDIR/pine-mma-sync.md"
  note "- (3) SEGATTN_FWD_HOPPER=0 gpu_bench --pine (mma.sync kernels): exit ${PIPESTATUS[0]} (pine-mma-sync.md)"
  # The same without GQA decode packing (src/decode_pack.rs), for its before / after.
  SEGATTN_GQA_PACK=0 budgeted 100000 20 "$WORK/gpu_bench" --pine 2>&1 | tee "$OUTDIR/pine-unpacked.md"
  note "- (3) SEGATTN_GQA_PACK=0 gpu_bench --pine: exit ${PIPESTATUS[0]}"

  # The same with cudarc's event tracking off (what the small calls of a decode step pay for it).
  SEGATTN_BENCH_EVENT_TRACKING=0 budgeted 100000 20 "$WORK/gpu_bench" --pine 2>&1 | tee "$OUTDIR/pine-no-events.md"
  note "- (3) SEGATTN_BENCH_EVENT_TRACKING=0 gpu_bench --pine: exit ${PIPESTATUS[0]}"

  log "(3) per-segment mass, fused and standalone (gpu_bench --mass)"
  t=$SECONDS
  budgeted 100000 20 "$WORK/gpu_bench" --mass 2>&1 | tee "$OUTDIR/mass.md"
  note "- (3) gpu_bench --mass: exit ${PIPESTATUS[0]}, $((SECONDS - t)) s"
  # On an H100 / H200 the default above is the wgmma kernels (the fused mass in
  # segattn_fwd_hopper_mass_*); the mma.sync ones for the before / after (bench/NOTES.md CUDA 39).
  SEGATTN_FWD_HOPPER=0 budgeted 100000 20 "$WORK/gpu_bench" --mass 2>&1 | tee "$OUTDIR/mass-mma-sync.md"
  note "- (3) SEGATTN_FWD_HOPPER=0 gpu_bench --mass (mma.sync kernels): exit ${PIPESTATUS[0]} (mass-mma-sync.md)"
  # The wide mass kernel with 64-key tiles (opt-in, bench/NOTES.md CUDA 28) against the
  # defaults above: PINE's importance (its scoring masks have no causal pair: the wide kernel),
  # and the standalone op with the wide rows forced (its masks here have causal pairs: the
  # 64-row kernel by default), with 32- and with 64-key tiles. (The three-block mass kernel was
  # timed twice, CUDA 22 and 25: SEGATTN_SCORES_BLOCKS=3 still takes it.)
  SEGATTN_SCORES_WIDE_KEYS=64 budgeted 100000 20 "$WORK/gpu_bench" --pine 2>&1 | tee "$OUTDIR/pine-wide64.md"
  SEGATTN_FWD_HOPPER=0 SEGATTN_FWD_WIDE=1 budgeted 100000 20 "$WORK/gpu_bench" --mass 2>&1 | tee "$OUTDIR/mass-wide.md"
  SEGATTN_FWD_HOPPER=0 SEGATTN_FWD_WIDE=1 SEGATTN_SCORES_WIDE_KEYS=64 budgeted 100000 20 "$WORK/gpu_bench" --mass 2>&1 |
    tee "$OUTDIR/mass-wide64.md"
  note "- (3) SEGATTN_SCORES_WIDE_KEYS=64 gpu_bench --pine, SEGATTN_FWD_HOPPER=0 SEGATTN_FWD_WIDE=1 [SEGATTN_SCORES_WIDE_KEYS=64] gpu_bench --mass: pine-wide64.md, mass-wide.md, mass-wide64.md"
  fi

  log "(3) peers (torch)"
  t=$SECONDS
  peers_filter="${SEGATTN_PEERS_FILTER-H16/16 D128}"
  pf=()
  [ -n "$peers_filter" ] && pf=(--filter "$peers_filter")
  PYTHONUNBUFFERED=1 budgeted 100000 25 "$PYTHON" bench/peers.py --masks "$WORK/masks.json" \
    --json "$OUTDIR/peers.jsonl" --check "${smoke[@]}" "${pf[@]}" 2>&1 | tee "$WORK/peers.log" | grep -v '^{'
  rc=${PIPESTATUS[0]}
  note "- (3) peers.py (filter '${peers_filter}'): exit $rc$([ "$rc" = 124 ] && echo ' (time budget reached: partial)'), $((SECONDS - t)) s"
  [ "$rc" = 0 ] || [ "$rc" = 124 ] || status=1
  # The attention's backward pass (training), ours then the peers' (SDPA flash / cuDNN, flex:
  # forward + backward) on the same shapes: last, with at most 40 s each, so that it never takes
  # time from the forward's targets above (not in a SEGATTN_BENCH_SHAPES_ONLY call).
  if [ "${SEGATTN_BENCH_SHAPES_ONLY:-0}" != 1 ]; then
    log "(3) the attention's backward pass (gpu_bench --backward, peers.py --backward)"
    t=$SECONDS
    budgeted 40 10 "$WORK/gpu_bench" --backward 2>&1 | tee "$OUTDIR/backward.md"
    note "- (3) gpu_bench --backward: exit ${PIPESTATUS[0]}, $((SECONDS - t)) s (backward.md)"
    t=$SECONDS
    PYTHONUNBUFFERED=1 budgeted 40 10 "$PYTHON" bench/peers.py --backward --masks "$WORK/masks.json" \
      --json "$OUTDIR/peers-backward.jsonl" "${smoke[@]}" 2>&1 | grep -v '^{' | tee "$OUTDIR/peers-backward.txt"
    note "- (3) peers.py --backward: exit ${PIPESTATUS[0]}, $((SECONDS - t)) s (peers-backward.txt)"
  fi

  log "(4) results table (with the results of earlier calls of this pack on this machine)"
  cat "$OUTDIR/segattn.jsonl" >>"$WORK/segattn-all.jsonl" 2>/dev/null
  cat "$OUTDIR/peers.jsonl" >>"$WORK/peers-all.jsonl" 2>/dev/null
  "$PYTHON" bench/report.py --ours "$WORK/segattn-all.jsonl" --peers "$WORK/peers-all.jsonl" \
    --header "$SUMMARY" --out "$OUTDIR/RESULTS.md" || status=1
  cat "$OUTDIR/RESULTS.md"
  # The mma.sync kernels' table against the same peers (SEGATTN_FWD_HOPPER=0 above: what GPUs
  # other than an H100 / H200 run).
  if [ -s "$OUTDIR/segattn-mma-sync.jsonl" ]; then
    "$PYTHON" bench/report.py --ours "$OUTDIR/segattn-mma-sync.jsonl" --peers "$WORK/peers-all.jsonl" \
      --out "$OUTDIR/RESULTS-mma-sync.md" && tail -15 "$OUTDIR/RESULTS-mma-sync.md"
  fi
fi

# --- (5) profile: where the kernels' time goes ----------------------------------------------
if [ "$PHASE" = profile ]; then
  NCU="$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1 || true)"
  PROFILE="$OUTDIR/profile.txt"
  : >"$PROFILE"
  if [ -z "$NCU" ]; then
    note "- (5) ncu: NOT FOUND"
    status=1
  else
    sections=(--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
      --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis)
    # One launch per kernel (after the warm-up ones), clocks left alone (METHOD.md).
    profile_one() {
      local label=$1 kernels=$2
      shift 2
      local t=$SECONDS
      {
        echo "=================== $label (kernels $kernels) ==================="
        budgeted 120 15 "$NCU" --clock-control none --kernel-name "regex:$kernels" --launch-skip "${PROFILE_SKIP:-3}" --launch-count 1 \
          "${sections[@]}" "$@"
      } >>"$PROFILE" 2>&1
      local rc=$?
      if grep -q -E 'LibraryNotLoaded|ERR_NVGPUCTRPERM|not supported' "$PROFILE"; then
        note "- (5) $label: ncu cannot read the counters on this machine (gVisor?)"
        return 1
      fi
      note "- (5) $label: exit $rc, $((SECONDS - t)) s"
    }
    # In order of what is open (short budgets cut the list): plain attention's kernel at the target
    # shapes (on an H100 / H200 the 64-row wgmma one: documents reach 0.61-0.68x causal's rate
    # there, issue 4's one missed target), then the mma.sync kernel its rule takes elsewhere; the
    # wgmma kernels built after the 2026-11-28 run (the standalone mass, the fused mass, PINE's
    # rotation); every kernel of steady PINE decode steps (durations only), also with each packed
    # baseline; the decode importance; the mass kernel's pass after the forward beyond 64 segments.
    for shape in "causal $TARGET" "documents8 $TARGET" "pine $TARGET"; do
      profile_one "$shape" '^segattn_fwd_(wide64_|wide_|hopper_|hopper128_)?bf16_d128$' "$WORK/gpu_bench" \
        --filter "$shape" --reps 20 --warmup 3 || break
    done
    SEGATTN_FWD_HOPPER=0 profile_one "causal $TARGET, mma.sync kernel" \
      '^segattn_fwd_(wide64_|wide_)?bf16_d128$' "$WORK/gpu_bench" --filter "causal $TARGET" --reps 20 --warmup 3
    profile_one "mass (standalone)" '^segattn_scores_(wide_|b4_|hopper_)?bf16_d128$' "$WORK/gpu_bench" --mass
    profile_one "mass (fused forward)" '^segattn_fwd_(wide64_|hopper_)?mass_bf16_d128$' "$WORK/gpu_bench" --mass
    # The rope kernel ran at about half the plain kernel's rate on the same mask (mma.sync): where
    # its warps wait (the turn's table loads? the straddling tiles' pieces?) decides what to change next.
    profile_one "PINE prefill attention" '^segattn_fwd_(hopper_)?rope_bf16_d128$' --section SourceCounters \
      --import-source yes "$WORK/gpu_bench" --pine
    # Six launches of every segattn_ kernel of steady PINE decode steps, durations only, of the
    # benchmark binary $2 (labelled $1).
    decode_trace() {
      local label=$1 bin=$2 t=$SECONDS
      {
        echo "=================== PINE decode steps, every kernel ($label) ==================="
        budgeted 90 15 "$NCU" --clock-control none --kernel-name "regex:^segattn_" --launch-skip 40 --launch-count 6 \
          --section SpeedOfLight --section LaunchStats "$bin" --pine-decode-trace
      } >>"$PROFILE" 2>&1
      note "- (5) PINE decode steps, every kernel ($label): exit $?, $((SECONDS - t)) s"
    }
    decode_trace "gpu_bench --pine-decode-trace" "$WORK/gpu_bench"
    # The same launches of each packed baseline revision: a kernel's duration before / after (the
    # kernel names line the two up where a revision launches another number of kernels a step).
    for rev in "${BASELINE_REVS[@]}"; do
      [ -x "$WORK/gpu_bench_base_$rev" ] && decode_trace "baseline $rev" "$WORK/gpu_bench_base_$rev"
    done
    # With the hottest source lines (warp stall samples, SASS with the CUDA line: -lineinfo builds):
    # the decode step is a latency chain, so where the warps wait matters more than the totals.
    profile_one "PINE decode importance" '^segattn_pine_decode_scores_bf16$' --section SourceCounters \
      --section InstructionStats --import-source yes "$WORK/gpu_bench" --pine-decode-trace
    # Beyond 64 segments the fused mass is the forward, then the mass kernel's exact pass with its
    # LSE (its call's extra time read as the harness's, NOTES CUDA 41). The mass kernel launches
    # once per call; one case's calls (--reps 20 --warmup 1: 21 each) come in this order: fused
    # (launches 0-20), fused with the mass freed before the sync (21-41), fused on the 64-row
    # forward (42-62), fused by query segment (63-83), standalone (84-104).
    PROFILE_SKIP=3 profile_one "mass after the forward, saved LSE (documents100 16/16)" '^segattn_scores_' \
      "$WORK/gpu_bench" --mass --filter "documents100 16/16" --reps 20 --warmup 1
    PROFILE_SKIP=87 profile_one "mass standalone, two passes (documents100 16/16)" '^segattn_scores_' \
      "$WORK/gpu_bench" --mass --filter "documents100 16/16" --reps 20 --warmup 1
    # A timeline of PINE decode steps (64 layer calls in a row): where a step's time goes between
    # launches, allocations and copies (the kernels alone are a fraction of it).
    NSYS="$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1 || true)"
    if [ -n "$NSYS" ]; then
      t=$SECONDS
      {
        echo "=================== PINE decode timeline (nsys) ==================="
        budgeted 90 10 "$NSYS" profile --force-overwrite true -o "$WORK/pine-decode" "$WORK/gpu_bench" --pine-decode-trace &&
          budgeted 60 5 "$NSYS" stats --force-export true --report cuda_api_sum --report cuda_gpu_kern_sum \
            --report cuda_gpu_mem_time_sum "$WORK/pine-decode.nsys-rep"
        echo "--- the last 80 GPU operations ---"
        budgeted 60 5 "$NSYS" stats --report cuda_gpu_trace --format csv "$WORK/pine-decode.nsys-rep" | tail -80
      } >"$OUTDIR/pine-decode-timeline.txt" 2>&1
      note "- (5) PINE decode timeline (nsys): exit $?, $((SECONDS - t)) s (pine-decode-timeline.txt)"
    else
      note "- (5) nsys: NOT FOUND (no PINE decode timeline)"
    fi
    # The one-line figures per kernel, for the summary.
    grep -E '^=====|^  segattn_|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Duration|Issued Ipc Active|No Eligible' \
      "$PROFILE" | tee -a "$SUMMARY"
  fi
fi

note ""
note "suite ($PHASE) finished in $((SECONDS - START)) s, status $status"
exit "$status"
