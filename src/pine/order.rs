//! PINE's segment order and position shifts, from the importance scores.
//!
//! A query group is a query segment (all its rows share one order) or a single suffix / generated
//! row. Per (batch row, query head, group): the segments are sorted by descending importance
//! (stable: ties keep the lower segment first; a segment query's own segment always first), and
//! segment `j` is shifted back by the total length of the segments ranked before it. Prefix and
//! suffix keys are never shifted; prefix rows form group 0, whose shifts are all 0.

use super::importance::HostImportance;
use crate::mask::PineLayout;

/// The per-row query groups and the shift of every key segment id for every group.
#[derive(Clone, Debug)]
pub(crate) struct QueryShifts {
    /// Groups per (batch row, head): 0 = no shift (prefix rows), `1..=n` the segments, then one
    /// per suffix / generated query row.
    pub groups: usize,
    /// Key segment ids (`max n + 2`).
    pub sk: usize,
    /// Query heads.
    pub heads: usize,
    /// `[B, Lq]`: the group of every query row.
    pub row_group: Vec<u32>,
    /// `[B, H, groups, sk]`: the shift of key segment id `s` for a group.
    pub shifts: Vec<u32>,
    /// `[B, Lq]`: the original (un-shifted) RoPE position of every query row.
    pub q_pos: Vec<u32>,
    /// The device copies of `[q_pos | row_group]` ([`QueryShifts::packed_rows`]), shared with the
    /// [`GroupLayout`] they come from (so every layer of a step uploads them once).
    #[cfg(feature = "cuda")]
    pub device_rows: crate::cuda::DeviceCopies<u32>,
}

impl QueryShifts {
    /// The shift of key segment `id` for query row `i` of batch row `b` and head `h`.
    #[inline]
    pub fn shift(&self, b: usize, h: usize, q_len: usize, i: usize, id: u32) -> u32 {
        let g = self.row_group[b * q_len + i] as usize;
        self.shifts[((b * self.heads + h) * self.groups + g) * self.sk + id as usize]
    }

    /// The largest shift plus one (the RoPE table must cover it).
    pub fn max_shift(&self) -> usize {
        self.shifts.iter().copied().max().map_or(0, |m| m as usize)
    }
}

/// The order of segments `1..=n` by descending `score(j)` (ties: lower index first), with `own`
/// first when given.
pub(crate) fn segment_order(n: usize, own: Option<usize>, score: impl Fn(usize) -> f32) -> Vec<usize> {
    // One allocation of its final size (a decode step sorts once per head and row).
    let mut order = Vec::with_capacity(n);
    order.extend(own);
    let first = order.len();
    order.extend((1..=n).filter(|&j| Some(j) != own));
    // sort_by is stable; total_cmp keeps NaN-free scores in their numeric order.
    order[first..].sort_by(|&a, &b| score(b).total_cmp(&score(a)));
    order
}

/// Writes the shifts of `order` into `dst` (indexed by segment id): the exclusive cumulative
/// sum of the segment lengths in rank order.
fn write_shifts(order: &[usize], lens: &[usize], dst: &mut [u32]) {
    let mut before = 0usize;
    for &j in order {
        dst[j] = before as u32;
        before += lens[j - 1];
    }
}

/// The query groups of the last `q_len` of the `kv_len` tokens of each (extended) layout, and the
/// per-row data the kernels read: what both the CPU order and the device kernel
/// (`kernels/pine/shifts.cu`) start from.
#[derive(Clone, Debug)]
pub(crate) struct GroupLayout {
    /// Groups per (batch row, head), the largest over the batch.
    pub groups: usize,
    /// Key segment ids (`max n + 2`).
    pub sk: usize,
    /// `[B]` segment count of each row.
    pub num_segs: Vec<u32>,
    /// `[B]` first suffix / generated row among the query rows (`q_len` if none).
    pub first_suffix_row: Vec<u32>,
    /// `[B, sk]` length of segment id `j` (0 for the prefix and suffix ids).
    pub segment_lens: Vec<u32>,
    /// `[B, Lq]` group of every query row.
    pub row_group: Vec<u32>,
    /// `[B, Lq]` original RoPE position of every query row.
    pub q_pos: Vec<u32>,
    /// Device copies of [`GroupLayout::packed_meta`] (the shifts kernel's metadata) and of the
    /// rows' `[q_pos | row_group]` (the rope kernel's), uploaded once per context; clones share
    /// them.
    #[cfg(feature = "cuda")]
    pub device_meta: crate::cuda::DeviceCopies<u32>,
    #[cfg(feature = "cuda")]
    pub device_rows: crate::cuda::DeviceCopies<u32>,
}

impl GroupLayout {
    pub fn new(layouts: &[PineLayout], sk: usize, q_len: usize, kv_len: usize, positions: &[Vec<u32>]) -> Self {
        let batch = layouts.len();
        let off = kv_len - q_len;
        let mut g = Self {
            groups: 1,
            sk,
            num_segs: Vec::with_capacity(batch),
            first_suffix_row: Vec::with_capacity(batch),
            segment_lens: vec![0; batch * sk],
            row_group: vec![0; batch * q_len],
            q_pos: vec![0; batch * q_len],
            #[cfg(feature = "cuda")]
            device_meta: Default::default(),
            #[cfg(feature = "cuda")]
            device_rows: Default::default(),
        };
        for (b, layout) in layouts.iter().enumerate() {
            let n = layout.segment_lens.len();
            let seg_end = layout.len() - layout.suffix_len;
            let first_suffix_row = seg_end.saturating_sub(off).min(q_len);
            g.groups = g.groups.max(n + 1 + q_len - first_suffix_row);
            g.num_segs.push(n as u32);
            g.first_suffix_row.push(first_suffix_row as u32);
            for (j, &l) in layout.segment_lens.iter().enumerate() {
                g.segment_lens[b * sk + j + 1] = l as u32;
            }
            let mut id_of = Vec::with_capacity(seg_end);
            id_of.extend(std::iter::repeat_n(0usize, layout.prefix_len));
            for (j, &l) in layout.segment_lens.iter().enumerate() {
                id_of.extend(std::iter::repeat_n(j + 1, l));
            }
            for i in 0..q_len {
                let t = off + i;
                let id = id_of.get(t).copied().unwrap_or(n + 1);
                g.row_group[b * q_len + i] = if id <= n { id } else { n + 1 + i - first_suffix_row } as u32;
                g.q_pos[b * q_len + i] = positions[b][t];
            }
        }
        g
    }
}

/// Shifts of every group from the importance scores, on the CPU (a stable sort per group; the
/// device kernel ranks by counting, the same order).
pub(crate) fn query_shifts(groups: GroupLayout, heads: usize, q_len: usize, imp: &HostImportance) -> QueryShifts {
    let batch = groups.num_segs.len();
    let (sk, ng) = (groups.sk, groups.groups);
    let mut shifts = vec![0u32; batch * heads * ng * sk];
    for b in 0..batch {
        let n = groups.num_segs[b] as usize;
        let lens: Vec<usize> = (1..=n).map(|j| groups.segment_lens[b * sk + j] as usize).collect();
        let first_suffix_row = groups.first_suffix_row[b] as usize;
        let segment_scores = imp.segments.as_ref().filter(|_| n > 2);
        // Without scores (a decode step's segment groups, or n <= 2) a segment group's order is
        // its own segment, then the others by index: the same for every head.
        let unscored: Vec<u32> = match segment_scores {
            Some(_) => Vec::new(),
            None => {
                let mut all = vec![0u32; (n + 1) * sk];
                for i in 1..=n {
                    let order = segment_order(n, Some(i), |_| 0.0);
                    write_shifts(&order, &lens, &mut all[i * sk..(i + 1) * sk]);
                }
                all
            }
        };
        for h in 0..heads {
            let base = (b * heads + h) * ng;
            // Segment groups.
            match segment_scores {
                Some(seg) => {
                    for i in 1..=n {
                        let row = &seg[((b * heads + h) * sk + i) * sk..][..sk];
                        let order = segment_order(n, Some(i), |j| row[j]);
                        write_shifts(&order, &lens, &mut shifts[(base + i) * sk..(base + i + 1) * sk]);
                    }
                }
                None => shifts[(base + 1) * sk..(base + n + 1) * sk].copy_from_slice(&unscored[sk..]),
            }
            // Suffix / generated rows, one group each.
            for i in first_suffix_row..q_len {
                let r = i - (q_len - imp.scored_rows);
                let row = &imp.rows[((b * heads + h) * imp.scored_rows + r) * sk..][..sk];
                let order = segment_order(n, None, |j| row[j]);
                let g = n + 1 + i - first_suffix_row;
                write_shifts(&order, &lens, &mut shifts[(base + g) * sk..(base + g + 1) * sk]);
            }
        }
    }
    QueryShifts {
        groups: ng,
        sk,
        heads,
        row_group: groups.row_group,
        shifts,
        q_pos: groups.q_pos,
        #[cfg(feature = "cuda")]
        device_rows: groups.device_rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_stable_descending_with_own_first() {
        let scores = [0.0, 0.2, 0.5, 0.2, 0.9];
        assert_eq!(segment_order(4, None, |j| scores[j]), vec![4, 2, 1, 3]);
        assert_eq!(segment_order(4, Some(3), |j| scores[j]), vec![3, 4, 2, 1]);
        assert_eq!(segment_order(2, Some(2), |_| 0.0), vec![2, 1]);
    }

    #[test]
    fn shifts_tile_the_segments_without_gaps() {
        let lens = [5, 3, 7];
        let mut dst = [0u32; 5];
        write_shifts(&[2, 3, 1], &lens, &mut dst);
        assert_eq!(&dst[1..4], &[10, 0, 3]);
    }
}
