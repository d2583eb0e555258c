//! The per-segment attention mass on the CPU: the standalone op ([`segment_mass`]: Q K^T, the
//! softmax statistics and per-segment sums, no V) and the accumulator that the attention's fused
//! mass output shares with it ([`MassRows`], [`MassSink`]).
//!
//! Work items are (batch, head, query tile) as in the attention. Per item the mass of its rows is
//! built in a `rows x Sk` f32 buffer — never anything of size `Lq x Lk` — by one of two
//! algorithms ([`MassAlgorithm`]):
//! - one pass: the buffer is a set of accumulators rescaled with the running max exactly like the
//!   attention output (the same `softmax_row`), P of each key tile summed per key segment piece
//!   (P times a one-hot segment matrix, as sparse sums: a tile touches at most 64 segments);
//! - two passes: the row max and log-sum-exp first (Q K^T only), then the exact probabilities
//!   `2^(s - lse)` of every key tile added straight into the segments it touches: no rescaling,
//!   whatever `Sk`.
//!
//! `Auto` takes one pass while `Sk <= 32 D` ([`crate::CPU_ONE_PASS_SEGMENTS_PER_DIM`]): the
//! rescaling costs at most `Sk` per row and key tile, and only when the row's max moves; a second
//! pass costs `64 D` per row and tile. A tile row is added per piece (few pieces), as one vector
//! add (single-token segments: consecutive ids) or as a scatter (many short pieces).
//!
//! [`MassSink`] turns each item's rows into the output: direct writes without reduction, f64
//! accumulation under a lock per (batch, output head) slab with a query or head reduction.

use std::sync::Mutex;

use candle_core::Result;
use rayon::prelude::*;

use super::bf16_pairs::{PairScores, PairTiles};
use super::exp2::exp2_with;
use super::kv_tiles::PreparedTiles;
use super::load::{load_scaled_rows, transpose_rows};
use super::reduce::lane_sum;
use super::tile::{row_scale, row_seen, scores, softmax_row, RowState, BC, BR, LANES};
use super::{fma_available, Element, SharedMut, Strided};
use crate::error::try_filled;
use crate::mask::tiles::{classify_tile, piece_visibility, TileClass};
use crate::mask::HostMask;
use crate::scores::{HeadReduction, MassAlgorithm, MassPlan, QueryReduction};
use crate::validate::AttentionShape;

/// Rows of a register block in the `scores` microkernel (tile.rs `ROWS`).
const SCORE_ROWS: usize = 4;

/// One piece of a key tile: key segment id and keys `[a, b)` relative to the tile start.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Piece {
    pub id: u32,
    pub a: usize,
    pub b: usize,
}

/// The key segments of one key tile, and how its probabilities are best added per segment.
#[derive(Clone, Debug, Default)]
pub(crate) struct TilePieces {
    /// The pieces, in key order.
    pub list: Vec<Piece>,
    /// The segment id of every key of the tile (filled only for [`AddMode::Scatter`]).
    ids: Vec<u32>,
    mode: AddMode,
}

/// How [`add_pieces`] adds a tile row into the per-segment accumulators.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum AddMode {
    /// Few pieces: one vectorised sum per piece.
    #[default]
    Sums,
    /// Consecutive ids (single-token segments): `acc[id0 + j] += p[j]`, one vector add.
    Consecutive(u32),
    /// Many short pieces: `acc[id(j)] += p[j]` key by key.
    Scatter,
}

/// Pieces per tile above which a scatter beats per-piece sums.
const SCATTER_PIECES: usize = 12;

/// The key segment pieces of keys `[k0, k1)` of batch row `b`, into `out`.
pub(crate) fn tile_pieces(mask: &HostMask, b: usize, k0: usize, k1: usize, out: &mut TilePieces) {
    out.list.clear();
    let list = &mut out.list;
    mask.kv.row(b).for_each_span(k0, k1, |id, a, e| {
        list.push(Piece {
            id,
            a: a - k0,
            b: e - k0,
        })
    });
    let cols = k1 - k0;
    out.mode = if out.list.len() <= SCATTER_PIECES {
        AddMode::Sums
    } else if out.list.len() == cols && out.list[cols - 1].id - out.list[0].id == (cols - 1) as u32 {
        // Strictly increasing ids over `cols` single keys: exactly id0, id0 + 1, ...
        AddMode::Consecutive(out.list[0].id)
    } else {
        out.ids.clear();
        out.ids.extend_from_slice(&mask.kv.row(b).ids[k0..k1]);
        AddMode::Scatter
    };
}

/// Adds `sum(p[a..b])` of every piece to `acc[id]` (`p` holds the tile's keys).
#[inline(always)]
pub(crate) fn add_pieces(p: &[f32], pieces: &TilePieces, acc: &mut [f32]) {
    match pieces.mode {
        AddMode::Sums => {
            for piece in &pieces.list {
                acc[piece.id as usize] += lane_sum(&p[piece.a..piece.b]);
            }
        }
        AddMode::Consecutive(id0) => {
            let dst = &mut acc[id0 as usize..id0 as usize + pieces.list.len()];
            dst.iter_mut().zip(p).for_each(|(a, x)| *a += x);
        }
        AddMode::Scatter => {
            for (&id, &x) in pieces.ids.iter().zip(p) {
                acc[id as usize] += x;
            }
        }
    }
}

/// [`add_pieces`] of a tile row `p` (its keys) whose `lane_sum` the softmax took already (`sum`):
/// a tile inside one segment (most tiles) adds `sum`, the same sum of the same values that
/// `add_pieces` would compute again.
#[inline(always)]
pub(crate) fn add_row(p: &[f32], sum: f32, pieces: &TilePieces, acc: &mut [f32]) {
    match pieces.list.as_slice() {
        [only] if pieces.mode == AddMode::Sums && only.a == 0 && only.b == p.len() => acc[only.id as usize] += sum,
        _ => add_pieces(p, pieces, acc),
    }
}

/// Sets the hidden scores of a PARTIAL tile to `-inf`, piece pair by piece pair: one rule lookup
/// per (query piece, key piece), then whole row ranges (the per-element rule lookup of the
/// definition, [`crate::mask::tiles::element_visible`], costs more than the tile's Q K^T).
/// `s` is `[BR, BC]`; rows `[q0, q1)`, keys `[k0, k0 + BC)` clipped to `k1`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn mask_tile(
    s: &mut [f32],
    mask: &HostMask,
    b: usize,
    (q0, q1): (usize, usize),
    (k0, k1): (usize, usize),
    k_pieces: &[Piece],
) {
    let table = mask.rule.table_row(b);
    let qs = mask.q.row(b);
    let off = mask.pos_offset;
    qs.for_each_span(q0, q1, |sq, qa, qb| {
        for kp in k_pieces {
            let rule = mask.rule.lookup(table, sq, kp.id);
            let (ka, kb) = (k0 + kp.a, k0 + kp.b);
            match piece_visibility(rule, qa, qb, ka, kb, off) {
                TileClass::Full => {}
                TileClass::Skip => {
                    for i in qa..qb {
                        s[(i - q0) * BC + kp.a..(i - q0) * BC + kp.b].fill(f32::NEG_INFINITY);
                    }
                }
                TileClass::Partial => {
                    // Causal: key j visible iff j <= pos(i).
                    for i in qa..qb {
                        let first_hidden = (i as i64 + off + 1).clamp(ka as i64, kb as i64) as usize;
                        s[(i - q0) * BC + first_hidden - k0..(i - q0) * BC + kp.b].fill(f32::NEG_INFINITY);
                    }
                }
            }
        }
    });
    debug_assert!(k1 - k0 <= BC);
}

/// The per-row mass accumulators of one work item: `[BR, sk]` f32, and the factor each row is
/// multiplied by when it is put into the output (1 / its softmax sum in one pass).
pub(crate) struct MassRows {
    pub sk: usize,
    pub acc: Vec<f32>,
    pub scale: [f32; BR],
}

impl MassRows {
    pub fn new(sk: usize) -> Self {
        Self {
            sk,
            acc: vec![0.0; BR * sk],
            scale: [1.0; BR],
        }
    }

    pub fn clear(&mut self, rows: usize) {
        self.acc[..rows * self.sk].fill(0.0);
        self.scale = [1.0; BR];
    }

    pub fn row_mut(&mut self, r: usize) -> &mut [f32] {
        &mut self.acc[r * self.sk..(r + 1) * self.sk]
    }

    /// Row `r` follows its O accumulator: rescaled by `alpha` (1 when its max did not move), then
    /// `p` (the tile's unnormalised probabilities, `sum` their `lane_sum`) summed per key segment
    /// piece ([`add_row`]).
    #[inline(always)]
    pub fn follow(&mut self, r: usize, alpha: f32, (p, sum): (&[f32], f32), pieces: &TilePieces) {
        let row = self.row_mut(r);
        if alpha != 1.0 {
            row.iter_mut().for_each(|x| *x *= alpha);
        }
        add_row(p, sum, pieces, row);
    }

    /// Every row is to be divided by its softmax sum (rows that saw nothing become 0; a NaN sum,
    /// from NaN inputs, makes the row NaN), when put.
    pub fn normalize(&mut self, state: &RowState, rows: usize) {
        for r in 0..rows {
            let sum = state.sum[r];
            self.scale[r] = row_scale(sum);
        }
    }
}

/// Where work items put their rows of mass, and the final output.
pub(crate) struct MassSink<'a> {
    plan: &'a MassPlan,
    mask: &'a HostMask,
    q_len: usize,
    /// Without reductions: `[B, H, Lq, Sk]` written directly (disjoint rows per item).
    direct: Vec<f32>,
    direct_ptr: SharedMut<f32>,
    /// With a reduction: one `[Lo, Sk]` f64 slab per (batch, output head).
    slabs: Vec<Mutex<Vec<f64>>>,
}

impl<'a> MassSink<'a> {
    /// Fails (instead of aborting) where the output cannot be allocated.
    pub fn new(plan: &'a MassPlan, mask: &'a HostMask, q_len: usize) -> Result<Self> {
        let (b, ho, lo, sk) = plan.out_dims(q_len);
        let reduce = plan.query_reduction != QueryReduction::None || plan.head_reduction != HeadReduction::None;
        let what = "segment mass output";
        let (mut direct, slabs) = if reduce {
            let slabs = (0..b * ho)
                .map(|_| Ok(Mutex::new(try_filled(lo * sk, 0f64, what)?)))
                .collect::<Result<Vec<_>>>()?;
            (Vec::new(), slabs)
        } else {
            // Every element is written by exactly one work item. With debug assertions (tests)
            // poisoned with NaN so that a missed one shows; else zeroed pages, touched only once.
            let fill = if cfg!(debug_assertions) { f32::NAN } else { 0.0 };
            (try_filled(b * ho * lo * sk, fill, what)?, Vec::new())
        };
        let direct_ptr = SharedMut(direct.as_mut_ptr());
        Ok(Self {
            plan,
            mask,
            q_len,
            direct,
            direct_ptr,
            slabs,
        })
    }

    /// Puts the normalised mass `rows` (`[q1 - q0, Sk]`, rows of query head `h`) of batch row `b`.
    ///
    /// # Safety
    /// Without a reduction no other thread may put rows `[q0, q1)` of head `h` of batch `b`.
    pub unsafe fn put(&self, b: usize, h: usize, (q0, q1): (usize, usize), rows: &MassRows) -> Result<()> {
        let plan = self.plan;
        let sk = plan.sk;
        let kw = plan.key_weights(b);
        if self.slabs.is_empty() {
            for r in 0..q1 - q0 {
                let dst = self
                    .direct_ptr
                    .0
                    .add(((b * plan.num_heads + h) * self.q_len + q0 + r) * sk);
                let src = &rows.acc[r * sk..(r + 1) * sk];
                let scale = rows.scale[r];
                for s in 0..sk {
                    *dst.add(s) = src[s] * scale * kw[s];
                }
            }
            return Ok(());
        }
        let ho = if plan.head_reduction == HeadReduction::None {
            h
        } else {
            0
        };
        let mut slab = self.slabs[b * plan.heads_out() + ho]
            .lock()
            .map_err(|_| candle_core::Error::Msg("segattn: mass slab poisoned by a panic".into()))?;
        let qw = plan.query_weights(b);
        let q_ids = self.mask.q.row(b).ids;
        for r in 0..q1 - q0 {
            let i = q0 + r;
            let (row, w) = if plan.query_reduction == QueryReduction::None {
                (i, plan.head_weight)
            } else {
                let id = q_ids[i] as usize;
                (id, plan.head_weight * qw[id])
            };
            let w = w * rows.scale[r];
            if w == 0.0 {
                continue;
            }
            let dst = &mut slab[row * sk..(row + 1) * sk];
            let src = &rows.acc[r * sk..(r + 1) * sk];
            for s in 0..sk {
                dst[s] += f64::from(src[s] * kw[s]) * f64::from(w);
            }
        }
        Ok(())
    }

    /// The output `[B, Ho, Lo, Sk]` f32, contiguous.
    pub fn finish(self) -> Result<Vec<f32>> {
        if self.slabs.is_empty() {
            return Ok(self.direct);
        }
        let (b, ho, lo, sk) = self.plan.out_dims(self.q_len);
        let mut out = Vec::with_capacity(b * ho * lo * sk);
        for slab in self.slabs {
            let slab = slab
                .into_inner()
                .map_err(|_| candle_core::Error::Msg("segattn: mass slab poisoned by a panic".into()))?;
            out.extend(slab.into_iter().map(|x| x as f32));
        }
        Ok(out)
    }
}

/// The standalone mass: q `[B, Lq, H, D]`, k `[B, Lk, Hkv, D]`, output `[B, Ho, Lo, Sk]` f32 as
/// laid out by `plan`. `scale` multiplies `q . k`.
pub(crate) fn segment_mass<T: Element>(
    q: Strided<'_, T>,
    k: Strided<'_, T>,
    shape: AttentionShape,
    mask: &HostMask,
    scale: f32,
    plan: &MassPlan,
) -> Result<Vec<f32>> {
    let AttentionShape {
        batch,
        q_len,
        num_heads,
        head_dim: d,
        ..
    } = shape;
    let sink = MassSink::new(plan, mask, q_len)?;
    let q_tiles = q_len.div_ceil(BR);
    let use_fma = fma_available();
    let use_avx512 = use_fma && super::element::avx512_available();
    let two_pass = plan.algorithm == MassAlgorithm::TwoPass;
    let use_pairs = super::bf16_pairs::applies::<T, T>();
    // Every key tile transposed once for the whole call (`cpu/kv_tiles.rs`), within the cap.
    let dp = d.div_ceil(LANES) * LANES;
    let prepared = PreparedTiles::build::<T, T>(k, None, &shape, q_tiles, dp, use_pairs);
    (0..batch * num_heads * q_tiles).into_par_iter().try_for_each_init(
        || ScoreScratch::new(d, plan.sk, use_pairs),
        |scratch, item| {
            let qt = item % q_tiles;
            let h = (item / q_tiles) % num_heads;
            let b = item / (q_tiles * num_heads);
            let q0 = qt * BR;
            let q1 = (q0 + BR).min(q_len);
            scratch.run(
                q,
                k,
                shape,
                mask,
                scale,
                (b, h),
                (q0, q1),
                (use_fma, use_avx512),
                two_pass,
                prepared.as_ref(),
            );
            // SAFETY: items are disjoint in (b, h, rows).
            unsafe { sink.put(b, h, (q0, q1), &scratch.mass) }
        },
    )?;
    sink.finish()
}

/// Per-thread buffers of the standalone op.
struct ScoreScratch {
    dp: usize,
    q: Vec<f32>,
    kt: Vec<f32>,
    s: Vec<f32>,
    mass: MassRows,
    pieces: TilePieces,
    /// Visible key tiles of the current item (start, partial), kept for the second pass.
    tiles: Vec<(usize, bool)>,
    /// Q and K^T as bf16 pairs, when S takes them (`cpu/bf16_pairs.rs`); `q` and `kt` unused then.
    pairs: Option<PairTiles>,
}

impl ScoreScratch {
    fn new(d: usize, sk: usize, bf16_pairs: bool) -> Self {
        let dp = d.div_ceil(LANES) * LANES;
        Self {
            dp,
            q: vec![0.0; BR * dp],
            kt: vec![0.0; dp * BC],
            s: vec![0.0; BR * BC],
            mass: MassRows::new(sk),
            pieces: TilePieces::default(),
            tiles: Vec::new(),
            pairs: bf16_pairs.then(|| PairTiles::scores_only(BR, dp)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run<T: Element>(
        &mut self,
        q: Strided<'_, T>,
        k: Strided<'_, T>,
        shape: AttentionShape,
        mask: &HostMask,
        scale: f32,
        (b, h): (usize, usize),
        (q0, q1): (usize, usize),
        (use_fma, use_avx512): (bool, bool),
        two_pass: bool,
        prepared: Option<&PreparedTiles>,
    ) {
        #[cfg(not(target_arch = "x86_64"))]
        let _ = use_avx512;
        let d = shape.head_dim;
        let dp = self.dp;
        let kh = h / shape.group_size();
        let rows = q1 - q0;
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        match &mut self.pairs {
            Some(pairs) => pairs.load_queries(rows, d, |r| q.row(b, q0 + r, h, d)),
            None => {
                self.q.fill(0.0);
                load_scaled_rows(&mut self.q, dp, rows, |r| q.row(b, q0 + r, h, d), scale_log2);
            }
        }
        self.mass.clear(rows);
        let mut state = RowState::new();

        let table = mask.rule.table_row(b);
        let (qs, ks) = (mask.q.row(b), mask.kv.row(b));
        let off = mask.pos_offset;
        self.tiles.clear();
        for k0 in (0..shape.kv_len).step_by(BC) {
            let k1 = (k0 + BC).min(shape.kv_len);
            let class = classify_tile(&mask.rule, table, qs, ks, (q0, q1), (k0, k1), off);
            if class != TileClass::Skip {
                self.tiles.push((k0, class == TileClass::Partial));
            }
        }
        let passes: &[Pass] = if two_pass {
            &[Pass::Stats, Pass::Exact]
        } else {
            &[Pass::Single]
        };
        for &pass in passes {
            if pass == Pass::Exact {
                // 2^(s - lse) in the second pass: fold the log2 of the sum into the max (a NaN
                // sum, from NaN inputs, makes the row's mass NaN).
                for r in 0..rows {
                    if row_seen(state.sum[r]) {
                        state.max[r] += state.sum[r].log2();
                    }
                }
            }
            for t in 0..self.tiles.len() {
                let (k0, partial) = self.tiles[t];
                let k1 = (k0 + BC).min(shape.kv_len);
                let cols = k1 - k0;
                if prepared.is_none() {
                    self.load_k(k, b, kh, d, k0, cols);
                }
                tile_pieces(mask, b, k0, k1, &mut self.pieces);
                let masked = |s: &mut [f32], pieces: &[Piece]| mask_tile(s, mask, b, (q0, q1), (k0, k1), pieces);
                let Self {
                    q: qb,
                    kt,
                    s,
                    mass,
                    pieces,
                    pairs,
                    ..
                } = self;
                // The keys this item loaded, or the call's prepared ones.
                let tile = prepared.map(|p| p.tile(b, kh, k0));
                let pairs = pairs.as_ref().map(|tiles| PairScores {
                    q: tiles.queries(),
                    kt: tile.map_or(tiles.keys(), |t| t.kt_pairs),
                    half: dp / 2,
                    scale: scale_log2,
                });
                let kt = tile.map_or(&kt[..], |t| t.kt);
                let tile = TileArgs {
                    q: qb,
                    kt,
                    pairs,
                    s,
                    dp,
                    rows,
                    cols,
                    partial,
                    pieces,
                };
                #[cfg(target_arch = "x86_64")]
                if use_avx512 {
                    // SAFETY: the CPU has AVX-512F and VL, AVX2 and FMA (checked by the op).
                    unsafe { mass_tile_avx512(tile, mass, &mut state, pass, masked) };
                    continue;
                }
                if use_fma {
                    // SAFETY: fma_available() checked that the CPU has AVX2 and FMA.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        mass_tile_avx2(tile, mass, &mut state, pass, masked)
                    };
                } else {
                    mass_tile::<false>(tile, mass, &mut state, pass, masked);
                }
            }
        }
        if !two_pass {
            self.mass.normalize(&state, rows);
        }
    }

    /// Loads keys `[k0, k0 + cols)` as K^T `[dp, BC]`, zero-padded.
    #[allow(clippy::too_many_arguments)]
    fn load_k<T: Element>(&mut self, k: Strided<'_, T>, b: usize, kh: usize, d: usize, k0: usize, cols: usize) {
        let key = |j: usize| k.row(b, k0 + j, kh, d);
        if let Some(pairs) = &mut self.pairs {
            pairs.load_keys(cols, d, key);
            return;
        }
        if cols < BC {
            self.kt.fill(0.0);
        }
        transpose_rows(&mut self.kt, cols, d, key);
    }
}

/// Which pass of which algorithm a key tile is processed for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    /// The one pass of the one-pass algorithm: online softmax, the mass accumulators rescaled
    /// like O.
    Single,
    /// First of two: the row max and sum only.
    Stats,
    /// Second of two: `state.max` holds the log2 LSE; exact probabilities into the mass.
    Exact,
}

/// The tile buffers of one key tile.
struct TileArgs<'a> {
    q: &'a [f32],
    kt: &'a [f32],
    /// The bf16 pair tiles, when S takes them instead of `q` and `kt`.
    pairs: Option<PairScores<'a>>,
    s: &'a mut [f32],
    dp: usize,
    rows: usize,
    cols: usize,
    partial: bool,
    pieces: &'a TilePieces,
}

/// One key tile of the standalone op: S = Q K^T, the mask, then the pass's row update.
#[inline(always)]
fn mass_tile<const FMA: bool>(
    t: TileArgs<'_>,
    mass: &mut MassRows,
    state: &mut RowState,
    pass: Pass,
    masked: impl Fn(&mut [f32], &[Piece]),
) {
    let TileArgs {
        q,
        kt,
        pairs,
        s,
        dp,
        rows,
        cols,
        partial,
        pieces,
    } = t;
    match pairs {
        Some(pairs) => pairs.scores(s, rows.div_ceil(SCORE_ROWS), (0, BC)),
        None => scores::<FMA>(q, kt, s, dp, rows.div_ceil(SCORE_ROWS), (0, BC)),
    }
    if partial {
        masked(s, &pieces.list);
    }
    for r in 0..rows {
        let srow = &mut s[r * BC..(r + 1) * BC];
        match pass {
            Pass::Single => {
                // The accumulators of the row follow the running max exactly like O.
                let (_, tile_sum) =
                    softmax_row::<FMA>(srow, cols, &mut state.max[r], &mut state.sum[r], mass.row_mut(r));
                add_row(&srow[..cols], tile_sum, pieces, mass.row_mut(r));
            }
            Pass::Stats => {
                softmax_row::<FMA>(srow, cols, &mut state.max[r], &mut state.sum[r], &mut []);
            }
            Pass::Exact => {
                let lse = state.max[r];
                if lse == f32::NEG_INFINITY {
                    continue; // the row sees nothing
                }
                for x in srow[..cols].iter_mut() {
                    *x = exp2_with::<FMA>(*x - lse);
                }
                add_pieces(srow, pieces, mass.row_mut(r));
            }
        }
    }
}

/// [`mass_tile`] compiled for AVX-512 as well (16 lanes: PINE's prefill importance -5-10%, as
/// the attention's tiles, NOTES CPU 15).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn mass_tile_avx512(
    t: TileArgs<'_>,
    mass: &mut MassRows,
    state: &mut RowState,
    pass: Pass,
    masked: impl Fn(&mut [f32], &[Piece]),
) {
    mass_tile::<true>(t, mass, state, pass, masked)
}

/// [`mass_tile`] compiled for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn mass_tile_avx2(
    t: TileArgs<'_>,
    mass: &mut MassRows,
    state: &mut RowState,
    pass: Pass,
    masked: impl Fn(&mut [f32], &[Piece]),
) {
    mass_tile::<true>(t, mass, state, pass, masked)
}
