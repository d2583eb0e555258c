//! PINE's importance of decode rows on the CPU, read straight from the rotated KV cache.
//!
//! A generated (or suffix) row's importance needs `q . k` of the UN-rotated projections over
//! every segment key, but the cache holds `k` rotated at its original position `p_k`. Since
//! `q . k == rope(q, p_k) . rope(k, p_k)`, the query is turned instead of the keys — and segments
//! are right-aligned to end at the same position `E - 1`, so the segment keys use at most
//! `max L_j` distinct positions: each row turns its query once per position (`max L_j x D`
//! work; once per block of up to 32 segments), then every segment key costs one dot product with
//! the cache row as it is. (Where a
//! position holds fewer keys than the query heads sharing them, the keys are turned back instead.)
//! No un-rotated copy of the cache, no extra pass over it.
//!
//! Per (batch row, query head, row): `s_j = scale * q_{p_j} . k_j` over the segment keys, softmax
//! over all of them (f32), the probabilities summed per segment and divided by its length. The
//! query heads of one KV head (GQA) are done together: each cache row is read once (once per run
//! of heads where a step has fewer items than threads: [`run_heads`]).

use candle_core::Result;
use rayon::prelude::*;

use super::dots::{dots, dots_pair, turned_back_dots_pair};
use super::exp2::exp2;
use super::reduce::{lane_max_with, lane_sum_with};
use super::tile::madd;
#[cfg(target_arch = "x86_64")]
use super::{
    dots::{dots_simd, turned_back_simd},
    simd::Avx512,
};
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
    // Work items: (batch row, KV head, row, run of query heads); the query heads of a run share
    // every key row (converted to f32 once, dotted with each head's turned query). One run holds
    // the whole group unless those items are fewer than the threads (an MQA model's step: one
    // item of 32 heads), where the group is cut into runs of a multiple of 4 heads (each run then
    // reads the segment keys: a small cache, one KV head). A head's scores are the same bits in
    // any run: the kernels' sums do not depend on how many heads share a block.
    let run_heads = run_heads(group, batch * kv_heads * q_len, rayon::current_num_threads());
    let runs = group.div_ceil(run_heads);
    let use_fma = super::fma_available();
    let use_avx512 = super::element::avx512_available();
    // Item index -> (batch row, KV head, row, the run's heads `[first, end)` of the group).
    let coords = |item: usize| {
        let run = item % runs;
        let i = (item / runs) % q_len;
        let kh = (item / (runs * q_len)) % kv_heads;
        let heads = (run * run_heads, ((run + 1) * run_heads).min(group));
        (item / (runs * q_len * kv_heads), kh, i, heads)
    };
    let per_item: Vec<Vec<f32>> = (0..batch * kv_heads * q_len * runs)
        .into_par_iter()
        .map(|item| {
            let (b, kh, i, heads) = coords(item);
            let args = ItemArgs {
                q,
                k,
                layout: &layouts[b],
                table,
                scale,
                sk,
                group,
                heads,
                d,
                at: (b, kh, i),
            };
            #[cfg(target_arch = "x86_64")]
            if use_avx512 {
                // SAFETY: the CPU has AVX-512F, AVX2, FMA and F16C (checked at run time).
                return unsafe { item_scores_avx512(&args) };
            }
            #[cfg(target_arch = "x86_64")]
            if use_fma {
                // SAFETY: the CPU has AVX2 and FMA (checked at run time).
                return unsafe { item_scores_avx2(&args) };
            }
            item_scores::<T, false, false>(&args)
        })
        .collect();
    let mut out = vec![0f32; batch * num_heads * q_len * sk];
    for (item, rows) in per_item.iter().enumerate() {
        let (b, kh, i, (first, end)) = coords(item);
        for (r, g) in (first..end).enumerate() {
            let h = kh * group + g;
            out[((b * num_heads + h) * q_len + i) * sk..][..sk].copy_from_slice(&rows[r * sk..(r + 1) * sk]);
        }
    }
    Ok(out)
}

/// The query heads of a run, when a KV head's `group` of them is cut into runs for `items`
/// (batch row, KV head, row) items on `threads` threads: the whole group where the items fill the
/// threads (or with `SEGATTN_CPU_DECODE_SPLIT=0`), else a multiple of 4 (the dot kernels'
/// block, so that the blocks of a run are those of the whole group) giving about two items a
/// thread.
fn run_heads(group: usize, items: usize, threads: usize) -> usize {
    if items == 0 || items >= threads || group < 8 || super::decode_split::disabled() {
        return group;
    }
    let runs = (2 * threads).div_ceil(items).min(group / 4);
    group.div_ceil(runs).div_ceil(4) * 4
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
    /// The run of the group's query heads `[first, end)` the item scores.
    heads: (usize, usize),
    d: usize,
    at: (usize, usize, usize),
}

/// The importance rows `[group, sk]` of the query heads of one KV head for one query row. `W16`:
/// built inside an AVX-512 function ([`item_scores_avx512`]), where the dot kernels are inlined.
#[inline(always)]
fn item_scores<T: Element, const FMA: bool, const W16: bool>(args: &ItemArgs<'_, T>) -> Vec<f32> {
    let ItemArgs {
        q,
        k,
        layout,
        table,
        scale,
        sk,
        group,
        heads: (first, end_head),
        d,
        at: (b, kh, i),
    } = *args;
    let half = d / 2;
    let run = end_head - first;
    let mut rows = vec![0f32; run * sk];
    let p = layout.prefix_len;
    let end = p + layout.segment_lens.iter().sum::<usize>();
    let longest = layout.segment_lens.iter().copied().max().unwrap_or(0);
    if longest == 0 {
        return rows;
    }
    // Each head's query turned once to each position of [E - longest, E) that has keys, then
    // dotted with those keys.
    let base = end - longest;
    // The run's queries, scaled, one after another (`run x D`).
    let queries: Vec<f32> = (first..end_head)
        .flat_map(|g| q.row(b, i, kh * group + g, d).iter().map(|x| x.to_f32() * scale))
        .collect();
    let keys = end - p;
    let mut scores = vec![0f32; run * keys];
    let cos_sin = |o: usize| {
        let pos = base + o;
        (
            &table.cos[pos * half..(pos + 1) * half],
            &table.sin[pos * half..(pos + 1) * half],
        )
    };
    // Segments SEG_BLOCK at a time (all of them at the usual counts), offset by offset within a
    // block (offset o = position base + o): every head's query is turned to the offset's position
    // once, into `turned` (`run x D`, 2 KB at GQA 4, D 128, in L1), and the block's keys there
    // are dotted with it, two at a time. (A table of every offset's turned queries, read once per
    // key in segment order, came from L2 at ~64 cycles a key.)
    let mut turned = vec![0f32; run * d];
    // (length, first token) of each segment.
    let segments: Vec<(usize, usize)> = layout
        .segment_lens
        .iter()
        .scan(p, |at, &len| {
            *at += len;
            Some((len, *at - len))
        })
        .collect();
    for block in segments.chunks(SEG_BLOCK) {
        for o in 0..longest {
            let here = block.iter().filter(|&&(len, _)| o + len >= longest).count();
            // Fewer keys here than query heads sharing them (two long answers, GQA 4): turning
            // those keys back is cheaper than turning every head's query; both give q . k of
            // the un-rotated projections. (Decided by the whole group, so that a run's scores
            // are those of the group's.)
            let turn_keys = here < group;
            let (c, s) = cos_sin(o);
            if here > 0 && !turn_keys {
                for (t, qrow) in turned.chunks_exact_mut(d).zip(queries.chunks_exact(d)) {
                    rotate::<FMA>(t, qrow, c, s);
                }
            }
            // Keys go in pairs (each query chunk loaded once for both): cache rows dotted with
            // `turned`, or keys turned back in registers and dotted with `queries`.
            let mut pending: Option<(&[T], usize)> = None;
            for &(len, start) in block {
                // Segment tokens are right-aligned: token t of a segment of `len` sits at offset
                // longest - len + t.
                let Some(t) = (o + len).checked_sub(longest) else {
                    continue;
                };
                let row = k.row(b, start + t, kh, d);
                let at = start - p + t;
                if FMA && t + PREFETCH_ROWS < len {
                    super::load::prefetch_l1(k.row(b, start + t + PREFETCH_ROWS, kh, d));
                }
                if turn_keys {
                    if let Some((first, first_at)) = pending.take() {
                        let pair = ([first, row], [first_at, at]);
                        turned_back_pair::<T, FMA, W16>(&queries, pair, (c, s), &mut scores, keys);
                    } else {
                        pending = Some((row, at));
                    }
                } else if let Some((first, first_at)) = pending.take() {
                    dots_pair_of::<T, FMA, W16>(&turned, ([first, row], [first_at, at]), &mut scores, keys);
                } else {
                    pending = Some((row, at));
                }
            }
            match pending {
                // A last key turned back on its own (paired with itself).
                Some((row, at)) if turn_keys => {
                    turned_back_pair::<T, FMA, W16>(&queries, ([row, row], [at, at]), (c, s), &mut scores, keys);
                }
                // The cache row as it is: widened in registers where the build has AVX2.
                Some((row, at)) => dots::<FMA, T>(&turned, row, &mut scores, keys, at),
                None => {}
            }
        }
    }
    // Per head: softmax over all segment keys, summed per segment, divided by its length.
    // (The exponentials as the attention's: 2^x by a vectorised polynomial, about one f32 ulp;
    // libm's expf was a call per key and a dependency chain through the sum.)
    for (g, head_scores) in scores.chunks_exact_mut(keys).enumerate() {
        let max = lane_max_with::<FMA>(head_scores);
        for x in head_scores.iter_mut() {
            *x = exp2((*x - max) * std::f32::consts::LOG2_E);
        }
        let total = lane_sum_with::<FMA>(head_scores);
        let mut at = 0;
        for (j, &len) in layout.segment_lens.iter().enumerate() {
            let mass = lane_sum_with::<FMA>(&head_scores[at..at + len]);
            rows[g * sk + j + 1] = mass / total / len as f32;
            at += len;
        }
    }
    rows
}

/// [`item_scores`] compiled for AVX2 + FMA + F16C (the loops vectorise 8 wide and fuse their
/// multiply-adds, the dots take `dots.rs`'s AVX2 kernels; the generic build is SSE2 only).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn item_scores_avx2<T: Element>(args: &ItemArgs<'_, T>) -> Vec<f32> {
    item_scores::<T, true, false>(args)
}

/// [`item_scores`] where the CPU also has AVX-512F: the same code, with the dots' AVX-512 kernels
/// inlined (`dots.rs` picks them at run time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn item_scores_avx512<T: Element>(args: &ItemArgs<'_, T>) -> Vec<f32> {
    item_scores::<T, true, true>(args)
}

/// [`dots_pair`] from [`item_scores`]: with `W16` (an AVX-512 build) the 16-lane kernel inlined
/// here, no run-time dispatch and no call per pair of keys (called, the pair's setup and
/// register saves were ~10% of the judge's importance).
#[inline(always)]
fn dots_pair_of<T: Element, const FMA: bool, const W16: bool>(
    qs: &[f32],
    (rows, at): ([&[T]; 2], [usize; 2]),
    scores: &mut [f32],
    keys: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if W16 && rows[0].len().is_multiple_of(16) {
        // SAFETY: `W16` is only set inside `item_scores_avx512`, built for (and called on a CPU
        // with) AVX-512F, AVX2, FMA and F16C; D is a multiple of 16.
        unsafe { dots_simd::<Avx512, 2, T>(qs, rows, at, scores, keys) };
        return;
    }
    dots_pair::<FMA, T>(qs, rows, at, scores, keys);
}

/// [`turned_back_dots_pair`] from [`item_scores`], inlined as [`dots_pair_of`].
#[inline(always)]
fn turned_back_pair<T: Element, const FMA: bool, const W16: bool>(
    qs: &[f32],
    (rows, at): ([&[T]; 2], [usize; 2]),
    cs: (&[f32], &[f32]),
    scores: &mut [f32],
    keys: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if W16 && rows[0].len().is_multiple_of(32) {
        // SAFETY: as in `dots_pair_of`; D / 2 is a multiple of 16.
        unsafe { turned_back_simd::<Avx512, T>(qs, rows, cs, at, scores, keys) };
        return;
    }
    turned_back_dots_pair::<FMA, T>(qs, rows, cs, at, scores, keys);
}

/// How many offsets ahead [`item_scores`] asks for each segment's cache row: a head's slice of
/// each row is a few cache lines a whole token row apart (`Hkv D` elements), a stride the
/// hardware prefetcher follows late. (Measured at the RAG prompt, 20 streams: 1-2 best, 8 ~8%
/// slower, the lines evicted before use.)
const PREFETCH_ROWS: usize = 2;

/// Segments whose keys [`item_scores`] reads side by side, offset by offset (one memory stream
/// each).
const SEG_BLOCK: usize = 32;

/// `dst` = `x` turned (rotate-half) by the angle whose cos / sin are `c` / `s`.
#[inline(always)]
fn rotate<const FMA: bool>(dst: &mut [f32], x: &[f32], c: &[f32], s: &[f32]) {
    let half = c.len();
    #[cfg(target_arch = "x86_64")]
    if FMA && half.is_multiple_of(8) {
        // SAFETY: as in `dots`.
        unsafe { rotate_avx2(dst, x, c, s) };
        return;
    }
    for j in 0..half {
        let (x1, x2) = (x[j], x[j + half]);
        dst[j] = madd::<FMA>(x1, c[j], -(x2 * s[j]));
        dst[j + half] = madd::<FMA>(x2, c[j], x1 * s[j]);
    }
}

/// [`rotate`] 8 pairs at a time.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `c.len() == s.len()` a multiple of 8, `dst` and `x` of twice
/// that length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn rotate_avx2(dst: &mut [f32], x: &[f32], c: &[f32], s: &[f32]) {
    use std::arch::x86_64::*;
    let half = c.len();
    assert!(
        s.len() == half && dst.len() == 2 * half && x.len() == 2 * half,
        "rotate: lengths"
    );
    let (xp, dp) = (x.as_ptr(), dst.as_mut_ptr());
    for j in (0..half).step_by(8) {
        // SAFETY: j + 8 <= half, so every access is inside its slice (lengths asserted above).
        unsafe {
            let (x1, x2) = (_mm256_loadu_ps(xp.add(j)), _mm256_loadu_ps(xp.add(j + half)));
            let (cv, sv) = (_mm256_loadu_ps(c.as_ptr().add(j)), _mm256_loadu_ps(s.as_ptr().add(j)));
            _mm256_storeu_ps(dp.add(j), _mm256_fmsub_ps(x1, cv, _mm256_mul_ps(x2, sv)));
            _mm256_storeu_ps(dp.add(j + half), _mm256_fmadd_ps(x2, cv, _mm256_mul_ps(x1, sv)));
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::{run_heads, suffix_importance, Strided};
    use crate::mask::PineLayout;
    use crate::pine::Rope;
    use crate::validate::AttentionShape;

    /// Runs are multiples of 4 heads (the dot kernels' block) and fill the threads.
    #[test]
    fn runs_of_heads() {
        assert_eq!(run_heads(32, 1, 2), 8);
        assert_eq!(run_heads(32, 1, 8), 4);
        assert_eq!(run_heads(32, 8, 2), 32, "GQA at Llama-3-8B: the items fill 2 threads");
        assert_eq!(run_heads(10, 1, 2), 8);
        assert_eq!(run_heads(6, 1, 8), 6, "below 8 heads: one run");
    }

    /// A decode row's importance is the same bits whether a KV head's query heads are scored in
    /// one item or in runs over several (forced by pools of 1 and 8 threads): MQA, 32 heads, two
    /// long answers (keys turned back) and 40 short documents (more keys a position than heads:
    /// queries turned), bf16 and f32.
    #[test]
    fn runs_of_heads_give_the_same_bits() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (layout, dtype) in [
            (PineLayout::new(20, &[300, 280], 9), candle_core::DType::BF16),
            (PineLayout::new(33, &[12; 40], 5), candle_core::DType::F32),
        ] {
            let (l, h, d) = (layout.len() + 1, 32, 64);
            let q = (Tensor::randn(0f32, 1.0, (1, 1, h, d), &dev)? + 0.1)?.to_dtype(dtype)?;
            let k = (Tensor::randn(0f32, 1.0, (1, l, 1, d), &dev)? + 0.1)?.to_dtype(dtype)?;
            let v = k.clone();
            let shape = AttentionShape::of(&q, &k, &v)?;
            let table = Rope::new(10_000.0).table(d, l)?;
            let sk = layout.segment_lens.len() + 1;
            let run = |threads: usize| -> candle_core::Result<Vec<u32>> {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let (qs, ql) = q.storage_and_layout();
                let (ks, kl) = k.storage_and_layout();
                let (candle_core::Storage::Cpu(qc), candle_core::Storage::Cpu(kc)) = (&*qs, &*ks) else {
                    unreachable!("CPU tensors")
                };
                let scores = match dtype {
                    candle_core::DType::BF16 => pool.install(|| {
                        let q = Strided::new(qc.as_slice::<half::bf16>()?, ql);
                        let k = Strided::new(kc.as_slice::<half::bf16>()?, kl);
                        suffix_importance(q, k, shape, std::slice::from_ref(&layout), &table, 0.125, sk)
                    })?,
                    _ => pool.install(|| {
                        let q = Strided::new(qc.as_slice::<f32>()?, ql);
                        let k = Strided::new(kc.as_slice::<f32>()?, kl);
                        suffix_importance(q, k, shape, std::slice::from_ref(&layout), &table, 0.125, sk)
                    })?,
                };
                Ok(scores.iter().map(|x| x.to_bits()).collect())
            };
            let whole = run(1)?;
            assert!(whole.iter().any(|&x| x != 0), "{layout:?}: all zero");
            assert_eq!(whole, run(8)?, "{layout:?} {dtype:?}");
        }
        Ok(())
    }
}
