//! Key and value tiles prepared once per call, in the form the prefill tile loops read them:
//! K^T (`[dp, BC]` f32, or `[dp / 2, BC]` bf16 pairs, `cpu/bf16_pairs.rs`) and V (`[BC, dp]`
//! widened to f32, or `[BC / 2, dp]` bf16 pairs of keys), for every (batch row, KV head, key
//! tile), zero-padded.
//!
//! Without this, every work item (one head's query tile) transposed and widened each key tile it
//! visits: a key tile was prepared once per query tile and per query head sharing its KV head
//! (GQA), and the transposes and conversions were ~18% of a bf16 prefill (perf, causal RAG
//! shape). A call whose key tiles are each read by one item only (one query tile per head and one
//! query head per KV head) keeps the per-item loads: preparing would add a pass. The tiles take 2
//! (pairs) or 4 (f32) bytes per key element plus 4 per value element, so a call whose tiles would
//! pass [`MAX_BYTES_ENV`] (default [`DEFAULT_MAX_MIB`] MiB) keeps the per-item loads instead.
//! Decode-sized items read K and V rows as stored and never use these.

use rayon::prelude::*;

use super::bf16_pairs::{pair_value_rows, transpose_key_pairs};
use super::element::{widen_into, Element};
use super::load::transpose_rows;
use super::tile::BC;
use super::Strided;
use crate::validate::AttentionShape;

/// Set to a number of MiB to cap the prepared tiles of one call (`0`: never prepare them, every
/// work item loads its own tiles: the path CI's AVX2 run takes). Read once per process.
pub(crate) const MAX_BYTES_ENV: &str = "SEGATTN_CPU_KV_TILES_MAX_MIB";

/// The default cap: 256 MiB (a 16k-token sequence with 8 KV heads of D 128 needs 96 MiB in bf16).
pub(crate) const DEFAULT_MAX_MIB: usize = 256;

fn max_bytes() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        let mib = std::env::var(MAX_BYTES_ENV)
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(DEFAULT_MAX_MIB);
        mib.saturating_mul(1 << 20)
    })
}

/// The prepared K^T or V tiles: f32, or bf16 pairs.
enum Words {
    F32(Vec<f32>),
    Pairs(Vec<u32>),
}

/// Every key tile of a call, prepared (see the module docs).
pub(crate) struct PreparedTiles {
    kv_heads: usize,
    tiles: usize,
    /// Words of one K^T tile (f32 or pairs).
    key_words: usize,
    keys: Words,
    /// Words of one V tile (f32 `[BC, dp]`, or pairs of keys `[BC / 2, dp]`).
    value_words: usize,
    values: Words,
}

impl PreparedTiles {
    /// The tiles of `k` (as pairs with `pairs`: k must be bf16) and, when given, of `v`, for a
    /// call of `q_tiles` query tiles a head; `None` when no key tile is read by two work items
    /// (one query tile and one query head a KV head, as a packed decode step of a large GQA
    /// group: preparing would only add a pass over K and V) or the tiles would pass the cap.
    pub fn build<K: Element, T: Element>(
        k: Strided<'_, K>,
        v: Option<Strided<'_, T>>,
        shape: &AttentionShape,
        q_tiles: usize,
        dp: usize,
        pairs: bool,
    ) -> Option<Self> {
        let (d, kv_heads) = (shape.head_dim, shape.num_kv_heads);
        if shape.group_size() * q_tiles < 2 {
            return None;
        }
        let tiles = shape.kv_len.div_ceil(BC);
        let slots = shape.batch * kv_heads * tiles;
        let key_words = if pairs { dp / 2 * BC } else { dp * BC };
        let value_words = match (&v, pairs) {
            (None, _) => 0,
            (Some(_), false) => BC * dp,
            (Some(_), true) => BC / 2 * dp,
        };
        let bytes = slots * (key_words + value_words) * 4;
        if bytes > max_bytes() {
            return None;
        }
        // Slot i is key tile t of KV head kh of batch row b, i = (b * Hkv + kh) * tiles + t.
        let locate = |i: usize| {
            let t = i % tiles;
            let kh = (i / tiles) % kv_heads;
            let b = i / (tiles * kv_heads);
            let k0 = t * BC;
            (b, kh, k0, BC.min(shape.kv_len - k0))
        };
        let keys = if pairs {
            let mut words = vec![0u32; slots * key_words];
            words.par_chunks_mut(key_words).enumerate().for_each(|(i, slot)| {
                let (b, kh, k0, cols) = locate(i);
                transpose_key_pairs(slot, cols, d, |j| k.row(b, k0 + j, kh, d));
            });
            Words::Pairs(words)
        } else {
            let mut words = vec![0f32; slots * key_words];
            words.par_chunks_mut(key_words).enumerate().for_each(|(i, slot)| {
                let (b, kh, k0, cols) = locate(i);
                transpose_rows(slot, cols, d, |j| k.row(b, k0 + j, kh, d));
            });
            Words::F32(words)
        };
        let values = match v {
            Some(v) if pairs => {
                let mut words = vec![0u32; slots * value_words];
                words.par_chunks_mut(value_words).enumerate().for_each(|(i, slot)| {
                    let (b, kh, k0, cols) = locate(i);
                    pair_value_rows(slot, cols, d, dp, |j| v.row(b, k0 + j, kh, d));
                });
                Words::Pairs(words)
            }
            Some(v) => {
                let mut words = vec![0f32; slots * value_words];
                words.par_chunks_mut(value_words).enumerate().for_each(|(i, slot)| {
                    let (b, kh, k0, cols) = locate(i);
                    for j in 0..cols {
                        widen_into(&mut slot[j * dp..j * dp + d], v.row(b, k0 + j, kh, d));
                    }
                });
                Words::F32(words)
            }
            None => Words::F32(Vec::new()),
        };
        Some(Self {
            kv_heads,
            tiles,
            key_words,
            keys,
            value_words,
            values,
        })
    }

    fn slot(&self, b: usize, kh: usize, k0: usize) -> usize {
        (b * self.kv_heads + kh) * self.tiles + k0 / BC
    }

    /// Tile `slot` of `words` (`len` words each) if they are f32, else empty.
    fn f32_tile(words: &Words, slot: usize, len: usize) -> &[f32] {
        match words {
            Words::F32(w) if len > 0 => &w[slot * len..][..len],
            _ => &[],
        }
    }

    /// Tile `slot` of `words` (`len` words each) if they are pairs, else empty.
    fn pair_tile(words: &Words, slot: usize, len: usize) -> &[u32] {
        match words {
            Words::Pairs(w) if len > 0 => &w[slot * len..][..len],
            _ => &[],
        }
    }

    /// The key tile starting at `k0` of KV head `kh` of batch row `b`.
    pub fn tile(&self, b: usize, kh: usize, k0: usize) -> Tile<'_> {
        let slot = self.slot(b, kh, k0);
        Tile {
            kt: Self::f32_tile(&self.keys, slot, self.key_words),
            kt_pairs: Self::pair_tile(&self.keys, slot, self.key_words),
            v: Self::f32_tile(&self.values, slot, self.value_words),
            v_pairs: Self::pair_tile(&self.values, slot, self.value_words),
        }
    }
}

/// One prepared key tile: K^T (`[dp, BC]`) and V (`[BC, dp]`) in f32, or their bf16 pairs
/// (`[dp / 2, BC]`, `[BC / 2, dp]`); the other form empty, and V empty when built without it.
#[derive(Clone, Copy)]
pub(crate) struct Tile<'a> {
    pub kt: &'a [f32],
    pub kt_pairs: &'a [u32],
    pub v: &'a [f32],
    pub v_pairs: &'a [u32],
}
