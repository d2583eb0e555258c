//! f32 registers of 8 lanes (AVX2) or 16 (AVX-512) behind one trait, so that each decode-sized
//! register kernel (`dots.rs`, `pv_rows.rs`) is written once and built twice: once inside an
//! AVX2 + FMA + F16C function, once inside an AVX-512 one. Every method is `#[inline(always)]`
//! and only ever runs inlined into a function compiled with its features (the callers check the
//! CPU first), where each becomes one or a few instructions. No closures in these kernels: a
//! closure does not take the features of the generic function it is written in, so the
//! intrinsics inside it stay out of line (calls, seen in `nm`).
//!
//! Sums across lanes keep each build's own order: a query's score must not depend on how many
//! rows share its tile (a GQA-packed decode step stays bitwise the unpacked one), so
//! [`Lanes::sum4`] and [`Lanes::sum8`] add each register exactly as [`Lanes::sum`] does.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::element::{widen16, widen8};
use super::Element;

/// One f32 register and the operations the decode kernels need.
///
/// # Safety
/// Every method needs the CPU features of its implementation ([`Avx2`]: AVX2, FMA, F16C;
/// [`Avx512`]: AVX-512F besides), and the pointer methods `LANES` readable / writable elements.
pub(crate) trait Lanes: Copy {
    /// f32 values per register.
    const LANES: usize;
    /// All lanes 0.
    unsafe fn zero() -> Self;
    /// `LANES` f32 from `p` (unaligned).
    unsafe fn load(p: *const f32) -> Self;
    /// Stores the lanes at `p` (unaligned).
    unsafe fn store(self, p: *mut f32);
    /// `x` in every lane.
    unsafe fn splat(x: f32) -> Self;
    /// `LANES` elements from `p` as stored, widened to f32 exactly (`element::widen8` / `widen16`).
    unsafe fn widen<T: Element>(p: *const T) -> Self;
    /// `a b + c`, one rounding.
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self;
    /// `a b - c`, one rounding.
    unsafe fn mul_sub(a: Self, b: Self, c: Self) -> Self;
    /// `a b`.
    unsafe fn mul(a: Self, b: Self) -> Self;
    /// The sum of the lanes.
    unsafe fn sum(self) -> f32;
    /// The sums of four registers, each added as [`Lanes::sum`] adds it.
    unsafe fn sum4(a: [Self; 4]) -> [f32; 4];
    /// The sums of eight registers, each added as [`Lanes::sum`] adds it (a decode tile's two keys
    /// times four query rows: reduced together, the shuffles and adds are shared).
    unsafe fn sum8(a: [Self; 8]) -> [f32; 8];
}

/// 8 lanes in an AVX register.
#[derive(Clone, Copy)]
pub(crate) struct Avx2(__m256);

impl Lanes for Avx2 {
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Self(_mm256_setzero_ps())
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller's contract.
        Self(unsafe { _mm256_loadu_ps(p) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller's contract.
        unsafe { _mm256_storeu_ps(p, self.0) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Self(_mm256_set1_ps(x))
    }
    #[inline(always)]
    unsafe fn widen<T: Element>(p: *const T) -> Self {
        // SAFETY: the caller's contract.
        Self(unsafe { widen8(p) })
    }
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        Self(_mm256_fmadd_ps(a.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn mul_sub(a: Self, b: Self, c: Self) -> Self {
        Self(_mm256_fmsub_ps(a.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        Self(_mm256_mul_ps(a.0, b.0))
    }
    /// Pairs, then pairs of pairs within each 128-bit half, then the two halves: the order of
    /// [`Avx2::sum4`] for each of its registers.
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        let a = self.0;
        let pairs = _mm256_hadd_ps(_mm256_hadd_ps(a, a), _mm256_hadd_ps(a, a));
        _mm_cvtss_f32(_mm_add_ss(
            _mm256_castps256_ps128(pairs),
            _mm256_extractf128_ps::<1>(pairs),
        ))
    }
    /// Four registers reduced together by horizontal adds ([a0 a0 a1 a1 | ...] -> [a0 a1 a2 a3]
    /// per 128-bit half, then the halves added): three adds for four sums.
    #[inline(always)]
    unsafe fn sum4(a: [Self; 4]) -> [f32; 4] {
        let pairs = _mm256_hadd_ps(_mm256_hadd_ps(a[0].0, a[1].0), _mm256_hadd_ps(a[2].0, a[3].0));
        let sums = _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps::<1>(pairs));
        let mut four = [0f32; 4];
        // SAFETY: `four` holds 4 f32.
        unsafe { _mm_storeu_ps(four.as_mut_ptr(), sums) };
        four
    }
    /// [`Avx2::sum4`]'s steps on eight registers: pairs and pairs of pairs by horizontal adds,
    /// then the 128-bit halves of both quartets added in one register.
    #[inline(always)]
    unsafe fn sum8(a: [Self; 8]) -> [f32; 8] {
        let quad = |x: [Self; 4]| _mm256_hadd_ps(_mm256_hadd_ps(x[0].0, x[1].0), _mm256_hadd_ps(x[2].0, x[3].0));
        let (lo, hi) = (quad([a[0], a[1], a[2], a[3]]), quad([a[4], a[5], a[6], a[7]]));
        let sums = _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(lo, hi),
            _mm256_permute2f128_ps::<0x31>(lo, hi),
        );
        let mut eight = [0f32; 8];
        // SAFETY: `eight` holds 8 f32.
        unsafe { _mm256_storeu_ps(eight.as_mut_ptr(), sums) };
        eight
    }
}

/// 16 lanes in an AVX-512 register.
#[derive(Clone, Copy)]
pub(crate) struct Avx512(__m512);

impl Lanes for Avx512 {
    const LANES: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Self(_mm512_setzero_ps())
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller's contract.
        Self(unsafe { _mm512_loadu_ps(p) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller's contract.
        unsafe { _mm512_storeu_ps(p, self.0) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Self(_mm512_set1_ps(x))
    }
    #[inline(always)]
    unsafe fn widen<T: Element>(p: *const T) -> Self {
        // SAFETY: the caller's contract.
        Self(unsafe { widen16(p) })
    }
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        Self(_mm512_fmadd_ps(a.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn mul_sub(a: Self, b: Self, c: Self) -> Self {
        Self(_mm512_fmsub_ps(a.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        Self(_mm512_mul_ps(a.0, b.0))
    }
    /// A tree: lane i + lane i + 8, then + 4, + 2, + 1 (the order [`Avx512::sum8`] keeps).
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        let a = self.0;
        let a = _mm512_add_ps(a, _mm512_shuffle_f32x4::<0b11_10_11_10>(a, a));
        let a = _mm512_add_ps(a, _mm512_shuffle_f32x4::<0b01_01_01_01>(a, a));
        let a = _mm512_add_ps(a, _mm512_shuffle_ps::<0b11_10_11_10>(a, a));
        let a = _mm512_add_ps(a, _mm512_shuffle_ps::<0b01_01_01_01>(a, a));
        _mm512_cvtss_f32(a)
    }
    /// [`Avx512::sum8`] on the four (the duplicated steps are computed once).
    #[inline(always)]
    unsafe fn sum4(a: [Self; 4]) -> [f32; 4] {
        // SAFETY: the caller's contract.
        let s = unsafe { Self::sum8([a[0], a[1], a[2], a[3], a[0], a[1], a[2], a[3]]) };
        [s[0], s[1], s[2], s[3]]
    }
    /// [`Avx512::sum`]'s tree on eight registers at once, each step adding the same lanes for
    /// every register: two registers per step share one add (the 256-bit halves of a pair side
    /// by side), then four (128-bit quarters), then eight (pairs of lanes). ~23 instructions
    /// where eight single sums take ~64.
    #[inline(always)]
    unsafe fn sum8(a: [Self; 8]) -> [f32; 8] {
        // Step 1, per pair (x, y): [x.q0 + x.q2, x.q1 + x.q3, y.q0 + y.q2, y.q1 + y.q3] (quarters).
        let halves = |x: Self, y: Self| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(x.0, y.0),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(x.0, y.0),
            )
        };
        let (h01, h23, h45, h67) = (
            halves(a[0], a[1]),
            halves(a[2], a[3]),
            halves(a[4], a[5]),
            halves(a[6], a[7]),
        );
        // Step 2, per two pairs: quarter r = register r's first two quarters of step 1 added.
        let quarters = |x: __m512, y: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
            )
        };
        let (q0123, q4567) = (quarters(h01, h23), quarters(h45, h67));
        // Step 3: quarter r = [r.0 + r.2, r.1 + r.3, (r + 4).0 + (r + 4).2, (r + 4).1 + (r + 4).3].
        let pairs = _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(q0123, q4567),
            _mm512_shuffle_ps::<0b11_10_11_10>(q0123, q4567),
        );
        // Step 4: lane 4 r + 2 x holds register r + 4 x's sum.
        let sums = _mm512_add_ps(pairs, _mm512_shuffle_ps::<0b10_11_00_01>(pairs, pairs));
        let mut lanes = [0f32; 16];
        // SAFETY: `lanes` holds 16 f32.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), sums) };
        [
            lanes[0], lanes[4], lanes[8], lanes[12], lanes[2], lanes[6], lanes[10], lanes[14],
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Eight registers of values spread over six decades and both signs, so that any change in the
    /// order of the additions changes the bits of some sum.
    fn registers<const L: usize>(seed: u64) -> [[f32; L]; 8] {
        let mut x = seed | 1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let m = ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            m * 10f32.powi((x % 7) as i32 - 3)
        };
        std::array::from_fn(|_| std::array::from_fn(|_| next()))
    }

    /// `sum4` / `sum8` of registers `r` against each register's `sum`, bit for bit.
    ///
    /// # Safety
    /// `V`'s CPU features; `L == V::LANES`.
    #[inline(always)]
    unsafe fn check<V: Lanes, const L: usize>(r: &[[f32; L]; 8], what: &str) -> [f32; 8] {
        // SAFETY: the caller's contract; each row holds L = LANES f32.
        unsafe {
            let v: [V; 8] = std::array::from_fn(|i| V::load(r[i].as_ptr()));
            let one = v.map(|x| x.sum());
            let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&V::sum8(v)), bits(&one), "{what} sum8");
            assert_eq!(bits(&V::sum4([v[4], v[5], v[6], v[7]])), bits(&one[4..]), "{what} sum4");
            one
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn check_avx2(r: &[[f32; 8]; 8]) {
        // SAFETY: this function's features; 8 lanes.
        unsafe { check::<Avx2, 8>(r, "avx2") };
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn check_avx512(r: &[[f32; 16]; 8]) {
        // SAFETY: this function's features; 16 lanes.
        let one = unsafe { check::<Avx512, 16>(r, "avx512") };
        // The tree itself: lane i + lane i + 8, then + 4, + 2, + 1.
        for (reg, &got) in r.iter().zip(&one) {
            let mut lanes = reg.to_vec();
            while lanes.len() > 1 {
                let half = lanes.len() / 2;
                lanes = (0..half).map(|i| lanes[i] + lanes[i + half]).collect();
            }
            assert_eq!(got.to_bits(), lanes[0].to_bits(), "avx512 sum order");
        }
    }

    /// `sum4` and `sum8` give each register's `sum` bit for bit, in both builds.
    #[test]
    fn batched_sums_equal_single_sums() {
        for seed in 1..200u64 {
            if crate::cpu::fma_available() {
                // SAFETY: AVX2, FMA and F16C checked just above.
                unsafe { check_avx2(&registers::<8>(seed)) };
            }
            if crate::cpu::element::avx512_available() {
                // SAFETY: AVX-512F and the rest checked just above.
                unsafe { check_avx512(&registers::<16>(seed)) };
            }
        }
    }
}
