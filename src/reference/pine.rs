//! The exact PINE oracle: one attention layer of "Eliminating Position Bias of Language Models:
//! A Mechanistic Approach" (ICLR 2025), computed literally as the paper's reference code does.
//!
//! Every step is written out the way the paper describes it, in f64, materialising everything:
//! the dense visibility matrix, the importance scores on the UN-rotated q and k, the order of the
//! segments, their shifts, and then, for every query group, the keys re-rotated explicitly at
//! their new positions `p_k - shift[segment(k)]`. It does NOT use the identity
//! `rope(q, p_q) . rope(k, p_k - s) == rope(q, p_q + s) . rope(k, p_k)` on which the fused path
//! relies; it is the thing that identity must reproduce. Slow on purpose (the suffix re-rotates
//! every key once per query row): for tests only.
//!
//! The steps, per batch row and query head:
//! 1. original positions: prefix `0..P`, segment `j` right-aligned to end at `E - 1`
//!    (`E = P + sum L_j`), suffix and generated tokens at their sequence index;
//! 2. visibility: prefix causal over the prefix only; a segment query sees the prefix and the
//!    other segments fully, its own segment causally, not the suffix; suffix and generated
//!    tokens see every token up to themselves;
//! 3. importance (scaled dot products of the un-rotated q and k, softmax, length-normalised mass
//!    per segment): per query segment (summed over its tokens, own segment forced first, only
//!    when `n > 2`) and per suffix / generated token;
//! 4. order: stable descending sort (ties: lower segment index first); `shift[j]` = total
//!    length of the segments ranked before `j`;
//! 5. attention of each query group with every key re-rotated at `p_k - shift[segment(k)]` and
//!    the query rotated at its original position.

use candle_core::{DType, Device, Result, Tensor};

use crate::error::invalid_arg;
use crate::mask::PineLayout;
use crate::pine::Rope;
use crate::validate::default_scale;

/// Output of [`pine_attention`].
#[derive(Clone, Debug)]
pub struct PineReferenceOutput {
    /// `[B, L, H, D]` f64 on the CPU.
    pub out: Tensor,
    /// `[B, H, L]` f64 natural-log log-sum-exp of each row's scaled scores (`-inf` for a row that
    /// sees nothing).
    pub lse: Tensor,
    /// `[B, H, L, S]` i64: the shift applied to key segment id `s` for query row `i`
    /// (`S` = max over batch rows of `n + 2`; prefix, suffix and ids beyond a row's own `n + 1`
    /// are 0; every entry of a prefix row is 0).
    pub shifts: Tensor,
    /// `[B, H, L]` f64: for the row's query group, the smallest gap between two importance scores
    /// that the sort had to compare (adjacent in sorted order, the forced own segment left out),
    /// relative to the largest score magnitude among them; `+inf` where no sort was needed
    /// (prefix rows, segment rows when `n <= 2`, suffix rows when `n <= 1`). Tests use it to skip
    /// groups whose order is a near-tie that f32 rounding could flip.
    pub margin: Tensor,
}

/// Exact PINE attention (one layer), f64 on the CPU.
///
/// `q` `[B, L, H, D]`, `k` and `v` `[B, L, Hkv, D]` are the UN-rotated projections
/// (`H % Hkv == 0`; GQA: query head `h` uses key/value head `h / (H / Hkv)`), of any float dtype
/// (converted to f64 exactly). `layouts` has one [`PineLayout`] per batch row; rows may differ
/// and each must satisfy `len() <= L`: the tokens beyond a row's layout are generated tokens
/// (suffix id `n + 1`, position = sequence index). Every segment needs at least one token.
/// `rope` gives the rotary frequencies (for tables, positions up to `L - 1` must be covered);
/// `scale` (default `1 / sqrt(D)`) scales both the importance scores and the attention scores.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use segattn::pine::Rope;
/// use segattn::reference::pine_attention;
/// use segattn::PineLayout;
/// let q = Tensor::randn(0f32, 1.0, (1, 12, 2, 8), &Device::Cpu)?;
/// let k = Tensor::randn(0f32, 1.0, (1, 12, 1, 8), &Device::Cpu)?;
/// let v = Tensor::randn(0f32, 1.0, (1, 12, 1, 8), &Device::Cpu)?;
/// let layout = PineLayout::new(2, &[3, 2, 3], 2); // 10 tokens, then 2 generated
/// let r = pine_attention(&q, &k, &v, &[layout], &Rope::new(10_000.0), None)?;
/// assert_eq!(r.shifts.dims(), &[1, 2, 12, 5]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn pine_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layouts: &[PineLayout],
    rope: &Rope,
    scale: Option<f64>,
) -> Result<PineReferenceOutput> {
    let Dims {
        batch,
        len,
        heads,
        kv_heads,
        d,
    } = check_inputs(q, k, v, layouts)?;
    let scale = scale.unwrap_or_else(|| default_scale(d));
    let angles = Angles::new(rope, d, len)?;
    let q = to_f64(q)?;
    let k = to_f64(k)?;
    let v = to_f64(v)?;
    let group = heads / kv_heads;
    let s_ids = layouts.iter().map(PineLayout::num_ids).max().unwrap_or(2);

    let mut out = vec![0f64; batch * len * heads * d];
    let mut lse = vec![f64::NEG_INFINITY; batch * heads * len];
    let mut shifts_out = vec![0i64; batch * heads * len * s_ids];
    let mut margin_out = vec![f64::INFINITY; batch * heads * len];

    for (b, layout) in layouts.iter().enumerate() {
        let row = Row::new(layout, len);
        let visible = row.visibility();
        for h in 0..heads {
            let kh = h / group;
            // The rows of this (batch row, head), `[L][D]` each.
            let q_rows: Vec<&[f64]> = (0..len).map(|t| &q[((b * len + t) * heads + h) * d..][..d]).collect();
            let k_rows: Vec<&[f64]> = (0..len)
                .map(|t| &k[((b * len + t) * kv_heads + kh) * d..][..d])
                .collect();
            let v_rows: Vec<&[f64]> = (0..len)
                .map(|t| &v[((b * len + t) * kv_heads + kh) * d..][..d])
                .collect();

            for query_group in row.query_groups() {
                // Steps 3 and 4: importance, order, shifts (indexed by segment id 0..=n+1).
                let Ordering { shift, margin } = match query_group {
                    QueryGroup::Prefix(_) => Ordering::none(row.n),
                    QueryGroup::Segment(i) => row.segment_order(i, &q_rows, &k_rows, scale),
                    QueryGroup::Token(t) => row.token_order(t, &q_rows, &k_rows, scale),
                };

                // Step 5: re-rotate ALL keys for this group at p_k - shift[segment(k)].
                let k_rot: Vec<Vec<f64>> = (0..len)
                    .map(|j| {
                        let new_pos = row.position(j) - shift[row.id(j)];
                        angles.rotate(k_rows[j], new_pos)
                    })
                    .collect();

                for t in query_group.rows(&row) {
                    let q_rot = angles.rotate(q_rows[t], row.position(t));
                    let scores: Vec<Option<f64>> = (0..len)
                        .map(|j| visible[t * len + j].then(|| scale * dot(&q_rot, &k_rot[j])))
                        .collect();
                    let o = &mut out[((b * len + t) * heads + h) * d..][..d];
                    lse[(b * heads + h) * len + t] = softmax_times_v(&scores, &v_rows, o);
                    margin_out[(b * heads + h) * len + t] = margin;
                    let sh = &mut shifts_out[((b * heads + h) * len + t) * s_ids..][..s_ids];
                    for (id, &s) in shift.iter().enumerate() {
                        sh[id] = s as i64;
                    }
                }
            }
        }
    }
    let dev = Device::Cpu;
    Ok(PineReferenceOutput {
        out: Tensor::from_vec(out, (batch, len, heads, d), &dev)?,
        lse: Tensor::from_vec(lse, (batch, heads, len), &dev)?,
        shifts: Tensor::from_vec(shifts_out, (batch, heads, len, s_ids), &dev)?,
        margin: Tensor::from_vec(margin_out, (batch, heads, len), &dev)?,
    })
}

/// The sizes of a call.
struct Dims {
    batch: usize,
    len: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
}

fn check_inputs(q: &Tensor, k: &Tensor, v: &Tensor, layouts: &[PineLayout]) -> Result<Dims> {
    for (name, t, want) in [
        ("q", q, "[B, L, H, D]"),
        ("k", k, "[B, L, Hkv, D]"),
        ("v", v, "[B, L, Hkv, D]"),
    ] {
        if t.rank() != 4 {
            invalid_arg!("{name}: expected rank 4 {want}, got shape {:?}", t.dims());
        }
        if !t.dtype().is_float() {
            invalid_arg!("{name}: expected a float dtype, got {:?}", t.dtype());
        }
    }
    let (batch, len, heads, d) = q.dims4()?;
    let (kb, kl, kv_heads, kd) = k.dims4()?;
    if (kb, kl, kd) != (batch, len, d) {
        invalid_arg!(
            "k: expected shape [{batch}, {len}, Hkv, {d}] (q is [B, L, H, D]), got {:?}",
            k.dims()
        );
    }
    if kv_heads == 0 || heads % kv_heads != 0 {
        invalid_arg!(
            "k: H = {heads} must be a multiple of Hkv = {kv_heads} (GQA), got shape {:?}",
            k.dims()
        );
    }
    if v.dims() != k.dims() {
        invalid_arg!("v: expected shape {:?} (the shape of k), got {:?}", k.dims(), v.dims());
    }
    if layouts.len() != batch {
        invalid_arg!(
            "layouts: expected one layout per batch row (B = {batch}), got {}",
            layouts.len()
        );
    }
    for (b, layout) in layouts.iter().enumerate() {
        if let Some(j) = layout.segment_lens.iter().position(|&l| l == 0) {
            invalid_arg!(
                "layouts: row {b}: segment {} has length 0; every segment needs at least one token",
                j + 1
            );
        }
        if layout.len() > len {
            invalid_arg!(
                "layouts: row {b} covers {} tokens, more than L = {len} (the length of q)",
                layout.len()
            );
        }
    }
    Ok(Dims {
        batch,
        len,
        heads,
        kv_heads,
        d,
    })
}

/// One batch row's layout, extended with generated tokens up to `len`.
struct Row {
    /// P.
    prefix_len: usize,
    /// n.
    n: usize,
    /// `(first sequence index, length)` of segment `j` at index `j - 1`.
    segments: Vec<(usize, usize)>,
    /// E = P + sum L_j: the first suffix token.
    end: usize,
    /// L, total tokens (suffix and generated tokens run from `end` to `len`).
    len: usize,
}

/// The query rows that share one order of the segments.
#[derive(Clone, Copy, Debug)]
enum QueryGroup {
    /// All the prefix rows (no order: they see no segment).
    Prefix(usize),
    /// The rows of segment `i` (1-based): one order per query segment.
    Segment(usize),
    /// One suffix or generated row: one order per query token.
    Token(usize),
}

impl QueryGroup {
    fn rows(self, row: &Row) -> std::ops::Range<usize> {
        match self {
            QueryGroup::Prefix(p) => 0..p,
            QueryGroup::Segment(i) => row.segment_range(i),
            QueryGroup::Token(t) => t..t + 1,
        }
    }
}

/// The result of steps 3 and 4 for one query group.
struct Ordering {
    /// `shift[id]` for every segment id `0..=n+1` (0 for the prefix and the suffix).
    shift: Vec<usize>,
    /// See [`PineReferenceOutput::margin`].
    margin: f64,
}

impl Ordering {
    /// No re-assignment: every shift 0.
    fn none(n: usize) -> Self {
        Self {
            shift: vec![0; n + 2],
            margin: f64::INFINITY,
        }
    }
}

impl Row {
    fn new(layout: &PineLayout, len: usize) -> Self {
        let prefix_len = layout.prefix_len;
        let mut segments = Vec::with_capacity(layout.segment_lens.len());
        let mut start = prefix_len;
        for &l in &layout.segment_lens {
            segments.push((start, l));
            start += l;
        }
        Self {
            prefix_len,
            n: segments.len(),
            segments,
            end: start,
            len,
        }
    }

    /// Sequence indices of segment `i` (1-based).
    fn segment_range(&self, i: usize) -> std::ops::Range<usize> {
        let (start, l) = self.segments[i - 1];
        start..start + l
    }

    /// L_i.
    fn segment_len(&self, i: usize) -> usize {
        self.segments[i - 1].1
    }

    /// Segment id of token `t`: prefix 0, segment `j` -> `j`, suffix and generated `n + 1`.
    fn id(&self, t: usize) -> usize {
        if t < self.prefix_len {
            return 0;
        }
        (1..=self.n)
            .find(|&j| self.segment_range(j).contains(&t))
            .unwrap_or(self.n + 1)
    }

    /// Step 1, original position of token `t`: prefix `0..P`; token `u` of segment `j` at
    /// `E - L_j + u` (right-aligned to end at `E - 1`); suffix and generated tokens at `t`.
    fn position(&self, t: usize) -> usize {
        match self.id(t) {
            j if (1..=self.n).contains(&j) => {
                let (start, l) = self.segments[j - 1];
                self.end - l + (t - start)
            }
            _ => t,
        }
    }

    /// Step 2, who sees whom, `[L * L]` row-major (query, key), from the paper's words.
    fn visibility(&self) -> Vec<bool> {
        let (n, suffix) = (self.n, self.n + 1);
        let mut visible = vec![false; self.len * self.len];
        for i in 0..self.len {
            let qi = self.id(i);
            for j in 0..self.len {
                let kj = self.id(j);
                visible[i * self.len + j] = if qi == 0 {
                    // Prefix queries: causal over the prefix only.
                    kj == 0 && j <= i
                } else if qi <= n {
                    // Segment-i queries: prefix fully, other segments fully, own segment causal,
                    // suffix excluded.
                    if kj == 0 {
                        true
                    } else if kj == qi {
                        j <= i
                    } else {
                        kj != suffix
                    }
                } else {
                    // Suffix queries and generated tokens: ordinary causal row.
                    j <= i
                };
            }
        }
        visible
    }

    /// The query groups: the prefix, each segment, each suffix / generated token.
    fn query_groups(&self) -> Vec<QueryGroup> {
        let mut groups = vec![QueryGroup::Prefix(self.prefix_len)];
        groups.extend((1..=self.n).map(QueryGroup::Segment));
        groups.extend((self.end..self.len).map(QueryGroup::Token));
        groups
    }

    /// `score_t[j] = sum_{s in seg j} A[t, s] / L_j`, `A` the softmax of `scale * q_t . k_s`
    /// (un-rotated) over the tokens `s` of the segments in `over` only. Indexed by segment id
    /// (entries of segments outside `over`, the prefix and the suffix stay 0).
    fn token_scores(&self, t: usize, over: &[usize], q: &[&[f64]], k: &[&[f64]], scale: f64) -> Vec<f64> {
        let keys: Vec<usize> = over.iter().flat_map(|&j| self.segment_range(j)).collect();
        let logits: Vec<f64> = keys.iter().map(|&s| scale * dot(q[t], k[s])).collect();
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exp: Vec<f64> = logits.iter().map(|x| (x - max).exp()).collect();
        let denom: f64 = exp.iter().sum();
        let mut score = vec![0f64; self.n + 2];
        for (&s, e) in keys.iter().zip(&exp) {
            score[self.id(s)] += e / denom; // A[t, s]
        }
        for &j in over {
            score[j] /= self.segment_len(j) as f64;
        }
        score
    }

    /// Steps 3 and 4 for the query segment `i`.
    fn segment_order(&self, i: usize, q: &[&[f64]], k: &[&[f64]], scale: f64) -> Ordering {
        let others: Vec<usize> = (1..=self.n).filter(|&j| j != i).collect();
        if self.n <= 2 {
            // n == 1: just the segment itself. n == 2: no scores, the other segment is simply
            // placed just before it.
            let order: Vec<usize> = std::iter::once(i).chain(others).collect();
            return self.ordering(&order, f64::INFINITY);
        }
        // n > 2: I[i, j] = sum over the tokens t of segment i of score_t[j], the softmax taken
        // over the OTHER segments only; I[i, i] forced to +max, so the own segment ranks first.
        let mut importance = vec![0f64; self.n + 2];
        for t in self.segment_range(i) {
            let score = self.token_scores(t, &others, q, k, scale);
            for &j in &others {
                importance[j] += score[j];
            }
        }
        importance[i] = f64::INFINITY;
        let order = stable_descending(&importance[1..=self.n]);
        // The sort compared the other segments' scores (the forced +max aside).
        let compared: Vec<f64> = order[1..].iter().map(|&j| importance[j]).collect();
        self.ordering(&order, margin_of(&compared))
    }

    /// Steps 3 and 4 for the suffix or generated token `t`: softmax over ALL segment tokens, no
    /// aggregation.
    fn token_order(&self, t: usize, q: &[&[f64]], k: &[&[f64]], scale: f64) -> Ordering {
        if self.n == 0 {
            return Ordering::none(0);
        }
        let all: Vec<usize> = (1..=self.n).collect();
        let score = self.token_scores(t, &all, q, k, scale);
        let order = stable_descending(&score[1..=self.n]);
        let sorted: Vec<f64> = order.iter().map(|&j| score[j]).collect();
        self.ordering(&order, margin_of(&sorted))
    }

    /// Step 4: `shift[j]` = total length of the segments ranked before `j`; 0 for the prefix and
    /// the suffix. `order` lists segment ids, most important first.
    fn ordering(&self, order: &[usize], margin: f64) -> Ordering {
        let mut shift = vec![0usize; self.n + 2];
        let mut before = 0;
        for &j in order {
            shift[j] = before;
            before += self.segment_len(j);
        }
        Ordering { shift, margin }
    }
}

/// Stable descending argsort of `scores` (segment `j` at index `j - 1`), returned as segment ids
/// 1-based; ties keep the lower segment index first.
fn stable_descending(scores: &[f64]) -> Vec<usize> {
    let mut ids: Vec<usize> = (1..=scores.len()).collect();
    ids.sort_by(|&a, &b| scores[b - 1].total_cmp(&scores[a - 1])); // `sort_by` is stable
    ids
}

/// Smallest gap between adjacent elements of a list sorted in descending order, relative to its
/// largest magnitude; `+inf` for fewer than 2 elements.
fn margin_of(sorted: &[f64]) -> f64 {
    if sorted.len() < 2 {
        return f64::INFINITY;
    }
    let largest = sorted.iter().fold(0f64, |m, x| m.max(x.abs()));
    let gap = sorted
        .windows(2)
        .map(|w| (w[0] - w[1]).abs())
        .fold(f64::INFINITY, f64::min);
    if largest > 0.0 {
        gap / largest
    } else {
        0.0 // every score 0: all tied
    }
}

/// Softmax over the visible scores (`None` = masked) times V, accumulated into `o`; returns the
/// log-sum-exp (`-inf`, `o` untouched at 0, when nothing is visible).
fn softmax_times_v(scores: &[Option<f64>], v: &[&[f64]], o: &mut [f64]) -> f64 {
    let max = scores.iter().flatten().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let denom: f64 = scores.iter().flatten().map(|s| (s - max).exp()).sum();
    for (j, s) in scores.iter().enumerate() {
        if let Some(s) = s {
            let p = (s - max).exp() / denom;
            o.iter_mut().zip(v[j]).for_each(|(o, v)| *o += p * v);
        }
    }
    max + denom.ln()
}

/// cos / sin of every position `0..L` and pair, f64.
struct Angles {
    half: usize,
    cos: Vec<f64>,
    sin: Vec<f64>,
}

impl Angles {
    /// Theta form: `cos(p * inv_freq[i])` in f64. Tables: the caller's f32 entries.
    fn new(rope: &Rope, d: usize, len: usize) -> Result<Self> {
        rope.check(d, len)?; // even D, theta > 1, tables covering positions 0..L
        let half = d / 2;
        let (cos, sin) = match rope.inv_freq(d) {
            Some(inv_freq) => (0..len)
                .flat_map(|p| inv_freq.iter().map(move |f| (p as f64 * f).sin_cos()))
                .map(|(s, c)| (c, s))
                .unzip(),
            None => {
                let table = rope.table(d, len)?;
                let widen = |x: &[f32]| x.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
                (widen(&table.cos), widen(&table.sin))
            }
        };
        Ok(Self { half, cos, sin })
    }

    /// `x` rotated at position `p` (rotate-half: pairs `(i, i + D/2)`).
    fn rotate(&self, x: &[f64], p: usize) -> Vec<f64> {
        let h = self.half;
        let (c, s) = (&self.cos[p * h..][..h], &self.sin[p * h..][..h]);
        let mut y = vec![0f64; 2 * h];
        for i in 0..h {
            let (x1, x2) = (x[i], x[i + h]);
            y[i] = x1 * c[i] - x2 * s[i];
            y[i + h] = x2 * c[i] + x1 * s[i];
        }
        y
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()
}
