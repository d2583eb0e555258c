// Block barriers and warp collectives as rendezvous between fibers: each thread deposits its
// operands and waits; the last to arrive computes everyone's result and wakes the others.
#include "emu/context.h"

namespace segattn::emu {

const char* op_name(Op op) {
  switch (op) {
    case Op::SyncThreads: return "__syncthreads";
    case Op::SyncThreadsCount: return "__syncthreads_count";
    case Op::SyncThreadsAnd: return "__syncthreads_and";
    case Op::SyncThreadsOr: return "__syncthreads_or";
    case Op::SyncWarp: return "__syncwarp";
    case Op::Shfl: return "__shfl_sync";
    case Op::ShflUp: return "__shfl_up_sync";
    case Op::ShflDown: return "__shfl_down_sync";
    case Op::ShflXor: return "__shfl_xor_sync";
    case Op::Ballot: return "__ballot_sync/__any_sync/__all_sync";
    case Op::Mma: return "mma.sync.m16n8k16";
    case Op::Ldmatrix: return "ldmatrix";
    case Op::WgmmaWait: return "wgmma.wait_group";
  }
  return "?";
}


// ---- Block barrier --------------------------------------------------------------------------

int block_barrier(Op op, int pred, Site site) {
  Context& c = context();
  Fiber& me = c.self();
  BlockBarrier& b = c.barrier;
  const int vote = pred != 0;
  if (b.arrived == 0) {
    b.op = op;
    b.site = site;
    b.acc = op == Op::SyncThreadsAnd ? 1 : 0;
  } else if (b.op != op) {
    c.fail(op_name(op), " at ", site, " met threads waiting in ", op_name(b.op), " at ", b.site);
  }
  switch (op) {
    case Op::SyncThreadsCount: b.acc += vote; break;
    case Op::SyncThreadsAnd: b.acc &= vote; break;
    case Op::SyncThreadsOr: b.acc |= vote; break;
    default: break;
  }
  const uint32_t gen = b.gen;
  if (++b.arrived == c.nthreads) {
    // Everyone else waits here (nobody can have exited: it would never have arrived).
    b.result[gen & 1] = b.acc;
    b.arrived = 0;
    ++b.gen;
    for (uint32_t w = 0; w < c.nwarps; ++w) c.make_ready(w, c.warp_lanes[w]);
    const uint32_t mw = me.linear >> 5;
    c.ready[mw] &= ~(1u << (me.linear & 31));
    if (c.ready[mw] == 0) c.ready_warps &= ~(1u << mw);
    return b.result[gen & 1];
  }
  c.block_current(op, site, 0);
  return b.result[gen & 1];
}

// ---- Warp collectives -----------------------------------------------------------------------

void warp_collective(Op op, uint32_t mask, const void* in, void* out, WarpComputeFn fn, Site site) {
  warp_collective(context(), op, mask, false, in, out, fn, site);
}

void warp_collective(Context& c, Op op, uint32_t mask, bool whole_warp, const void* in, void* out,
                     WarpComputeFn fn, Site site) {
  Fiber& me = c.self();
  const uint32_t w = me.linear >> 5;
  const uint32_t lane = me.linear & 31;
  const uint32_t bit = 1u << lane;
  Warp& warp = c.warps[w];
  const uint32_t lanes = c.warp_lanes[w];
  if (whole_warp && lanes != ~0u)
    c.fail(op_name(op), " at ", site, " needs all 32 lanes of a warp, warp ", w,
           " of this block is partial");
  const uint32_t expected = mask & lanes;
  if (!(expected & bit))
    c.fail(op_name(op), " at ", site, ": the calling lane ", lane, " is not in the mask ", Hex{mask});

  // Find the pending collective of this mask, or open one. A lane waits until its collective
  // completes, so it can never be in a pending slot already.
  WarpSlot* slot = nullptr;
  for (uint32_t i = 0; i < warp.nslots; ++i) {
    if (warp.slots[i].expected == expected) {
      slot = &warp.slots[i];
      break;
    }
  }
  if (slot == nullptr) {
    if (warp.nslots == kMaxSlotsPerWarp)
      c.fail(op_name(op), " at ", site, ": more than ", kMaxSlotsPerWarp,
             " collectives with different masks pending in warp ", w);
    slot = &warp.slots[warp.nslots++];
    slot->expected = expected;
    slot->arrived = 0;
    slot->op = op;
    slot->fn = fn;
    slot->site = site;
  } else if (slot->op != op || slot->fn != fn) {
    c.fail(op_name(op), " at ", site, " met lanes of warp ", w, " waiting in a different ",
           op_name(slot->op), " at ", slot->site, " (mask ", Hex{mask}, ")");
  }
  slot->in[lane] = in;
  slot->out[lane] = out;
  slot->arrived |= bit;
  if (slot->arrived != expected) {
    c.block_current(op, site, mask);
    return;  // the last lane has written our result
  }
  slot->fn(op, expected, slot->in, slot->out, slot->site);
  // Close the slot (keep the array dense) and wake the other lanes.
  WarpSlot* last = &warp.slots[--warp.nslots];
  if (slot != last) *slot = *last;
  c.make_ready(w, expected & ~bit);
}

uint32_t active_mask() {
  Context& c = context();
  return c.warp_lanes[c.self().linear >> 5];
}

namespace {

struct ShuffleIn {
  uint64_t value;
  int lane_arg;
  int width;
};

// Poison for reads from lanes that do not take part (undefined on the GPU): NaN for floats.
constexpr uint64_t kPoison = ~uint64_t{0};

void shuffle_compute(Op op, uint32_t lanes, const void* const* in, void* const* out, Site site) {
  for (uint32_t l = 0; l < 32; ++l) {
    if (!(lanes >> l & 1)) continue;
    const auto& me = *static_cast<const ShuffleIn*>(in[l]);
    const int width = me.width;
    if (width < 1 || width > 32 || (width & (width - 1)) != 0)
      context().fail(op_name(op), " at ", site, ": width ", width,
                     " is not a power of two in [1, 32]");
    const int lane = static_cast<int>(l);
    const int first = lane & ~(width - 1);  // first lane of this lane's segment
    const int pos = lane & (width - 1);     // position inside the segment
    int src = lane;
    switch (op) {
      case Op::Shfl: src = first + (me.lane_arg & (width - 1)); break;
      case Op::ShflUp: src = pos - me.lane_arg >= 0 ? lane - me.lane_arg : lane; break;
      case Op::ShflDown: src = pos + me.lane_arg < width ? lane + me.lane_arg : lane; break;
      case Op::ShflXor: {
        // Lanes of earlier segments may be read, later ones not (CUDA's documented rule).
        const int j = lane ^ (me.lane_arg & 31);
        src = j <= (first | (width - 1)) ? j : lane;
        break;
      }
      default: break;
    }
    uint64_t v = kPoison;
    if (lanes >> src & 1) v = static_cast<const ShuffleIn*>(in[src])->value;
    *static_cast<uint64_t*>(out[l]) = v;
  }
}

void ballot_compute(Op, uint32_t lanes, const void* const* in, void* const* out, Site) {
  uint32_t votes = 0;
  for (uint32_t l = 0; l < 32; ++l)
    if ((lanes >> l & 1) && *static_cast<const int*>(in[l])) votes |= 1u << l;
  for (uint32_t l = 0; l < 32; ++l)
    if (lanes >> l & 1) *static_cast<uint32_t*>(out[l]) = votes;
}

void nothing_compute(Op, uint32_t, const void* const*, void* const*, Site) {}

}  // namespace

uint64_t warp_shuffle(Op op, uint32_t mask, uint64_t value, int lane_arg, int width, Site site) {
  ShuffleIn in{value, lane_arg, width};
  uint64_t out = 0;
  warp_collective(op, mask, &in, &out, &shuffle_compute, site);
  return out;
}

uint32_t warp_ballot(uint32_t mask, int pred, Site site) {
  const int vote = pred != 0;
  uint32_t out = 0;
  warp_collective(Op::Ballot, mask, &vote, &out, &ballot_compute, site);
  return out;
}

void warp_sync(uint32_t mask, Site site) {
  warp_collective(Op::SyncWarp, mask, nullptr, nullptr, &nothing_compute, site);
}

}  // namespace segattn::emu
