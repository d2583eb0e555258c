//! Device copies of immutable host arrays, kept with the arrays: uploaded on first use in a CUDA
//! context, then shared by every launch that reads them there (a RoPE table, or what a PINE step
//! derives from its layouts, read by every layer of the step).
//!
//! A copy is queued on the stream of the launch that first needs it. A launch on another stream
//! (another host thread on candle's per-thread default stream, or another candle device of the
//! same GPU) first makes its stream wait for the upload's event: cudarc orders such uses only for
//! streams it created itself, and never across host threads that share the per-thread handle.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::{sys, CudaEvent, CudaSlice, CudaStream, DeviceRepr};
use candle_core::Result;

use super::driver_err;
use super::per_stream::StreamKey;

/// A buffer uploaded from the host on one stream, with what another stream needs to read it.
pub(crate) struct Uploaded<T> {
    buf: CudaSlice<T>,
    /// The stream the copy was queued on.
    on: StreamKey,
    /// Recorded on that stream right after the copy.
    done: CudaEvent,
    /// Whether a launch on another stream has read it: its free, queued on the upload's stream,
    /// is not ordered after that launch.
    foreign: AtomicBool,
}

impl<T: DeviceRepr> Uploaded<T> {
    /// Queues a copy of `data` on `stream`; `what` names it in errors.
    pub(crate) fn new(stream: &Arc<CudaStream>, data: &[T], what: &str) -> Result<Self> {
        let buf = stream
            .clone_htod(data)
            .map_err(|e| driver_err(format!("uploading {what} ({} elements)", data.len()), e))?;
        let done = stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(|e| driver_err(format!("recording the upload of {what}"), e))?;
        Ok(Self {
            buf,
            on: StreamKey::of(stream),
            done,
            foreign: AtomicBool::new(false),
        })
    }

    /// The buffer, readable by launches queued on `stream` from now on (a stream other than the
    /// upload's waits for it first).
    pub(crate) fn on_stream(&self, stream: &CudaStream) -> Result<&CudaSlice<T>> {
        if StreamKey::of(stream) != self.on {
            stream
                .wait(&self.done)
                .map_err(|e| driver_err("waiting for an upload made on another stream", e))?;
            self.foreign.store(true, Ordering::Relaxed);
        }
        Ok(&self.buf)
    }
}

/// Frees the buffer with its own context current ([`super::bind_for_free`]). The free is ordered
/// on the dropping thread's stream only: a buffer that launches on other streams read, or that
/// another thread than its uploader drops, first waits for the whole device (rare: a mask, table
/// or PINE layer shared by threads, or handed over, then dropped).
impl<T> Drop for Uploaded<T> {
    fn drop(&mut self) {
        if self.foreign.load(Ordering::Relaxed) || StreamKey::of(self.buf.stream()) != self.on {
            let ctx = self.buf.context();
            ctx.record_err(ctx.synchronize());
        }
        super::bind_for_free(&self.buf);
    }
}

/// The buffer itself: for the stream it was handed out for (by [`DeviceCopies::get_or_upload`] or
/// [`Uploaded::on_stream`], which made that stream wait where needed).
impl<T> std::ops::Deref for Uploaded<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.buf
    }
}

/// The device copies of one host array, keyed like the module cache by (device ordinal, CUDA
/// context). Clones share them; they are freed with the last clone. The array must not change
/// after its first upload (the owners are immutable).
pub(crate) struct DeviceCopies<T>(Arc<Mutex<Vec<DeviceCopy<T>>>>);

/// One copy: its CUDA context (device ordinal, CUcontext address) and the upload.
type DeviceCopy<T> = ((usize, usize), Arc<Uploaded<T>>);

impl<T> Clone for DeviceCopies<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> Default for DeviceCopies<T> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

impl<T> std::fmt::Debug for DeviceCopies<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map_or(0, |v| v.len());
        write!(f, "DeviceCopies({n} contexts)")
    }
}

impl<T: DeviceRepr> DeviceCopies<T> {
    /// The copy in the context of `stream`, uploaded now from `host()` if there is none yet, and
    /// readable by the launches queued on `stream` from now on; `what` names the array in errors.
    pub(crate) fn get_or_upload(
        &self,
        stream: &Arc<CudaStream>,
        what: &str,
        host: impl FnOnce() -> Vec<T>,
    ) -> Result<Arc<Uploaded<T>>> {
        let ctx = stream.context();
        let key = (ctx.ordinal(), ctx.cu_ctx() as usize);
        let mut copies = self.0.lock().map_err(|_| {
            candle_core::Error::Msg(format!("segattn: device copy cache of {what} poisoned by a panic"))
        })?;
        if let Some((_, copy)) = copies.iter().find(|(k, _)| *k == key) {
            copy.on_stream(stream)?;
            return Ok(copy.clone());
        }
        let copy = Arc::new(Uploaded::new(stream, &host(), what)?);
        copies.push((key, copy.clone()));
        Ok(copy)
    }
}
