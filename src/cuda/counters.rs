//! The "done" counters of the last-block merges (split-K attention, PINE's decode importance), kept
//! per stream: zeroed once, then reused by every launch on that stream. The kernels put each
//! counter back to zero when the last block of its group arrives (`arrive_last`,
//! kernels/last_block.cuh), so a launch needs neither an allocation nor a memset for them (a
//! decode step made one of each per launch).
//!
//! Launches on one stream run in order, so they may share the counters; another stream gets its
//! own buffer. A buffer that is too small is replaced by a larger zeroed one; launches already
//! holding the old one keep it alive (it is zero at rest too), and it is freed after them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream};
use candle_core::Result;

use super::driver_err;

/// The fewest counters a buffer holds (a decode step's groups are far fewer).
const MIN_COUNTERS: usize = 4096;

/// Buffers by stream (`CUstream` address; each buffer holds its stream, so an address is never
/// reused while its entry lives).
type Cache = Mutex<HashMap<usize, Arc<CudaSlice<u32>>>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// At least `n` counters on `stream`, all zero when the launch that uses them starts (the launch
/// must leave them zero: every counter's group must arrive in full). Keep the returned buffer
/// until the launch is enqueued.
pub(crate) fn zeroed_counters(stream: &Arc<CudaStream>, n: usize) -> Result<Arc<CudaSlice<u32>>> {
    let key = stream.cu_stream() as usize;
    let mut buffers = cache()
        .lock()
        .map_err(|_| candle_core::Error::Msg("segattn: split counter cache poisoned by a panic".into()))?;
    if let Some(buf) = buffers.get(&key).filter(|b| b.len() >= n) {
        return Ok(buf.clone());
    }
    let len = n.max(MIN_COUNTERS).max(buffers.get(&key).map_or(0, |b| 2 * b.len()));
    let buf = Arc::new(
        stream
            .alloc_zeros::<u32>(len)
            .map_err(|e| driver_err(format!("allocating {len} split counters"), e))?,
    );
    buffers.insert(key, buf.clone());
    Ok(buf)
}
