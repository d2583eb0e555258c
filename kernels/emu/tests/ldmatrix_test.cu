// Emulator test: ldmatrix x4 / x4.trans / x2 / x2.trans from a padded shared-memory tile; the Rust
// side checks every register against direct reads of the source.
#include "platform.cuh"
#include "ptx.cuh"

namespace {

constexpr int kStride = 24;  // elements per smem row: 48 bytes, rows stay 16-byte aligned

// One warp. src: 16x16 b16 values, row-major. Matrix i of the x4 forms covers rows 8*(i&1).. and
// columns 8*(i>>1).. (the order of the mma A fragments). out: 4 words per lane.
// mode 0: x4, 1: x4.trans, 2: x2, 3: x2.trans, 4: x4 with a misaligned address (must fail).
__global__ void ldmatrix_kernel(const uint16_t* src, uint32_t* out, int mode) {
  __shared__ __align__(16) uint16_t tile[16 * kStride];
  const int lane = threadIdx.x;
  for (int e = lane; e < 256; e += 32) tile[(e / 16) * kStride + e % 16] = src[e];
  __syncwarp();
  const int m = lane / 8, r = lane % 8;
  const uint16_t* row = &tile[(r + 8 * (m & 1)) * kStride + 8 * (m >> 1)];
  uint32_t regs[4] = {0, 0, 0, 0};
  switch (mode) {
    case 0: ldmatrix_x4(regs, row); break;
    case 1: ldmatrix_x4_trans(regs, row); break;
    // Lanes 16-31 pass no valid address: x2 must ignore them.
    case 2: ldmatrix_x2(regs, lane < 16 ? row : nullptr); break;
    case 3: ldmatrix_x2_trans(regs, lane < 16 ? row : nullptr); break;
    default: ldmatrix_x4(regs, lane == 9 ? row + 1 : row); break;
  }
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = regs[i];
}

}  // namespace

#if defined(SEGATTN_EMULATE)
extern "C" int segattn_emu_test_ldmatrix(int mode, const uint16_t* src, uint32_t* out) {
  return segattn::emu::launch(dim3(1), dim3(32), 0, [&] { ldmatrix_kernel(src, out, mode); });
}
#endif
