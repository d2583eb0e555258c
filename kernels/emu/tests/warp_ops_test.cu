// Emulator test: shuffles (all four kinds, widths, per-lane sources, divergent half-warp masks),
// votes and the reducing block barriers. The Rust side recomputes every value.
#include "platform.cuh"
#include "ptx.cuh"

namespace {

constexpr int kOutputs = 17;

// 64 threads. out[tid * kOutputs + k], see tests/emulator.rs for the expected values.
__global__ void warp_ops_kernel(int* out) {
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const unsigned full = 0xffffffffu;
  int* o = out + tid * kOutputs;

  int sum = tid * 3 + 1;
  for (int off = 16; off > 0; off /= 2) sum += shfl_xor(sum, off);
  o[0] = sum;

  float mx = static_cast<float>(tid * 7 % 13);
  for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, shfl_xor(mx, off));
  o[1] = static_cast<int>(mx);

  o[2] = __shfl_sync(full, tid * 10, 5);
  o[3] = __shfl_sync(full, tid, (lane * 7) % 32);
  o[4] = __shfl_up_sync(full, tid, 3);
  o[5] = __shfl_down_sync(full, tid, 5, 16);
  o[6] = __shfl_xor_sync(full, tid, 8, 8);
  o[7] = static_cast<int>(__ballot_sync(full, lane % 3 == 0));
  o[8] = __any_sync(full, tid == 40);
  o[9] = __all_sync(full, tid < 40);
  __syncwarp();
  o[10] = __syncthreads_count(tid % 4 == 0);
  o[11] = __syncthreads_and(tid < 63);
  o[12] = __syncthreads_or(tid == 63);
  o[13] = __syncthreads_and(1);
  o[14] = __syncthreads_or(0);
  // The two half-warps shuffle separately, in divergent branches.
  if (lane < 16)
    o[15] = __shfl_xor_sync(0x0000ffffu, tid, 1);
  else
    o[15] = __shfl_xor_sync(0xffff0000u, tid + 1000, 2);
  o[16] = static_cast<int>(__activemask());
}

}  // namespace

#if defined(SEGATTN_EMULATE)
extern "C" int segattn_emu_test_warp_ops(int* out) {
  return segattn::emu::launch(dim3(1), dim3(64), 0, [&] { warp_ops_kernel(out); });
}
#endif

namespace {

// Cost probe: every warp does `iters` full-warp butterfly shuffles.
__global__ void shuffle_loop_kernel(int iters, float* out) {
  float v = static_cast<float>(threadIdx.x);
  for (int i = 0; i < iters; ++i) v = 0.5f * (v + shfl_xor(v, 1 << (i % 5)));
  out[threadIdx.x] = v;
}

}  // namespace

#if defined(SEGATTN_EMULATE)
extern "C" int segattn_emu_test_shuffle_loop(int iters, int warps, float* out) {
  return segattn::emu::launch(dim3(1), dim3(32 * warps), 0,
                              [&] { shuffle_loop_kernel(iters, out); });
}
#endif
