//! CPU benchmark of the attention's backward pass (training): a forward and backward step of
//! `segment_attention` through candle's autograd, against the forward alone and against what a
//! candle user writes today (the same step through plain candle ops on a dense additive mask,
//! whose autograd keeps every `[B, H, L, L]` intermediate).
//!
//! Cases: B = 1, L = 2048, H = Hkv = 8, D = 64, f32; masks causal, 8 packed documents (causal
//! inside each), PINE (prefix 64, 16 segments, suffix 64). The loss is `sum(out * w)` for a fixed
//! random `w`, so the gradient reaching the op is `w`.
//!
//! # Two modes
//!
//! - `cargo bench --bench backward` runs criterion (sample size 10, flat sampling); filters work
//!   as usual (`-- documents`).
//! - `cargo bench --bench backward -- --table` (or `SEGATTN_BENCH_TABLE=1`) prints a Markdown
//!   table, also written to `bench/backward_table.md`: the three calls of a case interleaved
//!   (7 rounds, medians) after waiting (up to 20 s) for other processes to go quiet.

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Result, Tensor, Var, D};
use criterion::{Criterion, SamplingMode};
use segattn::{reference::dense_mask, segment_attention, SegmentMask};

#[path = "support/machine_load.rs"]
mod machine_load;
use machine_load::{cpu_model, median, ms, CpuSnapshot};

const L: usize = 2048;
const HEADS: usize = 8;
const HEAD_DIM: usize = 64;
const ROUNDS: usize = 7;

/// One case: inputs as candle variables, the mask and its dense additive form for the baseline.
struct Case {
    name: &'static str,
    q: Var,
    k: Var,
    v: Var,
    w: Tensor,
    mask: SegmentMask,
    /// `[1, 1, L, L]` f32, 0 where visible and -inf where hidden (built outside the timed calls).
    dense_bias: Tensor,
    visible: usize,
}

fn case(name: &'static str, mask: SegmentMask) -> Result<Case> {
    let dev = Device::Cpu;
    // Reproducible values in [-1, 1) (xorshift; the CPU device cannot be seeded).
    let t = |seed: u64| -> Result<Tensor> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let data: Vec<f32> = (0..L * HEADS * HEAD_DIM)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        Tensor::from_vec(data, (1, L, HEADS, HEAD_DIM), &dev)
    };
    let visible_u8 = dense_mask(&mask, 1, L, L)?;
    let visible = visible_u8.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize;
    let zeros = Tensor::zeros((1, L, L), DType::F32, &dev)?;
    let hidden = Tensor::full(f32::NEG_INFINITY, (1, L, L), &dev)?;
    let dense_bias = visible_u8.where_cond(&zeros, &hidden)?.unsqueeze(0)?;
    Ok(Case {
        name,
        q: Var::from_tensor(&t(1)?)?,
        k: Var::from_tensor(&t(2)?)?,
        v: Var::from_tensor(&t(3)?)?,
        w: t(4)?,
        mask,
        dense_bias,
        visible,
    })
}

fn cases() -> Result<Vec<Case>> {
    let dev = Device::Cpu;
    let docs = vec![L / 8; 8];
    let segs = vec![(L - 128) / 16; 16];
    Ok(vec![
        case("causal", SegmentMask::causal(L, &dev)?)?,
        case("documents8", SegmentMask::documents(&[docs], &dev)?)?,
        case("pine", SegmentMask::pine(64, &segs, 64, &dev)?)?,
    ])
}

/// The forward alone, no gradient recorded.
fn forward(c: &Case) -> Result<Tensor> {
    segment_attention(
        &c.q.as_tensor().detach(),
        &c.k.as_tensor().detach(),
        &c.v.as_tensor().detach(),
        &c.mask,
    )
}

/// Forward and backward through our op.
fn ours_step(c: &Case) -> Result<candle_core::backprop::GradStore> {
    let out = segment_attention(c.q.as_tensor(), c.k.as_tensor(), c.v.as_tensor(), &c.mask)?;
    (out * &c.w)?.sum_all()?.backward()
}

/// Forward and backward through candle ops on the dense mask: `[B, H, L, D]` layout, the softmax
/// with its max taken out of the graph.
fn dense_step(c: &Case) -> Result<candle_core::backprop::GradStore> {
    let heads_first = |t: &Tensor| t.transpose(1, 2)?.contiguous();
    let (q, k, v) = (
        heads_first(c.q.as_tensor())?,
        heads_first(c.k.as_tensor())?,
        heads_first(c.v.as_tensor())?,
    );
    let scale = 1.0 / (HEAD_DIM as f64).sqrt();
    let s = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&c.dense_bias)?;
    let max = s.max_keepdim(D::Minus1)?.detach();
    let e = s.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    let out = p.matmul(&v)?.transpose(1, 2)?;
    (out * &c.w)?.sum_all()?.backward()
}

fn time<T>(f: impl FnOnce() -> Result<T>) -> Result<Duration> {
    let t0 = Instant::now();
    black_box(f()?);
    Ok(t0.elapsed())
}

fn table_main() -> Result<()> {
    let mut md = String::new();
    writeln!(
        md,
        "Backward (CPU, {}; {} threads): B 1, L {L}, H {HEADS} / {HEADS}, D {HEAD_DIM}, f32; medians of {ROUNDS} \
         interleaved rounds.\n",
        cpu_model(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    )
    .unwrap();
    writeln!(
        md,
        "| mask | visible pairs | forward ms | forward + backward ms | backward / forward | dense candle ops, forward + \
         backward ms | dense / ours | other load |"
    )
    .unwrap();
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|").unwrap();
    for c in cases()? {
        machine_load::wait_for_quiet(Duration::from_secs(20), 0.10);
        // Warm-up.
        forward(&c)?;
        ours_step(&c)?;
        dense_step(&c)?;
        let before = CpuSnapshot::now();
        let (mut f, mut o, mut d) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            f.push(time(|| forward(&c))?);
            o.push(time(|| ours_step(&c))?);
            d.push(time(|| dense_step(&c))?);
        }
        let load = before.and_then(|b| b.foreign_load_since(CpuSnapshot::now()));
        let (f, o, d) = (median(f), median(o), median(d));
        writeln!(
            md,
            "| {} | {} | {:.1} | {:.1} | {:.2} | {:.1} | {:.2}x | {} |",
            c.name,
            c.visible,
            ms(f),
            ms(o),
            (ms(o) - ms(f)) / ms(f),
            ms(d),
            ms(d) / ms(o),
            load.map_or("n/a".into(), |l| format!("{:.0}%", 100.0 * l))
        )
        .unwrap();
    }
    println!("\n{md}");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/backward_table.md");
    std::fs::write(&path, md)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn criterion_main() -> Result<()> {
    let mut crit = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    for c in cases()? {
        let mut group = crit.benchmark_group(format!("backward_{}", c.name));
        group.sampling_mode(SamplingMode::Flat);
        group.bench_function("forward", |bch| bch.iter(|| forward(&c).expect("forward")));
        group.bench_function("ours_forward_backward", |bch| bch.iter(|| ours_step(&c).expect("ours")));
        group.bench_function("dense_forward_backward", |bch| {
            bch.iter(|| dense_step(&c).expect("dense"))
        });
        group.finish();
    }
    crit.final_summary();
    Ok(())
}

fn main() -> Result<()> {
    if machine_load::table_mode() {
        table_main()
    } else {
        criterion_main()
    }
}
