//! Launching the per-segment attention mass kernel (`kernels/scores/scores.cu`; on compute
//! capability 9.0 GPUs the one pass on wgmma, `kernels/hopper/scores_hopper.cu`, by
//! `kernel_params::scores_on_hopper`) on candle's stream: the raw mass (row-normalised
//! probabilities summed per key segment id, reduced by query segment / head when asked,
//! unweighted) into a zeroed f32 buffer `[B, Ho, Lo, Sk]`; the caller applies the length / mean
//! weights with tensor ops (`scores::apply_weights`).
//!
//! q and k must be readable in place (16-byte aligned, strides multiples of 8 elements):
//! `segment_scores` copies views that are not first (`kernel_params::kernel_readable`).
//! The mask metadata goes up with the forward launcher's [`MaskBuffer`] (one copy, O(L)).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Result};
use half::{bf16, f16};

use super::driver_err;
use super::launch::{
    base_params, check_grid, launch, launch_config, launch_with_params, loadable, strides_of, MaskBuffer,
};
use super::module::{self, Kernels};
use crate::emulated::Tile;
use crate::error::invalid_arg;
use crate::kernel_params::mass_output;
use crate::mask::HostMask;
use crate::params::SegattnScoresParams;
use crate::scores::MassPlan;
use crate::validate::AttentionShape;

// SAFETY: a plain C struct (bindgen of kernels/segattn_params.h, layout-tested) passed by value as
// the kernel's only parameter; its pointers are device addresses that the kernel dereferences.
unsafe impl DeviceRepr for SegattnScoresParams {}

/// Threads per block (`ScoresTraits::kThreads`); query rows per block: `mass_block_rows`.
const THREADS: u32 = 128;

/// The raw mass of q `[B, Lq, H, D]` and k `[B, Lk, Hkv, D]` (bf16 / f16, D = 64 / 128) under
/// `host`, laid out by `plan`; `two_pass` selects the kernel's algorithm (one pass needs
/// `plan.sk <= 64`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn segment_scores(
    (q, ql): (&CudaStorage, &Layout),
    (k, kl): (&CudaStorage, &Layout),
    shape: AttentionShape,
    host: &HostMask,
    scale: f32,
    plan: &MassPlan,
    two_pass: bool,
) -> Result<CudaStorage> {
    let dtype = q.dtype();
    crate::kernel_params::check_supported(dtype, shape.head_dim)?;
    super::per_stream::check_one_stream(("q", &q.device().cuda_stream()), &[("k", &k.device().cuda_stream())])?;
    match dtype {
        DType::BF16 => typed::<bf16>((q, ql), (k, kl), shape, host, scale, plan, two_pass),
        _ => typed::<f16>((q, ql), (k, kl), shape, host, scale, plan, two_pass),
    }
}

#[allow(clippy::too_many_arguments)]
fn typed<T: CudaDType + DeviceRepr + candle_core::WithDType>(
    (q, ql): (&CudaStorage, &Layout),
    (k, kl): (&CudaStorage, &Layout),
    shape: AttentionShape,
    host: &HostMask,
    scale: f32,
    plan: &MassPlan,
    two_pass: bool,
) -> Result<CudaStorage> {
    let dev = q.device().clone();
    let stream = dev.cuda_stream();
    let (b_out, h_out, l_out, sk) = plan.out_dims(shape.q_len);
    let n = b_out * h_out * l_out * sk;
    // Zeroed: the kernel adds into it under a reduction or with two passes (and never a zero-byte
    // allocation; the shape says how many elements there are).
    let mut mass = stream
        .alloc_zeros::<f32>(n.max(1))
        .map_err(|e| driver_err("allocating the segment mass", e))?;
    if n == 0 || shape.q_len == 0 || shape.kv_len == 0 {
        // Nothing to launch: every row sees no key (or there is no output): zeros.
        return Ok(CudaStorage::wrap_cuda_slice(mass, dev.clone()));
    }
    check_grid(&shape)?;
    let kernels = module::kernels(stream.context())?;
    let mask = MaskBuffer::of(&stream, host, 1)?;
    let mut base = base_params(
        &shape,
        T::DTYPE,
        scale,
        [strides_of(ql), strides_of(kl), strides_of(kl)],
    )?;
    {
        let qs = q.as_cuda_slice::<T>()?;
        let ks = k.as_cuda_slice::<T>()?;
        let (qp, _gq) = qs.device_ptr(&stream);
        let (kp, _gk) = ks.device_ptr(&stream);
        let elem = std::mem::size_of::<T>() as u64;
        let q_addr = qp + elem * ql.start_offset() as u64;
        let k_addr = kp + elem * kl.start_offset() as u64;
        for (arg, addr, l) in [("q", q_addr, ql), ("k", k_addr, kl)] {
            if !loadable(addr, &strides_of(l)) {
                invalid_arg!(
                    "{arg}: the mass kernel reads 16-byte chunks: expected a 16-byte aligned start and strides that \
                     are multiples of 8 elements, got strides {:?}",
                    l.stride()
                );
            }
        }
        base.q = q_addr as *const std::ffi::c_void;
        base.k = k_addr as *const std::ffi::c_void;
        base.v = std::ptr::null();
        base.o = std::ptr::null_mut();
        base.lse = std::ptr::null_mut();
        // (The guard lives until the launch below is queued.)
        let (mask_ptr, _gmask) = mask.device_ptr(&stream);
        mask.fill(mask_ptr, &mut base);
        let (mp, _gm) = mass.device_ptr_mut(&stream);
        let out = mass_output(plan, shape.q_len, mp as *mut f32)?;
        match kernels.standalone_mass_wgmma(T::DTYPE, shape.head_dim, host.summary(), two_pass)? {
            Some(kernel) => {
                // The one pass on wgmma: the forward kernel's parameters, the mass as its output.
                let mut params = base;
                params.mass = out;
                params.block_rows = kernel.block_rows as i32;
                params.block_keys = kernel.block_keys;
                params.kv_splits = 1;
                launch(&stream, kernel, &params, launch_config(&shape, kernel, 1)?)?;
            }
            None => {
                let params = SegattnScoresParams {
                    base,
                    out,
                    two_pass: i32::from(two_pass),
                    saved_lse: std::ptr::null(),
                };
                launch_kernel(&stream, &kernels, T::DTYPE, &shape, host.rule.has_causal(), &params)?;
            }
        }
    }
    drop(mask);
    super::recorded_errors(&stream, "the mass kernel")?;
    Ok(CudaStorage::wrap_cuda_slice(mass, dev.clone()))
}

/// The 64-row mass kernel at D = 128 with registers for four blocks per SM
/// (`segattn_scores_b4_*`: 128 registers and a few bytes of spills) unless `SEGATTN_SCORES_BLOCKS=3`
/// asks for the three-block one (no spills): the four-block kernel took 3-7% less time on an H100
/// (bench/NOTES.md CUDA 25). Read once.
fn four_blocks_setting() -> bool {
    static FLAG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FLAG.get_or_init(|| std::env::var_os("SEGATTN_SCORES_BLOCKS").is_none_or(|v| v != "3"))
}

/// Launches the mass kernel for `dtype` and `shape.head_dim` with `params` (q, k, mask, mass and,
/// for the fused mass after a forward launch, the forward kernel's LSE, all live device
/// allocations of the sizes stated in it) on `stream`, checked: the 128-row kernel where plain
/// attention would take the wide forward kernel (`causal`: the mask has a causal pair;
/// `params.base.block_rows` set to match), else the 64-row one.
pub(crate) fn launch_kernel(
    stream: &Arc<CudaStream>,
    kernels: &Kernels,
    dtype: DType,
    shape: &AttentionShape,
    causal: bool,
    params: &SegattnScoresParams,
) -> Result<()> {
    let block_rows = crate::kernel_params::mass_block_rows(shape.q_len, causal, None, shape.head_dim);
    let block_keys = crate::kernel_params::mass_block_keys(block_rows, shape.head_dim, None);
    // One tile drives both the entry point and the traits' shared-memory size.
    let tile = match (block_rows, block_keys) {
        (64, _) => Tile::Rows64,
        (_, 64) if shape.head_dim == 128 => Tile::WideKeys64,
        _ => Tile::Wide,
    };
    let bf16 = dtype == DType::BF16;
    let name = match (tile, shape.head_dim) {
        (Tile::WideKeys64, _) if bf16 => "segattn_scores_wide64_bf16_d128",
        (Tile::WideKeys64, _) => "segattn_scores_wide64_f16_d128",
        (Tile::Wide, 64) if bf16 => "segattn_scores_wide_bf16_d64",
        (Tile::Wide, 64) => "segattn_scores_wide_f16_d64",
        (Tile::Wide, _) if bf16 => "segattn_scores_wide_bf16_d128",
        (Tile::Wide, _) => "segattn_scores_wide_f16_d128",
        (Tile::Rows64, 64) if bf16 => "segattn_scores_bf16_d64",
        (Tile::Rows64, 64) => "segattn_scores_f16_d64",
        (Tile::Rows64, 256) if bf16 => "segattn_scores_bf16_d256",
        (Tile::Rows64, 256) => "segattn_scores_f16_d256",
        (Tile::Rows64, _) => match (bf16, four_blocks_setting()) {
            (true, true) => "segattn_scores_b4_bf16_d128",
            (true, false) => "segattn_scores_bf16_d128",
            (false, true) => "segattn_scores_b4_f16_d128",
            (false, false) => "segattn_scores_f16_d128",
        },
    };
    let mut params = *params;
    params.base.block_rows = block_rows as i32;
    params.base.block_keys = block_keys;
    let params = &params;
    // The traits' size, from the same headers compiled for the host.
    let Some(smem) = crate::emulated::scores_smem_bytes(dtype, shape.head_dim, tile) else {
        invalid_arg!("internal error: no shared memory size for kernel {name}");
    };
    let func = kernels.function_with_smem(name, smem)?;
    let cfg = LaunchConfig {
        grid_dim: (
            shape.q_len.div_ceil(block_rows) as u32,
            shape.num_heads as u32,
            shape.batch as u32,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: the kernel's one parameter is a SegattnScoresParams whose pointers are live device
    // allocations of the sizes stated in it (every key id < Sk and every query id < Lo under a
    // query reduction: checked by MassPlan); the grid covers [B, H, Lq] as the kernel expects.
    unsafe { launch_with_params(stream, &func, name, cfg, params) }
}
