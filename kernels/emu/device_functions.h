// CUDA device intrinsics under their CUDA names, for host C++.
//
// Synchronizing ones go through the emulator runtime; each takes hidden trailing parameters that
// default to the caller's file and line, so that a deadlock report says where threads wait.
// Arithmetic ones map to the C library (numerics differ from the GPU's fast paths: compare
// against hardware with tolerances).
#ifndef SEGATTN_EMU_DEVICE_FUNCTIONS_H
#define SEGATTN_EMU_DEVICE_FUNCTIONS_H

#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>

#include "emu/runtime.h"

namespace segattn::emu::detail {

template <class T>
inline uint64_t to_u64(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of at most 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

template <class T>
inline T from_u64(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

}  // namespace segattn::emu::detail

// ---- Barriers -----------------------------------------------------------------------------------

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  segattn::emu::block_barrier(segattn::emu::Op::SyncThreads, 0, {file, line});
}
inline int __syncthreads_count(int pred, const char* file = __builtin_FILE(),
                               int line = __builtin_LINE()) {
  return segattn::emu::block_barrier(segattn::emu::Op::SyncThreadsCount, pred, {file, line});
}
inline int __syncthreads_and(int pred, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
  return segattn::emu::block_barrier(segattn::emu::Op::SyncThreadsAnd, pred, {file, line});
}
inline int __syncthreads_or(int pred, const char* file = __builtin_FILE(),
                            int line = __builtin_LINE()) {
  return segattn::emu::block_barrier(segattn::emu::Op::SyncThreadsOr, pred, {file, line});
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  segattn::emu::warp_sync(mask, {file, line});
}

// Fibers of a block share one OS thread, and a fiber switch is an opaque call: ordering is
// sequential already; these only stop the compiler from moving memory accesses across them.
inline void __threadfence_block() { __asm__ __volatile__("" ::: "memory"); }
inline void __threadfence() { __asm__ __volatile__("" ::: "memory"); }

[[noreturn]] inline void __trap(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  segattn::emu::trap("__trap()", {file, line});
}

// ---- Warp shuffles and votes ------------------------------------------------------------------

template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using namespace segattn::emu;
  return detail::from_u64<T>(
      warp_shuffle(Op::Shfl, mask, detail::to_u64(var), src_lane, width, {file, line}));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using namespace segattn::emu;
  return detail::from_u64<T>(
      warp_shuffle(Op::ShflXor, mask, detail::to_u64(var), lane_mask, width, {file, line}));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using namespace segattn::emu;
  return detail::from_u64<T>(warp_shuffle(Op::ShflUp, mask, detail::to_u64(var),
                                          static_cast<int>(delta), width, {file, line}));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using namespace segattn::emu;
  return detail::from_u64<T>(warp_shuffle(Op::ShflDown, mask, detail::to_u64(var),
                                          static_cast<int>(delta), width, {file, line}));
}

inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return segattn::emu::warp_ballot(mask, pred, {file, line});
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return segattn::emu::warp_ballot(mask, pred, {file, line}) != 0;
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  // Over the lanes that take part: the mask restricted to the lanes the warp has.
  const unsigned votes = segattn::emu::warp_ballot(mask, pred, {file, line});
  return votes == (mask & segattn::emu::active_mask());
}
inline unsigned __activemask() { return segattn::emu::active_mask(); }

// ---- Bits and reinterpretation ----------------------------------------------------------------

inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline int __float_as_int(float f) { return static_cast<int>(__float_as_uint(f)); }
inline float __int_as_float(int i) { return __uint_as_float(static_cast<unsigned>(i)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
  return (x >> 16) | (x << 16);
}

template <class T>
inline T __ldg(const T* p) {
  return *p;
}

// ---- Fast math (plain C library here) ---------------------------------------------------------

inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : (x == x ? x : 0.0f)); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }

// CUDA's global min / max overloads (same-type only here).
#define SEGATTN_EMU_MINMAX(T)                        \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
SEGATTN_EMU_MINMAX(int)
SEGATTN_EMU_MINMAX(unsigned int)
SEGATTN_EMU_MINMAX(long)
SEGATTN_EMU_MINMAX(unsigned long)
SEGATTN_EMU_MINMAX(long long)
SEGATTN_EMU_MINMAX(unsigned long long)
#undef SEGATTN_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

#endif  // SEGATTN_EMU_DEVICE_FUNCTIONS_H
