//! The CUDA forward kernel (`kernels/fwd/fwd.cu`) run on the CPU under the SIMT emulator, for
//! tests: the same kernel source that nvcc compiles, built with the host compiler by build.rs.
//!
//! [`forward`] fills [`SegattnFwdParams`] exactly as a GPU launcher would (strides from the
//! tensors' layouts, O(L) segment metadata, the pair table) and runs the kernel through
//! `segattn_emu_fwd`. It is slow (every CUDA thread is a fiber): small shapes only.

use std::ffi::{c_char, c_int, c_void, CStr};

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};

use crate::decode_pack::DecodePacking;
use crate::error::invalid_arg;
use crate::kernel_params::{
    base_params, check_grid, contiguous_strides, loadable, mass_accumulates, mass_output, strides_of,
};
pub(crate) use crate::kernel_params::{check_supported, dtype_code, to_i32};
pub use crate::kernel_params::{FwdVariant, WIDE_MASS_MAX_SEGMENTS};
use crate::mask::tiles::classify_tile;
use crate::mask::{HostMask, SegmentMask};
use crate::op::AttentionOutput;
use crate::params::{SegattnFwdParams, SegattnSegments, SegattnStrides};
use crate::pine::PineRotation;
use crate::scores::{apply_weights, fused_mass_in_forward, MassPlan, SegmentScoreOptions};
use crate::validate::{default_scale, AttentionShape};

mod backward;
mod pine;
mod scores;
pub use backward::{attention_backward, bwd_smem_bytes};
pub use pine::{
    decode_scores_smem_bytes, pine_decode, pine_decode_importance_both, pine_decode_wgmma, pine_prefill,
    pine_prefill_wgmma, pine_shifts_both, rope_rows, DecodeImportanceBoth,
};
pub use scores::{scores_smem_bytes, segment_scores, segment_scores_tiled, segment_scores_wgmma};

/// The order in which the emulator runs the threads of a block between synchronisation points
/// (see `kernels/emu/emu_api.h`). Warp-granular schedules expose missing barriers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Schedule {
    /// Thread-granular round robin, increasing thread order.
    Forward,
    /// Thread-granular round robin, decreasing thread order.
    Reverse,
    /// The lowest runnable warp runs until all its threads block.
    LowFirst,
    /// The highest runnable warp runs until all its threads block.
    HighFirst,
    /// A random runnable thread at every switch (replayable from the seed).
    Random,
    /// Warp-granular, warps in random order (replayable from the seed).
    RandomWarp,
}

impl Schedule {
    /// The emulator's code for this schedule (`segattn_emu_schedule`).
    pub fn code(self) -> c_int {
        match self {
            Self::Forward => 0,
            Self::Reverse => 1,
            Self::LowFirst => 2,
            Self::HighFirst => 3,
            Self::Random => 4,
            Self::RandomWarp => 5,
        }
    }
}

extern "C" {
    fn segattn_emu_set_schedule(schedule: c_int, seed: u64);
    fn segattn_emu_last_error() -> *const c_char;
    fn segattn_emu_fwd(params: *const SegattnFwdParams) -> c_int;
    fn segattn_emu_fwd_hopper(params: *const SegattnFwdParams) -> c_int;
    fn segattn_emu_fwd_smem_bytes(dtype: c_int, head_dim: c_int, variant: c_int) -> c_int;
    fn segattn_emu_fwd_mass_rows_smem_bytes(dtype: c_int, head_dim: c_int, num_segments: c_int) -> c_int;
    fn segattn_emu_classify_tile(
        params: *const SegattnFwdParams,
        b: c_int,
        q0: c_int,
        q1: c_int,
        k0: c_int,
        k1: c_int,
        budget: c_int,
        out_class: *mut c_int,
        out_may_be_visible: *mut c_int,
        out_alone: *mut c_int,
    ) -> c_int;
    fn segattn_emu_key_runs(kid: *const u32, valid: c_int, out: *mut i64) -> c_int;
}

/// The calling thread's last emulator error.
pub(crate) fn last_error() -> String {
    // SAFETY: the emulator returns a NUL-terminated string owned by the calling thread's state,
    // valid until its next launch; it is copied at once.
    unsafe { CStr::from_ptr(segattn_emu_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// `Ok` for an emulated launch's return code 0, else the emulator's error for `what` (the kernel
/// launched: "forward kernel", "mass kernel", ...).
pub(crate) fn check_launch(rc: c_int, what: &str) -> Result<()> {
    if rc == 0 {
        return Ok(());
    }
    Err(candle_core::Error::Msg(format!("segattn: emulated {what} failed: {}", last_error())).bt())
}

/// Fails unless every last-block counter is zero after the launch: the GPU launcher reuses one
/// zeroed buffer per stream, which the kernels must leave zero (`arrive_last`).
pub(crate) fn check_counters_left_zero(counters: &[u32], what: &str) -> Result<()> {
    match counters.iter().position(|&c| c != 0) {
        None => Ok(()),
        Some(i) => Err(candle_core::Error::Msg(format!(
            "segattn: emulated {what} left counter {i} at {} (must be reset to 0 by the last block)",
            counters[i]
        ))
        .bt()),
    }
}

/// Dynamic shared memory of the forward kernel `variant` for `dtype` (bf16 / f16) and `head_dim`
/// (64 / 128), from the kernel's traits, or `None` when unsupported.
pub fn fwd_smem_bytes(dtype: DType, head_dim: usize, variant: FwdVariant) -> Option<usize> {
    let code = dtype_code(dtype)?;
    // SAFETY: a pure function of its arguments.
    let bytes = unsafe { segattn_emu_fwd_smem_bytes(code, c_int::try_from(head_dim).ok()?, variant.code()) };
    (bytes > 0).then_some(bytes as usize)
}

/// Dynamic shared memory of a launch of [`FwdVariant::WideMass`] (the fixed layout and the rows'
/// sums) for `num_segments` key segments, from the kernel's traits, or `None` when unsupported.
pub fn fwd_mass_rows_smem_bytes(dtype: DType, head_dim: usize, num_segments: usize) -> Option<usize> {
    let code = dtype_code(dtype)?;
    // SAFETY: a pure function of its arguments.
    let bytes = unsafe {
        segattn_emu_fwd_mass_rows_smem_bytes(
            code,
            c_int::try_from(head_dim).ok()?,
            c_int::try_from(num_segments).ok()?,
        )
    };
    (bytes > 0).then_some(bytes as usize)
}

/// Points the segment and rule fields of `p` at `host` (which must outlive every use of `p`).
fn fill_mask_params(p: &mut SegattnFwdParams, host: &HostMask) {
    let side = |s: &crate::mask::SegmentSpans| SegattnSegments {
        ids: s.ids().as_ptr(),
        span_end: s.span_ends().as_ptr(),
        batch_stride: if s.rows() == 1 { 0 } else { s.len() as i64 },
    };
    p.q_segments = side(&host.q);
    p.kv_segments = side(&host.kv);
    let rule = &host.rule;
    if rule.table_size == 0 {
        p.pair_table = std::ptr::null();
        p.table_size = 0;
        p.table_batch_stride = 0;
    } else {
        p.pair_table = rule.table.as_ptr();
        p.table_size = rule.table_size as i32;
        p.table_batch_stride = if rule.table_batches == 1 {
            0
        } else {
            (rule.table_size * rule.table_size) as i64
        };
    }
    p.intra_rule = i32::from(rule.intra.code());
    p.inter_rule = i32::from(rule.inter.code());
}

/// A q / k / v input as the kernel reads it: element pointer (start offset applied) and strides.
/// Holds the storage lock (or an aligned copy) while the kernel runs.
pub(crate) struct Input {
    _tensor: Tensor,
    ptr: *const c_void,
    strides: SegattnStrides,
}

impl Input {
    /// The kernel loads 16-byte chunks: the start must be 16-byte aligned and the batch, row and
    /// head strides multiples of 8 elements. Views that are not are copied.
    pub(crate) fn new(name: &str, t: &Tensor) -> Result<Self> {
        if let Some(input) = Self::try_direct(name, t)? {
            return Ok(input);
        }
        // A new storage laid out from its start (`Tensor::copy` would keep the view's layout).
        let copy = t.force_contiguous()?;
        match Self::try_direct(name, &copy)? {
            Some(input) => Ok(input),
            None => invalid_arg!("{name}: could not get a 16-byte aligned copy for the kernel's cp.async loads"),
        }
    }

    /// For kernels that load elements one by one (no alignment needed): `t` as it is when its
    /// last dimension is contiguous, else a contiguous copy.
    pub(crate) fn elementwise(name: &str, t: &Tensor) -> Result<Self> {
        let t = if t.layout().stride().last() == Some(&1) {
            t.clone()
        } else {
            t.contiguous()?
        };
        Self::try_direct_if(name, &t, |_, _| true)?
            .ok_or_else(|| candle_core::Error::Msg(format!("segattn: {name}: no view for the kernel")))
    }

    fn try_direct(name: &str, t: &Tensor) -> Result<Option<Self>> {
        Self::try_direct_if(name, t, |ptr, strides| loadable(ptr as u64, strides))
    }

    /// `t` in place when it is empty or `usable(start, strides)` holds.
    fn try_direct_if(
        name: &str,
        t: &Tensor,
        usable: impl Fn(*const c_void, &SegattnStrides) -> bool,
    ) -> Result<Option<Self>> {
        let (base, layout) = {
            let (storage, layout) = t.storage_and_layout();
            let base = match &*storage {
                Storage::Cpu(CpuStorage::BF16(v)) => v.as_ptr() as *const c_void,
                Storage::Cpu(CpuStorage::F16(v)) => v.as_ptr() as *const c_void,
                _ => invalid_arg!("{name}: the emulated kernel takes bf16 or f16 CPU tensors"),
            };
            (base, layout.clone())
        };
        let strides = strides_of(&layout);
        let ptr = base.wrapping_byte_add(layout.start_offset() * 2);
        // An empty tensor is never read.
        let aligned = t.elem_count() == 0 || usable(ptr, &strides);
        // The storage of a tensor is never reallocated while a clone of it (kept in `_tensor`)
        // is alive, and candle's CPU storage is immutable once shared.
        Ok(aligned.then(|| Self {
            _tensor: t.clone(),
            ptr,
            strides,
        }))
    }
}

/// The checks of an emulated launch beyond the common validation: what the kernels support
/// (dtype, head dim, grid size) and CPU tensors.
pub(crate) fn check_emulated_inputs(shape: &AttentionShape, dtype: DType, inputs: &[(&str, &Tensor)]) -> Result<()> {
    check_supported(dtype, shape.head_dim)?;
    for (name, t) in inputs {
        if !matches!(t.device(), Device::Cpu) {
            invalid_arg!(
                "{name}: the emulated kernel runs on CPU tensors, got device {:?}",
                t.device().location()
            );
        }
    }
    check_grid(shape)
}

/// Runs the emulated CUDA forward kernel: q `[B, Lq, H, D]`, k and v `[B, Lk, Hkv, D]` CPU
/// tensors (bf16 or f16, D = 64 or 128, strided views allowed), under `mask`. `scale` defaults to
/// `1/sqrt(D)`. Returns O `[B, Lq, H, D]` in the input dtype and LSE `[B, H, Lq]` f32 (always).
/// `schedule` and `seed` select the emulator's thread schedule.
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &SegmentMask,
    scale: Option<f64>,
    schedule: Schedule,
    seed: u64,
) -> Result<AttentionOutput> {
    run_forward(
        q,
        k,
        v,
        mask,
        Launch {
            scale,
            ..Launch::new(schedule, seed)
        },
    )
}

/// The SM count the emulated launches choose their plain kernel for (an H100's): the GPU
/// launcher's rule takes the wide kernel only with enough blocks per SM.
pub const EMULATED_SM_COUNT: usize = 132;

/// The kernel's tile, for [`forward_tiled`], [`forward_with_mass_tiled`] and [`segment_scores_tiled`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    /// 64 query rows (`segattn_fwd_*`, `segattn_scores_*`).
    Rows64,
    /// 128 query rows (`segattn_fwd_wide_*`, `segattn_scores_wide_*`: key tiles of 32 at D = 128,
    /// 64 at D = 64).
    Wide,
    /// 128 query rows with FlashAttention-2's 64-key tiles at D = 128 (`segattn_fwd_wide64_*`,
    /// `segattn_scores_wide64_*`; at D = 64 the same as [`Tile::Wide`]).
    WideKeys64,
}

/// [`forward`] with the plain kernel's tile chosen, whatever the number of rows (the GPU launcher's
/// rule: `FwdVariant::plain` in src/kernel_params.rs).
#[allow(clippy::too_many_arguments)]
pub fn forward_tiled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &SegmentMask,
    scale: Option<f64>,
    tile: Tile,
    schedule: Schedule,
    seed: u64,
) -> Result<AttentionOutput> {
    run_forward(
        q,
        k,
        v,
        mask,
        Launch {
            scale,
            ..Launch::new(schedule, seed)
        }
        .with_tile(tile),
    )
}

/// [`forward`] on a kernel built on Hopper's warpgroup MMA (the emulator's reading of wgmma:
/// kernels/emu/wgmma.cpp), whatever the rows and the mask: plain attention, D 64 / 128;
/// [`Tile::Rows64`] the 64-row kernel (`segattn_fwd_hopper_*`, one warpgroup), any other tile the
/// 128-row one (`segattn_fwd_hopper128_*`, two warpgroups). Under the emulator their products sum
/// in the mma.sync kernels' order, so they give the 64-row mma.sync kernel's bits.
#[allow(clippy::too_many_arguments)]
pub fn forward_wgmma(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &SegmentMask,
    scale: Option<f64>,
    tile: Tile,
    schedule: Schedule,
    seed: u64,
) -> Result<AttentionOutput> {
    run_forward(
        q,
        k,
        v,
        mask,
        Launch {
            scale,
            wgmma: true,
            ..Launch::new(schedule, seed)
        }
        .with_tile(tile),
    )
}

/// [`forward`] with split-K: the key tiles cut into `kv_splits` slices run as separate blocks,
/// whose f32 partials the last slice of each query tile merges through their LSE (the decode path of the
/// GPU for long caches).
#[allow(clippy::too_many_arguments)]
pub fn forward_split(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &SegmentMask,
    scale: Option<f64>,
    kv_splits: usize,
    schedule: Schedule,
    seed: u64,
) -> Result<AttentionOutput> {
    run_forward(
        q,
        k,
        v,
        mask,
        Launch {
            scale,
            kv_splits,
            ..Launch::new(schedule, seed)
        },
    )
}

/// [`forward_split`] without the GQA decode packing (`src/decode_pack.rs`) that the GPU launcher
/// and [`forward_split`] use for one-row queries with `H > Hkv`: for tests, which compare both.
#[allow(clippy::too_many_arguments)]
pub fn forward_split_unpacked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &SegmentMask,
    scale: Option<f64>,
    kv_splits: usize,
    schedule: Schedule,
    seed: u64,
) -> Result<AttentionOutput> {
    run_forward(
        q,
        k,
        v,
        mask,
        Launch {
            scale,
            kv_splits,
            gqa_pack: false,
            ..Launch::new(schedule, seed)
        },
    )
}

/// [`forward`] with the per-segment mass of the same softmax (`segment_mass`, weighted by
/// `options` as [`crate::SegmentAttention::return_segment_mass`] does), chosen as the GPU launcher
/// chooses: in the forward kernel's one pass for at most 64 key segments and `kv_splits` = 1, else
/// the forward kernel (split-K when `kv_splits` > 1) then the mass kernel's exact pass with the
/// forward kernel's LSE.
#[allow(clippy::too_many_arguments)]
pub fn forward_with_mass(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &SegmentMask,
    scale: Option<f64>,
    options: &SegmentScoreOptions,
    kv_splits: usize,
    schedule: Schedule,
    seed: u64,
) -> Result<AttentionOutput> {
    run_forward(
        q,
        k,
        v,
        mask,
        Launch {
            scale,
            mass: Some(options),
            kv_splits,
            ..Launch::new(schedule, seed)
        },
    )
}

/// [`forward_with_mass`] with the tile of the kernel plain attention would take chosen, whatever
/// the number of rows, as for [`forward_tiled`]: with [`Tile::WideKeys64`] at D = 128 and at most
/// [`WIDE_MASS_MAX_SEGMENTS`] key segments the fused mass runs in the 128 x 64 kernel
/// (`segattn_fwd_wide64_mass_*`, the rows' sums in shared memory), else in the 64-row one.
#[allow(clippy::too_many_arguments)]
pub fn forward_with_mass_tiled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &SegmentMask,
    scale: Option<f64>,
    options: &SegmentScoreOptions,
    kv_splits: usize,
    tile: Tile,
    schedule: Schedule,
    seed: u64,
) -> Result<AttentionOutput> {
    run_forward(
        q,
        k,
        v,
        mask,
        Launch {
            scale,
            mass: Some(options),
            kv_splits,
            ..Launch::new(schedule, seed)
        }
        .with_tile(tile),
    )
}

/// [`forward_with_mass`] on the wgmma kernels (`segattn_fwd_hopper_mass_*` where the mass is in the
/// forward kernel's one pass, else the 64-row wgmma attention before the mass kernel's pass)
/// whatever `SEGATTN_FWD_HOPPER` says (D 64 / 128). Under the emulator the one-pass sums are those
/// of the 64-row mma.sync mass kernel, bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn forward_with_mass_wgmma(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &SegmentMask,
    scale: Option<f64>,
    options: &SegmentScoreOptions,
    schedule: Schedule,
    seed: u64,
) -> Result<AttentionOutput> {
    run_forward(
        q,
        k,
        v,
        mask,
        Launch {
            scale,
            mass: Some(options),
            wgmma: true,
            ..Launch::new(schedule, seed)
        }
        .with_tile(Tile::Rows64),
    )
}

/// What an emulated forward launch does besides reading q, k, v and the mask.
#[derive(Clone, Copy)]
pub(crate) struct Launch<'a> {
    /// Softmax scale (default `1/sqrt(D)`).
    pub scale: Option<f64>,
    /// PINE's in-loop query rotation.
    pub rotation: Option<&'a PineRotation>,
    /// The fused per-segment mass, with these options.
    pub mass: Option<&'a SegmentScoreOptions>,
    /// Split-K slices (1: none).
    pub kv_splits: usize,
    /// GQA decode packing as on the GPU (`src/decode_pack.rs`).
    pub gqa_pack: bool,
    /// Plain attention: the wide (128-row) kernel or not; `None`: as the GPU launcher chooses.
    pub wide: Option<bool>,
    /// The wide kernel at D = 128: with 64-key tiles (`segattn_fwd_wide64_*`) or not; `None`: as
    /// the GPU launcher chooses ([`FwdVariant::with_wide_keys`]).
    pub wide_keys64: Option<bool>,
    /// The kernel built on Hopper's wgmma (kernels/hopper/fwd_hopper.cu, `FwdVariant::wgmma_of`):
    /// plain attention's of the same block rows as the mma.sync one `wide` chooses, the fused
    /// mass's in 64-row blocks.
    pub wgmma: bool,
    /// The emulator's thread schedule and its seed.
    pub schedule: Schedule,
    pub seed: u64,
}

impl Launch<'_> {
    /// A plain launch under `schedule`: default scale, no rotation, no mass, no split-K, packing
    /// as on the GPU.
    pub(crate) fn new(schedule: Schedule, seed: u64) -> Self {
        Self {
            scale: None,
            rotation: None,
            mass: None,
            kv_splits: 1,
            gqa_pack: true,
            wide: None,
            wide_keys64: None,
            wgmma: false,
            schedule,
            seed,
        }
    }

    /// The same launch on the kernel with `tile`, whatever the rows and the mask.
    pub(crate) fn with_tile(self, tile: Tile) -> Self {
        Self {
            wide: Some(tile != Tile::Rows64),
            wide_keys64: Some(tile == Tile::WideKeys64),
            ..self
        }
    }
}

/// [`forward`] with everything of `launch`.
pub(crate) fn run_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &SegmentMask,
    launch: Launch<'_>,
) -> Result<AttentionOutput> {
    let Launch {
        scale,
        rotation,
        mass,
        kv_splits,
        gqa_pack,
        wide,
        wide_keys64,
        wgmma,
        schedule,
        seed,
    } = launch;
    let shape = AttentionShape::of(q, k, v)?;
    if kv_splits == 0 {
        invalid_arg!("kv_splits: expected at least 1, got 0");
    }
    let AttentionShape {
        batch,
        q_len,
        kv_len,
        num_heads,
        head_dim,
        ..
    } = shape;
    let dtype = q.dtype();
    check_emulated_inputs(&shape, dtype, &[("q", q), ("k", k), ("v", v)])?;
    if rotation.is_some() {
        crate::kernel_params::check_pine_dims(dtype, head_dim)?;
    }
    let scale = scale.unwrap_or_else(|| default_scale(head_dim));
    if !scale.is_finite() {
        invalid_arg!("scale: expected a finite number, got {scale}");
    }
    let host = mask.host_metadata(batch, q_len, kv_len)?;
    if rotation.is_some() && mass.is_some() {
        invalid_arg!("return_segment_mass: not available with PINE's query rotation");
    }
    let packing = DecodePacking::plan(&shape, &host, gqa_pack && mass.is_none())?;
    let (kshape, khost) = match &packing {
        Some(pk) => (pk.shape, &pk.host),
        None => (shape, &host),
    };
    // The mass: its layout, the path (in the forward kernel or after it), and its buffer (zeros
    // where a kernel adds into it, else NaN so that a missed element cannot pass).
    let mass = match mass {
        None => None,
        Some(opts) => {
            let plan = MassPlan::new(&shape, &host, opts)?;
            let fused = fused_mass_in_forward(opts.algorithm, plan.sk, kv_splits, head_dim)?;
            let fill = if mass_accumulates(&plan, !fused) { 0.0 } else { f32::NAN };
            let (b, h, l, s) = plan.out_dims(q_len);
            Some((plan, fused, vec![fill; b * h * l * s]))
        }
    };

    let (qi, ki, vi) = (Input::new("q", q)?, Input::new("k", k)?, Input::new("v", v)?);
    let n_out = batch * q_len * num_heads * head_dim;
    // u128 storage: the kernel writes O with 16-byte stores.
    let mut out = vec![0u128; n_out.div_ceil(8)];
    let mut lse = vec![0f32; batch * num_heads * q_len];
    // Split-K partials (NaN-poisoned: every element must be written by the kernel).
    let (mut o_accum, mut lse_accum) = if kv_splits > 1 {
        (
            vec![f32::NAN; kv_splits * n_out],
            vec![f32::NAN; kv_splits * batch * num_heads * q_len],
        )
    } else {
        (Vec::new(), Vec::new())
    };
    // One zeroed counter per (batch row, head, 64-row query tile) of the launch: the last slice of
    // a tile to finish merges it (and leaves the counter zero, checked after the launch).
    let mut split_done = vec![0u32; kshape.batch * kshape.num_heads * kshape.q_len.div_ceil(64)];

    let mut p = SegattnFwdParams {
        q: qi.ptr,
        k: ki.ptr,
        v: vi.ptr,
        o: out.as_mut_ptr() as *mut c_void,
        lse: lse.as_mut_ptr(),
        kv_splits: to_i32("kv_splits", kv_splits)?,
        o_accum: if kv_splits > 1 {
            o_accum.as_mut_ptr()
        } else {
            std::ptr::null_mut()
        },
        lse_accum: if kv_splits > 1 {
            lse_accum.as_mut_ptr()
        } else {
            std::ptr::null_mut()
        },
        split_done: if kv_splits > 1 {
            split_done.as_mut_ptr()
        } else {
            std::ptr::null_mut()
        },
        ..base_params(&kshape, dtype, scale as f32, [qi.strides, ki.strides, vi.strides])?
    };
    if let Some(pk) = &packing {
        p.q_strides = pk.strides(qi.strides);
        p.o_strides = pk.strides(contiguous_strides(q_len, num_heads, head_dim));
    }
    fill_mask_params(&mut p, khost);
    let mut mass = mass;
    if let Some((plan, true, buf)) = &mut mass {
        p.mass = mass_output(plan, q_len, buf.as_mut_ptr())?;
    }
    // The entry point the GPU launcher would take (segattn_emu_fwd dispatches on these fields): the
    // mma.sync kernel of its rules, then its wgmma counterpart, its own entry, where asked or with
    // SEGATTN_FWD_HOPPER=1 (the emulator stands for an sm_80 card unless told otherwise).
    let summary = khost.summary();
    let mma_sync = match &mass {
        _ if rotation.is_some() => FwdVariant::Rope,
        Some((plan, true, _)) => FwdVariant::fused_mass(
            &kshape,
            kv_splits,
            summary,
            EMULATED_SM_COUNT,
            (wide, wide_keys64),
            plan.sk,
        ),
        _ => FwdVariant::plain_kernel(&kshape, kv_splits, summary, EMULATED_SM_COUNT, (wide, wide_keys64)),
    };
    let variant = match wgmma {
        true => mma_sync.wgmma_of(),
        false => mma_sync.on_hopper(head_dim, summary, true, wide, true),
    };
    let on_wgmma = variant.is_wgmma();
    p.block_rows = variant.block_rows() as i32;
    p.block_keys = variant.block_keys();
    // The rotation's arrays, packed as the GPU launcher uploads them (alive until the launch ends).
    let packed = rotation.map(|rot| (rot.table.packed(), rot.shifts.packed_rows()));
    if let (Some(rot), Some((table, rows))) = (rotation, &packed) {
        rot.check(&shape)?;
        p.rotation = crate::pine::kernel_args::rotation_params(
            rot,
            table.as_ptr(),
            rows.as_ptr(),
            rot.shifts.shifts.as_ptr(),
            packing.as_ref().map_or(1, |pk| pk.heads_per_row_block),
        )?;
    }

    // SAFETY: every pointer in `p` points into buffers that outlive the call (`qi`, `ki`, `vi`,
    // `host`, `out`, `lse`, `rotation`, `packed`) and the sizes in `p` match them; the schedule
    // applies to this thread.
    let rc = unsafe {
        segattn_emu_set_schedule(schedule.code(), seed);
        if on_wgmma {
            segattn_emu_fwd_hopper(&p)
        } else {
            segattn_emu_fwd(&p)
        }
    };
    check_launch(rc, "forward kernel")?;
    check_counters_left_zero(&split_done, "forward kernel")?;
    if let Some((plan, false, buf)) = &mut mass {
        // After the forward kernel: the mass kernel's exact pass with its LSE.
        let base = SegattnFwdParams {
            q: qi.ptr,
            k: ki.ptr,
            ..base_params(&shape, dtype, scale as f32, [qi.strides, ki.strides, ki.strides])?
        };
        scores::run_kernel(base, &host, plan, true, Some(&lse), buf, None, schedule, seed)?;
    }
    drop((qi, ki, vi));
    let segment_mass = match mass {
        None => None,
        Some((plan, _, buf)) => Some(apply_weights(
            Tensor::from_vec(buf, plan.out_dims(q_len), &Device::Cpu)?,
            &plan,
        )?),
    };

    let out = tensor_of_halves(&out, dtype, (batch, q_len, num_heads, head_dim))?;
    let lse = Tensor::from_vec(lse, (batch, num_heads, q_len), &Device::Cpu)?;
    Ok(AttentionOutput {
        out,
        lse: Some(lse),
        segment_mass,
    })
}

/// The first `dims.elem_count()` 16-bit elements (bf16, or f16 for any other `dtype`) of
/// `words`, a buffer a kernel wrote with wide stores (u32 / u128 words: aligned for them), as a
/// CPU tensor of shape `dims`. Fails if `words` holds fewer.
pub(crate) fn tensor_of_halves<W: Copy>(
    words: &[W],
    dtype: DType,
    dims: (usize, usize, usize, usize),
) -> Result<Tensor> {
    let n = dims.0 * dims.1 * dims.2 * dims.3;
    if std::mem::size_of_val(words) < 2 * n {
        invalid_arg!("internal error: a kernel output buffer holds fewer than {n} 16-bit elements");
    }
    // SAFETY: `words` holds at least n 16-bit elements (checked above); the word types used here
    // (u32, u128) and bf16 / f16 have no invalid bit patterns, and 2-byte alignment holds.
    match dtype {
        DType::BF16 => {
            let s = unsafe { std::slice::from_raw_parts(words.as_ptr() as *const half::bf16, n) };
            Tensor::from_slice(s, dims, &Device::Cpu)
        }
        _ => {
            let s = unsafe { std::slice::from_raw_parts(words.as_ptr() as *const half::f16, n) };
            Tensor::from_slice(s, dims, &Device::Cpu)
        }
    }
}

/// One tile classified by Rust and by the kernel's code, see [`classify_tile_both`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileClasses {
    /// [`crate::mask::tiles`] (`SEGATTN_TILE_*` code).
    pub rust: u8,
    /// `kernels/mask.cuh` `TileClassifier::classify_alone` with the kernels' budget (every piece
    /// pair: exact; `SEGATTN_TILE_*` code).
    pub kernel: u8,
    /// `kernels/mask.cuh` `TileClassifier::may_be_visible` (one thread, conservative, with the
    /// given budget of piece pairs).
    pub may_be_visible: bool,
    /// `kernels/mask.cuh` `TileClassifier::classify_alone` (one thread, with the given budget of
    /// piece pairs; `None` when it ran out, and the kernel falls back to the cooperative class).
    pub alone: Option<u8>,
}

/// Classifies the tile query rows `[q0, q1)` x keys `[k0, k1)` of batch row `b` with
/// [`crate::mask::tiles`] (Rust) and with `kernels/mask.cuh` (the kernel's classifier and its
/// conservative loop-bound test with `budget` piece pairs, emulated). Tiles of at most 64 x 64,
/// inside the sequence.
#[allow(clippy::too_many_arguments)]
pub fn classify_tile_both(
    mask: &SegmentMask,
    batch: usize,
    q_len: usize,
    kv_len: usize,
    b: usize,
    (q0, q1): (usize, usize),
    (k0, k1): (usize, usize),
    budget: usize,
) -> Result<TileClasses> {
    if b >= batch || q0 > q1 || q1 > q_len || k0 > k1 || k1 > kv_len || q1 - q0 > 64 || k1 - k0 > 64 {
        invalid_arg!("tile: rows [{q0}, {q1}) x keys [{k0}, {k1}) of row {b} is not a tile of at most 64 x 64 inside [{batch}, {q_len}, {kv_len}]");
    }
    let host = mask.host_metadata(batch, q_len, kv_len)?;
    let rust = classify_tile(
        &host.rule,
        host.rule.table_row(b),
        host.q.row(b),
        host.kv.row(b),
        (q0, q1),
        (k0, k1),
        host.pos_offset,
    ) as u8;
    let mut p = SegattnFwdParams {
        batch: to_i32("batch", batch)?,
        q_len: to_i32("q_len", q_len)?,
        kv_len: to_i32("kv_len", kv_len)?,
        ..Default::default()
    };
    fill_mask_params(&mut p, &host);
    let (mut cls, mut maybe, mut alone): (c_int, c_int, c_int) = (-1, -1, -2);
    let budget = c_int::try_from(budget).unwrap_or(c_int::MAX);
    // SAFETY: `p` points into `host`, alive for the call; the range was checked above.
    let rc = unsafe {
        segattn_emu_classify_tile(
            &p,
            b as c_int,
            q0 as c_int,
            q1 as c_int,
            k0 as c_int,
            k1 as c_int,
            budget,
            &mut cls,
            &mut maybe,
            &mut alone,
        )
    };
    check_launch(rc, "tile classification")?;
    Ok(TileClasses {
        rust,
        kernel: cls as u8,
        may_be_visible: maybe != 0,
        alone: u8::try_from(alone).ok(),
    })
}

/// A key tile's runs of one segment id as `kernels/mask.cuh` `key_runs` finds them (the kernels'
/// masked tiles and mass sums): `(end0, id0, id1, at_most_two)`, the first run being keys
/// `[0, end0)`. `kid`: the tile's 64 key ids (non-decreasing over the first `valid`), `valid` in
/// `1..=64`. Errors if the warp's lanes disagree (the result must be uniform).
pub fn key_runs(kid: &[u32; 64], valid: usize) -> Result<(usize, u32, u32, bool)> {
    let mut out = [0i64; 4 * 32];
    let valid = c_int::try_from(valid).unwrap_or(c_int::MAX);
    // SAFETY: `kid` holds the 64 ids the hook reads and `out` the 4 x 32 values it writes.
    let rc = unsafe { segattn_emu_key_runs(kid.as_ptr(), valid, out.as_mut_ptr()) };
    check_launch(rc, "key runs")?;
    if out.chunks_exact(4).any(|lane| lane != &out[..4]) {
        invalid_arg!("key_runs: the lanes of the warp disagree: {out:?}");
    }
    Ok((out[0] as usize, out[1] as u32, out[2] as u32, out[3] != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The emulated entry points refuse a block size no kernel has (a launcher bug), naming it.
    #[test]
    fn unknown_block_rows_are_errors() {
        let mut p = SegattnFwdParams {
            batch: 1,
            q_len: 1,
            kv_len: 1,
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 64,
            dtype: dtype_code(DType::BF16).unwrap(),
            block_rows: 96,
            ..Default::default()
        };
        // SAFETY: the params are rejected before any pointer in them is read.
        let rc = unsafe { segattn_emu_fwd(&p) };
        assert_ne!(rc, 0);
        assert!(last_error().contains("block_rows 96"), "{}", last_error());
        // The wide kernel is plain attention without split-K.
        p.block_rows = 128;
        p.kv_splits = 2;
        // SAFETY: as above.
        let rc = unsafe { segattn_emu_fwd(&p) };
        assert_ne!(rc, 0);
        assert!(last_error().contains("wide kernel"), "{}", last_error());
    }
}
