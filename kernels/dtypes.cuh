// 16-bit floating-point types for kernel code, in both build modes.
//
// nvcc: aliases of __nv_bfloat16 / __half, converted with the CUDA intrinsics. Emulation: 16-bit
// structs converted in software with the same rounding (to nearest, ties to even; NaN stays NaN).
// Kernel code uses only the helpers below (no implicit conversions), so it compiles both ways.
#ifndef SEGATTN_DTYPES_CUH
#define SEGATTN_DTYPES_CUH

#include "platform.cuh"

namespace segattn {

#if defined(SEGATTN_EMULATE)

struct bf16 {
  uint16_t raw;
};
struct f16 {
  uint16_t raw;
};

__host__ __device__ inline uint16_t bits(bf16 x) { return x.raw; }
__host__ __device__ inline uint16_t bits(f16 x) { return x.raw; }
template <class T>
__host__ __device__ inline T from_bits(uint16_t b) {
  return T{b};
}

namespace detail {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
}
inline float f32_from_bits(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16_bits(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// Branch-free (mask arithmetic on int32), so that loops over many values vectorize with SSE2.
inline float f16_bits_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const int32_t em = h & 0x7fff;
  // Normal: rebias the exponent (+112); infinity / NaN: exponent all ones (+224), payload kept.
  const uint32_t special = 0u - static_cast<uint32_t>(em >= 0x7c00);
  const uint32_t wide = (static_cast<uint32_t>(em) << 13) + 0x38000000u + (special & 0x38000000u);
  // Zero or subnormal: em * 2^-24, exact in fp32.
  const uint32_t tiny = 0u - static_cast<uint32_t>(em < 0x400);
  const uint32_t sub = f32_bits(static_cast<float>(em) * 0x1p-24f);
  return f32_from_bits(sign | (sub & tiny) | (wide & ~tiny));
}

inline uint16_t f32_to_f16_bits(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to infinity
  if (ax >= 0x38800000u) {  // normal half: rebias the exponent, round 23 -> 10 mantissa bits
    const uint32_t r = ax - 0x38000000u;
    return static_cast<uint16_t>(sign | ((r + 0x0fffu + ((r >> 13) & 1u)) >> 13));
  }
  if (ax <= 0x33000000u) return static_cast<uint16_t>(sign);  // <= 2^-25: ties to even give 0
  // Subnormal half: k * 2^-24 with k = round(m * 2^(e - 126)).
  const uint32_t e = ax >> 23;
  const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126 - e;  // 14..24
  uint32_t k = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (k & 1u))) ++k;
  return static_cast<uint16_t>(sign | k);
}

}  // namespace detail

__host__ __device__ inline float to_float(bf16 x) {
  return detail::f32_from_bits(static_cast<uint32_t>(x.raw) << 16);
}
__host__ __device__ inline float to_float(f16 x) { return detail::f16_bits_to_f32(x.raw); }

template <class T>
__host__ __device__ inline T from_float(float f);
template <>
__host__ __device__ inline bf16 from_float<bf16>(float f) {
  return bf16{detail::f32_to_bf16_bits(f)};
}
template <>
__host__ __device__ inline f16 from_float<f16>(float f) {
  return f16{detail::f32_to_f16_bits(f)};
}

#else  // nvcc

using bf16 = __nv_bfloat16;
using f16 = __half;

__host__ __device__ inline uint16_t bits(bf16 x) { return __bfloat16_as_ushort(x); }
__host__ __device__ inline uint16_t bits(f16 x) { return __half_as_ushort(x); }
template <class T>
__host__ __device__ inline T from_bits(uint16_t b);
template <>
__host__ __device__ inline bf16 from_bits<bf16>(uint16_t b) {
  return __ushort_as_bfloat16(b);
}
template <>
__host__ __device__ inline f16 from_bits<f16>(uint16_t b) {
  return __ushort_as_half(b);
}

__host__ __device__ inline float to_float(bf16 x) { return __bfloat162float(x); }
__host__ __device__ inline float to_float(f16 x) { return __half2float(x); }

template <class T>
__host__ __device__ inline T from_float(float f);
template <>
__host__ __device__ inline bf16 from_float<bf16>(float f) {
  return __float2bfloat16_rn(f);
}
template <>
__host__ __device__ inline f16 from_float<f16>(float f) {
  return __float2half_rn(f);
}

#endif

static_assert(sizeof(bf16) == 2 && sizeof(f16) == 2, "16-bit types must be 2 bytes");

// Two values in one 32-bit register, `lo` in the low 16 bits: the element order of the mma
// fragments and of memory (little endian).
template <class T>
__host__ __device__ inline uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(bits(from_float<T>(lo))) |
         (static_cast<uint32_t>(bits(from_float<T>(hi))) << 16);
}

template <class T>
__host__ __device__ inline float unpack_lo(uint32_t packed) {
  return to_float(from_bits<T>(static_cast<uint16_t>(packed & 0xffffu)));
}
template <class T>
__host__ __device__ inline float unpack_hi(uint32_t packed) {
  return to_float(from_bits<T>(static_cast<uint16_t>(packed >> 16)));
}
template <class T>
__host__ __device__ inline float2 unpack2(uint32_t packed) {
  return make_float2(unpack_lo<T>(packed), unpack_hi<T>(packed));
}
// bf16 is the top half of an f32: the high element is the register with its low half cleared
// (one AND; the general form shifted down and up again, two instructions).
template <>
__host__ __device__ inline float2 unpack2<bf16>(uint32_t packed) {
#if defined(SEGATTN_EMULATE)
  return make_float2(detail::f32_from_bits(packed << 16), detail::f32_from_bits(packed & 0xffff0000u));
#else
  return make_float2(__uint_as_float(packed << 16), __uint_as_float(packed & 0xffff0000u));
#endif
}

}  // namespace segattn

#endif  // SEGATTN_DTYPES_CUH
