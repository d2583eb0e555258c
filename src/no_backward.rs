//! Outputs without a gradient, recorded so that a backward pass through them fails loudly.
//!
//! PINE's rotated attention, the per-segment mass and `segment_scores` have no backward. Applied
//! without one, their outputs would be constants in candle's graph: a loss through them would
//! silently train nothing through them. When an input tracks gradients, such an output is
//! instead handed to candle as the output of an op of those inputs whose backward is candle's
//! `BackwardNotSupported` error naming it. The forward then costs one copy of the output.
//! (`cpu_copy` / `cuda_copy` also give the recorded attention op its LSE output.)

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};

use crate::error::invalid_arg;

/// `value`, as an output of `inputs` whose backward is an error naming `what`, when one of
/// `inputs` tracks gradients; `value` unchanged otherwise.
pub(crate) fn mark(value: Tensor, inputs: [&Tensor; 3], what: &'static str) -> Result<Tensor> {
    if !inputs.iter().any(|t| t.track_op()) {
        return Ok(value);
    }
    let op: Arc<Box<dyn CustomOp3 + Send + Sync>> = Arc::new(Box::new(NoBackward { value, what }));
    inputs[0].apply_op3_arc(inputs[1], inputs[2], op)
}

/// The op of [`mark`]: its forward returns a copy of `value`; its backward is candle's default,
/// the `BackwardNotSupported` error for op `what`.
struct NoBackward {
    value: Tensor,
    what: &'static str,
}

impl CustomOp3 for NoBackward {
    fn name(&self) -> &'static str {
        self.what
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_copy(&self.value, self.what)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_copy(&self.value, self.what)
    }
}

/// `t` laid out from the start of its storage, contiguous (a copy when it is not), as the
/// storage an op returns is read.
fn packed(t: &Tensor) -> Result<Tensor> {
    let layout = t.layout();
    if layout.is_contiguous() && layout.start_offset() == 0 {
        Ok(t.clone())
    } else {
        // A new storage laid out from its start (`Tensor::copy` would keep the view's layout).
        t.force_contiguous()
    }
}

/// A copy of `t` (on the CPU) as a custom op's output: storage and shape. `what` names it in
/// the error for a tensor on another device.
pub(crate) fn cpu_copy(t: &Tensor, what: &str) -> Result<(CpuStorage, Shape)> {
    let t = packed(t)?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => Ok((s.try_clone(layout)?, t.shape().clone())),
        _ => invalid_arg!("internal error: {what} is not on the CPU"),
    }
}

/// A copy of `t` (on a GPU) as a custom op's output: storage and shape.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_copy(t: &Tensor, what: &str) -> Result<(candle_core::CudaStorage, Shape)> {
    let t = packed(t)?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => Ok((s.try_clone(layout)?, t.shape().clone())),
        _ => invalid_arg!("internal error: {what} is not on the GPU"),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    /// A marked view (an offset, a transposed layout) keeps its values: the op's output is a
    /// copy laid out from its storage's start, not the whole storage under the view's shape.
    #[test]
    fn marked_views_keep_their_values() -> candle_core::Result<()> {
        let base = Tensor::arange(0f32, 60.0, &Device::Cpu)?.reshape((3, 4, 5))?;
        let x = Var::from_tensor(&Tensor::ones((2, 2), candle_core::DType::F32, &Device::Cpu)?)?;
        let views = [
            base.narrow(0, 1, 2)?,                  // contiguous, from offset 20
            base.narrow(2, 1, 3)?,                  // strided rows
            base.transpose(1, 2)?.narrow(1, 2, 3)?, // transposed and offset
        ];
        for (i, view) in views.iter().enumerate() {
            let marked = super::mark(view.clone(), [x.as_tensor(); 3], "test")?;
            assert!(marked.track_op(), "view {i}: not recorded");
            assert_eq!(marked.to_vec3::<f32>()?, view.to_vec3::<f32>()?, "view {i}");
        }
        Ok(())
    }
}
