//! The exact per-segment attention mass: the oracle of [`crate::segment_scores`] and of the
//! attention's fused mass output. Dense f64 scores, the explicit mask, the softmax, then plain
//! sums; slow on purpose.

use candle_core::{Device, Result, Tensor};

use super::{dense_mask_vec, to_f64};
use crate::error::invalid_arg;
use crate::mask::SegmentMask;
use crate::scores::{HeadReduction, QueryReduction, SegmentScoreOptions};
use crate::validate::{default_scale, AttentionShape};

/// Exact per-segment attention mass, f64 on the CPU, `[B, Ho, Lo, Sk]`.
///
/// q: `[B, Lq, H, D]`, k: `[B, Lk, Hkv, D]` (`H % Hkv == 0`), any of f32 / f16 / bf16; the mask
/// as for the attention. With `P[b, h, i, :]` the softmax of `scale * q_i . k_j` over the keys
/// `j` visible to query `i` (all zero when none is):
///
/// `mass[b, h, i, s] = sum_{j : kv_id(b, j) = s} P[b, h, i, j]`,
///
/// then divided by `L_s` (the number of keys of id `s` in row `b`) when normalising by length,
/// summed or averaged over the query rows of each query id (`Lo = Sq`), summed or averaged over
/// heads (`Ho = 1`). See [`SegmentScoreOptions`] for the axes (`Sk` = max key id + 1, ids index
/// the columns).
pub fn segment_mass(q: &Tensor, k: &Tensor, mask: &SegmentMask, options: &SegmentScoreOptions) -> Result<Tensor> {
    let shape = AttentionShape::of(q, k, k)?;
    let AttentionShape {
        batch,
        q_len,
        kv_len,
        num_heads,
        head_dim: d,
        ..
    } = shape;
    let hkv = shape.num_kv_heads;
    let group = shape.group_size();
    let scale = options.scale.unwrap_or_else(|| default_scale(d));
    if !scale.is_finite() {
        invalid_arg!("scale: expected a finite number, got {scale}");
    }
    let visible = dense_mask_vec(mask, batch, q_len, kv_len)?;

    // Segment ids of every batch row (the mask's rows of size 1 are shared).
    let ids_of = |t: &Tensor, len: usize| -> Result<Vec<Vec<u32>>> {
        let rows = t.to_device(&Device::Cpu)?.to_vec2::<u32>()?;
        Ok((0..batch)
            .map(|b| rows[if rows.len() == 1 { 0 } else { b }][..len].to_vec())
            .collect())
    };
    let kv_ids = ids_of(mask.kv_segments(), kv_len)?;
    let q_ids = ids_of(mask.q_segments(), q_len)?;
    let size = |ids: &[Vec<u32>], requested: Option<usize>, option: &str| -> Result<usize> {
        let natural = ids.iter().flatten().map(|&i| i as usize + 1).max().unwrap_or(0);
        match requested {
            Some(n) if n < natural => invalid_arg!("{option}: expected more than every id, got {n}"),
            Some(n) => Ok(n),
            None => Ok(natural),
        }
    };
    let sk = size(&kv_ids, options.num_key_segments, "num_key_segments")?;
    let reduce_q = options.query_reduction != QueryReduction::None;
    let sq = if reduce_q {
        size(&q_ids, options.num_query_segments, "num_query_segments")?
    } else {
        0
    };
    let ho = if options.head_reduction == HeadReduction::None {
        num_heads
    } else {
        1
    };
    let lo = if reduce_q { sq } else { q_len };

    let q = to_f64(q)?;
    let k = to_f64(k)?;
    let mut out = vec![0f64; batch * ho * lo * sk];
    let mut p = vec![0f64; kv_len];
    for b in 0..batch {
        let mut key_len = vec![0usize; sk];
        kv_ids[b].iter().for_each(|&s| key_len[s as usize] += 1);
        let mut q_count = vec![0usize; sq];
        if reduce_q {
            q_ids[b].iter().for_each(|&s| q_count[s as usize] += 1);
        }
        for h in 0..num_heads {
            let kh = h / group;
            for i in 0..q_len {
                // P of row i.
                let qi = &q[((b * q_len + i) * num_heads + h) * d..][..d];
                let mut max = f64::NEG_INFINITY;
                for (j, pj) in p.iter_mut().enumerate() {
                    *pj = f64::NEG_INFINITY;
                    if visible[(b * q_len + i) * kv_len + j] {
                        let kj = &k[((b * kv_len + j) * hkv + kh) * d..][..d];
                        *pj = scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>();
                        max = max.max(*pj);
                    }
                }
                if max == f64::NEG_INFINITY {
                    continue; // sees no key: zeros
                }
                p.iter_mut().for_each(|x| *x = (*x - max).exp());
                let denom: f64 = p.iter().sum();

                // Its weight in the output row it lands in.
                let mut w = 1.0 / denom;
                let row = if reduce_q {
                    let s = q_ids[b][i] as usize;
                    if options.query_reduction == QueryReduction::MeanBySegment {
                        w /= q_count[s] as f64;
                    }
                    s
                } else {
                    i
                };
                if options.head_reduction == HeadReduction::Mean {
                    w /= num_heads as f64;
                }
                let hh = if ho == 1 && options.head_reduction != HeadReduction::None {
                    0
                } else {
                    h
                };
                let dst = &mut out[((b * ho + hh) * lo + row) * sk..][..sk];
                for (j, &pj) in p.iter().enumerate() {
                    let s = kv_ids[b][j] as usize;
                    let mut x = pj * w;
                    if options.normalize_by_length {
                        x /= key_len[s] as f64;
                    }
                    dst[s] += x;
                }
            }
        }
    }
    Tensor::from_vec(out, (batch, ho, lo, sk), &Device::Cpu)
}
