//! Gradients of the attention op (candle autograd through `segment_attention`) against the f64
//! reference backward, and that reference against finite differences.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::cases::{draw, Case, MASK_KINDS};
use common::{
    autograd_gradients, env_count, gradient_tolerance, random_tensor, worst_ratio, worst_ratio_of_terms, Rng,
};
use proptest::prelude::*;
use segattn::{reference, segment_attention, SegmentAttention, SegmentMask};

const HEADS: [(usize, usize); 5] = [(1, 1), (2, 1), (4, 2), (3, 3), (6, 2)];
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Checks the gradients of `sum(out * w)`, plus `sum(lse * w_lse)` with `through_lse`.
fn check(case: &Case, seed: u64, scale: Option<f64>, through_lse: bool) -> Result<()> {
    let dtype = case.q.dtype();
    let mut rng = Rng::new(seed ^ 0x5eed);
    let w = random_tensor(&mut rng, case.q.dims(), dtype)?;
    let (b, lq, h, _) = case.q.dims4()?;
    let w_lse = if through_lse {
        Some(random_tensor(&mut rng, &[b, h, lq], DType::F32)?)
    } else {
        None
    };
    let (dq, dk, dv) = autograd_gradients((&case.q, &case.k, &case.v), &case.mask, (&w, w_lse.as_ref()), scale)?;
    let reference = |w: &Tensor, w_lse: Option<&Tensor>| {
        reference::attention_backward(&case.q, &case.k, &case.v, w, w_lse, &case.mask, scale)
    };
    let want = reference(&w, w_lse.as_ref())?;
    // Through the LSE, candle adds the output's and the LSE's gradients, each rounded to the
    // dtype: the tolerance follows the two terms (each from the reference alone).
    let terms = match &w_lse {
        Some(w_lse) => Some((reference(&w, None)?, reference(&w.zeros_like()?, Some(w_lse))?)),
        None => None,
    };
    let (atol, rtol) = gradient_tolerance(dtype);
    for (n, (name, got, want, like)) in [
        ("dq", &dq, &want.dq, &case.q),
        ("dk", &dk, &want.dk, &case.k),
        ("dv", &dv, &want.dv, &case.v),
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(got.dims(), like.dims(), "{}: {name} shape", case.description);
        assert_eq!(got.dtype(), dtype, "{}: {name} dtype", case.description);
        let magnitude = match &terms {
            Some((a, b)) => {
                let pick = |g: &reference::ReferenceGradients| [&g.dq, &g.dk, &g.dv][n].abs();
                (pick(a)? + pick(b)?)?
            }
            None => want.abs()?,
        };
        let (r, at) = worst_ratio_of_terms(got, want, &magnitude, atol, rtol)?;
        assert!(
            r <= 1.0,
            "{}: {name} off by {r} x tolerance at flat index {at}",
            case.description
        );
    }
    Ok(())
}

fn cases() -> u32 {
    env_count("SEGATTN_CASES").unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// Every mask family (fully masked rows, single-token segments, rule tables included), GQA,
    /// Lq <= Lk, every dtype.
    #[test]
    fn gradients_match_reference(
        seed in any::<u64>(),
        batch in 1usize..=2,
        lk in 1usize..=160,
        lq_equal in any::<bool>(),
        heads in prop::sample::select(HEADS.to_vec()),
        head_dim in 1usize..=48,
        dtype in prop::sample::select(DTYPES.to_vec()),
        kind in 0..MASK_KINDS.len(),
    ) {
        let case = draw(seed, batch, lk, lq_equal, heads, head_dim, dtype, kind).unwrap();
        // Half the cases also backpropagate through the LSE (ring attention's merge does).
        check(&case, seed, None, seed % 2 == 0).unwrap();
    }
}

/// More query rows than one block of the backward (256): the blocks, their key ranges and the
/// sums of dK and dV over blocks; a custom scale.
#[test]
fn long_rows_over_several_blocks() -> Result<()> {
    for (kind, dtype) in [
        (0, DType::F32),
        (2, DType::BF16),
        (5, DType::F32),
        (7, DType::F16),
        (9, DType::F32),
    ] {
        let case = draw(40 + kind as u64, 1, 700, true, (4, 2), 16, dtype, kind)?;
        check(&case, kind as u64, Some(0.21), kind % 2 == 1)?;
    }
    Ok(())
}

/// The oracle itself: its gradients equal central differences of the reference forward's loss
/// `sum(out * w) + sum(lse * w_lse)` over the rows that see a key (f64, steps of 2^-10 that the
/// f32 inputs represent exactly).
#[test]
fn reference_backward_matches_finite_differences() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = Rng::new(9);
    let (b, lq, lk, h, hkv, d) = (2, 5, 6, 4, 2, 3);
    let q = random_tensor(&mut rng, &[b, lq, h, d], DType::F32)?;
    let k = random_tensor(&mut rng, &[b, lk, hkv, d], DType::F32)?;
    let v = random_tensor(&mut rng, &[b, lk, hkv, d], DType::F32)?;
    let w = random_tensor(&mut rng, &[b, lq, h, d], DType::F32)?;
    let w_lse = random_tensor(&mut rng, &[b, h, lq], DType::F32)?;
    // PINE rows over the last 5 of 6 keys, and a row of the first batch row that sees nothing.
    let ids = Tensor::new(&[[0u32, 0, 1, 1, 2, 2], [0, 1, 1, 2, 2, 3]], &dev)?;
    let rule = segattn::PairRule::new(segattn::Visibility::Causal, segattn::Visibility::Full);
    let mask = SegmentMask::self_attention(&ids, rule)?.last_queries(lq)?;
    let scale = Some(0.7);
    let loss = |q: &Tensor, k: &Tensor, v: &Tensor| -> Result<f64> {
        let r = reference::attention(q, k, v, &mask, scale)?;
        let out_term = (r.out * w.to_dtype(DType::F64)?)?.sum_all()?.to_scalar::<f64>()?;
        let lse = r.lse.flatten_all()?.to_vec1::<f64>()?;
        let wl = w_lse.flatten_all()?.to_vec1::<f32>()?;
        let lse_term: f64 = lse
            .iter()
            .zip(&wl)
            .filter(|(l, _)| l.is_finite())
            .map(|(l, w)| l * f64::from(*w))
            .sum();
        Ok(out_term + lse_term)
    };
    let grads = reference::attention_backward(&q, &k, &v, &w, Some(&w_lse), &mask, scale)?;
    let step = 1.0 / 1024.0;
    for (which, want) in [(0, &grads.dq), (1, &grads.dk), (2, &grads.dv)] {
        let base = [&q, &k, &v][which];
        let flat = base.flatten_all()?.to_vec1::<f32>()?;
        let want = want.flatten_all()?.to_vec1::<f64>()?;
        for (n, want) in want.iter().enumerate() {
            let nudged = |delta: f32| -> Result<Tensor> {
                let mut x = flat.clone();
                x[n] += delta;
                Tensor::from_vec(x, base.dims(), &dev)
            };
            let mut inputs = [q.clone(), k.clone(), v.clone()];
            inputs[which] = nudged(step)?;
            let up = loss(&inputs[0], &inputs[1], &inputs[2])?;
            inputs[which] = nudged(-step)?;
            let down = loss(&inputs[0], &inputs[1], &inputs[2])?;
            let numeric = (up - down) / (2.0 * f64::from(step));
            assert!(
                (numeric - want).abs() <= 1e-5 + 1e-4 * want.abs(),
                "input {which} element {n}: finite difference {numeric}, reference {want}"
            );
        }
    }
    Ok(())
}

/// Only the inputs that track gradients get one; the LSE asked alongside changes nothing.
#[test]
fn gradients_reach_only_variables() -> Result<()> {
    let case = draw(5, 1, 40, true, (2, 1), 8, DType::F32, 5)?;
    let k = Var::from_tensor(&case.k)?;
    let res = SegmentAttention::new(&case.mask)
        .return_lse(true)
        .forward(&case.q, k.as_tensor(), &case.v)?;
    assert!(res.lse.is_some());
    let grads = res.out.sum_all()?.backward()?;
    assert!(grads.get(k.as_tensor()).is_some());
    assert!(grads.get(&case.q).is_none() && grads.get(&case.v).is_none());
    // The gradients are plain values: no op graph hangs off them (none of the backward's blocks).
    let w = case.q.ones_like()?;
    let all = autograd_gradients((&case.q, &case.k, &case.v), &case.mask, (&w, None), None)?;
    assert!(!all.0.track_op() && !all.1.track_op() && !all.2.track_op());
    // Without a variable no backward op is recorded: the plain path.
    let out = segment_attention(&case.q, &case.k, &case.v, &case.mask)?;
    assert!(!out.track_op());
    Ok(())
}

/// Packing is exact: documents packed in one row under `SegmentMask::documents` give the same
/// outputs and gradients as each document run alone under a causal mask (the reason to pack).
#[test]
fn packed_documents_equal_separate_runs() -> Result<()> {
    let dev = Device::Cpu;
    for seed in 0..6u64 {
        let mut rng = Rng::new(100 + seed);
        let total = 40 + rng.below(200);
        let docs = common::random_partition(&mut rng, total, 8);
        let len: usize = docs.iter().sum();
        let (h, hkv, d) = [(4, 2, 16), (2, 2, 32), (6, 3, 8)][seed as usize % 3];
        let q = random_tensor(&mut rng, &[1, len, h, d], DType::F32)?;
        let k = random_tensor(&mut rng, &[1, len, hkv, d], DType::F32)?;
        let v = random_tensor(&mut rng, &[1, len, hkv, d], DType::F32)?;
        let w = random_tensor(&mut rng, &[1, len, h, d], DType::F32)?;
        let packed = SegmentMask::documents(std::slice::from_ref(&docs), &dev)?;
        let (dq, dk, dv) = autograd_gradients((&q, &k, &v), &packed, (&w, None), None)?;
        let mut start = 0;
        for &n in &docs {
            let part = |t: &Tensor| t.narrow(1, start, n);
            let causal = SegmentMask::causal(n, &dev)?;
            let alone = autograd_gradients((&part(&q)?, &part(&k)?, &part(&v)?), &causal, (&part(&w)?, None), None)?;
            for (name, packed, alone) in [("dq", &dq, alone.0), ("dk", &dk, alone.1), ("dv", &dv, alone.2)] {
                let (r, at) = worst_ratio(&part(packed)?, &alone, 1e-6, 1e-5)?;
                assert!(
                    r <= 1.0,
                    "seed {seed} docs {docs:?}: {name} of the document at {start} off by {r} at {at}"
                );
            }
            start += n;
        }
    }
    Ok(())
}

/// More query rows than keys: under a causal rule the first rows sit before every key and see
/// nothing; their gradients are zero, the others match the reference, nothing is NaN.
#[test]
fn rows_before_every_key_get_zero_gradients() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = Rng::new(31);
    let (lq, lk, h, hkv, d) = (300, 40, 4, 2, 16);
    let q = random_tensor(&mut rng, &[1, lq, h, d], DType::F32)?;
    let k = random_tensor(&mut rng, &[1, lk, hkv, d], DType::F32)?;
    let v = random_tensor(&mut rng, &[1, lk, hkv, d], DType::F32)?;
    let w = random_tensor(&mut rng, &[1, lq, h, d], DType::F32)?;
    let rule = segattn::PairRule::new(segattn::Visibility::Causal, segattn::Visibility::Blocked);
    let mask = SegmentMask::new(
        &Tensor::zeros((1, lq), DType::U32, &dev)?,
        &Tensor::zeros((1, lk), DType::U32, &dev)?,
        rule,
    )?;
    let (dq, dk, dv) = autograd_gradients((&q, &k, &v), &mask, (&w, None), None)?;
    let want = reference::attention_backward(&q, &k, &v, &w, None, &mask, None)?;
    let (atol, rtol) = gradient_tolerance(DType::F32);
    for (name, got, want) in [("dq", &dq, &want.dq), ("dk", &dk, &want.dk), ("dv", &dv, &want.dv)] {
        let (r, at) = worst_ratio(got, want, atol, rtol)?;
        assert!(r <= 1.0, "{name} off by {r} x tolerance at {at}");
    }
    // Rows 0..260 are at positions -260..-1.
    let blind = dq.narrow(1, 0, lq - lk)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert_eq!(blind, 0.0);
    Ok(())
}

/// Ring / context-parallel training: attention over all keys computed as two partial attentions
/// over disjoint key halves, merged through their LSE (`merge_partials`), has the gradients of
/// the attention computed at once: the LSE passes its gradient back.
#[test]
fn merged_partials_have_the_gradients_of_the_whole() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = Rng::new(77);
    let (lq, half, h, hkv, d) = (40, 48, 4, 2, 16);
    let q = random_tensor(&mut rng, &[2, lq, h, d], DType::F32)?;
    let k = random_tensor(&mut rng, &[2, 2 * half, hkv, d], DType::F32)?;
    let v = random_tensor(&mut rng, &[2, 2 * half, hkv, d], DType::F32)?;
    let w = random_tensor(&mut rng, &[2, lq, h, d], DType::F32)?;
    let whole = SegmentMask::full(2 * half, &dev)?.last_queries(lq)?;
    let want = autograd_gradients((&q, &k, &v), &whole, (&w, None), None)?;

    let (qv, kv, vv) = (Var::from_tensor(&q)?, Var::from_tensor(&k)?, Var::from_tensor(&v)?);
    let part_mask = SegmentMask::full(half, &dev)?.last_queries(lq)?;
    let part = |start: usize| {
        let (k, v) = (
            kv.as_tensor().narrow(1, start, half)?,
            vv.as_tensor().narrow(1, start, half)?,
        );
        SegmentAttention::new(&part_mask)
            .return_lse(true)
            .forward(qv.as_tensor(), &k, &v)
    };
    let (a, b) = (part(0)?, part(half)?);
    let lse = |r: &segattn::AttentionOutput| r.lse.clone().expect("lse was asked for");
    let (out, _) = segattn::merge_partials(&a.out, &lse(&a), &b.out, &lse(&b))?;
    let grads = (out * &w)?.sum_all()?.backward()?;
    for (name, x, want) in [("dq", &qv, &want.0), ("dk", &kv, &want.1), ("dv", &vv, &want.2)] {
        let got = grads.get(x.as_tensor()).expect("a gradient");
        let (r, at) = worst_ratio(got, want, 1e-5, 1e-4)?;
        assert!(r <= 1.0, "{name} of the merged halves off by {r} x tolerance at {at}");
    }
    Ok(())
}

/// Views as inputs, as models pass them: q a transposed `[B, H, L, D]` tensor, k and v the two
/// halves of one fused projection `[B, L, 2 Hkv, D]`; the gradients flow back through the views
/// (the fused tensor gets both halves' gradients) and equal those of contiguous copies.
#[test]
fn gradients_through_views() -> Result<()> {
    let mut rng = Rng::new(12);
    let (b, l, h, hkv, d) = (2, 70, 4, 2, 16);
    let case = draw(3, b, l, true, (h, hkv), d, DType::F32, 5)?;
    let w = random_tensor(&mut rng, &[b, l, h, d], DType::F32)?;
    let want = autograd_gradients((&case.q, &case.k, &case.v), &case.mask, (&w, None), None)?;

    let q_heads_first = Var::from_tensor(&case.q.transpose(1, 2)?.contiguous()?)?;
    let kv = Var::from_tensor(&Tensor::cat(&[&case.k, &case.v], 2)?)?;
    let q = q_heads_first.as_tensor().transpose(1, 2)?;
    let (k, v) = (kv.as_tensor().narrow(2, 0, hkv)?, kv.as_tensor().narrow(2, hkv, hkv)?);
    assert!(!q.is_contiguous() && !k.is_contiguous());
    let out = segment_attention(&q, &k, &v, &case.mask)?;
    let grads = (out * &w)?.sum_all()?.backward()?;
    let dq = grads.get(q_heads_first.as_tensor()).expect("dq").transpose(1, 2)?;
    let dkv = grads.get(kv.as_tensor()).expect("dkv");
    for (name, got, want) in [
        ("dq", dq, &want.0),
        ("dk", dkv.narrow(2, 0, hkv)?, &want.1),
        ("dv", dkv.narrow(2, hkv, hkv)?, &want.2),
    ] {
        let (r, at) = worst_ratio(&got, want, 1e-6, 1e-5)?;
        assert!(r <= 1.0, "{name} through views off by {r} x tolerance at {at}");
    }
    Ok(())
}

/// The outputs without a gradient (PINE's attention, the segment mass, `segment_scores`) are
/// not silent constants in candle's graph: a backward pass through them is an error naming them,
/// while their values are those of the untracked call.
#[test]
fn backward_through_outputs_without_gradient_is_an_error() -> Result<()> {
    use segattn::pine::{PineAttention, Rope};
    use segattn::{segment_scores, PineLayout, SegmentScoreOptions};
    let mut rng = Rng::new(21);
    let layout = PineLayout::new(6, &[20, 14], 5);
    let l = layout.len();
    let q = random_tensor(&mut rng, &[1, l, 4, 16], DType::F32)?;
    let k = random_tensor(&mut rng, &[1, l, 2, 16], DType::F32)?;
    let v = random_tensor(&mut rng, &[1, l, 2, 16], DType::F32)?;
    let qv = Var::from_tensor(&q)?;
    let expect_error = |loss: Tensor, what: &str, plain: &Tensor, marked: &Tensor| -> Result<()> {
        let diff = (plain - marked)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "{what}: the marked output differs from the plain one");
        let err = loss.backward().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(what), "{what}: expected an error naming it, got {err:?}");
        Ok(())
    };

    let pine = PineAttention::new(std::slice::from_ref(&layout), Rope::new(10_000.0))?;
    let plain = pine.prefill(&q, &k, &v)?.out;
    let marked = pine.prefill(qv.as_tensor(), &k, &v)?.out;
    expect_error(marked.sum_all()?, "PINE attention", &plain, &marked)?;

    let mask = SegmentMask::pine(6, &[20, 14], 5, &Device::Cpu)?;
    let opts = SegmentScoreOptions::new();
    let plain = segment_scores(&q, &k, &mask, &opts)?;
    let marked = segment_scores(qv.as_tensor(), &k, &mask, &opts)?;
    expect_error(marked.sum_all()?, "segment_scores", &plain, &marked)?;

    let attn = SegmentAttention::new(&mask).return_segment_mass(opts);
    let plain = attn.forward(&q, &k, &v)?.segment_mass.expect("mass");
    let res = attn.forward(qv.as_tensor(), &k, &v)?;
    let marked = res.segment_mass.expect("mass");
    expect_error(marked.sum_all()?, "segment mass", &plain, &marked)?;
    // The attention output of the same call still trains.
    assert!(res.out.sum_all()?.backward()?.get(qv.as_tensor()).is_some());
    Ok(())
}
