// Rows of x [B, L, heads, D] rotated at per-token positions (rotate-half, Llama convention), in
// one pass in the input dtype: PINE's keys rotated once at their original positions before the
// attention (and a decode step's new keys). See SegattnRopeRowsParams in segattn_params.h.
//
// nvcc: `extern "C" __global__` entry points segattn_rope_rows_{bf16,f16}(const SegattnRopeRowsParams),
//   grid (L, B), block 128 threads, no shared memory.
// One block per token: its position is read once, then the threads stride over the (head, pair)
// elements; consecutive threads take consecutive pairs (coalesced reads of x and of the position's
// cos / sin row). As tensor ops the same rotation made ten launches with f32 intermediates.
//
// Host emulation (SEGATTN_EMULATE): `segattn_emu_rope_rows(params)`.
#include "platform.cuh"
#include "dtypes.cuh"
#include "segattn_params.h"

namespace segattn {
namespace rope_rows {

constexpr int kThreads = 128;

template <class T>
__device__ void rope_rows_kernel(const SegattnRopeRowsParams& p) {
  const int t = static_cast<int>(blockIdx.x);
  const int b = static_cast<int>(blockIdx.y);
  const int half = p.head_dim / 2;
  const int pb = p.pos_batches == 1 ? 0 : b;
  const uint32_t at = p.pos[static_cast<int64_t>(pb) * p.len + t];
  if (at >= static_cast<uint32_t>(p.table_len)) __trap();  // the host checks every position
  const float* const cs = p.cos + static_cast<int64_t>(at) * half;
  const float* const sn = p.sin + static_cast<int64_t>(at) * half;
  const T* const x = static_cast<const T*>(p.x) + static_cast<int64_t>(b) * p.x_strides.batch +
                     static_cast<int64_t>(t) * p.x_strides.row;
  T* const out = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.len + t) * p.heads * p.head_dim;
  for (int e = static_cast<int>(threadIdx.x); e < p.heads * half; e += kThreads) {
    const int h = e / half;
    const int c = e % half;
    const T* const xr = x + static_cast<int64_t>(h) * p.x_strides.head;
    const float x1 = to_float(xr[c]);
    const float x2 = to_float(xr[c + half]);
    const float co = cs[c];
    const float si = p.sign * sn[c];
    out[h * p.head_dim + c] = from_float<T>(x1 * co - x2 * si);
    out[h * p.head_dim + c + half] = from_float<T>(x2 * co + x1 * si);
  }
}

}  // namespace rope_rows
}  // namespace segattn

extern "C" __global__ void __launch_bounds__(segattn::rope_rows::kThreads)
    segattn_rope_rows_bf16(const SegattnRopeRowsParams params) {
  segattn::rope_rows::rope_rows_kernel<segattn::bf16>(params);
}

extern "C" __global__ void __launch_bounds__(segattn::rope_rows::kThreads)
    segattn_rope_rows_f16(const SegattnRopeRowsParams params) {
  segattn::rope_rows::rope_rows_kernel<segattn::f16>(params);
}

#if defined(SEGATTN_EMULATE)

#include "emu/emu_api.h"

// Runs the kernel for `p` on the CPU. 0 on success, nonzero with the message in
// segattn_emu_last_error().
extern "C" int segattn_emu_rope_rows(const SegattnRopeRowsParams* p) {
  if (p == nullptr || p->batch <= 0 || p->len <= 0 || p->heads <= 0) return 0;
  return ::segattn::emu::launch(dim3(p->len, p->batch), dim3(segattn::rope_rows::kThreads), 0, [&] {
    if (p->dtype == SEGATTN_DTYPE_BF16) {
      segattn_rope_rows_bf16(*p);
    } else {
      segattn_rope_rows_f16(*p);
    }
  });
}

#endif  // SEGATTN_EMULATE
