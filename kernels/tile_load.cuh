// Data movement of the forward kernel: global -> shared tiles with cp.async (predicated, zero-fill
// past the sequence end) and shared -> register mma fragments with ldmatrix. Tiles are
// [rows][head_dim] 16-bit, swizzled as described in kernel_traits.cuh.
#ifndef SEGATTN_TILE_LOAD_CUH
#define SEGATTN_TILE_LOAD_CUH

#include "platform.cuh"
#include "ptx.cuh"
#include "kernel_traits.cuh"

namespace segattn {
namespace fwd {

// Issues the cp.async copies of a kRows-row tile: row r of the tile is global row `src_row0 + r`
// (element pointer `src` + r * row_stride), for r < rows_valid; rows past it are zero-filled (the
// source pointer then stays at row 0 of the tile, which exists). Thread t copies chunk t % kChunks
// of rows t / kChunks + m kRowsPerRound: its source advances by a fixed stride and its
// destination by a constant (the swizzle repeats every 8 rows), so each copy costs a pointer add
// and a compare, not a 64-bit row multiply (the loop is issue-bound: every instruction counts).
// Does not commit.
template <class Traits, int kRows>
__device__ __forceinline__ void load_tile_async(char* smem_tile, const typename Traits::T* src, int64_t row_stride,
                                                int rows_valid) {
  using T = typename Traits::T;
  constexpr int kChunks = Traits::kChunks;
  constexpr int kRowsPerRound = Traits::kThreads / kChunks;
  static_assert(Traits::kThreads % kChunks == 0 && kRows % kRowsPerRound == 0, "whole copy rounds");
  static_assert(kRowsPerRound % 8 == 0 || 8 % kRowsPerRound == 0, "a swizzle pattern per round or per 8 rows");
  const int row0 = static_cast<int>(threadIdx.x) / kChunks;
  const int chunk = static_cast<int>(threadIdx.x) % kChunks;
  const T* const first = src + chunk * 8;
  const T* g = first + static_cast<int64_t>(row0) * row_stride;
  const int64_t step = kRowsPerRound * row_stride;
  char* const dst = smem_tile + tile_offset<Traits, kRows>(row0, chunk);
  // Round m's destination: a constant step when every round has this thread's swizzle pattern
  // (rounds of 8 rows or more); D = 256 copies 4 rows a round, whose patterns alternate (m is a
  // compile-time constant in the unrolled loops, so this is still one add).
  const auto dst_of = [&](int m) -> char* {
    if constexpr (kRowsPerRound % 8 == 0) {
      return dst + m * kRowsPerRound * kRowPitch<Traits>;
    } else {
      static_assert(!UsesWgmma<Traits>::value, "the wgmma layout's copies come in rounds of 8 rows");
      constexpr int kPeriod = 8 / kRowsPerRound;  // rounds per swizzle period
      return smem_tile + swizzle<kChunks>(row0 + (m % kPeriod) * kRowsPerRound, chunk) +
             (m / kPeriod) * 8 * kChunks * 16;
    }
  };
  if (rows_valid >= kRows) {  // every tile but a ragged last one: no per-row test
    SEGATTN_UNROLL
    for (int m = 0; m < kRows / kRowsPerRound; ++m) {
      cp_async_16(dst_of(m), g, true);
      g += step;
    }
    return;
  }
  SEGATTN_UNROLL
  for (int m = 0; m < kRows / kRowsPerRound; ++m) {
    const bool pred = row0 + m * kRowsPerRound < rows_valid;
    cp_async_16(dst_of(m), pred ? g : first, pred);
    g += step;
  }
}

// The A fragment of 16-row tile `row_tile` of the Q tile (rows 16 * row_tile ..; a warp's own, or
// one of them) for k-step kc (dims 16 kc ..): ldmatrix.x4 matrices 0..3 = (rows 0-7, cols 0-7),
// (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15) of the 16 x 16 block =
// a0..a3 of m16n8k16.
template <class Traits>
__device__ __forceinline__ void load_q_fragment(const char* sq, int row_tile, int lane, int kc, uint32_t (&qa)[4]) {
  // Row row_tile 16 + (lane & 7) + ((lane >> 3) & 1) 8, chunk 2 kc + (lane >> 4).
  if constexpr (UsesWgmma<Traits>::value) {
    // (Once per block, before the loop: the plain address computation.)
    ldmatrix_x4(qa, sq + tile_offset<Traits, Traits::kBlockM>(row_tile * 16 + (lane & 15), 2 * kc + (lane >> 4)));
  } else {
    const SwizzledRows<Traits::kChunks> rows(lane & 15, lane >> 4);
    ldmatrix_x4(qa, sq + rows.at(row_tile * 16, kc));
  }
}

// The A fragments of all head_dim / 16 k-steps.
template <class Traits>
__device__ __forceinline__ void load_q_fragments(const char* sq, int row_tile, int lane,
                                                 uint32_t (&qf)[Traits::kDK][4]) {
  SEGATTN_UNROLL
  for (int kc = 0; kc < Traits::kDK; ++kc) load_q_fragment<Traits>(sq, row_tile, lane, kc, qf[kc]);
}

// B fragments of K^T for key n-blocks 2*np and 2*np+1 (keys 16*np .. +16) and k-step kc (dims
// 16*kc .. +16). K is stored [key][dim], which is B = K^T in the column-major form mma wants, so no
// transpose: matrices (keys 0-7, dims 0-7) = b0 of n-block 2np, (keys 0-7, dims 8-15) = b1,
// (keys 8-15, dims 0-7) = b0 of n-block 2np+1, (keys 8-15, dims 8-15) = b1.
template <class Traits>
__device__ __forceinline__ void load_k_fragments(const char* sk, int np, int kc, int lane, uint32_t (&kb)[4]) {
  // Row np 16 + (lane & 7) + (lane >> 4) 8, chunk 2 kc + ((lane >> 3) & 1).
  const SwizzledRows<Traits::kChunks> rows((lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1);
  ldmatrix_x4(kb, sk + rows.at(np * 16, kc));
}

// B fragments of V for output n-blocks 2*dp and 2*dp+1 (dims 16*dp .. +16) and k-step kc (keys
// 16*kc .. +16). V is stored [key][dim] = B row-major, so ldmatrix .trans: matrices (keys 0-7,
// dims 0-7) = b0 of n-block 2dp, (keys 8-15, dims 0-7) = b1, (keys 0-7, dims 8-15) = b0 of n-block
// 2dp+1, (keys 8-15, dims 8-15) = b1.
template <class Traits>
__device__ __forceinline__ void load_v_fragments(const char* sv, int dp, int kc, int lane, uint32_t (&vb)[4]) {
  // Row kc 16 + (lane & 7) + ((lane >> 3) & 1) 8, chunk 2 dp + (lane >> 4).
  const SwizzledRows<Traits::kChunks> rows(lane & 15, lane >> 4);
  ldmatrix_x4_trans(vb, sv + rows.at(kc * 16, dp));
}

}  // namespace fwd
}  // namespace segattn

#endif  // SEGATTN_TILE_LOAD_CUH
