// Where one thread block of the backward kernel works, and which query tiles it visits: its batch
// row, KV head and keys [k0, k1), the pieces of its keys (runs of one segment id, recorded once in
// shared memory), and the class of every query tile against them, a window of kThreads tiles at a
// time (one per thread, exact, no barrier inside), so the loop visits only tiles that are not SKIP.
//
// The classification is the forward's (mask.cuh) with the roles swapped: there a block's query
// pieces are fixed and key tiles are classified against them; here the key pieces are fixed and
// each thread walks the query pieces of its tile from global memory. Same rule lookup and piece
// test (mask::piece_visibility), so both kernels skip exactly the same (query tile, key tile)
// pairs.
#ifndef SEGATTN_BWD_BLOCK_INFO_CUH
#define SEGATTN_BWD_BLOCK_INFO_CUH

#include "platform.cuh"
#include "segattn_params.h"
#include "mask.cuh"
#include "bwd_traits.cuh"

namespace segattn {
namespace bwd {

template <class Traits>
struct KeyBlock {
  static constexpr int kM = Traits::kBlockM;
  static constexpr int kN = Traits::kBlockN;
  // The forward's classifier records the pieces of a row range; here, of the block's keys.
  using Pieces = mask::TileClassifier<kN, kN, Traits::kThreads>;

  int b, kh;        // batch row, KV head
  int k0, k1;       // the block's keys
  int pos_offset;   // query row i sits at position i + pos_offset

  // The block of the grid (key tile blockIdx.x, KV head blockIdx.y, batch row blockIdx.z), from
  // the grid alone. Key tiles in launch order: under causal-like masks the first ones are seen by
  // the most query tiles, so the heaviest blocks start first.
  __device__ void locate(const SegattnFwdParams& p) {
    b = static_cast<int>(blockIdx.z);
    kh = static_cast<int>(blockIdx.y);
    k0 = static_cast<int>(blockIdx.x) * kN;
    k1 = min(k0 + kN, p.kv_len);
    pos_offset = p.kv_len - p.q_len;
  }

  __device__ static Pieces pieces_in(char* smem) {
    Pieces c;
    c.q_id = reinterpret_cast<uint32_t*>(smem + Traits::kOffKId);
    c.q_end = reinterpret_cast<int*>(smem + Traits::kOffKEnd);
    c.q_starts = reinterpret_cast<uint32_t*>(smem + Traits::kOffKStarts);
    return c;
  }

  // Block-collective (ends with a barrier): records the pieces of keys [k0, k1).
  __device__ void record_keys(const SegattnFwdParams& p, char* smem) const {
    pieces_in(smem).init_queries(mask::segments_of_batch(p.kv_segments, b), k0, k1);
  }

  // One thread alone, exact: the class of query rows [q0, q1) against the block's keys (pieces
  // recorded in `keys`): SKIP when every (query piece, key piece) pair is empty, FULL when every
  // one is full, PARTIAL otherwise.
  __device__ int classify_queries(const SegattnFwdParams& p, const Pieces& keys, int q0, int q1) const {
    const mask::Rule rule = mask::rule_of_batch(p, b);
    const mask::Segments q = mask::segments_of_batch(p.q_segments, b);
    bool any_visible = false;
    bool all_full = true;
    for (int i = q0; i < q1;) {
      const uint32_t sq = q.ids[i];
      const int qb = min(static_cast<int>(q.span_end[i]), q1);
      SEGATTN_UNROLL
      for (int w = 0; w < kN / 32; ++w) {
        uint32_t bits = keys.q_starts[w];
        while (bits != 0u) {
          const int r = w * 32 + (__ffs(static_cast<int>(bits)) - 1);
          bits &= bits - 1u;
          const int c = mask::piece_visibility(rule.lookup(sq, keys.q_id[r]), i, qb, k0 + r, keys.q_end[r], pos_offset);
          any_visible |= c != SEGATTN_TILE_SKIP;
          all_full &= c == SEGATTN_TILE_FULL;
        }
      }
      if (any_visible && !all_full) return SEGATTN_TILE_PARTIAL;
      i = qb;
    }
    if (!any_visible) return SEGATTN_TILE_SKIP;
    return all_full ? SEGATTN_TILE_FULL : SEGATTN_TILE_PARTIAL;
  }

  // Block-collective (barriers): the classes of query tiles [base, base + kThreads) into `window`
  // (SKIP past the last tile).
  __device__ void classify_window(const SegattnFwdParams& p, char* smem, int base, int num_tiles) const {
    uint8_t* const window = reinterpret_cast<uint8_t*>(smem + Traits::kOffWindow);
    __syncthreads();  // every thread has read the previous window
    const int t = base + static_cast<int>(threadIdx.x);
    int c = SEGATTN_TILE_SKIP;
    if (t < num_tiles) c = classify_queries(p, pieces_in(smem), t * kM, min(t * kM + kM, p.q_len));
    window[threadIdx.x] = static_cast<uint8_t>(c);
    __syncthreads();
  }
};

}  // namespace bwd
}  // namespace segattn

#endif  // SEGATTN_BWD_BLOCK_INFO_CUH
