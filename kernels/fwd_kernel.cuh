// The forward kernel body: FlashAttention-2 over the key tiles that the segment mask leaves
// visible.
//
// Grid (ceil(Lq / kBlockM), H, B), kThreads threads (128; the two-warpgroup wgmma kernel 256),
// launched in reverse order of query tiles. The block owns query rows [q0, q0 + kBlockM) of head
// h of batch row b; warp w owns rows 16w .. 16w + 15 of the tile (the wide kernel, kBlockM = 128
// with 4 warps: also rows 64 + 16w ..; each K and V fragment loaded from shared memory then feeds
// both row tiles' mma).
//
//   bound the key tiles: [first, last] that may be visible (one cheap scan spread over the threads)
//   classify key tiles ahead, a window of 128 at a time, one per thread (block_info.cuh); find the
//   first visible one (SKIP tiles cost no load and no mma)
//   cp.async Q tile (into K buffer 1, or its own tile), cp.async K/V of that tile into buffer 0
//   Q -> registers (ldmatrix A fragments, kept for the whole loop; or, kQInSmem, read from the Q
//   tile at every k-step); barrier
//   for each visible tile t (buffer buf):
//     find the next visible tile in the window; cp.async its K, V and key ids into buf ^ 1
//     wait for tile t's group; barrier
//     S = Q K^T                      (mma.sync m16n8k16, f32 accumulate)
//     scale by scale * log2(e); mask (PARTIAL tiles and the ragged last tile only)
//     online softmax (row max / sum over the quad with shuffles, exp2)
//     O += P V                       (P re-packed to 16 bits in registers as the A operand)
//     barrier (buffer buf is free for the load issued next iteration)
//   O / row sum -> 16-bit, staged through the warp's own rows of the Q tile, 16-byte stores;
//   LSE = (max + log2 sum) * ln 2 in f32.
//
// Split-K (params.kv_splits > 1, decode): each block covers one slice of the key tiles and writes
// an f32 partial output and LSE; the last slice of a query tile to finish merges them
// (split_merge.cuh), so split-K needs no second launch.
//
// The fused mass variant (Traits::kMass, segment_mass.cuh): per tile, P times a one-hot segment
// matrix into on-chip accumulators for segment ids 0..63, rescaled like O; the epilogue writes
// them divided by the row sum into p.mass (one pass, no split-K: the launcher sees to both). In
// the wide kernel (Traits::kMassInSmem) each row's sums live in shared memory, owned by one lane
// of its quad; a key tile adds its row sums to its segment, or (two segments) its sums on either
// side of the boundary, split by the softmax's update; the launcher gives it no tile of three.
//
// The wgmma variant (Traits::kWgmma, sm_90a: kernels/hopper/fwd_hopper.cu): each 4 warps are a
// warpgroup (one or two a block), and S = Q K^T and O += P V are Hopper's wgmma.mma_async
// (wgmma_tile.cuh) reading K and V from shared memory in wgmma's layout (tile_offset), 1024-byte
// aligned (layout_base). Its key-tile loop is its own (wgmma_loop.cuh: a tile's softmax overlaps
// the previous tile's P V, V copied an iteration after K; with kMass the tile's sums too); the
// prologue and the epilogue are the ones above. Its kScoresOnly form is the standalone mass
// (kernels/hopper/scores_hopper.cu): the fused mass kernel with no V, no P V and no output but the
// sums, two f16 terms of P in the one-hot sums, as the mma.sync mass kernel's (scores_kernel.cuh).
//
// PINE's variant (Traits::kRotate, rotary.cuh): Q stays in shared memory; S is computed piece by
// piece of the key tile's segments, each with the query turned by the row's position plus its
// group's shift for that segment (a turned copy of the Q tile, read k-step by k-step). Everything
// else is the same.
#ifndef SEGATTN_FWD_KERNEL_CUH
#define SEGATTN_FWD_KERNEL_CUH

#include <type_traits>

#include "platform.cuh"
#include "dtypes.cuh"
#include "ptx.cuh"
#include "segattn_params.h"
#include "kernel_traits.cuh"
#include "block_info.cuh"
#include "mask.cuh"
#include "qk_tile.cuh"
#include "rotary.cuh"
#include "segment_mass.cuh"
#include "softmax.cuh"
#include "split_merge.cuh"
#include "tile_load.cuh"
#include "wgmma_loop.cuh"

namespace segattn {
namespace fwd {

template <class Traits>
__device__ void fwd_kernel(const SegattnFwdParams& p) {
  using T = typename Traits::T;
  constexpr int kM = Traits::kBlockM;
  constexpr int kN = Traits::kBlockN;
  constexpr int kChunks = Traits::kChunks;

  SEGATTN_DYNAMIC_SMEM(char, smem_start);
  char* const smem = layout_base<Traits>(smem_start);  // (kWgmma: 1024-byte aligned)
  char* const s_q = smem + Traits::kOffQ;
  uint32_t* const s_kid = reinterpret_cast<uint32_t*>(smem + Traits::kOffKId);  // [2][kN]

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int lane = tid % 32;
  BlockInfo<Traits> blk;
  blk.locate(p, p.kv_splits);
  // The Q tile's copy first (its own cp.async group): its latency overlaps the key-tile scan,
  // which reads the mask metadata and ends in barriers (a block whose rows see no key waits for
  // the copy all the same before its epilogue reuses shared memory).
  load_tile_async<Traits, kM>(s_q, blk.template q_rows<T>(p.q, p.q_strides), p.q_strides.row,
                              blk.q1 - blk.q0);
  cp_async_commit();
  const int kv_len = blk.kv_len;
  const T* const k_base = blk.template kv_rows<T>(p.k, p.k_strides);
  const T* const v_base = blk.template kv_rows<T>(p.v, p.v_strides);
  // K, V and the key segment ids of tile t into buffer buf (each thread copies the same chunks
  // whatever the tile: a thread's own cp.async wait orders its copies into a buffer).
  // (The wgmma kernel's loop copies a tile's V an iteration after its K: the two halves apart.)
  auto load_k_async = [&](int t, int buf) {
    blk.load_key_ids_async(p, t, s_kid + buf * kN);
    const int k0 = t * kN;
    load_tile_async<Traits, kN>(smem + Traits::kOffK + buf * Traits::kKVBytes,
                                k_base + static_cast<int64_t>(k0) * p.k_strides.row, p.k_strides.row,
                                min(kN, kv_len - k0));
  };
  auto load_v_async = [&](int t, int buf) {
    if constexpr (Traits::kScoresOnly) return;  // the standalone mass reads no V
    const int k0 = t * kN;
    load_tile_async<Traits, kN>(smem + Traits::kOffV + buf * Traits::kKVBytes,
                                v_base + static_cast<int64_t>(k0) * p.v_strides.row, p.v_strides.row,
                                min(kN, kv_len - k0));
  };
  auto load_kv_async = [&](int t, int buf) {
    load_k_async(t, buf);
    load_v_async(t, buf);
  };
  // Split-K (decode steps): a slice's first key tile is nearly always its first visible one (a
  // decode row sees every key before it), so its copy goes out now, before the key-tile scan, and
  // its latency overlaps the scan's as Q's does; a slice that starts elsewhere waits for it to
  // land before loading its own (below). A block is a short chain of round trips there.
  int speculated = -1;
  if (p.kv_splits > 1) {
    const int num_tiles = (kv_len + kN - 1) / kN;
    const int first = blk.split * ((num_tiles + p.kv_splits - 1) / p.kv_splits);  // as find_tiles
    if (first < num_tiles) {
      load_kv_async(first, 0);
      cp_async_commit();
      speculated = first;
    }
  }
  blk.find_tiles(p, smem, p.kv_splits);
  const int b = blk.b;
  const int h = blk.h;
  const int q0 = blk.q0;
  const int q1 = blk.q1;
  const int end_tile = blk.end_tile;

  // This thread's rows: g and g + 8 of each of the warp's kMT row tiles (row tile i of warp w is
  // rows 16 (w + kWarps i) .. + 15 of the block).
  constexpr int kMT = Traits::kMTiles;
  const auto row_tile = [&](int i) { return warp + Traits::kWarps * i; };
  const int g = lane / 4;
  const int quad_col = 2 * (lane % 4);
  QueryRotator<Traits> rotator;
  if constexpr (Traits::kRotate) rotator.init();

  float o[kMT][Traits::kNO][4];
  OnlineSoftmax softmax[kMT];
  SEGATTN_UNROLL
  for (int i = 0; i < kMT; ++i) {
    SEGATTN_UNROLL
    for (int ob = 0; ob < Traits::kNO; ++ob) {
      SEGATTN_UNROLL
      for (int e = 0; e < 4; ++e) o[i][ob][e] = 0.0f;
    }
    softmax[i].init();
  }
  // kMass: the per-segment sums of segment ids 0..63 (C fragments, rows g and g + 8); the wide
  // kernel keeps them in shared memory instead (kMassInSmem: each lane one row of them).
  constexpr bool kMassInRegs = Traits::kMass && !Traits::kMassInSmem;
  float macc[kMassInRegs ? mass::kSegBlocks : 1][4];
  const auto mass_rows = [&] {  // the block's rows of sums (kMassInSmem)
    const int nseg = p.mass.num_segments;
    return mass::MassRows{reinterpret_cast<float*>(smem + Traits::kOffMass), Traits::mass_row_stride(nseg), nseg,
                          16 * row_tile(0), 16 * row_tile(kMT - 1)};
  };
  if constexpr (Traits::kMassInSmem) mass::zero_owned_row(mass_rows(), lane);
  mass::PendingSums pending;  // kMass: the last tiles' sums of one segment, not yet in macc
  pending.init();
  SEGATTN_UNROLL
  for (int nb = 0; nb < (kMassInRegs ? mass::kSegBlocks : 1); ++nb) {
    SEGATTN_UNROLL
    for (int e = 0; e < 4; ++e) macc[nb][e] = 0.0f;
  }

  int cls = SEGATTN_TILE_SKIP;
  int tile = blk.next_visible(p, blk.first_tile, cls);
  if (tile < end_tile) {
    if (tile != speculated) {
      if (speculated >= 0) cp_async_wait<0>();  // this thread's speculative copies into buffer 0 landed
      load_kv_async(tile, 0);
      cp_async_commit();
    }
    // (kRotate) the rows' positions and shift rows, while the copies are in flight.
    if constexpr (Traits::kRotate) rotator.stage_rows(p, b, h, q0, q1, smem, warp, lane);
    cp_async_wait<1>();  // the Q group
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();
  uint32_t qf[Traits::kQInSmem ? 1 : kMT][Traits::kDK][4];
  if (!Traits::kQInSmem && tile < end_tile) {
    SEGATTN_UNROLL
    for (int i = 0; i < kMT; ++i) load_q_fragments<Traits>(s_q, row_tile(i), lane, qf[i]);
    // (kQShared) the Q tile shares K buffer 1, which the loop's first prefetch overwrites
    if constexpr (Traits::kQShared) __syncthreads();
  }

  if constexpr (Traits::kWgmma) {
    wgmma_tile_loop<Traits>(p, blk, smem, tile, cls, qf[0], o[0], softmax[0], load_k_async, load_v_async,
                            [&](const float(&s)[Traits::kNS][4], const uint32_t* kid, int k0) {
                              // (kMass) the tile's sums, as the mma.sync kernel's below
                              if constexpr (Traits::kMass) {
                                softmax[0].rescale(macc);
                                pending.rescale(softmax[0]);
                                mass::accumulate_one_pass<Traits::kMassTerms, kN>(
                                    s, softmax[0].tile_sum, kid, min(kN, kv_len - k0), lane, pending, macc);
                              }
                            },
                            rotator, s_q);
  } else {
    int buf = 0;
    while (tile < end_tile) {
      // Look ahead: classify and prefetch the next visible tile while this one is computed.
      int next_cls = SEGATTN_TILE_SKIP;
      const int next = blk.next_visible(p, tile + 1, next_cls);
      if (next < end_tile) {
        load_kv_async(next, buf ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();

      const char* const s_k = smem + Traits::kOffK + buf * Traits::kKVBytes;
      const char* const s_v = smem + Traits::kOffV + buf * Traits::kKVBytes;
      const uint32_t* const kid = s_kid + buf * kN;
      const int k0 = tile * kN;

      // S = Q K^T.
      float s[kMT][Traits::kNS][4];
      if constexpr (Traits::kRotate) {
        SEGATTN_UNROLL
        for (int nb = 0; nb < Traits::kNS; ++nb) {
          SEGATTN_UNROLL
          for (int e = 0; e < 4; ++e) s[0][nb][e] = 0.0f;
        }
        // Piece by piece of the tile's key segments (block-uniform bounds [a, e)): the query turned
        // for the piece's segment (into the turned Q tile), the mma only on the columns of the piece
        // (qk_piece).
        const int valid = min(kN, kv_len - k0);
        char* const s_qt = smem + Traits::kOffQTurned;
        // Most tiles lie in one segment (one piece): the plain S mma, without the per-column-pair
        // piece tests and zeroed B fragments (keys past kv_len are masked below, as in the plain
        // kernel).
        const bool one_piece = static_cast<int>(blk.kv_segs_of(p).span_end[k0]) - k0 >= valid;
        if (one_piece) {
          rotator.turn_for(p, warp * 16 + g, kid[0], s_q, s_qt, warp, lane);
          qk_tile<Traits>([&](int kc, uint32_t(&qa)[4]) { load_q_fragment<Traits>(s_qt, warp, lane, kc, qa); }, s_k,
                          lane, s[0]);
        }
        for (int a = one_piece ? valid : 0; a < valid;) {
          const int e = min(static_cast<int>(blk.kv_segs_of(p).span_end[k0 + a]) - k0, valid);
          rotator.turn_for(p, warp * 16 + g, kid[a], s_q, s_qt, warp, lane);
          qk_piece<Traits>([&](int kc, uint32_t(&qa)[4]) { load_q_fragment<Traits>(s_qt, warp, lane, kc, qa); }, s_k,
                           lane, a, e, s[0]);
          a = e;
        }
      } else {
        // Q's fragments from registers, or (kQInSmem) from the Q tile at every k-step; each K
        // fragment serves every row tile of the warp.
        qk_tiles<Traits, kMT>(
            [&](int i, int kc, uint32_t(&qa)[4]) {
              if constexpr (Traits::kQInSmem) {
                load_q_fragment<Traits>(s_q, row_tile(i), lane, kc, qa);
              } else {
                SEGATTN_UNROLL
                for (int j = 0; j < 4; ++j) qa[j] = qf[i][kc][j];
              }
            },
            s_k, lane, s);
      }

      // Scale into the log2 domain; mask PARTIAL tiles and keys past the end; online softmax.
      // (kMassInSmem: a tile of two key segments also splits its row sums at the boundary.)
      if constexpr (Traits::kMassInSmem) {
        SEGATTN_UNROLL
        for (int i = 0; i < kMT; ++i) {
          blk.scale_and_mask(s[i], p, row_tile(i), lane, kid, k0, cls == SEGATTN_TILE_PARTIAL);
        }
        const int valid = min(kN, kv_len - k0);
        const int id0 = static_cast<int>(kid[0]);
        const bool two = static_cast<int>(kid[valid - 1]) != id0;  // uniform
        mask::KeyRuns runs{valid, kid[0], kid[0], true};
        if (two) {
          runs = mask::key_runs<kN>(kid, valid, lane);
          if (!runs.at_most_two) __trap();  // the launcher takes another kernel for such masks
          SEGATTN_UNROLL
          for (int i = 0; i < kMT; ++i) softmax[i].template update<true>(s[i], o[i], runs.end0, lane);
        } else {
          SEGATTN_UNROLL
          for (int i = 0; i < kMT; ++i) softmax[i].update(s[i], o[i]);
        }
        mass::rescale_owned_row(softmax, mass_rows, lane);
        mass::accumulate_rows_in_smem(softmax, two, id0, static_cast<int>(runs.id1), lane, mass_rows);
      } else {
        SEGATTN_UNROLL
        for (int i = 0; i < kMT; ++i) {
          blk.scale_and_mask(s[i], p, row_tile(i), lane, kid, k0, cls == SEGATTN_TILE_PARTIAL);
          softmax[i].update(s[i], o[i]);
        }
      }
      if constexpr (Traits::kMass && !Traits::kMassInSmem) {
        softmax[0].rescale(macc);
        pending.rescale(softmax[0]);
        mass::accumulate_one_pass<1, kN>(s[0], softmax[0].tile_sum, kid, min(kN, kv_len - k0), lane, pending, macc);
      }

      // O += P V, with P packed to 16 bits straight from the S accumulators; each V fragment
      // serves every row tile of the warp.
      SEGATTN_UNROLL
      for (int kc = 0; kc < Traits::kPK; ++kc) {
        uint32_t pa[kMT][4];
        SEGATTN_UNROLL
        for (int i = 0; i < kMT; ++i) p_fragment<T>(s[i], kc, pa[i]);
        SEGATTN_UNROLL
        for (int dp = 0; dp < Traits::kNO / 2; ++dp) {
          uint32_t vb[4];
          load_v_fragments<Traits>(s_v, dp, kc, lane, vb);
          SEGATTN_UNROLL
          for (int i = 0; i < kMT; ++i) {
            mma_16816<T>(o[i][2 * dp], pa[i], vb[0], vb[1]);
            mma_16816<T>(o[i][2 * dp + 1], pa[i], vb[2], vb[3]);
          }
        }
      }

      __syncthreads();  // every warp is done with buffer `buf` before it is refilled
      tile = next;
      cls = next_cls;
      buf ^= 1;
    }
  }

  // Epilogue. Each warp stages its own rows of O in its own rows of the Q tile (no warp reads
  // them after the loop's last barrier, no copy into them is in flight), then stores them with
  // 16-byte writes.
  float inv[kMT][2];
  float lse[kMT][2];
  SEGATTN_UNROLL
  for (int i = 0; i < kMT; ++i) softmax[i].finalize(inv[i], lse[i]);
  if constexpr (Traits::kMassInSmem) {
    if (p.mass.mass != nullptr) {
      // The row this lane owns in the sums: its query segment, output and 1 / sum.
      const int c = lane % 4;
      const int i = c >> 1;
      const int r = c & 1;
      uint32_t row_seg[2];
      int row_pos[2];
      blk.rows(row_tile(i), lane, row_seg, row_pos);
      float* row_out[2];
      mass::row_outputs(p.mass, b, h, q0, q1, row_tile(i), g, row_seg, row_out);
      float row_inv = 0.0f;
      SEGATTN_UNROLL
      for (int t = 0; t < kMT; ++t) row_inv = t == i ? inv[t][r] : row_inv;
      mass::store_owned_row(mass_rows(), row_inv, row_out[r], p.mass, lane);
    }
  } else if constexpr (Traits::kMass) {
    if (p.kv_splits <= 1 && p.mass.mass != nullptr) {
      // The sums are held at mass::kSumScale (kTermScale where P went in as two f16 terms).
      constexpr float sum_scale = mass::kSumScale<Traits::kMassTerms>;
      float row_inv[2];
      SEGATTN_UNROLL
      for (int r = 0; r < 2; ++r) row_inv[r] = inv[0][r] * (1.0f / sum_scale);
      float* row_out[2];
      uint32_t row_seg[2];
      int row_pos[2];
      blk.rows(warp, lane, row_seg, row_pos);
      mass::row_outputs(p.mass, b, h, q0, q1, warp, g, row_seg, row_out);
      pending.flush(lane, sum_scale, macc);
      mass::store_rows(macc, row_inv, row_out, p.mass, lane);
    }
    if constexpr (Traits::kScoresOnly) return;  // the standalone mass: the sums are its whole output
  }
  if (p.kv_splits > 1) {
    // This split's normalised partial output and LSE, f32, for the merge below.
    const int64_t bh = (static_cast<int64_t>(blk.split) * p.batch + b) * p.num_heads + h;
    SEGATTN_UNROLL
    for (int i = 0; i < kMT; ++i) {
      SEGATTN_UNROLL
      for (int r = 0; r < 2; ++r) {
        const int row = q0 + row_tile(i) * 16 + g + 8 * r;
        if (row >= q1) continue;
        float* const acc = p.o_accum + (bh * p.q_len + row) * Traits::kHeadDim + quad_col;
        SEGATTN_UNROLL
        for (int ob = 0; ob < Traits::kNO; ++ob) {
          *reinterpret_cast<float2*>(acc + ob * 8) =
              make_float2(o[i][ob][2 * r] * inv[i][r], o[i][ob][2 * r + 1] * inv[i][r]);
        }
        if ((lane % 4) == 0) p.lse_accum[bh * p.q_len + row] = lse[i][r];
      }
    }
    // Published before the count; the last slice of this query tile to finish merges its rows
    // (one warp per row). The flag lives in the K buffer, free since the loop's last barrier; no
    // copy into it is in flight on any path (the loop and the no-tile path end in wait<0>), and
    // this wait, free here, keeps it so if a path changes (the emulator lands copies only at a
    // wait, so it would not show one that lands on the flag).
    cp_async_wait<0>();
    __threadfence();
    __syncthreads();
    uint32_t* const s_last = reinterpret_cast<uint32_t*>(smem + Traits::kOffK);
    if (threadIdx.x == 0) {
      if (p.split_done == nullptr) __trap();  // the launcher provides the counters with split-K
      const int64_t tile = (static_cast<int64_t>(b) * p.num_heads + h) * ((p.q_len + kM - 1) / kM) + q0 / kM;
      *s_last = arrive_last(p.split_done + tile, static_cast<uint32_t>(p.kv_splits)) ? 1u : 0u;
    }
    __syncthreads();
    if (*s_last == 0u) return;
    __threadfence();
    for (int row = q0 + warp; row < q1; row += Traits::kWarps) {
      merge_split_row<T, Traits::kHeadDim>(p, (static_cast<int64_t>(b) * p.num_heads + h) * p.q_len + row, lane);
    }
    return;
  }
  T* const o_base = static_cast<T*>(p.o) + static_cast<int64_t>(b) * p.o_strides.batch +
                    static_cast<int64_t>(h) * p.o_strides.head;
  SEGATTN_UNROLL
  for (int i = 0; i < kMT; ++i) {
    const int tile_row0 = row_tile(i) * 16;
    SEGATTN_UNROLL
    for (int ob = 0; ob < Traits::kNO; ++ob) {
      SEGATTN_UNROLL
      for (int r = 0; r < 2; ++r) {
        const int row = tile_row0 + g + 8 * r;
        *reinterpret_cast<uint32_t*>(s_q + swizzle<kChunks>(row, ob) + quad_col * 2) =
            pack2<T>(o[i][ob][2 * r] * inv[i][r], o[i][ob][2 * r + 1] * inv[i][r]);
      }
    }
    __syncwarp();
    SEGATTN_UNROLL
    for (int it = 0; it < 16 * kChunks / 32; ++it) {
      const int idx = it * 32 + lane;
      const int r = idx / kChunks;
      const int chunk = idx % kChunks;
      const int row = q0 + tile_row0 + r;
      if (row < q1) {
        *reinterpret_cast<uint4*>(o_base + static_cast<int64_t>(row) * p.o_strides.row + chunk * 8) =
            *reinterpret_cast<const uint4*>(s_q + swizzle<kChunks>(tile_row0 + r, chunk));
      }
    }
    if (p.lse != nullptr && (lane % 4) == 0) {
      SEGATTN_UNROLL
      for (int r = 0; r < 2; ++r) {
        const int row = q0 + tile_row0 + g + 8 * r;
        if (row < q1) p.lse[(static_cast<int64_t>(b) * p.num_heads + h) * p.q_len + row] = lse[i][r];
      }
    }
  }
}

}  // namespace fwd
}  // namespace segattn

#endif  // SEGATTN_FWD_KERNEL_CUH
