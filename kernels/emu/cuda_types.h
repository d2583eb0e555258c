// The CUDA language pieces that host C++ lacks: qualifiers, dim3 / uint3, the built-in index
// variables and the vector types, with CUDA's sizes and alignments (kernels type-pun through
// uint4 and float4, so layout matters).
#ifndef SEGATTN_EMU_CUDA_TYPES_H
#define SEGATTN_EMU_CUDA_TYPES_H

#include <cstdint>

// Qualifiers. Kernels become plain functions; `__shared__` variables get one copy per OS thread
// (blocks of a launch run one after another on the launching thread, so that copy is the block's).
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __constant__
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
// __restrict__ is a GNU C++ keyword already.

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

// The running fiber's indices. The emulator rewrites them at every fiber switch, so a fiber only
// ever sees its own values. Constant-initialized, so access needs no TLS init wrapper.
inline thread_local uint3 threadIdx = {0, 0, 0};
inline thread_local uint3 blockIdx = {0, 0, 0};
inline thread_local dim3 blockDim = {1, 1, 1};
inline thread_local dim3 gridDim = {1, 1, 1};
constexpr int warpSize = 32;

#define SEGATTN_EMU_VEC2(T, name, al)    \
  struct __attribute__((aligned(al))) name { \
    T x, y;                              \
  };                                     \
  inline name make_##name(T x, T y) { return name{x, y}; }
#define SEGATTN_EMU_VEC4(T, name, al)         \
  struct __attribute__((aligned(al))) name {      \
    T x, y, z, w;                             \
  };                                          \
  inline name make_##name(T x, T y, T z, T w) { \
    return name{x, y, z, w};                  \
  }

SEGATTN_EMU_VEC2(float, float2, 8)
SEGATTN_EMU_VEC4(float, float4, 16)
SEGATTN_EMU_VEC2(int, int2, 8)
SEGATTN_EMU_VEC4(int, int4, 16)
SEGATTN_EMU_VEC2(unsigned int, uint2, 8)
SEGATTN_EMU_VEC4(unsigned int, uint4, 16)
SEGATTN_EMU_VEC2(unsigned short, ushort2, 4)
SEGATTN_EMU_VEC4(unsigned short, ushort4, 8)

#undef SEGATTN_EMU_VEC2
#undef SEGATTN_EMU_VEC4

inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return uint3{x, y, z}; }

static_assert(sizeof(uint4) == 16 && alignof(uint4) == 16, "CUDA layout of uint4");
static_assert(sizeof(float2) == 8 && alignof(float2) == 8, "CUDA layout of float2");

#endif  // SEGATTN_EMU_CUDA_TYPES_H
