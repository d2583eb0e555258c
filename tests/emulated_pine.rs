//! PINE's CUDA attention kernel (segattn_fwd_rope_*: the query turned inside the loop per row and
//! key segment), run on the CPU under the SIMT emulator, against the literal oracle
//! ([`segattn::reference::pine_attention`]): random layouts (ragged segments, single tokens, tiles
//! that straddle segments), GQA, bf16 and f16, D = 64 and 128, two thread schedules whose outputs
//! must be bitwise identical.
//!
//! The kernel reads K rotated once and rounded to the dtype, and rounds each turned query to the
//! dtype for the tensor cores: two roundings more than the plain kernel, which
//! `rotated_tolerance` covers. Query groups whose importance order is a near-tie are left out, as
//! in tests/pine.rs.
//!
//! `SEGATTN_EMU_CASES=n` scales the number of random cases (default 256 -> 6 here).

mod common;

use candle_core::{DType, Result};
use common::pine::{compare_with_oracle, PinePath, PineTolerance};
use common::{bits, env_count, one_rounding_tolerance, random_tensor, Rng};
use segattn::emulated::{
    pine_decode, pine_decode_importance_both, pine_decode_wgmma, pine_prefill, pine_prefill_wgmma, pine_shifts_both,
    rope_rows, Schedule,
};
use segattn::pine::{PineAttention, Rope};
use segattn::{reference, PineLayout};

fn cases() -> u64 {
    env_count("SEGATTN_EMU_CASES").map_or(6, |n| u64::from(n / 40).max(2))
}

fn random_layout(rng: &mut Rng) -> PineLayout {
    let n = 1 + rng.below(8);
    let segs: Vec<usize> = (0..n)
        .map(|_| if rng.below(4) == 0 { 1 } else { 1 + rng.below(40) })
        .collect();
    PineLayout::new(1 + rng.below(40), &segs, 1 + rng.below(30))
}

/// One random case; returns the rows (compared, left out as near-ties).
fn run_case(seed: u64) -> Result<(usize, usize)> {
    let mut rng = Rng::new(seed);
    let batch = 1 + rng.below(2);
    let mut layouts: Vec<PineLayout> = (0..batch).map(|_| random_layout(&mut rng)).collect();
    let len = layouts.iter().map(PineLayout::len).max().unwrap();
    for l in &mut layouts {
        l.suffix_len += len - l.len();
    }
    let heads = [(1, 1), (2, 1), (4, 2)][rng.below(3)];
    let d = [64, 128, 256][rng.below(3)];
    let dtype = [DType::BF16, DType::F16][rng.below(2)];
    run_layouts(seed, &layouts, heads, d, dtype)
}

fn run_layouts(
    seed: u64,
    layouts: &[PineLayout],
    (h, hkv): (usize, usize),
    d: usize,
    dtype: DType,
) -> Result<(usize, usize)> {
    let mut rng = Rng::new(seed ^ 0x5eed);
    let (batch, len) = (layouts.len(), layouts[0].len());
    let rope = Rope::new([10_000.0, 500_000.0][rng.below(2)]);
    let q = random_tensor(&mut rng, &[batch, len, h, d], dtype)?;
    let k = random_tensor(&mut rng, &[batch, len, hkv, d], dtype)?;
    let v = random_tensor(&mut rng, &[batch, len, hkv, d], dtype)?;
    let what = format!("seed {seed} layouts {layouts:?} H {h} Hkv {hkv} D {d} {dtype:?}");

    let pine = PineAttention::new(layouts, rope.clone())?;
    let got = pine_prefill(&pine, &q, &k, &v, Schedule::Forward, seed)?;
    let again = pine_prefill(&pine, &q, &k, &v, Schedule::RandomWarp, seed)?;
    let same = (got.out.to_dtype(DType::F32)? - again.out.to_dtype(DType::F32)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert_eq!(same, 0.0, "{what}: schedules disagree");

    let want = reference::pine_attention(&q, &k, &v, layouts, &rope, None)?;
    let lse = got.lse.expect("the emulated kernel returns the LSE");
    let tol = PineTolerance::of(PinePath::Emulated, dtype);
    compare_with_oracle(&got.out, &lse, &want, len, tol, &what)
}

#[test]
fn rotated_kernel_matches_the_literal_oracle() -> Result<()> {
    let base = std::env::var("SEGATTN_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| std::process::id() as u64);
    let (mut compared, mut skipped) = (0, 0);
    for c in 0..cases() {
        let (n, s) = run_case(base.wrapping_mul(1000).wrapping_add(c))?;
        compared += n;
        skipped += s;
    }
    // Near-ties are rare over the run (one case may lose a whole long segment's group).
    assert!(
        skipped <= compared,
        "{skipped} rows left out as near-ties, {compared} compared"
    );
    Ok(())
}

/// Tiles that straddle segments by construction: key tile 0 holds the prefix and segments 1 and
/// 2, tile 1 the ends of segments 3 and 4, single-token segments 5 to 9 and segment 10; the
/// suffix starts inside tile 2. Every head dim (D 256: key tiles of 32), both dtypes, GQA.
#[test]
fn tiles_straddling_segments() -> Result<()> {
    let layout = PineLayout::new(30, &[3, 25, 20, 20, 1, 1, 1, 1, 1, 30], 20);
    for (d, dtype) in [(64, DType::BF16), (128, DType::F16), (256, DType::BF16)] {
        let (compared, _) = run_layouts(7, std::slice::from_ref(&layout), (4, 2), d, dtype)?;
        assert!(compared > 0);
    }
    Ok(())
}

/// The wgmma rope kernel (`segattn_fwd_hopper_rope_*`, PINE's attention on an H100 / H200) gives
/// the mma.sync rope kernel's bits under the emulator, prefill and decode (split-K, GQA decode
/// packing): its turned query is the same rounding of the same arithmetic (`QueryRotator::rotate`),
/// and a tile across segments keeps each column from the product of its own piece. Layouts with
/// straddling tiles and single-token segments, D 64 / 128, both dtypes, GQA.
#[test]
fn wgmma_rope_kernel_gives_the_mma_sync_bits() -> Result<()> {
    for seed in 0..cases() + 2 {
        let mut rng = Rng::new(seed + 9100);
        let mut layouts = vec![if seed == 0 {
            PineLayout::new(30, &[3, 25, 20, 20, 1, 1, 1, 1, 1, 30], 20)
        } else {
            random_layout(&mut rng)
        }];
        if rng.below(2) == 0 {
            let l = &layouts[0];
            let reversed: Vec<usize> = l.segment_lens.iter().rev().copied().collect();
            layouts.push(PineLayout::new(l.suffix_len, &reversed, l.prefix_len));
        }
        let (batch, len) = (layouts.len(), layouts[0].len());
        let (h, hkv) = [(1, 1), (2, 1), (4, 2), (4, 1)][rng.below(4)];
        let d = [64, 128][rng.below(2)];
        let dtype = [DType::BF16, DType::F16][rng.below(2)];
        let q = random_tensor(&mut rng, &[batch, len, h, d], dtype)?;
        let k = random_tensor(&mut rng, &[batch, len, hkv, d], dtype)?;
        let v = random_tensor(&mut rng, &[batch, len, hkv, d], dtype)?;
        let pine = PineAttention::new(&layouts, Rope::new(10_000.0))?;
        let what = format!("seed {seed} {layouts:?} H {h}/{hkv} D {d} {dtype:?}");
        let schedule = [Schedule::Forward, Schedule::RandomWarp][rng.below(2)];
        let mma = pine_prefill(&pine, &q, &k, &v, schedule, seed)?;
        let wgmma = pine_prefill_wgmma(&pine, &q, &k, &v, schedule, seed)?;
        assert_eq!(bits(&wgmma.out)?, bits(&mma.out)?, "{what}: prefill output");
        assert_eq!(
            bits(wgmma.lse.as_ref().unwrap())?,
            bits(mma.lse.as_ref().unwrap())?,
            "{what}: prefill LSE"
        );
        // A decode step: the last token against the rotated cache, with and without split-K.
        let k_cache = pine.rotate_keys(&k)?;
        let last = q.narrow(1, len - 1, 1)?;
        for splits in [1, 1 + rng.below(len.div_ceil(64) + 1)] {
            let mma = pine_decode(&pine, &last, &k_cache, &v, splits, schedule, seed)?;
            let wgmma = pine_decode_wgmma(&pine, &last, &k_cache, &v, splits, schedule, seed)?;
            assert_eq!(
                bits(&wgmma.out)?,
                bits(&mma.out)?,
                "{what}: decode output, {splits} slices"
            );
        }
    }
    Ok(())
}

/// The device-side order and shifts (segattn_pine_shifts: ranking by counting) equal the CPU's
/// (a stable sort per group) on the same scores: random layouts, batch rows with different segment
/// counts (n = 1, 2 and more), and exact ties (repeated segments: equal keys give equal scores).
#[test]
fn device_shifts_match_the_cpu_order() -> Result<()> {
    for seed in 0..12u64 {
        let mut rng = Rng::new(seed);
        let batch = 1 + rng.below(3);
        let mut layouts: Vec<PineLayout> = (0..batch)
            .map(|_| {
                let n = [1, 2, 3, 5, 9][rng.below(5)];
                let segs: Vec<usize> = (0..n).map(|_| 1 + rng.below(12)).collect();
                PineLayout::new(1 + rng.below(9), &segs, 1 + rng.below(9))
            })
            .collect();
        let len = layouts.iter().map(PineLayout::len).max().unwrap();
        for l in &mut layouts {
            l.suffix_len += len - l.len();
        }
        let (h, hkv, d) = (4, 2, 16);
        let q = random_tensor(&mut rng, &[batch, len, h, d], DType::F32)?;
        let mut k = random_tensor(&mut rng, &[batch, len, hkv, d], DType::F32)?;
        if seed % 2 == 0 {
            // Ties: every key is the same vector (equal-length segments then score exactly alike).
            let same = random_tensor(&mut rng, &[1, 1, hkv, d], DType::F32)?.broadcast_as((batch, len, hkv, d))?;
            k = same.contiguous()?;
        }
        let pine = PineAttention::new(&layouts, Rope::new(10_000.0))?;
        let (cpu, kernel) = pine_shifts_both(&pine, &q, &k)?;
        assert_eq!(cpu, kernel, "seed {seed} layouts {layouts:?}");
    }
    Ok(())
}

/// The GPU's decode-importance kernel (each key un-rotated inside its dot product) equals the
/// CPU's (the query turned per key position) on the same rotated cache, and the order it derives
/// from its scores is the CPU order of those scores: random layouts, batch rows with different
/// layouts, GQA, bf16 / f16, D 64 / 128 / 256, one or two decode rows, one to 128 key slices (the
/// most).
#[test]
fn decode_importance_kernel_matches_the_cpu() -> Result<()> {
    for seed in 0..16u64 {
        let mut rng = Rng::new(seed + 500);
        let batch = 1 + rng.below(2);
        let mut layouts: Vec<PineLayout> = (0..batch).map(|_| random_layout(&mut rng)).collect();
        let len = layouts.iter().map(PineLayout::len).max().unwrap();
        for l in &mut layouts {
            l.suffix_len += len - l.len();
        }
        let rows = 1 + rng.below(2);
        let total = len + rows;
        let (h, hkv) = [(2, 1), (4, 2), (4, 4), (8, 2), (6, 1)][rng.below(5)];
        let d = [64, 128, 256][rng.below(3)];
        let dtype = [DType::BF16, DType::F16][rng.below(2)];
        let q = random_tensor(&mut rng, &[batch, rows, h, d], dtype)?;
        let k = random_tensor(&mut rng, &[batch, total, hkv, d], dtype)?;
        let pine = PineAttention::new(&layouts, Rope::new(10_000.0))?;
        let k_cache = pine.rotate_keys(&k)?;
        // One slice, or several merged (slices of a few keys, some holding no segment key).
        let splits = [1, 2, 5, 64, 128][rng.below(5)];
        let both = pine_decode_importance_both(&pine, &q, &k_cache, splits)?;
        let (cpu, kernel) = (&both.cpu, &both.kernel);
        // The kernel's own order of its rows: exactly the CPU order of its scores.
        assert_eq!(
            both.kernel_shifts, both.shifts_of_kernel_scores,
            "seed {seed} {layouts:?} H {h}/{hkv} splits {splits}: shifts"
        );
        for (i, (a, b)) in cpu.iter().zip(kernel).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 + 1e-4 * a.abs(),
                "seed {seed} {layouts:?} H {h}/{hkv} D {d} {dtype:?} splits {splits}: element {i}: CPU {a}, kernel {b}"
            );
        }
        assert!(cpu.iter().any(|&x| x > 0.0), "seed {seed}: nothing scored");
    }
    Ok(())
}

/// More key slices than the decode-importance merge holds (128): an error naming kv_splits.
#[test]
fn decode_importance_rejects_too_many_slices() -> Result<()> {
    let mut rng = Rng::new(77);
    let layouts = vec![PineLayout::new(4, &[30, 30], 2)];
    let q = random_tensor(&mut rng, &[1, 1, 2, 64], DType::BF16)?;
    let k = random_tensor(&mut rng, &[1, layouts[0].len() + 1, 1, 64], DType::BF16)?;
    let pine = PineAttention::new(&layouts, Rope::new(10_000.0))?;
    let k_cache = pine.rotate_keys(&k)?;
    let msg = match pine_decode_importance_both(&pine, &q, &k_cache, 129) {
        Ok(_) => panic!("129 slices must fail"),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains("kv_splits") && msg.contains("128") && msg.contains("129"),
        "{msg}"
    );
    Ok(())
}

/// The rope-rows kernel (PINE's keys rotated once on the GPU, in the input dtype) equals the CPU
/// rotation rounded to the dtype, within one unit in the last place: random shapes, head dims
/// (any even one), strided views, positions shared or per batch row, rotation and its inverse.
#[test]
fn rope_rows_kernel_matches_the_cpu_rotation() -> Result<()> {
    for seed in 0..24u64 {
        let mut rng = Rng::new(seed + 900);
        let (b, l, heads) = (1 + rng.below(2), 1 + rng.below(300), 1 + rng.below(8));
        let d = [2, 64, 96, 128][rng.below(4)];
        let dtype = [DType::BF16, DType::F16][rng.below(2)];
        // A strided view: every other head of a wider tensor.
        let wide = random_tensor(&mut rng, &[b, l, 2 * heads, d], dtype)?;
        let x = wide.reshape((b, l, heads, 2, d))?.narrow(3, 1, 1)?.squeeze(3)?;
        let pb = if rng.below(2) == 0 { 1 } else { b };
        let positions: Vec<u32> = (0..pb * l).map(|_| rng.below(5000) as u32).collect();
        let inverse = rng.below(2) == 1;
        let rope = if rng.below(2) == 0 {
            Rope::new(10_000.0)
        } else {
            Rope::new(500_000.0).with_llama3_scaling(segattn::pine::Llama3Scaling::llama31())
        };
        let pos_t = candle_core::Tensor::from_vec(positions.clone(), (pb, l), &candle_core::Device::Cpu)?;
        let want = rope
            .rotate(&x, &pos_t, inverse)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let got = rope_rows(&rope, &x, &positions, pb, inverse)?;
        assert_eq!(got.dtype(), dtype);
        let got = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let (atol, rtol) = one_rounding_tolerance(dtype);
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            assert!(
                ((w - g).abs() as f64) <= atol + rtol * w.abs() as f64,
                "seed {seed} [{b}, {l}, {heads}, {d}] {dtype:?} pb {pb} inverse {inverse}: element {i}: CPU {w}, kernel {g}"
            );
        }
    }
    Ok(())
}
