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

/// One dense reference problem: the shapes, the scale, the mask materialised and the inputs in
/// f64 (`[B, L, heads, D]` flattened).
struct Dense {
    shape: AttentionShape,
    scale: f64,
    visible: Vec<bool>,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
}

impl Dense {
    fn new(q: &Tensor, k: &Tensor, v: &Tensor, mask: &SegmentMask, scale: Option<f64>) -> Result<Self> {
        let shape = AttentionShape::of(q, k, v)?;
        Ok(Self {
            shape,
            scale: scale.unwrap_or_else(|| default_scale(shape.head_dim)),
            visible: dense_mask_vec(mask, shape.batch, shape.q_len, shape.kv_len)?,
            q: to_f64(q)?,
            k: to_f64(k)?,
            v: to_f64(v)?,
        })
    }

    /// Offset of query row `i` of head `h` in batch row `b` (in q, the output and dq).
    fn q_at(&self, b: usize, i: usize, h: usize) -> usize {
        let s = self.shape;
        ((b * s.q_len + i) * s.num_heads + h) * s.head_dim
    }

    /// Offset of key `j` of KV head `kh` in batch row `b` (in k, v, dk and dv).
    fn k_at(&self, b: usize, j: usize, kh: usize) -> usize {
        let s = self.shape;
        ((b * s.kv_len + j) * s.num_kv_heads + kh) * s.head_dim
    }

    /// The softmax of row `i` of head `h` in batch row `b` over its visible keys, written to
    /// `probs` (`[Lk]`, 0 for hidden keys), and the row's log-sum-exp; `None` (probs untouched)
    /// when the row sees no key.
    fn softmax_row(&self, (b, h, i): (usize, usize, usize), probs: &mut [f64]) -> Option<f64> {
        let s = self.shape;
        let (d, kh) = (s.head_dim, h / s.group_size());
        let qi = &self.q[self.q_at(b, i, h)..][..d];
        let mut max = f64::NEG_INFINITY;
        for (j, p) in probs.iter_mut().enumerate() {
            *p = f64::NEG_INFINITY;
            if self.visible[(b * s.q_len + i) * s.kv_len + j] {
                *p = self.scale * dot(qi, &self.k[self.k_at(b, j, kh)..][..d]);
                max = max.max(*p);
            }
        }
        if max == f64::NEG_INFINITY {
            return None;
        }
        let denom: f64 = probs.iter().map(|p| (p - max).exp()).sum();
        probs.iter_mut().for_each(|p| *p = (*p - max).exp() / denom);
        Some(max + denom.ln())
    }
}

fn dot(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// Exact segment-masked attention. `scale` defaults to `1 / sqrt(D)`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &SegmentMask,
    scale: Option<f64>,
) -> Result<ReferenceOutput> {
    let p = Dense::new(q, k, v, mask, scale)?;
    let AttentionShape {
        batch,
        q_len,
        kv_len,
        num_heads,
        head_dim: d,
        ..
    } = p.shape;
    let mut out = vec![0f64; p.q.len()];
    let mut lse = vec![f64::NEG_INFINITY; batch * num_heads * q_len];
    let mut probs = vec![0f64; kv_len];
    for b in 0..batch {
        for h in 0..num_heads {
            let kh = h / p.shape.group_size();
            for i in 0..q_len {
                // A row that sees no key: output 0, lse -inf.
                let Some(row_lse) = p.softmax_row((b, h, i), &mut probs) else {
                    continue;
                };
                lse[(b * num_heads + h) * q_len + i] = row_lse;
                let o = &mut out[p.q_at(b, i, h)..][..d];
                for (j, &pj) in probs.iter().enumerate() {
                    if pj > 0.0 {
                        let vj = &p.v[p.k_at(b, j, kh)..][..d];
                        o.iter_mut().zip(vj).for_each(|(o, v)| *o += pj * v);
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

/// Output of [`attention_backward`]: the gradients of `sum(out * d_out) + sum(lse * d_lse)` with
/// respect to q, k and v, f64 on the CPU, in the shapes of q, k and v.
#[derive(Clone, Debug)]
pub struct ReferenceGradients {
    /// `[B, Lq, H, D]`.
    pub dq: Tensor,
    /// `[B, Lk, Hkv, D]` (summed over the query heads of each KV head).
    pub dk: Tensor,
    /// `[B, Lk, Hkv, D]`.
    pub dv: Tensor,
}

/// Exact gradients of [`attention`] for the gradient `d_out` `[B, Lq, H, D]` of its output and,
/// optionally, `d_lse` `[B, H, Lq]` of its LSE, row by row in f64 (`P` the softmax of a row,
/// `dP_j = dO . v_j`, `dS_j = P_j (dP_j - sum_l P_l dP_l + dlse)`, `dq = scale sum_j dS_j k_j`,
/// `dk_j += scale dS_j q`, `dv_j += P_j dO`). A row that sees no key contributes nothing.
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d_out: &Tensor,
    d_lse: Option<&Tensor>,
    mask: &SegmentMask,
    scale: Option<f64>,
) -> Result<ReferenceGradients> {
    if d_out.dims() != q.dims() {
        crate::error::invalid_arg!("d_out: expected the shape of q {:?}, got {:?}", q.dims(), d_out.dims());
    }
    let (b, lq, h, _) = q.dims4()?;
    if let Some(g) = d_lse {
        if g.dims() != [b, h, lq] {
            crate::error::invalid_arg!(
                "d_lse: expected shape [{b}, {h}, {lq}] ([B, H, Lq]), got {:?}",
                g.dims()
            );
        }
    }
    let p = Dense::new(q, k, v, mask, scale)?;
    let AttentionShape {
        batch,
        q_len,
        kv_len,
        num_heads,
        num_kv_heads: hkv,
        head_dim: d,
    } = p.shape;
    let d_out = to_f64(d_out)?;
    let d_lse = d_lse.map(to_f64).transpose()?;
    let mut dq = vec![0f64; p.q.len()];
    let mut dk = vec![0f64; p.k.len()];
    let mut dv = vec![0f64; p.v.len()];
    let mut probs = vec![0f64; kv_len];
    let mut dp = vec![0f64; kv_len];
    for b in 0..batch {
        for h in 0..num_heads {
            let kh = h / p.shape.group_size();
            for i in 0..q_len {
                if p.softmax_row((b, h, i), &mut probs).is_none() {
                    continue;
                }
                let (qi, doi) = (&p.q[p.q_at(b, i, h)..][..d], &d_out[p.q_at(b, i, h)..][..d]);
                for (j, g) in dp.iter_mut().enumerate() {
                    *g = dot(doi, &p.v[p.k_at(b, j, kh)..][..d]);
                }
                let lse_grad = d_lse.as_ref().map_or(0.0, |g| g[(b * num_heads + h) * q_len + i]);
                let centre = dot(&probs, &dp) - lse_grad;
                for (j, (&pj, &g)) in probs.iter().zip(&dp).enumerate() {
                    if pj == 0.0 {
                        continue;
                    }
                    let ds = pj * (g - centre);
                    let at = p.k_at(b, j, kh);
                    for c in 0..d {
                        dq[p.q_at(b, i, h) + c] += p.scale * ds * p.k[at + c];
                        dk[at + c] += p.scale * ds * qi[c];
                        dv[at + c] += pj * doi[c];
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
