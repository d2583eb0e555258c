/* C API of the SIMT emulator, for Rust (and C). All settings are per OS thread: each thread that
 * launches emulated kernels has its own schedule, seed and last error. */
#ifndef SEGATTN_EMU_API_H
#define SEGATTN_EMU_API_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Orders in which the emulator runs the threads of a block between synchronization points.
 * FORWARD / REVERSE: thread-granular round robin in increasing / decreasing thread order.
 * LOW_FIRST / HIGH_FIRST: warp-granular: the lowest (highest) warp with a runnable thread runs
 *   until all its threads block (at __syncthreads or exit) before another warp runs.
 * RANDOM: a random runnable thread at every switch. RANDOM_WARP: warp-granular, warps in random
 *   order. Random schedules restart from the seed at every launch: a launch is replayable. */
typedef enum {
  SEGATTN_EMU_FORWARD = 0,
  SEGATTN_EMU_REVERSE = 1,
  SEGATTN_EMU_LOW_FIRST = 2,
  SEGATTN_EMU_HIGH_FIRST = 3,
  SEGATTN_EMU_RANDOM = 4,
  SEGATTN_EMU_RANDOM_WARP = 5
} segattn_emu_schedule;

/* Sets the schedule and seed of later launches made by the calling OS thread. The default comes
 * from the environment variables SEGATTN_EMU_SCHEDULE (forward, reverse, low-first, high-first,
 * random, random-warp; default forward) and SEGATTN_EMU_SEED (default 0), read when the thread
 * first uses the emulator. An invalid schedule makes later launches fail with an error. */
void segattn_emu_set_schedule(int schedule, uint64_t seed);

/* Message of the calling thread's last failed launch ("" if none). Valid until that thread's next
 * launch. */
const char* segattn_emu_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* SEGATTN_EMU_API_H */
