//! The CUDA path (`--features cuda`): the forward kernels of `kernels/` as the `cuda_fwd` of the
//! attention op, launched through cudarc (candle's re-export, so no second cudarc version) on
//! candle's stream.
//!
//! - `module`: the fatbin embedded at build time, loaded once per device context; kernels
//!   looked up and their dynamic shared memory raised above 48 KiB where needed.
//! - `launch`: device pointers and strides from the storages' layouts, mask metadata upload
//!   (O(N), one copy), output / LSE allocation, the checked launch.
//! - `pine`: PINE's device-side order and shifts, and the rotation inputs of the forward kernel.
//! - `device_copies`: device copies of immutable host arrays (RoPE tables, a PINE step's
//!   metadata), uploaded once per context.
//! - `backward`: the fused backward kernel (the gradients of attention, `crate::backward`).
//! - `per_stream`: the last-block merges' counters (zeroed once per stream and left zero by the
//!   kernels) and the split launches' scratch, kept per stream: no allocation per decode step.
//! - `hopper`: the Hopper-only (sm_90a, wgmma) fatbin, loaded on compute capability 9.0 GPUs: the
//!   wgmma forward kernels (plain attention's default there) and the probe that checks the
//!   emulator's reading of wgmma.
//! - `PreparedForward`: the same launch prepared once and repeated, for benchmarks (hidden).
//!
//! The public API is the CPU one: build the tensors and the mask on `Device::new_cuda(i)` and call
//! [`crate::SegmentAttention::forward`]. The CUDA kernels take bf16 / f16 and D = 64 / 128 / 256
//! (PINE's and the fused backward 64 / 128; the API pads other D: [`crate::head_dim`]); other
//! inputs are errors naming the argument (no silent fallback to the CPU).

mod backward;
mod bench;
mod device_copies;
mod hopper;
mod launch;
mod module;
mod per_stream;
mod pine;
mod rope_rows;
mod scores;

#[doc(hidden)]
pub use crate::backward::fused::set_fused_backward;
pub(crate) use backward::attention_backward;
pub use bench::PreparedForward;
pub(crate) use device_copies::DeviceCopies;
#[doc(hidden)]
pub use hopper::{wgmma_probe, WgmmaProbe};
pub(crate) use launch::{forward, DeviceMasks, ForwardExtras};
pub(crate) use pine::{pine_decode_scores, pine_shifts, DeviceTables};
pub(crate) use rope_rows::rope_rows;
pub(crate) use scores::segment_scores;

/// An error, before any work, when the GPU of `q` cannot run the forward kernel `variant` at
/// `q`'s dtype and head dim (its shared memory: PINE's D 256 kernel on a GPU of 99 KiB a block).
/// Nothing for tensors elsewhere.
pub(crate) fn check_fwd_kernel_runs(
    q: &candle_core::Tensor,
    variant: crate::kernel_params::FwdVariant,
) -> candle_core::Result<()> {
    let candle_core::Device::Cuda(dev) = q.device() else {
        return Ok(());
    };
    let kernels = module::kernels(dev.cuda_stream().context())?;
    kernels.fwd_or_err(q.dtype(), q.dim(candle_core::D::Minus1)?, variant)?;
    Ok(())
}

/// The errors cudarc recorded in the context instead of returning them (the access guards' event
/// records and waits as they drop, frees), as a candle error naming the kernel whose launch they
/// followed. Called after a launch, once its guards are dropped.
pub(crate) fn recorded_errors(
    stream: &candle_core::cuda_backend::cudarc::driver::CudaStream,
    kernel: &str,
) -> candle_core::Result<()> {
    stream
        .context()
        .check_err()
        .map_err(|e| driver_err(format!("after launching {kernel}"), e))
}

/// Makes the context of `buf` current before it is freed: cudarc queues the free on the buffer's
/// stream handle without binding its context, and the per-thread handle (`0x2`) names the
/// per-thread stream of whichever context the thread has current (another GPU's, in a thread that
/// drives two). A failure is recorded in the context, as cudarc's own drop does.
pub(crate) fn bind_for_free<T>(buf: &candle_core::cuda_backend::cudarc::driver::CudaSlice<T>) {
    let ctx = buf.context();
    ctx.record_err(ctx.bind_to_thread());
}

/// A driver error as a candle error that says what was being done.
pub(crate) fn driver_err(
    what: impl std::fmt::Display,
    e: candle_core::cuda_backend::cudarc::driver::DriverError,
) -> candle_core::Error {
    candle_core::Error::Msg(format!("segattn: CUDA error {what}: {e}")).bt()
}
