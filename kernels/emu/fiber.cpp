// Fiber stacks and the context switch (see fiber.h).
#include "emu/fiber.h"

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>

#if defined(SEGATTN_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if defined(SEGATTN_EMU_ASM_SWITCH)
// void segattn_emu_switch(void** save_sp, void* new_sp)
// Pushes the SysV callee-saved registers, stores the stack pointer in *save_sp, loads new_sp and
// pops the same registers of the other context; `ret` then continues where that context left off
// (or, for a fresh fiber, in the trampoline that fiber_prepare put there).
//
// segattn_emu_trampoline: first code of a fresh fiber: calls the entry in r13 with a 16-byte
// aligned stack (fiber_prepare sets r13 and the alignment). The entry never returns.
asm(R"(
  .text
  .p2align 4
  .globl segattn_emu_switch
  .hidden segattn_emu_switch
  .type segattn_emu_switch, @function
segattn_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size segattn_emu_switch, .-segattn_emu_switch

  .p2align 4
  .globl segattn_emu_trampoline
  .hidden segattn_emu_trampoline
  .type segattn_emu_trampoline, @function
segattn_emu_trampoline:
  callq *%r13
  ud2
  .size segattn_emu_trampoline, .-segattn_emu_trampoline
)");

extern "C" void segattn_emu_switch(void** save_sp, void* new_sp);
extern "C" void segattn_emu_trampoline();
#endif

namespace segattn::emu {

bool allocate_stack(FiberStack& stack, size_t usable_bytes) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t usable = (usable_bytes + page - 1) / page * page;
  const size_t total = usable + page;
  // MAP_NORESERVE: a fiber touches only the few pages it uses.
  void* m = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (m == MAP_FAILED) return false;
  if (mprotect(m, page, PROT_NONE) != 0) {
    munmap(m, total);
    return false;
  }
  stack.mapping = m;
  stack.mapping_size = total;
  stack.bottom = static_cast<char*>(m) + page;
  stack.size = usable;
  return true;
}

void free_stack(FiberStack& stack) {
  if (stack.mapping) munmap(stack.mapping, stack.mapping_size);
  stack = FiberStack{};
}

void fiber_init_thread_context(FiberContext& ctx) {
  ctx.stack_bottom = nullptr;
  ctx.stack_size = 0;
#if defined(SEGATTN_EMU_ASAN)
  pthread_attr_t attr;
  if (pthread_getattr_np(pthread_self(), &attr) == 0) {
    void* addr = nullptr;
    size_t size = 0;
    if (pthread_attr_getstack(&attr, &addr, &size) == 0) {
      ctx.stack_bottom = addr;
      ctx.stack_size = size;
    }
    pthread_attr_destroy(&attr);
  }
#endif
}

// A reused stack still carries the redzones of frames that never returned (finished or abandoned
// fibers switch away for good): clear them before the stack starts over.
static void forget_old_frames(const FiberStack& stack) {
#if defined(SEGATTN_EMU_ASAN)
  __asan_unpoison_memory_region(stack.bottom, stack.size);
#else
  (void)stack;
#endif
}

#if defined(SEGATTN_EMU_ASM_SWITCH)

void fiber_prepare(FiberContext& ctx, const FiberStack& stack, void (*entry)()) {
  // Initial frame, as segattn_emu_switch expects to pop it: r15 r14 r13 r12 rbx rbp, then the
  // return address. The return slot sits at 8 mod 16 so that the trampoline's `call` enters
  // `entry` with the ABI alignment (rsp = 8 mod 16 at function entry).
  forget_old_frames(stack);
  uintptr_t top = reinterpret_cast<uintptr_t>(stack.bottom) + stack.size;
  top &= ~uintptr_t{15};
  auto* frame = reinterpret_cast<uintptr_t*>(top - 24 - 6 * 8);
  frame[0] = 0;                                                      // r15
  frame[1] = 0;                                                      // r14
  frame[2] = reinterpret_cast<uintptr_t>(entry);                     // r13: called by trampoline
  frame[3] = 0;                                                      // r12
  frame[4] = 0;                                                      // rbx
  frame[5] = 0;                                                      // rbp: ends frame chains
  frame[6] = reinterpret_cast<uintptr_t>(&segattn_emu_trampoline);  // return address
  ctx.sp = frame;
  ctx.stack_bottom = stack.bottom;
  ctx.stack_size = stack.size;
}

static inline void raw_switch(FiberContext& from, FiberContext& to) {
  segattn_emu_switch(&from.sp, to.sp);
}

#else  // ucontext fallback

void fiber_prepare(FiberContext& ctx, const FiberStack& stack, void (*entry)()) {
  forget_old_frames(stack);
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = stack.bottom;
  ctx.uc.uc_stack.ss_size = stack.size;
  ctx.uc.uc_link = nullptr;
  makecontext(&ctx.uc, entry, 0);
  ctx.stack_bottom = stack.bottom;
  ctx.stack_size = stack.size;
}

static inline void raw_switch(FiberContext& from, FiberContext& to) { swapcontext(&from.uc, &to.uc); }

#endif

void fiber_switch(FiberContext& from, FiberContext& to, bool from_finished) {
#if defined(SEGATTN_EMU_ASAN)
  __sanitizer_start_switch_fiber(from_finished ? nullptr : &from.asan_fake_stack, to.stack_bottom,
                                 to.stack_size);
  raw_switch(from, to);
  // Back in `from`.
  __sanitizer_finish_switch_fiber(from.asan_fake_stack, nullptr, nullptr);
#else
  (void)from_finished;
  raw_switch(from, to);
#endif
}

void fiber_started() {
#if defined(SEGATTN_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
}

}  // namespace segattn::emu
