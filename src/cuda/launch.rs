//! Launching the forward kernel on candle's stream.
//!
//! - q, k, v are read in place through their layouts (start offset, batch / row / head strides):
//!   the kernel's 16-byte loads need a 16-byte aligned start and strides that are multiples of 8
//!   elements; a view that is not gets a contiguous copy on the device first (as the emulated path
//!   does on the host).
//! - The output `[B, Lq, H, D]` and the LSE `[B, H, Lq]` (only when asked) are allocated on the
//!   device and written by the kernel alone (every row, zeros for a row that sees no key).
//! - The mask metadata is uploaded in O(Lq + Lk + table) per row: [`MaskBuffer`] packs the host
//!   metadata that `SegmentAttention::forward` already built and validated (ids and span ends of
//!   both sides, the pair table) into ONE u32 buffer and copies it with one host-to-device copy,
//!   once per mask and device ([`DeviceMasks`]: later calls with the same mask reuse it).
//! - Every driver call and the launch are checked and become candle errors naming the call;
//!   `SEGATTN_CUDA_SYNC=1` also synchronizes after each launch, so that a fault inside the kernel
//!   is reported by the call that caused it. `SEGATTN_CUDA_POISON=1` fills the output (and LSE)
//!   with NaN before the launch, so that an element the kernel fails to write cannot pass a test.

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
    SyncOnDrop, ValidAsZeroBits,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};
use half::{bf16, f16};

use super::device_copies::Uploaded;
use super::driver_err;
use super::module::{self, FwdKernel, FWD_BLOCK_M, FWD_BLOCK_N};
use super::pine::RotationBuffers;
use crate::decode_pack::DecodePacking;
use crate::error::invalid_arg;
pub(crate) use crate::kernel_params::{base_params, check_grid, check_supported, loadable, strides_of};
use crate::kernel_params::{contiguous_strides, mass_accumulates, mass_output, FwdVariant};
use crate::mask::HostMask;
use crate::params::{SegattnFwdParams, SegattnScoresParams, SegattnSegments};
use crate::pine::PineRotation;
use crate::scores::{fused_mass_in_forward, kernel_two_pass, MassAlgorithm, MassPlan};
use crate::validate::AttentionShape;

// SAFETY: a plain C struct (bindgen of kernels/segattn_params.h, layout-tested) passed by value as
// the kernel's only parameter; its pointers are device addresses that the kernel dereferences.
unsafe impl DeviceRepr for SegattnFwdParams {}

fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| v == "1")
}

/// `SEGATTN_CUDA_SYNC=1`: synchronize after every launch and report execution errors there.
fn sync_after_launch() -> bool {
    static FLAG: OnceLock<bool> = OnceLock::new();
    *FLAG.get_or_init(|| env_flag("SEGATTN_CUDA_SYNC"))
}

/// `SEGATTN_CUDA_POISON=1`: fill outputs with NaN before the launch (tests).
fn poison_outputs() -> bool {
    static FLAG: OnceLock<bool> = OnceLock::new();
    *FLAG.get_or_init(|| env_flag("SEGATTN_CUDA_POISON"))
}

/// Where each part of the mask metadata sits in the packed u32 buffer
/// `[q ids | q span ends | kv ids | kv span ends | pair table bytes, packed 4 per word]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MaskLayout {
    q_rows: usize,
    q_len: usize,
    kv_rows: usize,
    kv_len: usize,
    table_at: usize,
    table_size: usize,
    table_batches: usize,
    intra: i32,
    inter: i32,
}

impl MaskLayout {
    /// Packs `host` into one buffer, O(rows x (Lq + Lk)) + table; never empty.
    pub(crate) fn pack(host: &HostMask) -> (Vec<u32>, Self) {
        let (q, kv, rule) = (&host.q, &host.kv, &host.rule);
        let table_words = rule.table.len().div_ceil(4);
        let mut words = Vec::with_capacity(2 * q.ids().len() + 2 * kv.ids().len() + table_words + 1);
        words.extend_from_slice(q.ids());
        words.extend_from_slice(q.span_ends());
        words.extend_from_slice(kv.ids());
        words.extend_from_slice(kv.span_ends());
        let table_at = words.len();
        words.extend(rule.table.chunks(4).map(|c| {
            let mut b = [0u8; 4];
            b[..c.len()].copy_from_slice(c);
            u32::from_le_bytes(b)
        }));
        // Never an empty allocation.
        words.push(0);
        let layout = Self {
            q_rows: q.rows(),
            q_len: q.len(),
            kv_rows: kv.rows(),
            kv_len: kv.len(),
            table_at,
            table_size: rule.table_size,
            table_batches: rule.table_batches,
            intra: i32::from(rule.intra.code()),
            inter: i32::from(rule.inter.code()),
        };
        (words, layout)
    }

    /// Fills the mask fields of `p` with addresses inside the packed buffer, whose first word is
    /// at address `base`.
    pub(crate) fn fill(&self, base: u64, p: &mut SegattnFwdParams) {
        let at = |word: usize| (base + 4 * word as u64) as *const u32;
        let nq = self.q_rows * self.q_len;
        let nk = self.kv_rows * self.kv_len;
        p.q_segments = SegattnSegments {
            ids: at(0),
            span_end: at(nq),
            batch_stride: if self.q_rows == 1 { 0 } else { self.q_len as i64 },
        };
        p.kv_segments = SegattnSegments {
            ids: at(2 * nq),
            span_end: at(2 * nq + nk),
            batch_stride: if self.kv_rows == 1 { 0 } else { self.kv_len as i64 },
        };
        if self.table_size == 0 {
            p.pair_table = std::ptr::null();
            p.table_size = 0;
            p.table_batch_stride = 0;
        } else {
            p.pair_table = at(self.table_at) as *const u8;
            p.table_size = self.table_size as i32;
            p.table_batch_stride = if self.table_batches == 1 {
                0
            } else {
                (self.table_size * self.table_size) as i64
            };
        }
        p.intra_rule = self.intra;
        p.inter_rule = self.inter;
    }
}

/// The mask metadata on the device (see [`MaskLayout`]).
pub(crate) struct MaskBuffer {
    buf: Uploaded<u32>,
    layout: MaskLayout,
}

impl MaskBuffer {
    /// Packs and uploads `host` with one host-to-device copy.
    pub(crate) fn upload(stream: &Arc<CudaStream>, host: &HostMask) -> Result<Self> {
        let (words, layout) = MaskLayout::pack(host);
        let buf = Uploaded::new(stream, &words, &format!("{} bytes of mask metadata", 4 * words.len()))?;
        Ok(Self { buf, layout })
    }

    /// The buffer of `host` in the context of `stream`: the one its mask already uploaded there
    /// (for the same GQA decode packing, `packed_heads`; 1: none), or a new upload, kept; readable
    /// by the launches queued on `stream` from now on.
    pub(crate) fn of(stream: &Arc<CudaStream>, host: &HostMask, packed_heads: usize) -> Result<Arc<Self>> {
        let ctx = stream.context();
        let key = (ctx.ordinal(), ctx.cu_ctx() as usize, packed_heads);
        let mut copies = host
            .device
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("segattn: mask buffer cache poisoned by a panic".into()))?;
        if let Some((_, buf)) = copies.iter().find(|(k, _)| *k == key) {
            buf.buf.on_stream(stream)?;
            return Ok(buf.clone());
        }
        let buf = Arc::new(Self::upload(stream, host)?);
        copies.push((key, buf.clone()));
        Ok(buf)
    }

    /// The device address of the buffer and its access guard: hold the guard until the launch
    /// that reads the buffer is queued (dropped, it records the read; a buffer dropped later
    /// waits for that record, so one taken before the launch would let it be freed under the
    /// kernel on another stream).
    pub(crate) fn device_ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        self.buf.device_ptr(stream)
    }

    /// Fills the mask fields of `p` with addresses inside the buffer, whose base is `base`.
    pub(crate) fn fill(&self, base: u64, p: &mut SegattnFwdParams) {
        self.layout.fill(base, p);
    }
}

/// The mask buffers a [`crate::SegmentMask`] uploaded, per CUDA context (device ordinal, context
/// address) and GQA decode packing: a mask used by every layer of a model is packed and copied to
/// the GPU once. The mask is immutable, so a buffer never goes stale; it is freed with the mask.
#[derive(Clone, Default)]
pub(crate) struct DeviceMasks(Arc<Mutex<Vec<DeviceMask>>>);

/// One uploaded buffer: (device ordinal, context, packed heads) and the buffer.
type DeviceMask = ((usize, usize, usize), Arc<MaskBuffer>);

impl std::fmt::Debug for DeviceMasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map_or(0, |v| v.len());
        write!(f, "DeviceMasks({n} buffers)")
    }
}

/// How many key slices split-K uses: only when the grid would leave most SMs idle (decode, short
/// query chunks) and the keys span several tiles; about two blocks per SM, each slice at least two
/// key tiles. `SEGATTN_KV_SPLITS=n` forces `n` (tests, benchmarks).
pub(crate) fn kv_splits(shape: &AttentionShape, sm_count: usize) -> usize {
    if let Some(n) = std::env::var("SEGATTN_KV_SPLITS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
    {
        return n.max(1);
    }
    let blocks = shape.q_len.div_ceil(FWD_BLOCK_M) * shape.num_heads * shape.batch;
    let tiles = shape.kv_len.div_ceil(FWD_BLOCK_N);
    if blocks >= sm_count || tiles < 4 {
        return 1;
    }
    (2 * sm_count).div_ceil(blocks).min(tiles / 2).clamp(1, 64)
}

/// The launch configuration: grid (ceil(Lq / block rows) x kv_splits, H, B), the kernel's threads
/// (128; 256 for the two-warpgroup wgmma kernel), the traits' shared memory.
pub(crate) fn launch_config(shape: &AttentionShape, kernel: &FwdKernel, kv_splits: usize) -> Result<LaunchConfig> {
    check_grid(shape)?;
    Ok(LaunchConfig {
        grid_dim: (
            (shape.q_len.div_ceil(kernel.block_rows) * kv_splits) as u32,
            shape.num_heads as u32,
            shape.batch as u32,
        ),
        block_dim: (kernel.threads, 1, 1),
        shared_mem_bytes: kernel.smem_bytes,
    })
}

/// Dynamic shared memory of a [`FwdVariant::WideMass`] launch for `num_segments` key segments.
pub(crate) fn wide_mass_smem_bytes(dtype: DType, num_segments: usize) -> Result<u32> {
    match crate::emulated::fwd_mass_rows_smem_bytes(dtype, 128, num_segments) {
        Some(bytes) => Ok(bytes as u32),
        None => invalid_arg!("internal error: no shared memory size for the wide mass kernel at Sk = {num_segments}"),
    }
}

/// Launches `kernel` with `params` on `stream`, checked (and synchronized with
/// `SEGATTN_CUDA_SYNC=1`).
pub(crate) fn launch(
    stream: &Arc<CudaStream>,
    kernel: &FwdKernel,
    params: &SegattnFwdParams,
    cfg: LaunchConfig,
) -> Result<()> {
    let mut builder = stream.launch_builder(&kernel.func);
    builder.arg(params);
    // SAFETY: the kernel's one parameter is a SegattnFwdParams by value; every pointer in it is a
    // live device allocation (held by the caller until after this call is ordered on `stream`)
    // of the sizes stated in it; the grid covers [B, H, Lq] as the kernel expects.
    unsafe { builder.launch(cfg) }.map_err(|e| {
        driver_err(
            format!(
                "launching {} (grid {:?}, block {:?}, {} bytes of dynamic shared memory)",
                kernel.name, cfg.grid_dim, cfg.block_dim, cfg.shared_mem_bytes
            ),
            e,
        )
    })?;
    if sync_after_launch() {
        stream
            .synchronize()
            .map_err(|e| driver_err(format!("running {} (SEGATTN_CUDA_SYNC=1)", kernel.name), e))?;
    }
    Ok(())
}

/// Launches `func` (entry point `name`) with `params`, its only parameter, on `stream`, checked:
/// the launch, an execution error with `SEGATTN_CUDA_SYNC=1`, and the context's sticky error.
///
/// # Safety
/// `params` must be the kernel's parameter struct, its pointers live device allocations (held by
/// the caller until the launch is ordered on `stream`) of the sizes stated in it, and `cfg` the
/// grid, block and dynamic shared memory the kernel expects for them.
pub(crate) unsafe fn launch_with_params<P: DeviceRepr>(
    stream: &Arc<CudaStream>,
    func: &CudaFunction,
    name: &str,
    cfg: LaunchConfig,
    params: &P,
) -> Result<()> {
    let mut builder = stream.launch_builder(func);
    builder.arg(params);
    // SAFETY: the caller's contract (above).
    unsafe { builder.launch(cfg) }.map_err(|e| {
        driver_err(
            format!(
                "launching {name} (grid {:?}, block {:?}, {} bytes of dynamic shared memory)",
                cfg.grid_dim, cfg.block_dim, cfg.shared_mem_bytes
            ),
            e,
        )
    })?;
    sync_if_asked(stream, name)?;
    super::recorded_errors(stream, name)
}

/// With `SEGATTN_CUDA_SYNC=1`: synchronizes `stream` and reports an execution error of `kernel`.
pub(crate) fn sync_if_asked(stream: &CudaStream, kernel: &str) -> Result<()> {
    if sync_after_launch() {
        stream
            .synchronize()
            .map_err(|e| driver_err(format!("running {kernel} (SEGATTN_CUDA_SYNC=1)"), e))?;
    }
    Ok(())
}

/// Grid rows per head and layers per batch row are limited to 65535.
pub(crate) fn check_grid_of(kernel: &str, batch: usize, heads: usize) -> Result<()> {
    if batch > 65_535 || heads > 65_535 {
        invalid_arg!("q: {kernel} launches one grid row per head and batch row (at most 65535 each), got B = {batch}, H = {heads}");
    }
    Ok(())
}

/// Fills `n` 16-bit or 32-bit words at `ptr` with all-ones bits (NaN in bf16, f16 and f32).
fn poison(stream: &CudaStream, ptr: u64, n: usize, bytes: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    // A raw driver call: the stream's context current first (the per-thread handle names the
    // stream of whichever context is current).
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| driver_err("binding the context to poison outputs", e))?;
    // SAFETY: `ptr` is the start of a live allocation of at least `n` elements of `bytes` bytes.
    let r = unsafe {
        if bytes == 2 {
            sys::cuMemsetD16Async(ptr, 0xFFFF, n, stream.cu_stream())
        } else {
            sys::cuMemsetD32Async(ptr, 0xFFFF_FFFF, n, stream.cu_stream())
        }
    };
    r.result()
        .map_err(|e| driver_err(format!("poisoning {n} output elements (SEGATTN_CUDA_POISON=1)"), e))
}

/// A q / k / v operand as the kernel reads it: the storage (the input, or a contiguous copy when
/// the input's view cannot be loaded in place) and its layout.
struct Operand<'a> {
    storage: Stored<'a>,
    layout: Layout,
}

enum Stored<'a> {
    Input(&'a CudaStorage),
    Copy(CudaStorage),
}

impl Stored<'_> {
    fn get(&self) -> &CudaStorage {
        match self {
            Self::Input(s) => s,
            Self::Copy(s) => s,
        }
    }
}

impl<'a> Operand<'a> {
    fn new<T: CudaDType + DeviceRepr>(name: &str, s: &'a CudaStorage, l: &Layout, dev: &CudaDevice) -> Result<Self> {
        // From the layout alone (asking cudarc for the address here, as well as at the launch,
        // cost an event wait and record per operand and call).
        if crate::kernel_params::layout_readable(l, std::mem::size_of::<T>()) {
            return Ok(Self {
                storage: Stored::Input(s),
                layout: l.clone(),
            });
        }
        let n = l.shape().elem_count();
        // SAFETY: fully written by the copy below before any read.
        let dst = unsafe { dev.alloc::<T>(n.max(1)) }?;
        let mut dst = T::wrap_cuda_slice(dst, dev.clone());
        s.copy_strided_src(&mut dst, 0, l)?;
        let layout = Layout::contiguous(l.shape());
        if !loadable(0, &strides_of(&layout)) {
            invalid_arg!("{name}: could not get a 16-byte aligned copy for the kernel's 16-byte loads");
        }
        Ok(Self {
            storage: Stored::Copy(dst),
            layout,
        })
    }
}

/// What the forward pass computes besides the output: the LSE, PINE's rotation, the fused mass.
#[derive(Clone, Copy)]
pub(crate) struct ForwardExtras<'a> {
    pub want_lse: bool,
    pub rotation: Option<&'a PineRotation>,
    /// The per-segment mass: its layout, and the algorithm asked for.
    pub mass: Option<(&'a MassPlan, MassAlgorithm)>,
}

/// The outputs of [`forward`] on the device.
pub(crate) struct ForwardOutputs {
    /// `[B, Lq, H, D]` in the input dtype.
    pub out: CudaStorage,
    /// `[B, H, Lq]` f32, when asked.
    pub lse: Option<CudaStorage>,
    /// The raw (reduced, unweighted) mass `[B, Ho, Lo, Sk]` f32, when asked.
    pub mass: Option<CudaStorage>,
}

/// The forward pass of the op on CUDA storages.
///
/// The fused mass: inside the forward kernel when it has at most 64 key segments (then without
/// split-K): the 128 x 64 one (`segattn_fwd_wide64_mass_*`, the rows' sums in shared memory) where
/// plain attention takes it and the mask allows ([`FwdVariant::with_mass`]), else the 64-row one
/// (`segattn_fwd_mass_*`, on-chip accumulators); else, and with
/// [`MassAlgorithm::TwoPass`], the forward kernel (split-K as usual) then the mass kernel's exact
/// pass with the forward kernel's LSE (`crate::scores::fused_mass_in_forward`).
pub(crate) fn forward(
    (q, ql): (&CudaStorage, &Layout),
    (k, kl): (&CudaStorage, &Layout),
    (v, vl): (&CudaStorage, &Layout),
    shape: AttentionShape,
    host: &HostMask,
    scale: f32,
    extras: ForwardExtras,
) -> Result<ForwardOutputs> {
    let dtype = q.dtype();
    check_supported(dtype, shape.head_dim)?;
    super::per_stream::check_one_stream(
        ("q", &q.device().cuda_stream()),
        &[("k", &k.device().cuda_stream()), ("v", &v.device().cuda_stream())],
    )?;
    if extras.rotation.is_some() {
        crate::kernel_params::check_pine_dims(dtype, shape.head_dim)?;
    }
    match dtype {
        DType::BF16 => forward_typed::<bf16>((q, ql), (k, kl), (v, vl), shape, host, scale, extras),
        _ => forward_typed::<f16>((q, ql), (k, kl), (v, vl), shape, host, scale, extras),
    }
}

#[allow(clippy::too_many_arguments)]
fn forward_typed<T: CudaDType + DeviceRepr + ValidAsZeroBits + candle_core::WithDType>(
    (q, ql): (&CudaStorage, &Layout),
    (k, kl): (&CudaStorage, &Layout),
    (v, vl): (&CudaStorage, &Layout),
    shape: AttentionShape,
    host: &HostMask,
    scale: f32,
    extras: ForwardExtras,
) -> Result<ForwardOutputs> {
    let ForwardExtras {
        want_lse,
        rotation,
        mass: mass_request,
    } = extras;
    let dev = q.device().clone();
    let stream = dev.cuda_stream();
    let n_out = shape.batch * shape.q_len * shape.num_heads * shape.head_dim;
    let n_lse = shape.batch * shape.num_heads * shape.q_len;
    // The mass: zeroed where a kernel adds into it (never a zero-byte allocation).
    let n_mass = mass_request.map_or(0, |(plan, _)| {
        let (b, h, l, s) = plan.out_dims(shape.q_len);
        b * h * l * s
    });
    let alloc_mass = |accumulates: bool| -> Result<Option<CudaSlice<f32>>> {
        if mass_request.is_none() {
            return Ok(None);
        }
        let buf = if accumulates || n_mass == 0 {
            stream.alloc_zeros::<f32>(n_mass.max(1))
        } else {
            // SAFETY: every element is written by the kernel (or poisoned, then written).
            unsafe { stream.alloc::<f32>(n_mass) }
        };
        Ok(Some(buf.map_err(|e| driver_err("allocating the segment mass", e))?))
    };
    let wrap_mass = |m: Option<CudaSlice<f32>>| m.map(|m| CudaStorage::wrap_cuda_slice(m, dev.clone()));
    if n_out == 0 {
        // Nothing to compute (B, Lq or H is 0): empty outputs, no launch (one element allocated,
        // never a zero-byte allocation; the shape says 0 elements).
        let out = T::wrap_cuda_slice(dev.alloc_zeros::<T>(1)?, dev.clone());
        let lse = if want_lse {
            Some(CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<f32>(1)?, dev.clone()))
        } else {
            None
        };
        return Ok(ForwardOutputs {
            out,
            lse,
            mass: wrap_mass(alloc_mass(true)?),
        });
    }
    let kernels = module::kernels(stream.context())?;
    // The fused mass in the forward kernel's one pass forbids split-K; after it, any split.
    let mass_one_pass = match mass_request {
        Some((plan, algorithm)) => !kernel_two_pass(algorithm, plan.sk)?,
        None => false,
    };
    // GQA decode steps: the query heads of a KV head as the rows of one block (not with the mass).
    let packing = DecodePacking::plan(&shape, host, mass_request.is_none())?;
    let (kshape, host) = match &packing {
        Some(p) => (p.shape, &p.host),
        None => (shape, host),
    };
    let splits = if mass_one_pass {
        1
    } else {
        kv_splits(&kshape, kernels.sm_count)
    };
    let mass_in_forward = match mass_request {
        Some((plan, algorithm)) => fused_mass_in_forward(algorithm, plan.sk, splits, shape.head_dim)?,
        None => false,
    };
    // The mma.sync kernel of the rules, then on an H100 / H200 its wgmma counterpart.
    let summary = host.summary();
    let mma_sync = match mass_request {
        _ if rotation.is_some() => FwdVariant::Rope,
        Some((plan, _)) if mass_in_forward => {
            let with_mass = FwdVariant::fused_mass(&kshape, splits, summary, kernels.sm_count, (None, None), plan.sk);
            // The rows' sums must fit this device's shared memory (not on 99 KiB GPUs).
            let fits = |k: &FwdKernel| k.mass_segments > 0 && plan.sk <= k.mass_segments;
            if with_mass == FwdVariant::WideMass && !kernels.fwd(T::DTYPE, shape.head_dim, with_mass).is_some_and(fits)
            {
                FwdVariant::Mass
            } else {
                with_mass
            }
        }
        _ => FwdVariant::plain_kernel(&kshape, splits, summary, kernels.sm_count, (None, None)),
    };
    let variant = kernels.on_this_gpu(T::DTYPE, shape.head_dim, summary, mma_sync)?;
    let kernel = kernels.fwd_or_err(T::DTYPE, shape.head_dim, variant)?;
    let mut cfg = launch_config(&kshape, kernel, splits)?;
    if let (FwdVariant::WideMass, Some((plan, _))) = (variant, mass_request) {
        // The rows' sums after the kernel's fixed shared memory (the limit was raised for them).
        cfg.shared_mem_bytes = wide_mass_smem_bytes(T::DTYPE, plan.sk)?;
    }

    let (qo, ko, vo) = (
        Operand::new::<T>("q", q, ql, &dev)?,
        Operand::new::<T>("k", k, kl, &dev)?,
        Operand::new::<T>("v", v, vl, &dev)?,
    );
    let mut params = base_params(
        &kshape,
        T::DTYPE,
        scale,
        [strides_of(&qo.layout), strides_of(&ko.layout), strides_of(&vo.layout)],
    )?;
    params.block_rows = kernel.block_rows as i32;
    params.block_keys = kernel.block_keys;
    if let Some(p) = &packing {
        params.q_strides = p.strides(strides_of(&qo.layout));
        params.o_strides = p.strides(contiguous_strides(shape.q_len, shape.num_heads, shape.head_dim));
    }
    let mask = MaskBuffer::of(&stream, host, packing.as_ref().map_or(1, |p| p.heads_per_row_block))?;
    let rotation = rotation.map(|r| RotationBuffers::upload(&stream, r)).transpose()?;
    // SAFETY: every element is written by the kernel (or poisoned, then written) before any read.
    let mut out = unsafe { stream.alloc::<T>(n_out) }.map_err(|e| driver_err("allocating the output", e))?;
    // The mass kernel after the forward one reads the LSE: computed even when not returned, then
    // in the stream's scratch (after the split partials), not an allocation freed within the call
    // (the pool would hand it back to the driver at the caller's next synchronisation: CUDA 41).
    let mass_after = mass_request.is_some() && !mass_in_forward;
    let mut lse = if want_lse {
        // SAFETY: every element is written by the kernel (or poisoned, then written) before any read.
        Some(unsafe { stream.alloc::<f32>(n_lse) }.map_err(|e| driver_err("allocating the LSE", e))?)
    } else {
        None
    };
    let mut mass = alloc_mass(mass_after || mass_request.is_some_and(|(plan, _)| mass_accumulates(plan, false)))?;
    // Split-K partials, O then LSE in one stretch of scratch (n_out is a multiple of D, so the LSE
    // part starts 256-byte aligned): every element written by the forward kernel before the merge
    // reads it. The merge is the last slice of each query tile to finish: one counter per (batch
    // row, head, query tile) of the launch, from the stream's zeroed counters (left zero).
    let partial_len = if splits > 1 { splits * (n_out + n_lse) } else { 0 };
    let scratch_lse = mass_after && !want_lse;
    let scratch_len = partial_len + if scratch_lse { n_lse } else { 0 };
    let scratch = if scratch_len > 0 {
        Some(super::per_stream::scratch(&stream, scratch_len)?)
    } else {
        None
    };
    let done = if splits > 1 {
        Some(super::per_stream::zeroed_counters(
            &stream,
            kshape.batch * kshape.num_heads * kshape.q_len.div_ceil(variant.block_rows()),
        )?)
    } else {
        None
    };
    {
        // The guards make later work on other streams wait for this launch (when cudarc tracks
        // events): they are dropped after it is ordered on `stream`.
        let qs = qo.storage.get().as_cuda_slice::<T>()?;
        let ks = ko.storage.get().as_cuda_slice::<T>()?;
        let vs = vo.storage.get().as_cuda_slice::<T>()?;
        let (qp, _gq) = qs.device_ptr(&stream);
        let (kp, _gk) = ks.device_ptr(&stream);
        let (vp, _gv) = vs.device_ptr(&stream);
        let (mp, _gm) = mask.device_ptr(&stream);
        let (op, _go) = out.device_ptr_mut(&stream);
        let lse_ptr = lse.as_mut().map(|l| l.device_ptr_mut(&stream));
        // The LSE the kernel writes: the returned one, or the mass pass's in the scratch.
        let lse_addr = match (&lse_ptr, &scratch) {
            (Some((p, _)), _) => Some(*p),
            (None, Some(sc)) if scratch_lse => Some(sc.addr + 4 * partial_len as u64),
            _ => None,
        };
        let elem = std::mem::size_of::<T>() as u64;
        params.q = (qp + elem * qo.layout.start_offset() as u64) as *const std::ffi::c_void;
        params.k = (kp + elem * ko.layout.start_offset() as u64) as *const std::ffi::c_void;
        params.v = (vp + elem * vo.layout.start_offset() as u64) as *const std::ffi::c_void;
        // Operand::new judged the layouts on the premise that a storage starts 16-byte aligned
        // (a whole cudarc allocation); one that does not (a pointer wrapped from elsewhere) is an
        // error here, not a misaligned load on the device.
        for (arg, addr) in [("q", params.q), ("k", params.k), ("v", params.v)] {
            if !(addr as u64).is_multiple_of(16) {
                invalid_arg!(
                    "{arg}: the kernels read 16-byte chunks: its storage's address {addr:?} is not 16-byte aligned"
                );
            }
        }
        params.o = op as *mut std::ffi::c_void;
        params.lse = lse_addr.map_or(std::ptr::null_mut(), |p| p as *mut f32);
        mask.fill(mp, &mut params);
        if let Some(r) = &rotation {
            r.fill(
                &stream,
                &mut params,
                packing.as_ref().map_or(1, |p| p.heads_per_row_block),
            )?;
        }
        let mass_ptr = mass.as_mut().map(|m| m.device_ptr_mut(&stream));
        if let (Some((plan, _)), Some((mp, _))) = (mass_request, &mass_ptr) {
            if mass_in_forward {
                params.mass = mass_output(plan, shape.q_len, *mp as *mut f32)?;
                if poison_outputs() && !mass_accumulates(plan, false) {
                    poison(&stream, *mp, n_mass, 4)?;
                }
            }
        }
        if poison_outputs() {
            poison(&stream, op, n_out, 2)?;
            if let Some(p) = lse_addr {
                poison(&stream, p, n_lse, 4)?;
            }
        }
        // (The stream's scratch and counters: only this stream's launches touch them, in order.)
        if let (Some(scratch), Some(done)) = (&scratch, &done) {
            let (o_acc, l_acc) = (scratch.addr, scratch.addr + 4 * (splits * n_out) as u64);
            params.kv_splits = splits as i32;
            params.o_accum = o_acc as *mut f32;
            params.lse_accum = l_acc as *mut f32;
            params.split_done = done.addr as *mut u32;
            if poison_outputs() {
                poison(&stream, o_acc, splits * n_out, 4)?;
                poison(&stream, l_acc, splits * n_lse, 4)?;
            }
        }
        launch(&stream, kernel, &params, cfg)?;
        if let (true, Some((plan, _)), Some((mp, _)), Some(lp)) = (mass_after, mass_request, &mass_ptr, lse_addr) {
            // The mass kernel's exact pass with the LSE just written (same stream).
            let scores = SegattnScoresParams {
                base: params,
                out: mass_output(plan, shape.q_len, *mp as *mut f32)?,
                two_pass: 1,
                saved_lse: lp as *const f32,
            };
            super::scores::launch_kernel(&stream, &kernels, T::DTYPE, &shape, host.rule.has_causal(), &scores)?;
        }
    }
    // Errors that cudarc recorded instead of returning (event records in the guards' drops).
    super::recorded_errors(&stream, kernel.name)?;
    let out = T::wrap_cuda_slice(out, dev.clone());
    let lse = if want_lse {
        lse.map(|l| CudaStorage::wrap_cuda_slice(l, dev.clone()))
    } else {
        None
    };
    Ok(ForwardOutputs {
        out,
        lse,
        mass: wrap_mass(mass),
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::mask::SegmentMask;
    use crate::{PairRule, PairTable, PineLayout, Visibility};

    /// Reads `n` values of `T` at `ptr` (a host address here).
    fn read<T: Copy>(ptr: *const T, n: usize) -> Vec<T> {
        // SAFETY: the tests point `ptr` into a live host buffer of at least `n` values.
        unsafe { std::slice::from_raw_parts(ptr, n) }.to_vec()
    }

    /// The packed buffer, read back through the pointers `fill` puts in the params, gives back
    /// every row's ids, span ends and table exactly (shared and per-row ids and tables, cross
    /// attention, odd table sizes).
    #[test]
    fn packed_mask_reads_back_through_the_params() -> Result<()> {
        let dev = Device::Cpu;
        let pine = SegmentMask::pine_batch(
            &[PineLayout::new(3, &[5, 4], 2), PineLayout::new(1, &[3, 3, 3, 2], 2)],
            &dev,
        )?;
        let q_ids = Tensor::new(&[[0u32, 0, 1, 1, 1], [0, 2, 2, 2, 5]], &dev)?;
        let kv_ids = Tensor::new(&[[0u32, 1, 1, 2, 2, 2, 3]], &dev)?;
        let codes: Vec<u8> = (0..2 * 3 * 3).map(|i| (i % 4) as u8).collect();
        let cross = SegmentMask::new(
            &q_ids,
            &kv_ids,
            PairRule::new(Visibility::Full, Visibility::Causal).with_table(PairTable::new(Tensor::from_vec(
                codes,
                (2, 3, 3),
                &dev,
            )?)?),
        )?;
        let plain = SegmentMask::documents(&[&[4, 3, 7][..]], &dev)?;
        for (name, mask, batch, lq, lk) in [
            ("pine_batch", &pine, 2, 14, 14),
            ("cross", &cross, 2, 5, 7),
            ("documents, no table", &plain, 3, 14, 14),
        ] {
            let host = mask.host_metadata(batch, lq, lk)?;
            let (words, layout) = MaskLayout::pack(&host);
            let mut p = SegattnFwdParams::default();
            layout.fill(words.as_ptr() as u64, &mut p);
            for b in 0..batch {
                for (side, segs, len) in [("q", &p.q_segments, lq), ("kv", &p.kv_segments, lk)] {
                    let want = if side == "q" { host.q.row(b) } else { host.kv.row(b) };
                    let off = b as i64 * segs.batch_stride;
                    // SAFETY: inside `words` (the offsets are what is being tested).
                    let (ids, ends) = unsafe { (segs.ids.offset(off as isize), segs.span_end.offset(off as isize)) };
                    assert_eq!(read(ids, len), want.ids, "{name}: {side} ids of row {b}");
                    assert_eq!(read(ends, len), want.span_end, "{name}: {side} span ends of row {b}");
                }
                let s = p.table_size as usize;
                if s == 0 {
                    assert!(p.pair_table.is_null(), "{name}");
                    assert!(host.rule.table_row(b).is_empty(), "{name}");
                } else {
                    // SAFETY: inside `words`.
                    let t = unsafe { p.pair_table.offset((b as i64 * p.table_batch_stride) as isize) };
                    assert_eq!(read(t, s * s), host.rule.table_row(b), "{name}: table of row {b}");
                }
            }
            assert_eq!(p.intra_rule, i32::from(host.rule.intra.code()), "{name}");
            assert_eq!(p.inter_rule, i32::from(host.rule.inter.code()), "{name}");
        }
        Ok(())
    }

    #[test]
    fn unsupported_inputs_name_the_argument() {
        let e = check_supported(DType::F32, 64).unwrap_err().to_string();
        assert!(e.contains("q:") && e.contains("dtype") && e.contains("F32"), "{e}");
        let e = check_supported(DType::BF16, 96).unwrap_err().to_string();
        assert!(e.contains("q:") && e.contains("head dim") && e.contains("96"), "{e}");
        let e = check_supported(DType::BF16, 512).unwrap_err().to_string();
        assert!(e.contains("q:") && e.contains("up to 256") && e.contains("512"), "{e}");
        assert!(check_supported(DType::F16, 128).is_ok());
        assert!(check_supported(DType::BF16, 256).is_ok());
        assert!(crate::kernel_params::check_pine_dims(DType::BF16, 256).is_ok());
        let e = crate::kernel_params::check_backward_dims(DType::BF16, 256)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("q:") && e.contains("fused backward") && e.contains("up to 128") && e.contains("256"),
            "{e}"
        );
    }

    #[test]
    fn in_place_loads_need_16_byte_alignment() {
        let layout = Layout::contiguous((2, 10, 4, 64));
        let st = strides_of(&layout);
        assert_eq!((st.batch, st.row, st.head), (10 * 4 * 64, 4 * 64, 64));
        assert!(loadable(256, &st));
        assert!(!loadable(256 + 2, &st));
        // A [B, L, H, 68] tensor narrowed to 64 on the last dim: row stride 4 * 68 is fine, the
        // head stride 68 is not a multiple of 8.
        let narrowed = Layout::contiguous((2, 10, 4, 68)).narrow(3, 2, 64).unwrap();
        assert!(!loadable(0, &strides_of(&narrowed)));
        // Size-1 dimensions get stride 0.
        let st = strides_of(&Layout::contiguous((1, 1, 1, 64)));
        assert_eq!((st.batch, st.row, st.head), (0, 0, 0));
    }
}
