// PINE's importance of decode rows on the GPU, read straight from the rotated KV cache: no
// un-rotated copy of the cache (see SegattnDecodeScoresParams in segattn_params.h).
//
// nvcc: `extern "C" __global__` segattn_pine_decode_scores_{bf16,f16}(const SegattnDecodeScoresParams),
//   grid (Lq, H, B), block 128 threads, dynamic shared memory (head_dim + num_segments + 8) floats.
// One block per (row, head). The cache holds k rotated at its original position p, and
//   q . rope^-1(k, p) = sum over pairs c of  cos(p f_c) (q1 k1 + q2 k2) + sin(p f_c) (q1 k2 - q2 k1),
// so each key costs one pass over its row and its position's table row. Two passes over the keys
// (the row max, then exp(s - max) summed per segment in shared memory): no per-key buffer. Decode
// reads few rows against a cache that L2 holds; the second pass recomputes instead of storing.
//
// Host emulation (SEGATTN_EMULATE): `segattn_emu_pine_decode_scores(params)`.
#include "platform.cuh"
#include "dtypes.cuh"
#include "kernel_traits.cuh"
#include "segattn_params.h"

namespace segattn {
namespace pine {

constexpr int kDecodeScoresThreads = 128;

// Adds v to *p in shared memory: atomically on the GPU; the emulator runs a block's threads as
// fibers of one OS thread, so a plain add is atomic there.
__device__ __forceinline__ void smem_add(float* p, float v) {
#if defined(SEGATTN_EMULATE)
  *p += v;
#else
  atomicAdd(p, v);
#endif
}

// Block-wide max (is_max) or sum of v; `red` holds one float per warp.
__device__ __forceinline__ float block_reduce(float v, float* red, bool is_max) {
  for (int m = 16; m >= 1; m /= 2) {
    const float o = __shfl_xor_sync(0xffffffffu, v, m);
    v = is_max ? fmaxf(v, o) : v + o;
  }
  const int warp = static_cast<int>(threadIdx.x) / 32;
  if (threadIdx.x % 32 == 0) red[warp] = v;
  __syncthreads();
  float r = red[0];
  for (int w = 1; w < kDecodeScoresThreads / 32; ++w) r = is_max ? fmaxf(r, red[w]) : r + red[w];
  __syncthreads();  // `red` is reused by the next reduction
  return r;
}

template <class T>
__device__ void decode_scores_kernel(const SegattnDecodeScoresParams& p) {
  SEGATTN_DYNAMIC_SMEM(float, smem);
  const int d = p.head_dim;
  const int half = d / 2;
  const int S = p.num_segments;
  float* const s_q = smem;               // [d] the row's query, scaled
  float* const s_acc = smem + d;         // [S] per-segment sums
  float* const s_red = s_acc + S;        // [kWarps]
  const int i = static_cast<int>(blockIdx.x);
  const int h = static_cast<int>(blockIdx.y);
  const int b = static_cast<int>(blockIdx.z);
  const int tid = static_cast<int>(threadIdx.x);
  const int kh = h / (p.num_heads / p.num_kv_heads);

  const T* const q = static_cast<const T*>(p.q) + static_cast<int64_t>(b) * p.q_strides.batch +
                     static_cast<int64_t>(i) * p.q_strides.row + static_cast<int64_t>(h) * p.q_strides.head;
  for (int c = tid; c < d; c += kDecodeScoresThreads) s_q[c] = to_float(q[c]) * p.scale;
  for (int s = tid; s < S; s += kDecodeScoresThreads) s_acc[s] = 0.0f;
  __syncthreads();

  const T* const k_base = static_cast<const T*>(p.k) + static_cast<int64_t>(b) * p.k_strides.batch +
                          static_cast<int64_t>(kh) * p.k_strides.head;
  const uint32_t* const pos = p.key_pos + static_cast<int64_t>(b) * p.kv_len;
  const uint32_t* const seg = p.key_seg + static_cast<int64_t>(b) * p.kv_len;
  auto score = [&](int j) {
    const T* const kr = k_base + static_cast<int64_t>(j) * p.k_strides.row;
    const float* const cs = p.cos + static_cast<int64_t>(pos[j]) * half;
    const float* const sn = p.sin + static_cast<int64_t>(pos[j]) * half;
    float acc = 0.0f;
    for (int x = 0; x < half; ++x) {
      const float q1 = s_q[x], q2 = s_q[x + half];
      const float k1 = to_float(kr[x]), k2 = to_float(kr[x + half]);
      acc += cs[x] * (q1 * k1 + q2 * k2) + sn[x] * (q1 * k2 - q2 * k1);
    }
    return acc;
  };

  float m = -INFINITY;
  for (int j = tid; j < p.kv_len; j += kDecodeScoresThreads) {
    if (seg[j] != 0) m = fmaxf(m, score(j));
  }
  m = block_reduce(m, s_red, true);
  if (m == -INFINITY) return;  // no segment key: the zeroed output stays

  float total = 0.0f;
  for (int j = tid; j < p.kv_len; j += kDecodeScoresThreads) {
    if (seg[j] != 0) {
      const float e = expf(score(j) - m);
      total += e;
      smem_add(&s_acc[seg[j]], e);
    }
  }
  total = block_reduce(total, s_red, false);  // its barriers also order the sums above

  float* const out = p.out + ((static_cast<int64_t>(b) * p.num_heads + h) * p.q_len + i) * S;
  const uint32_t* const lens = p.seg_lens + static_cast<int64_t>(b) * S;
  for (int s = tid; s < S; s += kDecodeScoresThreads) {
    if (lens[s] != 0) out[s] = s_acc[s] / total / static_cast<float>(lens[s]);
  }
}

}  // namespace pine
}  // namespace segattn

extern "C" __global__ void __launch_bounds__(segattn::pine::kDecodeScoresThreads)
    segattn_pine_decode_scores_bf16(const SegattnDecodeScoresParams params) {
  segattn::pine::decode_scores_kernel<segattn::bf16>(params);
}

extern "C" __global__ void __launch_bounds__(segattn::pine::kDecodeScoresThreads)
    segattn_pine_decode_scores_f16(const SegattnDecodeScoresParams params) {
  segattn::pine::decode_scores_kernel<segattn::f16>(params);
}

#if defined(SEGATTN_EMULATE)

#include "emu/emu_api.h"

// Dynamic shared memory of the kernel for `p`, in bytes.
extern "C" int segattn_pine_decode_scores_smem_bytes(int head_dim, int num_segments) {
  return 4 * (head_dim + num_segments + segattn::pine::kDecodeScoresThreads / 32);
}

// Runs the kernel for `p` on the CPU. 0 on success, nonzero with the message in
// segattn_emu_last_error().
extern "C" int segattn_emu_pine_decode_scores(const SegattnDecodeScoresParams* p) {
  if (p == nullptr || p->batch <= 0 || p->num_heads <= 0 || p->q_len <= 0) return 0;
  const dim3 grid(p->q_len, p->num_heads, p->batch);
  const int smem = segattn_pine_decode_scores_smem_bytes(p->head_dim, p->num_segments);
  if (p->dtype == SEGATTN_DTYPE_BF16) {
    return ::segattn::emu::launch(grid, dim3(segattn::pine::kDecodeScoresThreads), smem,
                                  [&] { segattn_pine_decode_scores_bf16(*p); });
  }
  return ::segattn::emu::launch(grid, dim3(segattn::pine::kDecodeScoresThreads), smem,
                                [&] { segattn_pine_decode_scores_f16(*p); });
}

#endif  // SEGATTN_EMULATE
