//! The README's Rust examples, compiled and run. Each ```rust block of README.md sits verbatim
//! below between a `// README begin` and a `// README end` line (a setup before it where the
//! README's block reuses an earlier one's tensors, checks after it), and
//! `every_readme_block_is_tested_here` fails when a block of the README is not found here: edit
//! both together.

// The README's blocks show a call, then an option of it under the same name.
#![allow(unused_variables)]

use candle_core::{Result, Tensor};

/// How many rows of a `[B, H, Lq, Sk]` mass sum to 1 over their segments (every row sees a key).
fn mass_of_each_row(mass: &Tensor) -> Result<usize> {
    let sums = mass.sum(3)?.flatten_all()?.to_vec1::<f32>()?;
    let heads = mass.dim(1)?;
    Ok(sums.iter().filter(|s| (**s - 1.0).abs() < 1e-4).count() / heads)
}

#[test]
#[rustfmt::skip]
fn readme_api() -> Result<()> {
// README begin
use candle_core::{Device, Tensor};
use segattn::{segment_attention, SegmentAttention, SegmentMask};

let dev = Device::Cpu;
// q: [B, Lq, H, D]; k, v: [B, Lk, Hkv, D] (H % Hkv == 0: GQA / MQA by indexing, K/V never repeated)
let q = Tensor::randn(0f32, 1.0, (1, 512, 8, 64), &dev)?;
let k = Tensor::randn(0f32, 1.0, (1, 512, 2, 64), &dev)?;
let v = Tensor::randn(0f32, 1.0, (1, 512, 2, 64), &dev)?;

// A PINE prompt: 64-token prefix, three documents, 32-token question.
let mask = SegmentMask::pine(64, &[160, 128, 128], 32, &dev)?;
let out = segment_attention(&q, &k, &v, &mask)?;                 // [B, Lq, H, D], dtype of q

// Options: scale (default 1/sqrt(D)) and the log-sum-exp [B, H, Lq] (f32, natural log).
let res = SegmentAttention::new(&mask).scale(0.125).return_lse(true).forward(&q, &k, &v)?;
let (out, lse) = (res.out, res.lse.unwrap());
// README end
assert_eq!(out.dims(), &[1, 512, 8, 64]);
assert_eq!(lse.dims(), &[1, 8, 512]);
assert_eq!(segment_attention(&q, &k, &v, &mask)?.dims(), &[1, 512, 8, 64]);
Ok(())
}

#[test]
#[rustfmt::skip]
fn readme_training() -> Result<()> {
// README begin
use candle_core::{Device, Tensor, Var};
use segattn::{segment_attention, SegmentMask};

let dev = Device::Cpu;
let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 512, 8, 64), &dev)?)?;
let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 512, 2, 64), &dev)?)?;
let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 512, 2, 64), &dev)?)?;
let mask = SegmentMask::documents(&[&[200, 180, 132]], &dev)?; // three packed documents
let out = segment_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask)?;
let grads = out.sqr()?.sum_all()?.backward()?;
let dq = grads.get(q.as_tensor()).unwrap(); // [1, 512, 8, 64]
// README end
assert_eq!(dq.dims(), &[1, 512, 8, 64]);
assert!(grads.get(k.as_tensor()).is_some() && grads.get(v.as_tensor()).is_some());
Ok(())
}

#[test]
#[rustfmt::skip]
fn readme_custom_mask() -> Result<()> {
use candle_core::{Device, Tensor};
let dev = Device::Cpu;
// README begin
use segattn::{PairRule, PairTable, SegmentMask, Visibility};
// Three segments: 0 a system prompt, 1 and 2 two documents. Every segment causal inside itself,
// blocked from the others by default; the table lets both documents see the system prompt.
let ids = Tensor::new(&[[0u32, 0, 0, 1, 1, 1, 1, 2, 2]], &dev)?;
let table = PairTable::from_rules(
    &[
        vec![None, None, None],
        vec![Some(Visibility::Full), None, None],
        vec![Some(Visibility::Full), None, None],
    ],
    &dev,
)?;
let rule = PairRule::new(Visibility::Causal, Visibility::Blocked).with_table(table);
let mask = SegmentMask::self_attention(&ids, rule)?; // or SegmentMask::new(&q_ids, &kv_ids, rule)
// README end
// A document sees the system prompt and itself causally, not the other document.
let dense = segattn::reference::dense_mask(&mask, 1, 9, 9)?.squeeze(0)?.to_vec2::<u8>()?;
let expected: Vec<Vec<u8>> = [
    "100000000", "110000000", "111000000", // system prompt: causal
    "111100000", "111110000", "111111000", "111111100", // document 1: prompt + itself causally
    "111000010", "111000011", // document 2: prompt + itself causally
]
.iter()
.map(|row| row.bytes().map(|c| c - b'0').collect())
.collect();
assert_eq!(dense, expected);
Ok(())
}

#[test]
#[rustfmt::skip]
fn readme_segment_mass() -> Result<()> {
use candle_core::{Device, Tensor};
use segattn::SegmentMask;
let dev = Device::Cpu;
let q = Tensor::randn(0f32, 1.0, (1, 512, 8, 64), &dev)?;
let k = Tensor::randn(0f32, 1.0, (1, 512, 2, 64), &dev)?;
let v = Tensor::randn(0f32, 1.0, (1, 512, 2, 64), &dev)?;
let mask = SegmentMask::pine(64, &[160, 128, 128], 32, &dev)?;
// README begin
use segattn::{segment_scores, HeadReduction, QueryReduction, SegmentAttention, SegmentScoreOptions};

// Standalone: Q K^T, the softmax statistics and the per-segment sums; no V.
let mass = segment_scores(&q, &k, &mask, &SegmentScoreOptions::new())?;   // [B, H, Lq, Sk] f32
// PINE's segment-query importance: length-normalised, summed over each query segment.
let opts = SegmentScoreOptions::new()
    .normalize_by_length(true)
    .query_reduction(QueryReduction::SumBySegment);                      // [B, H, Sq, Sk]
let importance = segment_scores(&q, &k, &mask, &opts)?;
// Fused into the attention, in the same pass (CPU and CUDA):
let res = SegmentAttention::new(&mask)
    .return_segment_mass(SegmentScoreOptions::new().head_reduction(HeadReduction::Mean))
    .forward(&q, &k, &v)?;
let (out, mass) = (res.out, res.segment_mass.unwrap());                 // mass [B, 1, Lq, Sk]
// README end
assert_eq!(mass_of_each_row(&segment_scores(&q, &k, &mask, &SegmentScoreOptions::new())?)?, 512);
assert_eq!(importance.dims(), &[1, 8, 5, 5]); // Sq = Sk = 5: prefix, three documents, question
assert_eq!(out.dims(), &[1, 512, 8, 64]);
assert_eq!(mass.dims(), &[1, 1, 512, 5]);
Ok(())
}

#[test]
#[rustfmt::skip]
fn readme_pine() -> Result<()> {
// README begin
use candle_core::{Device, Tensor};
use segattn::pine::{Llama3Scaling, PineAttention, Rope};
use segattn::PineLayout;

let dev = Device::Cpu;
// One layout per batch row: [prefix][segment 1]...[segment n][suffix] (rows may differ in their
// segments, not in their total length). A judge prompt: 128-token instruction, two answers of
// 500 and 480 tokens, 32-token question: L = 1140.
let layout = PineLayout::new(128, &[500, 480], 32);
let rope = Rope::new(500_000.0).with_llama3_scaling(Llama3Scaling::llama31());
let pine = PineAttention::new(&[layout], rope)?; // .scheme(PositionScheme::Vanilla / Pcw / Nia)

// In the model's attention layer, prefill: q, k, v BEFORE RoPE, [B, L, H or Hkv, D].
let (l, h, hkv, d) = (1140, 32, 8, 128);
let q = Tensor::randn(0f32, 1.0, (1, l, h, d), &dev)?;
let k = Tensor::randn(0f32, 1.0, (1, l, hkv, d), &dev)?;
let v = Tensor::randn(0f32, 1.0, (1, l, hkv, d), &dev)?;
let out = pine.prefill(&q, &k, &v)?.out; // [B, L, H, D]
let k_cache = pine.rotate_keys(&k)?; // the cache keeps K rotated once, at PINE's positions

// Decode: the new token's k rotated at its position (the tokens so far, l), appended with its v.
let (q_new, k_new, v_new) = (
    Tensor::randn(0f32, 1.0, (1, 1, h, d), &dev)?,
    Tensor::randn(0f32, 1.0, (1, 1, hkv, d), &dev)?,
    Tensor::randn(0f32, 1.0, (1, 1, hkv, d), &dev)?,
);
let k_cache = Tensor::cat(&[&k_cache, &pine.rotate_keys_from(&k_new, l)?], 1)?;
let v_cache = Tensor::cat(&[&v, &v_new], 1)?;
let step = pine.decode(&q_new, &k_cache, &v_cache)?.out; // [B, 1, H, D]
// README end
assert_eq!(out.dims(), &[1, 1140, 32, 128]);
assert_eq!(step.dims(), &[1, 1, 32, 128]);
Ok(())
}

#[test]
fn every_readme_block_is_tested_here() {
    let readme = include_str!("../README.md");
    let here = include_str!("readme.rs");
    let tested: Vec<&str> = here
        .split("// README begin\n")
        .skip(1)
        .filter_map(|s| s.split("// README end\n").next())
        .collect();
    let mut blocks = 0;
    for block in readme.split("```rust\n").skip(1) {
        let block = block.split("```").next().unwrap_or_default();
        assert!(
            tested.contains(&block),
            "a README rust block is not in tests/readme.rs verbatim:\n{block}"
        );
        blocks += 1;
    }
    assert_eq!(
        blocks,
        tested.len(),
        "tests/readme.rs tests blocks that the README no longer has"
    );
}
