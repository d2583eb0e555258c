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
