// Where one thread block of the forward and mass kernels works, and how it walks the key tiles:
// its batch row, head and KV head (GQA), its query rows [q0, q1), the mask's rule and key
// segments of its batch row, the range of key tiles that may be visible (a cheap scan, then the
// split-K slice), and the next tile that is not SKIP. The prologue both kernels share.
//
// Tile classes come from a window of kThreads tiles classified ahead, one tile per thread
// (mask.cuh classify_alone, exact, no barrier), kept in shared memory: finding the next tile in the
// loop reads that window, instead of classifying each tile with global loads of its key ids and
// block barriers on the loop's critical path.
#ifndef SEGATTN_BLOCK_INFO_CUH
#define SEGATTN_BLOCK_INFO_CUH

#include "platform.cuh"
#include "segattn_params.h"
#include "mask.cuh"
#include "ptx.cuh"

namespace segattn {
namespace fwd {

// Block-collective: classifies tiles [base, base + kThreads) ahead, one per thread, into `window`.
// Out of line: the loop calls it once per 128 tiles, and inlined, its temporaries would add to the
// register pressure of the whole loop. Arguments by value, so that the caller's state stays in
// registers (the caller saves what is live around the call).
// (Templated on the tile shape only: one copy per shape, whatever the kernel's element type.)
template <int kBlockM, int kBlockN, int kThreads>
__device__ __noinline__ void fill_class_window(const mask::TileClassifier<kBlockM, kBlockN, kThreads> classifier,
                                               const mask::Rule rule, const mask::Segments kv, int q0, int kv_len,
                                               int pos_offset, int end_tile, int base, uint8_t* window) {
  __syncthreads();  // every thread has read the previous window
  const int t = base + static_cast<int>(threadIdx.x);
  int c = SEGATTN_TILE_SKIP;
  if (t < end_tile) {
    const int k0 = t * kBlockN;
    // Budget: every piece pair of the tile, so the class is exact (typical tiles have a few).
    c = classifier.classify_alone(rule, kv, q0, k0, min(k0 + kBlockN, kv_len), pos_offset, kBlockM * kBlockN);
  }
  window[threadIdx.x] = static_cast<uint8_t>(c);
  __syncthreads();
}

template <class Traits>
struct BlockInfo {
  static constexpr int kM = Traits::kBlockM;
  static constexpr int kN = Traits::kBlockN;
  using Classifier = mask::TileClassifier<kM, kN, Traits::kThreads>;

  int b, h, kh;        // batch row, head, its KV head
  int split;           // the block's key slice (split-K), 0 without
  int q0, q1;          // the block's query rows
  int kv_len;          // keys
  int pos_offset;      // query row i sits at position i + pos_offset
  int first_tile;      // key tiles [first_tile, end_tile) may be visible
  int end_tile;
  int window_base;     // block-uniform: window() holds the classes of tiles [window_base, + kThreads)
                       // (none yet: a value no tile index reaches)

  // Block-collective (barriers): locate() then find_tiles().
  __device__ void init(const SegattnFwdParams& p, char* smem, int kv_splits) {
    locate(p, kv_splits);
    find_tiles(p, smem, kv_splits);
  }

  // The block of grid x = gridDim.x - 1 - (query tile * kv_splits + split) (kv_splits <= 1: no
  // split-K): its batch row, heads and query rows, from the grid alone (no memory read: the
  // forward kernel issues its Q tile's copy before the key-tile scan, to overlap the two).
  __device__ void locate(const SegattnFwdParams& p, int kv_splits) {
    // A grid built for another entry point (params.block_rows, 0 read as 64) would cover the
    // wrong rows: fail loudly.
    if ((p.block_rows == 0 ? 64 : p.block_rows) != kM) __trap();
    if (p.block_keys != 0 && p.block_keys != kN) __trap();
    window_base = -2 * Traits::kThreads;
    const int splits = max(kv_splits, 1);
    // One block per (query tile, slice): the last slice of a tile to finish merges, counted
    // against kv_splits (another grid width would merge early or never).
    if (static_cast<int>(gridDim.x) != (p.q_len + kM - 1) / kM * splits) __trap();
    b = static_cast<int>(blockIdx.z);
    h = static_cast<int>(blockIdx.y);
    kh = h / (p.num_heads / p.num_kv_heads);
    // Query tiles in reverse launch order: under causal-like masks the last tiles see the most
    // keys, so the heaviest blocks start first and the grid's tail is made of light ones.
    const int x = static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x);
    split = x % splits;
    q0 = x / splits * kM;
    q1 = min(q0 + kM, p.q_len);
    kv_len = p.kv_len;
    pos_offset = kv_len - p.q_len;
  }

  // Block-collective (barriers), after locate(): the block's query pieces recorded in shared
  // memory and its key-tile range.
  __device__ void find_tiles(const SegattnFwdParams& p, char* smem, int kv_splits) {
    const int splits = max(kv_splits, 1);
    const int num_tiles = (kv_len + kN - 1) / kN;
    const mask::Rule rule = rule_of(p);
    const mask::Segments kv_segs = kv_segs_of(p);
    const Classifier classifier = classifier_in(smem);
    classifier.init_queries(mask::segments_of_batch(p.q_segments, b), q0, q1);
    // Key tiles outside [first_tile, last_tile] are SKIP for sure (a cheap per-thread scan;
    // causal-like masks end far before num_tiles). Up to kThreads tiles, the same pass classifies
    // every tile exactly into the window, which the loop then reads without another pass.
    first_tile = 0;
    int last_tile = -1;
    if (classifier.visible_tile_range(rule, kv_segs, q0, kv_len, pos_offset, num_tiles, Traits::kScanBudget,
                                      reinterpret_cast<int*>(smem + Traits::kOffScan), window_in(smem),
                                      first_tile, last_tile)) {
      window_base = 0;
    }
    if (splits > 1) {
      const int per = (num_tiles + splits - 1) / splits;
      first_tile = max(first_tile, split * per);
      last_tile = min(last_tile, split * per + per - 1);
    }
    end_tile = last_tile + 1;
  }

  // Block-collective: the next tile >= `from` that is not SKIP (end_tile if none), its class in
  // `cls`. Every thread must call it with the same `from` (it may contain barriers).
  __device__ int next_visible(const SegattnFwdParams& p, int from, int& cls) {
    for (int t = from; t < end_tile; ++t) {
      if (t < window_base || t >= window_base + Traits::kThreads) {
        fill_class_window(classifier(), rule_of(p), kv_segs_of(p), q0, kv_len, pos_offset, end_tile, t, window());
        window_base = t;
      }
      const int c = window()[t - window_base];
      if (c != SEGATTN_TILE_SKIP) {
        cls = c;
        return t;
      }
    }
    cls = SEGATTN_TILE_SKIP;
    return end_tile;
  }

  // Key segment id of key j of tile t (0 past the keys), read from global memory (the mass
  // kernel's loop loads the next tile's ids into a register while it computes the current tile,
  // and stores them into shared memory before the barrier that ends the iteration).
  __device__ uint32_t key_id(const SegattnFwdParams& p, int t, int j) const {
    const int key = t * kN + j;
    return key < kv_len ? kv_segs_of(p).ids[key] : 0u;
  }

  // cp.async of the key segment ids of tile t into `dst` [kN] (0 past the keys), by threads
  // 0 .. kN - 1: they land with the tile's K / V group, not through registers. Does not commit.
  __device__ void load_key_ids_async(const SegattnFwdParams& p, int t, uint32_t* dst) const {
    const int j = static_cast<int>(threadIdx.x);
    if (j < kN) {
      const int key = t * kN + j;
      const uint32_t* const ids = kv_segs_of(p).ids;
      cp_async_4(dst + j, key < kv_len ? ids + key : ids, key < kv_len);
    }
  }

  // The mask's rule and key segments of the block's batch row, derived from the kernel parameters
  // where used rather than held in registers through the loop.
  __device__ mask::Rule rule_of(const SegattnFwdParams& p) const { return mask::rule_of_batch(p, b); }
  __device__ mask::Segments kv_segs_of(const SegattnFwdParams& p) const {
    return mask::segments_of_batch(p.kv_segments, b);
  }

  // The classifier's and the window's shared memory, addressed from the dynamic shared memory
  // symbol where used (constant addresses, no registers held through the loop).
  __device__ static Classifier classifier_in(char* smem) {
    Classifier c;
    c.q_id = reinterpret_cast<uint32_t*>(smem + Traits::kOffQId);
    c.q_end = reinterpret_cast<int*>(smem + Traits::kOffQEnd);
    c.q_starts = reinterpret_cast<uint32_t*>(smem + Traits::kOffQStarts);
    return c;
  }
  __device__ static Classifier classifier() {
    SEGATTN_DYNAMIC_SMEM(char, smem);
    return classifier_in(layout_base<Traits>(smem));
  }
  __device__ static uint8_t* window_in(char* smem) { return reinterpret_cast<uint8_t*>(smem + Traits::kOffClass); }
  __device__ static uint8_t* window() {
    SEGATTN_DYNAMIC_SMEM(char, smem);
    return window_in(layout_base<Traits>(smem));
  }

  // Scores of one 16-row tile `row_tile` against the key tile at k0 (C fragments [kNS][4]) into
  // the log2 domain (times p.scale_log2), with -inf where the mask hides the key (PARTIAL tiles,
  // `partial`) or the key is past the end (the ragged last tile). The rows' segments and positions
  // are read here, not held through the loop. Warp-collective (ballots); `partial` and k0 are
  // block-uniform.
  template <int kNS>
  __device__ __forceinline__ void scale_and_mask(float (&s)[kNS][4], const SegattnFwdParams& p, int row_tile,
                                                 int lane, const uint32_t* kid, int k0, bool partial) const {
    if (!partial && k0 + kN <= kv_len) {
      SEGATTN_UNROLL
      for (int nb = 0; nb < kNS; ++nb) {
        SEGATTN_UNROLL
        for (int e = 0; e < 4; ++e) s[nb][e] *= p.scale_log2;
      }
      return;
    }
    const mask::Rule rule = rule_of(p);
    uint32_t row_seg[2];
    int row_pos[2];
    rows(row_tile, lane, row_seg, row_pos);
    const int quad_col = 2 * (lane % 4);
    // The tile's keys in runs of one segment id: a masked tile nearly always has one or two (a
    // diagonal, a segment boundary). Then in each run a row sees exactly the keys up to a limit
    // (mask::key_limit), and an element costs a comparison and a select instead of a rule lookup
    // (~28 instructions with branches, ~1,800 for a tile: three times its Q K^T).
    const mask::KeyRuns runs = mask::key_runs<kN>(kid, min(kN, kv_len - k0), lane);
    if (runs.at_most_two) {
      // limit[run][r], relative to this thread's first column: key k0 + quad_col + c is visible
      // to row r iff c <= limit (the ragged last tile: keys past kv_len never).
      int limit[2][2];
      SEGATTN_UNROLL
      for (int r = 0; r < 2; ++r) {
        const int last = kv_len - 1;
        const int l0 = partial ? mask::key_limit(rule.lookup(row_seg[r], runs.id0), row_pos[r]) : mask::kNoKeyLimit;
        const int l1 = partial ? mask::key_limit(rule.lookup(row_seg[r], runs.id1), row_pos[r]) : mask::kNoKeyLimit;
        limit[0][r] = min(l0, last) - k0 - quad_col;
        limit[1][r] = min(l1, last) - k0 - quad_col;
      }
      const int run0_end = runs.end0 - quad_col;
      SEGATTN_UNROLL
      for (int nb = 0; nb < kNS; ++nb) {
        SEGATTN_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int c = nb * 8 + (e & 1);
          const int r = e >> 1;
          const bool visible = c <= (c < run0_end ? limit[0][r] : limit[1][r]);
          s[nb][e] = visible ? s[nb][e] * p.scale_log2 : -INFINITY;
        }
      }
      return;
    }
    SEGATTN_UNROLL
    for (int nb = 0; nb < kNS; ++nb) {
      SEGATTN_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int col = nb * 8 + quad_col + (e & 1);
        const int r = e >> 1;
        const int key = k0 + col;
        const bool visible =
            key < kv_len && (!partial || mask::element_visible(rule, row_seg[r], kid[col], row_pos[r], key));
        s[nb][e] = visible ? s[nb][e] * p.scale_log2 : -INFINITY;
      }
    }
  }

  // This thread's two rows of 16-row tile `row_tile` of the block (g and g + 8; a warp's own
  // tile is its index): segment id and position.
  __device__ void rows(int row_tile, int lane, uint32_t (&row_seg)[2], int (&row_pos)[2]) const {
    SEGATTN_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int row = row_tile * 16 + lane / 4 + 8 * r;
      row_seg[r] = classifier().q_id[row];
      row_pos[r] = q0 + row + pos_offset;
    }
  }

  // The block's first query row of q (or o) of head h, and row 0 of k (or v) of head kh.
  template <class T>
  __device__ const T* q_rows(const void* q, const SegattnStrides& s) const {
    return static_cast<const T*>(q) + static_cast<int64_t>(b) * s.batch + static_cast<int64_t>(q0) * s.row +
           static_cast<int64_t>(h) * s.head;
  }
  template <class T>
  __device__ const T* kv_rows(const void* k, const SegattnStrides& s) const {
    return static_cast<const T*>(k) + static_cast<int64_t>(b) * s.batch + static_cast<int64_t>(kh) * s.head;
  }
};

}  // namespace fwd
}  // namespace segattn

#endif  // SEGATTN_BLOCK_INFO_CUH
