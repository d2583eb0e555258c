//! Rows rotated at per-token positions on the GPU (`kernels/pine/rope_rows.cu`): PINE's keys
//! rotated once at their original positions, one launch in the input dtype (as tensor ops the
//! rotation made ten launches with f32 intermediates: 0.32 ms for the RAG prompt's keys on an
//! H200, bench/NOTES.md PINE 11).

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::{CudaStorage, DType, Result, Storage, Tensor};
use half::{bf16, f16};

use super::driver_err;
use super::module;
use crate::error::invalid_arg;
use crate::params::SegattnRopeRowsParams;
use crate::pine::kernel_args::rope_rows_params;
use crate::pine::RopeTable;

// SAFETY: a plain C struct (bindgen of kernels/segattn_params.h) passed by value as the kernel's
// only parameter; its pointers are device addresses.
unsafe impl DeviceRepr for SegattnRopeRowsParams {}

/// Threads per block of `segattn_rope_rows_*` (`rope_rows::kThreads`).
const THREADS: u32 = 128;

/// `x` `[B, L, heads, D]` (bf16 or f16, on a CUDA device) rotated at `pos` `[pb, L]` (host,
/// row-major; every position below the table's length), or un-rotated with `inverse`: a new
/// contiguous tensor in the dtype of `x`, computed in f32 and rounded once.
pub(crate) fn rope_rows(x: &Tensor, pos: &[u32], pb: usize, table: &RopeTable, inverse: bool) -> Result<Tensor> {
    let dims = x.dims4()?;
    let (b, l, heads, d) = dims;
    if pos.len() != pb * l {
        invalid_arg!("internal error: {} positions for [{pb}, {l}]", pos.len());
    }
    let table_len = table.cos.len() / table.half.max(1);
    if let Some(&p) = pos.iter().find(|&&p| p as usize >= table_len) {
        invalid_arg!("internal error: position {p} beyond the RoPE table ({table_len} rows)");
    }
    let candle_core::Device::Cuda(dev) = x.device() else {
        invalid_arg!("x: expected a CUDA tensor, got {:?}", x.device().location());
    };
    // The kernel reads the last dimension element by element from its start: contiguous.
    let x = if x.layout().stride().last() == Some(&1) {
        x.clone()
    } else {
        x.contiguous()?
    };
    let stream = dev.cuda_stream();
    let n = b * l * heads * d;
    let name = match x.dtype() {
        DType::BF16 => "segattn_rope_rows_bf16",
        DType::F16 => "segattn_rope_rows_f16",
        other => invalid_arg!("x: the rope-rows kernel takes bf16 or f16, got {other:?}"),
    };
    if n == 0 {
        return Tensor::zeros(dims, x.dtype(), x.device());
    }
    if l > i32::MAX as usize || b > 65_535 {
        invalid_arg!("x: {name} launches one block per token (L <= 2^31 - 1, B <= 65535), got [{b}, {l}]");
    }
    let tables = table
        .device
        .get_or_upload(&stream, "the RoPE table", || table.packed())?;
    let pos_dev = stream
        .clone_htod(pos)
        .map_err(|e| driver_err("uploading the RoPE positions", e))?;
    let kernels = module::kernels(stream.context())?;
    let func = kernels.function(name)?;
    // Allocated in the dtype of x; the kernel writes every element.
    let out_storage = {
        let (xs, xl) = x.storage_and_layout();
        let Storage::Cuda(xs) = &*xs else {
            invalid_arg!("x: expected a CUDA tensor");
        };
        let strides = crate::kernel_params::strides_of(xl);
        let (tp, _gt) = tables.device_ptr(&stream);
        let (pp, _gp) = pos_dev.device_ptr(&stream);
        let cfg = LaunchConfig {
            grid_dim: (l as u32, b as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! launch {
            ($t:ty) => {{
                // SAFETY: every element is written by the kernel before any read.
                let mut out = unsafe { stream.alloc::<$t>(n) }.map_err(|e| driver_err("allocating rotated rows", e))?;
                {
                    let (xp, _gx) = xs.as_cuda_slice::<$t>()?.device_ptr(&stream);
                    let (op, _go) = out.device_ptr_mut(&stream);
                    let params = rope_rows_params(
                        dims,
                        x.dtype(),
                        (
                            (xp + 2 * xl.start_offset() as u64) as *const std::ffi::c_void,
                            strides,
                        ),
                        (pp as *const u32, pb),
                        table,
                        tp as *const f32,
                        op as *mut std::ffi::c_void,
                        inverse,
                    )?;
                    let mut builder = stream.launch_builder(&func);
                    builder.arg(&params);
                    // SAFETY: the kernel's one parameter is a SegattnRopeRowsParams by value whose
                    // pointers are live device allocations of the stated sizes (x, the positions,
                    // the table, `out`), held until the launch is ordered on `stream`.
                    unsafe { builder.launch(cfg) }
                        .map_err(|e| driver_err(format!("launching {name} (grid {:?})", cfg.grid_dim), e))?;
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        match x.dtype() {
            DType::BF16 => launch!(bf16),
            _ => launch!(f16),
        }
    };
    super::launch::sync_if_asked(&stream, name)?;
    super::recorded_errors(&stream, name)?;
    Ok(Tensor::from_storage(
        Storage::Cuda(out_storage),
        dims,
        candle_core::op::BackpropOp::none(),
        false,
    ))
}
