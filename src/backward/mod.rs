//! Gradients of segment-masked attention, for training (packed documents, prefix-LM, any rule).
//!
//! FlashAttention-2's backward equations, with P recomputed from q, k and the forward's
//! log-sum-exp (all the forward keeps besides its inputs): for the scaled scores
//! `S = scale q k^T` under the mask, `P = exp(S - lse)`, and the output gradient `dO`,
//!
//! ```text
//! dV = P^T dO      dP = dO V^T      D_i = sum_j P_ij dP_ij (= dO_i . O_i)
//! dS = P * (dP - D)      dQ = scale dS K      dK = scale dS^T Q
//! ```
//!
//! computed in f32 on the device of q, a block of query rows at a time: memory O(rows x Lk) per
//! block, never Lq x Lk. The five products are candle matmuls (cuBLAS on a GPU); the softmax
//! gradient between them is candle's elementwise ops on a GPU (with the block's mask built there,
//! `bias.rs`) and one pass per row of our own on the CPU (`crate::cpu::softmax_grad`).
//! Each block reads only the key range its rows can see (the first to the last visible key of
//! the block), so causal, document and PINE masks skip most hidden keys. A row that sees no key
//! has P = 0 and gets zero gradients. Under GQA the P query heads of a KV head are stacked as the
//! rows of one product, so dK and dV sum over them without repeating K or V.
//!
//! `D_i` is taken as `sum_j P_ij dP_ij` rather than `dO_i . O_i`: the same number in exact
//! arithmetic, but free of the forward output's rounding to a 16-bit dtype.

use candle_core::{CpuStorage, DType, Result, Storage, Tensor, D};

mod bias;
pub(crate) mod fused;

use bias::BlockKeys;

use crate::mask::{HostMask, SegmentMask};
use crate::validate::AttentionShape;

/// Elements of one f32 score block `[B, H, rows, keys]` the block size aims at (32 MB; about
/// five such buffers are alive at once).
const SCORE_BLOCK_ELEMENTS: usize = 1 << 23;
/// Query rows per block: at least this many (fewer products, each larger)...
const MIN_BLOCK_ROWS: usize = 16;
/// ...and at most this many (smaller blocks skip more hidden keys under causal masks).
const MAX_BLOCK_ROWS: usize = 256;

/// Gradients of attention: `(dq, dk, dv)`, each `None` unless asked for in `wanted`.
pub(crate) type Gradients = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// What flows back into the attention: the gradient of its output `[B, Lq, H, D]` and / or of
/// its LSE `[B, H, Lq]` (at least one).
#[derive(Clone, Copy)]
pub(crate) struct Upstream<'a> {
    pub d_out: Option<&'a Tensor>,
    pub d_lse: Option<&'a Tensor>,
    /// The forward's output, when known (the fused CUDA kernel's delta = dO . O needs it; unread
    /// without the `cuda` feature).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub out: Option<&'a Tensor>,
}

/// The gradients of segment-masked attention at `(q, k, v)` for the gradients `up` of its output
/// and LSE, each in the dtype of its input; only those `wanted` (q, k, v) are computed. The LSE's
/// gradient adds `P_ij dlse_i` to `dS_ij` (d lse_i / d S_ij = P_ij) and nothing to dV (dv is
/// `None` when the output has no gradient).
pub(crate) fn attention_gradients(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    up: Upstream,
    lse: &Tensor,
    shape: AttentionShape,
    (mask, host): (&SegmentMask, &HostMask),
    scale: f32,
    wanted: [bool; 3],
) -> Result<Gradients> {
    let AttentionShape {
        batch: b,
        q_len: lq,
        kv_len: lk,
        num_heads: h,
        num_kv_heads: hkv,
        head_dim: d,
    } = shape;
    #[cfg(feature = "cuda")]
    if fused::available(q, &shape) && (up.d_out.is_none() || up.out.is_some()) {
        return fused::gradients((q, k, v), up, lse, shape, host, scale, wanted);
    }
    let p = shape.group_size();
    let dev = q.device();
    // [B, Hkv, Lk, D] f32.
    let heads_first = |t: &Tensor| t.to_dtype(DType::F32)?.transpose(1, 2)?.contiguous();
    let kf = heads_first(k)?;
    // V enters only through the output's gradient (dP = dO V^T, dV = P^T dO); the LSE's gradient
    // gives none to v.
    let vf = up.d_out.map(|_| heads_first(v)).transpose()?;
    let wanted = [wanted[0], wanted[1], wanted[2] && up.d_out.is_some()];
    // The forward's LSE `[B, H, Lq]`, with +inf for rows that see no key (P = exp(-inf) = 0
    // there, where -inf would give exp(NaN)).
    let lse = lse.to_dtype(DType::F32)?;
    let lse = lse
        .eq(f32::NEG_INFINITY)?
        .where_cond(&Tensor::full(f32::INFINITY, lse.shape(), dev)?, &lse)?;
    // On the CPU the elementwise middle runs as one pass per row over the LSE's host copy
    // (unless SEGATTN_CPU_PORTABLE=1 asks for the device-generic path, the one CUDA runs).
    let lse_host = if dev.is_cpu() && !crate::cpu::portable_only() {
        Some(lse.flatten_all()?.to_vec1::<f32>()?)
    } else {
        None
    };
    // The LSE's gradient `[B, H, Lq]` f32 (and its host copy for the CPU pass).
    let d_lse = up.d_lse.map(|t| t.to_dtype(DType::F32)).transpose()?;
    let d_lse_host = match (&d_lse, lse_host.is_some()) {
        (Some(t), true) => Some(t.flatten_all()?.to_vec1::<f32>()?),
        _ => None,
    };
    let cpu_pass = lse_host.is_some();
    let mut dk = KeyGradient::new(cpu_pass, (b, hkv, lk, d), dev)?;
    let mut dv = KeyGradient::new(cpu_pass, (b, hkv, lk, d), dev)?;
    let mut dq_blocks = Vec::new();
    let rows = block_rows(b * h * lk.max(1)).min(lq.max(1));
    for r0 in (0..lq).step_by(rows) {
        let c = rows.min(lq - r0);
        // [B, c, H, D] -> [B, H, c, D] -> [B, Hkv, P c, D]: query head kh P + i is rows i c.. of kh.
        let stack = |t: &Tensor| heads_first(&t.narrow(1, r0, c)?)?.reshape((b, hkv, p * c, d));
        let Some(keys) = BlockKeys::of(host, b, r0, c, lk) else {
            // No row of the block sees a key: zero gradients for it, nothing added to dK, dV.
            if wanted[0] {
                dq_blocks.push(Tensor::zeros((b, c, h, d), DType::F32, dev)?);
            }
            continue;
        };
        let (k0, kw) = (keys.first, keys.count);
        let kb = kf.narrow(2, k0, kw)?;
        let qb = stack(q)?;
        let dob = up.d_out.map(stack).transpose()?;
        // Raw scaled scores and dP = dO V^T over the block's key range, [B, Hkv, P c, kw]
        // (dP = 0 when only the LSE has a gradient).
        let qs = (&qb * f64::from(scale))?;
        let scores = qs.matmul(&kb.t()?)?;
        let dp = match (&dob, &vf) {
            (Some(dob), Some(vf)) => dob.matmul(&vf.narrow(2, k0, kw)?.t()?)?,
            _ => scores.zeros_like()?,
        };
        let (probs, ds) = match &lse_host {
            Some(lse_host) => {
                // Row ((bb Hkv + kh) P + i) c + r is query head kh P + i, row r0 + r.
                let at = |row: usize| {
                    let (head_row, r) = (row / c, row % c);
                    let (bb, head) = (head_row / h, head_row % h);
                    (bb * h + head) * lq + r0 + r
                };
                let bias = keys.host_bias(host, b);
                let rows = |row: usize| (lse_host[at(row)], d_lse_host.as_ref().map_or(0.0, |g| g[at(row)]));
                softmax_grad_cpu(&scores, &dp, &bias, rows, (b, hkv, p, c))?
            }
            None => {
                let block = |t: &Tensor| t.narrow(2, r0, c)?.reshape((b, hkv, p, c, 1));
                let d_lse_block = d_lse.as_ref().map(block).transpose()?;
                let bias = keys.bias(mask, host, b, dev)?;
                softmax_grad_ops(&scores, &dp, &bias, &block(&lse)?, d_lse_block.as_ref())?
            }
        };
        if wanted[0] {
            let dq_block = (ds.matmul(&kb)? * f64::from(scale))?
                .reshape((b, h, c, d))?
                .transpose(1, 2)?;
            dq_blocks.push(dq_block);
        }
        if wanted[1] {
            dk.add(&ds.t()?.matmul(&qs)?, k0)?;
        }
        if let (true, Some(dob)) = (wanted[2], &dob) {
            dv.add(&probs.t()?.matmul(dob)?, k0)?;
        }
    }
    let dq = match (wanted[0], dq_blocks.is_empty()) {
        (false, _) => None,
        (true, true) => Some(Tensor::zeros((b, lq, h, d), q.dtype(), dev)?),
        (true, false) => Some(Tensor::cat(&dq_blocks, 1)?.to_dtype(q.dtype())?.contiguous()?),
    };
    let back = |t: Tensor, like: &Tensor| t.transpose(1, 2)?.to_dtype(like.dtype())?.contiguous();
    let dk = if wanted[1] {
        Some(back(dk.into_tensor()?, k)?)
    } else {
        None
    };
    let dv = if wanted[2] {
        Some(back(dv.into_tensor()?, v)?)
    } else {
        None
    };
    Ok((dq, dk, dv))
}

/// `(P, dS)` of a block through candle's ops (the CUDA path, and the definition the CPU pass is
/// tested against): `scores`, `dp` `[B, Hkv, P c, kw]`, `bias` `[B, 1, 1, c, kw]`, `lse_block`
/// and the LSE's gradient `d_lse_block` (if any) `[B, Hkv, P, c, 1]`.
fn softmax_grad_ops(
    scores: &Tensor,
    dp: &Tensor,
    bias: &Tensor,
    lse_block: &Tensor,
    d_lse_block: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (b, hkv, p, c, _) = lse_block.dims5()?;
    let kw = scores.dim(D::Minus1)?;
    let probs = scores
        .reshape((b, hkv, p, c, kw))?
        .broadcast_add(bias)?
        .broadcast_sub(lse_block)?
        .exp()?
        .reshape((b, hkv, p * c, kw))?;
    let mut centre = (&probs * dp)?.sum_keepdim(D::Minus1)?;
    if let Some(g) = d_lse_block {
        // dS = P (dP - D + dlse).
        centre = (centre - g.reshape((b, hkv, p * c, 1))?)?;
    }
    let ds = (&probs * dp.broadcast_sub(&centre)?)?;
    Ok((probs, ds))
}

/// `(P, dS)` of a block on the CPU: the same as [`softmax_grad_ops`] in one pass per row
/// ([`crate::cpu::softmax_grad`]). `bias` is the block's host bias `[B, c, kw]`, `rows(row)` the
/// LSE of row `row` of the block and its gradient.
fn softmax_grad_cpu(
    scores: &Tensor,
    dp: &Tensor,
    bias: &[f32],
    rows: impl Fn(usize) -> (f32, f32) + Sync,
    (b, hkv, p, c): (usize, usize, usize, usize),
) -> Result<(Tensor, Tensor)> {
    let kw = scores.dim(D::Minus1)?;
    let rows = crate::cpu::softmax_grad::GradRows {
        keys: kw,
        // Row ((bb Hkv + kh) P + i) c + r uses the bias of (bb, r).
        bias_row: |row: usize| {
            let bb = row / (hkv * p * c);
            &bias[(bb * c + row % c) * kw..][..kw]
        },
        lse: rows,
    };
    let (probs, ds) = with_cpu_f32(scores, |s| with_cpu_f32(dp, |dp| rows.run(s, dp)))??;
    let dims = (b, hkv, p * c, kw);
    Ok((
        Tensor::from_vec(probs, dims, scores.device())?,
        Tensor::from_vec(ds, dims, scores.device())?,
    ))
}

/// Calls `f` on the elements of `t`, an f32 tensor on the CPU, in place (no copy).
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(all)), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        crate::error::invalid_arg!("internal error: the backward's CPU pass needs contiguous f32 CPU tensors");
    };
    Ok(f(&all[start..end]))
}

/// dK or dV `[B, Hkv, Lk, D]` f32, the sum of the blocks' contributions, each over its own key
/// range: added in place on the host for the CPU pass; on a device, padded to every key and added.
enum KeyGradient {
    Host {
        sum: Vec<f32>,
        dims: (usize, usize, usize, usize),
    },
    Device(Tensor),
}

impl KeyGradient {
    fn new(on_host: bool, dims: (usize, usize, usize, usize), dev: &candle_core::Device) -> Result<Self> {
        Ok(if on_host {
            Self::Host {
                sum: vec![0f32; dims.0 * dims.1 * dims.2 * dims.3],
                dims,
            }
        } else {
            Self::Device(Tensor::zeros(dims, DType::F32, dev)?)
        })
    }

    /// Adds `block` `[B, Hkv, kw, D]`, the gradient of keys `k0..k0 + kw`.
    fn add(&mut self, block: &Tensor, k0: usize) -> Result<()> {
        match self {
            Self::Host {
                sum,
                dims: (_, _, lk, d),
            } => {
                let (lk, d) = (*lk, *d);
                let kw = block.dim(2)?;
                with_cpu_f32(block, |block| {
                    // Per (b, kh): rows k0.. of the sum, kw D contiguous elements.
                    for (head, part) in block.chunks_exact(kw * d).enumerate() {
                        let at = (head * lk + k0) * d;
                        sum[at..at + kw * d].iter_mut().zip(part).for_each(|(s, x)| *s += x);
                    }
                })
            }
            Self::Device(sum) => {
                let (lk, kw) = (sum.dim(2)?, block.dim(2)?);
                *sum = (&*sum + block.pad_with_zeros(2, k0, lk - k0 - kw)?)?;
                Ok(())
            }
        }
    }

    fn into_tensor(self) -> Result<Tensor> {
        match self {
            Self::Host { sum, dims } => Tensor::from_vec(sum, dims, &candle_core::Device::Cpu),
            Self::Device(sum) => Ok(sum),
        }
    }
}

/// Query rows per block for `per_row` score elements per row (B H Lk).
fn block_rows(per_row: usize) -> usize {
    (SCORE_BLOCK_ELEMENTS / per_row).clamp(MIN_BLOCK_ROWS, MAX_BLOCK_ROWS)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn block_rows_stay_in_bounds() {
        assert_eq!(block_rows(1), MAX_BLOCK_ROWS);
        assert_eq!(block_rows(usize::MAX / 2), MIN_BLOCK_ROWS);
        assert_eq!(block_rows(SCORE_BLOCK_ELEMENTS / 100), 100);
    }

    /// The CPU pass equals candle's ops on a block with hidden keys, a row that sees nothing
    /// (+inf LSE) and GQA rows sharing bias rows.
    #[test]
    fn cpu_pass_matches_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (b, hkv, p, c, kw) = (2, 2, 3, 5, 37);
        let n = b * hkv * p * c * kw;
        let wave = |k: usize, f: f32| (0..k).map(|x| ((x as f32) * f).sin()).collect::<Vec<f32>>();
        let scores = Tensor::from_vec(wave(n, 0.37), (b, hkv, p * c, kw), &dev)?;
        let dp = Tensor::from_vec(wave(n, 0.11), (b, hkv, p * c, kw), &dev)?;
        let mut bias_values = vec![0f32; b * c * kw];
        for (x, v) in bias_values.iter_mut().enumerate() {
            if x % 3 == 0 || (x / kw) % c == 2 {
                *v = f32::NEG_INFINITY; // hidden keys; row 2 of every block sees nothing
            }
        }
        let mut lse = wave(b * hkv * p * c, 0.7);
        for (row, l) in lse.iter_mut().enumerate() {
            *l = if row % c == 2 { f32::INFINITY } else { *l + 1.5 };
        }
        let lse_block = Tensor::from_vec(lse.clone(), (b, hkv, p, c, 1), &dev)?;
        let d_lse = wave(b * hkv * p * c, 0.3);
        let rows = |row: usize| (lse[row], d_lse[row]);
        let (p_cpu, ds_cpu) = softmax_grad_cpu(&scores, &dp, &bias_values, rows, (b, hkv, p, c))?;
        let d_lse_block = Tensor::from_vec(d_lse.clone(), (b, hkv, p, c, 1), &dev)?;
        let bias_t = Tensor::from_vec(bias_values, (b, 1, 1, c, kw), &dev)?;
        let (p_ops, ds_ops) = softmax_grad_ops(&scores, &dp, &bias_t, &lse_block, Some(&d_lse_block))?;
        for (x, y) in [(p_cpu, p_ops), (ds_cpu, ds_ops)] {
            let (x, y) = (x.flatten_all()?.to_vec1::<f32>()?, y.flatten_all()?.to_vec1::<f32>()?);
            for (i, (a, b)) in x.iter().zip(&y).enumerate() {
                assert!((a - b).abs() <= 1e-6 + 1e-5 * b.abs(), "element {i}: {a} vs {b}");
            }
        }
        Ok(())
    }
}
