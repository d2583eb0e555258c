//! A second, independent oracle: masks written out densely from the DEFINITIONS of each preset
//! (not from the crate's rule code), and attention computed with candle's own ops (matmul,
//! additive -inf mask, softmax). A misreading of a mask shared by the reference and the fused
//! code would show up here.

mod common;

use candle_core::{DType, Device, Result, Tensor, D};
use common::{random_tensor, tolerance, worst_ratio, Rng};
use segattn::{reference, segment_attention, PineLayout, SegmentMask};

/// Dense visibility `[Lq, Lk]` from a per-pair predicate on (query position, key position).
fn dense(lq: usize, lk: usize, visible: impl Fn(usize, usize) -> bool) -> Vec<bool> {
    let off = lk - lq;
    (0..lq)
        .flat_map(|i| (0..lk).map(move |j| (i + off, j)))
        .map(|(p, j)| visible(p, j))
        .collect()
}

/// Which part of a PINE prompt a position is in: 0 prefix, 1..=n segment, n+1 suffix.
fn pine_part(layout: &PineLayout, pos: usize) -> usize {
    if pos < layout.prefix_len {
        return 0;
    }
    let mut start = layout.prefix_len;
    for (s, &l) in layout.segment_lens.iter().enumerate() {
        if pos < start + l {
            return s + 1;
        }
        start += l;
    }
    layout.segment_lens.len() + 1
}

/// PINE, from the paper's description: prefix causal; a segment sees the prefix, its own
/// segment causally, every other segment fully and not the suffix; the suffix is causal.
fn pine_visible(layout: &PineLayout, p: usize, j: usize) -> bool {
    let n = layout.segment_lens.len();
    let (a, b) = (pine_part(layout, p), pine_part(layout, j));
    match a {
        0 => b == 0 && j <= p,
        x if x <= n => b == 0 || (b == x && j <= p) || (b != x && b >= 1 && b <= n),
        _ => j <= p,
    }
}

/// Attention with candle ops and a dense boolean mask; rows must see at least one key.
fn candle_attention(q: &Tensor, k: &Tensor, v: &Tensor, visible: &[bool]) -> Result<Tensor> {
    let (_, lq, h, d) = q.dims4()?;
    let (_, lk, hkv, _) = k.dims4()?;
    let mask: Vec<f32> = visible
        .iter()
        .map(|&v| if v { 0.0 } else { f32::NEG_INFINITY })
        .collect();
    let mask = Tensor::from_vec(mask, (lq, lk), &Device::Cpu)?;
    let q = q.to_dtype(DType::F32)?.transpose(1, 2)?.contiguous()?; // [B, H, Lq, D]
                                                                    // GQA: query head h reads kv head h / (H / Hkv).
    let kv_index = Tensor::from_vec(
        (0..h).map(|x| (x / (h / hkv)) as u32).collect::<Vec<_>>(),
        h,
        &Device::Cpu,
    )?;
    let expand = |t: &Tensor| -> Result<Tensor> {
        t.to_dtype(DType::F32)?
            .index_select(&kv_index, 2)?
            .transpose(1, 2)?
            .contiguous()
    };
    let (k, v) = (expand(k)?, expand(v)?);
    let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(&mask)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    p.matmul(&v)?.transpose(1, 2)
}

fn compare(name: &str, mask: &SegmentMask, visible: &[bool], lq: usize, lk: usize, dtype: DType) -> Result<()> {
    let mut rng = Rng::new(lq as u64 * 31 + lk as u64);
    let q = random_tensor(&mut rng, &[1, lq, 4, 64], dtype)?;
    let k = random_tensor(&mut rng, &[1, lk, 2, 64], dtype)?;
    let v = random_tensor(&mut rng, &[1, lk, 2, 64], dtype)?;
    // The crate's own reading of the mask must equal the definition, element by element.
    let ours = reference::dense_mask(mask, 1, lq, lk)?.flatten_all()?.to_vec1::<u8>()?;
    for (idx, (&a, &b)) in ours.iter().zip(visible).enumerate() {
        assert_eq!(a == 1, b, "{name}: mask differs at query {} key {}", idx / lk, idx % lk);
    }
    let want = candle_attention(&q, &k, &v, visible)?;
    let (atol, rtol) = tolerance(dtype);
    for (what, got) in [
        ("fused", segment_attention(&q, &k, &v, mask)?),
        ("reference", reference::attention(&q, &k, &v, mask, None)?.out),
    ] {
        let (r, at) = worst_ratio(&got, &want, atol, rtol)?;
        assert!(r <= 1.0, "{name}: {what} off by {r} x tolerance at {at}");
    }
    Ok(())
}

#[test]
fn presets_match_their_definitions() -> Result<()> {
    let dev = Device::Cpu;
    for (lq, lk) in [(150, 150), (77, 150), (1, 150)] {
        for dtype in [DType::F32, DType::BF16] {
            let m = SegmentMask::causal(lk, &dev)?.last_queries(lq)?;
            compare("causal", &m, &dense(lq, lk, |p, j| j <= p), lq, lk, dtype)?;

            let m = SegmentMask::full(lk, &dev)?.last_queries(lq)?;
            compare("full", &m, &dense(lq, lk, |_, _| true), lq, lk, dtype)?;

            let doc = |x: usize| [0usize, 40, 41, 100, 150].iter().filter(|&&s| s <= x).count();
            let docs = [40, 1, 59, 50];
            let m = SegmentMask::documents(&[&docs], &dev)?.last_queries(lq)?;
            compare(
                "documents",
                &m,
                &dense(lq, lk, |p, j| doc(p) == doc(j) && j <= p),
                lq,
                lk,
                dtype,
            )?;
            let m = SegmentMask::documents_bidirectional(&[&docs], &dev)?.last_queries(lq)?;
            compare(
                "documents_bidirectional",
                &m,
                &dense(lq, lk, |p, j| doc(p) == doc(j)),
                lq,
                lk,
                dtype,
            )?;

            let m = SegmentMask::prefix_lm(lk, 70, &dev)?.last_queries(lq)?;
            compare(
                "prefix_lm",
                &m,
                &dense(lq, lk, |p, j| (p < 70 && j < 70) || (p >= 70 && j <= p)),
                lq,
                lk,
                dtype,
            )?;

            let layout = PineLayout::new(13, &[30, 1, 45, 21], 40);
            let m = SegmentMask::pine(13, &[30, 1, 45, 21], 40, &dev)?.last_queries(lq)?;
            compare(
                "pine",
                &m,
                &dense(lq, lk, |p, j| pine_visible(&layout, p, j)),
                lq,
                lk,
                dtype,
            )?;

            let prompts = [PineLayout::new(5, &[20, 25], 10), PineLayout::new(0, &[30, 30, 10], 20)];
            let m = SegmentMask::packed_prompts(&prompts, &dev)?.last_queries(lq)?;
            let packed = |p: usize, j: usize| {
                let (pp, jp) = (usize::from(p >= 60), usize::from(j >= 60));
                let base = if pp == 1 { 60 } else { 0 };
                pp == jp && pine_visible(&prompts[pp], p - base, j - base)
            };
            compare("packed_prompts", &m, &dense(lq, lk, packed), lq, lk, dtype)?;
        }
    }
    Ok(())
}
