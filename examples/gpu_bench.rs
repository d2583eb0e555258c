//! GPU benchmark of the segattn forward kernels (`--features cuda`), on the shapes of issue 4:
//! bf16, D = 64 and 128, H = 16 (and GQA 32 / 8), 16k tokens in total (B = 16384 / L), L in
//! {1k, 2k, 4k, 8k, 16k}, and D = 256 at L 8k, H 16; masks causal, full, documents (8 equal, 8 ragged), prefix-LM (prefix
//! L / 2) and PINE (prefix 256, 20 segments, suffix 64).
//!
//! Per shape: `kernel` = the kernel alone ([`segattn::cuda::PreparedForward`]: mask metadata
//! uploaded once), timed with CUDA events around each launch, after warm-up, median of `--reps`
//! (default 30) repetitions, rotating between input sets whose total size is at least 4x the
//! device's L2 cache (so no repetition reads the previous one's inputs from L2); `api` = the whole
//! public call `SegmentAttention::forward` (host mask metadata from the segment ids, upload,
//! allocation, launch), wall clock to stream synchronisation, median. TFLOP/s count only the
//! VISIBLE (q, k) pairs: 4 * D * H * visible pairs (summed over the batch).
//!
//! ```text
//! gpu_bench [--smoke] [--reps N] [--warmup N] [--filter SUBSTR] [--json FILE] [--list]
//!           [--export-masks FILE] [--pine] [--pine-decode-trace] [--mass] [--backward] [--cpu]
//! ```
//! `--pine`: instead, one PINE layer at Llama-3-8B shapes (examples/support/gpu_pine.rs).
//! `--pine-decode-trace`: only PINE decode steps of the RAG prompt, 64 layer calls in a row after
//! warm-up, for a timeline (`nsys profile`: the suite's profile half).
//! `--mass`: instead, the per-segment mass, fused and standalone, against the attention alone
//! (examples/support/gpu_mass.rs; `--filter` picks its cases by "MASK H/HKV"). `--backward`:
//! instead, a training step's attention, forward and backward through candle's autograd
//! (examples/support/gpu_backward.rs). With `--smoke` these run scaled-down shapes; with `--cpu`
//! they run on the CPU (a dry run of their code paths where there is no GPU: the times mean
//! nothing; scripts/gpu-suite.sh does it before packing).
//! `--list` prints the shapes; `--export-masks FILE` writes every mask (segment ids, rules, visible
//! pair count) as JSON for bench/peers.py, so that the peers run on exactly the same masks; neither
//! needs a GPU. `--smoke`: tiny shapes (L 256 / 512, 2k tokens).

use std::fmt::Write as _;
use std::time::Instant;

use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
use candle_core::{DType, Device, Result, Tensor};
use mask_json::visible_pairs;
use segattn::cuda::PreparedForward;
use segattn::{PineLayout, SegmentAttention, SegmentMask};

#[path = "support/gpu_backward.rs"]
mod gpu_backward;
#[path = "support/gpu_mass.rs"]
mod gpu_mass;
#[path = "support/gpu_pine.rs"]
mod gpu_pine;
#[path = "support/mask_json.rs"]
mod mask_json;
#[path = "support/timing.rs"]
mod timing;

/// L2 cache size when the device does not say (H100: 50 MB, H200: 60 MB); the input sets rotated
/// per repetition total at least 4x the device's L2.
const L2_BYTES_DEFAULT: usize = 60 << 20;

#[derive(Clone, Debug)]
struct Args {
    smoke: bool,
    reps: usize,
    warmup: usize,
    filter: Option<String>,
    json: Option<String>,
    list: bool,
    export_masks: Option<String>,
    pine: bool,
    pine_decode_trace: bool,
    mass: bool,
    backward: bool,
    cpu: bool,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut a = Args {
        smoke: false,
        reps: 30,
        warmup: 5,
        filter: None,
        json: None,
        list: false,
        export_masks: None,
        pine: false,
        pine_decode_trace: false,
        mass: false,
        backward: false,
        cpu: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--smoke" => a.smoke = true,
            "--list" => a.list = true,
            "--pine" => a.pine = true,
            "--pine-decode-trace" => a.pine_decode_trace = true,
            "--mass" => a.mass = true,
            "--backward" => a.backward = true,
            "--cpu" => a.cpu = true,
            "--reps" => a.reps = value("--reps")?.parse().map_err(|e| format!("--reps: {e}"))?,
            "--warmup" => a.warmup = value("--warmup")?.parse().map_err(|e| format!("--warmup: {e}"))?,
            "--filter" => a.filter = Some(value("--filter")?),
            "--json" => a.json = Some(value("--json")?),
            "--export-masks" => a.export_masks = Some(value("--export-masks")?),
            "-h" | "--help" => {
                return Err(
                    "usage: gpu_bench [--smoke] [--reps N] [--warmup N] [--filter SUBSTR] [--json FILE] \
                     [--list] [--export-masks FILE] [--pine] [--pine-decode-trace] [--mass] [--backward] [--cpu]"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.reps < 20 && !a.smoke {
        return Err(format!("--reps {}: at least 20 repetitions", a.reps));
    }
    if a.reps == 0 {
        return Err("--reps 0: at least one repetition".into());
    }
    if a.cpu && !(a.pine || a.mass || a.pine_decode_trace || a.backward) {
        return Err(
            "--cpu: only with --pine, --mass, --pine-decode-trace or --backward (a dry run of their code paths)".into(),
        );
    }
    Ok(a)
}

/// The mask families, in the order of bench/peers.py.
const MASKS: [&str; 6] = ["causal", "full", "documents8", "documents_ragged", "prefix_lm", "pine"];

/// Weights of the 8 ragged documents (the last takes the rounding remainder); same in peers.py.
const RAGGED: [usize; 8] = [3, 1, 4, 1, 5, 9, 2, 6];

/// Document lengths of the ragged layout of `len` tokens.
fn ragged_docs(len: usize) -> Vec<usize> {
    let total: usize = RAGGED.iter().sum();
    let mut lens: Vec<usize> = RAGGED.iter().map(|w| len * w / total).collect();
    let used: usize = lens.iter().sum();
    *lens.last_mut().expect("8 documents") += len - used;
    lens
}

/// PINE layout of `len` tokens: prefix 256, 20 segments (the first `rest % 20` one longer),
/// suffix 64 (scaled down for the smoke shapes).
fn pine_layout(len: usize) -> PineLayout {
    let (prefix, suffix, segs) = if len >= 1024 {
        (256, 64, 20)
    } else {
        (len / 8, len / 16, 6)
    };
    let rest = len - prefix - suffix;
    let lens: Vec<usize> = (0..segs).map(|i| rest / segs + usize::from(i < rest % segs)).collect();
    PineLayout::new(prefix, &lens, suffix)
}

fn build_mask(name: &str, len: usize, dev: &Device) -> Result<SegmentMask> {
    match name {
        "causal" => SegmentMask::causal(len, dev),
        "full" => SegmentMask::full(len, dev),
        "documents8" => {
            let lens: Vec<usize> = (0..8).map(|i| len / 8 + usize::from(i < len % 8)).collect();
            SegmentMask::documents(&[lens], dev)
        }
        "documents_ragged" => SegmentMask::documents(&[ragged_docs(len)], dev),
        "prefix_lm" => SegmentMask::prefix_lm(len, len / 2, dev),
        "pine" => {
            let l = pine_layout(len);
            SegmentMask::pine(l.prefix_len, &l.segment_lens, l.suffix_len, dev)
        }
        other => candle_core::bail!("unknown mask {other}"),
    }
}

#[derive(Clone, Copy, Debug)]
struct Shape {
    len: usize,
    batch: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

fn shapes(smoke: bool) -> Vec<Shape> {
    let (tokens, lens): (usize, &[usize]) = if smoke {
        (2048, &[256, 512])
    } else {
        (16384, &[1024, 2048, 4096, 8192, 16384])
    };
    let mut out = Vec::new();
    for head_dim in [64, 128] {
        for (heads, kv_heads) in [(16, 16), (32, 8)] {
            for &len in lens {
                out.push(Shape {
                    len,
                    batch: tokens / len,
                    heads,
                    kv_heads,
                    head_dim,
                });
            }
        }
    }
    // Head dim 256 (Gemma's; its own 64-row kernel): one length, H 16 / 16.
    let len = if smoke { 512 } else { 8192 };
    out.push(Shape {
        len,
        batch: tokens / len,
        heads: 16,
        kv_heads: 16,
        head_dim: 256,
    });
    out
}

fn label(mask: &str, s: &Shape) -> String {
    format!(
        "{mask} L{} B{} H{}/{} D{}",
        s.len, s.batch, s.heads, s.kv_heads, s.head_dim
    )
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

fn export_masks(path: &str, smoke: bool) -> Result<()> {
    let cpu = Device::Cpu;
    let mut lens: Vec<usize> = shapes(smoke).iter().map(|s| s.len).collect();
    lens.sort_unstable();
    lens.dedup();
    let mut masks = Vec::new();
    for &len in &lens {
        for name in MASKS {
            masks.push((name, len, build_mask(name, len, &cpu)?));
        }
    }
    mask_json::write_masks(path, masks)
}

/// Random bf16 inputs `[B, L, H, D]` on the GPU (normal, std 1).
fn inputs(s: &Shape, dev: &Device) -> Result<(Tensor, Tensor, Tensor)> {
    let q = Tensor::randn(0f32, 1.0, (s.batch, s.len, s.heads, s.head_dim), dev)?.to_dtype(DType::BF16)?;
    let k = Tensor::randn(0f32, 1.0, (s.batch, s.len, s.kv_heads, s.head_dim), dev)?.to_dtype(DType::BF16)?;
    let v = Tensor::randn(0f32, 1.0, (s.batch, s.len, s.kv_heads, s.head_dim), dev)?.to_dtype(DType::BF16)?;
    Ok((q, k, v))
}

struct Row {
    label: String,
    mask: &'static str,
    shape: Shape,
    visible: u64,
    kernel_ms: f64,
    api_ms: f64,
    kernel: &'static str,
}

fn bench_one(mask_name: &'static str, s: Shape, args: &Args, dev: &Device) -> Result<Row> {
    let Device::Cuda(cuda) = dev else {
        candle_core::bail!("not a CUDA device")
    };
    let stream = cuda.cuda_stream();
    let mask = build_mask(mask_name, s.len, dev)?;
    let visible = visible_pairs(&mask)? * s.batch as u64;
    let l2 = stream
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .ok()
        .and_then(|b| usize::try_from(b).ok())
        .filter(|&b| b > 0)
        .unwrap_or(L2_BYTES_DEFAULT);
    let set_bytes = 2 * s.batch * s.len * (s.heads + 2 * s.kv_heads) * s.head_dim;
    let sets = (4 * l2).div_ceil(set_bytes).clamp(2, 16);
    let mut prepared = Vec::with_capacity(sets);
    let mut tensors = Vec::with_capacity(sets);
    for _ in 0..sets {
        let (q, k, v) = inputs(&s, dev)?;
        prepared.push(PreparedForward::new(&q, &k, &v, &mask, None, true)?);
        tensors.push((q, k, v));
    }
    let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let ev =
        |e: candle_core::cuda_backend::cudarc::driver::DriverError| candle_core::Error::Msg(format!("CUDA event: {e}"));
    for i in 0..args.warmup {
        prepared[i % sets].launch()?;
    }
    stream.synchronize().map_err(ev)?;
    let mut events = Vec::with_capacity(args.reps);
    for i in 0..args.reps {
        let start = stream.record_event(timing).map_err(ev)?;
        prepared[i % sets].launch()?;
        let end = stream.record_event(timing).map_err(ev)?;
        events.push((start, end));
    }
    stream.synchronize().map_err(ev)?;
    let mut kernel_ms = Vec::with_capacity(args.reps);
    for (a, b) in &events {
        kernel_ms.push(f64::from(a.elapsed_ms(b).map_err(ev)?));
    }

    // The whole public call, wall clock.
    let mut api_ms = Vec::with_capacity(args.reps);
    for i in 0..args.warmup + args.reps {
        let (q, k, v) = &tensors[i % sets];
        stream.synchronize().map_err(ev)?;
        let t = Instant::now();
        let out = SegmentAttention::new(&mask).forward(q, k, v)?;
        stream.synchronize().map_err(ev)?;
        if i >= args.warmup {
            api_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        drop(out);
    }
    Ok(Row {
        label: label(mask_name, &s),
        mask: mask_name,
        shape: s,
        visible,
        kernel_ms: median(&mut kernel_ms),
        api_ms: median(&mut api_ms),
        kernel: prepared[0].kernel_name(),
    })
}

fn tflops(row: &Row, ms: f64) -> f64 {
    4.0 * row.shape.head_dim as f64 * row.shape.heads as f64 * row.visible as f64 / (ms * 1e-3) / 1e12
}

fn main() -> Result<()> {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let selected: Vec<(&'static str, Shape)> = shapes(args.smoke)
        .into_iter()
        .flat_map(|s| MASKS.iter().map(move |&m| (m, s)))
        .filter(|(m, s)| args.filter.as_ref().is_none_or(|f| label(m, s).contains(f.as_str())))
        .collect();
    if args.list {
        for (m, s) in &selected {
            println!("{}", label(m, s));
        }
        return Ok(());
    }
    if let Some(path) = &args.export_masks {
        return export_masks(path, args.smoke);
    }
    let dev = if args.cpu { Device::Cpu } else { Device::new_cuda(0)? };
    // candle runs on a stream of its own, which puts cudarc in multi-stream mode: every buffer
    // access records and waits on CUDA events (host time per launch). Single-stream users can turn
    // that off; SEGATTN_BENCH_EVENT_TRACKING=0 measures what it costs the small calls.
    #[cfg(feature = "cuda")]
    if let (Device::Cuda(d), Ok("0")) = (&dev, std::env::var("SEGATTN_BENCH_EVENT_TRACKING").as_deref()) {
        // SAFETY: one stream only (candle's); buffers created after this call are not tracked.
        unsafe { d.disable_event_tracking() };
        eprintln!("gpu_bench: cudarc event tracking disabled");
    }
    if args.pine_decode_trace {
        println!("{}", gpu_pine::decode_trace(&dev, args.smoke)?);
        return Ok(());
    }
    if args.pine {
        println!("{}", gpu_pine::run(&dev, args.reps, args.warmup, args.smoke)?);
        return Ok(());
    }
    if args.backward {
        gpu_backward::run(&dev, args.reps, args.warmup, args.smoke, visible_pairs)?;
        return Ok(());
    }
    if args.mass {
        println!(
            "{}",
            gpu_mass::run(&dev, args.reps, args.warmup, args.smoke, args.filter.as_deref())?
        );
        return Ok(());
    }
    println!(
        "segattn GPU benchmark: bf16, {} shapes, median of {} reps after {} warm-up, inputs rotated over >= 4x L2; \
         TFLOP/s = 4 D H x visible pairs / time",
        selected.len(),
        args.reps,
        args.warmup
    );
    println!(
        "{:<40} {:>14} {:>10} {:>9} {:>10} {:>9}  kernel",
        "shape", "visible pairs", "kernel ms", "TFLOP/s", "api ms", "TFLOP/s"
    );
    let mut json = String::new();
    for (m, s) in selected {
        let row = bench_one(m, s, &args, &dev)?;
        println!(
            "{:<40} {:>14} {:>10.3} {:>9.1} {:>10.3} {:>9.1}  {}",
            row.label,
            row.visible,
            row.kernel_ms,
            tflops(&row, row.kernel_ms),
            row.api_ms,
            tflops(&row, row.api_ms),
            row.kernel
        );
        let _ = writeln!(
            json,
            "{{\"impl\":\"segattn\",\"mask\":\"{}\",\"len\":{},\"batch\":{},\"heads\":{},\"kv_heads\":{},\"head_dim\":{},\
             \"dtype\":\"bf16\",\"visible_pairs\":{},\"ms\":{:.5},\"tflops\":{:.2},\"api_ms\":{:.5},\"api_tflops\":{:.2},\
             \"kernel\":\"{}\",\"reps\":{}}}",
            row.mask,
            s.len,
            s.batch,
            s.heads,
            s.kv_heads,
            s.head_dim,
            row.visible,
            row.kernel_ms,
            tflops(&row, row.kernel_ms),
            row.api_ms,
            tflops(&row, row.api_ms),
            row.kernel,
            args.reps
        );
        if let Some(path) = &args.json {
            std::fs::write(path, &json)?;
        }
    }
    Ok(())
}
