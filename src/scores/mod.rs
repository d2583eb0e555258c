//! Per-segment attention mass: how much of its attention each query gives to each key segment.
//!
//! `mass[b, h, i, s] = sum over keys j of segment s of P[b, h, i, j]`, `P` the softmax over the
//! keys visible to query `i` under a [`SegmentMask`]. Two forms:
//! - [`segment_scores`]: a standalone op (Q K^T, the softmax statistics and the per-segment sums;
//!   no V, never an `Lq x Lk` buffer);
//! - [`crate::SegmentAttention::return_segment_mass`]: an extra output of the attention, computed
//!   in the same pass.
//!
//! See [`SegmentScoreOptions`] for the output axes and the reductions.

mod options;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

pub(crate) use options::MassPlan;
pub use options::{
    HeadReduction, MassAlgorithm, QueryReduction, SegmentScoreOptions, CPU_ONE_PASS_SEGMENTS_PER_DIM,
    KERNEL_ONE_PASS_MAX_SEGMENTS, MAX_SEGMENT_AXIS,
};

use crate::cpu::{self, Element, Strided};
use crate::error::invalid_arg;
use crate::mask::{HostMask, SegmentMask};
use crate::validate::{default_scale, AttentionShape};

/// The per-segment attention mass of `q` over the key segments of `mask`, without V.
///
/// - q: `[B, Lq, H, D]`, k: `[B, Lk, Hkv, D]` (`H % Hkv == 0`, GQA by indexing), f32 / f16 /
///   bf16 (the same), last dimension contiguous. PINE scores un-rotated projections: pass q and k
///   before RoPE.
/// - mask: as for the attention (`q_segments [B, Lq]`, `kv_segments [B, Lk]`, the rule); it
///   defines which keys each query's softmax runs over.
/// - returns f32 `[B, Ho, Lo, Sk]` on the device of q: `Sk` = key segment ids `0..=max id`,
///   `Lo` = `Lq` or `Sq` (query ids) under a query reduction, `Ho` = `H` or 1 under a head
///   reduction; see [`SegmentScoreOptions`]. Before any normalisation each row sums to 1, or is
///   all zero for a query that sees no key.
/// - CPU: any dtype above, D up to 256. CUDA (`--features cuda`, q, k and the mask on the GPU):
///   the kernel of `kernels/scores/` for bf16 / f16 and D = 64 / 128 / 256, other D up to 256
///   zero-padded to them ([`crate::head_dim`]); other inputs are errors. Tested under the SIMT
///   emulator in `cargo test` and on GPUs (`tests/gpu_scores.rs`).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use segattn::{segment_scores, SegmentMask, SegmentScoreOptions};
/// let dev = Device::Cpu;
/// let q = Tensor::randn(0f32, 1.0, (1, 100, 4, 64), &dev)?;
/// let k = Tensor::randn(0f32, 1.0, (1, 100, 2, 64), &dev)?;
/// // Prefix 10 (id 0), segments of 30, 25, 25 (ids 1..=3), suffix 10 (id 4).
/// let mask = SegmentMask::pine(10, &[30, 25, 25], 10, &dev)?;
/// let mass = segment_scores(&q, &k, &mask, &SegmentScoreOptions::new())?;
/// assert_eq!(mass.dims(), &[1, 4, 100, 5]);
/// // How much the last query token of head 0 attends to each document (ids 1, 2, 3).
/// let docs = mass.get(0)?.get(0)?.get(99)?.narrow(0, 1, 3)?;
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn segment_scores(q: &Tensor, k: &Tensor, mask: &SegmentMask, options: &SegmentScoreOptions) -> Result<Tensor> {
    let shape = AttentionShape::of(q, k, k)?;
    let scale = options.scale.unwrap_or_else(|| default_scale(shape.head_dim));
    if !scale.is_finite() {
        invalid_arg!("scale: expected a finite number, got {scale}");
    }
    if let Some(width) = crate::head_dim::padded_width(q, shape.head_dim, &crate::head_dim::ATTENTION_HEAD_DIMS) {
        // A head dim the kernels are not built for: zero columns leave q . k as it is.
        let pad = |x: &Tensor| crate::head_dim::pad(x, width);
        let options = SegmentScoreOptions {
            scale: Some(scale),
            ..*options
        };
        return segment_scores(&pad(q)?, &pad(k)?, mask, &options);
    }
    let seg_dev = mask.q_segments().device().location();
    if seg_dev != q.device().location() {
        invalid_arg!(
            "mask: expected the segment ids on the device of q ({:?}), got {seg_dev:?}",
            q.device().location()
        );
    }
    let host = mask.host_metadata(shape.batch, shape.q_len, shape.kv_len)?;
    let plan = MassPlan::new(&shape, &host, options)?;
    let on_gpu = !q.device().is_cpu();
    let kernel_two_pass = if on_gpu {
        kernel_two_pass(options.algorithm, plan.sk)?
    } else {
        false
    };
    let op = ScoresOp {
        host,
        shape,
        scale: scale as f32,
        plan,
        kernel_two_pass,
    };
    let mass = if on_gpu {
        // The kernel reads q and k in place with 16-byte loads: views it cannot read so are
        // copied first. It writes the raw mass; the weights follow as tensor ops.
        let readable = crate::kernel_params::kernel_readable;
        let out = readable(q)?.apply_op2_no_bwd(&readable(k)?, &op)?;
        apply_weights(out, &op.plan)?
    } else {
        q.apply_op2_no_bwd(k, &op)?
    };
    // No backward: one through the mass is an error naming it, not a silent constant.
    crate::no_backward::mark(mass, [q, k, k], "segattn segment_scores (no gradient)")
}

/// The CUDA kernel's algorithm for `algorithm` and `sk` key segments: `true` for two passes. Its
/// one-pass path holds at most [`KERNEL_ONE_PASS_MAX_SEGMENTS`] segments on chip.
pub(crate) fn kernel_two_pass(algorithm: MassAlgorithm, sk: usize) -> Result<bool> {
    Ok(match algorithm {
        MassAlgorithm::OnePass if sk > KERNEL_ONE_PASS_MAX_SEGMENTS => invalid_arg!(
            "algorithm: the CUDA kernel's one-pass path holds at most {KERNEL_ONE_PASS_MAX_SEGMENTS} key segments, \
             got Sk = {sk} (use Auto or TwoPass)"
        ),
        MassAlgorithm::OnePass => false,
        MassAlgorithm::TwoPass => true,
        MassAlgorithm::Auto => sk > KERNEL_ONE_PASS_MAX_SEGMENTS,
    })
}

/// Whether the CUDA kernels compute an attention's fused mass inside the forward kernel (one
/// pass, on-chip accumulators: at most [`KERNEL_ONE_PASS_MAX_SEGMENTS`] key segments, no split-K,
/// D 64 / 128) or after it, by the mass kernel's exact pass with the forward kernel's LSE (any
/// number of segments; [`MassAlgorithm::TwoPass`] asks for it; D 256, whose forward kernel has
/// no mass variant, whatever the algorithm: the results agree to rounding).
pub(crate) fn fused_mass_in_forward(
    algorithm: MassAlgorithm,
    sk: usize,
    kv_splits: usize,
    head_dim: usize,
) -> Result<bool> {
    let two_pass = kernel_two_pass(algorithm, sk)?;
    if crate::kernel_params::plain_64_row_kernels_only(head_dim) {
        return Ok(false);
    }
    if !two_pass && kv_splits > 1 && algorithm == MassAlgorithm::OnePass {
        invalid_arg!(
            "algorithm: the forward kernel's one-pass mass does not run with split-K (kv_splits = {kv_splits})"
        );
    }
    Ok(!two_pass && kv_splits <= 1)
}

/// Applies the weights of `plan` (1 / L_s, 1 / query count, 1 / H) to a raw mass `[B, Ho, Lo, Sk]`
/// (f32, row-normalised probabilities summed per segment, reduced but unweighted: what the CUDA
/// kernel produces), with tensor ops on the tensor's own device.
pub(crate) fn apply_weights(raw: Tensor, plan: &MassPlan) -> Result<Tensor> {
    let dev = raw.device().clone();
    let mut out = raw;
    if plan.key_weight.iter().any(|&w| w != 1.0) {
        let kw = Tensor::from_slice(&plan.key_weight, (plan.key_rows, 1, 1, plan.sk), &dev)?;
        out = out.broadcast_mul(&kw)?;
    }
    if plan.query_weight.iter().any(|&w| w != 1.0) {
        let qw = Tensor::from_slice(&plan.query_weight, (plan.query_rows, 1, plan.sq, 1), &dev)?;
        out = out.broadcast_mul(&qw)?;
    }
    if plan.head_weight != 1.0 {
        out = out.affine(f64::from(plan.head_weight), 0.0)?;
    }
    Ok(out)
}

/// The candle op of [`segment_scores`]: q and k in, the mass out.
struct ScoresOp {
    host: HostMask,
    shape: AttentionShape,
    scale: f32,
    plan: MassPlan,
    /// The CUDA kernel's algorithm (the CPU's is in `plan`).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    kernel_two_pass: bool,
}

impl ScoresOp {
    fn cpu_typed<T: Element + candle_core::WithDType>(
        &self,
        (q, ql): (&CpuStorage, &Layout),
        (k, kl): (&CpuStorage, &Layout),
    ) -> Result<Vec<f32>> {
        cpu::segment::segment_mass(
            Strided::new(q.as_slice::<T>()?, ql),
            Strided::new(k.as_slice::<T>()?, kl),
            self.shape,
            &self.host,
            self.scale,
            &self.plan,
        )
    }
}

impl CustomOp2 for ScoresOp {
    fn name(&self) -> &'static str {
        "segattn-segment-scores"
    }

    fn cpu_fwd(&self, q: &CpuStorage, ql: &Layout, k: &CpuStorage, kl: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match q.dtype() {
            DType::F32 => self.cpu_typed::<f32>((q, ql), (k, kl))?,
            DType::F16 => self.cpu_typed::<f16>((q, ql), (k, kl))?,
            DType::BF16 => self.cpu_typed::<bf16>((q, ql), (k, kl))?,
            other => invalid_arg!("q: expected dtype f32, f16 or bf16, got {other:?}"),
        };
        Ok((CpuStorage::F32(out), Shape::from(self.plan.out_dims(self.shape.q_len))))
    }

    /// The raw (unweighted) mass; `segment_scores` applies the weights.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::segment_scores(
            (q, ql),
            (k, kl),
            self.shape,
            &self.host,
            self.scale,
            &self.plan,
            self.kernel_two_pass,
        )?;
        Ok((out, Shape::from(self.plan.out_dims(self.shape.q_len))))
    }
}
