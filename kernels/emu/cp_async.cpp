// cp.async emulation: copies are queued per thread and applied only when a cp.async.wait_group
// covers their group, so a missing or too-weak wait leaves the destination stale (or NaN-poisoned)
// and the kernel's output wrong, instead of working by luck as a synchronous copy would. Two
// copies of a thread in flight at once into overlapping bytes are an error: on a GPU they may
// land in either order (the queue here would apply them in issue order and hide the race).
#include <cstdio>
#include <cstring>

#include "emu/context.h"

namespace segattn::emu {

namespace {

// Queues one copy of `bytes` (16: cp.async.cg, 4: .ca) into the calling thread's list; both
// addresses must be aligned to it. pred false (src-size 0): nothing is read, the destination
// bytes are zero-filled.
void enqueue(void* smem_dst, const void* gmem_src, bool pred, uint32_t bytes, const char* what, Site site) {
  Context& c = context();
  Fiber& me = c.self();
  const uintptr_t align = bytes - 1;
  const bool bad_dst = (reinterpret_cast<uintptr_t>(smem_dst) & align) != 0 || smem_dst == nullptr;
  const bool bad_src = pred && (reinterpret_cast<uintptr_t>(gmem_src) & align) != 0;
  if (bad_dst || bad_src) {
    char buf[96];
    std::snprintf(buf, sizeof buf, ": addresses must be %u-byte aligned (dst %p, src %p)", bytes, smem_dst, gmem_src);
    c.fail(what, site, buf);
  }
  const uintptr_t lo = reinterpret_cast<uintptr_t>(smem_dst);
  for (size_t i = me.copies_head; i < me.copies.size(); ++i) {
    const uintptr_t other = reinterpret_cast<uintptr_t>(me.copies[i].dst);
    if (lo < other + me.copies[i].bytes && other < lo + bytes) {
      char buf[128];
      std::snprintf(buf, sizeof buf,
                    ": destination %p overlaps a copy still in flight (wait for it before copying there again)",
                    smem_dst);
      c.fail(what, site, buf);
    }
  }
  me.copies.push_back(AsyncCopy{smem_dst, pred ? gmem_src : nullptr, me.groups_committed, bytes});
}

}  // namespace

void cp_async_16(void* smem_dst, const void* gmem_src, bool pred, Site site) {
  enqueue(smem_dst, gmem_src, pred, 16, "cp.async.cg 16 bytes at ", site);
}

void cp_async_4(void* smem_dst, const void* gmem_src, bool pred, Site site) {
  enqueue(smem_dst, gmem_src, pred, 4, "cp.async.ca 4 bytes at ", site);
}

void cp_async_commit() { ++context().self().groups_committed; }

void fence_proxy_async() {
  Context& c = context();
  Fiber& me = c.self();
  for (const uint32_t chunk : me.unfenced) {
    if (c.smem_writer[chunk] == me.linear) c.smem_writer[chunk] = kNoWriter;
  }
  me.unfenced.clear();
}

void cp_async_wait(int n) {
  Context& c = context();
  Fiber& me = c.self();
  const uint32_t keep = n < 0 ? 0u : static_cast<uint32_t>(n);
  // Copies are queued in issue order, so their groups never decrease: complete the prefix whose
  // group is older than the `keep` most recent committed groups. Uncommitted copies stay.
  const uintptr_t lo = reinterpret_cast<uintptr_t>(c.smem);
  while (me.copies_head < me.copies.size()) {
    const AsyncCopy& cp = me.copies[me.copies_head];
    if (uint64_t{cp.group} + keep >= me.groups_committed) break;
    if (cp.src)
      std::memcpy(cp.dst, cp.src, cp.bytes);
    else
      std::memset(cp.dst, 0, cp.bytes);
    // Landed through the generic proxy: wgmma may not read it before this thread's proxy fence.
    const uintptr_t at = reinterpret_cast<uintptr_t>(cp.dst);
    if (at >= lo && at < lo + c.smem_size) {
      const uint32_t chunk = static_cast<uint32_t>((at - lo) / 16);
      c.smem_writer[chunk] = static_cast<uint16_t>(me.linear);
      me.unfenced.push_back(chunk);
    }
    ++me.copies_head;
  }
  if (me.copies_head == me.copies.size()) {
    me.copies.clear();
    me.copies_head = 0;
  }
}

}  // namespace segattn::emu
