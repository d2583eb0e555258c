//! Random attention cases shared by the property tests of every implementation.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor};
use segattn::{PairRule, PairTable, PineLayout, SegmentMask, Visibility};

use super::{random_partition, random_tensor, Rng};

/// The mask families drawn by the property tests.
pub const MASK_KINDS: [&str; 10] = [
    "causal",
    "full",
    "documents",
    "documents_bidirectional",
    "prefix_lm",
    "pine",
    "packed_prompts",
    "random_table",
    "single_token_segments",
    "empty_rows",
];

/// A drawn case: inputs and mask.
pub struct Case {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub mask: SegmentMask,
    pub description: String,
}

fn random_rule(rng: &mut Rng) -> Visibility {
    [Visibility::Blocked, Visibility::Causal, Visibility::Full][rng.below(3)]
}

/// A random `[rows, S, S]` table of codes 0..=3 (3 = default).
fn random_table(rng: &mut Rng, rows: usize, s: usize, blocked_row: Option<usize>) -> Result<PairTable> {
    let mut codes: Vec<u8> = (0..rows * s * s).map(|_| rng.below(4) as u8).collect();
    if let Some(r) = blocked_row {
        for b in 0..rows {
            codes[b * s * s + r * s..b * s * s + (r + 1) * s].fill(0);
        }
    }
    let t = if rows == 1 && rng.below(2) == 0 {
        Tensor::from_vec(codes, (s, s), &Device::Cpu)?
    } else {
        Tensor::from_vec(codes, (rows, s, s), &Device::Cpu)?
    };
    PairTable::new(t)
}

fn ids_from_partition(lens: &[usize]) -> Vec<u32> {
    let mut ids = Vec::new();
    for (s, &l) in lens.iter().enumerate() {
        ids.extend(std::iter::repeat_n(s as u32, l));
    }
    ids
}

fn random_pine(rng: &mut Rng, len: usize) -> PineLayout {
    let prefix = rng.below(len.min(24) + 1);
    let suffix = rng.below((len - prefix).min(24) + 1);
    let rest = len - prefix - suffix;
    let segs = if rest == 0 {
        vec![]
    } else {
        random_partition(rng, rest, 30)
    };
    PineLayout::new(prefix, &segs, suffix)
}

/// Builds a mask of family `kind` over `lk` keys for `batch` rows (self-attention layout).
pub fn random_mask(rng: &mut Rng, kind: usize, batch: usize, lk: usize) -> Result<SegmentMask> {
    let dev = Device::Cpu;
    Ok(match MASK_KINDS[kind] {
        "causal" => SegmentMask::causal(lk, &dev)?,
        "full" => SegmentMask::full(lk, &dev)?,
        "documents" | "documents_bidirectional" => {
            let rows: Vec<Vec<usize>> = (0..batch).map(|_| random_partition(rng, lk, 12)).collect();
            if kind == 2 {
                SegmentMask::documents(&rows, &dev)?
            } else {
                SegmentMask::documents_bidirectional(&rows, &dev)?
            }
        }
        "prefix_lm" => SegmentMask::prefix_lm(lk, rng.below(lk + 1), &dev)?,
        "pine" => {
            let layouts: Vec<PineLayout> = (0..batch).map(|_| random_pine(rng, lk)).collect();
            SegmentMask::pine_batch(&layouts, &dev)?
        }
        "packed_prompts" => {
            let parts = random_partition(rng, lk, 4);
            let prompts: Vec<PineLayout> = parts.iter().map(|&l| random_pine(rng, l)).collect();
            SegmentMask::packed_prompts(&prompts, &dev)?
        }
        "random_table" | "single_token_segments" | "empty_rows" => {
            let mut ids = Vec::with_capacity(batch * lk);
            let mut max_id = 0;
            for _ in 0..batch {
                let lens = if kind == 8 {
                    vec![1; lk]
                } else {
                    random_partition(rng, lk, 40)
                };
                max_id = max_id.max(lens.len());
                ids.extend(ids_from_partition(&lens));
            }
            let ids = Tensor::from_vec(ids, (batch, lk), &dev)?;
            // Tables smaller than the number of ids exercise the default fallback.
            let s = 1 + rng.below(max_id + 1);
            let blocked_row = (kind == 9).then(|| rng.below(s));
            let table_rows = if rng.below(2) == 0 { 1 } else { batch };
            let mut rule = PairRule::new(random_rule(rng), random_rule(rng));
            if kind == 9 {
                rule.inter = Visibility::Blocked;
            }
            let rule = if kind == 8 && rng.below(2) == 0 {
                rule
            } else {
                rule.with_table(random_table(rng, table_rows, s, blocked_row)?)
            };
            SegmentMask::self_attention(&ids, rule)?
        }
        other => unreachable!("unknown mask kind {other}"),
    })
}

/// Draws q, k, v and a mask. `lq_frac` in [0, 1] picks Lq <= Lk (1.0 = self-attention).
#[allow(clippy::too_many_arguments)]
pub fn draw(
    seed: u64,
    batch: usize,
    lk: usize,
    lq_equal: bool,
    heads: (usize, usize),
    head_dim: usize,
    dtype: DType,
    kind: usize,
) -> Result<Case> {
    let mut rng = Rng::new(seed);
    let lq = if lq_equal { lk } else { 1 + rng.below(lk) };
    let (h, hkv) = heads;
    let q = random_tensor(&mut rng, &[batch, lq, h, head_dim], dtype)?;
    let k = random_tensor(&mut rng, &[batch, lk, hkv, head_dim], dtype)?;
    let v = random_tensor(&mut rng, &[batch, lk, hkv, head_dim], dtype)?;
    let mask = random_mask(&mut rng, kind, batch, lk)?;
    let mask = if lq < lk { mask.last_queries(lq)? } else { mask };
    let description = format!(
        "seed {seed} B {batch} Lq {lq} Lk {lk} H {h} Hkv {hkv} D {head_dim} {dtype:?} mask {}",
        MASK_KINDS[kind]
    );
    Ok(Case {
        q,
        k,
        v,
        mask,
        description,
    })
}

/// Queries of segment 0 against keys in runs of 500 (segments 0, 1, 2, ...) of which a pair table
/// hides every other one: SKIP, FULL and PARTIAL key tiles all along a long key sequence.
pub fn alternating_runs(lq: usize, lk: usize) -> Result<SegmentMask> {
    let dev = &Device::Cpu;
    let runs = lk.div_ceil(500);
    let q_ids = Tensor::from_vec(vec![0u32; lq], (1, lq), dev)?;
    let kv_ids: Vec<u32> = (0..lk).map(|j| (j / 500) as u32).collect();
    let kv_ids = Tensor::from_vec(kv_ids, (1, lk), dev)?;
    let mut rules = vec![vec![None; runs]; runs];
    for (s, rule) in rules[0].iter_mut().enumerate() {
        *rule = Some(if s % 2 == 0 {
            Visibility::Blocked
        } else {
            Visibility::Full
        });
    }
    let table = PairTable::from_rules(&rules, dev)?;
    SegmentMask::new(
        &q_ids,
        &kv_ids,
        PairRule::new(Visibility::Full, Visibility::Full).with_table(table),
    )
}

/// 147 tokens in segments of 40, 50 and 57 (causal inside, full across) where a pair table blocks
/// every key for the queries of the middle segment: rows 40..90 see nothing.
pub fn blocked_middle_segment() -> Result<SegmentMask> {
    blocked_middle_segment_of(50)
}

/// [`blocked_middle_segment`] with a middle segment of `middle` tokens (40 + middle + 57 in all):
/// rows 40..40 + middle see nothing.
pub fn blocked_middle_segment_of(middle: usize) -> Result<SegmentMask> {
    let dev = &Device::Cpu;
    let lens = [40usize, middle, 57];
    let ids: Vec<u32> = lens
        .iter()
        .enumerate()
        .flat_map(|(i, &l)| std::iter::repeat_n(i as u32, l))
        .collect();
    let n = ids.len();
    let ids = Tensor::from_vec(ids, (1, n), dev)?;
    let b = Some(Visibility::Blocked);
    let table = PairTable::from_rules(&[vec![None, None, None], vec![b, b, b], vec![None, None, None]], dev)?;
    SegmentMask::self_attention(
        &ids,
        PairRule::new(Visibility::Causal, Visibility::Full).with_table(table),
    )
}

/// Inputs `(q [1, lq, h, d], k [1, lk, 1, d], v)` on the CPU whose scores grow along the keys by
/// several log2 units a 64-key tile in some rows and stay flat in the others (rows of both kinds
/// in every warp): the online softmax's reference then moves at every tile in some rows and never
/// in others (softmax.cuh's slack and a warp's rescale skip). Dimension 0 carries the trend (q's
/// is 1 or 0.01 by row and head, k's grows with the key); the others are small random values,
/// never zero.
pub fn growing_scores(
    rng: &mut Rng,
    (lq, lk, h, d): (usize, usize, usize, usize),
    dtype: DType,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = &Device::Cpu;
    let small = |rng: &mut Rng| {
        let x = (0.05 + 0.05 * rng.unit()) as f32;
        if rng.below(2) == 0 {
            -x
        } else {
            x
        }
    };
    let mut q = Vec::with_capacity(lq * h * d);
    for i in 0..lq {
        for hh in 0..h {
            q.push(if (i + hh) % 3 == 0 { 1.0 } else { 0.01 });
            q.extend((1..d).map(|_| small(rng)));
        }
    }
    // ~7 log2 units per 64 keys in the steep rows at the default scale 1 / sqrt(d).
    let steep = (d as f32).sqrt() * 0.08;
    let mut k = Vec::with_capacity(lk * d);
    for j in 0..lk {
        k.push(steep * j as f32);
        k.extend((1..d).map(|_| small(rng)));
    }
    Ok((
        Tensor::from_vec(q, (1, lq, h, d), dev)?.to_dtype(dtype)?,
        Tensor::from_vec(k, (1, lk, 1, d), dev)?.to_dtype(dtype)?,
        random_tensor(rng, &[1, lk, 1, d], dtype)?,
    ))
}
