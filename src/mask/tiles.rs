//! Tile classification: THE definition shared by the CPU path and the CUDA kernels
//! (kernels/mask.cuh implements exactly this; keep them in step).
//!
//! A tile is the block of query rows `[q0, q1)` times key columns `[k0, k1)` (both clipped to the
//! sequence). Both ranges are cut into segment pieces; each pair of pieces (query segment `sq`
//! rows `[qa, qb)`, key segment `sk` columns `[ka, kb)`) has one rule `r = rule(sq, sk)` and is
//!   - empty when `r` is Blocked, or Causal with `ka > pos(qb - 1)` (every key after every query);
//!   - full  when `r` is Full,    or Causal with `kb - 1 <= pos(qa)` (every key before every query);
//!   - mixed otherwise.
//!
//! The tile is SKIP when every piece pair is empty, FULL when every one is full, PARTIAL otherwise.
//! Only PARTIAL tiles test elements; SKIP tiles are never touched.

use super::rule::{HostRule, Visibility};
use super::spans::SpanRow;

/// Class of a (query tile, key tile) pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TileClass {
    /// No visible element: the tile is not computed.
    Skip = 0,
    /// Some visible elements: computed with a per-element mask.
    Partial = 1,
    /// Every element visible: computed without per-element tests.
    Full = 2,
}

/// How much of a piece pair (query piece `[qa, qb)` x key piece `[ka, kb)`) a rule shows, with
/// `pos_offset = Lk - Lq` (query row `i` at position `i + pos_offset`).
#[inline]
pub fn piece_visibility(rule: Visibility, qa: usize, qb: usize, ka: usize, kb: usize, pos_offset: i64) -> TileClass {
    match rule {
        Visibility::Blocked => TileClass::Skip,
        Visibility::Full => TileClass::Full,
        Visibility::Causal => {
            if (ka as i64) > (qb as i64 - 1) + pos_offset {
                TileClass::Skip
            } else if (kb as i64 - 1) <= qa as i64 + pos_offset {
                TileClass::Full
            } else {
                TileClass::Partial
            }
        }
    }
}

/// Classifies the tile `[q0, q1) x [k0, k1)` of one batch row (ranges already clipped).
#[allow(clippy::too_many_arguments)]
pub(crate) fn classify_tile(
    rule: &HostRule,
    table: &[u8],
    q: SpanRow<'_>,
    kv: SpanRow<'_>,
    (q0, q1): (usize, usize),
    (k0, k1): (usize, usize),
    pos_offset: i64,
) -> TileClass {
    let mut any_visible = false;
    let mut all_full = true;
    q.for_each_span(q0, q1, |sq, qa, qb| {
        kv.for_each_span(k0, k1, |sk, ka, kb| {
            let piece = piece_visibility(rule.lookup(table, sq, sk), qa, qb, ka, kb, pos_offset);
            any_visible |= piece != TileClass::Skip;
            all_full &= piece == TileClass::Full;
        });
    });
    if !any_visible {
        TileClass::Skip
    } else if all_full {
        TileClass::Full
    } else {
        TileClass::Partial
    }
}

/// Whether key `j` is visible to query row `i`: the definition (the reference's, and
/// `SegmentMask::visible`); the kernels mask PARTIAL tiles by runs that agree with it.
#[inline]
pub(crate) fn element_visible(
    rule: &HostRule,
    table: &[u8],
    q: SpanRow<'_>,
    kv: SpanRow<'_>,
    i: usize,
    j: usize,
    pos_offset: i64,
) -> bool {
    rule.lookup(table, q.ids[i], kv.ids[j])
        .allows(i as i64 + pos_offset, j as i64)
}

/// The class of every (query tile, key tile) of batch row `b`, row-major
/// `[ceil(Lq / tile_q), ceil(Lk / tile_k)]`. For inspection and pictures (O(Lq Lk / tiles)); the
/// attention itself classifies tiles on the fly and stores none.
pub fn tile_map(
    mask: &super::SegmentMask,
    batch: usize,
    b: usize,
    (q_len, kv_len): (usize, usize),
    (tile_q, tile_k): (usize, usize),
) -> candle_core::Result<Vec<TileClass>> {
    if tile_q == 0 || tile_k == 0 || b >= batch {
        crate::error::invalid_arg!(
            "tile_map: expected tile sizes >= 1 and b < batch = {batch}, got tiles ({tile_q}, {tile_k}) and b = {b}"
        );
    }
    let host = mask.host_metadata(batch, q_len, kv_len)?;
    let table = host.rule.table_row(b);
    let (qs, ks) = (host.q.row(b), host.kv.row(b));
    let mut out = Vec::new();
    for q0 in (0..q_len).step_by(tile_q) {
        for k0 in (0..kv_len).step_by(tile_k) {
            let qr = (q0, (q0 + tile_q).min(q_len));
            let kr = (k0, (k0 + tile_k).min(kv_len));
            out.push(classify_tile(&host.rule, table, qs, ks, qr, kr, host.pos_offset));
        }
    }
    Ok(out)
}
