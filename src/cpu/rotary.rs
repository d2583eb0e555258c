//! Query rotation inside the fused CPU attention, for PINE's re-assigned positions.
//!
//! Keys are rotated once, at their original positions. A query row `r` whose group shifts key
//! segment `s` by `shift` must see `rope(q, p_q + shift) . rope(k, p_k)`, which equals PINE's
//! `rope(q, p_q) . rope(k, p_k - shift)`. So per key tile, per key segment piece of the tile, the
//! query rows are turned by their shift (O(D) per row and piece) and only that piece's columns of
//! S are computed with them. A tile that straddles two segments gets each piece's columns from its
//! own rotation: exact, whatever the tile boundaries.

use super::bf16_pairs::{round_into_pairs, PairScores};
use super::segment::TilePieces;
use super::tile::{tile_scores, TileKeys, BC};
use super::Element;
use crate::pine::{QueryShifts, RopeTable};

/// Positions and shifts of the query rows, and the RoPE table that turns them.
pub(crate) struct QueryRotation<'a> {
    pub table: &'a RopeTable,
    pub shifts: &'a QueryShifts,
    /// GQA decode packing (`crate::decode_pack`): the attention's row `i` of head `h` is query
    /// row `i / P` of head `h P + i % P`, `P` = this (1: no packing).
    pub packed_heads: usize,
}

impl QueryRotation<'_> {
    /// The query row and head (and the query length) that the attention's row `i` of head `h`
    /// stands for, out of `q_len` rows: themselves without packing.
    fn origin(&self, h: usize, q_len: usize, i: usize) -> (usize, usize, usize) {
        let p = self.packed_heads;
        if p <= 1 {
            // Unpacked (every prefill): no divisions in the per-row, per-piece shift lookups.
            return (h, q_len, i);
        }
        (h * p + i % p, q_len / p, i / p)
    }

    /// Rotates the loaded (scaled) query rows `[q0, q0 + rows)` of head `h` of batch row `b` at
    /// their original positions: the base every shift turns further.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub fn rotate_base(&self, q: &mut [f32], dp: usize, rows: usize, b: usize, h: usize, q_len: usize, q0: usize) {
        for r in 0..rows {
            let (_, len, i) = self.origin(h, q_len, q0 + r);
            let p = self.shifts.q_pos[b * len + i] as usize;
            self.table.rotate_row(&mut q[r * dp..(r + 1) * dp], p);
        }
    }

    /// The shift of key segment `id` for the attention's row `i` of head `h` of batch row `b`.
    fn shift(&self, b: usize, h: usize, q_len: usize, i: usize, id: u32) -> u32 {
        let (h, len, i) = self.origin(h, q_len, i);
        self.shifts.shift(b, h, len, i, id)
    }
}

/// Buffers of [`rotated_scores`]: the S tile of one piece, and the query tile turned for the
/// last key segments met.
pub(crate) struct RotaryScratch {
    s: Vec<f32>,
    turned: TurnedQueries,
}

impl RotaryScratch {
    /// Buffers for tiles of `br` rows of `dp`; with `pairs`, each turned tile is also kept as bf16
    /// pairs (`cpu/bf16_pairs.rs`).
    pub fn new(br: usize, dp: usize, pairs: bool) -> Self {
        Self {
            s: vec![0.0; br * BC],
            turned: TurnedQueries {
                slots: [(); TURNED_SLOTS].map(|_| TurnedSlot {
                    id: None,
                    q: vec![0.0; br * dp],
                    pairs: if pairs { vec![0; br * dp / 2] } else { Vec::new() },
                }),
                next: 0,
            },
        }
    }

    /// Forgets the turned queries: a new query tile was loaded.
    pub fn new_query_tile(&mut self) {
        for slot in &mut self.turned.slots {
            slot.id = None;
        }
    }
}

/// The query tile turned by each row's shift for a key segment, kept for the next key tiles of
/// the same query tile: a row's shift depends only on its query group and the key segment, and a
/// segment usually spans several key tiles, which come in key order. (Turned again for every
/// tile, the rotation cost a PINE decode step ~5% over a plain one.)
struct TurnedQueries {
    slots: [TurnedSlot; TURNED_SLOTS],
    /// The slot to fill next (the older of the two).
    next: usize,
}

/// One segment's turned query tile.
struct TurnedSlot {
    /// The key segment; `None`: empty.
    id: Option<u32>,
    q: Vec<f32>,
    /// `q` rounded to bf16 pairs, when S takes pairs (else empty).
    pairs: Vec<u32>,
}

/// Segments remembered: a tile straddling two segments needs the last one's rotation and the
/// next one's, which the following tiles reuse.
const TURNED_SLOTS: usize = 2;

/// What a piece's columns of S are computed from.
enum PieceQueries {
    /// Every row's shift is 0: the base queries.
    Base,
    /// The turned rows in this slot.
    Slot(usize),
}

impl TurnedQueries {
    /// The queries for key segment `id` (`shift(r)` of each of the `rows` rows), turned now if
    /// this query tile has not turned them for `id` yet. `q`: the base tile, `row_blocks_rows`
    /// rows (padding rows zero) of `dp`. Inlined into the loops' SIMD builds, with the turns.
    #[inline(always)]
    fn for_segment(
        &mut self,
        id: u32,
        q: &[f32],
        (rows, row_blocks_rows, dp): (usize, usize, usize),
        shift: impl Fn(usize) -> usize,
        table: &RopeTable,
    ) -> PieceQueries {
        if let Some(i) = self.slots.iter().position(|slot| slot.id == Some(id)) {
            return PieceQueries::Slot(i);
        }
        if (0..rows).all(|r| shift(r) == 0) {
            return PieceQueries::Base;
        }
        let i = self.next;
        self.next = (i + 1) % TURNED_SLOTS;
        let slot = &mut self.slots[i];
        slot.id = Some(id);
        let qr = &mut slot.q[..row_blocks_rows * dp];
        // Each row turned from the base tile straight into the slot (a copy first cost PINE's
        // prefill 1.6%); the padding (head dim, row blocks) copied as it is: zeros.
        let width = table.half * 2;
        let shift_of = |r: usize| (r < rows).then(|| shift(r));
        for (r, (dst, src)) in qr.chunks_exact_mut(dp).zip(q.chunks_exact(dp)).enumerate() {
            match shift_of(r) {
                Some(sh) if sh != 0 => {
                    table.rotate_row_into(dst, src, sh);
                    dst[width..].copy_from_slice(&src[width..]);
                }
                _ => dst.copy_from_slice(src),
            }
        }
        if !slot.pairs.is_empty() {
            round_into_pairs(&mut slot.pairs[..row_blocks_rows * dp / 2], qr);
        }
        PieceQueries::Slot(i)
    }
}

/// S of one key tile (`s`, `[BR, BC]`) for query rows `[q0, q0 + rows)` of (b, h): every key
/// piece's columns from the base queries `q` turned by each row's shift for that piece's segment
/// (once per query tile and segment: [`TurnedQueries`]).
/// With [`TileKeys::Transposed`] (`keys_f32`) the `row_blocks_rows` rows are computed (padding
/// rows of `q` are zero), with [`TileKeys::Rows`] the `rows` rows. With `pairs` (the base queries'
/// bf16 pairs, the tile's K^T pairs) S takes the pair loops instead, each turned tile rounded to
/// pairs as it is turned.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn rotated_scores<const FMA: bool, T: Element>(
    rot: &QueryRotation<'_>,
    q: &[f32],
    keys_f32: TileKeys<'_, T>,
    kt: &[f32],
    s: &mut [f32],
    scratch: &mut RotaryScratch,
    dp: usize,
    (rows, row_blocks_rows): (usize, usize),
    pieces: &TilePieces,
    (b, h, q_len, q0): (usize, usize, usize, usize),
    pairs: Option<(&[u32], &[u32])>,
) {
    let row_blocks = row_blocks_rows / super::tile::ROWS;
    let single = pieces.list.len() == 1;
    let RotaryScratch { s: piece_s, turned } = scratch;
    for piece in &pieces.list {
        let shift = |r: usize| rot.shift(b, h, q_len, q0 + r, piece.id) as usize;
        let cols = (piece.a, piece.b);
        let dst: &mut [f32] = if single { s } else { piece_s };
        let slot = turned.for_segment(piece.id, q, (rows, row_blocks_rows, dp), shift, rot.table);
        let (queries, query_pairs) = match slot {
            PieceQueries::Base => (q, pairs.map(|(base, _)| base)),
            PieceQueries::Slot(i) => (&turned.slots[i].q[..], Some(&turned.slots[i].pairs[..])),
        };
        match (pairs, query_pairs) {
            // With pairs: the rows' pairs (rounded, already scaled) against the K^T pairs.
            (Some((_, kt_pairs)), Some(q_pairs)) => {
                let keys = TileKeys::Pairs(PairScores {
                    q: q_pairs,
                    kt: kt_pairs,
                    half: dp / 2,
                    scale: 1.0,
                });
                tile_scores::<FMA, T>(keys, queries, kt, dst, dp, (rows, row_blocks), cols)
            }
            _ => tile_scores::<FMA, T>(keys_f32, queries, kt, dst, dp, (rows, row_blocks), cols),
        }
        if !single {
            for r in 0..rows {
                let (a, e) = (r * BC + piece.a, r * BC + piece.b);
                s[a..e].copy_from_slice(&piece_s[a..e]);
            }
        }
    }
}
