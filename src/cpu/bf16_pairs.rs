//! The tile loops of bf16 inputs on CPUs with AVX-512 BF16 (`vdpbf16ps`: 16 lanes, each adding
//! the products of one pair of bf16 values to an f32 sum): twice the multiply-adds per instruction
//! of the f32 loops of `tile.rs`, and tiles half as large (pairs are moved as 32-bit words, not
//! widened first).
//!
//! - S = Q K^T: a product of two bf16 values is exact in f32, so S differs from the f32 loops only
//!   in the order and grouping of its f32 additions (two roundings per pair of dims instead of
//!   one per dim), as any other summation order would. Q is kept in its input bits, unscaled, and
//!   the scale is applied to each S value once at the end (the f32 loops scale Q first). PINE's
//!   queries, turned to their positions in f32, are rounded to bf16 first ([`round_into_pairs`]).
//! - O += P V: P is rounded to bf16, as the GPU kernels round it for the tensor cores, and V is
//!   read as pairs of keys; sums in f32. The softmax's row sums (and the per-segment mass) use
//!   the f32 P.
//!
//! The instruction flushes denormal inputs to zero (values below ~1e-38).
//!
//! Layouts (words are `u32`: element `2p` in the low half, `2p + 1` in the high half, as stored):
//! Q pairs `[BR, dp / 2]` (row r, pair p), K^T pairs `[dp / 2, BC]` (pair p, key j), V pairs
//! `[BC / 2, dp]` (keys 2i and 2i + 1, column c); zero-padded (odd D or an odd number of keys:
//! the last pair's high half is zero).

use super::element::{Element, Storage};
use super::tile::{BC, LANES, ROWS};

/// Set to `1` to keep bf16 inputs on the f32 loops where the CPU has AVX-512 BF16 (for A/B runs;
/// `SEGATTN_CPU_NO_AVX512=1` and `SEGATTN_CPU_PORTABLE=1` switch these loops off too).
pub(crate) const NO_AVX512BF16_ENV: &str = "SEGATTN_CPU_NO_AVX512BF16";

/// Whether S of bf16 inputs takes these loops: the CPU has AVX-512 BF16 besides the AVX-512 build
/// of the other loops ([`super::element::avx512_available`]), and [`NO_AVX512BF16_ENV`] is not
/// set. Decided once per process.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            let off = std::env::var(NO_AVX512BF16_ENV).is_ok_and(|v| v == "1");
            !off && super::element::avx512_available() && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether an op on elements `T` (queries) and `K` (keys) takes these loops.
pub(crate) fn applies<T: Element, K: Element>() -> bool {
    T::STORAGE == Storage::BF16 && K::STORAGE == Storage::BF16 && available()
}

/// The raw bits of a bf16 row.
#[inline(always)]
fn bits<T: Element>(row: &[T]) -> &[u16] {
    assert!(T::STORAGE == Storage::BF16, "bf16 pairs of a non-bf16 row");
    // SAFETY: T is half::bf16 (checked above), a transparent wrapper of u16: same size and
    // alignment, every bit pattern valid.
    unsafe { std::slice::from_raw_parts(row.as_ptr().cast::<u16>(), row.len()) }
}

/// The word of pair `p` of `row` (`d` elements): elements 2p and 2p + 1 (zero past `d`).
#[inline(always)]
fn pair(row: &[u16], p: usize) -> u32 {
    let lo = row[2 * p] as u32;
    let hi = row.get(2 * p + 1).map_or(0, |&x| x as u32);
    lo | (hi << 16)
}

/// A query tile, a key tile and a value tile as bf16 pairs, per thread, reused across tiles.
pub(crate) struct PairTiles {
    /// Words per row of Q (and rows of K^T): `dp / 2`.
    half: usize,
    q: Vec<u32>,
    kt: Vec<u32>,
    /// V as pairs of keys (`[BC / 2, dp]`, [`pair_value_rows`]).
    vp: Vec<u32>,
}

impl PairTiles {
    /// Buffers for tiles of `br` query rows and head dim padded to `dp` (a multiple of [`LANES`]).
    pub fn new(br: usize, dp: usize) -> Self {
        Self {
            vp: vec![0; BC / 2 * dp],
            ..Self::scores_only(br, dp)
        }
    }

    /// [`PairTiles::new`] without the value tile, for S alone (the standalone mass).
    pub fn scores_only(br: usize, dp: usize) -> Self {
        let half = dp / 2;
        Self {
            half,
            q: vec![0; br * half],
            kt: vec![0; half * BC],
            vp: Vec::new(),
        }
    }

    /// Query rows `row(0..rows)` (`d` elements each, unscaled) as pairs; the rows up to the next
    /// multiple of [`ROWS`] zeroed.
    pub fn load_queries<'a, T: Element>(&mut self, rows: usize, d: usize, row: impl Fn(usize) -> &'a [T]) {
        let half = self.half;
        self.q[..rows.div_ceil(ROWS) * ROWS * half].fill(0);
        for r in 0..rows {
            let src = bits(&row(r)[..d]);
            let dst = &mut self.q[r * half..(r + 1) * half];
            for (w, two) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *w = two[0] as u32 | (two[1] as u32) << 16;
            }
            if d % 2 == 1 {
                dst[d / 2] = pair(src, d / 2);
            }
        }
    }

    /// Keys `row(0..cols)` (`d` elements each) as this tile's K^T pairs ([`transpose_key_pairs`]).
    pub fn load_keys<'a, T: Element>(&mut self, cols: usize, d: usize, row: impl Fn(usize) -> &'a [T]) {
        transpose_key_pairs(&mut self.kt, cols, d, row);
    }

    /// Query rows already in f32 (`rows` of `src`, `dp` apart: PINE's queries turned to their
    /// positions, scaled) as pairs, each value rounded to bf16 ([`round_into_pairs`]); S then
    /// takes scale 1.
    pub fn round_queries(&mut self, src: &[f32], rows: usize, dp: usize) {
        round_into_pairs(&mut self.q[..rows * self.half], &src[..rows * dp]);
    }

    /// Values `row(0..cols)` (`d` elements each) as this tile's key pairs ([`pair_value_rows`]);
    /// not for tiles made by [`PairTiles::scores_only`].
    pub fn load_values<'a, T: Element>(&mut self, cols: usize, d: usize, row: impl Fn(usize) -> &'a [T]) {
        let dp = 2 * self.half;
        pair_value_rows(&mut self.vp, cols, d, dp, row);
    }

    /// This tile's values as key pairs (`[BC / 2, dp]`).
    pub fn values(&self) -> &[u32] {
        &self.vp
    }

    /// The query tile's pairs (`[BR, dp / 2]`).
    pub fn queries(&self) -> &[u32] {
        &self.q
    }

    /// This tile's K^T pairs (`[dp / 2, BC]`).
    pub fn keys(&self) -> &[u32] {
        &self.kt
    }
}

/// `src` (an even number of f32, a multiple of 32) rounded to bf16 (to nearest, ties to even, as
/// the tensor cores' inputs are), consecutive values paired into the words of `dst`: the layout of
/// a row of bf16 read as words. One rounding of each value: the queries PINE turns in f32.
pub(crate) fn round_into_pairs(dst: &mut [u32], src: &[f32]) {
    assert!(src.len() == 2 * dst.len() && src.len().is_multiple_of(2 * LANES));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F and BF16 (`available()`, the condition for using pairs); lengths asserted.
    unsafe {
        round_avx512bf16(dst, src)
    };
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("bf16 pairs are x86_64 only");
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_avx512bf16(dst: &mut [u32], src: &[f32]) {
    use std::arch::x86_64::*;
    for (words, values) in dst.chunks_exact_mut(LANES).zip(src.chunks_exact(2 * LANES)) {
        // SAFETY: 32 floats read, 16 words written (chunk lengths); unaligned loads and stores.
        unsafe {
            let lo = _mm512_loadu_ps(values.as_ptr());
            let hi = _mm512_loadu_ps(values.as_ptr().add(LANES));
            // The second operand's 16 values go to the low half: memory order kept.
            let both = _mm512_cvtne2ps_pbh(hi, lo);
            _mm512_storeu_si512(
                words.as_mut_ptr().cast(),
                std::mem::transmute::<__m512bh, __m512i>(both),
            );
        }
    }
}

/// Values `row(0..cols)` (`d` elements each) paired by keys into `vp` (`[BC / 2, dp]`): word
/// `(j / 2, c)` holds element `c` of values `j` (low half) and `j + 1` (high half), the layout in
/// which P V takes two keys per multiply-add. Zero past `cols` keys and `d` dims.
pub(crate) fn pair_value_rows<'a, T: Element>(
    vp: &mut [u32],
    cols: usize,
    d: usize,
    dp: usize,
    row: impl Fn(usize) -> &'a [T],
) {
    vp.fill(0);
    for jp in 0..cols.div_ceil(2) {
        let lo = bits(&row(2 * jp)[..d]);
        let words = &mut vp[jp * dp..jp * dp + d];
        if 2 * jp + 1 < cols {
            let hi = bits(&row(2 * jp + 1)[..d]);
            for ((w, &a), &b) in words.iter_mut().zip(lo).zip(hi) {
                *w = a as u32 | (b as u32) << 16;
            }
        } else {
            for (w, &a) in words.iter_mut().zip(lo) {
                *w = a as u32;
            }
        }
    }
}

/// O[r, :] += sum_j P[r, j] V[j, :] over the first `cols` keys, for the first
/// `row_blocks * ROWS` rows: P (f32, `[rows, BC]`, zero past `cols`) rounded to bf16 (as the GPU
/// kernels feed it to the tensor cores), V as key pairs (`[BC / 2, dp]`, [`pair_value_rows`]),
/// sums in f32.
pub(crate) fn accumulate_pv_pairs(p: &[f32], vp: &[u32], o: &mut [f32], dp: usize, row_blocks: usize, cols: usize) {
    assert!(dp.is_multiple_of(LANES) && cols <= BC);
    assert!(row_blocks * ROWS * BC <= p.len() && BC / 2 * dp <= vp.len() && row_blocks * ROWS * dp <= o.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX-512F and BF16 (`available()`, the condition for using pairs); the
    // bounds are asserted above.
    unsafe {
        pv_avx512bf16(p, vp, o, dp, row_blocks, cols)
    };
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("bf16 pairs are x86_64 only");
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pv_avx512bf16(p: &[f32], vp: &[u32], o: &mut [f32], dp: usize, row_blocks: usize, cols: usize) {
    use std::arch::x86_64::*;
    let pairs = cols.div_ceil(2);
    let as_bh = |x: __m512i| unsafe { std::mem::transmute::<__m512i, __m512bh>(x) };
    for rb in 0..row_blocks {
        let r0 = rb * ROWS;
        // The block's rows of P as pairs of keys (P is zero past `cols`: an odd last key pairs
        // with a zero).
        let mut pw = [[0u32; BC / 2]; ROWS];
        for (rr, words) in pw.iter_mut().enumerate() {
            round_into_pairs(words, &p[(r0 + rr) * BC..(r0 + rr + 1) * BC]);
        }
        let mut c = 0;
        while c < dp {
            let wide = c + 2 * LANES <= dp;
            let at = |rr: usize| (r0 + rr) * dp + c;
            // SAFETY (loads and stores of o and vp): rows < row_blocks * ROWS of o, columns
            // c .. c + 16 (or 32 when `wide`) <= dp; rows jp < BC / 2 of vp (asserted lengths).
            let mut acc: [[__m512; 2]; ROWS] = std::array::from_fn(|rr| {
                let x = o[at(rr)..].as_ptr();
                unsafe {
                    [
                        _mm512_loadu_ps(x),
                        if wide {
                            _mm512_loadu_ps(x.add(LANES))
                        } else {
                            _mm512_setzero_ps()
                        },
                    ]
                }
            });
            for jp in 0..pairs {
                let v = vp[jp * dp + c..].as_ptr();
                let v0 = as_bh(unsafe { _mm512_loadu_si512(v.cast()) });
                let v1 = if wide {
                    as_bh(unsafe { _mm512_loadu_si512(v.add(LANES).cast()) })
                } else {
                    v0
                };
                for (acc_row, words) in acc.iter_mut().zip(&pw) {
                    let pj = as_bh(_mm512_set1_epi32(words[jp] as i32));
                    acc_row[0] = _mm512_dpbf16_ps(acc_row[0], pj, v0);
                    if wide {
                        acc_row[1] = _mm512_dpbf16_ps(acc_row[1], pj, v1);
                    }
                }
            }
            for (rr, a) in acc.iter().enumerate() {
                let x = o[at(rr)..].as_mut_ptr();
                unsafe {
                    _mm512_storeu_ps(x, a[0]);
                    if wide {
                        _mm512_storeu_ps(x.add(LANES), a[1]);
                    }
                }
            }
            c += if wide { 2 * LANES } else { LANES };
        }
    }
}

/// Keys `row(0..cols)` (`d` elements each) as K^T pairs into `kt` (`[dp / 2, BC]`); the columns
/// past `cols` and the dims past `d` zeroed.
pub(crate) fn transpose_key_pairs<'a, T: Element>(
    kt: &mut [u32],
    cols: usize,
    d: usize,
    row: impl Fn(usize) -> &'a [T],
) {
    let pairs = d.div_ceil(2);
    if cols < BC {
        kt.fill(0);
    } else {
        kt[pairs * BC..].fill(0); // the padding dims (none where 16 divides D)
    }
    // Blocks of 8 keys x 8 pairs (16 elements) moved whole; the rest word by word.
    let (j_full, p_full) = (cols / 8 * 8, d / 16 * 8);
    #[cfg(target_arch = "x86_64")]
    for j0 in (0..j_full).step_by(8) {
        let rows: [&[u16]; 8] = std::array::from_fn(|l| bits(&row(j0 + l)[..d]));
        for p0 in (0..p_full).step_by(8) {
            // SAFETY: `available()` (the caller's condition for using pairs) checked AVX2; each
            // row holds d >= 2 (p0 + 8) elements; the block's words are inside kt ((p0 + 8) * BC
            // <= pairs * BC, j0 + 8 <= BC; transpose_block asserts its slice's length).
            unsafe { transpose_block(&rows, p0, &mut kt[p0 * BC + j0..]) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let (j_full, p_full) = (0, 0);
    for j in 0..cols {
        let src = bits(&row(j)[..d]);
        let from = if j < j_full { p_full } else { 0 };
        for p in from..pairs {
            kt[p * BC + j] = pair(src, p);
        }
    }
}

/// The inputs of S as bf16 pairs: query pairs `q` (`[rows, half]`), K^T pairs `kt`
/// (`[half, BC]`), and the factor S takes (the softmax scale for queries kept in their input bits,
/// 1 for queries scaled before their rounding to pairs).
#[derive(Clone, Copy)]
pub(crate) struct PairScores<'a> {
    pub q: &'a [u32],
    pub kt: &'a [u32],
    pub half: usize,
    pub scale: f32,
}

impl PairScores<'_> {
    /// S[r, j] = scale * sum_d Q[r, d] K[j, d] for the first `row_blocks * ROWS` rows and the
    /// columns `[c_begin, c_end)` (multiples of [`LANES`]), as `tile::scores` does on f32 tiles.
    pub fn scores(&self, s: &mut [f32], row_blocks: usize, (c_begin, c_end): (usize, usize)) {
        let Self { q, kt, half, scale } = *self;
        assert!(
            c_begin % LANES == 0 && c_end % LANES == 0 && c_end <= BC,
            "bf16 pair scores: columns {c_begin}..{c_end} not whole blocks of {LANES}"
        );
        assert!(row_blocks * ROWS * half <= q.len() && half * BC <= kt.len() && row_blocks * ROWS * BC <= s.len());
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F and BF16 (`available()`, the condition for using pairs);
        // the bounds are asserted above.
        unsafe {
            scores_avx512bf16(q, kt, s, half, row_blocks, (c_begin, c_end), scale)
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("bf16 pairs are x86_64 only");
    }
}

/// Words `[p0, p0 + 8)` of 8 rows, transposed into `dst[p * BC + l]` (p < 8, l < 8).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose_block(rows: &[&[u16]; 8], p0: usize, dst: &mut [u32]) {
    use std::arch::x86_64::*;
    assert!(dst.len() > 7 * BC + 7);
    let v: [__m256; 8] = std::array::from_fn(|l| {
        let x = &rows[l][2 * p0..2 * p0 + 16];
        // SAFETY: `x` holds 16 bf16 = 32 bytes; unaligned load.
        unsafe { _mm256_castsi256_ps(_mm256_loadu_si256(x.as_ptr().cast())) }
    });
    // SAFETY: AVX2 (this function's feature).
    let t = unsafe { super::load::transpose8x8(v) };
    for (p, col) in t.iter().enumerate() {
        // SAFETY: p * BC + 8 <= dst.len() (asserted); unaligned store of 8 words, bits as loaded.
        unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add(p * BC).cast(), *col) };
    }
}

/// The kernel of [`PairScores::scores`]: blocks of [`ROWS`] rows x 32 columns (8 accumulators,
/// one K^T load per 4 multiply-adds), then a 16-column block where the range ends there.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn scores_avx512bf16(
    q: &[u32],
    kt: &[u32],
    s: &mut [f32],
    half: usize,
    row_blocks: usize,
    (c_begin, c_end): (usize, usize),
    scale: f32,
) {
    use std::arch::x86_64::*;
    // SAFETY (the loads and stores below): rows r < row_blocks * ROWS of q (half words each) and
    // of s (BC each), columns < c_end <= BC of kt's `half` rows: the caller asserted the lengths.
    let word = |p: *const u32| unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast())) };
    let splat = |w: u32| unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(w as i32)) };
    let scale = _mm512_set1_ps(scale);
    for rb in 0..row_blocks {
        let r0 = rb * ROWS;
        let qrows: [&[u32]; ROWS] = std::array::from_fn(|rr| &q[(r0 + rr) * half..(r0 + rr + 1) * half]);
        let mut c0 = c_begin;
        while c0 + 2 * LANES <= c_end {
            let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
            for p in 0..half {
                let k = kt[p * BC..].as_ptr();
                // SAFETY: see above (c0 + 32 <= BC).
                let (k0, k1) = unsafe { (word(k.add(c0)), word(k.add(c0 + LANES))) };
                for (acc_row, qrow) in acc.iter_mut().zip(&qrows) {
                    let qv = splat(qrow[p]);
                    acc_row[0] = _mm512_dpbf16_ps(acc_row[0], qv, k0);
                    acc_row[1] = _mm512_dpbf16_ps(acc_row[1], qv, k1);
                }
            }
            for (rr, acc_row) in acc.iter().enumerate() {
                let out = s[(r0 + rr) * BC + c0..].as_mut_ptr();
                // SAFETY: see above.
                unsafe {
                    _mm512_storeu_ps(out, _mm512_mul_ps(acc_row[0], scale));
                    _mm512_storeu_ps(out.add(LANES), _mm512_mul_ps(acc_row[1], scale));
                }
            }
            c0 += 2 * LANES;
        }
        if c0 < c_end {
            let mut acc = [_mm512_setzero_ps(); ROWS];
            for p in 0..half {
                // SAFETY: see above (c0 + 16 <= c_end <= BC).
                let k0 = unsafe { word(kt[p * BC..].as_ptr().add(c0)) };
                for (acc_row, qrow) in acc.iter_mut().zip(&qrows) {
                    *acc_row = _mm512_dpbf16_ps(*acc_row, splat(qrow[p]), k0);
                }
            }
            for (rr, acc_row) in acc.iter().enumerate() {
                // SAFETY: see above.
                unsafe { _mm512_storeu_ps(s[(r0 + rr) * BC + c0..].as_mut_ptr(), _mm512_mul_ps(*acc_row, scale)) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// S from the pairs equals the f64 sum of the same products (up to f32 rounding of the sums),
    /// for ragged tiles, odd D and column ranges that end on a 16-column block.
    #[test]
    fn pair_scores_match_the_products() {
        if !available() {
            return; // the CPU has no AVX-512 BF16 (or it is switched off): nothing to test here
        }
        let mut seed = 0x9e37_79b9_u32;
        let mut draw = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            bf16::from_f32((seed % 2001) as f32 / 500.0 - 2.0 + 0.001)
        };
        for (rows, cols, d, c_range) in [
            (64usize, 64usize, 128usize, (0usize, 64usize)),
            (5, 37, 72, (0, 48)),
            (3, 64, 7, (16, 64)),
            (64, 9, 64, (0, 16)),
        ] {
            let dp = d.div_ceil(LANES) * LANES;
            let q: Vec<Vec<bf16>> = (0..rows).map(|_| (0..d).map(|_| draw()).collect()).collect();
            let k: Vec<Vec<bf16>> = (0..cols).map(|_| (0..d).map(|_| draw()).collect()).collect();
            let mut tiles = PairTiles::new(64, dp);
            tiles.kt.fill(u32::MAX); // stale words: load_keys must zero the padding columns
            tiles.load_queries(rows, d, |r| &q[r][..]);
            tiles.load_keys(cols, d, |j| &k[j][..]);
            let mut s = vec![f32::NAN; 64 * BC];
            let scale = 0.37;
            let pairs = PairScores {
                q: tiles.queries(),
                kt: tiles.keys(),
                half: dp / 2,
                scale,
            };
            pairs.scores(&mut s, rows.div_ceil(ROWS), c_range);
            for r in 0..rows {
                for j in c_range.0..c_range.1 {
                    let products: Vec<f64> = match k.get(j) {
                        Some(kj) => (0..d)
                            .map(|c| q[r][c].to_f64() * kj[c].to_f64() * scale as f64)
                            .collect(),
                        None => Vec::new(),
                    };
                    let want: f64 = products.iter().sum();
                    let size: f64 = products.iter().map(|x| x.abs()).sum();
                    let got = s[r * BC + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-6 * size,
                        "rows {rows} cols {cols} d {d}: S[{r}, {j}] = {got}, want {want}"
                    );
                }
            }
        }
    }

    /// The rounding of turned queries and of P: to nearest bf16, ties to even, as `half` rounds
    /// (normal values; the instruction flushes denormals).
    #[test]
    fn rounding_matches_half() {
        if !available() {
            return;
        }
        let src: Vec<f32> = (0..256).map(|i| ((i as f32) * 0.7311).sin() * 3.0 + 1e-3).collect();
        let mut words = vec![0u32; 128];
        round_into_pairs(&mut words, &src);
        for (i, x) in src.iter().enumerate() {
            let got = (words[i / 2] >> (16 * (i % 2))) as u16;
            assert_eq!(got, bf16::from_f32(*x).to_bits(), "value {i}: {x}");
        }
    }
}
