//! What the fused backward kernel (`kernels/bwd/bwd.cu`) needs besides q, k, v and the mask, and
//! what its output needs after it, device-agnostic (the CUDA launcher and the emulated one share
//! them): `delta_i = dO_i . O_i` per row, and dQ from the kernel's f32 accumulator.
//!
//! The kernel takes `delta` from the forward's output, FlashAttention-2's choice: one pass over
//! dO and O instead of a second pass over every visible key. The output's rounding to a 16-bit
//! dtype enters `dS = P (dP - delta)` (relative 2^-9 in bf16 per element of O); the tests'
//! gradient tolerance covers it.

use candle_core::{DType, Result, Tensor, D};

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

/// Whether `SEGATTN_BWD_FUSED=0` asks for the backward through candle's ops on a GPU (the fused
/// kernel's reference path, kept for comparison). Read once.
pub(crate) fn fused_disabled() -> bool {
    static FLAG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FLAG.get_or_init(|| std::env::var_os("SEGATTN_BWD_FUSED").is_some_and(|v| v == "0"))
}
