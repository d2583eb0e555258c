//! The fused backward kernel (`kernels/bwd/bwd.cu`) as the op's backward on a GPU: when it is
//! taken, and what it needs besides q, k, v and the mask, prepared with tensor ops on the device
//! (the emulated launcher shares them): `delta_i = dO_i . O_i` per row and the LSE as f32.
//!
//! The kernel takes `delta` from the forward's output, FlashAttention-2's choice: one pass over
//! dO and O instead of a second pass over every visible key. The output's rounding to a 16-bit
//! dtype enters `dS = P (dP - delta)` (relative 2^-9 in bf16 per element of O): the gradient is
//! exact for that definition (tests/emulated_bwd.rs checks it against the f64 reference of it),
//! which differs from the exact gradient by that rounding.

use candle_core::{DType, Result, Tensor, D};

#[cfg(feature = "cuda")]
use crate::validate::AttentionShape;

/// `delta = sum_d dO * O - dlse` `[B, H, Lq]` f32, contiguous, from the output `out` and its
/// gradient `d_out` `[B, Lq, H, D]` and the LSE's gradient `d_lse` `[B, H, Lq]` (if any).
pub(crate) fn delta(out: &Tensor, d_out: &Tensor, d_lse: Option<&Tensor>) -> Result<Tensor> {
    let d = (out.to_dtype(DType::F32)? * d_out.to_dtype(DType::F32)?)?
        .sum(D::Minus1)?
        .transpose(1, 2)?
        .contiguous()?;
    match d_lse {
        None => Ok(d),
        Some(g) => d - g.to_dtype(DType::F32)?,
    }
}

/// The forward's LSE `[B, H, Lq]` as the kernel reads it: f32, contiguous.
pub(crate) fn kernel_lse(lse: &Tensor) -> Result<Tensor> {
    lse.to_dtype(DType::F32)?.contiguous()
}

/// The process's choice from `SEGATTN_BWD_FUSED`: 0 not yet read, 1 fused, 2 off.
#[cfg(feature = "cuda")]
static ENV_MODE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

#[cfg(feature = "cuda")]
thread_local! {
    /// The calling thread's choice from [`set_fused_backward`]: 0 none (the process's), 1, 2.
    static THREAD_MODE: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

/// Whether the backward on a GPU goes through candle's ops instead of the fused kernel: the
/// calling thread's [`set_fused_backward`], else `SEGATTN_BWD_FUSED=0` (read on first use).
#[cfg(feature = "cuda")]
fn fused_disabled() -> bool {
    use std::sync::atomic::Ordering;
    match THREAD_MODE.with(|m| m.get()) {
        0 => {}
        mode => return mode == 2,
    }
    match ENV_MODE.load(Ordering::Relaxed) {
        0 => {
            let off = std::env::var_os("SEGATTN_BWD_FUSED").is_some_and(|v| v == "0");
            ENV_MODE.store(if off { 2 } else { 1 }, Ordering::Relaxed);
            off
        }
        mode => mode == 2,
    }
}

/// Selects the GPU backward for the calling thread (the one that runs `backward()`): the fused
/// kernel (`true`, the default) or the same equations through candle's ops (`false`; the
/// reference path, for benchmarks and tests). Other threads are not affected.
#[cfg(feature = "cuda")]
pub fn set_fused_backward(on: bool) {
    THREAD_MODE.with(|m| m.set(if on { 1 } else { 2 }));
}

/// Whether the fused kernel takes the backward at `q`: a CUDA tensor, bf16 / f16, D = 64 / 128
/// (every input the CUDA forward takes), unless `SEGATTN_BWD_FUSED=0`.
#[cfg(feature = "cuda")]
pub(crate) fn available(q: &Tensor, shape: &AttentionShape) -> bool {
    q.device().is_cuda()
        && matches!(q.dtype(), DType::BF16 | DType::F16)
        && matches!(shape.head_dim, 64 | 128)
        && !fused_disabled()
}

/// The gradients through the fused kernel (see [`available`]) for the gradients `up` of the
/// output (with the forward's output `up.out`) and / or of the LSE; only those `wanted` are
/// returned (dv only with an output gradient: the LSE's gives v none). With the LSE's gradient
/// alone the kernel runs with dO = 0 (dP = 0, delta = -dlse).
#[cfg(feature = "cuda")]
pub(crate) fn gradients(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    up: super::Upstream,
    lse: &Tensor,
    shape: AttentionShape,
    host: &crate::mask::HostMask,
    scale: f32,
    wanted: [bool; 3],
) -> Result<super::Gradients> {
    let (d_out, delta) = match (up.d_out, up.out) {
        (Some(d_out), Some(out)) => (d_out.clone(), delta(out, d_out, up.d_lse)?),
        (None, _) => {
            let Some(d_lse) = up.d_lse else {
                crate::error::invalid_arg!("internal error: a backward with no upstream gradient");
            };
            (q.zeros_like()?, d_lse.to_dtype(DType::F32)?.neg()?.contiguous()?)
        }
        (Some(_), None) => crate::error::invalid_arg!("internal error: the fused backward needs the forward's output"),
    };
    let lse = kernel_lse(lse)?;
    // The kernel reads 16-byte chunks: views it cannot read in place are copied first (as the
    // forward's are).
    let packed = crate::kernel_params::kernel_readable;
    let (q, k, v, d_out) = (packed(q)?, packed(k)?, packed(v)?, packed(&d_out)?);
    let (dq_accum, dk, dv) = crate::cuda::attention_backward((&q, &k, &v), &d_out, (&lse, &delta), shape, host, scale)?;
    let dq = if wanted[0] {
        Some(dq_accum.to_dtype(q.dtype())?)
    } else {
        None
    };
    Ok((
        dq,
        wanted[1].then_some(dk),
        (wanted[2] && up.d_out.is_some()).then_some(dv),
    ))
}
