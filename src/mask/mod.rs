//! Segment masks: per-token segment ids plus a rule for every pair of segments.
//!
//! Every batch row carries u32 segment ids for its queries (`q_segments`, `[B, Lq]`) and keys
//! (`kv_segments`, `[B, Lk]`; the same tensor for self-attention). Ids are non-decreasing along a
//! row, so every segment is one contiguous span. Key `j` is visible to query `i` according to the
//! [`PairRule`] for `(seg(i), seg(j))`, with query row `i` at position `i + (Lk - Lq)` and key `j`
//! at `j` (bottom-right aligned). A row of a segment-id tensor (or table) with batch size 1 is
//! shared by every batch row.
//!
//! The metadata is O(Lq + Lk + table) per row, never an `Lq x Lk` buffer: see [`tiles`] for how
//! (query tile, key tile) classes are derived from it.

mod presets;
mod rule;
mod spans;
pub mod tiles;

pub use presets::PineLayout;
pub use rule::{PairRule, PairTable, Visibility, TABLE_DEFAULT};
pub use spans::{SegmentSpans, SpanRow};

pub(crate) use rule::HostRule;

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Result, Tensor};

use crate::error::invalid_arg;

/// A segment mask: query and key segment ids and the rule for each pair of segments.
///
/// Build one from a preset ([`SegmentMask::causal`], [`SegmentMask::documents`],
/// [`SegmentMask::pine`], ...) or from your own tensors with [`SegmentMask::new`].
///
/// A mask reads its tensors (ids, pair table) once, at its first use, and keeps what it read for
/// every later call (and its clones): changing those tensors in place afterwards (candle's
/// `slice_set`, `Var::set`) is not seen. Build a new mask for new ids.
#[derive(Clone, Debug)]
pub struct SegmentMask {
    q_segments: Tensor,
    kv_segments: Tensor,
    rule: PairRule,
    /// The host copy of the ids (with their span ends) and of the rule, read once per mask (and
    /// shared by its clones): a mask used by every layer of a model is not copied back from the
    /// GPU by each call. The mask is immutable (its tensors changed in place afterwards are not
    /// seen: the type's documentation says so).
    host: Arc<OnceLock<HostParts>>,
    /// The packed metadata the CUDA launchers uploaded for it, per device (shared by clones).
    #[cfg(feature = "cuda")]
    device: crate::cuda::DeviceMasks,
}

/// What [`SegmentMask::host_metadata`] reads from the mask's tensors.
#[derive(Debug)]
struct HostParts {
    q: SegmentSpans,
    kv: SegmentSpans,
    rule: HostRule,
}

impl SegmentMask {
    /// A mask from segment-id tensors: `q_segments` `[B, Lq]` and `kv_segments` `[B, Lk]`, both
    /// u32 (batch size 1 = shared by every row), and a rule.
    ///
    /// ```
    /// use segattn::{PairRule, SegmentMask, Visibility};
    /// use candle_core::{Device, Tensor};
    /// // Two packed documents of 3 and 2 tokens, each causal, blocked from each other.
    /// let ids = Tensor::new(&[[0u32, 0, 0, 1, 1]], &Device::Cpu)?;
    /// let mask = SegmentMask::new(&ids, &ids, PairRule::new(Visibility::Causal, Visibility::Blocked))?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn new(q_segments: &Tensor, kv_segments: &Tensor, rule: PairRule) -> Result<Self> {
        check_ids("q_segments", q_segments)?;
        check_ids("kv_segments", kv_segments)?;
        if q_segments.device().location() != kv_segments.device().location() {
            invalid_arg!(
                "kv_segments: expected the device of q_segments ({:?}), got {:?}",
                q_segments.device().location(),
                kv_segments.device().location()
            );
        }
        Ok(Self {
            q_segments: q_segments.clone(),
            kv_segments: kv_segments.clone(),
            rule,
            host: Arc::default(),
            #[cfg(feature = "cuda")]
            device: Default::default(),
        })
    }

    /// A self-attention mask: the same `[B, L]` ids for queries and keys.
    pub fn self_attention(segments: &Tensor, rule: PairRule) -> Result<Self> {
        Self::new(segments, segments, rule)
    }

    /// The mask for the last `q_len` queries of this (self-attention) layout: the query ids become
    /// the last `q_len` ids of `kv_segments`. Use it for decode (`q_len = 1`) and chunked prefill,
    /// where the keys include a cache that precedes the queries.
    pub fn last_queries(&self, q_len: usize) -> Result<Self> {
        let lk = self.kv_segments.dim(1)?;
        if q_len > lk {
            invalid_arg!("q_len: expected at most the key length {lk}, got {q_len}");
        }
        let q_segments = self.kv_segments.narrow(1, lk - q_len, q_len)?;
        let mask = Self {
            q_segments,
            kv_segments: self.kv_segments.clone(),
            rule: self.rule.clone(),
            host: Arc::default(),
            #[cfg(feature = "cuda")]
            device: Default::default(),
        };
        // The host copy follows from this mask's, when it has one (no read-back from a GPU).
        if let Some(parts) = self.host.get() {
            let rows = parts.kv.rows();
            let ids: Vec<u32> = (0..rows)
                .flat_map(|r| parts.kv.ids()[r * lk + lk - q_len..(r + 1) * lk].iter().copied())
                .collect();
            let _ = mask.host.set(HostParts {
                q: SegmentSpans::from_ids("q_segments", ids, rows, q_len)?,
                kv: parts.kv.clone(),
                rule: parts.rule.clone(),
            });
        }
        Ok(mask)
    }

    /// A self-attention mask from ids `[rows, len]` and optional table codes `[table rows, S, S]`
    /// made on the host: the tensors go to `device` and the mask keeps the host copy, so that its
    /// first use does not read them back (a device-to-host copy that waits for the GPU). The
    /// presets are built this way.
    pub(crate) fn self_attention_from_host(
        ids: Vec<u32>,
        (rows, len): (usize, usize),
        (intra, inter): (Visibility, Visibility),
        table: Option<(Vec<u8>, usize, usize)>,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let spans = SegmentSpans::from_ids("segment ids", ids.clone(), rows, len)?;
        let mut rule = PairRule::new(intra, inter);
        let host_rule = match table {
            None => HostRule::new((intra, inter), Vec::new(), 0, 0),
            Some((codes, table_rows, size)) => {
                rule = rule.with_table(PairTable::new(Tensor::from_vec(
                    codes.clone(),
                    (table_rows, size, size),
                    device,
                )?)?);
                HostRule::new((intra, inter), codes, size, table_rows)
            }
        };
        let mask = Self::self_attention(&Tensor::from_vec(ids, (rows, len), device)?, rule)?;
        let _ = mask.host.set(HostParts {
            q: spans.clone(),
            kv: spans,
            rule: host_rule,
        });
        Ok(mask)
    }

    /// Query segment ids, `[B, Lq]` (or `[1, Lq]`) u32.
    pub fn q_segments(&self) -> &Tensor {
        &self.q_segments
    }

    /// Key segment ids, `[B, Lk]` (or `[1, Lk]`) u32.
    pub fn kv_segments(&self) -> &Tensor {
        &self.kv_segments
    }

    /// The pair rule.
    pub fn rule(&self) -> &PairRule {
        &self.rule
    }

    /// Host metadata for `batch` rows, `q_len` queries and `kv_len` keys, validated against them.
    pub(crate) fn host_metadata(&self, batch: usize, q_len: usize, kv_len: usize) -> Result<HostMask> {
        check_side("q_segments", &self.q_segments, batch, q_len, "Lq", "q")?;
        check_side("kv_segments", &self.kv_segments, batch, kv_len, "Lk", "k and v")?;
        if let Some(t) = &self.rule.table {
            let dims = t.rules().dims();
            if dims.len() == 3 && dims[0] != 1 && dims[0] != batch {
                invalid_arg!("pair_table: expected batch size 1 or {batch} (the batch of q), got shape {dims:?}");
            }
        }
        if self.host.get().is_none() {
            let parts = HostParts {
                q: SegmentSpans::from_tensor("q_segments", &self.q_segments)?,
                kv: SegmentSpans::from_tensor("kv_segments", &self.kv_segments)?,
                rule: HostRule::from_rule(&self.rule)?,
            };
            // Another thread may have filled it meanwhile, with the same values.
            let _ = self.host.set(parts);
        }
        let Some(parts) = self.host.get() else {
            invalid_arg!("internal error: the mask's host metadata is missing");
        };
        Ok(HostMask {
            q: parts.q.clone(),
            kv: parts.kv.clone(),
            rule: parts.rule.clone(),
            pos_offset: kv_len as i64 - q_len as i64,
            #[cfg(feature = "cuda")]
            device: self.device.clone(),
        })
    }
}

/// Everything the CPU code needs to know about a mask, on the host, O(Lq + Lk + table) per row.
#[derive(Clone, Debug)]
pub(crate) struct HostMask {
    pub q: SegmentSpans,
    pub kv: SegmentSpans,
    pub rule: HostRule,
    /// `Lk - Lq`: query row `i` is at position `i + pos_offset`.
    pub pos_offset: i64,
    /// The mask's uploaded buffers (the CUDA launchers look theirs up here).
    #[cfg(feature = "cuda")]
    pub device: crate::cuda::DeviceMasks,
}

impl HostMask {
    /// What the choice of the plain forward kernel needs to know of the mask (O(1)).
    pub fn summary(&self) -> crate::kernel_params::MaskSummary {
        let r = &self.rule;
        let mean = self.kv.mean_span_len();
        let documents_up_to = |tokens: f64| {
            r.intra == Visibility::Causal
                && r.inter == Visibility::Blocked
                && r.table_size == 0
                && mean <= tokens
                // One segment a row is a causal mask, where the wide kernel won even at 1k.
                && mean < self.kv.len() as f64
        };
        crate::kernel_params::MaskSummary {
            causal: r.has_causal(),
            short_documents: documents_up_to(crate::kernel_params::SHORT_DOCUMENT_TOKENS),
            short_documents_with_mass: documents_up_to(crate::kernel_params::SHORT_DOCUMENT_TOKENS_WITH_MASS),
            key_tiles_of_two_segments: self.kv.most_spans_per_tile() <= 2,
        }
    }

    /// Whether key `j` is visible to query `i` in batch row `b`.
    pub fn visible(&self, b: usize, i: usize, j: usize) -> bool {
        tiles::element_visible(
            &self.rule,
            self.rule.table_row(b),
            self.q.row(b),
            self.kv.row(b),
            i,
            j,
            self.pos_offset,
        )
    }
}

fn check_ids(name: &str, ids: &Tensor) -> Result<()> {
    if ids.dtype() != DType::U32 {
        invalid_arg!("{name}: expected dtype u32, got {:?}", ids.dtype());
    }
    if ids.rank() != 2 {
        invalid_arg!("{name}: expected rank 2 [B, L], got shape {:?}", ids.dims());
    }
    Ok(())
}

fn check_side(name: &str, ids: &Tensor, batch: usize, len: usize, len_name: &str, of: &str) -> Result<()> {
    let (b, l) = ids.dims2()?;
    if (b != batch && b != 1) || l != len {
        invalid_arg!(
            "{name}: expected shape [{batch}, {len}] ([B, {len_name}] of {of}; B = 1 is shared by \
             every row), got {:?}",
            ids.dims()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn mean_span_len_counts_runs_of_every_row() -> Result<()> {
        // Row 0: runs of 2, 3, 1; row 1: one run of 6.
        let spans = SegmentSpans::from_ids("ids", vec![0, 0, 1, 1, 1, 2, 5, 5, 5, 5, 5, 5], 2, 6)?;
        assert_eq!(spans.mean_span_len(), 3.0);
        assert_eq!(SegmentSpans::from_ids("ids", vec![], 1, 0)?.mean_span_len(), 0.0);
        Ok(())
    }

    /// The metadata of `mask` as a fresh mask over the same tensors reads it back.
    fn read_back(mask: &SegmentMask, batch: usize, q_len: usize, kv_len: usize) -> Result<HostMask> {
        SegmentMask::new(mask.q_segments(), mask.kv_segments(), mask.rule().clone())?
            .host_metadata(batch, q_len, kv_len)
    }

    fn same(a: &HostMask, b: &HostMask) -> bool {
        let spans = |x: &SegmentSpans, y: &SegmentSpans| {
            x.ids() == y.ids() && x.span_ends() == y.span_ends() && x.rows() == y.rows() && x.len() == y.len()
        };
        spans(&a.q, &b.q)
            && spans(&a.kv, &b.kv)
            && a.rule.intra == b.rule.intra
            && a.rule.inter == b.rule.inter
            && a.rule.table == b.rule.table
            && a.rule.table_size == b.rule.table_size
            && a.rule.table_batches == b.rule.table_batches
            && a.pos_offset == b.pos_offset
    }

    /// The presets keep the host copy they were built from, and `last_queries` derives its own:
    /// both equal what reading the tensors back gives.
    #[test]
    fn preset_host_copies_equal_the_tensors() -> Result<()> {
        let dev = Device::Cpu;
        let layouts = [PineLayout::new(3, &[5, 4], 2), PineLayout::new(1, &[3, 3, 3, 2], 2)];
        let masks = [
            SegmentMask::causal(9, &dev)?,
            SegmentMask::full(9, &dev)?,
            SegmentMask::documents(&[&[4, 5], &[2, 7]], &dev)?,
            SegmentMask::documents_bidirectional(&[&[3, 3, 3]], &dev)?,
            SegmentMask::prefix_lm(9, 4, &dev)?,
            SegmentMask::pine(2, &[3, 2], 2, &dev)?,
            SegmentMask::pine_batch(&layouts, &dev)?,
            SegmentMask::packed_prompts(&[PineLayout::new(1, &[2, 2], 1), PineLayout::new(1, &[1], 1)], &dev)?,
        ];
        for (i, mask) in masks.iter().enumerate() {
            let (rows, len) = mask.kv_segments().dims2()?;
            let batch = rows.max(2);
            let kept = mask.host_metadata(batch, len, len)?;
            assert!(same(&kept, &read_back(mask, batch, len, len)?), "preset {i}");
            for q_len in [1, 2, len] {
                let last = mask.last_queries(q_len)?;
                let kept = last.host_metadata(batch, q_len, len)?;
                assert!(
                    same(&kept, &read_back(&last, batch, q_len, len)?),
                    "preset {i} last {q_len}"
                );
            }
        }
        Ok(())
    }
}
