//! The fused CUDA backward kernel on a real GPU at lengths where the f64 reference is too slow
//! (`tests/gpu_fwd.rs gradients_match_reference` checks it against the reference on short
//! rows): its gradients against the same step with the backward through candle's ops
//! (`segattn::cuda::set_fused_backward(false)`: f32 products, exact delta), which
//! `tests/gradients.rs` checks against the reference. Several windows of query tiles, GQA,
//! ragged documents, PINE and prefix-LM masks, Lq < Lk, bf16 and f16, D 64 and 128.
//!
//! One test in this binary: it switches the backward path of the whole process. Compiled only with
//! `--features cuda`. Without a usable GPU it prints "skipped" and passes, unless
//! `SEGATTN_REQUIRE_GPU=1`: then it fails.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::gpu::{dry_run, gpu, mask_on};
use common::{autograd_gradients, fused_gradient_tolerance, random_tensor, worst_ratio_scaled, Rng};
use segattn::SegmentMask;

/// One configuration: name, mask (one row of ids, shared by the batch), batch, (H, Hkv), D, dtype.
struct Config {
    name: &'static str,
    mask: SegmentMask,
    batch: usize,
    heads: (usize, usize),
    head_dim: usize,
    dtype: DType,
}

#[test]
fn fused_kernel_matches_ops_path_on_long_rows() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let cpu = Device::Cpu;
    // The dry run on the CPU (both paths are then the CPU's) checks this test's logic on rows a
    // quarter as long.
    let n = |len: usize| if dry_run() { len / 4 } else { len };
    let config = |name, mask, batch, heads, head_dim, dtype| Config {
        name,
        mask,
        batch,
        heads,
        head_dim,
        dtype,
    };
    let configs = [
        config(
            "causal",
            SegmentMask::causal(n(4500), &cpu)?,
            1,
            (4, 2),
            128,
            DType::BF16,
        ),
        config(
            "ragged documents",
            SegmentMask::documents(&[vec![n(700), 1, n(1300), 33, n(966)]], &cpu)?,
            2,
            (2, 2),
            64,
            DType::F16,
        ),
        config(
            "pine",
            SegmentMask::pine(n(256), &[n(150); 20], 64, &cpu)?,
            1,
            (8, 2),
            128,
            DType::F16,
        ),
        config(
            "prefix-LM",
            SegmentMask::prefix_lm(n(2100), n(700), &cpu)?,
            1,
            (3, 1),
            64,
            DType::BF16,
        ),
        config(
            "causal, the last queries",
            SegmentMask::causal(n(2600), &cpu)?.last_queries(n(700))?,
            2,
            (2, 1),
            128,
            DType::BF16,
        ),
    ];
    let mut rng = Rng::new(31);
    for Config {
        name,
        mask,
        batch: b,
        heads: (h, hkv),
        head_dim: d,
        dtype,
    } in configs
    {
        let (lq, lk) = (mask.q_segments().dim(1)?, mask.kv_segments().dim(1)?);
        let q = random_tensor(&mut rng, &[b, lq, h, d], dtype)?.to_device(&dev)?;
        let k = random_tensor(&mut rng, &[b, lk, hkv, d], dtype)?.to_device(&dev)?;
        let v = random_tensor(&mut rng, &[b, lk, hkv, d], dtype)?.to_device(&dev)?;
        let w = random_tensor(&mut rng, &[b, lq, h, d], dtype)?.to_device(&dev)?;
        let mask = mask_on(&mask, &dev)?;
        let grads = |fused: bool| {
            segattn::cuda::set_fused_backward(fused);
            let g = autograd_gradients((&q, &k, &v), &mask, (&w, None), None);
            segattn::cuda::set_fused_backward(true);
            g
        };
        let fused = grads(true)?;
        let ops = grads(false)?;
        let tol = fused_gradient_tolerance(dtype);
        let cpu_f32 = |t: &Tensor| t.to_device(&cpu)?.to_dtype(DType::F32);
        for (g, (got, want)) in
            ["dq", "dk", "dv"]
                .into_iter()
                .zip([(&fused.0, &ops.0), (&fused.1, &ops.1), (&fused.2, &ops.2)])
        {
            let (r, at) = worst_ratio_scaled(&cpu_f32(got)?, &cpu_f32(want)?, tol)?;
            assert!(
                r <= 1.0,
                "{name} (B {b} Lq {lq} Lk {lk} H {h}/{hkv} D {d} {dtype:?}): {g} off by {r} x tolerance at flat index {at}"
            );
        }
    }
    Ok(())
}
