//! The CUDA per-segment mass kernel on a real GPU, through the public API (`segment_scores` on
//! `Device::new_cuda(0)` tensors and masks), against the f64 reference: random shapes, every mask
//! family, every option, both kernel algorithms, bf16 and f16, D 64, 128, 256 (and 40, 96, 200: padded); single-token
//! segments (Sk in the thousands, two passes); the GPU result against the emulated kernel's.
//!
//! Compiled only with `--features cuda`. Without a usable GPU every test prints "skipped" and
//! passes, unless `SEGATTN_REQUIRE_GPU=1`: then it fails. `SEGATTN_GPU_CASES=n` sets the number
//! of random cases (default 200).
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::cases::{draw, Case, MASK_KINDS};
use common::gpu::{gpu, mask_on};
use common::{env_count, mass_tolerance_for, misaligned, random_mass_options, worst_ratio, Rng};
use segattn::{
    reference, segment_scores, HeadReduction, MassAlgorithm, PairRule, SegmentAttention, SegmentMask,
    SegmentScoreOptions, Visibility,
};

fn check(
    dev: &Device,
    desc: &str,
    q: &Tensor,
    k: &Tensor,
    mask: &SegmentMask,
    opts: &SegmentScoreOptions,
) -> Result<()> {
    let want = reference::segment_mass(q, k, mask, opts)?;
    let got = segment_scores(&q.to_device(dev)?, &k.to_device(dev)?, &mask_on(mask, dev)?, opts)?;
    assert!(got.device().same_device(dev), "{desc}: output left the GPU");
    let got = got.to_device(&Device::Cpu)?;
    let (_, lq, h, _) = q.dims4()?;
    let (atol, rtol) = mass_tolerance_for(q.dtype(), opts, lq, h);
    let (r, at) = worst_ratio(&got, &want, atol, rtol)?;
    assert!(r <= 1.0, "{desc}: {r:.2} x tolerance at flat index {at}");
    // The emulated kernel reads the same PTX layouts: the GPU must agree with it closely (at the
    // kernels' own head dims; the padded ones are checked against the reference above).
    if !segattn::head_dim::ATTENTION_HEAD_DIMS.contains(&q.dim(3)?) {
        return Ok(());
    }
    let emu = segattn::emulated::segment_scores(q, k, mask, opts, segattn::emulated::Schedule::Forward, 0)?;
    let (r, at) = worst_ratio(&got, &emu.to_dtype(DType::F64)?, atol, rtol)?;
    assert!(
        r <= 1.0,
        "{desc}: GPU vs emulated kernel {r:.2} x tolerance at flat index {at}"
    );
    Ok(())
}

fn cases() -> u64 {
    env_count("SEGATTN_GPU_CASES").map_or(200, u64::from)
}

/// A random case of seed `seed`: dtype, head dim, heads (GQA), mask family, lengths and options.
fn random_case(seed: u64) -> Result<(Case, SegmentScoreOptions)> {
    let mut rng = Rng::new(seed);
    let dtype = if rng.below(2) == 0 { DType::BF16 } else { DType::F16 };
    // Some cases at D 256 and at head dims the API pads to 64 / 128 / 256.
    let d = [64, 128, 64, 128, 40, 96, 256, 200][rng.below(8)];
    let heads = [(4, 2), (3, 1), (2, 2), (8, 1)][rng.below(4)];
    let kind = rng.below(MASK_KINDS.len());
    let (batch, lk, lq_equal) = (1 + rng.below(2), 1 + rng.below(400), rng.below(2) == 0);
    let case = draw(seed, batch, lk, lq_equal, heads, d, dtype, kind)?;
    let opts = random_mass_options(&mut rng, &[MassAlgorithm::Auto, MassAlgorithm::TwoPass]);
    Ok((case, opts))
}

#[test]
fn gpu_scores_match_reference() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    for seed in 0..cases() {
        let (case, opts) = random_case(seed)?;
        let desc = format!("{} {opts:?}", case.description);
        // Every fifth case reads q from a view the kernel cannot load in place (copied first).
        let q = if seed % 5 == 2 {
            misaligned(&case.q)?
        } else {
            case.q.clone()
        };
        check(&dev, &desc, &q, &case.k, &case.mask, &opts)?;
    }
    Ok(())
}

/// The attention's fused mass on the GPU (`return_segment_mass`: in the forward kernel for at most
/// 64 key segments, else after it with its LSE): against the reference, the output against the
/// reference attention, and the mass against the standalone op on the GPU.
#[test]
fn gpu_fused_mass_matches_reference() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    for seed in 0..cases() / 2 {
        let (case, opts) = random_case(seed ^ 0xf05ed)?;
        let dtype = case.q.dtype();
        let desc = format!("{} {opts:?}", case.description);
        let mask = mask_on(&case.mask, &dev)?;
        // The fused mass is that of the attention's softmax: the options' scale is the attention's.
        let mut attention = SegmentAttention::new(&mask).return_segment_mass(opts);
        if let Some(s) = opts.scale {
            attention = attention.scale(s);
        }
        let res = attention.forward(
            &case.q.to_device(&dev)?,
            &case.k.to_device(&dev)?,
            &case.v.to_device(&dev)?,
        )?;
        let fused = res.segment_mass.expect("asked for");
        assert!(fused.device().same_device(&dev), "{desc}: mass left the GPU");
        let fused = fused.to_device(&Device::Cpu)?;
        let (_, lq, h, _) = case.q.dims4()?;
        let (atol, rtol) = mass_tolerance_for(dtype, &opts, lq, h);
        let want = reference::segment_mass(&case.q, &case.k, &case.mask, &opts)?;
        let (r, at) = worst_ratio(&fused, &want, atol, rtol)?;
        assert!(r <= 1.0, "{desc}: fused mass {r:.2} x tolerance at flat index {at}");
        let alone = segment_scores(&case.q.to_device(&dev)?, &case.k.to_device(&dev)?, &mask, &opts)?;
        let (r, at) = worst_ratio(
            &fused,
            &alone.to_device(&Device::Cpu)?.to_dtype(DType::F64)?,
            atol,
            rtol,
        )?;
        assert!(
            r <= 1.0,
            "{desc}: fused vs standalone {r:.2} x tolerance at flat index {at}"
        );
        let want_out = reference::attention(&case.q, &case.k, &case.v, &case.mask, opts.scale)?.out;
        let (atol, rtol) = common::tolerance(dtype);
        let (r, at) = worst_ratio(&res.out.to_device(&Device::Cpu)?, &want_out, atol, rtol)?;
        assert!(r <= 1.0, "{desc}: output {r:.2} x tolerance at flat index {at}");
    }
    Ok(())
}

#[test]
fn gpu_thousands_of_segments() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let l = 2500;
    let mut rng = Rng::new(25);
    let q = common::random_tensor(&mut rng, &[1, l, 2, 128], DType::BF16)?;
    let k = common::random_tensor(&mut rng, &[1, l, 1, 128], DType::BF16)?;
    let ids = Tensor::arange(0u32, l as u32, &Device::Cpu)?.reshape((1, l))?;
    let mask = SegmentMask::self_attention(&ids, PairRule::new(Visibility::Causal, Visibility::Causal))?;
    for opts in [
        SegmentScoreOptions::new(),
        SegmentScoreOptions::new()
            .normalize_by_length(true)
            .head_reduction(HeadReduction::Mean),
    ] {
        check(&dev, &format!("single tokens {opts:?}"), &q, &k, &mask, &opts)?;
    }
    Ok(())
}

#[test]
fn gpu_errors() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    if dev.is_cpu() {
        return Ok(()); // the CUDA kernels' own limits (a dry run on the CPU: see common::gpu)
    }
    let ids = Tensor::arange(0u32, 100, &dev)?.reshape((1, 100))?;
    let mask = SegmentMask::self_attention(&ids, PairRule::new(Visibility::Full, Visibility::Full))?;
    let x = Tensor::ones((1, 100, 1, 64), DType::F32, &dev)?;
    let e = segment_scores(&x, &x, &mask, &SegmentScoreOptions::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("q:") && e.contains("dtype"), "{e}");
    let x = x.to_dtype(DType::BF16)?;
    let e = segment_scores(
        &x,
        &x,
        &mask,
        &SegmentScoreOptions::new().algorithm(MassAlgorithm::OnePass),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("algorithm") && e.contains("64"), "{e}");
    Ok(())
}
