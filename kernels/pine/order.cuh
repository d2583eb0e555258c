// PINE's order as position shifts, one (query group, key segment) at a time: shared by the shifts
// kernel (shifts.cu: prefill and any query rows) and the decode importance kernel, which orders
// its rows itself once their scores are merged (decode_scores.cu).
//
// Segment j's rank is counted, not sorted: the segments ranked before j are those with a higher
// score, or an equal score and a lower id (a stable descending sort), the group's own segment
// always first. O(n) per element; n up to a few thousand.
#ifndef SEGATTN_PINE_ORDER_CUH
#define SEGATTN_PINE_ORDER_CUH

#include "platform.cuh"
#include "kernel_traits.cuh"

namespace segattn {
namespace pine {

// The shift of key segment id j for query group g of a batch row with n segments whose lengths
// are lens[1..n]: 0 for j outside 1..n and for group 0 (the prefix). A segment group g in 1..n:
// lens[g] (g comes first) plus the lengths of the segments ranked before j by `seg_score` (g's
// importance of each segment; nullptr: by index, PINE's n <= 2 rule); a suffix / generated row's
// group (g > n): the lengths of the segments its `row_score` ranks before j (nullptr: a group
// without a scored row, 0).
__device__ __forceinline__ uint32_t pine_shift(int g, int j, int n, const uint32_t* lens, const float* seg_score,
                                               const float* row_score) {
  uint32_t shift = 0;
  if (g < 1 || j < 1 || j > n) return shift;
  if (g <= n) {
    if (j == g) return shift;
    shift = lens[g];
    // Unrolled so that several lengths' (and scores') loads are in flight at once: this runs in
    // the decode importance's last block, the launch's tail.
    SEGATTN_UNROLL_8
    for (int m = 1; m <= n; ++m) {
      if (m == g || m == j) continue;
      const bool before =
          seg_score != nullptr ? (seg_score[m] > seg_score[j] || (seg_score[m] == seg_score[j] && m < j)) : m < j;
      if (before) shift += lens[m];
    }
  } else if (row_score != nullptr) {
    SEGATTN_UNROLL_8
    for (int m = 1; m <= n; ++m) {
      if (m != j && (row_score[m] > row_score[j] || (row_score[m] == row_score[j] && m < j))) shift += lens[m];
    }
  }
  return shift;
}

}  // namespace pine
}  // namespace segattn

#endif  // SEGATTN_PINE_ORDER_CUH
