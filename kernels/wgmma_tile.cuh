// The two matrix products of the forward kernel's key tile with Hopper's warpgroup MMA
// (FwdTraits::kWgmma; kernels/wgmma.cuh): the block's 4 warps are one warpgroup of 64 query rows,
// and each product is a few wgmma.mma_async over the whole tile, where the mma.sync kernel runs
// (D / 16) x (keys / 8) instructions per warp with ldmatrix before each pair.
//
//   S = Q K^T: D / 16 wgmma m64 x 64 x k16, A = Q's fragments (registers, loaded once), B = the
//     K tile, K-major (keys are the N rows, the head dim the contiguous K).
//   O += P V:  kN / 16 wgmma m64 x D x k16, A = P packed to 16 bits from S's accumulators (the
//     same fragments mma.sync takes), B = the V tile, MN-major (the head dim is both N and the
//     contiguous dimension).
//
// Both tiles are laid out by tile_offset (kernel_traits.cuh): column halves of 64 elements, rows
// of 128 bytes, 128-byte swizzle, 1024-byte aligned; so a descriptor's 8-row stride (SBO) is
// 1024 bytes, a K-major k-step is 32 bytes further in its half, and V's halves (N = 64 .. 127)
// lie kN x 128 bytes apart (LBO).
//
// Each function issues its product as one commit group and returns at once: the caller waits
// (wgmma_wait) before it reads the accumulators or reuses the A registers or the tile
// (wgmma_loop.cuh runs the softmax of one tile while the previous tile's P V is in flight).
#ifndef SEGATTN_WGMMA_TILE_CUH
#define SEGATTN_WGMMA_TILE_CUH

#include "platform.cuh"
#include "kernel_traits.cuh"
#include "softmax.cuh"
#include "wgmma.cuh"

namespace segattn {
namespace fwd {

// Issues s = Q K^T for the warpgroup's 64 rows and the K tile at `s_k`; qf: this thread's A
// fragments of Q for each k-step (dims 16 kc ..).
template <class Traits>
__device__ __forceinline__ void wgmma_qk_issue(const uint32_t (&qf)[Traits::kDK][4], const char* s_k,
                                               float (&s)[Traits::kNS][4]) {
  static_assert(Traits::kWgmma && Traits::kNS == 8, "64-key tiles: one wgmma N of 64");
  constexpr int kN = Traits::kBlockN;
  wgmma_fence();  // S's registers were last read by the packing of the previous tile's P
  SEGATTN_UNROLL
  for (int kc = 0; kc < Traits::kDK; ++kc) {
    const uint64_t desc = wgmma_desc_sw128(s_k + (kc / 4) * kN * 128 + (kc % 4) * 32, 16, 1024);
    wgmma_rs<typename Traits::T, kN, false>(s, qf[kc], desc, kc > 0);
  }
  wgmma_commit();
}

// P's A fragments for O += P V from the tile's unnormalised probabilities in `s` (16-bit, kPK
// k-steps of 16 keys).
template <class Traits>
__device__ __forceinline__ void wgmma_p_fragments(const float (&s)[Traits::kNS][4], uint32_t (&pa)[Traits::kPK][4]) {
  SEGATTN_UNROLL
  for (int kc = 0; kc < Traits::kPK; ++kc) p_fragment<typename Traits::T>(s, kc, pa[kc]);
}

// Issues o += P V for the warpgroup's 64 rows, P's fragments in `pa` (held until the wait), the V
// tile at `s_v`.
template <class Traits>
__device__ __forceinline__ void wgmma_pv_issue(const uint32_t (&pa)[Traits::kPK][4], const char* s_v,
                                               float (&o)[Traits::kNO][4]) {
  constexpr int kN = Traits::kBlockN;
  wgmma_fence();  // O was rescaled by the softmax, and P's registers written by the packing
  SEGATTN_UNROLL
  for (int kc = 0; kc < Traits::kPK; ++kc) {
    const uint64_t desc = wgmma_desc_sw128(s_v + kc * 16 * 128, kN * 128, 1024);
    wgmma_rs<typename Traits::T, Traits::kHeadDim, true>(o, pa[kc], desc, true);
  }
  wgmma_commit();
}

}  // namespace fwd
}  // namespace segattn

#endif  // SEGATTN_WGMMA_TILE_CUH
