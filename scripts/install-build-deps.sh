#!/usr/bin/env bash
# Installs the system packages the default build needs, idempotently:
#   libclang (bindgen reads kernels/segattn_params.h) and g++ (the SIMT emulation build of kernels/).
set -euo pipefail
have_libclang() {
  ldconfig -p 2>/dev/null | grep -q 'libclang\(-[0-9.]*\)\?\.so' ||
    ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1
}
need=()
have_libclang || need+=(libclang-dev)
command -v g++ >/dev/null 2>&1 || need+=(g++)
if [ ${#need[@]} -gt 0 ]; then
  echo "install-build-deps: installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
echo "install-build-deps: ok"
