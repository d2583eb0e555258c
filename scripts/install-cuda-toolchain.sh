#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, ptxas, headers, libdevice) from PyPI into a cache
# directory, idempotently, and prints the resulting CUDA_HOME as its LAST line:
#
#   CUDA_HOME=$(scripts/install-cuda-toolchain.sh | tail -1)
#
# Why 13.0: the GPU machines run driver 580 (CUDA 13.0), which rejects PTX from nvcc 13.1+
# (see shared/notes/cuda-toolchain.md). cuobjdump and nvdisasm are not published at 13.0; the
# 13.2 builds read 13.0 binaries. No GPU or driver is needed to install or to compile.
#
# Layout (default root ${SEGATTN_CACHE:-$HOME/.cache/segattn}/cuda-13.0, override with
# SEGATTN_CUDA_HOME):
#   pkgs/            pip install --target of the pinned wheels (nvidia/cu13/... inside)
#   bin include nvvm symlinks into pkgs/nvidia/cu13/  (bin has nvcc, ptxas, cuobjdump, nvdisasm)
#   lib/             a real directory of symlinks into pkgs/nvidia/cu13/lib (room for lib/stubs)
#   .stamp           the pinned versions; when it matches, a run does nothing (a few ms)
#
# Environment: SEGATTN_CACHE, SEGATTN_CUDA_HOME, PYTHON (default python3), NVCC_CCBIN (nvcc's own
# variable: host compiler; default is gcc/g++ on PATH, gcc 12 on Debian 12).
# Progress goes to stderr; stdout carries only the CUDA_HOME line.
set -euo pipefail

PINS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  # Not published at 13.0; 13.2 reads 13.0 binaries. nvdisasm is what `cuobjdump -sass` runs.
  nvidia-cuda-cuobjdump==13.2.86
  nvidia-cuda-nvdisasm==13.2.86
)
# Bump this when the layout or the verification below changes, to force a reinstall.
LAYOUT_VERSION=1

log() { echo "install-cuda-toolchain: $*" >&2; }

CACHE="${SEGATTN_CACHE:-$HOME/.cache/segattn}"
DEST="${SEGATTN_CUDA_HOME:-$CACHE/cuda-13.0}"
PYTHON="${PYTHON:-python3}"
STAMP_WANT="layout=$LAYOUT_VERSION ${PINS[*]}"

is_installed() {
  [ -f "$DEST/.stamp" ] && [ "$(cat "$DEST/.stamp")" = "$STAMP_WANT" ] &&
    [ -x "$DEST/bin/nvcc" ] && [ -x "$DEST/bin/cuobjdump" ]
}

# Fast path without taking the lock.
if is_installed; then
  echo "$DEST"
  exit 0
fi

mkdir -p "$(dirname "$DEST")"
# One installer at a time per tree (CI and a developer may share a cache).
exec 9>"$DEST.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9
fi
if is_installed; then
  echo "$DEST"
  exit 0
fi

start=$(date +%s)
log "installing CUDA 13.0 compiler into $DEST"
if [ -e "$DEST" ] && [ -n "$(ls -A "$DEST")" ] && [ ! -e "$DEST/.segattn-cuda" ]; then
  log "error: $DEST exists and was not made by this script; refusing to replace it"
  exit 1
fi
rm -rf "$DEST"
mkdir -p "$DEST"
touch "$DEST/.segattn-cuda"
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
  log "error: '$PYTHON -m pip' does not work; install pip (Debian: apt-get install python3-pip) or set PYTHON"
  exit 1
fi
# --no-deps: the pin list is closed (nvcc's only dependencies, crt, nvvm and runtime, are in it).
PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
  --no-deps --target "$DEST/pkgs" "${PINS[@]}" >&2

TREE="$DEST/pkgs/nvidia/cu13"
for f in bin/nvcc bin/ptxas bin/cuobjdump bin/nvdisasm include/cuda_runtime.h nvvm/libdevice; do
  if [ ! -e "$TREE/$f" ]; then
    log "error: $TREE/$f missing after pip install (wheel layout changed?)"
    exit 1
  fi
done
ln -s pkgs/nvidia/cu13/bin "$DEST/bin"
ln -s pkgs/nvidia/cu13/include "$DEST/include"
ln -s pkgs/nvidia/cu13/nvvm "$DEST/nvvm"
mkdir "$DEST/lib"
for f in "$TREE"/lib/*; do
  ln -s "../pkgs/nvidia/cu13/lib/$(basename "$f")" "$DEST/lib/$(basename "$f")"
done

# Verify: nvcc runs, and compiles a tiny kernel with mma.sync (device code for sm_80 and sm_90)
# plus host code, which exercises the host compiler (gcc 12 here).
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/probe.cu" <<'EOF'
#include <cuda_bf16.h>
#include <cstdint>
__global__ void probe(const uint32_t *a, float *d) {
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
               "{%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(a[4]), "r"(a[5]));
  for (int i = 0; i < 4; ++i) d[threadIdx.x * 4 + i] = c[i];
}
int launch(const uint32_t *a, float *d) {
  probe<<<1, 32>>>(a, d);
  return 0;
}
EOF
host_cc="${NVCC_CCBIN:-$(command -v g++ || command -v gcc || echo none)}"
if ! "$DEST/bin/nvcc" -std=c++17 -O3 -gencode arch=compute_80,code=sm_80 \
  -gencode arch=compute_90,code=sm_90 -c "$work/probe.cu" -o "$work/probe.o" >&2; then
  log "error: nvcc could not compile a probe kernel (host compiler: $host_cc)"
  exit 1
fi
log "nvcc: $("$DEST/bin/nvcc" --version | tail -1)"
log "host compiler: $host_cc ($("$host_cc" -dumpfullversion 2>/dev/null || echo '?'))"

echo "$STAMP_WANT" >"$DEST/.stamp"
log "done in $(($(date +%s) - start)) s ($(du -sh "$DEST" | cut -f1))"
echo "$DEST"
