// Emulator test: a small smem-staged bf16 matmul (cp.async -> ldmatrix -> mma), correct and with
// planted bugs, to prove the emulator catches them: the Rust side asserts that the correct kernel
// matches the reference under every schedule and that each buggy variant fails under the
// schedules named there.
#include "platform.cuh"
#include "ptx.cuh"

namespace {

// C[M][N] (f32) = A[M][K] * B[K][N] (bf16 bits, row-major). Block tile 64x32, k-step 32, 4 warps;
// warp w owns rows 16w..16w+15 of the block tile and all 4 n8 tiles.
constexpr int kBM = 64, kBN = 32, kBK = 32;
constexpr int kStride = kBK + 8;  // padded smem rows (80 bytes, 16-byte aligned)
constexpr int kThreads = 128;
constexpr size_t kSmemBytes = (kBM + kBK) * kStride * sizeof(uint16_t);

enum Mode {
  kCorrect = 0,
  kNoBarrierAfterLoad = 1,  // other warps' tiles read before they land
  kNoTrailingBarrier = 2,   // next tile overwrites smem other warps still read
  kWrongFragment = 3,       // a[1] and a[2] swapped
  kNoCpAsyncWait = 4,       // copies never completed
};

__global__ void tiled_matmul_kernel(const uint16_t* A, const uint16_t* B, float* C, int M, int N,
                                    int K, int mode) {
  SEGATTN_DYNAMIC_SMEM(uint16_t, smem);
  uint16_t* As = smem;                   // [kBM][kStride]
  uint16_t* Bs = smem + kBM * kStride;  // [kBK][kStride], B as stored: [k][n]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  float acc[4][4] = {};
  (void)M;

  for (int k0 = 0; k0 < K; k0 += kBK) {
    for (int c = tid; c < kBM * kBK / 8; c += kThreads) {  // 16-byte chunks of the A tile
      const int row = c / (kBK / 8), col = (c % (kBK / 8)) * 8;
      cp_async_16(As + row * kStride + col, A + (m0 + row) * K + k0 + col, true);
    }
    for (int c = tid; c < kBK * kBN / 8; c += kThreads) {
      const int row = c / (kBN / 8), col = (c % (kBN / 8)) * 8;
      cp_async_16(Bs + row * kStride + col, B + (k0 + row) * N + n0 + col, true);
    }
    cp_async_commit();
    if (mode != kNoCpAsyncWait) cp_async_wait<0>();
    if (mode != kNoBarrierAfterLoad) __syncthreads();

    for (int kk = 0; kk < kBK; kk += 16) {
      // x4: matrix i = lane / 8 covers rows 8*(i&1).., cols 8*(i>>1).. -> a[0..3] in mma order.
      const int i = lane / 8, r = lane % 8;
      uint32_t a[4];
      ldmatrix_x4(a, As + (warp * 16 + r + 8 * (i & 1)) * kStride + kk + 8 * (i >> 1));
      if (mode == kWrongFragment) {
        const uint32_t t = a[1];
        a[1] = a[2];
        a[2] = t;
      }
      for (int j = 0; j < 4; ++j) {
        // x2.trans over k rows kk..kk+15 of n columns 8j..8j+7 -> b[0], b[1].
        const int l = lane % 16;
        uint32_t b[2];
        ldmatrix_x2_trans(b, Bs + (kk + l) * kStride + 8 * j);
        mma_m16n8k16_bf16(acc[j], a, b, acc[j]);
      }
    }
    if (mode != kNoTrailingBarrier) __syncthreads();
  }

  const int g = lane >> 2, t = lane & 3;
  for (int j = 0; j < 4; ++j) {
    float* c0 = C + (m0 + warp * 16 + g) * N + n0 + 8 * j + 2 * t;
    float* c1 = c0 + 8 * N;
    c0[0] = acc[j][0];
    c0[1] = acc[j][1];
    c1[0] = acc[j][2];
    c1[1] = acc[j][3];
  }
}

}  // namespace

#if defined(SEGATTN_EMULATE)
// M a multiple of 64, N of 32, K of 32.
extern "C" int segattn_emu_test_tiled_matmul(int mode, const uint16_t* A, const uint16_t* B,
                                             float* C, int M, int N, int K) {
  return segattn::emu::launch(dim3(N / kBN, M / kBM), dim3(kThreads), kSmemBytes, [&] {
    tiled_matmul_kernel(A, B, C, M, N, K, mode);
  });
}
#endif
