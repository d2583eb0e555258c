// Online softmax on mma accumulator fragments (FlashAttention-2), entirely in registers.
//
// m16n8k16 C/D fragment of one warp: lane l holds, for each 8-column block, c0,c1 at row
// g = l / 4, columns 2 * (l % 4) + {0, 1}, and c2,c3 at row g + 8. So each thread owns two rows of
// its warp's 16 (index r = 0 for g, 1 for g + 8); the 4 lanes of a quad (same g) hold the rest of
// those rows, and row reductions are two xor-shuffles (1, 2) inside the quad.
//
// Scores arrive already scaled by scale * log2(e) (so exp2 is the exponential) and masked (-inf).
// A row that has seen no visible key keeps max = -inf and sum = 0: its output is 0 and its LSE
// -inf, never NaN (the exponent reference is taken as 0 while the max is -inf).
//
// The exponent reference of a row moves only when a tile's max exceeds it by more than
// kRefSlack (FlashAttention-3's trick): probabilities then stay below 2^kRefSlack, and most tiles
// leave O and the other accumulators as they are; a warp skips their rescaling (64 multiplies a
// tile at D = 128) when none of its rows moved. Exact: the output and the LSE are computed against
// whatever reference was used. kRefSlack = 3 keeps P x mass::kTermScale (2^12) inside f16.
#ifndef SEGATTN_SOFTMAX_CUH
#define SEGATTN_SOFTMAX_CUH

#include "platform.cuh"
#include "dtypes.cuh"
#include "ptx.cuh"
#include "kernel_traits.cuh"

namespace segattn {
namespace fwd {

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, shfl_xor(x, 1));
  return fmaxf(x, shfl_xor(x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += shfl_xor(x, 1);
  return x + shfl_xor(x, 2);
}

// Whether a row's softmax sum normalises it: positive (the row saw a key), or NaN (NaN scores,
// from NaN inputs: the output and LSE are then NaN, as the reference's). A sum of 0 is a row that
// saw nothing (output 0, LSE -inf). The finalize below, the mass kernel's stats pass and the
// split-K merge all decide by it.
__device__ __forceinline__ bool row_seen(float sum) { return sum > 0.0f || isnan(sum); }

constexpr float kRefSlack = 3.0f;

struct OnlineSoftmax {
  float row_max[2];  // exponent reference of the scaled scores (log2 domain): at most kRefSlack
                     // below the running max; -inf before any key
  float row_sum[2];  // this thread's partial sum of exp2(s - row_max) (quad-reduced at the end)
  float alpha[2];    // the last update's rescale factor (for accumulators other than O)
  float tile_sum[2];  // this thread's partial sum of the last tile's probabilities (the mass
                      // kernels add a one-segment tile's row sums from it)
  float tile_before[2];  // update<true>: the part of tile_sum before the split column, and
  float tile_after[2];   // the part from it on (a tile of two key segments)
  bool moved;        // warp-uniform: the last update moved some row's reference (alpha != 1)

  __device__ __forceinline__ void init() {
    SEGATTN_UNROLL
    for (int r = 0; r < 2; ++r) {
      row_max[r] = -INFINITY;
      row_sum[r] = 0.0f;
      alpha[r] = 1.0f;
    }
    moved = false;
  }

  // One key tile: turns the scores `s` [kNS][4] into unnormalised probabilities in place and
  // rescales the output accumulator `o` [kNO][4] to the new running max (other accumulators:
  // rescale afterwards). kSplit: also the row sums before column `split` of the tile and from
  // it on (tile_before, tile_after), in the same pass over the probabilities.
  template <bool kSplit = false, int kNS, int kNO>
  __device__ __forceinline__ void update(float (&s)[kNS][4], float (&o)[kNO][4], int split = 0, int lane = 0) {
    probabilities<kSplit>(s, split, lane);
    rescale(o);
  }

  // update without O's rescaling, which the caller does with `rescale` once O may be written (the
  // wgmma kernel: after the previous tile's P V, still running during this, has completed).
  template <bool kSplit = false, int kNS>
  __device__ __forceinline__ void probabilities(float (&s)[kNS][4], int split = 0, int lane = 0) {
    const int limit = split - 2 * (lane % 4);  // kSplit: relative to this thread's first column
    bool any = false;
    SEGATTN_UNROLL
    for (int r = 0; r < 2; ++r) {
      float tile_max = -INFINITY;
      SEGATTN_UNROLL
      for (int nb = 0; nb < kNS; ++nb) {
        tile_max = fmaxf(tile_max, fmaxf(s[nb][2 * r], s[nb][2 * r + 1]));
      }
      tile_max = quad_max(tile_max);
      // Moves on the first visible key (-inf + slack is -inf) and past the slack.
      const bool move = tile_max > row_max[r] + kRefSlack;
      const float new_ref = move ? tile_max : row_max[r];
      // Exponent reference: 0 while the row has seen nothing (all its scores are -inf then).
      const float ref = new_ref == -INFINITY ? 0.0f : new_ref;
      alpha[r] = move ? exp2_approx(row_max[r] - ref) : 1.0f;
      any = any || move;
      row_max[r] = new_ref;
      float sum = 0.0f;
      float before = 0.0f;
      float after = 0.0f;
      SEGATTN_UNROLL
      for (int nb = 0; nb < kNS; ++nb) {
        const float p0 = exp2_approx(s[nb][2 * r] - ref);
        const float p1 = exp2_approx(s[nb][2 * r + 1] - ref);
        s[nb][2 * r] = p0;
        s[nb][2 * r + 1] = p1;
        sum += p0 + p1;
        if constexpr (kSplit) {
          before += (nb * 8 < limit ? p0 : 0.0f) + (nb * 8 + 1 < limit ? p1 : 0.0f);
          after += (nb * 8 < limit ? 0.0f : p0) + (nb * 8 + 1 < limit ? 0.0f : p1);
        }
      }
      tile_sum[r] = sum;
      tile_before[r] = before;
      tile_after[r] = after;
      row_sum[r] = fmaf(row_sum[r], alpha[r], sum);
    }
    moved = __any_sync(0xffffffffu, any) != 0;
  }

  // Rescales an accumulator of the same rows (C fragments [kN][4]) to the reference of the last
  // update, as update does for O; nothing when no row of the warp moved (warp-uniform).
  template <int kN>
  __device__ __forceinline__ void rescale(float (&acc)[kN][4]) const {
    if (!moved) return;
    SEGATTN_UNROLL
    for (int nb = 0; nb < kN; ++nb) {
      SEGATTN_UNROLL
      for (int e = 0; e < 4; ++e) acc[nb][e] *= alpha[e >> 1];
    }
  }

  // After the last tile: the factor that normalises each row (0 for a row that saw nothing) and
  // its natural-log LSE (-inf for such a row). A NaN sum (NaN scores, from NaN inputs) makes both
  // NaN, as the reference's softmax is. Collective over the quad.
  __device__ __forceinline__ void finalize(float (&inv)[2], float (&lse)[2]) const {
    SEGATTN_UNROLL
    for (int r = 0; r < 2; ++r) {
      const float sum = quad_sum(row_sum[r]);
      const bool seen = row_seen(sum);
      inv[r] = seen ? 1.0f / sum : 0.0f;
      lse[r] = seen ? (row_max[r] + log2f(sum)) * 0.69314718055994530942f : -INFINITY;
    }
  }
};

// P's A fragment (16-bit type T) of k-step kc (keys 16 kc .. 16 kc + 15) from the tile's
// probabilities held as S accumulators (n-blocks of 8 keys): the C fragments of n-blocks 2kc and
// 2kc+1 are exactly the A fragment of k-step kc, so P never leaves the registers.
template <class T, int kNS>
__device__ __forceinline__ void p_fragment(const float (&p)[kNS][4], int kc, uint32_t (&pa)[4]) {
  pa[0] = pack2<T>(p[2 * kc][0], p[2 * kc][1]);
  pa[1] = pack2<T>(p[2 * kc][2], p[2 * kc][3]);
  pa[2] = pack2<T>(p[2 * kc + 1][0], p[2 * kc + 1][1]);
  pa[3] = pack2<T>(p[2 * kc + 1][2], p[2 * kc + 1][3]);
}

}  // namespace fwd
}  // namespace segattn

#endif  // SEGATTN_SOFTMAX_CUH
