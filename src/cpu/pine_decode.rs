//! PINE's importance of decode rows on the CPU, read straight from the rotated KV cache.
//!
//! A generated (or suffix) row's importance needs `q . k` of the UN-rotated projections over
//! every segment key, but the cache holds `k` rotated at its original position `p_k`. Since
//! `q . k == rope(q, p_k) . rope(k, p_k)`, the query is turned instead of the keys — and segments
//! are right-aligned to end at the same position `E - 1`, so the segment keys use at most
//! `max L_j` distinct positions: each row turns its query once per position (`max L_j x D`
//! work), then every segment key costs one dot product with the cache row as it is. No
//! un-rotated copy of the cache, no extra pass over it.
//!
//! Per (batch row, query head, row): `s_j = scale * q_{p_j} . k_j` over the segment keys, softmax
//! over all of them (f32), the probabilities summed per segment and divided by its length. The
//! query heads of one KV head (GQA) are done together: each cache row is read once.

use candle_core::Result;
use rayon::prelude::*;

use super::{Element, Strided};
use crate::mask::PineLayout;
use crate::pine::RopeTable;
use crate::validate::AttentionShape;

/// Importance `[B, H, Lq, sk]` (segment ids `1..=n`, other ids 0) of the `Lq` query rows `q`
/// (un-rotated, the last rows of each layout's tokens) against the rotated cache `k`.
pub(crate) fn suffix_importance<T: Element>(
    q: Strided<'_, T>,
    k: Strided<'_, T>,
    shape: AttentionShape,
    layouts: &[PineLayout],
    table: &RopeTable,
    scale: f32,
    sk: usize,
) -> Result<Vec<f32>> {
    let AttentionShape {
        batch,
        q_len,
        num_heads,
        head_dim: d,
        ..
    } = shape;
    let (group, kv_heads) = (shape.group_size(), shape.num_kv_heads);
    let half = d / 2;
    // Work items: (batch row, KV head, row); the query heads of one KV head share every key row
    // (converted to f32 once, dotted with each head's turned query).
    let per_item: Vec<Vec<f32>> = (0..batch * kv_heads * q_len)
        .into_par_iter()
        .map(|item| {
            let i = item % q_len;
            let kh = (item / q_len) % kv_heads;
            let b = item / (q_len * kv_heads);
            let mut rows = vec![0f32; group * sk];
            let layout = &layouts[b];
            let p = layout.prefix_len;
            let end = p + layout.segment_lens.iter().sum::<usize>();
            let longest = layout.segment_lens.iter().copied().max().unwrap_or(0);
            if longest == 0 {
                return rows;
            }
            // Each head's query turned to every position a segment key can have: [E - longest, E).
            let base = end - longest;
            let mut turned = vec![0f32; group * longest * d];
            for (g, tg) in turned.chunks_exact_mut(longest * d).enumerate() {
                let qrow: Vec<f32> = q
                    .row(b, i, kh * group + g, d)
                    .iter()
                    .map(|x| x.to_f32() * scale)
                    .collect();
                for (o, t) in tg.chunks_exact_mut(d).enumerate() {
                    let pos = base + o;
                    let (c, s) = (
                        &table.cos[pos * half..(pos + 1) * half],
                        &table.sin[pos * half..(pos + 1) * half],
                    );
                    for j in 0..half {
                        let (x1, x2) = (qrow[j], qrow[j + half]);
                        t[j] = x1 * c[j] - x2 * s[j];
                        t[j + half] = x2 * c[j] + x1 * s[j];
                    }
                }
            }
            // Scores of every segment key for every head: [group][keys].
            let keys = end - p;
            let mut scores = vec![0f32; group * keys];
            let mut krow = vec![0f32; d];
            let (mut start, mut at) = (p, 0);
            for &len in &layout.segment_lens {
                for t in 0..len {
                    for (dst, x) in krow.iter_mut().zip(k.row(b, start + t, kh, d)) {
                        *dst = x.to_f32();
                    }
                    let o = (longest - len + t) * d;
                    for g in 0..group {
                        scores[g * keys + at] = dot(&turned[g * longest * d + o..][..d], &krow);
                    }
                    at += 1;
                }
                start += len;
            }
            // Per head: softmax over all segment keys, summed per segment, divided by its length.
            for (g, head_scores) in scores.chunks_exact_mut(keys).enumerate() {
                let max = head_scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut total = 0f32;
                for x in head_scores.iter_mut() {
                    *x = (*x - max).exp();
                    total += *x;
                }
                let mut at = 0;
                for (j, &len) in layout.segment_lens.iter().enumerate() {
                    let mass: f32 = head_scores[at..at + len].iter().sum();
                    rows[g * sk + j + 1] = mass / total / len as f32;
                    at += len;
                }
            }
            rows
        })
        .collect();
    let mut out = vec![0f32; batch * num_heads * q_len * sk];
    for (item, rows) in per_item.iter().enumerate() {
        let i = item % q_len;
        let kh = (item / q_len) % kv_heads;
        let b = item / (q_len * kv_heads);
        for g in 0..group {
            let h = kh * group + g;
            out[((b * num_heads + h) * q_len + i) * sk..][..sk].copy_from_slice(&rows[g * sk..(g + 1) * sk]);
        }
    }
    Ok(out)
}

/// `a . b` in f32 over 8 independent lanes (vectorises; one chain would not).
#[inline]
fn dot<T: Element>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l].to_f32();
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
