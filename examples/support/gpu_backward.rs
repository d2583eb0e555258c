//! `gpu_bench --backward`: a training step's attention on the GPU, bf16, D = 128, H = 16 / 16,
//! 16k tokens a batch (L 2k x B 8, L 8k x B 2): our forward alone, and forward + backward through
//! candle's autograd (the loss `sum(out * w)`), under causal, 8 packed documents and prefix-LM
//! (prefix L / 4), with the backward through the fused kernel (TFLOP/s: FlashAttention-2's count
//! of five products over the visible pairs) and through candle's ops (the path it replaced). At
//! L 2k also the same step through plain candle ops on a dense additive mask.
//! Wall clock of the calls to stream synchronisation, median of `reps` after `warmup`. Each row is
//! printed as soon as it is measured (a call cut by its time budget keeps the rows it finished),
//! and the slow candle-ops paths (they materialise L x L matrices) run at L 2k only.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use segattn::{reference::dense_mask, segment_attention, SegmentMask};

use super::timing::median_ms;

/// Forward and backward through our op; returns dq (the step's last product).
fn ours(q: &Var, k: &Var, v: &Var, w: &Tensor, mask: &SegmentMask) -> Result<Tensor> {
    let out = segment_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), mask)?;
    let grads = (out * w)?.sum_all()?.backward()?;
    grads
        .get(q.as_tensor())
        .cloned()
        .ok_or_else(|| candle_core::Error::Msg("no gradient for q".into()))
}

/// The same step through candle ops on a dense `[1, 1, L, L]` f32 bias, in f32.
fn dense(q: &Var, k: &Var, v: &Var, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let heads_first = |t: &Tensor| t.to_dtype(DType::F32)?.transpose(1, 2)?.contiguous();
    let (qf, kf, vf) = (
        heads_first(q.as_tensor())?,
        heads_first(k.as_tensor())?,
        heads_first(v.as_tensor())?,
    );
    let scale = 1.0 / (qf.dim(D::Minus1)? as f64).sqrt();
    let s = (qf.matmul(&kf.t()?)? * scale)?.broadcast_add(bias)?;
    let e = s.broadcast_sub(&s.max_keepdim(D::Minus1)?.detach())?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    let out = p.matmul(&vf)?.transpose(1, 2)?;
    let grads = (out * w.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
    grads
        .get(q.as_tensor())
        .cloned()
        .ok_or_else(|| candle_core::Error::Msg("no gradient for q".into()))
}

/// Prints the markdown table of the backward benchmark, row by row (`smoke`: L 256 x B 2, for a
/// dry run); `visible_pairs(mask)`: the visible (q, k) pairs of one row of the mask.
pub fn run(
    dev: &Device,
    reps: usize,
    warmup: usize,
    smoke: bool,
    visible_pairs: impl Fn(&SegmentMask) -> Result<u64>,
) -> Result<()> {
    use std::io::Write as _;
    let (h, d) = (16usize, 128usize);
    let lengths: &[(usize, usize)] = if smoke { &[(256, 2)] } else { &[(2048, 8), (8192, 2)] };
    println!(
        "| mask | L | B | forward ms | forward + backward ms | backward / forward | backward TFLOP/s | \
         forward + backward through candle ops (our previous GPU backward) ms | dense candle ops, forward + backward ms |\n\
         |---|---|---|---|---|---|---|---|---|"
    );
    for &(len, batch) in lengths {
        let masks = [
            ("causal", SegmentMask::causal(len, dev)?),
            // One row of ids, shared by the batch (as the dense baseline's bias).
            ("documents8", SegmentMask::documents(&[vec![len / 8; 8]], dev)?),
            ("prefix_lm", SegmentMask::prefix_lm(len, len / 4, dev)?),
        ];
        let r = |shape: (usize, usize, usize, usize)| Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(DType::BF16);
        let (q, k, v) = (
            Var::from_tensor(&r((batch, len, h, d))?)?,
            Var::from_tensor(&r((batch, len, h, d))?)?,
            Var::from_tensor(&r((batch, len, h, d))?)?,
        );
        let w = r((batch, len, h, d))?;
        for (name, mask) in &masks {
            let (qd, kd, vd) = (q.as_tensor().detach(), k.as_tensor().detach(), v.as_tensor().detach());
            let fwd_ms = median_ms(dev, reps, warmup, || segment_attention(&qd, &kd, &vd, mask))?;
            let step_ms = median_ms(dev, reps, warmup, || ours(&q, &k, &v, &w, mask))?;
            // The same step with the backward through candle's ops (cuBLAS f32 products and
            // elementwise kernels): what the fused kernel replaced.
            let ops_ms = if len <= 2048 {
                segattn::set_fused_backward(false);
                let ms = median_ms(dev, reps.min(10), warmup.min(2), || ours(&q, &k, &v, &w, mask));
                segattn::set_fused_backward(true);
                format!("{:.3}", ms?)
            } else {
                "-".into()
            };
            // FlashAttention-2's count: the backward's five products, 2.5x the forward's two, over
            // the visible pairs only.
            let flops = 10.0 * (visible_pairs(mask)? * batch as u64 * h as u64 * d as u64) as f64;
            let bwd_tflops = flops / ((step_ms - fwd_ms) * 1e-3) / 1e12;
            let dense_ms = if len <= 2048 {
                let visible = dense_mask(mask, 1, len, len)?.to_device(dev)?;
                let zero = Tensor::zeros((1, len, len), DType::F32, dev)?;
                let hidden = Tensor::full(f32::NEG_INFINITY, (1, len, len), dev)?;
                let bias = visible.where_cond(&zero, &hidden)?.unsqueeze(0)?;
                format!("{:.3}", median_ms(dev, reps, warmup, || dense(&q, &k, &v, &w, &bias))?)
            } else {
                "-".into()
            };
            println!(
                "| {name} | {len} | {batch} | {fwd_ms:.3} | {step_ms:.3} | {:.2} | {bwd_tflops:.1} | {ops_ms} | {dense_ms} |",
                (step_ms - fwd_ms) / fwd_ms
            );
            std::io::stdout().flush()?;
        }
    }
    Ok(())
}
