//! Split-K of the CUDA forward kernel (params.kv_splits > 1: key tiles cut into slices run as
//! separate blocks, f32 partials merged by segattn_fwd_combine_* through their LSE), under the
//! SIMT emulator: decode-like shapes (1 to 3 query rows, hundreds of keys), every mask family
//! (incl. rows that see nothing and slices that see nothing), GQA, bf16 / f16, D 64 / 128 / 256,
//! against the f64 reference and the unsplit kernel; and PINE's decode step with split-K against
//! the literal oracle.

mod common;

use candle_core::{DType, IndexOp, Result};
use common::cases::{random_mask, MASK_KINDS};
use common::{
    bits, env_count, lse_tolerance, random_tensor, rotated_lse_tolerance, rotated_tolerance, tolerance, worst_ratio,
    Rng,
};
use segattn::emulated::{forward, forward_split, forward_split_unpacked, pine_decode, Schedule};
use segattn::pine::{PineAttention, Rope};
use segattn::{reference, PineLayout};

fn cases() -> u64 {
    env_count("SEGATTN_EMU_CASES").map_or(12, |n| u64::from(n / 20).max(3))
}

#[test]
fn split_k_matches_reference_and_unsplit() -> Result<()> {
    for seed in 0..cases() {
        let mut rng = Rng::new(seed + 100);
        let batch = 1 + rng.below(2);
        let lk = 65 + rng.below(500);
        let lq = 1 + rng.below(3);
        let (h, hkv) = [(1, 1), (4, 1), (4, 2)][rng.below(3)];
        let d = [64, 128, 256][rng.below(3)];
        let dtype = [DType::BF16, DType::F16][rng.below(2)];
        let kind = rng.below(MASK_KINDS.len());
        let mask = random_mask(&mut rng, kind, batch, lk)?.last_queries(lq)?;
        let q = random_tensor(&mut rng, &[batch, lq, h, d], dtype)?;
        let k = random_tensor(&mut rng, &[batch, lk, hkv, d], dtype)?;
        let v = random_tensor(&mut rng, &[batch, lk, hkv, d], dtype)?;
        let splits = 2 + rng.below(lk.div_ceil(64));
        let what = format!(
            "seed {seed} {} B {batch} Lq {lq} Lk {lk} H {h}/{hkv} D {d} {dtype:?} splits {splits}",
            MASK_KINDS[kind]
        );

        let got = forward_split(&q, &k, &v, &mask, None, splits, Schedule::RandomWarp, seed)?;
        let want = reference::attention(&q, &k, &v, &mask, None)?;
        let (atol, rtol) = tolerance(dtype);
        let (r, at) = worst_ratio(&got.out, &want.out, atol, rtol)?;
        assert!(r <= 1.0, "{what}: output off by {r} x tolerance at {at}");
        let (r, at) = worst_ratio(got.lse.as_ref().unwrap(), &want.lse, lse_tolerance(dtype), 0.0)?;
        assert!(r <= 1.0, "{what}: lse off by {r} x tolerance at {at}");
        let unsplit = forward(&q, &k, &v, &mask, None, Schedule::Forward, seed)?;
        let (r, at) = worst_ratio(&got.out, &unsplit.out, atol, rtol)?;
        assert!(
            r <= 1.0,
            "{what}: split differs from unsplit by {r} x tolerance at {at}"
        );
    }
    Ok(())
}

/// GQA decode packing (src/decode_pack.rs): a one-row step with its query heads as one block's
/// rows gives bitwise the output and LSE of the unpacked launch, split-K or not, under every mask
/// family (causal rules become full for the packed rows), batch rows with their own ids.
#[test]
fn gqa_decode_packing_is_bitwise_the_unpacked_launch() -> Result<()> {
    for seed in 0..2 * cases() {
        let mut rng = Rng::new(seed + 300);
        let batch = 1 + rng.below(2);
        let lk = 1 + rng.below(400);
        let (h, hkv) = [(4, 1), (4, 2), (8, 2), (6, 3), (2, 1)][rng.below(5)];
        let d = [64, 128, 256][rng.below(3)];
        let dtype = [DType::BF16, DType::F16][rng.below(2)];
        let kind = rng.below(MASK_KINDS.len());
        let mask = random_mask(&mut rng, kind, batch, lk)?.last_queries(1)?;
        let q = random_tensor(&mut rng, &[batch, 1, h, d], dtype)?;
        let k = random_tensor(&mut rng, &[batch, lk, hkv, d], dtype)?;
        let v = random_tensor(&mut rng, &[batch, lk, hkv, d], dtype)?;
        let splits = 1 + rng.below(lk.div_ceil(64).min(4));
        let what = format!(
            "seed {seed} {} B {batch} Lk {lk} H {h}/{hkv} D {d} {dtype:?} splits {splits}",
            MASK_KINDS[kind]
        );
        let packed = forward_split(&q, &k, &v, &mask, None, splits, Schedule::RandomWarp, seed)?;
        let unpacked = forward_split_unpacked(&q, &k, &v, &mask, None, splits, Schedule::Forward, seed)?;
        assert_eq!(bits(&packed.out)?, bits(&unpacked.out)?, "{what}: output");
        assert_eq!(
            bits(packed.lse.as_ref().unwrap())?,
            bits(unpacked.lse.as_ref().unwrap())?,
            "{what}: LSE"
        );
    }
    Ok(())
}

/// PINE's decode step with split-K: the rope kernel's slices and the combine; GQA steps run packed
/// (the query heads of a KV head as one block's rows), batch rows with different layouts.
#[test]
fn pine_decode_split_k_matches_the_oracle() -> Result<()> {
    for seed in 0..cases() {
        let mut rng = Rng::new(seed + 7000);
        let n = 1 + rng.below(12);
        let segs: Vec<usize> = (0..n).map(|_| 1 + rng.below(60)).collect();
        let (prefix, suffix) = (1 + rng.below(40), 1 + rng.below(20));
        let mut layouts = vec![PineLayout::new(prefix, &segs, suffix)];
        if rng.below(2) == 0 {
            // A second row of the same length: segments reversed, prefix and suffix swapped.
            let reversed: Vec<usize> = segs.iter().rev().copied().collect();
            layouts.push(PineLayout::new(suffix, &reversed, prefix));
        }
        let batch = layouts.len();
        let total = layouts[0].len() + 1;
        let (h, hkv) = [(2, 1), (4, 2), (4, 1)][rng.below(3)];
        let d = [64, 128, 256][rng.below(3)];
        let dtype = [DType::BF16, DType::F16][rng.below(2)];
        let rope = Rope::new(10_000.0);
        let q = random_tensor(&mut rng, &[batch, total, h, d], dtype)?;
        let k = random_tensor(&mut rng, &[batch, total, hkv, d], dtype)?;
        let v = random_tensor(&mut rng, &[batch, total, hkv, d], dtype)?;
        let pine = PineAttention::new(&layouts, rope.clone())?;
        let splits = 1 + rng.below(total.div_ceil(64) + 1);
        let what = format!("seed {seed} {layouts:?} H {h}/{hkv} D {d} {dtype:?} splits {splits}");
        let k_cache = pine.rotate_keys(&k)?;
        let got = pine_decode(
            &pine,
            &q.narrow(1, total - 1, 1)?,
            &k_cache,
            &v,
            splits,
            Schedule::Forward,
            seed,
        )?;
        let want = reference::pine_attention(&q, &k, &v, &layouts, &rope, None)?;
        let margin = want.margin.to_vec3::<f64>()?;
        let (atol, rtol) = rotated_tolerance(dtype);
        for (b, heads) in margin.iter().enumerate() {
            for (hi, m) in heads.iter().enumerate() {
                if m[total - 1] < 1e-2 {
                    continue; // a near-tie under the cache's rounding
                }
                let (r, at) = worst_ratio(&got.out.i((b, 0, hi))?, &want.out.i((b, total - 1, hi))?, atol, rtol)?;
                assert!(r <= 1.0, "{what}: row {b} head {hi} off by {r} x tolerance at {at}");
                let lse = got.lse.as_ref().unwrap().i((b, hi, 0))?;
                let (r, _) = worst_ratio(
                    &lse,
                    &want.lse.i((b, hi, total - 1))?,
                    rotated_lse_tolerance(dtype),
                    0.0,
                )?;
                assert!(r <= 1.0, "{what}: row {b} head {hi} lse off by {r} x tolerance");
            }
        }
    }
    Ok(())
}

/// NaN inputs give NaN rows on the CUDA kernels as on the CPU path (`tests/cpu_attention.rs`): a
/// NaN in a query makes that row's output, LSE and mass NaN; a NaN in key 60 makes every row that
/// sees it NaN; the rows that see neither keep their bits. The plain kernel, split-K (its merge
/// carries a slice's NaN LSE, which `fmaxf` would pass over), the fused mass and the standalone
/// mass in both of its algorithms.
#[test]
fn nan_inputs_make_the_rows_that_see_them_nan() -> Result<()> {
    use segattn::emulated::{forward_with_mass_tiled, segment_scores, Tile};
    use segattn::{MassAlgorithm, SegmentMask, SegmentScoreOptions};
    let dev = candle_core::Device::Cpu;
    let (l, d) = (130, 64);
    let mask = SegmentMask::documents(&[&[50usize, 80][..]], &dev)?;
    let mut rng = Rng::new(7);
    let (q, k, v) = (
        random_tensor(&mut rng, &[1, l, 2, d], DType::BF16)?,
        random_tensor(&mut rng, &[1, l, 1, d], DType::BF16)?,
        random_tensor(&mut rng, &[1, l, 1, d], DType::BF16)?,
    );
    let with_nan = |t: &candle_core::Tensor, row: usize, head: usize| -> Result<candle_core::Tensor> {
        let mut x = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        x[(row * t.dim(2)? + head) * d + 5] = f32::NAN;
        candle_core::Tensor::from_vec(x, t.dims(), &dev)?.to_dtype(DType::BF16)
    };
    let flat = |t: &candle_core::Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
    for lq in [l, 2] {
        let mask = mask.last_queries(lq)?;
        let q = q.narrow(1, l - lq, lq)?;
        let (q_nan, k_nan) = (with_nan(&q, lq - 1, 1)?, with_nan(&k, 60, 0)?);
        // Row i (position l - lq + i), head h is NaN in that run.
        let hit_q = |i: usize, h: usize| i == lq - 1 && h == 1;
        let hit_k = |i: usize, _h: usize| l - lq + i >= 60;
        // Each run as (output [Lq, 2, D], LSE [2, Lq], mass [2, Lq, Sk]) vectors.
        type Run = (Vec<f32>, Vec<f32>, Vec<f32>);
        let mass_opts = SegmentScoreOptions::new();
        let splits: &[usize] = if lq == 2 { &[1, 3] } else { &[1] };
        for &kv_splits in splits {
            let run = |q: &candle_core::Tensor, k: &candle_core::Tensor| -> Result<Run> {
                let got = forward_with_mass_tiled(
                    q,
                    k,
                    &v,
                    &mask,
                    None,
                    &mass_opts,
                    kv_splits,
                    Tile::Rows64,
                    Schedule::Forward,
                    0,
                )?;
                Ok((
                    flat(&got.out)?,
                    flat(got.lse.as_ref().unwrap())?,
                    flat(got.segment_mass.as_ref().unwrap())?,
                ))
            };
            let clean = run(&q, &k)?;
            for (what, got, hit) in [
                ("NaN query", run(&q_nan, &k)?, &hit_q as &dyn Fn(usize, usize) -> bool),
                ("NaN key 60", run(&q, &k_nan)?, &hit_k),
            ] {
                let sk = got.2.len() / (2 * lq);
                for i in 0..lq {
                    for h in 0..2 {
                        let o = |r: &Run| r.0[(i * 2 + h) * d..(i * 2 + h + 1) * d].to_vec();
                        let m = |r: &Run| r.2[(h * lq + i) * sk..(h * lq + i + 1) * sk].to_vec();
                        let lse = |r: &Run| r.1[h * lq + i];
                        let ok = if hit(i, h) {
                            o(&got).iter().chain(&m(&got)).all(|x| x.is_nan()) && lse(&got).is_nan()
                        } else {
                            let same = |a: Vec<f32>, b: Vec<f32>| {
                                a.iter().map(|x| x.to_bits()).eq(b.iter().map(|x| x.to_bits()))
                            };
                            same(o(&got), o(&clean)) && lse(&got).to_bits() == lse(&clean).to_bits()
                        };
                        assert!(ok, "{what}, Lq {lq}, {kv_splits} splits: row {i} head {h}");
                    }
                }
            }
        }
        // The standalone mass, one pass and two (whose second pass takes the first's LSE).
        for algorithm in [MassAlgorithm::OnePass, MassAlgorithm::TwoPass] {
            let opts = SegmentScoreOptions::new().algorithm(algorithm);
            for (what, q, k, hit) in [
                ("NaN query", &q_nan, &k, &hit_q as &dyn Fn(usize, usize) -> bool),
                ("NaN key 60", &q, &k_nan, &hit_k),
            ] {
                let got = flat(&segment_scores(q, k, &mask, &opts, Schedule::Forward, 0)?)?;
                let sk = got.len() / (2 * lq);
                for i in 0..lq {
                    for h in 0..2 {
                        let row = &got[(h * lq + i) * sk..(h * lq + i + 1) * sk];
                        assert_eq!(
                            row.iter().all(|x| x.is_nan()),
                            hit(i, h),
                            "mass {algorithm:?}, {what}, Lq {lq}: row {i} head {h}: {row:?}"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
