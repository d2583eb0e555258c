//! Merging partial results through the LSE equals attention over all keys at once.

mod common;

use candle_core::{DType, Result, Tensor};
use common::{random_tensor, worst_ratio, Rng};
use segattn::{merge_partials, PairRule, SegmentAttention, SegmentMask, Visibility};

#[test]
fn split_keys_merge_to_the_whole() -> Result<()> {
    let mut rng = Rng::new(5);
    let (lq, lk) = (40, 230);
    let q = random_tensor(&mut rng, &[2, lq, 4, 32], DType::F32)?;
    let k = random_tensor(&mut rng, &[2, lk, 2, 32], DType::F32)?;
    let v = random_tensor(&mut rng, &[2, lk, 2, 32], DType::F32)?;
    // Bidirectional documents; the queries are the last 40 positions. Positions are aligned to
    // the end of each part's keys, so the split uses a rule that ignores positions (Full within
    // a document): each part keeps its keys' segment ids, the queries keep theirs.
    let mask = SegmentMask::documents_bidirectional(&[&[100, 130], &[200, 30]], q.device())?;
    for split in [1, 64, 100, 170, 229] {
        let ids = mask.kv_segments();
        let q_ids = ids.narrow(1, lk - lq, lq)?;
        let rule = || PairRule::new(Visibility::Full, Visibility::Blocked);
        let part = |start: usize, len: usize| -> Result<_> {
            let kv_ids = ids.narrow(1, start, len)?;
            let m = SegmentMask::new(&q_ids, &kv_ids, rule())?;
            SegmentAttention::new(&m)
                .return_lse(true)
                .forward(&q, &k.narrow(1, start, len)?, &v.narrow(1, start, len)?)
        };
        let a = part(0, split)?;
        let b = part(split, lk - split)?;
        let (out, lse) = merge_partials(&a.out, a.lse.as_ref().unwrap(), &b.out, b.lse.as_ref().unwrap())?;
        let full = SegmentMask::new(&q_ids, ids, rule())?;
        let want = SegmentAttention::new(&full).return_lse(true).forward(&q, &k, &v)?;
        assert!(worst_ratio(&out, &want.out, 1e-5, 1e-4)?.0 <= 1.0, "split {split}");
        assert!(
            worst_ratio(&lse, want.lse.as_ref().unwrap(), 1e-5, 1e-5)?.0 <= 1.0,
            "split {split}"
        );
    }
    Ok(())
}

#[test]
fn empty_parts_contribute_nothing() -> Result<()> {
    let mut rng = Rng::new(9);
    let o = random_tensor(&mut rng, &[1, 3, 2, 8], DType::F32)?;
    let lse = random_tensor(&mut rng, &[1, 2, 3], DType::F32)?;
    let empty_lse = Tensor::full(f32::NEG_INFINITY, (1, 2, 3), o.device())?;
    let zeros = o.zeros_like()?;
    let (out, l) = merge_partials(&o, &lse, &zeros, &empty_lse)?;
    assert!(worst_ratio(&out, &o, 1e-6, 1e-6)?.0 <= 1.0);
    assert!(worst_ratio(&l, &lse, 1e-6, 1e-6)?.0 <= 1.0);
    let (out, l) = merge_partials(&zeros, &empty_lse, &zeros, &empty_lse)?;
    assert!(out.flatten_all()?.to_vec1::<f32>()?.iter().all(|&x| x == 0.0));
    assert!(l
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|&x| x == f32::NEG_INFINITY));
    Ok(())
}
