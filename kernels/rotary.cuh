// PINE's query rotation inside the forward kernel (the segattn_fwd_rope_* entry points).
//
// Keys are rotated once, at their original positions. Query row i of group g must meet the keys
// of segment s rotated by q_pos[i] + shift[g][s]: rope(q, p + s) . rope(k, p_k) equals PINE's
// rope(q, p) . rope(k, p_k - s). A key tile is cut into its segment pieces; for each piece every
// row's A fragments are re-formed from the un-rotated Q tile in shared memory and turned by that
// row's angle, and only the piece's 8-key column blocks run the S mma (QueryRotator below).
//
// Fragment layout (m16n8k16 A, see tile_load.cuh): register `reg` of k-step kc holds row
// g + 8 * (reg & 1), columns 16 kc + 8 (reg >> 1) + 2 (lane % 4) + {0, 1}. Rotate-half pairs
// column c with c + D/2, which is register `reg` of k-step kc + kDK/2 of the same thread: the
// rotation never leaves the thread's registers.
#ifndef SEGATTN_ROTARY_CUH
#define SEGATTN_ROTARY_CUH

#include "platform.cuh"
#include "dtypes.cuh"
#include "segattn_params.h"
#include "kernel_traits.cuh"
#include "tile_load.cuh"

namespace segattn {
namespace fwd {

template <class Traits>
struct QueryRotator {
  using T = typename Traits::T;
  static constexpr int kDK = Traits::kDK;
  static constexpr int kHalf = Traits::kHeadDim / 2;

  // The thread's two rows. 32-bit state only (the kernel is at its register limit at D = 128):
  // the parameters stay in the constant bank, the group's shift row is an offset (the host checks
  // that the shift table has fewer than 2^31 entries).
  int pos[2];        // original positions
  int shift_at[2];   // offset of the row's group's shifts [num_segments]; -1 for padding rows
  int angle[2];      // the angles (positions) the fragments are turned by now; -1: none yet

  // `row0` is the thread's first row (block-relative) and q0 the block's first query row.
  __device__ __forceinline__ void init(const SegattnFwdParams& p, int b, int h, int q0, int q1, int row0) {
    const SegattnRotation& rot = p.rotation;
    SEGATTN_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int i = q0 + row0 + 8 * r;
      angle[r] = -1;
      pos[r] = 0;
      shift_at[r] = -1;
      if (i < q1) {
        const int64_t at = static_cast<int64_t>(b) * p.q_len + i;
        pos[r] = static_cast<int>(rot.q_pos[at]);
        const int group = (b * p.num_heads + h) * rot.groups + static_cast<int>(rot.row_group[at]);
        shift_at[r] = group * rot.num_segments;
      }
    }
  }

  // Makes `qf` the warp's query fragments turned for the keys of segment `id`: a no-op when no
  // row of the warp changes angle (long segments: once per segment, not per tile). Warp-collective.
  __device__ __forceinline__ void turn_for(const SegattnFwdParams& p, uint32_t id, const char* s_q, int warp,
                                           int lane, uint32_t (&qf)[kDK][4]) {
    const SegattnRotation& rot = p.rotation;
    int want[2];
    SEGATTN_UNROLL
    for (int r = 0; r < 2; ++r) {
      want[r] = pos[r] + (shift_at[r] >= 0 ? static_cast<int>(rot.shifts[shift_at[r] + static_cast<int>(id)]) : 0);
    }
    const bool changed = want[0] != angle[0] || want[1] != angle[1];
    if (!__any_sync(0xffffffffu, changed)) return;
    load_q_fragments<Traits>(s_q, warp, lane, qf);
    const int quad_col = 2 * (lane % 4);
    SEGATTN_UNROLL
    for (int kc = 0; kc < kDK / 2; ++kc) {
      SEGATTN_UNROLL
      for (int reg = 0; reg < 4; ++reg) {
        const int r = reg & 1;
        const int at = want[r] * kHalf + kc * 16 + 8 * (reg >> 1) + quad_col;
        const float c0 = rot.cos[at], c1 = rot.cos[at + 1];
        const float s0 = rot.sin[at], s1 = rot.sin[at + 1];
        const float2 x1 = unpack2<T>(qf[kc][reg]);
        const float2 x2 = unpack2<T>(qf[kc + kDK / 2][reg]);
        qf[kc][reg] = pack2<T>(x1.x * c0 - x2.x * s0, x1.y * c1 - x2.y * s1);
        qf[kc + kDK / 2][reg] = pack2<T>(x2.x * c0 + x1.x * s0, x2.y * c1 + x1.y * s1);
      }
    }
    angle[0] = want[0];
    angle[1] = want[1];
  }
};

}  // namespace fwd
}  // namespace segattn

#endif  // SEGATTN_ROTARY_CUH
