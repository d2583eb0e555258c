// The standalone per-segment attention mass on Hopper's warpgroup MMA (sm_90a; FwdTraits::kScoresOnly,
// kernels/kernel_traits.cuh): the one-pass algorithm of the mma.sync mass kernel
// (kernels/scores_kernel.cuh, up to 64 key segments) in the body of the wgmma fused mass kernel
// (kernels/fwd_kernel.cuh, kernels/wgmma_loop.cuh) without V: per 64-key tile, S = Q K^T as
// wgmma, the online softmax, and the sums per segment rescaled with it (two f16 terms of P through
// the one-hot mma for tiles of three segments or more, as the mma.sync kernel's: PINE orders
// segments by these sums). No V tiles in shared memory, no O registers, no output but the sums.
// Under the emulator it gives the mma.sync 64-row mass kernel's bits (same products, same order).
// The two-pass algorithm (more than 64 segments) stays on the mma.sync kernel.
//
// nvcc (kernels/hopper.txt, the sm_90a fatbin): `extern "C" __global__` entry points
//   segattn_scores_hopper_{bf16,f16}_d{64,128}(SegattnFwdParams): grid (ceil(Lq / 64), H, B), 128
//     threads, params.block_rows = params.block_keys = 64, params.kv_splits = 1, params.mass the
//     output (SegattnMassOutput: per row or reduced, as the mass kernel's `out`), params.v and
//     params.o unused; dynamic shared memory HopperScoresTraits<T, D>::launch_smem_bytes(0).
//
// Host emulation (SEGATTN_EMULATE): `segattn_emu_scores_hopper(params)` runs them on the CPU.
#include "platform.cuh"
#include "fwd_kernel.cuh"

// Three blocks per SM (no O: at most 168 registers, no spill; shared memory is two K tiles and the
// Q tile), so that one block's softmax and sums run under another's products: its S is waited where
// it is issued (no P V to overlap).
#define SEGATTN_SCORES_HOPPER_ENTRY(name, T, D)                                                             \
  extern "C" __global__ void __launch_bounds__(segattn::fwd::HopperScoresTraits<T, D>::kThreads, 3)       \
      name(const SegattnFwdParams params) {                                                                 \
    segattn::fwd::fwd_kernel<segattn::fwd::HopperScoresTraits<T, D>>(params);                              \
  }

SEGATTN_SCORES_HOPPER_ENTRY(segattn_scores_hopper_bf16_d64, segattn::bf16, 64)
SEGATTN_SCORES_HOPPER_ENTRY(segattn_scores_hopper_bf16_d128, segattn::bf16, 128)
SEGATTN_SCORES_HOPPER_ENTRY(segattn_scores_hopper_f16_d64, segattn::f16, 64)
SEGATTN_SCORES_HOPPER_ENTRY(segattn_scores_hopper_f16_d128, segattn::f16, 128)

#undef SEGATTN_SCORES_HOPPER_ENTRY

#if defined(SEGATTN_EMULATE)

#include "fwd/emu_launch.cuh"

// Runs the wgmma standalone mass kernel for `p` (64-row blocks, no split-K, p->mass the output,
// at most 64 segments) on the CPU. 0 on success; nonzero with the message in
// segattn_emu_last_error() otherwise.
extern "C" int segattn_emu_scores_hopper(const SegattnFwdParams* p) {
  namespace e = segattn::fwd::emu_entry;
  using segattn::fwd::HopperScoresTraits;
  const char* bad = nullptr;
  if (p == nullptr) {
    bad = "segattn_emu_scores_hopper: params is NULL";
  } else if (p->mass.mass == nullptr || p->mass.num_segments > segattn::mass::kMaxOnePassSegments) {
    bad = "segattn_emu_scores_hopper: the mass output, up to 64 segments";
  } else if (p->kv_splits > 1 || (p->block_rows != 0 && p->block_rows != 64)) {
    bad = "segattn_emu_scores_hopper: 64-row blocks, no split-K";
  } else if (p->num_kv_heads <= 0 || p->num_heads % p->num_kv_heads != 0) {
    bad = "segattn_emu_scores_hopper: num_heads must be a positive multiple of num_kv_heads";
  } else if (p->head_dim != 64 && p->head_dim != 128) {
    bad = "segattn_emu_scores_hopper: head_dim 64 or 128";
  } else if (p->dtype != SEGATTN_DTYPE_BF16 && p->dtype != SEGATTN_DTYPE_F16) {
    bad = "segattn_emu_scores_hopper: dtype bf16 or f16";
  }
  if (bad != nullptr) return ::segattn::emu::fail_launch(bad);
  const bool d64 = p->head_dim == 64;
  if (p->dtype == SEGATTN_DTYPE_BF16) {
    return d64 ? e::launch<HopperScoresTraits<segattn::bf16, 64>>(*p, segattn_scores_hopper_bf16_d64)
               : e::launch<HopperScoresTraits<segattn::bf16, 128>>(*p, segattn_scores_hopper_bf16_d128);
  }
  return d64 ? e::launch<HopperScoresTraits<segattn::f16, 64>>(*p, segattn_scores_hopper_f16_d64)
             : e::launch<HopperScoresTraits<segattn::f16, 128>>(*p, segattn_scores_hopper_f16_d128);
}

#endif  // SEGATTN_EMULATE
