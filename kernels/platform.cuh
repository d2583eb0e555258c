// The one header every kernel source includes first.
//
// nvcc: the CUDA headers. Host C++ with SEGATTN_EMULATE (build.rs): the SIMT emulator
// (kernels/emu/), which gives the same kernel source CUDA's qualifiers, built-in variables and
// intrinsics on the CPU.
#ifndef SEGATTN_PLATFORM_CUH
#define SEGATTN_PLATFORM_CUH

#include <stdint.h>

#if defined(SEGATTN_EMULATE)

#include "emu/emu.cuh"

// `extern __shared__` has no host C++ form: the emulator hands out the block's dynamic shared
// memory (128-byte aligned, poisoned with 0xFF at the start of every block).
#define SEGATTN_DYNAMIC_SMEM(type, name) \
  type* name = reinterpret_cast<type*>(::segattn::emu::dynamic_smem())

#elif defined(__CUDACC__)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// One extern name for every kernel: declarations with different element types would conflict.
// Aligned to 128 bytes, as the swizzled tile layouts' bank pattern assumes (the emulator's too).
#define SEGATTN_DYNAMIC_SMEM(type, name)                                  \
  extern __shared__ __align__(128) unsigned char segattn_dynamic_smem_[]; \
  type* name = reinterpret_cast<type*>(segattn_dynamic_smem_)

#else
#error "kernels/ build either with nvcc or with SEGATTN_EMULATE defined (host emulation)"
#endif

#endif  // SEGATTN_PLATFORM_CUH
