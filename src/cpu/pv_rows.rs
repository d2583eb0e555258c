//! O += P V for decode-sized tiles (one block of [`ROWS`] query rows) with V read from its rows as
//! stored (f32, f16 or bf16) and widened in registers: no f32 copy of the V tile, which cost a
//! sixth of a decode step.

#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512, Lanes};
use super::tile::{madd, TileRows, BC, ROWS};
use super::Element;

/// `O[r, :] += sum_{j < cols} P[r, j] V[j, :]` for the first `rows` (at most [`ROWS`]) rows of `o`
/// (rows of `dp`) and `p` (rows of [`BC`]), `V[j]` = `v_rows.row(j)`. `FMA` (set only inside the
/// callers' AVX2 + FMA + F16C builds, after checking the CPU) takes the register kernel.
#[inline(always)]
pub(crate) fn accumulate_pv_rows<'a, const FMA: bool, T: Element>(
    p: &[f32],
    v_rows: TileRows<'a, T>,
    o: &mut [f32],
    dp: usize,
    rows: usize,
    cols: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if FMA && dp.is_multiple_of(16) {
        if dp.is_multiple_of(32) && super::element::avx512_available() {
            // SAFETY: the CPU has AVX-512F, AVX2, FMA and F16C (checked just above).
            unsafe { accumulate_pv_rows_avx512(p, v_rows, o, dp, rows, cols) };
            return;
        }
        // SAFETY: as in `dots::dots`.
        unsafe { accumulate_pv_rows_avx2(p, v_rows, o, dp, rows, cols) };
        return;
    }
    for j in 0..cols {
        let v = v_rows.row(j);
        for r in 0..rows {
            let pv = p[r * BC + j];
            for (acc, x) in o[r * dp..r * dp + v.len()].iter_mut().zip(v) {
                *acc = madd::<FMA>(pv, x.to_f32(), *acc);
            }
        }
    }
}

/// [`accumulate_pv_rows`] in AVX2 registers ([`pv_rows_simd`]).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `dp` a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn accumulate_pv_rows_avx2<'a, T: Element>(
    p: &[f32],
    v_rows: TileRows<'a, T>,
    o: &mut [f32],
    dp: usize,
    rows: usize,
    cols: usize,
) {
    // SAFETY: this function's features and contract.
    unsafe { pv_rows_simd::<Avx2, T>(p, v_rows, o, dp, rows, cols) }
}

/// [`accumulate_pv_rows`] in AVX-512 registers.
///
/// # Safety
/// The CPU must have AVX-512F, AVX2, FMA and F16C; `dp` a multiple of 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn accumulate_pv_rows_avx512<'a, T: Element>(
    p: &[f32],
    v_rows: TileRows<'a, T>,
    o: &mut [f32],
    dp: usize,
    rows: usize,
    cols: usize,
) {
    // SAFETY: this function's features and contract.
    unsafe { pv_rows_simd::<Avx512, T>(p, v_rows, o, dp, rows, cols) }
}

/// [`accumulate_pv_rows`] in registers `V`, the row count made a constant so that the
/// accumulators stay in registers.
///
/// # Safety
/// `V`'s CPU features; `dp` a multiple of `2 V::LANES`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn pv_rows_simd<'a, V: Lanes, T: Element>(
    p: &[f32],
    v_rows: TileRows<'a, T>,
    o: &mut [f32],
    dp: usize,
    rows: usize,
    cols: usize,
) {
    // SAFETY (each): the caller's features and contract.
    unsafe {
        match rows {
            1 => pv_block::<V, T, 1>(p, v_rows, o, dp, cols),
            2 => pv_block::<V, T, 2>(p, v_rows, o, dp, cols),
            3 => pv_block::<V, T, 3>(p, v_rows, o, dp, cols),
            _ => pv_block::<V, T, ROWS>(p, v_rows, o, dp, cols),
        }
    }
}

/// [`pv_rows_simd`] for `R` rows: per `2 LANES` columns, `2 R` accumulators over the keys, each
/// O element's multiply-adds key by key (so that the AVX2 and AVX-512 builds round the same sums).
///
/// # Safety
/// `V`'s CPU features; `dp` a multiple of `2 V::LANES`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn pv_block<'a, V: Lanes, T: Element, const R: usize>(
    p: &[f32],
    v_rows: TileRows<'a, T>,
    o: &mut [f32],
    dp: usize,
    cols: usize,
) {
    let lanes = V::LANES;
    assert!(
        R <= ROWS && dp.is_multiple_of(2 * lanes) && cols <= BC && o.len() >= R * dp && p.len() >= R * BC,
        "accumulate_pv_rows: shapes"
    );
    let mut rows = [std::ptr::null::<T>(); BC];
    for (j, r) in rows.iter_mut().enumerate().take(cols) {
        let v = v_rows.row(j);
        assert_eq!(v.len(), dp, "accumulate_pv_rows: V row length");
        *r = v.as_ptr();
        // The loop below reads each row 2 LANES columns at a time, all rows per step: ask for
        // every line of the rows now.
        super::load::prefetch_l1(v);
    }
    let op = o.as_mut_ptr();
    for c0 in (0..dp).step_by(2 * lanes) {
        // SAFETY (all): the features are the caller's; r < R and c0 + 2 LANES <= dp, inside `o`
        // (asserted) and inside every V row (dp elements each).
        unsafe {
            let mut acc = [[V::zero(); 2]; R];
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = [V::load(op.add(r * dp + c0)), V::load(op.add(r * dp + c0 + lanes))];
            }
            for (j, &vr) in rows.iter().enumerate().take(cols) {
                let (v0, v1) = (V::widen(vr.add(c0)), V::widen(vr.add(c0 + lanes)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let pv = V::splat(p[r * BC + j]);
                    acc[0] = V::mul_add(pv, v0, acc[0]);
                    acc[1] = V::mul_add(pv, v1, acc[1]);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                acc[0].store(op.add(r * dp + c0));
                acc[1].store(op.add(r * dp + c0 + lanes));
            }
        }
    }
}
