#!/usr/bin/env bash
# The one-command GPU suite, HERE half: builds (in release, with the cuda feature) the GPU test
# binaries (every tests/gpu_*.rs) and the GPU benchmark (examples/gpu_bench.rs), strips and compresses
# them into .gpu-suite/ (ignored through .git/info/exclude, so it travels only when carried), and
# prints how to run the suite on a GPU machine:
#
#   scripts/gpu-suite.sh            # build, dry-run the GPU tests and gpu_bench --pine / --mass / --backward
#                                   # on the CPU, pack, then print the `run` invocations
#   scripts/gpu-suite.sh --check    # also start both binaries here against the link stubs
#                                   # (no GPU: the tests skip, the benchmark exports its masks)
#
# There (no Rust, no network): `bash scripts/gpu-suite-remote.sh [test|bench|all] .gpu-suite`
# runs the property tests on the GPU, compute-sanitizer on small cases, our benchmark and
# bench/peers.py (torch: SDPA flash / cuDNN / math, FlexAttention), and prints and writes the
# results table (see that script). The working tree travels too (scripts/, bench/).
#
# A contributor with a local GPU and CUDA 13 driver can run the same thing in place:
#   scripts/gpu-suite.sh && bash scripts/gpu-suite-remote.sh all .gpu-suite
# (LD_LIBRARY_PATH must reach libcublas / libcurand / libnvrtc 13: a torch cu130 install's
# nvidia/cu13/lib is found automatically; set SEGATTN_CUDA_LIBS otherwise).
#
# Environment: SEGATTN_CACHE (toolchain, stubs, target-cuda), SEGATTN_SUITE_DIR (default
# .gpu-suite), SEGATTN_SUITE_LIMIT_MIB (default 60; the carry limit is 64 MiB for everything),
# SEGATTN_SUITE_BASELINE (git revisions, separated by spaces: each one's gpu_bench is packed too,
# as gpu_bench_base_REV, and the bench half times it next to this tree's at the target shapes, PINE
# and mass: a change's before / after on one machine in one run; two revisions split two rounds
# of unmeasured changes).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SUITE="${SEGATTN_SUITE_DIR:-.gpu-suite}"
LIMIT_MIB="${SEGATTN_SUITE_LIMIT_MIB:-60}"
CHECK=0
[ "${1:-}" = "--check" ] && CHECK=1
log() { echo "gpu-suite: $*" >&2; }
t0=$SECONDS

# shellcheck source=scripts/setup-cuda-build-env.sh
source scripts/setup-cuda-build-env.sh
log "CUDA build env: CUDA_HOME=$CUDA_HOME CARGO_TARGET_DIR=$CARGO_TARGET_DIR"

# Build both binaries; cargo reports their paths as JSON (the test binary's name has a hash).
msgs="$(mktemp)"
trap 'rm -f "$msgs" "$msgs.bench.bin" "$msgs.base.bin"' EXIT
# Every GPU test file: tests/gpu_*.rs (compiled only with the cuda feature).
mapfile -t GPU_TESTS < <(cd tests && ls gpu_*.rs | sed 's/\.rs$//')
[ ${#GPU_TESTS[@]} -gt 0 ] || { log "error: no tests/gpu_*.rs"; exit 1; }
test_args=()
for t in "${GPU_TESTS[@]}"; do test_args+=(--test "$t"); done
log "building the GPU tests (${GPU_TESTS[*]}) and the benchmark (release, --features cuda)"
cargo build --release --features cuda --example gpu_bench --message-format=json-render-diagnostics >"$msgs"
cargo test --release --features cuda "${test_args[@]}" --no-run --message-format=json-render-diagnostics >>"$msgs"
exe_of() {
  python3 - "${3:-$msgs}" "$1" "$2" <<'EOF'
import json, sys
path, kind, name = sys.argv[1:]
found = None
for line in open(path):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and m.get("executable") and t.get("name") == name and kind in t.get("kind", []):
        found = m["executable"]
print(found or "")
EOF
}
bins=()
for t in "${GPU_TESTS[@]}"; do
  exe="$(exe_of test "$t")"
  [ -x "$exe" ] || { log "error: no binary for tests/$t.rs in cargo's output"; exit 1; }
  bins+=("$t:$exe")
done
BENCH_BIN="$(exe_of example gpu_bench)"
[ -x "$BENCH_BIN" ] || { log "error: no benchmark binary found in cargo's output"; exit 1; }
# A copy: cargo's path is the uplifted examples/gpu_bench, which a baseline build overwrites.
cp "$BENCH_BIN" "$msgs.bench.bin"
BENCH_BIN="$msgs.bench.bin"
bins+=("gpu_bench:$BENCH_BIN")
log "built in $((SECONDS - t0)) s: ${bins[*]}"

# The baseline's benchmark: built from a detached worktree of that revision, in the same target
# directory (the dependencies are shared; the worktree's crate is a separate package to cargo).
BASELINE_REVS=()
for rev in ${SEGATTN_SUITE_BASELINE:-}; do
  rev="$(git rev-parse --short "$rev")"
  BASELINE_REVS+=("$rev")
  wt="$(mktemp -d)/baseline"
  git worktree add --detach "$wt" "$rev" >/dev/null 2>&1
  log "building the baseline's gpu_bench ($rev)"
  (cd "$wt" && cargo build --release --features cuda --example gpu_bench --message-format=json-render-diagnostics) \
    >"$msgs.base"
  base_bin="$(exe_of example gpu_bench "$msgs.base")"
  [ -x "$base_bin" ] || { log "error: no baseline benchmark binary in cargo's output"; exit 1; }
  cp "$base_bin" "$msgs.base.$rev.bin"
  git worktree remove --force "$wt"
  bins+=("gpu_bench_base_$rev:$msgs.base.$rev.bin")
done

# Dry runs on the CPU against the link stubs (no CUDA call is made), so that a mistake in the
# suite's own code does not cost GPU time: every GPU test with the CPU as its device
# (SEGATTN_GPU_TESTS_ON_CPU=1, few cases; tests of CUDA-only limits skip), and the benchmark's
# --pine, --mass and --pine-decode-trace code paths at small shapes.
for pair in "${bins[@]}"; do
  name="${pair%%:*}"
  case "$name" in gpu_bench*) continue ;; esac
  if ! SEGATTN_GPU_TESTS_ON_CPU=1 SEGATTN_GPU_CASES=8 LD_LIBRARY_PATH="$SEGATTN_CUDA_STUBS" "${pair#*:}" \
    --test-threads 2 >"$msgs.dry" 2>&1; then
    cat "$msgs.dry" >&2
    log "error: tests/$name.rs failed its dry run on the CPU"
    exit 1
  fi
  log "$name dry run on the CPU: $(grep -E '^test result' "$msgs.dry" | tail -1)"
done
for mode in --pine --mass --pine-decode-trace --backward; do
  if ! LD_LIBRARY_PATH="$SEGATTN_CUDA_STUBS" "$BENCH_BIN" "$mode" --cpu --smoke --reps 1 --warmup 0 >"$msgs.dry" 2>&1; then
    cat "$msgs.dry" >&2
    log "error: gpu_bench $mode failed its dry run on the CPU"
    exit 1
  fi
  log "gpu_bench $mode dry run on the CPU: $(grep -c -E '^(\| |PINE decode trace)' "$msgs.dry") result lines"
done
rm -f "$msgs.dry" "$msgs.base"

# The pack: stripped, xz-compressed binaries plus a manifest.
grep -qxF "/$SUITE/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/$SUITE/" >>.git/info/exclude; }
rm -rf "$SUITE"
mkdir -p "$SUITE"
for pair in "${bins[@]}"; do
  name="${pair%%:*}"
  bin="${pair#*:}"
  strip -o "$SUITE/$name" "$bin"
  xz -T0 -6 -f "$SUITE/$name"
done
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
dirty="$(git status --porcelain 2>/dev/null | grep -qv "^?? $SUITE/" && echo "+uncommitted changes" || true)"
{
  echo "commit=$commit$dirty"
  [ "${#BASELINE_REVS[@]}" -gt 0 ] && echo "baselines=${BASELINE_REVS[*]}"
  echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n), $(rustc --version)"
  echo "nvcc=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\), V\([0-9.]*\).*/\2/p')"
  echo "tests=${GPU_TESTS[*]}"
  echo "needs=$(objdump -p "$BENCH_BIN" | awk '/NEEDED/ { printf "%s ", $2 }')"
  (cd "$SUITE" && sha256sum ./*.xz)
} >"$SUITE/MANIFEST"

bytes=$(du -cb "$SUITE" | tail -1 | cut -f1)
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
log "packed: $(cd "$SUITE" && ls -l | awk 'NR > 1 { printf "%s %d B; ", $9, $5 }')"
log "pack $((bytes / 1024)) KiB + working tree $((tree_bytes / 1024)) KiB (limit 64 MiB in all)"
if [ $((bytes + tree_bytes)) -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
  log "error: pack + tree exceed ${LIMIT_MIB} MiB"
  exit 1
fi

if [ "$CHECK" = 1 ]; then
  # Both binaries start here against the stubs: CUDA calls fail cleanly, the tests skip.
  log "check: starting the binaries against the link stubs (no GPU here)"
  work="$(mktemp -d)"
  for t in "${GPU_TESTS[@]}" gpu_bench; do
    xz -dc "$SUITE/$t.xz" >"$work/$t" && chmod +x "$work/$t"
  done
  for t in "${GPU_TESTS[@]}"; do
    LD_LIBRARY_PATH="$SEGATTN_CUDA_STUBS" "$work/$t" --test-threads 2 2>&1 | grep '^test result' |
      sed "s/^/gpu-suite: $t (skips without a GPU): /"
  done
  LD_LIBRARY_PATH="$SEGATTN_CUDA_STUBS" "$work/gpu_bench" --list | wc -l | xargs echo "gpu-suite: benchmark shapes:"
  LD_LIBRARY_PATH="$SEGATTN_CUDA_STUBS" "$work/gpu_bench" --smoke --export-masks "$work/masks.json"
  if LD_LIBRARY_PATH="$SEGATTN_CUDA_STUBS" "$work/gpu_bench" --smoke --reps 20 2>"$work/err"; then
    log "error: the benchmark ran without a GPU?"
  else
    log "check: without a GPU the benchmark fails cleanly: $(grep -m1 -i error "$work/err")"
  fi
  rm -rf "$work"
fi

cat <<EOF

=== GPU suite packed in $SUITE/ ($((bytes / 1024)) KiB) in $((SECONDS - t0)) s ===
On a GPU machine through the \`run\` tool with a short device budget: ONE call runs every phase
under its own time budget and packs all outputs into \$OUT/gpu-session.tgz (see the script's
header for the budgets and filters):

  run  command: bash scripts/gpu-session.sh $SUITE
       carry:   ["$SUITE"]
       timeout_s: 580

Or phase by phase (one command at most 10 minutes, so two calls on the same warm machine; each
prints its part of the table and writes it under \$OUT):

  run  command: bash scripts/gpu-suite-remote.sh test $SUITE
       carry:   ["$SUITE"]
       timeout_s: 600

  run  command: bash scripts/gpu-suite-remote.sh bench $SUITE
       carry:   ["$SUITE"]
       timeout_s: 600

(\`bash scripts/gpu-suite-remote.sh all $SUITE\` does both in one go where no time limit applies.)
Then, where time is left (ncu, hardware counters, Firecracker machines only; ~3 minutes):

  run  command: bash scripts/gpu-suite-remote.sh profile $SUITE
       carry:   ["$SUITE"]
       timeout_s: 300
EOF
