// Emulator test: mma.sync m16n8k16 (bf16 and f16) against a plain matmul done on the Rust side.
// Fragments are built straight from global memory with the PTX ISA layout, independently of
// ldmatrix (tiled_matmul_test.cu checks the ldmatrix + mma combination).
#include "dtypes.cuh"
#include "platform.cuh"
#include "ptx.cuh"

namespace {

__device__ __forceinline__ uint32_t pair(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// Warp w computes d_w = a_w * b_w + c_w: a 16x16 row-major, b 16x8 row-major ([k][n]), c and d
// 16x8 row-major f32; all as 16-bit bit patterns.
template <bool BF16>
__global__ void mma_kernel(const uint16_t* a, const uint16_t* b, const float* c, float* d) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t = lane & 3;
  a += warp * 256;
  b += warp * 128;
  c += warp * 128;
  d += warp * 128;
  const uint32_t fa[4] = {pair(a[g * 16 + 2 * t], a[g * 16 + 2 * t + 1]),
                          pair(a[(g + 8) * 16 + 2 * t], a[(g + 8) * 16 + 2 * t + 1]),
                          pair(a[g * 16 + 2 * t + 8], a[g * 16 + 2 * t + 9]),
                          pair(a[(g + 8) * 16 + 2 * t + 8], a[(g + 8) * 16 + 2 * t + 9])};
  const uint32_t fb[2] = {pair(b[(2 * t) * 8 + g], b[(2 * t + 1) * 8 + g]),
                          pair(b[(2 * t + 8) * 8 + g], b[(2 * t + 9) * 8 + g])};
  float acc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t],
                  c[(g + 8) * 8 + 2 * t + 1]};
  if (BF16)
    mma_m16n8k16_bf16(acc, fa, fb, acc);
  else
    mma_m16n8k16_f16(acc, fa, fb, acc);
  d[g * 8 + 2 * t] = acc[0];
  d[g * 8 + 2 * t + 1] = acc[1];
  d[(g + 8) * 8 + 2 * t] = acc[2];
  d[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

}  // namespace

#if defined(SEGATTN_EMULATE)
extern "C" int segattn_emu_test_mma(int is_bf16, int warps, const uint16_t* a, const uint16_t* b,
                                    const float* c, float* d) {
  return segattn::emu::launch(dim3(1), dim3(32 * warps), 0, [&] {
    if (is_bf16)
      mma_kernel<true>(a, b, c, d);
    else
      mma_kernel<false>(a, b, c, d);
  });
}
#endif
