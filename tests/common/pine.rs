//! Comparing a PINE result with the literal oracle (`reference::pine_attention`), shared by the
//! CPU, emulated and GPU tests.

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use segattn::reference::PineReferenceOutput;

use super::worst_ratio;

/// Tolerances of one comparison: output `(atol, rtol)`, LSE `atol`, and the smallest relative gap
/// between two importance scores of a query group whose rows are compared (below it the order is
/// a near-tie that rounding may flip, legitimately).
#[derive(Clone, Copy, Debug)]
pub struct PineTolerance {
    pub atol: f64,
    pub rtol: f64,
    pub lse_atol: f64,
    pub min_margin: f64,
}

/// Which implementation a PINE result comes from.
#[derive(Clone, Copy, Debug)]
pub enum PinePath {
    /// The fused CPU path: f32 arithmetic, K rotated once and rounded to the input dtype (as a
    /// decode step's cache is); with bf16 on AVX-512 BF16 CPUs each turned query is rounded to
    /// bf16 as well (`cpu/bf16_pairs.rs`), as the GPU's tensor cores take it.
    Cpu,
    /// The CUDA kernels under the emulator: K rotated and rounded to the 16-bit input dtype, as
    /// a GPU cache stores it; importance with f16 probabilities in its segment sums.
    Emulated,
    /// The CUDA kernels on a GPU, the importance included (the mass kernel, whose segment sums
    /// take P in two f16 terms: ~1e-6 relative to f32 ones), plus the hardware's mma
    /// accumulation order and `ex2.approx` (about 1e-6 relative).
    Gpu,
}

impl PineTolerance {
    /// The tolerances of `path` for inputs of `dtype` (the one place they are stated for PINE).
    /// Near-tie margins: 1e-5 relative where the scores are computed in f32 (CPU, and the
    /// emulated prefill, whose importance is the CPU's); 1e-4 on a GPU, about 50x its importance
    /// error. (With P in one f16 term, 2^-11 relative, the first H200 run flipped a group at a
    /// 1.2e-4 gap; a margin above that left out most rows of 30-segment layouts, whose random
    /// scores sit close: the mass kernel now sums two terms.)
    pub fn of(path: PinePath, dtype: DType) -> Self {
        // Every path rounds the rotated K (and may round turned queries) to 16-bit inputs' dtype.
        let ((atol, rtol), lse_atol) = (super::rotated_tolerance(dtype), super::rotated_lse_tolerance(dtype));
        let min_margin = match path {
            PinePath::Cpu | PinePath::Emulated => 1e-5,
            PinePath::Gpu => 1e-4,
        };
        Self {
            atol,
            rtol,
            lse_atol,
            min_margin,
        }
    }
}

/// Compares `got` `[B, lq, H, D]` and `lse` `[B, H, lq]` (any device) with rows `[L - lq, L)` of
/// the oracle, leaving out near-tie groups. Panics with `what` and the place on a mismatch;
/// returns (rows compared, rows left out).
pub fn compare_with_oracle(
    got: &Tensor,
    lse: &Tensor,
    want: &PineReferenceOutput,
    lq: usize,
    tol: PineTolerance,
    what: &str,
) -> Result<(usize, usize)> {
    let got = got.to_device(&Device::Cpu)?;
    let lse = lse.to_device(&Device::Cpu)?;
    let (_, l, _, _) = want.out.dims4()?;
    let margin = want.margin.to_vec3::<f64>()?;
    let (mut compared, mut skipped) = (0, 0);
    for (b, margin_b) in margin.iter().enumerate() {
        for (h, margin_h) in margin_b.iter().enumerate() {
            for i in 0..lq {
                let t = l - lq + i;
                if margin_h[t] < tol.min_margin {
                    skipped += 1;
                    continue;
                }
                compared += 1;
                let (r, at) = worst_ratio(&got.i((b, i, h))?, &want.out.i((b, t, h))?, tol.atol, tol.rtol)?;
                assert!(
                    r <= 1.0,
                    "{what}: b {b} row {t} head {h}: output off by {r} x tolerance at {at}"
                );
                let (r, _) = worst_ratio(&lse.i((b, h, i))?, &want.lse.i((b, h, t))?, tol.lse_atol, 0.0)?;
                assert!(r <= 1.0, "{what}: b {b} row {t} head {h}: lse off by {r} x tolerance");
            }
        }
    }
    Ok((compared, skipped))
}

/// The oracle's first `len` rows (a prefill of the prompt when the oracle also ran generated
/// tokens, which the prompt's rows never see).
pub fn prompt_rows(want: &PineReferenceOutput, len: usize) -> Result<PineReferenceOutput> {
    Ok(PineReferenceOutput {
        out: want.out.narrow(1, 0, len)?,
        lse: want.lse.narrow(2, 0, len)?,
        shifts: want.shifts.narrow(2, 0, len)?,
        margin: want.margin.narrow(2, 0, len)?,
    })
}
