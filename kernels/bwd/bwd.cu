// The attention backward kernels: {bf16, f16} x head dim {64, 128}.
//
// nvcc: `extern "C" __global__` entry points with stable names, params by value:
//   segattn_bwd_bf16_d64, segattn_bwd_bf16_d128, segattn_bwd_f16_d64, segattn_bwd_f16_d128
//   grid (ceil(Lk / 64), Hkv, B), block 128 threads,
//   dynamic shared memory segattn::bwd::BwdTraits<T, D>::kSmemBytes (D = 64: 60,552 bytes;
//   D = 128: 72,072 bytes, raised by the launcher).
// Inputs: see SegattnBwdParams in segattn_params.h (q, k, v and d_out 16-byte aligned with strides
// that are multiples of 8 elements; dq_accum zeroed).
//
// Host emulation (SEGATTN_EMULATE): `segattn_emu_bwd(params)` runs the same entry points on the
// CPU through the SIMT emulator.
#include "platform.cuh"
#include "bwd_kernel.cuh"

#define SEGATTN_BWD_ENTRY(name, T, D)                                                       \
  extern "C" __global__ void __launch_bounds__(segattn::bwd::BwdTraits<T, D>::kThreads, 1) \
      name(const SegattnBwdParams params) {                                                 \
    segattn::bwd::bwd_kernel<segattn::bwd::BwdTraits<T, D>>(params);                        \
  }

SEGATTN_BWD_ENTRY(segattn_bwd_bf16_d64, segattn::bf16, 64)
SEGATTN_BWD_ENTRY(segattn_bwd_bf16_d128, segattn::bf16, 128)
SEGATTN_BWD_ENTRY(segattn_bwd_f16_d64, segattn::f16, 64)
SEGATTN_BWD_ENTRY(segattn_bwd_f16_d128, segattn::f16, 128)

#undef SEGATTN_BWD_ENTRY

#if defined(SEGATTN_EMULATE)

#include <cstdio>

#include "emu/emu_api.h"

namespace segattn {
namespace bwd {
namespace emu_entry {

using Entry = void (*)(const SegattnBwdParams);

template <class Traits>
int launch(const SegattnBwdParams& p, Entry entry) {
  const SegattnFwdParams& b = p.base;
  if (b.batch <= 0 || b.num_kv_heads <= 0 || b.kv_len <= 0) return 0;  // nothing to compute
  const dim3 grid((b.kv_len + Traits::kBlockN - 1) / Traits::kBlockN, b.num_kv_heads, b.batch);
  return ::segattn::emu::launch(grid, dim3(Traits::kThreads), Traits::kSmemBytes, [&] { entry(p); });
}

}  // namespace emu_entry
}  // namespace bwd
}  // namespace segattn

// Runs the backward kernel for `p` on the CPU. 0 on success; nonzero with the message in
// segattn_emu_last_error() for an unsupported dtype / head dim, bad sizes, or a failed launch.
extern "C" int segattn_emu_bwd(const SegattnBwdParams* p) {
  using namespace segattn::bwd;
  using segattn::bf16;
  using segattn::f16;
  static thread_local char message[256];
  if (p == nullptr) return ::segattn::emu::fail_launch("segattn_emu_bwd: params is NULL");
  const SegattnFwdParams& b = p->base;
  if (b.num_kv_heads <= 0 || b.num_heads % b.num_kv_heads != 0) {
    std::snprintf(message, sizeof message,
                  "segattn_emu_bwd: num_heads (%d) must be a positive multiple of num_kv_heads (%d)", b.num_heads,
                  b.num_kv_heads);
    return ::segattn::emu::fail_launch(message);
  }
  if (b.head_dim != 64 && b.head_dim != 128) {
    std::snprintf(message, sizeof message, "segattn_emu_bwd: unsupported head_dim %d (expected 64 or 128)",
                  b.head_dim);
    return ::segattn::emu::fail_launch(message);
  }
  const bool d64 = b.head_dim == 64;
  switch (b.dtype) {
    case SEGATTN_DTYPE_BF16:
      return d64 ? emu_entry::launch<BwdTraits<bf16, 64>>(*p, segattn_bwd_bf16_d64)
                 : emu_entry::launch<BwdTraits<bf16, 128>>(*p, segattn_bwd_bf16_d128);
    case SEGATTN_DTYPE_F16:
      return d64 ? emu_entry::launch<BwdTraits<f16, 64>>(*p, segattn_bwd_f16_d64)
                 : emu_entry::launch<BwdTraits<f16, 128>>(*p, segattn_bwd_f16_d128);
    default:
      std::snprintf(message, sizeof message,
                    "segattn_emu_bwd: unsupported dtype code %d (expected %d = f16 or %d = bf16)", b.dtype,
                    SEGATTN_DTYPE_F16, SEGATTN_DTYPE_BF16);
      return ::segattn::emu::fail_launch(message);
  }
}

// Dynamic shared memory of the backward kernel for (dtype, head_dim), 0 if unsupported.
extern "C" int segattn_emu_bwd_smem_bytes(int dtype, int head_dim) {
  using namespace segattn::bwd;
  if (dtype != SEGATTN_DTYPE_BF16 && dtype != SEGATTN_DTYPE_F16) return 0;
  if (head_dim == 64) return BwdTraits<segattn::bf16, 64>::kSmemBytes;
  if (head_dim == 128) return BwdTraits<segattn::bf16, 128>::kSmemBytes;
  return 0;
}

#endif  // SEGATTN_EMULATE
