// Every inline-PTX instruction the kernels use, behind a small device function: PTX on the GPU
// (sm_80 or newer), the SIMT emulator on the host (SEGATTN_EMULATE). The emulator computes each
// warp-wide instruction from the PTX ISA's fragment layouts (kernels/emu/tensor_core.cpp); only
// a GPU run can confirm that reading, so check kernels on hardware whenever one is available.
//
// In emulation each wrapper takes hidden trailing arguments with the caller's file and line (for
// deadlock reports); calls look the same in both modes.
#ifndef SEGATTN_PTX_CUH
#define SEGATTN_PTX_CUH

#include "platform.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "segattn kernels need sm_80 or newer (mma.sync bf16, cp.async)"
#endif

#if defined(SEGATTN_EMULATE)
#include <math.h>
#define SEGATTN_PTX_SITE , const char *emu_file = __builtin_FILE(), int emu_line = __builtin_LINE()
#define SEGATTN_PTX_HERE (::segattn::emu::Site{emu_file, emu_line})
#else
#define SEGATTN_PTX_SITE
#endif

namespace segattn {

// Shared-memory window address of a generic pointer to shared memory. Emulation: the low 32
// bits of the host address (enough for swizzle arithmetic on the low bits, nothing else).
__device__ __forceinline__ uint32_t smem_u32addr(const void* p) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#else
  return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p));
#endif
}

// D = A * B + C; A 16x16 row-major, B 16x8 column-major, fp32 accumulators. Fragments
// (g = lane / 4, t = lane % 4; the lower element of a pair in the low 16 bits):
//   a[0] = A[g][2t, 2t+1]  a[1] = A[g+8][2t, 2t+1]  a[2] = A[g][2t+8, 2t+9]  a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]  b[1] = B[2t+8, 2t+9][g]
//   c, d: [0] = (g, 2t) [1] = (g, 2t+1) [2] = (g+8, 2t) [3] = (g+8, 2t+1)
// d may be c. All 32 lanes of the warp must execute it.
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                  const float c[4] SEGATTN_PTX_SITE) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#elif defined(SEGATTN_EMULATE)
  ::segattn::emu::mma_m16n8k16(::segattn::emu::MmaInput::BF16, d, a, b, c, SEGATTN_PTX_HERE);
#endif
}

__device__ __forceinline__ void mma_m16n8k16_f16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                 const float c[4] SEGATTN_PTX_SITE) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#elif defined(SEGATTN_EMULATE)
  ::segattn::emu::mma_m16n8k16(::segattn::emu::MmaInput::F16, d, a, b, c, SEGATTN_PTX_HERE);
#endif
}

// ldmatrix.sync.aligned.m8n8.{x4,x2}[.trans].shared.b16: lanes 8i..8i+7 pass the addresses of the
// 8 rows (16 bytes each, 16-byte aligned, in shared memory) of matrix i; lane l receives in r[i]
// the elements (row l/4, cols 2(l%4), 2(l%4)+1) of matrix i, or of its transpose with .trans.
// x2: lanes 0-15 give the addresses (the others' are ignored). All 32 lanes must execute it.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem_row_ptr SEGATTN_PTX_SITE) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32addr(smem_row_ptr))
               : "memory");
#elif defined(SEGATTN_EMULATE)
  ::segattn::emu::ldmatrix(4, false, r, smem_row_ptr, SEGATTN_PTX_HERE);
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4],
                                                  const void* smem_row_ptr SEGATTN_PTX_SITE) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32addr(smem_row_ptr))
               : "memory");
#elif defined(SEGATTN_EMULATE)
  ::segattn::emu::ldmatrix(4, true, r, smem_row_ptr, SEGATTN_PTX_HERE);
#endif
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* smem_row_ptr SEGATTN_PTX_SITE) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32addr(smem_row_ptr))
               : "memory");
#elif defined(SEGATTN_EMULATE)
  ::segattn::emu::ldmatrix(2, false, r, smem_row_ptr, SEGATTN_PTX_HERE);
#endif
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t r[2],
                                                  const void* smem_row_ptr SEGATTN_PTX_SITE) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32addr(smem_row_ptr))
               : "memory");
#elif defined(SEGATTN_EMULATE)
  ::segattn::emu::ldmatrix(2, true, r, smem_row_ptr, SEGATTN_PTX_HERE);
#endif
}

// cp.async.cg.shared.global, 16 bytes, both addresses 16-byte aligned. pred == false: src-size 0,
// nothing is read and the 16 destination bytes are zero-filled.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src,
                                            bool pred SEGATTN_PTX_SITE) {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32addr(smem_dst)),
               "l"(gmem_src), "r"(pred ? 16 : 0)
               : "memory");
#elif defined(SEGATTN_EMULATE)
  ::segattn::emu::cp_async_16(smem_dst, gmem_src, pred, SEGATTN_PTX_HERE);
#endif
}

// cp.async.ca.shared.global, 4 bytes, both addresses 4-byte aligned. pred == false: src-size 0,
// nothing is read and the 4 destination bytes are zero-filled.
__device__ __forceinline__ void cp_async_4(void* smem_dst, const void* gmem_src,
                                           bool pred SEGATTN_PTX_SITE) {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32addr(smem_dst)),
               "l"(gmem_src), "r"(pred ? 4 : 0)
               : "memory");
#elif defined(SEGATTN_EMULATE)
  ::segattn::emu::cp_async_4(smem_dst, gmem_src, pred, SEGATTN_PTX_HERE);
#endif
}

// Closes the calling thread's cp.async operations issued so far into one group.
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(SEGATTN_EMULATE)
  ::segattn::emu::cp_async_commit();
#endif
}

// Waits until at most N of the calling thread's most recent committed groups are pending. Other
// threads' copies become visible only after a __syncthreads() that follows their wait.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(N >= 0, "cp.async.wait_group takes a non-negative count");
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#elif defined(SEGATTN_EMULATE)
  ::segattn::emu::cp_async_wait(N);
#endif
}

// ex2.approx.ftz.f32: 2^x, subnormal inputs and results flushed to zero. Emulation: exp2f, which
// is more accurate than the GPU's approximation (max 2 ulp).
__device__ __forceinline__ float exp2_approx(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#elif defined(SEGATTN_EMULATE)
  const float y = exp2f(x);
  return y < 1.17549435e-38f ? 0.0f : y;  // ftz (NaN compares false and passes through)
#else
  return x;  // nvcc host pass: never called
#endif
}

// Butterfly exchange across the full warp (__shfl_xor_sync with mask 0xffffffff).
#if defined(SEGATTN_EMULATE)
__device__ __forceinline__ float shfl_xor(float v, int lane_mask, const char* emu_file = __builtin_FILE(),
                                          int emu_line = __builtin_LINE()) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask, warpSize, emu_file, emu_line);
}
__device__ __forceinline__ int shfl_xor(int v, int lane_mask, const char* emu_file = __builtin_FILE(),
                                        int emu_line = __builtin_LINE()) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask, warpSize, emu_file, emu_line);
}
#else
__device__ __forceinline__ float shfl_xor(float v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}
__device__ __forceinline__ int shfl_xor(int v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}
#endif

// Adds v to *p (global or shared memory): atomically on the GPU. The emulator runs a block's
// threads as fibers of one OS thread and blocks one after another, so a plain add is atomic there.
__device__ __forceinline__ void atomic_add(float* p, float v) {
#if defined(SEGATTN_EMULATE)
  *p += v;
#else
  atomicAdd(p, v);
#endif
}

// Sum and max over the 32 lanes of a full warp (butterfly: every lane gets the result).
__device__ __forceinline__ float warp_sum(float v) {
  for (int m = 16; m >= 1; m /= 2) v += shfl_xor(v, m);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int m = 16; m >= 1; m /= 2) v = fmaxf(v, shfl_xor(v, m));
  return v;
}

}  // namespace segattn

// Also reachable unqualified from kernels outside namespace segattn.
using segattn::atomic_add;
using segattn::cp_async_16;
using segattn::cp_async_4;
using segattn::cp_async_commit;
using segattn::cp_async_wait;
using segattn::exp2_approx;
using segattn::ldmatrix_x2;
using segattn::ldmatrix_x2_trans;
using segattn::ldmatrix_x4;
using segattn::ldmatrix_x4_trans;
using segattn::mma_m16n8k16_bf16;
using segattn::mma_m16n8k16_f16;
using segattn::shfl_xor;
using segattn::smem_u32addr;
using segattn::warp_max;
using segattn::warp_sum;

#undef SEGATTN_PTX_SITE
#undef SEGATTN_PTX_HERE

#endif  // SEGATTN_PTX_CUH
