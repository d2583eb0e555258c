//! The attention's fused per-segment mass on the CUDA path, run on the CPU under the SIMT
//! emulator: the forward kernel's one-pass mass (`segattn_fwd_mass_*`: at most 64 key segments,
//! no split-K; `segattn_fwd_wide64_mass_*`, the 128 x 64 kernel with its rows' sums in shared
//! memory, at D = 128 and at most `WIDE_MASS_MAX_SEGMENTS` key segments) and, beyond that or with split-K or `MassAlgorithm::TwoPass`, the forward kernel
//! followed by the mass kernel's exact pass with the forward kernel's LSE. Checked against the
//! f64 reference, against the standalone mass kernel, and for leaving the attention untouched:
//! the output and LSE are bitwise those of the plain forward kernel (same split).
//!
//! `SEGATTN_EMU_CASES=n` scales the number of random cases (default 48 here).

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::cases::{draw, Case, MASK_KINDS};
use common::{bits, env_count, mass_tolerance_for, proptest_config, random_mass_options, worst_ratio, Rng};
use proptest::prelude::*;
use segattn::emulated::{
    forward_split, forward_tiled, forward_with_mass, forward_with_mass_tiled, forward_with_mass_wgmma, segment_scores,
    Schedule, Tile, WIDE_MASS_MAX_SEGMENTS,
};
use segattn::{reference, MassAlgorithm, PairRule, QueryReduction, SegmentMask, SegmentScoreOptions, Visibility};

const HEADS: [(usize, usize); 3] = [(4, 2), (3, 1), (2, 2)];
const SCHEDULES: [Schedule; 3] = [Schedule::Forward, Schedule::HighFirst, Schedule::RandomWarp];

fn cases(default: u32) -> u32 {
    env_count("SEGATTN_EMU_CASES").map_or(default, |n| n.div_ceil(2))
}

/// The fused mass of `case` with `opts` and `kv_splits` against the reference and the standalone
/// kernel; the output and LSE bitwise those of the plain kernel. `wide`: the launch takes the
/// 128 x 64 kernel for plain attention (`Tile::WideKeys64`), else the launcher's rule.
fn check(
    case: &Case,
    opts: &SegmentScoreOptions,
    kv_splits: usize,
    wide: bool,
    schedule: Schedule,
    seed: u64,
) -> Result<Tensor> {
    let what = format!(
        "{} {opts:?} kv_splits {kv_splits} wide {wide} {schedule:?}",
        case.description
    );
    let (q, k, v, mask) = (&case.q, &case.k, &case.v, &case.mask);
    let scale = opts.scale;
    let fused = if wide {
        forward_with_mass_tiled(q, k, v, mask, scale, opts, kv_splits, Tile::WideKeys64, schedule, seed)?
    } else {
        forward_with_mass(q, k, v, mask, scale, opts, kv_splits, schedule, seed)?
    };
    // Bitwise a plain launch: the kernel that the mass variant extends (the 128 x 64 one where it
    // holds the segments, else the 64-row one), or (mass after the forward kernel: more than 64
    // segments, two passes, split-K) the kernel the launcher takes for plain attention (the wide
    // one from 128 rows on, whose key tiles differ at D = 128).
    let d = q.dim(3)?;
    let sk = 1 + mask.kv_segments().max_all()?.to_scalar::<u32>()? as usize;
    let in_forward = kv_splits == 1 && opts.algorithm != MassAlgorithm::TwoPass && sk <= 64 && d != 256;
    let wide_mass = in_forward && wide && d == 128 && sk <= WIDE_MASS_MAX_SEGMENTS && key_tiles_of_two_segments(mask)?;
    let plain = if wide_mass {
        forward_tiled(q, k, v, mask, scale, Tile::WideKeys64, schedule, seed)?
    } else if in_forward {
        forward_tiled(q, k, v, mask, scale, Tile::Rows64, schedule, seed)?
    } else {
        forward_split(q, k, v, mask, scale, kv_splits, schedule, seed)?
    };
    assert_eq!(
        bits(&fused.out)?,
        bits(&plain.out)?,
        "{what}: the mass changed the output"
    );
    assert_eq!(
        bits(fused.lse.as_ref().unwrap())?,
        bits(plain.lse.as_ref().unwrap())?,
        "{what}: the mass changed the LSE"
    );
    let got = fused.segment_mass.expect("asked for");
    let want = reference::segment_mass(q, k, mask, opts)?;
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (_, lq, h, _) = q.dims4()?;
    let (atol, rtol) = mass_tolerance_for(q.dtype(), opts, lq, h);
    let (r, at) = worst_ratio(&got, &want, atol, rtol)?;
    if r > 1.0 {
        let g = got.flatten_all()?.to_vec1::<f32>()?[at];
        let w = want.flatten_all()?.to_vec1::<f64>()?[at];
        panic!(
            "{what}: {r:.2} x tolerance at flat index {at} of {:?}: got {g}, want {w}",
            got.dims()
        );
    }
    // The standalone kernel under the same mask: the same sums up to f32 rounding.
    let alone = segment_scores(q, k, mask, opts, schedule, seed)?;
    let (r, at) = worst_ratio(&got, &alone.to_dtype(DType::F64)?, atol, rtol)?;
    assert!(
        r <= 1.0,
        "{what}: {r:.2} x tolerance from the standalone kernel at {at}"
    );
    Ok(got)
}

/// Whether every aligned tile of 64 keys meets at most two key segments (the 128 x 64 mass
/// kernel's condition, besides its segment count).
fn key_tiles_of_two_segments(mask: &SegmentMask) -> Result<bool> {
    let ids = mask.kv_segments().to_vec2::<u32>()?;
    Ok(ids.iter().all(|row| {
        row.chunks(64)
            .all(|tile| tile.windows(2).filter(|w| w[0] != w[1]).count() <= 1)
    }))
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
) {
    let dtype = if bf16 { DType::BF16 } else { DType::F16 };
    let case = draw(seed, batch, lk, lq_equal, HEADS[heads], d, dtype, kind).unwrap();
    let mut rng = Rng::new(seed ^ 0xf00d);
    let sk = 1 + case.mask.kv_segments().max_all().unwrap().to_scalar::<u32>().unwrap() as usize;
    let algorithms: &[MassAlgorithm] = if sk <= 64 {
        &[MassAlgorithm::Auto, MassAlgorithm::OnePass, MassAlgorithm::TwoPass]
    } else {
        &[MassAlgorithm::Auto, MassAlgorithm::TwoPass]
    };
    let opts = random_mass_options(&mut rng, algorithms);
    // Split-K sends even a small Sk through the LSE path (never with OnePass: an error).
    let kv_splits = if opts.algorithm == MassAlgorithm::OnePass {
        1
    } else {
        [1, 1, 2, 3][rng.below(4)]
    };
    let schedule = SCHEDULES[rng.below(SCHEDULES.len())];
    let wide = rng.below(2) == 0;
    check(&case, &opts, kv_splits, wide, schedule, seed).unwrap_or_else(|e| panic!("{}\n{e}", case.description));
}

proptest! {
    #![proptest_config(proptest_config(cases(48)))]

    #[test]
    fn emulated_fused_mass_matches_reference(
        seed in any::<u64>(),
        bf16 in any::<bool>(),
        d128 in any::<bool>(),
        batch in 1usize..=2,
        heads in 0usize..HEADS.len(),
        lk in 1usize..=200,
        lq_equal in any::<bool>(),
        kind in 0usize..MASK_KINDS.len(),
    ) {
        run_random_case(seed, bf16, if d128 { 128 } else { 64 }, batch, heads, lk, lq_equal, kind);
    }
}

proptest! {
    // A quarter of the cases: each costs twice a D = 128 one under the emulator.
    #![proptest_config(proptest_config(cases(48).div_ceil(4)))]

    /// D = 256: the forward kernel has no mass variant there, so the mass kernel's exact pass
    /// follows it with its LSE, whatever the algorithm.
    #[test]
    fn emulated_d256_fused_mass_matches_reference(
        seed in any::<u64>(),
        bf16 in any::<bool>(),
        batch in 1usize..=2,
        heads in 0usize..HEADS.len(),
        lk in 1usize..=200,
        lq_equal in any::<bool>(),
        kind in 0usize..MASK_KINDS.len(),
    ) {
        run_random_case(seed, bf16, 256, batch, heads, lk, lq_equal, kind);
    }
}

/// Every mask family in both head dims, whatever the draw: the in-kernel path (D = 128 reads Q
/// from shared memory; the 64-row and the 128 x 64 kernels), and the LSE path through TwoPass and
/// through split-K.
#[test]
fn every_mask_kind_both_paths() -> Result<()> {
    for kind in 0..MASK_KINDS.len() {
        for (i, (d, algorithm, splits, wide)) in [
            (128, MassAlgorithm::Auto, 1, false),
            (128, MassAlgorithm::Auto, 1, true),
            (64, MassAlgorithm::TwoPass, 1, false),
            (128, MassAlgorithm::Auto, 2, false),
        ]
        .into_iter()
        .enumerate()
        {
            let seed = 1000 + 10 * kind as u64 + i as u64;
            let case = draw(seed, 2, 150, true, (4, 2), d, DType::BF16, kind)?;
            let opts = SegmentScoreOptions::new().algorithm(algorithm);
            check(&case, &opts, splits, wide, Schedule::RandomWarp, seed)?;
        }
    }
    Ok(())
}

/// The wgmma kernel's fused mass (`segattn_fwd_hopper_mass_*`, the default on an H100 / H200)
/// gives the 64-row mma.sync mass kernel's bits under the emulator: the output, the LSE and every
/// per-row sum (the same operations in the same order, from the per-tile hook of its loop). Every
/// mask family, D 64 / 128, both dtypes, GQA, the one-pass kernel and the LSE path (TwoPass),
/// length-normalised or not. (Reductions over rows or heads add blocks' sums in whatever order
/// they finish: those are checked against the reference elsewhere, not bit for bit.)
#[test]
fn wgmma_fused_mass_gives_the_mma_sync_bits() -> Result<()> {
    for kind in 0..MASK_KINDS.len() {
        for (i, (d, dtype, lk, algorithm)) in [
            (128, DType::BF16, 150, MassAlgorithm::Auto),
            (64, DType::F16, 97, MassAlgorithm::Auto),
            (128, DType::F16, 70, MassAlgorithm::TwoPass),
        ]
        .into_iter()
        .enumerate()
        {
            let seed = 5000 + 10 * kind as u64 + i as u64;
            let case = draw(seed, 2, lk, i != 1, HEADS[i], d, dtype, kind)?;
            let opts = SegmentScoreOptions::new()
                .algorithm(algorithm)
                .normalize_by_length(i != 1);
            let what = format!("{} {opts:?}", case.description);
            let (q, k, v, mask) = (&case.q, &case.k, &case.v, &case.mask);
            let schedule = SCHEDULES[i];
            let mma = forward_with_mass_tiled(q, k, v, mask, opts.scale, &opts, 1, Tile::Rows64, schedule, seed)?;
            let wgmma = forward_with_mass_wgmma(q, k, v, mask, opts.scale, &opts, schedule, seed)?;
            assert_eq!(bits(&wgmma.out)?, bits(&mma.out)?, "{what}: output");
            assert_eq!(
                bits(wgmma.lse.as_ref().unwrap())?,
                bits(mma.lse.as_ref().unwrap())?,
                "{what}: LSE"
            );
            assert_eq!(
                bits(wgmma.segment_mass.as_ref().unwrap())?,
                bits(mma.segment_mass.as_ref().unwrap())?,
                "{what}: mass"
            );
        }
    }
    Ok(())
}

/// Segments of one token, at the one-pass limit (64 ids: 0..=63 in the accumulators) and just
/// beyond it (65: the LSE path), with a query reduction; causal single-token ids touch every
/// accumulator block within one key tile.
#[test]
fn single_token_segments_at_the_limit() -> Result<()> {
    let dev = &Device::Cpu;
    let mut rng = Rng::new(7);
    for l in [64usize, 65, 130] {
        for d in [64usize, 128] {
            let q = common::random_tensor(&mut rng, &[1, l, 2, d], DType::F16)?;
            let k = common::random_tensor(&mut rng, &[1, l, 1, d], DType::F16)?;
            let v = common::random_tensor(&mut rng, &[1, l, 1, d], DType::F16)?;
            let ids = Tensor::arange(0u32, l as u32, dev)?.reshape((1, l))?;
            let mask = SegmentMask::self_attention(&ids, PairRule::new(Visibility::Causal, Visibility::Causal))?;
            let case = Case {
                q,
                k,
                v,
                mask,
                description: format!("{l} single-token segments, D = {d}"),
            };
            check(&case, &SegmentScoreOptions::new(), 1, false, Schedule::HighFirst, 3)?;
            let reduced = SegmentScoreOptions::new()
                .query_reduction(QueryReduction::SumBySegment)
                .normalize_by_length(true);
            check(&case, &reduced, 1, false, Schedule::Forward, 4)?;
        }
    }
    Ok(())
}

/// Rows that see no key (a blocked segment) get zero mass on both paths, as they get a zero output.
#[test]
fn fully_masked_rows() -> Result<()> {
    let mask = common::cases::blocked_middle_segment()?;
    let mut rng = Rng::new(5);
    for (d, algorithm, wide) in [
        (128usize, MassAlgorithm::OnePass, false),
        (128, MassAlgorithm::OnePass, true),
        (64, MassAlgorithm::TwoPass, false),
    ] {
        let case = Case {
            q: common::random_tensor(&mut rng, &[2, 147, 2, d], DType::BF16)?,
            k: common::random_tensor(&mut rng, &[2, 147, 1, d], DType::BF16)?,
            v: common::random_tensor(&mut rng, &[2, 147, 1, d], DType::BF16)?,
            mask: mask.clone(),
            description: format!("blocked segment 1, D = {d}"),
        };
        let got = check(
            &case,
            &SegmentScoreOptions::new().algorithm(algorithm),
            1,
            wide,
            Schedule::Forward,
            0,
        )?;
        assert_eq!(got.narrow(2, 40, 50)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
    }
    Ok(())
}

/// The 128 x 64 kernel's rows' sums: key tiles inside one segment and across one boundary
/// (segments of 64 to 150 keys, a ragged last tile; two segments cut mid-tile), every reduction,
/// a scale that moves the softmax reference often; at its segment limit (29 segments) and past
/// it, and with segments too short for it (a tile across three), where the 64-row kernel takes
/// the mass (`check` asserts which kernel's output it got).
#[test]
fn wide_kernel_rows_sums() -> Result<()> {
    let dev = &Device::Cpu;
    let mut rng = Rng::new(11);
    // A large scale spreads the scores: the softmax reference moves often, and the rows' sums
    // are rescaled with it.
    let options = [
        SegmentScoreOptions::new().scale(0.5),
        SegmentScoreOptions::new()
            .query_reduction(QueryReduction::MeanBySegment)
            .normalize_by_length(true),
        SegmentScoreOptions::new().head_reduction(segattn::HeadReduction::Sum),
    ];
    let runs = |lens: &[usize]| -> Vec<u32> {
        lens.iter()
            .enumerate()
            .flat_map(|(id, &n)| std::iter::repeat_n(id as u32, n))
            .collect()
    };
    let mut ragged = Vec::new();
    while ragged.iter().sum::<usize>() < 600 {
        ragged.push(64 + rng.below(87));
    }
    let mut short = Vec::new();
    while short.iter().sum::<usize>() < 147 {
        short.push(1 + rng.below(9));
    }
    let layouts = [
        (runs(&ragged), "segments of 64 to 150 keys"),
        (runs(&[100, 47]), "two segments cut mid-tile"),
        (
            runs(&[2; WIDE_MASS_MAX_SEGMENTS]),
            "29 segments of 2 keys (tiles of 29 segments: 64-row kernel)",
        ),
        (runs(&short), "runs of 1 to 9 keys (64-row kernel)"),
        (
            runs(&[64; WIDE_MASS_MAX_SEGMENTS + 1]),
            "30 segments of 64 keys (64-row kernel)",
        ),
    ];
    for (i, (ids, what)) in layouts.into_iter().enumerate() {
        let l = ids.len();
        let ids = Tensor::from_vec(ids, (1, l), dev)?;
        let rules = [
            PairRule::new(Visibility::Causal, Visibility::Full),
            PairRule::new(Visibility::Full, Visibility::Blocked),
        ];
        for (j, rule) in rules.into_iter().enumerate() {
            // The long layout once (the emulator's most expensive case here).
            if l > 1000 && j > 0 {
                continue;
            }
            let mask = SegmentMask::self_attention(&ids, rule)?;
            let case = Case {
                q: common::random_tensor(&mut rng, &[1, l, 4, 128], DType::BF16)?,
                k: common::random_tensor(&mut rng, &[1, l, 2, 128], DType::BF16)?,
                v: common::random_tensor(&mut rng, &[1, l, 2, 128], DType::BF16)?,
                mask,
                description: format!("{what}, rule {j}"),
            };
            let opts = &options[(i + j) % options.len()];
            check(
                &case,
                opts,
                1,
                true,
                SCHEDULES[(i + j) % SCHEDULES.len()],
                20 + i as u64,
            )?;
        }
    }
    Ok(())
}

/// OnePass beyond the forward kernel's 64 accumulators, or with split-K, is a clear error.
#[test]
fn one_pass_limits() -> Result<()> {
    let dev = &Device::Cpu;
    let ids = Tensor::arange(0u32, 100, dev)?.reshape((1, 100))?;
    let mask = SegmentMask::self_attention(&ids, PairRule::new(Visibility::Full, Visibility::Full))?;
    let x = Tensor::ones((1, 100, 1, 64), DType::BF16, dev)?;
    let one_pass = SegmentScoreOptions::new().algorithm(MassAlgorithm::OnePass);
    let e = forward_with_mass(&x, &x, &x, &mask, None, &one_pass, 1, Schedule::Forward, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("algorithm") && e.contains("64") && e.contains("100"), "{e}");
    let few = SegmentMask::self_attention(
        &Tensor::zeros((1, 100), DType::U32, dev)?,
        PairRule::new(Visibility::Causal, Visibility::Blocked),
    )?;
    let e = forward_with_mass(&x, &x, &x, &few, None, &one_pass, 2, Schedule::Forward, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("algorithm") && e.contains("split-K"), "{e}");
    Ok(())
}
