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
// Most tiles need no mma (segments are runs of tokens): one pass, a tile inside one segment adds
// the softmax's row sums to PendingSums (two numbers, moved into acc when the segment changes),
// and a tile of two segments its f32 sums on either side of the boundary (accumulate_one_pass).
// The wide forward kernel (two row tiles per warp) has no registers for acc: its rows' sums live
// in shared memory (MassRows, accumulate_rows_in_smem, at the end of this file).
#ifndef SEGATTN_SEGMENT_MASS_CUH
#define SEGATTN_SEGMENT_MASS_CUH

#include "platform.cuh"
#include "dtypes.cuh"
#include "ptx.cuh"
#include "segattn_params.h"
#include "kernel_traits.cuh"
#include "mask.cuh"
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
// The scale the sums are held at with kTerms terms of P: kTermScale for two, 1 for one.
template <int kTerms>
constexpr float kSumScale = kTerms == 2 ? kTermScale : 1.0f;

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

// acc += this thread's partial row sums `sum` (rows g and g + 8) reduced over the quad, into the
// column of segment `seg`, times `scale` (acc's scale): added by the thread that holds that
// column. Collective over the quad.
template <int kSB>
__device__ __forceinline__ void add_to_column(const float (&sum)[2], int seg, int lane, float scale,
                                              float (&acc)[kSB][4]) {
  const float sum0 = fwd::quad_sum(sum[0]) * scale;
  const float sum1 = fwd::quad_sum(sum[1]) * scale;
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

// acc += the row sums of the tile's P into the column of segment `seg` (a tile whose keys all
// belong to it), times `scale`: f32 sums, no mma and no f16 rounding of P. (The exact second
// pass of the mass kernel; one pass goes through PendingSums.)
template <int kNS, int kSB>
__device__ __forceinline__ void add_row_sums(const float (&p)[kNS][4], int seg, int lane, float scale,
                                             float (&acc)[kSB][4]) {
  float sum[2] = {0.0f, 0.0f};
  SEGATTN_UNROLL
  for (int nb = 0; nb < kNS; ++nb) {
    sum[0] += p[nb][0] + p[nb][1];
    sum[1] += p[nb][2] + p[nb][3];
  }
  add_to_column(sum, seg, lane, scale, acc);
}

// The tile's acc += P x one-hot(segment of each key) (the exact second pass: acc holds the tile's
// sums only): by add_row_sums when every key of the tile has one segment (`uniform`, uniform over
// the block), else by accumulate's mma.
template <int kTerms, int kNS, int kSB, class SegOf>
__device__ __forceinline__ void accumulate_tile(const float (&p)[kNS][4], const SegOf& seg_of, bool uniform, int lane,
                                                int nb_lo, int nb_hi, float (&acc)[kSB][4]) {
  if (uniform) {
    add_row_sums(p, seg_of(0), lane, kSumScale<kTerms>, acc);
  } else {
    accumulate<kTerms>(p, seg_of, lane, nb_lo, nb_hi, acc);
  }
}

// One pass: the row sums of the key segment the last tiles lay in, not yet added to the
// accumulators. Segments are runs of tokens, so consecutive key tiles mostly share one: such a
// tile adds two numbers here (the softmax's row sums), and the quad reduction and the weighted
// adds into acc (~35 instructions) happen once per change of segment instead of once per tile.
// Rescaled with the softmax like acc, so the sum of both is what acc alone held before.
struct PendingSums {
  float sum[2];  // this thread's partial row sums (rows g and g + 8), not reduced over the quad
  int seg;       // their key segment id (uniform over the block); -1: none yet

  __device__ __forceinline__ void init() {
    sum[0] = 0.0f;
    sum[1] = 0.0f;
    seg = -1;
  }

  // To the reference of the softmax's last update (as OnlineSoftmax::rescale does acc).
  __device__ __forceinline__ void rescale(const fwd::OnlineSoftmax& sm) {
    if (!sm.moved) return;
    sum[0] *= sm.alpha[0];
    sum[1] *= sm.alpha[1];
  }

  // Moves the pending sums into acc (times `scale`). Quad-collective; call it uniformly.
  template <int kSB>
  __device__ __forceinline__ void flush(int lane, float scale, float (&acc)[kSB][4]) {
    if (seg >= 0) add_to_column(sum, seg, lane, scale, acc);
    sum[0] = 0.0f;
    sum[1] = 0.0f;
    seg = -1;
  }

  // Adds row sums of key segment `id` (uniform), flushing the pending ones of another segment.
  template <int kSB>
  __device__ __forceinline__ void add(int id, float v0, float v1, int lane, float scale, float (&acc)[kSB][4]) {
    if (id != seg) {
      flush(lane, scale, acc);
      seg = id;
    }
    sum[0] += v0;
    sum[1] += v1;
  }
};

// This thread's partial row sums of P over the tile's columns before `end0` and from it on (a
// tile of two key segments): exact f32 sums, each element in one of them.
template <int kNS>
__device__ __forceinline__ void run_sums(const float (&p)[kNS][4], int end0, int lane, float (&before)[2],
                                         float (&after)[2]) {
  const int end = end0 - 2 * (lane % 4);  // relative to this thread's first column
  SEGATTN_UNROLL
  for (int r = 0; r < 2; ++r) {
    before[r] = 0.0f;
    after[r] = 0.0f;
  }
  SEGATTN_UNROLL
  for (int nb = 0; nb < kNS; ++nb) {
    SEGATTN_UNROLL
    for (int e = 0; e < 4; ++e) {
      const float x = p[nb][e];
      const float lo = nb * 8 + (e & 1) < end ? x : 0.0f;
      before[e >> 1] += lo;
      after[e >> 1] += x - lo;  // exactly x or 0
    }
  }
}

// One pass, a key tile's P into the per-segment sums (acc holds them times `scale`): a tile inside
// one segment adds the softmax's row sums `tile_sum` to `pending`; a tile of two segments its
// sums on either side of the boundary; any other tile goes through the one-hot mma (kTerms terms
// of P) for the 8-segment blocks between its first and last id. `kid`: the tile's kN key ids in
// shared memory, the first `valid` of them keys. After the softmax's update and
// pending.rescale.
template <int kTerms, int kN, int kNS, int kSB>
__device__ __forceinline__ void accumulate_one_pass(const float (&p)[kNS][4], const float (&tile_sum)[2],
                                                    const uint32_t* kid, int valid, int lane, PendingSums& pending,
                                                    float (&acc)[kSB][4]) {
  constexpr float scale = kSumScale<kTerms>;
  const uint32_t last_id = kid[valid - 1];
  if (kid[0] == last_id) {  // one segment: ids are non-decreasing along a row (validated)
    pending.add(static_cast<int>(last_id), tile_sum[0], tile_sum[1], lane, scale, acc);
    return;
  }
  const mask::KeyRuns runs = mask::key_runs<kN>(kid, valid, lane);
  if (runs.at_most_two) {
    float before[2], after[2];
    run_sums(p, runs.end0, lane, before, after);
    pending.add(static_cast<int>(runs.id0), before[0], before[1], lane, scale, acc);
    pending.add(static_cast<int>(runs.id1), after[0], after[1], lane, scale, acc);
    return;
  }
  accumulate<kTerms>(p, [&](int j) { return static_cast<int>(kid[j]); }, lane, static_cast<int>(kid[0] / 8u),
                     static_cast<int>(last_id / 8u), acc);
}

// The fused mass of the wide kernel (two 16-row tiles per warp), whose registers have no room
// for accumulator blocks (nor for pending sums: the loop sits at the 255 cap): each row's
// per-segment sums in shared memory, `[kBlockM][stride]` f32. A row is owned by one lane of its
// quad (lane % 4 = 2 i + r: row g + 8 r of the warp's row tile i), which alone adds to it,
// rescales it and stores it: no barrier and no atomic on the common paths (a lane reading
// another's row would need a __syncwarp, whose absence the emulator's fiber order hides). A
// tile's four row sums of a quad are reduced over it with three shuffles that leave each lane its
// own row's (quad_sums_to_owners). The block's rows are described where used (`rows_of()`, a MassRows
// derived from the kernel parameters), not held in registers through the loop.
struct MassRows {
  float* acc;        // [kBlockM][stride], row tile 1's rows fwd::kMassTile1Skew floats further on
  int stride;        // FwdTraits::mass_row_stride(num_segments)
  int num_segments;  // ids 0..num_segments - 1 kept (the mass's Sk)
  int tile0_row0;    // the block rows of the warp's two row tiles
  int tile1_row0;

  // The row this lane owns.
  __device__ __forceinline__ float* owned(int lane) const {
    const int c = lane % 4;
    const bool tile1 = (c & 2) != 0;
    const int skew = tile1 ? fwd::kMassTile1Skew : 0;
    return acc + skew + ((tile1 ? tile1_row0 : tile0_row0) + lane / 4 + 8 * (c & 1)) * stride;
  }
};

__device__ __forceinline__ void zero_owned_row(const MassRows& rows, int lane) {
  float* const row = rows.owned(lane);
  for (int j = 0; j < rows.num_segments; ++j) row[j] = 0.0f;
}

// v[i][r]: this thread's partial sums of rows g + 8 r of row tile i. Returns the quad's total
// of the row this lane owns (index 2 i + r = lane % 4): each step keeps the half of the values
// its side of a lane bit owns and adds its partner's copy of that half.
__device__ __forceinline__ float quad_sums_to_owners(const float (&v)[2][2], int lane) {
  const bool upper = (lane & 2) != 0;  // owns a row of row tile 1
  float k0 = upper ? v[1][0] : v[0][0];
  float k1 = upper ? v[1][1] : v[0][1];
  const float g0 = upper ? v[0][0] : v[1][0];
  const float g1 = upper ? v[0][1] : v[1][1];
  k0 += shfl_xor(g0, 2);
  k1 += shfl_xor(g1, 2);
  const bool odd = (lane & 1) != 0;  // owns row g + 8
  const float keep = odd ? k1 : k0;
  const float give = odd ? k0 : k1;
  return keep + shfl_xor(give, 1);
}

// Rescales this lane's row to the reference of its softmax's last update (as O is).
template <class Rows>
__device__ __forceinline__ void rescale_owned_row(const fwd::OnlineSoftmax (&sm)[2], const Rows& rows_of, int lane) {
  const int c = lane % 4;
  SEGATTN_UNROLL
  for (int i = 0; i < 2; ++i) {
    if (!sm[i].moved) continue;  // warp-uniform
    const float a = (c & 1) != 0 ? sm[i].alpha[1] : sm[i].alpha[0];
    if ((c >> 1) == i && a != 1.0f) {
      const MassRows rows = rows_of();
      float* const row = rows.owned(lane);
      for (int j = 0; j < rows.num_segments; ++j) row[j] *= a;
    }
  }
}

// Adds the row sums v (as quad_sums_to_owners) of key segment `id` (uniform) to the rows.
// Quad-collective.
template <class Rows>
__device__ __forceinline__ void add_to_rows(int id, const float (&v)[2][2], const Rows& rows_of, int lane) {
  const float mine = quad_sums_to_owners(v, lane);
  const MassRows rows = rows_of();
  if (id < rows.num_segments) rows.owned(lane)[id] += mine;
}

// One pass of the wide kernel: a key tile's P (both row tiles) into the rows' sums (`rows_of()`:
// the block's MassRows): a tile inside one segment `id0` adds the softmaxes' row sums
// `sm[i].tile_sum`; a tile of two segments `id0` and `id1` (`two`) the sums on either side of the
// boundary that the softmaxes' update<true> computed (tile_before, tile_after). A tile of more
// segments is not taken by this kernel (the launcher sees to it: FwdVariant::with_mass; a sum
// run by run, over P after the update, made ptxas spill in the loop). After rescale_owned_row.
// Warp-collective.
template <class Rows>
__device__ __forceinline__ void accumulate_rows_in_smem(const fwd::OnlineSoftmax (&sm)[2], bool two, int id0, int id1,
                                                        int lane, const Rows& rows_of) {
  if (!two) {
    const float v[2][2] = {{sm[0].tile_sum[0], sm[0].tile_sum[1]}, {sm[1].tile_sum[0], sm[1].tile_sum[1]}};
    add_to_rows(id0, v, rows_of, lane);
    return;
  }
  const float before[2][2] = {{sm[0].tile_before[0], sm[0].tile_before[1]},
                              {sm[1].tile_before[0], sm[1].tile_before[1]}};
  const float after[2][2] = {{sm[0].tile_after[0], sm[0].tile_after[1]}, {sm[1].tile_after[0], sm[1].tile_after[1]}};
  add_to_rows(id0, before, rows_of, lane);
  add_to_rows(id1, after, rows_of, lane);
}

// The wide kernel's epilogue: this lane's row of sums times the row's 1 / sum `inv` into its
// output `dst` (nullptr: a row past q1): every id < out.num_segments written, or the nonzero ones
// added under a reduction.
__device__ __forceinline__ void store_owned_row(const MassRows& rows, float inv, float* dst,
                                                const SegattnMassOutput& out, int lane) {
  if (dst == nullptr) return;
  const bool reduce = out.head_reduce != 0 || out.query_reduce != 0;
  const float* const row = rows.owned(lane);
  for (int s = 0; s < out.num_segments; ++s) {
    const float v = row[s] * inv;
    if (!reduce) {
      dst[s] = v;
    } else if (v != 0.0f) {
      segattn::atomic_add(dst + s, v);
    }
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
        segattn::atomic_add(dst + seg, v);
      }
    }
  }
}

}  // namespace mass
}  // namespace segattn

#endif  // SEGATTN_SEGMENT_MASS_CUH
