//! The PINE oracle (`reference::pine_attention`): the RoPE identity the fused path relies on, and
//! hand-checkable cases of the oracle itself (shifts, orders, ties, GQA, batch rows, the
//! paper's position invariance, agreement with the masked reference at the reported shifts),
//! plus its input errors.

mod common;

use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
use common::{random_tensor, tolerance, worst_ratio, Rng};
use segattn::pine::{Llama3Scaling, Rope};
use segattn::reference::{self, pine_attention, PineReferenceOutput};
use segattn::{PineLayout, SegmentMask};

const THETA: f64 = 10_000.0;

/// `layout` with its suffix extended by the generated tokens up to `len`.
fn extended(layout: &PineLayout, len: usize) -> PineLayout {
    PineLayout::new(
        layout.prefix_len,
        &layout.segment_lens,
        len - layout.prefix_len - seg_total(layout),
    )
}

fn seg_total(layout: &PineLayout) -> usize {
    layout.segment_lens.iter().sum()
}

/// Segment id of every token `0..len` (tokens beyond the layout: suffix id `n + 1`).
fn ids(layout: &PineLayout, len: usize) -> Vec<usize> {
    let mut ids = vec![0; layout.prefix_len];
    for (j, &l) in layout.segment_lens.iter().enumerate() {
        ids.extend(std::iter::repeat_n(j + 1, l));
    }
    ids.resize(len, layout.segment_lens.len() + 1);
    ids
}

/// Original PINE positions: prefix `0..P`, segments right-aligned to end at `E - 1`, the rest at
/// the sequence index.
fn original_positions(layout: &PineLayout, len: usize) -> Vec<usize> {
    let end = layout.prefix_len + seg_total(layout);
    let mut pos: Vec<usize> = (0..layout.prefix_len).collect();
    for &l in &layout.segment_lens {
        pos.extend(end - l..end);
    }
    pos.extend(end..len);
    pos
}

fn positions_tensor(pos: &[usize]) -> Result<Tensor> {
    let n = pos.len();
    let pos: Vec<u32> = pos.iter().map(|&p| p as u32).collect();
    Tensor::from_vec(pos, (1, n), &Device::Cpu)
}

fn tables(theta: f64, max_pos: usize, d: usize) -> Result<(Tensor, Tensor)> {
    let half = d / 2;
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    for p in 0..max_pos {
        for i in 0..half {
            let (s, c) = (p as f64 * theta.powf(-2.0 * i as f64 / d as f64)).sin_cos();
            cos.push(c as f32);
            sin.push(s as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (max_pos, half), &Device::Cpu)?,
        Tensor::from_vec(sin, (max_pos, half), &Device::Cpu)?,
    ))
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, atol: f64, rtol: f64) -> Result<()> {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let (ratio, at) = worst_ratio(got, want, atol, rtol)?;
    assert!(ratio <= 1.0, "{what}: mismatch at flat index {at} (ratio {ratio})");
    Ok(())
}

fn shifts_of(r: &PineReferenceOutput, b: usize, h: usize, t: usize) -> Result<Vec<i64>> {
    r.shifts.i((b, h, t))?.to_vec1::<i64>()
}

fn margin_of(r: &PineReferenceOutput, b: usize, h: usize, t: usize) -> Result<f64> {
    r.margin.i((b, h, t))?.to_scalar::<f64>()
}

/// Random un-rotated q `[B, L, H, D]`, k and v `[B, L, Hkv, D]`, f32.
fn qkv(rng: &mut Rng, b: usize, l: usize, h: usize, hkv: usize, d: usize) -> Result<(Tensor, Tensor, Tensor)> {
    Ok((
        random_tensor(rng, &[b, l, h, d], DType::F32)?,
        random_tensor(rng, &[b, l, hkv, d], DType::F32)?,
        random_tensor(rng, &[b, l, hkv, d], DType::F32)?,
    ))
}

/// Test 1: pine.md's identity `rope(q, p + s) . rope(k, p_k) == rope(q, p) . rope(k, p_k - s)` through
/// `Rope::rotate`, for theta with and without Llama-3 scaling and for caller tables.
#[test]
fn rope_identity_query_shift_equals_key_shift() -> Result<()> {
    let (rows, d, max_pos) = (64, 64, 512);
    let (cos, sin) = tables(THETA, max_pos, d)?;
    let ropes = [
        ("theta", Rope::new(THETA)),
        (
            "theta + llama3 scaling",
            Rope::new(500_000.0).with_llama3_scaling(Llama3Scaling::llama31()),
        ),
        ("tables", Rope::from_tables(&cos, &sin)?),
    ];
    let mut rng = Rng::new(1);
    for (name, rope) in &ropes {
        let q = random_tensor(&mut rng, &[1, rows, 1, d], DType::F32)?;
        let k = random_tensor(&mut rng, &[1, rows, 1, d], DType::F32)?;
        let (mut p, mut pk, mut s) = (vec![], vec![], vec![]);
        for _ in 0..rows {
            let key = rng.below(max_pos / 2);
            let shift = rng.below(key + 1);
            p.push(rng.below(max_pos / 2));
            pk.push(key);
            s.push(shift);
        }
        let add = |a: &[usize], b: &[usize], sign: i64| -> Vec<usize> {
            a.iter()
                .zip(b)
                .map(|(&x, &y)| (x as i64 + sign * y as i64) as usize)
                .collect()
        };
        let rot = |x: &Tensor, pos: &[usize]| rope.rotate(x, &positions_tensor(pos)?, false);
        let dots = |a: &Tensor, b: &Tensor| -> Result<Vec<f32>> { (a * b)?.sum(D::Minus1)?.flatten_all()?.to_vec1() };
        let query_shifted = dots(&rot(&q, &add(&p, &s, 1))?, &rot(&k, &pk)?)?;
        let key_shifted = dots(&rot(&q, &p)?, &rot(&k, &add(&pk, &s, -1))?)?;
        let norms = dots(&q.abs()?, &k.abs()?)?; // bounds |q| |k| from above
        for r in 0..rows {
            let (a, b) = (query_shifted[r], key_shifted[r]);
            assert!(
                (a - b).abs() <= 1e-5 * norms[r],
                "{name}: row {r} (p {}, p_k {}, s {}): {a} vs {b}",
                p[r],
                pk[r],
                s[r]
            );
        }
    }
    Ok(())
}

/// Test 2a: One segment: every shift is 0 and positions are sequence indices, so PINE is the masked
/// attention (`SegmentMask::pine`) of q and k rotated once at their sequence positions.
#[test]
fn single_segment_equals_masked_reference() -> Result<()> {
    let (len, h, hkv, d) = (16, 2, 1, 16);
    let layout = PineLayout::new(3, &[7], 4); // 14 tokens, 2 generated
    let mut rng = Rng::new(2);
    let (q, k, v) = qkv(&mut rng, 1, len, h, hkv, d)?;
    let rope = Rope::new(THETA);
    let r = pine_attention(&q, &k, &v, std::slice::from_ref(&layout), &rope, None)?;

    assert_eq!(r.shifts.dims(), &[1, h, len, 3]);
    assert!(r.shifts.flatten_all()?.to_vec1::<i64>()?.iter().all(|&s| s == 0));
    assert!(r
        .margin
        .flatten_all()?
        .to_vec1::<f64>()?
        .iter()
        .all(|m| *m == f64::INFINITY));

    let pos = positions_tensor(&(0..len).collect::<Vec<_>>())?;
    let qr = rope.rotate(&q, &pos, false)?;
    let kr = rope.rotate(&k, &pos, false)?;
    let mask = SegmentMask::pine(3, &[7], len - 10, &Device::Cpu)?;
    let want = reference::attention(&qr, &kr, &v, &mask, None)?;
    let (atol, rtol) = tolerance(DType::F32);
    assert_close("out", &r.out, &want.out, atol, rtol)?;
    assert_close("lse", &r.lse, &want.lse, atol, rtol)
}

/// Test 2b: Two segments: no scores; the other segment is placed just before the query's own, so the
/// shifts of a segment-i row are `shift[i] = 0`, `shift[other] = L_i`. Suffix rows sort two
/// scores (finite margin).
#[test]
fn two_segments_shift_the_other_by_own_length() -> Result<()> {
    let (len, d) = (17, 8);
    let layout = PineLayout::new(2, &[5, 3], 4); // 14 tokens, 3 generated
    let mut rng = Rng::new(3);
    let (q, k, v) = qkv(&mut rng, 1, len, 2, 2, d)?;
    let r = pine_attention(&q, &k, &v, std::slice::from_ref(&layout), &Rope::new(THETA), None)?;
    let ids = ids(&layout, len);
    for h in 0..2 {
        for (t, &id) in ids.iter().enumerate() {
            let shifts = shifts_of(&r, 0, h, t)?;
            let margin = margin_of(&r, 0, h, t)?;
            match id {
                0 => {
                    assert_eq!(shifts, [0, 0, 0, 0], "prefix row {t}");
                    assert_eq!(margin, f64::INFINITY);
                }
                1 => {
                    assert_eq!(shifts, [0, 0, 5, 0], "segment-1 row {t}");
                    assert_eq!(margin, f64::INFINITY);
                }
                2 => {
                    assert_eq!(shifts, [0, 3, 0, 0], "segment-2 row {t}");
                    assert_eq!(margin, f64::INFINITY);
                }
                _ => {
                    // Most important segment at shift 0, the other before it.
                    assert!(
                        shifts == [0, 0, 5, 0] || shifts == [0, 3, 0, 0],
                        "suffix row {t}: {shifts:?}"
                    );
                    assert!(margin.is_finite() && margin >= 0.0, "suffix row {t}: margin {margin}");
                }
            }
        }
    }
    Ok(())
}

/// Test 2c: Three segments, segment 3's keys aligned with every query (segments 1 and 2: zero keys):
/// segment 3 is the most important for everyone but itself; segments 1 and 2 tie (equal
/// lengths), so the lower index goes first.
#[test]
fn dominant_segment_ranks_next_to_the_query() -> Result<()> {
    let (p, l1, l2, l3, suffix, gen) = (1, 3, 3, 5, 2, 1);
    let layout = PineLayout::new(p, &[l1, l2, l3], suffix);
    let len = layout.len() + gen;
    let d = 4;
    let ids = ids(&layout, len);
    let mut q = vec![0f32; len * d];
    let mut k = vec![0f32; len * d];
    for t in 0..len {
        q[t * d] = 1.0;
        q[t * d + 1] = 0.5 * t as f32; // irrelevant to importance (k has no such component)
        k[t * d] = if ids[t] == 3 { 4.0 } else { 0.0 };
        k[t * d + 2] = if ids[t] == 0 || ids[t] == 4 { 1.0 } else { 0.0 };
    }
    let q = Tensor::from_vec(q, (1, len, 1, d), &Device::Cpu)?;
    let k = Tensor::from_vec(k, (1, len, 1, d), &Device::Cpu)?;
    let v = Tensor::randn(0f32, 1.0, (1, len, 1, d), &Device::Cpu)?;
    let r = pine_attention(&q, &k, &v, &[layout], &Rope::new(THETA), None)?;
    for (t, &id) in ids.iter().enumerate() {
        let (shifts, margin) = (shifts_of(&r, 0, 0, t)?, margin_of(&r, 0, 0, t)?);
        let (want, tie): ([i64; 5], bool) = match id {
            0 => ([0; 5], false),
            // order [1, 3, 2]
            1 => ([0, 0, (l1 + l3) as i64, l1 as i64, 0], false),
            // order [2, 3, 1]
            2 => ([0, (l2 + l3) as i64, 0, l2 as i64, 0], false),
            // order [3, 1, 2]: 1 and 2 tie
            3 => ([0, l3 as i64, (l3 + l1) as i64, 0, 0], true),
            // suffix and generated: order [3, 1, 2], 1 and 2 tie
            _ => ([0, l3 as i64, (l3 + l1) as i64, 0, 0], true),
        };
        assert_eq!(shifts, want, "row {t} (id {id})");
        if tie {
            assert_eq!(margin, 0.0, "row {t}: tied scores");
        } else if id == 0 {
            assert_eq!(margin, f64::INFINITY, "row {t}: prefix");
        } else {
            assert!(margin > 0.5, "row {t}: clear order, margin {margin}");
        }
    }
    Ok(())
}

/// Test 2c': The score is the length-normalised mass: a short segment with a higher mass per token
/// outranks a long one with more total mass (with raw sums every order below would differ).
#[test]
fn length_normalised_mass_decides_the_order() -> Result<()> {
    let (l1, l2, l3) = (6, 1, 2);
    let layout = PineLayout::new(1, &[l1, l2, l3], 2);
    let len = layout.len() + 1;
    let d = 4;
    let ids = ids(&layout, len);
    // With q = e0 and scale 1, a key token of segment j weighs exp(k_0): 1, 3 and 2.
    let weight = [0.0, 1.0, 3.0, 2.0, 1.0];
    let mut q = vec![0f32; len * d];
    let mut k = vec![0f32; len * d];
    for t in 0..len {
        q[t * d] = 1.0;
        k[t * d] = (weight[ids[t]] as f32).ln();
    }
    let q = Tensor::from_vec(q, (1, len, 1, d), &Device::Cpu)?;
    let k = Tensor::from_vec(k, (1, len, 1, d), &Device::Cpu)?;
    let v = Tensor::randn(0f32, 1.0, (1, len, 1, d), &Device::Cpu)?;
    let r = pine_attention(&q, &k, &v, &[layout], &Rope::new(THETA), Some(1.0))?;
    for (t, &id) in ids.iter().enumerate() {
        let want: [i64; 5] = match id {
            0 => [0; 5],
            // others 2 (3 / 1 per token) and 3 (4 / 2): order [1, 2, 3]
            1 => [0, 0, l1 as i64, (l1 + l2) as i64, 0],
            // others 1 (6 / 6) and 3 (4 / 2): order [2, 3, 1]
            2 => [0, (l2 + l3) as i64, 0, l2 as i64, 0],
            // others 1 (6 / 6) and 2 (3 / 1): order [3, 2, 1]
            3 => [0, (l3 + l2) as i64, l3 as i64, 0, 0],
            // all: 6 / 6, 3 / 1, 4 / 2: order [2, 3, 1]
            _ => [0, (l2 + l3) as i64, 0, l2 as i64, 0],
        };
        assert_eq!(shifts_of(&r, 0, 0, t)?, want, "row {t} (id {id})");
    }
    Ok(())
}

/// Test 2d: GQA and batch rows with different layouts (one shorter than L): each batch row equals the
/// single-row call.
#[test]
fn gqa_and_mixed_batch_rows_match_single_rows() -> Result<()> {
    let (len, h, hkv, d) = (16, 4, 2, 8);
    let layouts = [
        PineLayout::new(2, &[3, 4, 2], 3),
        PineLayout::new(0, &[5, 5], 6),
        PineLayout::new(4, &[1, 1, 1, 1], 2), // 10 tokens: 6 generated
    ];
    let mut rng = Rng::new(4);
    let (q, k, v) = qkv(&mut rng, layouts.len(), len, h, hkv, d)?;
    let rope = Rope::new(THETA);
    let all = pine_attention(&q, &k, &v, &layouts, &rope, Some(0.3))?;
    assert_eq!(all.shifts.dims(), &[3, h, len, 6]);
    for (b, layout) in layouts.iter().enumerate() {
        let row = |t: &Tensor| t.narrow(0, b, 1);
        let one = pine_attention(
            &row(&q)?,
            &row(&k)?,
            &row(&v)?,
            std::slice::from_ref(layout),
            &rope,
            Some(0.3),
        )?;
        assert_close("out", &row(&all.out)?, &one.out, 0.0, 0.0)?;
        assert_close("lse", &row(&all.lse)?, &one.lse, 0.0, 0.0)?;
        assert_close("margin", &row(&all.margin)?, &one.margin, 0.0, 0.0)?;
        let s = layout.num_ids();
        let shifts = row(&all.shifts)?;
        assert_eq!(
            shifts.narrow(3, 0, s)?.flatten_all()?.to_vec1::<i64>()?,
            one.shifts.flatten_all()?.to_vec1::<i64>()?,
            "row {b} shifts"
        );
        if s < 6 {
            let beyond = shifts.narrow(3, s, 6 - s)?.flatten_all()?.to_vec1::<i64>()?;
            assert!(beyond.iter().all(|&x| x == 0), "row {b}: ids beyond n + 1 must be 0");
        }
    }
    Ok(())
}

/// Test 2e: All keys equal: every importance score ties (equal lengths), so the order is by index:
/// own segment first for segment rows, then the others ascending; `1..=n` for suffix rows.
#[test]
fn equal_keys_tie_lower_index_first() -> Result<()> {
    let (len, h, d) = (17, 2, 8);
    let layout = PineLayout::new(2, &[3, 3, 3, 3], 2); // 16 tokens, 1 generated
    let mut rng = Rng::new(5);
    let q = random_tensor(&mut rng, &[1, len, h, d], DType::F32)?;
    let k = random_tensor(&mut rng, &[1, 1, 1, d], DType::F32)?
        .broadcast_as((1, len, 1, d))?
        .contiguous()?;
    let v = random_tensor(&mut rng, &[1, len, 1, d], DType::F32)?;
    let r = pine_attention(&q, &k, &v, std::slice::from_ref(&layout), &Rope::new(THETA), None)?;
    let ids = ids(&layout, len);
    for h in 0..h {
        for (t, &id) in ids.iter().enumerate() {
            let (shifts, margin) = (shifts_of(&r, 0, h, t)?, margin_of(&r, 0, h, t)?);
            let order: Vec<usize> = match id {
                0 => vec![],
                i @ 1..=4 => std::iter::once(i).chain((1..=4).filter(|&j| j != i)).collect(),
                _ => (1..=4).collect(),
            };
            let mut want = vec![0i64; 6];
            for (rank, &j) in order.iter().enumerate() {
                want[j] = 3 * rank as i64;
            }
            assert_eq!(shifts, want, "head {h} row {t} (id {id})");
            let want_margin = if id == 0 { f64::INFINITY } else { 0.0 };
            assert_eq!(margin, want_margin, "head {h} row {t} (id {id})");
        }
    }
    Ok(())
}

/// Test 2f: With a zero rotation (tables cos = 1, sin = 0) positions do not matter, so PINE is exactly
/// the masked attention under `SegmentMask::pine_batch`: the oracle's visibility, built from
/// pine.md's words, agrees with the crate's mask (many segments, generated tokens, GQA, batch).
#[test]
fn zero_rotation_equals_pine_mask() -> Result<()> {
    let (len, h, hkv, d) = (24, 4, 2, 8);
    let layouts = [PineLayout::new(3, &[4, 1, 5, 2], 4), PineLayout::new(0, &[6, 6, 6], 2)];
    let identity = Rope::from_tables(
        &Tensor::ones((len, d / 2), DType::F32, &Device::Cpu)?,
        &Tensor::zeros((len, d / 2), DType::F32, &Device::Cpu)?,
    )?;
    let mut rng = Rng::new(6);
    let (q, k, v) = qkv(&mut rng, 2, len, h, hkv, d)?;
    let r = pine_attention(&q, &k, &v, &layouts, &identity, None)?;
    let ext: Vec<PineLayout> = layouts.iter().map(|l| extended(l, len)).collect();
    let want = reference::attention(&q, &k, &v, &SegmentMask::pine_batch(&ext, &Device::Cpu)?, None)?;
    assert_close("out", &r.out, &want.out, 1e-12, 1e-12)?;
    assert_close("lse", &r.lse, &want.lse, 1e-12, 1e-12)
}

/// Test 2g: Every query row equals the masked reference with its keys rotated (by `Rope::rotate`) at
/// `p_k - shift[segment(k)]` from the reported shifts, and the query at its original position;
/// rows of one query segment share their shifts.
#[test]
fn each_row_equals_masked_reference_at_its_shifts() -> Result<()> {
    let (len, h, hkv, d) = (20, 2, 1, 16);
    let layout = PineLayout::new(2, &[3, 5, 2, 4], 3); // 19 tokens, 1 generated
    let mut rng = Rng::new(7);
    let (q, k, v) = qkv(&mut rng, 1, len, h, hkv, d)?;
    let rope = Rope::new(THETA).with_llama3_scaling(Llama3Scaling {
        original_max_position: 64.0,
        ..Llama3Scaling::llama31()
    });
    let r = pine_attention(&q, &k, &v, std::slice::from_ref(&layout), &rope, None)?;
    let ids = ids(&layout, len);
    let pos = original_positions(&layout, len);
    let mask = SegmentMask::pine_batch(&[extended(&layout, len)], &Device::Cpu)?;
    let (atol, rtol) = tolerance(DType::F32);
    for hq in 0..h {
        let qh = rope.rotate(&q.narrow(2, hq, 1)?, &positions_tensor(&pos)?, false)?;
        let kh = k.narrow(2, hq / (h / hkv), 1)?;
        let vh = v.narrow(2, hq / (h / hkv), 1)?;
        for t in 0..len {
            let shifts = shifts_of(&r, 0, hq, t)?;
            if t > 0 && ids[t] == ids[t - 1] && (1..=4).contains(&ids[t]) {
                assert_eq!(shifts, shifts_of(&r, 0, hq, t - 1)?, "rows of one segment share shifts");
            }
            let key_pos: Vec<usize> = (0..len).map(|j| pos[j] - shifts[ids[j]] as usize).collect();
            let kr = rope.rotate(&kh, &positions_tensor(&key_pos)?, false)?;
            let want = reference::attention(&qh, &kr, &vh, &mask, None)?;
            let what = format!("head {hq} row {t}");
            assert_close(&what, &r.out.i((.., t, hq))?, &want.out.i((.., t, 0))?, atol, rtol)?;
            assert_close(&what, &r.lse.i((.., hq, t))?, &want.lse.i((.., 0, t))?, atol, rtol)?;
        }
    }
    Ok(())
}

/// Test 2h: The paper's point: permuting the segments of the prompt permutes the output rows with
/// their tokens and changes nothing else (suffix and generated rows identical), for random
/// inputs (no ties).
#[test]
fn permuting_segments_permutes_the_output() -> Result<()> {
    let (h, hkv, d) = (2, 2, 16);
    let lens = [4, 2, 5, 3];
    let layout = PineLayout::new(3, &lens, 3);
    let len = layout.len() + 2;
    let perm = [2, 0, 3, 1]; // new segment r is old segment perm[r]
    let permuted = PineLayout::new(3, &perm.map(|j| lens[j]), 3);
    let starts: Vec<usize> = (0..lens.len()).map(|j| 3 + lens[..j].iter().sum::<usize>()).collect();
    // index[new token] = old token
    let mut index: Vec<u32> = (0..3).collect();
    for &j in &perm {
        index.extend((starts[j]..starts[j] + lens[j]).map(|t| t as u32));
    }
    index.extend((3 + seg_total(&layout)) as u32..len as u32);
    let index = Tensor::new(index.as_slice(), &Device::Cpu)?;

    let mut rng = Rng::new(8);
    let (q, k, v) = qkv(&mut rng, 1, len, h, hkv, d)?;
    let rope = Rope::new(THETA);
    let a = pine_attention(&q, &k, &v, &[layout], &rope, None)?;
    let gather = |t: &Tensor| t.index_select(&index, 1);
    let b = pine_attention(&gather(&q)?, &gather(&k)?, &gather(&v)?, &[permuted], &rope, None)?;
    let margins = a.margin.flatten_all()?.to_vec1::<f64>()?;
    assert!(margins.iter().all(|&m| m > 1e-9), "random inputs must not tie");
    assert_close("out", &b.out, &a.out.index_select(&index, 1)?, 1e-12, 1e-10)?;
    assert_close("lse", &b.lse, &a.lse.index_select(&index, 2)?, 1e-12, 1e-10)
}

/// Test 3: input errors name the argument.
#[test]
fn errors_name_the_argument() -> Result<()> {
    let (len, d) = (8, 4);
    let mut rng = Rng::new(9);
    let (q, k, v) = qkv(&mut rng, 2, len, 2, 1, d)?;
    let rope = Rope::new(THETA);
    let ok = PineLayout::new(1, &[2, 3], 1);
    let cases: [(&str, Vec<PineLayout>, &str); 3] = [
        (
            "empty segment",
            vec![ok.clone(), PineLayout::new(1, &[2, 0, 3], 1)],
            "layouts",
        ),
        ("one layout for two rows", vec![ok.clone()], "layouts"),
        (
            "layout longer than L",
            vec![ok.clone(), PineLayout::new(2, &[3, 3], 1)],
            "layouts",
        ),
    ];
    for (what, layouts, name) in cases {
        let err = pine_attention(&q, &k, &v, &layouts, &rope, None)
            .expect_err(what)
            .to_string();
        assert!(err.contains(name), "{what}: {err}");
    }
    // Tables of L / 2 positions: angle addition reaches at most 2 (L / 2) - 1 < L.
    let (cos, sin) = tables(THETA, len / 2, d)?;
    let short = Rope::from_tables(&cos, &sin)?;
    let err = pine_attention(&q, &k, &v, &[ok.clone(), ok], &short, None)
        .expect_err("tables too short")
        .to_string();
    assert!(err.contains("rope"), "tables too short: {err}");
    Ok(())
}
