//! Wall-clock timing of a public GPU call for the `gpu_bench` modes that time whole calls.

use std::time::Instant;

use candle_core::{Device, Result, Tensor};

/// `warmup` calls of `f`, then a stream synchronisation.
fn warm_up<R>(dev: &Device, warmup: usize, f: &mut impl FnMut() -> Result<R>) -> Result<()> {
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()
}

/// The median of `reps` (at least one) measurements `measure()`.
fn median_of(reps: usize, mut measure: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut t = (0..reps.max(1)).map(|_| measure()).collect::<Result<Vec<f64>>>()?;
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// The median wall clock (ms) of `f` to stream synchronisation, over `reps` runs after `warmup`.
/// What `f` returns lives until after the synchronisation, as a caller's results would: a device
/// buffer freed before it would be handed back to the driver there (cudarc allocates from the
/// device's default memory pool, whose release threshold is 0) and mapped again by the next call,
/// a cost of the harness, not of the call (bench/NOTES.md CUDA 41).
pub fn median_ms<R>(dev: &Device, reps: usize, warmup: usize, mut f: impl FnMut() -> Result<R>) -> Result<f64> {
    warm_up(dev, warmup, &mut f)?;
    median_of(reps, || {
        let start = Instant::now();
        let out = f()?;
        dev.synchronize()?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        drop(out);
        Ok(ms)
    })
}

/// The median wall clock (ms) per call of `calls` calls of `f` issued back to back and one stream
/// synchronisation, over `reps` runs after `warmup`: a model's layers in a row, where the GPU
/// work of one call overlaps the host work of the next and no call pays the synchronisation.
pub fn per_call_in_row_ms(
    dev: &Device,
    reps: usize,
    warmup: usize,
    calls: usize,
    mut f: impl FnMut() -> Result<Tensor>,
) -> Result<f64> {
    let calls = calls.max(1);
    median_ms(dev, reps, warmup, || {
        let mut last = f()?;
        for _ in 1..calls {
            last = f()?;
        }
        Ok(last)
    })
    .map(|ms| ms / calls as f64)
}

/// The median host time (ms) per call to issue `calls` calls of `f` back to back, without waiting
/// for the GPU (synchronised after each run, outside the timing), over `reps` runs after
/// `warmup`: where it is close to [`per_call_in_row_ms`], the calls are bound by their host work
/// (launches, allocations, uploads), not by their kernels.
pub fn host_ms_per_call(
    dev: &Device,
    reps: usize,
    warmup: usize,
    calls: usize,
    mut f: impl FnMut() -> Result<Tensor>,
) -> Result<f64> {
    let calls = calls.max(1);
    warm_up(dev, warmup, &mut f)?;
    median_of(reps, || {
        let start = Instant::now();
        let outs = (0..calls).map(|_| f()).collect::<Result<Vec<Tensor>>>()?;
        let ms = start.elapsed().as_secs_f64() * 1e3 / calls as f64;
        dev.synchronize()?;
        drop(outs);
        Ok(ms)
    })
}
