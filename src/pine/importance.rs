//! PINE's importance scores, through the fused per-segment mass ([`crate::segment_scores`]) under
//! two scoring masks, on un-rotated q and k:
//! - segment queries (needed when a row has `n > 2` segments): each segment's tokens see only
//!   the OTHER segments; length-normalised mass summed over the query segment -> `I[i, j]`;
//! - suffix and generated rows: every segment token; length-normalised mass per row.
//!
//! Neither builds anything of size `L x L`: the masks are segment ids plus a small rule table.
//! The scores stay on the device of q: the order is computed there too ([`super::shifts`]).

use candle_core::{DType, Device, Result, Tensor};

use crate::mask::{PineLayout, SegmentMask, Visibility};
use crate::scores::{segment_scores, QueryReduction, SegmentScoreOptions};

/// Importance scores, f32 tensors on the device of q.
pub(crate) struct Importance {
    /// `[B, H, Sk, Sk]`: `I[b, h, i, j]` for segment query ids `i`, when some row has `n > 2`.
    pub segments: Option<Tensor>,
    /// `[B, H, m, Sk]`: per-row scores of the last `m` query rows (suffix / generated rows).
    pub rows: Option<Tensor>,
    /// `m`, the number of last query rows scored per row.
    pub scored_rows: usize,
}

/// [`Importance`] copied to the host, for the CPU order.
pub(crate) struct HostImportance {
    pub segments: Option<Vec<f32>>,
    pub rows: Vec<f32>,
    pub scored_rows: usize,
}

impl Importance {
    pub fn to_host(&self) -> Result<HostImportance> {
        Ok(HostImportance {
            segments: self.segments.as_ref().map(to_host).transpose()?,
            rows: self.rows.as_ref().map(to_host).transpose()?.unwrap_or_default(),
            scored_rows: self.scored_rows,
        })
    }
}

/// PINE's two scoring masks for the last `q_len` of `kv_len` tokens (see the module docs), on a
/// device: built once per step (`super::step::StepLayout::scoring_masks`), shared by its layers.
pub(crate) struct ScoringMasks {
    /// Segment queries over the other segments: only for a whole prompt with `n > 2` somewhere.
    pub segments: Option<SegmentMask>,
    /// The last `scored_rows` query rows over every segment token, when there are such rows.
    pub rows: Option<SegmentMask>,
}

impl ScoringMasks {
    /// `layouts` extended to `kv_len` keys; `scored_rows` as in [`importance`].
    pub fn new(
        layouts: &[PineLayout],
        device: &Device,
        q_len: usize,
        kv_len: usize,
        scored_rows: usize,
    ) -> Result<Self> {
        let needs_segments = q_len == kv_len && layouts.iter().any(|l| l.segment_lens.len() > 2);
        let segments = if needs_segments {
            Some(scoring_mask(layouts, device, |q_id, k_id, n| {
                (1..=n).contains(&q_id) && (1..=n).contains(&k_id) && q_id != k_id
            })?)
        } else {
            None
        };
        let rows = if scored_rows > 0 {
            Some(
                scoring_mask(layouts, device, |q_id, k_id, n| {
                    q_id == n + 1 && (1..=n).contains(&k_id)
                })?
                .last_queries(scored_rows)?,
            )
        } else {
            None
        };
        Ok(Self { segments, rows })
    }
}

/// Scores for `q` (`[B, Lq, H, D]`, the last `Lq` of the `Lk` tokens of every layout, extended)
/// against `k` (un-rotated, `[B, Lk, Hkv, D]`) under `masks` (built for the same shape).
/// `scored_rows`: how many last query rows are suffix / generated rows in at least one batch row.
pub(crate) fn importance(
    q: &Tensor,
    k: &Tensor,
    layouts: &[PineLayout],
    masks: &ScoringMasks,
    scale: f64,
    scored_rows: usize,
) -> Result<Importance> {
    let q_len = q.dim(1)?;
    let sk = layouts.iter().map(PineLayout::num_ids).max().unwrap_or(2);
    let base = SegmentScoreOptions::new()
        .normalize_by_length(true)
        .scale(scale)
        .num_key_segments(sk);
    let segments = match &masks.segments {
        Some(mask) => {
            let opts = base
                .query_reduction(QueryReduction::SumBySegment)
                .num_query_segments(sk);
            Some(segment_scores(q, k, mask, &opts)?)
        }
        None => None,
    };
    let rows = match &masks.rows {
        Some(mask) => {
            let q_last = q.narrow(1, q_len - scored_rows, scored_rows)?;
            Some(segment_scores(&q_last, k, mask, &base)?)
        }
        None => None,
    };
    Ok(Importance {
        segments,
        rows,
        scored_rows,
    })
}

/// A self-attention mask over the PINE ids of `layouts` in which query id `q` sees key id `k`
/// (fully) iff `sees(q, k, n)`, `n` the row's segment count; everything else is blocked.
fn scoring_mask(
    layouts: &[PineLayout],
    device: &Device,
    sees: impl Fn(usize, usize, usize) -> bool,
) -> Result<SegmentMask> {
    SegmentMask::from_layouts(layouts, device, |q, k, n| {
        if sees(q, k, n) {
            Visibility::Full
        } else {
            Visibility::Blocked
        }
    })
}

/// The per-row importance `[B, H, Lq, sk]` of decode rows `q` (un-rotated, every row after the
/// segments) on the CPU, read straight from the rotated cache `k_cache` (see
/// [`crate::cpu::pine_decode`]): no un-rotated copy of the cache.
pub(crate) fn decode_rows_cpu(
    q: &Tensor,
    k_cache: &Tensor,
    layouts: &[PineLayout],
    table: &crate::pine::RopeTable,
    scale: f64,
    sk: usize,
) -> Result<Tensor> {
    use crate::cpu::{pine_decode::suffix_importance, Element, Strided};
    use crate::validate::AttentionShape;
    use candle_core::{CpuStorage, Storage};
    let shape = AttentionShape::of(q, k_cache, k_cache)?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k_cache.storage_and_layout();
    fn run<T: Element + candle_core::WithDType>(
        (q, ql): (&CpuStorage, &candle_core::Layout),
        (k, kl): (&CpuStorage, &candle_core::Layout),
        shape: AttentionShape,
        layouts: &[PineLayout],
        table: &crate::pine::RopeTable,
        scale: f32,
        sk: usize,
    ) -> Result<Vec<f32>> {
        suffix_importance(
            Strided::new(q.as_slice::<T>()?, ql),
            Strided::new(k.as_slice::<T>()?, kl),
            shape,
            layouts,
            table,
            scale,
            sk,
        )
    }
    let (Storage::Cpu(q_cpu), Storage::Cpu(k_cpu)) = (&*qs, &*ks) else {
        crate::error::invalid_arg!("internal error: PINE's CPU decode importance got a GPU tensor");
    };
    let args = ((q_cpu, ql), (k_cpu, kl));
    let out = match q.dtype() {
        DType::F32 => run::<f32>(args.0, args.1, shape, layouts, table, scale as f32, sk)?,
        DType::F16 => run::<half::f16>(args.0, args.1, shape, layouts, table, scale as f32, sk)?,
        DType::BF16 => run::<half::bf16>(args.0, args.1, shape, layouts, table, scale as f32, sk)?,
        other => crate::error::invalid_arg!("q: expected dtype f32, f16 or bf16, got {other:?}"),
    };
    Tensor::from_vec(out, (shape.batch, shape.num_heads, shape.q_len, sk), q.device())
}

fn to_host(t: &Tensor) -> Result<Vec<f32>> {
    // CPU tensors: a copy out of the storage; the GPU path never calls it.
    t.flatten_all()?.to_vec1::<f32>()
}
