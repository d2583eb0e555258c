//! Preset masks. Each builds segment ids (O(L)) and a rule; none builds an `L x L` buffer.

use candle_core::{Device, Result};

use super::rule::{Visibility, TABLE_DEFAULT};
use super::SegmentMask;
use crate::error::invalid_arg;

use Visibility::{Blocked, Causal, Full};

/// The layout of one PINE-style prompt: `[prefix][segment 1]...[segment n][suffix]`.
///
/// Segment ids: the prefix is 0, segment `j` (1-based) is `j`, the suffix (and every token
/// generated after it) is `n + 1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PineLayout {
    /// Tokens before the segments (system prompt, BOS, instruction).
    pub prefix_len: usize,
    /// Length of each segment (documents, candidate answers).
    pub segment_lens: Vec<usize>,
    /// Tokens after the segments (question, assistant header), plus generated tokens.
    pub suffix_len: usize,
}

impl PineLayout {
    /// A layout.
    pub fn new(prefix_len: usize, segment_lens: &[usize], suffix_len: usize) -> Self {
        Self {
            prefix_len,
            segment_lens: segment_lens.to_vec(),
            suffix_len,
        }
    }

    /// Total tokens.
    pub fn len(&self) -> usize {
        self.prefix_len + self.segment_lens.iter().sum::<usize>() + self.suffix_len
    }

    /// Whether the layout has no token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of segment ids used: prefix, the segments and the suffix.
    pub fn num_ids(&self) -> usize {
        self.segment_lens.len() + 2
    }

    /// Appends this prompt's ids, offset by `base`, to `ids`.
    fn push_ids(&self, base: u32, ids: &mut Vec<u32>) {
        ids.extend(std::iter::repeat_n(base, self.prefix_len));
        for (j, &l) in self.segment_lens.iter().enumerate() {
            ids.extend(std::iter::repeat_n(base + 1 + j as u32, l));
        }
        let suffix = base + 1 + self.segment_lens.len() as u32;
        ids.extend(std::iter::repeat_n(suffix, self.suffix_len));
    }

    /// Writes this prompt's rules (`rule(q, k, n)`) into the `s x s` table `codes` at id offset
    /// `base`.
    fn write_rules(&self, base: usize, s: usize, codes: &mut [u8], rule: impl Fn(usize, usize, usize) -> Visibility) {
        let n = self.segment_lens.len();
        for q in 0..=n + 1 {
            for k in 0..=n + 1 {
                codes[(base + q) * s + base + k] = rule(q, k, n).code();
            }
        }
    }
}

/// PINE's rule: the prefix is causal over itself; a segment sees the prefix and the other
/// segments fully, itself causally, not the suffix; the suffix (and every token generated after
/// it) is causal over everything.
fn pine_rule(q: usize, k: usize, n: usize) -> Visibility {
    let suffix = n + 1;
    if q == 0 {
        if k == 0 {
            Causal
        } else {
            Blocked
        }
    } else if q <= n {
        if k == q {
            Causal
        } else if k == suffix {
            Blocked
        } else {
            Full
        }
    } else if k == suffix {
        Causal
    } else {
        Full
    }
}

impl SegmentMask {
    /// Ordinary causal attention over `len` tokens (one segment, intra = Causal).
    ///
    /// ```
    /// let mask = segattn::SegmentMask::causal(128, &candle_core::Device::Cpu)?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn causal(len: usize, device: &Device) -> Result<Self> {
        Self::self_attention_from_host(vec![0; len], (1, len), (Causal, Blocked), None, device)
    }

    /// Full bidirectional attention over `len` tokens.
    ///
    /// ```
    /// let mask = segattn::SegmentMask::full(128, &candle_core::Device::Cpu)?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn full(len: usize, device: &Device) -> Result<Self> {
        Self::self_attention_from_host(vec![0; len], (1, len), (Full, Blocked), None, device)
    }

    /// Packed documents: each token sees its own document causally and nothing of the others.
    /// `doc_lens[b]` lists the document lengths of batch row `b`; every row must have the same
    /// total length. A single row is shared by every batch row.
    ///
    /// ```
    /// // One row of three documents (100, 20 and 8 tokens).
    /// let mask = segattn::SegmentMask::documents(&[&[100, 20, 8]], &candle_core::Device::Cpu)?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn documents<R: AsRef<[usize]>>(doc_lens: &[R], device: &Device) -> Result<Self> {
        let (ids, shape) = document_ids(doc_lens)?;
        Self::self_attention_from_host(ids, shape, (Causal, Blocked), None, device)
    }

    /// Packed bidirectional documents (encoders, embedding models): each token sees its whole
    /// document and nothing of the others. Same arguments as [`SegmentMask::documents`].
    ///
    /// ```
    /// let mask = segattn::SegmentMask::documents_bidirectional(&[&[64, 64]], &candle_core::Device::Cpu)?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn documents_bidirectional<R: AsRef<[usize]>>(doc_lens: &[R], device: &Device) -> Result<Self> {
        let (ids, shape) = document_ids(doc_lens)?;
        Self::self_attention_from_host(ids, shape, (Full, Blocked), None, device)
    }

    /// Prefix-LM: the first `prefix_len` tokens see the whole prefix; the rest is causal.
    ///
    /// ```
    /// let mask = segattn::SegmentMask::prefix_lm(256, 100, &candle_core::Device::Cpu)?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn prefix_lm(len: usize, prefix_len: usize, device: &Device) -> Result<Self> {
        if prefix_len > len {
            invalid_arg!("prefix_len: expected at most len = {len}, got {prefix_len}");
        }
        let ids: Vec<u32> = (0..len).map(|i| u32::from(i >= prefix_len)).collect();
        // Segment 0 = prefix (full over itself), segment 1 = the rest (causal over everything).
        let codes = [Full, Blocked, Full, Causal].map(Visibility::code).to_vec();
        Self::self_attention_from_host(ids, (1, len), (Causal, Blocked), Some((codes, 1, 2)), device)
    }

    /// PINE (position-invariant inference): `[prefix][segments][suffix]`. The prefix is causal; a
    /// segment sees the prefix, its own segment causally and every other segment fully (not the
    /// suffix); the suffix and everything after it are causal over everything.
    ///
    /// ```
    /// // System prompt of 32 tokens, two candidate answers, an 8-token question.
    /// let mask = segattn::SegmentMask::pine(32, &[120, 95], 8, &candle_core::Device::Cpu)?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn pine(prefix_len: usize, segment_lens: &[usize], suffix_len: usize, device: &Device) -> Result<Self> {
        Self::pine_batch(&[PineLayout::new(prefix_len, segment_lens, suffix_len)], device)
    }

    /// PINE with one layout per batch row (rows may differ; every row must have the same total
    /// length). The pair table is `[B, S, S]` with S the largest `num_ids`.
    pub fn pine_batch(layouts: &[PineLayout], device: &Device) -> Result<Self> {
        Self::from_layouts(layouts, device, pine_rule)
    }

    /// Any rule over the ids of `[prefix][segments][suffix]` layouts (one per batch row, rows may
    /// differ, same total length): `rule(q, k, n)` is the visibility of key id `k` for query id
    /// `q` in a row of `n` segments (ids: prefix 0, segments `1..=n`, suffix `n + 1`). PINE's
    /// variants (PCW, NIA, the importance scoring masks) are built this way.
    ///
    /// ```
    /// use segattn::{PineLayout, SegmentMask, Visibility};
    /// // Segments see only themselves (causally) and the prefix; the suffix sees everything.
    /// let layouts = [PineLayout::new(4, &[10, 6], 3)];
    /// let mask = SegmentMask::from_layouts(&layouts, &candle_core::Device::Cpu, |q, k, n| match (q, k) {
    ///     (q, k) if q == k => Visibility::Causal,
    ///     (q, _) if q == n + 1 => Visibility::Full,
    ///     (_, 0) => Visibility::Full,
    ///     _ => Visibility::Blocked,
    /// })?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn from_layouts(
        layouts: &[PineLayout],
        device: &Device,
        rule: impl Fn(usize, usize, usize) -> Visibility,
    ) -> Result<Self> {
        let len = common_len("layouts", layouts.iter().map(PineLayout::len))?;
        let s = layouts.iter().map(PineLayout::num_ids).max().unwrap_or(2);
        let mut ids = Vec::with_capacity(layouts.len() * len);
        let mut codes = vec![TABLE_DEFAULT; layouts.len() * s * s];
        for (b, layout) in layouts.iter().enumerate() {
            layout.push_ids(0, &mut ids);
            layout.write_rules(0, s, &mut codes[b * s * s..(b + 1) * s * s], &rule);
        }
        let rows = layouts.len();
        Self::self_attention_from_host(ids, (rows, len), (Causal, Blocked), Some((codes, rows, s)), device)
    }

    /// Several PINE-style prompts packed in one row, blocked from each other. Prompt `p` uses ids
    /// `base_p .. base_p + num_ids_p` (prefix, segments, suffix, in order), `base_p` the sum of
    /// `num_ids` of the prompts before it; the pair table is block-diagonal, one PINE block per
    /// prompt, and every pair of ids from different prompts is Blocked (the default inter rule).
    ///
    /// ```
    /// use segattn::{PineLayout, SegmentMask};
    /// let prompts = [PineLayout::new(8, &[30, 40], 4), PineLayout::new(8, &[25, 25, 10], 6)];
    /// let mask = SegmentMask::packed_prompts(&prompts, &candle_core::Device::Cpu)?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn packed_prompts(prompts: &[PineLayout], device: &Device) -> Result<Self> {
        if prompts.is_empty() {
            invalid_arg!("prompts: expected at least one prompt layout, got none");
        }
        let s: usize = prompts.iter().map(PineLayout::num_ids).sum();
        let len: usize = prompts.iter().map(PineLayout::len).sum();
        let mut ids = Vec::with_capacity(len);
        let mut codes = vec![TABLE_DEFAULT; s * s];
        let mut base = 0;
        for p in prompts {
            p.push_ids(base as u32, &mut ids);
            p.write_rules(base, s, &mut codes, pine_rule);
            base += p.num_ids();
        }
        Self::self_attention_from_host(ids, (1, len), (Causal, Blocked), Some((codes, 1, s)), device)
    }
}

/// The ids of packed documents, `[rows, len]` flattened, and that shape.
fn document_ids<R: AsRef<[usize]>>(doc_lens: &[R]) -> Result<(Vec<u32>, (usize, usize))> {
    let len = common_len("doc_lens", doc_lens.iter().map(|r| r.as_ref().iter().sum()))?;
    let mut ids = Vec::with_capacity(doc_lens.len() * len);
    for row in doc_lens {
        for (d, &l) in row.as_ref().iter().enumerate() {
            ids.extend(std::iter::repeat_n(d as u32, l));
        }
    }
    Ok((ids, (doc_lens.len(), len)))
}

/// The common total length of every row, or an error naming `name`.
fn common_len(name: &str, lens: impl Iterator<Item = usize>) -> Result<usize> {
    let lens: Vec<usize> = lens.collect();
    let Some(&first) = lens.first() else {
        invalid_arg!("{name}: expected at least one batch row, got none");
    };
    if let Some((b, &l)) = lens.iter().enumerate().find(|(_, &l)| l != first) {
        invalid_arg!(
            "{name}: every batch row must have the same total length: row 0 has {first} tokens, row {b} has {l}"
        );
    }
    Ok(first)
}
