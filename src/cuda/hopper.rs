//! The Hopper-only kernels (wgmma, sm_90a): `build/nvcc.rs` compiles `kernels/hopper.txt` into
//! `$OUT_DIR/segattn_sm90a.fatbin`, an image that runs on compute capability 9.0 GPUs only (H100,
//! H200), loaded only there.
//!
//! It holds the forward kernels on wgmma (`kernels/hopper/fwd_hopper.cu`, loaded with the others
//! by `module::kernels`, plain attention's kernels there unless `SEGATTN_FWD_HOPPER=0`:
//! `FwdVariant::on_hopper`) and
//! the wgmma probe (`kernels/hopper/wgmma_probe.cu`): the reading of wgmma's
//! register fragments and shared-memory layouts that the emulator computes by
//! (`kernels/emu/wgmma.cpp`), checked against the card by `tests/gpu_fwd.rs` before a forward
//! kernel is built on it (bench/NOTES.md CUDA 34).

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
use candle_core::cuda_backend::cudarc::driver::{CudaContext, CudaModule, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::{Device, Result};

use super::driver_err;
use crate::error::invalid_arg;

static HOPPER_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/segattn_sm90a.fatbin"));

/// Whether the GPU of `ctx` runs the sm_90a image: compute capability 9.0 exactly.
fn runs_sm90a(ctx: &CudaContext) -> Result<bool> {
    let gpu = ctx.ordinal();
    let attr = |a, what| {
        ctx.attribute(a)
            .map_err(|e| driver_err(format!("querying the compute capability ({what}) of GPU {gpu}"), e))
    };
    let major = attr(
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
        "major",
    )?;
    let minor = attr(
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
        "minor",
    )?;
    Ok((major, minor) == (9, 0))
}

/// The sm_90a fatbin loaded in `ctx`, or `None` on a GPU that is not compute capability 9.0.
pub(crate) fn load_module(ctx: &Arc<CudaContext>) -> Result<Option<Arc<CudaModule>>> {
    if !runs_sm90a(ctx)? {
        return Ok(None);
    }
    let gpu = ctx.ordinal();
    let module = ctx.load_module(Ptx::from_binary(HOPPER_FATBIN.to_vec())).map_err(|e| {
        driver_err(
            format!(
                "loading the sm_90a kernels ({} bytes of fatbin) on GPU {gpu}",
                HOPPER_FATBIN.len()
            ),
            e,
        )
    })?;
    Ok(Some(module))
}

/// One run of the wgmma probe (`kernels/hopper/wgmma_probe.cu`): one warpgroup computes
/// D = C + A B, B read from `tile` ([64][128] 16-bit values) as laid out in shared memory by the
/// probe.
#[doc(hidden)]
pub struct WgmmaProbe<'a> {
    /// 0: B = the tile's rows as K-major columns (N 64, `k_steps` <= 8 of A's [64][16 k_steps]);
    /// 1: B = the tile's first 16 k_steps rows, MN-major (N 128, `k_steps` <= 4); 2: as 1 with
    /// N 64 (a D 64 kernel's V tile).
    pub mode: i32,
    pub is_bf16: bool,
    pub a: &'a [u16],
    pub tile: &'a [u16],
    /// [64][N] f32.
    pub c: &'a [f32],
    pub k_steps: usize,
    /// The B descriptor's (leading, stride) byte offsets; `None`: the reading the kernels use
    /// (mode 0: 16 (unused) and 1024; modes 1, 2: 8192 and 1024).
    pub offsets: Option<(u32, u32)>,
}

impl WgmmaProbe<'_> {
    /// The N (D's columns) of probe `mode`: 128 for mode 1, else 64.
    pub fn n_of(mode: i32) -> usize {
        if mode == 1 {
            128
        } else {
            64
        }
    }
}

/// Runs `probe` on the GPU `dev`: D, or `None` on a GPU that is not compute capability 9.0 (the
/// image does not run there).
#[doc(hidden)]
pub fn wgmma_probe(dev: &Device, probe: &WgmmaProbe<'_>) -> Result<Option<Vec<f32>>> {
    let WgmmaProbe {
        mode,
        is_bf16,
        a,
        tile,
        c,
        k_steps,
        offsets,
    } = *probe;
    let Device::Cuda(cuda) = dev else {
        invalid_arg!("dev: the wgmma probe runs on a CUDA device, got {:?}", dev.location());
    };
    let n = WgmmaProbe::n_of(mode);
    let max_steps = if mode == 0 { 8 } else { 4 };
    if !(0..=2).contains(&mode) || k_steps == 0 || k_steps > max_steps {
        invalid_arg!(
            "mode / k_steps: expected mode 0 with 1..=8 k-steps or mode 1 or 2 with 1..=4, got {mode} / {k_steps}"
        );
    }
    for (arg, got, want) in [
        ("a", a.len(), 64 * 16 * k_steps),
        ("tile", tile.len(), 64 * 128),
        ("c", c.len(), 64 * n),
    ] {
        if got != want {
            invalid_arg!("{arg}: expected {want} elements, got {got}");
        }
    }
    let stream = cuda.cuda_stream();
    let Some(module) = load_module(stream.context())? else {
        return Ok(None);
    };
    let func = module
        .load_function("segattn_wgmma_probe")
        .map_err(|e| driver_err("looking up segattn_wgmma_probe (kernels/hopper.txt lists it?)", e))?;
    let up_a = stream.clone_htod(a).map_err(|e| driver_err("uploading A", e))?;
    let up_tile = stream
        .clone_htod(tile)
        .map_err(|e| driver_err("uploading the tile", e))?;
    let up_c = stream.clone_htod(c).map_err(|e| driver_err("uploading C", e))?;
    let mut d = stream
        .alloc_zeros::<f32>(64 * n)
        .map_err(|e| driver_err("allocating D", e))?;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 1024 + 64 * 128 * 2, // the tile and its 1024-byte alignment
    };
    let (is_bf16, k_steps) = (i32::from(is_bf16), k_steps as i32);
    let (lbo, sbo) = offsets.unwrap_or(if mode == 0 { (16, 1024) } else { (64 * 128, 1024) });
    let (lbo, sbo) = (lbo as i32, sbo as i32);
    let mut builder = stream.launch_builder(&func);
    builder
        .arg(&mode)
        .arg(&is_bf16)
        .arg(&up_a)
        .arg(&up_tile)
        .arg(&up_c)
        .arg(&mut d)
        .arg(&k_steps)
        .arg(&lbo)
        .arg(&sbo);
    // SAFETY: the probe's parameters are (mode, is_bf16, a, tile, c, d, k_steps, lbo, sbo) with device
    // buffers of the sizes checked above; one block of 128 threads and the shared memory it takes.
    unsafe { builder.launch(cfg) }.map_err(|e| driver_err("launching segattn_wgmma_probe", e))?;
    let out = stream.clone_dtoh(&d).map_err(|e| driver_err("reading D back", e))?;
    stream
        .synchronize()
        .map_err(|e| driver_err("synchronizing after segattn_wgmma_probe", e))?;
    Ok(Some(out))
}
