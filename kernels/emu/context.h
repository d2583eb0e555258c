// Internal state of the emulator: one Context per OS thread that launches kernels. Only the
// emulator's .cpp files include this.
#ifndef SEGATTN_EMU_CONTEXT_H
#define SEGATTN_EMU_CONTEXT_H

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "emu/emu_api.h"
#include "emu/fiber.h"
#include "emu/runtime.h"

namespace segattn::emu {

constexpr size_t kStackBytes = 256 * 1024;
constexpr uint32_t kMaxThreads = 1024;
constexpr uint32_t kMaxWarps = kMaxThreads / 32;
// Collectives with different masks can be pending in one warp at once (e.g. the two halves of a
// warp shuffling separately in divergent branches).
constexpr uint32_t kMaxSlotsPerWarp = 8;
// The most dynamic shared memory a block can have (sm_90: 227 KiB).
constexpr size_t kMaxDynamicSmem = 227 * 1024;
// Bytes after a launch's dynamic shared memory filled with kSmemCanary before each block and
// checked after it (a write past the size the launch asked for fails the launch).
constexpr size_t kSmemRedZone = 256;
constexpr unsigned char kSmemCanary = 0xa5;
constexpr uint32_t kNoThread = 0xffffffffu;

enum class FiberState : uint8_t { Ready, Running, Waiting, Done };

// One cp.async in flight: applied when its group is waited for. src == nullptr: zero-fill.
struct AsyncCopy {
  void* dst;
  const void* src;  // nullptr: zero-fill
  uint32_t group;
  uint32_t bytes;   // 16 or 4
};

// One wgmma.mma_async of a thread, queued until a wgmma.wait_group covers its group.
struct PendingWgmma {
  MmaInput type;
  int n;
  bool trans_b;
  bool accumulate;
  float* d;
  const uint32_t* a;
  uint64_t b_desc;
  uint32_t group;
  Site site;
};

struct Fiber {
  FiberContext ctx;
  uint3 tid;
  uint32_t linear;
  FiberState state;
  // What the fiber waits in (valid while Waiting), for deadlock reports.
  Op wait_op;
  Site wait_site;
  uint32_t wait_mask;
  // cp.async queue: copies [copies_head, size) are in flight; groups [0, groups_committed) have
  // been committed, and copies tagged groups_committed are not committed yet.
  std::vector<AsyncCopy> copies;
  size_t copies_head;
  uint32_t groups_committed;
  // wgmma queue (wgmma.cpp): ops of groups [0, wgmma_groups_committed) committed, in issue order.
  std::vector<PendingWgmma> wgmma;
  uint32_t wgmma_groups_committed;
  // 16-byte chunks of shared memory this thread's cp.async landed since its last
  // fence.proxy.async (Context::smem_writer holds which of them are still its own).
  std::vector<uint32_t> unfenced;
};

// Context::smem_writer's value for a chunk with no landed copy awaiting a proxy fence.
constexpr uint16_t kNoWriter = 0xffffu;

// One pending warp collective: the lanes deposit pointers to their operands here.
struct WarpSlot {
  uint32_t expected;
  uint32_t arrived;
  Op op;
  WarpComputeFn fn;
  Site site;
  const void* in[32];
  void* out[32];
};

struct Warp {
  uint32_t nslots;
  WarpSlot slots[kMaxSlotsPerWarp];
};

struct BlockBarrier {
  uint32_t arrived;
  Op op;
  Site site;
  int acc;
  uint32_t gen;
  // Results of the last two generations: a waiter of generation g reads result[g & 1] after it
  // wakes, and generation g + 2 cannot complete before every thread has passed g + 1.
  int result[2];
};

class Rng {
 public:
  void seed(uint64_t s) { state_ = s ^ 0x9e3779b97f4a7c15ull; }
  uint64_t next() {  // splitmix64
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint32_t below(uint32_t n) { return static_cast<uint32_t>(((next() >> 32) * n) >> 32); }

 private:
  uint64_t state_ = 0;
};

// A 32-bit mask in failure messages.
struct Hex {
  uint32_t value;
};

void append(std::string& s, const char* text);
void append(std::string& s, Site site);
void append(std::string& s, Hex h);
template <class T, class = std::enable_if_t<std::is_integral_v<T>>>
void append(std::string& s, T v) {
  s += std::to_string(v);
}

class Context {
 public:
  Context();
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  // ---- Configuration (per OS thread) ----
  int schedule = SEGATTN_EMU_FORWARD;
  uint64_t seed = 0;
  std::string config_error;  // from a bad environment variable
  std::string last_error;

  // ---- Launch state ----
  bool in_launch = false;
  bool failed = false;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  uint32_t nthreads = 0;
  uint32_t nwarps = 0;
  Fiber* current = nullptr;
  uint32_t last_linear = kNoThread;  // the fiber that ran last, for round-robin schedules
  uint32_t done_count = 0;
  uint32_t warp_lanes[kMaxWarps] = {};  // lanes each warp has (the last one may be partial)
  uint32_t ready[kMaxWarps] = {};
  uint32_t ready_warps = 0;
  Warp warps[kMaxWarps];
  BlockBarrier barrier = {};
  Rng rng;
  unsigned char* smem = nullptr;
  size_t smem_size = 0;
  size_t smem_capacity = 0;
  // Per 16-byte chunk of the dynamic shared memory: the thread whose cp.async landed there and
  // has not yet issued fence.proxy.async since (kNoWriter: none). wgmma's B reads check it.
  std::vector<uint16_t> smem_writer;
  FiberContext main_ctx;
  // This OS thread's threadIdx, rewritten at every switch (cached: TLS lookups cost a call in PIC).
  uint3* thread_idx_slot = nullptr;
  std::vector<Fiber> fibers;
  std::vector<FiberStack> stacks;

  Fiber& self() {
    if (__builtin_expect(current == nullptr, 0)) outside_launch();
    return *current;
  }

  // The running fiber waits: runs another one, returns once woken.
  void block_current(Op op, Site site, uint32_t mask);
  // Marks `lanes` of warp `w` runnable.
  void make_ready(uint32_t w, uint32_t lanes) {
    ready[w] |= lanes;
    ready_warps |= 1u << w;
  }
  // Ends the running fiber for good.
  [[noreturn]] void finish_current();
  // Aborts the launch from inside a fiber with the message made of `parts` (C strings, Site,
  // integers, Hex), followed by the thread's identity. The fiber never returns, so the parts must
  // own no memory: owning temporaries in its frames would leak (LeakSanitizer reports them).
  template <class... Parts>
  [[noreturn]] void fail(const Parts&... parts) {
    std::string message;
    (append(message, parts), ...);
    fail_message(std::move(message));
  }
  // "thread (x,y,z) of block (x,y,z)".
  std::string describe(const Fiber& f) const;

  // Launch driver (scheduler.cpp).
  int launch(dim3 grid, dim3 block, size_t dynamic_smem_bytes, void (*body)(void*), void* arg);

 private:
  [[noreturn]] void fail_message(std::string&& message);
  Fiber* pick();
  void resume(Fiber& from, Fiber& to, bool from_finished);
  bool prepare(uint32_t threads, size_t smem_bytes);
  void run_block(dim3 block);
  std::string deadlock_report() const;
  [[noreturn]] static void outside_launch();
  int reject(const std::string& message);
};

// The calling OS thread's context, read at every intrinsic: initial-exec TLS (no __tls_get_addr
// call), inline fast path, created on first use.
extern __thread Context* tls_context __attribute__((tls_model("initial-exec")));
Context& create_context();
inline Context& context() {
  Context* c = tls_context;
  return __builtin_expect(c != nullptr, 1) ? *c : create_context();
}

// warp_collective (runtime.h) for the emulator's own instructions: `whole_warp` makes a partial
// warp an error (mma.sync and ldmatrix need all 32 lanes).
void warp_collective(Context& c, Op op, uint32_t mask, bool whole_warp, const void* in, void* out,
                     WarpComputeFn fn, Site site);

}  // namespace segattn::emu

#endif  // SEGATTN_EMU_CONTEXT_H
