//! The mask of one block of the backward: which keys its rows can see (the block's key range)
//! and the additive bias over that range (0 visible, `-inf` hidden).
//!
//! Two ways to the bias: on the host from the mask's spans (the CPU path reads it as is), or on
//! the device of q through candle's ops from the segment-id tensors and the pair table (the CUDA
//! path: no `rows x keys` host work and no upload). Both follow
//! `crate::mask::tiles::element_visible`.

use candle_core::{DType, Device, Result, Tensor};

use crate::mask::{HostMask, SegmentMask, Visibility, TABLE_DEFAULT};

/// Query rows `r0..r0 + rows` of every batch row, and the keys `first..first + count` that
/// hold every key one of them can see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlockKeys {
    pub r0: usize,
    pub rows: usize,
    pub first: usize,
    pub count: usize,
}

/// Calls `f(b, r, start, stop)` for each run of keys `start..stop` visible to row `r0 + r` of
/// batch row `b` (a rule lookup per key span, not per key).
fn for_each_visible_run(
    host: &HostMask,
    batch: usize,
    (r0, rows): (usize, usize),
    (k0, k1): (usize, usize),
    mut f: impl FnMut(usize, usize, usize, usize),
) {
    for b in 0..batch {
        let (q_row, kv_row, table) = (host.q.row(b), host.kv.row(b), host.rule.table_row(b));
        for r in 0..rows {
            let i = r0 + r;
            let pos = i as i64 + host.pos_offset;
            kv_row.for_each_span(k0, k1, |id, start, end| {
                let stop = match host.rule.lookup(table, q_row.ids[i], id) {
                    Visibility::Blocked => start,
                    Visibility::Full => end,
                    // Keys j <= pos of the span.
                    Visibility::Causal => (pos + 1).clamp(start as i64, end as i64) as usize,
                };
                if stop > start {
                    f(b, r, start, stop);
                }
            });
        }
    }
}

impl BlockKeys {
    /// The key range of rows `r0..r0 + rows`, or `None` when none of them sees a key.
    pub fn of(host: &HostMask, batch: usize, r0: usize, rows: usize, kv_len: usize) -> Option<Self> {
        let (mut lo, mut hi) = (kv_len, 0);
        for_each_visible_run(host, batch, (r0, rows), (0, kv_len), |_, _, start, stop| {
            lo = lo.min(start);
            hi = hi.max(stop);
        });
        // Lazily: `hi - lo` only exists when some key is visible.
        (hi > lo).then(|| Self {
            r0,
            rows,
            first: lo,
            count: hi - lo,
        })
    }

    /// The bias `[B, rows, count]` (row-major) built on the host.
    pub fn host_bias(&self, host: &HostMask, batch: usize) -> Vec<f32> {
        let n = self.count;
        let mut bias = vec![f32::NEG_INFINITY; batch * self.rows * n];
        let keys = (self.first, self.first + n);
        for_each_visible_run(host, batch, (self.r0, self.rows), keys, |b, r, start, stop| {
            let row = (b * self.rows + r) * n;
            bias[row + start - self.first..row + stop - self.first].fill(0.0);
        });
        bias
    }

    /// The bias as a tensor `[B or 1, 1, 1, rows, count]` f32 on `dev`, through candle's ops
    /// from the mask's segment ids (and pair table): O(B x rows x count) work on the device.
    pub fn bias(&self, mask: &SegmentMask, host: &HostMask, batch: usize, dev: &Device) -> Result<Tensor> {
        let rule = &host.rule;
        // Segment ids of the block's rows [Bm, rows, 1] and keys [Bm, 1, count] (Bm = B or 1).
        let q_ids = mask
            .q_segments()
            .to_device(dev)?
            .narrow(1, self.r0, self.rows)?
            .unsqueeze(2)?;
        let k_ids = mask
            .kv_segments()
            .to_device(dev)?
            .narrow(1, self.first, self.count)?
            .unsqueeze(1)?;
        let same = q_ids.broadcast_eq(&k_ids)?;
        // Key first + j <= position of row r0 + r, [rows, count] (positions < 2^24: exact in f32).
        let positions = |start: f64, n: usize| Tensor::arange(0u32, n as u32, dev)?.to_dtype(DType::F32)? + start;
        let q_pos = positions(self.r0 as f64 + host.pos_offset as f64, self.rows)?.unsqueeze(1)?;
        let k_pos = positions(self.first as f64, self.count)?.unsqueeze(0)?;
        let causal = k_pos.broadcast_le(&q_pos)?;
        let allowed = |rule: Visibility| match rule {
            Visibility::Blocked => causal.zeros_like(),
            Visibility::Causal => Ok(causal.clone()),
            Visibility::Full => causal.ones_like(),
        };
        let mut shape = same.shape().clone();
        let mut visible = same.where_cond(
            &allowed(rule.intra)?.broadcast_as(&shape)?,
            &allowed(rule.inter)?.broadcast_as(&shape)?,
        )?;
        if let Some(table) = &mask.rule().table {
            // The table's code for each (row, key) pair where both ids are inside it; the
            // default pair's visibility elsewhere and for TABLE_DEFAULT entries.
            let s = rule.table_size as u32;
            let codes = table.rules().to_device(dev)?.flatten_all()?;
            let inside = q_ids.lt(s)?.broadcast_mul(&k_ids.lt(s)?)?;
            let mut index = (q_ids.minimum(s - 1)? * f64::from(s))?.broadcast_add(&k_ids.minimum(s - 1)?)?;
            if rule.table_batches > 1 {
                // Per-row tables [B, S, S]: row b's codes start at b S^2.
                shape = (batch, self.rows, self.count).into();
                let offsets = (Tensor::arange(0u32, batch as u32, dev)? * f64::from(s * s))?.reshape((batch, 1, 1))?;
                index = index.broadcast_add(&offsets)?;
                visible = visible.broadcast_as(&shape)?.contiguous()?;
            }
            let index = index.broadcast_as(&shape)?.contiguous()?;
            let code = codes.index_select(&index.flatten_all()?, 0)?.reshape(&shape)?;
            let code = inside
                .broadcast_as(&shape)?
                .where_cond(&code, &Tensor::full(TABLE_DEFAULT, &shape, dev)?)?;
            let is = |v: u8| code.eq(v);
            let by_table = is(Visibility::Full.code())?
                .maximum(&is(Visibility::Causal.code())?.broadcast_mul(&causal)?)?
                .maximum(&is(TABLE_DEFAULT)?.mul(&visible)?)?;
            visible = by_table;
        }
        let zero = Tensor::zeros(&shape, DType::F32, dev)?;
        let hidden = Tensor::full(f32::NEG_INFINITY, &shape, dev)?;
        let (bm, rows, count) = shape.dims3()?;
        visible.where_cond(&zero, &hidden)?.reshape((bm, 1, 1, rows, count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::PineLayout;

    #[test]
    fn block_keys_cut_to_the_visible_keys() -> Result<()> {
        let dev = Device::Cpu;
        // Two documents of 3 and 4 tokens: rows 3..5 see keys 3..=4 at most.
        let mask = SegmentMask::documents(&[&[3, 4]], &dev)?;
        let host = mask.host_metadata(1, 7, 7)?;
        let keys = BlockKeys::of(&host, 1, 3, 2, 7).expect("visible keys");
        assert_eq!((keys.first, keys.count), (3, 2));
        assert_eq!(keys.host_bias(&host, 1), vec![0.0, f32::NEG_INFINITY, 0.0, 0.0]);
        // A rule that hides everything: no block.
        let rule = crate::PairRule::new(Visibility::Blocked, Visibility::Blocked);
        let blocked = SegmentMask::new(mask.q_segments(), mask.kv_segments(), rule)?;
        assert!(BlockKeys::of(&blocked.host_metadata(1, 7, 7)?, 1, 0, 7, 7).is_none());
        Ok(())
    }

    /// The bias built by ops equals the host's, for the presets without a pair table, per-row and
    /// shared ids, Lq < Lk, and blocks anywhere along the rows (and the host's copied, with one).
    #[test]
    fn bias_by_ops_equals_the_host_bias() -> Result<()> {
        let dev = Device::Cpu;
        let layouts = [PineLayout::new(3, &[5, 4, 1], 2), PineLayout::new(1, &[3, 3, 3, 2], 3)];
        let masks = [
            SegmentMask::causal(15, &dev)?,
            SegmentMask::full(15, &dev)?,
            SegmentMask::documents(&[&[4, 5, 6], &[2, 7, 6]], &dev)?,
            SegmentMask::documents_bidirectional(&[&[3, 3, 9]], &dev)?,
            SegmentMask::prefix_lm(15, 6, &dev)?,
            SegmentMask::pine_batch(&layouts, &dev)?,
        ];
        let mut by_ops = 0;
        for (m, mask) in masks.iter().enumerate() {
            for q_len in [15, 6, 1] {
                let mask = if q_len < 15 {
                    mask.last_queries(q_len)?
                } else {
                    mask.clone()
                };
                let host = mask.host_metadata(2, q_len, 15)?;
                by_ops += usize::from(host.rule.table_size == 0);
                for (r0, rows) in [(0, q_len), (q_len / 2, q_len - q_len / 2), (q_len - 1, 1)] {
                    let Some(keys) = BlockKeys::of(&host, 2, r0, rows, 15) else {
                        continue;
                    };
                    let want = keys.host_bias(&host, 2);
                    let got = keys.bias(&mask, &host, 2, &dev)?;
                    let got = got
                        .broadcast_as((2, 1, 1, rows, keys.count))?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    assert_eq!(got, want, "mask {m} q_len {q_len} block {r0}+{rows}");
                }
            }
        }
        // Causal, full and both document masks have no pair table (prefix-LM and PINE have one).
        assert_eq!(by_ops, 4 * 3);
        Ok(())
    }
}
