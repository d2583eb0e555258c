//! Calls with one query tile per head but too few (batch row, head) items for the threads, split
//! over chunks of keys (split-K on the CPU). A decode step is one item per (batch row, KV head)
//! once its query heads are packed as rows (`crate::decode_pack`): an MQA model's step (one KV
//! head) was one item, so one thread did all of it while the others waited. Here a work item is
//! (batch row, chunk, head), consecutive items are the heads of one chunk, and each leaves a
//! partial softmax state (its rows' maxima, sums and unnormalised output) that is merged with
//! the row's other chunks through their maxima at the end, as `merge_partials` merges two halves
//! of the keys. A row that sees nothing stays 0 with LSE -inf; a NaN stays NaN.
//!
//! Chunks span at least [`MIN_CHUNK_KEYS`]: a chunk's start costs its head a new stream through
//! the cache. Which calls split, and where, depends on the shape and the thread count only, so a
//! call gives the same bits run to run on one pool; on a pool of another size a split call can
//! differ in its last bits (the sums merge in another grouping), as split-K on a GPU depends on
//! its number of SMs.
//!
//! Tried for token-major caches (`[B, L, Hkv, D]`, a head's rows `Hkv D` elements apart), and not
//! kept: chunks of all heads copied head-major first, or run head after head while in L2
//! (`bench/NOTES.md` CPU 23).

use candle_core::Result;
use rayon::prelude::*;

use super::tile::{row_lse, row_scale, BC, BR};
use super::{Element, Forward, Item, PooledScratch, QueryRotation, ScratchConfig, Strided};
use crate::mask::HostMask;
use crate::validate::AttentionShape;

/// Keys a chunk spans at least: a chunk's start costs its head a new stream through the cache
/// (measured: a decode step in 128-key chunks ran 1.3x the unsplit one, in 512-key chunks 1.01x).
const MIN_CHUNK_KEYS: usize = 512;
/// Multiply-adds (S and P V) a chunk does at least: a split call waits for the pool's other
/// threads to take their chunks, and a sleeping one took up to ~0.5 ms to wake on this project's
/// build machine (a 2-vCPU VM), so short calls stay whole (8 M, ~0.1-0.2 ms of one of its cores:
/// an MQA step of 1024 keys does not split; NOTES CPU 23).
const MIN_CHUNK_MADDS: usize = 8 << 20;

/// `SEGATTN_CPU_DECODE_SPLIT=0`: no call is split (one item per (batch row, head) over every
/// key; nor PINE's decode importance over runs of query heads, `pine_decode::run_heads`;
/// benchmarks).
pub(super) fn disabled() -> bool {
    static FLAG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FLAG.get_or_init(|| std::env::var_os("SEGATTN_CPU_DECODE_SPLIT").is_some_and(|v| v == "0"))
}

/// How a split call cuts its keys: `chunks` chunks of `chunk_keys` (the last one shorter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SplitPlan {
    chunk_keys: usize,
    chunks: usize,
}

impl SplitPlan {
    /// The split of a call of `shape` on `threads` threads: where it has one query tile per
    /// head (decode steps, short chunks of a prompt) but fewer (batch row, head) items than twice
    /// the threads, its keys are cut into enough chunks of at least [`MIN_CHUNK_KEYS`] and
    /// [`MIN_CHUNK_MADDS`] for that; `None` where it has the items, not the keys, or one thread.
    pub fn new(shape: &AttentionShape, threads: usize) -> Option<Self> {
        let items = shape.batch * shape.num_heads;
        let want = 2 * threads;
        if threads < 2 || shape.q_len == 0 || shape.q_len > BR || items == 0 || items >= want {
            return None;
        }
        let per_key = 2 * shape.q_len * shape.head_dim;
        let min_keys = MIN_CHUNK_KEYS.max(MIN_CHUNK_MADDS.div_ceil(per_key));
        let chunks = want.div_ceil(items).min(shape.kv_len / min_keys);
        if chunks < 2 {
            return None;
        }
        let chunk_keys = shape.kv_len.div_ceil(chunks).div_ceil(BC) * BC;
        Some(Self {
            chunk_keys,
            chunks: shape.kv_len.div_ceil(chunk_keys),
        })
    }
}

/// `2^(m_part - m)`: 0 for a part that saw nothing (`m_part` -inf, also when `m` is).
#[inline]
fn weight(m_part: f32, m: f32) -> f32 {
    if m_part == f32::NEG_INFINITY {
        0.0
    } else {
        (m_part - m).exp2()
    }
}

/// [`super::forward`] for a call split by `plan` (no mass: its accumulators are per row).
#[allow(clippy::too_many_arguments)]
pub(super) fn forward<T: Element, K: Element>(
    q: Strided<'_, T>,
    k: Strided<'_, K>,
    v: Strided<'_, T>,
    shape: AttentionShape,
    mask: &HostMask,
    scale: f32,
    want_lse: bool,
    rotation: Option<&QueryRotation<'_>>,
    plan: SplitPlan,
) -> Result<Forward<T>> {
    let AttentionShape {
        batch,
        q_len: rows,
        num_heads,
        head_dim: d,
        kv_len,
        ..
    } = shape;
    let SplitPlan { chunk_keys, chunks } = plan;
    let config = ScratchConfig {
        d,
        mass_segments: None,
        rotary: rotation.is_some(),
        bf16_pairs: super::bf16_pairs::applies::<T, K>(),
    };
    let use_fma = super::fma_available();
    let use_avx512 = use_fma && super::element::avx512_available();
    // Item ((b chunks + c) H + h)'s partial state: its rows' maxima and sums (log2 domain, as
    // `RowState`) and unnormalised output rows.
    let items = batch * chunks * num_heads;
    let mut part_max = vec![f32::NEG_INFINITY; items * rows];
    let mut part_sum = vec![0f32; items * rows];
    let mut part_o = vec![0f32; items * rows * d];
    part_max
        .par_chunks_mut(rows)
        .zip(part_sum.par_chunks_mut(rows))
        .zip(part_o.par_chunks_mut(rows * d))
        .enumerate()
        .for_each_init(
            || PooledScratch::take(config),
            |scratch, (index, ((max, sum), o))| {
                let h = index % num_heads;
                let c = (index / num_heads) % chunks;
                let b = index / (num_heads * chunks);
                let item = Item {
                    q,
                    k,
                    v,
                    shape,
                    mask,
                    scale,
                    rotation,
                    at: (b, h),
                    rows: (0, rows),
                    use_fma,
                    use_avx512,
                    use_bf16_pairs: config.bf16_pairs,
                    prepared: None,
                    keys: (c * chunk_keys, ((c + 1) * chunk_keys).min(kv_len)),
                };
                let state = scratch.run(&item);
                max.copy_from_slice(&state.max[..rows]);
                sum.copy_from_slice(&state.sum[..rows]);
                for (r, o_row) in o.chunks_exact_mut(d).enumerate() {
                    o_row.copy_from_slice(&scratch.o[r * scratch.dp..r * scratch.dp + d]);
                }
            },
        );

    // Each row's chunks merged, normalised and written: out [B, Lq, H, D], lse [B, H, Lq].
    let mut out = vec![T::from_f32(0.0); batch * rows * num_heads * d];
    let mut lse = vec![0f32; batch * num_heads * rows];
    out.par_chunks_mut(rows * num_heads * d)
        .zip(lse.par_chunks_mut(num_heads * rows))
        .enumerate()
        .for_each(|(b, (out_b, lse_b))| {
            let mut acc = vec![0f32; d];
            for h in 0..num_heads {
                for r in 0..rows {
                    let slot = |c: usize| ((b * chunks + c) * num_heads + h) * rows + r;
                    let m = (0..chunks).map(|c| part_max[slot(c)]).fold(f32::NEG_INFINITY, f32::max);
                    let mut total = 0f32;
                    acc.fill(0.0);
                    for c in 0..chunks {
                        let w = weight(part_max[slot(c)], m);
                        // NaN x 0 is NaN: a chunk whose scores were NaN (NaN inputs) keeps the
                        // row NaN, as the unsplit pass does.
                        total += part_sum[slot(c)] * w;
                        if w != 0.0 {
                            let o = &part_o[slot(c) * d..(slot(c) + 1) * d];
                            acc.iter_mut().zip(o).for_each(|(a, x)| *a += x * w);
                        }
                    }
                    // A row that saw no key: output 0 and LSE -inf; a NaN sum stays NaN in both.
                    let inv = row_scale(total);
                    let at = (r * num_heads + h) * d;
                    for (dst, a) in out_b[at..at + d].iter_mut().zip(&acc) {
                        *dst = T::from_f32(a * inv);
                    }
                    lse_b[h * rows + r] = row_lse(m, total);
                }
            }
        });
    Ok(Forward {
        out,
        lse: want_lse.then_some(lse),
        mass: None,
    })
}
