//! The exact reference: the simplest possible computation, the oracle of every test.
//!
//! Dense scores in f64, the explicit mask from the rule, softmax, times V, plus the log-sum-exp.
//! It materialises everything and is slow on purpose: keep it obviously right. It is public so
//! that users can check their own integrations.

use candle_core::{DType, Device, Result, Tensor};

use crate::mask::SegmentMask;
use crate::validate::{default_scale, AttentionShape};

mod pine;
mod segment_mass;
pub use pine::{pine_attention, PineReferenceOutput};
pub use segment_mass::segment_mass;

/// Output of [`attention`]: `out` `[B, Lq, H, D]` f64 and `lse` `[B, H, Lq]` f64 (natural log of
/// the softmax denominator of the scaled scores; `-inf` for a row that sees no key, whose output
/// is 0).
#[derive(Clone, Debug)]
pub struct ReferenceOutput {
    /// `[B, Lq, H, D]`, f64, on the CPU.
    pub out: Tensor,
    /// `[B, H, Lq]`, f64, on the CPU.
    pub lse: Tensor,
}

/// Exact segment-masked attention. `scale` defaults to `1 / sqrt(D)`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &SegmentMask,
    scale: Option<f64>,
) -> Result<ReferenceOutput> {
    let shape = AttentionShape::of(q, k, v)?;
    let AttentionShape {
        batch,
        q_len,
        kv_len,
        num_heads,
        head_dim: d,
        ..
    } = shape;
    let scale = scale.unwrap_or_else(|| default_scale(d));
    let visible = dense_mask_vec(mask, batch, q_len, kv_len)?;
    let q = to_f64(q)?;
    let k = to_f64(k)?;
    let v = to_f64(v)?;
    let hkv = shape.num_kv_heads;
    let group = shape.group_size();

    let mut out = vec![0f64; batch * q_len * num_heads * d];
    let mut lse = vec![f64::NEG_INFINITY; batch * num_heads * q_len];
    let mut scores = vec![0f64; kv_len];
    for b in 0..batch {
        for h in 0..num_heads {
            let kh = h / group;
            for i in 0..q_len {
                let qi = &q[((b * q_len + i) * num_heads + h) * d..][..d];
                let mut max = f64::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    *s = f64::NEG_INFINITY;
                    if visible[(b * q_len + i) * kv_len + j] {
                        let kj = &k[((b * kv_len + j) * hkv + kh) * d..][..d];
                        *s = scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>();
                        max = max.max(*s);
                    }
                }
                if max == f64::NEG_INFINITY {
                    continue; // sees no key: output 0, lse -inf
                }
                let denom: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                lse[(b * num_heads + h) * q_len + i] = max + denom.ln();
                let o = &mut out[((b * q_len + i) * num_heads + h) * d..][..d];
                for (j, s) in scores.iter().enumerate() {
                    let p = (s - max).exp() / denom;
                    if p > 0.0 {
                        let vj = &v[((b * kv_len + j) * hkv + kh) * d..][..d];
                        o.iter_mut().zip(vj).for_each(|(o, v)| *o += p * v);
                    }
                }
            }
        }
    }
    Ok(ReferenceOutput {
        out: Tensor::from_vec(out, (batch, q_len, num_heads, d), &Device::Cpu)?,
        lse: Tensor::from_vec(lse, (batch, num_heads, q_len), &Device::Cpu)?,
    })
}

/// Output of [`attention_backward`]: the gradients of `sum(out * d_out)` with respect to q, k
/// and v, f64 on the CPU, in the shapes of q, k and v.
#[derive(Clone, Debug)]
pub struct ReferenceGradients {
    /// `[B, Lq, H, D]`.
    pub dq: Tensor,
    /// `[B, Lk, Hkv, D]` (summed over the query heads of each KV head).
    pub dk: Tensor,
    /// `[B, Lk, Hkv, D]`.
    pub dv: Tensor,
}

/// Exact gradients of [`attention`] for the output gradient `d_out` `[B, Lq, H, D]`, row by row
/// in f64 (`P` the softmax of a row, `dP_j = dO . v_j`, `dS_j = P_j (dP_j - sum_l P_l dP_l)`,
/// `dq = scale sum_j dS_j k_j`, `dk_j += scale dS_j q`, `dv_j += P_j dO`). A row that sees no
/// key contributes nothing.
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d_out: &Tensor,
    mask: &SegmentMask,
    scale: Option<f64>,
) -> Result<ReferenceGradients> {
    let shape = AttentionShape::of(q, k, v)?;
    let AttentionShape {
        batch,
        q_len,
        kv_len,
        num_heads,
        head_dim: d,
        ..
    } = shape;
    if d_out.dims() != q.dims() {
        crate::error::invalid_arg!("d_out: expected the shape of q {:?}, got {:?}", q.dims(), d_out.dims());
    }
    let scale = scale.unwrap_or_else(|| default_scale(d));
    let visible = dense_mask_vec(mask, batch, q_len, kv_len)?;
    let (q, k, v, d_out) = (to_f64(q)?, to_f64(k)?, to_f64(v)?, to_f64(d_out)?);
    let hkv = shape.num_kv_heads;
    let group = shape.group_size();
    let q_at = |b: usize, i: usize, h: usize| ((b * q_len + i) * num_heads + h) * d;
    let k_at = |b: usize, j: usize, kh: usize| ((b * kv_len + j) * hkv + kh) * d;

    let mut dq = vec![0f64; q.len()];
    let mut dk = vec![0f64; k.len()];
    let mut dv = vec![0f64; v.len()];
    let mut probs = vec![0f64; kv_len];
    let mut dp = vec![0f64; kv_len];
    for b in 0..batch {
        for h in 0..num_heads {
            let kh = h / group;
            for i in 0..q_len {
                let qi = &q[q_at(b, i, h)..][..d];
                let doi = &d_out[q_at(b, i, h)..][..d];
                let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
                let mut max = f64::NEG_INFINITY;
                for (j, p) in probs.iter_mut().enumerate() {
                    *p = f64::NEG_INFINITY;
                    if visible[(b * q_len + i) * kv_len + j] {
                        *p = scale * dot(qi, &k[k_at(b, j, kh)..][..d]);
                        max = max.max(*p);
                    }
                }
                if max == f64::NEG_INFINITY {
                    continue;
                }
                probs.iter_mut().for_each(|p| *p = (*p - max).exp());
                let denom: f64 = probs.iter().sum();
                probs.iter_mut().for_each(|p| *p /= denom);
                for (j, g) in dp.iter_mut().enumerate() {
                    *g = dot(doi, &v[k_at(b, j, kh)..][..d]);
                }
                let row_dot: f64 = probs.iter().zip(&dp).map(|(p, g)| p * g).sum();
                for j in 0..kv_len {
                    let p = probs[j];
                    if p == 0.0 {
                        continue;
                    }
                    let ds = p * (dp[j] - row_dot);
                    let at = k_at(b, j, kh);
                    for c in 0..d {
                        dq[q_at(b, i, h) + c] += scale * ds * k[at + c];
                        dk[at + c] += scale * ds * qi[c];
                        dv[at + c] += p * doi[c];
                    }
                }
            }
        }
    }
    let cpu = &Device::Cpu;
    Ok(ReferenceGradients {
        dq: Tensor::from_vec(dq, (batch, q_len, num_heads, d), cpu)?,
        dk: Tensor::from_vec(dk, (batch, kv_len, hkv, d), cpu)?,
        dv: Tensor::from_vec(dv, (batch, kv_len, hkv, d), cpu)?,
    })
}

/// The mask materialised: `[B, Lq, Lk]` u8, 1 where key `j` is visible to query `i`.
/// O(B Lq Lk) memory: for tests and inspection only.
pub fn dense_mask(mask: &SegmentMask, batch: usize, q_len: usize, kv_len: usize) -> Result<Tensor> {
    let v = dense_mask_vec(mask, batch, q_len, kv_len)?;
    let v: Vec<u8> = v.into_iter().map(u8::from).collect();
    Tensor::from_vec(v, (batch, q_len, kv_len), &Device::Cpu)
}

fn dense_mask_vec(mask: &SegmentMask, batch: usize, q_len: usize, kv_len: usize) -> Result<Vec<bool>> {
    let host = mask.host_metadata(batch, q_len, kv_len)?;
    let mut out = Vec::with_capacity(batch * q_len * kv_len);
    for b in 0..batch {
        for i in 0..q_len {
            out.extend((0..kv_len).map(|j| host.visible(b, i, j)));
        }
    }
    Ok(out)
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()
}
