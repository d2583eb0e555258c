// The per-segment attention mass on mma fragments: shared by the mass kernel (scores_kernel.cuh)
// and the forward kernel's fused mass output (fwd_kernel.cuh with Traits::kMass).
//
// Per key tile, after the online softmax turned the S accumulators into probabilities P: the
// segment sums are P (re-packed to f16 A fragments; P is in [0, 1], where f16 keeps 11
// significant bits) times a one-hot segment matrix B[key][seg] = 1 where the key's segment is seg,
// built in registers from the key ids (no shared-memory operand): one m16n8k16 mma per 16 keys and
// 8 segments, into C fragments acc[nb] (rows g and g + 8 of the warp; segments
// 8 nb + quad_col + {0, 1}). The caller rescales acc with the running max exactly like O (one
// pass: OnlineSoftmax::rescale) or clears it per tile (the mass kernel's second pass, where
// segments are numbered per tile).
#ifndef SEGATTN_SEGMENT_MASS_CUH
#define SEGATTN_SEGMENT_MASS_CUH

#include "platform.cuh"
#include "dtypes.cuh"
#include "ptx.cuh"
#include "segattn_params.h"
#include "kernel_traits.cuh"
#include "softmax.cuh"

namespace segattn {
namespace mass {

// Accumulator blocks of 8 segments on chip: segment ids 0..63 in one pass.
constexpr int kSegBlocks = 8;
constexpr int kMaxOnePassSegments = 8 * kSegBlocks;

// f16 bit patterns of a one-hot B fragment register: 1.0 (0x3C00) in the half whose key segment
// is `want`.
__device__ __forceinline__ uint32_t onehot2(int seg_lo, int seg_hi, int want) {
  return (seg_lo == want ? 0x3C00u : 0u) | (seg_hi == want ? 0x3C000000u : 0u);
}

// Adds v to *p: atomically on the GPU. The emulator runs a block's threads as fibers of one OS
// thread and blocks one after another, so a plain add is atomic there.
__device__ __forceinline__ void atomic_add(float* p, float v) {
#if defined(SEGATTN_EMULATE)
  *p += v;
#else
  atomicAdd(p, v);
#endif
}

// Where this thread's rows (g and g + 8 of 16-row tile `row_tile` of the block, query segment ids
// `row_seg`) land in `out`: the row of `mass` for (b, h), or nullptr for a row past q1.
__device__ __forceinline__ void row_outputs(const SegattnMassOutput& out, int b, int h, int q0, int q1, int row_tile,
                                            int g, const uint32_t (&row_seg)[2], float* (&row_out)[2]) {
  SEGATTN_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int row = q0 + row_tile * 16 + g + 8 * r;
    const int64_t ro = out.query_reduce != 0 ? static_cast<int64_t>(row_seg[r]) : static_cast<int64_t>(row);
    const int64_t ho = out.head_reduce != 0 ? 0 : h;
    row_out[r] = row < q1 ? out.mass + static_cast<int64_t>(b) * out.batch_stride + ho * out.head_stride +
                                ro * out.row_stride
                          : nullptr;
  }
}

// One k-step (keys 16 kc .. 16 kc + 15 of the tile) of acc[nb] += P x one-hot(segment of each
// key), for the segment blocks nb_lo..nb_hi (uniform over the block). `pa` holds P's f16 A
// fragments of the k-step: kTerms = 1, P rounded to f16 (11 significant bits); kTerms = 2, P
// times kTermScale rounded to f16 and the f16 rounding of what that left over, each multiplied in
// (about 22 bits: the segment sums agree with f32 ones to ~1e-6, which an order of importance
// scores needs; acc then holds kTermScale times the sums).
// `seg_of(j)` is the segment (id, or the tile-local number) of key j of the tile.
template <int kTerms, int kSB, class SegOf>
__device__ __forceinline__ void accumulate_step(int kc, const uint32_t (&pa)[kTerms][4], const SegOf& seg_of,
                                                int lane, int nb_lo, int nb_hi, float (&acc)[kSB][4]) {
  const int g = lane / 4;
  // B rows (keys) of this thread: 16 kc + quad_col + {0, 1} and + 8.
  const int j = 16 * kc + 2 * (lane % 4);
  const int seg[4] = {seg_of(j), seg_of(j + 1), seg_of(j + 8), seg_of(j + 9)};
  SEGATTN_UNROLL
  for (int nb = 0; nb < kSB; ++nb) {
    if (nb < nb_lo || nb > nb_hi) continue;  // uniform over the block
    const int want = 8 * nb + g;
    const uint32_t b[2] = {onehot2(seg[0], seg[1], want), onehot2(seg[2], seg[3], want)};
    SEGATTN_UNROLL
    for (int t = 0; t < kTerms; ++t) mma_m16n8k16_f16(acc[nb], pa[t], b, acc[nb]);
  }
}

// With two terms, P (at most 1) is scaled by this power of two first (exact in f32, unscaled by
// the caller): the leftover term of a probability near 1e-4 would otherwise fall among f16's
// subnormals and lose the bits it is there for. P x 2^12 stays far below f16's largest value.
constexpr float kTermScale = 4096.0f;

// P's f16 A fragment of k-step kc; with kTerms = 2, that of P x kTermScale and the f16 fragment
// of its rounding error.
template <int kTerms, int kNS>
__device__ __forceinline__ void p_terms(const float (&p)[kNS][4], int kc, uint32_t (&pa)[kTerms][4]) {
  if constexpr (kTerms == 1) {
    fwd::p_fragment<segattn::f16>(p, kc, pa[0]);
  } else {
    SEGATTN_UNROLL
    for (int r = 0; r < 4; ++r) {
      // Register r holds the C elements (2kc + r / 2, 2 (r % 2) + {0, 1}): see fwd::p_fragment.
      const float x0 = p[2 * kc + (r >> 1)][2 * (r & 1)] * kTermScale;
      const float x1 = p[2 * kc + (r >> 1)][2 * (r & 1) + 1] * kTermScale;
      pa[0][r] = pack2<segattn::f16>(x0, x1);
      const float2 hi = unpack2<segattn::f16>(pa[0][r]);
      pa[1][r] = pack2<segattn::f16>(x0 - hi.x, x1 - hi.y);
    }
  }
}

// The whole tile of accumulate_step.
template <int kTerms = 1, int kNS, int kSB, class SegOf>
__device__ __forceinline__ void accumulate(const float (&p)[kNS][4], const SegOf& seg_of, int lane, int nb_lo,
                                           int nb_hi, float (&acc)[kSB][4]) {
  SEGATTN_UNROLL
  for (int kc = 0; kc < kNS / 2; ++kc) {
    uint32_t pa[kTerms][4];
    p_terms<kTerms>(p, kc, pa);
    accumulate_step(kc, pa, seg_of, lane, nb_lo, nb_hi, acc);
  }
}

// acc += the row sums of the tile's P into the column of segment `seg` (a tile whose keys all
// belong to it, the common case: segments are runs of tokens), times `scale` (acc's scale): f32
// sums of the thread's P elements reduced over the quad, added by the thread that holds that
// column. No mma and no f16 rounding of P.
template <int kNS, int kSB>
__device__ __forceinline__ void add_row_sums(const float (&p)[kNS][4], bool have_partial, const float (&partial)[2],
                                             int seg, int lane, float scale, float (&acc)[kSB][4]) {
  float sum0 = 0.0f, sum1 = 0.0f;
  if (have_partial) {  // OnlineSoftmax::tile_sum: the same sums, already added up
    sum0 = partial[0];
    sum1 = partial[1];
  } else {
    SEGATTN_UNROLL
    for (int nb = 0; nb < kNS; ++nb) {
      sum0 += p[nb][0] + p[nb][1];
      sum1 += p[nb][2] + p[nb][3];
    }
  }
  sum0 = fwd::quad_sum(sum0) * scale;
  sum1 = fwd::quad_sum(sum1) * scale;
  // Column seg of a C fragment: block seg / 8, thread lane % 4 == (seg % 8) / 2, element seg % 2
  // (of rows g and g + 8). Added to every block with a 0 / 1 weight: a branch on the block lets
  // the compiler index acc at run time, which puts it in local memory.
  const bool mine = (lane % 4) == ((seg % 8) >> 1);
  const bool odd = (seg & 1) != 0;
  const float v[4] = {odd ? 0.0f : sum0, odd ? sum0 : 0.0f, odd ? 0.0f : sum1, odd ? sum1 : 0.0f};
  SEGATTN_UNROLL
  for (int nb = 0; nb < kSB; ++nb) {
    const float w = (mine && nb == seg / 8) ? 1.0f : 0.0f;
    SEGATTN_UNROLL
    for (int e = 0; e < 4; ++e) acc[nb][e] = fmaf(w, v[e], acc[nb][e]);
  }
}

// The tile's acc += P x one-hot(segment of each key): by add_row_sums when every key of the tile
// has one segment (`uniform`, uniform over the block), else by accumulate's mma. With
// `have_partial`, `partial` holds this thread's row sums of p (OnlineSoftmax::tile_sum).
template <int kTerms = 1, int kNS, int kSB, class SegOf>
__device__ __forceinline__ void accumulate_tile(const float (&p)[kNS][4], bool have_partial, const float (&partial)[2],
                                                const SegOf& seg_of, bool uniform, int lane, int nb_lo, int nb_hi,
                                                float (&acc)[kSB][4]) {
  if (uniform) {
    add_row_sums(p, have_partial, partial, seg_of(0), lane, kTerms == 2 ? kTermScale : 1.0f, acc);
  } else {
    accumulate<kTerms>(p, seg_of, lane, nb_lo, nb_hi, acc);
  }
}

// One-pass epilogue: acc (segment ids 0..8 kSB - 1) times each row's 1 / sum into the rows'
// outputs: every (row < q1, id < num_segments) element written, or the nonzero ones added under a
// reduction.
template <int kSB>
__device__ __forceinline__ void store_rows(const float (&acc)[kSB][4], const float (&inv)[2],
                                           float* const (&row_out)[2], const SegattnMassOutput& out, int lane) {
  const bool reduce = out.head_reduce != 0 || out.query_reduce != 0;
  const int quad_col = 2 * (lane % 4);
  SEGATTN_UNROLL
  for (int nb = 0; nb < kSB; ++nb) {
    SEGATTN_UNROLL
    for (int e = 0; e < 4; ++e) {
      const int seg = 8 * nb + quad_col + (e & 1);
      float* const dst = row_out[e >> 1];
      if (dst == nullptr || seg >= out.num_segments) continue;
      const float v = acc[nb][e] * inv[e >> 1];
      if (!reduce) {
        dst[seg] = v;
      } else if (v != 0.0f) {
        atomic_add(dst + seg, v);
      }
    }
  }
}

}  // namespace mass
}  // namespace segattn

#endif  // SEGATTN_SEGMENT_MASS_CUH
