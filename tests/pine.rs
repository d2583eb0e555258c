//! PINE's fused CPU path against the literal oracle ([`segattn::reference::pine_attention`]):
//! prefill and decode, random layouts (2 to 30 segments, ragged, single-token segments, prefix
//! and suffix 1 to 64 tokens), batch rows with different layouts, GQA, f32 / f16 / bf16, RoPE
//! from theta, with Llama-3 scaling, or from tables.
//!
//! PINE sorts importance scores. Where two scores of a query group are closer than f32 rounding
//! can resolve, the fused path (f32) and the oracle (f64) may legitimately order them differently;
//! those groups (the oracle's `margin` below the near-tie margin of `PineTolerance::of`) are left
//! out of the comparison, and the test asserts that they are rare.

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::pine::{compare_with_oracle, prompt_rows, PinePath, PineTolerance};
use common::{env_count, random_tensor, tolerance, worst_ratio, Rng};
use proptest::prelude::*;
use segattn::pine::{Llama3Scaling, PineAttention, PositionScheme, Rope};
use segattn::{reference, PineLayout, SegmentAttention, SegmentMask};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
const HEADS: [(usize, usize); 4] = [(1, 1), (2, 1), (4, 2), (6, 3)];

/// A random layout of `n` segments with prefix and suffix in 1..=64 (lengths ragged, some single
/// tokens).
fn random_layout(rng: &mut Rng, n: usize, max_seg: usize) -> PineLayout {
    let segs: Vec<usize> = (0..n)
        .map(|_| if rng.below(5) == 0 { 1 } else { 1 + rng.below(max_seg) })
        .collect();
    PineLayout::new(1 + rng.below(64), &segs, 1 + rng.below(64))
}

/// Random layouts for `batch` rows with one common total length (the shorter rows' suffixes
/// grow).
fn random_layouts(rng: &mut Rng, batch: usize) -> Vec<PineLayout> {
    let mut layouts: Vec<PineLayout> = (0..batch)
        .map(|_| {
            let n = 2 + rng.below(29);
            let max_seg = (320 / n).clamp(2, 40);
            random_layout(rng, n, max_seg)
        })
        .collect();
    let len = layouts.iter().map(PineLayout::len).max().unwrap();
    for l in &mut layouts {
        l.suffix_len += len - l.len();
    }
    layouts
}

fn random_rope(rng: &mut Rng, d: usize, len: usize) -> Result<Rope> {
    Ok(match rng.below(3) {
        0 => Rope::new(10_000.0),
        1 => Rope::new(500_000.0).with_llama3_scaling(Llama3Scaling {
            original_max_position: 64.0, // small, so that every branch of the scaling is taken
            ..Llama3Scaling::llama31()
        }),
        _ => {
            // Tables of a true rotation, longer than needed.
            let half = d / 2;
            let n = len + 7;
            let f: Vec<f64> = (0..half).map(|i| 1e4f64.powf(-2.0 * i as f64 / d as f64)).collect();
            let cos: Vec<f32> = (0..n * half)
                .map(|x| ((x / half) as f64 * f[x % half]).cos() as f32)
                .collect();
            let sin: Vec<f32> = (0..n * half)
                .map(|x| ((x / half) as f64 * f[x % half]).sin() as f32)
                .collect();
            let cos = Tensor::from_vec(cos, (n, half), &Device::Cpu)?;
            let sin = Tensor::from_vec(sin, (n, half), &Device::Cpu)?;
            Rope::from_tables(&cos, &sin)?
        }
    })
}

fn cases() -> u32 {
    env_count("SEGATTN_CASES").map_or(24, |n| n / 4).max(4)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn prefill_and_decode_match_the_literal_oracle(
        seed in any::<u64>(),
        batch in 1usize..=2,
        heads in prop::sample::select(HEADS.to_vec()),
        head_dim in prop::sample::select(vec![16usize, 32, 48, 64, 128]),
        dtype in prop::sample::select(DTYPES.to_vec()),
        generated in 1usize..=3,
    ) {
        let (compared, _) = run_case(seed, batch, heads, head_dim, dtype, generated)?;
        prop_assert!(compared > 0, "seed {seed}: no row compared");
    }
}

/// Near-ties (rows left out of the comparison) are rare: over a fixed set of cases (a single case
/// can legitimately lose one large group, e.g. a long segment whose scores saturate).
#[test]
fn near_ties_are_rare() -> Result<()> {
    let (mut compared, mut skipped) = (0, 0);
    for seed in 0..16u64 {
        let heads = HEADS[seed as usize % HEADS.len()];
        let dtype = DTYPES[seed as usize % DTYPES.len()];
        let (c, s) = run_case(
            seed,
            1 + seed as usize % 2,
            heads,
            32 + 32 * (seed as usize % 2),
            dtype,
            1,
        )?;
        compared += c;
        skipped += s;
    }
    assert!(
        skipped * 10 <= compared + skipped,
        "{skipped} of {} rows were near-ties",
        compared + skipped
    );
    Ok(())
}

/// One random case (replayable from its arguments). Returns the prefill rows (compared, left out
/// as near-ties).
fn run_case(
    seed: u64,
    batch: usize,
    heads: (usize, usize),
    head_dim: usize,
    dtype: DType,
    generated: usize,
) -> Result<(usize, usize)> {
    let mut rng = Rng::new(seed);
    let layouts = random_layouts(&mut rng, batch);
    let len = layouts[0].len();
    let total = len + generated;
    let (h, hkv) = heads;
    let rope = random_rope(&mut rng, head_dim, total)?;
    let q = random_tensor(&mut rng, &[batch, total, h, head_dim], dtype)?;
    let k = random_tensor(&mut rng, &[batch, total, hkv, head_dim], dtype)?;
    let v = random_tensor(&mut rng, &[batch, total, hkv, head_dim], dtype)?;
    let what = format!("seed {seed} layouts {layouts:?} H {h} Hkv {hkv} D {head_dim} {dtype:?} rope {rope:?}");
    let want = reference::pine_attention(&q, &k, &v, &layouts, &rope, None)?;
    let pine = PineAttention::new(&layouts, rope.clone())?.return_lse(true);

    // Prefill of the prompt: the oracle's first `len` rows (they do not see generated tokens).
    let prompt = |t: &Tensor| t.narrow(1, 0, len);
    let got = pine.prefill(&prompt(&q)?, &prompt(&k)?, &prompt(&v)?)?;
    let (c, s) = compare_with_oracle(
        &got.out,
        &got.lse.unwrap(),
        &prompt_rows(&want, len)?,
        len,
        PineTolerance::of(PinePath::Cpu, dtype),
        &format!("prefill {what}"),
    )?;

    // Decode: the cache holds K rotated once at the original positions.
    let k_cache = pine.rotate_keys(&k)?;
    let step = generated.min(2);
    let got = pine.decode(&q.narrow(1, total - step, step)?, &k_cache, &v)?;
    // The cache holds K rotated and rounded to the dtype: the oracle gets the keys that cache
    // represents (un-rotated exactly enough in f32), so that only the decode step is measured.
    let positions = pine.key_positions(total, &Device::Cpu)?;
    let k_seen = rope.rotate(&k_cache.to_dtype(DType::F32)?, &positions, true)?;
    let want = reference::pine_attention(&q, &k_seen, &v, &layouts, &rope, None)?;
    compare_with_oracle(
        &got.out,
        &got.lse.unwrap(),
        &want,
        step,
        PineTolerance::of(PinePath::Cpu, dtype),
        &format!("decode {what}"),
    )?;
    Ok((c, s))
}

/// With one segment no shift exists: PINE is the PINE mask at the original positions.
#[test]
fn one_segment_is_the_pine_mask_at_original_positions() -> Result<()> {
    let mut rng = Rng::new(7);
    let layout = PineLayout::new(9, &[70], 13);
    let (l, d) = (layout.len(), 64);
    let q = random_tensor(&mut rng, &[1, l, 4, d], DType::F32)?;
    let k = random_tensor(&mut rng, &[1, l, 2, d], DType::F32)?;
    let v = random_tensor(&mut rng, &[1, l, 2, d], DType::F32)?;
    let rope = Rope::new(10_000.0);
    let pine = PineAttention::new(std::slice::from_ref(&layout), rope.clone())?;
    let got = pine.prefill(&q, &k, &v)?.out;
    let pos = pine.key_positions(l, &Device::Cpu)?;
    let mask = SegmentMask::pine(9, &[70], 13, &Device::Cpu)?;
    let want =
        SegmentAttention::new(&mask).forward(&rope.rotate(&q, &pos, false)?, &rope.rotate(&k, &pos, false)?, &v)?;
    let (atol, rtol) = tolerance(DType::F32);
    let (r, at) = worst_ratio(&got, &want.out, atol, rtol)?;
    assert!(r <= 1.0, "off by {r} x tolerance at {at}");
    Ok(())
}

/// The baselines equal plain segment attention on q and k rotated at the scheme's positions.
#[test]
fn baselines_are_masks_and_positions() -> Result<()> {
    let mut rng = Rng::new(11);
    let layout = PineLayout::new(5, &[20, 9, 14], 6);
    let l = layout.len();
    let q = random_tensor(&mut rng, &[1, l, 2, 32], DType::F32)?;
    let k = random_tensor(&mut rng, &[1, l, 1, 32], DType::F32)?;
    let v = random_tensor(&mut rng, &[1, l, 1, 32], DType::F32)?;
    let rope = Rope::new(10_000.0);
    for scheme in [PositionScheme::Vanilla, PositionScheme::Pcw, PositionScheme::Nia] {
        let layer = PineAttention::new(std::slice::from_ref(&layout), rope.clone())?.scheme(scheme);
        let got = layer.prefill(&q, &k, &v)?.out;
        let pos = layer.key_positions(l, &Device::Cpu)?;
        let mask = scheme.mask(std::slice::from_ref(&layout), l, &Device::Cpu)?;
        let want = reference::attention(
            &rope.rotate(&q, &pos, false)?,
            &rope.rotate(&k, &pos, false)?,
            &v,
            &mask,
            None,
        )?;
        let (r, at) = worst_ratio(&got, &want.out, 2e-5, 2e-4)?;
        assert!(r <= 1.0, "{scheme:?}: off by {r} x tolerance at {at}");
        // Decode step against the cache equals the last prefill row.
        let cache = layer.rotate_keys(&k)?;
        let step = layer.decode(&q.narrow(1, l - 1, 1)?, &cache, &v)?.out;
        let (r, _) = worst_ratio(&step, &got.narrow(1, l - 1, 1)?, 1e-6, 1e-5)?;
        assert!(r <= 1.0, "{scheme:?}: decode differs from prefill by {r} x tolerance");
    }
    // PCW positions: segments restart after the prefix; the suffix follows the longest segment.
    let pcw = PositionScheme::Pcw.positions(&layout, l + 1);
    assert_eq!(&pcw[5..8], &[5, 6, 7]);
    assert_eq!(pcw[25], 5);
    assert_eq!(&pcw[48..], &[25, 26, 27, 28, 29, 30, 31]);
    Ok(())
}

/// A layer keeps what a call derives from its layouts (groups, mask, key metadata) for the next
/// call of the same shape and scheme (the other layers of a step): reused across decode steps of
/// different cache lengths, prefill and decode in turn, and clones switched to a baseline scheme
/// (which share the kept step), it gives what a fresh layer gives, bit for bit.
#[test]
fn a_layer_reused_across_shapes_and_schemes_matches_fresh_layers() -> Result<()> {
    let mut rng = Rng::new(12);
    let layout = PineLayout::new(4, &[11, 7, 9, 5], 3);
    let l = layout.len();
    let rope = Rope::new(10_000.0);
    let (h, hkv, d) = (4, 2, 32);
    let q = random_tensor(&mut rng, &[1, l + 3, h, d], DType::F32)?;
    let k = random_tensor(&mut rng, &[1, l + 3, hkv, d], DType::F32)?;
    let v = random_tensor(&mut rng, &[1, l + 3, hkv, d], DType::F32)?;
    let bits = |t: &Tensor| -> Result<Vec<u32>> {
        Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|x| x.to_bits()).collect())
    };
    let fresh = || PineAttention::new(std::slice::from_ref(&layout), rope.clone());
    let kept = fresh()?;
    let cache = kept.rotate_keys(&k)?;
    // Decode steps of growing, then repeated, cache lengths; prefill in between.
    for &(extra, prefill) in &[
        (1usize, false),
        (2, false),
        (2, false),
        (0, true),
        (3, false),
        (1, false),
    ] {
        if prefill {
            let (qp, kp, vp) = (q.narrow(1, 0, l)?, k.narrow(1, 0, l)?, v.narrow(1, 0, l)?);
            let got = kept.prefill(&qp, &kp, &vp)?.out;
            let want = fresh()?.prefill(&qp, &kp, &vp)?.out;
            assert_eq!(bits(&got)?, bits(&want)?, "prefill after decode steps");
        } else {
            let n = l + extra;
            let (qs, kc, vc) = (q.narrow(1, n - 1, 1)?, cache.narrow(1, 0, n)?, v.narrow(1, 0, n)?);
            let got = kept.decode(&qs, &kc, &vc)?.out;
            let want = fresh()?.decode(&qs, &kc, &vc)?.out;
            assert_eq!(bits(&got)?, bits(&want)?, "decode at Lk {n}");
        }
    }
    // A clone switched to a baseline shares the kept step: its mask must be the baseline's.
    for scheme in [PositionScheme::Nia, PositionScheme::Pcw, PositionScheme::Pine] {
        let switched = kept.clone().scheme(scheme);
        let (qp, kp, vp) = (q.narrow(1, 0, l)?, k.narrow(1, 0, l)?, v.narrow(1, 0, l)?);
        let got = switched.prefill(&qp, &kp, &vp)?.out;
        let want = fresh()?.scheme(scheme).prefill(&qp, &kp, &vp)?.out;
        assert_eq!(
            bits(&got)?,
            bits(&want)?,
            "{scheme:?} after PINE calls on a shared step"
        );
    }
    Ok(())
}

/// A decode step with few heads for the threads runs its attention split over the keys
/// (`cpu/decode_split.rs`; forced by a pool of 8 threads): the same step as unsplit (one thread)
/// within tolerance, on an MQA step (32 query heads, one KV head) over a prompt long enough for
/// several chunks, every dtype.
#[test]
fn split_key_decode_matches_unsplit() -> Result<()> {
    let (split, whole) = (
        rayon::ThreadPoolBuilder::new().num_threads(8).build().unwrap(),
        rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap(),
    );
    for (i, (d, dtype)) in [(64, DType::F32), (128, DType::BF16), (128, DType::F16)]
        .into_iter()
        .enumerate()
    {
        let mut rng = Rng::new(40 + i as u64);
        let layout = PineLayout::new(70, &[1500, 1, 1333, 1250], 30 + i);
        let (total, (h, hkv)) = (layout.len() + 1, (32, 1));
        let q = random_tensor(&mut rng, &[1, 1, h, d], dtype)?;
        let k = random_tensor(&mut rng, &[1, total, hkv, d], dtype)?;
        let v = random_tensor(&mut rng, &[1, total, hkv, d], dtype)?;
        let pine = PineAttention::new(&[layout], Rope::new(10_000.0))?.return_lse(true);
        let k_cache = pine.rotate_keys(&k)?;
        let a = split.install(|| pine.decode(&q, &k_cache, &v))?;
        let b = whole.install(|| pine.decode(&q, &k_cache, &v))?;
        let (atol, rtol) = tolerance(dtype);
        let (r, at) = worst_ratio(&a.out, &b.out, atol, rtol)?;
        assert!(
            r <= 1.0,
            "D {d} {dtype:?}: split vs unsplit off by {r} x tolerance at {at}"
        );
        let (r, at) = worst_ratio(&a.lse.unwrap(), &b.lse.unwrap(), common::lse_tolerance(dtype), 0.0)?;
        assert!(r <= 1.0, "D {d} {dtype:?}: lse off by {r} x tolerance at {at}");
    }
    Ok(())
}
