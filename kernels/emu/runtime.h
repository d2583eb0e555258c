// Entry points of the emulator runtime that device code reaches (through the intrinsics in
// device_functions.h and the wrappers in ptx.cuh), and the launch function for kernel entry files.
//
// Every call here acts on the calling OS thread's own emulator state: Rust test threads may launch
// kernels concurrently.
#ifndef SEGATTN_EMU_RUNTIME_H
#define SEGATTN_EMU_RUNTIME_H

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "emu/cuda_types.h"

namespace segattn::emu {

// Where a thread waits, for deadlock reports. Filled in by default arguments at the call site.
struct Site {
  const char* file;
  int line;
};

#define SEGATTN_EMU_HERE ::segattn::emu::Site{__builtin_FILE(), __builtin_LINE()}

// What a thread waits in; names for diagnostics live in collectives.cpp.
enum class Op : uint8_t {
  SyncThreads,
  SyncThreadsCount,
  SyncThreadsAnd,
  SyncThreadsOr,
  SyncWarp,
  Shfl,
  ShflUp,
  ShflDown,
  ShflXor,
  Ballot,
  Mma,
  Ldmatrix,
  WgmmaWait,
};
const char* op_name(Op op);

// ---- Block and warp collectives --------------------------------------------------------------

// __syncthreads and its reducing variants: returns the count / and / or of `pred` over the block.
int block_barrier(Op op, int pred, Site site);

// The computation of a warp collective, run once by the last lane to arrive: `in[l]` / `out[l]`
// are what lane l passed; only lanes in `lanes` are valid. `site` is where the first lane arrived.
using WarpComputeFn = void (*)(Op op, uint32_t lanes, const void* const* in, void* const* out,
                               Site site);

// Deposits this lane's operands and waits until every lane of `mask` (restricted to the lanes the
// warp has) has arrived at a collective with the same `op`; the last arrival runs `fn` for the
// whole warp. Lanes that meet with a different op or `fn` fail the launch. `in` and `out` must
// stay valid until the call returns (they live on the lane's stack, suspended meanwhile).
void warp_collective(Op op, uint32_t mask, const void* in, void* out, WarpComputeFn fn, Site site);

// Shuffles and votes on any value of at most 8 bytes (bit patterns travel as uint64).
uint64_t warp_shuffle(Op op, uint32_t mask, uint64_t value, int lane_arg, int width, Site site);
uint32_t warp_ballot(uint32_t mask, int pred, Site site);
void warp_sync(uint32_t mask, Site site);
// The lanes of the caller's warp. Convergence is not modelled: this is __activemask() of converged
// code, whatever the schedule.
uint32_t active_mask();

// ---- Tensor core and memory instructions (ptx.cuh) -------------------------------------------

enum class MmaInput : uint8_t { BF16, F16 };
void mma_m16n8k16(MmaInput type, float d[4], const uint32_t a[4], const uint32_t b[2],
                  const float c[4], Site site);
// num = 1, 2 or 4 matrices.
void ldmatrix(int num, bool trans, uint32_t* r, const void* row_ptr, Site site);

// wgmma.mma_async.sync.aligned.m64nNk16.f32.{bf16,f16} with A in registers (n = 64 or 128): queued
// per thread and computed at the wgmma_wait that covers its group (warp by warp: a warp's 16 rows
// of D need only its own A fragments and B), so a missing wait, or A, D or B changed before it,
// gives a wrong result. `d` (n / 2 floats) and `a` (4 registers) must stay live until that wait.
// `b_desc`: the shared-memory matrix descriptor of B, its address field from smem_desc_address;
// 128-byte swizzle only.
void wgmma_rs(MmaInput type, int n, bool trans_b, float* d, const uint32_t* a, uint64_t b_desc, bool accumulate,
              Site site);
void wgmma_commit();
void wgmma_wait(int n, Site site);
// The descriptor's 14-bit address field of a shared-memory pointer: its offset in the block's
// dynamic shared memory, in 16-byte units.
uint64_t smem_desc_address(const void* smem_ptr, Site site);

// fence.proxy.async.shared::cta: the calling thread's landed cp.async copies into shared memory
// become visible to the async proxy (wgmma's B reads). The emulator models the one rule that the
// kernels depend on: a wgmma reading bytes that a cp.async of some thread landed, with no
// fence.proxy.async by that thread after the landing, fails the launch (on a GPU it may read stale
// data). Plain stores are not tracked.
void fence_proxy_async();

void cp_async_16(void* smem_dst, const void* gmem_src, bool pred, Site site);
void cp_async_4(void* smem_dst, const void* gmem_src, bool pred, Site site);
void cp_async_commit();
void cp_async_wait(int n);

// ---- Misc ------------------------------------------------------------------------------------

// The block's dynamic shared memory (poisoned with 0xFF bytes at the start of every block).
void* dynamic_smem();
size_t dynamic_smem_size();

// Aborts the launch with an error naming the thread and the site (device-side __trap()).
[[noreturn]] void trap(const char* what, Site site);

// ---- Launch ----------------------------------------------------------------------------------

// Runs `body(ctx)` as every thread of every block of the grid. Returns 0, or nonzero with the
// message available from segattn_emu_last_error() (deadlock, trap, bad configuration, ...).
int launch_erased(dim3 grid, dim3 block, size_t dynamic_smem_bytes, void (*body)(void*), void* ctx);

// The launch for kernel entry files, e.g.
//   return segattn::emu::launch(grid, block, smem, [&] { fwd_kernel<Traits>(*p); });
// The body runs once per CUDA thread, with threadIdx / blockIdx / blockDim / gridDim set.
template <class F>
int launch(dim3 grid, dim3 block, size_t dynamic_smem_bytes, F&& body) {
  using Body = std::remove_reference_t<F>;
  return launch_erased(
      grid, block, dynamic_smem_bytes, [](void* p) { (*static_cast<Body*>(p))(); },
      const_cast<void*>(static_cast<const void*>(&body)));
}

// A launch that fails with `message` (segattn_emu_last_error() then carries it): how an emulated
// entry point refuses its arguments.
inline int fail_launch(const char* message) {
  return launch(dim3(1), dim3(1), 0, [&] { trap(message, SEGATTN_EMU_HERE); });
}

}  // namespace segattn::emu

#endif  // SEGATTN_EMU_RUNTIME_H
