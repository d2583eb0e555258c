// Split-K merge of the forward kernel's partial outputs (params.kv_splits > 1), done by the last
// block of each query tile to finish (fwd_kernel.cuh's epilogue, last_block.cuh): no merge launch.
//
// Per output row (b, h, i): the S partials O_s (normalised, f32) and their log-sum-exps L_s merge
// as softmax blocks do: L = log sum_s e^(L_s), O = sum_s e^(L_s - L) O_s. A row that no split saw
// (every L_s = -inf) gets O = 0 and L = -inf, never NaN; a NaN L_s (NaN inputs) makes O and L NaN.
#ifndef SEGATTN_SPLIT_MERGE_CUH
#define SEGATTN_SPLIT_MERGE_CUH

#include "platform.cuh"
#include "dtypes.cuh"
#include "segattn_params.h"
#include "last_block.cuh"
#include "kernel_traits.cuh"
#include "ptx.cuh"
#include "softmax.cuh"

namespace segattn {
namespace fwd {

// Merges row `row` = (b H + h) Lq + i of the partials into o and lse: one warp, lanes over the
// head dim.
template <class T, int kHeadDim>
__device__ __forceinline__ void merge_split_row(const SegattnFwdParams& p, int64_t row, int lane) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.num_heads * p.q_len;
  const int splits = p.kv_splits;
  const int i = static_cast<int>(row % p.q_len);
  const int64_t bh = row / p.q_len;
  const int h = static_cast<int>(bh % p.num_heads);
  const int b = static_cast<int>(bh / p.num_heads);

  // The max over the slices, the lanes over the slices: their loads in flight together, not one
  // L2 round trip per slice.
  float m = -INFINITY;
  bool nan = false;  // fmaxf passes over NaN: a slice's NaN LSE is carried on its own
  for (int s = lane; s < splits; s += 32) {
    const float l = load_cg(p.lse_accum + static_cast<int64_t>(s) * rows + row);
    m = fmaxf(m, l);
    nan |= isnan(l);
  }
  m = warp_max(m);
  if (__any_sync(0xffffffffu, nan)) m = NAN;
  float total = 0.0f;
  constexpr int kPerLane = kHeadDim / 32;
  float acc[kPerLane];
  SEGATTN_UNROLL
  for (int e = 0; e < kPerLane; ++e) acc[e] = 0.0f;
  if (m != -INFINITY) {
    // 16 slices' loads in flight at a time: the merging block is the launch's tail, each batch
    // one L2 round trip that the decode step waits for (two at a RAG step's 26 slices, not four).
    SEGATTN_UNROLL_16
    for (int s = 0; s < splits; ++s) {
      // 0 for an empty split.
      const float w = expf(load_cg(p.lse_accum + static_cast<int64_t>(s) * rows + row) - m);
      total += w;
      const float* const o_s = p.o_accum + (static_cast<int64_t>(s) * rows + row) * kHeadDim;
      SEGATTN_UNROLL
      for (int e = 0; e < kPerLane; ++e) acc[e] += w * load_cg(o_s + e * 32 + lane);
    }
  }
  const float inv = row_seen(total) ? 1.0f / total : 0.0f;
  T* const out = static_cast<T*>(p.o) + static_cast<int64_t>(b) * p.o_strides.batch +
                 static_cast<int64_t>(i) * p.o_strides.row + static_cast<int64_t>(h) * p.o_strides.head;
  SEGATTN_UNROLL
  for (int e = 0; e < kPerLane; ++e) out[e * 32 + lane] = from_float<T>(acc[e] * inv);
  if (p.lse != nullptr && lane == 0) p.lse[row] = row_seen(total) ? m + logf(total) : -INFINITY;
}

}  // namespace fwd
}  // namespace segattn

#endif  // SEGATTN_SPLIT_MERGE_CUH
