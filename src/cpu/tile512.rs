//! The f32 register blocks of `tile.rs` (S = Q K^T and O += P V on prefill tiles) in AVX-512
//! builds: 4 rows x 64 columns, four zmm registers a row (16 accumulators), and 32 or 16 columns
//! for a rest (D of 80, 96, 112, ...).
//!
//! `tile.rs` blocks 4 rows x [`LANES`] (16) columns, written once for every build and vectorised
//! by the compiler: 8 ymm accumulators in the AVX2 build, but only 4 zmm in the AVX-512 one. A
//! fused multiply-add takes 4 cycles, and a core with two 512-bit FMA units needs 8 of them in
//! flight: 4 x 32 columns (8 accumulators, NOTES CPU 17) kept one unit busy, 4 x 64 (16) feed
//! both and load fewer operands per FMA (4 of K or V and 4 broadcasts per 16, against 2 and 4
//! per 8). Each output element still sums its products in the same order with the same fused
//! multiply-adds, so the results are bitwise those of `tile.rs`.

use super::tile::{BC, LANES, ROWS};

/// Whether the tile loops take these blocks (the AVX-512 build, `element::avx512_available`).
#[inline(always)]
pub(crate) fn available() -> bool {
    super::element::avx512_available()
}

/// `tile::scores` in AVX-512 blocks: S[r, j] = sum_d Q[r, d] K^T[d, j] for the first
/// `row_blocks * ROWS` rows and the columns `[c_begin, c_end)` (multiples of [`LANES`]).
pub(crate) fn scores(q: &[f32], kt: &[f32], s: &mut [f32], dp: usize, row_blocks: usize, cols: (usize, usize)) {
    assert!(cols.0.is_multiple_of(LANES) && cols.1.is_multiple_of(LANES) && cols.1 <= BC);
    assert!(row_blocks * ROWS * dp <= q.len() && dp * BC <= kt.len() && row_blocks * ROWS * BC <= s.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F (`available()`, the caller's condition); the bounds are asserted above.
    unsafe {
        scores_avx512(q, kt, s, dp, row_blocks, cols)
    };
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AVX-512 tiles on a non-x86 build");
}

/// `tile::accumulate_pv` in AVX-512 blocks: O[r, :] += sum_j P[r, j] V[j, :] over the first
/// `cols` keys, for the first `row_blocks * ROWS` rows.
pub(crate) fn accumulate_pv(p: &[f32], v: &[f32], o: &mut [f32], dp: usize, row_blocks: usize, cols: usize) {
    assert!(dp.is_multiple_of(LANES) && cols <= BC);
    assert!(row_blocks * ROWS * BC <= p.len() && cols * dp <= v.len() && row_blocks * ROWS * dp <= o.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F (`available()`, the caller's condition); the bounds are asserted above.
    unsafe {
        accumulate_pv_avx512(p, v, o, dp, row_blocks, cols)
    };
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AVX-512 tiles on a non-x86 build");
}

/// Two registers (`W` = 2) or one (`W` = 1) of each of [`ROWS`] rows, summing
/// `a[r][k] * b[k][0 .. 16 W]` over `k < n` into `acc` (rows of `a` `a_stride` apart, its
/// elements consecutive in k; rows of `b` `b_stride` apart).
///
/// # Safety
/// AVX-512F; every element read must be in bounds (the callers' asserts).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn block<const W: usize>(
    acc: &mut [[std::arch::x86_64::__m512; W]; ROWS],
    a: *const f32,
    a_stride: usize,
    b: *const f32,
    b_stride: usize,
    n: usize,
) {
    use std::arch::x86_64::*;
    for k in 0..n {
        // SAFETY: in bounds (the caller's contract).
        let bk: [__m512; W] = std::array::from_fn(|w| unsafe { _mm512_loadu_ps(b.add(k * b_stride + w * LANES)) });
        for (r, acc_row) in acc.iter_mut().enumerate() {
            // SAFETY: in bounds (the caller's contract).
            let ak = _mm512_set1_ps(unsafe { *a.add(r * a_stride + k) });
            for w in 0..W {
                acc_row[w] = _mm512_fmadd_ps(ak, bk[w], acc_row[w]);
            }
        }
    }
}

/// The widest block of [`ROWS`] rows that fits the columns `[c, end)`: 4 registers a row (64
/// columns, 16 accumulators: enough independent sums for two FMA units of 4 cycles' latency), 2
/// or 1 for the rest.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn width(c: usize, end: usize) -> usize {
    if c + 4 * LANES <= end {
        4
    } else if c + 2 * LANES <= end {
        2
    } else {
        1
    }
}

/// S's block of `W` registers a row at rows `r0..`, columns `c..`: the sums over the head dim from 0.
///
/// # Safety
/// AVX-512F; rows r0 .. r0 + ROWS of `q` (dp each), dp rows of `kt` and rows r0 .. of `s` at
/// columns c .. c + 16 W <= BC.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn scores_block<const W: usize>(q: *const f32, kt: *const f32, s: *mut f32, dp: usize) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); W]; ROWS];
    // SAFETY: the caller's contract.
    unsafe { block::<W>(&mut acc, q, dp, kt, BC, dp) };
    for (rr, a) in acc.iter().enumerate() {
        for (w, x) in a.iter().enumerate() {
            // SAFETY: row rr of the block, columns < 16 W (the caller's contract).
            unsafe { _mm512_storeu_ps(s.add(rr * BC + w * LANES), *x) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_avx512(q: &[f32], kt: &[f32], s: &mut [f32], dp: usize, row_blocks: usize, (c0, c1): (usize, usize)) {
    for rb in 0..row_blocks {
        let r0 = rb * ROWS;
        let qrows = q[r0 * dp..].as_ptr();
        let mut c = c0;
        while c < c1 {
            let w = width(c, c1);
            // SAFETY: rows r0 .. r0 + 3 of q and s, dp rows of kt, columns c .. c + 16 w <= c1 <= BC
            // (asserted by `scores`).
            unsafe {
                let (kt, out) = (kt[c..].as_ptr(), s.as_mut_ptr().add(r0 * BC + c));
                match w {
                    4 => scores_block::<4>(qrows, kt, out, dp),
                    2 => scores_block::<2>(qrows, kt, out, dp),
                    _ => scores_block::<1>(qrows, kt, out, dp),
                }
            }
            c += w * LANES;
        }
    }
}

/// O's block of `W` registers a row at rows `r0..`, columns `c..`: += P V over the first `cols` keys.
///
/// # Safety
/// AVX-512F; rows r0 .. r0 + ROWS of `p` (BC apart, keys < cols) and of `o` (dp apart) at columns
/// c .. c + 16 W <= dp, rows j < cols of `v`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn pv_block<const W: usize>(p: *const f32, v: *const f32, o: *mut f32, dp: usize, cols: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    let mut acc: [[__m512; W]; ROWS] =
        std::array::from_fn(|rr| std::array::from_fn(|w| unsafe { _mm512_loadu_ps(o.add(rr * dp + w * LANES)) }));
    // SAFETY: the caller's contract.
    unsafe { block::<W>(&mut acc, p, BC, v, dp, cols) };
    for (rr, a) in acc.iter().enumerate() {
        for (w, x) in a.iter().enumerate() {
            // SAFETY: as the loads above.
            unsafe { _mm512_storeu_ps(o.add(rr * dp + w * LANES), *x) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn accumulate_pv_avx512(p: &[f32], v: &[f32], o: &mut [f32], dp: usize, row_blocks: usize, cols: usize) {
    for rb in 0..row_blocks {
        let r0 = rb * ROWS;
        let prows = p[r0 * BC..].as_ptr();
        let mut c = 0;
        while c < dp {
            let w = width(c, dp);
            // SAFETY: rows r0 .. r0 + 3 of p and o, columns c .. c + 16 w <= dp, rows j < cols of v
            // (asserted by `accumulate_pv`).
            unsafe {
                let (v, out) = (v[c..].as_ptr(), o.as_mut_ptr().add(r0 * dp + c));
                match w {
                    4 => pv_block::<4>(prows, v, out, dp, cols),
                    2 => pv_block::<2>(prows, v, out, dp, cols),
                    _ => pv_block::<1>(prows, v, out, dp, cols),
                }
            }
            c += w * LANES;
        }
    }
}
