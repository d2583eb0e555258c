// Fibers for the SIMT emulator: one stack and one saved context per emulated CUDA thread.
//
// x86-64 uses a hand-written context switch (fiber.cpp): it saves only the callee-saved
// registers, so a switch costs a few nanoseconds, where ucontext's swapcontext makes a system
// call (sigprocmask) each time. Other architectures fall back to ucontext.
//
// The floating-point environment (MXCSR, x87 control word) is not switched: all fibers of an OS
// thread share it, and kernels do not change it.
#ifndef SEGATTN_EMU_FIBER_H
#define SEGATTN_EMU_FIBER_H

#include <cstddef>

#if defined(__x86_64__) && !defined(SEGATTN_EMU_FORCE_UCONTEXT)
#define SEGATTN_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define SEGATTN_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SEGATTN_EMU_ASAN 1
#endif
#endif

namespace segattn::emu {

// A stack from mmap with a PROT_NONE guard page below it: an overflow faults at once instead of
// silently corrupting the neighbouring fiber.
struct FiberStack {
  void* mapping = nullptr;  // guard page + usable stack
  size_t mapping_size = 0;
  void* bottom = nullptr;  // lowest usable address
  size_t size = 0;         // usable bytes
};

// Returns false when the kernel refuses the mapping.
bool allocate_stack(FiberStack& stack, size_t usable_bytes);
void free_stack(FiberStack& stack);

// Where a suspended fiber (or the launching OS thread) resumes.
struct FiberContext {
#if defined(SEGATTN_EMU_ASM_SWITCH)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  // Stack bounds, for AddressSanitizer's fiber annotations.
  const void* stack_bottom = nullptr;
  size_t stack_size = 0;
#if defined(SEGATTN_EMU_ASAN)
  void* asan_fake_stack = nullptr;
#endif
};

// Makes `ctx` start `entry()` on `stack` when first switched to. `entry` must never return: a
// finished fiber switches away for good.
void fiber_prepare(FiberContext& ctx, const FiberStack& stack, void (*entry)());

// Fills in the bounds of the calling OS thread's own stack (needed only under ASan).
void fiber_init_thread_context(FiberContext& ctx);

// Saves the running context into `from` and resumes `to`. `from_finished` says that `from` will
// never be resumed (lets ASan drop its fake stack).
void fiber_switch(FiberContext& from, FiberContext& to, bool from_finished = false);

// Must be the first call of a fiber's entry function (ASan bookkeeping; no-op otherwise).
void fiber_started();

}  // namespace segattn::emu

#endif  // SEGATTN_EMU_FIBER_H
