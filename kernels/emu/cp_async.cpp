// cp.async emulation: copies are queued per thread and applied only when a cp.async.wait_group
// covers their group, so a missing or too-weak wait leaves the destination stale (or NaN-poisoned)
// and the kernel's output wrong, instead of working by luck as a synchronous copy would.
#include <cstdio>
#include <cstring>

#include "emu/context.h"

namespace segattn::emu {

void cp_async_16(void* smem_dst, const void* gmem_src, bool pred, Site site) {
  Context& c = context();
  Fiber& me = c.self();
  const bool bad_dst = (reinterpret_cast<uintptr_t>(smem_dst) & 15) != 0 || smem_dst == nullptr;
  const bool bad_src = pred && (reinterpret_cast<uintptr_t>(gmem_src) & 15) != 0;
  if (bad_dst || bad_src) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "(dst %p, src %p)", smem_dst, gmem_src);
    c.fail("cp.async.cg 16 bytes at ", site, ": addresses must be 16-byte aligned ", buf);
  }
  // src-size 0 (pred false): nothing is read, the 16 bytes are zero-filled.
  me.copies.push_back(AsyncCopy{smem_dst, pred ? gmem_src : nullptr, me.groups_committed, 16});
}

void cp_async_4(void* smem_dst, const void* gmem_src, bool pred, Site site) {
  Context& c = context();
  Fiber& me = c.self();
  const bool bad_dst = (reinterpret_cast<uintptr_t>(smem_dst) & 3) != 0 || smem_dst == nullptr;
  const bool bad_src = pred && (reinterpret_cast<uintptr_t>(gmem_src) & 3) != 0;
  if (bad_dst || bad_src) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "(dst %p, src %p)", smem_dst, gmem_src);
    c.fail("cp.async.ca 4 bytes at ", site, ": addresses must be 4-byte aligned ", buf);
  }
  me.copies.push_back(AsyncCopy{smem_dst, pred ? gmem_src : nullptr, me.groups_committed, 4});
}

void cp_async_commit() { ++context().self().groups_committed; }

void cp_async_wait(int n) {
  Fiber& me = context().self();
  const uint32_t keep = n < 0 ? 0u : static_cast<uint32_t>(n);
  // Copies are queued in issue order, so their groups never decrease: complete the prefix whose
  // group is older than the `keep` most recent committed groups. Uncommitted copies stay.
  while (me.copies_head < me.copies.size()) {
    const AsyncCopy& cp = me.copies[me.copies_head];
    if (uint64_t{cp.group} + keep >= me.groups_committed) break;
    if (cp.src)
      std::memcpy(cp.dst, cp.src, cp.bytes);
    else
      std::memset(cp.dst, 0, cp.bytes);
    ++me.copies_head;
  }
  if (me.copies_head == me.copies.size()) {
    me.copies.clear();
    me.copies_head = 0;
  }
}

}  // namespace segattn::emu
