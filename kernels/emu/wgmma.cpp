// Hopper's warpgroup MMA (wgmma.mma_async, A in registers, B in shared memory through a matrix
// descriptor), from this project's reading of the PTX ISA ("Asynchronous Warpgroup Level Matrix
// Multiply-Accumulate": register fragments, shared memory matrix layouts, matrix descriptor).
// Only a GPU run can confirm that reading (tests/gpu_fwd.rs runs the same test kernel there).
//
// Asynchrony: an op is queued per thread and computed at the wgmma.wait_group that covers its
// commit group, reading A, D and B then, so a missing wait or an operand changed before it shows
// up as a wrong result (as cp.async's queue does for copies).
//
// Reading, for m64nNk16 (16-bit inputs, f32 accumulators), warp w of the warpgroup, g = lane / 4,
// t = lane % 4:
//   A (registers): warp w's rows 16 w .. 16 w + 15 in mma.m16n8k16's A layout (fragments.h)
//   D: d[4j + 0, 1] = D[16 w + g][8j + 2t, + 1], d[4j + 2, 3] = D[16 w + g + 8][8j + 2t, + 1]
//   B (shared memory, 128-byte swizzle, byte addresses before the swizzle, T = 8 elements):
//     K-major  (trans_b 0, B^T stored [n][k]): start + (n / 8) SBO + (n % 8) 128 + (k / 8) 16
//              + (k % 8) 2 (LBO unused)
//     MN-major (trans_b 1, B stored [k][n]):   start + (k / 8) SBO + (k % 8) 128 + (n / 64) LBO
//              + ((n / 8) % 8) 16 + (n % 8) 2
//   and the 128-byte swizzle acts on the absolute address: bits [4, 7) ^= bits [7, 10) (the
//   descriptor's base offset 0: atoms start on 1024-byte boundaries).
// Since a warp's 16 rows of D need only that warp's A and all of B, each warp computes its part
// at its own wait (a warp collective), not the warpgroup as one.
#include <cstdio>
#include <cstring>

#include "dtypes.cuh"
#include "emu/context.h"
#include "emu/fragments.h"

namespace segattn::emu {

namespace {

struct Desc {
  uintptr_t start;  // host address
  uint32_t lbo;     // bytes
  uint32_t sbo;     // bytes
};

Desc decode_desc(uint64_t desc, const char* where, Site site) {
  Context& c = context();
  const uint32_t swizzle = static_cast<uint32_t>(desc >> 62);
  const uint32_t base_offset = static_cast<uint32_t>((desc >> 49) & 7);
  if (swizzle != 1 || base_offset != 0) {
    c.fail(where, site, ": the emulator reads 128-byte swizzled descriptors with base offset 0 only (got mode ",
           swizzle, ", base offset ", base_offset, ")");
  }
  Desc d;
  d.start = reinterpret_cast<uintptr_t>(c.smem) + ((desc & 0x3FFF) << 4);
  d.lbo = static_cast<uint32_t>(((desc >> 16) & 0x3FFF) << 4);
  d.sbo = static_cast<uint32_t>(((desc >> 32) & 0x3FFF) << 4);
  return d;
}

// The 16-bit element B[k][n] of a k16 x n operand.
uint16_t b_element(const Desc& desc, bool trans_b, int k, int n, const char* where, Site site) {
  uintptr_t addr;
  if (!trans_b) {
    addr = desc.start + (n / 8) * desc.sbo + (n % 8) * 128 + (k / 8) * 16 + (k % 8) * 2;
  } else {
    addr = desc.start + (k / 8) * desc.sbo + (k % 8) * 128 + (n / 64) * desc.lbo + ((n / 8) % 8) * 16 + (n % 8) * 2;
  }
  addr ^= ((addr >> 7) & 7) << 4;
  Context& c = context();
  const uintptr_t lo = reinterpret_cast<uintptr_t>(c.smem);
  if (addr < lo || addr + 2 > lo + c.smem_size) {
    c.fail(where, site, ": B element (k ", k, ", n ", n, ") lies outside the block's dynamic shared memory");
  }
  const uint16_t writer = c.smem_writer[(addr - lo) / 16];
  if (writer != kNoWriter) {
    c.fail(where, site, ": B element (k ", k, ", n ", n, ") at shared byte ", addr - lo, " was landed by thread ",
           writer, "'s cp.async with no fence.proxy.async of that thread after it (wgmma reads through the async "
           "proxy: on a GPU it may see stale bytes)");
  }
  uint16_t v;
  std::memcpy(&v, reinterpret_cast<const void*>(addr), 2);
  return v;
}

// One queued op for the 32 lanes of a warp (`ops[l]` is lane l's copy of it).
void compute_one(const PendingWgmma* const* ops) {
  const PendingWgmma& op = *ops[0];
  const char* where = "wgmma.mma_async at ";
  const Desc desc = decode_desc(op.b_desc, where, op.site);
  const int n = op.n;
  uint16_t a16[16 * 16];
  gather_a_fragments([&](int l) { return ops[l]->a; }, a16);
  float A[16][16];
  for (int i = 0; i < 16 * 16; ++i) A[i / 16][i % 16] = decode16(op.type, a16[i]);
  static thread_local float B[16][128];
  for (int k = 0; k < 16; ++k) {
    for (int j = 0; j < n; ++j) B[k][j] = decode16(op.type, b_element(desc, op.trans_b, k, j, where, op.site));
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    float* d = ops[l]->d;
    for (int j = 0; j < n / 8; ++j) {
      for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e >> 1);
        const int col = 8 * j + 2 * t + (e & 1);
        // Products of 16-bit floats are exact in f32; the tensor core sums in another order.
        float acc = op.accumulate ? d[4 * j + e] : 0.0f;
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        d[4 * j + e] = acc;
      }
    }
  }
}

struct WaitIn {
  Fiber* fiber;
  uint32_t keep;
};

void wait_compute(Op op, uint32_t, const void* const* in, void* const*, Site site) {
  Context& c = context();
  const auto& first = *static_cast<const WaitIn*>(in[0]);
  // The ops each lane completes: its queue's prefix older than the `keep` newest groups.
  size_t count[32];
  for (int l = 0; l < 32; ++l) {
    const auto& w = *static_cast<const WaitIn*>(in[l]);
    if (w.keep != first.keep) c.fail(op_name(op), " at ", site, ": lanes wait for different group counts");
    const Fiber& f = *w.fiber;
    size_t k = 0;
    while (k < f.wgmma.size() && uint64_t{f.wgmma[k].group} + w.keep < f.wgmma_groups_committed) ++k;
    count[l] = k;
    if (k != count[0]) c.fail(op_name(op), " at ", site, ": lanes of a warp have different wgmma ops in flight");
  }
  for (size_t i = 0; i < count[0]; ++i) {
    const PendingWgmma* ops[32];
    for (int l = 0; l < 32; ++l) {
      ops[l] = &static_cast<const WaitIn*>(in[l])->fiber->wgmma[i];
      const PendingWgmma& a = *ops[l];
      const PendingWgmma& b = *ops[0];
      if (a.type != b.type || a.n != b.n || a.trans_b != b.trans_b || a.accumulate != b.accumulate ||
          a.b_desc != b.b_desc) {
        c.fail("wgmma.mma_async at ", a.site, ": the lanes of a warp issued different operations");
      }
    }
    compute_one(ops);
  }
  for (int l = 0; l < 32; ++l) {
    Fiber& f = *static_cast<const WaitIn*>(in[l])->fiber;
    f.wgmma.erase(f.wgmma.begin(), f.wgmma.begin() + static_cast<std::ptrdiff_t>(count[0]));
  }
}

}  // namespace

void wgmma_rs(MmaInput type, int n, bool trans_b, float* d, const uint32_t* a, uint64_t b_desc, bool accumulate,
              Site site) {
  Context& c = context();
  if (n != 64 && n != 128) c.fail("wgmma.mma_async at ", site, ": the emulator has N = 64 and 128, got ", n);
  Fiber& me = c.self();
  me.wgmma.push_back(PendingWgmma{type, n, trans_b, accumulate, d, a, b_desc, me.wgmma_groups_committed, site});
}

void wgmma_commit() { ++context().self().wgmma_groups_committed; }

void wgmma_wait(int n, Site site) {
  Context& c = context();
  WaitIn in{&c.self(), n < 0 ? 0u : static_cast<uint32_t>(n)};
  warp_collective(c, Op::WgmmaWait, ~0u, true, &in, nullptr, &wait_compute, site);
}

uint64_t smem_desc_address(const void* smem_ptr, Site site) {
  Context& c = context();
  const uintptr_t p = reinterpret_cast<uintptr_t>(smem_ptr);
  const uintptr_t lo = reinterpret_cast<uintptr_t>(c.smem);
  if (p < lo || p >= lo + c.smem_size || (p & 15) != 0) {
    c.fail("a wgmma matrix descriptor at ", site,
           ": the address is not a 16-byte aligned one in the block's dynamic shared memory");
  }
  return ((p - lo) >> 4) & 0x3FFF;
}

}  // namespace segattn::emu
