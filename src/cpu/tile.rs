//! The inner loops of the fused CPU attention, on one (query tile, key tile) pair:
//! S = Q K^T, the online-softmax update and O += P V (the mask of PARTIAL tiles goes on S in
//! between: `segment::mask_tile`).
//!
//! Buffers are f32, row-major, padded with zeros: Q `[BR, dp]`, K^T `[dp, BC]`, V `[BC, dp]`,
//! S/P `[BR, BC]`, O `[BR, dp]`, `dp` = D rounded up to a multiple of [`LANES`]. The loops are
//! register-blocked (`ROWS` rows x `LANES` columns of accumulators) so that the compiler keeps the
//! block in SIMD registers; `FMA` selects fused multiply-add where the CPU has it.

use super::bf16_pairs::PairScores;
use super::exp2::exp2_with;
use super::load::RowPrefetch;
use super::reduce::{lane_max_with, lane_sum_with};

/// Query rows per tile.
pub(crate) const BR: usize = 64;
/// Keys per tile.
pub(crate) const BC: usize = 64;
/// Columns of one accumulator block (two AVX registers of f32).
pub(crate) const LANES: usize = 16;
/// Rows of one accumulator block.
pub(crate) const ROWS: usize = 4;

/// `a b + c`, fused where the build has FMA (`mul_add` outside an FMA build calls libm).
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Per-row running softmax state of one query tile.
pub(crate) struct RowState {
    /// Running max of the scaled scores (log2 domain), `-inf` while the row has seen nothing.
    pub max: [f32; BR],
    /// Running sum of `2^(s - max)`.
    pub sum: [f32; BR],
}

impl RowState {
    pub fn new() -> Self {
        Self {
            max: [f32::NEG_INFINITY; BR],
            sum: [0.0; BR],
        }
    }
}

/// The rest of one key tile's work for a query tile once S is in `s` (scaled into the log2
/// domain, hidden elements already `-inf`: `segment::mask_tile`): the online-softmax update, then
/// O += P V. `rows` and `cols` are the valid rows and keys (the rest is padding).
/// `row_hook(r, alpha, p, sum)` is called after each row's online-softmax update with the factor
/// its accumulators were rescaled by, its unnormalised probabilities `p` (`cols` of them) and their
/// `lane_sum`: other accumulators that must follow O (the per-segment mass) update there; pass
/// `|_, _, _, _| {}` for none.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn attend_scored_tile<const FMA: bool, T: super::Element>(
    s: &mut [f32],
    (values, v): (TileValues<'_, T>, &[f32]),
    o: &mut [f32],
    state: &mut RowState,
    dp: usize,
    rows: usize,
    cols: usize,
    mut row_hook: impl FnMut(usize, f32, &[f32], f32),
) {
    for r in 0..rows {
        let srow = &mut s[r * BC..(r + 1) * BC];
        let (alpha, tile_sum) = softmax_row::<FMA>(
            srow,
            cols,
            &mut state.max[r],
            &mut state.sum[r],
            &mut o[r * dp..(r + 1) * dp],
        );
        row_hook(r, alpha, &srow[..cols], tile_sum);
    }
    match values {
        TileValues::Widened => accumulate_pv::<FMA>(s, v, o, dp, rows.div_ceil(ROWS), cols),
        TileValues::Rows(v_rows) => super::pv_rows::accumulate_pv_rows::<FMA, T>(s, v_rows, o, dp, rows, cols),
        TileValues::Pairs(vp) => super::bf16_pairs::accumulate_pv_pairs(s, vp, o, dp, rows.div_ceil(ROWS), cols),
    }
}

/// S[r, j] = sum_d Q[r, d] K^T[d, j] for the first `row_blocks * ROWS` rows and the columns
/// `[c_begin, c_end)` (multiples of [`LANES`]; `(0, BC)` for the whole tile).
#[inline(always)]
pub(crate) fn scores<const FMA: bool>(
    q: &[f32],
    kt: &[f32],
    s: &mut [f32],
    dp: usize,
    row_blocks: usize,
    (c_begin, c_end): (usize, usize),
) {
    debug_assert!(c_begin % LANES == 0 && c_end % LANES == 0 && c_end <= BC);
    if FMA && super::tile512::available() {
        // 8 accumulators of 16 lanes: the same sums in the same order (`cpu/tile512.rs`).
        return super::tile512::scores(q, kt, s, dp, row_blocks, (c_begin, c_end));
    }
    for rb in 0..row_blocks {
        let r0 = rb * ROWS;
        // Rows and columns sliced once to their exact lengths, so that the inner loop carries no
        // bounds checks.
        let qrows: [&[f32]; ROWS] = std::array::from_fn(|rr| &q[(r0 + rr) * dp..(r0 + rr + 1) * dp]);
        let kt = &kt[..dp * BC];
        for c0 in (c_begin..c_end).step_by(LANES) {
            let mut acc = [[0f32; LANES]; ROWS];
            for (d, krow) in kt.chunks_exact(BC).enumerate() {
                let k: &[f32; LANES] = krow[c0..c0 + LANES].try_into().unwrap();
                for (acc_row, qrow) in acc.iter_mut().zip(&qrows) {
                    let qv = qrow[d];
                    for x in 0..LANES {
                        acc_row[x] = madd::<FMA>(qv, k[x], acc_row[x]);
                    }
                }
            }
            for (rr, acc_row) in acc.iter().enumerate() {
                s[(r0 + rr) * BC + c0..(r0 + rr) * BC + c0 + LANES].copy_from_slice(acc_row);
            }
        }
    }
}

/// The rows of a K or V tile as stored: key `j` of the tile is `D` elements at
/// `first + j * stride` of `data`. A plain struct, not a closure: the decode kernels read a row
/// per key, and a `dyn Fn` per key (a call, the strides reloaded, the index recomputed) cost a
/// decode step ~10% (NOTES CPU 20).
#[derive(Clone, Copy)]
pub(crate) struct TileRows<'a, T> {
    data: &'a [T],
    first: usize,
    stride: usize,
    d: usize,
    /// With it, [`TileRows::read`] also asks for K and V rows further on ([`RowPrefetch`]).
    prefetch: Option<RowPrefetch<'a>>,
}

impl<'a, T: super::Element> TileRows<'a, T> {
    /// Keys `k0..` of (b, head) of `x`, `d` elements each.
    #[inline(always)]
    pub fn of(x: super::Strided<'a, T>, b: usize, k0: usize, head: usize, d: usize) -> Self {
        Self {
            data: x.data,
            first: x.start(b, k0, head),
            stride: x.strides[1],
            d,
            prefetch: None,
        }
    }

    /// These rows, reading which asks for `prefetch`'s rows too.
    pub fn with_prefetch(self, prefetch: RowPrefetch<'a>) -> Self {
        Self {
            prefetch: Some(prefetch),
            ..self
        }
    }

    /// Key `j` of the tile.
    #[inline(always)]
    pub fn row(&self, j: usize) -> &'a [T] {
        let at = self.first + j * self.stride;
        &self.data[at..at + self.d]
    }

    /// Key `j` of the tile, after asking for row `j` of the prefetch's rows (if any).
    #[inline(always)]
    pub fn read(&self, j: usize) -> &'a [T] {
        if let Some(p) = &self.prefetch {
            p.ask(j);
        }
        self.row(j)
    }

    /// The elements per row.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.d
    }

    /// (data, first row, stride, elements per row).
    pub fn parts(&self) -> (&'a [T], usize, usize, usize) {
        (self.data, self.first, self.stride, self.d)
    }
}

/// Where a tile's S reads its keys.
#[derive(Clone, Copy)]
pub(crate) enum TileKeys<'a, T> {
    /// The tile transposed into `kt` (`[dp, BC]`, by `load_kv`): the register-blocked [`scores`].
    Transposed,
    /// The tile's keys as stored ([`TileRows`]): dotted with each query row (`cpu/dots.rs`).
    /// For decode-sized tiles (one block of [`ROWS`] rows, `D == dp`), where transposing 64 keys
    /// cost as much as their S.
    Rows(TileRows<'a, T>),
    /// The query and key tiles as bf16 pairs (`cpu/bf16_pairs.rs`, AVX-512 BF16), with the factor
    /// S takes (the f32 Q of the other variants is scaled already).
    Pairs(PairScores<'a>),
}

/// Where a tile's P V reads its values.
#[derive(Clone, Copy)]
pub(crate) enum TileValues<'a, T> {
    /// The tile widened into `v` (`[BC, dp]`, by `load_kv`): the register-blocked P V.
    Widened,
    /// The tile's values as stored ([`TileRows`]), widened in registers (`cpu/pv_rows.rs`); with
    /// [`TileKeys::Rows`].
    Rows(TileRows<'a, T>),
    /// The tile's values as bf16 pairs of keys (`cpu/bf16_pairs.rs`, `[BC / 2, dp]`), P rounded to
    /// bf16 for them; with [`TileKeys::Pairs`].
    Pairs(&'a [u32]),
}

/// S of the tile's keys `[c_begin, c_end)` for the `rows` query rows of `q`. [`TileKeys::Transposed`]
/// computes the `row_blocks` blocks of [`ROWS`] rows (padding rows of `q` are zero) and the
/// enclosing multiples of [`LANES`] columns, within `s`'s padding; [`TileKeys::Rows`] exactly
/// `rows` x `[c_begin, c_end)`.
#[inline(always)]
pub(crate) fn tile_scores<const FMA: bool, T: super::Element>(
    keys: TileKeys<'_, T>,
    q: &[f32],
    kt: &[f32],
    s: &mut [f32],
    dp: usize,
    (rows, row_blocks): (usize, usize),
    (c_begin, c_end): (usize, usize),
) {
    match keys {
        TileKeys::Transposed => scores::<FMA>(
            q,
            kt,
            s,
            dp,
            row_blocks,
            (c_begin / LANES * LANES, c_end.div_ceil(LANES) * LANES),
        ),
        TileKeys::Rows(k_rows) => super::dots::dots_rows::<FMA, T>(&q[..rows * dp], k_rows, c_begin..c_end, s, BC),
        TileKeys::Pairs(pairs) => pairs.scores(s, row_blocks, (c_begin / LANES * LANES, c_end.div_ceil(LANES) * LANES)),
    }
}

/// Whether a row's softmax sum normalises it: positive where it saw a key, NaN where NaN inputs
/// reached it (kept NaN, [`softmax_row`]); 0 only for a row that saw nothing (output 0, LSE -inf).
#[inline(always)]
pub(crate) fn row_seen(sum: f32) -> bool {
    sum > 0.0 || sum.is_nan()
}

/// What a row's unnormalised output is multiplied by: `1 / sum`, or 0 for a row that saw nothing
/// (a NaN sum stays NaN).
#[inline(always)]
pub(crate) fn row_scale(sum: f32) -> f32 {
    if row_seen(sum) {
        1.0 / sum
    } else {
        0.0
    }
}

/// A row's log-sum-exp (natural log) from its running max (log2 domain) and sum: -inf for a row
/// that saw nothing, NaN where its sum is NaN.
#[inline(always)]
pub(crate) fn row_lse(max: f32, sum: f32) -> f32 {
    if row_seen(sum) {
        (max + sum.log2()) * std::f32::consts::LN_2
    } else {
        f32::NEG_INFINITY
    }
}

/// Online-softmax update of one row: turns the scores into P in place (0 beyond `cols`), and
/// rescales the row's running sum and output accumulator to the new max. Returns the factor the
/// accumulator was rescaled by (1 when the max did not move), for other accumulators that must
/// follow it (the per-segment mass), and the tile's sum of P (`lane_sum` of its `cols` values;
/// 0 when the row sees nothing here).
#[inline(always)]
pub(crate) fn softmax_row<const FMA: bool>(
    srow: &mut [f32],
    cols: usize,
    max: &mut f32,
    sum: &mut f32,
    orow: &mut [f32],
) -> (f32, f32) {
    let tile_max = lane_max_with::<FMA>(&srow[..cols]);
    if tile_max == f32::NEG_INFINITY {
        // The row sees nothing in this tile: it contributes nothing. Unless what it sees scored
        // NaN (a NaN in its query, or in a visible key), which the max passes over: then the
        // row's sum becomes NaN and so does its output, as the reference's softmax would be.
        if srow[..cols].iter().any(|x| x.is_nan()) {
            *sum = f32::NAN;
        }
        srow.fill(0.0);
        return (1.0, 0.0);
    }
    let new_max = max.max(tile_max);
    // Separate loops: the exponentials vectorise, the sum takes independent lanes.
    for x in srow[..cols].iter_mut() {
        *x = exp2_with::<FMA>(*x - new_max);
    }
    let tile_sum = lane_sum_with::<FMA>(&srow[..cols]);
    srow[cols..].fill(0.0);
    let mut alpha = 1.0;
    if *max != new_max {
        alpha = exp2_with::<FMA>(*max - new_max);
        *sum *= alpha;
        orow.iter_mut().for_each(|o| *o *= alpha);
        *max = new_max;
    }
    *sum += tile_sum;
    (alpha, tile_sum)
}

/// O[r, :] += sum_j P[r, j] V[j, :] over the first `cols` keys.
#[inline(always)]
fn accumulate_pv<const FMA: bool>(p: &[f32], v: &[f32], o: &mut [f32], dp: usize, row_blocks: usize, cols: usize) {
    if FMA && super::tile512::available() {
        // 8 accumulators of 16 lanes: the same sums in the same order (`cpu/tile512.rs`).
        return super::tile512::accumulate_pv(p, v, o, dp, row_blocks, cols);
    }
    for rb in 0..row_blocks {
        let r0 = rb * ROWS;
        for c0 in (0..dp).step_by(LANES) {
            let mut acc = [[0f32; LANES]; ROWS];
            for (rr, acc_row) in acc.iter_mut().enumerate() {
                acc_row.copy_from_slice(&o[(r0 + rr) * dp + c0..(r0 + rr) * dp + c0 + LANES]);
            }
            for j in 0..cols {
                let vv: &[f32; LANES] = v[j * dp + c0..j * dp + c0 + LANES].try_into().unwrap();
                for (rr, acc_row) in acc.iter_mut().enumerate() {
                    let pv = p[(r0 + rr) * BC + j];
                    for x in 0..LANES {
                        acc_row[x] = madd::<FMA>(pv, vv[x], acc_row[x]);
                    }
                }
            }
            for (rr, acc_row) in acc.iter().enumerate() {
                o[(r0 + rr) * dp + c0..(r0 + rr) * dp + c0 + LANES].copy_from_slice(acc_row);
            }
        }
    }
}
