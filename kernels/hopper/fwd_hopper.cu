// The forward kernels on Hopper's warpgroup MMA (sm_90a; FwdTraits::kWgmma, kernels/wgmma_tile.cuh,
// kernels/wgmma_loop.cuh): segment-masked attention in 64-key tiles, {bf16, f16} x head dim
// {64, 128}, in blocks of one warpgroup (64 rows) or two (128 rows sharing each key tile); the
// prologue, the tile walk, the masks and the epilogue are the mma.sync kernels'
// (kernels/fwd_kernel.cuh), split-K included.
//
// nvcc (kernels/hopper.txt, the sm_90a fatbin): `extern "C" __global__` entry points
//   segattn_fwd_hopper_{bf16,f16}_d{64,128}(SegattnFwdParams): grid (ceil(Lq / 64) * kv_splits,
//     H, B), 128 threads, params.block_rows = 64;
//   segattn_fwd_hopper128_{bf16,f16}_d{64,128}(SegattnFwdParams): grid (ceil(Lq / 128) *
//     kv_splits, H, B), 256 threads, params.block_rows = 128;
//   segattn_fwd_hopper_mass_{bf16,f16}_d{64,128}(SegattnFwdParams): the 64-row kernel with the
//     fused per-segment mass (params.mass, up to 64 key segments; no split-K);
//   segattn_fwd_hopper_rope_{bf16,f16}_d{64,128}(SegattnFwdParams): the 64-row kernel with PINE's
//     in-loop query rotation (params.rotation; split-K as the others);
//   dynamic shared memory HopperTraits<T, D, warpgroups>::launch_smem_bytes(0) (kernel_traits.cuh:
//   the layout and 1024 bytes to align the tiles; HopperMassTraits, HopperRopeTraits the same),
//   params.block_keys = 64.
//
// Host emulation (SEGATTN_EMULATE): `segattn_emu_fwd_hopper(params)` runs them on the CPU, the
// 64- or 128-row one by params.block_rows, the mass or rope kernel where params.mass or
// params.rotation asks (the emulator's wgmma: kernels/emu/wgmma.cpp).
#include "platform.cuh"
#include "fwd_kernel.cuh"

// One entry point: `name` runs fwd_kernel for the traits given as the rest of the arguments.
#define SEGATTN_FWD_HOPPER_ENTRY(name, ...)                                                                \
  extern "C" __global__ void __launch_bounds__(__VA_ARGS__::kThreads, 1) name(const SegattnFwdParams params) { \
    segattn::fwd::fwd_kernel<__VA_ARGS__>(params);                                                         \
  }

using segattn::bf16;
using segattn::f16;
using segattn::fwd::HopperMassTraits;
using segattn::fwd::HopperRopeTraits;
using segattn::fwd::HopperTraits;

// Plain attention, one warpgroup (64 rows) and two (128 rows).
SEGATTN_FWD_HOPPER_ENTRY(segattn_fwd_hopper_bf16_d64, HopperTraits<bf16, 64, 1>)
SEGATTN_FWD_HOPPER_ENTRY(segattn_fwd_hopper_bf16_d128, HopperTraits<bf16, 128, 1>)
SEGATTN_FWD_HOPPER_ENTRY(segattn_fwd_hopper_f16_d64, HopperTraits<f16, 64, 1>)
SEGATTN_FWD_HOPPER_ENTRY(segattn_fwd_hopper_f16_d128, HopperTraits<f16, 128, 1>)
SEGATTN_FWD_HOPPER_ENTRY(segattn_fwd_hopper128_bf16_d64, HopperTraits<bf16, 64, 2>)
SEGATTN_FWD_HOPPER_ENTRY(segattn_fwd_hopper128_bf16_d128, HopperTraits<bf16, 128, 2>)
SEGATTN_FWD_HOPPER_ENTRY(segattn_fwd_hopper128_f16_d64, HopperTraits<f16, 64, 2>)
SEGATTN_FWD_HOPPER_ENTRY(segattn_fwd_hopper128_f16_d128, HopperTraits<f16, 128, 2>)
// With the fused per-segment mass (params.mass; up to 64 key segments, its sums in registers).
SEGATTN_FWD_HOPPER_ENTRY(segattn_fwd_hopper_mass_bf16_d64, HopperMassTraits<bf16, 64>)
SEGATTN_FWD_HOPPER_ENTRY(segattn_fwd_hopper_mass_bf16_d128, HopperMassTraits<bf16, 128>)
SEGATTN_FWD_HOPPER_ENTRY(segattn_fwd_hopper_mass_f16_d64, HopperMassTraits<f16, 64>)
SEGATTN_FWD_HOPPER_ENTRY(segattn_fwd_hopper_mass_f16_d128, HopperMassTraits<f16, 128>)
// With PINE's in-loop query rotation (params.rotation; the turned Q in registers).
SEGATTN_FWD_HOPPER_ENTRY(segattn_fwd_hopper_rope_bf16_d64, HopperRopeTraits<bf16, 64>)
SEGATTN_FWD_HOPPER_ENTRY(segattn_fwd_hopper_rope_bf16_d128, HopperRopeTraits<bf16, 128>)
SEGATTN_FWD_HOPPER_ENTRY(segattn_fwd_hopper_rope_f16_d64, HopperRopeTraits<f16, 64>)
SEGATTN_FWD_HOPPER_ENTRY(segattn_fwd_hopper_rope_f16_d128, HopperRopeTraits<f16, 128>)

#undef SEGATTN_FWD_HOPPER_ENTRY

#if defined(SEGATTN_EMULATE)

#include "fwd/emu_launch.cuh"

// Runs the wgmma forward kernel for `p` (blocks of p->block_rows 64, or 0 read as 64, or 128; with
// p->mass.mass the fused mass kernel, 64-row blocks, no split-K, at most 64 segments; with
// p->rotation.cos PINE's, 64-row blocks) on the CPU. 0 on success; nonzero with the message in segattn_emu_last_error() otherwise.
extern "C" int segattn_emu_fwd_hopper(const SegattnFwdParams* p) {
  namespace e = segattn::fwd::emu_entry;
  const char* bad = nullptr;
  if (p == nullptr) {
    bad = "segattn_emu_fwd_hopper: params is NULL";
  } else if (p->rotation.cos != nullptr && (p->mass.mass != nullptr || p->block_rows == 128)) {
    bad = "segattn_emu_fwd_hopper: the rotation in 64-row blocks, without the fused mass";
  } else if (p->mass.mass != nullptr &&
             (p->block_rows == 128 || p->kv_splits > 1 || p->mass.num_segments > segattn::mass::kMaxOnePassSegments)) {
    bad = "segattn_emu_fwd_hopper: the fused mass in 64-row blocks, without split-K, up to 64 segments";
  } else if (p->block_rows != 0 && p->block_rows != 64 && p->block_rows != 128) {
    bad = "segattn_emu_fwd_hopper: blocks of 64 or 128 rows";
  } else if (p->num_kv_heads <= 0 || p->num_heads % p->num_kv_heads != 0) {
    bad = "segattn_emu_fwd_hopper: num_heads must be a positive multiple of num_kv_heads";
  } else if (p->head_dim != 64 && p->head_dim != 128) {
    bad = "segattn_emu_fwd_hopper: head_dim 64 or 128";
  } else if (p->dtype != SEGATTN_DTYPE_BF16 && p->dtype != SEGATTN_DTYPE_F16) {
    bad = "segattn_emu_fwd_hopper: dtype bf16 or f16";
  }
  if (bad != nullptr) return ::segattn::emu::fail_launch(bad);
  const bool d64 = p->head_dim == 64;
  const bool bf = p->dtype == SEGATTN_DTYPE_BF16;
  if (p->rotation.cos != nullptr) {
    if (bf) {
      return d64 ? e::launch<HopperRopeTraits<bf16, 64>>(*p, segattn_fwd_hopper_rope_bf16_d64)
                 : e::launch<HopperRopeTraits<bf16, 128>>(*p, segattn_fwd_hopper_rope_bf16_d128);
    }
    return d64 ? e::launch<HopperRopeTraits<f16, 64>>(*p, segattn_fwd_hopper_rope_f16_d64)
               : e::launch<HopperRopeTraits<f16, 128>>(*p, segattn_fwd_hopper_rope_f16_d128);
  }
  if (p->mass.mass != nullptr) {
    if (bf) {
      return d64 ? e::launch<HopperMassTraits<bf16, 64>>(*p, segattn_fwd_hopper_mass_bf16_d64)
                 : e::launch<HopperMassTraits<bf16, 128>>(*p, segattn_fwd_hopper_mass_bf16_d128);
    }
    return d64 ? e::launch<HopperMassTraits<f16, 64>>(*p, segattn_fwd_hopper_mass_f16_d64)
               : e::launch<HopperMassTraits<f16, 128>>(*p, segattn_fwd_hopper_mass_f16_d128);
  }
  if (p->block_rows == 128) {
    if (bf) {
      return d64 ? e::launch<HopperTraits<bf16, 64, 2>>(*p, segattn_fwd_hopper128_bf16_d64)
                 : e::launch<HopperTraits<bf16, 128, 2>>(*p, segattn_fwd_hopper128_bf16_d128);
    }
    return d64 ? e::launch<HopperTraits<f16, 64, 2>>(*p, segattn_fwd_hopper128_f16_d64)
               : e::launch<HopperTraits<f16, 128, 2>>(*p, segattn_fwd_hopper128_f16_d128);
  }
  if (bf) {
    return d64 ? e::launch<HopperTraits<bf16, 64>>(*p, segattn_fwd_hopper_bf16_d64)
               : e::launch<HopperTraits<bf16, 128>>(*p, segattn_fwd_hopper_bf16_d128);
  }
  return d64 ? e::launch<HopperTraits<f16, 64>>(*p, segattn_fwd_hopper_f16_d64)
             : e::launch<HopperTraits<f16, 128>>(*p, segattn_fwd_hopper_f16_d128);
}

#endif  // SEGATTN_EMULATE
