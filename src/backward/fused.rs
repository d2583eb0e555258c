//! What the fused backward kernel (`kernels/bwd/bwd.cu`) needs besides q, k, v and the mask, and
//! what its output needs after it, device-agnostic (the CUDA launcher and the emulated one share
//! them): `delta_i = dO_i . O_i` per row, and dQ from the kernel's f32 accumulator.
//!
//! The kernel takes `delta` from the forward's output, FlashAttention-2's choice: one pass over
//! dO and O instead of a second pass over every visible key. The output's rounding to a 16-bit
//! dtype enters `dS = P (dP - delta)` (relative 2^-9 in bf16 per element of O); the tests'
//! gradient tolerance covers it.

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

#[cfg(feature = "cuda")]
/// Whether `SEGATTN_BWD_FUSED=0` asks for the backward through candle's ops on a GPU (the fused
/// kernel's reference path, kept for comparison). Read once.
pub(crate) fn fused_disabled() -> bool {
    static FLAG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FLAG.get_or_init(|| std::env::var_os("SEGATTN_BWD_FUSED").is_some_and(|v| v == "0"))
}

#[cfg(feature = "cuda")]
/// Whether the fused kernel takes the backward at `q`: a CUDA tensor, bf16 / f16, D = 64 / 128
/// (every input the CUDA forward takes), unless `SEGATTN_BWD_FUSED=0`.
pub(crate) fn available(q: &Tensor, shape: &AttentionShape) -> bool {
    q.device().is_cuda()
        && matches!(q.dtype(), DType::BF16 | DType::F16)
        && matches!(shape.head_dim, 64 | 128)
        && !fused_disabled()
}

/// The gradients through the fused kernel (see [`available`]), for the output gradient `d_out`
/// of the forward's output `out`; only those `wanted` are returned.
#[cfg(feature = "cuda")]
pub(crate) fn gradients(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (out, d_out): (&Tensor, &Tensor),
    lse: &Tensor,
    shape: AttentionShape,
    host: &crate::mask::HostMask,
    scale: f32,
    wanted: [bool; 3],
) -> Result<super::Gradients> {
    let delta = delta(out, d_out, None)?;
    let lse = kernel_lse(lse)?;
    // The kernel reads 16-byte chunks: views that are not contiguous are copied first.
    let packed = |t: &Tensor| {
        if t.is_contiguous() {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    let (q, k, v, d_out) = (packed(q)?, packed(k)?, packed(v)?, packed(d_out)?);
    let (dq_accum, dk, dv) = crate::cuda::attention_backward((&q, &k, &v), &d_out, (&lse, &delta), shape, host, scale)?;
    let dq = if wanted[0] {
        Some(dq_accum.to_dtype(q.dtype())?)
    } else {
        None
    };
    Ok((dq, wanted[1].then_some(dk), wanted[2].then_some(dv)))
}
