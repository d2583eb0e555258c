//! The f32 register blocks of `tile.rs` (S = Q K^T and O += P V on prefill tiles) with 8
//! accumulators in AVX-512 builds: 4 rows x 32 columns, two zmm registers a row.
//!
//! `tile.rs` blocks 4 rows x [`LANES`] (16) columns, written once for every build and vectorised
//! by the compiler: 8 ymm accumulators in the AVX2 build, but only 4 zmm in the AVX-512 one,
//! whose fused multiply-adds take 4 cycles each, so 4 independent sums cannot keep the unit busy.
//! These blocks in intrinsics took 24% off a causal bf16 prefill's f32 loops of that time (NOTES
//! CPU 17; in isolation both explicit forms ran at this VM's one zmm FMA a cycle). Each output
//! element still sums its products in the same order with the same fused multiply-adds, so the
//! results are bitwise those of `tile.rs`. A 16-column rest (D of 80, 112, ...) takes one
//! register a row.

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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_avx512(q: &[f32], kt: &[f32], s: &mut [f32], dp: usize, row_blocks: usize, (c0, c1): (usize, usize)) {
    use std::arch::x86_64::*;
    let s_base = s.as_mut_ptr();
    for rb in 0..row_blocks {
        let r0 = rb * ROWS;
        let qrows = q[r0 * dp..].as_ptr();
        let mut c = c0;
        while c < c1 {
            // SAFETY: row r0 + rr < row_blocks * ROWS of s, column c < BC (asserted by `scores`).
            let out = |rr: usize| unsafe { s_base.add((r0 + rr) * BC + c) };
            if c + 2 * LANES <= c1 {
                let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
                // SAFETY: rows r0.. r0 + 3 of q (dp each), dp rows of kt at columns < c + 32 <= BC.
                unsafe { block::<2>(&mut acc, qrows, dp, kt[c..].as_ptr(), BC, dp) };
                for (rr, a) in acc.iter().enumerate() {
                    // SAFETY: row r0 + rr of s, columns c .. c + 32 <= BC.
                    unsafe {
                        _mm512_storeu_ps(out(rr), a[0]);
                        _mm512_storeu_ps(out(rr).add(LANES), a[1]);
                    }
                }
                c += 2 * LANES;
            } else {
                let mut acc = [[_mm512_setzero_ps(); 1]; ROWS];
                // SAFETY: as above, columns < c + 16 <= c1.
                unsafe { block::<1>(&mut acc, qrows, dp, kt[c..].as_ptr(), BC, dp) };
                for (rr, a) in acc.iter().enumerate() {
                    // SAFETY: row r0 + rr of s, columns c .. c + 16.
                    unsafe { _mm512_storeu_ps(out(rr), a[0]) };
                }
                c += LANES;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn accumulate_pv_avx512(p: &[f32], v: &[f32], o: &mut [f32], dp: usize, row_blocks: usize, cols: usize) {
    use std::arch::x86_64::*;
    for rb in 0..row_blocks {
        let r0 = rb * ROWS;
        let prows = p[r0 * BC..].as_ptr();
        let mut c = 0;
        while c < dp {
            let at = |rr: usize| (r0 + rr) * dp + c;
            if c + 2 * LANES <= dp {
                // SAFETY: rows r0 .. r0 + 3 of o, columns c .. c + 32 <= dp.
                let mut acc: [[__m512; 2]; ROWS] = std::array::from_fn(|rr| {
                    let x = o[at(rr)..].as_ptr();
                    unsafe { [_mm512_loadu_ps(x), _mm512_loadu_ps(x.add(LANES))] }
                });
                // SAFETY: rows of p (BC apart, keys < cols), rows j < cols of v at columns < c + 32.
                unsafe { block::<2>(&mut acc, prows, BC, v[c..].as_ptr(), dp, cols) };
                for (rr, a) in acc.iter().enumerate() {
                    let x = o[at(rr)..].as_mut_ptr();
                    // SAFETY: as the loads above.
                    unsafe {
                        _mm512_storeu_ps(x, a[0]);
                        _mm512_storeu_ps(x.add(LANES), a[1]);
                    }
                }
                c += 2 * LANES;
            } else {
                // SAFETY: rows r0 .. r0 + 3 of o, columns c .. c + 16 <= dp.
                let mut acc: [[__m512; 1]; ROWS] =
                    std::array::from_fn(|rr| [unsafe { _mm512_loadu_ps(o[at(rr)..].as_ptr()) }]);
                // SAFETY: as above, columns < c + 16.
                unsafe { block::<1>(&mut acc, prows, BC, v[c..].as_ptr(), dp, cols) };
                for (rr, a) in acc.iter().enumerate() {
                    // SAFETY: as the loads above.
                    unsafe { _mm512_storeu_ps(o[at(rr)..].as_mut_ptr(), a[0]) };
                }
                c += LANES;
            }
        }
    }
}
