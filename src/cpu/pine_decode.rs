//! PINE's importance of decode rows on the CPU, read straight from the rotated KV cache.
//!
//! A generated (or suffix) row's importance needs `q . k` of the UN-rotated projections over
//! every segment key, but the cache holds `k` rotated at its original position `p_k`. Since
//! `q . k == rope(q, p_k) . rope(k, p_k)`, the query is turned instead of the keys — and segments
//! are right-aligned to end at the same position `E - 1`, so the segment keys use at most
//! `max L_j` distinct positions: each row turns its query once per position (`max L_j x D`
//! work), then every segment key costs one dot product with the cache row as it is. (Where a
//! position holds fewer keys than the query heads sharing them, the keys are turned back instead.)
//! No un-rotated copy of the cache, no extra pass over it.
//!
//! Per (batch row, query head, row): `s_j = scale * q_{p_j} . k_j` over the segment keys, softmax
//! over all of them (f32), the probabilities summed per segment and divided by its length. The
//! query heads of one KV head (GQA) are done together: each cache row is read once.

use candle_core::Result;
use rayon::prelude::*;

use super::exp2::exp2;
use super::tile::{lane_max, lane_sum, madd};
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
    // Work items: (batch row, KV head, row); the query heads of one KV head share every key row
    // (converted to f32 once, dotted with each head's turned query).
    let use_fma = super::fma_available();
    let per_item: Vec<Vec<f32>> = (0..batch * kv_heads * q_len)
        .into_par_iter()
        .map(|item| {
            let i = item % q_len;
            let kh = (item / q_len) % kv_heads;
            let b = item / (q_len * kv_heads);
            let args = ItemArgs {
                q,
                k,
                layout: &layouts[b],
                table,
                scale,
                sk,
                group,
                d,
                at: (b, kh, i),
            };
            #[cfg(target_arch = "x86_64")]
            if use_fma {
                // SAFETY: the CPU has AVX2 and FMA (checked at run time).
                return unsafe { item_scores_avx2(&args) };
            }
            item_scores::<T, false>(&args)
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

/// What one work item of [`suffix_importance`] reads: (batch row, KV head, query row) `at`.
#[derive(Clone, Copy)]
struct ItemArgs<'a, T> {
    q: Strided<'a, T>,
    k: Strided<'a, T>,
    layout: &'a PineLayout,
    table: &'a RopeTable,
    scale: f32,
    sk: usize,
    group: usize,
    d: usize,
    at: (usize, usize, usize),
}

/// The importance rows `[group, sk]` of the query heads of one KV head for one query row.
#[inline(always)]
fn item_scores<T: Element, const FMA: bool>(args: &ItemArgs<'_, T>) -> Vec<f32> {
    let ItemArgs {
        q,
        k,
        layout,
        table,
        scale,
        sk,
        group,
        d,
        at: (b, kh, i),
    } = *args;
    let half = d / 2;
    let mut rows = vec![0f32; group * sk];
    let p = layout.prefix_len;
    let end = p + layout.segment_lens.iter().sum::<usize>();
    let longest = layout.segment_lens.iter().copied().max().unwrap_or(0);
    if longest == 0 {
        return rows;
    }
    // Each head's query turned once to each position of [E - longest, E) that has keys, then
    // dotted with those keys.
    let base = end - longest;
    // The group's queries, scaled, one after another (`group x D`).
    let queries: Vec<f32> = (0..group)
        .flat_map(|g| q.row(b, i, kh * group + g, d).iter().map(|x| x.to_f32() * scale))
        .collect();
    let starts: Vec<usize> = layout
        .segment_lens
        .iter()
        .scan(p, |at, &len| {
            let s = *at;
            *at += len;
            Some(s)
        })
        .collect();
    let keys = end - p;
    let mut scores = vec![0f32; group * keys];
    // Per position offset o (position base + o): whether the keys there are fewer than the heads
    // (two long answers, GQA 4: turning those keys back is cheaper than turning every head's
    // query; both give q . k of the un-rotated projections), else every head's query turned to
    // it, computed once (`[longest, group, D]`). Then the keys are read segment by segment, in
    // memory order (position by position they were 20 strided streams at the RAG prompt).
    let turn_keys: Vec<bool> = (0..longest)
        .map(|o| layout.segment_lens.iter().filter(|&&len| o + len >= longest).count() < group)
        .collect();
    let cos_sin = |o: usize| {
        let pos = base + o;
        (
            &table.cos[pos * half..(pos + 1) * half],
            &table.sin[pos * half..(pos + 1) * half],
        )
    };
    let mut turned = vec![
        0f32;
        if turn_keys.iter().all(|&t| t) {
            0
        } else {
            longest * group * d
        }
    ];
    for (o, &keys_turn) in turn_keys.iter().enumerate() {
        if !keys_turn {
            let (c, s) = cos_sin(o);
            let at = &mut turned[o * group * d..(o + 1) * group * d];
            for (t, qrow) in at.chunks_exact_mut(d).zip(queries.chunks_exact(d)) {
                rotate::<FMA>(t, qrow, c, s, 1.0);
            }
        }
    }
    let (mut krow, mut raw) = (vec![0f32; d], vec![0f32; d]);
    for (&len, &start) in layout.segment_lens.iter().zip(&starts) {
        for t in 0..len {
            // Segment tokens are right-aligned: token t of a segment of `len` sits at offset
            // longest - len + t.
            let o = longest - len + t;
            let row = k.row(b, start + t, kh, d);
            let at = start - p + t;
            if turn_keys[o] {
                for (dst, x) in raw.iter_mut().zip(row) {
                    *dst = x.to_f32();
                }
                let (c, s) = cos_sin(o);
                rotate::<FMA>(&mut krow, &raw, c, s, -1.0);
                dots::<FMA>(&queries, &krow, &mut scores, keys, at);
            } else {
                for (dst, x) in krow.iter_mut().zip(row) {
                    *dst = x.to_f32();
                }
                dots::<FMA>(
                    &turned[o * group * d..(o + 1) * group * d],
                    &krow,
                    &mut scores,
                    keys,
                    at,
                );
            }
        }
    }
    // Per head: softmax over all segment keys, summed per segment, divided by its length.
    // (The exponentials as the attention's: 2^x by a vectorised polynomial, about one f32 ulp;
    // libm's expf was a call per key and a dependency chain through the sum.)
    for (g, head_scores) in scores.chunks_exact_mut(keys).enumerate() {
        let max = lane_max(head_scores);
        for x in head_scores.iter_mut() {
            *x = exp2((*x - max) * std::f32::consts::LOG2_E);
        }
        let total = lane_sum(head_scores);
        let mut at = 0;
        for (j, &len) in layout.segment_lens.iter().enumerate() {
            let mass = lane_sum(&head_scores[at..at + len]);
            rows[g * sk + j + 1] = mass / total / len as f32;
            at += len;
        }
    }
    rows
}

/// [`item_scores`] compiled for AVX2 + FMA (the loops vectorise 8 wide and fuse their
/// multiply-adds; the generic build is SSE2 only).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn item_scores_avx2<T: Element>(args: &ItemArgs<'_, T>) -> Vec<f32> {
    item_scores::<T, true>(args)
}

/// `dst` = `x` turned (rotate-half) by the angle whose cos / sin are `c` / `s`, times `sign` for
/// the inverse.
#[inline(always)]
fn rotate<const FMA: bool>(dst: &mut [f32], x: &[f32], c: &[f32], s: &[f32], sign: f32) {
    let half = c.len();
    for j in 0..half {
        let (x1, x2, sn) = (x[j], x[j + half], sign * s[j]);
        dst[j] = madd::<FMA>(x1, c[j], -(x2 * sn));
        dst[j + half] = madd::<FMA>(x2, c[j], x1 * sn);
    }
}

/// `scores[g keys + at] = qs_g . k` for each query `qs_g` of `qs` (`group x D`): the key read
/// once for four queries at a time, each over 8 independent lanes (one register each; a dot per
/// query reloaded the key and vectorised poorly).
#[inline(always)]
fn dots<const FMA: bool>(qs: &[f32], k: &[f32], scores: &mut [f32], keys: usize, at: usize) {
    let d = k.len();
    let group = qs.len() / d;
    let mut g0 = 0;
    if d % 8 == 0 {
        while g0 + 4 <= group {
            let mut acc = [[0f32; 8]; 4];
            let q4: [&[f32]; 4] = std::array::from_fn(|j| &qs[(g0 + j) * d..(g0 + j + 1) * d]);
            for (c, kc) in k.chunks_exact(8).enumerate() {
                for (acc_j, q) in acc.iter_mut().zip(&q4) {
                    let qc = &q[c * 8..c * 8 + 8];
                    for l in 0..8 {
                        acc_j[l] = madd::<FMA>(qc[l], kc[l], acc_j[l]);
                    }
                }
            }
            for (j, acc_j) in acc.iter().enumerate() {
                scores[(g0 + j) * keys + at] = acc_j.iter().sum();
            }
            g0 += 4;
        }
    }
    for g in g0..group {
        scores[g * keys + at] = dot::<FMA, f32>(&qs[g * d..(g + 1) * d], k);
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
