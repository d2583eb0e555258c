// Compile-time configuration of the forward kernel: tile sizes, warps and the shared-memory layout
// for one (element type, head dim) pair.
//
// Tiles: a thread block owns kBlockM = 64 query rows (4 warps x 16 rows, one m16 mma tile per warp)
// and walks key/value tiles of kBlockN = 64 keys. Every tile row is head_dim 16-bit elements, i.e.
// kChunks 16-byte chunks. The wide kernel (kMTiles = 2; no rotation; the fused mass with its rows'
// sums in shared memory) owns 128 rows, two 16-row tiles per warp (rows 16 w .. and 64 + 16 w ..),
// Q read from its own shared tile; its key tiles are 32 keys at D = 128 (D = 64: 50,864 B of
// shared memory, D = 128: 66,992 B) or 64 (FlashAttention-2's tile, 100,016 B). D = 256
// (plain attention and PINE's rotation): 64 rows, 32-key tiles, Q in its own tile (99,240 B;
// with the turned Q and the rows' positions, 132,520 B: one block per sm_90 SM, none on 99 KiB GPUs).
//
// Shared memory (dynamic, in this order, all tiles row-major [row][head_dim] and swizzled):
//   K[2]     kBlockN x D  x 2       double buffer (the next tile's cp.async in flight)
//   V[2]     kBlockN x D  x 2
//   metadata q_id[kBlockM] u32, q_end[kBlockM] i32, q_starts[kBlockM/32] u32 (piece-start bits),
//            k_id[2][kBlockN] u32 (the key segment ids of each K/V buffer's tile),
//            scan[2 * kWarps] i32 (reduction of the visible key-tile range)
//            class[kThreads] u8 (the window of key-tile classes found ahead, block_info.cuh),
//            (kRotate) row_pos[kBlockM], row_shifts[kBlockM] i32 (each row's position and the
//            start of its group's shifts, rotary.cuh stage_rows)
// The Q tile (kBlockM x D) lives in K buffer 1: it is loaded together with the first K/V tile
// (into buffer 0), moved to registers, and only then may buffer 1 be filled; the epilogue stages
// the output there again. (With kQInSmem Q has its own tile after V[2], + 16 KiB at D = 128; with
// kRotate, PINE's variant, the turned Q a second one: + 16 KiB at D = 64, + 32 KiB at D = 128.)
// Plain kernel: D = 64: 32 KiB of tiles + 1192 B = 33,960 B (under the 48 KiB default); D = 128:
// 64 KiB + 1192 B = 66,728 B (the launcher raises cudaFuncAttributeMaxDynamicSharedMemorySize
// above 48 KiB).
//
// Bank conflicts: XOR swizzle of 16-byte chunks, no padding. Chunk c of row r is stored at chunk
// position (c ^ (r & 7)) of that row. An ldmatrix phase reads 8 consecutive rows at one logical
// chunk, which the swizzle spreads over 8 distinct chunk positions mod 8 = all 32 banks; cp.async
// writes (consecutive threads -> consecutive chunks of a row) and the output staging (8 rows x 4
// lanes x 4 bytes at one logical chunk) are conflict-free for the same reason.
#ifndef SEGATTN_KERNEL_TRAITS_CUH
#define SEGATTN_KERNEL_TRAITS_CUH

#include <type_traits>

#include "platform.cuh"
#include "dtypes.cuh"
#include "ptx.cuh"

// `#pragma unroll` for nvcc; nothing in host emulation (g++ does not know the pragma, and
// unrolling there only costs compile time).
#ifndef SEGATTN_UNROLL
#if defined(__CUDACC__)
#define SEGATTN_UNROLL _Pragma("unroll")
// Partial unrolling, where a full one lets the scheduler hoist every load of the loop and run out
// of registers.
#define SEGATTN_UNROLL_2 _Pragma("unroll 2")
// Loads of independent iterations in flight together (latency-bound loops over a few partials).
#define SEGATTN_UNROLL_8 _Pragma("unroll 8")
#define SEGATTN_UNROLL_16 _Pragma("unroll 16")
#else
#define SEGATTN_UNROLL
#define SEGATTN_UNROLL_2
#define SEGATTN_UNROLL_8
#define SEGATTN_UNROLL_16
#endif
#endif

namespace segattn {
namespace fwd {

// kMassInSmem: the rows of a warp's second row tile (64 rows below its first) start 16 floats
// further on. 64 odd row strides are a multiple of 32 banks, so rows R and R + 64 shared a bank
// (a 2-way conflict on every access of the sums); 16 more put them in the other 16 banks.
constexpr int kMassTile1Skew = 16;

template <class Element, int kHeadDim_, bool kRotate_ = false, bool kMass_ = false, int kMTiles_ = 1,
          int kBlockN_ = 0, int kWarpGroups_ = 0, bool kScoresOnly_ = false>
struct FwdTraits {
  using T = Element;
  static constexpr int kHeadDim = kHeadDim_;
  // PINE's in-loop query rotation (rotary.cuh): Q stays in its own shared tile for the whole loop.
  static constexpr bool kRotate = kRotate_;
  // The fused per-segment mass output (segment_mass.cuh): 8 more accumulator blocks per thread,
  // no shared memory; in the wide kernel, whose registers have no room for them, each row's sums
  // in shared memory after the fixed layout (kMassInSmem, mass::SmemRowSums).
  static constexpr bool kMass = kMass_;
  static_assert(!(kRotate && kMass), "the fused mass is not offered with PINE's rotation");
  // Row tiles of 16 query rows per warp: 1, or 2 for the wide kernel (FlashAttention-2's 128-row
  // blocks: each K and V fragment read from shared memory feeds two mma, and the per-tile costs
  // of the loop are shared by twice the rows), plain attention only.
  static constexpr int kMTiles = kMTiles_;
  static_assert(kMTiles == 1 || (kMTiles == 2 && !kRotate_), "the wide kernel has no rotation");
  static constexpr bool kMassInSmem = kMass && kMTiles > 1;
  // Hopper's warpgroup MMA (kernels/hopper/, sm_90a), kWarpGroups_ > 0: the block is that many
  // warpgroups of 4 warps, each warpgroup 64 query rows (warp w: rows 16 w ..); S = Q K^T and
  // O += P V are wgmma.mma_async with A (Q's and P's fragments) in registers and B (K, V) read
  // from shared memory through descriptors, so the K and V tiles are laid out as wgmma's 128-byte
  // swizzled atoms (tile_offset below) and start on 1024-byte boundaries (kSmemAlign). Two
  // warpgroups share each K and V tile (half the copies per row). Plain attention only, 64-key
  // tiles, D 64 / 128; the fused mass (kMass) and PINE's rotation (kRotate: the turned Q's A
  // fragments in registers) in blocks of one warpgroup, as the 64-row mma.sync kernels'.
  static constexpr int kWarpGroups = kWarpGroups_;
  static constexpr bool kWgmma = kWarpGroups > 0;
  static_assert(kWarpGroups >= 0 && kWarpGroups <= 2, "one or two warpgroups");
  static_assert(!kWgmma || (kMTiles_ == 1 && kHeadDim_ <= 128 && (!(kMass_ || kRotate_) || kWarpGroups_ == 1)),
                "the wgmma kernel is attention in 16-row tiles per warp at D 64 / 128, the fused mass and the "
                "rotation in one warpgroup");
  // Q read from its own shared tile at every key tile instead of held in registers: PINE's
  // rotation (it re-forms the fragments per segment), the fused mass at D = 128, whose 32
  // accumulator registers take the place of Q's (with both, the kernel spills), and the wide
  // kernel, whose two row tiles' accumulators leave no room for their Q. D = 256 likewise: its
  // 128 O accumulator registers leave no room for 64 of Q fragments. (A wgmma kernel reads Q's
  // fragments from registers: kWgmma keeps them there, the fused mass's included.)
  static constexpr bool kQInSmem =
      kRotate || (kMass && kHeadDim == 128 && !kWgmma) || kMTiles > 1 || kHeadDim == 256;
  // The standalone per-segment mass on wgmma (kernels/hopper/scores_hopper.cu): the fused mass
  // kernel without V, O and the output (no V tiles in shared memory, no P V, no O registers), its
  // sums with two f16 terms of P as the mma.sync mass kernel's (scores_kernel.cuh), whose bits it
  // gives: PINE orders segments by them.
  static constexpr bool kScoresOnly = kScoresOnly_;
  static_assert(!kScoresOnly || (kMass_ && kWarpGroups_ == 1), "the standalone mass: a wgmma mass kernel");
  // Terms of P in the one-hot sums of tiles of three or more segments (segment_mass.cuh), and the
  // scale the sums are held at.
  static constexpr int kMassTerms = kScoresOnly ? 2 : 1;
  static constexpr int kWarps = kWgmma ? 4 * kWarpGroups : 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsPerWarp = 16 * kMTiles;
  static constexpr int kBlockM = kWarps * kRowsPerWarp;
  // Keys per tile (kBlockN_ 0: the default): 64; 32 for the wide kernel at D = 128, whose two row
  // tiles' S accumulators at 64 keys (2 x 32 registers) do not fit next to O's 2 x 64 without
  // spills. kBlockN_ = 64 there is FlashAttention-2's 128 x 64 tile for sm_80 / sm_90, spills
  // included (segattn_fwd_wide64_*: the default at D = 128, 10% faster than 128 x 32 on an H100).
  // D = 256 (64-row kernels): 32 keys, so that the double-buffered K and V tiles (64 KiB)
  // and the Q tile (32 KiB) leave room for two blocks per SM, as FlashAttention-2's hdim-256
  // kernels keep their tiles small.
  static constexpr int kBlockN = kBlockN_ != 0 ? kBlockN_
                                 : ((kMTiles > 1 && kHeadDim == 128) || kHeadDim == 256) ? 32
                                                                                          : 64;
  static_assert(kBlockN == 32 || kBlockN == 64, "key tiles of 32 or 64");
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256, "head dims 64, 128 and 256 are instantiated");
  static_assert(kHeadDim != 256 || (kMTiles == 1 && !kMass_), "D = 256: plain attention and PINE's, 64-row tiles");
  static_assert(sizeof(T) == 2, "16-bit inputs");

  // 16-byte chunks per tile row (8 elements each).
  static constexpr int kChunks = kHeadDim / 8;
  // mma fragment counts.
  static constexpr int kDK = kHeadDim / 16;  // k-steps of S = Q K^T
  static constexpr int kNS = kBlockN / 8;    // n-blocks of S (8 keys each)
  static constexpr int kNO = kHeadDim / 8;   // n-blocks of O (8 dims each)
  static constexpr int kPK = kBlockN / 16;   // k-steps of O += P V

  // Byte offsets into dynamic shared memory.
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kKVBytes = kBlockN * kHeadDim * 2;
  static constexpr int kOffK = 0;                           // + buf * kKVBytes
  static constexpr int kOffV = kOffK + 2 * kKVBytes;        // + buf * kKVBytes
  // Bytes of the two V buffers (none for kScoresOnly: the layout after kOffV starts there).
  static constexpr int kVBytes = kScoresOnly ? 0 : 2 * kKVBytes;
  // Q shares K buffer 1 when it fits there and is moved to registers before buffer 1's first
  // load is issued; otherwise (kQInSmem, or the wide kernel's 128 rows) it has its own tile after V.
  static constexpr bool kQShared = !kQInSmem && kQBytes <= kKVBytes;
  static constexpr int kOffQ = kQShared ? kOffK + kKVBytes : kOffV + kVBytes;
  // kRotate: the turned Q tile, whose fragments the S mma reads k-step by k-step. A wgmma kernel
  // turns Q's fragments in registers and uses the space to keep a tile's scores while it computes
  // another segment's piece of them (kStashBytes: 32 f32 per thread; wgmma_loop.cuh).
  static constexpr int kOffQTurned = kOffQ + kQBytes;
  static constexpr int kStashBytes = kThreads * 32 * 4;
  static constexpr int kTurnedBytes = kRotate ? (kWgmma && kStashBytes > kQBytes ? kStashBytes : kQBytes) : 0;
  static constexpr int kOffQId = kOffV + kVBytes + (kRotate ? kQBytes + kTurnedBytes : kQShared ? 0 : kQBytes);  // u32[kBlockM]
  static constexpr int kOffQEnd = kOffQId + 4 * kBlockM;    // i32[kBlockM]
  static constexpr int kOffQStarts = kOffQEnd + 4 * kBlockM;  // u32[kBlockM / 32]
  static constexpr int kOffKId = kOffQStarts + 4 * (kBlockM / 32);  // u32[2][kBlockN]
  static constexpr int kOffScan = kOffKId + 4 * 2 * kBlockN;         // i32[2 * kWarps]
  static constexpr int kOffClass = kOffScan + 4 * 2 * kWarps;  // u8[kThreads]: tile classes ahead
  // kRotate: each row's position and the start of its group's shifts (i32[kBlockM] each, staged
  // once per block by QueryRotator::stage_rows, read at every turn).
  static constexpr int kOffRowPos = kOffClass + kThreads;
  static constexpr int kOffRowShifts = kOffRowPos + 4 * kBlockM;
  static constexpr int kSmemBytes = kRotate ? kOffRowShifts + 4 * kBlockM : kOffClass + kThreads;
  // kWgmma: the layout starts at the first 1024-byte boundary of the dynamic shared memory (whose
  // own alignment is not promised), so the launch gives it this much more (layout_base below).
  static constexpr int kSmemAlign = kWgmma ? 1024 : 0;
  // kMassInSmem: the rows' per-segment sums, f32 [kBlockM][mass_row_stride(num_segments)], after
  // the fixed layout (kSmemBytes is that layout; the launch adds mass_smem_bytes).
  static constexpr int kOffMass = (kSmemBytes + 15) / 16 * 16;
  // Sums per row: an odd count, so that the 16 rows of a warp's row tile fall in 16 banks.
  __host__ __device__ static constexpr int mass_row_stride(int num_segments) { return num_segments | 1; }
  // Dynamic shared memory of a launch with `num_segments` key segments (kSmemBytes without kMassInSmem).
  __host__ __device__ static constexpr int launch_smem_bytes(int num_segments) {
    return kMassInSmem ? kOffMass + 4 * (kBlockM * mass_row_stride(num_segments) + kMassTile1Skew)
                       : kSmemBytes + kSmemAlign;
  }

  // Piece pairs one thread evaluates per key tile when bounding the loop (mask.cuh
  // may_be_visible); a tile with more pairs counts as possibly visible.
  static constexpr int kScanBudget = 64;
  static_assert(kOffK % 128 == 0 && kOffV % 128 == 0 && kOffQId % 16 == 0 && kOffRowPos % 4 == 0, "aligned tiles");
  // Split-K's first key tile is copied into buffer 0 (K, V, key ids) before the key-tile scan, so
  // the scan's memory (query pieces, scan, classes, rows) must lie outside every K / V / id buffer.
  static_assert(kOffQId >= kOffV + kVBytes && kOffScan >= kOffKId + 4 * 2 * kBlockN,
                "the key-tile scan's shared memory overlaps a key buffer");
};

// The wgmma kernels' traits (kernels/hopper/fwd_hopper.cu): attention, 64-key tiles, D 64 / 128,
// in blocks of kWarpGroups x 64 rows.
template <class T, int D, int kWarpGroups = 1>
using HopperTraits = FwdTraits<T, D, false, false, 1, 64, kWarpGroups>;
// ... with the fused per-segment mass (one warpgroup, up to mass::kMaxOnePassSegments segments).
template <class T, int D>
using HopperMassTraits = FwdTraits<T, D, false, true, 1, 64, 1>;
// ... with PINE's in-loop query rotation (one warpgroup).
template <class T, int D>
using HopperRopeTraits = FwdTraits<T, D, true, false, 1, 64, 1>;
// The standalone per-segment mass, one pass (kScoresOnly: no V, no output; one warpgroup).
template <class T, int D>
using HopperScoresTraits = FwdTraits<T, D, false, true, 1, 64, 1, true>;

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile of `kChunks` chunks per row.
template <int kChunks>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return (row * kChunks + (chunk ^ (row & 7))) * 16;
}

// Whether `Traits` (the forward, mass or backward kernel's) is a wgmma kernel's (FwdTraits::kWgmma;
// the others have none).
template <class Traits, class = void>
struct UsesWgmma : std::false_type {};
template <class Traits>
struct UsesWgmma<Traits, std::void_t<decltype(Traits::kWgmma)>> : std::bool_constant<Traits::kWgmma> {};

// Where the layout of `Traits` starts in the dynamic shared memory `smem`: a wgmma kernel's at its
// first 1024-byte boundary (FwdTraits::kSmemAlign), any other's at `smem`.
template <class Traits>
__device__ __forceinline__ char* layout_base(char* smem) {
  if constexpr (UsesWgmma<Traits>::value) {
    constexpr uint32_t kAlign = Traits::kSmemAlign;
    return smem + ((kAlign - (smem_u32addr(smem) & (kAlign - 1))) & (kAlign - 1));
  } else {
    return smem;
  }
}

// Bytes from one row of a K / V / Q tile to the next: the head dim's, or a wgmma kernel's 128 (the
// tile in column halves of 64 elements, see tile_offset).
template <class Traits>
constexpr int kRowPitch = UsesWgmma<Traits>::value ? 128 : Traits::kChunks * 16;

// Byte offset of 16-byte chunk `chunk` of row `row` in a kRows-row K / V / Q tile of the kernel
// `Traits`: `swizzle` (rows of the head dim's bytes), or with kWgmma wgmma's 128-byte swizzled
// K-major layout, which is also V's MN-major one: the tile in column halves of 64 elements (the
// second kRows x 128 bytes after the first), rows of 128 bytes, chunk c of a row at c ^ (row % 8).
// D 64 has one half: the same bytes as `swizzle`.
template <class Traits, int kRows>
__device__ __forceinline__ int tile_offset(int row, int chunk) {
  if constexpr (UsesWgmma<Traits>::value) {
    return (chunk / 8) * kRows * 128 + row * 128 + ((chunk % 8) ^ (row & 7)) * 16;
  } else {
    return swizzle<Traits::kChunks>(row, chunk);
  }
}

// swizzle(row0 + drow, 2 pair + half) with drow % 8 == 0 (the rows of one thread in the fragment
// loaders and stores), split into a per-thread part and a part known at compile time in unrolled
// loops. With l = row0 & 7 = 2 c + e:
//   (2 pair + half) ^ l = 2 (pair ^ c) + (half ^ e), and pair ^ c = (pair & ~3) + ((pair & 3) ^ c)
// since c < 4. So the offset is base | ((32 (pair & 3)) ^ c32) plus a constant, base =
// 16 (row0 kChunks + (half ^ e)) having bits 5 and 6 clear: one LOP3 per distinct pair % 4 in a
// loop, the rest folded into the instructions' immediates (the plain form cost a multiply-add
// and an XOR per fragment: ~75 instructions of a key tile's S mma at D = 128).
template <int kChunks>
struct SwizzledRows {
  static_assert(kChunks % 8 == 0, "rows of at least 128 bytes: base keeps bits 5 and 6 clear");
  int base;  // 16 (row0 kChunks + (half ^ (row0 & 1)))
  int c32;   // 32 ((row0 >> 1) & 3)

  __device__ __forceinline__ SwizzledRows(int row0, int half)
      : base(16 * (row0 * kChunks + (half ^ (row0 & 1)))), c32(32 * ((row0 >> 1) & 3)) {}

  __device__ __forceinline__ int at(int drow, int pair) const {
    return (base | ((32 * (pair & 3)) ^ c32)) + 32 * (pair & ~3) + drow * kChunks * 16;
  }
};

}  // namespace fwd
}  // namespace segattn

#endif  // SEGATTN_KERNEL_TRAITS_CUH
