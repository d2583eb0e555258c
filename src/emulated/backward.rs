//! The CUDA backward kernel (`kernels/bwd/bwd.cu`) run on the CPU under the SIMT emulator, for
//! tests: the parameters filled as the GPU launcher fills them (`src/cuda/backward.rs`), dK and dV
//! poisoned with NaN before the launch (every element must be written), dQ accumulated in f32.

use std::ffi::{c_int, c_void};

use candle_core::{DType, Device, Result, Tensor};

use super::{
    check_emulated_inputs, check_launch, dtype_code, fill_mask_params, segattn_emu_set_schedule, tensor_of_halves,
    Input, Schedule,
};
use crate::backward::fused;
use crate::error::invalid_arg;
use crate::kernel_params::base_params;
use crate::mask::SegmentMask;
use crate::params::SegattnBwdParams;
use crate::validate::{default_scale, AttentionShape};

extern "C" {
    fn segattn_emu_bwd(params: *const SegattnBwdParams) -> c_int;
    fn segattn_emu_bwd_smem_bytes(dtype: c_int, head_dim: c_int) -> c_int;
}

/// Dynamic shared memory of the backward kernel for `dtype` (bf16 / f16) and `head_dim`
/// (64 / 128), from the kernel's traits, or `None` when unsupported.
pub fn bwd_smem_bytes(dtype: DType, head_dim: usize) -> Option<usize> {
    let code = dtype_code(dtype)?;
    // SAFETY: a pure function of its arguments.
    let bytes = unsafe { segattn_emu_bwd_smem_bytes(code, c_int::try_from(head_dim).ok()?) };
    (bytes > 0).then_some(bytes as usize)
}

/// Runs the emulated CUDA backward kernel: the gradients `(dq, dk, dv)` of attention over q
/// `[B, Lq, H, D]`, k and v `[B, Lk, Hkv, D]` (CPU tensors, bf16 or f16, D = 64 or 128) under
/// `mask`, for the gradients of its output `d_out` and, optionally, of its LSE `d_lse`
/// `[B, H, Lq]` (a zero `d_out` for the LSE's alone, as the GPU path runs it), given the
/// forward's output `out` and LSE `lse` `[B, H, Lq]` (from [`super::forward`] or the op). Each
/// gradient in the dtype of its input.
pub fn attention_backward(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (out, lse): (&Tensor, &Tensor),
    (d_out, d_lse): (&Tensor, Option<&Tensor>),
    mask: &SegmentMask,
    scale: Option<f64>,
    schedule: Schedule,
    seed: u64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let shape = AttentionShape::of(q, k, v)?;
    let dtype = q.dtype();
    check_emulated_inputs(&shape, dtype, &[("q", q), ("k", k), ("v", v), ("d_out", d_out)])?;
    crate::kernel_params::check_backward_dims(dtype, shape.head_dim)?;
    if out.dims() != q.dims() {
        invalid_arg!("out: expected the shape of q {:?}, got {:?}", q.dims(), out.dims());
    }
    if d_out.dims() != q.dims() || d_out.dtype() != dtype {
        invalid_arg!(
            "d_out: expected the shape and dtype of q ({:?}, {dtype:?}), got {:?}, {:?}",
            q.dims(),
            d_out.dims(),
            d_out.dtype()
        );
    }
    let AttentionShape {
        batch,
        q_len,
        kv_len,
        num_heads,
        num_kv_heads,
        head_dim,
    } = shape;
    if lse.dims() != [batch, num_heads, q_len] {
        invalid_arg!(
            "lse: expected [{batch}, {num_heads}, {q_len}] ([B, H, Lq]), got {:?}",
            lse.dims()
        );
    }
    let scale = scale.unwrap_or_else(|| default_scale(head_dim));
    let host = mask.host_metadata(batch, q_len, kv_len)?;
    if let Some(g) = d_lse {
        if g.dims() != [batch, num_heads, q_len] {
            invalid_arg!(
                "d_lse: expected [{batch}, {num_heads}, {q_len}] ([B, H, Lq]), got {:?}",
                g.dims()
            );
        }
    }
    let delta = fused::delta(out, d_out, d_lse)?.flatten_all()?.to_vec1::<f32>()?;
    let lse = fused::kernel_lse(lse)?.flatten_all()?.to_vec1::<f32>()?;

    let (qi, ki, vi, doi) = (
        Input::new("q", q)?,
        Input::new("k", k)?,
        Input::new("v", v)?,
        Input::new("d_out", d_out)?,
    );
    let mut dq_accum = vec![0f32; batch * q_len * num_heads * head_dim];
    let n_kv = batch * kv_len * num_kv_heads * head_dim;
    // Two 16-bit NaNs per u32 (the kernel stores column pairs): an element it misses stays NaN.
    let nan2: u32 = match dtype {
        DType::BF16 => 0x7fc0_7fc0,
        _ => 0x7e00_7e00,
    };
    let mut dk = vec![nan2; n_kv.div_ceil(2)];
    let mut dv = vec![nan2; n_kv.div_ceil(2)];
    let mut base = base_params(&shape, dtype, scale as f32, [qi.strides, ki.strides, vi.strides])?;
    base.q = qi.ptr;
    base.k = ki.ptr;
    base.v = vi.ptr;
    fill_mask_params(&mut base, &host);
    let p = SegattnBwdParams {
        base,
        d_out: doi.ptr,
        d_out_strides: doi.strides,
        lse: lse.as_ptr(),
        delta: delta.as_ptr(),
        dq_accum: dq_accum.as_mut_ptr(),
        dk: dk.as_mut_ptr() as *mut c_void,
        dv: dv.as_mut_ptr() as *mut c_void,
    };
    // SAFETY: every pointer in `p` points into buffers that outlive the call (`qi`, `ki`, `vi`,
    // `doi`, `host`, `lse`, `delta`, `dq_accum`, `dk`, `dv`) whose sizes match the shape in `p`;
    // the schedule applies to this thread.
    let rc = unsafe {
        segattn_emu_set_schedule(schedule.code(), seed);
        segattn_emu_bwd(&p)
    };
    check_launch(rc, "backward kernel")?;
    drop((qi, ki, vi, doi));
    let dq = Tensor::from_vec(dq_accum, (batch, q_len, num_heads, head_dim), &Device::Cpu)?.to_dtype(dtype)?;
    let kv_dims = (batch, kv_len, num_kv_heads, head_dim);
    Ok((
        dq,
        tensor_of_halves(&dk, dtype, kv_dims)?,
        tensor_of_halves(&dv, dtype, kv_dims)?,
    ))
}
