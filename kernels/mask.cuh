// The segment mask on the device: rule lookup, piece visibility, tile classification and the
// per-element test. Exactly the definitions of src/mask/tiles.rs and src/mask/rule.rs (keep them
// in step; tests/emulated_fwd.rs checks that both classify random tiles alike).
//
// A tile is query rows [q0, q1) x keys [k0, k1), both clipped to the sequence. Both ranges are cut
// into segment pieces; each pair of pieces (query segment sq rows [qa, qb), key segment sk keys
// [ka, kb)) with rule r = rule(sq, sk) is
//   - empty when r is BLOCKED, or CAUSAL with ka > pos(qb - 1);
//   - full  when r is FULL,    or CAUSAL with kb - 1 <= pos(qa);
//   - mixed otherwise,
// with pos(i) = i + (Lk - Lq). The tile is SKIP when every pair is empty, FULL when every pair is
// full, PARTIAL otherwise.
#ifndef SEGATTN_MASK_CUH
#define SEGATTN_MASK_CUH

#include "platform.cuh"
#include "kernel_traits.cuh"
#include "segattn_params.h"

namespace segattn {
namespace mask {

// The rule for segment pairs of one batch row.
struct Rule {
  const uint8_t* table;  // this batch row's [size, size] table, or nullptr
  int size;
  int intra;
  int inter;

  __device__ __forceinline__ int lookup(uint32_t sq, uint32_t sk) const {
    if (table != nullptr && sq < static_cast<uint32_t>(size) && sk < static_cast<uint32_t>(size)) {
      const int code = table[static_cast<size_t>(sq) * static_cast<size_t>(size) + sk];
      if (code != SEGATTN_RULE_DEFAULT) return code;
    }
    return sq == sk ? intra : inter;
  }
};

__device__ __forceinline__ Rule rule_of_batch(const SegattnFwdParams& p, int b) {
  Rule r;
  r.table = p.pair_table == nullptr ? nullptr : p.pair_table + static_cast<int64_t>(b) * p.table_batch_stride;
  r.size = p.pair_table == nullptr ? 0 : p.table_size;
  r.intra = p.intra_rule;
  r.inter = p.inter_rule;
  return r;
}

// Segment ids and span ends of one side (queries or keys) for one batch row.
struct Segments {
  const uint32_t* ids;
  const uint32_t* span_end;
};

__device__ __forceinline__ Segments segments_of_batch(const SegattnSegments& s, int b) {
  const int64_t off = static_cast<int64_t>(b) * s.batch_stride;
  return Segments{s.ids + off, s.span_end + off};
}

// classify_alone's answer when its budget of piece pairs ran out (not a SEGATTN_TILE_* code).
constexpr int kTileUnknown = -1;

// Whether key position k_pos is visible to query position q_pos under `rule`.
__device__ __forceinline__ bool allows(int rule, int q_pos, int k_pos) {
  return rule == SEGATTN_RULE_FULL || (rule == SEGATTN_RULE_CAUSAL && k_pos <= q_pos);
}

// The class of the piece pair query rows [qa, qb) x keys [ka, kb) under `rule`.
__device__ __forceinline__ int piece_visibility(int rule, int qa, int qb, int ka, int kb, int pos_offset) {
  if (rule == SEGATTN_RULE_BLOCKED) return SEGATTN_TILE_SKIP;
  if (rule == SEGATTN_RULE_FULL) return SEGATTN_TILE_FULL;
  if (ka > (qb - 1) + pos_offset) return SEGATTN_TILE_SKIP;
  if (kb - 1 <= qa + pos_offset) return SEGATTN_TILE_FULL;
  return SEGATTN_TILE_PARTIAL;
}

// Tile classification for a query tile of up to kBlockM rows and key tiles of up to kBlockN keys,
// in a block of kThreads threads. The query tile's pieces are recorded once in shared memory
// (init_queries, block-collective); then one thread alone classifies a key tile against them
// (classify_alone: the block classifies many tiles at once, a thread each), or bounds the key-tile
// range (visible_tile_range, block-collective).
template <int kBlockM, int kBlockN, int kThreads>
struct TileClassifier {
  static_assert(kBlockM % 32 == 0, "query rows in whole warps (ballot)");
  static_assert(kThreads >= kBlockM, "one thread per query row in init_queries");
  static constexpr int kWords = kBlockM / 32;

  uint32_t* q_id;      // [kBlockM] segment id of each row of the tile (0 past q1)
  int* q_end;          // [kBlockM] end of the piece that starts at a row (clipped to q1)
  uint32_t* q_starts;  // [kWords]  bit r: a piece starts at row q0 + r

  // Records the pieces of query rows [q0, q1). Ends with a barrier.
  __device__ void init_queries(const Segments& q, int q0, int q1) const {
    const int r = threadIdx.x;
    if (r < kBlockM) {
      const int i = q0 + r;
      const bool valid = i < q1;
      const uint32_t id = valid ? q.ids[i] : 0u;
      const bool start = valid && (r == 0 || q.ids[i - 1] != id);
      q_id[r] = id;
      q_end[r] = valid ? min(static_cast<int>(q.span_end[i]), q1) : q1;
      const unsigned bits = __ballot_sync(0xffffffffu, start);
      if ((r & 31) == 0) q_starts[r / 32] = bits;
    }
    __syncthreads();
  }

  // One thread alone: the class of the tile query rows [q0, q1) x keys [k0, k1), or kTileUnknown
  // when that takes more than `budget` piece pairs. No barrier, so a block classifies many tiles
  // at once (a thread each) ahead of its loop. With `stop_if_visible`, returns PARTIAL as soon as
  // one pair is not SKIP (a loop bound needs no more).
  __device__ int classify_alone(const Rule& rule, const Segments& kv, int q0, int k0, int k1, int pos_offset,
                                int budget, bool stop_if_visible = false) const {
    bool any_visible = false;
    bool all_full = true;
    int j = k0;
    while (j < k1) {
      const uint32_t sk = kv.ids[j];
      const int kb = min(static_cast<int>(kv.span_end[j]), k1);
      for (int w = 0; w < kWords; ++w) {
        uint32_t bits = q_starts[w];
        while (bits != 0u) {
          const int r = w * 32 + (__ffs(static_cast<int>(bits)) - 1);
          bits &= bits - 1u;
          if (--budget < 0) return kTileUnknown;
          const int c = piece_visibility(rule.lookup(q_id[r], sk), q0 + r, q_end[r], j, kb, pos_offset);
          any_visible |= c != SEGATTN_TILE_SKIP;
          all_full &= c == SEGATTN_TILE_FULL;
          if (any_visible && (stop_if_visible || !all_full)) return SEGATTN_TILE_PARTIAL;
        }
      }
      j = kb;
    }
    if (!any_visible) return SEGATTN_TILE_SKIP;
    return all_full ? SEGATTN_TILE_FULL : SEGATTN_TILE_PARTIAL;
  }

  // One thread alone, conservative: false only when the tile query rows [q0, q1) x keys
  // [k0, k1) is SKIP. Evaluates at most `budget` piece pairs and answers true past that. Used to
  // bound the key-tile loop (first and last tile that may be visible) without block barriers.
  __device__ bool may_be_visible(const Rule& rule, const Segments& kv, int q0, int k0, int k1, int pos_offset,
                                 int budget) const {
    return classify_alone(rule, kv, q0, k0, k1, pos_offset, budget, true) != SEGATTN_TILE_SKIP;
  }

  // The first and last key tile (of kBlockN keys, `num_tiles` of them) that may be visible to the
  // query tile, by may_be_visible over the tiles spread across the block's threads, reduced
  // through `scratch` (2 * kThreads / 32 ints of shared memory). last < first when none is.
  // When every tile has a thread (num_tiles <= kThreads), each thread classifies its tile exactly
  // instead, into `window[t]` (kThreads bytes; SKIP past num_tiles): the loop then needs no other
  // classification pass, and the function returns true. Every thread of the block must call it
  // (it contains __syncthreads; the window is readable by all after it returns).
  __device__ bool visible_tile_range(const Rule& rule, const Segments& kv, int q0, int kv_len, int pos_offset,
                                     int num_tiles, int budget, int* scratch, uint8_t* window, int& first,
                                     int& last) const {
    int lo = num_tiles;
    int hi = -1;
    const bool one_pass = num_tiles <= kThreads;
    if (one_pass) {
      const int t = threadIdx.x;
      int c = SEGATTN_TILE_SKIP;
      if (t < num_tiles) {
        const int k0 = t * kBlockN;
        c = classify_alone(rule, kv, q0, k0, min(k0 + kBlockN, kv_len), pos_offset, kBlockM * kBlockN);
      }
      window[t] = static_cast<uint8_t>(c);
      if (c != SEGATTN_TILE_SKIP) {
        lo = t;
        hi = t;
      }
    } else {
      for (int t = threadIdx.x; t < num_tiles; t += kThreads) {
        const int k0 = t * kBlockN;
        if (may_be_visible(rule, kv, q0, k0, min(k0 + kBlockN, kv_len), pos_offset, budget)) {
          lo = min(lo, t);
          hi = max(hi, t);
        }
      }
    }
    for (int m = 16; m >= 1; m /= 2) {
      lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, m));
      hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, m));
    }
    constexpr int kWarps = kThreads / 32;
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
      scratch[warp] = lo;
      scratch[kWarps + warp] = hi;
    }
    __syncthreads();
    first = scratch[0];
    last = scratch[kWarps];
    for (int w = 1; w < kWarps; ++w) {
      first = min(first, scratch[w]);
      last = max(last, scratch[kWarps + w]);
    }
    return one_pass;
  }
};

// No limit: every key position is at most this.
constexpr int kNoKeyLimit = 0x7fffffff;

// Under `rule`, the query at position q_pos sees exactly the keys at positions <= this limit
// (FULL: all, CAUSAL: up to its own position, BLOCKED: none, key positions being >= 0): allows()
// as one comparison, for a row and a run of keys of one segment.
__device__ __forceinline__ int key_limit(int rule, int q_pos) {
  return rule == SEGATTN_RULE_FULL ? kNoKeyLimit : rule == SEGATTN_RULE_CAUSAL ? q_pos : -1;
}

// The first column in [from, valid) of a key tile whose segment id (`kid`, kN ids in shared
// memory) is not `id`, or `valid` if none. Warp-collective (a ballot per 32 keys); uniform.
template <int kN>
__device__ __forceinline__ int first_key_not_in(const uint32_t* kid, uint32_t id, int from, int valid, int lane) {
  SEGATTN_UNROLL
  for (int w = 0; w < kN / 32; ++w) {
    const int col = 32 * w + lane;
    const unsigned other = __ballot_sync(0xffffffffu, col >= from && col < valid && kid[col] != id);
    if (other != 0u) return 32 * w + __ffs(static_cast<int>(other)) - 1;
  }
  return valid;
}

// A key tile's keys as runs of one segment id: a masked tile or a mass tile across a segment
// boundary nearly always has one or two (a diagonal, a boundary), which the kernels treat with
// per-run quantities instead of per-key ones.
struct KeyRuns {
  int end0;           // the first run is columns [0, end0) (end0 == valid: one run)
  uint32_t id0, id1;  // the first run's id and the second's (id0 again with one run)
  bool at_most_two;   // no third run before `valid`
};

// The runs of the first `valid` keys of a tile (`kid`, kN ids in shared memory).
// Warp-collective; the result is uniform.
template <int kN>
__device__ __forceinline__ KeyRuns key_runs(const uint32_t* kid, int valid, int lane) {
  KeyRuns runs;
  runs.id0 = kid[0];
  runs.end0 = first_key_not_in<kN>(kid, runs.id0, 0, valid, lane);
  runs.id1 = kid[min(runs.end0, valid - 1)];
  runs.at_most_two = runs.end0 >= valid || first_key_not_in<kN>(kid, runs.id1, runs.end0, valid, lane) >= valid;
  return runs;
}

// Whether key `k_pos` (segment sk) is visible to the query at position `q_pos` (segment sq): the
// per-element test of PARTIAL tiles.
__device__ __forceinline__ bool element_visible(const Rule& rule, uint32_t sq, uint32_t sk, int q_pos, int k_pos) {
  return allows(rule.lookup(sq, sk), q_pos, k_pos);
}

}  // namespace mask
}  // namespace segattn

#endif  // SEGATTN_MASK_CUH
