//! Options of the per-segment attention mass, and the output layout they imply.

use candle_core::Result;

use crate::error::{invalid_arg, try_filled};
use crate::mask::{HostMask, SegmentSpans};
use crate::validate::AttentionShape;

/// Reduction over query rows of the per-segment mass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum QueryReduction {
    /// One output row per query row: `[B, H, Lq, Sk]`.
    #[default]
    None,
    /// Sum over the query rows of each query segment id: `[B, H, Sq, Sk]` (PINE's `I[i, j]`).
    SumBySegment,
    /// Mean over the query rows of each query segment id (rows that see nothing count, as
    /// zeros): `[B, H, Sq, Sk]`. An id with no query row in a batch row gives zeros.
    MeanBySegment,
}

/// Reduction over (query) heads of the per-segment mass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HeadReduction {
    /// One output per query head (under GQA: per query head, not per key/value head): `H`.
    #[default]
    None,
    /// Sum over the heads; the head axis is kept with size 1.
    Sum,
    /// Mean over the heads; the head axis is kept with size 1.
    Mean,
}

/// How the fused CPU path (and the CUDA kernel) compute the mass. The results agree to rounding;
/// the choice is about speed. `Auto` is right for normal use; the others exist for tests and
/// benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MassAlgorithm {
    /// One pass while it is the cheaper one, else two. CPU: one pass while
    /// `Sk <= CPU_ONE_PASS_SEGMENTS_PER_DIM * D` (32 D): its rescaling costs at most `Sk` per
    /// row and key tile when the row's max moves, a second pass `64 D` (measured crossover, with
    /// every row's max moving at every tile: `Sk ~ 64 D`). CUDA kernel: one pass while
    /// `Sk <= KERNEL_ONE_PASS_MAX_SEGMENTS` (64, what its registers hold).
    #[default]
    Auto,
    /// One pass over the key tiles: per-row, per-segment accumulators rescaled with the running
    /// max exactly like the attention output (`P` times a one-hot segment matrix). Cost per row
    /// and key tile O(tile + Sk) when the max moves: the choice for small `Sk`. (The attention's
    /// fused mass output always works this way.)
    OnePass,
    /// Two passes: the row max and log-sum-exp first (Q K^T only), then the exact probabilities
    /// `exp(s - lse)` of every key tile summed straight into the segments the tile touches (at
    /// most 64). No rescaling at all: the choice for thousands of segments.
    TwoPass,
}

/// [`MassAlgorithm::Auto`] on the CPU: one pass while `Sk <= CPU_ONE_PASS_SEGMENTS_PER_DIM * D`.
pub const CPU_ONE_PASS_SEGMENTS_PER_DIM: usize = 32;

/// The most key segments the CUDA kernel's one-pass path holds on chip (ids 0..63); above, its
/// [`MassAlgorithm::Auto`] takes two passes and [`MassAlgorithm::OnePass`] is an error.
pub const KERNEL_ONE_PASS_MAX_SEGMENTS: usize = 64;

/// Options of [`crate::segment_scores`] and of the attention's fused mass output
/// ([`crate::SegmentAttention::return_segment_mass`]). Build with the methods:
///
/// ```
/// use segattn::{HeadReduction, QueryReduction, SegmentScoreOptions};
/// // PINE's segment-query importance: length-normalised mass summed over each query segment,
/// // per head.
/// let opts = SegmentScoreOptions::new()
///     .normalize_by_length(true)
///     .query_reduction(QueryReduction::SumBySegment);
/// assert_eq!(opts.head_reduction, HeadReduction::None);
/// ```
///
/// # Output
///
/// An f32 tensor `[B, Ho, Lo, Sk]` on the device of q:
/// - `Sk`: the key segment **ids** `0..=max id` (max over every batch row of `kv_segments`, or
///   [`SegmentScoreOptions::num_key_segments`]): column `s` is the segment with id `s`, the same
///   in every batch row, so callers index by the ids they built the mask from (PINE: 0 = prefix,
///   `1..=n` the segments, `n + 1` the suffix). Ids that no key carries give zero columns.
/// - `Lo`: `Lq` (one row per query), or `Sq` (query segment ids `0..=max q id`) under a query
///   reduction.
/// - `Ho`: `H` (query heads), or 1 under a head reduction (the axis is kept so that the rank and
///   the axis positions never depend on the options).
///
/// `mass[b, h, i, s] = sum over keys j of segment s of P[b, h, i, j]`, with `P` the softmax over
/// the keys visible to query `i` under the mask; a query that sees no key gives a row of zeros.
/// Then, in this order (all linear): divided by the number of keys `L_s` of segment `s` in batch
/// row `b` (normalize_by_length), summed / averaged over the query rows of each query segment,
/// summed / averaged over heads.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SegmentScoreOptions {
    /// Divide the mass of segment `s` by its key count `L_s` (PINE's importance). Default false.
    pub normalize_by_length: bool,
    /// Reduction over query rows. Default none.
    pub query_reduction: QueryReduction,
    /// Reduction over heads. Default none.
    pub head_reduction: HeadReduction,
    /// Softmax scale applied to `q . k` (default `1/sqrt(D)`). For the attention's fused output,
    /// leave it unset (the attention's scale is used) or set the same value.
    pub scale: Option<f64>,
    /// The size `Sk` of the key segment axis; every key id must be below it. Default: max key id
    /// + 1 (fix it to get the same shape across calls, e.g. `n + 2` for PINE).
    pub num_key_segments: Option<usize>,
    /// The size `Sq` of the query segment axis under a query reduction; every query id must be
    /// below it. Default: max query id + 1.
    pub num_query_segments: Option<usize>,
    /// Algorithm of the fused paths (default [`MassAlgorithm::Auto`]).
    pub algorithm: MassAlgorithm,
}

impl SegmentScoreOptions {
    /// Defaults: raw mass, per query row, per head, scale `1/sqrt(D)`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`SegmentScoreOptions::normalize_by_length`].
    pub fn normalize_by_length(mut self, yes: bool) -> Self {
        self.normalize_by_length = yes;
        self
    }

    /// Sets [`SegmentScoreOptions::query_reduction`].
    pub fn query_reduction(mut self, r: QueryReduction) -> Self {
        self.query_reduction = r;
        self
    }

    /// Sets [`SegmentScoreOptions::head_reduction`].
    pub fn head_reduction(mut self, r: HeadReduction) -> Self {
        self.head_reduction = r;
        self
    }

    /// Sets [`SegmentScoreOptions::scale`].
    pub fn scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Sets [`SegmentScoreOptions::num_key_segments`].
    pub fn num_key_segments(mut self, n: usize) -> Self {
        self.num_key_segments = Some(n);
        self
    }

    /// Sets [`SegmentScoreOptions::num_query_segments`].
    pub fn num_query_segments(mut self, n: usize) -> Self {
        self.num_query_segments = Some(n);
        self
    }

    /// Sets [`SegmentScoreOptions::algorithm`].
    pub fn algorithm(mut self, a: MassAlgorithm) -> Self {
        self.algorithm = a;
        self
    }
}

/// Largest id + 1 of a side (0 when it has no position), or the requested size, checked.
pub(crate) fn axis_size(name: &str, option: &str, spans: &SegmentSpans, requested: Option<usize>) -> Result<usize> {
    let max = spans.ids().iter().copied().max();
    let natural = max.map_or(0, |m| m as usize + 1);
    let n = match requested {
        None => natural,
        Some(n) => {
            if natural > n {
                invalid_arg!(
                    "{option}: expected more than every id of {name} (max id {}), got {n}",
                    natural - 1
                );
            }
            n
        }
    };
    if n > MAX_SEGMENT_AXIS {
        invalid_arg!(
            "{option}: expected at most {MAX_SEGMENT_AXIS} segments (the output and every row's sums hold one \
             value per segment id up to the largest; are the ids of {name} dense?), got {n}"
        );
    }
    Ok(n)
}

/// The largest segment axis (`Sk`, `Sq`) of the per-segment mass: ids up to ~1M. Far above any
/// real count of documents or segments, and it keeps a thread's row sums (64 rows x `Sk` f32)
/// under 256 MiB; a larger axis (a sparse id like 4e9) would ask for terabytes.
pub const MAX_SEGMENT_AXIS: usize = 1 << 20;

/// The output layout of one mass computation and the weights of its normalisations.
#[derive(Clone, Debug)]
pub(crate) struct MassPlan {
    pub batch: usize,
    pub num_heads: usize,
    /// Key segment axis `Sk`.
    pub sk: usize,
    /// Query segment axis `Sq` (0 without a query reduction).
    pub sq: usize,
    pub query_reduction: QueryReduction,
    pub head_reduction: HeadReduction,
    /// `[kv rows, Sk]`: 1 / L_s (or 1 without length normalisation; 0 where L_s = 0).
    pub key_weight: Vec<f32>,
    pub key_rows: usize,
    /// `[q rows, Sq]`: 1 / count (mean) or 1 (sum); empty without a query reduction.
    pub query_weight: Vec<f32>,
    pub query_rows: usize,
    /// 1 / H for the head mean, else 1.
    pub head_weight: f32,
    pub algorithm: MassAlgorithm,
}

impl MassPlan {
    pub fn new(shape: &AttentionShape, mask: &HostMask, opts: &SegmentScoreOptions) -> Result<Self> {
        let sk = axis_size("kv_segments", "num_key_segments", &mask.kv, opts.num_key_segments)?;
        let sq = if opts.query_reduction == QueryReduction::None {
            0
        } else {
            axis_size("q_segments", "num_query_segments", &mask.q, opts.num_query_segments)?
        };
        let heads_out = if opts.head_reduction == HeadReduction::None {
            shape.num_heads
        } else {
            1
        };
        let rows_out = if opts.query_reduction == QueryReduction::None {
            shape.q_len
        } else {
            sq
        };
        let elems = [shape.batch, heads_out, rows_out, sk]
            .iter()
            .try_fold(1usize, |acc, &x| acc.checked_mul(x))
            .filter(|&n| n <= isize::MAX as usize / 8);
        if elems.is_none() {
            invalid_arg!(
                "num_key_segments: the output [{}, {heads_out}, {rows_out}, {sk}] is too large (are the segment \
                 ids dense? Sk is the max key id + 1)",
                shape.batch
            );
        }
        // Per row of ids and segment: 1 / its token count (a mean, or a length normalisation).
        let inverse_counts = |spans: &SegmentSpans, size: usize, what: &str| -> Result<Vec<f32>> {
            let mut c = try_filled(spans.rows() * size, 0u32, what)?;
            for r in 0..spans.rows() {
                for &id in spans.row(r).ids {
                    c[r * size + id as usize] += 1;
                }
            }
            Ok(c.into_iter()
                .map(|c| if c == 0 { 0.0 } else { 1.0 / c as f32 })
                .collect())
        };
        let key_rows = mask.kv.rows();
        let key_weight = if opts.normalize_by_length {
            inverse_counts(&mask.kv, sk, "num_key_segments")?
        } else {
            try_filled(key_rows * sk, 1.0, "num_key_segments")?
        };
        let query_rows = mask.q.rows();
        let query_weight = match opts.query_reduction {
            QueryReduction::None => Vec::new(),
            QueryReduction::SumBySegment => try_filled(query_rows * sq, 1.0, "num_query_segments")?,
            QueryReduction::MeanBySegment => inverse_counts(&mask.q, sq, "num_query_segments")?,
        };
        let head_weight = if opts.head_reduction == HeadReduction::Mean {
            1.0 / shape.num_heads as f32
        } else {
            1.0
        };
        // The CPU's choice (the kernel launchers make their own, see MassAlgorithm::Auto).
        let algorithm = match opts.algorithm {
            MassAlgorithm::Auto if sk <= CPU_ONE_PASS_SEGMENTS_PER_DIM * shape.head_dim => MassAlgorithm::OnePass,
            MassAlgorithm::Auto => MassAlgorithm::TwoPass,
            a => a,
        };
        Ok(Self {
            batch: shape.batch,
            num_heads: shape.num_heads,
            sk,
            sq,
            query_reduction: opts.query_reduction,
            head_reduction: opts.head_reduction,
            key_weight,
            key_rows,
            query_weight,
            query_rows,
            head_weight,
            algorithm,
        })
    }

    /// Heads of the output: `H`, or 1 under a head reduction.
    pub fn heads_out(&self) -> usize {
        if self.head_reduction == HeadReduction::None {
            self.num_heads
        } else {
            1
        }
    }

    /// Rows of the output: `Lq`, or `Sq` under a query reduction.
    pub fn rows_out(&self, q_len: usize) -> usize {
        if self.query_reduction == QueryReduction::None {
            q_len
        } else {
            self.sq
        }
    }

    /// `(B, Ho, Lo, Sk)`.
    pub fn out_dims(&self, q_len: usize) -> (usize, usize, usize, usize) {
        (self.batch, self.heads_out(), self.rows_out(q_len), self.sk)
    }

    /// The key weights `[Sk]` of batch row `b`.
    pub fn key_weights(&self, b: usize) -> &[f32] {
        let r = if self.key_rows == 1 { 0 } else { b };
        &self.key_weight[r * self.sk..(r + 1) * self.sk]
    }

    /// The query weights `[Sq]` of batch row `b` (empty without a query reduction).
    pub fn query_weights(&self, b: usize) -> &[f32] {
        if self.sq == 0 {
            return &[];
        }
        let r = if self.query_rows == 1 { 0 } else { b };
        &self.query_weight[r * self.sq..(r + 1) * self.sq]
    }
}
