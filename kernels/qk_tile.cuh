// The S = Q K^T tile of one warp (16 query rows x kBlockN keys) with mma.sync m16n8k16, shared by
// the forward kernel (fwd_kernel.cuh) and the mass kernel (scores_kernel.cuh).
#ifndef SEGATTN_QK_TILE_CUH
#define SEGATTN_QK_TILE_CUH

#include <type_traits>

#include "platform.cuh"
#include "dtypes.cuh"
#include "ptx.cuh"
#include "kernel_traits.cuh"
#include "tile_load.cuh"

namespace segattn {
namespace fwd {

// d += a b on 16-bit T (bf16 or f16) fragments, f32 accumulate; b given as its two registers.
template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  if constexpr (std::is_same<T, segattn::bf16>::value) {
    mma_m16n8k16_bf16(d, a, b, d);
  } else {
    mma_m16n8k16_f16(d, a, b, d);
  }
}

// s[i] = Q_i K^T for the kMT row tiles of a warp and the K tile at `s_k` (shared, swizzled).
// `q_fragment(i, kc, qa)` puts row tile i's A fragment of k-step kc (dims 16 kc .. 16 kc + 15) in
// qa: from registers held for the whole loop, or from the Q tile in shared memory where registers
// are short. Each K fragment is loaded once and serves every row tile (kMT > 1 halves the
// ldmatrix traffic per mma of K).
template <class Traits, int kMT, class QFragment>
__device__ __forceinline__ void qk_tiles(const QFragment& q_fragment, const char* s_k, int lane,
                                         float (&s)[kMT][Traits::kNS][4]) {
  using T = typename Traits::T;
  SEGATTN_UNROLL
  for (int i = 0; i < kMT; ++i) {
    SEGATTN_UNROLL
    for (int nb = 0; nb < Traits::kNS; ++nb) {
      SEGATTN_UNROLL
      for (int e = 0; e < 4; ++e) s[i][nb][e] = 0.0f;
    }
  }
  SEGATTN_UNROLL
  for (int kc = 0; kc < Traits::kDK; ++kc) {
    uint32_t qa[kMT][4];
    SEGATTN_UNROLL
    for (int i = 0; i < kMT; ++i) q_fragment(i, kc, qa[i]);
    SEGATTN_UNROLL
    for (int np = 0; np < Traits::kNS / 2; ++np) {
      uint32_t kb[4];
      load_k_fragments<Traits>(s_k, np, kc, lane, kb);
      SEGATTN_UNROLL
      for (int i = 0; i < kMT; ++i) {
        mma_16816<T>(s[i][2 * np], qa[i], kb[0], kb[1]);
        mma_16816<T>(s[i][2 * np + 1], qa[i], kb[2], kb[3]);
      }
    }
  }
}

// qk_tiles for one row tile: `q_fragment(kc, qa)`.
template <class Traits, class QFragment>
__device__ __forceinline__ void qk_tile(const QFragment& q_fragment, const char* s_k, int lane,
                                        float (&s)[Traits::kNS][4]) {
  qk_tiles<Traits, 1>([&](int, int kc, uint32_t(&qa)[4]) { q_fragment(kc, qa); }, s_k, lane,
                      reinterpret_cast<float(&)[1][Traits::kNS][4]>(s));
}

// s += Q K^T on the key columns [a, e) of the tile only (a piece of PINE's rope kernel: one key
// segment, with Q turned for it), for one row tile; a and e are block-uniform. Column pairs of 16
// keys are visited one at a time (compile-time indices, uniform branches): a pair outside the
// piece costs nothing, a pair inside it the plain k-steps, and only a pair that the piece cuts
// zeroes the B fragments of the keys outside it (so the mma adds exactly nothing to their
// columns, and every piece accumulates straight into s). Per column the k-steps add in the same
// order as in qk_tile. Q's fragment is re-read for each pair (one more ldmatrix per k-step and
// pair): cheaper than testing each pair at each k-step, which cost ~500 instructions a piece.
template <class Traits, class QFragment>
__device__ __forceinline__ void qk_piece(const QFragment& q_fragment, const char* s_k, int lane, int a, int e,
                                         float (&s)[Traits::kNS][4]) {
  using T = typename Traits::T;
  const int g = lane / 4;
  SEGATTN_UNROLL
  for (int np = 0; np < Traits::kNS / 2; ++np) {
    const int c0 = np * 16;
    if (c0 >= e || c0 + 16 <= a) continue;
    if (c0 >= a && c0 + 16 <= e) {
      SEGATTN_UNROLL
      for (int kc = 0; kc < Traits::kDK; ++kc) {
        uint32_t qa[4], kb[4];
        q_fragment(kc, qa);
        load_k_fragments<Traits>(s_k, np, kc, lane, kb);
        mma_16816<T>(s[2 * np], qa, kb[0], kb[1]);
        mma_16816<T>(s[2 * np + 1], qa, kb[2], kb[3]);
      }
    } else {
      // This thread's B fragments hold keys c0 + g (n-block 2 np) and c0 + 8 + g (2 np + 1).
      const uint32_t m0 = (c0 + g >= a && c0 + g < e) ? ~0u : 0u;
      const uint32_t m1 = (c0 + 8 + g >= a && c0 + 8 + g < e) ? ~0u : 0u;
      SEGATTN_UNROLL
      for (int kc = 0; kc < Traits::kDK; ++kc) {
        uint32_t qa[4], kb[4];
        q_fragment(kc, qa);
        load_k_fragments<Traits>(s_k, np, kc, lane, kb);
        mma_16816<T>(s[2 * np], qa, kb[0] & m0, kb[1] & m0);
        mma_16816<T>(s[2 * np + 1], qa, kb[2] & m1, kb[3] & m1);
      }
    }
  }
}

}  // namespace fwd
}  // namespace segattn

#endif  // SEGATTN_QK_TILE_CUH
