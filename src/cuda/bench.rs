//! A forward call prepared once and launched many times (benchmarks, profiling).

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, LaunchConfig};
use candle_core::{DType, Device, Result, Storage, Tensor};
use half::{bf16, f16};

use super::driver_err;
use super::launch::{base_params, check_supported, launch, launch_config, loadable, strides_of, MaskBuffer};
use super::module::{kernels, Kernels};
use crate::error::invalid_arg;
use crate::kernel_params::FwdVariant;
use crate::mask::SegmentMask;
use crate::params::SegattnFwdParams;
use crate::validate::{default_scale, AttentionShape};

/// The forward kernel with its parameters built once: inputs checked and their device addresses
/// taken, the mask metadata uploaded, the output (and LSE) allocated. [`PreparedForward::launch`]
/// then only enqueues the kernel on the device's stream, so that a benchmark times the kernel
/// alone; the mask preparation that [`crate::SegmentAttention::forward`] does on every call is
/// timed separately by calling that.
///
/// Inputs must be CUDA tensors that the kernel can read in place (16-byte aligned, strides
/// multiples of 8 elements, e.g. contiguous), bf16 or f16, D = 64 or 128.
pub struct PreparedForward {
    _inputs: [Tensor; 3],
    _mask: MaskBuffer,
    _out: CudaSlice<u16>,
    _lse: Option<CudaSlice<f32>>,
    params: SegattnFwdParams,
    kernels: Arc<Kernels>,
    dtype: DType,
    head_dim: usize,
    /// The forward kernel chosen for the shape (`FwdVariant::plain`).
    variant: FwdVariant,
    cfg: LaunchConfig,
    stream: Arc<CudaStream>,
}

/// The device address of a CUDA tensor's first element.
fn address(name: &str, t: &Tensor, stream: &Arc<CudaStream>) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        invalid_arg!("{name}: expected a CUDA tensor, got device {:?}", t.device().location());
    };
    let base = match t.dtype() {
        DType::BF16 => s.as_cuda_slice::<bf16>()?.device_ptr(stream).0,
        _ => s.as_cuda_slice::<f16>()?.device_ptr(stream).0,
    };
    let ptr = base + 2 * layout.start_offset() as u64;
    if !loadable(ptr, &strides_of(layout)) {
        invalid_arg!(
            "{name}: not readable in place by the kernel (16-byte aligned start, strides multiples of 8 \
             elements), strides {:?}: pass a packed copy (Tensor::force_contiguous)",
            layout.stride()
        );
    }
    Ok(ptr)
}

impl PreparedForward {
    /// Prepares `attention(q, k, v)` under `mask` (all on one CUDA device); `scale` defaults to
    /// `1/sqrt(D)`.
    pub fn new(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &SegmentMask,
        scale: Option<f64>,
        want_lse: bool,
    ) -> Result<Self> {
        let shape = AttentionShape::of(q, k, v)?;
        check_supported(q.dtype(), shape.head_dim)?;
        let Device::Cuda(dev) = q.device() else {
            invalid_arg!("q: expected a CUDA tensor, got device {:?}", q.device().location());
        };
        let stream = dev.cuda_stream();
        let scale = scale.unwrap_or_else(|| default_scale(shape.head_dim));
        let host = mask.host_metadata(shape.batch, shape.q_len, shape.kv_len)?;
        let kernels = kernels(stream.context())?;
        let variant = kernels.plain_variant(q.dtype(), &shape, 1, host.summary())?;
        let Some(kernel) = kernels.fwd(q.dtype(), shape.head_dim, variant) else {
            invalid_arg!(
                "internal error: no CUDA kernel for {:?} D = {}",
                q.dtype(),
                shape.head_dim
            );
        };
        let cfg = launch_config(&shape, kernel, 1)?;
        let mut params = base_params(
            &shape,
            q.dtype(),
            scale as f32,
            [strides_of(q.layout()), strides_of(k.layout()), strides_of(v.layout())],
        )?;
        params.block_rows = kernel.block_rows as i32;
        params.block_keys = kernel.block_keys;
        params.q = address("q", q, &stream)? as *const std::ffi::c_void;
        params.k = address("k", k, &stream)? as *const std::ffi::c_void;
        params.v = address("v", v, &stream)? as *const std::ffi::c_void;
        let mask_buf = MaskBuffer::upload(&stream, &host)?;
        // (The buffer is kept with the prepared call, whose launches are on this stream.)
        mask_buf.fill(mask_buf.device_ptr(&stream).0, &mut params);
        let n_out = (shape.batch * shape.q_len * shape.num_heads * shape.head_dim).max(1);
        let out = stream
            .alloc_zeros::<u16>(n_out)
            .map_err(|e| driver_err("allocating the output", e))?;
        params.o = out.device_ptr(&stream).0 as *mut std::ffi::c_void;
        let lse = if want_lse {
            let n = (shape.batch * shape.num_heads * shape.q_len).max(1);
            let lse = stream
                .alloc_zeros::<f32>(n)
                .map_err(|e| driver_err("allocating the LSE", e))?;
            params.lse = lse.device_ptr(&stream).0 as *mut f32;
            Some(lse)
        } else {
            None
        };
        Ok(Self {
            _inputs: [q.clone(), k.clone(), v.clone()],
            _mask: mask_buf,
            _out: out,
            _lse: lse,
            params,
            kernels,
            dtype: q.dtype(),
            head_dim: shape.head_dim,
            variant,
            cfg,
            stream,
        })
    }

    /// Enqueues the kernel once on the device's stream (asynchronous; checked).
    pub fn launch(&self) -> Result<()> {
        let Some(kernel) = self.kernels.fwd(self.dtype, self.head_dim, self.variant) else {
            invalid_arg!(
                "internal error: no CUDA kernel for {:?} D = {}",
                self.dtype,
                self.head_dim
            );
        };
        launch(&self.stream, kernel, &self.params, self.cfg)
    }

    /// The kernel's name.
    pub fn kernel_name(&self) -> &'static str {
        self.kernels
            .fwd(self.dtype, self.head_dim, self.variant)
            .map_or("?", |k| k.name)
    }

    /// The launch configuration: grid, block, dynamic shared memory.
    pub fn launch_config(&self) -> (u32, u32, u32, u32, u32) {
        let (gx, gy, gz) = self.cfg.grid_dim;
        (gx, gy, gz, self.cfg.block_dim.0, self.cfg.shared_mem_bytes)
    }

    /// The stream the kernel runs on (candle's stream of the device), for events.
    pub fn stream(&self) -> Arc<CudaStream> {
        self.stream.clone()
    }
}
