// Warp-wide tensor-core instructions, computed by the last lane to arrive from the fragment
// layouts of the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type",
// "Warp-level matrix load instruction: ldmatrix"). groupID = lane >> 2, tig = lane % 4:
//   A (16x16, row):  a[0] = A[g][2t..2t+1]   a[1] = A[g+8][2t..]   a[2] = A[g][2t+8..]
//                    a[3] = A[g+8][2t+8..]   (gathered by fragments.h, shared with wgmma)
//   B (16x8, col):   b[0] = B[2t..2t+1][g]   b[1] = B[2t+8..2t+9][g]
//   C, D (16x8 f32): c[0], c[1] = C[g][2t], C[g][2t+1];  c[2], c[3] = C[g+8][2t], C[g+8][2t+1]
// The lower-numbered element of a pair sits in the low 16 bits.
//   ldmatrix: lanes 8i..8i+7 give the row addresses of matrix i; lane l receives in r[i] the
//   elements (row l/4, cols 2(l%4), 2(l%4)+1) of matrix i, of its transpose with .trans.
#include <cstdio>
#include <cstring>

#include "dtypes.cuh"
#include "emu/context.h"
#include "emu/fragments.h"

namespace segattn::emu {

namespace {

// ---- mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 ------------------------

struct MmaIn {
  const uint32_t* a;
  const uint32_t* b;
  const float* c;
};

template <MmaInput T>
void mma_compute(Op, uint32_t, const void* const* in, void* const* out, Site) {
  // Gather the raw 16-bit values first, then decode them in one branch-free loop (vectorizes).
  uint16_t raw[16 * 16 + 16 * 8];  // A row-major [16][16], then B as [k][n]
  uint16_t* a16 = raw;
  uint16_t* b16 = raw + 256;
  float D[16][8];
  gather_a_fragments([&](int l) { return static_cast<const MmaIn*>(in[l])->a; }, a16);
  for (int l = 0; l < 32; ++l) {
    const auto& p = *static_cast<const MmaIn*>(in[l]);
    const int g = l >> 2, t = l & 3;
    for (int r = 0; r < 2; ++r) {
      b16[(2 * t + 8 * r) * 8 + g] = static_cast<uint16_t>(p.b[r]);
      b16[(2 * t + 8 * r + 1) * 8 + g] = static_cast<uint16_t>(p.b[r] >> 16);
    }
    D[g][2 * t] = p.c[0];
    D[g][2 * t + 1] = p.c[1];
    D[g + 8][2 * t] = p.c[2];
    D[g + 8][2 * t + 1] = p.c[3];
  }
  float values[16 * 16 + 16 * 8];
  for (int i = 0; i < 16 * 16 + 16 * 8; ++i) values[i] = decode16(T, raw[i]);
  const float* A = values;
  const float* B = values + 256;
  // D += A * B in fp32, k in order. Products of 16-bit floats are exact in fp32; plain
  // multiply-add (libm fmaf would be several times slower). The tensor core sums in another order:
  // compare with hardware using tolerances.
  for (int i = 0; i < 16; ++i) {
    float acc[8];  // one row of D, kept in registers across k
    for (int j = 0; j < 8; ++j) acc[j] = D[i][j];
    for (int k = 0; k < 16; ++k) {
      const float a = A[i * 16 + k];
      for (int j = 0; j < 8; ++j) acc[j] += a * B[k * 8 + j];
    }
    for (int j = 0; j < 8; ++j) D[i][j] = acc[j];
  }
  // All inputs are read: d may alias c.
  for (int l = 0; l < 32; ++l) {
    auto* d = static_cast<float*>(out[l]);
    const int g = l >> 2, t = l & 3;
    d[0] = D[g][2 * t];
    d[1] = D[g][2 * t + 1];
    d[2] = D[g + 8][2 * t];
    d[3] = D[g + 8][2 * t + 1];
  }
}

// ---- ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}.shared.b16 ------------------------------

template <int NUM, bool TRANS>
void ldmatrix_compute(Op op, uint32_t, const void* const* in, void* const* out, Site site) {
  const unsigned char* rows[32];
  for (int i = 0; i < NUM * 8; ++i) {
    rows[i] = *static_cast<const unsigned char* const*>(in[i]);
    if (rows[i] == nullptr || (reinterpret_cast<uintptr_t>(rows[i]) & 15) != 0) {
      char addr[32];
      std::snprintf(addr, sizeof addr, "%p", static_cast<const void*>(rows[i]));
      context().fail(op_name(op), " at ", site, ": lane ", i, " gave the row address ", addr,
                     ", not a 16-byte aligned shared-memory address");
    }
  }
  for (int l = 0; l < 32; ++l) {
    auto* r = static_cast<uint32_t*>(out[l]);
    for (int m = 0; m < NUM; ++m) {
      if (!TRANS) {
        std::memcpy(&r[m], rows[8 * m + l / 4] + 4 * (l % 4), 4);
      } else {
        uint16_t lo, hi;
        std::memcpy(&lo, rows[8 * m + 2 * (l % 4)] + 2 * (l / 4), 2);
        std::memcpy(&hi, rows[8 * m + 2 * (l % 4) + 1] + 2 * (l / 4), 2);
        r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
      }
    }
  }
}

template <int NUM>
WarpComputeFn ldmatrix_fn(bool trans) {
  return trans ? &ldmatrix_compute<NUM, true> : &ldmatrix_compute<NUM, false>;
}

}  // namespace

void mma_m16n8k16(MmaInput type, float d[4], const uint32_t a[4], const uint32_t b[2],
                  const float c[4], Site site) {
  MmaIn in{a, b, c};
  warp_collective(context(), Op::Mma, ~0u, true, &in, d,
                  type == MmaInput::BF16 ? &mma_compute<MmaInput::BF16> : &mma_compute<MmaInput::F16>,
                  site);
}

void ldmatrix(int num, bool trans, uint32_t* r, const void* row_ptr, Site site) {
  const WarpComputeFn fn = num == 4 ? ldmatrix_fn<4>(trans)
                           : num == 2 ? ldmatrix_fn<2>(trans)
                                      : ldmatrix_fn<1>(trans);
  warp_collective(context(), Op::Ldmatrix, ~0u, true, &row_ptr, r, fn, site);
}

}  // namespace segattn::emu
