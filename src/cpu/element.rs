//! The input element types of the CPU path and their conversion to f32.

use half::{bf16, f16};

/// How an [`Element`] is stored (for the vector loads of [`widen8`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Storage {
    F32,
    F16,
    BF16,
}

/// An attention input element: f32, f16 or bf16, computed in f32.
pub(crate) trait Element: Copy + Send + Sync + 'static {
    const STORAGE: Storage;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const STORAGE: Storage = Storage::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for f16 {
    const STORAGE: Storage = Storage::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Element for bf16 {
    const STORAGE: Storage = Storage::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// Whether the running CPU has what [`widen8`] needs (AVX2 and F16C; std caches the detection),
/// and the vector paths are not switched off by [`PORTABLE_ENV`]. Every `_avx2` path of the CPU
/// kernels is behind this check (directly or through `fma_available`).
#[inline]
pub(crate) fn widen8_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !portable_only() && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Set to `1` to run the CPU kernels' portable code (as on a CPU without AVX2, FMA and F16C, or
/// not x86) on any CPU: the tests run once this way so that the path other machines take is
/// tested here too. Read once per process.
pub(crate) const PORTABLE_ENV: &str = "SEGATTN_CPU_PORTABLE";

/// Whether [`PORTABLE_ENV`] is set to `1`. The attention's backward also takes its
/// device-generic path on the CPU then (`crate::backward`).
pub(crate) fn portable_only() -> bool {
    static PORTABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PORTABLE.get_or_init(|| std::env::var(PORTABLE_ENV).is_ok_and(|v| v == "1"))
}

/// The 8 elements at `src` as f32 in one AVX register: f32 loaded, f16 through F16C, bf16 by
/// shifting its bits up (all exact; a signalling bf16 NaN stays a NaN, un-quieted, where
/// `bf16::to_f32` quiets it). The scalar `to_f32` per element ran as SSE code at ~1/4 the rate
/// and was a third of a CPU decode step (converting V).
///
/// # Safety
/// `src` must be valid for reading 8 elements, and the CPU must have AVX2 and F16C
/// ([`widen8_available`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
pub(crate) unsafe fn widen8<T: Element>(src: *const T) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY (all three): 8 elements readable at `src` (the caller's contract), unaligned loads.
    match T::STORAGE {
        Storage::F32 => unsafe { _mm256_loadu_ps(src.cast()) },
        Storage::F16 => unsafe { _mm256_cvtph_ps(_mm_loadu_si128(src.cast())) },
        Storage::BF16 => unsafe {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(src.cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
        },
    }
}

/// Whether the CPU loops may take their AVX-512 builds ([`widen16`]): the CPU has AVX-512F and VL
/// (with AVX2, FMA and F16C: [`widen8_available`]) and neither [`PORTABLE_ENV`] nor
/// [`NO_AVX512_ENV`] is set.
#[inline]
pub(crate) fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // Decided once per process: the decode loops ask per pair of keys.
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            let off = std::env::var(NO_AVX512_ENV).is_ok_and(|v| v == "1");
            !off && widen8_available()
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Set to `1` to keep the CPU kernels on their AVX2 builds where the CPU also has AVX-512 (the
/// tests run once this way, so that both builds are tested on an AVX-512 machine).
pub(crate) const NO_AVX512_ENV: &str = "SEGATTN_CPU_NO_AVX512";

/// [`widen8`] for 16 elements in one AVX-512 register.
///
/// # Safety
/// `src` must be valid for reading 16 elements, and the CPU must have AVX-512F
/// ([`avx512_available`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn widen16<T: Element>(src: *const T) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY (all three): 16 elements readable at `src` (the caller's contract), unaligned loads.
    match T::STORAGE {
        Storage::F32 => unsafe { _mm512_loadu_ps(src.cast()) },
        Storage::F16 => unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(src.cast())) },
        Storage::BF16 => unsafe {
            let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(src.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
        },
    }
}

/// `dst[i] = src[i] as f32` (same lengths), 8 at a time where the CPU has AVX2 and F16C.
#[inline]
pub(crate) fn widen_into<T: Element>(dst: &mut [f32], src: &[T]) {
    assert_eq!(dst.len(), src.len(), "widen_into: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if widen8_available() {
        // SAFETY: the CPU has AVX2 and F16C (checked just above).
        unsafe { widen_into_avx2(dst, src) };
        return;
    }
    for (d, x) in dst.iter_mut().zip(src) {
        *d = x.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn widen_into_avx2<T: Element>(dst: &mut [f32], src: &[T]) {
    use std::arch::x86_64::*;
    let full = src.len() / 8 * 8;
    for i in (0..full).step_by(8) {
        // SAFETY: i + 8 <= len for both slices (equal lengths, asserted by the caller).
        unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add(i), widen8(src.as_ptr().add(i))) };
    }
    for (d, x) in dst[full..].iter_mut().zip(&src[full..]) {
        *d = x.to_f32();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every finite, infinite and subnormal f16 / bf16 bit pattern (NaNs: still NaN) widens to
    /// what the scalar `to_f32` gives, at lengths with and without a tail.
    #[test]
    fn widen_into_is_to_f32() {
        fn check<T: Element>(from_bits: impl Fn(u16) -> T) {
            let all: Vec<T> = (0..=u16::MAX).map(&from_bits).collect();
            for len in [all.len(), 13, 8, 7, 0] {
                let src = &all[all.len() - len..];
                let mut got = vec![f32::NAN; len];
                widen_into(&mut got, src);
                for (x, g) in src.iter().zip(&got) {
                    let want = x.to_f32();
                    assert!(
                        want.to_bits() == g.to_bits() || (want.is_nan() && g.is_nan()),
                        "{want} vs {g}"
                    );
                }
            }
        }
        check(half::f16::from_bits);
        check(half::bf16::from_bits);
        let f: Vec<f32> = (0..37).map(|i| i as f32 * -1.25e-3).collect();
        let mut got = vec![0f32; f.len()];
        widen_into(&mut got, &f);
        assert_eq!(got, f);
    }

    /// `SEGATTN_CPU_PORTABLE=1` switches every vector path off, `SEGATTN_CPU_NO_AVX512=1` the
    /// AVX-512 ones, bf16 pairs included (CI runs the tests each way).
    #[test]
    fn the_isa_switches_are_honoured() {
        if std::env::var(PORTABLE_ENV).is_ok_and(|v| v == "1") {
            assert!(!widen8_available() && !crate::cpu::fma_available() && !avx512_available());
        }
        if std::env::var(NO_AVX512_ENV).is_ok_and(|v| v == "1") {
            assert!(!avx512_available());
        }
        // The bf16 pair loops go with the AVX-512 build (and have their own switch).
        if !avx512_available() || std::env::var(super::super::bf16_pairs::NO_AVX512BF16_ENV).is_ok_and(|v| v == "1") {
            assert!(!super::super::bf16_pairs::available());
        }
    }

    /// Every f16 / bf16 bit pattern (NaNs: still NaN) widens 16 at a time in AVX-512 to what the
    /// scalar `to_f32` gives; f32 loads unchanged.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn widen16_is_to_f32() {
        if !avx512_available() {
            return;
        }
        #[target_feature(enable = "avx512f")]
        fn wide<T: Element>(src: &[T]) -> Vec<f32> {
            src.chunks_exact(16)
                .flat_map(|c| {
                    let mut out = [0f32; 16];
                    // SAFETY: 16 elements at c, the CPU has AVX-512F (checked by the caller).
                    unsafe { std::arch::x86_64::_mm512_storeu_ps(out.as_mut_ptr(), widen16(c.as_ptr())) };
                    out
                })
                .collect()
        }
        fn check<T: Element>(from_bits: impl Fn(u16) -> T) {
            let all: Vec<T> = (0..=u16::MAX).map(&from_bits).collect();
            // SAFETY: the CPU has AVX-512F (checked above).
            let got = unsafe { wide(&all) };
            for (x, g) in all.iter().zip(&got) {
                let want = x.to_f32();
                assert!(
                    want.to_bits() == g.to_bits() || (want.is_nan() && g.is_nan()),
                    "{want} vs {g}"
                );
            }
        }
        check(half::f16::from_bits);
        check(half::bf16::from_bits);
        let f: Vec<f32> = (0..32).map(|i| i as f32 * -1.25e-3).collect();
        // SAFETY: as above.
        assert_eq!(unsafe { wide(&f) }, f);
    }
}
