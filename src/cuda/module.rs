//! The embedded fatbin, loaded once per CUDA context, and its forward kernels.
//!
//! `build/nvcc.rs` compiles the production kernels into `$OUT_DIR/segattn.fatbin` (sm_80 and
//! sm_90 SASS plus compute_80 PTX); it is embedded here and loaded with `cuModuleLoadData` the
//! first time a device is used. The cache is keyed by (device ordinal, CUcontext): candle's
//! `Device::new_cuda(i)` retains the primary context of GPU `i`, so every candle device of one GPU
//! shares one module however many `CudaDevice`s are created, and the cached module keeps its
//! context alive, so a key is never reused for another context.
//!
//! At load time every forward kernel is looked up, checked (block size, static + dynamic shared
//! memory against the device's opt-in limit) and its dynamic shared memory limit raised through
//! `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` when it needs more than the 48 KiB default.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use candle_core::cuda_backend::cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::{DType, Result};

use super::driver_err;
use crate::kernel_params::{FwdVariant, MaskSummary};
use crate::validate::AttentionShape;

/// The production kernels, compiled by nvcc at build time (see build/nvcc.rs).
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/segattn.fatbin"));

/// Query rows per block of the 64-row forward kernels (`FwdTraits::kBlockM`; the wide ones:
/// [`FwdVariant::block_rows`]).
pub(crate) const FWD_BLOCK_M: usize = 64;
/// Keys per tile of the forward kernel (`FwdTraits::kBlockN`).
pub(crate) const FWD_BLOCK_N: usize = 64;
/// Dynamic shared memory a kernel may use without opting in.
const DEFAULT_DYNAMIC_SMEM: usize = 48 * 1024;

/// One forward entry point, ready to launch.
pub(crate) struct FwdKernel {
    pub name: &'static str,
    pub func: CudaFunction,
    /// Dynamic shared memory per block (the kernel traits' `kSmemBytes`; a wide mass launch adds its
    /// rows' sums, `launch::wide_mass_smem_bytes`).
    pub smem_bytes: u32,
    /// Query rows per block (`kBlockM`: the grid's x and `params.block_rows`).
    pub block_rows: usize,
    /// `params.block_keys` (the entry's key tile, checked by the kernel; 0: unchecked).
    pub block_keys: i32,
    /// Threads per block (`FwdTraits::kThreads`: [`FwdVariant::threads`]).
    pub threads: u32,
    /// [`FwdVariant::WideMass`]: the most key segments whose rows' sums fit this device's shared
    /// memory next to the fixed layout (up to `kernel_params::WIDE_MASS_MAX_SEGMENTS`; GPUs with
    /// 99 KiB a block, sm_86 / sm_89, hold none: the 64-row variant runs there); 0 otherwise.
    pub mass_segments: usize,
}

/// The loaded module of one context: the forward kernels by (dtype, head dim, variant).
pub(crate) struct Kernels {
    _module: Arc<CudaModule>,
    /// The sm_90a fatbin's module (compute capability 9.0 GPUs), whose forward kernels are in `fwd`.
    _hopper_module: Option<Arc<CudaModule>>,
    /// The context the module is loaded in (bound before function attributes are set).
    ctx: Arc<CudaContext>,
    fwd: Vec<((DType, usize, FwdVariant), FwdKernel)>,
    /// The forward entry points this device cannot run, and why (their shared memory).
    unavailable: Vec<((DType, usize, FwdVariant), String)>,
    /// The other entry points (mass, PINE), looked up on first use and kept.
    others: Mutex<Vec<(&'static str, CudaFunction)>>,
    /// Streaming multiprocessors of the device (the split-K heuristic).
    pub sm_count: usize,
}

impl Kernels {
    /// The loaded module.
    pub fn module(&self) -> &Arc<CudaModule> {
        &self._module
    }

    /// Entry point `name` of the fatbin (the mass and PINE kernels), looked up once per context.
    pub fn function(&self, name: &'static str) -> Result<CudaFunction> {
        self.function_with_smem(name, 0)
    }

    /// [`Kernels::function`] for a kernel that takes `smem` bytes of dynamic shared memory (a
    /// constant of its traits): above the 48 KiB default, the limit is raised once, on lookup.
    pub fn function_with_smem(&self, name: &'static str, smem: usize) -> Result<CudaFunction> {
        let mut others = self
            .others
            .lock()
            .map_err(|_| candle_core::Error::Msg("segattn: CUDA function cache poisoned by a panic".into()))?;
        if let Some((_, f)) = others.iter().find(|(n, _)| *n == name) {
            return Ok(f.clone());
        }
        let f = self.module().load_function(name).map_err(|e| {
            driver_err(
                format!("kernel {name} is not in the embedded fatbin (kernels/production.txt lists its file?)"),
                e,
            )
        })?;
        raise_dynamic_smem(&self.ctx, &f, name, smem)?;
        others.push((name, f.clone()));
        Ok(f)
    }

    /// The forward kernel `variant` for `dtype` (bf16 / f16) and `head_dim` (64 / 128; 256 plain
    /// and PINE's), if this device runs it.
    pub fn fwd(&self, dtype: DType, head_dim: usize, variant: FwdVariant) -> Option<&FwdKernel> {
        self.fwd
            .iter()
            .find(|((d, h, v), _)| *d == dtype && *h == head_dim && *v == variant)
            .map(|(_, k)| k)
    }

    /// The kernel plain attention of `shape` (as the launch sees it: `kv_splits` slices, the mask
    /// `summary`) takes on this GPU: [`FwdVariant::plain_kernel`]'s rule for its SMs, then
    /// [`Kernels::on_this_gpu`].
    pub fn plain_variant(
        &self,
        dtype: DType,
        shape: &AttentionShape,
        kv_splits: usize,
        summary: MaskSummary,
    ) -> Result<FwdVariant> {
        let variant = FwdVariant::plain_kernel(shape, kv_splits, summary, self.sm_count, (None, None));
        self.on_this_gpu(dtype, shape.head_dim, summary, variant)
    }

    /// `variant` (plain attention's, the fused mass's or PINE's mma.sync kernel for a mask of `summary`)
    /// or, on a compute capability 9.0 GPU, its wgmma kernel ([`FwdVariant::on_hopper`];
    /// `SEGATTN_FWD_HOPPER=0` opts out). Where the wgmma kernel did not load, the mma.sync one, or
    /// an error where `SEGATTN_FWD_HOPPER=1` asks for the wgmma kernels.
    pub fn on_this_gpu(
        &self,
        dtype: DType,
        head_dim: usize,
        summary: MaskSummary,
        variant: FwdVariant,
    ) -> Result<FwdVariant> {
        let wanted = variant.on_hopper(head_dim, summary, true, None, false);
        if wanted == variant {
            return Ok(variant);
        }
        Ok(self.wgmma_kernel(dtype, head_dim, wanted)?.map_or(variant, |_| wanted))
    }

    /// The standalone mass's wgmma kernel ([`FwdVariant::HopperScores`]) where
    /// `kernel_params::scores_on_hopper` takes it on this GPU (`two_pass`: the call's algorithm);
    /// `None`: the mma.sync mass kernel (not a compute capability 9.0 GPU, the rule, or a failed
    /// load, which is an error where `SEGATTN_FWD_HOPPER=1` asks for the wgmma kernels).
    pub fn standalone_mass_wgmma(
        &self,
        dtype: DType,
        head_dim: usize,
        summary: MaskSummary,
        two_pass: bool,
    ) -> Result<Option<&FwdKernel>> {
        if !crate::kernel_params::scores_on_hopper(head_dim, summary, two_pass, true, false) {
            return Ok(None);
        }
        self.wgmma_kernel(dtype, head_dim, FwdVariant::HopperScores)
    }

    /// The wgmma kernel `wanted` where it loaded; `None` where it did not (not a compute capability
    /// 9.0 GPU, or its load failed: the caller takes the mma.sync kernel), but an error for a failed
    /// load where `SEGATTN_FWD_HOPPER=1` asks for the wgmma kernels.
    fn wgmma_kernel(&self, dtype: DType, head_dim: usize, wanted: FwdVariant) -> Result<Option<&FwdKernel>> {
        if let Some(k) = self.fwd(dtype, head_dim, wanted) {
            return Ok(Some(k));
        }
        let key = (dtype, head_dim, wanted);
        match self.unavailable.iter().find(|(k, _)| *k == key) {
            Some((_, why)) if crate::kernel_params::hopper_setting() == Some(true) => Err(candle_core::Error::Msg(
                format!("SEGATTN_FWD_HOPPER=1: the wgmma kernel {wanted:?} for {dtype:?} D = {head_dim} did not load: {why}"),
            )
            .bt()),
            _ => Ok(None),
        }
    }

    /// [`Kernels::fwd`], or an error saying why there is none.
    pub fn fwd_or_err(&self, dtype: DType, head_dim: usize, variant: FwdVariant) -> Result<&FwdKernel> {
        if let Some(k) = self.fwd(dtype, head_dim, variant) {
            return Ok(k);
        }
        let key = (dtype, head_dim, variant);
        match self.unavailable.iter().find(|(k, _)| *k == key) {
            Some((_, why)) => Err(candle_core::Error::Msg(why.clone()).bt()),
            None => Err(candle_core::Error::Msg(format!(
                "segattn: internal error: no CUDA kernel for {dtype:?} D = {head_dim} ({variant:?})"
            ))
            .bt()),
        }
    }
}

/// Every forward entry point of kernels/hopper/fwd_hopper.cu (the sm_90a fatbin).
const HOPPER_FWD_ENTRIES: [(&str, DType, usize, FwdVariant); 20] = [
    ("segattn_fwd_hopper_bf16_d64", DType::BF16, 64, FwdVariant::Hopper),
    ("segattn_fwd_hopper_bf16_d128", DType::BF16, 128, FwdVariant::Hopper),
    ("segattn_fwd_hopper_f16_d64", DType::F16, 64, FwdVariant::Hopper),
    ("segattn_fwd_hopper_f16_d128", DType::F16, 128, FwdVariant::Hopper),
    (
        "segattn_fwd_hopper128_bf16_d64",
        DType::BF16,
        64,
        FwdVariant::HopperWide,
    ),
    (
        "segattn_fwd_hopper128_bf16_d128",
        DType::BF16,
        128,
        FwdVariant::HopperWide,
    ),
    ("segattn_fwd_hopper128_f16_d64", DType::F16, 64, FwdVariant::HopperWide),
    (
        "segattn_fwd_hopper128_f16_d128",
        DType::F16,
        128,
        FwdVariant::HopperWide,
    ),
    (
        "segattn_fwd_hopper_mass_bf16_d64",
        DType::BF16,
        64,
        FwdVariant::HopperMass,
    ),
    (
        "segattn_fwd_hopper_mass_bf16_d128",
        DType::BF16,
        128,
        FwdVariant::HopperMass,
    ),
    (
        "segattn_fwd_hopper_mass_f16_d64",
        DType::F16,
        64,
        FwdVariant::HopperMass,
    ),
    (
        "segattn_fwd_hopper_mass_f16_d128",
        DType::F16,
        128,
        FwdVariant::HopperMass,
    ),
    (
        "segattn_fwd_hopper_rope_bf16_d64",
        DType::BF16,
        64,
        FwdVariant::HopperRope,
    ),
    (
        "segattn_fwd_hopper_rope_bf16_d128",
        DType::BF16,
        128,
        FwdVariant::HopperRope,
    ),
    (
        "segattn_fwd_hopper_rope_f16_d64",
        DType::F16,
        64,
        FwdVariant::HopperRope,
    ),
    (
        "segattn_fwd_hopper_rope_f16_d128",
        DType::F16,
        128,
        FwdVariant::HopperRope,
    ),
    // The standalone mass (kernels/hopper/scores_hopper.cu): forward-kernel parameters, no V.
    (
        "segattn_scores_hopper_bf16_d64",
        DType::BF16,
        64,
        FwdVariant::HopperScores,
    ),
    (
        "segattn_scores_hopper_bf16_d128",
        DType::BF16,
        128,
        FwdVariant::HopperScores,
    ),
    (
        "segattn_scores_hopper_f16_d64",
        DType::F16,
        64,
        FwdVariant::HopperScores,
    ),
    (
        "segattn_scores_hopper_f16_d128",
        DType::F16,
        128,
        FwdVariant::HopperScores,
    ),
];

/// Every forward entry point of kernels/fwd/fwd.cu: (name, dtype, head dim, variant).
const FWD_ENTRIES: [(&str, DType, usize, FwdVariant); 24] = [
    ("segattn_fwd_bf16_d64", DType::BF16, 64, FwdVariant::Plain),
    ("segattn_fwd_bf16_d128", DType::BF16, 128, FwdVariant::Plain),
    ("segattn_fwd_f16_d64", DType::F16, 64, FwdVariant::Plain),
    ("segattn_fwd_f16_d128", DType::F16, 128, FwdVariant::Plain),
    ("segattn_fwd_mass_bf16_d64", DType::BF16, 64, FwdVariant::Mass),
    ("segattn_fwd_mass_bf16_d128", DType::BF16, 128, FwdVariant::Mass),
    ("segattn_fwd_mass_f16_d64", DType::F16, 64, FwdVariant::Mass),
    ("segattn_fwd_mass_f16_d128", DType::F16, 128, FwdVariant::Mass),
    ("segattn_fwd_rope_bf16_d64", DType::BF16, 64, FwdVariant::Rope),
    ("segattn_fwd_rope_bf16_d128", DType::BF16, 128, FwdVariant::Rope),
    ("segattn_fwd_rope_f16_d64", DType::F16, 64, FwdVariant::Rope),
    ("segattn_fwd_rope_f16_d128", DType::F16, 128, FwdVariant::Rope),
    ("segattn_fwd_wide_bf16_d64", DType::BF16, 64, FwdVariant::Wide),
    ("segattn_fwd_wide_bf16_d128", DType::BF16, 128, FwdVariant::Wide),
    ("segattn_fwd_wide_f16_d64", DType::F16, 64, FwdVariant::Wide),
    ("segattn_fwd_wide_f16_d128", DType::F16, 128, FwdVariant::Wide),
    ("segattn_fwd_wide64_bf16_d128", DType::BF16, 128, FwdVariant::Wide64),
    ("segattn_fwd_wide64_f16_d128", DType::F16, 128, FwdVariant::Wide64),
    (
        "segattn_fwd_wide64_mass_bf16_d128",
        DType::BF16,
        128,
        FwdVariant::WideMass,
    ),
    (
        "segattn_fwd_wide64_mass_f16_d128",
        DType::F16,
        128,
        FwdVariant::WideMass,
    ),
    ("segattn_fwd_bf16_d256", DType::BF16, 256, FwdVariant::Plain),
    ("segattn_fwd_f16_d256", DType::F16, 256, FwdVariant::Plain),
    ("segattn_fwd_rope_bf16_d256", DType::BF16, 256, FwdVariant::Rope),
    ("segattn_fwd_rope_f16_d256", DType::F16, 256, FwdVariant::Rope),
];

type Cache = Mutex<HashMap<(usize, usize), Arc<Kernels>>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The kernels of `ctx`, loading the fatbin on first use.
pub(crate) fn kernels(ctx: &Arc<CudaContext>) -> Result<Arc<Kernels>> {
    let key = (ctx.ordinal(), ctx.cu_ctx() as usize);
    // Loading under the lock: a second thread on the same device waits instead of loading twice.
    let mut cache = cache()
        .lock()
        .map_err(|_| candle_core::Error::Msg("segattn: CUDA module cache poisoned by a panic".into()))?;
    if let Some(k) = cache.get(&key) {
        return Ok(k.clone());
    }
    let kernels = Arc::new(load(ctx)?);
    cache.insert(key, kernels.clone());
    Ok(kernels)
}

/// Raises the dynamic shared memory limit of `func` (entry point `name` in `ctx`) to `smem` bytes
/// when that is above the 48 KiB every kernel may use without opting in.
fn raise_dynamic_smem(ctx: &Arc<CudaContext>, func: &CudaFunction, name: &str, smem: usize) -> Result<()> {
    if smem <= DEFAULT_DYNAMIC_SMEM {
        return Ok(());
    }
    ctx.bind_to_thread()
        .map_err(|e| driver_err(format!("binding the context of GPU {}", ctx.ordinal()), e))?;
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .map_err(|e| {
        driver_err(
            format!("raising the dynamic shared memory of {name} to {smem} bytes"),
            e,
        )
    })
}

fn load(ctx: &Arc<CudaContext>) -> Result<Kernels> {
    let gpu = ctx.ordinal();
    let module = ctx.load_module(Ptx::from_binary(FATBIN.to_vec())).map_err(|e| {
        driver_err(
            format!(
                "loading the embedded kernels ({} bytes of fatbin: sm_80 / sm_90 SASS, compute_80 PTX) on GPU {gpu}",
                FATBIN.len()
            ),
            e,
        )
    })?;
    let optin = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map_err(|e| driver_err(format!("querying the shared memory limit of GPU {gpu}"), e))?;
    let optin = usize::try_from(optin).unwrap_or(0);
    let mut fwd = Vec::with_capacity(FWD_ENTRIES.len() + HOPPER_FWD_ENTRIES.len());
    let mut unavailable = Vec::new();
    // The wgmma kernels, on compute capability 9.0 GPUs only (the sm_90a fatbin runs nowhere else).
    // A failure to load them leaves the rest of the module working: the calls then run on
    // the mma.sync kernels, or fail where SEGATTN_FWD_HOPPER=1 asks for wgmma
    // (`Kernels::on_this_gpu`).
    let hopper = match super::hopper::load_module(ctx) {
        Ok(m) => m,
        Err(e) => {
            for (_, dtype, head_dim, variant) in HOPPER_FWD_ENTRIES {
                unavailable.push(((dtype, head_dim, variant), e.to_string()));
            }
            None
        }
    };
    let entries = FWD_ENTRIES.iter().map(|e| (&module, *e)).chain(
        hopper
            .iter()
            .flat_map(|m| HOPPER_FWD_ENTRIES.iter().map(move |e| (m, *e))),
    );
    for (module, (name, dtype, head_dim, variant)) in entries {
        let func = match module.load_function(name) {
            Ok(f) => f,
            Err(e) => {
                let e = driver_err(
                    format!(
                        "kernel {name} is not in its embedded fatbin (kernels/production.txt or kernels/hopper.txt \
                         lists its file?)"
                    ),
                    e,
                );
                if !variant.is_wgmma() {
                    return Err(e);
                }
                unavailable.push(((dtype, head_dim, variant), e.to_string()));
                continue;
            }
        };
        // The traits' size, from the same headers compiled for the host (kernels/kernel_traits.cuh).
        let Some(smem) = crate::emulated::fwd_smem_bytes(dtype, head_dim, variant) else {
            return Err(candle_core::Error::Msg(format!(
                "segattn: internal error: no shared memory size for kernel {name}"
            ))
            .bt());
        };
        let max_threads = func
            .max_threads_per_block()
            .map_err(|e| driver_err(format!("querying the block size limit of {name}"), e))?;
        let threads = variant.threads();
        if max_threads < threads as i32 {
            return Err(candle_core::Error::Msg(format!(
                "segattn: kernel {name} allows {max_threads} threads per block, the launch needs {threads}"
            ))
            .bt());
        }
        let static_smem = func
            .shared_size_bytes()
            .map_err(|e| driver_err(format!("querying the static shared memory of {name}"), e))?;
        let static_smem = usize::try_from(static_smem).unwrap_or(0);
        let total = smem + static_smem;
        if total > optin {
            // Not this device's (D 256 with PINE's rotation on a GPU of 99 KiB a block): an error
            // when a call needs it, the rest of the module as usual.
            unavailable.push((
                (dtype, head_dim, variant),
                format!(
                    "segattn: kernel {name} needs {total} bytes of shared memory per block ({smem} dynamic + \
                     {static_smem} static), GPU {gpu} allows {optin}: {dtype:?} D = {head_dim} ({variant:?}) does not \
                     run on this GPU"
                ),
            ));
            continue;
        }
        // The wide mass kernel's launches add its rows' sums after the fixed layout: the most
        // segments that fit this device (none: the launcher takes the 64-row variant).
        let (launch_max, mass_segments) = if variant == FwdVariant::WideMass {
            let bytes = |sk| crate::emulated::fwd_mass_rows_smem_bytes(dtype, head_dim, sk).unwrap_or(usize::MAX);
            match (0..=crate::kernel_params::WIDE_MASS_MAX_SEGMENTS)
                .rev()
                .find(|&sk| bytes(sk).saturating_add(static_smem) <= optin)
            {
                Some(sk) => (bytes(sk), sk),
                None => (smem, 0),
            }
        } else {
            (smem, 0)
        };
        raise_dynamic_smem(ctx, &func, name, launch_max)?;
        fwd.push((
            (dtype, head_dim, variant),
            FwdKernel {
                name,
                func,
                smem_bytes: smem as u32,
                block_rows: variant.block_rows(),
                block_keys: variant.block_keys(),
                threads,
                mass_segments,
            },
        ));
    }
    let sm_count = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| driver_err(format!("querying the multiprocessor count of GPU {gpu}"), e))?;
    Ok(Kernels {
        _module: module,
        _hopper_module: hopper,
        ctx: ctx.clone(),
        fwd,
        unavailable,
        others: Mutex::new(Vec::new()),
        sm_count: usize::try_from(sm_count).unwrap_or(1).max(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_match_their_variants() {
        // Each (dtype, head dim, variant) once; the wgmma variants only in the sm_90a table.
        let all: Vec<_> = FWD_ENTRIES
            .iter()
            .chain(&HOPPER_FWD_ENTRIES)
            .map(|e| (e.1, e.2, e.3))
            .collect();
        for (i, key) in all.iter().enumerate() {
            assert!(!all[..i].contains(key), "{key:?} listed twice");
        }
        // Each name says its dtype and head dim (a copied line left unedited would not).
        for (name, dtype, d, variant) in FWD_ENTRIES.iter().chain(&HOPPER_FWD_ENTRIES) {
            let dt = if *dtype == DType::BF16 { "_bf16_" } else { "_f16_" };
            assert!(
                name.contains(dt) && name.ends_with(&format!("_d{d}")),
                "{name}: {dtype:?} D {d} ({variant:?})"
            );
        }
        assert!(FWD_ENTRIES.iter().all(|e| !e.3.is_wgmma()));
        assert!(HOPPER_FWD_ENTRIES.iter().all(|e| e.3.is_wgmma()));
        // The wgmma kernel that `FwdVariant::on_hopper` may take for any mma.sync kernel at D 64 /
        // 128 is listed for both dtypes (else the launcher would fall back to mma.sync unseen).
        for (_, dtype, d, variant) in FWD_ENTRIES.iter().filter(|e| e.2 <= 128) {
            let wgmma = variant.wgmma_of();
            assert!(
                HOPPER_FWD_ENTRIES
                    .iter()
                    .any(|e| (e.1, e.2, e.3) == (*dtype, *d, wgmma)),
                "{wgmma:?} for {dtype:?} D {d} ({variant:?}) is not in HOPPER_FWD_ENTRIES"
            );
        }
        // The standalone mass on wgmma (`kernel_params::scores_on_hopper`) likewise.
        for dtype in [DType::BF16, DType::F16] {
            for d in [64, 128] {
                assert!(HOPPER_FWD_ENTRIES
                    .iter()
                    .any(|e| (e.1, e.2, e.3) == (dtype, d, FwdVariant::HopperScores)));
            }
        }
    }
}
