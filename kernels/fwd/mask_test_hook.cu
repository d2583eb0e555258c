// Emulation-only test hook: classifies one tile with the classifier of kernels/mask.cuh (the code
// the forward and mass kernels run), so that tests can compare it with
// src/mask/tiles.rs on random metadata. Not a production file.
#if defined(SEGATTN_EMULATE)

#include "platform.cuh"
#include "mask.cuh"
#include "segattn_params.h"

namespace segattn {
namespace mask_test_hook {

constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
constexpr int kThreads = 128;
using Classifier = mask::TileClassifier<kBlockM, kBlockN, kThreads>;

constexpr int kOffQId = 0;
constexpr int kOffQEnd = kOffQId + 4 * kBlockM;
constexpr int kOffQStarts = kOffQEnd + 4 * kBlockM;
constexpr int kSmemBytes = kOffQStarts + 4 * Classifier::kWords;

}  // namespace mask_test_hook
}  // namespace segattn

// Classifies query rows [q0, q1) x keys [k0, k1) of batch row `b` under the mask of `p` (segments,
// rule, q_len and kv_len are read; tensors are not) and writes to `out_class` the class
// (SEGATTN_TILE_*) that the kernels' window gives it (TileClassifier::classify_alone with a budget
// of every piece pair: exact), to `out_may_be_visible` the conservative loop-bound verdict of
// TileClassifier::may_be_visible with `budget` piece pairs (0 or 1), and to `out_alone` the class
// of classify_alone with that budget (SEGATTN_TILE_*, or -1 past it). Needs 0 <= q1 - q0 <= 64 and
// 0 <= k1 - k0 <= 64 within the sequence. Returns 0, or nonzero with the message in
// segattn_emu_last_error().
extern "C" int segattn_emu_classify_tile(const SegattnFwdParams* p, int b, int q0, int q1, int k0, int k1,
                                         int budget, int* out_class, int* out_may_be_visible,
                                         int* out_alone) {
  using namespace segattn::mask_test_hook;
  namespace mask = segattn::mask;
  if (q1 - q0 > kBlockM || k1 - k0 > kBlockN || q0 < 0 || k0 < 0 || q1 > p->q_len || k1 > p->kv_len) {
    return segattn::emu::launch(dim3(1), dim3(1), 0, [] {
      segattn::emu::trap("segattn_emu_classify_tile: tile out of range or larger than 64 x 64",
                         SEGATTN_EMU_HERE);
    });
  }
  const dim3 grid(1);
  const dim3 block(kThreads);
  return segattn::emu::launch(grid, block, kSmemBytes, [&] {
    SEGATTN_DYNAMIC_SMEM(char, smem);
    Classifier c;
    c.q_id = reinterpret_cast<uint32_t*>(smem + kOffQId);
    c.q_end = reinterpret_cast<int*>(smem + kOffQEnd);
    c.q_starts = reinterpret_cast<uint32_t*>(smem + kOffQStarts);
    c.init_queries(mask::segments_of_batch(p->q_segments, b), q0, q1);
    const mask::Rule rule = mask::rule_of_batch(*p, b);
    const mask::Segments kv = mask::segments_of_batch(p->kv_segments, b);
    const int pos_offset = p->kv_len - p->q_len;
    if (threadIdx.x == 0) {
      *out_class = c.classify_alone(rule, kv, q0, k0, k1, pos_offset, kBlockM * kBlockN);
      *out_may_be_visible = c.may_be_visible(rule, kv, q0, k0, k1, pos_offset, budget) ? 1 : 0;
      *out_alone = c.classify_alone(rule, kv, q0, k0, k1, pos_offset, budget);
    }
  });
}

// mask::key_runs of the key ids kid[0..64) (a tile's, non-decreasing) with `valid` keys, run by one
// warp: out[4 lane + {0, 1, 2, 3}] = end0, id0, id1, at_most_two as each lane sees them (the
// result must be uniform). Needs 1 <= valid <= 64. Returns 0, or nonzero with the message in
// segattn_emu_last_error().
extern "C" int segattn_emu_key_runs(const uint32_t* kid, int valid, int64_t* out) {
  namespace mask = segattn::mask;
  using namespace segattn::mask_test_hook;
  if (valid < 1 || valid > kBlockN) {
    return segattn::emu::launch(dim3(1), dim3(1), 0, [] {
      segattn::emu::trap("segattn_emu_key_runs: valid must be in 1..=64", SEGATTN_EMU_HERE);
    });
  }
  return segattn::emu::launch(dim3(1), dim3(32), 4 * kBlockN, [&] {
    SEGATTN_DYNAMIC_SMEM(uint32_t, s_kid);
    const int lane = static_cast<int>(threadIdx.x);
    s_kid[lane] = kid[lane];
    s_kid[lane + 32] = kid[lane + 32];
    __syncwarp();
    const mask::KeyRuns runs = mask::key_runs<kBlockN>(s_kid, valid, lane);
    out[4 * lane] = runs.end0;
    out[4 * lane + 1] = runs.id0;
    out[4 * lane + 2] = runs.id1;
    out[4 * lane + 3] = runs.at_most_two ? 1 : 0;
  });
}

#endif  // SEGATTN_EMULATE
