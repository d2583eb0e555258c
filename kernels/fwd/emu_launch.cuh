// Host emulation only (SEGATTN_EMULATE): how the emulated entries of the forward kernels
// (kernels/fwd/fwd.cu, kernels/hopper/fwd_hopper.cu) launch them, as the GPU launcher does
// (src/cuda/launch.rs launch_config): grid (ceil(Lq / kBlockM) * kv_splits, H, B), kThreads, the
// traits' dynamic shared memory for the launch's key segments.
#ifndef SEGATTN_FWD_EMU_LAUNCH_CUH
#define SEGATTN_FWD_EMU_LAUNCH_CUH

#if defined(SEGATTN_EMULATE)

#include "platform.cuh"
#include "emu/emu_api.h"
#include "segattn_params.h"

namespace segattn {
namespace fwd {
namespace emu_entry {

using Entry = void (*)(const SegattnFwdParams);

template <class Traits>
int launch(const SegattnFwdParams& p, Entry entry) {
  if (p.batch <= 0 || p.num_heads <= 0 || p.q_len <= 0) return 0;  // nothing to compute
  const int splits = p.kv_splits > 1 ? p.kv_splits : 1;
  const dim3 grid((p.q_len + Traits::kBlockM - 1) / Traits::kBlockM * splits, p.num_heads, p.batch);
  const dim3 block(Traits::kThreads);
  return ::segattn::emu::launch(grid, block, Traits::launch_smem_bytes(p.mass.num_segments), [&] { entry(p); });
}

}  // namespace emu_entry
}  // namespace fwd
}  // namespace segattn

#endif  // SEGATTN_EMULATE

#endif  // SEGATTN_FWD_EMU_LAUNCH_CUH
