// PINE's query rotation inside the forward kernel (the segattn_fwd_rope_* entry points).
//
// Keys are rotated once, at their original positions. Query row i of group g must meet the keys
// of segment s rotated by q_pos[i] + shift[g][s]: rope(q, p + s) . rope(k, p_k) equals PINE's
// rope(q, p) . rope(k, p_k - s). A key tile is cut into its segment pieces; for each piece whose
// segment differs from the last, every row of the un-rotated Q tile is turned by that row's angle
// into a second shared tile (QueryRotator below), from which the S mma reads its A fragments
// k-step by k-step (no Q fragments held in registers: the kernel is at its register limit).
//
// Fragment layout (m16n8k16 A, see tile_load.cuh): register `reg` of k-step kc holds row
// g + 8 * (reg & 1), columns 16 kc + 8 (reg >> 1) + 2 (lane % 4) + {0, 1}. Rotate-half pairs
// column c with c + D/2, which is register `reg` of k-step kc + kDK/2 of the same thread: the
// rotation is computed in-thread, and each thread writes back exactly the elements it read.
#ifndef SEGATTN_ROTARY_CUH
#define SEGATTN_ROTARY_CUH

#include "platform.cuh"
#include "dtypes.cuh"
#include "segattn_params.h"
#include "kernel_traits.cuh"
#include "tile_load.cuh"

namespace segattn {
namespace fwd {

// Two adjacent floats at an even offset of an 8-byte aligned table (SegattnRotation), in one
// load on the GPU; the emulator's host tables are only 4-byte aligned.
__device__ __forceinline__ float2 load_pair(const float* at) {
#if defined(SEGATTN_EMULATE)
  return make_float2(at[0], at[1]);
#else
  return *reinterpret_cast<const float2*>(at);
#endif
}

template <class Traits>
struct QueryRotator {
  using T = typename Traits::T;
  static constexpr int kDK = Traits::kDK;
  static constexpr int kHalf = Traits::kHeadDim / 2;

  // The key segment the fragments are turned for now (-1: none yet). One register of state: the
  // kernel is at its register limit at D = 128, so the rows' positions and shift rows are read
  // from shared memory (stage_rows) at each turn, which happens once per key segment, not per
  // tile. Pieces are block-uniform, so is this id: the whole warp turns together.
  int cur_id;

  __device__ __forceinline__ void init() { cur_id = -1; }

  // Each row's position and the index of its group's shifts (-1 for padding rows), into shared
  // memory once per block, each warp its own 16 rows: a turn then waits on two loads (the shift,
  // then the cos / sin rows), not three (the row's group and position first). Warp-collective;
  // ends with __syncwarp (a warp's turns read only its own rows).
  __device__ __forceinline__ void stage_rows(const SegattnFwdParams& p, int b, int h, int q0, int q1, char* smem,
                                             int warp, int lane) {
    if (lane < 16) {
      const int r = warp * 16 + lane;
      const int i = q0 + r;
      int pos = 0;
      int shifts_at = -1;
      if (i < q1) {
        const SegattnRotation& rot = p.rotation;
        // GQA decode packing: kernel row i is query row i / P of head h P + i % P (P = 1: i, h).
        const int pack = max(rot.packed_heads, 1);
        const int64_t at = static_cast<int64_t>(b) * (p.q_len / pack) + i / pack;
        const int head = h * pack + i % pack;
        const int group = (b * p.num_heads * pack + head) * rot.groups + static_cast<int>(rot.row_group[at]);
        pos = static_cast<int>(rot.q_pos[at]);
        shifts_at = group * rot.num_segments;
      }
      reinterpret_cast<int*>(smem + Traits::kOffRowPos)[r] = pos;
      reinterpret_cast<int*>(smem + Traits::kOffRowShifts)[r] = shifts_at;
    }
    __syncwarp();
  }

  // The angles of this thread's rows row0 and row0 + 8 for the keys of segment `id`, from the rows
  // staged in the layout at `smem` (stage_rows).
  __device__ __forceinline__ static void angles(const SegattnFwdParams& p, int row0, uint32_t id, const char* smem,
                                                int (&angle)[2]) {
    const int* const row_pos = reinterpret_cast<const int*>(smem + Traits::kOffRowPos);
    const int* const row_shifts = reinterpret_cast<const int*>(smem + Traits::kOffRowShifts);
    SEGATTN_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int at = row_shifts[row0 + 8 * r];
      // Padding rows (-1): any finite rotation.
      angle[r] = at < 0 ? 0 : row_pos[row0 + 8 * r] + static_cast<int>(p.rotation.shifts[at + id]);
    }
  }

  // One A-fragment register's element pair turned: `lo` holds columns col, col + 1 of a row and
  // `hi` the same columns + D/2 (the rotate-half pairs), by that row's angle. The same arithmetic
  // wherever the turned values go (the turned tile, or a wgmma kernel's registers).
  __device__ __forceinline__ static void rotate(const SegattnRotation& rot, int angle, int col, uint32_t& lo,
                                                uint32_t& hi) {
    // col is even and the tables' rows even-sized: one 8-byte load for each pair of angles.
    const int at = angle * kHalf + col;
    const float2 cs = load_pair(rot.cos + at);
    const float2 sn = load_pair(rot.sin + at);
    const float c0 = cs.x, c1 = cs.y, s0 = sn.x, s1 = sn.y;
    const float2 x1 = unpack2<T>(lo);
    const float2 x2 = unpack2<T>(hi);
    lo = pack2<T>(x1.x * c0 - x2.x * s0, x1.y * c1 - x2.y * s1);
    hi = pack2<T>(x2.x * c0 + x1.x * s0, x2.y * c1 + x1.y * s1);
  }

  // A wgmma kernel's turn (FwdTraits::kWgmma, whose S reads Q's A fragments from registers):
  // `qt` [kDK][4] becomes this thread's A fragments of the warp's rows of `s_q` (the un-rotated Q
  // tile, in the layout at `smem`) turned for the keys of segment `id`. A no-op when the id did not
  // change. Warp-collective (ldmatrix). The caller sees that no wgmma still reads `qt`.
  __device__ __forceinline__ void turn_into(const SegattnFwdParams& p, int row0, uint32_t id, const char* s_q,
                                            const char* smem, uint32_t (&qt)[kDK][4], int warp, int lane) {
    if (static_cast<int>(id) == cur_id) return;
    cur_id = static_cast<int>(id);
    int angle[2];
    angles(p, row0, id, smem, angle);
    const int quad_col = 2 * (lane % 4);
    SEGATTN_UNROLL
    for (int kc = 0; kc < kDK / 2; ++kc) {
      load_q_fragment<Traits>(s_q, warp, lane, kc, qt[kc]);
      load_q_fragment<Traits>(s_q, warp, lane, kc + kDK / 2, qt[kc + kDK / 2]);
      SEGATTN_UNROLL
      for (int reg = 0; reg < 4; ++reg) {
        rotate(p.rotation, angle[reg & 1], kc * 16 + 8 * (reg >> 1) + quad_col, qt[kc][reg], qt[kc + kDK / 2][reg]);
      }
    }
  }

  // Makes the warp's rows of the turned tile `s_qt` its rows of `s_q` turned for the keys of
  // segment `id` (rows q0 + row0 and q0 + row0 + 8 of (b, h) for this thread). A no-op when the
  // id did not change. Warp-collective (ldmatrix); begins and ends with __syncwarp: the warp reads
  // only its own rows of `s_qt`.
  __device__ __forceinline__ void turn_for(const SegattnFwdParams& p, int row0, uint32_t id, const char* s_q,
                                           char* s_qt, int warp, int lane) {
    if (static_cast<int>(id) == cur_id) return;
    cur_id = static_cast<int>(id);
    // The warp's S mma of the last tile read these rows of `s_qt` (ldmatrix, other lanes' rows):
    // their reads are ordered before this turn's writes (compute-sanitizer racecheck reported the
    // intra-warp hazard under independent thread scheduling).
    __syncwarp();
    // The staged rows (stage_rows; the turned tile's offset is known, so is the layout's).
    int angle[2];
    angles(p, row0, id, s_qt - Traits::kOffQTurned, angle);
    // ldmatrix rows warp 16 + (lane & 15), chunks 2 kc + (lane >> 4) (as load_q_fragment).
    const SwizzledRows<Traits::kChunks> ld_rows(lane & 15, lane >> 4);
    // The element pairs go back to rows row0 and row0 + 8, chunks 2 kc + (reg >> 1).
    const SwizzledRows<Traits::kChunks> st_rows[2] = {SwizzledRows<Traits::kChunks>(row0, 0),
                                                      SwizzledRows<Traits::kChunks>(row0, 1)};
    const int quad_col = 2 * (lane % 4);
    SEGATTN_UNROLL
    for (int kc = 0; kc < kDK / 2; ++kc) {
      // The pair (kc, kc + kDK/2) holds columns c and c + D/2: a rotate-half pair, in-thread.
      uint32_t lo[4], hi[4];
      ldmatrix_x4(lo, s_q + ld_rows.at(warp * 16, kc));
      ldmatrix_x4(hi, s_q + ld_rows.at(warp * 16, kc + kDK / 2));
      SEGATTN_UNROLL
      for (int reg = 0; reg < 4; ++reg) {
        const int r = reg & 1;
        rotate(p.rotation, angle[r], kc * 16 + 8 * (reg >> 1) + quad_col, lo[reg], hi[reg]);
        // Back to shared memory at this element pair's own place (row, col) and (row, col + D/2).
        const SwizzledRows<Traits::kChunks>& rows = st_rows[reg >> 1];
        *reinterpret_cast<uint32_t*>(s_qt + rows.at(8 * r, kc) + quad_col * 2) = lo[reg];
        *reinterpret_cast<uint32_t*>(s_qt + rows.at(8 * r, kc + kDK / 2) + quad_col * 2) = hi[reg];
      }
    }
    __syncwarp();
  }
};

}  // namespace fwd
}  // namespace segattn

#endif  // SEGATTN_ROTARY_CUH
