//! O += P V for decode-sized tiles (one block of [`ROWS`] query rows) with V read from its rows as
//! stored (f32, f16 or bf16) and widened in registers: no f32 copy of the V tile, which cost a
//! sixth of a decode step.

#[cfg(target_arch = "x86_64")]
use super::element::{widen16, widen8};
use super::tile::{madd, BC, ROWS};
use super::Element;

/// `O[r, :] += sum_{j < cols} P[r, j] V[j, :]` for the first `rows` (at most [`ROWS`]) rows of `o`
/// (rows of `dp`) and `p` (rows of [`BC`]), `V[j]` = `row(j)`. `FMA` (set only inside the
/// callers' AVX2 + FMA + F16C builds, after checking the CPU) takes the register kernel.
#[inline(always)]
pub(crate) fn accumulate_pv_rows<'a, const FMA: bool, T: Element>(
    p: &[f32],
    row: &dyn Fn(usize) -> &'a [T],
    o: &mut [f32],
    dp: usize,
    rows: usize,
    cols: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if FMA && dp.is_multiple_of(16) {
        if dp.is_multiple_of(32) && super::element::avx512_available() {
            // SAFETY: the CPU has AVX-512F, AVX2, FMA and F16C (checked just above).
            unsafe { accumulate_pv_rows_avx512(p, row, o, dp, rows, cols) };
            return;
        }
        // SAFETY: as in `dots::dots`.
        unsafe { accumulate_pv_rows_avx2(p, row, o, dp, rows, cols) };
        return;
    }
    for j in 0..cols {
        let v = row(j);
        for r in 0..rows {
            let pv = p[r * BC + j];
            for (acc, x) in o[r * dp..r * dp + v.len()].iter_mut().zip(v) {
                *acc = madd::<FMA>(pv, x.to_f32(), *acc);
            }
        }
    }
}

/// [`accumulate_pv_rows`] in AVX2 registers.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn accumulate_pv_rows_avx2<'a, T: Element>(
    p: &[f32],
    row: &dyn Fn(usize) -> &'a [T],
    o: &mut [f32],
    dp: usize,
    rows: usize,
    cols: usize,
) {
    // The row count as a constant: the accumulators stay in registers.
    // SAFETY (each): this function's features.
    unsafe {
        match rows {
            1 => pv_block::<T, 1>(p, row, o, dp, cols),
            2 => pv_block::<T, 2>(p, row, o, dp, cols),
            3 => pv_block::<T, 3>(p, row, o, dp, cols),
            _ => pv_block::<T, ROWS>(p, row, o, dp, cols),
        }
    }
}

/// [`accumulate_pv_rows_avx2`] for `R` rows: per 16 columns, `2 R` accumulators over the keys.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pv_block<'a, T: Element, const R: usize>(
    p: &[f32],
    row: &dyn Fn(usize) -> &'a [T],
    o: &mut [f32],
    dp: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    assert!(
        R <= ROWS && dp.is_multiple_of(16) && cols <= BC && o.len() >= R * dp && p.len() >= R * BC,
        "accumulate_pv_rows: shapes"
    );
    let mut rows = [std::ptr::null::<T>(); BC];
    for (j, r) in rows.iter_mut().enumerate().take(cols) {
        let v = row(j);
        assert_eq!(v.len(), dp, "accumulate_pv_rows: V row length");
        *r = v.as_ptr();
        // The loop below reads each row 16 columns at a time, all rows per 16 columns: ask for
        // every line of the rows now.
        super::load::prefetch_l1(v);
    }
    let op = o.as_mut_ptr();
    for c0 in (0..dp).step_by(16) {
        // SAFETY (the loads and stores of O): r < R and c0 + 16 <= dp, inside `o` (asserted).
        let mut acc: [[__m256; 2]; R] = std::array::from_fn(|r| unsafe {
            [
                _mm256_loadu_ps(op.add(r * dp + c0)),
                _mm256_loadu_ps(op.add(r * dp + c0 + 8)),
            ]
        });
        for (j, &vr) in rows.iter().enumerate().take(cols) {
            // SAFETY: row j holds dp elements and c0 + 16 <= dp.
            let (v0, v1) = unsafe { (widen8(vr.add(c0)), widen8(vr.add(c0 + 8))) };
            for (r, acc) in acc.iter_mut().enumerate() {
                let pv = _mm256_set1_ps(p[r * BC + j]);
                acc[0] = _mm256_fmadd_ps(pv, v0, acc[0]);
                acc[1] = _mm256_fmadd_ps(pv, v1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: as for the loads.
            unsafe {
                _mm256_storeu_ps(op.add(r * dp + c0), acc[0]);
                _mm256_storeu_ps(op.add(r * dp + c0 + 8), acc[1]);
            }
        }
    }
}

/// [`accumulate_pv_rows`] in AVX-512 registers (32 columns per pass: 2 R accumulators).
///
/// # Safety
/// The CPU must have AVX-512F, AVX2, FMA and F16C; `dp` a multiple of 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn accumulate_pv_rows_avx512<'a, T: Element>(
    p: &[f32],
    row: &dyn Fn(usize) -> &'a [T],
    o: &mut [f32],
    dp: usize,
    rows: usize,
    cols: usize,
) {
    // SAFETY (each): this function's features and contract.
    unsafe {
        match rows {
            1 => pv_block512::<T, 1>(p, row, o, dp, cols),
            2 => pv_block512::<T, 2>(p, row, o, dp, cols),
            3 => pv_block512::<T, 3>(p, row, o, dp, cols),
            _ => pv_block512::<T, ROWS>(p, row, o, dp, cols),
        }
    }
}

/// [`pv_block`] with 16-lane registers: per 32 columns, `2 R` accumulators over the keys. The
/// multiply-adds of each O element come in the same order as in [`pv_block`] (key by key), so
/// the two builds agree to the rounding of the same sums.
///
/// # Safety
/// The CPU must have AVX-512F, AVX2, FMA and F16C; `dp` a multiple of 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn pv_block512<'a, T: Element, const R: usize>(
    p: &[f32],
    row: &dyn Fn(usize) -> &'a [T],
    o: &mut [f32],
    dp: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    assert!(
        R <= ROWS && dp.is_multiple_of(32) && cols <= BC && o.len() >= R * dp && p.len() >= R * BC,
        "accumulate_pv_rows: shapes"
    );
    let mut rows = [std::ptr::null::<T>(); BC];
    for (j, r) in rows.iter_mut().enumerate().take(cols) {
        let v = row(j);
        assert_eq!(v.len(), dp, "accumulate_pv_rows: V row length");
        *r = v.as_ptr();
        super::load::prefetch_l1(v);
    }
    let op = o.as_mut_ptr();
    for c0 in (0..dp).step_by(32) {
        // SAFETY (the loads and stores of O): r < R and c0 + 32 <= dp, inside `o` (asserted).
        let mut acc: [[__m512; 2]; R] = std::array::from_fn(|r| unsafe {
            [
                _mm512_loadu_ps(op.add(r * dp + c0)),
                _mm512_loadu_ps(op.add(r * dp + c0 + 16)),
            ]
        });
        for (j, &vr) in rows.iter().enumerate().take(cols) {
            // SAFETY: row j holds dp elements and c0 + 32 <= dp.
            let (v0, v1) = unsafe { (widen16(vr.add(c0)), widen16(vr.add(c0 + 16))) };
            for (r, acc) in acc.iter_mut().enumerate() {
                let pv = _mm512_set1_ps(p[r * BC + j]);
                acc[0] = _mm512_fmadd_ps(pv, v0, acc[0]);
                acc[1] = _mm512_fmadd_ps(pv, v1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: as for the loads.
            unsafe {
                _mm512_storeu_ps(op.add(r * dp + c0), acc[0]);
                _mm512_storeu_ps(op.add(r * dp + c0 + 16), acc[1]);
            }
        }
    }
}
