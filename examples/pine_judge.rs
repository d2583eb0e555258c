//! LM-as-a-judge with a tiny random Llama: the same prompt (system prompt, answer A, answer B,
//! assistant header) with the two answers in both orders, under vanilla attention and under PINE.
//! Vanilla's next-token distribution depends on which answer comes first; PINE's does not.
//!
//! cargo run --release --example pine_judge

#[path = "../tests/support/tiny_llama.rs"]
mod tiny_llama;

use std::time::Instant;

use candle_core::{Device, Result, Tensor, D};
use segattn::pine::PositionScheme;
use segattn::PineLayout;
use tiny_llama::{Config, Rng, TinyLlama};

const STEPS: usize = 6;
const REPEATS: usize = 5;

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = Config {
        layers: 4,
        ..Config::tiny()
    };
    let model = TinyLlama::new(cfg.clone(), 42, &dev)?;
    let mut rng = Rng::new(2025);
    let (prefix, a, b, suffix) = (
        rng.tokens(32, cfg.vocab),
        rng.tokens(60, cfg.vocab),
        rng.tokens(45, cfg.vocab),
        rng.tokens(8, cfg.vocab),
    );
    let orders = [
        (
            "A,B",
            [&prefix[..], &a, &b, &suffix].concat(),
            PineLayout::new(32, &[60, 45], 8),
        ),
        (
            "B,A",
            [&prefix[..], &b, &a, &suffix].concat(),
            PineLayout::new(32, &[45, 60], 8),
        ),
    ];
    println!(
        "tiny Llama: {} layers, hidden {}, heads {}/{} (q/kv), head dim {}, vocab {}; prompt {} tokens \
         (prefix 32, answers 60 + 45, suffix 8), f32, CPU\n",
        cfg.layers,
        cfg.hidden,
        cfg.heads,
        cfg.kv_heads,
        cfg.head_dim,
        cfg.vocab,
        orders[0].1.len()
    );

    for scheme in [PositionScheme::Vanilla, PositionScheme::Pine] {
        println!("== {scheme:?}");
        let mut last = Vec::new();
        for (name, tokens, layout) in &orders {
            let gen = model.generate(
                std::slice::from_ref(tokens),
                std::slice::from_ref(layout),
                scheme,
                STEPS,
            )?;
            let logits = gen.logits[0].squeeze(0)?;
            println!(
                "  order {name}: top-5 next {}   greedy {:?}",
                top5(&logits)?,
                gen.tokens[0]
            );
            last.push(gen.logits);
        }
        let first = diff(&last[0][0], &last[1][0])?;
        let worst = (0..STEPS)
            .map(|i| diff(&last[0][i], &last[1][i]))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .fold(0f32, f32::max);
        println!(
            "  max |logits(A,B) - logits(B,A)|: last prompt token {first:.2e}, over {STEPS} greedy steps {worst:.2e}"
        );

        let (tokens, layout) = (&orders[0].1, &orders[0].2);
        let (prefill, decode) = timings(&model, tokens, layout, scheme)?;
        println!("  wall time: prefill {prefill:.2} ms, decode step {decode:.3} ms (best of {REPEATS})\n");
    }
    Ok(())
}

fn diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// "id (logit)" of the 5 largest logits of `[vocab]`.
fn top5(logits: &Tensor) -> Result<String> {
    let v: Vec<f32> = logits.to_vec1()?;
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&i, &j| v[j].total_cmp(&v[i]));
    Ok(idx[..5]
        .iter()
        .map(|&i| format!("{i:>3} ({:.3})", v[i]))
        .collect::<Vec<_>>()
        .join(" "))
}

/// Best-of-REPEATS wall time of the prefill and of one decode step, in ms.
fn timings(model: &TinyLlama, tokens: &[u32], layout: &PineLayout, scheme: PositionScheme) -> Result<(f64, f64)> {
    let (mut prefill, mut decode) = (f64::MAX, f64::MAX);
    for _ in 0..REPEATS {
        let t = Instant::now();
        let (logits, mut cache) = model.prefill(&[tokens.to_vec()], std::slice::from_ref(layout), scheme)?;
        let next: Vec<u32> = logits
            .narrow(1, tokens.len() - 1, 1)?
            .squeeze(1)?
            .argmax(D::Minus1)?
            .to_vec1()?;
        prefill = prefill.min(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let step = model.decode_step(&mut cache, &next)?;
        step.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        decode = decode.min(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok((prefill, decode))
}
