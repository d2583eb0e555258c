//! Launching the fused backward kernel (`kernels/bwd/bwd.cu`) on candle's stream: dQ accumulated
//! in a zeroed f32 buffer (converted to the dtype by the caller), dK and dV written in the dtype.
//! Its inputs besides q, k, v and the mask (the forward's LSE, delta = dO . O) are prepared by
//! `crate::backward::fused` with tensor ops on the device.

use std::ffi::c_void;

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, ValidAsZeroBits,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Layout, Result, Storage, Tensor};
use half::{bf16, f16};

use super::driver_err;
use super::launch::{base_params, launch_with_params, loadable, strides_of, MaskBuffer};
use super::module;
use crate::error::invalid_arg;
use crate::mask::HostMask;
use crate::params::{SegattnBwdParams, SegattnStrides};
use crate::validate::AttentionShape;

// SAFETY: a plain C struct (bindgen of kernels/segattn_params.h, layout-tested) passed by value as
// the kernel's only parameter; its pointers are device addresses that the kernel dereferences.
unsafe impl DeviceRepr for SegattnBwdParams {}

/// Threads per block and keys per block (`BwdTraits::kThreads`, `kBlockN`, which assert them).
const THREADS: u32 = crate::params::SEGATTN_BWD_THREADS;
const BLOCK_KEYS: usize = crate::params::SEGATTN_BWD_BLOCK_KEYS as usize;

/// The gradients `(dq_accum f32 [B, Lq, H, D], dk, dv [B, Lk, Hkv, D] in the dtype)` of attention
/// over q, k, v (CUDA, bf16 / f16, D = 64 / 128) under `host` for the output gradient `d_out`,
/// given the forward's LSE and delta `[B, H, Lq]` f32 contiguous.
pub(crate) fn attention_backward(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    d_out: &Tensor,
    (lse, delta): (&Tensor, &Tensor),
    shape: AttentionShape,
    host: &HostMask,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    crate::kernel_params::check_backward_dims(q.dtype(), shape.head_dim)?;
    match q.dtype() {
        DType::BF16 => typed::<bf16>((q, k, v), d_out, (lse, delta), shape, host, scale),
        _ => typed::<f16>((q, k, v), d_out, (lse, delta), shape, host, scale),
    }
}

/// The CUDA slice of `storage` (the storage of input `name`), elements of type `T`.
fn cuda_slice<'a, T: CudaDType>(name: &str, storage: &'a Storage) -> Result<&'a CudaSlice<T>> {
    match storage {
        Storage::Cuda(s) => s.as_cuda_slice::<T>(),
        _ => invalid_arg!("{name}: expected a CUDA tensor on the device of q"),
    }
}

/// The address of a 16-bit input at device address `base` with `layout` (start offset applied)
/// and its strides, checked for the kernel's 16-byte loads.
fn checked_input<T>(name: &str, base: u64, layout: &Layout) -> Result<(u64, SegattnStrides)> {
    let addr = base + (std::mem::size_of::<T>() * layout.start_offset()) as u64;
    let strides = strides_of(layout);
    if !loadable(addr, &strides) {
        invalid_arg!(
            "{name}: the backward kernel reads 16-byte chunks: expected a 16-byte aligned start and strides that are \
             multiples of 8 elements, got strides {:?}",
            layout.stride()
        );
    }
    Ok((addr, strides))
}

/// The address of a contiguous f32 row vector (`name`: the LSE or delta, `[B, H, Lq]`, the
/// kernel reads `rows` of them) at `base` with `layout`.
fn checked_rows(name: &str, base: u64, layout: &Layout, rows: usize) -> Result<u64> {
    if !layout.is_contiguous() || layout.shape().elem_count() != rows {
        invalid_arg!(
            "internal error: {name}: expected {rows} contiguous f32 ([B, H, Lq]), got shape {:?}, strides {:?}",
            layout.dims(),
            layout.stride()
        );
    }
    Ok(base + 4 * layout.start_offset() as u64)
}

fn typed<T: CudaDType + DeviceRepr + ValidAsZeroBits + candle_core::WithDType>(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    d_out: &Tensor,
    (lse, delta): (&Tensor, &Tensor),
    shape: AttentionShape,
    host: &HostMask,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let candle_core::Device::Cuda(dev) = q.device() else {
        invalid_arg!("internal error: the fused backward runs on a CUDA device");
    };
    let stream = dev.cuda_stream();
    let AttentionShape {
        batch,
        q_len,
        kv_len,
        num_heads,
        num_kv_heads,
        head_dim,
    } = shape;
    if num_kv_heads > 65_535 || batch > 65_535 {
        invalid_arg!(
            "k: the backward kernel launches one grid row per KV head and batch row (at most 65535 each), got B = \
             {batch} and Hkv = {num_kv_heads}"
        );
    }
    let n_q = batch * q_len * num_heads * head_dim;
    let n_kv = batch * kv_len * num_kv_heads * head_dim;
    // Never zero-byte allocations (the shape says how many elements there are).
    let mut dq_accum = stream
        .alloc_zeros::<f32>(n_q.max(1))
        .map_err(|e| driver_err("allocating the backward's dQ accumulator", e))?;
    // dK and dV: every element is written by the kernel; zeroed all the same, so that an empty
    // key range (no launch) reads as zero gradients.
    let mut dk = stream
        .alloc_zeros::<T>(n_kv.max(1))
        .map_err(|e| driver_err("allocating dK", e))?;
    let mut dv = stream
        .alloc_zeros::<T>(n_kv.max(1))
        .map_err(|e| driver_err("allocating dV", e))?;
    if n_q > 0 && n_kv > 0 {
        let kernels = module::kernels(stream.context())?;
        let mask = MaskBuffer::of(&stream, host, 1)?;
        // Every device pointer's guard is held until the launch is ordered on the stream.
        let (q_st, q_l) = q.storage_and_layout();
        let (k_st, k_l) = k.storage_and_layout();
        let (v_st, v_l) = v.storage_and_layout();
        let (do_st, do_l) = d_out.storage_and_layout();
        let (lse_st, lse_l) = lse.storage_and_layout();
        let (delta_st, delta_l) = delta.storage_and_layout();
        let (q_ptr, _gq) = cuda_slice::<T>("q", &q_st)?.device_ptr(&stream);
        let (k_ptr, _gk) = cuda_slice::<T>("k", &k_st)?.device_ptr(&stream);
        let (v_ptr, _gv) = cuda_slice::<T>("v", &v_st)?.device_ptr(&stream);
        let (do_ptr, _gdo) = cuda_slice::<T>("d_out", &do_st)?.device_ptr(&stream);
        let (lse_ptr, _glse) = cuda_slice::<f32>("lse", &lse_st)?.device_ptr(&stream);
        let (delta_ptr, _gdelta) = cuda_slice::<f32>("delta", &delta_st)?.device_ptr(&stream);
        let (qa, qs) = checked_input::<T>("q", q_ptr, q_l)?;
        let (ka, ks) = checked_input::<T>("k", k_ptr, k_l)?;
        let (va, vs) = checked_input::<T>("v", v_ptr, v_l)?;
        let (doa, dos) = checked_input::<T>("d_out", do_ptr, do_l)?;
        let mut base = base_params(&shape, T::DTYPE, scale, [qs, ks, vs])?;
        base.q = qa as *const c_void;
        base.k = ka as *const c_void;
        base.v = va as *const c_void;
        base.o = std::ptr::null_mut();
        base.lse = std::ptr::null_mut();
        // (The guard lives until the launch below is queued.)
        let (mask_ptr, _gmask) = mask.device_ptr(&stream);
        mask.fill(mask_ptr, &mut base);
        let (dqp, _g1) = dq_accum.device_ptr_mut(&stream);
        let (dkp, _g2) = dk.device_ptr_mut(&stream);
        let (dvp, _g3) = dv.device_ptr_mut(&stream);
        let params = SegattnBwdParams {
            base,
            d_out: doa as *const c_void,
            d_out_strides: dos,
            lse: checked_rows("lse", lse_ptr, lse_l, batch * num_heads * q_len)? as *const f32,
            delta: checked_rows("delta", delta_ptr, delta_l, batch * num_heads * q_len)? as *const f32,
            dq_accum: dqp as *mut f32,
            dk: dkp as *mut c_void,
            dv: dvp as *mut c_void,
        };
        let name = match (T::DTYPE, head_dim) {
            (DType::BF16, 64) => "segattn_bwd_bf16_d64",
            (DType::BF16, _) => "segattn_bwd_bf16_d128",
            (_, 64) => "segattn_bwd_f16_d64",
            _ => "segattn_bwd_f16_d128",
        };
        let Some(smem) = crate::emulated::bwd_smem_bytes(T::DTYPE, head_dim) else {
            invalid_arg!("internal error: no shared memory size for kernel {name}");
        };
        let func = kernels.function_with_smem(name, smem)?;
        let cfg = LaunchConfig {
            grid_dim: (kv_len.div_ceil(BLOCK_KEYS) as u32, num_kv_heads as u32, batch as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the kernel's one parameter is a SegattnBwdParams whose pointers are live device
        // allocations of the sizes stated in it (the inputs, held by the caller; the mask buffer
        // and the outputs, held here until after the launch is ordered on the stream); the grid
        // covers [B, Hkv, Lk] as the kernel expects.
        unsafe { launch_with_params(&stream, &func, name, cfg, &params) }?;
    }
    super::recorded_errors(&stream, "the backward kernel")?;
    let wrap = |storage: CudaStorage, dims: (usize, usize, usize, usize)| {
        Tensor::from_storage(Storage::Cuda(storage), dims, BackpropOp::none(), false)
    };
    let dq_accum = wrap(
        CudaStorage::wrap_cuda_slice(dq_accum, dev.clone()),
        (batch, q_len, num_heads, head_dim),
    );
    let kv_dims = (batch, kv_len, num_kv_heads, head_dim);
    Ok((
        dq_accum,
        wrap(CudaStorage::wrap_cuda_slice(dk, dev.clone()), kv_dims),
        wrap(CudaStorage::wrap_cuda_slice(dv, dev.clone()), kv_dims),
    ))
}
