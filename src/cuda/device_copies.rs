//! Device copies of immutable host arrays, kept with the arrays: uploaded on first use in a CUDA
//! context, then shared by every launch that reads them there (a RoPE table, or what a PINE step
//! derives from its layouts, read by every layer of the step).

use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use candle_core::Result;

use super::driver_err;

/// The device copies of one host array, keyed like the module cache by (device ordinal, CUDA
/// context). Clones share them; they are freed with the last clone. The array must not change
/// after its first upload (the owners are immutable).
pub(crate) struct DeviceCopies<T>(Arc<Mutex<Vec<DeviceCopy<T>>>>);

/// One copy: its CUDA context (device ordinal, CUcontext address) and the buffer.
type DeviceCopy<T> = ((usize, usize), Arc<CudaSlice<T>>);

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
    /// The copy in the context of `stream`, uploaded now from `host()` if there is none yet;
    /// `what` names the array in errors.
    pub(crate) fn get_or_upload(
        &self,
        stream: &Arc<CudaStream>,
        what: &str,
        host: impl FnOnce() -> Vec<T>,
    ) -> Result<Arc<CudaSlice<T>>> {
        let ctx = stream.context();
        let key = (ctx.ordinal(), ctx.cu_ctx() as usize);
        let mut copies = self.0.lock().map_err(|_| {
            candle_core::Error::Msg(format!("segattn: device copy cache of {what} poisoned by a panic"))
        })?;
        if let Some((_, copy)) = copies.iter().find(|(k, _)| *k == key) {
            return Ok(copy.clone());
        }
        let data = host();
        let copy = Arc::new(
            stream
                .clone_htod(&data)
                .map_err(|e| driver_err(format!("uploading {what} ({} elements)", data.len()), e))?,
        );
        copies.push((key, copy.clone()));
        Ok(copy)
    }
}
