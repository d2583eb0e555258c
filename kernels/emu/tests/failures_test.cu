// Emulator test: kernels that must make the launch fail with a diagnosis instead of hanging or
// crashing: deadlocks, divergent collectives, traps, writes past the dynamic shared memory, bad
// configurations.
#include "platform.cuh"
#include "ptx.cuh"

namespace {

__global__ void failing_kernel(int mode, int* out) {
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  switch (mode) {
    case 0:  // __syncthreads reached by warp 0 only (64 threads)
      if (tid < 32) __syncthreads();
      break;
    case 1: {  // full-mask shuffle reached by half a warp (32 threads)
      int v = tid;
      if (lane < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
      out[tid] = v;
      break;
    }
    case 2:  // one thread exits while the others wait at a barrier (64 threads)
      if (tid == 5) return;
      __syncthreads();
      break;
    case 3:  // __trap (64 threads)
      if (tid == 7) __trap();
      __syncthreads();
      break;
    case 4: {  // lanes of one warp in different collectives under the same mask (32 threads)
      int v = 0;
      if (lane < 16)
        v = __shfl_xor_sync(0xffffffffu, tid, 1);
      else
        v = static_cast<int>(__ballot_sync(0xffffffffu, 1));
      out[tid] = v;
      break;
    }
    case 5: {  // mma in a partial warp (48 threads)
      const uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
      float d[4] = {0, 0, 0, 0};
      mma_m16n8k16_bf16(d, a, b, d);
      break;
    }
    case 7: {  // a write one byte past the launch's 100 bytes of dynamic shared memory
      SEGATTN_DYNAMIC_SMEM(unsigned char, dyn);
      if (tid == 3) dyn[100] = 1;
      __syncthreads();
      break;
    }
    default:  // deadlock after useful work: warp 1 waits for a barrier warp 0 skips
      out[tid] = tid;
      __syncthreads();
      if (tid >= 32) __syncthreads();
      break;
  }
}

}  // namespace

#if defined(SEGATTN_EMULATE)
extern "C" int segattn_emu_test_failure(int mode, int threads, int* out) {
  const size_t smem = mode == 7 ? 100 : 0;
  return segattn::emu::launch(dim3(1), dim3(threads), smem, [&] { failing_kernel(mode, out); });
}
#endif
