//! Sums and maxima of a row across SIMD lanes, in one fixed order for every build.
//!
//! [`REDUCE_LANES`] independent lanes (one AVX-512 register, two AVX ones): lane `l` takes
//! elements `l, l + 16, l + 32, ...`, then the lanes fold in halves (16 -> 8 -> 4 -> 2 -> 1) and
//! the elements past the last whole 16 are added one by one. A plain `iter().sum()` of f32 is one
//! dependency chain; the same lanes written as arrays ([`lane_sum`]) were vectorised by the
//! compiler across chunks (strided pairs, then a chain of scalar folds), which cost the softmax
//! rows of the standalone mass a fifth of their time (NOTES CPU 19). [`lane_sum_with`] and
//! [`lane_max_with`] are the same orders in AVX registers, for the loops' FMA builds (AVX2 at
//! least): bitwise the array forms.

/// Independent lanes of the reductions.
pub(crate) const REDUCE_LANES: usize = 16;

/// Sum of `x` in the order above.
#[inline(always)]
pub(crate) fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; REDUCE_LANES];
    let mut chunks = x.chunks_exact(REDUCE_LANES);
    for c in &mut chunks {
        for l in 0..REDUCE_LANES {
            acc[l] += c[l];
        }
    }
    let tail = chunks.remainder();
    fold_halves(acc, |a, b| a + b) + tail.iter().sum::<f32>()
}

/// Max of `x` (`-inf` when empty) in the order above (any order gives the same maximum).
#[inline(always)]
pub(crate) fn lane_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; REDUCE_LANES];
    let mut chunks = x.chunks_exact(REDUCE_LANES);
    for c in &mut chunks {
        for l in 0..REDUCE_LANES {
            acc[l] = larger(acc[l], c[l]);
        }
    }
    let tail = chunks.remainder();
    tail.iter().fold(fold_halves(acc, larger), |m, &v| larger(m, v))
}

/// [`lane_sum`], in AVX registers where `FMA` (the caller runs in an AVX2 + FMA build). Not
/// from closures: a closure does not take its function's features, so the intrinsics stay out of
/// line, a call each (the fused mass's row hook ran 20% slower that way).
#[inline(always)]
pub(crate) fn lane_sum_with<const FMA: bool>(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: FMA builds run only where `fma_available()` found AVX2.
        return unsafe { avx::sum(x) };
    }
    lane_sum(x)
}

/// [`lane_max`], in AVX registers where `FMA`.
#[inline(always)]
pub(crate) fn lane_max_with<const FMA: bool>(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: as in `lane_sum_with`.
        return unsafe { avx::max(x) };
    }
    lane_max(x)
}

/// The larger of `a` and `b`, `a` when they compare equal or `b` is NaN.
#[inline(always)]
fn larger(a: f32, b: f32) -> f32 {
    if b > a {
        b
    } else {
        a
    }
}

/// `acc` reduced by `op` in halves: lane `l` with lane `l + 8`, then `l + 4`, `l + 2`, `l + 1`.
#[inline(always)]
fn fold_halves(mut acc: [f32; REDUCE_LANES], op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut width = REDUCE_LANES / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] = op(acc[l], acc[l + width]);
        }
        width /= 2;
    }
    acc[0]
}

/// The reductions in two AVX registers (lanes 0-7 and 8-15).
#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    use super::{larger, REDUCE_LANES};

    /// # Safety
    /// The CPU has AVX.
    #[inline(always)]
    pub(super) unsafe fn sum(x: &[f32]) -> f32 {
        let whole = x.len() / REDUCE_LANES * REDUCE_LANES;
        let p = x.as_ptr();
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i < whole {
            // SAFETY: `i + 16 <= x.len()`.
            unsafe {
                lo = _mm256_add_ps(lo, _mm256_loadu_ps(p.add(i)));
                hi = _mm256_add_ps(hi, _mm256_loadu_ps(p.add(i + 8)));
            }
            i += REDUCE_LANES;
        }
        // SAFETY: the caller's AVX.
        unsafe { fold(lo, hi) + x[whole..].iter().sum::<f32>() }
    }

    /// Lanes 0-7 and 8-15 folded in halves.
    ///
    /// # Safety
    /// The CPU has AVX.
    #[inline(always)]
    unsafe fn fold(lo: __m256, hi: __m256) -> f32 {
        let eight = _mm256_add_ps(lo, hi);
        let four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps::<1>(eight));
        let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
        let one = _mm_add_ss(two, _mm_movehdup_ps(two));
        _mm_cvtss_f32(one)
    }

    /// # Safety
    /// The CPU has AVX.
    #[inline(always)]
    pub(super) unsafe fn max(x: &[f32]) -> f32 {
        let whole = x.len() / REDUCE_LANES * REDUCE_LANES;
        let p = x.as_ptr();
        let (mut lo, mut hi) = (_mm256_set1_ps(f32::NEG_INFINITY), _mm256_set1_ps(f32::NEG_INFINITY));
        let mut i = 0;
        while i < whole {
            // SAFETY: `i + 16 <= x.len()`. `max_ps(a, b)` is `a > b ? a : b`: `larger(b, a)`.
            unsafe {
                lo = _mm256_max_ps(_mm256_loadu_ps(p.add(i)), lo);
                hi = _mm256_max_ps(_mm256_loadu_ps(p.add(i + 8)), hi);
            }
            i += REDUCE_LANES;
        }
        let eight = _mm256_max_ps(hi, lo);
        let four = _mm_max_ps(_mm256_extractf128_ps::<1>(eight), _mm256_castps256_ps128(eight));
        let two = _mm_max_ps(_mm_movehl_ps(four, four), four);
        let one = _mm_max_ss(_mm_movehdup_ps(two), two);
        x[whole..].iter().fold(_mm_cvtss_f32(one), |m, &v| larger(m, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX forms give the array forms' bits, for every length around the lane count.
    #[test]
    fn avx_forms_match_the_array_forms() {
        if !crate::cpu::fma_available() {
            return;
        }
        let mut seed = 0x9e37_79b9_u32;
        for len in 0..80 {
            let x: Vec<f32> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1 << 24) as f32 * 7.0 - 3.5
                })
                .collect();
            assert_eq!(
                lane_sum_with::<true>(&x).to_bits(),
                lane_sum(&x).to_bits(),
                "sum, len {len}"
            );
            assert_eq!(
                lane_max_with::<true>(&x).to_bits(),
                lane_max(&x).to_bits(),
                "max, len {len}"
            );
        }
    }
}
