// The per-segment attention mass kernel: Q K^T, the online softmax statistics and, per query row,
// the sum of the probabilities over each key segment id. No V, nothing of size Lq x Lk.
//
// Same structure as the forward kernel (fwd_kernel.cuh): grid (ceil(Lq / kBlockM), H, B), 128
// threads, warp w owns query rows 16w .. 16w + 15 of the block's tile (the wide kernel, 128 rows:
// also 64 + 16w ..; each K fragment serves both row tiles); the same tile classes found ahead
// (block_info.cuh: SKIP tiles never loaded), cp.async double-buffered K tiles, Q in registers as
// ldmatrix A fragments (wide: read from its shared tile), S = Q K^T with mma.sync m16n8k16,
// masking and OnlineSoftmax (softmax.cuh).
// The segment sums (segment_mass.cuh): f32 row sums for a tile of one or two segments (nearly
// all), else two more mma per 16 keys and 8 segments (P, as an f16 value plus the f16 value of
// its rounding error, times a one-hot segment matrix built in registers from the key ids):
// f32-like sums, which PINE's importance order needs.
//
// Two algorithms (p.two_pass):
//   one pass (Sk <= 64): accumulators for segment ids 0..63 on chip, acc[8][4] per thread (the C
//     fragments of 16 rows x 64 segments per warp), rescaled with the running max exactly like O
//     (OnlineSoftmax::update takes them as its `o`); per tile only the 8-segment blocks between
//     the tile's first and last key id are multiplied (a documents tile: one block). Epilogue:
//     acc / row sum, stored (or added under a reduction).
//   two passes (any Sk): pass 1 the row max and sum only (no accumulator; skipped when the caller
//     gives the rows' LSE from the forward kernel, p.saved_lse); pass 2 recomputes S
//     and takes the exact probabilities 2^(s - lse2); the segments of a tile are numbered locally
//     (piece order, at most 64: a ballot of the piece starts), the tile's sums go through the
//     one-hot mma into per-tile accumulators and are added to mass[row][global id] at once: each
//     (row, segment) element has one owner thread, so without a reduction no atomics are needed.
//
// Shared memory (dynamic): K[2] kBlockN x D (double buffer; the Q tile is staged in K buffer 1,
// as in the forward kernel, or, wide, has its own tile after K), then q_id / q_end / q_starts
// (classifier), k_id[2][kBlockN],
// local_id[2][kBlockN] (global id of each local segment of the buffer's tile), scan[2 * kWarps],
// class[kThreads] (the window of key-tile classes found ahead, block_info.cuh).
#ifndef SEGATTN_SCORES_KERNEL_CUH
#define SEGATTN_SCORES_KERNEL_CUH

#include <type_traits>

#include "platform.cuh"
#include "dtypes.cuh"
#include "ptx.cuh"
#include "segattn_params.h"
#include "kernel_traits.cuh"
#include "block_info.cuh"
#include "mask.cuh"
#include "qk_tile.cuh"
#include "segment_mass.cuh"
#include "softmax.cuh"
#include "tile_load.cuh"

namespace segattn {
namespace scores {

template <class Element, int kHeadDim_, int kMTiles_ = 1, int kBlockN_ = 0>
struct ScoresTraits {
  using T = Element;
  static constexpr int kHeadDim = kHeadDim_;
  // Row tiles of 16 query rows per warp: 1, or 2 for the wide kernel (as the forward kernel's:
  // each K fragment and each one-hot segment fragment serves both row tiles, and the loop's
  // per-tile costs are shared by 128 rows); its Q is read from its own shared tile.
  static constexpr int kMTiles = kMTiles_;
  static_assert(kMTiles == 1 || kMTiles == 2, "one or two row tiles per warp");
  // Q read from its own shared tile at each k-step (not held in registers) for the wide kernel and
  // at D = 128, whose 32 Q registers would keep the 64-row kernel from three blocks per SM.
  static constexpr bool kQInSmem = kMTiles > 1 || kHeadDim >= 128;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = kWarps * 16 * kMTiles;
  // Keys per tile (kBlockN_ 0: the default): 64; 32 for the wide kernel (two row tiles' S and
  // segment accumulators: at 64 keys its D = 64 build spilled on sm_90). kBlockN_ = 64 there is
  // the forward kernel's 128 x 64 tile (segattn_scores_wide64_*, D = 128: 251 registers, no
  // spill), opt-in until timed (SEGATTN_SCORES_WIDE_KEYS=64).
  static constexpr int kBlockN = kBlockN_ != 0 ? kBlockN_ : (kMTiles > 1 ? 32 : 64);
  static_assert(kBlockN == 32 || kBlockN == 64, "key tiles of 32 or 64");
  // Blocks per SM the registers must allow (__launch_bounds__): three for the 64-row kernel (at
  // most 168 registers: 160-162, no spill; 188 at D = 64 and 208-216 at D = 128 unbounded; at
  // D = 128 with Q in shared memory and the rows' output pointers not held through the loop),
  // else one (the compiler's choice).
  // D = 256 (64-row kernel only): its two K buffers and Q tile (96 KiB) fit two blocks per SM.
  static constexpr int kMinBlocks = kMTiles == 1 ? (kHeadDim == 256 ? 2 : 3) : 1;
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256, "head dims 64, 128 and 256 are instantiated");
  static_assert(kHeadDim != 256 || kMTiles == 1, "D = 256: the 64-row kernel only");
  static_assert(sizeof(T) == 2, "16-bit inputs");

  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per tile row
  static constexpr int kDK = kHeadDim / 16;     // k-steps of S = Q K^T
  static constexpr int kNS = kBlockN / 8;       // n-blocks of S
  static constexpr int kPK = kBlockN / 16;      // k-steps of P x one-hot
  // Segment n-blocks of 8: one pass holds ids 0 .. 8 * kSegBlocks - 1; two passes number at most
  // kBlockN local segments per tile.
  static constexpr int kSegBlocks = mass::kSegBlocks;
  static constexpr int kMaxOnePassSegments = mass::kMaxOnePassSegments;
  static_assert(kBlockN <= kMaxOnePassSegments, "a tile has at most kBlockN <= 64 local segments");

  static constexpr int kKBytes = kBlockN * kHeadDim * 2;
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kOffK = 0;              // + buf * kKBytes
  // Q shares K buffer 1 (in registers before its reuse), or (kQInSmem) has its own tile after K.
  static constexpr int kOffQ = kQInSmem ? kOffK + 2 * kKBytes : kOffK + kKBytes;
  static_assert(kQInSmem || kQBytes <= kKBytes, "the Q tile fits in a K buffer");
  static constexpr int kOffQId = kOffK + 2 * kKBytes + (kQInSmem ? kQBytes : 0);  // u32[kBlockM]
  static constexpr int kOffQEnd = kOffQId + 4 * kBlockM;               // i32[kBlockM]
  static constexpr int kOffQStarts = kOffQEnd + 4 * kBlockM;           // u32[kBlockM / 32]
  static constexpr int kOffKId = kOffQStarts + 4 * (kBlockM / 32);     // u32[2][kBlockN]
  static constexpr int kOffLocalId = kOffKId + 4 * 2 * kBlockN;        // u32[2][kBlockN]
  static constexpr int kOffScan = kOffLocalId + 4 * 2 * kBlockN;      // i32[2 * kWarps]
  static constexpr int kOffClass = kOffScan + 4 * 2 * kWarps;  // u8[kThreads]: tile classes ahead
  static constexpr int kSmemBytes = kOffClass + kThreads;
  static constexpr int kScanBudget = 64;
  static_assert(kOffK % 128 == 0 && kOffQId % 16 == 0, "aligned tiles");
};

// Local segment of key j of a tile: the number of piece starts at keys <= j, minus one. `starts`
// holds the piece-start bits of keys 0..31 and 32..63.
__device__ __forceinline__ int local_of(const uint32_t (&starts)[2], int j) {
  const uint32_t lo = j < 32 ? (starts[0] & (0xffffffffu >> (31 - j))) : starts[0];
  const uint32_t hi = j < 32 ? 0u : (starts[1] & (0xffffffffu >> (63 - j)));
  return __popc(lo) + __popc(hi) - 1;
}

template <class Traits>
__device__ void scores_kernel(const SegattnScoresParams& sp) {
  using T = typename Traits::T;
  constexpr int kM = Traits::kBlockM;
  constexpr int kN = Traits::kBlockN;
  constexpr int kSB = Traits::kSegBlocks;
  const SegattnFwdParams& p = sp.base;

  SEGATTN_DYNAMIC_SMEM(char, smem);
  char* const s_q = smem + Traits::kOffQ;
  uint32_t* const s_kid = reinterpret_cast<uint32_t*>(smem + Traits::kOffKId);          // [2][kN]
  uint32_t* const s_local_id = reinterpret_cast<uint32_t*>(smem + Traits::kOffLocalId);  // [2][kN]

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int lane = tid % 32;
  fwd::BlockInfo<Traits> blk;
  blk.init(p, smem, 1);  // no split-K (base.kv_splits may be the forward launch's)
  const int b = blk.b;
  const int h = blk.h;
  const int q0 = blk.q0;
  const int q1 = blk.q1;
  const int kv_len = blk.kv_len;
  const int end_tile = blk.end_tile;
  const bool two_pass = sp.two_pass != 0;
  const bool reduce = sp.out.head_reduce != 0 || sp.out.query_reduce != 0;

  // Piece starts of tile t, whose key ids are in `kid` (published by a barrier), as two ballots;
  // the global id of each local segment goes to `local_id` (visible after the next barrier).
  auto number_pieces = [&](int t, const uint32_t* kid, uint32_t* local_id, uint32_t (&starts)[2]) {
    const int valid = min(kN, kv_len - t * kN);
    SEGATTN_UNROLL
    for (int half = 0; half < 2; ++half) {
      const int j = 32 * half + lane;
      const bool start = j < valid && (j == 0 || kid[j] != kid[j - 1]);
      starts[half] = __ballot_sync(0xffffffffu, start);
    }
    if (tid < kN) {
      const int j = tid;
      if (j < valid && (j == 0 || kid[j] != kid[j - 1])) local_id[local_of(starts, j)] = kid[j];
    }
  };

  const T* const q_base = blk.template q_rows<T>(p.q, p.q_strides);
  const T* const k_base = blk.template kv_rows<T>(p.k, p.k_strides);
  auto load_k_async = [&](int t, int buf) {
    const int k0 = t * kN;
    fwd::load_tile_async<Traits, kN>(smem + Traits::kOffK + buf * Traits::kKBytes,
                                k_base + static_cast<int64_t>(k0) * p.k_strides.row, p.k_strides.row,
                                min(kN, kv_len - k0));
  };

  // This thread's rows: g and g + 8 of each of the warp's kMT row tiles (row tile i of warp w is
  // rows 16 (w + kWarps i) .. + 15 of the block), and where they land in `mass` (query
  // reduction: the row's query segment id).
  constexpr int kMT = Traits::kMTiles;
  const auto row_tile = [&](int i) { return warp + Traits::kWarps * i; };
  const int g = lane / 4;
  const int quad_col = 2 * (lane % 4);
  // Computed where used (not held through the loop: four registers fewer).
  const auto outputs_of = [&](int i, float* (&row_out)[2]) {
    uint32_t row_seg[2];
    int row_pos[2];
    blk.rows(row_tile(i), lane, row_seg, row_pos);
    mass::row_outputs(sp.out, b, h, q0, q1, row_tile(i), g, row_seg, row_out);
  };

  // One pass: the accumulators of segment ids 0..8 kSB - 1 (C fragments: rows g, g + 8; ids
  // 8 nb + quad_col + {0, 1}). Two passes: the current tile's sums by local segment.
  float acc[kMT][kSB][4];
  mass::PendingSums pending[kMT];  // one pass: the last tiles' sums of one segment, not yet in acc
  fwd::OnlineSoftmax softmax[kMT];
  // Two passes: log2-domain LSE of each row (+inf: sees nothing).
  float lse2[kMT][2];
  SEGATTN_UNROLL
  for (int i = 0; i < kMT; ++i) {
    SEGATTN_UNROLL
    for (int nb = 0; nb < kSB; ++nb) {
      SEGATTN_UNROLL
      for (int e = 0; e < 4; ++e) acc[i][nb][e] = 0.0f;
    }
    softmax[i].init();
    pending[i].init();
    lse2[i][0] = INFINITY;
    lse2[i][1] = INFINITY;
  }
  // Two passes with the forward kernel's LSE: the statistics pass is skipped.
  const bool saved = two_pass && sp.saved_lse != nullptr;
  if (saved) {
    SEGATTN_UNROLL
    for (int i = 0; i < kMT; ++i) {
      SEGATTN_UNROLL
      for (int r = 0; r < 2; ++r) {
        const int row = q0 + row_tile(i) * 16 + g + 8 * r;
        const float lse = row < q1 ? sp.saved_lse[(static_cast<int64_t>(b) * p.num_heads + h) * p.q_len + row]
                                   : -INFINITY;
        lse2[i][r] = lse == -INFINITY ? INFINITY : lse * 1.44269504088896340736f;  // ln -> log2
      }
    }
  }
  uint32_t qf[Traits::kQInSmem ? 1 : Traits::kDK][4];

  const int passes = two_pass ? 2 : 1;
  for (int pass = saved ? 1 : 0; pass < passes; ++pass) {
    const bool stats_only = two_pass && pass == 0;
    const bool exact = two_pass && pass == 1;
    const bool first = pass == (saved ? 1 : 0);  // loads the Q tile
    int cls = SEGATTN_TILE_SKIP;
    int tile = blk.next_visible(p, blk.first_tile, cls);
    if (tile < end_tile) {
      if (tid < kN) s_kid[tid] = blk.key_id(p, tile, tid);  // published by the barrier below
      if (first) {
        fwd::load_tile_async<Traits, kM>(s_q, q_base, p.q_strides.row, q1 - q0);
        cp_async_commit();
      }
      load_k_async(tile, 0);
      cp_async_commit();
      if (first) {
        cp_async_wait<1>();  // the Q group
        __syncthreads();
        if constexpr (!Traits::kQInSmem) fwd::load_q_fragments<Traits>(s_q, warp, lane, qf);
      }
      __syncthreads();  // the ids; (first pass) the Q tile may share K buffer 1, which the loop's
                        // first prefetch overwrites
    }

    int buf = 0;
    while (tile < end_tile) {
      int next_cls = SEGATTN_TILE_SKIP;
      const int next = blk.next_visible(p, tile + 1, next_cls);
      // The next tile's key ids: loaded now, stored at the end of the iteration.
      const uint32_t next_kid = tid < kN && next < end_tile ? blk.key_id(p, next, tid) : 0u;
      // This tile's pieces (its ids were published by the last barrier), before the barrier that
      // publishes local_id.
      uint32_t starts[2] = {0u, 0u};
      if (exact) number_pieces(tile, s_kid + buf * kN, s_local_id + buf * kN, starts);
      if (next < end_tile) {
        load_k_async(next, buf ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();

      const char* const s_k = smem + Traits::kOffK + buf * Traits::kKBytes;
      const uint32_t* const kid = s_kid + buf * kN;
      const int k0 = tile * kN;

      // S = Q K^T, each K fragment serving every row tile of the warp.
      float s[kMT][Traits::kNS][4];
      fwd::qk_tiles<Traits, kMT>(
          [&](int i, int kc, uint32_t(&qa)[4]) {
            if constexpr (Traits::kQInSmem) {
              fwd::load_q_fragment<Traits>(s_q, row_tile(i), lane, kc, qa);
            } else {
              SEGATTN_UNROLL
              for (int j = 0; j < 4; ++j) qa[j] = qf[kc][j];
            }
          },
          s_k, lane, s);

      // The exact pass: the tile's local segments (piece order), the blocks of 8 they fill, and
      // whether there is only one.
      const int nloc = exact ? __popc(starts[0]) + __popc(starts[1]) : 0;
      const int nb_hi = (nloc - 1) / 8;
      const auto local_seg = [&](int j) { return local_of(starts, j); };

      SEGATTN_UNROLL
      for (int i = 0; i < kMT; ++i) {
        // Scale into the log2 domain; mask PARTIAL tiles and keys past the end.
        blk.scale_and_mask(s[i], p, row_tile(i), lane, kid, k0, cls == SEGATTN_TILE_PARTIAL);
        if (stats_only) {
          float none[1][4] = {{0.0f, 0.0f, 0.0f, 0.0f}};
          softmax[i].update(s[i], none);
          continue;
        }
        if (!exact) {
          // s -> unnormalised P; acc and the pending sums rescaled like O; the tile's sums by
          // global id (PendingSums, or two f16 terms of P through the one-hot mma: PINE orders
          // segments by these sums, so they must agree with f32 ones well below the gaps that
          // decide an order; one term would be 2^-11 relative). acc holds the sums times
          // mass::kTermScale.
          softmax[i].update(s[i], acc[i]);
          pending[i].rescale(softmax[i]);
          mass::accumulate_one_pass<2, kN>(s[i], softmax[i].tile_sum, kid, min(kN, kv_len - k0), lane, pending[i],
                                           acc[i]);
        } else {
          SEGATTN_UNROLL
          for (int nb = 0; nb < Traits::kNS; ++nb) {
            SEGATTN_UNROLL
            for (int e = 0; e < 4; ++e) s[i][nb][e] = exp2_approx(s[i][nb][e] - lse2[i][e >> 1]);
          }
          // Two passes: acc holds this tile's sums only (local segments), as above.
          SEGATTN_UNROLL
          for (int nb = 0; nb < kSB; ++nb) {
            SEGATTN_UNROLL
            for (int e = 0; e < 4; ++e) acc[i][nb][e] = 0.0f;
          }
          mass::accumulate_tile<2>(s[i], local_seg, nloc == 1, lane, 0, nb_hi, acc[i]);
          // Add the tile's sums to mass[row][global id of each local segment].
          float* row_out[2];
          outputs_of(i, row_out);
          const uint32_t* const local_id = s_local_id + buf * kN;
          SEGATTN_UNROLL
          for (int nb = 0; nb < kSB; ++nb) {
            if (nb > nb_hi) continue;
            SEGATTN_UNROLL
            for (int e = 0; e < 4; ++e) {
              const int loc = 8 * nb + quad_col + (e & 1);
              float* const out = row_out[e >> 1];
              const float v = acc[i][nb][e] * (1.0f / mass::kTermScale);
              const uint32_t id = local_id[loc];
              // (Every key id is below num_segments; the test only keeps a stray id in bounds.)
              if (loc < nloc && out != nullptr && v != 0.0f && id < static_cast<uint32_t>(sp.out.num_segments)) {
                float* const dst = out + id;
                if (reduce) {
                  segattn::atomic_add(dst, v);
                } else {
                  *dst += v;  // this thread owns (row, segment): no other writer
                }
              }
            }
          }
        }
      }

      // Buffer buf ^ 1's ids and local ids were last read for the previous tile.
      if (tid < kN) s_kid[(buf ^ 1) * kN + tid] = next_kid;
      __syncthreads();  // every warp is done with buffer `buf` before it is refilled
      tile = next;
      cls = next_cls;
      buf ^= 1;
    }

    if (stats_only) {
      SEGATTN_UNROLL
      for (int i = 0; i < kMT; ++i) {
        SEGATTN_UNROLL
        for (int r = 0; r < 2; ++r) {
          const float sum = fwd::quad_sum(softmax[i].row_sum[r]);
          // A NaN sum (NaN inputs) gives a NaN LSE, hence NaN mass in the second pass.
          lse2[i][r] = fwd::row_seen(sum) ? softmax[i].row_max[r] + log2f(sum) : INFINITY;
        }
      }
    }
  }

  if (!two_pass) {
    // Epilogue: normalise by the row sum; store every (row < q1, id < num_segments) element, or
    // add the nonzero ones under a reduction.
    SEGATTN_UNROLL
    for (int i = 0; i < kMT; ++i) {
      float inv[2];
      float lse[2];
      softmax[i].finalize(inv, lse);
      SEGATTN_UNROLL
      for (int r = 0; r < 2; ++r) inv[r] *= 1.0f / mass::kTermScale;  // acc holds scaled sums
      pending[i].flush(lane, mass::kTermScale, acc[i]);
      float* row_out[2];
      outputs_of(i, row_out);
      mass::store_rows(acc[i], inv, row_out, sp.out, lane);
    }
  }
}

}  // namespace scores
}  // namespace segattn

#endif  // SEGATTN_SCORES_KERNEL_CUH
