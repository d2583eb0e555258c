//! Dot products of a few f32 query rows with key rows as stored (f32, f16 or bf16): the S of
//! PINE's decode importance (`pine_decode`) and of decode-sized attention tiles (a few query
//! rows against each key, where transposing the key tile to K^T would cost more than the dots).
//!
//! Layout: `qs` is `group` rows of `D` f32, one after another; `k` a key row of `D` elements;
//! the result for query `g` and key index `at` goes to `scores[g * keys + at]`.

#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512, Lanes};
use super::tile::{madd, TileRows};
use super::Element;

/// `scores[g keys + at] = qs_g . k` for each query `qs_g` of `qs` (`group x D`). `FMA` (set only
/// inside the callers' AVX2 + FMA + F16C builds, after checking the CPU) takes the register
/// kernel ([`dots_simd`]).
#[inline(always)]
pub(crate) fn dots<const FMA: bool, T: Element>(qs: &[f32], k: &[T], scores: &mut [f32], keys: usize, at: usize) {
    #[cfg(target_arch = "x86_64")]
    if FMA && k.len().is_multiple_of(8) {
        if k.len().is_multiple_of(16) && super::element::avx512_available() {
            // SAFETY: the CPU has AVX-512F, AVX2, FMA and F16C (checked just above).
            unsafe { dots_avx512::<1, T>(qs, [k], [at], scores, keys) };
            return;
        }
        // SAFETY: `FMA` is only set in functions built for AVX2 + FMA + F16C, called after
        // checking the CPU's features (`super::fma_available`).
        unsafe { dots_avx2::<1, T>(qs, [k], [at], scores, keys) };
        return;
    }
    let d = k.len();
    for (g, q) in qs.chunks_exact(d).enumerate() {
        scores[g * keys + at] = dot::<FMA, T>(q, k);
    }
}

/// [`dots`] for two keys: `scores[g keys + at[x]] = qs_g . k[x]`.
#[inline(always)]
pub(crate) fn dots_pair<const FMA: bool, T: Element>(
    qs: &[f32],
    k: [&[T]; 2],
    at: [usize; 2],
    scores: &mut [f32],
    keys: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if FMA && k[0].len().is_multiple_of(8) {
        if k[0].len().is_multiple_of(16) && super::element::avx512_available() {
            // SAFETY: the CPU has AVX-512F, AVX2, FMA and F16C (checked just above).
            unsafe { dots_avx512::<2, T>(qs, k, at, scores, keys) };
            return;
        }
        // SAFETY: as in `dots`.
        unsafe { dots_avx2::<2, T>(qs, k, at, scores, keys) };
        return;
    }
    for x in 0..2 {
        dots::<FMA, T>(qs, k[x], scores, keys, at[x]);
    }
}

/// [`dots`] / [`dots_pair`] for `K` (1 or 2) keys in AVX2 registers ([`dots_simd`]).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; every key `D` long with `D` a multiple of 8, `qs.len()`
/// a multiple of `D`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dots_avx2<const K: usize, T: Element>(
    qs: &[f32],
    k: [&[T]; K],
    at: [usize; K],
    scores: &mut [f32],
    keys: usize,
) {
    // SAFETY: this function's features and contract.
    unsafe { dots_simd::<Avx2, K, T>(qs, k, at, scores, keys) }
}

/// [`dots_avx2`] in AVX-512 registers.
///
/// # Safety
/// The CPU must have AVX-512F, AVX2, FMA and F16C; every key `D` long with `D` a multiple of 16,
/// `qs.len()` a multiple of `D`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn dots_avx512<const K: usize, T: Element>(
    qs: &[f32],
    k: [&[T]; K],
    at: [usize; K],
    scores: &mut [f32],
    keys: usize,
) {
    // SAFETY: this function's features and contract.
    unsafe { dots_simd::<Avx512, K, T>(qs, k, at, scores, keys) }
}

/// `scores[g keys + at[x]] = qs_g . k[x]` for `K` keys in registers `V`: each `LANES` values of
/// the keys widened straight from the cache rows once and multiplied into four queries at a time
/// (`4 K` accumulators; two keys: 6 loads for 8 multiply-adds per 8 lanes, where one key needs 5
/// for 4), the rest of the queries one at a time. (The same loops written for the auto-vectoriser
/// came out as 4-wide shuffles, ~3x slower.)
///
/// # Safety
/// `V`'s CPU features; every key `D` long with `D` a multiple of `V::LANES`, `qs.len()` a
/// multiple of `D`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn dots_simd<V: Lanes, const K: usize, T: Element>(
    qs: &[f32],
    k: [&[T]; K],
    at: [usize; K],
    scores: &mut [f32],
    keys: usize,
) {
    let d = k[0].len();
    assert!(
        d.is_multiple_of(V::LANES) && k.iter().all(|x| x.len() == d) && qs.len().is_multiple_of(d),
        "dots: lengths"
    );
    let group = qs.len() / d;
    let mut g0 = 0;
    while g0 + 4 <= group {
        // SAFETY: rows g0..g0 + 4 of qs and every key hold d values, d % LANES == 0.
        let sums = unsafe { dots_block::<V, 4, K, T>(&qs[g0 * d..], k) };
        put(scores, keys, g0, at, sums);
        g0 += 4;
    }
    for g in g0..group {
        // SAFETY: as above, for row g.
        let sums = unsafe { dots_block::<V, 1, K, T>(&qs[g * d..], k) };
        put(scores, keys, g, at, sums);
    }
}

/// The `N` (1 or 4) query rows at the start of `qs` dotted with `K` keys: `[key][row]`. `N` and
/// `K` constants so that the accumulators stay in registers.
///
/// # Safety
/// As [`dots_simd`], with at least `N` rows in `qs`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dots_block<V: Lanes, const N: usize, const K: usize, T: Element>(qs: &[f32], k: [&[T]; K]) -> [[f32; N]; K] {
    let d = k[0].len();
    assert!(qs.len() >= N * d, "dots_block: rows");
    let qp = qs.as_ptr();
    // SAFETY (all): the features are the caller's; c + LANES <= d, inside every key and each of
    // the N query rows.
    unsafe {
        let mut acc = [[V::zero(); N]; K];
        for c in (0..d).step_by(V::LANES) {
            let mut kv = [V::zero(); K];
            for (kv, k) in kv.iter_mut().zip(k) {
                *kv = V::widen(k.as_ptr().add(c));
            }
            for r in 0..N {
                let qv = V::load(qp.add(r * d + c));
                for (acc, kv) in acc.iter_mut().zip(kv) {
                    acc[r] = V::mul_add(qv, kv, acc[r]);
                }
            }
        }
        block_sums::<V, N, K>(acc)
    }
}

/// Stores a block's sums (`[key][row]`, rows from query `g0` on): `scores[g keys + at[x]]`.
#[inline(always)]
fn put<const N: usize, const K: usize>(
    scores: &mut [f32],
    keys: usize,
    g0: usize,
    at: [usize; K],
    sums: [[f32; N]; K],
) {
    for (x, sums) in sums.iter().enumerate() {
        for (r, &sum) in sums.iter().enumerate() {
            scores[(g0 + r) * keys + at[x]] = sum;
        }
    }
}

/// The lane sums of a block's `K x N` accumulators: eight at a time for two keys and four rows,
/// four at a time for one key ([`Lanes::sum8`] / [`Lanes::sum4`]: the same order as one at a
/// time, so that a query's score does not depend on how many rows share its tile).
///
/// # Safety
/// `V`'s CPU features.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block_sums<V: Lanes, const N: usize, const K: usize>(acc: [[V; N]; K]) -> [[f32; N]; K] {
    let mut out = [[0f32; N]; K];
    // SAFETY: the caller's features.
    unsafe {
        if N == 4 && K == 2 {
            let (a, b) = (&acc[0], &acc[1]);
            let s = V::sum8([a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]);
            out[0].copy_from_slice(&s[..4]);
            out[1].copy_from_slice(&s[4..]);
        } else if N == 4 {
            for (out, a) in out.iter_mut().zip(acc) {
                out.copy_from_slice(&V::sum4([a[0], a[1], a[2], a[3]]));
            }
        } else {
            for (out, acc) in out.iter_mut().zip(acc) {
                for (out, a) in out.iter_mut().zip(acc) {
                    *out = a.sum();
                }
            }
        }
    }
    out
}

/// [`dots_pair`] of the two keys turned BACK by the angle whose cos / sin are `c` / `s` (rotate-half
/// pairs `j`, `j + D/2`): `scores[g keys + at[x]] = qs_g . rope^-1(k[x])`. PINE's decode importance
/// takes this where a key position holds fewer keys than query heads (the judge prompt: 2 keys, 4
/// heads), so turning the keys is cheaper than turning every query. The turned keys stay in
/// registers: one pass over each key, no stored copy read back.
#[inline(always)]
pub(crate) fn turned_back_dots_pair<const FMA: bool, T: Element>(
    qs: &[f32],
    k: [&[T]; 2],
    (c, s): (&[f32], &[f32]),
    at: [usize; 2],
    scores: &mut [f32],
    keys: usize,
) {
    let half = c.len();
    #[cfg(target_arch = "x86_64")]
    if FMA && half % 8 == 0 {
        if half % 16 == 0 && super::element::avx512_available() {
            // SAFETY: the CPU has AVX-512F, AVX2, FMA and F16C (checked just above).
            unsafe { turned_back_avx512(qs, k, (c, s), at, scores, keys) };
            return;
        }
        // SAFETY: as in `dots`.
        unsafe { turned_back_avx2(qs, k, (c, s), at, scores, keys) };
        return;
    }
    let d = 2 * half;
    for x in 0..2 {
        for (g, q) in qs.chunks_exact(d).enumerate() {
            let mut acc = [0f32; 2];
            for j in 0..half {
                let (x1, x2) = (k[x][j].to_f32(), k[x][j + half].to_f32());
                let lo = madd::<FMA>(x1, c[j], x2 * s[j]);
                let hi = madd::<FMA>(x2, c[j], -(x1 * s[j]));
                acc[0] = madd::<FMA>(q[j], lo, acc[0]);
                acc[1] = madd::<FMA>(q[j + half], hi, acc[1]);
            }
            scores[g * keys + at[x]] = acc[0] + acc[1];
        }
    }
}

/// [`turned_back_dots_pair`] in AVX2 registers ([`turned_back_simd`]).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `c.len() == s.len()` a multiple of 8, both keys of twice
/// that length, `qs.len()` a multiple of it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn turned_back_avx2<T: Element>(
    qs: &[f32],
    k: [&[T]; 2],
    cs: (&[f32], &[f32]),
    at: [usize; 2],
    scores: &mut [f32],
    keys: usize,
) {
    // SAFETY: this function's features and contract.
    unsafe { turned_back_simd::<Avx2, T>(qs, k, cs, at, scores, keys) }
}

/// [`turned_back_avx2`] in AVX-512 registers.
///
/// # Safety
/// The CPU must have AVX-512F, AVX2, FMA and F16C; `c.len() == s.len()` a multiple of 16, both
/// keys of twice that length, `qs.len()` a multiple of it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn turned_back_avx512<T: Element>(
    qs: &[f32],
    k: [&[T]; 2],
    cs: (&[f32], &[f32]),
    at: [usize; 2],
    scores: &mut [f32],
    keys: usize,
) {
    // SAFETY: this function's features and contract.
    unsafe { turned_back_simd::<Avx512, T>(qs, k, cs, at, scores, keys) }
}

/// [`turned_back_dots_pair`] in registers `V`: per `LANES` pairs, both keys widened and turned
/// (the cos / sin loaded once for both: they sit at the same position), then four queries at a
/// time multiplied in (8 accumulators; 12 multiply-adds per 14 loads). Query rows past a
/// multiple of four go one at a time, turning the keys again.
///
/// # Safety
/// `V`'s CPU features; `c.len() == s.len()` a multiple of `V::LANES`, both keys of twice that
/// length, `qs.len()` a multiple of it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn turned_back_simd<V: Lanes, T: Element>(
    qs: &[f32],
    k: [&[T]; 2],
    (c, s): (&[f32], &[f32]),
    at: [usize; 2],
    scores: &mut [f32],
    keys: usize,
) {
    let half = c.len();
    let d = 2 * half;
    assert!(
        half.is_multiple_of(V::LANES) && s.len() == half && k[0].len() == d && k[1].len() == d,
        "turned_back_dots_pair: lengths"
    );
    let group = qs.len() / d;
    let mut g0 = 0;
    while g0 + 4 <= group {
        // SAFETY: rows g0..g0 + 4 of qs exist; the rest as this function's contract.
        let sums = unsafe { turned_back_block::<V, 4, T>(&qs[g0 * d..], k, (c, s)) };
        put(scores, keys, g0, at, sums);
        g0 += 4;
    }
    for g in g0..group {
        // SAFETY: as above, for row g.
        let sums = unsafe { turned_back_block::<V, 1, T>(&qs[g * d..], k, (c, s)) };
        put(scores, keys, g, at, sums);
    }
}

/// The `N` (1 or 4) query rows at the start of `qs` dotted with the two turned-back keys:
/// `[key][row]`. `N` a constant so that the accumulators stay in registers.
///
/// # Safety
/// As [`turned_back_simd`], with at least `N` rows in `qs`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn turned_back_block<V: Lanes, const N: usize, T: Element>(
    qs: &[f32],
    k: [&[T]; 2],
    (c, s): (&[f32], &[f32]),
) -> [[f32; N]; 2] {
    let half = c.len();
    let d = 2 * half;
    assert!(qs.len() >= N * d, "turned_back_block: rows");
    let (k0, k1, qp, cp, sp) = (k[0].as_ptr(), k[1].as_ptr(), qs.as_ptr(), c.as_ptr(), s.as_ptr());
    // SAFETY (all): the features are the caller's; j + LANES <= half: both halves of both keys
    // (length d), of the N query rows, and of c and s are in bounds (asserted by the callers and
    // above).
    unsafe {
        let mut acc = [[V::zero(); N]; 2];
        for j in (0..half).step_by(V::LANES) {
            let (cv, sv) = (V::load(cp.add(j)), V::load(sp.add(j)));
            let ((lo0, hi0), (lo1, hi1)) = (
                turn_back::<V, T>(k0.add(j), k0.add(j + half), cv, sv),
                turn_back::<V, T>(k1.add(j), k1.add(j + half), cv, sv),
            );
            let [acc0, acc1] = &mut acc;
            for r in 0..N {
                let row = qp.add(r * d + j);
                let (qlo, qhi) = (V::load(row), V::load(row.add(half)));
                acc0[r] = V::mul_add(qhi, hi0, V::mul_add(qlo, lo0, acc0[r]));
                acc1[r] = V::mul_add(qhi, hi1, V::mul_add(qlo, lo1, acc1[r]));
            }
        }
        block_sums::<V, N, 2>(acc)
    }
}

/// The rotate-half pair `(x1, x2)` at `p1` / `p2` turned back (rope^-1) by the angle of `(c, s)`:
/// `(x1 c + x2 s, x2 c - x1 s)`.
///
/// # Safety
/// `V`'s CPU features; `LANES` elements readable at `p1` and `p2`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn turn_back<V: Lanes, T: Element>(p1: *const T, p2: *const T, c: V, s: V) -> (V, V) {
    // SAFETY: the caller's contract.
    unsafe {
        let (x1, x2) = (V::widen(p1), V::widen(p2));
        (V::mul_add(x1, c, V::mul(x2, s)), V::mul_sub(x2, c, V::mul(x1, s)))
    }
}

/// [`dots`] for the keys `rows.read(j)`, `j` in `range`, at `at = j`: two keys at a time.
#[inline(always)]
pub(crate) fn dots_rows<'a, const FMA: bool, T: Element>(
    qs: &[f32],
    rows: TileRows<'a, T>,
    range: std::ops::Range<usize>,
    scores: &mut [f32],
    keys: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        let d16 = rows.len().is_multiple_of(16);
        if d16 && super::element::avx512_available() {
            // SAFETY: the CPU has AVX-512F, AVX2, FMA and F16C (checked just above).
            unsafe { dots_rows_avx512(qs, rows, range, scores, keys) };
            return;
        }
        // SAFETY: as in `dots`.
        unsafe { dots_rows_avx2(qs, rows, range, scores, keys) };
        return;
    }
    for j in range {
        dots::<FMA, T>(qs, rows.read(j), scores, keys, j);
    }
}

/// [`dots_rows`] as one AVX2 function, so that the pair loop is inlined into it (a call per pair
/// of keys cost ~15% of a decode tile's S).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots_rows_avx2<'a, T: Element>(
    qs: &[f32],
    rows: TileRows<'a, T>,
    range: std::ops::Range<usize>,
    scores: &mut [f32],
    keys: usize,
) {
    let mut j = range.start;
    while j + 2 <= range.end {
        dots_pair::<true, T>(qs, [rows.read(j), rows.read(j + 1)], [j, j + 1], scores, keys);
        j += 2;
    }
    if j < range.end {
        dots::<true, T>(qs, rows.read(j), scores, keys, j);
    }
}

/// [`dots_rows`] in AVX-512 registers, two keys at a time ([`dots_avx512`]; a last odd key alone).
///
/// # Safety
/// The CPU must have AVX-512F, AVX2, FMA and F16C; every key `D` long with `D` a multiple of 16,
/// `qs.len()` a multiple of `D`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn dots_rows_avx512<'a, T: Element>(
    qs: &[f32],
    rows: TileRows<'a, T>,
    range: std::ops::Range<usize>,
    scores: &mut [f32],
    keys: usize,
) {
    let mut j = range.start;
    while j + 2 <= range.end {
        // SAFETY: this function's contract.
        unsafe { dots_avx512::<2, T>(qs, [rows.read(j), rows.read(j + 1)], [j, j + 1], scores, keys) };
        j += 2;
    }
    if j < range.end {
        // SAFETY: as above.
        unsafe { dots_avx512::<1, T>(qs, [rows.read(j)], [j], scores, keys) };
    }
}

/// `a . b` in f32 over 8 independent lanes (vectorises; one chain would not).
#[inline(always)]
fn dot<const FMA: bool, T: Element>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] = madd::<FMA>(x[l], y[l].to_f32(), acc[l]);
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y.to_f32())
        .sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// A small deterministic generator (values in [-1, 1), never 0).
    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let v = ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                if v == 0.0 {
                    0.5
                } else {
                    v
                }
            })
            .collect()
    }

    /// `turned_back_dots_pair` against the key turned back by the inverse rotation and dotted in
    /// f64: every query count 1-9 (blocks of 4 and the rest), D 16 / 64 / 128, f32 and bf16 keys,
    /// the AVX2 path and the portable one.
    #[test]
    fn turned_back_dots_match_f64() {
        for (seed, &d) in [16usize, 64, 128].iter().enumerate() {
            let half = d / 2;
            let angles: Vec<f64> = values(seed as u64 + 7, half).iter().map(|&a| 3.0 * a as f64).collect();
            let c: Vec<f32> = angles.iter().map(|a| a.cos() as f32).collect();
            let s: Vec<f32> = angles.iter().map(|a| a.sin() as f32).collect();
            for group in 1..=9 {
                let qs = values(seed as u64 * 31 + group as u64, group * d);
                let keys32 = [values(100 + group as u64, d), values(200 + group as u64, d)];
                let keys16: Vec<Vec<bf16>> = keys32
                    .iter()
                    .map(|k| k.iter().map(|&x| bf16::from_f32(x)).collect())
                    .collect();
                let want = |k: &[f32], g: usize| -> f64 {
                    let q = &qs[g * d..(g + 1) * d];
                    (0..half)
                        .map(|j| {
                            let (x1, x2) = (k[j] as f64, k[j + half] as f64);
                            let (cj, sj) = (c[j] as f64, s[j] as f64);
                            q[j] as f64 * (x1 * cj + x2 * sj) + q[j + half] as f64 * (x2 * cj - x1 * sj)
                        })
                        .sum()
                };
                let check = |got: &[f32], keys: [&[f32]; 2], what: &str| {
                    for g in 0..group {
                        for x in 0..2 {
                            let (w, v) = (want(keys[x], g), got[g * 2 + x] as f64);
                            assert!(
                                (w - v).abs() <= 1e-5 * (1.0 + w.abs()),
                                "{what} D {d} group {group} g {g} key {x}: {v} vs {w}"
                            );
                        }
                    }
                };
                let wide: [Vec<f32>; 2] = [0, 1].map(|x| keys16[x].iter().map(|v| v.to_f32()).collect());
                for fma in [false, true] {
                    if fma && !crate::cpu::fma_available() {
                        continue;
                    }
                    let mut got = vec![f32::NAN; group * 2];
                    let mut got16 = vec![f32::NAN; group * 2];
                    let (k32, k16) = ([&keys32[0][..], &keys32[1][..]], [&keys16[0][..], &keys16[1][..]]);
                    if fma {
                        // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            pair_avx2_for_test(&qs, k32, k16, (&c, &s), &mut got, &mut got16)
                        };
                    } else {
                        turned_back_dots_pair::<false, f32>(&qs, k32, (&c, &s), [0, 1], &mut got, 2);
                        turned_back_dots_pair::<false, bf16>(&qs, k16, (&c, &s), [0, 1], &mut got16, 2);
                    }
                    check(&got, k32, if fma { "avx2 f32" } else { "portable f32" });
                    check(
                        &got16,
                        [&wide[0], &wide[1]],
                        if fma { "avx2 bf16" } else { "portable bf16" },
                    );
                }
            }
        }
    }

    /// The AVX2 build of `turned_back_dots_pair` (the `FMA` flag is only set inside such builds).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pair_avx2_for_test(
        qs: &[f32],
        k32: [&[f32]; 2],
        k16: [&[bf16]; 2],
        cs: (&[f32], &[f32]),
        got: &mut [f32],
        got16: &mut [f32],
    ) {
        turned_back_dots_pair::<true, f32>(qs, k32, cs, [0, 1], got, 2);
        turned_back_dots_pair::<true, bf16>(qs, k16, cs, [0, 1], got16, 2);
    }
}
