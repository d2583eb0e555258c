// The backward kernel body: FlashAttention-2's backward over the (query tile, key tile) pairs that
// the segment mask leaves visible.
//
// Grid (ceil(Lk / 64), Hkv, B), 128 threads. The block owns keys [k0, k0 + 64) of KV head kh of
// batch row b; warp w owns keys 16w .. 16w + 15 and keeps their dK and dV in registers; query
// tiles of kBlockM rows (64, or 32 at D = 128: bwd_traits.cuh). With the forward's LSE and
// delta_i = dO_i . O_i given:
//
//   load K, V (cp.async); record the keys' segment pieces (bwd_block_info.cuh)
//   for each window of 128 query tiles: classify them against the keys, one per thread
//     for each query tile that is not SKIP, for each query head h of kh (an "item"):
//       cp.async the NEXT item's Q, dO, rows' LSE, delta and segment ids into the other buffer;
//       wait for this item's; barrier
//       S^T  = K Q^T                     (keys x queries: rows of the warp's keys; mma.sync)
//       P^T  = exp2(S^T scale log2(e) - lse), 0 where masked (PARTIAL tiles, keys past the end)
//       dP^T = V dO^T
//       dV  += P^T dO                    (P^T re-packed to 16 bits in registers as the A operand)
//       dS^T = P^T (dP^T - delta)
//       dK  += dS^T Q                    (the same, from dS^T)
//       dS^T -> shared memory (16-bit); barrier
//       dQ  += scale dS K                (A = dS through ldmatrix .trans; f32 atomic adds into
//                                         dq_accum, a 16-row tile and a range of dims a warp)
//   dK * scale and dV -> 16-bit, stored
//
// Rows past Lq read zero Q, dO, LSE and delta: their P^T is exp2(0) = 1, but dV += P^T dO and
// dS^T = P^T (dP^T - 0) = 0 add nothing, and their dQ is not stored. Keys past Lk read zero K and
// V and are masked (their P would be exp(-lse), which can overflow). So no NaN can arise from
// padding. The order of the atomic adds into dq_accum varies between runs on a GPU (the
// last bits of dQ with it), as in FlashAttention-2.
#ifndef SEGATTN_BWD_KERNEL_CUH
#define SEGATTN_BWD_KERNEL_CUH

#include "platform.cuh"
#include "dtypes.cuh"
#include "ptx.cuh"
#include "segattn_params.h"
#include "bwd_traits.cuh"
#include "bwd_block_info.cuh"
#include "mask.cuh"
#include "qk_tile.cuh"
#include "softmax.cuh"
#include "tile_load.cuh"

namespace segattn {
namespace bwd {

using fwd::load_k_fragments;
using fwd::load_q_fragment;
using fwd::load_tile_async;
using fwd::load_v_fragments;
using fwd::mma_16816;
using fwd::p_fragment;

// acc[kNS][4] = A B^T for the warp's 16 rows of the A tile (K or V, rows = keys) and every row of
// the B tile (Q or dO, kBlockM rows): S^T = K Q^T or dP^T = V dO^T.
template <class Traits>
__device__ __forceinline__ void rows_times_tile_t(const char* s_a, const char* s_b, int warp, int lane,
                                                  float (&acc)[Traits::kNS][4]) {
  using T = typename Traits::T;
  SEGATTN_UNROLL
  for (int nb = 0; nb < Traits::kNS; ++nb) {
    SEGATTN_UNROLL
    for (int e = 0; e < 4; ++e) acc[nb][e] = 0.0f;
  }
  SEGATTN_UNROLL
  for (int kc = 0; kc < Traits::kDK; ++kc) {
    uint32_t a[4];
    load_q_fragment<Traits>(s_a, warp, lane, kc, a);
    SEGATTN_UNROLL
    for (int np = 0; np < Traits::kNS / 2; ++np) {
      uint32_t bfrag[4];
      load_k_fragments<Traits>(s_b, np, kc, lane, bfrag);
      mma_16816<T>(acc[2 * np], a, bfrag[0], bfrag[1]);
      mma_16816<T>(acc[2 * np + 1], a, bfrag[2], bfrag[3]);
    }
  }
}

// acc[kNO][4] += X Y for X = the warp's 16 key rows x kBlockM queries (C fragments `x`, P^T or
// dS^T, packed to 16 bits here) and Y = the tile at `s_y` (dO or Q, [query][dim]): dV += P^T dO,
// dK += dS^T Q.
template <class Traits>
__device__ __forceinline__ void accumulate_keys(const float (&x)[Traits::kNS][4], const char* s_y, int lane,
                                                float (&acc)[Traits::kNO][4]) {
  using T = typename Traits::T;
  SEGATTN_UNROLL
  for (int kc = 0; kc < Traits::kPK; ++kc) {
    uint32_t xa[4];
    p_fragment<T>(x, kc, xa);
    SEGATTN_UNROLL
    for (int dp = 0; dp < Traits::kNO / 2; ++dp) {
      uint32_t yb[4];
      load_v_fragments<Traits>(s_y, dp, kc, lane, yb);
      mma_16816<T>(acc[2 * dp], xa, yb[0], yb[1]);
      mma_16816<T>(acc[2 * dp + 1], xa, yb[2], yb[3]);
    }
  }
}

// The A fragment of dS (rows = queries 16 row_tile .., k = keys 16 kc ..) from the dS^T tile
// ([key][query], 16-bit, rows of kDsStride bytes) through ldmatrix .trans: matrices (keys 0-7,
// queries 0-7), (keys 0-7, queries 8-15), (keys 8-15, queries 0-7), (keys 8-15, queries 8-15),
// transposed, are a0..a3.
template <class Traits>
__device__ __forceinline__ void load_ds_fragment(const char* s_ds, int row_tile, int kc, int lane, uint32_t (&a)[4]) {
  const int key = kc * 16 + (lane & 7) + ((lane >> 4) & 1) * 8;
  const int query = row_tile * 16 + ((lane >> 3) & 1) * 8;
  ldmatrix_x4_trans(a, s_ds + key * Traits::kDsStride + query * 2);
}

template <class Traits>
__device__ void bwd_kernel(const SegattnBwdParams& bp) {
  using T = typename Traits::T;
  constexpr int kM = Traits::kBlockM;
  constexpr int kN = Traits::kBlockN;
  const SegattnFwdParams& p = bp.base;

  SEGATTN_DYNAMIC_SMEM(char, smem);
  char* const s_k = smem + Traits::kOffK;
  char* const s_v = smem + Traits::kOffV;
  char* const s_ds = smem + Traits::kOffDs;
  const uint8_t* const window = reinterpret_cast<const uint8_t*>(smem + Traits::kOffWindow);

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int quad_col = 2 * (lane % 4);
  KeyBlock<Traits> blk;
  blk.locate(p);
  const int b = blk.b;
  const int kh = blk.kh;
  const int k0 = blk.k0;
  const int valid_keys = blk.k1 - k0;

  // K and V once (their own cp.async group, waited for with the first query tile's).
  const auto kv_rows = [&](const void* base, const SegattnStrides& s) {
    return static_cast<const T*>(base) + static_cast<int64_t>(b) * s.batch + static_cast<int64_t>(k0) * s.row +
           static_cast<int64_t>(kh) * s.head;
  };
  load_tile_async<Traits, kN>(s_k, kv_rows(p.k, p.k_strides), p.k_strides.row, valid_keys);
  load_tile_async<Traits, kN>(s_v, kv_rows(p.v, p.v_strides), p.v_strides.row, valid_keys);
  cp_async_commit();
  blk.record_keys(p, smem);

  float dk[Traits::kNO][4];
  float dv[Traits::kNO][4];
  SEGATTN_UNROLL
  for (int ob = 0; ob < Traits::kNO; ++ob) {
    SEGATTN_UNROLL
    for (int e = 0; e < 4; ++e) {
      dk[ob][e] = 0.0f;
      dv[ob][e] = 0.0f;
    }
  }

  const int group = p.num_heads / p.num_kv_heads;
  const int num_tiles = (p.q_len + kM - 1) / kM;
  const float log2e = 1.4426950408889634f;
  // The work items of a window: (query tile ti of the window, query head j of the KV head), for
  // the tiles that are not SKIP, heads innermost. ti = kThreads: none left in the window.
  const auto first_from = [&](int ti, int in_window) {
    while (ti < in_window && window[ti] == SEGATTN_TILE_SKIP) ++ti;
    return ti < in_window ? ti : Traits::kThreads;
  };
  // cp.async of item (ti, j)'s Q and dO tiles, LSE, delta and segment ids into buffer buf (zero
  // past the rows). Commits.
  const auto issue = [&](int base, int ti, int j, int buf) {
    const int q0 = (base + ti) * kM;
    const int rows = min(kM, p.q_len - q0);
    const int h = kh * group + j;
    const auto q_rows = [&](const void* base_ptr, const SegattnStrides& s) {
      return static_cast<const T*>(base_ptr) + static_cast<int64_t>(b) * s.batch + static_cast<int64_t>(q0) * s.row +
             static_cast<int64_t>(h) * s.head;
    };
    load_tile_async<Traits, kM>(smem + Traits::kOffQ + buf * Traits::kQBytes, q_rows(p.q, p.q_strides),
                                p.q_strides.row, rows);
    load_tile_async<Traits, kM>(smem + Traits::kOffDo + buf * Traits::kQBytes, q_rows(bp.d_out, bp.d_out_strides),
                                bp.d_out_strides.row, rows);
    if (tid < kM) {
      const int64_t at = (static_cast<int64_t>(b) * p.num_heads + h) * p.q_len + q0;
      const uint32_t* const ids = mask::segments_of_batch(p.q_segments, b).ids + q0;
      const bool row_valid = tid < rows;
      const int r = row_valid ? tid : 0;  // a valid address even when nothing is read
      cp_async_4(smem + Traits::kOffLse + 4 * (buf * kM + tid), bp.lse + at + r, row_valid);
      cp_async_4(smem + Traits::kOffDelta + 4 * (buf * kM + tid), bp.delta + at + r, row_valid);
      cp_async_4(smem + Traits::kOffQId + 4 * (buf * kM + tid), ids + r, row_valid);
    }
    cp_async_commit();
  };
  for (int base = 0; base < num_tiles; base += Traits::kThreads) {
    blk.classify_window(p, smem, base, num_tiles);
    const int in_window = min(Traits::kThreads, num_tiles - base);
    int ti = first_from(0, in_window);
    int j = 0;
    int buf = 0;
    if (ti < Traits::kThreads) issue(base, ti, j, buf);
    while (ti < Traits::kThreads) {
      // The next item's copies go out before this one is computed (none past the window: the
      // next window's classification comes first).
      const int next_j = j + 1 < group ? j + 1 : 0;
      const int next_ti = j + 1 < group ? ti : first_from(ti + 1, in_window);
      if (next_ti < Traits::kThreads) {
        issue(base, next_ti, next_j, buf ^ 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();

      const int cls = window[ti];
      const int q0 = (base + ti) * kM;
      const int rows = min(kM, p.q_len - q0);
      const int h = kh * group + j;
      const bool masked = cls == SEGATTN_TILE_PARTIAL || valid_keys < kN;
      const char* const s_q = smem + Traits::kOffQ + buf * Traits::kQBytes;
      const char* const s_do = smem + Traits::kOffDo + buf * Traits::kQBytes;
      const float* const s_lse = reinterpret_cast<const float*>(smem + Traits::kOffLse) + buf * kM;
      const float* const s_delta = reinterpret_cast<const float*>(smem + Traits::kOffDelta) + buf * kM;
      const uint32_t* const s_qid = reinterpret_cast<const uint32_t*>(smem + Traits::kOffQId) + buf * kM;

      // S^T = K Q^T, then P^T in place.
      float s[Traits::kNS][4];
      rows_times_tile_t<Traits>(s_k, s_q, warp, lane, s);
      if (masked) {
        // This thread's two keys (rows g and g + 8 of the warp's 16), read here rather than held
        // in registers through the loop: segment id, and position (-1 past the keys: hidden).
        const mask::Rule rule = mask::rule_of_batch(p, b);
        uint32_t key_seg[2];
        int key_pos[2];
        SEGATTN_UNROLL
        for (int r = 0; r < 2; ++r) {
          const int row = warp * 16 + g + 8 * r;
          key_seg[r] = KeyBlock<Traits>::pieces_in(smem).q_id[row];
          key_pos[r] = row < valid_keys ? k0 + row : -1;
        }
        // The tile's query rows in runs of one segment id: a masked tile nearly always has one or
        // two (a diagonal, a segment boundary). Then in each run a key is seen by exactly the
        // rows from a first column on (FULL: 0; CAUSAL: the key's position; BLOCKED, or a key
        // past the end: none), and an element costs a comparison instead of a rule lookup
        // (the forward's scale_and_mask, with rows and keys swapped).
        const mask::KeyRuns runs = mask::key_runs<kM>(s_qid, rows, lane);
        if (runs.at_most_two) {
          constexpr int kNever = 1 << 30;
          int from[2][2];  // [run][r]: the first column that sees key r, less this thread's first
          SEGATTN_UNROLL
          for (int r = 0; r < 2; ++r) {
            SEGATTN_UNROLL
            for (int run = 0; run < 2; ++run) {
              const int code = rule.lookup(run == 0 ? runs.id0 : runs.id1, key_seg[r]);
              int first = code == SEGATTN_RULE_FULL     ? 0
                          : code == SEGATTN_RULE_CAUSAL ? key_pos[r] - q0 - blk.pos_offset
                                                        : kNever;
              if (key_pos[r] < 0) first = kNever;
              from[run][r] = first - quad_col;
            }
          }
          const int run0_end = runs.end0 - quad_col;
          SEGATTN_UNROLL
          for (int nb = 0; nb < Traits::kNS; ++nb) {
            SEGATTN_UNROLL
            for (int e = 0; e < 4; ++e) {
              const int c = nb * 8 + (e & 1);
              const int r = e >> 1;
              const bool visible = c >= (c < run0_end ? from[0][r] : from[1][r]);
              s[nb][e] = visible ? s[nb][e] * p.scale_log2 - s_lse[c + quad_col] * log2e : -INFINITY;
            }
          }
        } else {
          SEGATTN_UNROLL
          for (int nb = 0; nb < Traits::kNS; ++nb) {
            SEGATTN_UNROLL
            for (int e = 0; e < 4; ++e) {
              const int col = nb * 8 + quad_col + (e & 1);
              const int r = e >> 1;
              const bool visible = key_pos[r] >= 0 && mask::element_visible(rule, s_qid[col], key_seg[r],
                                                                            q0 + col + blk.pos_offset, key_pos[r]);
              s[nb][e] = visible ? s[nb][e] * p.scale_log2 - s_lse[col] * log2e : -INFINITY;
            }
          }
        }
      } else {
        SEGATTN_UNROLL
        for (int nb = 0; nb < Traits::kNS; ++nb) {
          SEGATTN_UNROLL
          for (int e = 0; e < 4; ++e) {
            s[nb][e] = s[nb][e] * p.scale_log2 - s_lse[nb * 8 + quad_col + (e & 1)] * log2e;
          }
        }
      }
      SEGATTN_UNROLL
      for (int nb = 0; nb < Traits::kNS; ++nb) {
        SEGATTN_UNROLL
        for (int e = 0; e < 4; ++e) s[nb][e] = exp2_approx(s[nb][e]);  // exp2(-inf) = 0
      }
      // dP^T = V dO^T; dV += P^T dO.
      float dp[Traits::kNS][4];
      rows_times_tile_t<Traits>(s_v, s_do, warp, lane, dp);
      accumulate_keys<Traits>(s, s_do, lane, dv);
      // dS^T = P^T (dP^T - delta), in place of dP^T; dK += dS^T Q; dS^T to shared memory.
      SEGATTN_UNROLL
      for (int nb = 0; nb < Traits::kNS; ++nb) {
        SEGATTN_UNROLL
        for (int e = 0; e < 4; ++e) dp[nb][e] = s[nb][e] * (dp[nb][e] - s_delta[nb * 8 + quad_col + (e & 1)]);
      }
      accumulate_keys<Traits>(dp, s_q, lane, dk);
      SEGATTN_UNROLL
      for (int nb = 0; nb < Traits::kNS; ++nb) {
        SEGATTN_UNROLL
        for (int r = 0; r < 2; ++r) {
          const int key = warp * 16 + g + 8 * r;
          *reinterpret_cast<uint32_t*>(s_ds + key * Traits::kDsStride + (nb * 8 + quad_col) * 2) =
              pack2<T>(dp[nb][2 * r], dp[nb][2 * r + 1]);
        }
      }
      __syncthreads();

      // dQ += scale dS K: warp w takes 16-row tile w % kDqRowTiles of the query tile and its
      // share of the dims, 16 at a time.
      const int dq_tile = warp % Traits::kDqRowTiles;
      const int dq_pair0 = warp / Traits::kDqRowTiles * Traits::kDqPairsPerWarp;
      float* const dq_rows = bp.dq_accum + ((static_cast<int64_t>(b) * p.q_len + q0) * p.num_heads + h) *
                                               static_cast<int64_t>(Traits::kHeadDim);
      const int64_t dq_row_stride = static_cast<int64_t>(p.num_heads) * Traits::kHeadDim;
      SEGATTN_UNROLL
      for (int dpair = dq_pair0; dpair < dq_pair0 + Traits::kDqPairsPerWarp; ++dpair) {
        float acc[2][4];
        SEGATTN_UNROLL
        for (int i = 0; i < 2; ++i) {
          SEGATTN_UNROLL
          for (int e = 0; e < 4; ++e) acc[i][e] = 0.0f;
        }
        SEGATTN_UNROLL
        for (int kc = 0; kc < Traits::kQK; ++kc) {
          uint32_t a[4], kb[4];
          load_ds_fragment<Traits>(s_ds, dq_tile, kc, lane, a);
          load_v_fragments<Traits>(s_k, dpair, kc, lane, kb);
          mma_16816<T>(acc[0], a, kb[0], kb[1]);
          mma_16816<T>(acc[1], a, kb[2], kb[3]);
        }
        SEGATTN_UNROLL
        for (int r = 0; r < 2; ++r) {
          const int row = dq_tile * 16 + g + 8 * r;
          if (row >= rows) continue;
          float* const dst = dq_rows + row * dq_row_stride + dpair * 16 + quad_col;
          SEGATTN_UNROLL
          for (int i = 0; i < 2; ++i) {
            atomic_add(dst + 8 * i, acc[i][2 * r] * p.scale);
            atomic_add(dst + 8 * i + 1, acc[i][2 * r + 1] * p.scale);
          }
        }
      }
      // No barrier here: Q, dO and the row data of buffer buf are last read before the barrier
      // above (the next item's copies into it are issued after it), and dS^T is next written
      // after the next item's first barrier, which every warp reaches only once done with dQ.
      ti = next_ti;
      j = next_j;
      buf ^= 1;
    }
  }

  cp_async_wait<0>();  // K and V's copies, when no query tile sees the keys

  // Epilogue: this thread's rows of dK (times the scale) and dV, 32-bit stores of column pairs.
  T* const dk_out = static_cast<T*>(bp.dk);
  T* const dv_out = static_cast<T*>(bp.dv);
  SEGATTN_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int row = warp * 16 + g + 8 * r;
    if (row >= valid_keys) continue;
    const int64_t at =
        ((static_cast<int64_t>(b) * p.kv_len + k0 + row) * p.num_kv_heads + kh) * Traits::kHeadDim + quad_col;
    SEGATTN_UNROLL
    for (int ob = 0; ob < Traits::kNO; ++ob) {
      *reinterpret_cast<uint32_t*>(dk_out + at + ob * 8) =
          pack2<T>(dk[ob][2 * r] * p.scale, dk[ob][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dv_out + at + ob * 8) = pack2<T>(dv[ob][2 * r], dv[ob][2 * r + 1]);
    }
  }
}

}  // namespace bwd
}  // namespace segattn

#endif  // SEGATTN_BWD_KERNEL_CUH
