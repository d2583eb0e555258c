#!/usr/bin/env bash
# Sets up the environment for `cargo build --features cuda` on a machine WITHOUT a GPU or a CUDA
# driver (CI, the project's build machines), idempotently, and prints `export` lines:
#
#   eval "$(scripts/setup-cuda-build-env.sh)"     # or:  source scripts/setup-cuda-build-env.sh
#   cargo test --no-run --features cuda
#
# What it makes, cached under ${SEGATTN_CACHE:-$HOME/.cache/segattn}:
#   cuda-13.0/          the pinned nvcc 13.0 from PyPI (scripts/install-cuda-toolchain.sh)
#   cuda-13.0-build/    a CUDA_HOME tree for cudarc / candle-kernels / build/nvcc.rs:
#     bin include nvvm    symlinks into the pinned toolchain
#     lib/                libcudart.so(.13) from the wheel (real: candle-kernels links it)
#     lib/stubs/          generated link stubs with the right sonames for libcuda.so.1,
#                         libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13:
#                         one C function per symbol of cudarc's `sys` bindings (of the cudarc in
#                         Cargo.lock), each returning 34 = CUDA_ERROR_STUB_LIBRARY (NULL for
#                         pointers); scripts/gen-cuda-stubs.py
#     .stamp              toolchain + cudarc version + generator hash; when it matches, a run is a
#                         few milliseconds
#   target-cuda/        CARGO_TARGET_DIR for cuda builds, apart from the default build's target
#                       (the cuda env changes PATH / CUDA_HOME, which build scripts watch: sharing
#                       one target dir would rebuild both ways on every switch)
#
# Exported: CUDA_HOME, PATH (+ $CUDA_HOME/bin), CUDARC_CUDA_VERSION=13000 (cudarc does not run
# `nvcc --version`), CUDA_COMPUTE_CAP=90 (no nvidia-smi here; candle-kernels needs it),
# CUDAFORGE_THREADS=$(nproc) (parallel nvcc in candle-kernels' build script), CARGO_TARGET_DIR
# (override with SEGATTN_CUDA_TARGET_DIR), SEGATTN_CUDA_STUBS (the stub directory: prepend it to
# LD_LIBRARY_PATH to START cuda binaries here - CUDA calls then fail cleanly - never on a GPU
# machine); and unset CUDA_PATH, CUDA_ROOT, CUDA_TOOLKIT_ROOT_DIR (cudarc adds a link path for each
# one that is set, which could pick a real toolkit's libraries instead of the stubs).
#
# Environment: SEGATTN_CACHE, SEGATTN_CUDA_TARGET_DIR, CUDA_COMPUTE_CAP (kept when set), PYTHON,
# CC (stub compiler, default cc). Progress goes to stderr; stdout carries only the export lines.

_segattn_cuda_env() {
  set -euo pipefail
  local root cache toolchain dest stamp_want cudarc_ver cudarc_src crate gen_hash tc_stamp
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  cache="${SEGATTN_CACHE:-$HOME/.cache/segattn}"
  dest="$cache/cuda-13.0-build"
  local python="${PYTHON:-python3}" cc="${CC:-cc}"
  log() { echo "setup-cuda-build-env: $*" >&2; }

  toolchain="$(SEGATTN_CACHE="$cache" bash "$root/scripts/install-cuda-toolchain.sh" | tail -1)"
  [ -x "$toolchain/bin/nvcc" ] || { log "error: no nvcc in $toolchain"; return 1; }

  # The cudarc the build will link: its version from Cargo.lock, its sources from cargo's registry.
  cudarc_ver="$(awk '/^name = "cudarc"$/ { getline; gsub(/version = |"/, ""); print; exit }' "$root/Cargo.lock")"
  [ -n "$cudarc_ver" ] || { log "error: cudarc not in $root/Cargo.lock"; return 1; }
  tc_stamp="$(cat "$toolchain/.stamp")"
  gen_hash="$(cat "$root/scripts/gen-cuda-stubs.py" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
  stamp_want="layout=1 cudarc=$cudarc_ver gen=$gen_hash toolchain=[$tc_stamp]"

  if ! { [ -f "$dest/.stamp" ] && [ "$(cat "$dest/.stamp")" = "$stamp_want" ]; }; then
    mkdir -p "$cache"
    exec 8>"$dest.lock"
    command -v flock >/dev/null 2>&1 && flock 8
    if ! { [ -f "$dest/.stamp" ] && [ "$(cat "$dest/.stamp")" = "$stamp_want" ]; }; then
      local start=$SECONDS
      local cargo_home="${CARGO_HOME:-$HOME/.cargo}"
      cudarc_src="$(ls -d "$cargo_home"/registry/src/*/"cudarc-$cudarc_ver" 2>/dev/null | head -1 || true)"
      if [ -z "$cudarc_src" ]; then
        log "fetching crates (cudarc $cudarc_ver sources are not unpacked yet)"
        (cd "$root" && cargo fetch --quiet >&2)
        crate="$(ls "$cargo_home"/registry/cache/*/"cudarc-$cudarc_ver.crate" 2>/dev/null | head -1 || true)"
        [ -n "$crate" ] || { log "error: cudarc-$cudarc_ver.crate not in $cargo_home/registry/cache"; return 1; }
        mkdir -p "$cache/crates"
        tar -xzf "$crate" -C "$cache/crates"
        cudarc_src="$cache/crates/cudarc-$cudarc_ver"
      fi
      log "building $dest (stubs from $cudarc_src)"
      if [ -e "$dest" ] && [ ! -e "$dest/.segattn-cuda-build" ]; then
        log "error: $dest exists and was not made by this script; refusing to replace it"
        return 1
      fi
      rm -rf "$dest"
      mkdir -p "$dest/lib/stubs" "$dest/src"
      touch "$dest/.segattn-cuda-build"
      for d in bin include nvvm; do ln -s "$toolchain/$d" "$dest/$d"; done
      # The real CUDA runtime from the wheel (candle-kernels links -lcudart).
      ln -s "$toolchain/lib/libcudart.so.13" "$dest/lib/libcudart.so.13"
      ln -s libcudart.so.13 "$dest/lib/libcudart.so"
      for f in libcudart_static.a libcudadevrt.a; do
        [ -e "$toolchain/lib/$f" ] && ln -s "$toolchain/lib/$f" "$dest/lib/$f"
      done
      "$python" "$root/scripts/gen-cuda-stubs.py" "$cudarc_src" "$dest/src" >&2
      local c soname base
      for c in "$dest"/src/*.c; do
        soname="$(basename "$c" .c)"
        base="${soname%%.so*}.so"
        "$cc" -shared -fPIC -O1 -w -Wl,-soname,"$soname" -o "$dest/lib/stubs/$soname" "$c"
        ln -s "$soname" "$dest/lib/stubs/$base"
      done
      # The stubs' directory also gets cudart, so that LD_LIBRARY_PATH=$SEGATTN_CUDA_STUBS is enough
      # to start a cuda binary here.
      ln -s ../libcudart.so.13 "$dest/lib/stubs/libcudart.so.13"
      echo "$stamp_want" >"$dest/.stamp"
      log "done in $((SECONDS - start)) s"
    fi
    exec 8>&-
  fi

  local target="${SEGATTN_CUDA_TARGET_DIR:-$cache/target-cuda}"
  local path="$PATH"
  case ":$path:" in *":$dest/bin:"*) ;; *) path="$dest/bin:$path" ;; esac
  printf 'export CUDA_HOME=%q\n' "$dest"
  printf 'export PATH=%q\n' "$path"
  printf 'export CUDARC_CUDA_VERSION=13000\n'
  printf 'export CUDA_COMPUTE_CAP=%q\n' "${CUDA_COMPUTE_CAP:-90}"
  printf 'export CUDAFORGE_THREADS=%q\n' "$(nproc 2>/dev/null || echo 2)"
  printf 'export CARGO_TARGET_DIR=%q\n' "$target"
  printf 'export SEGATTN_CUDA_STUBS=%q\n' "$dest/lib/stubs"
  printf 'unset CUDA_PATH CUDA_ROOT CUDA_TOOLKIT_ROOT_DIR\n'
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
  # Sourced: run in a subshell (set -e must not leak into the caller's shell), then apply.
  if _segattn_cuda_env_out="$(_segattn_cuda_env)"; then
    eval "$_segattn_cuda_env_out"
    unset _segattn_cuda_env_out
    unset -f _segattn_cuda_env
  else
    unset _segattn_cuda_env_out
    unset -f _segattn_cuda_env
    echo "setup-cuda-build-env: FAILED" >&2
    return 1
  fi
else
  _segattn_cuda_env
fi
