//! The CUDA per-segment mass kernel (`kernels/scores/scores.cu`) run on the CPU under the SIMT
//! emulator, for tests: the parameters are filled exactly as a GPU launcher would fill them, the
//! kernel writes the raw (reduced, unweighted) mass, and the weights are applied with tensor ops
//! (`scores::apply_weights`, device-agnostic).

use std::ffi::c_int;

use candle_core::{DType, Device, Result, Tensor};

use super::{
    check_emulated_inputs, check_launch, dtype_code, fill_mask_params, segattn_emu_set_schedule, Input, Schedule, Tile,
};
use crate::error::invalid_arg;
use crate::kernel_params::{base_params, mass_accumulates, mass_output};
use crate::mask::{HostMask, SegmentMask};
use crate::params::{SegattnFwdParams, SegattnScoresParams};
use crate::scores::{apply_weights, kernel_two_pass, MassPlan, SegmentScoreOptions};
use crate::validate::{default_scale, AttentionShape};

extern "C" {
    fn segattn_emu_scores(params: *const SegattnScoresParams) -> c_int;
    fn segattn_emu_scores_hopper(params: *const SegattnFwdParams) -> c_int;
    fn segattn_emu_scores_smem_bytes(dtype: c_int, head_dim: c_int, wide: c_int, keys64: c_int) -> c_int;
}

/// Dynamic shared memory of the mass kernel for `dtype` (bf16 / f16) and `head_dim` (64 / 128 /
/// 256) with the tile `tile` (its 64-key wide tiles at D = 128 only), from the kernel's traits, or
/// `None` when unsupported.
pub fn scores_smem_bytes(dtype: DType, head_dim: usize, tile: Tile) -> Option<usize> {
    let code = dtype_code(dtype)?;
    // SAFETY: a pure function of its arguments.
    let bytes = unsafe {
        segattn_emu_scores_smem_bytes(
            code,
            c_int::try_from(head_dim).ok()?,
            c_int::from(tile != Tile::Rows64),
            c_int::from(tile == Tile::WideKeys64),
        )
    };
    (bytes > 0).then_some(bytes as usize)
}

/// Runs the emulated CUDA mass kernel: q `[B, Lq, H, D]`, k `[B, Lk, Hkv, D]` CPU tensors (bf16 or
/// f16, D = 64 or 128, strided views allowed) under `mask`, with `options` as for
/// [`crate::segment_scores`]. Returns f32 `[B, Ho, Lo, Sk]`. The kernel's algorithm: one pass for
/// `Sk <= 64` under [`crate::MassAlgorithm::Auto`], two passes otherwise; [`crate::MassAlgorithm::OnePass`] with
/// more segments is an error. `schedule` and `seed` select the emulator's thread schedule.
pub fn segment_scores(
    q: &Tensor,
    k: &Tensor,
    mask: &SegmentMask,
    options: &SegmentScoreOptions,
    schedule: Schedule,
    seed: u64,
) -> Result<Tensor> {
    run_segment_scores(q, k, mask, options, Kernel::AsLaunched, schedule, seed)
}

/// [`segment_scores`] on the standalone mass's wgmma kernel (`segattn_scores_hopper_*`, the one
/// pass of a compute capability 9.0 GPU), whatever `SEGATTN_FWD_HOPPER` says: an error where the
/// call needs two passes (more than 64 key segments, or [`crate::MassAlgorithm::TwoPass`]).
pub fn segment_scores_wgmma(
    q: &Tensor,
    k: &Tensor,
    mask: &SegmentMask,
    options: &SegmentScoreOptions,
    schedule: Schedule,
    seed: u64,
) -> Result<Tensor> {
    run_segment_scores(q, k, mask, options, Kernel::Wgmma, schedule, seed)
}

/// Which mass kernel an emulated call runs.
#[derive(Clone, Copy, PartialEq)]
enum Kernel {
    /// The GPU launcher's choice (the emulator an sm_80 card unless `SEGATTN_FWD_HOPPER=1`).
    AsLaunched,
    /// The mma.sync kernel with this tile.
    Tiled(Tile),
    /// The wgmma one-pass kernel.
    Wgmma,
}

/// [`segment_scores`] with the kernel's tile chosen, whatever the number of rows: 64 query rows
/// per block, or 128 (`segattn_scores_wide_*`, key tiles of 32 at D = 128; [`Tile::WideKeys64`]:
/// of 64 at D = 128, `segattn_scores_wide64_*`). The GPU launcher's rule:
/// `kernel_params::mass_block_rows` and `mass_block_keys`.
pub fn segment_scores_tiled(
    q: &Tensor,
    k: &Tensor,
    mask: &SegmentMask,
    options: &SegmentScoreOptions,
    tile: Tile,
    schedule: Schedule,
    seed: u64,
) -> Result<Tensor> {
    run_segment_scores(q, k, mask, options, Kernel::Tiled(tile), schedule, seed)
}

fn run_segment_scores(
    q: &Tensor,
    k: &Tensor,
    mask: &SegmentMask,
    options: &SegmentScoreOptions,
    kernel: Kernel,
    schedule: Schedule,
    seed: u64,
) -> Result<Tensor> {
    let shape = AttentionShape::of(q, k, k)?;
    let AttentionShape {
        batch,
        q_len,
        kv_len,
        head_dim,
        ..
    } = shape;
    let dtype = q.dtype();
    check_emulated_inputs(&shape, dtype, &[("q", q), ("k", k)])?;
    let scale = options.scale.unwrap_or_else(|| default_scale(head_dim));
    if !scale.is_finite() {
        invalid_arg!("scale: expected a finite number, got {scale}");
    }
    let host = mask.host_metadata(batch, q_len, kv_len)?;
    let plan = MassPlan::new(&shape, &host, options)?;
    let two_pass = kernel_two_pass(options.algorithm, plan.sk)?;
    let (b_out, h_out, l_out, sk) = plan.out_dims(q_len);
    // Added into: zeros; written: NaN, so that an element the kernel misses cannot pass.
    let fill = if mass_accumulates(&plan, two_pass) {
        0.0
    } else {
        f32::NAN
    };
    let mut mass = vec![fill; b_out * h_out * l_out * sk];
    let (qi, ki) = (Input::new("q", q)?, Input::new("k", k)?);
    let base = SegattnFwdParams {
        q: qi.ptr,
        k: ki.ptr,
        ..base_params(&shape, dtype, scale as f32, [qi.strides, ki.strides, ki.strides])?
    };
    match kernel {
        Kernel::Wgmma if two_pass => {
            invalid_arg!(
                "segment_scores_wgmma: the wgmma mass kernel has one pass (at most 64 key segments, not TwoPass)"
            )
        }
        Kernel::Wgmma => {
            let mut base = base;
            fill_mask_params(&mut base, &host);
            run_wgmma_kernel(base, &plan, &mut mass, schedule, seed)?;
        }
        Kernel::AsLaunched => run_kernel(base, &host, &plan, two_pass, None, &mut mass, None, schedule, seed)?,
        Kernel::Tiled(tile) => run_kernel(
            base,
            &host,
            &plan,
            two_pass,
            None,
            &mut mass,
            Some(tile),
            schedule,
            seed,
        )?,
    }
    drop((qi, ki));
    let raw = Tensor::from_vec(mass, (b_out, h_out, l_out, sk), &Device::Cpu)?;
    apply_weights(raw, &plan)
}

/// Runs the emulated mass kernel with the q / k / sizes of `base` under `host` into `mass` (raw,
/// laid out by `plan`; zeroed first where the kernel adds into it). `saved_lse` (`[B, H, Lq]`, with
/// `two_pass`): the forward kernel's LSE, which replaces the kernel's first pass. `tile`: the
/// kernel's tile (`None`: as the GPU launcher chooses).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_kernel(
    mut base: SegattnFwdParams,
    host: &HostMask,
    plan: &MassPlan,
    two_pass: bool,
    saved_lse: Option<&[f32]>,
    mass: &mut [f32],
    tile: Option<Tile>,
    schedule: Schedule,
    seed: u64,
) -> Result<()> {
    fill_mask_params(&mut base, host);
    let q_len = usize::try_from(base.q_len).unwrap_or(0);
    let head_dim = usize::try_from(base.head_dim).unwrap_or(0);
    // The GPU launcher's choice on a compute capability 9.0 GPU, which the emulator stands for
    // where SEGATTN_FWD_HOPPER=1: the one pass on wgmma (`segattn_scores_hopper_*`).
    let wgmma = tile.is_none()
        && saved_lse.is_none()
        && crate::kernel_params::scores_on_hopper(head_dim, host.summary(), two_pass, true, true);
    if wgmma {
        return run_wgmma_kernel(base, plan, mass, schedule, seed);
    }
    let wide = tile.map(|t| t != Tile::Rows64);
    let rows = crate::kernel_params::mass_block_rows(q_len, host.rule.has_causal(), wide, head_dim);
    base.block_rows = rows as i32;
    base.block_keys = crate::kernel_params::mass_block_keys(rows, head_dim, tile.map(|t| t == Tile::WideKeys64));
    if let Some(lse) = saved_lse {
        let want = plan.batch * plan.num_heads * q_len;
        if !two_pass || lse.len() != want {
            invalid_arg!(
                "internal error: a saved LSE of {} rows for a two-pass mass of {want} rows",
                lse.len()
            );
        }
    }
    let p = SegattnScoresParams {
        base,
        out: mass_output(plan, q_len, mass.as_mut_ptr())?,
        two_pass: i32::from(two_pass),
        saved_lse: saved_lse.map_or(std::ptr::null(), <[f32]>::as_ptr),
    };
    if plan.sk == 0 {
        return Ok(());
    }
    // SAFETY: every pointer in `p` points into buffers that outlive the call (the caller's q / k
    // inputs, `host`, `mass`, `saved_lse`) and the sizes in `p` match them (every key id < Sk,
    // every query id < Lo under a query reduction: checked by MassPlan); the schedule applies to
    // this thread.
    let rc = unsafe {
        segattn_emu_set_schedule(schedule.code(), seed);
        segattn_emu_scores(&p)
    };
    check_launch(rc, "mass kernel")
}

/// [`run_kernel`] on the standalone mass's wgmma kernel (`segattn_scores_hopper_*`: one pass, 64-row
/// blocks, forward-kernel parameters with the mass as the output); `base` has its mask filled.
fn run_wgmma_kernel(
    mut base: SegattnFwdParams,
    plan: &MassPlan,
    mass: &mut [f32],
    schedule: Schedule,
    seed: u64,
) -> Result<()> {
    let q_len = usize::try_from(base.q_len).unwrap_or(0);
    base.mass = mass_output(plan, q_len, mass.as_mut_ptr())?;
    base.block_rows = 64;
    base.block_keys = 64;
    base.kv_splits = 1;
    if plan.sk == 0 {
        return Ok(());
    }
    // SAFETY: as in `run_kernel`: every pointer in `base` points into buffers that outlive the
    // call, with the sizes it states.
    let rc = unsafe {
        segattn_emu_set_schedule(schedule.code(), seed);
        segattn_emu_scores_hopper(&base)
    };
    check_launch(rc, "wgmma mass kernel")
}
