// The wgmma probe: one warpgroup computes D = C + A B with wgmma.mma_async (A in registers, B in
// shared memory through a descriptor), B read from a [64][128] tile of 16-bit values stored the
// way a Hopper forward kernel will store its K and V tiles (bench/NOTES.md CUDA 34): two column
// halves of 64 elements, rows of 128 bytes, 16-byte chunk c of row r at chunk c ^ (r % 8),
// the tile 1024-byte aligned. Written here with its own formula, independently of the kernel's.
//   mode 0 (S = Q K^T): B[k][n] = tile[n][k], K-major, n < 64, k < 16 k_steps (<= 128)
//   mode 1 (O = P V):   B[k][n] = tile[k][n], MN-major, n < 128, k < 16 k_steps (<= 64)
//   mode 2 (O = P V at D 64): as mode 1 with n < 64
// The descriptors' leading and stride byte offsets are parameters (this reading: mode 0: LBO
// unused (16), SBO 1024; modes 1, 2: LBO 64 x 128 = 8192, the column halves' distance, SBO 1024), so
// that a GPU test can try another reading when the card disagrees.
// A is [64][16 k_steps] row-major, C and D [64][N] f32. skip_wait: D is written without waiting
// for the ops (the emulator must then leave C in place; on a GPU the result is undefined).
//
// The emulator runs it in `cargo test` (tests/emulator.rs); tests/gpu_fwd.rs runs it on a Hopper
// GPU (the sm_90a fatbin, kernels/hopper.txt), which is what confirms the emulator's reading of
// the PTX ISA before a kernel is built on it.
#include "dtypes.cuh"
#include "platform.cuh"
#include "ptx.cuh"
#include "kernel_traits.cuh"
#include "wgmma.cuh"

namespace {

__device__ __forceinline__ uint32_t pair16(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// Byte offset of element (r, c) of the tile.
__device__ __forceinline__ int tile_offset(int r, int c) {
  return (c / 64) * 64 * 128 + r * 128 + (((c % 64) / 8) ^ (r % 8)) * 16 + (c % 8) * 2;
}

template <class T, int kN, bool kTransB>
__device__ void probe_body(const uint16_t* a, const uint16_t* tile, const float* c, float* d, int k_steps,
                           uint32_t lbo, uint32_t sbo, bool skip_wait) {
  SEGATTN_DYNAMIC_SMEM(char, smem);
  char* const base = smem + ((1024 - (smem_u32addr(smem) & 1023)) & 1023);
  const int tid = static_cast<int>(threadIdx.x);
  for (int i = tid; i < 64 * 128; i += 128) {
    *reinterpret_cast<uint16_t*>(base + tile_offset(i / 128, i % 128)) = tile[i];
  }
  fence_proxy_async_smem();
  __syncthreads();

  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int ka = 16 * k_steps;  // A's columns
  float acc[kN / 8][4];
  for (int j = 0; j < kN / 8; ++j) {
    for (int e = 0; e < 4; ++e) acc[j][e] = c[(16 * warp + g + 8 * (e / 2)) * kN + 8 * j + 2 * t + e % 2];
  }
  // Unrolled over the most k-steps (k_steps <= 8), so that the fragments stay in registers.
  uint32_t frag[8][4];
  SEGATTN_UNROLL
  for (int kc = 0; kc < 8; ++kc) {
    if (kc >= k_steps) break;
    const uint16_t* r0 = a + (16 * warp + g) * ka + 16 * kc;
    const uint16_t* r8 = r0 + 8 * ka;
    frag[kc][0] = pair16(r0[2 * t], r0[2 * t + 1]);
    frag[kc][1] = pair16(r8[2 * t], r8[2 * t + 1]);
    frag[kc][2] = pair16(r0[2 * t + 8], r0[2 * t + 9]);
    frag[kc][3] = pair16(r8[2 * t + 8], r8[2 * t + 9]);
  }
  wgmma_fence();
  SEGATTN_UNROLL
  for (int kc = 0; kc < 8; ++kc) {
    if (kc >= k_steps) break;
    // K-major: the 16 k of step kc lie in column half kc / 4, 32 bytes per step within it.
    // MN-major: rows 16 kc .. of the tile; LBO = the column halves' distance, SBO = 8 rows.
    const uint64_t desc = kTransB ? wgmma_desc_sw128(base + kc * 16 * 128, lbo, sbo)
                                  : wgmma_desc_sw128(base + (kc / 4) * 64 * 128 + (kc % 4) * 32, lbo, sbo);
    wgmma_rs<T, kN, kTransB>(acc, frag[kc], desc, true);
  }
  wgmma_commit();
  if (!skip_wait) wgmma_wait<0>();
  wgmma_fence_operands(acc);
  for (int j = 0; j < kN / 8; ++j) {
    for (int e = 0; e < 4; ++e) d[(16 * warp + g + 8 * (e / 2)) * kN + 8 * j + 2 * t + e % 2] = acc[j][e];
  }
}

// The probe of `mode` (0: K-major, N 64; 1: MN-major, N 128; 2: MN-major, N 64, the V tile of a
// D 64 kernel) in bf16 or f16.
__device__ void run_probe(int mode, bool is_bf16, const uint16_t* a, const uint16_t* tile, const float* c, float* d,
                          int k_steps, uint32_t lbo, uint32_t sbo, bool skip_wait) {
  using segattn::f16;
  if (mode == 0) {
    if (is_bf16) probe_body<segattn::bf16, 64, false>(a, tile, c, d, k_steps, lbo, sbo, skip_wait);
    else probe_body<f16, 64, false>(a, tile, c, d, k_steps, lbo, sbo, skip_wait);
  } else if (mode == 1) {
    if (is_bf16) probe_body<segattn::bf16, 128, true>(a, tile, c, d, k_steps, lbo, sbo, skip_wait);
    else probe_body<f16, 128, true>(a, tile, c, d, k_steps, lbo, sbo, skip_wait);
  } else {
    if (is_bf16) probe_body<segattn::bf16, 64, true>(a, tile, c, d, k_steps, lbo, sbo, skip_wait);
    else probe_body<f16, 64, true>(a, tile, c, d, k_steps, lbo, sbo, skip_wait);
  }
}

}  // namespace

// The GPU entry (the sm_90a fatbin): `mode` and the dtype as above; 128 threads, 17 KiB of
// dynamic shared memory.
extern "C" __global__ void __launch_bounds__(128) segattn_wgmma_probe(int mode, int is_bf16, const uint16_t* a,
                                                                     const uint16_t* tile, const float* c, float* d,
                                                                     int k_steps, int lbo, int sbo) {
  run_probe(mode, is_bf16 != 0, a, tile, c, d, k_steps, lbo, sbo, false);
}

#if defined(SEGATTN_EMULATE)
extern "C" int segattn_emu_test_wgmma(int mode, int is_bf16, const uint16_t* a, const uint16_t* tile,
                                      const float* c, float* d, int k_steps, int skip_wait) {
  const uint32_t lbo = mode == 0 ? 16 : 64 * 128, sbo = 1024;
  return segattn::emu::launch(dim3(1), dim3(128), 1024 + 64 * 128 * 2, [&] {
    run_probe(mode, is_bf16 != 0, a, tile, c, d, k_steps, lbo, sbo, skip_wait != 0);
  });
}
#endif
