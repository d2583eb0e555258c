//! The elementwise middle of the attention backward on the CPU, one pass per row: from the raw
//! scaled scores `S` and `dP = dO V^T` of a block of rows, the probabilities and the score
//! gradient
//!
//! ```text
//! P = exp(S + bias - lse)      dS = P (dP - sum_j P_j dP_j + dlse)
//! ```
//!
//! where candle's ops would take seven passes over the block and allocate at each. The same
//! through candle's ops is `softmax_grad_ops` in `crate::backward` (the CUDA path, and the
//! definition this pass is tested against).

use rayon::prelude::*;

use super::exp2::exp2;

/// A block of rows of the backward: row `r` of `s` / `dp` (each `[rows, keys]`, row-major) uses
/// bias row `bias_row(r)` (`[keys]`, 0 visible, `-inf` hidden) and `lse(r)`: its log-sum-exp
/// (`+inf` for a row that sees no key) and the gradient of that LSE (0 when it has none).
pub(crate) struct GradRows<'a, B: Fn(usize) -> &'a [f32] + Sync, L: Fn(usize) -> (f32, f32) + Sync> {
    pub keys: usize,
    pub bias_row: B,
    pub lse: L,
}

impl<'a, B: Fn(usize) -> &'a [f32] + Sync, L: Fn(usize) -> (f32, f32) + Sync> GradRows<'a, B, L> {
    /// `(P, dS)`, each `[rows, keys]` like `s` and `dp`.
    pub fn run(&self, s: &[f32], dp: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let n = self.keys;
        let mut probs = vec![0f32; s.len()];
        let mut ds = vec![0f32; s.len()];
        if n == 0 {
            return (probs, ds);
        }
        // Rows in parallel, a few at a time (a row is one key range of the block: <= Lk floats).
        const ROWS_PER_TASK: usize = 8;
        probs
            .par_chunks_mut(n * ROWS_PER_TASK)
            .zip(ds.par_chunks_mut(n * ROWS_PER_TASK))
            .enumerate()
            .for_each(|(task, (p_rows, ds_rows))| {
                for (k, (p, g)) in p_rows.chunks_exact_mut(n).zip(ds_rows.chunks_exact_mut(n)).enumerate() {
                    let r = task * ROWS_PER_TASK + k;
                    self.row(&s[r * n..][..n], &dp[r * n..][..n], r, p, g);
                }
            });
        (probs, ds)
    }

    fn row(&self, s: &[f32], dp: &[f32], r: usize, p: &mut [f32], ds: &mut [f32]) {
        let (bias, lse) = ((self.bias_row)(r), (self.lse)(r));
        #[cfg(target_arch = "x86_64")]
        if super::fma_available() {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { row_avx2(s, bias, dp, lse, p, ds) };
        }
        row_body(s, bias, dp, lse, p, ds);
    }
}

/// [`row_body`] compiled for AVX2 + FMA (the loops vectorise 8 wide there).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2(s: &[f32], bias: &[f32], dp: &[f32], lse: (f32, f32), p: &mut [f32], ds: &mut [f32]) {
    row_body(s, bias, dp, lse, p, ds);
}

/// One row: `p = exp(s + bias - lse)`, `ds = p (dp - sum p dp + dlse)` for `(lse, dlse)`.
#[inline(always)]
fn row_body(s: &[f32], bias: &[f32], dp: &[f32], (lse, d_lse): (f32, f32), p: &mut [f32], ds: &mut [f32]) {
    for ((p, &s), &b) in p.iter_mut().zip(s).zip(bias) {
        // exp(x) = 2^(x log2 e); -inf (hidden, or a row that sees nothing) gives 0.
        *p = exp2((s + b - lse) * std::f32::consts::LOG2_E);
    }
    // Eight partial sums, so that the loop vectorises.
    let mut part = [0f32; 8];
    let (p8, g8) = (p.chunks_exact(8), dp.chunks_exact(8));
    let tail: f32 = p8.remainder().iter().zip(g8.remainder()).map(|(p, g)| p * g).sum();
    for (p, g) in p8.zip(g8) {
        for l in 0..8 {
            part[l] += p[l] * g[l];
        }
    }
    let centre = part.iter().sum::<f32>() + tail - d_lse;
    for ((ds, &p), &g) in ds.iter_mut().zip(p.iter()).zip(dp) {
        *ds = p * (g - centre);
    }
}
