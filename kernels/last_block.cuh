// The "last block to finish merges" pattern (split-K attention, PINE's decode importance): blocks
// publish partial results, count themselves done on a counter zeroed by the launcher, and the one
// that sees the count complete merges everyone's partials in the same launch.
//
// Protocol: every thread writes its partials, then __threadfence(); a barrier; one thread adds 1
// with count_done; the block that got count = total - 1 goes on after a __threadfence() and reads
// the partials with load_cg (L2, never a stale L1 line).
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

}  // namespace segattn

#endif  // SEGATTN_LAST_BLOCK_CUH
