//! PINE on a real GPU through the public API ([`PineAttention`] on `Device::new_cuda(0)`
//! tensors): importance (the mass kernel), order and shifts (the shifts kernel, on the device) and
//! the attention kernel with the query turned in the loop, against the literal oracle on the CPU;
//! prefill and decode, random layouts, GQA, bf16 and f16, D 64, 128 and 256 (and 96, zero-padded
//! to 128 by the API); and the baselines.
//!
//! Compiled only with `--features cuda`; skipped without a GPU unless `SEGATTN_REQUIRE_GPU=1`.
//! `SEGATTN_GPU_CASES=n` scales the number of random cases (default 400 -> 40 here).
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::gpu::gpu;
use common::pine::{compare_with_oracle, prompt_rows, PinePath, PineTolerance};
use common::{env_count, misaligned, random_tensor, worst_ratio, Rng};
use segattn::pine::{PineAttention, PositionScheme, Rope};
use segattn::{reference, PineLayout};

fn cases() -> u64 {
    env_count("SEGATTN_GPU_CASES").map_or(40, |n| u64::from(n / 10).max(4))
}

fn random_layouts(rng: &mut Rng, batch: usize) -> Vec<PineLayout> {
    let mut layouts: Vec<PineLayout> = (0..batch)
        .map(|_| {
            let n = 1 + rng.below(30);
            let segs: Vec<usize> = (0..n)
                .map(|_| if rng.below(5) == 0 { 1 } else { 1 + rng.below(150) })
                .collect();
            PineLayout::new(1 + rng.below(64), &segs, 1 + rng.below(64))
        })
        .collect();
    let len = layouts.iter().map(PineLayout::len).max().unwrap();
    for l in &mut layouts {
        l.suffix_len += len - l.len();
    }
    layouts
}

#[test]
fn gpu_pine_matches_the_literal_oracle() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let (mut compared, mut skipped) = (0, 0);
    for seed in 0..cases() {
        let mut rng = Rng::new(seed);
        let batch = 1 + rng.below(2);
        let layouts = random_layouts(&mut rng, batch);
        let len = layouts[0].len();
        let total = len + 1 + rng.below(3);
        let (h, hkv) = [(4, 1), (8, 2), (4, 4)][rng.below(3)];
        // Sometimes a head dim the API pads to 128 (RoPE's pairs kept through the padding).
        let d = [64, 128, 64, 128, 96, 256][rng.below(6)];
        let dtype = [DType::BF16, DType::F16][rng.below(2)];
        let rope = Rope::new(500_000.0);
        let q = random_tensor(&mut rng, &[batch, total, h, d], dtype)?;
        let k = random_tensor(&mut rng, &[batch, total, hkv, d], dtype)?;
        let v = random_tensor(&mut rng, &[batch, total, hkv, d], dtype)?;
        let what = format!("seed {seed} layouts {layouts:?} H {h} Hkv {hkv} D {d} {dtype:?}");
        let want = reference::pine_attention(&q, &k, &v, &layouts, &rope, None)?;
        let pine = PineAttention::new(&layouts, rope.clone())?.return_lse(true);
        let on = |t: &Tensor| t.to_device(&dev);

        let p = |t: &Tensor| t.narrow(1, 0, len);
        let got = pine.prefill(&on(&p(&q)?)?, &on(&p(&k)?)?, &on(&p(&v)?)?)?;
        assert!(got.out.device().same_device(&dev), "{what}: prefill left the GPU");
        let (c, s) = compare_with_oracle(
            &got.out,
            &got.lse.unwrap(),
            &prompt_rows(&want, len)?,
            len,
            PineTolerance::of(PinePath::Gpu, dtype),
            &format!("prefill {what}"),
        )?;
        compared += c;
        skipped += s;

        let k_cache = pine.rotate_keys(&on(&k)?)?;
        // Every other case reads the cache from a view that starts 2 bytes past a 16-byte
        // boundary (the kernels' 16-byte loads cannot read it in place: copied first).
        let k_cache = if seed % 2 == 1 { misaligned(&k_cache)? } else { k_cache };
        let got = pine.decode(&on(&q.narrow(1, total - 1, 1)?)?, &k_cache, &on(&v)?)?;
        // The cache holds K rotated and rounded to the dtype: the oracle gets the keys that cache
        // represents (un-rotated in f32), so that the decode step alone is measured, not the
        // cache's rounding (which moves importance scores by ~1e-3 relative in bf16: enough to
        // flip an order whose margin is above the near-tie threshold).
        let positions = pine.key_positions(total, &Device::Cpu)?;
        let k_seen = rope.rotate(
            &k_cache.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
            &positions,
            true,
        )?;
        let want = reference::pine_attention(&q, &k_seen, &v, &layouts, &rope, None)?;
        compare_with_oracle(
            &got.out,
            &got.lse.unwrap(),
            &want,
            1,
            PineTolerance::of(PinePath::Gpu, dtype),
            &format!("decode {what}"),
        )?;
    }
    eprintln!("near-ties: {skipped} rows left out, {compared} compared");
    // Near-ties are rare over the run (16-bit scores and f16 probabilities make more of them).
    assert!(
        skipped <= compared,
        "{skipped} rows left out as near-ties, {compared} compared"
    );
    Ok(())
}

/// The baselines run on the GPU too and equal the CPU path.
#[test]
fn gpu_baselines_match_the_cpu() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let mut rng = Rng::new(3);
    let layout = PineLayout::new(40, &[100, 37, 80], 20);
    let l = layout.len();
    let q = random_tensor(&mut rng, &[1, l, 8, 128], DType::BF16)?;
    let k = random_tensor(&mut rng, &[1, l, 2, 128], DType::BF16)?;
    let v = random_tensor(&mut rng, &[1, l, 2, 128], DType::BF16)?;
    for scheme in [PositionScheme::Vanilla, PositionScheme::Pcw, PositionScheme::Nia] {
        let layer = PineAttention::new(std::slice::from_ref(&layout), Rope::new(10_000.0))?.scheme(scheme);
        let cpu = layer.prefill(&q, &k, &v)?.out;
        let gpu = layer
            .prefill(&q.to_device(&dev)?, &k.to_device(&dev)?, &v.to_device(&dev)?)?
            .out;
        let (r, at) = worst_ratio(&gpu.to_device(&Device::Cpu)?, &cpu, 2e-2, 2e-2)?;
        assert!(r <= 1.0, "{scheme:?}: GPU off the CPU by {r} x tolerance at {at}");
    }
    Ok(())
}

/// Decode shapes (one query row, or a chunk of 130 rows: three query tiles, each merged by its
/// own last slice; long keys) take the split-K path (blocks << SMs): plain attention under every
/// preset against the reference.
#[test]
fn gpu_split_k_decode_matches_reference() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let mut rng = Rng::new(11);
    for (lk, d, dtype, rows) in [
        (2000, 128, DType::BF16, 1),
        (777, 64, DType::F16, 1),
        (4096, 128, DType::F16, 1),
        (4096, 64, DType::BF16, 130),
    ] {
        let layout = PineLayout::new(100, &[lk / 4, lk / 3, 57], lk - 100 - lk / 4 - lk / 3 - 57);
        for mask in [
            segattn::SegmentMask::causal(lk, &Device::Cpu)?,
            segattn::SegmentMask::pine_batch(std::slice::from_ref(&layout), &Device::Cpu)?,
        ] {
            let mask = mask.last_queries(rows)?;
            let q = random_tensor(&mut rng, &[1, rows, 8, d], dtype)?;
            let k = random_tensor(&mut rng, &[1, lk, 2, d], dtype)?;
            let v = random_tensor(&mut rng, &[1, lk, 2, d], dtype)?;
            let want = reference::attention(&q, &k, &v, &mask, None)?;
            let on_gpu = segattn::SegmentMask::new(
                &mask.q_segments().to_device(&dev)?,
                &mask.kv_segments().to_device(&dev)?,
                mask.rule().clone(),
            )?;
            let got = segattn::SegmentAttention::new(&on_gpu).return_lse(true).forward(
                &q.to_device(&dev)?,
                &k.to_device(&dev)?,
                &v.to_device(&dev)?,
            )?;
            let (r, at) = worst_ratio(&got.out.to_device(&Device::Cpu)?, &want.out, 2e-2, 2e-2)?;
            assert!(r <= 1.0, "Lk {lk} D {d} rows {rows}: off by {r} x tolerance at {at}");
            let (r, _) = worst_ratio(&got.lse.unwrap().to_device(&Device::Cpu)?, &want.lse, 2e-3, 0.0)?;
            assert!(r <= 1.0, "Lk {lk} D {d} rows {rows}: lse off by {r} x tolerance");
        }
    }
    Ok(())
}

/// Decode steps from several host threads at once, plain (split-K over a long cache) and PINE
/// (its decode importance's slices, then split-K), one layer object shared by every thread, as a
/// server does. candle's `Device::new_cuda` queues each host thread on its own per-thread stream:
/// the split launches' partials and counters must be each thread's own, and the layer's device
/// copies (uploaded by whichever thread came first) ready on the others' streams. Every thread
/// must get the bits of the same step made alone.
#[test]
fn decode_steps_from_several_threads_give_the_bits_of_one() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let mut rng = Rng::new(12);
    let (h, hkv, d) = (32, 8, 128);
    let layout = PineLayout::new(256, &[150; 20], 64);
    let len = layout.len();
    // A layer and a decode mask as a model holds them (their device copies made on first use).
    let layer = || -> Result<(PineAttention, segattn::SegmentMask)> {
        let pine = PineAttention::new(std::slice::from_ref(&layout), Rope::new(500_000.0))?;
        Ok((pine, segattn::SegmentMask::causal(len + 1, &dev)?.last_queries(1)?))
    };
    // Four different steps (query and cache), each against the whole prompt and one new token.
    let steps: Vec<(Tensor, Tensor, Tensor)> = (0..4)
        .map(|_| -> Result<(Tensor, Tensor, Tensor)> {
            let q = random_tensor(&mut rng, &[1, 1, h, d], DType::BF16)?.to_device(&dev)?;
            let k = random_tensor(&mut rng, &[1, len + 1, hkv, d], DType::BF16)?.to_device(&dev)?;
            let v = random_tensor(&mut rng, &[1, len + 1, hkv, d], DType::BF16)?.to_device(&dev)?;
            Ok((q, k, v))
        })
        .collect::<Result<_>>()?;
    let step = |(pine, mask): &(PineAttention, segattn::SegmentMask),
                (q, k, v): &(Tensor, Tensor, Tensor)|
     -> Result<(Vec<u32>, Vec<u32>)> {
        let plain = segattn::SegmentAttention::new(mask).forward(q, k, v)?;
        Ok((common::bits(&plain.out)?, common::bits(&pine.decode(q, k, v)?.out)?))
    };
    let alone_layer = layer()?;
    let alone: Vec<(Vec<u32>, Vec<u32>)> = steps.iter().map(|x| step(&alone_layer, x)).collect::<Result<_>>()?;
    // The threads share a fresh layer and mask, whose device copies the first of them makes. The
    // inputs (and the mask's ids) were uploaded on this thread's stream: done before others read.
    let shared = layer()?;
    dev.synchronize()?;
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (steps, alone, step, shared) = (&steps, &alone, &step, &shared);
                s.spawn(move || -> Result<()> {
                    for round in 0..12 {
                        let i = (t + round) % steps.len();
                        let got = step(shared, &steps[i])?;
                        assert!(got.0 == alone[i].0, "thread {t} round {round}: plain step {i} differs");
                        assert!(got.1 == alone[i].1, "thread {t} round {round}: PINE step {i} differs");
                    }
                    Ok(())
                })
            })
            .collect();
        threads
            .into_iter()
            .try_for_each(|t| t.join().expect("a decode thread panicked"))
    })
}
