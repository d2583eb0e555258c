//! Device buffers kept per stream and reused by every launch on it, so that a decode step, whose
//! host work is its bottleneck, makes no allocation for them (with cudarc's event tracking an
//! allocation and its free are about seven driver calls):
//!
//! - the "done" counters of the last-block merges (split-K attention, PINE's decode importance):
//!   zeroed once; the kernels put each counter back to zero when the last block of its group
//!   arrives (`arrive_last`, kernels/last_block.cuh), so a launch needs no memset either;
//! - the scratch of the split launches' partials (split-K's O and LSE, the decode importance's
//!   maxima, totals and segment sums): every element written by the launch before it reads it,
//!   and dead when the launch ends.
//!
//! Launches on one stream run in order, so they may share a buffer; another stream gets its own.
//! "One stream" is a [`StreamKey`]: candle's `Device::new_cuda` queues on CUDA's per-thread
//! default stream, whose one handle is a different stream in each host thread, so those buffers
//! are kept per thread (and freed on the thread's own stream when it exits).
//! A buffer that is too small is replaced by a larger one; launches already holding the old one
//! keep it alive, and it is freed (stream-ordered, on its own stream) after them. Since only its
//! own stream ever touches a buffer, launches take its address as it was when allocated
//! ([`Kept::addr`]) instead of asking cudarc for it at each launch, which with event tracking
//! waits on and records events (two more driver calls a buffer and launch).

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{LocalKey, ThreadId};

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr};
use candle_core::Result;

use super::driver_err;

/// CUDA's per-thread default stream handle (`CU_STREAM_PER_THREAD`), the stream of candle's
/// `Device::new_cuda`.
const PER_THREAD_STREAM: usize = 0x2;

/// Which stream a launch is ordered on: the CUDA context and the stream handle, and for the
/// per-thread default stream the host thread too (the same handle in every thread and context,
/// each thread's own stream underneath).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct StreamKey {
    context: usize,
    stream: usize,
    thread: Option<ThreadId>,
}

impl StreamKey {
    pub(crate) fn of(stream: &CudaStream) -> Self {
        Self::on_this_thread(stream.context().cu_ctx() as usize, stream.cu_stream() as usize)
    }

    /// The key of stream `handle` of `context` for a launch from the calling thread.
    fn on_this_thread(context: usize, handle: usize) -> Self {
        Self {
            context,
            stream: handle,
            thread: (handle == PER_THREAD_STREAM).then(|| std::thread::current().id()),
        }
    }
}

/// Every input of one launch must come from one stream. candle accepts tensors of two candle
/// devices of one GPU (it compares locations), but a device made with its own stream
/// (`CudaDevice::new_with_stream`) is not ordered with another device's stream: a kernel on q's
/// stream could read another input before it is written, or after it is freed.
pub(crate) fn check_one_stream(first: (&str, &CudaStream), others: &[(&str, &CudaStream)]) -> Result<()> {
    let want = StreamKey::of(first.1);
    for (name, stream) in others {
        if StreamKey::of(stream) != want {
            crate::error::invalid_arg!(
                "{name}: expected the CUDA stream of {} (the same candle device), got another stream of GPU {}: \
                 candle devices made with their own stream are not ordered with each other (move it with \
                 `to_device({}.device())`)",
                first.0,
                stream.context().ordinal(),
                first.0
            );
        }
    }
    Ok(())
}

/// The fewest counters a buffer holds (a decode step's groups are far fewer).
const MIN_COUNTERS: usize = 4096;
/// The fewest f32 a scratch buffer holds (1 MiB: a Llama-3-8B decode step's partials are less).
const MIN_SCRATCH: usize = 256 * 1024;

/// A stream's buffer and its device address. Hold it until the launch that uses it is enqueued.
pub(crate) struct Kept<T> {
    buf: Arc<CudaSlice<T>>,
    /// The buffer's device address, for the launches on the stream it was made for.
    pub addr: u64,
}

// (Not derived: that would ask T: Clone; only the Arc is cloned.)
impl<T> Clone for Kept<T> {
    fn clone(&self) -> Self {
        Self {
            buf: self.buf.clone(),
            addr: self.addr,
        }
    }
}

/// Buffers of the streams other than the per-thread one, by [`StreamKey`] (each buffer holds its
/// stream, so a handle is never reused while its entry lives).
type Cache<T> = Mutex<HashMap<StreamKey, Kept<T>>>;

/// This thread's buffers on the per-thread default stream, by CUDA context: dropped with the
/// thread, so their free is queued on that thread's stream, after its launches.
type ThreadCache<T> = RefCell<ThreadBuffers<T>>;

/// A thread's buffers by CUDA context; dropped at thread exit, each with its own context current
/// ([`super::bind_for_free`]).
struct ThreadBuffers<T>(HashMap<usize, Kept<T>>);

impl<T> Drop for ThreadBuffers<T> {
    fn drop(&mut self) {
        for (_, kept) in self.0.drain() {
            super::bind_for_free(&kept.buf);
            drop(kept);
        }
    }
}

thread_local! {
    static THREAD_COUNTERS: ThreadCache<u32> = RefCell::new(ThreadBuffers(HashMap::new()));
    static THREAD_SCRATCH: ThreadCache<f32> = RefCell::new(ThreadBuffers(HashMap::new()));
}

fn counter_cache() -> &'static Cache<u32> {
    static CACHE: OnceLock<Cache<u32>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn scratch_cache() -> &'static Cache<f32> {
    static CACHE: OnceLock<Cache<f32>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The buffer of `stream` (from `shared`, or this thread's `local` for the per-thread stream) if
/// it holds at least `n` elements, else a new one of at least `min` and twice the old one's, made
/// by `alloc` (which names what it allocates in its errors).
fn kept<T: DeviceRepr>(
    (shared, local): (&Cache<T>, &'static LocalKey<ThreadCache<T>>),
    what: &str,
    stream: &Arc<CudaStream>,
    n: usize,
    min: usize,
    alloc: impl FnOnce(usize) -> Result<CudaSlice<T>>,
) -> Result<Kept<T>> {
    let key = StreamKey::of(stream);
    if key.thread.is_some() {
        return local
            .try_with(|cache| take_or_grow(&mut cache.borrow_mut().0, key.context, stream, n, min, alloc))
            .map_err(|_| candle_core::Error::Msg(format!("segattn: {what} asked for while its thread exits")))?;
    }
    let mut buffers = shared
        .lock()
        .map_err(|_| candle_core::Error::Msg(format!("segattn: {what} cache poisoned by a panic")))?;
    take_or_grow(&mut buffers, key, stream, n, min, alloc)
}

/// [`kept`]'s lookup in one cache.
fn take_or_grow<K: Hash + Eq, T: DeviceRepr>(
    buffers: &mut HashMap<K, Kept<T>>,
    key: K,
    stream: &Arc<CudaStream>,
    n: usize,
    min: usize,
    alloc: impl FnOnce(usize) -> Result<CudaSlice<T>>,
) -> Result<Kept<T>> {
    if let Some(kept) = buffers.get(&key).filter(|k| k.buf.len() >= n) {
        return Ok(kept.clone());
    }
    let len = n.max(min).max(buffers.get(&key).map_or(0, |k| 2 * k.buf.len()));
    let buf = alloc(len)?;
    // Once, after its allocation (ordered on this stream): the address every later launch uses.
    let addr = buf.device_ptr(stream).0;
    let kept = Kept {
        buf: Arc::new(buf),
        addr,
    };
    buffers.insert(key, kept.clone());
    Ok(kept)
}

/// At least `n` counters on `stream`, all zero when the launch that uses them starts (the launch
/// must leave them zero: every counter's group must arrive in full). Keep the returned buffer
/// until the launch is enqueued.
pub(crate) fn zeroed_counters(stream: &Arc<CudaStream>, n: usize) -> Result<Kept<u32>> {
    kept(
        (counter_cache(), &THREAD_COUNTERS),
        "split counter",
        stream,
        n,
        MIN_COUNTERS,
        |len| {
            stream
                .alloc_zeros::<u32>(len)
                .map_err(|e| driver_err(format!("allocating {len} split counters"), e))
        },
    )
}

/// At least `n` f32 of scratch on `stream`, of any content: the launch that uses them must write
/// every element it reads, and nothing may read them after it. Keep the returned buffer until the
/// launch is enqueued.
pub(crate) fn scratch(stream: &Arc<CudaStream>, n: usize) -> Result<Kept<f32>> {
    kept(
        (scratch_cache(), &THREAD_SCRATCH),
        "split scratch",
        stream,
        n,
        MIN_SCRATCH,
        |len| {
            // SAFETY: uninitialised device memory of a plain type; see the contract above.
            unsafe { stream.alloc::<f32>(len) }
                .map_err(|e| driver_err(format!("allocating {len} f32 of split scratch"), e))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_per_thread_stream_is_another_stream_in_each_thread() {
        let here = |handle| StreamKey::on_this_thread(7, handle);
        let there = |handle| {
            std::thread::spawn(move || StreamKey::on_this_thread(7, handle))
                .join()
                .unwrap()
        };
        assert_ne!(here(PER_THREAD_STREAM), there(PER_THREAD_STREAM));
        assert_eq!(here(PER_THREAD_STREAM), here(PER_THREAD_STREAM));
        // The legacy default stream (0, 1) and created streams are one stream for every thread.
        for handle in [0, 1, 0x7f00_1234] {
            assert_eq!(here(handle), there(handle));
        }
        // Another context: another stream, whatever the handle.
        assert_ne!(here(PER_THREAD_STREAM), StreamKey::on_this_thread(8, PER_THREAD_STREAM));
    }
}
