//! Shared test helpers: tolerances (the one place they are stated), random inputs, comparisons.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var};
use segattn::{HeadReduction, MassAlgorithm, QueryReduction, SegmentAttention, SegmentMask, SegmentScoreOptions};

/// Absolute and relative tolerance of a fused result against the f64 reference, by input dtype.
/// Inputs are rounded to the dtype before both run, so the error is the kernel's own: f32
/// accumulation and, for 16-bit types, the rounding of the output (and of P for tensor cores).
pub fn tolerance(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (2e-5, 2e-4),
        DType::F16 => (2e-3, 4e-3),
        DType::BF16 => (1.6e-2, 2e-2),
        other => panic!("no tolerance for {other:?}"),
    }
}

/// Tolerance of one f32 result rounded once to `dtype` by two paths whose f32 arithmetic may
/// differ in the last bit (fused multiply-add or not): one unit in the last place of the dtype.
pub fn one_rounding_tolerance(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F16 => (1e-6, 1.0 / 1024.0),
        DType::BF16 => (1e-6, 1.0 / 128.0),
        _ => (1e-6, 1e-6),
    }
}

/// Tolerance between two CPU paths of one call that may take different loops (a padded head dim
/// at most 4 query rows reads K and V rows as stored where the unpadded one takes the tile loops):
/// - their f32 sums run in other orders: at D 255 and scale 0.35 the logits move by ~5e-6 and the
///   outputs as much (soaks of 1500 cases found up to 4e-6): 2e-5 absolute, 1e-5 relative;
/// - 16-bit outputs round those: two units in the last place (a value just above a power of two
///   and its twin just below are one unit of the lower binade apart, a little over one of the
///   upper);
/// - bf16 P is rounded to bf16 in the tile loops of AVX-512 BF16 CPUs (`cpu/bf16_pairs.rs`, as the
///   GPU's tensor cores take P), at most 2^-9 of each weight: 2^-9 max |v| (random inputs:
///   |v| < 1.55, so 3e-3) absolute.
pub fn cpu_paths_tolerance(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (2e-5, 1e-5),
        DType::F16 => (2e-5, 2.0 / 1024.0),
        DType::BF16 => (4e-3, 2.0 / 128.0),
        other => panic!("no tolerance for {other:?}"),
    }
}

/// Tolerance of PINE's attention against the oracle (CUDA kernels, and the CPU's): K rotated once
/// and rounded to the dtype, and each turned query rounded to the dtype for the tensor cores (or
/// the CPU's bf16 pair loops): two roundings more than [`tolerance`] covers.
pub fn rotated_tolerance(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F16 => (4e-3, 8e-3),
        DType::BF16 => (3e-2, 4e-2),
        other => tolerance(other),
    }
}

/// LSE tolerance of PINE's attention (see [`rotated_tolerance`]).
pub fn rotated_lse_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 1e-2,
        _ => lse_tolerance(dtype),
    }
}

/// Absolute and relative tolerance of the gradients dq, dk, dv against the f64 reference, by
/// input dtype. The backward runs in f32 from the dtype's inputs; for 16-bit types the error is
/// mostly the final rounding of each gradient to the dtype (half a unit in the last place).
pub fn gradient_tolerance(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (1e-4, 1e-4),
        DType::F16 => (2e-4, 2e-3),
        DType::BF16 => (2e-4, 8e-3),
        other => panic!("no tolerance for {other:?}"),
    }
}

/// Tolerance of the fused CUDA backward kernel's gradients against the f64 reference: (a
/// fraction of the tensor's largest magnitude, an absolute floor, relative). The kernel rounds P
/// and dS to the dtype for its tensor-core products (FlashAttention-2's choice) and takes
/// delta = dO . O from the rounded output, so an element's error follows the size of the terms it
/// sums, which the tensor's largest element bounds; the floor covers tensors whose terms cancel
/// to exactly 0 (every row sees one key: dS = 0 in exact arithmetic, ~1e-8 from O's rounding).
/// See [`worst_ratio_scaled`].
pub fn fused_gradient_tolerance(dtype: DType) -> (f64, f64, f64) {
    match dtype {
        DType::F16 => (1e-3, 1e-5, 1e-3),
        DType::BF16 => (6e-3, 1e-4, 6e-3),
        other => panic!("no fused backward for {other:?}"),
    }
}

/// Tolerance of the LSE (always f32): absolute, on values of magnitude ~log(Lk) + max score.
pub fn lse_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        _ => 2e-3,
    }
}

/// Absolute and relative tolerance of a per-segment attention mass (values in [0, 1] per query
/// row) against the f64 reference, by input dtype. The CPU computes in f32 for every dtype; the
/// CUDA kernel rounds P to f16 for its tensor-core segment sums (2^-11 relative per element) and
/// uses `ex2.approx`. Under a query or head SUM, scale `atol` by the number of rows summed.
pub fn mass_tolerance(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (2e-6, 1e-4),
        DType::F16 | DType::BF16 => (5e-5, 2e-3),
        other => panic!("no tolerance for {other:?}"),
    }
}

/// The tolerance of a mass computed with `opts` from q `[B, lq, h, D]` of `dtype`: sums over
/// query rows or heads add up the rows' errors.
pub fn mass_tolerance_for(dtype: DType, opts: &SegmentScoreOptions, lq: usize, h: usize) -> (f64, f64) {
    let (atol, rtol) = mass_tolerance(dtype);
    let rows = if opts.query_reduction == QueryReduction::SumBySegment {
        lq
    } else {
        1
    };
    let heads = if opts.head_reduction == HeadReduction::Sum {
        h
    } else {
        1
    };
    (atol * (rows * heads) as f64, rtol)
}

/// Random mass options from `rng`: every reduction and normalisation, sometimes a scale, the
/// algorithm one of `algorithms`.
pub fn random_mass_options(rng: &mut Rng, algorithms: &[MassAlgorithm]) -> SegmentScoreOptions {
    let mut o = SegmentScoreOptions::new()
        .normalize_by_length(rng.below(2) == 0)
        .query_reduction(
            [
                QueryReduction::None,
                QueryReduction::SumBySegment,
                QueryReduction::MeanBySegment,
            ][rng.below(3)],
        )
        .head_reduction([HeadReduction::None, HeadReduction::Sum, HeadReduction::Mean][rng.below(3)])
        .algorithm(algorithms[rng.below(algorithms.len())]);
    if rng.below(4) == 0 {
        o = o.scale(0.05 + 0.3 * rng.unit());
    }
    o
}

/// The f32 bit patterns of a tensor's values (any float dtype), for bitwise comparisons.
pub fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|x| x.to_bits())
        .collect())
}

/// The case count set in environment variable `var` (`SEGATTN_CASES`, `SEGATTN_EMU_CASES`,
/// `SEGATTN_GPU_CASES`), if any; each test scales it to its own cost.
pub fn env_count(var: &str) -> Option<u32> {
    std::env::var(var).ok().and_then(|s| s.parse().ok())
}

/// A proptest configuration of `cases` cases that writes no failure-persistence files (the
/// failing seed is in the message; the emulated and GPU tests replay from it).
pub fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases,
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::Off)),
        ..proptest::test_runner::Config::default()
    }
}

/// A small deterministic generator (xorshift64*), so every case is replayable from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// A value never zero: magnitude in [0.05, 1.55), random sign.
    pub fn nonzero(&mut self) -> f32 {
        let m = 0.05 + 1.5 * self.unit();
        (if self.next_u64() & 1 == 0 { m } else { -m }) as f32
    }
}

/// A random `shape` tensor of `dtype` with values never zero.
pub fn random_tensor(rng: &mut Rng, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.nonzero()).collect();
    Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)
}

/// The same values as `t` in a contiguous view whose start is one element past its storage's (a
/// view the kernels' 16-byte loads cannot read in place: the API must copy it; moved to a GPU with
/// `to_device`, the view keeps its layout).
pub fn misaligned(t: &Tensor) -> Result<Tensor> {
    let flat = t.flatten_all()?;
    let n = flat.dim(0)?;
    Tensor::cat(&[&flat.narrow(0, 0, 1)?, &flat], 0)?
        .narrow(0, 1, n)?
        .reshape(t.shape())
}

/// Random segment lengths summing to `len` (at least one segment; may include single tokens).
pub fn random_partition(rng: &mut Rng, len: usize, max_segments: usize) -> Vec<usize> {
    if len == 0 {
        return vec![0];
    }
    let n = 1 + rng.below(max_segments.min(len));
    let mut cuts: Vec<usize> = (0..n - 1).map(|_| 1 + rng.below(len.max(2) - 1)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut lens = Vec::new();
    let mut prev = 0;
    for c in cuts.into_iter().chain(std::iter::once(len)) {
        if c > prev {
            lens.push(c - prev);
            prev = c;
        }
    }
    lens
}

/// Max |a - b| / (atol + rtol m) over all elements, for magnitudes `m` of the terms `b` is a sum
/// of (a result that two ops each round to a 16-bit dtype and candle then adds: under
/// cancellation the error follows the terms, not their sum). NaN anywhere fails.
pub fn worst_ratio_of_terms(a: &Tensor, b: &Tensor, m: &Tensor, atol: f64, rtol: f64) -> Result<(f64, usize)> {
    let f = |t: &Tensor| t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>();
    let (a, b, m) = (f(a)?, f(b)?, f(m)?);
    assert!(
        a.len() == b.len() && b.len() == m.len(),
        "compared tensors differ in size"
    );
    let mut worst = (0.0, 0);
    for (i, ((&x, &y), &m)) in a.iter().zip(&b).zip(&m).enumerate() {
        let r = if x.is_nan() || y.is_nan() {
            f64::INFINITY
        } else {
            (x - y).abs() / (atol + rtol * m)
        };
        if r > worst.0 {
            worst = (r, i);
        }
    }
    Ok(worst)
}

/// Max |a - b| / (frac max|b| + atol + rtol |b|) over all elements (an error measured against
/// the tensor's scale), for `(frac, atol, rtol)` from [`fused_gradient_tolerance`]. NaN anywhere
/// fails.
pub fn worst_ratio_scaled(a: &Tensor, b: &Tensor, (frac, atol, rtol): (f64, f64, f64)) -> Result<(f64, usize)> {
    let largest = b
        .abs()?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    worst_ratio(a, b, frac * largest + atol, rtol)
}

/// Max |a - b| / (atol + rtol |b|) over all elements; `-inf == -inf` counts as equal and any NaN
/// in `a` fails. Returns the worst ratio and its flat index (ratio <= 1 passes).
pub fn worst_ratio(a: &Tensor, b: &Tensor, atol: f64, rtol: f64) -> Result<(f64, usize)> {
    let a = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    assert_eq!(a.len(), b.len(), "compared tensors differ in size");
    let mut worst = (0.0, 0);
    for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
        let r = if x.is_nan() || y.is_nan() {
            f64::INFINITY
        } else if x == y {
            0.0
        } else if x.is_infinite() || y.is_infinite() {
            f64::INFINITY
        } else {
            (x - y).abs() / (atol + rtol * y.abs())
        };
        if r > worst.0 {
            worst = (r, i);
        }
    }
    Ok(worst)
}
pub mod cases;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod pine;

/// dq, dk, dv of the loss `sum(out * w)` (plus `sum(lse * w_lse)` when `w_lse` is given) of
/// attention over `(q, k, v)` under `mask`, from candle's backward pass through the op (`w` in
/// the dtype of q, so the gradient that reaches the op is exactly `w`; `w_lse` f32 `[B, H, Lq]`).
pub fn autograd_gradients(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    mask: &SegmentMask,
    (w, w_lse): (&Tensor, Option<&Tensor>),
    scale: Option<f64>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (q, k, v) = (Var::from_tensor(q)?, Var::from_tensor(k)?, Var::from_tensor(v)?);
    let mut attn = SegmentAttention::new(mask).return_lse(w_lse.is_some());
    if let Some(s) = scale {
        attn = attn.scale(s);
    }
    let res = attn.forward(q.as_tensor(), k.as_tensor(), v.as_tensor())?;
    let mut loss = (res.out * w)?.sum_all()?.to_dtype(DType::F32)?;
    if let (Some(w_lse), Some(lse)) = (w_lse, &res.lse) {
        // Rows that see nothing have lse -inf: weight 0 there would still give NaN, so they are
        // left out of the loss.
        let finite = lse.ne(f32::NEG_INFINITY)?;
        let term = finite.where_cond(&(lse * w_lse)?, &lse.zeros_like()?)?;
        loss = (loss + term.sum_all()?)?;
    }
    let grads = loss.backward()?;
    let get = |x: &Var, name: &str| {
        grads
            .get(x.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg(format!("no gradient for {name}")))
    };
    Ok((get(&q, "q")?, get(&k, "k")?, get(&v, "v")?))
}
