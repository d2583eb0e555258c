// Compile-time configuration of the backward kernel (bwd_kernel.cuh): tile sizes, warps and the
// shared-memory layout for one (element type, head dim) pair.
//
// A thread block owns kBlockN = 64 keys of one KV head (4 warps x 16 keys: each warp's dK and dV
// rows stay in its registers for the whole kernel) and walks query tiles of kBlockM rows, for
// every query head of its KV head. Tiles are row-major [row][head_dim] 16-bit and swizzled as in
// the forward kernel (kernel_traits.cuh), so the forward's fragment loaders serve: K and V as A
// operands (their rows are the warp's keys), Q and dO as B operands, non-transposed for
// S^T = K Q^T and dP^T = V dO^T and transposed (ldmatrix .trans) for dV += P^T dO, dK += dS^T Q.
//
// Shared memory (dynamic, in this order):
//   K, V        kBlockN x D x 2 each     loaded once
//   Q, dO [2]   kBlockM x D x 2 each     per query tile and head, double buffered: the next
//                                        (tile, head)'s copies are in flight while one is
//                                        computed (kBlockM = 64 at D = 64, 32 at D = 128)
//   dS^T        kBlockN x (kBlockM + 8) x 2   16-bit, rows padded by 16 bytes (conflict-free
//               fragment stores and ldmatrix .trans reads): the A operand of dQ = dS K
//   lse, delta, q_id [2]   f32 / f32 / u32 [kBlockM]: the rows' LSE (natural log), delta and
//               segment ids, copied with the tiles (zero past the rows)
//   key pieces  u32 k_id[kBlockN], i32 k_end[kBlockN], u32 k_starts[kBlockN / 32]
//   window      u8[kThreads]  classes of the query tiles ahead, one per thread
// D = 64: 60,552 bytes; D = 128: 72,072 bytes (the launcher raises the limit above 48 KiB).
#ifndef SEGATTN_BWD_TRAITS_CUH
#define SEGATTN_BWD_TRAITS_CUH

#include "platform.cuh"
#include "dtypes.cuh"
#include "kernel_traits.cuh"
#include "segattn_params.h"

namespace segattn {
namespace bwd {

template <class Element, int kHeadDim_>
struct BwdTraits {
  using T = Element;
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dims 64 and 128 are instantiated");
  static_assert(sizeof(T) == 2, "16-bit inputs");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockN = 16 * kWarps;  // keys per block: 16 per warp
  // The launcher (src/cuda/backward.rs) sizes the grid and the block by these.
  static_assert(kThreads == SEGATTN_BWD_THREADS && kBlockN == SEGATTN_BWD_BLOCK_KEYS, "segattn_params.h");
  // Query rows per query tile: 64 at D = 64; 32 at D = 128, where the 2 x 64 dK / dV accumulators
  // leave no room for two 64-column S^T / dP^T blocks (255 registers and spills at 64 rows).
  static constexpr int kBlockM = kHeadDim == 128 ? 32 : 64;

  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per tile row
  static constexpr int kDK = kHeadDim / 16;     // k-steps of S^T = K Q^T and dP^T = V dO^T
  static constexpr int kNS = kBlockM / 8;       // n-blocks of S^T (8 query rows each)
  static constexpr int kNO = kHeadDim / 8;      // n-blocks of dK, dV, dQ (8 dims each)
  static constexpr int kPK = kBlockM / 16;      // k-steps of dV += P^T dO, dK += dS^T Q
  static constexpr int kQK = kBlockN / 16;      // k-steps of dQ += dS K
  // dQ = dS K of a query tile: its 16-row tiles shared among the warps, each warp taking one row
  // tile and a range of the dims (all of them at kBlockM = 64, half at 32).
  static constexpr int kDqRowTiles = kBlockM / 16;
  static constexpr int kDqWarpsPerRowTile = kWarps / kDqRowTiles;
  static constexpr int kDqPairsPerWarp = kNO / 2 / kDqWarpsPerRowTile;  // 16-dim column pairs
  static_assert(kWarps % kDqRowTiles == 0 && (kNO / 2) % kDqWarpsPerRowTile == 0, "dQ split evenly");

  static constexpr int kKVBytes = kBlockN * kHeadDim * 2;
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kDsStride = kBlockM * 2 + 16;  // bytes per dS^T row (padded)
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + kKVBytes;
  static constexpr int kOffQ = kOffV + kKVBytes;       // + buf * kQBytes
  static constexpr int kOffDo = kOffQ + 2 * kQBytes;   // + buf * kQBytes
  static constexpr int kOffDs = kOffDo + 2 * kQBytes;
  static constexpr int kOffLse = kOffDs + kBlockN * kDsStride;  // f32[2][kBlockM]
  static constexpr int kOffDelta = kOffLse + 2 * 4 * kBlockM;   // f32[2][kBlockM]
  static constexpr int kOffQId = kOffDelta + 2 * 4 * kBlockM;   // u32[2][kBlockM]
  static constexpr int kOffKId = kOffQId + 2 * 4 * kBlockM;     // u32[kBlockN]
  static constexpr int kOffKEnd = kOffKId + 4 * kBlockN;        // i32[kBlockN]
  static constexpr int kOffKStarts = kOffKEnd + 4 * kBlockN;    // u32[kBlockN / 32]
  static constexpr int kOffWindow = kOffKStarts + 4 * (kBlockN / 32);  // u8[kThreads]
  static constexpr int kSmemBytes = kOffWindow + kThreads;
  static_assert(kOffQ % 128 == 0 && kOffDs % 16 == 0 && kDsStride % 16 == 0, "aligned tiles");
};

}  // namespace bwd
}  // namespace segattn

#endif  // SEGATTN_BWD_TRAITS_CUH
