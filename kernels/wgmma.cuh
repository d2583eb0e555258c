// Hopper's warpgroup MMA (sm_90a): wgmma.mma_async with A in registers and B in shared memory
// through a matrix descriptor, and the fences and waits around it. The GPU runs the PTX; the SIMT
// emulator (kernels/emu/wgmma.cpp) computes it from this project's reading of the PTX ISA, which
// only a GPU run confirms (tests/gpu_fwd.rs runs the probe kernels/hopper/wgmma_probe.cu on the card).
//
// A device pass for another architecture (sm_80, plain sm_90) compiles every wrapper to a trap:
// kernels that call them are built for sm_90a only (kernels/hopper/).
#ifndef SEGATTN_WGMMA_CUH
#define SEGATTN_WGMMA_CUH

#include <type_traits>

#include "platform.cuh"
#include "dtypes.cuh"
#include "ptx.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SEGATTN_WGMMA_PTX 1
#endif

#if defined(SEGATTN_EMULATE)
#define SEGATTN_WGMMA_SITE , const char *emu_file = __builtin_FILE(), int emu_line = __builtin_LINE()
#define SEGATTN_WGMMA_SITE_FIRST const char *emu_file = __builtin_FILE(), int emu_line = __builtin_LINE()
#define SEGATTN_WGMMA_HERE (::segattn::emu::Site{emu_file, emu_line})
#else
#define SEGATTN_WGMMA_SITE
#define SEGATTN_WGMMA_SITE_FIRST
#endif

namespace segattn {

// The 64-bit shared-memory matrix descriptor of an operand in the 128-byte swizzled layout
// (PTX ISA, "Matrix Descriptor Format"): start address, leading and stride byte offsets (16-byte
// units, 14 bits each), base offset 0 (the layout's 1024-byte atoms start on 1024-byte
// boundaries of the shared window: the caller aligns its tiles), swizzle mode 1 (128 bytes).
__device__ __forceinline__ uint64_t wgmma_desc_sw128(const void* smem_ptr, uint32_t lbo_bytes,
                                                     uint32_t sbo_bytes SEGATTN_WGMMA_SITE) {
#if defined(SEGATTN_EMULATE)
  const uint64_t addr = ::segattn::emu::smem_desc_address(smem_ptr, SEGATTN_WGMMA_HERE);
#else
  const uint64_t addr = (smem_u32addr(smem_ptr) & 0x3FFFFu) >> 4;
#endif
  return addr | (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFFu) << 32) | (uint64_t{1} << 62);
}

// Orders this thread's earlier register and shared-memory accesses before the wgmma ops issued
// after it (wgmma.fence: needed before the first wgmma and whenever its accumulators or A
// registers were written by other instructions since).
__device__ __forceinline__ void wgmma_fence() {
#if defined(SEGATTN_WGMMA_PTX)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// Closes the wgmma ops issued so far into one group.
__device__ __forceinline__ void wgmma_commit() {
#if defined(SEGATTN_WGMMA_PTX)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(SEGATTN_EMULATE)
  ::segattn::emu::wgmma_commit();
#endif
}

// Waits until at most N of the most recent committed groups are pending; only then may the
// accumulators be read and the A registers and B's shared memory be reused.
template <int N>
__device__ __forceinline__ void wgmma_wait(SEGATTN_WGMMA_SITE_FIRST) {
#if defined(SEGATTN_WGMMA_PTX)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(SEGATTN_EMULATE)
  ::segattn::emu::wgmma_wait(N, SEGATTN_WGMMA_HERE);
#endif
}

// Shared memory written through the generic proxy (plain stores, cp.async) and read next by the
// async proxy (wgmma's B): each writing thread fences after its writes, before the barrier. (The
// emulator fails a wgmma that reads a cp.async's landed bytes before the copying thread's fence.)
__device__ __forceinline__ void fence_proxy_async_smem() {
#if defined(SEGATTN_WGMMA_PTX)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(SEGATTN_EMULATE)
  ::segattn::emu::fence_proxy_async();
#endif
}

// Keeps the compiler from moving accesses of a wgmma operand across the asynchronous region
// (between the mma_async that uses it and the wait that completes it): f32 accumulators it
// writes, or 32-bit A registers it reads (they must not be reused before the wait).
template <class E, int kBlocks>
__device__ __forceinline__ void wgmma_fence_operands(E (&x)[kBlocks][4]) {
  static_assert(std::is_same<E, float>::value || std::is_same<E, uint32_t>::value, "f32 or 32-bit registers");
#if defined(SEGATTN_WGMMA_PTX)
#pragma unroll
  for (int j = 0; j < kBlocks; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if constexpr (std::is_same<E, float>::value) {
        asm volatile("" : "+f"(x[j][e])::"memory");
      } else {
        asm volatile("" : "+r"(x[j][e])::"memory");
      }
    }
  }
#else
  (void)x;
#endif
}

#define SEGATTN_WGMMA_D4(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
// The operands after D's N / 2 registers: A's 4 registers, B's descriptor, scale-d (a predicate
// from `accumulate`) and trans-b.
#define SEGATTN_WGMMA_INPUTS                                                                               \
  "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(static_cast<int>(accumulate)),              \
      "n"(static_cast<int>(kTransB))
// wgmma m64n64k16 / m64n128k16 with A in registers, f32 accumulators, TYPE "bf16" or "f16".
#define SEGATTN_WGMMA_N64(TYPE)                                                                            \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " {"                             \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                     \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"             \
               "}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"                                          \
               : SEGATTN_WGMMA_D4(0), SEGATTN_WGMMA_D4(1), SEGATTN_WGMMA_D4(2), SEGATTN_WGMMA_D4(3),        \
                 SEGATTN_WGMMA_D4(4), SEGATTN_WGMMA_D4(5), SEGATTN_WGMMA_D4(6), SEGATTN_WGMMA_D4(7)         \
               : SEGATTN_WGMMA_INPUTS)
#define SEGATTN_WGMMA_N128(TYPE)                                                                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {"                            \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                     \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "           \
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "           \
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"             \
               "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"                                          \
               : SEGATTN_WGMMA_D4(0), SEGATTN_WGMMA_D4(1), SEGATTN_WGMMA_D4(2), SEGATTN_WGMMA_D4(3),        \
                 SEGATTN_WGMMA_D4(4), SEGATTN_WGMMA_D4(5), SEGATTN_WGMMA_D4(6), SEGATTN_WGMMA_D4(7),        \
                 SEGATTN_WGMMA_D4(8), SEGATTN_WGMMA_D4(9), SEGATTN_WGMMA_D4(10), SEGATTN_WGMMA_D4(11),      \
                 SEGATTN_WGMMA_D4(12), SEGATTN_WGMMA_D4(13), SEGATTN_WGMMA_D4(14), SEGATTN_WGMMA_D4(15)     \
               : SEGATTN_WGMMA_INPUTS)

// D (+)= A B for the warpgroup: m64 x kN x k16, 16-bit T (bf16 or f16), f32 accumulators.
// d: this thread's fragment of D (d[j][e]: rows 16 warp + g + 8 (e / 2), column 8 j + 2 t +
// e % 2, as mma.m16n8k16's C, j = 0 .. kN / 8 - 1); a: its fragment of A (mma.m16n8k16's A
// layout for the warp's 16 rows); b_desc: B, K-major (kTransB false: stored [n][k]) or MN-major
// (kTransB true: stored [k][n]); accumulate false: D = A B. Issued by all 128 threads of a
// warpgroup (4 consecutive warps, the first a multiple of 4); completes at a wgmma_wait.
template <class T, int kN, bool kTransB>
__device__ __forceinline__ void wgmma_rs(float (&d)[kN / 8][4], const uint32_t (&a)[4], uint64_t b_desc,
                                         bool accumulate SEGATTN_WGMMA_SITE) {
  static_assert(kN == 64 || kN == 128, "wgmma m64n64k16 and m64n128k16");
  constexpr bool kBf16 = std::is_same<T, bf16>::value;
#if defined(SEGATTN_WGMMA_PTX)
  if constexpr (kN == 64 && kBf16) {
    SEGATTN_WGMMA_N64("bf16");
  } else if constexpr (kN == 64) {
    SEGATTN_WGMMA_N64("f16");
  } else if constexpr (kBf16) {
    SEGATTN_WGMMA_N128("bf16");
  } else {
    SEGATTN_WGMMA_N128("f16");
  }
#elif defined(__CUDA_ARCH__)
  (void)d, (void)a, (void)b_desc, (void)accumulate, (void)kBf16;
  __trap();
#elif defined(SEGATTN_EMULATE)
  ::segattn::emu::wgmma_rs(kBf16 ? ::segattn::emu::MmaInput::BF16 : ::segattn::emu::MmaInput::F16, kN, kTransB,
                           &d[0][0], a, b_desc, accumulate, SEGATTN_WGMMA_HERE);
#endif
}

#undef SEGATTN_WGMMA_D4
#undef SEGATTN_WGMMA_INPUTS
#undef SEGATTN_WGMMA_N64
#undef SEGATTN_WGMMA_N128

}  // namespace segattn

// Also reachable unqualified from kernels outside namespace segattn.
using segattn::fence_proxy_async_smem;
using segattn::wgmma_commit;
using segattn::wgmma_desc_sw128;
using segattn::wgmma_fence;
using segattn::wgmma_fence_operands;
using segattn::wgmma_rs;
using segattn::wgmma_wait;

#undef SEGATTN_WGMMA_SITE
#undef SEGATTN_WGMMA_SITE_FIRST
#undef SEGATTN_WGMMA_HERE

#endif  // SEGATTN_WGMMA_CUH
