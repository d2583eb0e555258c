//! Merging two partial attention results computed over disjoint sets of keys (split-K decode,
//! ring / context-parallel attention): the softmax of the union, from each part's output and LSE.

use candle_core::{Result, Tensor};

use crate::error::invalid_arg;

/// Merges partial results `(out_a, lse_a)` and `(out_b, lse_b)` of the same queries over disjoint
/// key sets: `out` `[B, Lq, H, D]` (any float dtype), `lse` `[B, H, Lq]` f32. Returns the output
/// and LSE of attention over both key sets, exactly as if computed at once. A part with LSE
/// `-inf` (it saw no key) contributes nothing; if both are `-inf` the result is 0 and `-inf`.
/// Differentiable (candle ops): with parts from [`crate::SegmentAttention`] with `return_lse`,
/// whose LSE has its gradient, the merged result trains as the whole would (ring /
/// context-parallel training).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use segattn::{merge_partials, SegmentAttention, SegmentMask};
/// let dev = Device::Cpu;
/// let q = Tensor::randn(0f32, 1.0, (1, 1, 2, 32), &dev)?;
/// let k = Tensor::randn(0f32, 1.0, (1, 100, 2, 32), &dev)?;
/// let v = Tensor::randn(0f32, 1.0, (1, 100, 2, 32), &dev)?;
/// let run = |k: &Tensor, v: &Tensor| {
///     let mask = SegmentMask::full(k.dim(1)?, &dev)?.last_queries(1)?;
///     SegmentAttention::new(&mask).return_lse(true).forward(&q, k, v)
/// };
/// let a = run(&k.narrow(1, 0, 60)?, &v.narrow(1, 0, 60)?)?;
/// let b = run(&k.narrow(1, 60, 40)?, &v.narrow(1, 60, 40)?)?;
/// let (out, _lse) = merge_partials(&a.out, a.lse.as_ref().unwrap(), &b.out, b.lse.as_ref().unwrap())?;
/// let whole = run(&k, &v)?.out;
/// let err = (out - whole)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(err < 1e-5);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn merge_partials(out_a: &Tensor, lse_a: &Tensor, out_b: &Tensor, lse_b: &Tensor) -> Result<(Tensor, Tensor)> {
    if out_a.dims() != out_b.dims() || out_a.rank() != 4 {
        invalid_arg!(
            "out_b: expected the shape of out_a {:?} (rank 4 [B, Lq, H, D]), got {:?}",
            out_a.dims(),
            out_b.dims()
        );
    }
    let (b, lq, h, _) = out_a.dims4()?;
    for (name, lse) in [("lse_a", lse_a), ("lse_b", lse_b)] {
        if lse.dims() != [b, h, lq] {
            invalid_arg!(
                "{name}: expected shape [{b}, {h}, {lq}] ([B, H, Lq]), got {:?}",
                lse.dims()
            );
        }
        if lse.dtype() != candle_core::DType::F32 {
            invalid_arg!("{name}: expected dtype f32, got {:?}", lse.dtype());
        }
    }
    let dtype = out_a.dtype();
    let max = lse_a.maximum(lse_b)?;
    // Rows where both parts are empty: shift by 0 instead of -inf so that no NaN appears.
    let zero = max.zeros_like()?;
    let finite = max.ne(f32::NEG_INFINITY)?;
    let shift = finite.where_cond(&max, &zero)?;
    let wa = lse_a.broadcast_sub(&shift)?.exp()?;
    let wb = lse_b.broadcast_sub(&shift)?.exp()?;
    let total = (&wa + &wb)?;
    let lse = (&shift + total.log()?)?;
    let safe_total = total.ne(0f32)?.where_cond(&total, &zero.ones_like()?)?;
    // [B, H, Lq] -> [B, Lq, H, 1] to weight the outputs.
    let as_out = |w: &Tensor| -> Result<Tensor> { (w / &safe_total)?.transpose(1, 2)?.unsqueeze(3) };
    let out = (out_a.to_dtype(candle_core::DType::F32)?.broadcast_mul(&as_out(&wa)?)?
        + out_b.to_dtype(candle_core::DType::F32)?.broadcast_mul(&as_out(&wb)?)?)?;
    Ok((out.to_dtype(dtype)?, lse))
}
