// Emulator test: cp.async + commit + wait against a direct copy, and proof that a missing wait is
// exposed (the destination keeps the NaN poison).
#include "platform.cuh"
#include "ptx.cuh"

namespace {

constexpr int kThreads = 64;
constexpr int kChunkBytes = 16;

// Thread t copies chunk t of src (zero-filled when t % 5 == 3) into dynamic smem, then the block
// writes smem back out in reverse chunk order, so every thread reads another thread's copy.
// mode 0: commit + wait<0> + __syncthreads (correct). 1: no wait (must leave poison).
// 2: two groups; after wait<1> the first is complete and the second still pending (out region 0
//    and 1), after wait<0> the second is complete (region 2). 3: misaligned destination (fails).
// 4: a second copy into the same chunk while the first is in flight, another group (fails: on a
//    GPU the two may land in either order).
__global__ void cp_async_kernel(const unsigned char* src, unsigned char* out, int mode) {
  SEGATTN_DYNAMIC_SMEM(unsigned char, smem);
  const int t = threadIdx.x;
  const int back = kThreads - 1 - t;
  const bool pred = t % 5 != 3;
  constexpr int kRegion = kThreads * kChunkBytes;
  auto copy_out = [&](const unsigned char* from, unsigned char* to) {
    const uint4 v = *reinterpret_cast<const uint4*>(from + back * kChunkBytes);
    *reinterpret_cast<uint4*>(to + back * kChunkBytes) = v;
  };
  if (mode == 3) {
    cp_async_16(smem + t * kChunkBytes + 4, src + t * kChunkBytes, true);
    return;
  }
  if (mode == 4) {
    cp_async_16(smem + t * kChunkBytes, src + t * kChunkBytes, true);
    cp_async_commit();
    cp_async_16(smem + t * kChunkBytes, src + kRegion + t * kChunkBytes, true);
    cp_async_commit();
    cp_async_wait<0>();
    return;
  }
  cp_async_16(smem + t * kChunkBytes, src + t * kChunkBytes, pred);
  cp_async_commit();
  if (mode == 0) cp_async_wait<0>();
  if (mode == 2) {
    cp_async_16(smem + kRegion + t * kChunkBytes, src + kRegion + t * kChunkBytes, pred);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    copy_out(smem, out);
    copy_out(smem + kRegion, out + kRegion);  // still in flight: poison
    __syncthreads();  // nobody completes group 1 before everyone has read the poison
    cp_async_wait<0>();
    __syncthreads();
    copy_out(smem + kRegion, out + 2 * kRegion);
    return;
  }
  __syncthreads();
  copy_out(smem, out);
}

}  // namespace

#if defined(SEGATTN_EMULATE)
// src: 2 * 1024 bytes (16-byte aligned); out: 3 * 1024 bytes.
extern "C" int segattn_emu_test_cp_async(int mode, const unsigned char* src, unsigned char* out) {
  return segattn::emu::launch(dim3(1), dim3(kThreads), 2 * kThreads * kChunkBytes,
                              [&] { cp_async_kernel(src, out, mode); });
}
#endif
