//! CPU decode steps: one new query row against a KV cache, ours (`segment_attention` under the
//! causal mask's last row) against what a candle user writes today (K and V repeated to the query
//! heads, matmul, softmax, matmul, in the cache's dtype), at Llama-3-8B's attention shape (H 32,
//! Hkv 8, D 128, B 1) and its multi-query variant (Hkv 1), f32 and bf16, caches of 1k to 16k
//! tokens.
//!
//! Both read the same cache bytes: ours `[1, L, Hkv, D]` (its layout), the baseline's `[1, Hkv, L,
//! D]` contiguous (the usual candle KV cache), so neither pays a transpose.
//!
//! # Two modes
//!
//! - `cargo bench --bench cpu_decode` runs criterion on a few shapes.
//! - `cargo bench --bench cpu_decode -- --table` (or `SEGATTN_BENCH_TABLE=1`) prints a Markdown
//!   table on stdout: medians of interleaved rounds (ours, baseline) after a warm-up, the caches
//!   evicted before each call (`support/cold_cache.rs`: a layer's step inside a model reads its KV
//!   cache from DRAM); `GB/s` is the bytes of K and V read per step over its time (a decode step is
//!   bound by reading the cache).

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Duration;

use candle_core::{DType, Device, Result, Tensor};
use criterion::{BenchmarkId, Criterion, SamplingMode};
use segattn::{segment_attention, SegmentMask};

#[path = "support/cold_cache.rs"]
mod cold_cache;
#[path = "support/machine_load.rs"]
mod machine_load;
#[path = "support/rounds.rs"]
mod rounds;
use machine_load::{median, ms, CpuSnapshot};

const HEADS: usize = 32;
const KV_HEADS: usize = 8;
/// The multi-query variant of the table (one KV head: Falcon, Gemma 2B style), where a step is
/// one (batch row, KV head) item, split over its keys for the threads from 2048 keys on (at D
/// 128, `cpu/decode_split.rs`).
const MQA_KV_HEADS: usize = 1;
const HEAD_DIM: usize = 128;
/// Cache lengths (the new token's row included).
const LENS: [usize; 3] = [1024, 4096, 16384];
/// Interleaved rounds per cache length (fewer where the baseline takes a third of a second).
fn rounds(len: usize) -> usize {
    if len >= 16384 {
        21
    } else {
        101
    }
}
const WARM_UP: Duration = Duration::from_millis(500);

/// One decode step's inputs, for both sides.
struct Case {
    len: usize,
    kv_heads: usize,
    dtype: DType,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: SegmentMask,
    /// The baseline's: q `[1, H, 1, D]`, the cache `[1, Hkv, L, D]`.
    q_heads: Tensor,
    k_heads: Tensor,
    v_heads: Tensor,
    /// The baseline's cache as ours' `[1, L, Hkv, D]` views (transposed, no copy): a candle KV
    /// cache passed as it is usually kept, head-major.
    k_view: Tensor,
    v_view: Tensor,
}

impl Case {
    fn new(len: usize, dtype: DType, kv_heads: usize) -> Result<Self> {
        let dev = Device::Cpu;
        let randn = |shape: (usize, usize, usize, usize)| Tensor::randn(0f32, 1.0, shape, &dev)?.to_dtype(dtype);
        let q = randn((1, 1, HEADS, HEAD_DIM))?;
        let k = randn((1, len, kv_heads, HEAD_DIM))?;
        let v = randn((1, len, kv_heads, HEAD_DIM))?;
        let (k_heads, v_heads) = (k.transpose(1, 2)?.contiguous()?, v.transpose(1, 2)?.contiguous()?);
        Ok(Self {
            len,
            kv_heads,
            dtype,
            mask: SegmentMask::causal(len, &dev)?.last_queries(1)?,
            q_heads: q.transpose(1, 2)?.contiguous()?,
            k_view: k_heads.transpose(1, 2)?,
            v_view: v_heads.transpose(1, 2)?,
            k_heads,
            v_heads,
            q,
            k,
            v,
        })
    }

    fn ours(&self) -> Result<Tensor> {
        segment_attention(&self.q, &self.k, &self.v, &self.mask)
    }

    /// Ours on the head-major cache (`k_view`, `v_view`): each KV head's keys contiguous, where the
    /// token-major cache puts a row every `Hkv D` elements (a new 4 KB page every row in f32).
    fn ours_head_major(&self) -> Result<Tensor> {
        segment_attention(&self.q, &self.k_view, &self.v_view, &self.mask)
    }

    fn baseline(&self) -> Result<Tensor> {
        Self::candle_ops(&self.q_heads, &self.k_heads, &self.v_heads)
    }

    /// The baseline's step on `[1, H, 1, D]` and `[1, Hkv, L, D]`, out `[1, H, 1, D]`.
    fn candle_ops(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let group = HEADS / k.dim(1)?;
        let repeat = |t: &Tensor| -> Result<Tensor> {
            let (b, hkv, l, d) = t.dims4()?;
            t.unsqueeze(2)?
                .broadcast_as((b, hkv, group, l, d))?
                .reshape((b, hkv * group, l, d))
        };
        let (k, v) = (repeat(k)?, repeat(v)?);
        let scale = 1.0 / (HEAD_DIM as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        probs.matmul(&v)
    }

    /// Bytes of K and V one step reads.
    fn cache_bytes(&self) -> usize {
        2 * self.len * self.kv_heads * HEAD_DIM * self.dtype.size_in_bytes()
    }
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        _ => "other",
    }
}

fn criterion_main() -> Result<()> {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    for (dtype, kv_heads) in [DType::BF16, DType::F32]
        .into_iter()
        .flat_map(|t| [(t, KV_HEADS), (t, MQA_KV_HEADS)])
    {
        let mqa = if kv_heads == MQA_KV_HEADS { "mqa_" } else { "" };
        let mut g = c.benchmark_group(format!("decode_{mqa}{}", dtype_name(dtype)));
        g.sampling_mode(SamplingMode::Flat);
        for len in [1024, 4096] {
            let case = Case::new(len, dtype, kv_heads)?;
            g.bench_function(BenchmarkId::new("ours", len), |b| b.iter(|| case.ours().unwrap()));
            g.bench_function(BenchmarkId::new("baseline", len), |b| {
                b.iter(|| case.baseline().unwrap())
            });
        }
        g.finish();
    }
    c.final_summary();
    Ok(())
}

/// Medians of `rounds` interleaved rounds of `ops`, after `WARM_UP` of them, the caches evicted
/// (untimed) before each timed call, and the share of the CPU other processes used meanwhile.
fn interleaved(rounds: usize, ops: &[&dyn Fn()], evictor: &cold_cache::Evictor) -> (Vec<Duration>, Option<f64>) {
    machine_load::wait_for_quiet(Duration::from_secs(20), 0.10);
    let before = CpuSnapshot::now();
    let t = rounds::timed_rounds(rounds, ops, WARM_UP, &|| evictor.evict());
    let load = before.and_then(|b| b.foreign_load_since(CpuSnapshot::now()));
    (t.into_iter().map(median).collect(), load)
}

fn table_main() -> Result<()> {
    let mut md = String::new();
    writeln!(
        md,
        "CPU: {}, {} threads. One decode step: q `[1, 1, {HEADS}, {HEAD_DIM}]` against a cache of L tokens \
         of Hkv KV heads ({KV_HEADS}: Llama-3-8B; {MQA_KV_HEADS}: multi-query). Ours: `segment_attention` (causal, last row); baseline: K / V repeated to {HEADS} heads, \
         matmul, softmax, matmul (candle ops, the cache's dtype). Medians of 101 interleaved rounds (21 at L = 16384) after {} ms \
         of warm-up, the caches evicted before each call (64 MiB written, untimed: the KV cache comes from DRAM, as \
         for a layer inside a model). GB/s: bytes of K and V read / time. Max err: the largest absolute difference \
         from the same step computed in f32 (candle ops) from the same inputs.\n",
        machine_load::cpu_model(),
        rayon::current_num_threads(),
        WARM_UP.as_millis()
    )
    .unwrap();
    writeln!(
        md,
        "| Hkv | L | dtype | ours ms | baseline ms | speedup | ours GB/s | baseline GB/s | ours max err | baseline max err | other load |"
    )
    .unwrap();
    writeln!(md, "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|").unwrap();
    let evictor = cold_cache::Evictor::new();
    for (kv_heads, dtype) in [KV_HEADS, MQA_KV_HEADS]
        .into_iter()
        .flat_map(|h| [(h, DType::BF16), (h, DType::F32)])
    {
        for len in LENS {
            let case = Case::new(len, dtype, kv_heads)?;
            let ops: [&dyn Fn(); 2] = [&|| drop(black_box(case.ours().unwrap())), &|| {
                drop(black_box(case.baseline().unwrap()))
            }];
            // Both against the step computed in f32 from the same (rounded) inputs.
            let f32 = |t: &Tensor| t.to_dtype(DType::F32);
            let exact = Case::candle_ops(&f32(&case.q_heads)?, &f32(&case.k_heads)?, &f32(&case.v_heads)?)?;
            let max_diff =
                |t: Tensor| -> Result<f32> { (f32(&t)? - &exact)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
            let (ours_diff, base_diff) = (max_diff(case.ours()?.transpose(1, 2)?)?, max_diff(case.baseline()?)?);
            let (t, load) = interleaved(rounds(len), &ops, &evictor);
            let gbs = |d: Duration| case.cache_bytes() as f64 / d.as_secs_f64() / 1e9;
            eprintln!(
                "Hkv {kv_heads} L {len} {}: ours {:.3} ms, baseline {:.3} ms",
                dtype_name(dtype),
                ms(t[0]),
                ms(t[1])
            );
            writeln!(
                md,
                "| {kv_heads} | {len} | {} | {:.3} | {:.3} | {:.1}x | {:.1} | {:.1} | {ours_diff:.1e} | {base_diff:.1e} | {} |",
                dtype_name(dtype),
                ms(t[0]),
                ms(t[1]),
                t[1].as_secs_f64() / t[0].as_secs_f64(),
                gbs(t[0]),
                gbs(t[1]),
                load.map_or("n/a".into(), |l| format!("{:.0}%", 100.0 * l))
            )
            .unwrap();
        }
    }
    print!("{md}");
    Ok(())
}

/// `--ours-json FILE [--dtypes bf16,f32]`: ours alone on every decode case, back to back
/// (`decode`: the cache stays in L3) and from a cold cache (`decode_cold`), on the head-major
/// cache (`segattn`: a `[1, Hkv, L, D]` cache passed as a view, as torch gets it) and on the
/// token-major one (`segattn_token_major`: `[1, L, Hkv, D]` contiguous), as JSON lines for
/// bench/cpu_peers_report.py (bench/cpu_peers.py --decode times torch on the same cases): the
/// median of at least 20 calls and 1 s (at most 200) after the warm-up.
fn ours_json(path: &str) -> Result<()> {
    let dtypes = machine_load::flag_value("--dtypes").unwrap_or_else(|| "bf16,f32".into());
    let evictor = cold_cache::Evictor::new();
    let mut lines = vec![machine_load::ours_json_meta()];
    for name in dtypes.split(',') {
        let dtype = match name {
            "bf16" => DType::BF16,
            "f32" => DType::F32,
            other => candle_core::bail!("--dtypes: expected bf16 and / or f32, got {other}"),
        };
        for len in LENS {
            let case = Case::new(len, dtype, KV_HEADS)?;
            let layouts: [(&str, &dyn Fn() -> Result<Tensor>); 2] = [
                ("segattn", &|| case.ours_head_major()),
                ("segattn_token_major", &|| case.ours()),
            ];
            for ((mode, cold), (impl_name, ours)) in [("decode", false), ("decode_cold", true)]
                .into_iter()
                .flat_map(|m| layouts.iter().map(move |l| (m, *l)))
            {
                machine_load::wait_for_quiet(Duration::from_secs(20), 0.10);
                let start = std::time::Instant::now();
                while start.elapsed() < WARM_UP {
                    drop(black_box(ours()?));
                }
                let before = CpuSnapshot::now();
                let prepare = || {
                    if cold {
                        evictor.evict();
                    }
                };
                let (t, reps) =
                    machine_load::median_of_calls((20, 200), prepare, || ours().map(|o| drop(black_box(o))))?;
                let load = before.and_then(|b| b.foreign_load_since(CpuSnapshot::now()));
                let flops = (4 * HEAD_DIM * HEADS * len) as f64;
                eprintln!("{impl_name} {mode} L {len} {name}: {:.3} ms", ms(t));
                lines.push(format!(
                    "{{\"impl\":\"{impl_name}\",\"mask\":\"{mode}\",\"len\":{len},\"batch\":1,\"heads\":{HEADS},\
                     \"kv_heads\":{KV_HEADS},\"head_dim\":{HEAD_DIM},\"dtype\":\"{name}\",\"visible_pairs\":{len},\
                     \"ms\":{:.5},\"gflops\":{:.2},\"gbps\":{:.2},\"reps\":{reps},\"foreign_load\":{:.3}}}",
                    ms(t),
                    flops / t.as_secs_f64() / 1e9,
                    case.cache_bytes() as f64 / t.as_secs_f64() / 1e9,
                    load.unwrap_or(0.0)
                ));
                std::fs::write(path, lines.join("\n") + "\n")?;
            }
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    if let Some(path) = machine_load::flag_value("--ours-json") {
        return ours_json(&path);
    }
    if machine_load::table_mode() {
        table_main()
    } else {
        criterion_main()
    }
}
