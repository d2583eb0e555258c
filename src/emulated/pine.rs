//! PINE's kernels under the SIMT emulator: the attention with in-loop query rotation
//! (`segattn_fwd_rope_*`, and `segattn_fwd_hopper_rope_*` on Hopper's wgmma) and the device-side
//! order and shifts (`segattn_pine_shifts`).

use candle_core::{DType, Result, Tensor};

use super::{check_launch, run_forward, Launch, Schedule};
use crate::op::AttentionOutput;
use crate::params::{SegattnDecodeScoresParams, SegattnRopeRowsParams, SegattnShiftsParams};
use crate::pine::kernel_args::{decode_scores_params, rope_rows_params, shifts_params, DecodeOrder, DecodePartials};
use crate::pine::{PineAttention, ScoreKeys};
use crate::validate::AttentionShape;

extern "C" {
    fn segattn_emu_pine_shifts(params: *const SegattnShiftsParams) -> std::ffi::c_int;
    fn segattn_emu_pine_decode_scores(params: *const SegattnDecodeScoresParams) -> std::ffi::c_int;
    fn segattn_emu_rope_rows(params: *const SegattnRopeRowsParams) -> std::ffi::c_int;
    fn segattn_pine_decode_scores_smem_bytes(
        heads_per_kv: std::ffi::c_int,
        head_dim: std::ffi::c_int,
        num_segments: std::ffi::c_int,
    ) -> std::ffi::c_int;
}

/// Dynamic shared memory of the decode-importance kernel (`kernels/pine/decode_scores.cu`) for
/// `heads_per_kv` query heads per KV head, `head_dim` and `sk` segment ids, from its own formula.
pub fn decode_scores_smem_bytes(heads_per_kv: usize, head_dim: usize, sk: usize) -> Result<usize> {
    let arg = |name: &str, v: usize| super::to_i32(name, v);
    // SAFETY: a pure function of its arguments.
    let bytes = unsafe {
        segattn_pine_decode_scores_smem_bytes(
            arg("heads per KV head", heads_per_kv)?,
            arg("head_dim", head_dim)?,
            arg("key segments", sk)?,
        )
    };
    usize::try_from(bytes).map_err(|_| candle_core::Error::Msg("segattn: decode importance smem overflow".into()))
}

/// PINE's attention layer through the emulated CUDA kernel with in-loop query rotation
/// (`segattn_fwd_rope_*`): importance, order and shifts as [`PineAttention::prefill`] computes
/// them (on the CPU), K rotated once at its original positions (rounded to the input dtype, as a
/// GPU run stores it), then the kernel. q, k, v un-rotated, bf16 or f16, D = 64 or 128.
pub fn pine_prefill(
    pine: &PineAttention,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    schedule: Schedule,
    seed: u64,
) -> Result<AttentionOutput> {
    prefill_on(pine, q, k, v, false, schedule, seed)
}

/// [`pine_prefill`] on the wgmma rope kernel (`segattn_fwd_hopper_rope_*`) whatever
/// `SEGATTN_FWD_HOPPER` says (D 64 / 128). Under the emulator its products sum in the mma.sync
/// kernel's order and its turned query rounds alike, so it gives that kernel's bits.
pub fn pine_prefill_wgmma(
    pine: &PineAttention,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    schedule: Schedule,
    seed: u64,
) -> Result<AttentionOutput> {
    prefill_on(pine, q, k, v, true, schedule, seed)
}

fn prefill_on(
    pine: &PineAttention,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    wgmma: bool,
    schedule: Schedule,
    seed: u64,
) -> Result<AttentionOutput> {
    let shape = AttentionShape::of(q, k, v)?;
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let plan = pine.plan(&f32(q)?, &f32(k)?, &shape)?;
    let k_rot = pine.rotate_keys(k)?;
    run_forward(
        q,
        &k_rot,
        v,
        &plan.mask,
        Launch {
            scale: Some(plan.scale),
            rotation: Some(&plan.rotation),
            wgmma,
            ..Launch::new(schedule, seed)
        },
    )
}

/// A PINE decode step through the emulated rope kernel with split-K (`kv_splits` slices merged
/// by the last slice of each query tile; 1 = none): q `[B, Lq, H, D]` un-rotated, the cache rotated with
/// [`PineAttention::rotate_keys`], as [`PineAttention::decode`].
#[allow(clippy::too_many_arguments)]
pub fn pine_decode(
    pine: &PineAttention,
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    kv_splits: usize,
    schedule: Schedule,
    seed: u64,
) -> Result<AttentionOutput> {
    decode_on(pine, q, k_cache, v_cache, kv_splits, false, schedule, seed)
}

/// [`pine_decode`] on the wgmma rope kernel (`segattn_fwd_hopper_rope_*`), whatever
/// `SEGATTN_FWD_HOPPER` says (D 64 / 128): the mma.sync kernel's bits under the emulator.
#[allow(clippy::too_many_arguments)]
pub fn pine_decode_wgmma(
    pine: &PineAttention,
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    kv_splits: usize,
    schedule: Schedule,
    seed: u64,
) -> Result<AttentionOutput> {
    decode_on(pine, q, k_cache, v_cache, kv_splits, true, schedule, seed)
}

#[allow(clippy::too_many_arguments)]
fn decode_on(
    pine: &PineAttention,
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    kv_splits: usize,
    wgmma: bool,
    schedule: Schedule,
    seed: u64,
) -> Result<AttentionOutput> {
    let shape = AttentionShape::of(q, k_cache, v_cache)?;
    // The library's decode plan: importance read from the rotated cache as it is.
    let plan = pine.plan_with(q, ScoreKeys::RotatedCache(k_cache), &shape)?;
    run_forward(
        q,
        k_cache,
        v_cache,
        &plan.mask,
        Launch {
            scale: Some(plan.scale),
            rotation: Some(&plan.rotation),
            kv_splits,
            wgmma,
            ..Launch::new(schedule, seed)
        },
    )
}

/// PINE's shifts for a prefill of `q`, `k` (un-rotated, `[B, L, H(kv), D]`, any float dtype), from
/// one set of importance scores (CPU), computed twice: by the CPU order (a stable sort per group)
/// and by the device kernel `segattn_pine_shifts` (ranking by counting), emulated. Returns (CPU,
/// kernel), both `[B, H, groups, Sk]`.
pub fn pine_shifts_both(pine: &PineAttention, q: &Tensor, k: &Tensor) -> Result<(Vec<u32>, Vec<u32>)> {
    let shape = AttentionShape::of(q, k, k)?;
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let (imp, groups) = pine.importance(&f32(q)?, &f32(k)?, &shape)?;
    let imp = imp.to_host()?;
    let mut kernel = vec![u32::MAX; shape.batch * shape.num_heads * groups.groups * groups.sk];
    let meta = groups.packed_meta();
    let p = shifts_params(
        &groups,
        shape.num_heads,
        shape.q_len,
        imp.scored_rows,
        imp.segments.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
        imp.rows.as_ptr(),
        meta.as_ptr(),
        kernel.as_mut_ptr(),
    )?;
    // SAFETY: every pointer of `p` points into a live buffer of the size stated in `p`
    // (`imp`, `meta`, `kernel`), all alive for the call.
    let rc = unsafe { segattn_emu_pine_shifts(&p) };
    check_launch(rc, "shifts kernel")?;
    let cpu = crate::pine::order::query_shifts(groups, shape.num_heads, shape.q_len, &imp).shifts;
    Ok((cpu, kernel))
}

/// What [`pine_decode_importance_both`] computes: the importance `[B, H, Lq, Sk]` by the CPU path
/// and by the kernel, the kernel's shifts `[B, H, groups, Sk]`, and the CPU order of the kernel's
/// own importance (which the kernel's shifts must equal exactly).
#[derive(Debug)]
pub struct DecodeImportanceBoth {
    pub cpu: Vec<f32>,
    pub kernel: Vec<f32>,
    pub kernel_shifts: Vec<u32>,
    pub shifts_of_kernel_scores: Vec<u32>,
}

/// The importance of decode rows `q` (`[B, Lq, H, D]` un-rotated, bf16 / f16) against a cache
/// rotated with [`PineAttention::rotate_keys`], computed twice: by the CPU path (which reads the
/// rotated cache with turned queries) and by the GPU kernel `segattn_pine_decode_scores`
/// (un-rotating each key in its dot product; the keys cut into `kv_splits` slices, the last slice
/// of each row merging them), emulated; with the kernel's order of its rows. Outputs and partials
/// are poisoned (NaN, u32::MAX): the kernel must write every element.
pub fn pine_decode_importance_both(
    pine: &PineAttention,
    q: &Tensor,
    k_cache: &Tensor,
    kv_splits: usize,
) -> Result<DecodeImportanceBoth> {
    let shape = AttentionShape::of(q, k_cache, k_cache)?;
    super::check_emulated_inputs(&shape, q.dtype(), &[("q", q), ("k_cache", k_cache)])?;
    crate::kernel_params::check_pine_dims(q.dtype(), shape.head_dim)?;
    let (extended, sk, table, scale) = pine.decode_inputs(&shape)?;
    let cpu = crate::pine::importance::decode_rows_cpu(q, k_cache, &extended, &table, scale, sk)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let groups = pine.step_groups(&shape)?;
    let words = pine.decode_keys(&extended, shape.kv_len, sk);
    let meta = groups.packed_meta();
    let packed_table = table.packed();
    let (qi, ki) = (super::Input::new("q", q)?, super::Input::new("k_cache", k_cache)?);
    let mut kernel = vec![f32::NAN; shape.batch * shape.num_heads * shape.q_len * sk];
    let mut kernel_shifts = vec![u32::MAX; shape.batch * shape.num_heads * groups.groups * sk];
    // Slice partials, NaN-poisoned: the kernel must write every element; counters zeroed.
    let splits = kv_splits.max(1);
    let (n_rows, n_acc) = DecodePartials::sizes(&shape, sk, splits);
    let (mut part_max, mut part_total, mut part_acc) =
        (vec![f32::NAN; n_rows], vec![f32::NAN; n_rows], vec![f32::NAN; n_acc]);
    let mut done = vec![0u32; DecodePartials::counters(&shape)];
    let partials = if splits > 1 {
        DecodePartials {
            splits,
            max: part_max.as_mut_ptr(),
            total: part_total.as_mut_ptr(),
            acc: part_acc.as_mut_ptr(),
            done: done.as_mut_ptr(),
        }
    } else {
        DecodePartials::none()
    };
    let order = DecodeOrder {
        shifts: kernel_shifts.as_mut_ptr(),
        meta: meta.as_ptr(),
        groups: groups.groups,
    };
    let p = decode_scores_params(
        &shape,
        q.dtype(),
        sk,
        scale as f32,
        (qi.ptr, qi.strides),
        (ki.ptr, ki.strides),
        words.as_ptr(),
        &table,
        packed_table.as_ptr(),
        kernel.as_mut_ptr(),
        partials,
        order,
    )?;
    // SAFETY: every pointer of `p` points into a live buffer of the size stated in `p` (`qi`,
    // `ki`, `words`, `packed_table`, `kernel`, the partials and counters, `meta`, the shifts), all
    // alive for the call.
    let rc = unsafe { segattn_emu_pine_decode_scores(&p) };
    check_launch(rc, "decode-importance kernel")?;
    super::check_counters_left_zero(&done, "decode-importance kernel")?;
    drop((qi, ki));
    let host = crate::pine::importance::HostImportance {
        segments: None,
        rows: kernel.clone(),
        scored_rows: shape.q_len,
    };
    let shifts_of_kernel_scores = crate::pine::order::query_shifts(groups, shape.num_heads, shape.q_len, &host).shifts;
    Ok(DecodeImportanceBoth {
        cpu,
        kernel,
        kernel_shifts,
        shifts_of_kernel_scores,
    })
}

/// Rows of `x` `[B, L, heads, D]` (CPU, bf16 / f16) rotated at `positions` `[pb, L]` (row-major,
/// `pb` 1 or B; `inverse`: undone) by the emulated rope-rows kernel (`segattn_rope_rows_*`, the
/// GPU path of PINE's key rotation), in the dtype of `x`. The output is NaN-poisoned before the
/// launch: the kernel must write every element.
pub fn rope_rows(rope: &crate::pine::Rope, x: &Tensor, positions: &[u32], pb: usize, inverse: bool) -> Result<Tensor> {
    let dims = x.dims4()?;
    let (b, l, heads, d) = dims;
    if positions.len() != pb * l || (pb != 1 && pb != b) {
        crate::error::invalid_arg!(
            "positions: expected [1 or {b}, {l}] positions, got {} for {pb} rows",
            positions.len()
        );
    }
    let len = positions.iter().copied().max().map_or(1, |m| m as usize + 1);
    let table = rope.table(d, len)?;
    let packed = table.packed();
    let xi = super::Input::elementwise("x", x)?;
    let n = b * l * heads * d;
    let launch = |out: *mut std::ffi::c_void| -> Result<()> {
        let p = rope_rows_params(
            dims,
            x.dtype(),
            (xi.ptr, xi.strides),
            (positions.as_ptr(), pb),
            &table,
            packed.as_ptr(),
            out,
            inverse,
        )?;
        // SAFETY: every pointer of `p` points into a live buffer of the size stated in `p` (`xi`,
        // `positions`, `packed`, the output), all alive for the call.
        let rc = unsafe { segattn_emu_rope_rows(&p) };
        check_launch(rc, "rope-rows kernel")
    };
    match x.dtype() {
        DType::BF16 => {
            let mut out = vec![half::bf16::NAN; n];
            launch(out.as_mut_ptr().cast())?;
            Tensor::from_vec(out, dims, x.device())
        }
        DType::F16 => {
            let mut out = vec![half::f16::NAN; n];
            launch(out.as_mut_ptr().cast())?;
            Tensor::from_vec(out, dims, x.device())
        }
        other => crate::error::invalid_arg!("x: the emulated kernel takes bf16 or f16, got {other:?}"),
    }
}
