//! Head dims the CUDA kernels are not built for run zero-padded to 64 or 128 (`segattn::head_dim`).
//! The padding happens in the public API, before any kernel, so it is checked here on the CPU
//! with `head_dim::set_padding_on_cpu`: the attention (to 64, 128 or 256: output, LSE, fused segment mass and the
//! gradients through the pad and the cut), the standalone segment mass and PINE (prefill, decode
//! and the cache's key rotation, whose RoPE pairs must survive the padding) against the f64
//! references and against the same calls unpadded. The GPU tests run the same head dims on a card.
//!
//! `SEGATTN_CASES=n` sets the number of random cases (default 48).

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::cases::{draw, MASK_KINDS};
use common::{
    autograd_gradients, env_count, gradient_tolerance, lse_tolerance, mass_tolerance_for, proptest_config,
    random_mass_options, random_tensor, tolerance, worst_ratio, Rng,
};
use proptest::prelude::*;
use segattn::head_dim::set_padding_on_cpu;
use segattn::pine::{PineAttention, Rope};
use segattn::{reference, segment_scores, MassAlgorithm, PineLayout, SegmentAttention};

/// Head dims around the kernels' 64, 128 and 256: below the first, between, odd, one short.
const HEAD_DIMS: [usize; 12] = [1, 8, 24, 33, 48, 63, 80, 96, 127, 160, 200, 255];
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
const HEADS: [(usize, usize); 4] = [(1, 1), (2, 1), (4, 2), (6, 3)];

fn cases() -> u32 {
    env_count("SEGATTN_CASES").unwrap_or(48)
}

/// Runs `f` with the padding on (this thread), and turns it off again whatever happens.
fn padded<T>(f: impl FnOnce() -> T) -> T {
    struct Off;
    impl Drop for Off {
        fn drop(&mut self) {
            set_padding_on_cpu(false);
        }
    }
    set_padding_on_cpu(true);
    let _off = Off;
    f()
}

fn assert_close(got: &Tensor, want: &Tensor, (atol, rtol): (f64, f64), what: &str) -> Result<()> {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (r, at) = worst_ratio(got, want, atol, rtol)?;
    assert!(
        r <= 1.0,
        "{what}: off by {r:.2} x tolerance ({atol}, {rtol}) at flat index {at}"
    );
    Ok(())
}

proptest! {
    #![proptest_config(proptest_config(cases()))]

    /// Output, LSE and fused mass of the padded call against the f64 reference, and the output
    /// against the unpadded call (the same f32 arithmetic up to the order of the sums).
    #[test]
    fn padded_attention_matches_reference(
        seed in any::<u64>(),
        d in prop::sample::select(HEAD_DIMS.to_vec()),
        dtype in prop::sample::select(DTYPES.to_vec()),
        heads in prop::sample::select(HEADS.to_vec()),
        batch in 1usize..=2,
        lk in 1usize..=150,
        lq_equal in any::<bool>(),
        kind in 0usize..MASK_KINDS.len(),
        with_mass in any::<bool>(),
    ) {
        let case = draw(seed, batch, lk, lq_equal, heads, d, dtype, kind)?;
        let what = format!("{} mass {with_mass}", case.description);
        let mut rng = Rng::new(seed ^ 0x5eed);
        let opts = random_mass_options(&mut rng, &[MassAlgorithm::Auto, MassAlgorithm::OnePass]);
        let scale = (rng.below(3) == 0).then(|| 0.05 + 0.3 * rng.unit());
        let mass_opts = opts.scale(scale.unwrap_or(1.0 / (d as f64).sqrt()));
        let run = || -> Result<segattn::AttentionOutput> {
            let mut op = SegmentAttention::new(&case.mask).return_lse(true);
            if with_mass {
                op = op.return_segment_mass(mass_opts);
            }
            if let Some(s) = scale {
                op = op.scale(s);
            }
            op.forward(&case.q, &case.k, &case.v)
        };
        let got = padded(run)?;
        let native = run()?;
        prop_assert!(got.out.is_contiguous(), "{what}: output not contiguous");
        prop_assert_eq!(got.out.dtype(), dtype);

        let want = reference::attention(&case.q, &case.k, &case.v, &case.mask, scale)?;
        assert_close(&got.out, &want.out, tolerance(dtype), &format!("out {what}"))?;
        let lse_tol = lse_tolerance(dtype);
        assert_close(got.lse.as_ref().unwrap(), &want.lse, (lse_tol, 0.0), &format!("lse {what}"))?;
        // Against the unpadded call: the same f32 arithmetic up to the order of the sums, then one
        // rounding to the dtype, and for bf16 P's rounding where only one of them takes the tile
        // loops (`cpu_paths_tolerance`).
        let tol = common::cpu_paths_tolerance(dtype);
        assert_close(&got.out, &native.out, tol, &format!("vs unpadded {what}"))?;

        let (_, lq, h, _) = case.q.dims4()?;
        if with_mass {
            let mass = got.segment_mass.unwrap();
            let want_mass = reference::segment_mass(&case.q, &case.k, &case.mask, &mass_opts)?;
            assert_close(&mass, &want_mass, mass_tolerance_for(dtype, &opts, lq, h), &format!("mass {what} {opts:?}"))?;
        }

        // The standalone mass, padded.
        let alone = padded(|| segment_scores(&case.q, &case.k, &case.mask, &opts))?;
        let want_alone = reference::segment_mass(&case.q, &case.k, &case.mask, &opts)?;
        assert_close(&alone, &want_alone, mass_tolerance_for(dtype, &opts, lq, h), &format!("segment_scores {what} {opts:?}"))?;
    }
}

/// Gradients through the pad, the padded attention and the cut, against the f64 reference: the
/// padding's columns get no gradient and the real ones theirs.
#[test]
fn padded_gradients_match_reference() -> Result<()> {
    for (i, &d) in [8usize, 33, 96, 127, 200].iter().enumerate() {
        for dtype in [DType::F32, DType::BF16] {
            let kind = (3 * i + 1) % MASK_KINDS.len();
            let case = draw(40 + i as u64, 2, 70, i % 2 == 0, HEADS[i % HEADS.len()], d, dtype, kind)?;
            let mut rng = Rng::new(i as u64);
            let w = random_tensor(&mut rng, case.q.dims(), dtype)?;
            let (dq, dk, dv) =
                padded(|| autograd_gradients((&case.q, &case.k, &case.v), &case.mask, (&w, None), None))?;
            let want = reference::attention_backward(&case.q, &case.k, &case.v, &w, None, &case.mask, None)?;
            let tol = gradient_tolerance(dtype);
            for (name, got, want) in [("dq", &dq, &want.dq), ("dk", &dk, &want.dk), ("dv", &dv, &want.dv)] {
                assert_eq!(got.dims(), want.dims(), "{name}: shape");
                // Gradients sum over rows: scale the tolerance with the largest element.
                let largest = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
                assert_close(
                    got,
                    want,
                    (tol.0 * largest.max(1.0), tol.1),
                    &format!("{name} {}", case.description),
                )?;
            }
        }
    }
    Ok(())
}

/// The padding's layout: each half padded (RoPE's pairs `(c, c + D/2)` stay pairs), and the
/// padded width picked per head dim.
#[test]
fn halves_are_padded_apart() -> Result<()> {
    let x = Tensor::arange(1f32, 7.0, &Device::Cpu)?.reshape((1, 1, 1, 6))?;
    // Through the public path: a head dim of 6 with v = x and one key gives out = x.
    let mask = segattn::SegmentMask::causal(1, &Device::Cpu)?;
    let out = padded(|| SegmentAttention::new(&mask).forward(&x, &x, &x))?.out;
    assert_eq!(out.flatten_all()?.to_vec1::<f32>()?, vec![1., 2., 3., 4., 5., 6.]);
    // Empty inputs keep their shapes.
    let empty = Tensor::zeros((1, 0, 2, 6), DType::F32, &Device::Cpu)?;
    let keys = Tensor::ones((1, 3, 2, 6), DType::F32, &Device::Cpu)?;
    let none = segattn::SegmentMask::full(3, &Device::Cpu)?.last_queries(0)?;
    let got = padded(|| {
        SegmentAttention::new(&none)
            .return_lse(true)
            .forward(&empty, &keys, &keys)
    })?;
    assert_eq!(got.out.dims(), &[1, 0, 2, 6]);
    assert_eq!(got.lse.unwrap().dims(), &[1, 2, 0]);
    assert_eq!(segattn::head_dim::PINE_HEAD_DIMS, [64, 128, 256]);
    assert_eq!(segattn::head_dim::BACKWARD_HEAD_DIMS, [64, 128]);
    assert_eq!(segattn::head_dim::ATTENTION_HEAD_DIMS, [64, 128, 256]);
    Ok(())
}

/// PINE at padded head dims: prefill, the cache's key rotation and decode against the same calls
/// unpadded (every RoPE form: theta, Llama-3 scaling, tables) and the prefill against the oracle.
#[test]
fn padded_pine_matches_unpadded() -> Result<()> {
    let mut rng = Rng::new(11);
    for (i, &d) in [8usize, 48, 80, 96, 200].iter().enumerate() {
        let layouts = vec![PineLayout::new(5, &[9, 1, 14, 6], 4), PineLayout::new(3, &[20, 7], 9)];
        let len = layouts[0].len();
        let (h, hkv) = HEADS[i % HEADS.len()];
        let dtype = DTYPES[i % DTYPES.len()];
        let rope = match i % 3 {
            0 => Rope::new(10_000.0),
            1 => Rope::new(500_000.0).with_llama3_scaling(segattn::pine::Llama3Scaling {
                original_max_position: 16.0,
                ..segattn::pine::Llama3Scaling::llama31()
            }),
            _ => {
                let half = d / 2;
                let n = len + 4;
                let f: Vec<f64> = (0..half).map(|c| 1e4f64.powf(-2.0 * c as f64 / d as f64)).collect();
                let table = |trig: fn(f64) -> f64| -> Result<Tensor> {
                    let v: Vec<f32> = (0..n * half)
                        .map(|x| trig((x / half) as f64 * f[x % half]) as f32)
                        .collect();
                    Tensor::from_vec(v, (n, half), &Device::Cpu)
                };
                Rope::from_tables(&table(f64::cos)?, &table(f64::sin)?)?
            }
        };
        let total = len + 2;
        let q = random_tensor(&mut rng, &[2, total, h, d], dtype)?;
        let k = random_tensor(&mut rng, &[2, total, hkv, d], dtype)?;
        let v = random_tensor(&mut rng, &[2, total, hkv, d], dtype)?;
        let pine = PineAttention::new(&layouts, rope.clone())?.return_lse(true);
        let prompt = |t: &Tensor| t.narrow(1, 0, len);
        let what = format!("D {d} {dtype:?} H {h} Hkv {hkv} rope {i}");

        let run = |pine: &PineAttention| -> Result<(Tensor, Tensor, Tensor, Tensor)> {
            let pre = pine.prefill(&prompt(&q)?, &prompt(&k)?, &prompt(&v)?)?;
            let k_cache = pine.rotate_keys(&k)?;
            let step = pine.decode(&q.narrow(1, total - 2, 2)?, &k_cache, &v)?;
            Ok((pre.out, pre.lse.unwrap(), k_cache, step.out))
        };
        let (pre, lse, k_cache, step) = padded(|| run(&pine))?;
        let (pre0, lse0, k_cache0, step0) = run(&pine)?;
        let (atol, rtol) = common::cpu_paths_tolerance(dtype);
        let near = (atol.max(1e-5), rtol.max(1e-4));
        assert_close(&k_cache, &k_cache0, near, &format!("rotated keys {what}"))?;
        assert_close(&pre, &pre0, near, &format!("prefill {what}"))?;
        assert_close(&lse, &lse0, (1e-4, 1e-5), &format!("prefill lse {what}"))?;
        assert_close(&step, &step0, near, &format!("decode {what}"))?;

        // The prefill against the literal oracle as well.
        let want = reference::pine_attention(&prompt(&q)?, &prompt(&k)?, &prompt(&v)?, &layouts, &rope, None)?;
        let tol = common::pine::PineTolerance::of(common::pine::PinePath::Cpu, dtype);
        common::pine::compare_with_oracle(&pre, &lse, &want, len, tol, &format!("oracle {what}"))?;
    }
    Ok(())
}
