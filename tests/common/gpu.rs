//! The GPU of the GPU tests (`--features cuda`): one device per process, outputs poisoned with
//! NaN before every launch and every launch synchronized and checked, unless set otherwise.

use std::sync::OnceLock;

use candle_core::{Device, Result};
use segattn::{PairRule, PairTable, SegmentMask};

/// The GPU, or `None` (test skipped) when there is none and `SEGATTN_REQUIRE_GPU` is not 1.
///
/// `SEGATTN_GPU_TESTS_ON_CPU=1`: the CPU instead, a dry run of the GPU tests' own logic where
/// there is no GPU (scripts/gpu-suite.sh runs it before packing, so that a mistake in a test does
/// not cost GPU time); tests of CUDA-only limits skip there.
pub fn gpu() -> Option<Device> {
    if dry_run() {
        return Some(Device::Cpu);
    }
    static DEV: OnceLock<std::result::Result<Device, String>> = OnceLock::new();
    let dev = DEV.get_or_init(|| {
        for (var, default) in [("SEGATTN_CUDA_POISON", "1"), ("SEGATTN_CUDA_SYNC", "1")] {
            if std::env::var_os(var).is_none() {
                // Inside the OnceLock initialisation, before any CUDA call of this process.
                std::env::set_var(var, default);
            }
        }
        Device::new_cuda(0).map_err(|e| e.to_string())
    });
    match dev {
        Ok(d) => Some(d.clone()),
        Err(e) if std::env::var_os("SEGATTN_REQUIRE_GPU").is_some_and(|v| v == "1") => {
            panic!("SEGATTN_REQUIRE_GPU=1 but no CUDA device: {e}")
        }
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// The same mask with its tensors on `dev` (what a user does: build it on the device of q).
pub fn mask_on(mask: &SegmentMask, dev: &Device) -> Result<SegmentMask> {
    let rule = mask.rule();
    let mut moved = PairRule::new(rule.intra, rule.inter);
    if let Some(t) = &rule.table {
        moved = moved.with_table(PairTable::new(t.rules().to_device(dev)?)?);
    }
    SegmentMask::new(
        &mask.q_segments().to_device(dev)?,
        &mask.kv_segments().to_device(dev)?,
        moved,
    )
}

/// Whether the GPU tests run on the CPU (`SEGATTN_GPU_TESTS_ON_CPU=1`, see [`gpu`]).
pub fn dry_run() -> bool {
    std::env::var_os("SEGATTN_GPU_TESTS_ON_CPU").is_some_and(|v| v == "1")
}
