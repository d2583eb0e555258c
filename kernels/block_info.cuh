// Where one thread block of the forward and mass kernels works, and how it walks the key tiles:
// its batch row, head and KV head (GQA), its query rows [q0, q1), the mask's rule and key
// segments of its batch row, the range of key tiles that may be visible (a cheap scan, then the
// split-K slice), and the next tile that is not SKIP. The prologue both kernels share.
//
// Tile classes come from a window of kThreads tiles classified ahead, one tile per thread
// (mask.cuh classify_alone, no barrier), kept in shared memory: finding the next tile in the loop
// reads that window, instead of classifying each tile with global loads of its key ids and two
// block barriers on the loop's critical path. Tiles too complex for one thread's budget fall back
// to the block-cooperative classify.
#ifndef SEGATTN_BLOCK_INFO_CUH
#define SEGATTN_BLOCK_INFO_CUH

#include "platform.cuh"
#include "segattn_params.h"
#include "mask.cuh"

namespace segattn {
namespace fwd {

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
  mask::Rule rule;
  mask::Segments kv_segs;
  Classifier classifier;
  uint8_t* window;     // [kThreads] classes of tiles [window_base, window_base + kThreads)
  int window_base;     // block-uniform; no window yet: a value no tile index reaches

  // Block-collective (barriers): the block of grid x = gridDim.x - 1 - (query tile * kv_splits +
  // split) (kv_splits <= 1: no split-K), its query pieces recorded in shared memory and its
  // key-tile range.
  __device__ void init(const SegattnFwdParams& p, char* smem, int kv_splits) {
    classifier.q_id = reinterpret_cast<uint32_t*>(smem + Traits::kOffQId);
    classifier.q_end = reinterpret_cast<int*>(smem + Traits::kOffQEnd);
    classifier.q_starts = reinterpret_cast<uint32_t*>(smem + Traits::kOffQStarts);
    window = reinterpret_cast<uint8_t*>(smem + Traits::kOffClass);
    window_base = -2 * Traits::kThreads;
    const int splits = max(kv_splits, 1);
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
    const int num_tiles = (kv_len + kN - 1) / kN;
    rule = mask::rule_of_batch(p, b);
    kv_segs = mask::segments_of_batch(p.kv_segments, b);
    classifier.init_queries(mask::segments_of_batch(p.q_segments, b), q0, q1);
    // Key tiles outside [first_tile, last_tile] are SKIP for sure (a cheap per-thread scan;
    // causal-like masks end far before num_tiles).
    first_tile = 0;
    int last_tile = -1;
    classifier.visible_tile_range(rule, kv_segs, q0, kv_len, pos_offset, num_tiles, Traits::kScanBudget,
                                  reinterpret_cast<int*>(smem + Traits::kOffScan), first_tile, last_tile);
    if (splits > 1) {
      const int per = (num_tiles + splits - 1) / splits;
      first_tile = max(first_tile, split * per);
      last_tile = min(last_tile, split * per + per - 1);
    }
    end_tile = last_tile + 1;
  }

  // Block-collective: the next tile >= `from` that is not SKIP (end_tile if none), its class in
  // `cls`. Every thread must call it with the same `from` (it may contain barriers).
  __device__ int next_visible(int from, int& cls) {
    for (int t = from; t < end_tile; ++t) {
      if (t < window_base || t >= window_base + Traits::kThreads) fill_window(t);
      int c = window[t - window_base];
      if (c == static_cast<uint8_t>(mask::kTileUnknown)) c = classify_cooperatively(t);
      if (c != SEGATTN_TILE_SKIP) {
        cls = c;
        return t;
      }
    }
    cls = SEGATTN_TILE_SKIP;
    return end_tile;
  }

  // Key segment id of key j of tile t (0 past the keys), read from global memory: the loop loads
  // the next tile's ids into a register while it computes the current tile, and stores them into
  // shared memory before the barrier that ends the iteration.
  __device__ uint32_t key_id(int t, int j) const {
    const int key = t * kN + j;
    return key < kv_len ? kv_segs.ids[key] : 0u;
  }

 private:
  // Block-collective: classifies tiles [base, base + kThreads) ahead, one per thread.
  __device__ void fill_window(int base) {
    __syncthreads();  // every thread has read the previous window
    const int t = base + static_cast<int>(threadIdx.x);
    int c = SEGATTN_TILE_SKIP;
    if (t < end_tile) {
      const int k0 = t * kN;
      c = classifier.classify_alone(rule, kv_segs, q0, k0, min(k0 + kN, kv_len), pos_offset, Traits::kScanBudget);
    }
    window[threadIdx.x] = static_cast<uint8_t>(c);
    window_base = base;
    __syncthreads();
  }

  __device__ int classify_cooperatively(int t) const {
    const int k0 = t * kN;
    return classifier.classify(rule, kv_segs, q0, k0, min(k0 + kN, kv_len), pos_offset);
  }

 public:
  // This thread's two rows (g and g + 8 of warp `warp`): segment id and position.
  __device__ void rows(int warp, int lane, uint32_t (&row_seg)[2], int (&row_pos)[2]) const {
    SEGATTN_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int row = warp * 16 + lane / 4 + 8 * r;
      row_seg[r] = classifier.q_id[row];
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
