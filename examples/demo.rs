//! The segattn demo: a PINE-style prompt (prefix, 16 documents, question) through the fused
//! attention and through the exact reference; prints the error, both times, the mask of every
//! preset as ASCII, and writes the same pictures to an SVG file.
//!
//! ```text
//! cargo run --release --example demo                  # CPU (default)
//! cargo run --release --example demo -- --svg out.svg # picture elsewhere (default docs/masks.svg)
//! ```

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use segattn::mask::tiles::{tile_map, TileClass};
use segattn::{reference, PineLayout, SegmentAttention, SegmentMask};

/// A small layout of each preset, drawn one character per token.
fn presets(dev: &Device) -> Result<Vec<(&'static str, SegmentMask)>> {
    Ok(vec![
        ("causal", SegmentMask::causal(32, dev)?),
        ("full", SegmentMask::full(32, dev)?),
        ("documents [10, 6, 16]", SegmentMask::documents(&[&[10, 6, 16]], dev)?),
        (
            "documents_bidirectional [10, 6, 16]",
            SegmentMask::documents_bidirectional(&[&[10, 6, 16]], dev)?,
        ),
        ("prefix_lm(12)", SegmentMask::prefix_lm(32, 12, dev)?),
        ("pine(4, [7, 5, 8], 8)", SegmentMask::pine(4, &[7, 5, 8], 8, dev)?),
        (
            "packed_prompts [pine(2,[5,4],3), pine(2,[6,5,2],3)]",
            SegmentMask::packed_prompts(
                &[PineLayout::new(2, &[5, 4], 3), PineLayout::new(2, &[6, 5, 2], 3)],
                dev,
            )?,
        ),
    ])
}

fn ascii(mask: &SegmentMask, len: usize) -> Result<String> {
    let dense = reference::dense_mask(mask, 1, len, len)?.to_vec3::<u8>()?;
    let mut s = String::new();
    for row in &dense[0] {
        s.extend(row.iter().map(|&v| if v == 1 { '#' } else { '.' }));
        s.push('\n');
    }
    Ok(s)
}

/// One SVG with a panel per preset: dark squares where the key (column) is visible to the query
/// (row).
fn svg(panels: &[(&str, SegmentMask)], len: usize) -> Result<String> {
    let cell = 6;
    let (panel, gap, title) = (len * cell, 30, 40);
    let cols = 4;
    let rows = panels.len().div_ceil(cols);
    let width = cols * (panel + gap) + gap;
    let height = rows * (panel + title + gap) + gap;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"monospace\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (n, (name, mask)) in panels.iter().enumerate() {
        let x0 = gap + (n % cols) * (panel + gap);
        let y0 = gap + (n / cols) * (panel + title + gap);
        s += &format!("<text x=\"{x0}\" y=\"{}\">{name}</text>\n", y0 + 12);
        let y0 = y0 + title - 16;
        s += &format!(
            "<rect x=\"{x0}\" y=\"{y0}\" width=\"{panel}\" height=\"{panel}\" fill=\"#f4f4f4\" stroke=\"#999\"/>\n"
        );
        let dense = reference::dense_mask(mask, 1, len, len)?.to_vec3::<u8>()?;
        for (i, row) in dense[0].iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                if v == 1 {
                    s += &format!(
                        "<rect x=\"{}\" y=\"{}\" width=\"{cell}\" height=\"{cell}\" fill=\"#2b5797\"/>\n",
                        x0 + j * cell,
                        y0 + i * cell
                    );
                }
            }
        }
    }
    s += "</svg>\n";
    Ok(s)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()
}

fn main() -> Result<()> {
    let svg_path = std::env::args()
        .skip_while(|a| a != "--svg")
        .nth(1)
        .unwrap_or_else(|| "docs/masks.svg".to_string());
    let dev = Device::Cpu;

    println!("== Mask presets (row = query, column = key, # = visible) ==\n");
    let panels = presets(&dev)?;
    for (name, mask) in &panels {
        println!("{name}\n{}", ascii(mask, 32)?);
    }
    std::fs::write(&svg_path, svg(&panels, 32)?)?;
    println!("(the same pictures: {svg_path})\n");

    // A RAG-style PINE prompt: instruction, 16 retrieved documents, question.
    let (prefix, docs, suffix) = (64, vec![96usize; 16], 64);
    let mask = SegmentMask::pine(prefix, &docs, suffix, &dev)?;
    let n = prefix + docs.iter().sum::<usize>() + suffix;
    let (b, h, hkv, d) = (1, 8, 2, 64);
    println!("== PINE prompt: prefix {prefix}, {} documents of {}, suffix {suffix}: N = {n}, H = {h}, Hkv = {hkv}, D = {d}, bf16 ==", docs.len(), docs[0]);
    let q = Tensor::randn(0f32, 1.0, (b, n, h, d), &dev)?.to_dtype(DType::BF16)?;
    let k = Tensor::randn(0f32, 1.0, (b, n, hkv, d), &dev)?.to_dtype(DType::BF16)?;
    let v = Tensor::randn(0f32, 1.0, (b, n, hkv, d), &dev)?.to_dtype(DType::BF16)?;

    let attn = SegmentAttention::new(&mask).return_lse(true);
    attn.forward(&q, &k, &v)?; // warm-up (thread pool)
    let t = Instant::now();
    let fused = attn.forward(&q, &k, &v)?;
    let fused_time = t.elapsed();
    let t = Instant::now();
    let exact = reference::attention(&q, &k, &v, &mask, None)?;
    let reference_time = t.elapsed();

    let classes = tile_map(&mask, 1, 0, (n, n), (64, 64))?;
    let count = |c: TileClass| classes.iter().filter(|&&x| x == c).count();
    println!(
        "64x64 tiles: {} skipped, {} full, {} partial (of {})",
        count(TileClass::Skip),
        count(TileClass::Full),
        count(TileClass::Partial),
        classes.len()
    );
    let tiles_per_row = n.div_ceil(64);
    for row in classes.chunks(tiles_per_row) {
        let line: String = row
            .iter()
            .map(|c| match c {
                TileClass::Skip => '.',
                TileClass::Partial => '+',
                TileClass::Full => '#',
            })
            .collect();
        println!("  {line}");
    }
    println!("  (. skipped, + partial: per-element mask, # full: no per-element test)\n");
    println!(
        "max |fused - reference| output: {:.3e} (bf16 keeps 8 significant bits: 3.9e-3 relative)",
        max_abs_diff(&fused.out, &exact.out)?
    );
    println!(
        "max |fused - reference| LSE:    {:.3e}",
        max_abs_diff(fused.lse.as_ref().expect("asked"), &exact.lse)?
    );
    println!("fused CPU attention: {:>10.2} ms", fused_time.as_secs_f64() * 1e3);
    println!("f64 reference:       {:>10.2} ms", reference_time.as_secs_f64() * 1e3);
    Ok(())
}
