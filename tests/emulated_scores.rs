//! The CUDA per-segment mass kernel (kernels/scores/scores.cu), run on the CPU under the SIMT
//! emulator, against the f64 reference: random shapes (ragged lengths, GQA, Lq <= Lk), every mask
//! family, every option (length normalisation, query and head reductions, scale), both kernel
//! algorithms (one pass with on-chip accumulators, two passes with per-tile local segments),
//! bf16 and f16, head dims 64 and 128, strided views; three thread schedules per case (forward,
//! high-first, random-warp), whose outputs must be bitwise identical. Plus Sk in the thousands
//! (single-token segments) and the kernel's limits.
//!
//! `SEGATTN_EMU_CASES=n` sets the number of random kernel cases (default 96).

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::cases::{draw, MASK_KINDS};
use common::{env_count, mass_tolerance, mass_tolerance_for, proptest_config, random_mass_options, worst_ratio, Rng};
use proptest::prelude::*;
use segattn::emulated::{
    scores_smem_bytes, segment_scores, segment_scores_tiled, segment_scores_wgmma, Schedule, Tile,
};
use segattn::{
    reference, HeadReduction, MassAlgorithm, PairRule, QueryReduction, SegmentMask, SegmentScoreOptions, Visibility,
};

const SCHEDULES: [Schedule; 3] = [Schedule::Forward, Schedule::HighFirst, Schedule::RandomWarp];
const HEADS: [(usize, usize); 3] = [(4, 2), (3, 1), (2, 2)];

fn cases(default: u32) -> u32 {
    env_count("SEGATTN_EMU_CASES").unwrap_or(default)
}

/// Runs the kernel under every schedule, checks it against the reference and that every schedule
/// gives the same bits; under a reduction, where warps add into shared elements with atomics in
/// schedule order (as on a GPU), the same values to f32 rounding.
fn check(desc: &str, q: &Tensor, k: &Tensor, mask: &SegmentMask, opts: &SegmentScoreOptions, seed: u64) -> Result<()> {
    check_tiled(desc, q, k, mask, opts, seed, None)
}

/// [`check`] with the kernel's tile chosen (`Tile::Wide`: 128 query rows per block, 32-key tiles
/// at D = 128; `Tile::WideKeys64`: 64-key ones), `None` as the GPU launcher decides (128 rows
/// from 128 rows on).
fn check_tiled(
    desc: &str,
    q: &Tensor,
    k: &Tensor,
    mask: &SegmentMask,
    opts: &SegmentScoreOptions,
    seed: u64,
    tile: Option<Tile>,
) -> Result<()> {
    let want = reference::segment_mass(q, k, mask, opts)?;
    let (_, lq, h, _) = q.dims4()?;
    let (atol, rtol) = mass_tolerance_for(q.dtype(), opts, lq, h);
    let mut first: Option<Vec<f32>> = None;
    for schedule in SCHEDULES {
        let got = match tile {
            None => segment_scores(q, k, mask, opts, schedule, seed)?,
            Some(t) => segment_scores_tiled(q, k, mask, opts, t, schedule, seed)?,
        };
        assert_eq!(got.dims(), want.dims(), "{desc}");
        let (r, at) = worst_ratio(&got, &want, atol, rtol)?;
        if r > 1.0 {
            let g = got.flatten_all()?.to_vec1::<f32>()?[at];
            let w = want.flatten_all()?.to_vec1::<f64>()?[at];
            let d = got.dims();
            panic!(
                "{desc}\n{schedule:?}: mass[{}, {}, {}, {}] = {g}, want {w} ({r:.2} x tolerance)",
                at / (d[1] * d[2] * d[3]),
                (at / (d[2] * d[3])) % d[1],
                (at / d[3]) % d[2],
                at % d[3]
            );
        }
        let values = got.flatten_all()?.to_vec1::<f32>()?;
        let reduced = opts.query_reduction != QueryReduction::None || opts.head_reduction != HeadReduction::None;
        match &first {
            None => first = Some(values),
            Some(f) if !reduced => assert!(
                f.iter().zip(&values).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{desc}\n{schedule:?}: differs from the forward schedule's"
            ),
            Some(f) => {
                for (i, (a, b)) in f.iter().zip(&values).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * a.abs().max(1e-3),
                        "{desc}\n{schedule:?}: element {i} is {b}, {a} under the forward schedule"
                    );
                }
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_random_case(
    seed: u64,
    bf16: bool,
    d: usize,
    batch: usize,
    heads: usize,
    lk: usize,
    lq_equal: bool,
    kind: usize,
    tile: Option<Tile>,
) {
    let dtype = if bf16 { DType::BF16 } else { DType::F16 };
    let case = draw(seed, batch, lk, lq_equal, HEADS[heads], d, dtype, kind).unwrap();
    let mut rng = Rng::new(seed ^ 0xc0ffee);
    let opts = random_mass_options(&mut rng, &[MassAlgorithm::Auto, MassAlgorithm::TwoPass]);
    // Sometimes strided views: q transposed from [B, H, Lq, D], k a half of a wider tensor.
    let (q, k) = if rng.below(3) == 0 {
        let q = case
            .q
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let k = Tensor::cat(&[&case.k, &case.v], 2).unwrap();
        let hkv = case.k.dim(2).unwrap();
        (q, k.narrow(2, 0, hkv).unwrap())
    } else {
        (case.q.clone(), case.k.clone())
    };
    let desc = format!("{} {opts:?} tile {tile:?}", case.description);
    check_tiled(&desc, &q, &k, &case.mask, &opts, seed, tile).unwrap_or_else(|e| panic!("{desc}\n{e}"));
}

proptest! {
    #![proptest_config(proptest_config(cases(96)))]

    #[test]
    fn emulated_scores_match_reference(
        seed in any::<u64>(),
        bf16 in any::<bool>(),
        d128 in any::<bool>(),
        batch in 1usize..=2,
        heads in 0usize..HEADS.len(),
        lk in 1usize..=200,
        lq_equal in any::<bool>(),
        kind in 0usize..MASK_KINDS.len(),
        tile in 0usize..4,
    ) {
        // The launcher's choice (wide from 128 rows on), or any kernel forced at any size (the
        // 64-key wide tiles at D = 128; at D = 64 the wide kernel has them already).
        let tile = [None, Some(Tile::Rows64), Some(Tile::Wide), Some(Tile::WideKeys64)][tile];
        run_random_case(seed, bf16, if d128 { 128 } else { 64 }, batch, heads, lk, lq_equal, kind, tile);
    }
}

proptest! {
    // A quarter of the cases: each costs twice a D = 128 one under the emulator.
    #![proptest_config(proptest_config(cases(96).div_ceil(4)))]

    /// D = 256 (the 64-row kernel, Q read from shared memory).
    #[test]
    fn emulated_d256_scores_match_reference(
        seed in any::<u64>(),
        bf16 in any::<bool>(),
        batch in 1usize..=2,
        heads in 0usize..HEADS.len(),
        lk in 1usize..=200,
        lq_equal in any::<bool>(),
        kind in 0usize..MASK_KINDS.len(),
    ) {
        run_random_case(seed, bf16, 256, batch, heads, lk, lq_equal, kind, None);
    }
}

/// Every mask family in both dtypes and head dims, with both algorithms, whatever the draw.
#[test]
fn every_mask_kind_both_algorithms() -> Result<()> {
    for kind in 0..MASK_KINDS.len() {
        let (bf16, d128) = (kind % 2 == 0, (kind / 2) % 2 == 0);
        let dtype = if bf16 { DType::BF16 } else { DType::F16 };
        let case = draw(
            700 + kind as u64,
            2,
            150,
            kind % 3 != 0,
            (4, 2),
            if d128 { 128 } else { 64 },
            dtype,
            kind,
        )?;
        let sk = 1 + case.mask.kv_segments().max_all()?.to_scalar::<u32>()? as usize;
        let one_pass = if sk <= 64 {
            MassAlgorithm::OnePass
        } else {
            MassAlgorithm::Auto
        };
        for algorithm in [one_pass, MassAlgorithm::TwoPass] {
            let opts = SegmentScoreOptions::new().algorithm(algorithm);
            for tile in [Tile::Rows64, Tile::Wide, Tile::WideKeys64] {
                if tile == Tile::WideKeys64 && !d128 {
                    continue;
                }
                let desc = format!("{} {algorithm:?} {tile:?}", case.description);
                check_tiled(&desc, &case.q, &case.k, &case.mask, &opts, 1, Some(tile))?;
            }
        }
    }
    Ok(())
}

/// The standalone mass on wgmma (`segattn_scores_hopper_*`, the one pass of a compute capability
/// 9.0 GPU) gives the bits of the 64-row mma.sync mass kernel: the same products in the same order
/// (S's, the softmax's, the sums' two f16 terms of P), every mask family, D 64 / 128, bf16 / f16,
/// GQA, with and without reductions and length normalisation. Under a reduction, where rows add
/// into shared elements with atomics in schedule order, the same values to f32 rounding.
#[test]
fn wgmma_mass_kernel_gives_the_mma_sync_bits() -> Result<()> {
    for kind in 0..MASK_KINDS.len() {
        for (i, (d, dtype, lk)) in [(128, DType::BF16, 150), (64, DType::F16, 97), (128, DType::F16, 70)]
            .into_iter()
            .enumerate()
        {
            let seed = 9100 + 10 * kind as u64 + i as u64;
            let case = draw(seed, 2, lk, i != 1, HEADS[i], d, dtype, kind)?;
            let sk = 1 + case.mask.kv_segments().max_all()?.to_scalar::<u32>()? as usize;
            if sk > 64 {
                continue; // the wgmma kernel is the one pass
            }
            let opts = match i {
                0 => SegmentScoreOptions::new(),
                1 => SegmentScoreOptions::new()
                    .normalize_by_length(true)
                    .query_reduction(QueryReduction::SumBySegment),
                _ => SegmentScoreOptions::new().head_reduction(HeadReduction::Mean),
            };
            let what = format!("{} {opts:?}", case.description);
            let schedule = SCHEDULES[i];
            let mma = segment_scores_tiled(&case.q, &case.k, &case.mask, &opts, Tile::Rows64, schedule, seed)?;
            let wgmma = segment_scores_wgmma(&case.q, &case.k, &case.mask, &opts, schedule, seed)?;
            let (a, b) = (
                mma.flatten_all()?.to_vec1::<f32>()?,
                wgmma.flatten_all()?.to_vec1::<f32>()?,
            );
            if i == 0 {
                assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}");
            } else {
                for (j, (x, y)) in a.iter().zip(&b).enumerate() {
                    assert!((x - y).abs() <= 1e-6 * x.abs().max(1e-3), "{what}: [{j}] {x} vs {y}");
                }
            }
        }
    }
    Ok(())
}

/// The wgmma mass kernel refuses what it cannot do (two passes) with a message, never a wrong
/// answer.
#[test]
fn wgmma_mass_kernel_is_one_pass() -> Result<()> {
    let case = draw(9, 1, 80, false, (2, 1), 64, DType::BF16, 0)?;
    let opts = SegmentScoreOptions::new().algorithm(MassAlgorithm::TwoPass);
    let e = segment_scores_wgmma(&case.q, &case.k, &case.mask, &opts, Schedule::Forward, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("one pass"), "{e}");
    Ok(())
}

/// Single-token segments: thousands of key segments through the two-pass path (every tile has 64
/// local segments), with and without reductions.
#[test]
fn thousands_of_segments() -> Result<()> {
    let dev = Device::Cpu;
    let l = 2100;
    let mut rng = Rng::new(21);
    let q = common::random_tensor(&mut rng, &[1, l, 1, 64], DType::BF16)?;
    let k = common::random_tensor(&mut rng, &[1, l, 1, 64], DType::BF16)?;
    let ids = Tensor::arange(0u32, l as u32, &dev)?.reshape((1, l))?;
    let mask = SegmentMask::self_attention(&ids, PairRule::new(Visibility::Causal, Visibility::Causal))?;
    let want = reference::segment_mass(&q, &k, &mask, &SegmentScoreOptions::new())?;
    assert_eq!(want.dims(), &[1, 1, l, l]);
    let got = segment_scores(&q, &k, &mask, &SegmentScoreOptions::new(), Schedule::RandomWarp, 5)?;
    let (r, at) = worst_ratio(
        &got,
        &want,
        mass_tolerance(DType::BF16).0,
        mass_tolerance(DType::BF16).1,
    )?;
    assert!(r <= 1.0, "single tokens: {r} x tolerance at {at}");
    // A query reduction over 100-token query segments, the keys still single tokens (cross ids).
    let q_ids: Vec<u32> = (0..l as u32).map(|i| i / 100).collect();
    let q_ids = Tensor::from_vec(q_ids, (1, l), &dev)?;
    let mask = SegmentMask::new(&q_ids, &ids, PairRule::new(Visibility::Full, Visibility::Causal))?;
    let opts = SegmentScoreOptions::new()
        .query_reduction(QueryReduction::MeanBySegment)
        .normalize_by_length(true);
    check("single-token keys, reduced", &q, &k, &mask, &opts, 9)?;
    Ok(())
}

/// More key tiles than one window of tile classes (128, classified ahead one per thread): the
/// loop refills the window, and the second pass of the two-pass algorithm starts it again.
#[test]
fn long_key_sequences_refill_the_class_window() -> Result<()> {
    let (lq, lk) = (70, 128 * 64 + 300);
    for kind in [0usize, 5, 7] {
        let mut rng = Rng::new(9100 + kind as u64);
        let mask = common::cases::random_mask(&mut rng, kind, 1, lk)?.last_queries(lq)?;
        let q = common::random_tensor(&mut rng, &[1, lq, 2, 64], DType::BF16)?;
        let k = common::random_tensor(&mut rng, &[1, lk, 1, 64], DType::BF16)?;
        for algorithm in [MassAlgorithm::Auto, MassAlgorithm::TwoPass] {
            let opts = SegmentScoreOptions::new().algorithm(algorithm);
            for tile in [Tile::Rows64, Tile::Wide] {
                let desc = format!("{} Lq {lq} Lk {lk} {algorithm:?} {tile:?}", MASK_KINDS[kind]);
                check_tiled(&desc, &q, &k, &mask, &opts, 2, Some(tile))?;
            }
        }
    }
    // SKIP, FULL and PARTIAL tiles all along: every other run of keys is hidden.
    let mask = common::cases::alternating_runs(lq, lk)?;
    let mut rng = Rng::new(9200);
    let q = common::random_tensor(&mut rng, &[1, lq, 2, 64], DType::F16)?;
    let k = common::random_tensor(&mut rng, &[1, lk, 1, 64], DType::F16)?;
    for algorithm in [MassAlgorithm::OnePass, MassAlgorithm::TwoPass] {
        let opts = SegmentScoreOptions::new().algorithm(algorithm);
        for tile in [Tile::Rows64, Tile::Wide] {
            check_tiled(
                &format!("alternating runs {algorithm:?} {tile:?}"),
                &q,
                &k,
                &mask,
                &opts,
                2,
                Some(tile),
            )?;
        }
    }
    Ok(())
}

/// Partial and fully masked query tiles, ragged lengths, a blocked segment (rows that see nothing
/// stay zero in both algorithms).
#[test]
fn fully_masked_rows() -> Result<()> {
    let mask = common::cases::blocked_middle_segment()?;
    let mut rng = Rng::new(4);
    for (dtype, algorithm) in [
        (DType::BF16, MassAlgorithm::OnePass),
        (DType::F16, MassAlgorithm::TwoPass),
    ] {
        let q = common::random_tensor(&mut rng, &[2, 147, 2, 128], dtype)?;
        let k = common::random_tensor(&mut rng, &[2, 147, 1, 128], dtype)?;
        let opts = SegmentScoreOptions::new().algorithm(algorithm);
        check("blocked segment 1", &q, &k, &mask, &opts, 3)?;
        let got = segment_scores(&q, &k, &mask, &opts, Schedule::Forward, 0)?;
        let rows = got.narrow(2, 40, 50)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(rows, 0.0);
    }
    Ok(())
}

/// Unsupported inputs are clear errors; the shared-memory sizes the GPU launcher must request.
#[test]
fn limits_and_smem() -> Result<()> {
    let dev = &Device::Cpu;
    let ids = Tensor::arange(0u32, 100, dev)?.reshape((1, 100))?;
    let mask = SegmentMask::self_attention(&ids, PairRule::new(Visibility::Full, Visibility::Full))?;
    let x = Tensor::ones((1, 100, 1, 64), DType::BF16, dev)?;
    let e = segment_scores(
        &x,
        &x,
        &mask,
        &SegmentScoreOptions::new().algorithm(MassAlgorithm::OnePass),
        Schedule::Forward,
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("algorithm") && e.contains("64"), "{e}");
    let x32 = Tensor::ones((1, 100, 1, 64), DType::F32, dev)?;
    let e = segment_scores(&x32, &x32, &mask, &SegmentScoreOptions::new(), Schedule::Forward, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("q:") && e.contains("dtype"), "{e}");
    let x96 = Tensor::ones((1, 100, 1, 96), DType::F16, dev)?;
    let e = segment_scores(&x96, &x96, &mask, &SegmentScoreOptions::new(), Schedule::Forward, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("head dim") && e.contains("96"), "{e}");
    // At D = 128 Q has its own tile (read from shared memory per k-step: registers for three
    // blocks per SM); at D = 64 it shares K's second buffer.
    // D = 256 likewise (two K buffers of 32 KiB and the Q tile: two blocks per SM), 64 rows only.
    for (d, want) in [(64usize, 18_088usize), (128, 34_472 + 64 * 128 * 2), (256, 100_008)] {
        assert_eq!(scores_smem_bytes(DType::BF16, d, Tile::Rows64), Some(want));
        assert_eq!(scores_smem_bytes(DType::F16, d, Tile::Rows64), Some(want));
    }
    assert_eq!(scores_smem_bytes(DType::BF16, 256, Tile::Wide), None);
    // The wide kernel: Q (128 rows) in its own tile, 32-key tiles.
    for (d, want) in [(64usize, 26_288usize), (128, 50_864)] {
        assert_eq!(scores_smem_bytes(DType::BF16, d, Tile::Wide), Some(want));
        assert_eq!(scores_smem_bytes(DType::F16, d, Tile::Wide), Some(want));
    }
    // ... with 64-key tiles at D = 128 only: two K buffers of 16 KiB, Q 32 KiB, metadata.
    assert_eq!(
        scores_smem_bytes(DType::BF16, 128, Tile::WideKeys64),
        Some(50_864 + 16_384 + 512)
    );
    assert_eq!(scores_smem_bytes(DType::BF16, 64, Tile::WideKeys64), None);
    assert_eq!(scores_smem_bytes(DType::F32, 64, Tile::Rows64), None);
    Ok(())
}

/// No key at all: zeros (one pass writes every element, two passes add nothing to zeros).
#[test]
fn no_keys() -> Result<()> {
    let dev = &Device::Cpu;
    let q = Tensor::ones((1, 5, 2, 64), DType::BF16, dev)?;
    let k = Tensor::ones((1, 0, 2, 64), DType::BF16, dev)?;
    let mask = SegmentMask::new(
        &Tensor::zeros((1, 5), DType::U32, dev)?,
        &Tensor::zeros((1, 0), DType::U32, dev)?,
        PairRule::new(Visibility::Full, Visibility::Full),
    )?;
    for algorithm in [MassAlgorithm::OnePass, MassAlgorithm::TwoPass] {
        let opts = SegmentScoreOptions::new().num_key_segments(3).algorithm(algorithm);
        let m = segment_scores(&q, &k, &mask, &opts, Schedule::RandomWarp, 2)?;
        assert_eq!(m.dims(), &[1, 2, 5, 3]);
        assert_eq!(m.abs()?.max_all()?.to_scalar::<f32>()?, 0.0, "{algorithm:?}");
    }
    Ok(())
}
