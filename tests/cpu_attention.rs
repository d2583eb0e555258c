//! The fused CPU attention against the f64 reference, on random cases.

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::cases::{draw, Case, MASK_KINDS};
use common::{env_count, lse_tolerance, tolerance, worst_ratio};
use proptest::prelude::*;
use segattn::{reference, SegmentAttention, SegmentMask};

const HEADS: [(usize, usize); 6] = [(1, 1), (2, 1), (4, 2), (3, 3), (6, 2), (8, 1)];
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn check(case: &Case, scale: Option<f64>) -> Result<()> {
    let dtype = case.q.dtype();
    let mut attn = SegmentAttention::new(&case.mask).return_lse(true);
    if let Some(s) = scale {
        attn = attn.scale(s);
    }
    let got = attn.forward(&case.q, &case.k, &case.v)?;
    let want = reference::attention(&case.q, &case.k, &case.v, &case.mask, scale)?;
    assert_eq!(got.out.dims(), case.q.dims(), "{}", case.description);
    assert_eq!(got.out.dtype(), dtype, "{}", case.description);
    let (atol, rtol) = tolerance(dtype);
    let (r, at) = worst_ratio(&got.out, &want.out, atol, rtol)?;
    assert!(
        r <= 1.0,
        "{}: output off by {r} x tolerance at flat index {at}",
        case.description
    );
    let lse = got.lse.expect("lse was asked for");
    let (r, at) = worst_ratio(&lse, &want.lse, lse_tolerance(dtype), 0.0)?;
    assert!(
        r <= 1.0,
        "{}: lse off by {r} x tolerance at flat index {at}",
        case.description
    );
    Ok(())
}

fn cases() -> u32 {
    env_count("SEGATTN_CASES").unwrap_or(96)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn fused_cpu_matches_reference(
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
        check(&case, None).unwrap();
    }
}

#[test]
fn every_mask_kind_and_dtype_at_head_dim_256() -> Result<()> {
    for kind in 0..MASK_KINDS.len() {
        for dtype in DTYPES {
            let case = draw(kind as u64 + 7, 2, 131, kind % 2 == 0, (4, 2), 256, dtype, kind)?;
            check(&case, None)?;
        }
    }
    Ok(())
}

#[test]
fn custom_scale_and_odd_head_dims() -> Result<()> {
    for (d, kind) in [(1, 0), (3, 5), (17, 7), (72, 2), (200, 6)] {
        let case = draw(d as u64, 1, 97, true, (2, 1), d, DType::F32, kind)?;
        check(&case, Some(0.37))?;
    }
    Ok(())
}

#[test]
fn strided_views_need_no_copy_and_match() -> Result<()> {
    // q, k, v as views: a [B, H, L, D] tensor transposed to [B, L, H, D], and a narrowed slice.
    let case = draw(11, 2, 150, true, (4, 2), 64, DType::F32, 5)?;
    let q_t = case.q.transpose(1, 2)?.contiguous()?.transpose(1, 2)?;
    assert!(!q_t.is_contiguous());
    let k_wide = Tensor::cat(&[&case.k, &case.k], 3)?;
    let k_view = k_wide.narrow(3, 0, 64)?;
    let v_wide = Tensor::cat(&[&case.v, &case.v], 2)?;
    let v_view = v_wide.narrow(2, 2, 2)?;
    let view_case = Case {
        q: q_t,
        k: k_view,
        v: v_view,
        mask: case.mask.clone(),
        description: "views".into(),
    };
    check(&view_case, None)
}

#[test]
fn rows_that_see_nothing_give_zero_and_minus_infinity() -> Result<()> {
    // Lq > Lk is allowed: the first rows sit before every key and see nothing under causal.
    let dev = Device::Cpu;
    let mut rng = common::Rng::new(3);
    let q = common::random_tensor(&mut rng, &[1, 10, 2, 32], DType::F32)?;
    let k = common::random_tensor(&mut rng, &[1, 4, 2, 32], DType::F32)?;
    let v = common::random_tensor(&mut rng, &[1, 4, 2, 32], DType::F32)?;
    let ids_q = Tensor::zeros((1, 10), DType::U32, &dev)?;
    let ids_k = Tensor::zeros((1, 4), DType::U32, &dev)?;
    let mask = SegmentMask::new(
        &ids_q,
        &ids_k,
        segattn::PairRule::new(segattn::Visibility::Causal, segattn::Visibility::Blocked),
    )?;
    let got = SegmentAttention::new(&mask).return_lse(true).forward(&q, &k, &v)?;
    let out = got
        .out
        .to_vec3::<f32>()
        .map(|_| ())
        .or_else(|_| Ok::<(), candle_core::Error>(()));
    out?;
    let lse = got.lse.unwrap().flatten_all()?.to_vec1::<f32>()?;
    // Rows 0..6 are at positions -6..-1: nothing visible.
    for h in 0..2 {
        for i in 0..10 {
            let l = lse[h * 10 + i];
            if i < 6 {
                assert_eq!(l, f32::NEG_INFINITY, "row {i}");
            } else {
                assert!(l.is_finite(), "row {i}");
            }
        }
    }
    let o = got.out.flatten_all()?.to_vec1::<f32>()?;
    assert!(o.iter().all(|x| !x.is_nan()));
    assert!(o[..6 * 2 * 32].iter().all(|&x| x == 0.0));
    let case = Case {
        q,
        k,
        v,
        mask,
        description: "lq > lk".into(),
    };
    check(&case, None)
}

/// A GQA decode step (one query row, H > Hkv) runs packed on the CPU (the P query heads of a KV
/// head as the rows of one work item, as on the GPU): bitwise the same output and LSE as the same
/// step with K and V repeated to H heads (unpacked: no GQA), for every mask kind and both dtypes.
#[test]
fn packed_gqa_decode_is_bitwise_unpacked() -> Result<()> {
    for kind in 0..MASK_KINDS.len() {
        for (i, dtype) in [DType::BF16, DType::F32].into_iter().enumerate() {
            let case = draw(7 * kind as u64 + i as u64, 2, 150, true, (8, 2), 64, dtype, kind)?;
            let mask = case.mask.last_queries(1)?;
            let q = case.q.narrow(1, 149, 1)?;
            let repeat = |t: &Tensor| -> Result<Tensor> {
                let (b, l, hkv, d) = t.dims4()?;
                t.unsqueeze(3)?.repeat((1, 1, 1, 4, 1))?.reshape((b, l, hkv * 4, d))
            };
            let op = SegmentAttention::new(&mask).return_lse(true);
            let packed = op.forward(&q, &case.k, &case.v)?;
            let unpacked = op.forward(&q, &repeat(&case.k)?, &repeat(&case.v)?)?;
            let at = format!("{} {dtype:?}", case.description);
            assert!(
                common::bits(&packed.out)? == common::bits(&unpacked.out)?,
                "{at}: output"
            );
            let (pl, ul) = (packed.lse.unwrap(), unpacked.lse.unwrap());
            assert!(common::bits(&pl)? == common::bits(&ul)?, "{at}: lse");
        }
    }
    Ok(())
}

/// A call with one query tile per head and fewer (batch row, head) items than twice the threads
/// (an MQA decode step above all) is split over its keys in chunks of at least 512 keys and 8 M
/// multiply-adds, whose partial results are merged at the end. Forced here by a pool of 8
/// threads: every mask kind (some hide whole chunks, `empty_rows` has rows that see nothing),
/// every dtype, MQA decode steps (packed: 16 or 32 rows) and 40 or 64 query rows of one or two
/// heads, two to five chunks; against the reference, and against the same call unsplit (one
/// thread).
#[test]
fn split_key_calls_match_reference_and_unsplit() -> Result<()> {
    let pool = |threads: usize| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let (split, whole) = (pool(8), pool(1));
    let mut drawn = 0u64;
    for kind in 0..MASK_KINDS.len() {
        for (dtype, heads, lq, d) in [
            (DType::F32, (16, 1), 1, 128),
            (DType::BF16, (32, 1), 1, 64),
            (DType::F16, (3, 1), 40, 128),
            (DType::F32, (2, 2), 64, 64),
        ] {
            drawn += 1;
            let lk = 4200 + (drawn as usize * 137) % 900;
            let case = draw(drawn * 31 + kind as u64, 1, lk, true, heads, d, dtype, kind)?;
            let mask = case.mask.last_queries(lq)?;
            let q = case.q.narrow(1, lk - lq, lq)?;
            let case = Case {
                q,
                mask,
                description: format!("{} (last {lq} rows)", case.description),
                ..case
            };
            split.install(|| check(&case, None))?;
            let op = SegmentAttention::new(&case.mask).return_lse(true);
            let (a, b) = (
                split.install(|| op.forward(&case.q, &case.k, &case.v))?,
                whole.install(|| op.forward(&case.q, &case.k, &case.v))?,
            );
            let (atol, rtol) = tolerance(dtype);
            let (r, at) = worst_ratio(&a.out, &b.out, atol, rtol)?;
            assert!(
                r <= 1.0,
                "{}: split vs unsplit output off by {r} x tolerance at {at}",
                case.description
            );
            let (r, at) = worst_ratio(&a.lse.unwrap(), &b.lse.unwrap(), lse_tolerance(dtype), 0.0)?;
            assert!(
                r <= 1.0,
                "{}: split vs unsplit lse off by {r} x tolerance at {at}",
                case.description
            );
        }
    }
    Ok(())
}

/// The split call's merge keeps NaN where the unsplit pass has it: a NaN key in the first chunk
/// makes the decode row that sees it NaN (output and LSE), however the other chunks went.
#[test]
fn split_key_calls_keep_nan_rows_nan() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = common::Rng::new(9);
    let (lk, d) = (4500, 64);
    let q = common::random_tensor(&mut rng, &[1, 1, 32, d], DType::F32)?;
    let mut k = common::random_tensor(&mut rng, &[1, lk, 1, d], DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    k[100 * d + 3] = f32::NAN;
    let k = Tensor::from_vec(k, (1, lk, 1, d), &dev)?;
    let v = common::random_tensor(&mut rng, &[1, lk, 1, d], DType::F32)?;
    let mask = SegmentMask::causal(lk, &dev)?.last_queries(1)?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(8).build().unwrap();
    let got = pool.install(|| SegmentAttention::new(&mask).return_lse(true).forward(&q, &k, &v))?;
    let out = got.out.flatten_all()?.to_vec1::<f32>()?;
    let lse = got.lse.unwrap().flatten_all()?.to_vec1::<f32>()?;
    assert!(
        out.iter().all(|x| x.is_nan()) && lse[0].is_nan(),
        "out {:?}, lse {lse:?}",
        &out[..4]
    );
    Ok(())
}

#[test]
fn decode_and_chunked_prefill_match_reference() -> Result<()> {
    for lq in [1, 2, 37, 64, 65] {
        for kind in [0, 5, 6] {
            let case = draw(
                lq as u64 * 13 + kind as u64,
                2,
                200,
                true,
                (8, 2),
                64,
                DType::BF16,
                kind,
            )?;
            let mask = case.mask.last_queries(lq)?;
            let q = case.q.narrow(1, 200 - lq, lq)?;
            check(&Case { q, mask, ..case }, None)?;
        }
    }
    Ok(())
}

/// NaN inputs give NaN rows, as the reference's softmax does, and only where a row sees them: a
/// NaN in a query makes that row's output and LSE NaN (its max passes over NaN scores, so the row
/// once came out as a row that sees nothing: zeros and -inf); a NaN in a key makes every row that
/// sees the key NaN. Rows that do not see it keep their bits. Every dtype (bf16 on its pair loops
/// where the CPU has them), prefill-sized and decode-sized tiles, with the fused mass too.
#[test]
fn nan_inputs_make_exactly_the_rows_that_see_them_nan() -> Result<()> {
    let dev = Device::Cpu;
    let (l, d) = (130, 64);
    // Two documents: rows 0..50 see keys 0..=i, rows 50..130 keys 50..=i.
    let mask = SegmentMask::documents(&[&[50usize, 80][..]], &dev)?;
    let values = |seed: u64, len: usize, heads: usize| -> Result<Tensor> {
        let mut x = seed | 1;
        let v: Vec<f32> = (0..len * heads * d)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0 + 1e-3
            })
            .collect();
        Tensor::from_vec(v, (1, len, heads, d), &dev)
    };
    let with_nan = |t: &Tensor, (row, head): (usize, usize)| -> Result<Tensor> {
        let mut v = t.flatten_all()?.to_vec1::<f32>()?;
        let heads = t.dim(2)?;
        v[(row * heads + head) * d + 5] = f32::NAN;
        Tensor::from_vec(v, t.dims(), &dev)
    };
    let (q, k, v) = (values(1, l, 2)?, values(2, l, 1)?, values(3, l, 1)?);
    for dtype in DTYPES {
        let cast = |t: &Tensor| t.to_dtype(dtype);
        let (q, k, v) = (cast(&q)?, cast(&k)?, cast(&v)?);
        let run = |q: &Tensor, k: &Tensor, mask: &SegmentMask| -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
            let r = SegmentAttention::new(mask)
                .return_lse(true)
                .return_segment_mass(segattn::SegmentScoreOptions::new())
                .forward(q, k, &v)?;
            let flat = |t: Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
            Ok((flat(r.out)?, flat(r.lse.unwrap())?, flat(r.segment_mass.unwrap())?))
        };
        // Row (i, h) of the output [Lq, 2, D], the LSE [2, Lq] and the mass [2, Lq, Sk].
        let row_is = |(out, lse, mass): &(Vec<f32>, Vec<f32>, Vec<f32>), lq: usize, i: usize, h: usize| {
            let o = &out[(i * 2 + h) * d..(i * 2 + h + 1) * d];
            let sk = mass.len() / (2 * lq);
            let m = &mass[(h * lq + i) * sk..(h * lq + i + 1) * sk];
            (
                o.iter().chain(m).all(|x| x.is_nan()) && lse[h * lq + i].is_nan(),
                o.to_vec(),
                lse[h * lq + i],
            )
        };
        for lq in [l, 1] {
            let mask = mask.last_queries(lq)?;
            let q = q.narrow(1, l - lq, lq)?;
            let clean = run(&q, &k, &mask)?;
            // A NaN in the query of the last row, head 1.
            let got = run(
                &with_nan(&q.to_dtype(DType::F32)?, (lq - 1, 1))?.to_dtype(dtype)?,
                &k,
                &mask,
            )?;
            // A NaN in key 60 (one KV head: every query head sees it).
            let got_k = run(
                &q,
                &with_nan(&k.to_dtype(DType::F32)?, (60, 0))?.to_dtype(dtype)?,
                &mask,
            )?;
            // Which rows each run makes NaN: (i, h) -> hit, from the row's position.
            let hit_q = |i: usize, h: usize| i == lq - 1 && h == 1;
            let hit_k = |i: usize, _h: usize| l - lq + i >= 60;
            for (what, got, hit) in [
                ("NaN query", &got, &hit_q as &dyn Fn(usize, usize) -> bool),
                ("NaN key 60", &got_k, &hit_k),
            ] {
                for i in 0..lq {
                    for h in 0..2 {
                        let (_, want_o, want_lse) = row_is(&clean, lq, i, h);
                        let (nan, o, lse) = row_is(got, lq, i, h);
                        assert!(
                            if hit(i, h) {
                                nan
                            } else {
                                o == want_o && lse.to_bits() == want_lse.to_bits()
                            },
                            "{dtype:?} Lq {lq}: {what}, row {i} (position {}) head {h}: {}",
                            l - lq + i,
                            if hit(i, h) { "not NaN" } else { "changed" }
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
