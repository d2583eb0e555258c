//! Multi-hop-QA-style attention analysis with the fused per-segment mass: for a prompt of several
//! documents and a question, how much attention the question tokens and the answer tokens pay
//! to each document, per layer and head. Prints a table and draws a heat map (SVG).
//!
//! ```text
//! cargo run --release --example segment_attention_map
//! cargo run --release --example segment_attention_map -- --svg out.svg --docs 8 --layers 4 --heads 8 --gold 5
//! ```
//!
//! The model is a TINY RANDOM one (no weights are downloaded): token embeddings are random, each
//! layer has random projections, and the query and key projections of a head are TIED (q = x W,
//! k = x W), so that q . k grows with the similarity of two tokens. To give the map something to
//! find, the question and answer tokens and the tokens of one "gold" document share a random
//! direction in embedding space: a correct map lights up that document. Positions: no RoPE (as
//! PINE scores un-rotated q and k).
//!
//! Prompt layout and segment ids: `[system: 0][doc 1: 1] ... [doc n: n][question: n+1][answer: n+2]`.
//! Mask `--mask causal` (default; a decoder) or `--mask prefix-lm` (the "Masking in Multi-hop QA"
//! prefill: the whole prompt bidirectional, the answer causal). Each layer runs
//! `SegmentAttention::return_segment_mass` with a mean over each query segment: `[1, H, Sq, Sk]`,
//! rows = query segment ids, columns = key segment ids, in the same pass as the attention output.

use std::fmt::Write as _;

use candle_core::{DType, Device, Result, Tensor, D};
use segattn::{PairRule, QueryReduction, SegmentAttention, SegmentMask, SegmentScoreOptions, Visibility};

struct Args {
    svg: String,
    docs: usize,
    doc_len: usize,
    layers: usize,
    heads: usize,
    gold: usize,
    mask: String,
    seed: u64,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut a = Args {
        svg: "target/segment_map.svg".into(),
        docs: 6,
        doc_len: 96,
        layers: 3,
        heads: 8,
        gold: 4,
        mask: "causal".into(),
        seed: 7,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String| v.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--svg" => a.svg = value()?,
            "--docs" => a.docs = num(value()?)?,
            "--doc-len" => a.doc_len = num(value()?)?,
            "--layers" => a.layers = num(value()?)?,
            "--heads" => a.heads = num(value()?)?,
            "--gold" => a.gold = num(value()?)?,
            "--mask" => a.mask = value()?,
            "--seed" => a.seed = num(value()?)? as u64,
            "--help" | "-h" => {
                return Err(
                    "usage: segment_attention_map [--svg PATH] [--docs N] [--doc-len L] [--layers N] \
                            [--heads H] [--gold DOC (1-based)] [--mask causal|prefix-lm] [--seed S]"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other} (try --help)")),
        }
    }
    if a.docs == 0 || a.gold == 0 || a.gold > a.docs || a.layers == 0 || a.heads == 0 || a.doc_len == 0 {
        return Err(format!(
            "need --docs >= 1, 1 <= --gold <= --docs, --layers, --heads, --doc-len >= 1 (got docs {}, gold {})",
            a.docs, a.gold
        ));
    }
    if a.mask != "causal" && a.mask != "prefix-lm" {
        return Err(format!("--mask: expected causal or prefix-lm, got {}", a.mask));
    }
    Ok(a)
}

/// xorshift64*: deterministic random numbers without a dependency.
struct Rng(u64);

impl Rng {
    fn normal(&mut self) -> f32 {
        // Sum of 4 uniforms, centred and scaled: close enough to N(0, 1) for random weights.
        let mut s = 0.0;
        for _ in 0..4 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            s += (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f32 / (1u64 << 53) as f32;
        }
        (s - 2.0) * 3f32.sqrt()
    }
    fn tensor(&mut self, shape: &[usize], std: f32) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| std * self.normal()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }
}

const SYSTEM_LEN: usize = 24;
const QUESTION_LEN: usize = 20;
const ANSWER_LEN: usize = 12;
const D_MODEL: usize = 256;
const HEAD_DIM: usize = 64;
/// How much of the shared topic direction the gold document, question and answer tokens carry
/// (embeddings are N(0, 1) per coordinate): enough to be found, not enough to drown the rest.
const TOPIC_STRENGTH: f32 = 0.7;

/// `x / rms(x)` over the last dim.
fn rms_norm(x: &Tensor) -> Result<Tensor> {
    let rms = x.sqr()?.mean_keepdim(D::Minus1)?.sqrt()?;
    x.broadcast_div(&(rms + 1e-6)?)
}

/// Mass per layer: `[layer][head][query id][key id]`.
type Maps = Vec<Vec<Vec<Vec<f32>>>>;

fn run(a: &Args) -> Result<(Maps, Vec<usize>)> {
    let dev = Device::Cpu;
    let mut rng = Rng(a.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let n_docs = a.docs;
    let lens: Vec<usize> = std::iter::once(SYSTEM_LEN)
        .chain(std::iter::repeat_n(a.doc_len, n_docs))
        .chain([QUESTION_LEN, ANSWER_LEN])
        .collect();
    let n: usize = lens.iter().sum();
    let ids: Vec<u32> = lens
        .iter()
        .enumerate()
        .flat_map(|(s, &l)| std::iter::repeat_n(s as u32, l))
        .collect();
    let ids_t = Tensor::from_vec(ids.clone(), (1, n), &dev)?;
    let answer = (n_docs + 2) as u32;
    let mask = if a.mask == "causal" {
        SegmentMask::self_attention(&ids_t, PairRule::new(Visibility::Causal, Visibility::Causal))?
    } else {
        // Prompt bidirectional, answer causal over everything.
        let s = n_docs + 3;
        let rows: Vec<Vec<Option<Visibility>>> = (0..s)
            .map(|q| {
                (0..s)
                    .map(|k| {
                        Some(if q as u32 == answer {
                            Visibility::Causal
                        } else if k as u32 == answer {
                            Visibility::Blocked
                        } else {
                            Visibility::Full
                        })
                    })
                    .collect()
            })
            .collect();
        SegmentMask::self_attention(
            &ids_t,
            PairRule::new(Visibility::Causal, Visibility::Causal)
                .with_table(segattn::PairTable::from_rules(&rows, &dev)?),
        )?
    };

    // Embeddings: random, plus a shared "topic" direction in the gold document, the question and
    // the answer.
    let topic = rng.tensor(&[1, 1, D_MODEL], 1.0)?;
    let mut x = rng.tensor(&[1, n, D_MODEL], 1.0)?;
    let gold_range = {
        let start: usize = lens[..a.gold].iter().sum();
        start..start + lens[a.gold]
    };
    let q_start: usize = lens[..n_docs + 1].iter().sum();
    let plant: Vec<f32> = (0..n)
        .map(|i| {
            if gold_range.contains(&i) || i >= q_start {
                TOPIC_STRENGTH
            } else {
                0.0
            }
        })
        .collect();
    let plant = Tensor::from_vec(plant, (1, n, 1), &dev)?;
    x = (x + plant.broadcast_mul(&topic)?)?;

    let h = a.heads;
    let opts = SegmentScoreOptions::new().query_reduction(QueryReduction::MeanBySegment);
    let mut maps = Vec::new();
    for _layer in 0..a.layers {
        let xn = rms_norm(&x)?;
        // Tied query/key projection per head, a value projection and an output projection.
        let w = rng.tensor(&[D_MODEL, h * HEAD_DIM], 1.0 / (D_MODEL as f32).sqrt())?;
        let wv = rng.tensor(&[D_MODEL, h * HEAD_DIM], 1.0 / (D_MODEL as f32).sqrt())?;
        let wo = rng.tensor(&[h * HEAD_DIM, D_MODEL], 0.5 / ((h * HEAD_DIM) as f32).sqrt())?;
        let flat = xn.reshape((n, D_MODEL))?;
        let qk = flat.matmul(&w)?.reshape((1, n, h, HEAD_DIM))?;
        let v = flat.matmul(&wv)?.reshape((1, n, h, HEAD_DIM))?;
        let res = SegmentAttention::new(&mask)
            .return_segment_mass(opts)
            .forward(&qk, &qk, &v)?;
        let mass = res.segment_mass.expect("asked for").squeeze(0)?; // [H, Sq, Sk]
        maps.push(mass.to_dtype(DType::F32)?.to_vec3::<f32>()?);
        let out = res
            .out
            .reshape((n, h * HEAD_DIM))?
            .matmul(&wo)?
            .reshape((1, n, D_MODEL))?;
        x = (x + out)?;
    }
    Ok((maps, lens))
}

/// The two query segments analysed: question and answer.
fn rows_of(n_docs: usize) -> [(&'static str, usize); 2] {
    [("question", n_docs + 1), ("answer", n_docs + 2)]
}

fn table(a: &Args, maps: &Maps) -> String {
    let n_docs = a.docs;
    let mut s = String::new();
    for (name, qid) in rows_of(n_docs) {
        writeln!(
            s,
            "\nAttention mass of the {name} tokens (mean over its tokens), % per key segment:\n"
        )
        .unwrap();
        write!(s, "| layer.head | system |").unwrap();
        for d in 1..=n_docs {
            let star = if d == a.gold { "*" } else { "" };
            write!(s, " doc {d}{star} |").unwrap();
        }
        writeln!(s, " question | answer | top doc |").unwrap();
        writeln!(s, "|---|{}", "---:|".repeat(n_docs + 4)).unwrap();
        for (l, layer) in maps.iter().enumerate() {
            for (h, head) in layer.iter().enumerate() {
                let row = &head[qid];
                write!(s, "| {l}.{h} |").unwrap();
                for x in row {
                    write!(s, " {:.1} |", 100.0 * x).unwrap();
                }
                let top = (1..=n_docs)
                    .max_by(|&i, &j| row[i].total_cmp(&row[j]))
                    .expect("at least one document");
                writeln!(s, " doc {top} |").unwrap();
            }
        }
    }
    s
}

/// White -> dark blue for a share in [0, max].
fn color(v: f32, max: f32) -> String {
    let t = if max > 0.0 { (v / max).clamp(0.0, 1.0) } else { 0.0 };
    let lerp = |a: f32, b: f32| (a + (b - a) * t).round() as u8;
    format!(
        "#{:02x}{:02x}{:02x}",
        lerp(255.0, 8.0),
        lerp(255.0, 48.0),
        lerp(255.0, 107.0)
    )
}

fn svg(a: &Args, maps: &Maps) -> String {
    let n_docs = a.docs;
    let rows = a.layers * a.heads;
    let (cell_w, cell_h) = (44usize, 16usize);
    let (left, top, gap) = (70usize, 70usize, 60usize);
    let panel_w = n_docs * cell_w;
    let width = left + 2 * panel_w + gap + 30;
    let height = top + rows * cell_h + 40;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"monospace\" \
         font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    writeln!(
        s,
        "<text x=\"{left}\" y=\"18\" font-size=\"13\">Attention mass on each document per layer.head (tiny random \
         model, gold document {} marked *, mask {})</text>",
        a.gold, a.mask
    )
    .unwrap();
    for (p, (name, qid)) in rows_of(n_docs).into_iter().enumerate() {
        let x0 = left + p * (panel_w + gap);
        // Colour scale per panel: its largest document share.
        let max = maps
            .iter()
            .flatten()
            .flat_map(|head| head[qid][1..=n_docs].iter().copied())
            .fold(0.0f32, f32::max);
        writeln!(
            s,
            "<text x=\"{x0}\" y=\"40\" font-size=\"12\">{name} tokens -> documents (max {:.0}%)</text>",
            100.0 * max
        )
        .unwrap();
        for d in 1..=n_docs {
            let star = if d == a.gold { "*" } else { "" };
            writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">doc {d}{star}</text>",
                x0 + (d - 1) * cell_w + cell_w / 2,
                top - 8
            )
            .unwrap();
        }
        for (l, layer) in maps.iter().enumerate() {
            for (h, head) in layer.iter().enumerate() {
                let y = top + (l * a.heads + h) * cell_h;
                if p == 0 {
                    writeln!(s, "<text x=\"8\" y=\"{}\">L{l} H{h}</text>", y + cell_h - 4).unwrap();
                }
                for (d, &v) in head[qid].iter().enumerate().take(n_docs + 1).skip(1) {
                    writeln!(
                        s,
                        "<rect x=\"{}\" y=\"{y}\" width=\"{cell_w}\" height=\"{cell_h}\" fill=\"{}\" \
                         stroke=\"#dddddd\"><title>L{l} H{h} {name} -> doc {d}: {:.1}%</title></rect>",
                        x0 + (d - 1) * cell_w,
                        color(v, max),
                        100.0 * v
                    )
                    .unwrap();
                }
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

fn main() -> Result<()> {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let (maps, lens) = run(&args)?;
    println!(
        "Prompt: system {} tokens, {} documents of {} tokens (gold: doc {}), question {} tokens, answer {} \
         tokens; {} tokens, mask {}; {} layers x {} heads, head dim {HEAD_DIM}; tiny random model (tied q/k \
         projections, planted topic).",
        lens[0],
        args.docs,
        args.doc_len,
        args.gold,
        QUESTION_LEN,
        ANSWER_LEN,
        lens.iter().sum::<usize>(),
        args.mask,
        args.layers,
        args.heads
    );
    print!("{}", table(&args, &maps));
    let hits = maps
        .iter()
        .flatten()
        .filter(|head| {
            let row = &head[args.docs + 1];
            (1..=args.docs).max_by(|&i, &j| row[i].total_cmp(&row[j])) == Some(args.gold)
        })
        .count();
    println!(
        "\nThe question's top document is the gold one in {hits} of {} layer.heads.",
        args.layers * args.heads
    );
    let path = std::path::Path::new(&args.svg);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, svg(&args, &maps))?;
    println!("Heat map written to {}", path.display());
    Ok(())
}
