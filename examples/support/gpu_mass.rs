//! `gpu_bench --mass`: the per-segment attention mass on the GPU (issue 4 of 5's targets), bf16,
//! D = 128, H = 16 (and GQA 32 / 8), L = 8k, B = 2: for each mask, our attention alone, the
//! attention with its fused mass (`return_segment_mass`, per query row; and summed by query
//! segment), and the standalone op `segment_scores` under the same mask. Wall clock of the public
//! calls to stream synchronisation, median of `reps` after `warmup`, the outputs alive until then
//! (the per-row fused mass also freed before it: `median_ms`). The fused mass takes the
//! 128 x 64 kernel here (`segattn_fwd_wide64_mass_*`, the rows' sums in shared memory) for
//! documents8 (whose plain attention the 64-row kernel runs: documents of at most 1,024 tokens)
//! and PINE (`FwdVariant::fused_mass`); the attention and its fused mass are also timed
//! with the 64-row kernel (`SEGATTN_FWD_WIDE=0`: `segattn_fwd_mass_*`, on-chip accumulators), the
//! path every fused mass took before the wide one had it.
//!
//! Masks: documents (8 equal: Sk = 8), PINE (prefix 256, 20 segments, suffix 64: Sk = 22) and 100
//! documents (Sk = 100: the forward kernel then the mass kernel's exact pass with its LSE).

use candle_core::{DType, Device, Result, Tensor};
use segattn::{segment_scores, QueryReduction, SegmentAttention, SegmentMask, SegmentScoreOptions};

use super::timing::median_ms;

/// `len` tokens in `n` documents of equal length (the last takes the remainder).
fn equal_docs(len: usize, n: usize) -> Vec<usize> {
    let mut docs = vec![len / n; n];
    docs[n - 1] += len - n * (len / n);
    docs
}

/// `f` with plain attention on the 64-row kernel (`SEGATTN_FWD_WIDE=0`), the setting restored after.
fn with_64_row_kernel<R>(f: impl FnOnce() -> Result<R>) -> Result<R> {
    let before = std::env::var("SEGATTN_FWD_WIDE").ok();
    std::env::set_var("SEGATTN_FWD_WIDE", "0");
    let res = f();
    match before {
        Some(v) => std::env::set_var("SEGATTN_FWD_WIDE", v),
        None => std::env::remove_var("SEGATTN_FWD_WIDE"),
    }
    res
}

/// The markdown table of the mass benchmark (`smoke`: B = 1, L = 1024, for a dry run), for the
/// cases whose label "MASK H/HKV" (e.g. "documents100 16/16") contains `filter`.
pub fn run(dev: &Device, reps: usize, warmup: usize, smoke: bool, filter: Option<&str>) -> Result<String> {
    let (batch, len, d) = if smoke { (1, 1024, 128) } else { (2, 8192, 128) };
    let mut out = String::from(
        "| mask | Sk | heads | attention ms | + fused mass ms | overhead (target <= 15%) | + fused mass, freed before the sync ms | + fused mass by query segment ms | overhead | standalone ms | standalone / attention (target <= 0.60) | 64-row kernel: attention ms | + fused mass ms | overhead |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let documents = |n: usize| SegmentMask::documents(&vec![equal_docs(len, n); batch], dev);
    let pine = || {
        let seg = (len - 256 - 64) / 20;
        let mut segs = vec![seg; 20];
        segs[19] += len - 256 - 64 - 20 * seg;
        SegmentMask::pine(256, &segs, 64, dev)
    };
    for (name, mask) in [
        ("documents8", documents(8)?),
        ("pine", pine()?),
        ("documents100", documents(100)?),
    ] {
        let sk = 1 + mask.kv_segments().max_all()?.to_scalar::<u32>()? as usize;
        for (h, hkv) in [(16usize, 16usize), (32, 8)] {
            if filter.is_some_and(|f| !format!("{name} {h}/{hkv}").contains(f)) {
                continue;
            }
            let r = |shape: (usize, usize, usize, usize)| Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(DType::BF16);
            let (q, k, v) = (
                r((batch, len, h, d))?,
                r((batch, len, hkv, d))?,
                r((batch, len, hkv, d))?,
            );
            let attention = SegmentAttention::new(&mask);
            let per_row = SegmentScoreOptions::new();
            let by_segment = SegmentScoreOptions::new().query_reduction(QueryReduction::SumBySegment);
            let plain_ms = median_ms(dev, reps, warmup, || Ok(attention.forward(&q, &k, &v)?.out))?;
            let narrow_ms =
                with_64_row_kernel(|| median_ms(dev, reps, warmup, || Ok(attention.forward(&q, &k, &v)?.out)))?;
            // The fused calls' mass lives until the synchronisation, as the caller who asked for it
            // would keep it; once more dropped before it (the harness cost of NOTES CUDA 41).
            let fused = attention.clone().return_segment_mass(per_row);
            let fused_ms = median_ms(dev, reps, warmup, || fused.forward(&q, &k, &v))?;
            let dropped_ms = median_ms(dev, reps, warmup, || Ok(fused.forward(&q, &k, &v)?.out))?;
            let narrow_fused_ms = with_64_row_kernel(|| median_ms(dev, reps, warmup, || fused.forward(&q, &k, &v)))?;
            let fused_seg = attention.clone().return_segment_mass(by_segment);
            let fused_seg_ms = median_ms(dev, reps, warmup, || fused_seg.forward(&q, &k, &v))?;
            let alone_ms = median_ms(dev, reps, warmup, || segment_scores(&q, &k, &mask, &per_row))?;
            out.push_str(&format!(
                "| {name} | {sk} | {h}/{hkv} | {plain_ms:.3} | {fused_ms:.3} | {:+.1}% | {dropped_ms:.3} | {fused_seg_ms:.3} | {:+.1}% | {alone_ms:.3} | {:.2} | {narrow_ms:.3} | {narrow_fused_ms:.3} | {:+.1}% |\n",
                100.0 * (fused_ms / plain_ms - 1.0),
                100.0 * (fused_seg_ms / plain_ms - 1.0),
                alone_ms / plain_ms,
                100.0 * (narrow_fused_ms / narrow_ms - 1.0)
            ));
        }
    }
    Ok(out)
}
