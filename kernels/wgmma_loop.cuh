// The wgmma forward kernel's key-tile loop (FwdTraits::kWgmma; kernels/hopper/fwd_hopper.cu) with
// FlashAttention-3's intra-warpgroup overlap: tile t's S = Q K^T and the previous tile's
// O += P V are issued together, and tile t's softmax runs while that P V is still in the tensor
// cores.
//
//   for each visible tile t (K, ids in buffer t % 2; its V there too, one iteration later):
//     wait for this thread's copies (tile t's K and ids, tile t - 1's V); proxy fence; barrier
//     issue S_t = Q K_t                                   (group 1)
//     issue O += P_{t-1} V_{t-1}                           (group 2; not at the first tile)
//     issue the copies of the next tile's K and ids (buffer (t + 1) % 2, whose K the S of t - 1
//       read, waited last iteration) and of V_t (buffer t % 2, whose V the P V of t - 2 read)
//     wait for group 1; scale, mask, softmax probabilities of S_t (O untouched); the caller's
//       per-tile work on them (the fused mass: its sums rescaled and added)
//     wait for group 2; rescale O to tile t's reference; P_t packed to 16 bits (held to the next
//       iteration's P V)
//   after the loop: wait for the last V; O += P_last V_last.
//
// One barrier per tile. The operations on O come in the serial order (rescale to tile t - 1's
// reference, add P_{t-1} V_{t-1}, rescale to tile t's), so the output is the 64-row mma.sync
// kernel's bit for bit under the emulator. Each copy is issued a whole iteration before its wait.
//
// PINE's rotation (Traits::kRotate, rotary.cuh): S's A fragments are the query turned for the key
// segment of the tile, in registers (QueryRotator::turn_into, when the segment changes). A tile
// inside one segment issues S as above. A tile across segments issues the previous P V first,
// then S once per piece, each with the query turned for its segment and waited at once, the
// pieces' columns kept in shared memory between them (kStashBytes): such tiles lose the overlap
// of their softmax with the P V. Each column's products and their order are the mma.sync rope
// kernel's (qk_piece), so under the emulator the output is that kernel's bit for bit.
#ifndef SEGATTN_WGMMA_LOOP_CUH
#define SEGATTN_WGMMA_LOOP_CUH

#include <type_traits>

#include "platform.cuh"
#include "ptx.cuh"
#include "segattn_params.h"
#include "kernel_traits.cuh"
#include "block_info.cuh"
#include "rotary.cuh"
#include "softmax.cuh"
#include "wgmma.cuh"
#include "wgmma_tile.cuh"

namespace segattn {
namespace fwd {

// kRotate, a key tile across segments: s = the tile's scores, each piece [a, e) of one key segment
// computed with the query turned for it (all 64 columns, of which the piece's are kept; the
// columns before it wait in this thread's stash in shared memory). Returns with every product it
// issued waited (and whatever else was in flight: the caller's P V).
template <class Traits>
__device__ __forceinline__ void wgmma_rope_pieces(const SegattnFwdParams& p, BlockInfo<Traits>& blk,
                                                  QueryRotator<Traits>& rotator, const uint32_t* kid, int k0,
                                                  int valid, int row0, const char* s_q, char* smem, const char* s_k,
                                                  uint32_t (&qt)[Traits::kDK][4], float (&s)[Traits::kNS][4],
                                                  int warp, int lane) {
  // This thread's 32 scores, interleaved over the warp's lanes (conflict-free).
  float* const stash = reinterpret_cast<float*>(smem + Traits::kOffQTurned) + warp * 32 * 32 + lane;
  const int quad_col = 2 * (lane % 4);
  for (int a = 0; a < valid;) {
    const int e = min(static_cast<int>(blk.kv_segs_of(p).span_end[k0 + a]) - k0, valid);
    if (a > 0) {
      SEGATTN_UNROLL
      for (int nb = 0; nb < Traits::kNS; ++nb) {
        SEGATTN_UNROLL
        for (int i = 0; i < 4; ++i) stash[(4 * nb + i) * 32] = s[nb][i];
      }
    }
    rotator.turn_into(p, row0, kid[a], s_q, smem, qt, warp, lane);
    wgmma_qk_issue<Traits>(qt, s_k, s);
    wgmma_wait<0>();
    wgmma_fence_operands(s);
    if (a > 0) {
      // Columns before the piece: the earlier pieces' scores.
      SEGATTN_UNROLL
      for (int nb = 0; nb < Traits::kNS; ++nb) {
        SEGATTN_UNROLL
        for (int i = 0; i < 4; ++i) {
          if (8 * nb + quad_col + (i & 1) < a) s[nb][i] = stash[(4 * nb + i) * 32];
        }
      }
    }
    a = e;
  }
}

// Runs the loop from visible tile `tile` (class `cls`) whose K, V and key ids were copied into
// buffer 0 by this thread's last commit group. load_k(t, buf): issues tile t's key ids and K into
// buffer buf; load_v(t, buf) its V (no commit). o, softmax: the rows' accumulators and state.
// on_probabilities(s, kid, k0): after each tile's softmax, with its probabilities, its key ids
// in shared memory and its first key, while that tile's P V is still in flight (work on other
// accumulators than O: the fused mass). kRotate: `rotator` turns the un-rotated Q tile `s_q`
// (qf is not read). kScoresOnly (the standalone mass): no V is copied (load_v is not called) and
// o is not touched; the loop is S, softmax and on_probabilities.
template <class Traits, class LoadK, class LoadV, class OnProbabilities>
__device__ __forceinline__ void wgmma_tile_loop(const SegattnFwdParams& p, BlockInfo<Traits>& blk, char* smem,
                                                int tile, int cls, const uint32_t (&qf)[Traits::kDK][4],
                                                float (&o)[Traits::kNO][4], OnlineSoftmax& softmax,
                                                const LoadK& load_k, const LoadV& load_v,
                                                const OnProbabilities& on_probabilities,
                                                QueryRotator<Traits>& rotator, const char* s_q) {
  static_assert(Traits::kWgmma && Traits::kMTiles == 1, "a wgmma kernel: one 16-row tile per warp");
  constexpr int kN = Traits::kBlockN;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const uint32_t* const s_kid = reinterpret_cast<const uint32_t*>(smem + Traits::kOffKId);
  const auto k_tile = [&](int buf) { return smem + Traits::kOffK + buf * Traits::kKVBytes; };
  const auto v_tile = [&](int buf) { return smem + Traits::kOffV + buf * Traits::kKVBytes; };

  uint32_t pa[Traits::kPK][4];  // the previous tile's P, read by its P V until that completes
  // kRotate: Q's A fragments turned for the current key segment (read by S until its wait).
  uint32_t qt[Traits::kRotate ? Traits::kDK : 1][4];
  int buf = 0;
  // One tile; kWithPV (every tile but the first): the previous tile's P V issued with its S. A
  // compile-time flag, not a run-time one: ptxas serialises every wgmma of a kernel where some
  // path might read an accumulator before its wait, and it does not follow run-time flags.
  const auto step = [&](auto with_pv) {
    constexpr bool kWithPV = decltype(with_pv)::value;
    int next_cls = SEGATTN_TILE_SKIP;
    const int next = blk.next_visible(p, tile + 1, next_cls);
    cp_async_wait<0>();
    fence_proxy_async_smem();  // this thread's copies, through the generic proxy, before wgmma reads them
    __syncthreads();

    // The copies go out while the tensor cores work. The first tile's V came with its K (the
    // caller's copy).
    const auto issue_copies = [&] {
      if (next < blk.end_tile) load_k(next, buf ^ 1);
      if constexpr (kWithPV) load_v(tile, buf);
      cp_async_commit();
    };
    float s[Traits::kNS][4];
    if constexpr (Traits::kRotate) {
      // Each branch waits for its S before the two meet (ptxas serialises every wgmma of the
      // kernel where registers of a product in flight could be moved at a join).
      const uint32_t* const kid = s_kid + buf * kN;
      const int k0 = tile * kN;
      const int valid = min(kN, blk.kv_len - k0);
      const int row0 = warp * 16 + lane / 4;
      // (S of the last tile, which read qt, was waited there.)
      if (static_cast<int>(blk.kv_segs_of(p).span_end[k0]) - k0 >= valid) {  // one piece (most tiles)
        rotator.turn_into(p, row0, kid[0], s_q, smem, qt, warp, lane);
        wgmma_qk_issue<Traits>(qt, k_tile(buf), s);
        if constexpr (kWithPV) wgmma_pv_issue<Traits>(pa, v_tile(buf ^ 1), o);
        issue_copies();
        wgmma_wait<kWithPV ? 1 : 0>();
      } else {
        if constexpr (kWithPV) wgmma_pv_issue<Traits>(pa, v_tile(buf ^ 1), o);
        issue_copies();
        wgmma_rope_pieces<Traits>(p, blk, rotator, kid, k0, valid, row0, s_q, smem, k_tile(buf), qt, s, warp,
                                  lane);
      }
    } else {
      wgmma_qk_issue<Traits>(qf, k_tile(buf), s);
      if constexpr (kWithPV) wgmma_pv_issue<Traits>(pa, v_tile(buf ^ 1), o);
      issue_copies();
      wgmma_wait<kWithPV ? 1 : 0>();
    }
    wgmma_fence_operands(s);
    blk.scale_and_mask(s, p, warp, lane, s_kid + buf * kN, tile * kN, cls == SEGATTN_TILE_PARTIAL);
    softmax.probabilities(s);
    on_probabilities(s, s_kid + buf * kN, tile * kN);
    if constexpr (kWithPV) {
      wgmma_wait<0>();
      wgmma_fence_operands(o);
      wgmma_fence_operands(pa);
    }
    if constexpr (!Traits::kScoresOnly) {
      softmax.rescale(o);
      wgmma_p_fragments<Traits>(s, pa);
    }

    tile = next;
    cls = next_cls;
    buf ^= 1;
  };
  if (tile >= blk.end_tile) return;
  if constexpr (Traits::kScoresOnly) {
    // The standalone mass: no V, no P V; each tile's S is waited where it is issued.
    while (tile < blk.end_tile) step(std::false_type{});
    cp_async_wait<0>();
    return;
  }
  step(std::false_type{});
  while (tile < blk.end_tile) step(std::true_type{});
  cp_async_wait<0>();  // the last tile's V
  fence_proxy_async_smem();
  __syncthreads();
  wgmma_pv_issue<Traits>(pa, v_tile(buf ^ 1), o);
  wgmma_wait<0>();
  wgmma_fence_operands(o);
}

}  // namespace fwd
}  // namespace segattn

#endif  // SEGATTN_WGMMA_LOOP_CUH
