//! Query rotation inside the fused CPU attention, for PINE's re-assigned positions.
//!
//! Keys are rotated once, at their original positions. A query row `r` whose group shifts key
//! segment `s` by `shift` must see `rope(q, p_q + shift) . rope(k, p_k)`, which equals PINE's
//! `rope(q, p_q) . rope(k, p_k - shift)`. So per key tile, per key segment piece of the tile, the
//! query rows are turned by their shift (O(D) per row and piece) and only that piece's columns of
//! S are computed with them. A tile that straddles two segments gets each piece's columns from its
//! own rotation: exact, whatever the tile boundaries.

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

/// Buffers of [`rotated_scores`]: one rotated query tile and one S tile.
pub(crate) struct RotaryScratch {
    qr: Vec<f32>,
    s: Vec<f32>,
}

impl RotaryScratch {
    pub fn new(br: usize, dp: usize) -> Self {
        Self {
            qr: vec![0.0; br * dp],
            s: vec![0.0; br * BC],
        }
    }
}

/// S of one key tile (`s`, `[BR, BC]`) for query rows `[q0, q0 + rows)` of (b, h): every key
/// piece's columns from the base queries `q` turned by each row's shift for that piece's segment.
/// With [`TileKeys::Transposed`] the `row_blocks_rows` rows are computed (padding rows of `q` are
/// zero), with [`TileKeys::Rows`] the `rows` rows.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn rotated_scores<const FMA: bool, T: Element>(
    rot: &QueryRotation<'_>,
    q: &[f32],
    keys: TileKeys<'_, T>,
    kt: &[f32],
    s: &mut [f32],
    scratch: &mut RotaryScratch,
    dp: usize,
    (rows, row_blocks_rows): (usize, usize),
    pieces: &TilePieces,
    (b, h, q_len, q0): (usize, usize, usize, usize),
) {
    let row_blocks = row_blocks_rows / super::tile::ROWS;
    let single = pieces.list.len() == 1;
    for piece in &pieces.list {
        let shift = |r: usize| rot.shift(b, h, q_len, q0 + r, piece.id) as usize;
        let cols = (piece.a, piece.b);
        let dst: &mut [f32] = if single { s } else { &mut scratch.s };
        if (0..rows).all(|r| shift(r) == 0) {
            tile_scores::<FMA, T>(keys, q, kt, dst, dp, (rows, row_blocks), cols);
        } else {
            let qr = &mut scratch.qr;
            qr[..row_blocks_rows * dp].copy_from_slice(&q[..row_blocks_rows * dp]);
            for r in 0..rows {
                let sh = shift(r);
                if sh != 0 {
                    rot.table.rotate_row(&mut qr[r * dp..(r + 1) * dp], sh);
                }
            }
            tile_scores::<FMA, T>(keys, qr, kt, dst, dp, (rows, row_blocks), cols);
        }
        if !single {
            for r in 0..rows {
                let (a, e) = (r * BC + piece.a, r * BC + piece.b);
                s[a..e].copy_from_slice(&scratch.s[a..e]);
            }
        }
    }
}
