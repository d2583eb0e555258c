//! PINE end to end: one position-invariant attention layer, fused, O(L) memory, batched.
//!
//! PINE ("Eliminating Position Bias of Language Models", ICLR 2025) makes a prompt of segments
//! (documents, candidate answers) order-invariant without training. Per layer and query head:
//! 1. **importance** (`importance.rs`): on un-rotated q and k, how much each query segment (or each
//!    suffix / generated row) attends to each other segment, length-normalised — the fused
//!    per-segment mass under two scoring masks;
//! 2. **order and shifts** (`order.rs`): segments sorted by importance (own segment first, stable),
//!    each shifted back by the length of the segments ranked before it;
//! 3. **attention** with PINE's mask (segments bidirectional between each other, causal inside)
//!    where the query is rotated, inside the fused loop, by its position plus the shift of each
//!    key segment — `rope(q, p + s) . rope(k, p_k) == rope(q, p) . rope(k, p_k - s)` — so K is
//!    rotated once, at its original position (cacheable), and no per-group copy of K exists.
//!
//! [`PineAttention`] runs a layer: [`PineAttention::prefill`] on the whole prompt,
//! [`PineAttention::decode`] for generated tokens against a KV cache rotated with
//! [`PineAttention::rotate_keys`]. The baselines of the paper (vanilla, PCW, NIA) are
//! [`PositionScheme`]s of the same API. The literal oracle is [`crate::reference::pine_attention`].

pub(crate) mod importance;
pub(crate) mod kernel_args;
pub(crate) mod order;
mod rope;
mod scheme;
pub(crate) mod shifts;
mod step;

use candle_core::{Device, Result, Tensor};

pub use rope::{Llama3Scaling, Rope};
pub use scheme::PositionScheme;

pub(crate) use order::QueryShifts;
pub(crate) use rope::RopeTable;

use crate::cpu::rotary::QueryRotation;
use crate::error::invalid_arg;
use crate::head_dim;
use crate::mask::PineLayout;
use crate::op::{AttentionOutput, SegmentAttention};
use crate::validate::{default_scale, AttentionShape};

/// One PINE attention layer (or a baseline scheme) for a batch of prompt layouts.
///
/// q, k, v are the layer's projections **before** RoPE: q `[B, L, H, D]`, k and v
/// `[B, L, Hkv, D]` (GQA: `H % Hkv == 0`), f32 / f16 / bf16, one [`PineLayout`] per batch row
/// (rows may differ; every row must have the same total length).
///
/// Build one per request and share it (or clones of it) between the model's layers: it keeps
/// what the last call derived from the layouts for its shape (query groups, the attention's mask,
/// the decode key metadata and their GPU copies), which the other layers of a prefill or of a
/// decode step then reuse.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use segattn::pine::{PineAttention, Rope};
/// use segattn::PineLayout;
/// let dev = Device::Cpu;
/// // System prompt of 8 tokens, two candidate answers of 20 and 14 tokens, a 6-token header.
/// let layout = PineLayout::new(8, &[20, 14], 6);
/// let pine = PineAttention::new(&[layout], Rope::new(500_000.0))?;
/// let (l, h, hkv, d) = (48, 4, 2, 64);
/// let q = Tensor::randn(0f32, 1.0, (1, l, h, d), &dev)?;
/// let k = Tensor::randn(0f32, 1.0, (1, l, hkv, d), &dev)?;
/// let v = Tensor::randn(0f32, 1.0, (1, l, hkv, d), &dev)?;
/// let out = pine.prefill(&q, &k, &v)?.out;
/// assert_eq!(out.dims(), &[1, l, h, d]);
///
/// // Decode: the cache keeps K rotated once at PINE's original positions.
/// let k_cache = pine.rotate_keys(&k)?;
/// let q_new = Tensor::randn(0f32, 1.0, (1, 1, h, d), &dev)?;
/// let k_new = pine.rotate_keys_from(&Tensor::randn(0f32, 1.0, (1, 1, hkv, d), &dev)?, l)?;
/// let k_cache = Tensor::cat(&[&k_cache, &k_new], 1)?;
/// let v_cache = Tensor::cat(&[&v, &Tensor::randn(0f32, 1.0, (1, 1, hkv, d), &dev)?], 1)?;
/// let step = pine.decode(&q_new, &k_cache, &v_cache)?.out;
/// assert_eq!(step.dims(), &[1, 1, h, d]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct PineAttention {
    layouts: Vec<PineLayout>,
    rope: Rope,
    scheme: PositionScheme,
    scale: Option<f64>,
    return_lse: bool,
    /// What the last call derived from the layouts (shared by every layer of a step).
    step: step::StepCache,
    /// `rope` for a head dim the CUDA kernels are not built for, on zero-padded inputs
    /// ([`crate::head_dim`]): (D, padded width, rotation), kept with its tables (shared by clones).
    padded_rope: std::sync::Arc<std::sync::Mutex<Option<(usize, usize, Rope)>>>,
}

impl PineAttention {
    /// A PINE layer for `layouts` (one per batch row) with RoPE `rope`. Every segment must have
    /// at least one token and every layout the same total length.
    pub fn new(layouts: &[PineLayout], rope: Rope) -> Result<Self> {
        let Some(first) = layouts.first() else {
            invalid_arg!("layouts: expected one layout per batch row, got none");
        };
        for (b, l) in layouts.iter().enumerate() {
            if let Some(j) = l.segment_lens.iter().position(|&x| x == 0) {
                invalid_arg!(
                    "layouts: row {b}: segment {} has no token (every segment needs at least one)",
                    j + 1
                );
            }
            if l.len() != first.len() {
                invalid_arg!(
                    "layouts: every batch row must have the same total length: row 0 has {} tokens, row {b} has {}",
                    first.len(),
                    l.len()
                );
            }
        }
        Ok(Self {
            layouts: layouts.to_vec(),
            rope,
            scheme: PositionScheme::Pine,
            scale: None,
            return_lse: false,
            step: Default::default(),
            padded_rope: Default::default(),
        })
    }

    /// Runs a baseline instead of PINE (same API, same inputs).
    pub fn scheme(mut self, scheme: PositionScheme) -> Self {
        self.scheme = scheme;
        self
    }

    /// Overrides the softmax scale (default `1/sqrt(D)`); the importance scores use it too.
    pub fn scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Also return the log-sum-exp `[B, H, Lq]` (to merge split-K partials).
    pub fn return_lse(mut self, yes: bool) -> Self {
        self.return_lse = yes;
        self
    }

    /// The layouts, one per batch row.
    pub fn layouts(&self) -> &[PineLayout] {
        &self.layouts
    }

    /// The RoPE position of every token `0..len` of every batch row, `[B, len]` u32: where K is
    /// rotated once for the cache (PINE: the original positions, segments right-aligned to end
    /// at the last segment position; tokens beyond the layout are generated ones).
    pub fn key_positions(&self, len: usize, device: &Device) -> Result<Tensor> {
        let pos: Vec<u32> = self.positions(len).into_iter().flatten().collect();
        Tensor::from_vec(pos, (self.layouts.len(), len), device)
    }

    /// `k` `[B, L, Hkv, D]` (un-rotated) rotated at [`PineAttention::key_positions`]: what a KV
    /// cache stores for [`PineAttention::decode`].
    pub fn rotate_keys(&self, k: &Tensor) -> Result<Tensor> {
        self.rotate_keys_from(k, 0)
    }

    /// `k` `[B, n, Hkv, D]` (un-rotated), the keys of tokens `from .. from + n`, rotated at their
    /// positions: the new tokens' keys to append to a cache during decode.
    pub fn rotate_keys_from(&self, k: &Tensor, from: usize) -> Result<Tensor> {
        let d = k.dim(candle_core::D::Minus1)?;
        if let Some((padded, width)) = self.padded(k, d)? {
            return head_dim::unpad(&padded.rotate_keys_from(&head_dim::pad(k, width)?, from)?, d);
        }
        let dtype = k.dtype();
        self.rotate_rows(k, from, from + k.dim(1)?, false)?.to_dtype(dtype)
    }

    /// One layer over the whole prompt: q, k, v un-rotated, `L` = the layouts' length. Returns
    /// O `[B, L, H, D]` in the dtype of q (and the LSE when asked).
    pub fn prefill(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<AttentionOutput> {
        let shape = AttentionShape::of(q, k, v)?;
        self.check_batch(&shape)?;
        let len = self.layouts[0].len();
        if shape.q_len != len || shape.kv_len != len {
            invalid_arg!(
                "q: prefill expects the whole prompt, L = {len} tokens (the layouts' length), got Lq = {}, Lk = {}",
                shape.q_len,
                shape.kv_len
            );
        }
        if let Some((padded, width)) = self.padded(q, shape.head_dim)? {
            let pad = |x: &Tensor| head_dim::pad(x, width);
            return head_dim::unpad_output(padded.prefill(&pad(q)?, &pad(k)?, &pad(v)?)?, shape.head_dim);
        }
        self.check_gpu_kernels(q, &shape)?;
        // K rotated once (in f32) and rounded to the inputs' dtype, as a decode step's cache is,
        // on the CPU as on the GPU: the attention reads q, k and v in one dtype (16-bit K tiles
        // take the CPU's bf16 pair loops, `cpu/bf16_pairs.rs`).
        self.attend(q, k, &self.rotate_keys(k)?, v, &shape)
    }

    /// One decode (or chunked suffix) step: q `[B, Lq, H, D]` un-rotated, the last `Lq` tokens;
    /// `k_cache` `[B, Lk, Hkv, D]` rotated with [`PineAttention::rotate_keys`] (including these
    /// tokens' keys), `v_cache` likewise. Every query row must come after the segments (suffix or
    /// generated tokens). Per row and head: importance against every segment, order, shifts,
    /// attention.
    pub fn decode(&self, q: &Tensor, k_cache: &Tensor, v_cache: &Tensor) -> Result<AttentionOutput> {
        let shape = AttentionShape::of(q, k_cache, v_cache)?;
        self.check_batch(&shape)?;
        let len = self.layouts[0].len();
        if shape.kv_len < len || shape.q_len > shape.kv_len {
            invalid_arg!(
                "k_cache: expected at least the prompt ({len} tokens) and Lq = {} query rows, got Lk = {}",
                shape.q_len,
                shape.kv_len
            );
        }
        if let Some((padded, width)) = self.padded(q, shape.head_dim)? {
            // A copy of the cache at the padded width, every step: keep D at 64 / 128 to avoid it.
            let pad = |x: &Tensor| head_dim::pad(x, width);
            return head_dim::unpad_output(padded.decode(&pad(q)?, &pad(k_cache)?, &pad(v_cache)?)?, shape.head_dim);
        }
        self.check_gpu_kernels(q, &shape)?;
        let first_row = shape.kv_len - shape.q_len;
        if let Some((b, l)) = self
            .layouts
            .iter()
            .enumerate()
            .find(|(_, l)| first_row < l.len() - l.suffix_len)
        {
            invalid_arg!(
                "q: decode rows must come after the segments: row {b}'s segments end at token {}, the first query \
                 row is token {first_row} (run prefill on the prompt)",
                l.len() - l.suffix_len
            );
        }
        if self.scheme != PositionScheme::Pine {
            return self.attend(q, k_cache, k_cache, v_cache, &shape);
        }
        // Importance straight from the rotated cache: no un-rotated copy of it.
        let step = || {
            let plan = self.plan_with(q, ScoreKeys::RotatedCache(k_cache), &shape)?;
            self.attend_planned(&plan, q, k_cache, v_cache)
        };
        if q.device().is_cpu() {
            rayon::scope(|_| step())
        } else {
            step()
        }
    }

    /// Benchmark support, not a stable API: steps 1 and 2 alone (the importance scores, then each
    /// query group's order and shifts) of [`PineAttention::prefill`] (`decode` false: `k`
    /// un-rotated, the whole prompt) or of [`PineAttention::decode`] (`k` the rotated cache).
    /// Returns the shifts `[B, H, groups, Sk]` u32 on the device of q, for the caller to wait on.
    #[doc(hidden)]
    pub fn bench_plan(&self, q: &Tensor, k: &Tensor, v: &Tensor, decode: bool) -> Result<Tensor> {
        let shape = AttentionShape::of(q, k, v)?;
        self.check_batch(&shape)?;
        let keys = if decode {
            ScoreKeys::RotatedCache(k)
        } else {
            ScoreKeys::Plain(k)
        };
        Ok(self.plan_with(q, keys, &shape)?.rotation.shift_tensor)
    }

    /// The attention of the last `Lq` tokens: `k_plain` un-rotated (for the importance), `k_rot`
    /// rotated at the scheme's positions.
    fn attend(
        &self,
        q: &Tensor,
        k_plain: &Tensor,
        k_rot: &Tensor,
        v: &Tensor,
        shape: &AttentionShape,
    ) -> Result<AttentionOutput> {
        if self.scheme != PositionScheme::Pine {
            let (q_len, kv_len) = (shape.q_len, shape.kv_len);
            let q_rot = self
                .rotate_rows(q, kv_len - q_len, kv_len, false)?
                .to_dtype(q.dtype())?;
            return SegmentAttention::new(&self.mask(shape)?)
                .with_host_mask()
                .scale(self.scale_for(shape))
                .return_lse(self.return_lse)
                .forward(&q_rot, k_rot, v);
        }
        let plan = self.plan(q, k_plain, shape)?;
        self.attend_planned(&plan, q, k_rot, v)
    }

    /// Step 3: the attention with the query turned in the loop.
    fn attend_planned(&self, plan: &PinePlan, q: &Tensor, k_rot: &Tensor, v: &Tensor) -> Result<AttentionOutput> {
        SegmentAttention::new(&plan.mask)
            .with_host_mask()
            .scale(plan.scale)
            .return_lse(self.return_lse)
            .with_rotation(&plan.rotation)
            .forward(q, k_rot, v)
    }

    /// Steps 1 and 2 for the last `Lq` tokens: the importance scores (on un-rotated `q` and
    /// `k_plain`), the order and shifts of every query group, and the mask and RoPE table of the
    /// attention.
    pub(crate) fn plan(&self, q: &Tensor, k_plain: &Tensor, shape: &AttentionShape) -> Result<PinePlan> {
        self.plan_with(q, ScoreKeys::Plain(k_plain), shape)
    }

    /// [`PineAttention::plan`] with the keys of the importance given either way.
    pub(crate) fn plan_with(&self, q: &Tensor, keys: ScoreKeys<'_>, shape: &AttentionShape) -> Result<PinePlan> {
        let (imp, groups, ordered) = self.importance_with(q, keys, shape)?;
        // The order on the device of the scores: no host round trip on the GPU (a GPU decode step's
        // importance kernel orders its rows itself).
        let shift_tensor = match ordered {
            Some(shifts) => shifts,
            None => shifts::shifts(&imp, &groups, shape.num_heads, shape.q_len, q.device())?,
        };
        let host_shifts = if shift_tensor.device().is_cpu() {
            shift_tensor.flatten_all()?.to_vec1::<u32>()?
        } else {
            Vec::new()
        };
        // Positions up to (original position + shift), a shift at most the row's segment tokens:
        // the kernels turn a row by the sum.
        let max_shift = (0..groups.num_segs.len())
            .map(|b| {
                groups.segment_lens[b * groups.sk..(b + 1) * groups.sk]
                    .iter()
                    .sum::<u32>() as usize
            })
            .max()
            .unwrap_or(0);
        let table = self.rope.table(shape.head_dim, shape.kv_len + max_shift)?;
        let shifts = QueryShifts {
            groups: groups.groups,
            sk: groups.sk,
            heads: shape.num_heads,
            row_group: groups.row_group,
            shifts: host_shifts,
            q_pos: groups.q_pos,
            #[cfg(feature = "cuda")]
            device_rows: groups.device_rows,
        };
        Ok(PinePlan {
            mask: self.step(shape)?.mask.clone(),
            rotation: PineRotation {
                table,
                shifts,
                shift_tensor,
            },
            scale: self.scale_for(shape),
        })
    }

    /// Step 1: the importance scores of the last `Lq` tokens (host copies), and their groups.
    pub(crate) fn importance(
        &self,
        q: &Tensor,
        k_plain: &Tensor,
        shape: &AttentionShape,
    ) -> Result<(importance::Importance, order::GroupLayout)> {
        let (imp, groups, _) = self.importance_with(q, ScoreKeys::Plain(k_plain), shape)?;
        Ok((imp, groups))
    }

    fn importance_with(
        &self,
        q: &Tensor,
        keys: ScoreKeys<'_>,
        shape: &AttentionShape,
    ) -> Result<(importance::Importance, order::GroupLayout, Option<Tensor>)> {
        let step = self.step(shape)?;
        let (extended, sk) = (&step.extended, step.sk);
        let mut ordered = None;
        let imp = match keys {
            ScoreKeys::RotatedCache(k_cache) => {
                // Decode: every query row is a suffix / generated row.
                let table = self.rope.table(shape.head_dim, shape.kv_len)?;
                let scale = self.scale_for(shape);
                let rows = if q.device().is_cpu() {
                    importance::decode_rows_cpu(q, k_cache, extended, &table, scale, sk)?
                } else {
                    let (rows, shifts) = self.decode_rows_gpu(q, k_cache, &step, &table, scale)?;
                    ordered = Some(shifts);
                    rows
                };
                importance::Importance {
                    segments: None,
                    rows: Some(rows),
                    scored_rows: shape.q_len,
                }
            }
            ScoreKeys::Plain(k_plain) => {
                // In the inputs' dtype: the scores op computes in f32 from any of them (16-bit
                // values widen exactly; bf16 on AVX-512 BF16 as exact pair products), and k is
                // un-rotated here, so q and k share it.
                let masks = step.scoring_masks(q.device())?;
                importance::importance(q, k_plain, extended, &masks, self.scale_for(shape), step.scored_rows)?
            }
        };
        Ok((imp, step.groups.clone(), ordered))
    }

    /// What this call derives from the layouts alone (see [`step`]): the one kept from the last
    /// call when it had the same scheme and shape (every layer of a step), else built now.
    fn step(&self, shape: &AttentionShape) -> Result<std::sync::Arc<step::StepLayout>> {
        let key = step::StepKey {
            scheme: self.scheme,
            q_len: shape.q_len,
            kv_len: shape.kv_len,
        };
        self.step.get_or_build(key, || {
            let (q_len, kv_len) = (shape.q_len, shape.kv_len);
            let extended: Vec<PineLayout> = self.layouts.iter().map(|l| scheme::extend(l, kv_len)).collect();
            let sk = extended.iter().map(PineLayout::num_ids).max().unwrap_or(2);
            let off = kv_len - q_len;
            let scored_rows = extended
                .iter()
                .map(|l| q_len - (l.len() - l.suffix_len).saturating_sub(off).min(q_len))
                .max()
                .unwrap_or(0);
            let groups = order::GroupLayout::new(&extended, sk, q_len, kv_len, &self.positions(kv_len));
            let mask = self
                .scheme
                .mask(&self.layouts, kv_len, &Device::Cpu)?
                .last_queries(q_len)?;
            Ok(step::StepLayout::new(key, extended, sk, scored_rows, groups, mask))
        })
    }

    /// The mask of the last `Lq` tokens under this scheme.
    /// The attention's mask, on the CPU whatever the device of q: the launchers read only its
    /// host metadata (kept with it from the layouts), so a GPU step uploads no mask tensor; and
    /// kept with the step, so every layer of the step shares its packed device copy.
    fn mask(&self, shape: &AttentionShape) -> Result<crate::mask::SegmentMask> {
        Ok(self.step(shape)?.mask.clone())
    }

    fn scale_for(&self, shape: &AttentionShape) -> f64 {
        self.scale.unwrap_or_else(|| default_scale(shape.head_dim))
    }

    /// What the decode-importance kernel reads besides q, the cache and the table:
    /// `[key_pos | key_seg | seg_lens]` (`[B, Lk]`, `[B, Lk]`, `[B, sk]`), for `extended` layouts.
    pub(crate) fn decode_keys(&self, extended: &[PineLayout], kv_len: usize, sk: usize) -> Vec<u32> {
        let batch = extended.len();
        let mut words = Vec::with_capacity(2 * batch * kv_len + batch * sk);
        for row in self.positions(kv_len) {
            words.extend_from_slice(&row);
        }
        for l in extended {
            words.extend(std::iter::repeat_n(0u32, l.prefix_len));
            for (j, &len) in l.segment_lens.iter().enumerate() {
                words.extend(std::iter::repeat_n(j as u32 + 1, len));
            }
            words.extend(std::iter::repeat_n(0u32, kv_len - (l.len() - l.suffix_len)));
        }
        for l in extended {
            let mut lens = vec![0u32; sk];
            for (j, &len) in l.segment_lens.iter().enumerate() {
                lens[j + 1] = len as u32;
            }
            words.extend(lens);
        }
        words
    }

    /// The inputs of a decode step's importance besides q and the cache: the layouts extended to
    /// `Lk`, the number of key segment ids, the RoPE table and the scale.
    pub(crate) fn decode_inputs(
        &self,
        shape: &AttentionShape,
    ) -> Result<(Vec<PineLayout>, usize, std::sync::Arc<RopeTable>, f64)> {
        let extended: Vec<PineLayout> = self.layouts.iter().map(|l| scheme::extend(l, shape.kv_len)).collect();
        let sk = extended.iter().map(PineLayout::num_ids).max().unwrap_or(2);
        let table = self.rope.table(shape.head_dim, shape.kv_len)?;
        Ok((extended, sk, table, self.scale_for(shape)))
    }

    /// The query groups of a step of `shape` (the step's cached layout work).
    pub(crate) fn step_groups(&self, shape: &AttentionShape) -> Result<order::GroupLayout> {
        Ok(self.step(shape)?.groups.clone())
    }

    /// The decode rows' importance on the GPU and their order (shifts), from one kernel
    /// (`kernels/pine/decode_scores.cu`).
    #[allow(unused_variables)]
    fn decode_rows_gpu(
        &self,
        q: &Tensor,
        k_cache: &Tensor,
        step: &step::StepLayout,
        table: &RopeTable,
        scale: f64,
    ) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        {
            let kv_len = k_cache.dim(1)?;
            let words = step.decode_words(|| self.decode_keys(&step.extended, kv_len, step.sk));
            crate::cuda::pine_decode_scores(
                q,
                k_cache,
                words,
                &step.device_words,
                &step.groups,
                table,
                scale as f32,
                step.sk,
            )
        }
        #[cfg(not(feature = "cuda"))]
        invalid_arg!(
            "q: on {:?}, but segattn was built without the cuda feature",
            q.device().location()
        )
    }

    /// `x` `[B, rows, heads, D]`, tokens `[from, from + rows)` of a `len`-token sequence, rotated
    /// (or un-rotated) at the scheme's positions, f32, positions from the host.
    fn rotate_rows(&self, x: &Tensor, from: usize, len: usize, inverse: bool) -> Result<Tensor> {
        let pos: Vec<u32> = self
            .positions(len)
            .iter()
            .flat_map(|row| row[from..].iter().copied())
            .collect();
        self.rope.rotate_at(x, &pos, self.layouts.len(), inverse)
    }

    fn positions(&self, len: usize) -> Vec<Vec<u32>> {
        self.layouts.iter().map(|l| self.scheme.positions(l, len)).collect()
    }

    /// This layer at the padded width, when `x`'s device runs head dim `d` zero-padded
    /// ([`crate::head_dim::padded_width`]): the same layer with the rotation of [`Rope::padded`]
    /// (kept, with its tables, for the next calls) and the real D's default scale.
    fn padded(&self, x: &Tensor, d: usize) -> Result<Option<(Self, usize)>> {
        let Some(width) = head_dim::padded_width(x, d, &head_dim::PINE_HEAD_DIMS) else {
            return Ok(None);
        };
        if !d.is_multiple_of(2) {
            invalid_arg!("q: RoPE needs an even head dimension, got D = {d}");
        }
        let rope = {
            let mut kept = self
                .padded_rope
                .lock()
                .map_err(|_| candle_core::Error::Msg("segattn: padded RoPE cache poisoned by a panic".into()))?;
            match kept.as_ref() {
                Some((kd, kw, rope)) if (*kd, *kw) == (d, width) => rope.clone(),
                _ => {
                    let rope = self.rope.padded(d, width);
                    *kept = Some((d, width, rope.clone()));
                    rope
                }
            }
        };
        let layer = Self {
            rope,
            scale: Some(self.scale.unwrap_or_else(|| default_scale(d))),
            ..self.clone()
        };
        Ok(Some((layer, width)))
    }

    /// On a GPU, PINE's own kernels (the rotated attention, the decode importance) take bf16 /
    /// f16 at D 64 / 128 / 256 (the layer pads others up to them) where the device has room for
    /// them: an error before any work.
    fn check_gpu_kernels(&self, q: &Tensor, shape: &AttentionShape) -> Result<()> {
        if q.device().is_cuda() && self.scheme == PositionScheme::Pine {
            crate::kernel_params::check_pine_dims(q.dtype(), shape.head_dim)?;
            // The device may lack the shared memory of the rotated kernel (D 256 on 99 KiB GPUs).
            #[cfg(feature = "cuda")]
            crate::cuda::check_fwd_kernel_runs(q, crate::kernel_params::FwdVariant::Rope)?;
        }
        Ok(())
    }

    fn check_batch(&self, shape: &AttentionShape) -> Result<()> {
        if shape.batch != self.layouts.len() {
            invalid_arg!(
                "q: expected batch {} (one per layout), got B = {}",
                self.layouts.len(),
                shape.batch
            );
        }
        if !shape.head_dim.is_multiple_of(2) {
            invalid_arg!("q: RoPE needs an even head dimension, got D = {}", shape.head_dim);
        }
        Ok(())
    }
}

/// The keys PINE's importance reads: un-rotated projections, or a decode cache rotated at the
/// original positions (read as it is on the CPU).
pub(crate) enum ScoreKeys<'a> {
    Plain(&'a Tensor),
    RotatedCache(&'a Tensor),
}

/// Everything PINE's attention needs beyond q, k and v: the mask, the query rotation, the scale.
pub(crate) struct PinePlan {
    pub mask: crate::mask::SegmentMask,
    pub rotation: PineRotation,
    pub scale: f64,
}

/// The query rotation of one PINE call: the RoPE table (positions up to every row's position plus
/// its largest shift) and every row's position, group and shifts.
#[derive(Debug)]
pub(crate) struct PineRotation {
    pub table: std::sync::Arc<RopeTable>,
    /// Groups and positions on the host; the shifts themselves too on the CPU (empty on a GPU).
    pub shifts: QueryShifts,
    /// The shifts `[B, H, groups, Sk]` u32 on the device of the inputs.
    pub shift_tensor: Tensor,
}

impl PineRotation {
    /// Checks that the rotation was built for this call's shape.
    pub(crate) fn check(&self, shape: &AttentionShape) -> Result<()> {
        let rows = self.shifts.row_group.len();
        if rows != shape.batch * shape.q_len
            || self.shifts.heads != shape.num_heads
            || self.table.half * 2 != shape.head_dim
        {
            invalid_arg!("internal error: PINE rotation built for another shape");
        }
        Ok(())
    }

    /// What the kernels assume without checking: every row's position plus shift is inside the
    /// table, and the shift table is indexed with 32-bit offsets.
    pub(crate) fn check_kernel_limits(&self) -> Result<()> {
        let rows = self.table.cos.len() / self.table.half;
        let max_shift = if self.shift_tensor.device().is_cpu() {
            self.shifts.max_shift()
        } else {
            0 // bounded by construction (the table covers Lk + every row's segment tokens)
        };
        let need = self.shifts.q_pos.iter().copied().max().unwrap_or(0) as usize + max_shift + 1;
        if rows < need {
            invalid_arg!("internal error: the RoPE table has {rows} positions, the rows need {need}");
        }
        if self.shift_tensor.elem_count() > i32::MAX as usize || rows * self.table.half > i32::MAX as usize {
            invalid_arg!(
                "q: PINE's shift table ({} entries) or RoPE table ({} entries) exceeds the kernel's 32-bit indexing",
                self.shift_tensor.elem_count(),
                rows * self.table.half
            );
        }
        Ok(())
    }

    pub(crate) fn cpu(&self) -> QueryRotation<'_> {
        QueryRotation {
            table: &self.table,
            shifts: &self.shifts,
            packed_heads: 1,
        }
    }
}
