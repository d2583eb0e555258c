//! The fused CPU attention: tiled online softmax (the FlashAttention-2 algorithm) in f32.
//!
//! Work items are (batch, head, query tile), run in parallel with rayon; a call with one query
//! tile per head and too few items for the threads (a decode step of few KV heads) is split over
//! its keys instead ([`decode_split`]). For each item the key tiles are classified from the
//! segment metadata (see [`crate::mask::tiles`]): SKIP tiles are never touched, FULL tiles run
//! without per-element tests, PARTIAL tiles have their hidden runs set to -inf on S by (query
//! span, key piece) (`segment::mask_tile`).
//! Inputs are converted to f32 one tile at a time (K transposed to K^T for the register-blocked
//! loops of `tile.rs`); an item of at most one block of query rows (a decode step) reads K and V
//! rows as stored instead (`dots.rs`, `pv_rows.rs`). Nothing of size `Lq x Lk` is ever allocated.

mod bf16_pairs;
mod decode_split;
mod dots;
mod element;
mod exp2;
mod kv_tiles;
mod load;
pub(crate) mod pine_decode;
mod pv_rows;
mod reduce;
pub(crate) mod rotary;
pub(crate) mod segment;
mod simd;
pub(crate) mod softmax_grad;
mod tile;
mod tile512;

use candle_core::{Layout, Result};
use rayon::prelude::*;

pub(crate) use element::{portable_only, Element};

use crate::mask::tiles::{classify_tile, TileClass};
use crate::mask::HostMask;
use crate::scores::MassPlan;
use crate::validate::{strides4, AttentionShape};
use bf16_pairs::{PairScores, PairTiles};
use kv_tiles::PreparedTiles;
use rotary::{rotated_scores, QueryRotation, RotaryScratch};
use segment::{mask_tile, MassRows, MassSink, TilePieces};
use tile::{attend_scored_tile, tile_scores, RowState, TileKeys, TileRows, TileValues, BC, BR, LANES, ROWS};

/// How many keys ahead a decode-sized item asks for the K and V rows (one key tile: measured
/// against two, RAG decode step from a cold cache -20% either way, back to back 64 slightly better).
const AHEAD: usize = BC;

/// A rank-4 input `[B, L, heads, D]` with arbitrary strides on the first three dims.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a, T> {
    pub data: &'a [T],
    pub strides: [usize; 3],
    pub offset: usize,
}

impl<'a, T: Element> Strided<'a, T> {
    pub fn new(data: &'a [T], layout: &Layout) -> Self {
        let (strides, offset) = strides4(layout);
        Self { data, strides, offset }
    }

    /// The index in `data` of (b, row, head)'s first element.
    #[inline(always)]
    pub(crate) fn start(&self, b: usize, row: usize, head: usize) -> usize {
        self.offset + b * self.strides[0] + row * self.strides[1] + head * self.strides[2]
    }

    /// The contiguous `D` elements of (b, row, head).
    #[inline]
    pub(crate) fn row(&self, b: usize, row: usize, head: usize, d: usize) -> &'a [T] {
        let start = self.start(b, row, head);
        &self.data[start..start + d]
    }
}

/// The result of [`forward`]: O `[B, Lq, H, D]` contiguous and, when asked, LSE `[B, H, Lq]` and
/// the per-segment mass (`[B, Ho, Lo, Sk]`, laid out by its [`MassPlan`]).
pub(crate) struct Forward<T> {
    pub out: Vec<T>,
    pub lse: Option<Vec<f32>>,
    pub mass: Option<Vec<f32>>,
}

/// Segment-masked attention on the CPU. `scale` multiplies q.k before the softmax. With `mass`,
/// also the per-segment mass of P, accumulated in the same pass (see [`segment`]). With
/// `rotation`, q is un-rotated and is turned inside the loop per row and key segment (PINE's
/// re-assigned positions, see [`rotary`]); k is then rotated at its original positions.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<T: Element, K: Element>(
    q: Strided<'_, T>,
    k: Strided<'_, K>,
    v: Strided<'_, T>,
    shape: AttentionShape,
    mask: &HostMask,
    scale: f32,
    want_lse: bool,
    mass: Option<&MassPlan>,
    rotation: Option<&QueryRotation<'_>>,
) -> Result<Forward<T>> {
    let AttentionShape {
        batch,
        q_len,
        num_heads,
        head_dim: d,
        ..
    } = shape;
    // A call with one query tile per head and fewer items than twice the threads (a decode step
    // of few KV heads, MQA's above all) runs split over its keys (`decode_split`).
    if mass.is_none() && !decode_split::disabled() {
        if let Some(plan) = decode_split::SplitPlan::new(&shape, rayon::current_num_threads()) {
            return decode_split::forward(q, k, v, shape, mask, scale, want_lse, rotation, plan);
        }
    }
    // Poisoned with NaN: every element must be written by exactly one work item.
    let mut out = vec![T::from_f32(f32::NAN); batch * q_len * num_heads * d];
    let mut lse = if want_lse {
        vec![f32::NAN; batch * num_heads * q_len]
    } else {
        Vec::new()
    };
    let q_tiles = q_len.div_ceil(BR);
    let out_ptr = SharedMut(out.as_mut_ptr());
    let lse_ptr = SharedMut(lse.as_mut_ptr());
    let use_fma = fma_available();
    let use_avx512 = use_fma && element::avx512_available();
    // S of bf16 inputs from bf16 pairs where the CPU has AVX-512 BF16 (under a rotation, from
    // the queries turned in f32 and rounded to bf16, as the GPU's tensor cores take them).
    let use_bf16_pairs = bf16_pairs::applies::<T, K>();
    let sink = mass.map(|plan| MassSink::new(plan, mask, q_len)).transpose()?;
    // Every key tile transposed and widened once for the whole call, unless every item is
    // decode-sized (those read K and V rows as stored), no tile is read by two items, or the
    // tiles would pass the cap (`kv_tiles`).
    let all_direct = use_fma && q_len <= ROWS && d.is_multiple_of(LANES);
    let dp = d.div_ceil(LANES) * LANES;
    let prepared = (!all_direct)
        .then(|| kv_tiles::PreparedTiles::build(k, Some(v), &shape, q_tiles, dp, use_bf16_pairs))
        .flatten();

    let config = ScratchConfig {
        d,
        mass_segments: mass.map(|plan| plan.sk),
        rotary: rotation.is_some(),
        bf16_pairs: use_bf16_pairs,
    };
    (0..batch * num_heads * q_tiles).into_par_iter().try_for_each_init(
        || PooledScratch::take(config),
        |scratch, item| {
            let qt = item % q_tiles;
            let h = (item / q_tiles) % num_heads;
            let b = item / (q_tiles * num_heads);
            let q0 = qt * BR;
            let q1 = (q0 + BR).min(q_len);
            let item = Item {
                q,
                k,
                v,
                shape,
                mask,
                scale,
                rotation,
                at: (b, h),
                rows: (q0, q1),
                use_fma,
                use_avx512,
                use_bf16_pairs,
                prepared: prepared.as_ref(),
                keys: (0, shape.kv_len),
            };
            let state = scratch.run(&item);
            // SAFETY: each work item writes only rows [q0, q1) of head h of batch b, in `out` and
            // `lse`; items are disjoint, and both vectors outlive the parallel loop.
            unsafe {
                scratch.write_output(&out_ptr, want_lse.then_some(&lse_ptr), &state, shape, (b, h), (q0, q1));
            }
            if let (Some(sink), Some(rows)) = (&sink, &mut scratch.mass) {
                rows.normalize(&state, q1 - q0);
                // SAFETY: items are disjoint in (b, h, rows).
                unsafe { sink.put(b, h, (q0, q1), rows)? };
            }
            Ok::<(), candle_core::Error>(())
        },
    )?;
    Ok(Forward {
        out,
        lse: want_lse.then_some(lse),
        mass: sink.map(MassSink::finish).transpose()?,
    })
}

/// Whether the running CPU has AVX2, FMA and F16C, which the `_avx2` builds of the CPU loops use
/// (checked once per call; the result is cached by std).
pub(crate) fn fma_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("fma") && element::widen8_available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A raw pointer that work items write through at disjoint positions.
struct SharedMut<T>(*mut T);
// SAFETY: used only for disjoint writes from the work items of one parallel loop.
unsafe impl<T> Sync for SharedMut<T> {}
unsafe impl<T> Send for SharedMut<T> {}

/// One work item of the forward: the query rows `rows` of head `at.1` of batch row `at.0`, and
/// what every key tile of it reads.
#[derive(Clone, Copy)]
struct Item<'a, 'r, T, K = T> {
    q: Strided<'a, T>,
    k: Strided<'a, K>,
    v: Strided<'a, T>,
    shape: AttentionShape,
    mask: &'a HostMask,
    scale: f32,
    rotation: Option<&'a QueryRotation<'r>>,
    at: (usize, usize),
    rows: (usize, usize),
    /// The CPU has AVX2, FMA and F16C ([`fma_available`]).
    use_fma: bool,
    /// It also has AVX-512F: the item runs in the AVX-512 build ([`element::avx512_available`]).
    use_avx512: bool,
    /// q and k are bf16 and the CPU has AVX-512 BF16: S of prefill-sized tiles from bf16 pairs
    /// ([`bf16_pairs`]).
    use_bf16_pairs: bool,
    /// The call's key and value tiles, when prepared once for all items ([`kv_tiles`]); else each
    /// item loads the tiles it visits into its scratch.
    prepared: Option<&'a PreparedTiles>,
    /// The keys `[begin, end)` the item runs over (`begin` a multiple of [`BC`]): every key, or
    /// one chunk of a split decode call ([`decode_split`]).
    keys: (usize, usize),
}

impl<T, K> Item<'_, '_, T, K> {
    /// Whether the item's tiles read K and V rows as stored (decode-sized: at most one register
    /// block of rows; D a multiple of [`LANES`]; AVX2 builds).
    fn direct(&self) -> bool {
        self.use_fma && self.rows.1 - self.rows.0 <= ROWS && self.shape.head_dim.is_multiple_of(LANES)
    }

    /// Whether the item's S reads the bf16 pair tiles (prefill-sized items of bf16 inputs).
    fn pairs(&self) -> bool {
        self.use_bf16_pairs && !self.direct()
    }
}

/// Per-thread tile buffers, reused across work items (and calls: [`PooledScratch`]).
struct Scratch {
    config: ScratchConfig,
    dp: usize,
    q: Vec<f32>,
    kt: Vec<f32>,
    v: Vec<f32>,
    s: Vec<f32>,
    o: Vec<f32>,
    /// The per-segment mass accumulators of the item's rows, when asked for.
    mass: Option<MassRows>,
    /// The key segment pieces of the current key tile (for the mass and the rotation).
    pieces: TilePieces,
    /// Buffers of the in-loop query rotation, when there is one.
    rotary: Option<RotaryScratch>,
    /// Q, K^T and V as bf16 pairs, for the items that take them ([`Item::pairs`]).
    pairs: Option<PairTiles>,
}

/// What a [`Scratch`] is sized and built for.
#[derive(Clone, Copy, PartialEq, Eq)]
struct ScratchConfig {
    d: usize,
    mass_segments: Option<usize>,
    rotary: bool,
    bf16_pairs: bool,
}

thread_local! {
    /// This thread's buffers from its last call, for the next call of the same config. A decode
    /// step is short: building ~200 KB of zeroed buffers for each of a call's rayon splits cost
    /// a step ~4% (memset in the profile, NOTES CPU 20).
    static SPARE_SCRATCH: std::cell::RefCell<Option<Scratch>> = const { std::cell::RefCell::new(None) };
}

/// Mass accumulators above this many bytes (`BR x Sk` f32) are not kept between calls.
const SPARE_MASS_BYTES: usize = 1 << 20;

/// A thread's [`Scratch`] for one call: its spare one when that has the call's config, else a
/// new one; kept as the spare when dropped. Every item overwrites what it reads (as it must when
/// items share a thread's buffers within a call), so an old buffer serves like a new one.
struct PooledScratch(Option<Scratch>);

impl PooledScratch {
    fn take(config: ScratchConfig) -> Self {
        let spare = SPARE_SCRATCH
            .try_with(|cell| cell.try_borrow_mut().ok().and_then(|mut spare| spare.take()))
            .ok()
            .flatten();
        Self(Some(match spare {
            Some(scratch) if scratch.config == config => scratch,
            _ => Scratch::new(config),
        }))
    }
}

impl Drop for PooledScratch {
    fn drop(&mut self) {
        let Some(scratch) = self.0.take() else { return };
        if scratch.config.mass_segments.unwrap_or(0) * BR * 4 > SPARE_MASS_BYTES {
            return;
        }
        // At thread exit, or re-entered from a nested call on this thread: not kept, dropped.
        let _ = SPARE_SCRATCH.try_with(|cell| {
            if let Ok(mut spare) = cell.try_borrow_mut() {
                *spare = Some(scratch);
            }
        });
    }
}

impl std::ops::Deref for PooledScratch {
    type Target = Scratch;
    fn deref(&self) -> &Scratch {
        self.0
            .as_ref()
            .expect("a pooled scratch holds its buffers until dropped")
    }
}

impl std::ops::DerefMut for PooledScratch {
    fn deref_mut(&mut self) -> &mut Scratch {
        self.0
            .as_mut()
            .expect("a pooled scratch holds its buffers until dropped")
    }
}

impl Scratch {
    fn new(config: ScratchConfig) -> Self {
        let ScratchConfig {
            d,
            mass_segments,
            rotary,
            bf16_pairs,
        } = config;
        let dp = d.div_ceil(LANES) * LANES;
        Self {
            config,
            dp,
            q: vec![0.0; BR * dp],
            kt: vec![0.0; dp * BC],
            v: vec![0.0; BC * dp],
            s: vec![0.0; BR * BC],
            o: vec![0.0; BR * dp],
            mass: mass_segments.map(MassRows::new),
            pieces: TilePieces::default(),
            rotary: rotary.then(|| RotaryScratch::new(BR, dp, bf16_pairs)),
            pairs: bf16_pairs.then(|| PairTiles::new(BR, dp)),
        }
    }

    /// Runs one query tile over every visible key tile of `item.keys`; returns the softmax state,
    /// with the unnormalised output in `self.o`.
    fn run<T: Element, K: Element>(&mut self, item: &Item<'_, '_, T, K>) -> RowState {
        #[cfg(target_arch = "x86_64")]
        if item.use_avx512 {
            // SAFETY: the CPU has AVX-512F, AVX2, FMA and F16C (checked by the forward).
            return unsafe { self.run_avx512(item) };
        }
        #[cfg(target_arch = "x86_64")]
        if item.use_fma {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked by the forward).
            return unsafe { self.run_avx2(item) };
        }
        self.run_with::<false, T, K>(item)
    }

    /// [`Scratch::run`] built for AVX2 + FMA + F16C: the tile loops inlined and vectorised 8
    /// lanes wide, fused multiply-adds, the AVX2 kernels of `dots.rs` / `pv_rows.rs`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_avx2<T: Element, K: Element>(&mut self, item: &Item<'_, '_, T, K>) -> RowState {
        self.run_with::<true, T, K>(item)
    }

    /// [`Scratch::run`] built for AVX-512 as well: the same loops 16 lanes wide (prefill tiles
    /// -6-11%, NOTES CPU 15), the AVX-512 kernels of the decode-sized tiles.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
    unsafe fn run_avx512<T: Element, K: Element>(&mut self, item: &Item<'_, '_, T, K>) -> RowState {
        self.run_with::<true, T, K>(item)
    }

    /// The item's key tiles in order. `FMA`: inside one of the vector builds.
    #[inline(always)]
    fn run_with<const FMA: bool, T: Element, K: Element>(&mut self, item: &Item<'_, '_, T, K>) -> RowState {
        let mut state = self.begin(item);
        for k0 in (item.keys.0..item.keys.1).step_by(BC) {
            self.key_tile::<FMA, T, K>(item, &mut state, k0);
        }
        state
    }

    /// Loads the item's query rows (scaled; turned to their positions under a rotation) and clears
    /// O: the state before the first key tile. Inlined into the loops' SIMD builds, with the
    /// loads and rotations it calls (out of line they ran in the baseline build).
    #[inline(always)]
    fn begin<T: Element, K: Element>(&mut self, item: &Item<'_, '_, T, K>) -> RowState {
        let Item {
            q,
            shape,
            scale,
            rotation,
            at: (b, h),
            rows: (q0, q1),
            ..
        } = *item;
        let (d, dp, rows) = (shape.head_dim, self.dp, q1 - q0);
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        // Only the row blocks the loops compute are read (a decode item: one block of 4 rows, not
        // the 64 of a tile; zeroing all of q and O cost ~2% of a decode step).
        let used = rows.div_ceil(ROWS) * ROWS * dp;
        if item.pairs() && rotation.is_none() {
            // S reads only the pair tiles, exact bf16 inputs; the scale is applied to S.
            let pairs = self.pairs.as_mut().expect("bf16 pair tiles");
            pairs.load_queries(rows, d, |r| q.row(b, q0 + r, h, d));
        } else {
            self.q[..used].fill(0.0);
            load::load_scaled_rows(&mut self.q, dp, rows, |r| q.row(b, q0 + r, h, d), scale_log2);
        }
        if let Some(rot) = rotation {
            rot.rotate_base(&mut self.q, dp, rows, b, h, shape.q_len, q0);
            if let Some(scratch) = &mut self.rotary {
                scratch.new_query_tile();
            }
            if item.pairs() {
                // The rows at their own positions (scaled), rounded to pairs for the pieces whose
                // shift is 0; turned rows are rounded as they are turned.
                let pairs = self.pairs.as_mut().expect("bf16 pair tiles");
                pairs.round_queries(&self.q, rows.div_ceil(ROWS) * ROWS, dp);
            }
        }
        self.o[..used].fill(0.0);
        if let Some(m) = &mut self.mass {
            m.clear(rows);
        }
        RowState::new()
    }

    /// Key tile `[k0, k0 + BC)` of the item (clipped to Lk): skipped when the mask hides it,
    /// otherwise S, the online softmax and P V into `state` and `self.o`.
    #[inline(always)]
    fn key_tile<const FMA: bool, T: Element, K: Element>(
        &mut self,
        item: &Item<'_, '_, T, K>,
        state: &mut RowState,
        k0: usize,
    ) {
        let Item {
            k,
            v,
            shape,
            mask,
            rotation,
            at: (b, h),
            rows: (q0, q1),
            ..
        } = *item;
        let (d, dp, rows) = (shape.head_dim, self.dp, q1 - q0);
        let kh = h / shape.group_size();
        let table = mask.rule.table_row(b);
        let (qs, ks) = (mask.q.row(b), mask.kv.row(b));
        let off = mask.pos_offset;
        let k1 = (k0 + BC).min(shape.kv_len);
        let class = classify_tile(&mask.rule, table, qs, ks, (q0, q1), (k0, k1), off);
        if class == TileClass::Skip {
            return;
        }
        // Decode-sized items (one register block of rows: a decode step, GQA-packed or not; D a
        // multiple of LANES) read K and V straight from their rows: no K^T transpose, no f32 V
        // tile (`TileKeys::Rows`, `pv_rows`).
        let direct = item.direct();
        let pairs = item.pairs();
        let cols = k1 - k0;
        // The call's prepared tile, or (None) the tile this item loads into its scratch.
        let prepared = match item.prepared {
            Some(p) if !direct => Some(p.tile(b, kh, k0)),
            _ => None,
        };
        if !direct && prepared.is_none() {
            self.load_kv(k, v, b, kh, d, k0, cols, pairs);
        }
        // The tile's key segment pieces: the mass's sums, the rotation's turns and a PARTIAL tile's
        // mask (by piece: per element, the rule's lookup cost a PINE prefill ~8%, NOTES CPU 22).
        if self.mass.is_some() || rotation.is_some() || class == TileClass::Partial {
            segment::tile_pieces(mask, b, k0, k1, &mut self.pieces);
        }
        // Decode-sized items: as S reads key j, the K and V rows of key j + AHEAD are asked for
        // into L2. A decode step streams the cache once, each row a few lines a whole token row
        // apart (a stride the hardware prefetcher follows late); the hints spread over the tile,
        // not issued all at its start (which left most of them dropped).
        let (keys, values) = if direct {
            let ahead = k0 + AHEAD;
            let key_rows = TileRows::of(k, b, k0, kh, d);
            let key_rows = match shape.kv_len.checked_sub(ahead) {
                Some(count) if count > 0 => key_rows.with_prefetch(load::RowPrefetch::new(
                    TileRows::of(k, b, ahead, kh, d),
                    TileRows::of(v, b, ahead, kh, d),
                    count,
                )),
                _ => key_rows,
            };
            (
                TileKeys::Rows(key_rows),
                TileValues::Rows(TileRows::of(v, b, k0, kh, d)),
            )
        } else {
            (TileKeys::Transposed, TileValues::Widened)
        };
        if let Some(rot) = rotation {
            self.attend_rotated::<FMA, T, K>(
                rot,
                (keys, values),
                prepared,
                pairs,
                mask,
                shape,
                (b, h),
                (q0, q1),
                (k0, k1),
                class,
                state,
            );
            return;
        }
        let Self {
            q: qb,
            kt,
            v: vb,
            s,
            o,
            mass,
            pieces,
            pairs: pair_tiles,
            ..
        } = self;
        let (keys, values) = match pair_tiles {
            Some(tiles) if pairs => (
                TileKeys::Pairs(PairScores {
                    q: tiles.queries(),
                    kt: prepared.map_or(tiles.keys(), |p| p.kt_pairs),
                    half: dp / 2,
                    scale: item.scale * std::f32::consts::LOG2_E,
                }),
                TileValues::Pairs(prepared.map_or(tiles.values(), |p| p.v_pairs)),
            ),
            _ => (keys, values),
        };
        let (kt, vb): (&[f32], &[f32]) = prepared.map_or((kt, vb), |p| (p.kt, p.v));
        // The mass accumulators follow O's rescaling; P of the tile is summed per key segment.
        let hook = |r: usize, alpha: f32, p: &[f32], sum: f32| {
            if let Some(m) = mass.as_mut() {
                m.follow(r, alpha, (p, sum), pieces);
            }
        };
        tile_scores::<FMA, K>(keys, qb, kt, s, dp, (rows, rows.div_ceil(ROWS)), (0, cols));
        if class == TileClass::Partial {
            mask_tile(s, mask, b, (q0, q1), (k0, k1), &pieces.list);
        }
        attend_scored_tile::<FMA, T>(s, (values, vb), o, state, dp, rows, cols, hook);
    }

    /// One key tile with the query rotated per row and key piece: S piece by piece
    /// ([`rotated_scores`]), the mask of a PARTIAL tile by piece pairs, then the online softmax
    /// and P V as usual.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn attend_rotated<'a, const FMA: bool, T: Element, K: Element>(
        &mut self,
        rot: &QueryRotation<'_>,
        (keys, values): (TileKeys<'a, K>, TileValues<'a, T>),
        prepared: Option<kv_tiles::Tile<'_>>,
        pairs: bool,
        mask: &HostMask,
        shape: AttentionShape,
        (b, h): (usize, usize),
        (q0, q1): (usize, usize),
        (k0, k1): (usize, usize),
        class: TileClass,
        state: &mut RowState,
    ) {
        let (dp, rows, cols) = (self.dp, q1 - q0, k1 - k0);
        let padded = rows.div_ceil(ROWS) * ROWS;
        let Self {
            q: qb,
            kt,
            v: vb,
            s,
            o,
            pieces,
            rotary,
            pairs: pair_tiles,
            ..
        } = self;
        let (kt, vb): (&[f32], &[f32]) = prepared.map_or((kt, vb), |p| (p.kt, p.v));
        let pair_args = match pair_tiles {
            Some(tiles) if pairs => Some((
                (tiles.queries(), prepared.map_or(tiles.keys(), |p| p.kt_pairs)),
                prepared.map_or(tiles.values(), |p| p.v_pairs),
            )),
            _ => None,
        };
        let scratch = rotary.as_mut().expect("rotation scratch");
        let at = (b, h, shape.q_len, q0);
        rotated_scores::<FMA, K>(
            rot,
            qb,
            keys,
            kt,
            s,
            scratch,
            dp,
            (rows, padded),
            pieces,
            at,
            pair_args.map(|a| a.0),
        );
        if class == TileClass::Partial {
            mask_tile(s, mask, b, (q0, q1), (k0, k1), &pieces.list);
        }
        let hook = |_: usize, _: f32, _: &[f32], _: f32| {};
        match pair_args {
            Some((_, vp)) => {
                let values = (TileValues::Pairs(vp), vb);
                attend_scored_tile::<FMA, T>(s, values, o, state, dp, rows, cols, hook)
            }
            None => attend_scored_tile::<FMA, T>(s, (values, vb), o, state, dp, rows, cols, hook),
        }
    }

    /// Loads key tile rows `[k0, k0 + cols)` as K^T `[dp, BC]` and V `[BC, dp]` (or, with `pairs`,
    /// as the K^T and V pairs of [`Scratch::pairs`]), zero-padded.
    #[allow(clippy::too_many_arguments)]
    fn load_kv<T: Element, K: Element>(
        &mut self,
        k: Strided<'_, K>,
        v: Strided<'_, T>,
        b: usize,
        kh: usize,
        d: usize,
        k0: usize,
        cols: usize,
        pairs: bool,
    ) {
        let dp = self.dp;
        let key = |j: usize| k.row(b, k0 + j, kh, d);
        let value = |j: usize| v.row(b, k0 + j, kh, d);
        if let (Some(tiles), true) = (&mut self.pairs, pairs) {
            tiles.load_keys(cols, d, key);
            tiles.load_values(cols, d, value);
            return;
        }
        if cols < BC {
            self.kt.fill(0.0);
            self.v.fill(0.0);
        }
        load::transpose_rows(&mut self.kt, cols, d, key);
        for j in 0..cols {
            element::widen_into(&mut self.v[j * dp..j * dp + d], value(j));
        }
    }

    /// Normalises the tile's output rows and writes them (and the LSE) to the results.
    ///
    /// # Safety
    /// `out` and `lse` must point to buffers of the forward's sizes, and no other thread may write
    /// rows `[q0, q1)` of head `h` of batch `b`.
    unsafe fn write_output<T: Element>(
        &self,
        out: &SharedMut<T>,
        lse: Option<&SharedMut<f32>>,
        state: &RowState,
        shape: AttentionShape,
        (b, h): (usize, usize),
        (q0, q1): (usize, usize),
    ) {
        let d = shape.head_dim;
        for r in 0..q1 - q0 {
            let i = q0 + r;
            let sum = state.sum[r];
            // A row that saw no key: output 0 and LSE -inf (never NaN). A NaN sum (NaN scores,
            // from NaN inputs) stays NaN in both.
            let inv = tile::row_scale(sum);
            let dst = out.0.add(((b * shape.q_len + i) * shape.num_heads + h) * d);
            for c in 0..d {
                *dst.add(c) = T::from_f32(self.o[r * self.dp + c] * inv);
            }
            if let Some(lse) = lse {
                *lse.0.add((b * shape.num_heads + h) * shape.q_len + i) = tile::row_lse(state.max[r], sum);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::{Scratch, ScratchConfig, SPARE_SCRATCH};
    use crate::SegmentMask;

    /// A spare scratch full of NaN: what a call reads without writing first would show.
    fn poisoned_spare(config: ScratchConfig) {
        let mut scratch = Scratch::new(config);
        for buf in [
            &mut scratch.q,
            &mut scratch.kt,
            &mut scratch.v,
            &mut scratch.s,
            &mut scratch.o,
        ] {
            buf.fill(f32::NAN);
        }
        SPARE_SCRATCH.with(|cell| *cell.borrow_mut() = Some(scratch));
    }

    /// Buffers kept from an earlier call serve like new ones: every thread's spare poisoned, then
    /// decode-sized, ragged and whole-tile calls against the reference.
    #[test]
    fn kept_buffers_are_overwritten_before_they_are_read() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let d = 64;
        let config = ScratchConfig {
            d,
            mass_segments: None,
            rotary: false,
            bf16_pairs: false,
        };
        for (q_len, kv_len) in [(1, 150), (4, 77), (3, 64), (70, 70), (129, 200)] {
            rayon::broadcast(|_| poisoned_spare(config));
            poisoned_spare(config);
            let q = Tensor::randn(0f32, 1.0, (1, q_len, 2, d), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (1, kv_len, 2, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (1, kv_len, 2, d), &dev)?;
            let mask = SegmentMask::causal(kv_len, &dev)?.last_queries(q_len)?;
            let ours = crate::segment_attention(&q, &k, &v, &mask)?;
            let want = crate::reference::attention(&q, &k, &v, &mask, None)?
                .out
                .to_dtype(candle_core::DType::F32)?;
            let err = (ours - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(err < 1e-4, "Lq {q_len}, Lk {kv_len}: max error {err}");
        }
        Ok(())
    }
}
