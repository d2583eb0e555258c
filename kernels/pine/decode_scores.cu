// PINE's importance of decode rows on the GPU, read straight from the rotated KV cache: no
// un-rotated copy of the cache (see SegattnDecodeScoresParams in segattn_params.h).
//
// nvcc: `extern "C" __global__` entry points, params by value:
//   segattn_pine_decode_scores_{bf16,f16} (head_dim 64 or 128) and
//   segattn_pine_decode_scores_d256_{bf16,f16} (head_dim 256): grid (kv_splits, Lq * Hkv, B), 128
//     threads, dynamic shared memory segattn_pine_decode_scores_smem_bytes(P, head_dim,
//     num_segments) with P = H / Hkv; with kv_splits > 1, params.done zero (and left zero).
//
// One block per (key slice, query row, KV head) scores that slice for ALL P query heads of the KV
// head, so each key row is read once per KV head, not once per query head. A warp takes keys
// kUnroll at a time (their loads all in flight before the first dot product: a decode step is
// bound by load latency, not arithmetic), its lanes over the rotate-half pairs (coalesced loads
// of the key row and of its position's cos / sin row); the cache holds k rotated at its original
// position p, and
//   q . rope^-1(k, p) = sum over pairs c of  cos(p f_c) (q1 k1 + q2 k2) + sin(p f_c) (q1 k2 - q2 k1),
// reduced over the warp with shuffles, 4 keys x 4 heads together (warp_sum_many). One
// pass over the slice, in chunks of kChunk keys: the chunk's scores go to shared memory, then its
// max, then exp(s - max) summed per segment; the per-segment sums are rescaled when a chunk raises
// the max (online softmax, as the attention's O). Slices let short-query decode fill the GPU;
// their partial (max, sum, per-segment sums) merge like split-K attention's, in the same launch:
// the last slice of a (row, KV head) to finish (a counter per pair) merges them, then orders the
// segments for its row (order.cuh): a decode step's importance and order are one launch.
//
// Host emulation (SEGATTN_EMULATE): `segattn_emu_pine_decode_scores(params)`.
#include "platform.cuh"
#include "dtypes.cuh"
#include "kernel_traits.cuh"
#include "ptx.cuh"
#include "segattn_params.h"
#include "order.cuh"
#include "last_block.cuh"

namespace segattn {
namespace pine {

constexpr int kDecodeScoresThreads = 128;
constexpr int kDecodeScoresWarps = kDecodeScoresThreads / 32;
// Keys per chunk (scores held in shared memory) and keys in flight per warp.
constexpr int kDecodeScoresChunk = 128;
constexpr int kDecodeScoresUnroll = 4;
// Most key slices of a launch: the merge keeps one weight per slice and head where the chunk's
// scores were ([P][kChunk]); the launchers cap kv_splits at it.
constexpr int kMaxDecodeScoresSplits = SEGATTN_DECODE_SCORES_MAX_SPLITS;
static_assert(kMaxDecodeScoresSplits <= kDecodeScoresChunk, "the slice weights live in the scores' shared memory");

// Heads scored together, and the scores reduced over the warp at once (kUnroll keys x heads).
constexpr int kHeadsAtOnce = 4;
constexpr int kReduced = kDecodeScoresUnroll * kHeadsAtOnce;
static_assert(kReduced == 16, "warp_sum_many halves 16 values over lane bits 4..1");

// Reduces 16 values over the warp with 16 shuffles (5 per value one by one): at each step a lane
// keeps half of its values, adds its partner's copy of that half and hands over the other half.
// Returns the index of the sum that v[0] then holds: (lane >> 1) & 15 (lanes 2 k and 2 k + 1
// hold the same one).
// One step of warp_sum_many: values 0..2 kHalf - 1 -> 0..kHalf - 1, across lane bit kBit.
// Constant indices only (the steps are spelled out: a loop the compiler does not unroll would
// index v at run time, in local memory).
template <int kHalf, int kBit>
__device__ __forceinline__ void halve(float (&v)[kReduced], int lane) {
  const bool upper = (lane & kBit) != 0;
  SEGATTN_UNROLL
  for (int i = 0; i < kHalf; ++i) {
    const float keep = upper ? v[i + kHalf] : v[i];
    const float give = upper ? v[i] : v[i + kHalf];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, give, kBit);
  }
}

__device__ __forceinline__ int warp_sum_many(float (&v)[kReduced], int lane) {
  halve<8, 16>(v, lane);
  halve<4, 8>(v, lane);
  halve<2, 4>(v, lane);
  halve<1, 2>(v, lane);
  v[0] += __shfl_xor_sync(0xffffffffu, v[0], 1);
  return (lane >> 1) & 15;
}

// Shared memory (4-byte words): q [P][D] (scaled), scores [P][kChunk], acc [P][S] (then the
// importance), running max [P], rescale [P] (then the totals), the chunk's key positions and
// segment ids [kChunk] each, the last-slice flag.
__host__ __device__ inline int decode_scores_smem_floats(int heads_per_kv, int head_dim, int num_segments) {
  return heads_per_kv * (head_dim + kDecodeScoresChunk + num_segments + 2) + 2 * kDecodeScoresChunk + 1;
}

template <class T, int kHeadDim>
__device__ void decode_scores_kernel(const SegattnDecodeScoresParams& p) {
  constexpr int kHalf = kHeadDim / 2;
  constexpr int kPairs = kHalf / 32;  // rotate-half pairs per lane
  static_assert(kPairs * 32 == kHalf, "head dims 64, 128 and 256");
  SEGATTN_DYNAMIC_SMEM(float, smem);
  const int P = p.num_heads / p.num_kv_heads;
  const int S = p.num_segments;
  float* const s_q = smem;                                  // [P][D]
  float* const s_score = s_q + P * kHeadDim;                // [P][kChunk]
  float* const s_acc = s_score + P * kDecodeScoresChunk;    // [P][S]
  float* const s_max = s_acc + P * S;                       // [P]
  float* const s_rescale = s_max + P;                       // [P]
  uint32_t* const s_pos = reinterpret_cast<uint32_t*>(s_rescale + P);  // [kChunk]
  uint32_t* const s_seg = s_pos + kDecodeScoresChunk;                  // [kChunk]
  uint32_t* const s_last = s_seg + kDecodeScoresChunk;                 // [1]
  const int split = static_cast<int>(blockIdx.x);
  const int i = static_cast<int>(blockIdx.y) / p.num_kv_heads;
  const int kh = static_cast<int>(blockIdx.y) % p.num_kv_heads;
  const int b = static_cast<int>(blockIdx.z);
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int lane = tid % 32;

  // The P query rows, scaled; zeroed sums, no max yet.
  for (int x = tid; x < P * kHeadDim; x += kDecodeScoresThreads) {
    const int hh = x / kHeadDim;
    const T* const q = static_cast<const T*>(p.q) + static_cast<int64_t>(b) * p.q_strides.batch +
                       static_cast<int64_t>(i) * p.q_strides.row +
                       static_cast<int64_t>(kh * P + hh) * p.q_strides.head;
    s_q[x] = to_float(q[x % kHeadDim]) * p.scale;
  }
  for (int x = tid; x < P * S; x += kDecodeScoresThreads) s_acc[x] = 0.0f;
  for (int x = tid; x < P; x += kDecodeScoresThreads) s_max[x] = -INFINITY;

  const int splits = max(p.kv_splits, 1);
  const int per = (p.kv_len + splits - 1) / splits;
  const int j0 = split * per;
  const int j1 = min(p.kv_len, j0 + per);
  const T* const k_base = static_cast<const T*>(p.k) + static_cast<int64_t>(b) * p.k_strides.batch +
                          static_cast<int64_t>(kh) * p.k_strides.head;
  const uint32_t* const pos = p.key_pos + static_cast<int64_t>(b) * p.kv_len;
  const uint32_t* const seg = p.key_seg + static_cast<int64_t>(b) * p.kv_len;

  // This lane's pairs c = lane kPairs + t of a key: its halves and the cos / sin of its position.
  struct KeyPairs {
    float k1[kPairs], k2[kPairs], c[kPairs], s[kPairs];
  };
  auto load_key = [&](int j, uint32_t at) {
    KeyPairs kp;
    const T* const kr = k_base + static_cast<int64_t>(j) * p.k_strides.row;
    const float* const cs = p.cos + static_cast<int64_t>(at) * kHalf;
    const float* const sn = p.sin + static_cast<int64_t>(at) * kHalf;
    SEGATTN_UNROLL
    for (int t = 0; t < kPairs; ++t) {
      const int c = lane * kPairs + t;
      kp.k1[t] = to_float(kr[c]);
      kp.k2[t] = to_float(kr[c + kHalf]);
      kp.c[t] = cs[c];
      kp.s[t] = sn[c];
    }
    return kp;
  };
  // This lane's part of q_hh . rope^-1(k): its pairs only (the warp reduces it).
  auto partial_score = [&](const KeyPairs& kp, int hh) {
    const float* const q = s_q + hh * kHeadDim;
    float acc = 0.0f;
    SEGATTN_UNROLL
    for (int t = 0; t < kPairs; ++t) {
      const int c = lane * kPairs + t;
      const float q1 = q[c], q2 = q[c + kHalf];
      acc += kp.c[t] * (q1 * kp.k1[t] + q2 * kp.k2[t]) + kp.s[t] * (q1 * kp.k2[t] - q2 * kp.k1[t]);
    }
    return acc;
  };

  for (int c0 = j0; c0 < j1; c0 += kDecodeScoresChunk) {
    const int n = min(kDecodeScoresChunk, j1 - c0);
    __syncthreads();  // the last chunk's scores and ids are consumed (and the setup is written)
    for (int jj = tid; jj < n; jj += kDecodeScoresThreads) {
      s_pos[jj] = pos[c0 + jj];
      s_seg[jj] = seg[c0 + jj];
    }
    __syncthreads();

    // (1) Scores of the chunk's keys, -inf for keys outside every segment (id 0).
    for (int base = warp; base < n; base += kDecodeScoresWarps * kDecodeScoresUnroll) {
      KeyPairs kp[kDecodeScoresUnroll] = {};
      SEGATTN_UNROLL
      for (int u = 0; u < kDecodeScoresUnroll; ++u) {
        const int jj = base + u * kDecodeScoresWarps;
        if (jj < n && s_seg[jj] != 0) kp[u] = load_key(c0 + jj, s_pos[jj]);  // warp-uniform
      }
      // The kUnroll keys' scores for kHeadsAtOnce heads at a time: 16 lane partials reduced over
      // the warp together (16 shuffles for 16 scores, not 5 each); lane pair (2 v, 2 v + 1)
      // ends with score v.
      for (int h0 = 0; h0 < P; h0 += kHeadsAtOnce) {
        float v[kReduced];
        SEGATTN_UNROLL
        for (int u = 0; u < kDecodeScoresUnroll; ++u) {
          SEGATTN_UNROLL
          for (int t = 0; t < kHeadsAtOnce; ++t) {
            v[u * kHeadsAtOnce + t] = h0 + t < P ? partial_score(kp[u], h0 + t) : 0.0f;
          }
        }
        const int idx = warp_sum_many(v, lane);
        const int jj = base + (idx / kHeadsAtOnce) * kDecodeScoresWarps;
        const int hh = h0 + idx % kHeadsAtOnce;
        if ((lane & 1) == 0 && jj < n && hh < P) {
          s_score[hh * kDecodeScoresChunk + jj] = s_seg[jj] != 0 ? v[0] : -INFINITY;
        }
      }
    }
    __syncthreads();

    // (2) Each head's max so far; the factor that rescales its sums to it.
    for (int hh = warp; hh < P; hh += kDecodeScoresWarps) {
      float m = -INFINITY;
      for (int jj = lane; jj < n; jj += 32) m = fmaxf(m, s_score[hh * kDecodeScoresChunk + jj]);
      m = warp_max(m);
      if (lane == 0) {
        const float old = s_max[hh];
        const float now = fmaxf(old, m);
        s_rescale[hh] = old == now ? 1.0f : expf(old - now);  // old -inf: sums are 0, any factor
        s_max[hh] = now;
      }
    }
    __syncthreads();
    for (int x = tid; x < P * S; x += kDecodeScoresThreads) {
      const float f = s_rescale[x / S];
      if (f != 1.0f) s_acc[x] *= f;
    }
    __syncthreads();

    // (3) exp(s - max) summed per segment.
    for (int x = tid; x < P * n; x += kDecodeScoresThreads) {
      const int hh = x / n;
      const int jj = x % n;
      const uint32_t id = s_seg[jj];
      if (id != 0) segattn::atomic_add(&s_acc[hh * S + id], expf(s_score[hh * kDecodeScoresChunk + jj] - s_max[hh]));
    }
  }
  __syncthreads();

  const uint32_t* const lens = p.seg_lens + static_cast<int64_t>(b) * S;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.num_heads * p.q_len;
  const auto row_of = [&](int hh) {  // [B, H, Lq]
    return (static_cast<int64_t>(b) * p.num_heads + kh * P + hh) * p.q_len + i;
  };
  if (splits > 1) {
    // This slice's partials: each head's max, total (the sum of its segments' sums: every scored
    // key has a segment id) and per-segment sums.
    for (int hh = 0; hh < P; ++hh) {
      float part = 0.0f;
      for (int s = lane; s < S; s += 32) part += s_acc[hh * S + s];
      const float total = warp_sum(part);  // every warp computes it: no barrier
      const int64_t at = split * rows + row_of(hh);
      if (tid == 0) {
        p.part_max[at] = s_max[hh];
        p.part_total[at] = total;
      }
      for (int s = tid; s < S; s += kDecodeScoresThreads) p.part_acc[at * S + s] = s_acc[hh * S + s];
    }
    // Published before the count; the last slice of this (row, KV head) to finish merges.
    __threadfence();
    __syncthreads();
    if (tid == 0) {
      uint32_t* const done = &p.done[(static_cast<int64_t>(b) * p.q_len + i) * p.num_kv_heads + kh];
      *s_last = arrive_last(done, static_cast<uint32_t>(splits)) ? 1u : 0u;
    }
    __syncthreads();
    if (*s_last == 0u) return;
    __threadfence();
    // Merge (weights exp(max_x - max), as split-K does), with every slice's loads in flight at
    // once: a loop over the slices that waited on each load cost ~45 us at 66 slices. (a) A warp
    // per head, its lanes over the slices: the max, each slice's weight (kept in the scores'
    // shared memory, which the chunks no longer need) and the total.
    float* const s_weight = s_score;  // [P][kMaxDecodeScoresSplits]
    for (int hh = warp; hh < P; hh += kDecodeScoresWarps) {
      const int64_t row = row_of(hh);
      float m = -INFINITY;
      for (int x = lane; x < splits; x += 32) m = fmaxf(m, load_cg(p.part_max + x * rows + row));
      m = warp_max(m);
      float total = 0.0f;
      for (int x = lane; x < splits; x += 32) {
        const float mx = load_cg(p.part_max + x * rows + row);
        const float w = mx == -INFINITY ? 0.0f : expf(mx - m);  // an empty slice's sums are 0
        s_weight[hh * kMaxDecodeScoresSplits + x] = w;
        total += w * load_cg(p.part_total + x * rows + row);
      }
      total = warp_sum(total);
      if (lane == 0) {
        s_max[hh] = m;
        s_rescale[hh] = total;
      }
    }
    __syncthreads();
    // (b) A thread per (head, segment): the weighted sum over the slices; no branch on what the
    // loads return, so the unrolled loads issue together (an empty slice has weight 0 and sums 0).
    for (int x = tid; x < P * S; x += kDecodeScoresThreads) {
      const int hh = x / S;
      const float* const part = p.part_acc + row_of(hh) * S + x % S;
      const float* const w = s_weight + hh * kMaxDecodeScoresSplits;
      float acc = 0.0f;
      SEGATTN_UNROLL_8
      for (int y = 0; y < splits; ++y) acc += w[y] * load_cg(part + y * rows * S);
      s_acc[x] = acc;
    }
  } else {
    // One slice: each head's total from its own sums.
    for (int hh = warp; hh < P; hh += kDecodeScoresWarps) {
      float part = 0.0f;
      for (int s = lane; s < S; s += 32) part += s_acc[hh * S + s];
      const float total = warp_sum(part);
      if (lane == 0) s_rescale[hh] = total;
    }
  }
  __syncthreads();

  // The importance (sums / total / segment length; 0 for ids without keys), kept for the order
  // and written to `out`: every element.
  for (int x = tid; x < P * S; x += kDecodeScoresThreads) {
    const int hh = x / S;
    const int s = x % S;
    const float total = s_rescale[hh];
    const float v = total > 0.0f && lens[s] != 0 ? s_acc[x] / total / static_cast<float>(lens[s]) : 0.0f;
    s_acc[x] = v;
    p.out[row_of(hh) * S + s] = v;
  }
  __syncthreads();

  // The order: this row's group from its scores; row 0's block also every group that is not a
  // query row's (segment groups by index, as PINE orders them for n <= 2 and as a decode plan
  // has no segment queries; the prefix group and unused groups 0).
  const int n = static_cast<int>(p.num_segs[b]);
  const int first = static_cast<int>(p.first_suffix_row[b]);
  const auto shift_at = [&](int hh, int g) {
    return p.shifts + ((static_cast<int64_t>(b) * p.num_heads + kh * P + hh) * p.groups + g) * S;
  };
  if (i >= first && n + 1 + i - first < p.groups) {
    const int g = n + 1 + i - first;
    for (int x = tid; x < P * S; x += kDecodeScoresThreads) {
      const int hh = x / S;
      shift_at(hh, g)[x % S] = pine_shift(g, x % S, n, lens, nullptr, s_acc + hh * S);
    }
  }
  if (i == 0) {
    // The same for every head: computed once, written for each (this block's tail: the launch
    // waits for it).
    for (int x = tid; x < p.groups * S; x += kDecodeScoresThreads) {
      const int g = x / S;
      const bool row_group = g > n && first + g - n - 1 < p.q_len;
      if (row_group) continue;
      const uint32_t v = pine_shift(g, x % S, n, lens, nullptr, nullptr);
      for (int hh = 0; hh < P; ++hh) shift_at(hh, g)[x % S] = v;
    }
  }
}

template <class T>
__device__ void decode_scores_entry(const SegattnDecodeScoresParams& p) {
  if (p.head_dim == 64) {
    decode_scores_kernel<T, 64>(p);
  } else if (p.head_dim == 128) {
    decode_scores_kernel<T, 128>(p);
  } else {
    __trap();  // D 256 has its own entry point
  }
}

}  // namespace pine
}  // namespace segattn

// Four blocks per SM (the launcher's target; <= 128 registers): without the bound ptxas stopped at
// 80 registers and spilled one value across the loop.
extern "C" __global__ void __launch_bounds__(segattn::pine::kDecodeScoresThreads, 4)
    segattn_pine_decode_scores_bf16(const SegattnDecodeScoresParams params) {
  segattn::pine::decode_scores_entry<segattn::bf16>(params);
}

extern "C" __global__ void __launch_bounds__(segattn::pine::kDecodeScoresThreads, 4)
    segattn_pine_decode_scores_f16(const SegattnDecodeScoresParams params) {
  segattn::pine::decode_scores_entry<segattn::f16>(params);
}

// D = 256 (its own entry point: in the one above, its key pairs in flight made ptxas spill under
// the four-block bound, for every head dim): two blocks per SM.
extern "C" __global__ void __launch_bounds__(segattn::pine::kDecodeScoresThreads, 2)
    segattn_pine_decode_scores_d256_bf16(const SegattnDecodeScoresParams params) {
  segattn::pine::decode_scores_kernel<segattn::bf16, 256>(params);
}

extern "C" __global__ void __launch_bounds__(segattn::pine::kDecodeScoresThreads, 2)
    segattn_pine_decode_scores_d256_f16(const SegattnDecodeScoresParams params) {
  segattn::pine::decode_scores_kernel<segattn::f16, 256>(params);
}

#if defined(SEGATTN_EMULATE)

#include "emu/emu_api.h"

// Dynamic shared memory of the kernel for `P` query heads per KV head, in bytes.
extern "C" int segattn_pine_decode_scores_smem_bytes(int heads_per_kv, int head_dim, int num_segments) {
  return 4 * segattn::pine::decode_scores_smem_floats(heads_per_kv, head_dim, num_segments);
}

// Runs the kernel (and the merge when kv_splits > 1) for `p` on the CPU. 0 on success, nonzero
// with the message in segattn_emu_last_error().
extern "C" int segattn_emu_pine_decode_scores(const SegattnDecodeScoresParams* p) {
  if (p == nullptr || p->batch <= 0 || p->num_heads <= 0 || p->q_len <= 0) return 0;
  if (p->num_kv_heads <= 0 || p->num_heads % p->num_kv_heads != 0 ||
      (p->head_dim != 64 && p->head_dim != 128 && p->head_dim != 256)) {
    return ::segattn::emu::launch(dim3(1), dim3(1), 0, [&] {
      ::segattn::emu::trap("segattn_emu_pine_decode_scores: head_dim 64, 128 or 256 and H a multiple of Hkv",
                           SEGATTN_EMU_HERE);
    });
  }
  const int splits = p->kv_splits > 1 ? p->kv_splits : 1;
  const dim3 grid(splits, p->q_len * p->num_kv_heads, p->batch);
  const int smem =
      segattn_pine_decode_scores_smem_bytes(p->num_heads / p->num_kv_heads, p->head_dim, p->num_segments);
  const int rc = ::segattn::emu::launch(grid, dim3(segattn::pine::kDecodeScoresThreads), smem, [&] {
    const bool d256 = p->head_dim == 256;
    if (p->dtype == SEGATTN_DTYPE_BF16) {
      d256 ? segattn_pine_decode_scores_d256_bf16(*p) : segattn_pine_decode_scores_bf16(*p);
    } else {
      d256 ? segattn_pine_decode_scores_d256_f16(*p) : segattn_pine_decode_scores_f16(*p);
    }
  });
  return rc;
}

#endif  // SEGATTN_EMULATE
