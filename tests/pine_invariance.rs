//! PINE's promise, checked end to end: permuting the segments of a prompt does not change what
//! comes after them. On one attention layer (random q, k, v) and on a whole tiny Llama (random
//! weights, `support/tiny_llama.rs`): the suffix / last-token outputs and greedy decoding are the
//! same in every segment order, the segment rows move with their segment — and the vanilla
//! (causal, sequence positions) baseline is shown to depend on the order.

#[path = "support/tiny_llama.rs"]
mod tiny_llama;

use candle_core::{Device, Result, Tensor};
use segattn::pine::{Llama3Scaling, PineAttention, PositionScheme, Rope};
use segattn::PineLayout;
use std::slice;

use tiny_llama::{Config, Generation, Rng, TinyLlama};

/// Max abs difference allowed between two segment orders under an order-invariant scheme (f32:
/// only the summation order differs).
const INVARIANT_TOL: f32 = 1e-4;
/// Min max-abs difference that shows a scheme depends on the order.
const ORDER_DEPENDENT_MIN: f32 = 1e-2;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// The layout with its segments in `order` (new segment `i` = old segment `order[i]`) and the
/// row gather that maps the old token sequence to the new one (`new[r] = old[index[r]]`).
fn permute(layout: &PineLayout, order: &[usize]) -> (PineLayout, Vec<u32>) {
    let mut starts = Vec::new();
    let mut s = layout.prefix_len;
    for &l in &layout.segment_lens {
        starts.push(s);
        s += l;
    }
    let mut index: Vec<u32> = (0..layout.prefix_len as u32).collect();
    for &j in order {
        index.extend((starts[j]..starts[j] + layout.segment_lens[j]).map(|r| r as u32));
    }
    index.extend(s as u32..layout.len() as u32);
    let lens: Vec<usize> = order.iter().map(|&j| layout.segment_lens[j]).collect();
    (PineLayout::new(layout.prefix_len, &lens, layout.suffix_len), index)
}

/// Rows of `x` `[B, L, ...]` gathered along dim 1.
fn gather(x: &Tensor, index: &[u32]) -> Result<Tensor> {
    let idx = Tensor::new(index, x.device())?;
    x.index_select(&idx, 1)
}

fn gather_tokens(tokens: &[u32], index: &[u32]) -> Vec<u32> {
    index.iter().map(|&i| tokens[i as usize]).collect()
}

// ---------------------------------------------------------------------------------------------
// One attention layer on random inputs.
// ---------------------------------------------------------------------------------------------

struct LayerCase {
    layout: PineLayout,
    order: Vec<usize>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rope: Rope,
}

/// One layer's outputs in the original segment order (`*_ref`; prefill rows gathered into the
/// permuted order) and in the permuted order (`*_perm`). Decode: two generated tokens as one
/// chunk, then a third alone; the generated tokens are the same in both orders.
struct LayerRun {
    prefill_ref: Tensor,
    prefill_perm: Tensor,
    decode_ref: Vec<Tensor>,
    decode_perm: Vec<Tensor>,
}

fn run_layer(case: &LayerCase, scheme: PositionScheme, seed: u64) -> Result<LayerRun> {
    let dev = Device::Cpu;
    let mut rng = Rng::new(seed);
    let (l, h, hkv, d) = (case.layout.len(), case.heads, case.kv_heads, case.head_dim);
    let q = rng.randn(&[1, l, h, d], 0.0, 1.0, &dev)?;
    let k = rng.randn(&[1, l, hkv, d], 0.0, 1.0, &dev)?;
    let v = rng.randn(&[1, l, hkv, d], 0.0, 1.0, &dev)?;
    // Three generated tokens, identical in both orders.
    let gq = rng.randn(&[1, 3, h, d], 0.0, 1.0, &dev)?;
    let gk = rng.randn(&[1, 3, hkv, d], 0.0, 1.0, &dev)?;
    let gv = rng.randn(&[1, 3, hkv, d], 0.0, 1.0, &dev)?;
    let (layout_p, index) = permute(&case.layout, &case.order);

    let one = |layout: &PineLayout, q: &Tensor, k: &Tensor, v: &Tensor| -> Result<(Tensor, Vec<Tensor>)> {
        let attn = PineAttention::new(slice::from_ref(layout), case.rope.clone())?.scheme(scheme);
        let out = attn.prefill(q, k, v)?.out;
        let k_all = attn.rotate_keys(&Tensor::cat(&[k, &gk], 1)?)?;
        let v_all = Tensor::cat(&[v, &gv], 1)?;
        // Chunk of the first 2 generated tokens, then the third alone.
        let chunk = attn.decode(
            &gq.narrow(1, 0, 2)?,
            &k_all.narrow(1, 0, l + 2)?,
            &v_all.narrow(1, 0, l + 2)?,
        )?;
        let single = attn.decode(&gq.narrow(1, 2, 1)?, &k_all, &v_all)?;
        Ok((out, vec![chunk.out, single.out]))
    };
    let (out_ref, decode_ref) = one(&case.layout, &q, &k, &v)?;
    let (prefill_perm, decode_perm) = one(
        &layout_p,
        &gather(&q, &index)?,
        &gather(&k, &index)?,
        &gather(&v, &index)?,
    )?;
    Ok(LayerRun {
        prefill_ref: gather(&out_ref, &index)?,
        prefill_perm,
        decode_ref,
        decode_perm,
    })
}

fn layer_cases() -> Vec<LayerCase> {
    vec![
        // 5 ragged segments, prefix and suffix, GQA 4:2.
        LayerCase {
            layout: PineLayout::new(5, &[7, 13, 4, 10, 9], 6),
            order: vec![3, 0, 4, 2, 1],
            heads: 4,
            kv_heads: 2,
            head_dim: 32,
            rope: Rope::new(10_000.0),
        },
        // 4 segments (one of a single token), GQA 8:2, D 64, Llama-3 scaled RoPE.
        LayerCase {
            layout: PineLayout::new(3, &[11, 1, 8, 17], 4),
            order: vec![2, 3, 1, 0],
            heads: 8,
            kv_heads: 2,
            head_dim: 64,
            rope: Rope::new(500_000.0).with_llama3_scaling(Llama3Scaling::llama31()),
        },
        // 3 segments, reversed, MHA.
        LayerCase {
            layout: PineLayout::new(2, &[9, 14, 6], 5),
            order: vec![2, 1, 0],
            heads: 2,
            kv_heads: 2,
            head_dim: 16,
            rope: Rope::new(10_000.0),
        },
        // 2 segments (the judge case: no importance scores for segment queries), swapped.
        LayerCase {
            layout: PineLayout::new(6, &[12, 19], 3),
            order: vec![1, 0],
            heads: 4,
            kv_heads: 1,
            head_dim: 32,
            rope: Rope::new(10_000.0),
        },
    ]
}

#[test]
fn layer_pine_is_segment_order_invariant() -> Result<()> {
    for (c, case) in layer_cases().iter().enumerate() {
        let run = run_layer(case, PositionScheme::Pine, 100 + c as u64)?;
        let layout = &case.layout;
        // Every row: prefix and suffix rows in place, segment rows moved with their segment.
        let diff = max_abs_diff(&run.prefill_ref, &run.prefill_perm)?;
        let suffix_start = layout.len() - layout.suffix_len;
        let suffix_diff = max_abs_diff(
            &run.prefill_ref.narrow(1, suffix_start, layout.suffix_len)?,
            &run.prefill_perm.narrow(1, suffix_start, layout.suffix_len)?,
        )?;
        assert!(
            diff <= INVARIANT_TOL,
            "case {c} {layout:?} order {:?}: PINE prefill differs across segment orders by {diff} (suffix rows: \
             {suffix_diff})",
            case.order
        );
        for (i, (a, b)) in run.decode_ref.iter().zip(&run.decode_perm).enumerate() {
            let diff = max_abs_diff(a, b)?;
            assert!(
                diff <= INVARIANT_TOL,
                "case {c} {layout:?} order {:?}: PINE decode call {i} differs across segment orders by {diff}",
                case.order
            );
        }
    }
    Ok(())
}

#[test]
fn layer_pcw_is_order_invariant_too() -> Result<()> {
    // PCW places every segment right after the prefix and blocks segments from each other, so it
    // is order-invariant by construction (at the cost of the cross-segment attention).
    for (c, case) in layer_cases().iter().enumerate() {
        let run = run_layer(case, PositionScheme::Pcw, 200 + c as u64)?;
        let diff = max_abs_diff(&run.prefill_ref, &run.prefill_perm)?;
        assert!(diff <= INVARIANT_TOL, "case {c}: PCW prefill differs by {diff}");
        for (a, b) in run.decode_ref.iter().zip(&run.decode_perm) {
            let diff = max_abs_diff(a, b)?;
            assert!(diff <= INVARIANT_TOL, "case {c}: PCW decode differs by {diff}");
        }
    }
    Ok(())
}

#[test]
fn layer_vanilla_and_nia_depend_on_the_order() -> Result<()> {
    for scheme in [PositionScheme::Vanilla, PositionScheme::Nia] {
        for (c, case) in layer_cases().iter().enumerate() {
            let run = run_layer(case, scheme, 300 + c as u64)?;
            let layout = &case.layout;
            let suffix_start = layout.len() - layout.suffix_len;
            let suffix_diff = max_abs_diff(
                &run.prefill_ref.narrow(1, suffix_start, layout.suffix_len)?,
                &run.prefill_perm.narrow(1, suffix_start, layout.suffix_len)?,
            )?;
            assert!(
                suffix_diff >= ORDER_DEPENDENT_MIN,
                "case {c} {scheme:?}: suffix rows differ by only {suffix_diff} across orders"
            );
            let decode_diff = max_abs_diff(&run.decode_ref[1], &run.decode_perm[1])?;
            assert!(
                decode_diff >= ORDER_DEPENDENT_MIN,
                "case {c} {scheme:?}: decode differs by only {decode_diff} across orders"
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The whole tiny model.
// ---------------------------------------------------------------------------------------------

/// A prompt: its layout and token ids.
struct Prompt {
    layout: PineLayout,
    tokens: Vec<u32>,
}

impl Prompt {
    fn prefill(&self, model: &TinyLlama, scheme: PositionScheme) -> Result<Tensor> {
        let (logits, _) = model.prefill(slice::from_ref(&self.tokens), slice::from_ref(&self.layout), scheme)?;
        Ok(logits)
    }

    fn generate(&self, model: &TinyLlama, scheme: PositionScheme) -> Result<Generation> {
        model.generate(
            slice::from_ref(&self.tokens),
            slice::from_ref(&self.layout),
            scheme,
            STEPS,
        )
    }
}

fn prompt(layout: PineLayout, vocab: usize, seed: u64) -> Prompt {
    let tokens = Rng::new(seed).tokens(layout.len(), vocab);
    Prompt { layout, tokens }
}

/// The same prompt with its segments in `order`, and the row gather of the permutation.
fn permuted(p: &Prompt, order: &[usize]) -> (Prompt, Vec<u32>) {
    let (layout, index) = permute(&p.layout, order);
    let tokens = gather_tokens(&p.tokens, &index);
    (Prompt { layout, tokens }, index)
}

const STEPS: usize = 4;

/// Judge (prefix, 2 answers, suffix) and RAG (5 documents; 4 documents of which two are the same
/// text, as retrieval often returns) prompts, each with a second order.
fn model_cases(vocab: usize) -> Vec<(&'static str, Prompt, Vec<usize>)> {
    let mut dup = prompt(PineLayout::new(9, &[14, 8, 14, 11], 7), vocab, 13);
    let first: Vec<u32> = dup.tokens[9..23].to_vec();
    dup.tokens.splice(31..45, first);
    vec![
        (
            "judge",
            prompt(PineLayout::new(12, &[30, 21], 6), vocab, 11),
            vec![1, 0],
        ),
        (
            "rag",
            prompt(PineLayout::new(9, &[14, 8, 19, 11, 16], 7), vocab, 12),
            vec![2, 4, 0, 3, 1],
        ),
        ("rag-duplicate", dup, vec![3, 0, 1, 2]),
    ]
}

fn models() -> Result<Vec<(&'static str, TinyLlama)>> {
    let dev = Device::Cpu;
    let scaled = Config {
        llama3_scaling: Some(Llama3Scaling::llama31()),
        rope_theta: 500_000.0,
        layers: 2,
        ..Config::tiny()
    };
    Ok(vec![
        ("tiny", TinyLlama::new(Config::tiny(), 7, &dev)?),
        ("tiny-llama3-rope", TinyLlama::new(scaled, 8, &dev)?),
    ])
}

#[test]
fn model_pine_logits_and_generation_are_order_invariant() -> Result<()> {
    for (name, model) in models()? {
        for (case, p, order) in model_cases(model.config().vocab) {
            let (pp, index) = permuted(&p, &order);
            let scheme = PositionScheme::Pine;
            // Full logits: every row, segment rows moved with their segment.
            let logits = p.prefill(&model, scheme)?;
            let logits_p = pp.prefill(&model, scheme)?;
            let diff = max_abs_diff(&gather(&logits, &index)?, &logits_p)?;
            assert!(
                diff <= INVARIANT_TOL,
                "{name}/{case}: PINE prefill logits differ across orders by {diff}"
            );

            let a = p.generate(&model, scheme)?;
            let b = pp.generate(&model, scheme)?;
            assert_eq!(
                a.tokens, b.tokens,
                "{name}/{case}: PINE greedy tokens differ across orders"
            );
            for (i, (la, lb)) in a.logits.iter().zip(&b.logits).enumerate() {
                let diff = max_abs_diff(la, lb)?;
                assert!(
                    diff <= INVARIANT_TOL,
                    "{name}/{case}: PINE logits of generated token {i} differ across orders by {diff}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn model_vanilla_depends_on_the_order() -> Result<()> {
    for (name, model) in models()? {
        for (case, p, order) in model_cases(model.config().vocab) {
            let (pp, _) = permuted(&p, &order);
            let scheme = PositionScheme::Vanilla;
            let a = p.generate(&model, scheme)?;
            let b = pp.generate(&model, scheme)?;
            for (i, (la, lb)) in a.logits.iter().zip(&b.logits).enumerate() {
                let diff = max_abs_diff(la, lb)?;
                assert!(
                    diff >= ORDER_DEPENDENT_MIN,
                    "{name}/{case}: vanilla logits of generated token {i} differ by only {diff} across orders"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn model_batch_of_two_orders_equals_single_rows() -> Result<()> {
    // Both orders as the two rows of one batch (per-row layouts, same total length): each row
    // equals its single-row run, and under PINE the two rows equal each other.
    let tol = 1e-5;
    for (name, model) in models()? {
        for (case, p, order) in model_cases(model.config().vocab) {
            let (pp, _) = permuted(&p, &order);
            for scheme in [PositionScheme::Pine, PositionScheme::Vanilla] {
                let tokens = [p.tokens.clone(), pp.tokens.clone()];
                let layouts = [p.layout.clone(), pp.layout.clone()];
                let batch = model.generate(&tokens, &layouts, scheme, STEPS)?;
                let (full, _) = model.prefill(&tokens, &layouts, scheme)?;
                for row in 0..2 {
                    let single = model.generate(&tokens[row..=row], &layouts[row..=row], scheme, STEPS)?;
                    let (single_full, _) = model.prefill(&tokens[row..=row], &layouts[row..=row], scheme)?;
                    let diff = max_abs_diff(&full.narrow(0, row, 1)?, &single_full)?;
                    assert!(
                        diff <= tol,
                        "{name}/{case} {scheme:?} row {row}: batched prefill logits differ by {diff}"
                    );
                    assert_eq!(
                        batch.tokens[row], single.tokens[0],
                        "{name}/{case} {scheme:?} row {row}: tokens"
                    );
                    for (i, (lb, ls)) in batch.logits.iter().zip(&single.logits).enumerate() {
                        let diff = max_abs_diff(&lb.narrow(0, row, 1)?, ls)?;
                        assert!(
                            diff <= tol,
                            "{name}/{case} {scheme:?} row {row}: batched logits of generated token {i} differ by {diff}"
                        );
                    }
                }
                if scheme == PositionScheme::Pine {
                    assert_eq!(
                        batch.tokens[0], batch.tokens[1],
                        "{name}/{case}: PINE batch rows generate differently"
                    );
                    for (i, l) in batch.logits.iter().enumerate() {
                        let diff = max_abs_diff(&l.narrow(0, 0, 1)?, &l.narrow(0, 1, 1)?)?;
                        assert!(
                            diff <= INVARIANT_TOL,
                            "{name}/{case}: PINE batch rows differ at token {i} by {diff}"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn model_decode_matches_prefill_of_the_extended_prompt() -> Result<()> {
    // Generated tokens are suffix tokens: prefill over prompt + generated tokens (suffix grown by
    // STEPS - 1) gives the logits that the KV-cache decode steps gave.
    for (name, model) in models()? {
        for (case, p, _) in model_cases(model.config().vocab) {
            for scheme in [
                PositionScheme::Pine,
                PositionScheme::Vanilla,
                PositionScheme::Pcw,
                PositionScheme::Nia,
            ] {
                let gen = p.generate(&model, scheme)?;
                let mut tokens = p.tokens.clone();
                tokens.extend_from_slice(&gen.tokens[0][..STEPS - 1]);
                let mut layout = p.layout.clone();
                layout.suffix_len += STEPS - 1;
                let (logits, _) = model.prefill(&[tokens], &[layout], scheme)?;
                let start = p.layout.len() - 1;
                for (i, l) in gen.logits.iter().enumerate() {
                    let diff = max_abs_diff(&logits.narrow(1, start + i, 1)?.squeeze(1)?, l)?;
                    assert!(
                        diff <= INVARIANT_TOL,
                        "{name}/{case} {scheme:?}: decode logits of token {i} differ from prefill by {diff}"
                    );
                }
            }
        }
    }
    Ok(())
}
