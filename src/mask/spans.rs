//! Host segment metadata of one side (queries or keys): O(len) per batch row.
//!
//! For every position we keep its segment id and `span_end`, one past the last position of its
//! segment. Walking a range of positions segment by segment is then `i = span_end[i]`.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use crate::error::invalid_arg;

/// Segment ids and span ends of every batch row of one side, `[rows, len]` flattened. Immutable
/// and shared: a clone (every call's copy of a mask's metadata) costs two reference counts, not
/// O(len) copies.
#[derive(Clone, Debug)]
pub struct SegmentSpans {
    ids: Arc<[u32]>,
    span_end: Arc<[u32]>,
    rows: usize,
    len: usize,
    /// Number of spans (runs of one id) over all rows.
    spans: usize,
    /// The most spans that any aligned tile of [`RUN_TILE`] positions of a row meets.
    most_spans_per_tile: usize,
}

/// The tile of [`SegmentSpans::most_spans_per_tile`]: the forward kernels' key tiles of 64.
pub const RUN_TILE: usize = 64;

impl SegmentSpans {
    /// Reads and validates a `[B, L]` (or `[1, L]`) u32 segment-id tensor. `name` is the argument
    /// name used in error messages.
    pub fn from_tensor(name: &str, ids: &Tensor) -> Result<Self> {
        let (rows, len) = ids.dims2()?;
        let ids = ids.flatten_all()?.to_vec1::<u32>()?;
        Self::from_ids(name, ids, rows, len)
    }

    /// Builds spans from `rows` rows of `len` ids each; ids must be non-decreasing in each row.
    pub fn from_ids(name: &str, ids: Vec<u32>, rows: usize, len: usize) -> Result<Self> {
        let mut span_end = vec![0u32; ids.len()];
        let mut spans = 0;
        let mut most_spans_per_tile = 0;
        for r in 0..rows {
            let row = &ids[r * len..(r + 1) * len];
            for i in 1..len {
                if row[i] < row[i - 1] {
                    invalid_arg!(
                        "{name}: segment ids must be non-decreasing along each row (every segment \
                         one contiguous span), but row {r} has id {} at index {i} after id {} at \
                         index {}",
                        row[i],
                        row[i - 1],
                        i - 1
                    );
                }
            }
            // Spans a tile meets: one, plus one per segment boundary strictly inside it.
            for tile in row.chunks(RUN_TILE) {
                let inside = tile.windows(2).filter(|w| w[0] != w[1]).count();
                most_spans_per_tile = most_spans_per_tile.max(1 + inside);
            }
            let ends = &mut span_end[r * len..(r + 1) * len];
            let mut end = len as u32;
            spans += usize::from(len > 0);
            for i in (0..len).rev() {
                if i + 1 < len && row[i] != row[i + 1] {
                    end = (i + 1) as u32;
                    spans += 1;
                }
                ends[i] = end;
            }
        }
        Ok(Self {
            ids: ids.into(),
            span_end: span_end.into(),
            rows,
            len,
            spans,
            most_spans_per_tile,
        })
    }

    /// The most spans (runs of one id) that any aligned tile of 64 positions (the forward
    /// kernels' key tiles) of a row meets (0 for empty rows).
    pub fn most_spans_per_tile(&self) -> usize {
        self.most_spans_per_tile
    }

    /// Number of rows stored (1 when shared by every batch row).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Length of every row.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether rows are empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mean length of a span (a run of one segment id) over all rows; 0 for empty rows.
    pub fn mean_span_len(&self) -> f64 {
        if self.spans == 0 {
            0.0
        } else {
            (self.rows * self.len) as f64 / self.spans as f64
        }
    }

    /// The row used by batch row `b` (row 0 when shared).
    pub fn row(&self, b: usize) -> SpanRow<'_> {
        let r = if self.rows == 1 { 0 } else { b };
        let range = r * self.len..(r + 1) * self.len;
        SpanRow {
            ids: &self.ids[range.clone()],
            span_end: &self.span_end[range],
        }
    }

    /// All ids, `[rows, len]` flattened.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// All span ends, `[rows, len]` flattened.
    pub fn span_ends(&self) -> &[u32] {
        &self.span_end
    }
}

/// One row of [`SegmentSpans`].
#[derive(Clone, Copy, Debug)]
pub struct SpanRow<'a> {
    /// Segment id of every position.
    pub ids: &'a [u32],
    /// One past the last position of every position's segment.
    pub span_end: &'a [u32],
}

impl SpanRow<'_> {
    /// Calls `f(id, start, end)` for each segment piece of positions `[start, end)`, in order.
    #[inline]
    pub fn for_each_span(&self, start: usize, end: usize, mut f: impl FnMut(u32, usize, usize)) {
        let mut i = start;
        while i < end {
            let stop = (self.span_end[i] as usize).min(end);
            f(self.ids[i], i, stop);
            i = stop;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_spans_per_tile_counts_boundaries_inside_a_tile() -> Result<()> {
        let spans = |ids: Vec<u32>, rows: usize| {
            let len = ids.len() / rows;
            SegmentSpans::from_ids("ids", ids, rows, len).map(|s| s.most_spans_per_tile())
        };
        // One segment; a boundary on a tile edge (two tiles of one span each); one inside.
        assert_eq!(spans(vec![0; 200], 1)?, 1);
        assert_eq!(spans([vec![0; 64], vec![1; 64]].concat(), 1)?, 1);
        assert_eq!(spans([vec![0; 40], vec![1; 88]].concat(), 1)?, 2);
        // Two boundaries inside the second tile of the second row.
        let row0 = [vec![0; 64], vec![1; 64]].concat();
        let row1 = [vec![0; 70], vec![1; 10], vec![2; 48]].concat();
        assert_eq!(spans([row0, row1].concat(), 2)?, 3);
        assert_eq!(spans(Vec::new(), 1)?, 0);
        Ok(())
    }
}
