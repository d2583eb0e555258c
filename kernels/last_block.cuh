// The "last block to finish merges" pattern (split-K attention, PINE's decode importance): blocks
// publish partial results, count themselves done on a counter that is zero when the launch starts,
// and the one that sees the count complete merges everyone's partials in the same launch.
//
// Protocol: every thread writes its partials, then __threadfence(); a barrier; one thread calls
// arrive_last; the block that arrived last goes on after a __threadfence() and reads the partials
// with load_cg (L2, never a stale L1 line). The last arrival also puts the counter back to zero,
// so the launcher keeps one zeroed counter buffer per stream (zeroed once) instead of allocating
// and zeroing one per launch.
#ifndef SEGATTN_LAST_BLOCK_CUH
#define SEGATTN_LAST_BLOCK_CUH

#include "platform.cuh"

namespace segattn {

// A load that bypasses L1: the merging block reads what other blocks wrote.
__device__ __forceinline__ float load_cg(const float* p) {
#if defined(SEGATTN_EMULATE)
  return *p;
#else
  return __ldcg(p);
#endif
}

// Adds 1 to *counter and returns the old value (a plain add in the emulator, which runs one block
// at a time).
__device__ __forceinline__ uint32_t count_done(uint32_t* counter) {
#if defined(SEGATTN_EMULATE)
  return (*counter)++;
#else
  return atomicAdd(counter, 1u);
#endif
}

// Counts this block done among `total`; true for the last one, which also resets the counter to 0
// for the next launch: every other block has added its 1 already, and nothing else in this launch
// touches the counter again.
__device__ __forceinline__ bool arrive_last(uint32_t* counter, uint32_t total) {
  const bool last = count_done(counter) == total - 1u;
  if (last) *counter = 0u;
  return last;
}

}  // namespace segattn

#endif  // SEGATTN_LAST_BLOCK_CUH
