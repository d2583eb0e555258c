//! Filling the kernels' parameter struct (`kernels/segattn_params.h`), shared by the GPU launcher
//! (`src/cuda/`) and the emulated launches (`src/emulated*`), so that both hand the kernels the
//! same sizes, strides, dtype code and scale.

use candle_core::{DType, Layout, Result, Tensor};

use crate::error::invalid_arg;
use crate::params::{SegattnFwdParams, SegattnMassOutput, SegattnStrides};
use crate::scores::{HeadReduction, MassPlan, QueryReduction};
use crate::validate::AttentionShape;

/// The checks of the CUDA kernels beyond the common validation: dtype and head dim.
pub(crate) fn check_supported(dtype: DType, head_dim: usize) -> Result<()> {
    if !matches!(dtype, DType::BF16 | DType::F16) {
        invalid_arg!(
            "q: the CUDA kernels support dtype bf16 or f16, got {dtype:?} (f32 attention runs on the CPU \
             only; convert with .to_dtype(DType::BF16))"
        );
    }
    if head_dim > 256 {
        invalid_arg!(
            "q: the CUDA attention and mass kernels support head dim D up to 256 (built for 64, 128 and 256; other \
             D run zero-padded to them), got D = {head_dim}"
        );
    }
    if !crate::head_dim::ATTENTION_HEAD_DIMS.contains(&head_dim) {
        invalid_arg!(
            "q: the CUDA attention and mass kernels are built for head dim D = 64, 128 or 256, got D = {head_dim}"
        );
    }
    Ok(())
}

/// Whether `head_dim` is built as the 64-row forward and mass kernels only: D 256 (no wide or
/// fused-mass variant; PINE's rotated one is 64 rows too; the static_asserts of kernel_traits.cuh
/// and scores_kernel.cuh).
pub(crate) fn plain_64_row_kernels_only(head_dim: usize) -> bool {
    head_dim == 256
}

/// [`check_supported`] for kernels built for the head dims `dims` only (`what`: PINE's,
/// [`crate::head_dim::PINE_HEAD_DIMS`]; the fused backward's,
/// [`crate::head_dim::BACKWARD_HEAD_DIMS`]), which the API pads other D up to.
pub(crate) fn check_supported_dims(what: &str, dtype: DType, head_dim: usize, dims: &[usize]) -> Result<()> {
    check_supported(dtype, head_dim)?;
    if !dims.contains(&head_dim) {
        let largest = dims.iter().max().copied().unwrap_or(0);
        invalid_arg!(
            "q: the CUDA {what} kernels support head dim D up to {largest} (built for {dims:?}; other D run \
             zero-padded to them), got D = {head_dim}"
        );
    }
    Ok(())
}

/// [`check_supported_dims`] for PINE's kernels (rotated attention, decode importance).
pub(crate) fn check_pine_dims(dtype: DType, head_dim: usize) -> Result<()> {
    check_supported_dims("PINE", dtype, head_dim, &crate::head_dim::PINE_HEAD_DIMS)
}

/// [`check_supported_dims`] for the fused backward kernel.
pub(crate) fn check_backward_dims(dtype: DType, head_dim: usize) -> Result<()> {
    check_supported_dims("fused backward", dtype, head_dim, &crate::head_dim::BACKWARD_HEAD_DIMS)
}

/// The kernels launch one grid row per head and one grid layer per batch row (at most 65535
/// each: CUDA's grid y and z limits).
pub(crate) fn check_grid(shape: &AttentionShape) -> Result<()> {
    if shape.num_heads > 65_535 || shape.batch > 65_535 {
        invalid_arg!(
            "q: the CUDA kernels launch one grid row per head and batch row (at most 65535 each), got B = {} and \
             H = {}",
            shape.batch,
            shape.num_heads
        );
    }
    Ok(())
}

/// The kernels' code for `dtype`, `None` for dtypes they do not support (only bf16 and f16).
pub(crate) fn dtype_code(dtype: DType) -> Option<i32> {
    match dtype {
        DType::BF16 => Some(crate::params::SEGATTN_DTYPE_BF16 as i32),
        DType::F16 => Some(crate::params::SEGATTN_DTYPE_F16 as i32),
        _ => None,
    }
}

/// A size as the kernels' 32-bit integer, or an error naming it.
pub(crate) fn to_i32(name: &str, v: usize) -> Result<i32> {
    match i32::try_from(v) {
        Ok(v) => Ok(v),
        Err(_) => invalid_arg!("{name}: {v} does not fit the kernel's 32-bit sizes"),
    }
}

/// (batch, row, head) strides in elements of a rank-4 layout; 0 for a dimension of size 1 (its
/// stride is never multiplied by a nonzero index).
pub(crate) fn strides_of(layout: &Layout) -> SegattnStrides {
    let s = layout.stride();
    let d = layout.dims();
    let pick = |i: usize| if d[i] == 1 { 0 } else { s[i] as i64 };
    SegattnStrides {
        batch: pick(0),
        row: pick(1),
        head: pick(2),
    }
}

/// Whether the kernels' 16-byte loads can read a 16-bit tensor at address `addr` with `strides`
/// in place: a 16-byte aligned start and strides that are multiples of 8 elements.
pub(crate) fn loadable(addr: u64, strides: &SegattnStrides) -> bool {
    addr.is_multiple_of(16) && [strides.batch, strides.row, strides.head].iter().all(|s| s % 8 == 0)
}

/// `t` (a rank-4 16-bit tensor with a contiguous last dim) as the kernels' 16-byte loads can read
/// it: itself when its layout allows ([`loadable`]; a candle CUDA storage is a whole cudarc
/// allocation, 256-byte aligned, so the start offset and the strides decide), else a packed copy.
/// (Not `Tensor::contiguous`, a no-op on a contiguous view at an odd offset, nor `Tensor::copy`,
/// which keeps the view's layout.)
pub(crate) fn kernel_readable(t: &Tensor) -> Result<Tensor> {
    if readable_in_place(t) {
        Ok(t.clone())
    } else {
        t.force_contiguous()
    }
}

/// Whether the kernels' 16-byte loads can read `t` in place, from its layout alone (see
/// [`kernel_readable`]; no `device_ptr`, whose event work a decode step would pay).
pub(crate) fn readable_in_place(t: &Tensor) -> bool {
    layout_readable(t.layout(), t.dtype().size_in_bytes())
}

/// [`readable_in_place`] for a storage's `layout` of elements of `elem_bytes` bytes: a candle
/// CUDA storage is a whole cudarc allocation (256-byte aligned), so the start offset and the
/// strides decide.
pub(crate) fn layout_readable(layout: &Layout, elem_bytes: usize) -> bool {
    // (The last dim read element after element: callers check it, this keeps it true anyway.)
    let last_contiguous = layout.stride().last() == Some(&1) || layout.dims().last().is_some_and(|&d| d <= 1);
    last_contiguous && loadable((elem_bytes * layout.start_offset()) as u64, &strides_of(layout))
}

/// Strides of a contiguous `[B, len, heads, head_dim]` tensor (the kernels' output).
pub(crate) fn contiguous_strides(len: usize, heads: usize, head_dim: usize) -> SegattnStrides {
    SegattnStrides {
        batch: (len * heads * head_dim) as i64,
        row: (heads * head_dim) as i64,
        head: head_dim as i64,
    }
}

/// Everything of the parameters but the pointers and the mask: sizes, strides of q, k, v and of
/// the contiguous output `[B, Lq, H, D]`, dtype code (bf16 or f16) and scale.
pub(crate) fn base_params(
    shape: &AttentionShape,
    dtype: DType,
    scale: f32,
    strides: [SegattnStrides; 3],
) -> Result<SegattnFwdParams> {
    let AttentionShape {
        batch,
        q_len,
        kv_len,
        num_heads,
        num_kv_heads,
        head_dim,
    } = *shape;
    let Some(dtype) = dtype_code(dtype) else {
        invalid_arg!("q: the CUDA kernels support dtype bf16 or f16, got {dtype:?}");
    };
    to_i32(
        "rows x heads x head_dim",
        q_len.max(kv_len) * num_heads.max(num_kv_heads) * head_dim,
    )?;
    Ok(SegattnFwdParams {
        q_strides: strides[0],
        k_strides: strides[1],
        v_strides: strides[2],
        o_strides: contiguous_strides(q_len, num_heads, head_dim),
        batch: to_i32("batch", batch)?,
        q_len: to_i32("q_len", q_len)?,
        kv_len: to_i32("kv_len", kv_len)?,
        num_heads: to_i32("num_heads", num_heads)?,
        num_kv_heads: to_i32("num_kv_heads", num_kv_heads)?,
        head_dim: to_i32("head_dim", head_dim)?,
        dtype,
        scale,
        scale_log2: (f64::from(scale) * std::f64::consts::LOG2_E) as f32,
        ..Default::default()
    })
}

/// Where the kernels write a per-segment mass laid out by `plan` (`[B, Ho, Lo, Sk]` f32,
/// contiguous) at `mass`, with the reductions of `plan`.
pub(crate) fn mass_output(plan: &MassPlan, q_len: usize, mass: *mut f32) -> Result<SegattnMassOutput> {
    let (_, h_out, l_out, sk) = plan.out_dims(q_len);
    Ok(SegattnMassOutput {
        mass,
        batch_stride: (h_out * l_out * sk) as i64,
        head_stride: (l_out * sk) as i64,
        row_stride: sk as i64,
        num_segments: to_i32("key segments", sk)?,
        head_reduce: i32::from(plan.head_reduction != HeadReduction::None),
        query_reduce: i32::from(plan.query_reduction != QueryReduction::None),
    })
}

/// Whether the kernels add into the mass (a reduction: several rows or heads meet in one element,
/// or the two-pass algorithm): then it must start zeroed; otherwise every element is written.
pub(crate) fn mass_accumulates(plan: &MassPlan, two_pass: bool) -> bool {
    two_pass || plan.head_reduction != HeadReduction::None || plan.query_reduction != QueryReduction::None
}

/// The forward kernel's variants (entry points `segattn_fwd_*`, `segattn_fwd_mass_*`,
/// `segattn_fwd_rope_*`, `segattn_fwd_wide*` of kernels/fwd/fwd.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FwdVariant {
    /// Segment-masked attention.
    Plain,
    /// With the fused per-segment mass output (`params.mass`, at most 64 key segments).
    Mass,
    /// With PINE's in-loop query rotation (`params.rotation`).
    Rope,
    /// Segment-masked attention in blocks of 128 query rows, two 16-row tiles per warp
    /// (`segattn_fwd_wide_*`; no split-K).
    Wide,
    /// [`FwdVariant::Wide`] with key tiles of 64 at D = 128 (`segattn_fwd_wide64_*`,
    /// FlashAttention-2's 128 x 64 tile; plain attention's default at D = 128, see `FwdVariant::plain`).
    Wide64,
    /// [`FwdVariant::Wide64`] with the fused per-segment mass output, each row's sums in shared
    /// memory (`segattn_fwd_wide64_mass_*`; at most [`WIDE_MASS_MAX_SEGMENTS`] key segments, see
    /// `FwdVariant::with_mass`).
    WideMass,
    /// Plain attention on Hopper's warpgroup MMA (`segattn_fwd_hopper_*`, the sm_90a fatbin:
    /// compute capability 9.0 GPUs only): the 64-row kernel with S and O's products as wgmma, one
    /// warpgroup, D 64 / 128, split-K as the 64-row one. Plain attention's kernel on those GPUs
    /// (`FwdVariant::on_hopper`; `SEGATTN_FWD_HOPPER=0` opts out; bench/NOTES.md CUDA 34-35, 38).
    Hopper,
    /// [`FwdVariant::Hopper`] in blocks of 128 query rows, two warpgroups of 64 sharing each K and
    /// V tile (`segattn_fwd_hopper128_*`, 256 threads): only where `SEGATTN_FWD_WIDE=1` (or a
    /// test) forces wide blocks; slower than the 64-row one on an H200 (bench/NOTES.md CUDA 36, 38).
    HopperWide,
    /// [`FwdVariant::Hopper`] with the fused per-segment mass (`segattn_fwd_hopper_mass_*`, its
    /// sums in registers as [`FwdVariant::Mass`]'s, up to 64 key segments, no split-K): the fused
    /// mass on compute capability 9.0 GPUs, where plain attention runs on wgmma
    /// (`FwdVariant::on_hopper`; bench/NOTES.md CUDA 39).
    HopperMass,
    /// [`FwdVariant::Hopper`] with PINE's in-loop query rotation (`segattn_fwd_hopper_rope_*`: the
    /// turned query's A fragments in registers; a key tile across segments computes S once per
    /// piece): PINE's attention on compute capability 9.0 GPUs (bench/NOTES.md CUDA 40).
    HopperRope,
    /// The standalone per-segment mass on wgmma (`segattn_scores_hopper_*`,
    /// kernels/hopper/scores_hopper.cu): [`FwdVariant::HopperMass`] without V, O and the output,
    /// its sums as the mma.sync mass kernel's one pass (up to 64 key segments, no split-K): the
    /// one-pass `segment_scores` on compute capability 9.0 GPUs (bench/NOTES.md CUDA 42).
    HopperScores,
}

impl FwdVariant {
    /// The variant code of `segattn_emu_fwd_smem_bytes`.
    pub(crate) fn code(self) -> i32 {
        match self {
            Self::Plain => 0,
            Self::Rope => 1,
            Self::Mass => 2,
            Self::Wide => 3,
            Self::Wide64 => 4,
            Self::WideMass => 5,
            Self::Hopper => 6,
            Self::HopperWide => 7,
            Self::HopperMass => 8,
            Self::HopperRope => 9,
            Self::HopperScores => 10,
        }
    }

    /// Keys per key tile for `params.block_keys` (0: the entry point's own, unchecked).
    pub(crate) fn block_keys(self) -> i32 {
        match self {
            Self::Wide64
            | Self::WideMass
            | Self::Hopper
            | Self::HopperWide
            | Self::HopperMass
            | Self::HopperRope
            | Self::HopperScores => 64,
            _ => 0,
        }
    }

    /// Query rows per block (`params.block_rows`).
    pub(crate) fn block_rows(self) -> usize {
        match self {
            Self::Wide | Self::Wide64 | Self::WideMass | Self::HopperWide => 128,
            _ => 64,
        }
    }

    /// Threads per block (`FwdTraits::kThreads`): 4 warps, or the two warpgroups of
    /// [`FwdVariant::HopperWide`].
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn threads(self) -> u32 {
        match self {
            Self::HopperWide => 256,
            _ => 128,
        }
    }

    /// Whether this is a wgmma kernel (the sm_90a fatbin's, loaded on compute capability 9.0 GPUs only).
    pub(crate) fn is_wgmma(self) -> bool {
        matches!(
            self,
            Self::Hopper | Self::HopperWide | Self::HopperMass | Self::HopperRope | Self::HopperScores
        )
    }

    /// The wgmma kernel of the same block shape as the kernel `self`: the 64-row
    /// [`FwdVariant::Hopper`] for plain attention's 64-row kernel, the 128-row
    /// [`FwdVariant::HopperWide`] for the wide ones, [`FwdVariant::HopperMass`] for either fused
    /// mass kernel, [`FwdVariant::HopperRope`] for PINE's.
    pub(crate) fn wgmma_of(self) -> Self {
        match self {
            Self::Plain | Self::Hopper => Self::Hopper,
            Self::Wide | Self::Wide64 | Self::HopperWide => Self::HopperWide,
            Self::Mass | Self::WideMass | Self::HopperMass => Self::HopperMass,
            Self::Rope | Self::HopperRope => Self::HopperRope,
            Self::HopperScores => Self::HopperScores,
        }
    }

    /// The kernel for plain attention (no rotation, no fused mass) of `shape` (the launch's: rows
    /// as the kernel sees them) on a GPU of `sm_count` SMs. The wide kernel (FlashAttention-2's
    /// tile: each K and V fragment read from shared memory feeds two mma, the loop's per-tile costs
    /// shared by 128 rows) where all of these hold, else the 64-row one:
    /// - at least 128 query rows and no split-K;
    /// - at least [`WIDE_MIN_BLOCKS_PER_SM`] of its blocks per SM: with fewer, the last wave of
    ///   twice as long blocks leaves SMs idle (an H100, causal, 1,160 rows x 32 heads, 320 wide
    ///   blocks: the 64-row kernel 14% faster; 832 blocks: equal);
    /// - at D = 128 (128 x 64 tiles), any mask but short causal documents; at D = 64, a mask
    ///   without a causal pair. On an H100 the 128 x 64 kernel beat the 64-row one on causal
    ///   (+4-10%), full (+17-21%), prefix-LM and PINE masks (+2-17%) from 1k to 16k tokens and on
    ///   causal documents of 2k tokens (+4%), and lost on documents of 128 to 1k tokens (-1-10%: a
    ///   block of 128 rows sees a few key tiles, its fixed costs weigh); D = 64 has no 64-key
    ///   variant and keeps the H200's rule (its 32-key kind lost where the diagonal's partial
    ///   tiles weigh). bench/NOTES.md CUDA 10 and 25.
    ///
    /// `SEGATTN_FWD_WIDE=0` always takes the 64-row kernel, `=1` the wide one wherever it applies
    /// (any number of rows, blocks or mask; tests). `forced` (tests) takes precedence over
    /// `SEGATTN_FWD_WIDE`, which takes precedence over the rule.
    pub(crate) fn plain(
        shape: &AttentionShape,
        kv_splits: usize,
        mask: MaskSummary,
        sm_count: usize,
        forced: Option<bool>,
    ) -> Self {
        if plain_64_row_kernels_only(shape.head_dim) {
            return Self::Plain;
        }
        let rows = Self::Wide.block_rows();
        let blocks = shape.q_len.div_ceil(rows) * shape.num_heads * shape.batch;
        let by_rule = shape.q_len >= rows
            && blocks >= WIDE_MIN_BLOCKS_PER_SM * sm_count
            && if shape.head_dim == 128 {
                !mask.short_documents
            } else {
                !mask.causal
            };
        let wide = forced.or_else(wide_setting).unwrap_or(by_rule);
        if wide && kv_splits <= 1 {
            Self::Wide
        } else {
            Self::Plain
        }
    }

    /// The wide kernel with 64-key tiles at D = 128 ([`FwdVariant::Wide64`]) in place of
    /// [`FwdVariant::Wide`], unless `forced` says otherwise (tests) or `SEGATTN_FWD_WIDE_KEYS=32`
    /// asks for the 32-key tiles; every other variant as it is. The 64-key tiles were 7-15%
    /// faster on every mask on an H100 (bench/NOTES.md CUDA 25).
    pub(crate) fn with_wide_keys(self, head_dim: usize, forced: Option<bool>) -> Self {
        let keys64 = forced.unwrap_or_else(wide_keys_setting);
        if self == Self::Wide && head_dim == 128 && keys64 {
            Self::Wide64
        } else {
            self
        }
    }

    /// The kernel for attention with the fused mass of `num_segments` key segments inside the
    /// forward kernel (one pass, no split-K), where `self` is the kernel plain attention of the
    /// same shape and `mask` takes ([`FwdVariant::plain`], [`FwdVariant::with_wide_keys`]): its
    /// 128 x 64 kernel with the rows' sums in shared memory ([`FwdVariant::WideMass`]) when the sums
    /// leave room for two blocks per SM (at most [`WIDE_MASS_MAX_SEGMENTS`]) and no tile of 64 keys
    /// meets more than two key segments (segments of 64 keys and more: documents, PINE's), else the
    /// 64-row kernel with its on-chip accumulators ([`FwdVariant::Mass`], up to 64 segments, any
    /// lengths). So the fused mass extends the attention the user would get without it wherever
    /// it can ([`FwdVariant::fused_mass`] also takes the 128 x 64 kernel for documents of 513 to
    /// 1,024 tokens, which plain attention runs in the 64-row one).
    pub(crate) fn with_mass(self, num_segments: usize, mask: MaskSummary) -> Self {
        if self == Self::Wide64 && num_segments <= WIDE_MASS_MAX_SEGMENTS && mask.key_tiles_of_two_segments {
            Self::WideMass
        } else {
            Self::Mass
        }
    }

    /// The kernel plain attention takes: [`FwdVariant::plain`], then
    /// [`FwdVariant::with_wide_keys`] (`forced`: tests' and the emulator's overrides of each).
    pub(crate) fn plain_kernel(
        shape: &AttentionShape,
        kv_splits: usize,
        mask: MaskSummary,
        sm_count: usize,
        (forced, forced_keys64): (Option<bool>, Option<bool>),
    ) -> Self {
        Self::plain(shape, kv_splits, mask, sm_count, forced).with_wide_keys(shape.head_dim, forced_keys64)
    }

    /// `self` (plain attention's kernel, [`FwdVariant::plain_kernel`], the fused mass's,
    /// [`FwdVariant::fused_mass`], or PINE's) or, where the GPU has them (`hopper_loaded`: a compute
    /// capability 9.0 GPU), a wgmma kernel at D 64 / 128 in its place: for plain attention the
    /// 64-row [`FwdVariant::Hopper`], or the 128-row one where `forced_wide` (tests), else
    /// `SEGATTN_FWD_WIDE=1`, asks for wide blocks and `self` has them; for the fused mass
    /// [`FwdVariant::HopperMass`], for PINE's [`FwdVariant::HopperRope`]. On an H200 (bench/NOTES.md CUDA 38) the 64-row wgmma kernel beat the
    /// best mma.sync kernel on every D 128 shape (1.04-1.41x) and the 128-row wgmma kernel on all
    /// but one (even; two independent blocks per SM, each one's softmax under the other's
    /// products); at D 64 it won from 2k tokens on (1.03-1.15x) but lost on causal documents of
    /// 128 to 1,024 tokens (0.78-0.99x: a block sees one or two key tiles, and the smaller
    /// products do not pay for wgmma's fences and waits), which stay on mma.sync (`mask`'s
    /// `short_documents`). `SEGATTN_FWD_HOPPER=0` keeps every call on mma.sync, `=1` takes wgmma
    /// wherever it applies. `emulated`: the emulator's choice, which takes a wgmma kernel only
    /// where `SEGATTN_FWD_HOPPER=1` asks (it stands for an sm_80 card by default).
    pub(crate) fn on_hopper(
        self,
        head_dim: usize,
        mask: MaskSummary,
        hopper_loaded: bool,
        forced_wide: Option<bool>,
        emulated: bool,
    ) -> Self {
        if head_dim > 128 || !hopper_loaded || !wgmma_wanted(head_dim, mask, emulated) {
            return self;
        }
        match self.wgmma_of() {
            Self::HopperWide if forced_wide.or_else(wide_setting) != Some(true) => Self::Hopper,
            wgmma => wgmma,
        }
    }

    /// The kernel for attention with the fused mass of `num_segments` key segments inside the
    /// forward kernel: [`FwdVariant::with_mass`] of the plain kernel ([`FwdVariant::plain_kernel`],
    /// same arguments) chosen as if causal documents were short only up to
    /// [`SHORT_DOCUMENT_TOKENS_WITH_MASS`] tokens: the 128 x 64 kernel's sums in shared memory cost
    /// less than the 64-row kernel's accumulators, which moves the break-even.
    pub(crate) fn fused_mass(
        shape: &AttentionShape,
        kv_splits: usize,
        mask: MaskSummary,
        sm_count: usize,
        forced: (Option<bool>, Option<bool>),
        num_segments: usize,
    ) -> Self {
        let as_plain = MaskSummary {
            short_documents: mask.short_documents_with_mass,
            ..mask
        };
        Self::plain_kernel(shape, kv_splits, as_plain, sm_count, forced).with_mass(num_segments, mask)
    }
}

/// Most key segments of [`FwdVariant::WideMass`]: its fixed 100,016 bytes of shared memory, 128
/// rows x 29 f32 sums (an odd row stride) and the second row tile's 16-float skew are 114,928
/// bytes, so two blocks still fit an sm_90 SM (228 KiB, 1 KiB reserved per block), as for the
/// plain 128 x 64 kernel.
pub const WIDE_MASS_MAX_SEGMENTS: usize = 29;

/// `SEGATTN_FWD_WIDE_KEYS`: "32" takes the wide kernel's 32-key tiles at D = 128; anything else
/// (or unset) the 64-key tiles. Read once.
fn wide_keys_setting() -> bool {
    static FLAG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FLAG.get_or_init(|| std::env::var_os("SEGATTN_FWD_WIDE_KEYS").is_none_or(|v| v != "32"))
}

/// `SEGATTN_FWD_HOPPER`: `Some(false)` for "0" (plain attention on the mma.sync kernels even on
/// a GPU with the wgmma ones), `Some(true)` for "1" (the wgmma kernels, an error where one did not
/// load on a compute capability 9.0 GPU; the emulator's too), else `None` (the default: the wgmma
/// kernels where loaded). Read once.
pub(crate) fn hopper_setting() -> Option<bool> {
    static FLAG: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    *FLAG.get_or_init(|| match std::env::var("SEGATTN_FWD_HOPPER").ok().as_deref() {
        Some("0") => Some(false),
        Some("1") => Some(true),
        _ => None,
    })
}

/// Whether a call at `head_dim` under a mask of `mask` takes a wgmma kernel where the GPU has them
/// (`FwdVariant::on_hopper`'s rule): `SEGATTN_FWD_HOPPER` where set, else yes but for D 64's short
/// causal documents, and never under the emulator (`emulated`) unless asked.
fn wgmma_wanted(head_dim: usize, mask: MaskSummary, emulated: bool) -> bool {
    let mma_sync_wins = head_dim == 64 && mask.short_documents;
    match hopper_setting() {
        Some(setting) => setting,
        None => !emulated && !mma_sync_wins,
    }
}

/// Whether `segment_scores` runs on [`FwdVariant::HopperScores`] (the standalone mass on wgmma):
/// the one-pass algorithm (`two_pass` false) at D 64 / 128 where the GPU has the wgmma kernels
/// (`hopper_loaded`) and [`FwdVariant::on_hopper`]'s rule takes them; else the mma.sync mass
/// kernel. Predicted 0.5-0.6x the wgmma attention's time against 0.8-0.9x for the mma.sync mass
/// kernel on an H200 (bench/NOTES.md CUDA 42; not yet measured).
pub(crate) fn scores_on_hopper(
    head_dim: usize,
    mask: MaskSummary,
    two_pass: bool,
    hopper_loaded: bool,
    emulated: bool,
) -> bool {
    !two_pass && head_dim <= 128 && hopper_loaded && wgmma_wanted(head_dim, mask, emulated)
}

/// `SEGATTN_FWD_WIDE`: `Some(false)` for "0", `Some(true)` for "1", else `None` (the rule decides).
fn wide_setting() -> Option<bool> {
    match std::env::var("SEGATTN_FWD_WIDE").ok().as_deref() {
        Some("0") => Some(false),
        Some("1") => Some(true),
        _ => None,
    }
}

/// Query rows per block of the mass kernel (`params.base.block_rows`): 128 (its wide kernel) from
/// 128 query rows on for masks without a causal pair, else 64 (the forward kernel's rule at D = 64:
/// the mass kernel's wide variant has only 32-key tiles, and was not measured against the 64-row
/// one on causal masks); `SEGATTN_FWD_WIDE` and `wide` force the choice as for the forward kernel.
/// D 256 has the 64-row kernel only.
pub(crate) fn mass_block_rows(q_len: usize, causal: bool, wide: Option<bool>, head_dim: usize) -> usize {
    let wide_rows = FwdVariant::Wide.block_rows();
    if !plain_64_row_kernels_only(head_dim) && wide.or_else(wide_setting).unwrap_or(q_len >= wide_rows && !causal) {
        wide_rows
    } else {
        FwdVariant::Plain.block_rows()
    }
}

/// Keys per tile of the mass kernel (`params.base.block_keys`) with `block_rows` query rows per
/// block ([`mass_block_rows`]): 64 for the wide kernel at D = 128 when `forced` (tests) or
/// `SEGATTN_SCORES_WIDE_KEYS=64` asks for them (`segattn_scores_wide64_*`, the forward kernel's
/// 128 x 64 tile; opt-in: no gain over the defaults on an H200, bench/NOTES.md CUDA 32), else 0
/// (the entry point's own: 32 for the wide kernel, 64 for the 64-row one).
pub(crate) fn mass_block_keys(block_rows: usize, head_dim: usize, forced: Option<bool>) -> i32 {
    let keys64 = forced.unwrap_or_else(|| std::env::var_os("SEGATTN_SCORES_WIDE_KEYS").is_some_and(|v| v == "64"));
    if block_rows == FwdVariant::Wide.block_rows() && head_dim == 128 && keys64 {
        64
    } else {
        0
    }
}

/// Wide forward blocks per SM below which the 64-row kernel is taken (four waves of two blocks
/// per SM; see [`FwdVariant::plain`]).
pub(crate) const WIDE_MIN_BLOCKS_PER_SM: usize = 8;

/// The mean length up to which causal documents count as short (see [`MaskSummary`]): on an H100
/// the 64-row kernel was faster on documents of 128 to 1,024 tokens, the wide one on 2,048.
pub(crate) const SHORT_DOCUMENT_TOKENS: f64 = 1024.0;

/// [`SHORT_DOCUMENT_TOKENS`] for an attention with the fused mass ([`FwdVariant::fused_mass`]): on
/// an H200, 8 causal documents of 1,024 tokens (L 8k, B 2) took 5-10% less time with the fused
/// mass in the 128 x 64 kernel than in the 64-row one in the same calls (H 16 / 16: 0.376-0.391
/// against 0.397-0.415 ms; 32 / 8: 0.684-0.696 against 0.745-0.769), where plain attention alone
/// was even or 4% faster in it (bench/NOTES.md CUDA 32). Shorter documents are not measured: the
/// threshold is the plain rule's halved.
pub(crate) const SHORT_DOCUMENT_TOKENS_WITH_MASS: f64 = 512.0;

/// What the choice of the plain forward kernel ([`FwdVariant::plain`]) needs to know of a mask.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct MaskSummary {
    /// Some pair of segments may be causal (partial tiles along the diagonal).
    pub causal: bool,
    /// Causal documents blocked from each other (no pair table), at least two a row, their key
    /// segments at most [`SHORT_DOCUMENT_TOKENS`] long on average: each block of query rows sees a
    /// few key tiles.
    pub short_documents: bool,
    /// The same, at most [`SHORT_DOCUMENT_TOKENS_WITH_MASS`] long on average.
    pub short_documents_with_mass: bool,
    /// Every aligned tile of 64 keys meets at most two key segments ([`FwdVariant::WideMass`]
    /// sums a tile's probabilities on either side of one boundary).
    pub key_tiles_of_two_segments: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SegmentMask;
    use candle_core::Device;

    /// An H100's SM count.
    const SMS: usize = 132;

    fn shape(len: usize, heads: usize, d: usize) -> AttentionShape {
        AttentionShape {
            batch: 1,
            q_len: len,
            kv_len: len,
            num_heads: heads,
            num_kv_heads: heads,
            head_dim: d,
        }
    }

    /// The plain forward kernel the rule (no forcing) takes for `mask` at `len` tokens x 32 heads
    /// (enough blocks on an H100 from 4,224 tokens on) and head dim `d`.
    fn chosen(mask: &SegmentMask, len: usize, d: usize) -> FwdVariant {
        let host = mask.host_metadata(1, len, len).unwrap();
        FwdVariant::plain_kernel(&shape(len, 32, d), 1, host.summary(), SMS, (None, None))
    }

    #[test]
    fn wgmma_kernel_only_where_loaded_and_plain() {
        let any = MaskSummary::default();
        let short_documents = MaskSummary {
            causal: true,
            short_documents: true,
            ..any
        };
        // Whatever SEGATTN_FWD_HOPPER says: never where the GPU has no wgmma kernel, never at
        // D 256.
        for emulated in [false, true] {
            for v in [
                FwdVariant::Plain,
                FwdVariant::Wide,
                FwdVariant::Wide64,
                FwdVariant::Mass,
                FwdVariant::Rope,
            ] {
                assert_eq!(v.on_hopper(128, any, false, None, emulated), v);
                assert_eq!(v.on_hopper(256, any, true, None, emulated), v);
            }
        }
        // On a GPU with them, by default (SEGATTN_FWD_HOPPER unset or "1"): the 64-row wgmma
        // kernel for any plain one but D 64's short documents (unless "1"), the 128-row one only
        // where wide blocks are forced. The emulator takes them only where SEGATTN_FWD_HOPPER=1
        // asks.
        let setting = std::env::var("SEGATTN_FWD_HOPPER").ok();
        for emulated in [false, true] {
            let on = |head_dim: usize, mask: MaskSummary| match setting.as_deref() {
                Some("0") => false,
                Some("1") => true,
                _ => !emulated && (head_dim != 64 || !mask.short_documents),
            };
            for v in [FwdVariant::Plain, FwdVariant::Wide, FwdVariant::Wide64] {
                for (head_dim, mask) in [(128, any), (128, short_documents), (64, any), (64, short_documents)] {
                    let want = if on(head_dim, mask) { FwdVariant::Hopper } else { v };
                    assert_eq!(v.on_hopper(head_dim, mask, true, Some(false), emulated), want);
                }
            }
            let want = |v: FwdVariant, w: FwdVariant| if on(128, any) { w } else { v };
            assert_eq!(
                FwdVariant::Wide64.on_hopper(128, any, true, Some(true), emulated),
                want(FwdVariant::Wide64, FwdVariant::HopperWide)
            );
            assert_eq!(
                FwdVariant::Wide.on_hopper(64, any, true, Some(true), emulated),
                want(FwdVariant::Wide, FwdVariant::HopperWide)
            );
            // Forced wide, but a 64-row kernel (split-K): the 64-row wgmma kernel.
            assert_eq!(
                FwdVariant::Plain.on_hopper(128, any, true, Some(true), emulated),
                want(FwdVariant::Plain, FwdVariant::Hopper)
            );
            // Either fused mass kernel: the wgmma one (one warpgroup, its sums in registers); PINE's
            // likewise.
            for (v, w) in [
                (FwdVariant::Mass, FwdVariant::HopperMass),
                (FwdVariant::WideMass, FwdVariant::HopperMass),
                (FwdVariant::Rope, FwdVariant::HopperRope),
            ] {
                for forced in [None, Some(false), Some(true)] {
                    assert_eq!(v.on_hopper(128, any, true, forced, emulated), want(v, w));
                    assert_eq!(v.on_hopper(64, any, true, forced, emulated), want(v, w));
                }
            }
        }
        assert_eq!(FwdVariant::Hopper.block_rows(), 64);
        assert_eq!(FwdVariant::Hopper.block_keys(), 64);
        assert_eq!(FwdVariant::Hopper.threads(), 128);
        assert_eq!(FwdVariant::HopperWide.block_rows(), 128);
        assert_eq!(FwdVariant::HopperWide.block_keys(), 64);
        assert_eq!(FwdVariant::HopperWide.threads(), 256);
        assert_eq!(FwdVariant::HopperMass.block_rows(), 64);
        assert_eq!(FwdVariant::HopperMass.block_keys(), 64);
        assert_eq!(FwdVariant::HopperMass.threads(), 128);
        assert!(FwdVariant::HopperMass.is_wgmma());
        assert_eq!(FwdVariant::HopperRope.block_rows(), 64);
        assert_eq!(FwdVariant::HopperRope.block_keys(), 64);
        assert_eq!(FwdVariant::HopperRope.threads(), 128);
        assert!(FwdVariant::HopperRope.is_wgmma());
        assert_eq!(FwdVariant::HopperScores.block_rows(), 64);
        assert_eq!(FwdVariant::HopperScores.block_keys(), 64);
        assert_eq!(FwdVariant::HopperScores.threads(), 128);
        assert!(FwdVariant::HopperScores.is_wgmma());
    }

    #[test]
    fn standalone_mass_on_wgmma_by_the_attention_rule() {
        let any = MaskSummary::default();
        let short_documents = MaskSummary {
            causal: true,
            short_documents: true,
            ..any
        };
        let setting = std::env::var("SEGATTN_FWD_HOPPER").ok();
        for emulated in [false, true] {
            for mask in [any, short_documents] {
                for head_dim in [64, 128, 256] {
                    // Whatever the setting: never two passes, never without the kernels, never D 256.
                    assert!(!scores_on_hopper(head_dim, mask, true, true, emulated));
                    assert!(!scores_on_hopper(head_dim, mask, false, false, emulated));
                    let want = head_dim <= 128
                        && match setting.as_deref() {
                            Some("0") => false,
                            Some("1") => true,
                            _ => !emulated && (head_dim != 64 || !mask.short_documents),
                        };
                    assert_eq!(
                        scores_on_hopper(head_dim, mask, false, true, emulated),
                        want,
                        "D {head_dim} {mask:?} emulated {emulated}"
                    );
                    // The same choice as plain attention's kernel.
                    if head_dim <= 128 {
                        let attention = FwdVariant::Plain.on_hopper(head_dim, mask, true, Some(false), emulated);
                        assert_eq!(attention == FwdVariant::Hopper, want);
                    }
                }
            }
        }
    }

    #[test]
    fn plain_kernel_rule() {
        // The rule only: skipped where the environment forces a kernel.
        if std::env::var_os("SEGATTN_FWD_WIDE").is_some() || std::env::var_os("SEGATTN_FWD_WIDE_KEYS").is_some() {
            return;
        }
        let cpu = &Device::Cpu;
        let n = 8192;
        let causal = SegmentMask::causal(n, cpu).unwrap();
        let full = SegmentMask::full(n, cpu).unwrap();
        let short_docs = SegmentMask::documents(&[[256; 32]], cpu).unwrap();
        let long_docs = SegmentMask::documents(&[[2048; 4]], cpu).unwrap();
        let bidirectional_docs = SegmentMask::documents_bidirectional(&[[256; 32]], cpu).unwrap();
        let pine = SegmentMask::pine(64, &[800; 10], 128, cpu).unwrap();
        // D = 128: the 128 x 64 wide kernel but for short causal documents.
        assert_eq!(chosen(&causal, n, 128), FwdVariant::Wide64);
        assert_eq!(chosen(&full, n, 128), FwdVariant::Wide64);
        assert_eq!(chosen(&long_docs, n, 128), FwdVariant::Wide64);
        assert_eq!(chosen(&bidirectional_docs, n, 128), FwdVariant::Wide64);
        assert_eq!(chosen(&pine, n, 128), FwdVariant::Wide64);
        assert_eq!(chosen(&short_docs, n, 128), FwdVariant::Plain);
        // D = 64: the wide kernel only without a causal pair.
        assert_eq!(chosen(&full, n, 64), FwdVariant::Wide);
        assert_eq!(chosen(&causal, n, 64), FwdVariant::Plain);
        assert_eq!(chosen(&pine, n, 64), FwdVariant::Plain);
        // Too few wide blocks (1,160 rows x 32 heads: 320), fewer than 128 query rows, or
        // split-K: the 64-row kernel.
        let judge = SegmentMask::causal(1160, cpu).unwrap();
        assert_eq!(chosen(&judge, 1160, 128), FwdVariant::Plain);
        let small = SegmentMask::full(100, cpu).unwrap();
        let host = small.host_metadata(1, 100, 100).unwrap();
        assert_eq!(
            FwdVariant::plain(&shape(100, 4096, 128), 1, host.summary(), SMS, None),
            FwdVariant::Plain
        );
        let host = full.host_metadata(1, n, n).unwrap();
        assert_eq!(
            FwdVariant::plain(&shape(n, 32, 128), 4, host.summary(), SMS, None),
            FwdVariant::Plain
        );
        // Forcing wins over the rule.
        assert_eq!(
            FwdVariant::plain(&shape(n, 32, 128), 1, host.summary(), SMS, Some(false)),
            FwdVariant::Plain
        );
        let judge_host = judge.host_metadata(1, 1160, 1160).unwrap();
        assert_eq!(
            FwdVariant::plain(&shape(1160, 32, 128), 1, judge_host.summary(), SMS, Some(true)),
            FwdVariant::Wide
        );
        assert_eq!(FwdVariant::Wide.with_wide_keys(128, Some(false)), FwdVariant::Wide);
    }

    #[test]
    fn fused_mass_kernel_rule() {
        // The rule only: skipped where the environment forces a kernel.
        if std::env::var_os("SEGATTN_FWD_WIDE").is_some() || std::env::var_os("SEGATTN_FWD_WIDE_KEYS").is_some() {
            return;
        }
        let cpu = &Device::Cpu;
        let n = 8192;
        let with_mass = |mask: &SegmentMask, d: usize, sk: usize| {
            let summary = mask.host_metadata(1, n, n).unwrap().summary();
            FwdVariant::fused_mass(&shape(n, 32, d), 1, summary, SMS, (None, None), sk)
        };
        // Where plain attention takes the 128 x 64 kernel, the fused mass extends it...
        let pine = SegmentMask::pine(64, &[800; 10], 128, cpu).unwrap();
        let long_docs = SegmentMask::documents(&[[2048; 4]], cpu).unwrap();
        assert_eq!(with_mass(&pine, 128, 12), FwdVariant::WideMass);
        assert_eq!(with_mass(&long_docs, 128, 4), FwdVariant::WideMass);
        assert_eq!(with_mass(&long_docs, 128, WIDE_MASS_MAX_SEGMENTS), FwdVariant::WideMass);
        // ... but for more segments than its shared memory holds at two blocks per SM, and
        // wherever plain attention takes another kernel (short documents, D = 64, forced).
        assert_eq!(with_mass(&long_docs, 128, WIDE_MASS_MAX_SEGMENTS + 1), FwdVariant::Mass);
        let short_docs = SegmentMask::documents(&[[256; 32]], cpu).unwrap();
        assert_eq!(with_mass(&short_docs, 128, 32), FwdVariant::Mass);
        // Documents of 1,024 tokens: plain attention takes the 64-row kernel, the fused mass the
        // 128 x 64 one (its threshold is lower).
        let docs_1k = SegmentMask::documents(&[[1024; 8]], cpu).unwrap();
        assert_eq!(chosen(&docs_1k, n, 128), FwdVariant::Plain);
        assert_eq!(with_mass(&docs_1k, 128, 8), FwdVariant::WideMass);
        assert_eq!(with_mass(&pine, 64, 12), FwdVariant::Mass);
        let two = MaskSummary {
            key_tiles_of_two_segments: true,
            ..MaskSummary::default()
        };
        assert_eq!(FwdVariant::Wide.with_mass(12, two), FwdVariant::Mass);
        assert_eq!(FwdVariant::Plain.with_mass(12, two), FwdVariant::Mass);
        assert_eq!(FwdVariant::Wide64.with_mass(12, two), FwdVariant::WideMass);
        // A tile of 64 keys across three segments (one of 32 keys): the 64-row kernel.
        let short_segment = SegmentMask::pine(16, &[32, 4008, 4008], 128, cpu).unwrap();
        assert_eq!(chosen(&short_segment, n, 128), FwdVariant::Wide64);
        assert_eq!(with_mass(&short_segment, 128, 5), FwdVariant::Mass);
    }

    /// Views the kernels' 16-byte loads cannot read are copied, packed from offset 0; the others
    /// are taken as they are.
    #[test]
    fn kernel_readable_copies_only_what_it_must() -> Result<()> {
        let cpu = &Device::Cpu;
        let base = Tensor::arange(0f32, 2.0 * 6.0 * 2.0 * 16.0 + 32.0, cpu)?.to_dtype(DType::BF16)?;
        let n = 2 * 6 * 2 * 16;
        let aligned = base.narrow(0, 16, n)?.reshape((2, 6, 2, 16))?; // offset 16 elements: 32 bytes
        let odd = base.narrow(0, 1, n)?.reshape((2, 6, 2, 16))?; // 2 bytes past an aligned start
        let last_strided = base.narrow(0, 0, n)?.reshape((2, 6, 16, 2))?.transpose(2, 3)?;
        assert!(readable_in_place(&aligned));
        let same = kernel_readable(&aligned)?;
        assert_eq!(same.layout().start_offset(), 16, "an aligned view is not copied");
        for (name, view) in [("odd offset", odd), ("strided last dim", last_strided)] {
            assert!(!readable_in_place(&view), "{name}");
            let copy = kernel_readable(&view)?;
            assert!(readable_in_place(&copy) && copy.layout().start_offset() == 0, "{name}");
            let diff = (copy.to_dtype(DType::F32)? - view.to_dtype(DType::F32)?)?
                .abs()?
                .max_all()?;
            assert_eq!(diff.to_scalar::<f32>()?, 0.0, "{name}");
        }
        Ok(())
    }

    /// The mass kernel's 64-key tiles: the wide kernel at D = 128 only, when asked for.
    #[test]
    fn mass_kernel_keys() {
        assert_eq!(mass_block_keys(128, 128, Some(true)), 64);
        assert_eq!(mass_block_keys(128, 128, Some(false)), 0);
        assert_eq!(mass_block_keys(64, 128, Some(true)), 0);
        assert_eq!(mass_block_keys(128, 64, Some(true)), 0);
        assert_eq!(mass_block_keys(64, 256, Some(true)), 0);
    }

    /// [`WIDE_MASS_MAX_SEGMENTS`] against the kernel's traits: two blocks per sm_90 SM (233,472
    /// bytes of shared memory, 1,024 reserved per block) at that many segments, not at the next
    /// odd stride.
    #[test]
    fn wide_mass_segments_fit_two_blocks_per_sm() {
        const SM90_SMEM_PER_SM: usize = 233_472;
        let per_block = |sk| crate::emulated::fwd_mass_rows_smem_bytes(DType::BF16, 128, sk).unwrap() + 1024;
        assert!(2 * per_block(WIDE_MASS_MAX_SEGMENTS) <= SM90_SMEM_PER_SM);
        assert!(2 * per_block(WIDE_MASS_MAX_SEGMENTS + 2) > SM90_SMEM_PER_SM);
        let fixed = crate::emulated::fwd_smem_bytes(DType::BF16, 128, FwdVariant::WideMass).unwrap();
        assert_eq!(
            fixed,
            crate::emulated::fwd_smem_bytes(DType::BF16, 128, FwdVariant::Wide64).unwrap()
        );
        // One row of stride 1 per query row, and the second row tile's 16-float skew.
        assert_eq!(per_block(0) - 1024, fixed.div_ceil(16) * 16 + 4 * (128 + 16));
    }
}
