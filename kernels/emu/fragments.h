// The register fragments that mma.sync m16n8k16 and wgmma m64nNk16 share, read once for both
// (tensor_core.cpp, wgmma.cpp): A's fragment of a warp's 16 x 16 block (g = lane / 4,
// t = lane % 4; the lower element of a pair in the low 16 bits)
//   a[0] = A[g][2t, 2t+1]  a[1] = A[g+8][2t, 2t+1]  a[2] = A[g][2t+8, 2t+9]  a[3] = A[g+8][2t+8, 2t+9]
// and the decoding of its 16-bit inputs.
#ifndef SEGATTN_EMU_FRAGMENTS_H
#define SEGATTN_EMU_FRAGMENTS_H

#include <cstdint>

#include "dtypes.cuh"
#include "emu/runtime.h"

namespace segattn::emu {

// The warp's A block into `a16`, row-major [16][16] raw 16-bit values, from `a_of(l)`: lane l's 4
// registers.
template <class ALane>
inline void gather_a_fragments(const ALane& a_of, uint16_t* a16) {
  for (int l = 0; l < 32; ++l) {
    const uint32_t* a = a_of(l);
    const int g = l >> 2, t = l & 3;
    for (int r = 0; r < 4; ++r) {
      const int row = g + 8 * (r & 1);
      const int col = 2 * t + 8 * (r >> 1);
      a16[row * 16 + col] = static_cast<uint16_t>(a[r]);
      a16[row * 16 + col + 1] = static_cast<uint16_t>(a[r] >> 16);
    }
  }
}

// A 16-bit input as f32 (exact).
inline float decode16(MmaInput type, uint16_t h) {
  return type == MmaInput::BF16 ? to_float(from_bits<bf16>(h)) : to_float(from_bits<f16>(h));
}

}  // namespace segattn::emu

#endif  // SEGATTN_EMU_FRAGMENTS_H
