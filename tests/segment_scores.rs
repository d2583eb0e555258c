//! The per-segment attention mass: the fused CPU op (`segment_scores`, both algorithms) and the
//! attention's fused mass output against the f64 reference (`reference::segment_mass`), on random
//! shapes, segmentations, masks, options, dtypes and GQA; plus the invariants (rows sum to 1 or
//! are empty) and the large-`Sk` path (single-token segments, Sk in the thousands).
//!
//! `SEGATTN_CASES=n` sets the number of random cases (default 96).

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::cases::{draw, Case, MASK_KINDS};
use common::{
    bits, env_count, mass_tolerance, mass_tolerance_for, proptest_config, random_mass_options, worst_ratio, Rng,
};
use proptest::prelude::*;
use segattn::{
    reference, segment_scores, HeadReduction, MassAlgorithm, PairRule, QueryReduction, SegmentAttention, SegmentMask,
    SegmentScoreOptions, Visibility,
};

const HEADS: [(usize, usize); 5] = [(1, 1), (2, 1), (4, 2), (3, 3), (6, 2)];
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
const ALGORITHMS: [MassAlgorithm; 3] = [MassAlgorithm::Auto, MassAlgorithm::OnePass, MassAlgorithm::TwoPass];

fn cases() -> u32 {
    env_count("SEGATTN_CASES").unwrap_or(96)
}

fn assert_close(got: &Tensor, want: &Tensor, tol: (f64, f64), what: &str) -> Result<()> {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    assert_eq!(got.dtype(), DType::F32, "{what}: dtype");
    let (r, at) = worst_ratio(got, want, tol.0, tol.1)?;
    if r > 1.0 {
        let g = got.flatten_all()?.to_vec1::<f32>()?[at];
        let w = want.flatten_all()?.to_vec1::<f64>()?[at];
        let d = got.dims();
        let (s, i, h, b) = (
            at % d[3],
            (at / d[3]) % d[2],
            (at / (d[3] * d[2])) % d[1],
            at / (d[3] * d[2] * d[1]),
        );
        panic!("{what}: off by {r:.2} x tolerance at [{b}, {h}, {i}, {s}]: got {g}, want {w} (tol {tol:?})");
    }
    Ok(())
}

/// The standalone op against the reference.
fn check(case: &Case, opts: &SegmentScoreOptions) -> Result<Tensor> {
    let got = segment_scores(&case.q, &case.k, &case.mask, opts)?;
    let want = reference::segment_mass(&case.q, &case.k, &case.mask, opts)?;
    let (_, lq, h, _) = case.q.dims4()?;
    let tol = mass_tolerance_for(case.q.dtype(), opts, lq, h);
    assert_close(&got, &want, tol, &format!("{} {opts:?}", case.description))?;
    Ok(got)
}

/// The attention's fused mass output against the reference and against the standalone op; the
/// attention's own outputs must not change.
fn check_fused(case: &Case, opts: &SegmentScoreOptions) -> Result<()> {
    let scale = opts.scale;
    let mut plain = SegmentAttention::new(&case.mask).return_lse(true);
    if let Some(s) = scale {
        plain = plain.scale(s);
    }
    let with_mass = plain.clone().return_segment_mass(*opts);
    let a = plain.forward(&case.q, &case.k, &case.v)?;
    let b = with_mass.forward(&case.q, &case.k, &case.v)?;
    assert!(a.segment_mass.is_none());
    assert_eq!(
        bits(&a.out)?,
        bits(&b.out)?,
        "{}: the mass changed the output",
        case.description
    );
    assert_eq!(
        bits(a.lse.as_ref().unwrap())?,
        bits(b.lse.as_ref().unwrap())?,
        "{}: the mass changed the LSE",
        case.description
    );
    let fused = b.segment_mass.expect("asked for");
    let want = reference::segment_mass(&case.q, &case.k, &case.mask, opts)?;
    let (_, lq, h, _) = case.q.dims4()?;
    let tol = mass_tolerance_for(case.q.dtype(), opts, lq, h);
    let what = format!("{} {opts:?}", case.description);
    assert_close(&fused, &want, tol, &format!("fused: {what}"))?;
    let standalone = segment_scores(&case.q, &case.k, &case.mask, opts)?;
    // Both in f32 over the same probabilities: much closer to each other than to the reference.
    let (atol, rtol) = (tol.0 / 4.0, tol.1 / 4.0);
    assert_close(
        &fused,
        &standalone.to_dtype(DType::F64)?,
        (atol, rtol),
        &format!("fused vs standalone: {what}"),
    )?;
    Ok(())
}

proptest! {
    #![proptest_config(proptest_config(cases()))]

    #[test]
    fn fused_attention_mass_matches_reference_and_standalone(
        seed in any::<u64>(),
        batch in 1usize..=3,
        lk in 1usize..=300,
        lq_equal in any::<bool>(),
        heads in prop::sample::select(HEADS.to_vec()),
        head_dim in (1usize..=16).prop_map(|m| 8 * m),
        dtype in prop::sample::select(DTYPES.to_vec()),
        kind in 0..MASK_KINDS.len(),
    ) {
        let case = draw(seed, batch, lk, lq_equal, heads, head_dim, dtype, kind).unwrap();
        let opts = random_mass_options(&mut Rng::new(seed ^ 0xfeed), &ALGORITHMS);
        check_fused(&case, &opts).unwrap();
    }

    #[test]
    fn fused_cpu_scores_match_reference(
        seed in any::<u64>(),
        batch in 1usize..=3,
        lk in 1usize..=300,
        lq_equal in any::<bool>(),
        heads in prop::sample::select(HEADS.to_vec()),
        head_dim in (1usize..=16).prop_map(|m| 8 * m),
        dtype in prop::sample::select(DTYPES.to_vec()),
        kind in 0..MASK_KINDS.len(),
    ) {
        let case = draw(seed, batch, lk, lq_equal, heads, head_dim, dtype, kind).unwrap();
        let opts = random_mass_options(&mut Rng::new(seed ^ 0x5ca1ab1e), &ALGORITHMS);
        check(&case, &opts).unwrap();
    }
}

/// Both algorithms, every mask kind, every dtype: the same result.
#[test]
fn one_pass_and_two_pass_agree() -> Result<()> {
    for kind in 0..MASK_KINDS.len() {
        for (n, dtype) in DTYPES.into_iter().enumerate() {
            let case = draw(
                kind as u64 * 3 + n as u64,
                2,
                190,
                kind % 2 == 0,
                (4, 2),
                64,
                dtype,
                kind,
            )?;
            let one = check(&case, &SegmentScoreOptions::new().algorithm(MassAlgorithm::OnePass))?;
            let two = check(&case, &SegmentScoreOptions::new().algorithm(MassAlgorithm::TwoPass))?;
            let (r, _) = worst_ratio(&one, &two.to_dtype(DType::F64)?, 1e-6, 1e-5)?;
            assert!(r <= 1.0, "{}: one pass and two passes differ ({r})", case.description);
        }
    }
    Ok(())
}

/// Before normalisation every row sums to 1, or to exactly 0 when it sees no key (the
/// reference's LSE is -inf there).
#[test]
fn rows_sum_to_one_or_zero() -> Result<()> {
    for kind in 0..MASK_KINDS.len() {
        for algorithm in ALGORITHMS {
            let case = draw(100 + kind as u64, 2, 150, true, (3, 1), 32, DType::BF16, kind)?;
            let mass = segment_scores(
                &case.q,
                &case.k,
                &case.mask,
                &SegmentScoreOptions::new().algorithm(algorithm),
            )?;
            let sums = mass.sum(3)?.flatten_all()?.to_vec1::<f32>()?;
            let lse = reference::attention(&case.q, &case.k, &case.v, &case.mask, None)?
                .lse
                .flatten_all()?
                .to_vec1::<f64>()?;
            for (i, (&s, &l)) in sums.iter().zip(&lse).enumerate() {
                if l == f64::NEG_INFINITY {
                    assert_eq!(s, 0.0, "{}: empty row {i} sums to {s}", case.description);
                } else {
                    assert!((s - 1.0).abs() < 1e-5, "{}: row {i} sums to {s}", case.description);
                }
            }
        }
    }
    Ok(())
}

/// Single-token segments at L = 2500: Sk = 2500, the two-pass path (Auto) and the one-pass path,
/// against the reference; the output is indexed by ids.
#[test]
fn thousands_of_segments() -> Result<()> {
    let dev = Device::Cpu;
    let l = 2500;
    let mut rng = Rng::new(2500);
    let q = common::random_tensor(&mut rng, &[1, l, 2, 32], DType::F32)?;
    let k = common::random_tensor(&mut rng, &[1, l, 1, 32], DType::F32)?;
    let ids = Tensor::arange(0u32, l as u32, &dev)?.reshape((1, l))?;
    let mask = SegmentMask::self_attention(&ids, PairRule::new(Visibility::Causal, Visibility::Causal))?;
    let opts = SegmentScoreOptions::new().normalize_by_length(true);
    let want = reference::segment_mass(&q, &k, &mask, &opts)?;
    assert_eq!(want.dims(), &[1, 2, l, l]);
    for algorithm in [MassAlgorithm::Auto, MassAlgorithm::OnePass] {
        let got = segment_scores(&q, &k, &mask, &opts.algorithm(algorithm))?;
        assert_close(
            &got,
            &want,
            mass_tolerance(DType::F32),
            &format!("single tokens {algorithm:?}"),
        )?;
    }
    // Query reduction over 2500 single-token query segments and a head mean.
    let opts = opts
        .query_reduction(QueryReduction::MeanBySegment)
        .head_reduction(HeadReduction::Mean);
    let got = segment_scores(&q, &k, &mask, &opts)?;
    let want = reference::segment_mass(&q, &k, &mask, &opts)?;
    assert_close(&got, &want, mass_tolerance(DType::F32), "single tokens, reduced")?;
    Ok(())
}

/// One segment (Sk = 1): every visible row puts all its mass on segment 0.
#[test]
fn one_segment() -> Result<()> {
    let case = draw(5, 2, 130, true, (2, 1), 16, DType::F32, 0)?; // causal: one id
    let mass = check(&case, &SegmentScoreOptions::new())?;
    assert_eq!(mass.dims(), &[2, 2, 130, 1]);
    let v = mass.flatten_all()?.to_vec1::<f32>()?;
    assert!(v.iter().all(|&x| (x - 1.0).abs() < 1e-5));
    Ok(())
}

/// `Sk` and `Sq` are ids: sparse ids give zero columns and rows; fixed sizes are honoured and
/// checked.
#[test]
fn axes_are_ids() -> Result<()> {
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[1u32, 1, 1, 4, 4, 7, 7, 7]], &dev)?;
    let mask = SegmentMask::self_attention(&ids, PairRule::new(Visibility::Full, Visibility::Full))?;
    let mut rng = Rng::new(9);
    let q = common::random_tensor(&mut rng, &[1, 8, 2, 16], DType::F32)?;
    let k = common::random_tensor(&mut rng, &[1, 8, 2, 16], DType::F32)?;
    let opts = SegmentScoreOptions::new().query_reduction(QueryReduction::SumBySegment);
    let m = segment_scores(&q, &k, &mask, &opts)?;
    assert_eq!(m.dims(), &[1, 2, 8, 8]);
    let m = m.squeeze(0)?.to_vec3::<f32>()?;
    for head in &m {
        for s in [0usize, 2, 3, 5, 6] {
            assert!(head[s].iter().all(|&x| x == 0.0), "query id {s} has no row");
            assert!(head.iter().all(|row| row[s] == 0.0), "key id {s} has no key");
        }
        // Query id 1 has 3 rows, each summing to 1.
        assert!((head[1].iter().sum::<f32>() - 3.0).abs() < 1e-5);
    }
    let fixed = segment_scores(&q, &k, &mask, &opts.num_key_segments(10).num_query_segments(9))?;
    assert_eq!(fixed.dims(), &[1, 2, 9, 10]);
    let e = segment_scores(&q, &k, &mask, &opts.num_key_segments(7))
        .unwrap_err()
        .to_string();
    assert!(e.contains("num_key_segments") && e.contains("max id 7"), "{e}");
    let e = segment_scores(&q, &k, &mask, &opts.num_query_segments(3))
        .unwrap_err()
        .to_string();
    assert!(e.contains("num_query_segments"), "{e}");
    Ok(())
}

/// PINE's segment-query importance, written as a mask: each segment's queries see only the OTHER
/// segments (prefix, suffix and their own segment blocked), length-normalised, summed over the
/// query segment.
#[test]
fn pine_importance_by_mask() -> Result<()> {
    let dev = Device::Cpu;
    let (prefix, segs, suffix) = (8usize, [20usize, 13, 31, 9], 6usize);
    let n = segs.len();
    let layout = segattn::PineLayout::new(prefix, &segs, suffix);
    let attn_mask = SegmentMask::pine(prefix, &segs, suffix, &dev)?;
    // Scores mask: segment queries see the other segments fully, nothing else.
    let b = Some(Visibility::Blocked);
    let f = Some(Visibility::Full);
    let rows: Vec<Vec<Option<Visibility>>> = (0..n + 2)
        .map(|qi| {
            (0..n + 2)
                .map(|ki| {
                    if (1..=n).contains(&qi) && (1..=n).contains(&ki) && qi != ki {
                        f
                    } else {
                        b
                    }
                })
                .collect()
        })
        .collect();
    let table = segattn::PairTable::from_rules(&rows, &dev)?;
    let score_mask = SegmentMask::self_attention(
        attn_mask.kv_segments(),
        PairRule::new(Visibility::Blocked, Visibility::Blocked).with_table(table),
    )?;
    let mut rng = Rng::new(77);
    let l = layout.len();
    let q = common::random_tensor(&mut rng, &[1, l, 4, 64], DType::BF16)?;
    let k = common::random_tensor(&mut rng, &[1, l, 2, 64], DType::BF16)?;
    let opts = SegmentScoreOptions::new()
        .normalize_by_length(true)
        .query_reduction(QueryReduction::SumBySegment);
    let case = Case {
        v: k.clone(),
        q,
        k,
        mask: score_mask,
        description: "pine importance".into(),
    };
    let m = check(&case, &opts)?;
    assert_eq!(m.dims(), &[1, 4, n + 2, n + 2]);
    // I[i, j] = 0 on the diagonal, prefix and suffix; rows of segment queries carry mass.
    let m = m.squeeze(0)?.to_vec3::<f32>()?;
    for head in &m {
        for i in 1..=n {
            assert_eq!(head[i][i], 0.0);
            assert_eq!(head[i][0], 0.0);
            assert_eq!(head[i][n + 1], 0.0);
            let total: f32 = (1..=n).map(|j| head[i][j] * segs[j - 1] as f32).sum();
            assert!((total - segs[i - 1] as f32).abs() < 1e-2, "row {i}: {total}");
        }
        assert!(head[0].iter().all(|&x| x == 0.0));
    }
    Ok(())
}

/// The fused output under every mask kind and every reduction, and at Sk in the thousands.
#[test]
fn fused_every_mask_kind_and_option() -> Result<()> {
    let mut rng = Rng::new(31);
    for kind in 0..MASK_KINDS.len() {
        for n in 0..3 {
            let case = draw(
                300 + 3 * kind as u64 + n,
                2,
                170,
                n != 1,
                (4, 2),
                48,
                DTYPES[n as usize],
                kind,
            )?;
            check_fused(&case, &random_mass_options(&mut rng, &ALGORITHMS))?;
        }
    }
    let dev = Device::Cpu;
    let l = 2100;
    let q = common::random_tensor(&mut rng, &[1, l, 2, 16], DType::BF16)?;
    let k = common::random_tensor(&mut rng, &[1, l, 1, 16], DType::BF16)?;
    let ids = Tensor::arange(0u32, l as u32, &dev)?.reshape((1, l))?;
    let mask = SegmentMask::self_attention(&ids, PairRule::new(Visibility::Causal, Visibility::Causal))?;
    let case = Case {
        v: k.clone(),
        q,
        k,
        mask,
        description: "single tokens L 2100".into(),
    };
    check_fused(&case, &SegmentScoreOptions::new().head_reduction(HeadReduction::Mean))?;
    Ok(())
}

/// Decode and chunked prefill (Lq < Lk, bottom-right aligned) with cache ids.
#[test]
fn decode_and_chunks() -> Result<()> {
    for lq in [1, 2, 63, 65] {
        for kind in [2, 5, 6] {
            let case = draw(lq as u64 * 7 + kind as u64, 2, 220, true, (8, 2), 64, DType::F16, kind)?;
            let mask = case.mask.last_queries(lq)?;
            let q = case.q.narrow(1, 220 - lq, lq)?;
            let case = Case { q, mask, ..case };
            let mut rng = Rng::new(lq as u64);
            for _ in 0..3 {
                check(&case, &random_mass_options(&mut rng, &ALGORITHMS))?;
            }
        }
    }
    Ok(())
}

/// Strided views are read in place and give the same result.
#[test]
fn strided_views() -> Result<()> {
    let case = draw(12, 2, 140, true, (4, 2), 64, DType::F32, 5)?;
    let q = case.q.transpose(1, 2)?.contiguous()?.transpose(1, 2)?;
    let k = Tensor::cat(&[&case.k, &case.k], 2)?.narrow(2, 2, 2)?;
    assert!(!q.is_contiguous() && !k.is_contiguous());
    check(
        &Case { q, k, ..case },
        &SegmentScoreOptions::new().head_reduction(HeadReduction::Sum),
    )?;
    Ok(())
}

/// Invalid inputs are errors naming the argument.
#[test]
fn errors() -> Result<()> {
    let dev = Device::Cpu;
    let mask = SegmentMask::causal(8, &dev)?;
    let q = Tensor::ones((1, 8, 4, 16), DType::F32, &dev)?;
    let k = Tensor::ones((1, 8, 3, 16), DType::F32, &dev)?;
    let e = segment_scores(&q, &k, &mask, &SegmentScoreOptions::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("k:") && e.contains("GQA"), "{e}");
    let k = Tensor::ones((1, 8, 2, 16), DType::F16, &dev)?;
    let e = segment_scores(&q, &k, &mask, &SegmentScoreOptions::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("k:") && e.contains("dtype"), "{e}");
    let k = Tensor::ones((1, 8, 2, 16), DType::F32, &dev)?;
    let e = segment_scores(&q, &k, &mask, &SegmentScoreOptions::new().scale(f64::NAN))
        .unwrap_err()
        .to_string();
    assert!(e.contains("scale"), "{e}");
    let short = SegmentMask::causal(7, &dev)?;
    let e = segment_scores(&q, &k, &short, &SegmentScoreOptions::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("q_segments"), "{e}");
    // The attention's fused output with a different scale.
    let e = SegmentAttention::new(&mask)
        .scale(0.5)
        .return_segment_mass(SegmentScoreOptions::new().scale(0.25))
        .forward(&q, &k, &k)
        .unwrap_err()
        .to_string();
    assert!(e.contains("scale") && e.contains("return_segment_mass"), "{e}");
    // A segment axis past the cap, asked for or implied by a sparse id: an error, not an
    // allocation of terabytes that aborts the process.
    let too_many = segattn::MAX_SEGMENT_AXIS + 1;
    let e = segment_scores(&q, &k, &mask, &SegmentScoreOptions::new().num_key_segments(too_many))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("num_key_segments") && e.contains(&format!("got {too_many}")),
        "{e}"
    );
    let sparse = Tensor::new(
        &[[
            0u32,
            0,
            0,
            0,
            4_000_000_000,
            4_000_000_000,
            4_000_000_000,
            4_000_000_000,
        ]],
        &dev,
    )?;
    let sparse = SegmentMask::self_attention(&sparse, PairRule::new(Visibility::Causal, Visibility::Full))?;
    let e = segment_scores(&q, &k, &sparse, &SegmentScoreOptions::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("kv_segments dense") && e.contains("got 4000000001"), "{e}");
    Ok(())
}

/// The reference on a case small enough to compute by hand: one query, three keys in segments
/// 0, 0, 2 with scores 0, ln 2, ln 5 (scale 1): P = (1, 2, 5) / 8.
#[test]
fn reference_by_hand() -> Result<()> {
    let dev = Device::Cpu;
    let q = Tensor::new(&[[[[1f32, 0.0]]]], &dev)?; // [1, 1, 1, 2]
    let k = Tensor::new(&[[[[0f32, 0.0]], [[2f32.ln(), 0.0]], [[5f32.ln(), 0.0]]]], &dev)?; // [1, 3, 1, 2]
    let q_ids = Tensor::new(&[[0u32]], &dev)?;
    let k_ids = Tensor::new(&[[0u32, 0, 2]], &dev)?;
    let mask = SegmentMask::new(&q_ids, &k_ids, PairRule::new(Visibility::Full, Visibility::Full))?;
    let opts = SegmentScoreOptions::new().scale(1.0);
    let m = reference::segment_mass(&q, &k, &mask, &opts)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let want = [3.0 / 8.0, 0.0, 5.0 / 8.0];
    assert!(m.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-7), "{m:?}");
    let n = reference::segment_mass(&q, &k, &mask, &opts.normalize_by_length(true))?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let want = [3.0 / 16.0, 0.0, 5.0 / 8.0];
    assert!(n.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-7), "{n:?}");
    let got = segment_scores(&q, &k, &mask, &opts)?.flatten_all()?.to_vec1::<f32>()?;
    assert!(
        got.iter().zip(m).all(|(&a, b)| (f64::from(a) - b).abs() < 1e-6),
        "{got:?}"
    );
    Ok(())
}

/// No key at all (Sk = 0, or a fixed Sk with zero rows) and no query: empty or zero outputs, no
/// panic, on every path.
#[test]
fn empty_inputs() -> Result<()> {
    let dev = Device::Cpu;
    let rule = PairRule::new(Visibility::Full, Visibility::Full);
    let q = Tensor::ones((1, 5, 2, 16), DType::F32, &dev)?;
    let k = Tensor::ones((1, 0, 2, 16), DType::F32, &dev)?;
    let mask = SegmentMask::new(
        &Tensor::zeros((1, 5), DType::U32, &dev)?,
        &Tensor::zeros((1, 0), DType::U32, &dev)?,
        rule.clone(),
    )?;
    let m = segment_scores(&q, &k, &mask, &SegmentScoreOptions::new())?;
    assert_eq!(m.dims(), &[1, 2, 5, 0]);
    let m = segment_scores(&q, &k, &mask, &SegmentScoreOptions::new().num_key_segments(3))?;
    assert_eq!(m.dims(), &[1, 2, 5, 3]);
    assert_eq!(m.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
    let r = SegmentAttention::new(&mask)
        .return_segment_mass(SegmentScoreOptions::new().num_key_segments(2))
        .forward(&q, &k, &k)?;
    assert_eq!(r.segment_mass.unwrap().abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
    // No query.
    let q0 = Tensor::ones((1, 0, 2, 16), DType::F32, &dev)?;
    let k4 = Tensor::ones((1, 4, 2, 16), DType::F32, &dev)?;
    let mask = SegmentMask::new(
        &Tensor::zeros((1, 0), DType::U32, &dev)?,
        &Tensor::new(&[[0u32, 0, 1, 1]], &dev)?,
        rule,
    )?;
    let m = segment_scores(&q0, &k4, &mask, &SegmentScoreOptions::new())?;
    assert_eq!(m.dims(), &[1, 2, 0, 2]);
    let m = segment_scores(
        &q0,
        &k4,
        &mask,
        &SegmentScoreOptions::new().query_reduction(QueryReduction::MeanBySegment),
    )?;
    assert_eq!(m.dims(), &[1, 2, 0, 2]);
    Ok(())
}
