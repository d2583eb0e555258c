// Launch driver and scheduler: runs the blocks of a grid one after another on the calling OS
// thread, each block's threads as fibers, switching between them in the order the schedule picks
// whenever one waits; detects deadlocks; the C API.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <new>
#include <tuple>

#include "emu/context.h"

namespace segattn::emu {

__thread Context* tls_context __attribute__((tls_model("initial-exec"))) = nullptr;

namespace {

// Frees the context when the OS thread exits.
struct ContextOwner {
  Context* ctx = nullptr;
  ~ContextOwner() {
    delete ctx;
    tls_context = nullptr;
  }
};
thread_local ContextOwner tls_owner;

const char* const kScheduleNames[] = {"forward", "reverse", "low-first", "high-first",
                                      "random", "random-warp"};
constexpr int kScheduleCount = 6;

const char* schedule_name(int s) {
  return s >= 0 && s < kScheduleCount ? kScheduleNames[s] : "invalid";
}

void fiber_entry();

}  // namespace

Context& create_context() {
  auto* c = new Context();
  tls_owner.ctx = c;
  tls_context = c;
  return *c;
}

Context::Context() {
  fiber_init_thread_context(main_ctx);
  thread_idx_slot = &threadIdx;
  // Defaults from the environment, read once per OS thread.
  if (const char* s = std::getenv("SEGATTN_EMU_SCHEDULE"); s && *s) {
    int found = -1;
    for (int i = 0; i < kScheduleCount; ++i)
      if (std::strcmp(s, kScheduleNames[i]) == 0) found = i;
    if (found < 0) {
      config_error = std::string("SEGATTN_EMU_SCHEDULE=") + s +
                     " is not one of forward, reverse, low-first, high-first, random, random-warp";
    } else {
      schedule = found;
    }
  }
  if (const char* s = std::getenv("SEGATTN_EMU_SEED"); s && *s) {
    char* end = nullptr;
    seed = std::strtoull(s, &end, 0);
    if (*end != '\0') config_error = std::string("SEGATTN_EMU_SEED=") + s + " is not an integer";
  }
}

Context::~Context() {
  for (auto& s : stacks) free_stack(s);
  std::free(smem);
}

[[noreturn]] void Context::outside_launch() {
  std::fprintf(stderr, "segattn emulator: a device intrinsic was called outside a kernel launch\n");
  std::abort();
}

std::string Context::describe(const Fiber& f) const {
  char buf[96];
  std::snprintf(buf, sizeof buf, "thread (%u,%u,%u) of block (%u,%u,%u)", f.tid.x, f.tid.y, f.tid.z,
                blockIdx.x, blockIdx.y, blockIdx.z);
  return buf;
}

// ---- Picking the next fiber -----------------------------------------------------------------

namespace {

// Index of the k-th (0-based) set bit of m.
inline uint32_t nth_set_bit(uint32_t m, uint32_t k) {
  while (k--) m &= m - 1;
  return static_cast<uint32_t>(__builtin_ctz(m));
}

inline uint32_t lowest(uint32_t m) { return static_cast<uint32_t>(__builtin_ctz(m)); }
inline uint32_t highest(uint32_t m) { return 31u - static_cast<uint32_t>(__builtin_clz(m)); }
// Bits strictly above / below position p.
inline uint32_t above(uint32_t p) { return p >= 31 ? 0u : ~0u << (p + 1); }
inline uint32_t below(uint32_t p) { return (1u << p) - 1u; }

}  // namespace

Fiber* Context::pick() {
  if (ready_warps == 0) return nullptr;
  uint32_t w = 0;
  uint32_t lane = 0;
  const uint32_t last = last_linear;
  switch (schedule) {
    case SEGATTN_EMU_FORWARD: {  // next runnable thread after the last one, cyclically
      if (last != kNoThread) {
        const uint32_t lw = last >> 5;
        if (uint32_t m = ready[lw] & above(last & 31)) {
          w = lw;
          lane = lowest(m);
          break;
        }
        uint32_t wm = ready_warps & above(lw);
        w = lowest(wm ? wm : ready_warps);
      } else {
        w = lowest(ready_warps);
      }
      lane = lowest(ready[w]);
      break;
    }
    case SEGATTN_EMU_REVERSE: {  // previous runnable thread, cyclically
      if (last != kNoThread) {
        const uint32_t lw = last >> 5;
        if (uint32_t m = ready[lw] & below(last & 31)) {
          w = lw;
          lane = highest(m);
          break;
        }
        uint32_t wm = ready_warps & below(lw);
        w = highest(wm ? wm : ready_warps);
      } else {
        w = highest(ready_warps);
      }
      lane = highest(ready[w]);
      break;
    }
    case SEGATTN_EMU_LOW_FIRST:
      w = lowest(ready_warps);
      lane = lowest(ready[w]);
      break;
    case SEGATTN_EMU_HIGH_FIRST:
      w = highest(ready_warps);
      lane = lowest(ready[w]);
      break;
    case SEGATTN_EMU_RANDOM:
      w = nth_set_bit(ready_warps, rng.below(static_cast<uint32_t>(__builtin_popcount(ready_warps))));
      lane = nth_set_bit(ready[w], rng.below(static_cast<uint32_t>(__builtin_popcount(ready[w]))));
      break;
    default: {  // SEGATTN_EMU_RANDOM_WARP: stay in the last warp while it can run
      if (last != kNoThread && ready[last >> 5] != 0) {
        w = last >> 5;
      } else {
        w = nth_set_bit(ready_warps,
                        rng.below(static_cast<uint32_t>(__builtin_popcount(ready_warps))));
      }
      lane = lowest(ready[w]);
      break;
    }
  }
  ready[w] &= ~(1u << lane);
  if (ready[w] == 0) ready_warps &= ~(1u << w);
  return &fibers[w * 32 + lane];
}

void Context::resume(Fiber& from, Fiber& to, bool from_finished) {
  current = &to;
  to.state = FiberState::Running;
  last_linear = to.linear;
  *thread_idx_slot = to.tid;
  fiber_switch(from.ctx, to.ctx, from_finished);
}

void Context::block_current(Op op, Site site, uint32_t mask) {
  Fiber& me = *current;
  me.state = FiberState::Waiting;
  me.wait_op = op;
  me.wait_site = site;
  me.wait_mask = mask;
  Fiber* next = pick();
  if (next == nullptr) {
    // Nobody can run: back to the launcher, which reports the deadlock. Never resumed.
    current = nullptr;
    fiber_switch(me.ctx, main_ctx);
    __builtin_unreachable();
  }
  resume(me, *next, false);
  // Woken: the collective we waited in has completed.
}

void Context::finish_current() {
  Fiber& me = *current;
  me.state = FiberState::Done;
  ++done_count;
  if (Fiber* next = pick()) {
    resume(me, *next, true);
  } else {
    current = nullptr;
    fiber_switch(me.ctx, main_ctx, true);
  }
  __builtin_unreachable();
}

void append(std::string& s, const char* text) { s += text ? text : "?"; }
void append(std::string& s, Site site) {
  append(s, site.file);
  s += ':';
  s += std::to_string(site.line);
}
void append(std::string& s, Hex h) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", h.value);
  s += buf;
}

void Context::fail_message(std::string&& message) {
  Fiber& me = self();
  if (!failed) {
    failed = true;
    // Moves the buffer out of `message`: nothing stays owned by the frames we abandon.
    last_error = std::move(message) + " (" + describe(me) + ", schedule " +
                 schedule_name(schedule) + ", seed " + std::to_string(seed) + ")";
  }
  std::string().swap(message);
  current = nullptr;
  fiber_switch(me.ctx, main_ctx, true);
  __builtin_unreachable();
}

namespace {

void fiber_entry() {
  fiber_started();
  Context& c = context();
  // A plain buffer: this frame is abandoned if the launch fails.
  char error[256] = "";
  try {
    c.body(c.body_arg);
  } catch (const std::exception& e) {
    std::snprintf(error, sizeof error, "a C++ exception escaped the kernel: %s", e.what());
  } catch (...) {
    std::snprintf(error, sizeof error, "a C++ exception escaped the kernel");
  }
  // Fail outside the handler: a fiber that never comes back must not stay inside a catch block.
  if (error[0] != '\0') c.fail(error);
  c.finish_current();
}

}  // namespace

// ---- Launch ---------------------------------------------------------------------------------

int Context::reject(const std::string& message) {
  last_error = message;
  return 1;
}

bool Context::prepare(uint32_t threads, size_t smem_bytes) {
  try {
    if (fibers.size() < threads) fibers.resize(threads);
    while (stacks.size() < threads) {
      FiberStack s;
      if (!allocate_stack(s, kStackBytes)) return false;
      stacks.push_back(s);
    }
    // Keep a valid pointer even for 0 bytes; 128-byte alignment covers every vector type. A red
    // zone follows the launch's bytes (run_block checks that no thread wrote into it).
    const size_t want = std::max<size_t>((smem_bytes + 127) / 128 * 128, 128) + kSmemRedZone;
    if (want > smem_capacity) {
      void* p = std::aligned_alloc(128, want);
      if (!p) return false;
      std::free(smem);
      smem = static_cast<unsigned char*>(p);
      smem_capacity = want;
    }
  } catch (const std::bad_alloc&) {
    return false;
  }
  smem_size = smem_bytes;
  return true;
}

void Context::run_block(dim3 block) {
  std::memset(smem, 0xff, smem_size);  // NaN poison: reads before writes show up
  std::memset(smem + smem_size, kSmemCanary, kSmemRedZone);
  smem_writer.assign((smem_size + 15) / 16, kNoWriter);
  for (uint32_t i = 0; i < nthreads; ++i) {
    Fiber& f = fibers[i];
    f.tid = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
    f.linear = i;
    f.state = FiberState::Ready;
    f.copies.clear();
    f.copies_head = 0;
    f.groups_committed = 0;
    f.wgmma.clear();
    f.wgmma_groups_committed = 0;
    f.unfenced.clear();
    fiber_prepare(f.ctx, stacks[i], &fiber_entry);
  }
  ready_warps = 0;
  for (uint32_t w = 0; w < kMaxWarps; ++w) {
    uint32_t lanes = 0;
    if (w < nwarps) {
      const uint32_t n = std::min<uint32_t>(32, nthreads - w * 32);
      lanes = n == 32 ? ~0u : (1u << n) - 1u;
      ready_warps |= 1u << w;
    }
    warp_lanes[w] = lanes;
    warps[w].nslots = 0;
    ready[w] = lanes;
  }
  barrier.arrived = 0;
  barrier.gen = 0;
  done_count = 0;
  last_linear = kNoThread;

  Fiber* first = pick();
  current = first;
  first->state = FiberState::Running;
  last_linear = first->linear;
  threadIdx = first->tid;
  fiber_switch(main_ctx, first->ctx);
  // Back when every fiber has finished, nobody can run, or the launch failed.
  current = nullptr;
  if (!failed && done_count < nthreads) {
    failed = true;
    last_error = deadlock_report();
  }
  // A write past the dynamic shared memory the launch asked for (on a GPU: another block's
  // memory, or a fault) shows in the red zone. Reads there go unseen.
  for (size_t i = 0; i < kSmemRedZone && !failed; ++i) {
    if (smem[smem_size + i] != kSmemCanary) {
      failed = true;
      last_error = "a thread of block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
                   std::to_string(blockIdx.z) + ") wrote past the launch's " + std::to_string(smem_size) +
                   " bytes of dynamic shared memory (at byte " + std::to_string(smem_size + i) + ")";
    }
  }
}

int Context::launch(dim3 grid, dim3 block, size_t smem_bytes, void (*fn)(void*), void* arg) {
  last_error.clear();
  if (in_launch) return reject("kernel launch from device code (dynamic parallelism) is not emulated");
  if (!config_error.empty()) return reject(config_error);
  if (schedule < 0 || schedule >= kScheduleCount)
    return reject("invalid emulator schedule " + std::to_string(schedule));
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  char dims[160];
  std::snprintf(dims, sizeof dims, "grid (%u,%u,%u), block (%u,%u,%u), %zu bytes dynamic smem",
                grid.x, grid.y, grid.z, block.x, block.y, block.z, smem_bytes);
  if (threads == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0)
    return reject(std::string("invalid launch configuration (empty dimension): ") + dims);
  if (threads > kMaxThreads || block.x > 1024 || block.y > 1024 || block.z > 64)
    return reject(std::string("invalid launch configuration (more than 1024 threads per block, or "
                              "block.x/y > 1024, block.z > 64): ") + dims);
  if (grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    return reject(std::string("invalid launch configuration (grid too large): ") + dims);
  if (smem_bytes > kMaxDynamicSmem)
    return reject(std::string("invalid launch configuration (more than 227 KiB of dynamic shared "
                              "memory): ") + dims);
  nthreads = static_cast<uint32_t>(threads);
  nwarps = (nthreads + 31) / 32;
  if (!prepare(nthreads, smem_bytes)) return reject("out of memory for fiber stacks or shared memory");

  body = fn;
  body_arg = arg;
  failed = false;
  in_launch = true;
  rng.seed(seed);
  const uint3 saved_thread = threadIdx, saved_block = blockIdx;
  const dim3 saved_block_dim = blockDim, saved_grid_dim = gridDim;
  gridDim = grid;
  blockDim = block;
  for (uint32_t z = 0; z < grid.z && !failed; ++z)
    for (uint32_t y = 0; y < grid.y && !failed; ++y)
      for (uint32_t x = 0; x < grid.x && !failed; ++x) {
        blockIdx = uint3{x, y, z};
        run_block(block);
      }
  if (failed) last_error += std::string(" [") + dims + "]";
  threadIdx = saved_thread;
  blockIdx = saved_block;
  blockDim = saved_block_dim;
  gridDim = saved_grid_dim;
  in_launch = false;
  return failed ? 1 : 0;
}

// ---- Deadlock report ------------------------------------------------------------------------

namespace {

// "0-31, 40, 42-50"
std::string ranges(const std::vector<uint32_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!s.empty()) s += ", ";
    s += std::to_string(ids[i]);
    if (j > i) s += "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return s;
}

std::string hex(uint32_t v) {
  std::string s;
  append(s, Hex{v});
  return s;
}

}  // namespace

std::string Context::deadlock_report() const {
  std::string r = "deadlock in block (" + std::to_string(blockIdx.x) + "," +
                  std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) +
                  "): no thread can proceed (schedule " + schedule_name(schedule) + ", seed " +
                  std::to_string(seed) + ")";
  // Group the stuck threads by where they wait; threads are linear ids within the block.
  using Key = std::tuple<int, std::string, int, uint32_t>;
  std::map<Key, std::vector<uint32_t>> waiting;
  std::vector<uint32_t> exited;
  for (uint32_t i = 0; i < nthreads; ++i) {
    const Fiber& f = fibers[i];
    if (f.state == FiberState::Done) {
      exited.push_back(i);
    } else {
      const bool warp_op = f.wait_op >= Op::SyncWarp;
      waiting[Key{static_cast<int>(f.wait_op), f.wait_site.file ? f.wait_site.file : "?",
                  f.wait_site.line, warp_op ? f.wait_mask : 0}]
          .push_back(i);
    }
  }
  size_t lines = 0;
  for (const auto& [key, ids] : waiting) {
    if (++lines > 12) {
      r += "\n  ... and more";
      break;
    }
    const Op op = static_cast<Op>(std::get<0>(key));
    r += "\n  threads " + ranges(ids) + ": wait in " + op_name(op) + " at " + std::get<1>(key) +
         ":" + std::to_string(std::get<2>(key));
    if (op >= Op::SyncWarp && op != Op::Mma && op != Op::Ldmatrix && op != Op::WgmmaWait)
      r += " (mask " + hex(std::get<3>(key)) + ")";
  }
  if (barrier.arrived > 0)
    r += "\n  block barrier: " + std::to_string(barrier.arrived) + " of " +
         std::to_string(nthreads) + " threads arrived";
  for (uint32_t w = 0; w < nwarps; ++w) {
    for (uint32_t s = 0; s < warps[w].nslots; ++s) {
      const WarpSlot& slot = warps[w].slots[s];
      std::vector<uint32_t> missing;
      for (uint32_t l = 0; l < 32; ++l)
        if ((slot.expected & ~slot.arrived) >> l & 1) missing.push_back(l);
      r += "\n  warp " + std::to_string(w) + ": " + op_name(slot.op) + " still waits for lanes " +
           ranges(missing);
    }
  }
  if (!exited.empty()) r += "\n  threads " + ranges(exited) + ": exited";
  return r;
}

int launch_erased(dim3 grid, dim3 block, size_t dynamic_smem_bytes, void (*body)(void*), void* ctx) {
  return context().launch(grid, block, dynamic_smem_bytes, body, ctx);
}

void* dynamic_smem() { return context().smem; }
size_t dynamic_smem_size() { return context().smem_size; }

void trap(const char* what, Site site) { context().fail(what, " at ", site); }

}  // namespace segattn::emu

// ---- C API ------------------------------------------------------------------------------------

extern "C" void segattn_emu_set_schedule(int schedule, uint64_t seed) {
  auto& c = segattn::emu::context();
  c.schedule = schedule;
  c.seed = seed;
  c.config_error.clear();
}

extern "C" const char* segattn_emu_last_error(void) {
  return segattn::emu::context().last_error.c_str();
}
