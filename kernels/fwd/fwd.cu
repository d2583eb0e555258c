// The forward kernels: {bf16, f16} x head dim {64, 128}; plain, with the fused per-segment mass,
// and with PINE's query rotation; plain attention at head dim 256 too.
//
// nvcc: `extern "C" __global__` entry points with stable names, params by value:
//   segattn_fwd_bf16_d64, segattn_fwd_bf16_d128, segattn_fwd_f16_d64, segattn_fwd_f16_d128
//   segattn_fwd_mass_{bf16,f16}_d{64,128} (params.mass set: the per-segment mass of segment ids
//   0..63 in the same pass; kv_splits <= 1; D = 64: shared memory as the plain kernel, D = 128:
//   Q in its own tile, 83,112 bytes)
//   segattn_fwd_rope_{bf16,f16}_d{64,128} (PINE: params.rotation set; Q in its own smem tile:
//   and the turned Q in a second: D = 64: 50,344 bytes, D = 128: 99,496 bytes)
//   segattn_fwd_wide_{bf16,f16}_d{64,128} (plain attention in blocks of 128 query rows, two
//   16-row tiles per warp, Q in its own shared tile; key tiles of 32 at D = 128; no split-K;
//   grid x ceil(Lq / 128); params.block_rows = 128)
//   segattn_fwd_wide64_{bf16,f16}_d128 (the wide kernel with key tiles of 64: FlashAttention-2's
//   128 x 64 tile, a few spills; params.block_keys = 64; plain attention's kernel at D = 128 from
//   128 query rows on, SEGATTN_FWD_WIDE_KEYS=32 for the 32-key tiles)
//   segattn_fwd_wide64_mass_{bf16,f16}_d128 (the 128 x 64 kernel with the fused mass, params.mass
//   set: each row's sums in shared memory after the fixed layout, FwdTraits::launch_smem_bytes(
//   params.mass.num_segments) bytes in all; no split-K)
//   segattn_fwd_{bf16,f16}_d256 (plain attention, 64 rows x 32-key tiles, Q in its own shared
//   tile: 99,240 bytes; split-K as the 64-row kernels), segattn_fwd_rope_{bf16,f16}_d256 (PINE's,
//   the same tiles and the turned Q)
//   split-K (params.kv_splits = S > 1): grid x is ceil(Lq / 64) * S; the last slice of each query
//   tile merges the partials (params.split_done zeroed by the caller).
//   grid (ceil(Lq / 64), H, B), block 128 threads,
//   dynamic shared memory segattn::fwd::FwdTraits<T, D>::kSmemBytes
//   (D = 64: 33,960 bytes; D = 128: 66,728 bytes, so the launcher must set
//   cudaFuncAttributeMaxDynamicSharedMemorySize for D = 128).
// Inputs: q/k/v/o pointers 16-byte aligned with row, head and batch strides multiples of 8
// elements (16-byte cp.async and stores); lse contiguous [B, H, Lq] or NULL.
//
// Host emulation (SEGATTN_EMULATE): `segattn_emu_fwd(params)` runs the same entry points on the
// CPU through the SIMT emulator.
#include "platform.cuh"
#include "fwd_kernel.cuh"

#define SEGATTN_FWD_ENTRY_KEYS(name, T, D, ROTATE, MASS, MTILES, KEYS)                                   \
  extern "C" __global__ void __launch_bounds__(                                                             \
      segattn::fwd::FwdTraits<T, D, ROTATE, MASS, MTILES, KEYS>::kThreads, 1)                               \
      name(const SegattnFwdParams params) {                                                                 \
    segattn::fwd::fwd_kernel<segattn::fwd::FwdTraits<T, D, ROTATE, MASS, MTILES, KEYS>>(params);            \
  }
#define SEGATTN_FWD_ENTRY(name, T, D, ROTATE, MASS, MTILES) SEGATTN_FWD_ENTRY_KEYS(name, T, D, ROTATE, MASS, MTILES, 0)

SEGATTN_FWD_ENTRY(segattn_fwd_bf16_d64, segattn::bf16, 64, false, false, 1)
SEGATTN_FWD_ENTRY(segattn_fwd_bf16_d128, segattn::bf16, 128, false, false, 1)
SEGATTN_FWD_ENTRY(segattn_fwd_f16_d64, segattn::f16, 64, false, false, 1)
SEGATTN_FWD_ENTRY(segattn_fwd_f16_d128, segattn::f16, 128, false, false, 1)
// The per-segment mass of the same softmax, fused (params.mass).
SEGATTN_FWD_ENTRY(segattn_fwd_mass_bf16_d64, segattn::bf16, 64, false, true, 1)
SEGATTN_FWD_ENTRY(segattn_fwd_mass_bf16_d128, segattn::bf16, 128, false, true, 1)
SEGATTN_FWD_ENTRY(segattn_fwd_mass_f16_d64, segattn::f16, 64, false, true, 1)
SEGATTN_FWD_ENTRY(segattn_fwd_mass_f16_d128, segattn::f16, 128, false, true, 1)
// PINE: the query rotated in the loop (params.rotation).
SEGATTN_FWD_ENTRY(segattn_fwd_rope_bf16_d64, segattn::bf16, 64, true, false, 1)
SEGATTN_FWD_ENTRY(segattn_fwd_rope_bf16_d128, segattn::bf16, 128, true, false, 1)
SEGATTN_FWD_ENTRY(segattn_fwd_rope_f16_d64, segattn::f16, 64, true, false, 1)
SEGATTN_FWD_ENTRY(segattn_fwd_rope_f16_d128, segattn::f16, 128, true, false, 1)
// Wide: 128 query rows per block, two 16-row tiles per warp (no split-K).
SEGATTN_FWD_ENTRY(segattn_fwd_wide_bf16_d64, segattn::bf16, 64, false, false, 2)
SEGATTN_FWD_ENTRY(segattn_fwd_wide_bf16_d128, segattn::bf16, 128, false, false, 2)
SEGATTN_FWD_ENTRY(segattn_fwd_wide_f16_d64, segattn::f16, 64, false, false, 2)
SEGATTN_FWD_ENTRY(segattn_fwd_wide_f16_d128, segattn::f16, 128, false, false, 2)
// Wide with 64-key tiles at D = 128 (FlashAttention-2's 128 x 64; the default at D = 128).
SEGATTN_FWD_ENTRY_KEYS(segattn_fwd_wide64_bf16_d128, segattn::bf16, 128, false, false, 2, 64)
SEGATTN_FWD_ENTRY_KEYS(segattn_fwd_wide64_f16_d128, segattn::f16, 128, false, false, 2, 64)
// ... and with the fused mass (params.mass; its rows' sums in shared memory).
SEGATTN_FWD_ENTRY_KEYS(segattn_fwd_wide64_mass_bf16_d128, segattn::bf16, 128, false, true, 2, 64)
SEGATTN_FWD_ENTRY_KEYS(segattn_fwd_wide64_mass_f16_d128, segattn::f16, 128, false, true, 2, 64)

// D = 256 (Gemma's head dim): plain attention, 64 x 32 tiles, Q read from shared memory; and
// PINE's rotation (the turned Q in a second tile: one block per sm_90 SM).
SEGATTN_FWD_ENTRY(segattn_fwd_bf16_d256, segattn::bf16, 256, false, false, 1)
SEGATTN_FWD_ENTRY(segattn_fwd_f16_d256, segattn::f16, 256, false, false, 1)
SEGATTN_FWD_ENTRY(segattn_fwd_rope_bf16_d256, segattn::bf16, 256, true, false, 1)
SEGATTN_FWD_ENTRY(segattn_fwd_rope_f16_d256, segattn::f16, 256, true, false, 1)

#undef SEGATTN_FWD_ENTRY
#undef SEGATTN_FWD_ENTRY_KEYS

#if defined(SEGATTN_EMULATE)

#include <cstdio>

#include "fwd/emu_launch.cuh"

// Runs the forward kernel for `p` on the CPU. 0 on success; nonzero with the message in
// segattn_emu_last_error() for an unsupported dtype / head dim, bad sizes, or a failed launch.
extern "C" int segattn_emu_fwd(const SegattnFwdParams* p) {
  using namespace segattn::fwd;
  using segattn::bf16;
  using segattn::f16;
  static thread_local char message[256];
  if (p == nullptr) return ::segattn::emu::fail_launch("segattn_emu_fwd: params is NULL");
  if (p->num_kv_heads <= 0 || p->num_heads % p->num_kv_heads != 0) {
    std::snprintf(message, sizeof message,
                  "segattn_emu_fwd: num_heads (%d) must be a positive multiple of num_kv_heads (%d)",
                  p->num_heads, p->num_kv_heads);
    return ::segattn::emu::fail_launch(message);
  }
  if (p->head_dim != 64 && p->head_dim != 128 && p->head_dim != 256) {
    std::snprintf(message, sizeof message, "segattn_emu_fwd: unsupported head_dim %d (expected 64, 128 or 256)",
                  p->head_dim);
    return ::segattn::emu::fail_launch(message);
  }
  const bool d64 = p->head_dim == 64;
  const bool rope = p->rotation.cos != nullptr;
  const bool mass = p->mass.mass != nullptr;
  const bool wide = p->block_rows == 128;
  if (p->head_dim == 256) {
    if (mass || wide) {
      return ::segattn::emu::fail_launch("segattn_emu_fwd: D = 256 runs in 64-row blocks, without the fused mass");
    }
    switch (p->dtype) {
      case SEGATTN_DTYPE_BF16:
        return rope ? emu_entry::launch<FwdTraits<bf16, 256, true>>(*p, segattn_fwd_rope_bf16_d256)
                    : emu_entry::launch<FwdTraits<bf16, 256>>(*p, segattn_fwd_bf16_d256);
      case SEGATTN_DTYPE_F16:
        return rope ? emu_entry::launch<FwdTraits<f16, 256, true>>(*p, segattn_fwd_rope_f16_d256)
                    : emu_entry::launch<FwdTraits<f16, 256>>(*p, segattn_fwd_f16_d256);
      default:
        break;  // the dtype's message below
    }
  }
  // The wide kernel's 64-key tiles at D = 128 (segattn_fwd_wide64_*); any other mismatch between
  // block_keys and the entry's tiles traps in the kernel.
  const bool keys64 = p->block_keys == 64;
  if (p->block_rows != 0 && p->block_rows != 64 && !wide) {
    std::snprintf(message, sizeof message, "segattn_emu_fwd: block_rows %d (expected 64 or 128)", p->block_rows);
    return ::segattn::emu::fail_launch(message);
  }
  if (wide && (rope || p->kv_splits > 1 || (mass && (d64 || !keys64)))) {
    return ::segattn::emu::fail_launch(
        "segattn_emu_fwd: the wide kernel has no rotation and no split-K, and the fused mass only with 64-key "
        "tiles at D = 128");
  }
  if (rope && mass) return ::segattn::emu::fail_launch("segattn_emu_fwd: the fused mass is not offered with PINE's rotation");
  if (mass && (p->kv_splits > 1 || p->mass.num_segments > segattn::mass::kMaxOnePassSegments)) {
    std::snprintf(message, sizeof message,
                  "segattn_emu_fwd: the fused mass needs kv_splits <= 1 (got %d) and at most %d segments (got %d)",
                  p->kv_splits, segattn::mass::kMaxOnePassSegments, p->mass.num_segments);
    return ::segattn::emu::fail_launch(message);
  }
  switch (p->dtype) {
    case SEGATTN_DTYPE_BF16:
      if (rope) {
        return d64 ? emu_entry::launch<FwdTraits<bf16, 64, true>>(*p, segattn_fwd_rope_bf16_d64)
                   : emu_entry::launch<FwdTraits<bf16, 128, true>>(*p, segattn_fwd_rope_bf16_d128);
      }
      if (mass && wide) {
        return emu_entry::launch<FwdTraits<bf16, 128, false, true, 2, 64>>(*p, segattn_fwd_wide64_mass_bf16_d128);
      }
      if (mass) {
        return d64 ? emu_entry::launch<FwdTraits<bf16, 64, false, true>>(*p, segattn_fwd_mass_bf16_d64)
                   : emu_entry::launch<FwdTraits<bf16, 128, false, true>>(*p, segattn_fwd_mass_bf16_d128);
      }
      if (wide) {
        if (!d64 && keys64) {
          return emu_entry::launch<FwdTraits<bf16, 128, false, false, 2, 64>>(*p, segattn_fwd_wide64_bf16_d128);
        }
        return d64 ? emu_entry::launch<FwdTraits<bf16, 64, false, false, 2>>(*p, segattn_fwd_wide_bf16_d64)
                   : emu_entry::launch<FwdTraits<bf16, 128, false, false, 2>>(*p, segattn_fwd_wide_bf16_d128);
      }
      return d64 ? emu_entry::launch<FwdTraits<bf16, 64>>(*p, segattn_fwd_bf16_d64)
                 : emu_entry::launch<FwdTraits<bf16, 128>>(*p, segattn_fwd_bf16_d128);
    case SEGATTN_DTYPE_F16:
      if (rope) {
        return d64 ? emu_entry::launch<FwdTraits<f16, 64, true>>(*p, segattn_fwd_rope_f16_d64)
                   : emu_entry::launch<FwdTraits<f16, 128, true>>(*p, segattn_fwd_rope_f16_d128);
      }
      if (mass && wide) {
        return emu_entry::launch<FwdTraits<f16, 128, false, true, 2, 64>>(*p, segattn_fwd_wide64_mass_f16_d128);
      }
      if (mass) {
        return d64 ? emu_entry::launch<FwdTraits<f16, 64, false, true>>(*p, segattn_fwd_mass_f16_d64)
                   : emu_entry::launch<FwdTraits<f16, 128, false, true>>(*p, segattn_fwd_mass_f16_d128);
      }
      if (wide) {
        if (!d64 && keys64) {
          return emu_entry::launch<FwdTraits<f16, 128, false, false, 2, 64>>(*p, segattn_fwd_wide64_f16_d128);
        }
        return d64 ? emu_entry::launch<FwdTraits<f16, 64, false, false, 2>>(*p, segattn_fwd_wide_f16_d64)
                   : emu_entry::launch<FwdTraits<f16, 128, false, false, 2>>(*p, segattn_fwd_wide_f16_d128);
      }
      return d64 ? emu_entry::launch<FwdTraits<f16, 64>>(*p, segattn_fwd_f16_d64)
                 : emu_entry::launch<FwdTraits<f16, 128>>(*p, segattn_fwd_f16_d128);
    default:
      std::snprintf(message, sizeof message,
                    "segattn_emu_fwd: unsupported dtype code %d (expected %d = f16 or %d = bf16)", p->dtype,
                    SEGATTN_DTYPE_F16, SEGATTN_DTYPE_BF16);
      return ::segattn::emu::fail_launch(message);
  }
}

// Dynamic shared memory of the kernel for (dtype, head_dim, variant: 0 plain, 1 PINE's rotation,
// 2 fused mass, 3 wide, 4 wide with 64-key tiles: at D = 64 the same as 3, 5 wide with 64-key
// tiles and the fused mass: D = 128 only, its fixed layout without the rows' sums, see
// segattn_emu_fwd_mass_rows_smem_bytes, 6 the wgmma kernel, 7 its two-warpgroup (128-row) one, 8
// the wgmma kernel with the fused mass, 9 with PINE's rotation, 10 the standalone mass on wgmma:
// D 64 / 128), 0 if unsupported (for the Rust side to check its launch configuration against the
// traits).
extern "C" int segattn_emu_fwd_smem_bytes(int dtype, int head_dim, int variant) {
  using namespace segattn::fwd;
  using segattn::bf16;
  if (dtype != SEGATTN_DTYPE_BF16 && dtype != SEGATTN_DTYPE_F16) return 0;
  if (head_dim == 256) {
    return variant == 0 ? FwdTraits<bf16, 256>::kSmemBytes : variant == 1 ? FwdTraits<bf16, 256, true>::kSmemBytes : 0;
  }
  if (head_dim != 64 && head_dim != 128) return 0;
  const bool d64 = head_dim == 64;
  switch (variant) {
    case 0:
      return d64 ? FwdTraits<bf16, 64>::kSmemBytes : FwdTraits<bf16, 128>::kSmemBytes;
    case 1:
      return d64 ? FwdTraits<bf16, 64, true>::kSmemBytes : FwdTraits<bf16, 128, true>::kSmemBytes;
    case 2:
      return d64 ? FwdTraits<bf16, 64, false, true>::kSmemBytes : FwdTraits<bf16, 128, false, true>::kSmemBytes;
    case 3:
      return d64 ? FwdTraits<bf16, 64, false, false, 2>::kSmemBytes
                 : FwdTraits<bf16, 128, false, false, 2>::kSmemBytes;
    case 4:
      return d64 ? FwdTraits<bf16, 64, false, false, 2>::kSmemBytes
                 : FwdTraits<bf16, 128, false, false, 2, 64>::kSmemBytes;
    case 5:
      return d64 ? 0 : FwdTraits<bf16, 128, false, true, 2, 64>::kSmemBytes;
    case 6:  // the wgmma kernel (kernels/hopper/fwd_hopper.cu): its launch's, with the alignment
      return d64 ? HopperTraits<bf16, 64>::launch_smem_bytes(0) : HopperTraits<bf16, 128>::launch_smem_bytes(0);
    case 7:
      return d64 ? HopperTraits<bf16, 64, 2>::launch_smem_bytes(0) : HopperTraits<bf16, 128, 2>::launch_smem_bytes(0);
    case 8:  // the wgmma kernel with the fused mass
      return d64 ? HopperMassTraits<bf16, 64>::launch_smem_bytes(0) : HopperMassTraits<bf16, 128>::launch_smem_bytes(0);
    case 9:  // the wgmma kernel with PINE's rotation
      return d64 ? HopperRopeTraits<bf16, 64>::launch_smem_bytes(0) : HopperRopeTraits<bf16, 128>::launch_smem_bytes(0);
    case 10:  // the standalone mass on wgmma (kernels/hopper/scores_hopper.cu)
      return d64 ? HopperScoresTraits<bf16, 64>::launch_smem_bytes(0)
                 : HopperScoresTraits<bf16, 128>::launch_smem_bytes(0);
    default:
      return 0;
  }
}

// Dynamic shared memory of a launch of the wide kernel with the fused mass (variant 5 above) for
// `num_segments` key segments: the fixed layout and the rows' sums. 0 if unsupported.
extern "C" int segattn_emu_fwd_mass_rows_smem_bytes(int dtype, int head_dim, int num_segments) {
  using namespace segattn::fwd;
  if ((dtype != SEGATTN_DTYPE_BF16 && dtype != SEGATTN_DTYPE_F16) || head_dim != 128 || num_segments < 0) return 0;
  return FwdTraits<segattn::bf16, 128, false, true, 2, 64>::launch_smem_bytes(num_segments);
}

#endif  // SEGATTN_EMULATE
