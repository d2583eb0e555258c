//! Wall-clock timing of a public GPU call for the `gpu_bench` modes that time whole calls.

use std::time::Instant;

use candle_core::{Device, Result, Tensor};

/// The median wall clock (ms) of `f` to stream synchronisation, over `reps` runs after `warmup`.
pub fn median_ms(dev: &Device, reps: usize, warmup: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        let out = f()?;
        dev.synchronize()?;
        t.push(start.elapsed().as_secs_f64() * 1e3);
        drop(out);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}
