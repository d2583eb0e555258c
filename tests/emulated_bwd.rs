//! The CUDA backward kernel (kernels/bwd/bwd.cu), run on the CPU under the SIMT emulator, against
//! the f64 reference backward: random shapes (ragged lengths, GQA, Lq <= Lk), every mask family
//! of the property tests (fully masked rows, single-token segments, random pair tables), bf16 and
//! f16, head dims 64 and 128, and three thread schedules per case, whose gradients must be
//! bitwise identical (one block runs at a time in the emulator, so even dQ's adds come in one order).
//!
//! `SEGATTN_EMU_CASES=n` sets the number of random cases (default 48).

mod common;

use candle_core::{DType, Result, Tensor};
use common::cases::{draw, MASK_KINDS};
use common::{bits, env_count, fused_gradient_tolerance, proptest_config, random_tensor, worst_ratio_scaled, Rng};
use proptest::prelude::*;
use segattn::emulated::{attention_backward, forward, Schedule};
use segattn::reference;

const SCHEDULES: [Schedule; 3] = [Schedule::Forward, Schedule::HighFirst, Schedule::RandomWarp];
const HEADS: [(usize, usize); 4] = [(1, 1), (2, 1), (4, 2), (3, 3)];

fn check(seed: u64, lk: usize, lq_equal: bool, heads: usize, head_dim: usize, dtype: DType, kind: usize) -> Result<()> {
    let batch = 1 + (seed % 2) as usize;
    let case = draw(seed, batch, lk, lq_equal, HEADS[heads], head_dim, dtype, kind)?;
    let scale = seed.is_multiple_of(3).then_some(0.3);
    let fwd = forward(&case.q, &case.k, &case.v, &case.mask, scale, Schedule::Forward, 0)?;
    let lse = fwd.lse.expect("the emulated forward returns the LSE");
    let mut rng = Rng::new(seed ^ 0xb4c4);
    let d_out = random_tensor(&mut rng, case.q.dims(), dtype)?;
    // A third of the cases with a gradient of the LSE as well, a third with it alone (dO = 0).
    let (b, lq, h, _) = case.q.dims4()?;
    let d_lse = match seed % 3 {
        0 => None,
        _ => Some(random_tensor(&mut rng, &[b, h, lq], DType::F32)?),
    };
    let d_out = if seed % 3 == 2 { d_out.zeros_like()? } else { d_out };
    let want = kernel_definition(&case, (&fwd.out, &d_out), d_lse.as_ref(), scale)?;
    let tol = fused_gradient_tolerance(dtype);
    let mut first: Option<[Vec<u32>; 3]> = None;
    for (i, schedule) in SCHEDULES.into_iter().enumerate() {
        let got = attention_backward(
            (&case.q, &case.k, &case.v),
            (&fwd.out, &lse),
            (&d_out, d_lse.as_ref()),
            &case.mask,
            scale,
            schedule,
            seed.wrapping_add(i as u64),
        )?;
        for (name, got, want, like) in [
            ("dq", &got.0, &want.dq, &case.q),
            ("dk", &got.1, &want.dk, &case.k),
            ("dv", &got.2, &want.dv, &case.v),
        ] {
            assert_eq!(got.dims(), like.dims(), "{}: {name} shape", case.description);
            assert_eq!(got.dtype(), dtype, "{}: {name} dtype", case.description);
            let (r, at) = worst_ratio_scaled(got, want, tol)?;
            assert!(
                r <= 1.0,
                "{} schedule {schedule:?}: {name} off by {r} x tolerance at flat index {at}",
                case.description
            );
        }
        let now = [bits(&got.0)?, bits(&got.1)?, bits(&got.2)?];
        match &first {
            None => first = Some(now),
            Some(f) => assert!(
                f == &now,
                "{}: schedule {schedule:?} changed the gradients' bits",
                case.description
            ),
        }
    }
    Ok(())
}

/// The reference gradients of what the kernel computes: FlashAttention-2's backward with
/// delta_i = dO_i . O_i taken from the output as rounded to the dtype (`out`), where the exact
/// gradient has dO_i . O_i of the exact output. The two differ by that rounding alone (~2^-9 of
/// |dO| |O| per element in bf16, which does not vanish where the exact dQ does: a row that sees
/// one key); the reference takes the difference as a gradient of the LSE (added to `d_lse`, the
/// LSE's own gradient, if any), which enters dS the same way: dS = P (dP - dO . O_exact + dlse).
fn kernel_definition(
    case: &common::cases::Case,
    (out, d_out): (&Tensor, &Tensor),
    d_lse: Option<&Tensor>,
    scale: Option<f64>,
) -> Result<reference::ReferenceGradients> {
    let exact = reference::attention(&case.q, &case.k, &case.v, &case.mask, scale)?.out;
    let f64_of = |t: &Tensor| t.to_dtype(DType::F64);
    let correction = (f64_of(d_out)? * (f64_of(&exact)? - f64_of(out)?)?)?
        .sum(candle_core::D::Minus1)?
        .transpose(1, 2)?
        .contiguous()?;
    let correction = match d_lse {
        Some(g) => (correction + g.to_dtype(DType::F64)?)?,
        None => correction,
    };
    reference::attention_backward(&case.q, &case.k, &case.v, d_out, Some(&correction), &case.mask, scale)
}

proptest! {
    #![proptest_config(proptest_config(env_count("SEGATTN_EMU_CASES").unwrap_or(48)))]

    #[test]
    fn gradients_match_reference(
        seed in any::<u64>(),
        lk in 1usize..200,
        lq_equal in any::<bool>(),
        heads in 0..HEADS.len(),
        d128 in any::<bool>(),
        bf16 in any::<bool>(),
        kind in 0..MASK_KINDS.len(),
    ) {
        let dtype = if bf16 { DType::BF16 } else { DType::F16 };
        check(seed, lk, lq_equal, heads, if d128 { 128 } else { 64 }, dtype, kind).unwrap();
    }
}

/// Several key blocks and query tiles, a causal mask (SKIP, FULL and PARTIAL tiles), GQA.
#[test]
fn long_causal_rows_with_gqa() -> Result<()> {
    check(7, 300, true, 2, 64, DType::BF16, 0)
}

/// A ragged batch of documents at D = 128 in f16.
#[test]
fn documents_at_head_dim_128() -> Result<()> {
    check(11, 181, true, 1, 128, DType::F16, 2)
}

/// Rows that see no key get zero gradients, never NaN (the forward's LSE is -inf there).
#[test]
fn empty_rows_give_zero_gradients() -> Result<()> {
    let kind = MASK_KINDS.iter().position(|k| *k == "empty_rows").unwrap();
    for seed in 0..4 {
        check(seed, 97, true, 0, 64, DType::BF16, kind)?;
    }
    Ok(())
}

/// Unsupported inputs are errors that name the argument.
#[test]
fn bad_inputs_are_errors() -> Result<()> {
    let case = draw(1, 1, 16, true, (1, 1), 64, DType::BF16, 0)?;
    let fwd = forward(&case.q, &case.k, &case.v, &case.mask, None, Schedule::Forward, 0)?;
    let lse = fwd.lse.unwrap();
    let short = case.q.narrow(1, 0, 8)?;
    let err = attention_backward(
        (&case.q, &case.k, &case.v),
        (&fwd.out, &lse),
        (&short, None),
        &case.mask,
        None,
        Schedule::Forward,
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("d_out"), "{err}");
    let bad_lse = Tensor::zeros((1, 1, 3), DType::F32, &candle_core::Device::Cpu)?;
    let d_out = case.q.ones_like()?;
    let err = attention_backward(
        (&case.q, &case.k, &case.v),
        (&fwd.out, &bad_lse),
        (&d_out, None),
        &case.mask,
        None,
        Schedule::Forward,
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("lse"), "{err}");
    Ok(())
}

/// Scores far below zero (the LSE near -500, so exp(-lse) overflows f32) with a ragged last key
/// tile seen whole (a FULL tile: no mask test per element): the padding keys past Lk must be
/// masked all the same, or their P would be +inf and dQ NaN.
#[test]
fn padding_keys_stay_masked_under_huge_negative_scores() -> Result<()> {
    let dev = candle_core::Device::Cpu;
    let (lq, lk, d) = (70, 70, 64);
    let mut rng = Rng::new(3);
    let noise = |rng: &mut Rng, dims: &[usize]| random_tensor(rng, dims, DType::F32);
    let q = ((noise(&mut rng, &[1, lq, 1, d])? * 0.01)? + 8.0)?.to_dtype(DType::BF16)?;
    let k = ((noise(&mut rng, &[1, lk, 1, d])? * 0.01)? - 8.0)?.to_dtype(DType::BF16)?;
    let v = random_tensor(&mut rng, &[1, lk, 1, d], DType::BF16)?;
    let mask = segattn::SegmentMask::full(lk, &dev)?;
    let fwd = forward(&q, &k, &v, &mask, None, Schedule::Forward, 0)?;
    let lse = fwd.lse.unwrap();
    assert!(
        lse.max_all()?.to_scalar::<f32>()? < -400.0,
        "the case needs the LSE far below zero"
    );
    let d_out = random_tensor(&mut rng, &[1, lq, 1, d], DType::BF16)?;
    let (dq, dk, dv) = attention_backward(
        (&q, &k, &v),
        (&fwd.out, &lse),
        (&d_out, None),
        &mask,
        None,
        Schedule::Forward,
        0,
    )?;
    for (name, g) in [("dq", dq), ("dk", dk), ("dv", dv)] {
        let g = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(g.iter().all(|x| x.is_finite()), "{name} has a non-finite element");
    }
    Ok(())
}

/// More than one window of query tiles (128 tiles of 32 rows at D = 128: 4,096 rows), so the
/// pipeline stops at a window's end and restarts after the next classification; GQA. Against
/// the CPU path's gradients (f32, exact delta; the f64 reference is too slow at this length),
/// which tests/gradients.rs checks against the reference.
#[test]
fn several_windows_of_query_tiles() -> Result<()> {
    let dev = candle_core::Device::Cpu;
    let (len, d) = (4200, 128);
    let mut rng = Rng::new(5);
    let q = random_tensor(&mut rng, &[1, len, 2, d], DType::BF16)?;
    let k = random_tensor(&mut rng, &[1, len, 1, d], DType::BF16)?;
    let v = random_tensor(&mut rng, &[1, len, 1, d], DType::BF16)?;
    let d_out = random_tensor(&mut rng, &[1, len, 2, d], DType::BF16)?;
    let mut docs = vec![100; len / 100];
    docs.push(len % 100);
    docs.retain(|&l| l > 0);
    let mask = segattn::SegmentMask::documents(&[docs], &dev)?;
    let fwd = forward(&q, &k, &v, &mask, None, Schedule::Forward, 0)?;
    let lse = fwd.lse.unwrap();
    let got = attention_backward(
        (&q, &k, &v),
        (&fwd.out, &lse),
        (&d_out, None),
        &mask,
        None,
        Schedule::Forward,
        0,
    )?;
    let f32s = |t: &Tensor| t.to_dtype(DType::F32);
    let want = common::autograd_gradients(
        (&f32s(&q)?, &f32s(&k)?, &f32s(&v)?),
        &mask,
        (&f32s(&d_out)?, None),
        None,
    )?;
    let tol = fused_gradient_tolerance(DType::BF16);
    for (name, got, want) in [
        ("dq", &got.0, &want.0),
        ("dk", &got.1, &want.1),
        ("dv", &got.2, &want.2),
    ] {
        let (r, at) = worst_ratio_scaled(got, want, tol)?;
        assert!(r <= 1.0, "{name} off by {r} x tolerance at flat index {at}");
    }
    Ok(())
}
