//! Tile loads shared by the CPU kernels.

#[cfg(target_arch = "x86_64")]
use super::element::widen8;
use super::element::Element;
use super::tile::{TileRows, BC};

/// Writes rows `row(0..cols)` (`d` elements each) transposed into `kt` `[dp, BC]` (K^T of a key
/// tile), in 8 x 8 blocks: 8 contiguous reads per row and 8 contiguous writes per column instead
/// of one scattered store per element; the blocks are transposed in AVX registers where the CPU
/// has AVX2.
#[inline]
pub(crate) fn transpose_rows<'a, T: Element>(kt: &mut [f32], cols: usize, d: usize, row: impl Fn(usize) -> &'a [T]) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::element::widen8_available() {
            // SAFETY: the CPU has AVX2 and F16C (checked just above; std caches the detection).
            unsafe { transpose_rows_avx2(kt, cols, d, row) };
            return;
        }
    }
    transpose_rows_generic(kt, cols, d, row)
}

/// The 8 values `r[c0..c0 + 8]` as f32.
#[inline(always)]
fn eight<T: Element>(r: &[T], c0: usize) -> [f32; 8] {
    let src: &[T; 8] = r[c0..c0 + 8].try_into().unwrap();
    std::array::from_fn(|c| src[c].to_f32())
}

/// The scalar tail: keys `[j0, cols)` (all dims) and dims `[c0, d)` of keys `[0, j0)`.
#[inline(always)]
fn tails<'a, T: Element>(
    kt: &mut [f32],
    cols: usize,
    d: usize,
    j_full: usize,
    c_full: usize,
    row: &impl Fn(usize) -> &'a [T],
) {
    for j in 0..j_full {
        let r = row(j);
        for c in c_full..d {
            kt[c * BC + j] = r[c].to_f32();
        }
    }
    for j in j_full..cols {
        for (c, x) in row(j).iter().enumerate() {
            kt[c * BC + j] = x.to_f32();
        }
    }
}

#[inline(always)]
fn transpose_rows_generic<'a, T: Element>(kt: &mut [f32], cols: usize, d: usize, row: impl Fn(usize) -> &'a [T]) {
    const B: usize = 8;
    let (j_full, c_full) = (cols / B * B, d / B * B);
    for j0 in (0..j_full).step_by(B) {
        let rows: [&[T]; B] = std::array::from_fn(|l| row(j0 + l));
        for c0 in (0..c_full).step_by(B) {
            let block: [[f32; B]; B] = std::array::from_fn(|l| eight(rows[l], c0));
            for c in 0..B {
                let col: [f32; B] = std::array::from_fn(|l| block[l][c]);
                kt[(c0 + c) * BC + j0..(c0 + c) * BC + j0 + B].copy_from_slice(&col);
            }
        }
    }
    tails(kt, cols, d, j_full, c_full, &row);
}

/// [`transpose_rows_generic`] with each 8 x 8 block widened ([`widen8`]) and transposed in
/// registers (unpack, shuffle and 128-bit lane permutes: 24 shuffles per 64 values).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn transpose_rows_avx2<'a, T: Element>(kt: &mut [f32], cols: usize, d: usize, row: impl Fn(usize) -> &'a [T]) {
    use std::arch::x86_64::*;
    const B: usize = 8;
    let (j_full, c_full) = (cols / B * B, d / B * B);
    assert!(kt.len() >= d * BC && cols <= BC, "K^T tile buffer too small");
    for j0 in (0..j_full).step_by(B) {
        let rows: [&[T]; B] = std::array::from_fn(|l| row(j0 + l));
        for c0 in (0..c_full).step_by(B) {
            let v: [__m256; B] = std::array::from_fn(|l| {
                let x = &rows[l][c0..c0 + 8];
                // SAFETY: `x` holds 8 elements; the CPU has AVX2 and F16C (this function's features).
                unsafe { widen8(x.as_ptr()) }
            });
            // SAFETY: AVX2 (this function's features).
            let cols_out = unsafe { transpose8x8(v) };
            for (c, col) in cols_out.iter().enumerate() {
                let at = (c0 + c) * BC + j0;
                // SAFETY: c0 + c < d and j0 + 8 <= cols <= BC, so at + 8 <= d * BC <= kt.len() (asserted).
                unsafe { _mm256_storeu_ps(kt.as_mut_ptr().add(at), *col) };
            }
        }
    }
    tails(kt, cols, d, j_full, c_full, &row);
}

/// The 8 x 8 transpose of the rows `v` (unpack, shuffle and 128-bit lane permutes: 24 shuffles
/// per 64 values; bit patterns kept as they are).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn transpose8x8(v: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    let t0 = _mm256_unpacklo_ps(v[0], v[1]);
    let t1 = _mm256_unpackhi_ps(v[0], v[1]);
    let t2 = _mm256_unpacklo_ps(v[2], v[3]);
    let t3 = _mm256_unpackhi_ps(v[2], v[3]);
    let t4 = _mm256_unpacklo_ps(v[4], v[5]);
    let t5 = _mm256_unpackhi_ps(v[4], v[5]);
    let t6 = _mm256_unpacklo_ps(v[6], v[7]);
    let t7 = _mm256_unpackhi_ps(v[6], v[7]);
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ]
}

/// Loads `rows` query rows as f32 times `scale` into `dst` (row stride `dp`; padding untouched).
#[inline(always)]
pub(crate) fn load_scaled_rows<'a, T: Element>(
    dst: &mut [f32],
    dp: usize,
    rows: usize,
    row: impl Fn(usize) -> &'a [T],
    scale: f32,
) {
    for r in 0..rows {
        let src = row(r);
        for (d, x) in dst[r * dp..r * dp + src.len()].iter_mut().zip(src) {
            *d = x.to_f32() * scale;
        }
    }
}

/// Asks for every cache line of `row` into L1 (a hint: never faults, no effect on results).
#[inline(always)]
pub(crate) fn prefetch_l1<T>(row: &[T]) {
    #[cfg(target_arch = "x86_64")]
    prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }, T>(row);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// Asks for every cache line of `row` into L2 (a hint: never faults, no effect on results).
#[inline(always)]
pub(crate) fn prefetch_l2<T>(row: &[T]) {
    #[cfg(target_arch = "x86_64")]
    prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }, T>(row);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch<const HINT: i32, T>(row: &[T]) {
    for off in (0..std::mem::size_of_val(row)).step_by(64) {
        // SAFETY: prefetch never faults; the address is inside `row`.
        unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(row.as_ptr().cast::<i8>().add(off)) };
    }
}

/// A decode tile's prefetch: as S reads the tile's key `j`, key `j` of two other row sets (the K
/// and V rows some keys further on) is asked for into L2 (both viewed as bytes: K and V may
/// differ in type).
#[derive(Clone, Copy)]
pub(crate) struct RowPrefetch<'a> {
    k: RowBytes<'a>,
    v: RowBytes<'a>,
    /// Rows `j < count` lie inside the cache (the rest of the tile has none to ask for).
    count: usize,
}

/// One input's rows as bytes: row `j` at `first + j * stride`, `len` bytes.
#[derive(Clone, Copy)]
struct RowBytes<'a> {
    data: &'a [u8],
    first: usize,
    stride: usize,
    len: usize,
}

impl<'a> RowBytes<'a> {
    fn of<T: Element>(rows: TileRows<'a, T>) -> Self {
        let (data, first, stride, d) = rows.parts();
        let size = std::mem::size_of::<T>();
        // SAFETY: the elements (f32, f16, bf16) are plain data without padding: any of their
        // bytes may be read as u8, and the view covers exactly the slice's bytes.
        let data = unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) };
        Self {
            data,
            first: first * size,
            stride: stride * size,
            len: d * size,
        }
    }

    #[inline(always)]
    fn ask(&self, j: usize) {
        let at = self.first + j * self.stride;
        prefetch_l2(&self.data[at..at + self.len]);
    }
}

impl<'a> RowPrefetch<'a> {
    /// Row `j` of `k` and of `v` asked for as the tile's key `j` is read, for `j < count` (rows
    /// inside the cache).
    pub fn new<K: Element, V: Element>(k: TileRows<'a, K>, v: TileRows<'a, V>, count: usize) -> Self {
        Self {
            k: RowBytes::of(k),
            v: RowBytes::of(v),
            count,
        }
    }

    #[inline(always)]
    pub(crate) fn ask(&self, j: usize) {
        if j < self.count {
            self.k.ask(j);
            self.v.ask(j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both versions transpose exactly, ragged edges included.
    #[test]
    fn transposes_exactly() {
        for (cols, d) in [(64, 64), (64, 128), (37, 72), (5, 3), (64, 17), (1, 256), (0, 8)] {
            let rows: Vec<Vec<f32>> = (0..cols)
                .map(|j| (0..d).map(|c| (j * 1000 + c) as f32).collect())
                .collect();
            let mut want = vec![-1f32; d * BC];
            for j in 0..cols {
                for c in 0..d {
                    want[c * BC + j] = rows[j][c];
                }
            }
            let mut got = vec![-1f32; d * BC];
            transpose_rows_generic(&mut got, cols, d, |j| &rows[j][..]);
            assert_eq!(got, want, "generic cols {cols} d {d}");
            let mut got = vec![-1f32; d * BC];
            transpose_rows(&mut got, cols, d, |j| &rows[j][..]);
            assert_eq!(got, want, "dispatched cols {cols} d {d}");
        }
    }
}
