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
//! [`Lanes::sum4`] adds each register exactly as [`Lanes::sum`] does.

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
    #[inline(always)]
    unsafe fn sum4(a: [Self; 4]) -> [f32; 4] {
        // SAFETY: the caller's contract.
        unsafe { [a[0].sum(), a[1].sum(), a[2].sum(), a[3].sum()] }
    }
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
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        _mm512_reduce_add_ps(self.0)
    }
}
