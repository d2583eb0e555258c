// PINE's segment order and position shifts on the device (no host round trip between the
// importance scores and the attention). See SegattnShiftsParams in segattn_params.h.
//
// nvcc: `extern "C" __global__ void segattn_pine_shifts(const SegattnShiftsParams)`,
//   grid (ceil(groups * num_segments / 128), H, B), block 128 threads, no shared memory.
// One thread per (group, key segment j): pine_shift (order.cuh) counts j's rank.
//
// Host emulation (SEGATTN_EMULATE): `segattn_emu_pine_shifts(params)`.
#include "platform.cuh"
#include "segattn_params.h"
#include "order.cuh"

namespace segattn {
namespace pine {

constexpr int kShiftsThreads = 128;

__device__ __forceinline__ void shifts_kernel(const SegattnShiftsParams& p) {
  const int b = static_cast<int>(blockIdx.z);
  const int h = static_cast<int>(blockIdx.y);
  const int idx = static_cast<int>(blockIdx.x) * kShiftsThreads + static_cast<int>(threadIdx.x);
  const int S = p.num_segments;
  if (idx >= p.groups * S) return;
  const int g = idx / S;
  const int j = idx % S;
  const int n = static_cast<int>(p.num_segs[b]);
  const uint32_t* lens = p.segment_lens + static_cast<int64_t>(b) * S;
  const int64_t bh = static_cast<int64_t>(b) * p.num_heads + h;
  // Segment query group g (n > 2): its importance of every segment; a suffix / generated row's
  // group: the row's own scores, when the row is a query row and scored.
  const float* seg_score = nullptr;
  const float* row_score = nullptr;
  if (g >= 1 && g <= n) {
    if (p.segment_scores != nullptr && n > 2) seg_score = p.segment_scores + (bh * S + g) * S;
  } else if (g > n) {
    const int row = static_cast<int>(p.first_suffix_row[b]) + g - n - 1;
    const int r = row - (p.q_len - p.scored_rows);
    if (row < p.q_len && r >= 0) row_score = p.row_scores + (bh * p.scored_rows + r) * S;
  }
  const uint32_t shift = pine_shift(g, j, n, lens, seg_score, row_score);
  p.shifts[((static_cast<int64_t>(b) * p.num_heads + h) * p.groups + g) * S + j] = shift;
}

}  // namespace pine
}  // namespace segattn

extern "C" __global__ void __launch_bounds__(segattn::pine::kShiftsThreads)
    segattn_pine_shifts(const SegattnShiftsParams params) {
  segattn::pine::shifts_kernel(params);
}

#if defined(SEGATTN_EMULATE)

#include "emu/emu_api.h"

// Runs the shifts kernel for `p` on the CPU. 0 on success, nonzero with the message in
// segattn_emu_last_error().
extern "C" int segattn_emu_pine_shifts(const SegattnShiftsParams* p) {
  if (p == nullptr || p->batch <= 0 || p->num_heads <= 0 || p->groups * p->num_segments <= 0) return 0;
  const int threads = segattn::pine::kShiftsThreads;
  const dim3 grid((p->groups * p->num_segments + threads - 1) / threads, p->num_heads, p->batch);
  return ::segattn::emu::launch(grid, dim3(threads), 0, [&] { segattn_pine_shifts(*p); });
}

#endif  // SEGATTN_EMULATE
