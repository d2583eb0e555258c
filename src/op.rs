//! The public attention API and its candle `CustomOp3`.

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use half::{bf16, f16};

use crate::backward::Upstream;
use crate::cpu::{self, Element, Strided};
use crate::decode_pack::DecodePacking;
use crate::error::invalid_arg;
use crate::head_dim;
use crate::mask::{HostMask, SegmentMask};
use crate::no_backward;
use crate::pine::PineRotation;
use crate::scores::{apply_weights, kernel_two_pass, MassAlgorithm, MassPlan, SegmentScoreOptions};
use crate::validate::{default_scale, AttentionShape};

/// Output of [`SegmentAttention::forward`].
#[derive(Clone, Debug)]
pub struct AttentionOutput {
    /// `[B, Lq, H, D]` in the input dtype. A query row that sees no key gets 0.
    pub out: Tensor,
    /// `[B, H, Lq]` f32 natural log of each row's softmax denominator over the scaled scores,
    /// `-inf` for a row that sees no key; present when asked with
    /// [`SegmentAttention::return_lse`]. Use it to merge partial results with
    /// [`crate::merge_partials`]; with inputs that track gradients it has its gradient (a loss
    /// through the merge trains q and k through it too).
    pub lse: Option<Tensor>,
    /// `[B, Ho, Lo, Sk]` f32 per-segment attention mass of this attention's softmax, computed in
    /// the same pass; present when asked with [`SegmentAttention::return_segment_mass`]. Layout
    /// and options: [`SegmentScoreOptions`]; equal to [`crate::segment_scores`] under the same
    /// mask and scale.
    pub segment_mass: Option<Tensor>,
}

/// Segment-masked attention with options.
///
/// q: `[B, Lq, H, D]`; k, v: `[B, Lk, Hkv, D]` with `H % Hkv == 0` (query head `h` reads key/value
/// head `h / (H / Hkv)`); dtypes f32, f16 or bf16 (all three the same); the last dimension
/// contiguous, other strides arbitrary.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use segattn::{SegmentAttention, SegmentMask};
/// let dev = Device::Cpu;
/// let q = Tensor::randn(0f32, 1.0, (1, 96, 4, 64), &dev)?;
/// let k = Tensor::randn(0f32, 1.0, (1, 96, 2, 64), &dev)?;
/// let v = Tensor::randn(0f32, 1.0, (1, 96, 2, 64), &dev)?;
/// let mask = SegmentMask::pine(16, &[40, 30], 10, &dev)?;
/// let res = SegmentAttention::new(&mask).return_lse(true).forward(&q, &k, &v)?;
/// assert_eq!(res.out.dims(), &[1, 96, 4, 64]);
/// assert_eq!(res.lse.unwrap().dims(), &[1, 4, 96]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct SegmentAttention<'a> {
    mask: &'a SegmentMask,
    scale: Option<f64>,
    return_lse: bool,
    segment_mass: Option<SegmentScoreOptions>,
    /// PINE's in-loop query rotation (crate-internal: [`crate::pine`] sets it).
    rotation: Option<&'a PineRotation>,
    /// The mask's tensors may stay on the CPU whatever the device of q (crate-internal: PINE's
    /// per-step masks, whose host metadata is all the launchers read, are never uploaded).
    host_mask: bool,
}

impl<'a> SegmentAttention<'a> {
    /// Attention under `mask`, with the default scale `1/sqrt(D)` and no LSE.
    pub fn new(mask: &'a SegmentMask) -> Self {
        Self {
            mask,
            scale: None,
            return_lse: false,
            segment_mass: None,
            rotation: None,
            host_mask: false,
        }
    }

    /// Rotates the (un-rotated) queries inside the loop by their position plus their group's
    /// shift for each key segment; k must be rotated at its original positions.
    pub(crate) fn with_rotation(mut self, rotation: &'a PineRotation) -> Self {
        self.rotation = Some(rotation);
        self
    }

    /// Accepts a mask whose tensors are on the CPU with q on a GPU (see `host_mask`).
    pub(crate) fn with_host_mask(mut self) -> Self {
        self.host_mask = true;
        self
    }

    /// Overrides the softmax scale applied to `q . k` (default `1/sqrt(D)`).
    pub fn scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Also return the log-sum-exp `[B, H, Lq]`.
    pub fn return_lse(mut self, yes: bool) -> Self {
        self.return_lse = yes;
        self
    }

    /// Also return the per-segment attention mass `[B, Ho, Lo, Sk]` (f32) of this attention's
    /// probabilities, accumulated in the same pass like O (a per-row, per-key-segment accumulator
    /// rescaled with the running max). `options.scale` must be unset or equal to the attention's
    /// scale. On CUDA: inside the forward kernel for at most 64 key segments (without split-K, D 64
    /// / 128); beyond that, at D 256, or with [`crate::MassAlgorithm::TwoPass`], the forward kernel runs as usual
    /// and the mass kernel's exact pass follows with the forward kernel's LSE; `OnePass` beyond
    /// 64 segments is an error there.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use segattn::{SegmentAttention, SegmentMask, SegmentScoreOptions};
    /// let dev = Device::Cpu;
    /// let q = Tensor::randn(0f32, 1.0, (1, 96, 4, 64), &dev)?;
    /// let k = Tensor::randn(0f32, 1.0, (1, 96, 2, 64), &dev)?;
    /// let v = Tensor::randn(0f32, 1.0, (1, 96, 2, 64), &dev)?;
    /// let mask = SegmentMask::pine(16, &[40, 30], 10, &dev)?;
    /// let res = SegmentAttention::new(&mask)
    ///     .return_segment_mass(SegmentScoreOptions::new())
    ///     .forward(&q, &k, &v)?;
    /// assert_eq!(res.segment_mass.unwrap().dims(), &[1, 4, 96, 4]); // ids 0..=3
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn return_segment_mass(mut self, options: SegmentScoreOptions) -> Self {
        self.segment_mass = Some(options);
        self
    }

    /// Runs the fused attention.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<AttentionOutput> {
        let shape = AttentionShape::of(q, k, v)?;
        let scale = self.scale.unwrap_or_else(|| default_scale(shape.head_dim));
        if !scale.is_finite() {
            invalid_arg!("scale: expected a finite number, got {scale}");
        }
        if self.rotation.is_none() {
            if let Some(width) = head_dim::padded_width(q, shape.head_dim, &head_dim::ATTENTION_HEAD_DIMS) {
                return self.forward_padded(q, k, v, width, scale);
            }
        }
        let seg_dev = self.mask.q_segments().device().location();
        let host_ok = self.host_mask && self.mask.q_segments().device().is_cpu();
        if seg_dev != q.device().location() && !host_ok {
            invalid_arg!(
                "mask: expected the segment ids on the device of q ({:?}), got {seg_dev:?}",
                q.device().location()
            );
        }
        let host_mask = self.mask.host_metadata(shape.batch, shape.q_len, shape.kv_len)?;
        let mass_plan = match &self.segment_mass {
            None => None,
            Some(opts) => Some(mass_plan(opts, scale, q, &shape, &host_mask)?),
        };
        let op = AttentionOp {
            host_mask,
            shape,
            scale: scale as f32,
            want_lse: self.return_lse,
            lse: Mutex::new(None),
            mass_plan,
            mass_algorithm: self.segment_mass.as_ref().map_or(MassAlgorithm::Auto, |o| o.algorithm),
            mass: Mutex::new(None),
            rotation: None,
        };
        let lse_of = |storage| {
            Tensor::from_storage(
                storage,
                (shape.batch, shape.num_heads, shape.q_len),
                BackpropOp::none(),
                false,
            )
        };
        let (out, op, lse): (Tensor, Arc<AttentionOp>, Option<Tensor>) = match self.rotation {
            // PINE's rotated attention is inference only: no backward (one through it is an
            // error, `no_backward`).
            Some(rot) => {
                rot.check(&shape)?;
                if self.segment_mass.is_some() {
                    invalid_arg!("return_segment_mass: not available with PINE's query rotation");
                }
                let op = AttentionOp {
                    rotation: Some(rot),
                    ..op
                };
                let out = q.apply_op3_no_bwd(k, v, &op)?;
                let lse = op.take_lse()?.map(lse_of);
                let mark = |t: Tensor| no_backward::mark(t, [q, k, v], "segattn PINE attention (inference only)");
                (mark(out)?, Arc::new(op), lse.map(mark).transpose()?)
            }
            // With gradients: candle keeps the op for the backward pass (`TrackedAttention`),
            // which reuses the forward's LSE (computed whether asked for or not).
            None if q.track_op() || k.track_op() || v.track_op() => {
                let op = Arc::new(AttentionOp { want_lse: true, ..op });
                let saved_lse = Arc::new(OnceLock::new());
                let tracked = |output| -> Arc<Box<dyn CustomOp3 + Send + Sync>> {
                    Arc::new(Box::new(TrackedAttention {
                        op: Arc::clone(&op),
                        lse: Arc::clone(&saved_lse),
                        mask: self.mask.clone(),
                        output,
                    }))
                };
                let out = q.apply_op3_arc(k, v, tracked(TrackedOutput::Out))?;
                let Some(lse) = op.take_lse()?.map(lse_of) else {
                    invalid_arg!("internal error: the attention op produced no LSE");
                };
                let _ = saved_lse.set(lse);
                // The LSE asked for is the output of a second recorded op (a copy of the kept
                // one), so that a loss through it (merge_partials in ring attention) gets its
                // gradient too.
                let lse = match self.return_lse {
                    true => Some(q.apply_op3_arc(k, v, tracked(TrackedOutput::Lse))?),
                    false => None,
                };
                (out, op, lse)
            }
            None => {
                let out = q.apply_op3_no_bwd(k, v, &op)?;
                let lse = op.take_lse()?.map(lse_of);
                (out, Arc::new(op), lse)
            }
        };
        let segment_mass = match (&op.mass_plan, take_slot(&op.mass)?) {
            (Some(plan), Some(storage)) => {
                // The CPU path weights the mass itself; the CUDA kernels leave it raw.
                let on_cpu = matches!(storage, Storage::Cpu(_));
                let mass = Tensor::from_storage(storage, plan.out_dims(shape.q_len), BackpropOp::none(), false);
                let mass = if on_cpu { mass } else { apply_weights(mass, plan)? };
                Some(no_backward::mark(
                    mass,
                    [q, k, v],
                    "segattn segment mass (no gradient)",
                )?)
            }
            (None, _) => None,
            (Some(_), None) => invalid_arg!("internal error: the attention op produced no segment mass"),
        };
        Ok(AttentionOutput { out, lse, segment_mass })
    }

    /// [`SegmentAttention::forward`] for a head dim the CUDA kernels are not built for: on
    /// inputs zero-padded to `width` with the real D's `scale`, the output cut back
    /// ([`crate::head_dim`]; LSE and segment mass are those of the real D already).
    fn forward_padded(&self, q: &Tensor, k: &Tensor, v: &Tensor, width: usize, scale: f64) -> Result<AttentionOutput> {
        let d = q.dim(candle_core::D::Minus1)?;
        let padded = Self {
            scale: Some(scale),
            ..self.clone()
        };
        let res = padded.forward(
            &head_dim::pad(q, width)?,
            &head_dim::pad(k, width)?,
            &head_dim::pad(v, width)?,
        )?;
        head_dim::unpad_output(res, d)
    }
}

/// Segment-masked attention with the default scale: `[B, Lq, H, D]` in the dtype of q.
/// See [`SegmentAttention`] for shapes and options.
///
/// Differentiable: when q, k or v track gradients, candle's backward pass gives dq, dk and dv
/// (FlashAttention-2's backward equations, blocks of query rows, O(rows x Lk) memory). The LSE
/// of [`SegmentAttention::return_lse`] is differentiable too (ring attention through
/// [`crate::merge_partials`]); the segment mass is not.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use segattn::{segment_attention, SegmentMask};
/// let dev = Device::Cpu;
/// let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 96, 4, 32), &dev)?)?;
/// let k = Tensor::randn(0f32, 1.0, (1, 96, 2, 32), &dev)?;
/// let v = Tensor::randn(0f32, 1.0, (1, 96, 2, 32), &dev)?;
/// let mask = SegmentMask::documents(&[&[40, 56]], &dev)?; // two packed documents
/// let out = segment_attention(q.as_tensor(), &k, &v, &mask)?;
/// let grads = out.sqr()?.sum_all()?.backward()?;
/// assert_eq!(grads.get(q.as_tensor()).unwrap().dims(), &[1, 96, 4, 32]);
/// assert!(grads.get(&k).is_none()); // only variables get a gradient
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn segment_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &SegmentMask) -> Result<Tensor> {
    Ok(SegmentAttention::new(mask).forward(q, k, v)?.out)
}

/// Which output of the attention a [`TrackedAttention`] op gives candle.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TrackedOutput {
    /// The output `[B, Lq, H, D]`: the forward runs here.
    Out,
    /// The LSE `[B, H, Lq]`: a copy of the one the `Out` op kept.
    Lse,
}

/// The attention as candle records it for the backward pass (inputs that track gradients): the
/// same forward, and [`crate::backward`]'s gradients, which start from the forward's LSE (`lse`,
/// set once the forward ran). The output and, when asked for, the LSE are each the output of
/// such an op; candle adds their gradients. The segment mass has no gradient.
struct TrackedAttention {
    op: Arc<AttentionOp<'static>>,
    lse: Arc<OnceLock<Tensor>>,
    /// The mask (a clone: its tensors are shared), for the backward's bias on the device.
    mask: SegmentMask,
    output: TrackedOutput,
}

impl TrackedAttention {
    fn kept_lse(&self) -> Result<&Tensor> {
        match self.lse.get() {
            Some(lse) => Ok(lse),
            None => invalid_arg!("internal error: the forward's LSE was not kept"),
        }
    }
}

impl CustomOp3 for TrackedAttention {
    fn name(&self) -> &'static str {
        match self.output {
            TrackedOutput::Out => "segattn-attention",
            TrackedOutput::Lse => "segattn-attention-lse",
        }
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if self.output == TrackedOutput::Out {
            return self.op.cpu_fwd(q, ql, k, kl, v, vl);
        }
        no_backward::cpu_copy(self.kept_lse()?, "the kept LSE")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if self.output == TrackedOutput::Out {
            return self.op.cuda_fwd(q, ql, k, kl, v, vl);
        }
        no_backward::cuda_copy(self.kept_lse()?, "the kept LSE")
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        d_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = &self.op;
        let lse = self.kept_lse()?;
        // Only the inputs that track gradients get one (candle would store the others too).
        let wanted = [q.track_op(), k.track_op(), v.track_op()];
        // Detached: the gradients are computed from the values alone, so that they carry no op
        // graph (which would keep every block's intermediates alive as long as they live).
        let (q, k, v, res, d_res) = (q.detach(), k.detach(), v.detach(), res.detach(), d_res.detach());
        let up = match self.output {
            TrackedOutput::Out => Upstream {
                d_out: Some(&d_res),
                d_lse: None,
                out: Some(&res),
            },
            TrackedOutput::Lse => Upstream {
                d_out: None,
                d_lse: Some(&d_res),
                out: None,
            },
        };
        crate::backward::attention_gradients(
            (&q, &k, &v),
            up,
            lse,
            op.shape,
            (&self.mask, &op.host_mask),
            op.scale,
            wanted,
        )
    }
}

/// Checks the fused mass options against the attention call and lays out the output.
fn mass_plan(
    opts: &SegmentScoreOptions,
    scale: f64,
    q: &Tensor,
    shape: &AttentionShape,
    host_mask: &HostMask,
) -> Result<MassPlan> {
    if let Some(s) = opts.scale {
        if (s - scale).abs() > 1e-12 * scale.abs().max(1.0) {
            invalid_arg!(
                "return_segment_mass: options.scale ({s}) differs from the attention's scale ({scale}); the fused \
                 mass is that of the attention's softmax: leave it unset"
            );
        }
    }
    let plan = MassPlan::new(shape, host_mask, opts)?;
    if !q.device().is_cpu() {
        // The CUDA path's algorithm for this many segments (an error for OnePass beyond 64).
        kernel_two_pass(opts.algorithm, plan.sk)?;
    }
    Ok(plan)
}

/// Takes what an op left in a side slot.
fn take_slot(slot: &Mutex<Option<Storage>>) -> Result<Option<Storage>> {
    Ok(slot
        .lock()
        .map_err(|_| candle_core::Error::Msg("segattn: output slot poisoned by a panic".into()))?
        .take())
}

/// The candle op. It holds the mask metadata; candle hands it q, k and v. The LSE and the
/// segment mass, outputs that `CustomOp3` cannot return, are left in `lse` and `mass` for the
/// caller to pick up.
struct AttentionOp<'a> {
    host_mask: HostMask,
    shape: AttentionShape,
    scale: f32,
    want_lse: bool,
    lse: Mutex<Option<Storage>>,
    /// The fused per-segment mass, when asked for: its layout, the algorithm asked for, and its
    /// slot (weighted on the CPU, raw from the CUDA kernels).
    mass_plan: Option<MassPlan>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    mass_algorithm: MassAlgorithm,
    mass: Mutex<Option<Storage>>,
    rotation: Option<&'a PineRotation>,
}

impl AttentionOp<'_> {
    fn take_lse(&self) -> Result<Option<Storage>> {
        let mut slot = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("segattn: lse slot poisoned by a panic".into()))?;
        let lse = slot.take();
        if self.want_lse && lse.is_none() {
            invalid_arg!("internal error: the attention op produced no LSE");
        }
        Ok(lse)
    }

    /// The CPU path on q, v of element type `T` and k of `K` (the same type; the kernels keep them
    /// apart).
    fn cpu_typed<T: Element + candle_core::WithDType, K: Element + candle_core::WithDType>(
        &self,
        (q, ql): (&CpuStorage, &Layout),
        (k, kl): (&CpuStorage, &Layout),
        (v, vl): (&CpuStorage, &Layout),
    ) -> Result<CpuStorage> {
        let (q, k, v) = (
            Strided::new(q.as_slice::<T>()?, ql),
            Strided::new(k.as_slice::<K>()?, kl),
            Strided::new(v.as_slice::<T>()?, vl),
        );
        let rotation = self.rotation.map(PineRotation::cpu);
        // A GQA decode step packed as on the GPU (crate::decode_pack): the P query heads of a KV
        // head are the rows of one work item, so each K / V tile is converted once per KV head
        // and the register blocks are full (3.7x at Llama-3-8B shapes). Rows are independent, so
        // the result is bitwise the unpacked one. Not with the mass (laid out per head and row).
        let packing = if self.mass_plan.is_none() {
            DecodePacking::plan(&self.shape, &self.host_mask, true)?
        } else {
            None
        };
        let fwd = match &packing {
            None => cpu::forward(
                q,
                k,
                v,
                self.shape,
                &self.host_mask,
                self.scale,
                self.want_lse,
                self.mass_plan.as_ref(),
                rotation.as_ref(),
            )?,
            Some(pk) => {
                let p = pk.heads_per_row_block;
                // q [B, 1, H, D] read as [B, P, Hkv, D]: row i of head kh is head kh P + i.
                let packed_q = Strided {
                    strides: [q.strides[0], q.strides[2], q.strides[2] * p],
                    ..q
                };
                let rotation = rotation.map(|r| cpu::rotary::QueryRotation { packed_heads: p, ..r });
                let mut fwd = cpu::forward(
                    packed_q,
                    k,
                    v,
                    pk.shape,
                    &pk.host,
                    self.scale,
                    self.want_lse,
                    None,
                    rotation.as_ref(),
                )?;
                // O back from [B, P, Hkv, D] to [B, 1, H, D] (the LSE's [B, Hkv, P] is [B, H, 1]).
                fwd.out = unpack_decode_rows(&fwd.out, self.shape, p);
                fwd
            }
        };
        if let Some(mass) = fwd.mass {
            *self
                .mass
                .lock()
                .map_err(|_| candle_core::Error::Msg("segattn: mass slot poisoned by a panic".into()))? =
                Some(Storage::Cpu(CpuStorage::F32(mass)));
        }
        if let Some(lse) = fwd.lse {
            *self
                .lse
                .lock()
                .map_err(|_| candle_core::Error::Msg("segattn: lse slot poisoned by a panic".into()))? =
                Some(Storage::Cpu(CpuStorage::F32(lse)));
        }
        Ok(T::to_cpu_storage_owned(fwd.out))
    }
}

/// A packed decode step's output `[B, P, Hkv, D]` (contiguous) as `[B, 1, H, D]`: element
/// `(b, i, kh)` is head `kh P + i` (see [`DecodePacking`]).
fn unpack_decode_rows<T: Copy>(packed: &[T], shape: AttentionShape, p: usize) -> Vec<T> {
    let (d, hkv) = (shape.head_dim, shape.num_kv_heads);
    let mut out = Vec::with_capacity(packed.len());
    for b in 0..shape.batch {
        for h in 0..shape.num_heads {
            let (kh, i) = (h / p, h % p);
            let from = ((b * p + i) * hkv + kh) * d;
            out.extend_from_slice(&packed[from..from + d]);
        }
    }
    out
}

impl CustomOp3 for AttentionOp<'_> {
    fn name(&self) -> &'static str {
        "segattn-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let args = ((q, ql), (k, kl), (v, vl));
        let out = match (q.dtype(), k.dtype()) {
            (DType::F32, DType::F32) => self.cpu_typed::<f32, f32>(args.0, args.1, args.2)?,
            (DType::F16, DType::F16) => self.cpu_typed::<f16, f16>(args.0, args.1, args.2)?,
            (DType::BF16, DType::BF16) => self.cpu_typed::<bf16, bf16>(args.0, args.1, args.2)?,
            (other, _) => invalid_arg!("q: expected dtype f32, f16 or bf16 (k the same), got {other:?}"),
        };
        let s = self.shape;
        Ok((out, Shape::from((s.batch, s.q_len, s.num_heads, s.head_dim))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let outputs = crate::cuda::forward(
            (q, ql),
            (k, kl),
            (v, vl),
            self.shape,
            &self.host_mask,
            self.scale,
            crate::cuda::ForwardExtras {
                want_lse: self.want_lse,
                rotation: self.rotation,
                mass: self.mass_plan.as_ref().map(|plan| (plan, self.mass_algorithm)),
            },
        )?;
        let out = outputs.out;
        if let Some(lse) = outputs.lse {
            *self
                .lse
                .lock()
                .map_err(|_| candle_core::Error::Msg("segattn: lse slot poisoned by a panic".into()))? =
                Some(Storage::Cuda(lse));
        }
        if let Some(mass) = outputs.mass {
            *self
                .mass
                .lock()
                .map_err(|_| candle_core::Error::Msg("segattn: mass slot poisoned by a panic".into()))? =
                Some(Storage::Cuda(mass));
        }
        let s = self.shape;
        Ok((out, Shape::from((s.batch, s.q_len, s.num_heads, s.head_dim))))
    }
}
