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
// head, so each key row is read once per KV head, not once per query head. A round of the block
// takes 32 keys, 8 per warp, 4 lanes per key: each lane owns runs of 8 rotate-half pairs of its
// key and loads them whole (16-byte loads of each half of the key row, 32-byte loads of the cos /
// sin rows of its position), all in flight at once: a decode step is bound by latency, not
// arithmetic. The cache holds k rotated at its original position p; the lane turns its pairs back
// once (rope^-1, shared by the P heads):
//   u1 = cos(p f_c) k1 + sin(p f_c) k2,   u2 = cos(p f_c) k2 - sin(p f_c) k1,
// and each head's score is q1 . u1 + q2 . u2 over the pairs, summed over the key's 4 lanes (3
// shuffles for 4 heads). One pass over the slice, in chunks of kChunk keys: the chunk's scores go
// to shared memory, then its max, then exp(s - max) summed per segment (a warp sum per 32 keys of
// one segment); the per-segment sums are rescaled when a chunk raises the max (online softmax, as
// the attention's O). Slices let short-query decode fill the GPU; their partial (max, sum,
// per-segment sums) merge like split-K attention's, in the same launch: the last slice of a (row,
// KV head) to finish (a counter per pair) merges them, then orders the segments for its row
// (order.cuh): a decode step's importance and order are one launch.
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
// Keys per chunk (scores held in shared memory).
constexpr int kDecodeScoresChunk = 128;
// Lanes per key, keys per warp and per round of the block; each lane's pairs come in runs of 8.
constexpr int kLanesPerKey = 4;
constexpr int kKeysPerWarp = 32 / kLanesPerKey;
constexpr int kKeysPerRound = kKeysPerWarp * kDecodeScoresWarps;
constexpr int kPairsPerRun = 8;
static_assert(kDecodeScoresChunk % kKeysPerRound == 0, "whole rounds per chunk");
// Most key slices of a launch: the merge keeps one weight per slice and head where the chunk's
// scores were ([P][kChunk]); the launchers cap kv_splits at it.
constexpr int kMaxDecodeScoresSplits = SEGATTN_DECODE_SCORES_MAX_SPLITS;
static_assert(kMaxDecodeScoresSplits <= kDecodeScoresChunk, "the slice weights live in the scores' shared memory");
// The merge's loads: each lane of a head's warp holds up to kSlicesPerLane slices' max and total;
// a (head, segment) sum loads kMergeBatch slices at a time.
constexpr int kSlicesPerLane = kMaxDecodeScoresSplits / 32;
static_assert(kSlicesPerLane * 32 == kMaxDecodeScoresSplits, "whole warps of slices");
constexpr int kMergeBatch = 32;

// Heads scored together: one per lane of a key, after the sum over its lanes.
constexpr int kHeadsAtOnce = kLanesPerKey;

// Sums each of 4 values over the 4 lanes of a key (lane bits 1 and 0) with 3 shuffles, not 2
// each: at each step a lane keeps half of its values, adds its partner's copy of that half and
// hands over the other half. Afterwards v[0] of key lane `part` (= lane & 3) holds the sum of
// value `part`.
__device__ __forceinline__ void sum_over_key_lanes(float (&v)[kHeadsAtOnce], int lane) {
  static_assert(kHeadsAtOnce == 4, "two halving steps");
  const bool upper2 = (lane & 2) != 0;
  SEGATTN_UNROLL
  for (int i = 0; i < 2; ++i) {
    const float keep = upper2 ? v[i + 2] : v[i];
    const float give = upper2 ? v[i] : v[i + 2];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, give, 2);
  }
  const bool upper1 = (lane & 1) != 0;
  const float keep = upper1 ? v[1] : v[0];
  const float give = upper1 ? v[0] : v[1];
  v[0] = keep + __shfl_xor_sync(0xffffffffu, give, 1);
}

// 16 bytes from memory: one vector load from a 16-byte aligned address on the device (any address
// in host emulation).
template <class V>
__device__ __forceinline__ V load16(const void* src) {
  static_assert(sizeof(V) == 16, "16-byte vectors");
#if defined(SEGATTN_EMULATE)
  V v;
  __builtin_memcpy(&v, src, sizeof(V));
  return v;
#else
  return *reinterpret_cast<const V*>(src);
#endif
}

// Shared memory (4-byte words): q [P][D] (scaled), scores [P][kChunk], acc [P][S] (then the
// importance), running max [P], rescale [P] (then the totals), the chunk's key segment ids
// [kChunk], the last-slice flag.
__host__ __device__ inline int decode_scores_smem_floats(int heads_per_kv, int head_dim, int num_segments) {
  return heads_per_kv * (head_dim + kDecodeScoresChunk + num_segments + 2) + kDecodeScoresChunk + 1;
}

template <class T, int kHeadDim>
__device__ void decode_scores_kernel(const SegattnDecodeScoresParams& p) {
  constexpr int kHalf = kHeadDim / 2;
  constexpr int kLanePairs = kHalf / kLanesPerKey;      // rotate-half pairs per lane of a key
  constexpr int kRuns = kLanePairs / kPairsPerRun;      // their runs of 8
  static_assert(kRuns * kPairsPerRun * kLanesPerKey == kHalf, "head dims 64, 128 and 256");
  SEGATTN_DYNAMIC_SMEM(float, smem);
  const int P = p.num_heads / p.num_kv_heads;
  const int S = p.num_segments;
  float* const s_q = smem;                                  // [P][D]
  float* const s_score = s_q + P * kHeadDim;                // [P][kChunk]
  float* const s_acc = s_score + P * kDecodeScoresChunk;    // [P][S]
  float* const s_max = s_acc + P * S;                       // [P]
  float* const s_rescale = s_max + P;                       // [P]
  uint32_t* const s_seg = reinterpret_cast<uint32_t*>(s_rescale + P);  // [kChunk]
  uint32_t* const s_last = s_seg + kDecodeScoresChunk;                 // [1]
  const int split = static_cast<int>(blockIdx.x);
  const int i = static_cast<int>(blockIdx.y) / p.num_kv_heads;
  const int kh = static_cast<int>(blockIdx.y) % p.num_kv_heads;
  const int b = static_cast<int>(blockIdx.z);
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int lane = tid % 32;

  const int splits = max(p.kv_splits, 1);
  // The last slice to finish merges, counted against p.kv_splits: a grid of another width would
  // merge early or never, and leave the stream's counter non-zero for the next launch.
  if (static_cast<int>(gridDim.x) != splits) __trap();
  const int per = (p.kv_len + splits - 1) / splits;
  const int j0 = split * per;
  const int j1 = min(p.kv_len, j0 + per);
  const T* const k_base = static_cast<const T*>(p.k) + static_cast<int64_t>(b) * p.k_strides.batch +
                          static_cast<int64_t>(kh) * p.k_strides.head;
  const uint32_t* const pos = p.key_pos + static_cast<int64_t>(b) * p.kv_len;
  const uint32_t* const seg = p.key_seg + static_cast<int64_t>(b) * p.kv_len;

  // A round's key of this lane (key kKeysPerWarp warp + lane / 4 of the round), read whole
  // before any arithmetic: its runs of pairs c = (t kLanesPerKey + part) 8 + e (e < 8), as
  // 16-bit halves and their position's cos / sin.
  const int part = lane % kLanesPerKey;
  struct KeyRuns {
    uint4 k1[kRuns], k2[kRuns];
    float4 cs[2 * kRuns], sn[2 * kRuns];
  };
  auto load_key = [&](int j, uint32_t at, KeyRuns& kr) {
    const T* const row = k_base + static_cast<int64_t>(j) * p.k_strides.row;
    const float* const cs = p.cos + static_cast<int64_t>(at) * kHalf;
    const float* const sn = p.sin + static_cast<int64_t>(at) * kHalf;
    SEGATTN_UNROLL
    for (int t = 0; t < kRuns; ++t) {
      const int c = (t * kLanesPerKey + part) * kPairsPerRun;
      kr.k1[t] = load16<uint4>(row + c);
      kr.k2[t] = load16<uint4>(row + kHalf + c);
      kr.cs[2 * t] = load16<float4>(cs + c);
      kr.cs[2 * t + 1] = load16<float4>(cs + c + 4);
      kr.sn[2 * t] = load16<float4>(sn + c);
      kr.sn[2 * t + 1] = load16<float4>(sn + c + 4);
    }
  };
  // rope^-1 of the lane's pairs: u1 = cos k1 + sin k2, u2 = cos k2 - sin k1.
  auto unrotate = [&](const KeyRuns& kr, float (&u1)[kLanePairs], float (&u2)[kLanePairs]) {
    SEGATTN_UNROLL
    for (int t = 0; t < kRuns; ++t) {
      const uint32_t w1[4] = {kr.k1[t].x, kr.k1[t].y, kr.k1[t].z, kr.k1[t].w};
      const uint32_t w2[4] = {kr.k2[t].x, kr.k2[t].y, kr.k2[t].z, kr.k2[t].w};
      const float c[8] = {kr.cs[2 * t].x,     kr.cs[2 * t].y,     kr.cs[2 * t].z,     kr.cs[2 * t].w,
                          kr.cs[2 * t + 1].x, kr.cs[2 * t + 1].y, kr.cs[2 * t + 1].z, kr.cs[2 * t + 1].w};
      const float s[8] = {kr.sn[2 * t].x,     kr.sn[2 * t].y,     kr.sn[2 * t].z,     kr.sn[2 * t].w,
                          kr.sn[2 * t + 1].x, kr.sn[2 * t + 1].y, kr.sn[2 * t + 1].z, kr.sn[2 * t + 1].w};
      SEGATTN_UNROLL
      for (int w = 0; w < 4; ++w) {
        const float2 a = unpack2<T>(w1[w]);
        const float2 b = unpack2<T>(w2[w]);
        const int e = t * kPairsPerRun + 2 * w;
        u1[e] = c[2 * w] * a.x + s[2 * w] * b.x;
        u2[e] = c[2 * w] * b.x - s[2 * w] * a.x;
        u1[e + 1] = c[2 * w + 1] * a.y + s[2 * w + 1] * b.y;
        u2[e + 1] = c[2 * w + 1] * b.y - s[2 * w + 1] * a.y;
      }
    }
  };
  // This lane's part of q_hh . rope^-1(k): its pairs only (the key's 4 lanes sum it).
  auto partial_score = [&](const float (&u1)[kLanePairs], const float (&u2)[kLanePairs], int hh) {
    const float* const q = s_q + hh * kHeadDim;
    float acc = 0.0f;
    SEGATTN_UNROLL
    for (int t = 0; t < kRuns; ++t) {
      const int c = (t * kLanesPerKey + part) * kPairsPerRun;
      SEGATTN_UNROLL
      for (int e4 = 0; e4 < kPairsPerRun; e4 += 4) {
        const float4 a = load16<float4>(q + c + e4);
        const float4 b = load16<float4>(q + kHalf + c + e4);
        const float* const v1 = u1 + t * kPairsPerRun + e4;
        const float* const v2 = u2 + t * kPairsPerRun + e4;
        acc += a.x * v1[0] + b.x * v2[0];
        acc += a.y * v1[1] + b.y * v2[1];
        acc += a.z * v1[2] + b.z * v2[2];
        acc += a.w * v1[3] + b.w * v2[3];
      }
    }
    return acc;
  };

  // This lane's key of the round at r0 of the chunk at c0 (n keys): its segment id (0 past the
  // chunk) into `id`, its runs into `kr`. Keys outside every segment are not read (their
  // position's table row need not exist); the key's loads wait on its id as its cos / sin do on
  // its position (both loaded together).
  uint32_t id = 0u;
  KeyRuns kr = {};
  auto load_round = [&](int c0, int n, int r0) {
    const int jj = r0 + warp * kKeysPerWarp + lane / kLanesPerKey;
    id = jj < n ? seg[c0 + jj] : 0u;
    kr = KeyRuns{};
    if (id != 0u) load_key(c0 + jj, pos[c0 + jj], kr);
  };
  // The first round's loads go out before the setup, whose own loads (q) then overlap them: the
  // block is a chain of round trips, and most slices are one chunk of two rounds.
  if (j0 < j1) load_round(j0, min(kDecodeScoresChunk, j1 - j0), 0);

  // The P query rows, scaled (kQBatch loads in flight per thread: P D = 512 at Llama-3-8B's 4 x
  // 128, one batch); zeroed sums, no max yet.
  constexpr int kQBatch = 4;
  const int nq = P * kHeadDim;
  const T* const q_row = static_cast<const T*>(p.q) + static_cast<int64_t>(b) * p.q_strides.batch +
                         static_cast<int64_t>(i) * p.q_strides.row + static_cast<int64_t>(kh * P) * p.q_strides.head;
  for (int x0 = tid; x0 < nq; x0 += kQBatch * kDecodeScoresThreads) {
    float v[kQBatch];
    SEGATTN_UNROLL
    for (int t = 0; t < kQBatch; ++t) {
      const int x = x0 + t * kDecodeScoresThreads;
      v[t] = x < nq ? to_float(q_row[static_cast<int64_t>(x / kHeadDim) * p.q_strides.head + x % kHeadDim]) : 0.0f;
    }
    SEGATTN_UNROLL
    for (int t = 0; t < kQBatch; ++t) {
      const int x = x0 + t * kDecodeScoresThreads;
      if (x < nq) s_q[x] = v[t] * p.scale;
    }
  }
  for (int x = tid; x < P * S; x += kDecodeScoresThreads) s_acc[x] = 0.0f;
  for (int x = tid; x < P; x += kDecodeScoresThreads) s_max[x] = -INFINITY;

  // The scores of the round at r0 of the chunk at c0 (n keys) from `id` and `kr` (load_round's),
  // -inf for keys outside every segment (id 0).
  auto score_round = [&](int n, int r0) {
    const int jj = r0 + warp * kKeysPerWarp + lane / kLanesPerKey;
    const bool valid = jj < n;
    float u1[kLanePairs], u2[kLanePairs];
    unrotate(kr, u1, u2);
    if (valid && part == 0) s_seg[jj] = id;
    for (int h0 = 0; h0 < P; h0 += kHeadsAtOnce) {
      float v[kHeadsAtOnce];
      SEGATTN_UNROLL
      for (int t = 0; t < kHeadsAtOnce; ++t) v[t] = h0 + t < P ? partial_score(u1, u2, h0 + t) : 0.0f;
      sum_over_key_lanes(v, lane);
      const int hh = h0 + part;
      if (valid && hh < P) s_score[hh * kDecodeScoresChunk + jj] = id != 0 ? v[0] : -INFINITY;
    }
  };
  // One chunk of keys; `preloaded`: its first round's keys are already loaded (the slice's first
  // chunk). Inlined at its two call sites with `preloaded` constant, so the preloaded registers
  // are dead once that round is scored, not carried around the loops.
  auto chunk = [&](int c0, bool preloaded) {
    const int n = min(kDecodeScoresChunk, j1 - c0);
    __syncthreads();  // the last chunk's scores and ids are consumed (and the setup is written)

    // (1) Scores of the chunk's keys, round by round.
    int r0 = 0;
    if (preloaded) {
      score_round(n, 0);
      r0 = kKeysPerRound;
    }
    for (; r0 < n; r0 += kKeysPerRound) {
      load_round(c0, n, r0);
      score_round(n, r0);
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

    // (3) exp(s - max) summed per segment, a warp per head and 32 keys at a time, in key order:
    // segments are runs of keys, so the 32 keys mostly share one id and the warp adds one sum;
    // at a boundary, one sum per run. Only the head's warp writes its sums (lane 0, no atomics),
    // so the importance is the same bits every run (shared atomics added in a varying order, and
    // PINE's order would then vary between segments whose importance agrees to the last bits).
    const int groups32 = (n + 31) / 32;
    for (int hh = warp; hh < P; hh += kDecodeScoresWarps) {
      for (int g = 0; g < groups32; ++g) {
        const int jj = g * 32 + lane;
        const uint32_t key_id = jj < n ? s_seg[jj] : 0u;
        const float e = key_id != 0 ? expf(s_score[hh * kDecodeScoresChunk + jj] - s_max[hh]) : 0.0f;
        // Lanes whose key is in a segment, run by run (ids are non-decreasing along the keys).
        uint32_t left = __ballot_sync(0xffffffffu, key_id != 0u);
        while (left != 0u) {
          const uint32_t run_id = __shfl_sync(0xffffffffu, key_id, __ffs(static_cast<int>(left)) - 1);
          const bool in_run = key_id == run_id;
          const float sum = warp_sum(in_run ? e : 0.0f);
          if (lane == 0) s_acc[hh * S + run_id] += sum;
          left &= ~__ballot_sync(0xffffffffu, in_run);
        }
      }
    }
  };
  if (j0 < j1) chunk(j0, true);
  for (int c0 = j0 + kDecodeScoresChunk; c0 < j1; c0 += kDecodeScoresChunk) chunk(c0, false);
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
    // Merge (weights exp(max_x - max), as split-K does), with the slices' loads in flight
    // together: this block is the launch's tail, so each round trip to L2 here is one the whole
    // decode step waits for (a loop that waited on each load cost ~45 us at 66 slices; loops of
    // dependent batches, 11 round trips at 52). (a) A warp per head, each lane up to 4 slices
    // loaded at once: the max, each slice's weight (kept in the scores' shared memory, which the
    // chunks no longer need) and the total: one round trip.
    float* const s_weight = s_score;  // [P][kMaxDecodeScoresSplits]
    for (int hh = warp; hh < P; hh += kDecodeScoresWarps) {
      const int64_t row = row_of(hh);
      float mx[kSlicesPerLane], tot[kSlicesPerLane];
      SEGATTN_UNROLL
      for (int t = 0; t < kSlicesPerLane; ++t) {
        const int x = lane + 32 * t;
        mx[t] = x < splits ? load_cg(p.part_max + x * rows + row) : -INFINITY;
        tot[t] = x < splits ? load_cg(p.part_total + x * rows + row) : 0.0f;
      }
      float m = -INFINITY;
      SEGATTN_UNROLL
      for (int t = 0; t < kSlicesPerLane; ++t) m = fmaxf(m, mx[t]);
      m = warp_max(m);
      float total = 0.0f;
      SEGATTN_UNROLL
      for (int t = 0; t < kSlicesPerLane; ++t) {
        const float w = mx[t] == -INFINITY ? 0.0f : expf(mx[t] - m);  // an empty slice's sums are 0
        if (lane + 32 * t < splits) s_weight[hh * kMaxDecodeScoresSplits + lane + 32 * t] = w;
        total += w * tot[t];
      }
      total = warp_sum(total);
      if (lane == 0) {
        s_max[hh] = m;
        s_rescale[hh] = total;
      }
    }
    __syncthreads();
    // (b) A thread per (head, segment): the weighted sum over the slices in slice order, their
    // loads issued kMergeBatch at a time (two round trips at 52 slices).
    for (int x = tid; x < P * S; x += kDecodeScoresThreads) {
      const int hh = x / S;
      const float* const part = p.part_acc + row_of(hh) * S + x % S;
      const float* const w = s_weight + hh * kMaxDecodeScoresSplits;
      float acc = 0.0f;
      for (int y0 = 0; y0 < splits; y0 += kMergeBatch) {
        float v[kMergeBatch];
        SEGATTN_UNROLL
        for (int t = 0; t < kMergeBatch; ++t) {
          v[t] = y0 + t < splits ? load_cg(part + static_cast<int64_t>(y0 + t) * rows * S) : 0.0f;
        }
        SEGATTN_UNROLL
        for (int t = 0; t < kMergeBatch; ++t) {
          if (y0 + t < splits) acc += w[y0 + t] * v[t];
        }
      }
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
