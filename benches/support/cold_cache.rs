//! Evicting the CPU caches between timed calls. In a model, one layer's decode step runs after the
//! other layers' steps, which have replaced its KV cache in L3 with theirs: its cache comes from
//! DRAM. Steps timed back to back keep the cache in L3 (a 13.6 MB cache fits the build machine's
//! 32 MB), so the benches time decode both ways.

use std::cell::RefCell;
use std::hint::black_box;

/// Bytes written to evict: twice the 32 MiB L3 of the build machine.
const EVICT_BYTES: usize = 64 << 20;

pub struct Evictor(RefCell<Vec<u8>>);

impl Evictor {
    pub fn new() -> Self {
        Self(RefCell::new(vec![1; EVICT_BYTES]))
    }

    /// Writes one byte of every cache line of the buffer (untimed by the callers).
    pub fn evict(&self) {
        let mut buf = self.0.borrow_mut();
        for x in buf.iter_mut().step_by(64) {
            *x = x.wrapping_add(1);
        }
        black_box(&*buf);
    }
}
