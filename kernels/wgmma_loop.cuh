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
#ifndef SEGATTN_WGMMA_LOOP_CUH
#define SEGATTN_WGMMA_LOOP_CUH

#include <type_traits>

#include "platform.cuh"
#include "ptx.cuh"
#include "segattn_params.h"
#include "kernel_traits.cuh"
#include "block_info.cuh"
#include "softmax.cuh"
#include "wgmma.cuh"
#include "wgmma_tile.cuh"

namespace segattn {
namespace fwd {

// Runs the loop from visible tile `tile` (class `cls`) whose K, V and key ids were copied into
// buffer 0 by this thread's last commit group. load_k(t, buf): issues tile t's key ids and K into
// buffer buf; load_v(t, buf) its V (no commit). o, softmax: the rows' accumulators and state.
// on_probabilities(s, kid, k0): after each tile's softmax, with its probabilities, its key ids
// in shared memory and its first key, while that tile's P V is still in flight (work on other
// accumulators than O: the fused mass).
template <class Traits, class LoadK, class LoadV, class OnProbabilities>
__device__ __forceinline__ void wgmma_tile_loop(const SegattnFwdParams& p, BlockInfo<Traits>& blk, char* smem,
                                                int tile, int cls, const uint32_t (&qf)[Traits::kDK][4],
                                                float (&o)[Traits::kNO][4], OnlineSoftmax& softmax,
                                                const LoadK& load_k, const LoadV& load_v,
                                                const OnProbabilities& on_probabilities) {
  static_assert(Traits::kWgmma && Traits::kMTiles == 1, "a wgmma kernel: one 16-row tile per warp");
  constexpr int kN = Traits::kBlockN;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const uint32_t* const s_kid = reinterpret_cast<const uint32_t*>(smem + Traits::kOffKId);
  const auto k_tile = [&](int buf) { return smem + Traits::kOffK + buf * Traits::kKVBytes; };
  const auto v_tile = [&](int buf) { return smem + Traits::kOffV + buf * Traits::kKVBytes; };

  uint32_t pa[Traits::kPK][4];  // the previous tile's P, read by its P V until that completes
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

    float s[Traits::kNS][4];
    wgmma_qk_issue<Traits>(qf, k_tile(buf), s);
    if constexpr (kWithPV) wgmma_pv_issue<Traits>(pa, v_tile(buf ^ 1), o);
    // The copies go out while the tensor cores work. The first tile's V came with its K (the
    // caller's copy).
    if (next < blk.end_tile) load_k(next, buf ^ 1);
    if constexpr (kWithPV) load_v(tile, buf);
    cp_async_commit();

    wgmma_wait<kWithPV ? 1 : 0>();
    wgmma_fence_operands(s);
    blk.scale_and_mask(s, p, warp, lane, s_kid + buf * kN, tile * kN, cls == SEGATTN_TILE_PARTIAL);
    softmax.probabilities(s);
    on_probabilities(s, s_kid + buf * kN, tile * kN);
    if constexpr (kWithPV) {
      wgmma_wait<0>();
      wgmma_fence_operands(o);
      wgmma_fence_operands(pa);
    }
    softmax.rescale(o);
    wgmma_p_fragments<Traits>(s, pa);

    tile = next;
    cls = next_cls;
    buf ^= 1;
  };
  if (tile >= blk.end_tile) return;
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
