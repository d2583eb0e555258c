//! Head dims the CUDA kernels are not built for, run on the next width they are built for.
//!
//! The attention and segment-mass kernels exist for D = 64, 128 and 256, PINE's and the fused
//! backward for 64 and 128 (each width is a set of instantiations, tuned and resource-checked on
//! its own). Appending zero columns to q and k leaves every `q . k` as it is, and zero columns of v
//! give zero output columns, so a smaller D runs exactly on inputs padded to the next width, with
//! the softmax scale of the real D, and the output is cut back to D. The price is the padded
//! width's work (D 96: 4/3 of a native kernel's products) and one copy of q, k and v; the pad and
//! the cut are candle ops, so gradients flow through them (the backward runs at the padded width
//! too). Each half of the head dim is padded separately (`[x1, 0, x2, 0]`), which keeps RoPE's
//! rotate-half pairs `(c, c + D / 2)` pairs.
//!
//! The CPU path takes any D up to [`crate::MAX_HEAD_DIM_CPU`] natively and is not padded, except
//! under [`set_padding_on_cpu`] (tests: the padding checked against the native CPU path).

use std::cell::Cell;

use candle_core::{DType, Tensor, D};

use crate::error::invalid_arg;
use crate::op::AttentionOutput;

/// The head dims the CUDA attention and segment-mass kernels are built for, smallest first.
pub const ATTENTION_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// The head dims of the CUDA kernels of PINE (rotation in the loop, decode importance).
pub const PINE_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// The head dims of the fused CUDA backward kernel (others take the backward through candle's
/// ops).
pub const BACKWARD_HEAD_DIMS: [usize; 2] = [64, 128];

thread_local! {
    /// [`set_padding_on_cpu`] of the calling thread.
    static ON_CPU: Cell<bool> = const { Cell::new(false) };
}

/// Tests only, not a stable API: pads head dims on the CPU as on a GPU (bf16 / f16 / f32 alike),
/// for the calling thread, so that the padded path can be checked against the native one where
/// there is no GPU. Other threads are not affected.
#[doc(hidden)]
pub fn set_padding_on_cpu(on: bool) {
    ON_CPU.with(|c| c.set(on));
}

/// The width to run `head_dim` at for inputs like `q` on kernels built for `widths` (smallest
/// first), or `None` to run it as it is: on a CUDA device, bf16 or f16 (other dtypes keep their
/// error), a D between two widths or below the first. D above the last width is left to the
/// kernels' check (an error naming q).
pub(crate) fn padded_width(q: &Tensor, head_dim: usize, widths: &[usize]) -> Option<usize> {
    let padded_here = if q.device().is_cpu() {
        ON_CPU.with(|c| c.get())
    } else {
        q.device().is_cuda() && matches!(q.dtype(), DType::BF16 | DType::F16)
    };
    if !padded_here || head_dim == 0 || widths.contains(&head_dim) {
        return None;
    }
    widths.iter().copied().find(|&w| w > head_dim)
}

/// `x` `[..., D]` with each half of its last dim zero-padded to `width / 2`: `[x1, 0, x2, 0]`
/// (an odd D: its first `D / 2 + 1` columns, then the rest, each padded).
pub(crate) fn pad(x: &Tensor, width: usize) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if d > width || !width.is_multiple_of(2) {
        invalid_arg!("internal error: head dim {d} padded to {width}");
    }
    if x.elem_count() == 0 {
        return zeros_with_last_dim(x, width); // no copy kernel over an empty grid (CUDA refuses one)
    }
    let first = d.div_ceil(2);
    let half = width / 2;
    let lo = x
        .narrow(D::Minus1, 0, first)?
        .pad_with_zeros(D::Minus1, 0, half - first)?;
    let hi = x
        .narrow(D::Minus1, first, d - first)?
        .pad_with_zeros(D::Minus1, 0, half - (d - first))?;
    // candle concatenates strided inputs along a transposed view: the kernels read rows whole.
    Tensor::cat(&[&lo, &hi], D::Minus1)?.contiguous()
}

/// The inverse of [`pad`] for an output `[..., width]` of inputs padded from `d`: its `d` real
/// columns, contiguous.
pub(crate) fn unpad(x: &Tensor, d: usize) -> candle_core::Result<Tensor> {
    let width = x.dim(D::Minus1)?;
    if x.elem_count() == 0 {
        return zeros_with_last_dim(x, d);
    }
    let first = d.div_ceil(2);
    let lo = x.narrow(D::Minus1, 0, first)?;
    let hi = x.narrow(D::Minus1, width / 2, d - first)?;
    Tensor::cat(&[&lo, &hi], D::Minus1)?.contiguous()
}

/// A padded call's output cut back to head dim `d` (the LSE and the segment mass are the real
/// D's already).
pub(crate) fn unpad_output(res: AttentionOutput, d: usize) -> candle_core::Result<AttentionOutput> {
    Ok(AttentionOutput {
        out: unpad(&res.out, d)?,
        ..res
    })
}

/// An empty tensor like `x` with last dim `d`.
fn zeros_with_last_dim(x: &Tensor, d: usize) -> candle_core::Result<Tensor> {
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = d;
    }
    Tensor::zeros(dims, x.dtype(), x.device())
}
