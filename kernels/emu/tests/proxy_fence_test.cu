// Emulator test: a wgmma reading shared memory that cp.async filled needs a fence.proxy.async by
// each copying thread between its copies' landing (its cp.async wait) and the barrier before the
// wgmma. The emulator fails a launch whose wgmma reads landed bytes that no such fence covers.
#include "dtypes.cuh"
#include "platform.cuh"
#include "ptx.cuh"
#include "wgmma.cuh"

namespace {

constexpr int kThreads = 128;  // one warpgroup

// B: a 64 x 64 K-major bf16 tile (64 keys of 128 bytes, 128-byte swizzle), copied with cp.async
// by all threads (4 chunks each); then one wgmma m64n64k16 on its first 16 columns, A zero.
// mode 0: wait, fence, barrier (correct). 1: no fence (fails). 2: the fence before the wait, so
// the copies land after it (fails). 3: only threads 0..63 fence (fails on the others' chunks).
__global__ void proxy_fence_kernel(const uint16_t* tile, float* out, int mode) {
  SEGATTN_DYNAMIC_SMEM(char, smem);
  char* const base = smem + ((1024 - (smem_u32addr(smem) & 1023)) & 1023);
  const int t = static_cast<int>(threadIdx.x);
  for (int i = 0; i < 4; ++i) {
    const int chunk = t + kThreads * i;  // 512 chunks: row chunk / 8, column chunk chunk % 8
    const int r = chunk / 8, c = chunk % 8;
    cp_async_16(base + r * 128 + ((c ^ (r % 8)) * 16), tile + r * 64 + c * 8, true);
  }
  cp_async_commit();
  if (mode == 2) fence_proxy_async_smem();
  cp_async_wait<0>();
  if (mode == 0 || (mode == 3 && t < 64)) fence_proxy_async_smem();
  __syncthreads();
  float d[8][4];
  const uint32_t a[4] = {0, 0, 0, 0};
  wgmma_fence();
  wgmma_rs<segattn::bf16, 64, false>(d, a, wgmma_desc_sw128(base, 16, 1024), false);
  wgmma_commit();
  wgmma_wait<0>();
  for (int j = 0; j < 8; ++j) {
    for (int e = 0; e < 4; ++e) out[(t * 8 + j) * 4 + e] = d[j][e];
  }
}

}  // namespace

#if defined(SEGATTN_EMULATE)
// tile: 64 x 64 bf16 (16-byte aligned); out: 128 x 32 floats.
extern "C" int segattn_emu_test_proxy_fence(int mode, const uint16_t* tile, float* out) {
  return segattn::emu::launch(dim3(1), dim3(kThreads), 64 * 128 + 1024, [&] { proxy_fence_kernel(tile, out, mode); });
}
#endif
