//! `gpu_bench --pine`: one PINE layer on the GPU at Llama-3-8B shapes (H 32, Hkv 8, D 128, bf16)
//! for the RAG prompt (prefix 256, 20 segments of 150, suffix 64) and the judge prompt (prefix
//! 128, 2 segments of 500, suffix 32): PINE prefill (importance, device-side order, rope kernel)
//! against our plain causal attention of the same shape, and a PINE decode step (split-K rope
//! kernel) against a plain decode step (split-K plain kernel, q already rotated). Wall clock of
//! the public calls to stream synchronisation, median of `reps` after `warmup`. A second table
//! breaks PINE's calls down: the rotation of K that prefill does (once, at the original
//! positions), steps 1-2 alone (importance and order: `PineAttention::bench_plan`), and the rest
//! (the attention with its per-call setup) by difference. A third table times decode steps as a
//! model makes them: 32 layer calls in a row, one synchronisation, per call, and the host's share:
//! the time to issue them without waiting for the GPU.

use candle_core::{DType, Device, Result, Tensor};
use segattn::pine::{PineAttention, Rope};
use segattn::{PineLayout, SegmentAttention, SegmentMask};

use super::timing::{host_ms_per_call, median_ms, per_call_in_row_ms};

/// The markdown table of the PINE benchmark (`smoke`: small prompts, for a dry run).
pub fn run(dev: &Device, reps: usize, warmup: usize, smoke: bool) -> Result<String> {
    let (h, hkv, d) = (32, 8, 128);
    let prompts = [("RAG", rag_layout(smoke)), ("judge", judge_layout(smoke))];
    let mut breakdown = String::from(
        "| prompt | prefill: K rotation ms | prefill: importance + order ms | prefill: attention ms (rest) | decode: importance + order ms | decode: attention ms (rest) |\n|---|---|---|---|---|---|\n",
    );
    let mut in_row = String::from(
        "| prompt | PINE decode ms per layer, 32 in a row | plain decode ms per layer, 32 in a row | ratio (target <= 1.5) | PINE host ms per layer (issue only) | plain host ms per layer |\n|---|---|---|---|---|---|\n",
    );
    let mut out = String::from(
        "| prompt | L | PINE prefill ms | causal prefill ms | ratio (target <= 1.6) | PINE decode ms | plain decode ms | ratio (target <= 1.5) |\n|---|---|---|---|---|---|---|---|\n",
    );
    for (name, layout) in prompts {
        let l = layout.len();
        let r = |shape: (usize, usize, usize, usize)| Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(DType::BF16);
        let (q, k, v) = (r((1, l, h, d))?, r((1, l, hkv, d))?, r((1, l, hkv, d))?);
        let pine = PineAttention::new(std::slice::from_ref(&layout), Rope::new(500_000.0))?;
        let causal = SegmentMask::causal(l, dev)?;
        let pine_ms = median_ms(dev, reps, warmup, || Ok(pine.prefill(&q, &k, &v)?.out))?;
        let causal_ms = median_ms(dev, reps, warmup, || {
            Ok(SegmentAttention::new(&causal).forward(&q, &k, &v)?.out)
        })?;
        // Decode: a cache of the prompt plus the new token, K rotated once.
        let (k1, v1) = (r((1, l + 1, hkv, d))?, r((1, l + 1, hkv, d))?);
        let k_cache = pine.rotate_keys(&k1)?;
        let q1 = r((1, 1, h, d))?;
        let step_mask = SegmentMask::causal(l + 1, dev)?.last_queries(1)?;
        // One decode step of a layer, PINE and plain (closures over shared references: Copy, so
        // each timing below takes its own).
        let pine_call = || Ok(pine.decode(&q1, &k_cache, &v1)?.out);
        let plain_call = || Ok(SegmentAttention::new(&step_mask).forward(&q1, &k_cache, &v1)?.out);
        let pine_step = median_ms(dev, reps, warmup, pine_call)?;
        let plain_step = median_ms(dev, reps, warmup, plain_call)?;
        out.push_str(&format!(
            "| {name} | {l} | {pine_ms:.3} | {causal_ms:.3} | {:.2} | {pine_step:.3} | {plain_step:.3} | {:.2} |\n",
            pine_ms / causal_ms,
            pine_step / plain_step
        ));
        let layers = 32;
        let pine_row = per_call_in_row_ms(dev, reps, warmup, layers, pine_call)?;
        let plain_row = per_call_in_row_ms(dev, reps, warmup, layers, plain_call)?;
        let pine_host = host_ms_per_call(dev, reps, warmup, layers, pine_call)?;
        let plain_host = host_ms_per_call(dev, reps, warmup, layers, plain_call)?;
        in_row.push_str(&format!(
            "| {name} | {pine_row:.3} | {plain_row:.3} | {:.2} | {pine_host:.3} | {plain_host:.3} |\n",
            pine_row / plain_row
        ));
        let rotate_ms = median_ms(dev, reps, warmup, || pine.rotate_keys(&k))?;
        let plan_ms = median_ms(dev, reps, warmup, || pine.bench_plan(&q, &k, &v, false))?;
        let step_plan_ms = median_ms(dev, reps, warmup, || pine.bench_plan(&q1, &k_cache, &v1, true))?;
        breakdown.push_str(&format!(
            "| {name} | {rotate_ms:.3} | {plan_ms:.3} | {:.3} | {step_plan_ms:.3} | {:.3} |\n",
            pine_ms - rotate_ms - plan_ms,
            pine_step - step_plan_ms
        ));
    }
    out.push('\n');
    out.push_str(&breakdown);
    out.push('\n');
    out.push_str(&in_row);
    Ok(out)
}

/// `gpu_bench --pine-decode-trace`: PINE decode steps of the RAG prompt (the smoke prompt with
/// `smoke`) as a model makes them, 64 layer calls in a row after 16 warm-up calls, for a timeline
/// tool to show the launches, copies and gaps of one step. Returns a one-line summary.
pub fn decode_trace(dev: &Device, smoke: bool) -> Result<String> {
    let (h, hkv, d) = (32, 8, 128);
    let layout = rag_layout(smoke);
    let l = layout.len();
    let r = |shape: (usize, usize, usize, usize)| Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(DType::BF16);
    let pine = PineAttention::new(std::slice::from_ref(&layout), Rope::new(500_000.0))?;
    let k_cache = pine.rotate_keys(&r((1, l + 1, hkv, d))?)?;
    let (v1, q1) = (r((1, l + 1, hkv, d))?, r((1, 1, h, d))?);
    let ms = per_call_in_row_ms(dev, 1, 16, 64, || Ok(pine.decode(&q1, &k_cache, &v1)?.out))?;
    Ok(format!(
        "PINE decode trace: L {l}, 64 layer calls in a row, {ms:.3} ms per call"
    ))
}

/// The RAG prompt: prefix 256, 20 segments of 150, suffix 64 (`smoke`: scaled down).
fn rag_layout(smoke: bool) -> PineLayout {
    if smoke {
        PineLayout::new(16, &[30; 5], 8)
    } else {
        PineLayout::new(256, &[150; 20], 64)
    }
}

/// The judge prompt: prefix 128, 2 segments of 500, suffix 32 (`smoke`: scaled down).
fn judge_layout(smoke: bool) -> PineLayout {
    if smoke {
        PineLayout::new(8, &[40, 40], 4)
    } else {
        PineLayout::new(128, &[500, 500], 32)
    }
}
