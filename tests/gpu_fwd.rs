//! The CUDA forward kernels on a real GPU, through the public API (`SegmentAttention::forward` on
//! `Device::new_cuda(0)` tensors and masks), against the f64 reference: the property tests of
//! tests/emulated_fwd.rs (random shapes with ragged lengths, GQA, Lq < Lk and cross attention,
//! every mask family, random pair tables shared and per row with fully masked rows, bf16 and
//! f16, D 64 and 128, strided views, custom scales), with more and larger cases, D 256 and other
//! head dims (zero-padded to 64 / 128 / 256 by the API), plus large
//! shapes against the fused CPU path, determinism, misaligned views, empty inputs and the error
//! messages of unsupported inputs. Training: the gradients through the fused backward kernel
//! against the reference (short rows) and against the candle-ops backward (long rows).
//!
//! Compiled only with `--features cuda`. Without a usable GPU every test prints "skipped" and
//! passes, unless `SEGATTN_REQUIRE_GPU=1` (scripts/gpu-suite-remote.sh sets it): then it fails.
//! Outputs are poisoned with NaN before every launch (`SEGATTN_CUDA_POISON=1`) and every launch
//! is synchronized and checked (`SEGATTN_CUDA_SYNC=1`); both are set here unless already set.
//!
//! `SEGATTN_GPU_CASES=n` sets the number of random cases (default 400, over 8 parallel tests).
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::cases::{random_mask, MASK_KINDS};
use common::gpu::{dry_run, gpu, mask_on};
use common::{
    autograd_gradients, env_count, fused_gradient_tolerance, proptest_config, random_tensor, worst_ratio,
    worst_ratio_scaled, Rng,
};
use proptest::prelude::*;
use segattn::{reference, PairRule, PairTable, SegmentAttention, SegmentMask, Visibility};

/// Output tolerances `(atol, rtol)` of the tensor-core kernel (bf16 P, f32 accumulation), for
/// inputs of magnitude at most 1 (the emulated kernel's tolerances).
fn tolerance(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::BF16 => (2e-2, 2e-2),
        _ => (5e-3, 5e-3),
    }
}

/// LSE tolerances `(atol, rtol)`: computed in f32 from exact products of the inputs.
const LSE_TOLERANCE: (f64, f64) = (1e-3, 1e-4);

fn cases(default: u32) -> u32 {
    env_count("SEGATTN_GPU_CASES").unwrap_or(default)
}

/// Values of magnitude in [0.25, 1] with random signs, rounded to `dtype`, on the CPU.
fn values(rng: &mut Rng, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let x = (0.25 + 0.75 * rng.unit()) as f32;
            if rng.below(2) == 0 {
                -x
            } else {
                x
            }
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
}

/// Inputs on the CPU. `strided`: q a transposed `[B, H, Lq, D]` view, k and v the two halves of
/// one fused `[B, Lk, 2 Hkv, D]` tensor (read in place on the GPU too).
fn inputs(
    rng: &mut Rng,
    (b, lq, lk, h, hkv, d): (usize, usize, usize, usize, usize, usize),
    dtype: DType,
    strided: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    if strided {
        let q = values(rng, &[b, h, lq, d], dtype)?.transpose(1, 2)?;
        let kv = values(rng, &[b, lk, 2 * hkv, d], dtype)?;
        Ok((q, kv.narrow(2, 0, hkv)?, kv.narrow(2, hkv, hkv)?))
    } else {
        Ok((
            values(rng, &[b, lq, h, d], dtype)?,
            values(rng, &[b, lk, hkv, d], dtype)?,
            values(rng, &[b, lk, hkv, d], dtype)?,
        ))
    }
}

/// Runs the public API on the GPU, checks output and LSE against `want` (out `[B, Lq, H, D]`,
/// lse `[B, H, Lq]`, any float dtype), and returns the GPU output (CPU copy, f32).
#[allow(clippy::too_many_arguments)]
fn check_gpu(
    desc: &str,
    dev: &Device,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    mask: &SegmentMask,
    scale: Option<f64>,
    want_out: &Tensor,
    want_lse: &Tensor,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let gmask = mask_on(mask, dev)?;
    // to_device copies the storage and keeps the layout: strided views stay views on the GPU.
    let (gq, gk, gv) = (q.to_device(dev)?, k.to_device(dev)?, v.to_device(dev)?);
    let mut op = SegmentAttention::new(&gmask).return_lse(true);
    if let Some(s) = scale {
        op = op.scale(s);
    }
    let got = op.forward(&gq, &gk, &gv)?;
    assert!(got.out.device().same_device(dev), "{desc}: output not on the GPU");
    assert_eq!(got.out.dims(), q.dims(), "{desc}");
    assert_eq!(got.out.dtype(), dtype, "{desc}");
    let lse = got.lse.expect("asked for the LSE");
    assert!(lse.device().same_device(dev), "{desc}: LSE not on the GPU");
    let (b, lq, h, d) = q.dims4()?;
    assert_eq!(lse.dims(), &[b, h, lq], "{desc}");
    let out = got.out.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let lse = lse.to_device(&Device::Cpu)?;

    let (atol, rtol) = tolerance(dtype);
    let (r, i) = worst_ratio(&out, want_out, atol, rtol)?;
    if r > 1.0 {
        let got_v = out.flatten_all()?.to_vec1::<f32>()?[i];
        let want_v = want_out.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[i];
        panic!(
            "{desc}\nout[b {}, row {}, head {}, dim {}] = {got_v}, want {want_v} (ratio {r:.2} of atol {atol} + rtol {rtol})",
            i / (lq * h * d),
            (i / (h * d)) % lq,
            (i / d) % h,
            i % d
        );
    }
    let (r, i) = worst_ratio(&lse, want_lse, LSE_TOLERANCE.0, LSE_TOLERANCE.1)?;
    if r > 1.0 {
        let got_v = lse.flatten_all()?.to_vec1::<f32>()?[i];
        let want_v = want_lse.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[i];
        panic!(
            "{desc}\nlse[b {}, head {}, row {}] = {got_v}, want {want_v}",
            i / (h * lq),
            (i / lq) % h,
            i % lq
        );
    }
    // Rows that see no key output exactly 0.
    let want_lse_v = want_lse.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let out_v = out.flatten_all()?.to_vec1::<f32>()?;
    for (idx, w) in want_lse_v.iter().enumerate() {
        if *w == f64::NEG_INFINITY {
            let (bb, hh, row) = (idx / (h * lq), (idx / lq) % h, idx % lq);
            let o = &out_v[((bb * lq + row) * h + hh) * d..][..d];
            assert!(
                o.iter().all(|&x| x == 0.0),
                "{desc}: row {row} of head {hh} sees no key and must output 0"
            );
        }
    }

    // Without the LSE (the kernel's lse = NULL path): the same output bits.
    let mut op = SegmentAttention::new(&gmask);
    if let Some(s) = scale {
        op = op.scale(s);
    }
    let plain = op.forward(&gq, &gk, &gv)?;
    assert!(plain.lse.is_none());
    let plain = plain.out.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let same = plain
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .zip(&out_v)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "{desc}: the output differs with and without the LSE");
    Ok(out)
}

/// Checks one case against the f64 reference.
fn check_reference(
    desc: &str,
    dev: &Device,
    qkv: (&Tensor, &Tensor, &Tensor),
    mask: &SegmentMask,
    scale: Option<f64>,
) -> Result<()> {
    let want = reference::attention(qkv.0, qkv.1, qkv.2, mask, scale)?;
    check_gpu(desc, dev, qkv, mask, scale, &want.out, &want.lse).map(|_| ())
}

const HEADS: [(usize, usize); 5] = [(4, 2), (3, 1), (2, 2), (8, 1), (6, 3)];
/// Mask kinds: the shared families of tests/common/cases.rs, plus cross attention.
const KINDS: usize = MASK_KINDS.len() + 1;

/// Cross attention: independent non-decreasing query and key ids, a random rule and table.
fn cross_mask(rng: &mut Rng, batch: usize, lq: usize, lk: usize) -> Result<SegmentMask> {
    let ids = |rng: &mut Rng, rows: usize, len: usize| -> Result<Tensor> {
        let mut v = Vec::with_capacity(rows * len);
        for _ in 0..rows {
            let mut id = rng.below(2) as u32;
            for _ in 0..len {
                if rng.below(8) == 0 {
                    id += 1 + rng.below(2) as u32;
                }
                v.push(id);
            }
        }
        Tensor::from_vec(v, (rows, len), &Device::Cpu)
    };
    let rows = |rng: &mut Rng| if rng.below(2) == 0 { 1 } else { batch };
    let (qr, kr) = (rows(rng), rows(rng));
    let q_ids = ids(rng, qr, lq)?;
    let kv_ids = ids(rng, kr, lk)?;
    let vis = |rng: &mut Rng| Visibility::from_code(rng.below(3) as u8).expect("code < 3");
    let mut rule = PairRule::new(vis(rng), vis(rng));
    if rng.below(4) != 0 {
        let s = 1 + rng.below(12);
        let codes: Vec<u8> = (0..s * s).map(|_| [0u8, 1, 2, 3, 3][rng.below(5)]).collect();
        rule = rule.with_table(PairTable::new(Tensor::from_vec(codes, (s, s), &Device::Cpu)?)?);
    }
    SegmentMask::new(&q_ids, &kv_ids, rule)
}

#[allow(clippy::too_many_arguments)]
fn run_random_case(
    seed: u64,
    bf16: bool,
    d128: bool,
    batch: usize,
    heads: usize,
    lk: usize,
    lq_raw: usize,
    kind: usize,
) {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(seed);
    let dtype = if bf16 { DType::BF16 } else { DType::F16 };
    let d = if d128 { 128 } else { 64 };
    let (h, hkv) = HEADS[heads];
    let cross = kind == KINDS - 1;
    let lq = if cross {
        lq_raw
    } else if rng.below(2) == 0 {
        lk
    } else {
        1 + (lq_raw - 1) % lk
    };
    let strided = rng.below(10) < 3;
    let scale = (rng.below(10) < 3).then(|| 0.05 + 0.3 * rng.unit());
    let (name, mask) = if cross {
        ("cross".to_string(), cross_mask(&mut rng, batch, lq, lk).unwrap())
    } else {
        let m = random_mask(&mut rng, kind, batch, lk).unwrap();
        let m = if lq < lk { m.last_queries(lq).unwrap() } else { m };
        (MASK_KINDS[kind].to_string(), m)
    };
    let desc = format!(
        "seed {seed}: {dtype:?} D {d} B {batch} Lq {lq} Lk {lk} H {h} Hkv {hkv} strided {strided} scale {scale:?} mask {name}"
    );
    let (q, k, v) = inputs(&mut rng, (batch, lq, lk, h, hkv, d), dtype, strided).unwrap();
    check_reference(&desc, &dev, (&q, &k, &v), &mask, scale).unwrap_or_else(|e| panic!("{desc}\n{e}"));
}

/// The random cases are split over `SHARDS` tests, so that the harness runs them in parallel (the
/// f64 reference on the CPU is the slow part).
const SHARDS: u32 = 8;

macro_rules! random_case_shards {
    ($($name:ident),*) => {$(
        proptest! {
            #![proptest_config(proptest_config(cases(400).div_ceil(SHARDS)))]

            #[test]
            fn $name(
                seed in any::<u64>(),
                bf16 in any::<bool>(),
                d128 in any::<bool>(),
                batch in 1usize..=3,
                heads in 0usize..HEADS.len(),
                lk in 1usize..=700,
                lq_raw in 1usize..=700,
                kind in 0usize..KINDS,
            ) {
                run_random_case(seed, bf16, d128, batch, heads, lk, lq_raw, kind);
            }
        }
    )*};
}

random_case_shards!(
    gpu_kernel_matches_reference_0,
    gpu_kernel_matches_reference_1,
    gpu_kernel_matches_reference_2,
    gpu_kernel_matches_reference_3,
    gpu_kernel_matches_reference_4,
    gpu_kernel_matches_reference_5,
    gpu_kernel_matches_reference_6,
    gpu_kernel_matches_reference_7
);

/// Every mask kind in both dtypes and both head dims, whatever the random draw.
#[test]
fn every_mask_kind_every_instantiation() {
    for kind in 0..KINDS {
        for (i, (bf16, d128)) in [(true, true), (true, false), (false, true), (false, false)]
            .into_iter()
            .enumerate()
        {
            let seed = 1000 * (i as u64 + 1) + kind as u64;
            run_random_case(seed, bf16, d128, 2, (kind + i) % HEADS.len(), 333, 190, kind);
        }
    }
}

/// Lengths that are exact multiples of the 64-row tiles, single rows and keys, one past a tile.
#[test]
fn tile_multiples_and_tiny_lengths() {
    let Some(dev) = gpu() else { return };
    for (lq, lk) in [
        (128, 128),
        (64, 192),
        (1, 1),
        (1, 128),
        (2, 65),
        (65, 65),
        (64, 64),
        (1, 1000),
    ] {
        let mut rng = Rng::new(lq as u64 * 1000 + lk as u64);
        let mask = SegmentMask::documents(&[&[lk / 2, lk - lk / 2][..]], &Device::Cpu)
            .unwrap()
            .last_queries(lq)
            .unwrap();
        for d in [64, 128] {
            let (q, k, v) = inputs(&mut rng, (2, lq, lk, 4, 2, d), DType::BF16, false).unwrap();
            check_reference(
                &format!("documents Lq {lq} Lk {lk} D {d}"),
                &dev,
                (&q, &k, &v),
                &mask,
                None,
            )
            .unwrap();
        }
    }
}

/// D = 256 (its own kernel: plain attention, 64-row blocks) and the head dims the kernels are not
/// built for, which run zero-padded to 64 / 128 / 256 (`segattn::head_dim`): against the
/// reference, every mask family, strided views, GQA, both dtypes.
#[test]
fn other_head_dims_match_reference() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    for (i, d) in [8usize, 32, 33, 80, 96, 112, 127, 160, 200, 256, 256]
        .into_iter()
        .enumerate()
    {
        for kind in [i % KINDS, (i + 5) % KINDS] {
            let mut rng = Rng::new(500 + 10 * i as u64 + kind as u64);
            let dtype = if (i + kind) % 2 == 0 { DType::BF16 } else { DType::F16 };
            let (b, lk) = (1 + rng.below(2), 1 + rng.below(400));
            let lq = if kind == KINDS - 1 || rng.below(2) == 0 {
                lk
            } else {
                1 + rng.below(lk)
            };
            let (h, hkv) = HEADS[rng.below(HEADS.len())];
            let mask = if kind == KINDS - 1 {
                cross_mask(&mut rng, b, lq, lk)?
            } else {
                let m = random_mask(&mut rng, kind, b, lk)?;
                if lq < lk {
                    m.last_queries(lq)?
                } else {
                    m
                }
            };
            let strided = rng.below(3) == 0;
            let (q, k, v) = inputs(&mut rng, (b, lq, lk, h, hkv, d), dtype, strided)?;
            let desc =
                format!("padded D {d}: {dtype:?} B {b} Lq {lq} Lk {lk} H {h}/{hkv} kind {kind} strided {strided}");
            check_reference(&desc, &dev, (&q, &k, &v), &mask, None)?;
        }
    }
    Ok(())
}

/// A segment blocked from everything: its rows output 0 with LSE -inf.
#[test]
fn fully_masked_rows() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let mask = common::cases::blocked_middle_segment_of(150)?;
    let n = 40 + 150 + 57;
    for dtype in [DType::BF16, DType::F16] {
        let mut rng = Rng::new(5);
        let (q, k, v) = inputs(&mut rng, (2, n, n, 2, 1, 128), dtype, false)?;
        check_reference("blocked segment 1", &dev, (&q, &k, &v), &mask, None)?;
    }
    Ok(())
}

/// Scores that grow along the keys by several log2 units a tile in some rows and stay flat in the
/// others (`common::cases::growing_scores`: the softmax reference's slack, a warp's rescale skip).
#[test]
fn softmax_reference_moves_in_some_rows() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let (lq, lk) = (200, 700);
    for (d, dtype) in [(64, DType::BF16), (128, DType::F16), (128, DType::BF16)] {
        let (q, k, v) = common::cases::growing_scores(&mut Rng::new(11), (lq, lk, 4, d), dtype)?;
        for (name, mask) in [
            ("full", SegmentMask::full(lk, &Device::Cpu)?.last_queries(lq)?),
            ("causal", SegmentMask::causal(lk, &Device::Cpu)?.last_queries(lq)?),
        ] {
            let desc = format!("growing scores, {name}, D {d} {dtype:?}");
            check_reference(&desc, &dev, (&q, &k, &v), &mask, None)?;
        }
    }
    Ok(())
}

/// No key at all (Lk = 0): output 0, LSE -inf. No query (Lq = 0) or no batch row: empty outputs.
#[test]
fn empty_inputs() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let full = PairRule::new(Visibility::Full, Visibility::Full);
    // Empty tensors by zeros: candle's `ones` launches a fill kernel with an empty grid on CUDA,
    // which the driver refuses (CUDA_ERROR_INVALID_VALUE); an empty tensor has no values anyway.
    let q = Tensor::ones((1, 5, 2, 64), DType::BF16, &dev)?;
    let k = Tensor::zeros((1, 0, 2, 64), DType::BF16, &dev)?;
    let mask = SegmentMask::new(
        &Tensor::zeros((1, 5), DType::U32, &dev)?,
        &Tensor::zeros((1, 0), DType::U32, &dev)?,
        full.clone(),
    )?;
    let got = SegmentAttention::new(&mask).return_lse(true).forward(&q, &k, &k)?;
    let out = got.out.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    assert_eq!(out.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
    let lse = got
        .lse
        .unwrap()
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert!(lse.iter().all(|&x| x == f32::NEG_INFINITY));

    let q = Tensor::zeros((1, 0, 2, 64), DType::BF16, &dev)?;
    let k = Tensor::ones((1, 7, 2, 64), DType::BF16, &dev)?;
    let mask = SegmentMask::new(
        &Tensor::zeros((1, 0), DType::U32, &dev)?,
        &Tensor::zeros((1, 7), DType::U32, &dev)?,
        full,
    )?;
    let got = SegmentAttention::new(&mask).return_lse(true).forward(&q, &k, &k)?;
    assert_eq!(got.out.dims(), &[1, 0, 2, 64]);
    assert_eq!(got.lse.unwrap().dims(), &[1, 2, 0]);
    // The same at a padded head dim (no copy of an empty tensor).
    let q = Tensor::zeros((1, 0, 2, 96), DType::BF16, &dev)?;
    let k = Tensor::ones((1, 7, 2, 96), DType::BF16, &dev)?;
    let got = SegmentAttention::new(&mask).return_lse(true).forward(&q, &k, &k)?;
    assert_eq!(got.out.dims(), &[1, 0, 2, 96]);
    assert_eq!(got.lse.unwrap().dims(), &[1, 2, 0]);
    Ok(())
}

/// Views the kernel cannot read in place (start not 16-byte aligned, strides not multiples of 8
/// elements) are copied on the device first, with the same result.
#[test]
fn misaligned_views() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let mut rng = Rng::new(77);
    let (b, l, h, d) = (2, 150, 4, 64);
    let wide = values(&mut rng, &[b, l, h, d + 4], DType::BF16)?;
    let q = wide.narrow(3, 2, d)?; // start offset 2, row stride h * 68: neither aligned
    let k = values(&mut rng, &[b, l, 2, d], DType::BF16)?;
    let v = values(&mut rng, &[b, l, 2, d], DType::BF16)?;
    let mask = SegmentMask::pine(16, &[40, 50, 30], 14, &Device::Cpu)?;
    check_reference("misaligned q", &dev, (&q, &k, &v), &mask, None)
}

/// The fused backward on a tracked view the kernels cannot load in place (q a view of a
/// variable, one element past its start): copied first as the forward's inputs are, its
/// gradients those of the same values in an aligned tensor (to rounding: dQ adds with atomics).
#[test]
fn gradients_through_misaligned_views() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let mut rng = Rng::new(78);
    let (b, l, h, hkv, d) = (1, 130, 4, 2, 128);
    let n = b * l * h * d;
    let mask = SegmentMask::pine(10, &[50, 40], 30, &Device::Cpu)?;
    let mask = mask_on(&mask, &dev)?;
    let q = values(&mut rng, &[b, l, h, d], DType::BF16)?.to_device(&dev)?;
    let k = values(&mut rng, &[b, l, hkv, d], DType::BF16)?.to_device(&dev)?;
    let v = values(&mut rng, &[b, l, hkv, d], DType::BF16)?.to_device(&dev)?;
    let w = values(&mut rng, &[b, l, h, d], DType::BF16)?.to_device(&dev)?;
    let dq_of = |q_in: &Tensor, var: &candle_core::Var| -> Result<Tensor> {
        let out = SegmentAttention::new(&mask).forward(q_in, &k, &v)?.out;
        let grads = (out * &w)?.sum_all()?.to_dtype(DType::F32)?.backward()?;
        grads
            .get(var.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("no gradient for q".into()))
    };
    let aligned = candle_core::Var::from_tensor(&q)?;
    let want = dq_of(aligned.as_tensor(), &aligned)?;
    // One element before q's values: q's view starts 2 bytes past an aligned address.
    let flat = candle_core::Var::from_tensor(&Tensor::cat(
        &[&q.flatten_all()?.narrow(0, 0, 1)?, &q.flatten_all()?],
        0,
    )?)?;
    let view = flat.as_tensor().narrow(0, 1, n)?.reshape((b, l, h, d))?;
    let got = dq_of(&view, &flat)?.narrow(0, 1, n)?.reshape((b, l, h, d))?;
    let (atol, rtol) = tolerance(DType::BF16);
    let (r, at) = worst_ratio(&got.to_dtype(DType::F32)?, &want.to_dtype(DType::F32)?, atol, rtol)?;
    assert!(
        r <= 1.0,
        "dq through a misaligned view: {r:.2} x tolerance at flat index {at}"
    );
    Ok(())
}

/// Large shapes (the benchmark's masks, GQA 32/8 reduced in heads to keep the CPU oracle fast)
/// against the fused CPU path on the same inputs upcast to f32 (f32 accumulation throughout).
#[test]
fn large_shapes_match_cpu_path() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let cpu = Device::Cpu;
    let cases: Vec<(&str, usize, usize, usize, usize, SegmentMask)> = vec![
        ("causal 4096 D128", 1, 4096, 8, 2, SegmentMask::causal(4096, &cpu)?),
        ("full 2048 D64", 2, 2048, 4, 4, SegmentMask::full(2048, &cpu)?),
        (
            "documents ragged 4096 D128",
            1,
            4096,
            8,
            2,
            SegmentMask::documents(&[&[1000, 37, 1500, 63, 700, 796][..]], &cpu)?,
        ),
        (
            "prefix_lm 2048/512 D64",
            2,
            2048,
            4,
            1,
            SegmentMask::prefix_lm(2048, 512, &cpu)?,
        ),
        (
            "pine 256 + 20 x 185 + 64 D128",
            1,
            4020,
            8,
            2,
            SegmentMask::pine(256, &[185; 20], 64, &cpu)?,
        ),
    ];
    for (i, (name, b, l, h, hkv, mask)) in cases.into_iter().enumerate() {
        let d = if name.contains("D128") { 128 } else { 64 };
        let mut rng = Rng::new(900 + i as u64);
        for dtype in [DType::BF16, DType::F16] {
            let (q, k, v) = inputs(&mut rng, (b, l, l, h, hkv, d), dtype, i % 2 == 1)?;
            let f32s = |t: &Tensor| t.to_dtype(DType::F32);
            let want = SegmentAttention::new(&mask)
                .return_lse(true)
                .forward(&f32s(&q)?, &f32s(&k)?, &f32s(&v)?)?;
            check_gpu(
                &format!("{name} {dtype:?} B {b} H {h}/{hkv}"),
                &dev,
                (&q, &k, &v),
                &mask,
                None,
                &want.out,
                &want.lse.expect("asked"),
            )?;
        }
    }
    Ok(())
}

/// Two runs on the same inputs give the same bits (no race, no uninitialised read).
#[test]
fn deterministic() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let mut rng = Rng::new(3);
    let (q, k, v) = inputs(&mut rng, (2, 1000, 1000, 8, 2, 128), DType::BF16, false)?;
    let (q, k, v) = (q.to_device(&dev)?, k.to_device(&dev)?, v.to_device(&dev)?);
    let mask = SegmentMask::pine(100, &[200, 300, 250], 150, &dev)?;
    let bits = || -> Result<Vec<u32>> {
        let r = SegmentAttention::new(&mask).return_lse(true).forward(&q, &k, &v)?;
        let mut out: Vec<u32> = r
            .out
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|x| x.to_bits())
            .collect();
        out.extend(
            r.lse
                .unwrap()
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|x| x.to_bits()),
        );
        Ok(out)
    };
    let first = bits()?;
    for _ in 0..3 {
        assert!(bits()? == first, "two runs differ");
    }
    Ok(())
}

/// Unsupported dtype or head dim on the GPU: errors naming the argument; the common validation
/// gives the same messages on both devices.
#[test]
fn errors_name_the_argument() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    if dev.is_cpu() {
        return Ok(()); // the CUDA kernels' own limits (a dry run on the CPU: see common::gpu)
    }
    let mask = SegmentMask::causal(8, &dev)?;
    let msg = |r: Result<segattn::AttentionOutput>| r.expect_err("expected an error").to_string();

    let x = Tensor::ones((1, 8, 1, 64), DType::F32, &dev)?;
    let e = msg(SegmentAttention::new(&mask).forward(&x, &x, &x));
    assert!(e.contains("q:") && e.contains("dtype") && e.contains("F32"), "{e}");
    // Up to 256 every head dim runs (padded where it is not 64, 128 or 256); beyond, an error.
    let x = Tensor::ones((1, 8, 1, 320), DType::BF16, &dev)?;
    let e = msg(SegmentAttention::new(&mask).forward(&x, &x, &x));
    assert!(e.contains("q:") && e.contains("head dim") && e.contains("320"), "{e}");
    // PINE's kernels take bf16 / f16 only (checked before any work).
    let layout = segattn::PineLayout::new(2, &[3, 2], 1);
    let pine = segattn::pine::PineAttention::new(&[layout], segattn::pine::Rope::new(1e4))?;
    let x = Tensor::ones((1, 8, 1, 64), DType::F32, &dev)?;
    let e = pine.prefill(&x, &x, &x).expect_err("expected an error").to_string();
    assert!(e.contains("q:") && e.contains("dtype") && e.contains("F32"), "{e}");

    // Same message on both devices for an invalid shape / rule / GQA ratio.
    let on = |d: &Device| -> Result<Vec<String>> {
        let m = SegmentMask::causal(8, d)?;
        let q = Tensor::ones((1, 8, 3, 64), DType::BF16, d)?;
        let k = Tensor::ones((1, 8, 2, 64), DType::BF16, d)?;
        let r3 = Tensor::ones((8, 2, 64), DType::BF16, d)?;
        let long = Tensor::ones((1, 9, 2, 64), DType::BF16, d)?;
        Ok(vec![
            msg(SegmentAttention::new(&m).forward(&q, &k, &k)),
            msg(SegmentAttention::new(&m).forward(&r3, &k, &k)),
            msg(SegmentAttention::new(&m).forward(&k, &long, &long)),
            msg(SegmentAttention::new(&m).scale(f64::NAN).forward(&k, &k, &k)),
        ])
    };
    let (cpu_msgs, gpu_msgs) = (on(&Device::Cpu)?, on(&dev)?);
    for (c, g) in cpu_msgs.iter().zip(&gpu_msgs) {
        let first = |s: &str| s.lines().next().unwrap_or("").to_string();
        assert_eq!(first(c), first(g), "messages differ between CPU and GPU");
    }
    // Mask on the wrong device.
    let q = Tensor::ones((1, 8, 2, 64), DType::BF16, &dev)?;
    let e = msg(SegmentAttention::new(&SegmentMask::causal(8, &Device::Cpu)?).forward(&q, &q, &q));
    assert!(e.contains("mask:") && e.contains("device"), "{e}");
    // k from another candle device of the same GPU that has its own stream (not ordered with
    // q's): an error naming k, for the attention and the standalone mass.
    let other = Device::Cuda(candle_core::CudaDevice::new_with_stream(0)?);
    let k = Tensor::ones((1, 8, 2, 64), DType::BF16, &other)?;
    other.synchronize()?;
    let e = msg(SegmentAttention::new(&mask).forward(&q, &k, &q));
    assert!(e.contains("k:") && e.contains("stream"), "{e}");
    let e = segattn::segment_scores(&q, &k, &mask, &segattn::SegmentScoreOptions::new())
        .expect_err("expected an error")
        .to_string();
    assert!(e.contains("k:") && e.contains("stream"), "{e}");
    Ok(())
}

/// Training on the GPU: the gradients of `sum(out * w)` through candle's backward pass (our
/// kernels forward, the fused backward kernel for the output's gradient, candle's CUDA ops for
/// the LSE's) against the f64 reference
/// backward, over every mask family, GQA, Lq < Lk, strided inputs, D 64, 128, 96 (padded), 256.
#[test]
fn gradients_match_reference() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let mut rng = Rng::new(77);
    // At most 24 cases: the f64 reference backward runs on the host.
    for case in 0..cases(24).min(24) as usize {
        let kind = case % MASK_KINDS.len();
        let dtype = if case % 2 == 0 { DType::BF16 } else { DType::F16 };
        let (b, lk) = (1 + rng.below(2), 1 + rng.below(300));
        let lq = if rng.below(2) == 0 { lk } else { 1 + rng.below(lk) };
        let (h, hkv) = HEADS[rng.below(HEADS.len())];
        // Some cases at a padded head dim (the backward through the pad and the cut) and at 256
        // (the candle-ops backward: the fused kernel is built for 64 / 128).
        let d = [64, 128, 64, 128, 96, 256][case % 6];
        let (q, k, v) = inputs(&mut rng, (b, lq, lk, h, hkv, d), dtype, case % 3 == 0)?;
        let mask = random_mask(&mut rng, kind, b, lk)?;
        let mask = if lq < lk { mask.last_queries(lq)? } else { mask };
        let w = values(&mut rng, &[b, lq, h, d], dtype)?;
        let desc = format!(
            "case {case}: B {b} Lq {lq} Lk {lk} H {h}/{hkv} D {d} {dtype:?} {}",
            MASK_KINDS[kind]
        );
        let on = |t: &Tensor| t.to_device(&dev);
        // Every other case also backpropagates through the LSE.
        let w_lse = if case % 2 == 0 {
            Some(values(&mut rng, &[b, h, lq], DType::F32)?)
        } else {
            None
        };
        let w_lse_dev = w_lse.as_ref().map(on).transpose()?;
        let got = common::autograd_gradients(
            (&on(&q)?, &on(&k)?, &on(&v)?),
            &mask_on(&mask, &dev)?,
            (&on(&w)?, w_lse_dev.as_ref()),
            None,
        )?;
        let reference =
            |w: &Tensor, w_lse: Option<&Tensor>| reference::attention_backward(&q, &k, &v, w, w_lse, &mask, None);
        let want = reference(&w, w_lse.as_ref())?;
        // Through the LSE candle adds two gradients each rounded to the dtype: the tolerance
        // follows the two terms (tests/gradients.rs).
        let terms = match &w_lse {
            Some(w_lse) => Some((reference(&w, None)?, reference(&w.zeros_like()?, Some(w_lse))?)),
            None => None,
        };
        // P comes from the GPU forward's LSE (ex2.approx, f32 sums in another order): its error
        // enters every gradient, so the forward kernel's own tolerance bounds them here; the
        // fused backward kernel (the output's gradient) adds its rounding of P and dS for the
        // tensor cores, bounded against the tensor's scale (common::fused_gradient_tolerance).
        let (atol, rtol) = tolerance(dtype);
        let (frac, _, _) = common::fused_gradient_tolerance(dtype);
        let got = [got.0, got.1, got.2];
        let want = [&want.dq, &want.dk, &want.dv];
        for (n, name) in ["dq", "dk", "dv"].into_iter().enumerate() {
            let magnitude = match &terms {
                Some((a, b)) => ([&a.dq, &a.dk, &a.dv][n].abs()? + [&b.dq, &b.dk, &b.dv][n].abs()?)?,
                None => want[n].abs()?,
            };
            let got = got[n].to_device(&Device::Cpu)?;
            let largest = magnitude.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let (r, at) = common::worst_ratio_of_terms(&got, want[n], &magnitude, atol + frac * largest, rtol)?;
            assert!(r <= 1.0, "{desc}: {name} off by {r} x tolerance at flat index {at}");
        }
    }
    Ok(())
}

// The fused backward kernel at lengths where the f64 reference is too slow
// (`gradients_match_reference` checks it against the reference on short rows): its gradients
// against the same step with the backward through candle's ops
// (`segattn::set_fused_backward(false)`, for this thread only: f32 products, exact
// delta), which tests/gradients.rs checks against the reference. Several windows of query tiles,
// GQA, ragged documents, PINE and prefix-LM masks, Lq < Lk, bf16 and f16, D 64 and 128.

/// One configuration: name, mask (one row of ids, shared by the batch), batch, (H, Hkv), D, dtype.
struct Config {
    name: &'static str,
    mask: SegmentMask,
    batch: usize,
    heads: (usize, usize),
    head_dim: usize,
    dtype: DType,
}

#[test]
fn fused_kernel_matches_ops_path_on_long_rows() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let cpu = Device::Cpu;
    // The dry run on the CPU (both paths are then the CPU's) checks this test's logic on rows a
    // quarter as long.
    let n = |len: usize| if dry_run() { len / 4 } else { len };
    let config = |name, mask, batch, heads, head_dim, dtype| Config {
        name,
        mask,
        batch,
        heads,
        head_dim,
        dtype,
    };
    let configs = [
        config(
            "causal",
            SegmentMask::causal(n(4500), &cpu)?,
            1,
            (4, 2),
            128,
            DType::BF16,
        ),
        config(
            "ragged documents",
            SegmentMask::documents(&[vec![n(700), 1, n(1300), 33, n(966)]], &cpu)?,
            2,
            (2, 2),
            64,
            DType::F16,
        ),
        config(
            "pine",
            SegmentMask::pine(n(256), &[n(150); 20], 64, &cpu)?,
            1,
            (8, 2),
            128,
            DType::F16,
        ),
        config(
            "prefix-LM",
            SegmentMask::prefix_lm(n(2100), n(700), &cpu)?,
            1,
            (3, 1),
            64,
            DType::BF16,
        ),
        config(
            "causal, the last queries",
            SegmentMask::causal(n(2600), &cpu)?.last_queries(n(700))?,
            2,
            (2, 1),
            128,
            DType::BF16,
        ),
    ];
    let mut rng = Rng::new(31);
    for Config {
        name,
        mask,
        batch: b,
        heads: (h, hkv),
        head_dim: d,
        dtype,
    } in configs
    {
        let (lq, lk) = (mask.q_segments().dim(1)?, mask.kv_segments().dim(1)?);
        let q = random_tensor(&mut rng, &[b, lq, h, d], dtype)?.to_device(&dev)?;
        let k = random_tensor(&mut rng, &[b, lk, hkv, d], dtype)?.to_device(&dev)?;
        let v = random_tensor(&mut rng, &[b, lk, hkv, d], dtype)?.to_device(&dev)?;
        let w = random_tensor(&mut rng, &[b, lq, h, d], dtype)?.to_device(&dev)?;
        let mask = mask_on(&mask, &dev)?;
        let grads = |fused: bool| {
            segattn::set_fused_backward(fused);
            let g = autograd_gradients((&q, &k, &v), &mask, (&w, None), None);
            segattn::set_fused_backward(true);
            g
        };
        let fused = grads(true)?;
        let ops = grads(false)?;
        let tol = fused_gradient_tolerance(dtype);
        let cpu_f32 = |t: &Tensor| t.to_device(&cpu)?.to_dtype(DType::F32);
        for (g, (got, want)) in
            ["dq", "dk", "dv"]
                .into_iter()
                .zip([(&fused.0, &ops.0), (&fused.1, &ops.1), (&fused.2, &ops.2)])
        {
            let (r, at) = worst_ratio_scaled(&cpu_f32(got)?, &cpu_f32(want)?, tol)?;
            assert!(
                r <= 1.0,
                "{name} (B {b} Lq {lq} Lk {lk} H {h}/{hkv} D {d} {dtype:?}): {g} off by {r} x tolerance at flat index {at}"
            );
        }
    }
    Ok(())
}

/// 16-bit bit patterns of `x` in bf16 or f16.
fn bits16(x: f32, is_bf16: bool) -> u16 {
    if is_bf16 {
        half::bf16::from_f32(x).to_bits()
    } else {
        half::f16::from_f32(x).to_bits()
    }
}

fn value16(b: u16, is_bf16: bool) -> f64 {
    f64::from(if is_bf16 {
        half::bf16::from_bits(b).to_f32()
    } else {
        half::f16::from_bits(b).to_f32()
    })
}

/// [`segattn::cuda::wgmma_probe`] of these operands.
fn probe(
    dev: &Device,
    mode: i32,
    is_bf16: bool,
    (a, tile, c): (&[u16], &[u16], &[f32]),
    k_steps: usize,
    offsets: Option<(u32, u32)>,
) -> Result<Option<Vec<f32>>> {
    let probe = segattn::cuda::WgmmaProbe {
        mode,
        is_bf16,
        a,
        tile,
        c,
        k_steps,
        offsets,
    };
    segattn::cuda::wgmma_probe(dev, &probe)
}

/// Where the card read B[k][n] from, for the first k-step of `mode`: A = [I I I I] (row i picks
/// k = i % 16) times tiles holding their own row and then column indices, so D's values name the
/// tile element behind every (k, n). Returns the (k, n, read row, read column) that differ from
/// the emulator's reading (`mode` 0: tile[n][k]; 1 and 2: tile[k][n]).
fn wgmma_misreadings(dev: &Device, mode: i32, is_bf16: bool) -> Result<Vec<(usize, usize, usize, usize)>> {
    let n = segattn::cuda::WgmmaProbe::n_of(mode);
    let a: Vec<u16> = (0..64 * 16)
        .map(|i| bits16(if i % 16 == (i / 16) % 16 { 1.0 } else { 0.0 }, is_bf16))
        .collect();
    let c = vec![0f32; 64 * n];
    let mut read = Vec::new();
    for by_row in [true, false] {
        let tile: Vec<u16> = (0..64 * 128)
            .map(|i| bits16(if by_row { (i / 128) as f32 } else { (i % 128) as f32 }, is_bf16))
            .collect();
        let Some(d) = probe(dev, mode, is_bf16, (&a, &tile, &c), 1, None)? else {
            return Ok(Vec::new());
        };
        read.push(d);
    }
    let mut wrong = Vec::new();
    for k in 0..16 {
        for j in 0..n {
            let (row, col) = (read[0][k * n + j] as usize, read[1][k * n + j] as usize);
            let expected = if mode == 0 { (j, k) } else { (k, j) };
            if (row, col) != expected {
                wrong.push((k, j, row, col));
            }
        }
    }
    Ok(wrong)
}

/// The emulator's reading of Hopper's wgmma (kernels/emu/wgmma.cpp: register fragments, the
/// 128-byte swizzled K-major and MN-major layouts, the descriptor) against the card, through the
/// probe kernel of the sm_90a fatbin (kernels/hopper/wgmma_probe.cu), on the uses the wgmma forward
/// kernel makes of it (S = Q K^T over 8 k-steps, O = P V over 4 at D 128 and D 64), bf16 and f16. On a
/// mismatch it also prints where the card read each B element from. Skipped on GPUs that are not
/// compute capability 9.0.
#[test]
fn wgmma_reading_matches_the_card() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    if dry_run() {
        eprintln!("skipped on the CPU: the probe is an sm_90a kernel");
        return Ok(());
    }
    let mut rng = Rng::new(34);
    for is_bf16 in [true, false] {
        for (mode, k_steps) in [(0i32, 8usize), (0, 3), (1, 4), (1, 1), (2, 4)] {
            let n = segattn::cuda::WgmmaProbe::n_of(mode);
            let ka = 16 * k_steps;
            let mut draw = |scale: f64| ((rng.unit() * 2.0 - 1.0) * scale) as f32;
            let a: Vec<u16> = (0..64 * ka).map(|_| bits16(draw(2.0), is_bf16)).collect();
            let tile: Vec<u16> = (0..64 * 128).map(|_| bits16(draw(2.0), is_bf16)).collect();
            let c: Vec<f32> = (0..64 * n).map(|_| draw(4.0)).collect();
            let Some(d) = probe(&dev, mode, is_bf16, (&a, &tile, &c), k_steps, None)? else {
                eprintln!("skipped: not a compute capability 9.0 GPU (the sm_90a image does not run here)");
                return Ok(());
            };
            let b = |k: usize, j: usize| {
                value16(
                    if mode == 0 {
                        tile[j * 128 + k]
                    } else {
                        tile[k * 128 + j]
                    },
                    is_bf16,
                )
            };
            let mut bad = Vec::new();
            for i in 0..64 {
                for j in 0..n {
                    let mut exact = f64::from(c[i * n + j]);
                    let mut magnitude = exact.abs();
                    for k in 0..ka {
                        let p = value16(a[i * ka + k], is_bf16) * b(k, j);
                        exact += p;
                        magnitude += p.abs();
                    }
                    // Exact products, f32 sums in the tensor core's order.
                    let got = f64::from(d[i * n + j]);
                    if (got - exact).abs() > 2e-5 * magnitude + 1e-6 {
                        bad.push(format!("D[{i}][{j}] = {got}, expected {exact}"));
                    }
                }
            }
            if !bad.is_empty() {
                // Other readings of the descriptor's byte offsets: the first that the card agrees with.
                let mut agrees = "none of (LBO, SBO) in {16, 1024, 2048, 8192, 16384}^2".to_string();
                'search: for lbo in [16u32, 1024, 2048, 8192, 16384] {
                    for sbo in [16u32, 1024, 2048, 8192, 16384] {
                        let Some(d2) = probe(&dev, mode, is_bf16, (&a, &tile, &c), k_steps, Some((lbo, sbo)))? else {
                            break 'search;
                        };
                        let close = d2.iter().zip(&d).enumerate().all(|(i, (&x, _))| {
                            let (row, j) = (i / n, i % n);
                            let mut exact = f64::from(c[i]);
                            let mut magnitude = exact.abs();
                            for k in 0..ka {
                                let p = value16(a[row * ka + k], is_bf16) * b(k, j);
                                exact += p;
                                magnitude += p.abs();
                            }
                            (f64::from(x) - exact).abs() <= 2e-5 * magnitude + 1e-6
                        });
                        if close {
                            agrees = format!("LBO {lbo} and SBO {sbo} bytes");
                            break 'search;
                        }
                    }
                }
                let wrong = wgmma_misreadings(&dev, mode, is_bf16)?;
                let shown: Vec<String> = wrong
                    .iter()
                    .take(24)
                    .map(|(k, j, r, c)| format!("B[{k}][{j}] <- tile[{r}][{c}]"))
                    .collect();
                panic!(
                    "wgmma mode {mode} bf16={is_bf16} k_steps {k_steps}: {} of {} elements differ (first: {}); the card \
                     agrees with the descriptor offsets: {agrees}; it read {} of B's first k-step elements from \
                     elsewhere than the emulator: {}",
                    bad.len(),
                    64 * n,
                    bad[0],
                    wrong.len(),
                    shown.join(", ")
                );
            }
        }
    }
    Ok(())
}
