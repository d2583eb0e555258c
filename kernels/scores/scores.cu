// The per-segment attention mass kernels: {bf16, f16} x head dim {64, 128, 256}.
//
// nvcc: `extern "C" __global__` entry points with stable names, params by value:
//   segattn_scores_bf16_d64, segattn_scores_bf16_d128, segattn_scores_f16_d64, segattn_scores_f16_d128
//   grid (ceil(Lq / 64), H, B), block 128 threads,
//   dynamic shared memory segattn::scores::ScoresTraits<T, D>::kSmemBytes
//   (D = 64: 18,088 bytes; D = 128: 50,856 bytes, Q in its own tile: raised by the launcher);
//   registers for three blocks per SM;
//   segattn_scores_b4_{bf16,f16}_d128: the same kernel with registers for FOUR blocks per SM (128
//   registers: a few bytes of spills, kernels/production.txt; 4 x 50,856 bytes of shared memory fit
//   sm_90, not sm_80): the default at D = 128 (3-7% faster on an H100; SEGATTN_SCORES_BLOCKS=3
//   takes the three-block one);
//   segattn_scores_wide_{bf16,f16}_d{64,128}: 128 query rows per block (two 16-row tiles per warp,
//   Q in its own shared tile; key tiles of 32 at D = 128), grid (ceil(Lq / 128), H, B),
//   params.base.block_rows = 128;
//   segattn_scores_wide64_{bf16,f16}_d128: the wide kernel with key tiles of 64 (the forward
//   kernel's 128 x 64 tile; params.base.block_keys = 64; opt-in, SEGATTN_SCORES_WIDE_KEYS=64);
//   segattn_scores_{bf16,f16}_d256: the 64-row kernel at D = 256 (Q in its own tile, registers
//   for two blocks per SM, which its shared memory allows).
// Inputs as for the forward kernel (16-byte aligned q / k, strides multiples of 8 elements). The
// mass output must be zeroed first when two_pass, head_reduce or query_reduce is set (the kernel
// adds into it); see SegattnScoresParams in segattn_params.h.
//
// Host emulation (SEGATTN_EMULATE): `segattn_emu_scores(params)` runs the same entry points on
// the CPU through the SIMT emulator.
#include "platform.cuh"
#include "scores_kernel.cuh"

#define SEGATTN_SCORES_ENTRY_KEYS(name, T, D, MTILES, KEYS, MIN_BLOCKS)                                   \
  extern "C" __global__ void __launch_bounds__(segattn::scores::ScoresTraits<T, D, MTILES, KEYS>::kThreads, \
                                               MIN_BLOCKS)                                                  \
      name(const SegattnScoresParams params) {                                                              \
    segattn::scores::scores_kernel<segattn::scores::ScoresTraits<T, D, MTILES, KEYS>>(params);              \
  }
#define SEGATTN_SCORES_ENTRY_BLOCKS(name, T, D, MTILES, MIN_BLOCKS) \
  SEGATTN_SCORES_ENTRY_KEYS(name, T, D, MTILES, 0, MIN_BLOCKS)
#define SEGATTN_SCORES_ENTRY(name, T, D, MTILES) \
  SEGATTN_SCORES_ENTRY_BLOCKS(name, T, D, MTILES, (segattn::scores::ScoresTraits<T, D, MTILES>::kMinBlocks))

SEGATTN_SCORES_ENTRY(segattn_scores_bf16_d64, segattn::bf16, 64, 1)
SEGATTN_SCORES_ENTRY(segattn_scores_bf16_d128, segattn::bf16, 128, 1)
SEGATTN_SCORES_ENTRY(segattn_scores_f16_d64, segattn::f16, 64, 1)
SEGATTN_SCORES_ENTRY(segattn_scores_f16_d128, segattn::f16, 128, 1)
// Four blocks per SM at D = 128 (the default; SEGATTN_SCORES_BLOCKS=3 for the three-block one).
SEGATTN_SCORES_ENTRY_BLOCKS(segattn_scores_b4_bf16_d128, segattn::bf16, 128, 1, 4)
SEGATTN_SCORES_ENTRY_BLOCKS(segattn_scores_b4_f16_d128, segattn::f16, 128, 1, 4)
// Wide: 128 query rows per block.
SEGATTN_SCORES_ENTRY(segattn_scores_wide_bf16_d64, segattn::bf16, 64, 2)
SEGATTN_SCORES_ENTRY(segattn_scores_wide_bf16_d128, segattn::bf16, 128, 2)
SEGATTN_SCORES_ENTRY(segattn_scores_wide_f16_d64, segattn::f16, 64, 2)
SEGATTN_SCORES_ENTRY(segattn_scores_wide_f16_d128, segattn::f16, 128, 2)
// Wide with 64-key tiles at D = 128 (opt-in: SEGATTN_SCORES_WIDE_KEYS=64).
SEGATTN_SCORES_ENTRY_KEYS(segattn_scores_wide64_bf16_d128, segattn::bf16, 128, 2, 64, 1)
SEGATTN_SCORES_ENTRY_KEYS(segattn_scores_wide64_f16_d128, segattn::f16, 128, 2, 64, 1)

// D = 256: the 64-row kernel, Q in its own shared tile, two blocks per SM.
SEGATTN_SCORES_ENTRY(segattn_scores_bf16_d256, segattn::bf16, 256, 1)
SEGATTN_SCORES_ENTRY(segattn_scores_f16_d256, segattn::f16, 256, 1)

#undef SEGATTN_SCORES_ENTRY
#undef SEGATTN_SCORES_ENTRY_BLOCKS
#undef SEGATTN_SCORES_ENTRY_KEYS

#if defined(SEGATTN_EMULATE)

#include <cstdio>

#include "emu/emu_api.h"

namespace segattn {
namespace scores {
namespace emu_entry {

using Entry = void (*)(const SegattnScoresParams);

template <class Traits>
int launch(const SegattnScoresParams& p, Entry entry) {
  if (p.base.batch <= 0 || p.base.num_heads <= 0 || p.base.q_len <= 0) return 0;  // nothing to compute
  const dim3 grid((p.base.q_len + Traits::kBlockM - 1) / Traits::kBlockM, p.base.num_heads, p.base.batch);
  const dim3 block(Traits::kThreads);
  return ::segattn::emu::launch(grid, block, Traits::kSmemBytes, [&] { entry(p); });
}

}  // namespace emu_entry
}  // namespace scores
}  // namespace segattn

// Runs the mass kernel for `p` on the CPU. 0 on success; nonzero with the message in
// segattn_emu_last_error() for an unsupported dtype / head dim / segment count, bad sizes, or a
// failed launch.
extern "C" int segattn_emu_scores(const SegattnScoresParams* p) {
  using namespace segattn::scores;
  using segattn::bf16;
  using segattn::f16;
  static thread_local char message[256];
  if (p == nullptr) return ::segattn::emu::fail_launch("segattn_emu_scores: params is NULL");
  const SegattnFwdParams& b = p->base;
  if (b.num_kv_heads <= 0 || b.num_heads % b.num_kv_heads != 0) {
    std::snprintf(message, sizeof message,
                  "segattn_emu_scores: num_heads (%d) must be a positive multiple of num_kv_heads (%d)",
                  b.num_heads, b.num_kv_heads);
    return ::segattn::emu::fail_launch(message);
  }
  if (b.head_dim != 64 && b.head_dim != 128 && b.head_dim != 256) {
    std::snprintf(message, sizeof message, "segattn_emu_scores: unsupported head_dim %d (expected 64, 128 or 256)",
                  b.head_dim);
    return ::segattn::emu::fail_launch(message);
  }
  if (p->two_pass == 0 && p->out.num_segments > ScoresTraits<bf16, 64>::kMaxOnePassSegments) {
    std::snprintf(message, sizeof message,
                  "segattn_emu_scores: the one-pass kernel holds at most %d segments, got num_segments %d "
                  "(use two_pass)",
                  ScoresTraits<bf16, 64>::kMaxOnePassSegments, p->out.num_segments);
    return ::segattn::emu::fail_launch(message);
  }
  if (b.block_rows != 0 && b.block_rows != 64 && b.block_rows != 128) {
    std::snprintf(message, sizeof message, "segattn_emu_scores: block_rows %d (expected 64 or 128)", b.block_rows);
    return ::segattn::emu::fail_launch(message);
  }
  const bool d64 = b.head_dim == 64;
  const bool wide = b.block_rows == 128;
  // The wide kernel's 64-key tiles at D = 128 (segattn_scores_wide64_*); any other mismatch
  // between block_keys and the entry's tiles traps in the kernel.
  const bool keys64 = wide && !d64 && b.block_keys == 64;
  if (b.head_dim == 256) {
    if (wide) return ::segattn::emu::fail_launch("segattn_emu_scores: D = 256 has the 64-row kernel only");
    if (b.dtype == SEGATTN_DTYPE_BF16) return emu_entry::launch<ScoresTraits<bf16, 256>>(*p, segattn_scores_bf16_d256);
    if (b.dtype == SEGATTN_DTYPE_F16) return emu_entry::launch<ScoresTraits<f16, 256>>(*p, segattn_scores_f16_d256);
  }
  switch (b.dtype) {
    case SEGATTN_DTYPE_BF16:
      if (keys64) return emu_entry::launch<ScoresTraits<bf16, 128, 2, 64>>(*p, segattn_scores_wide64_bf16_d128);
      if (wide) {
        return d64 ? emu_entry::launch<ScoresTraits<bf16, 64, 2>>(*p, segattn_scores_wide_bf16_d64)
                   : emu_entry::launch<ScoresTraits<bf16, 128, 2>>(*p, segattn_scores_wide_bf16_d128);
      }
      return d64 ? emu_entry::launch<ScoresTraits<bf16, 64>>(*p, segattn_scores_bf16_d64)
                 : emu_entry::launch<ScoresTraits<bf16, 128>>(*p, segattn_scores_bf16_d128);
    case SEGATTN_DTYPE_F16:
      if (keys64) return emu_entry::launch<ScoresTraits<f16, 128, 2, 64>>(*p, segattn_scores_wide64_f16_d128);
      if (wide) {
        return d64 ? emu_entry::launch<ScoresTraits<f16, 64, 2>>(*p, segattn_scores_wide_f16_d64)
                   : emu_entry::launch<ScoresTraits<f16, 128, 2>>(*p, segattn_scores_wide_f16_d128);
      }
      return d64 ? emu_entry::launch<ScoresTraits<f16, 64>>(*p, segattn_scores_f16_d64)
                 : emu_entry::launch<ScoresTraits<f16, 128>>(*p, segattn_scores_f16_d128);
    default:
      std::snprintf(message, sizeof message,
                    "segattn_emu_scores: unsupported dtype code %d (expected %d = f16 or %d = bf16)", b.dtype,
                    SEGATTN_DTYPE_F16, SEGATTN_DTYPE_BF16);
      return ::segattn::emu::fail_launch(message);
  }
}

// Dynamic shared memory of the mass kernel for (dtype, head_dim, wide: 0 or 1, keys64: 1 for the
// wide kernel's 64-key tiles at D = 128), 0 if unsupported.
extern "C" int segattn_emu_scores_smem_bytes(int dtype, int head_dim, int wide, int keys64) {
  using namespace segattn::scores;
  if (dtype != SEGATTN_DTYPE_BF16 && dtype != SEGATTN_DTYPE_F16) return 0;
  if (keys64) return wide && head_dim == 128 ? ScoresTraits<segattn::bf16, 128, 2, 64>::kSmemBytes : 0;
  if (head_dim == 64) {
    return wide ? ScoresTraits<segattn::bf16, 64, 2>::kSmemBytes : ScoresTraits<segattn::bf16, 64>::kSmemBytes;
  }
  if (head_dim == 128) {
    return wide ? ScoresTraits<segattn::bf16, 128, 2>::kSmemBytes : ScoresTraits<segattn::bf16, 128>::kSmemBytes;
  }
  if (head_dim == 256) return wide ? 0 : ScoresTraits<segattn::bf16, 256>::kSmemBytes;
  return 0;
}

#endif  // SEGATTN_EMULATE
