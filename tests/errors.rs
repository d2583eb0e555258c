//! Every invalid input is a `candle_core::Error` naming the argument, expected and actual.

use candle_core::{DType, Device, Result, Tensor};
use segattn::{merge_partials, PairRule, PairTable, PineLayout, SegmentAttention, SegmentMask, Visibility};

fn t(shape: &[usize], dtype: DType) -> Tensor {
    Tensor::ones(shape, DType::F32, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn causal(len: usize) -> SegmentMask {
    SegmentMask::causal(len, &Device::Cpu).unwrap()
}

/// Asserts that `r` failed with a message containing every one of `parts`.
fn expect_err<T: std::fmt::Debug>(r: Result<T>, parts: &[&str]) {
    let msg = format!("{}", r.expect_err("expected an error"));
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} lacks {p:?}");
    }
}

fn run(q: &Tensor, k: &Tensor, v: &Tensor, mask: &SegmentMask) -> Result<segattn::AttentionOutput> {
    SegmentAttention::new(mask).forward(q, k, v)
}

#[test]
fn rank() {
    let k = t(&[1, 8, 2, 16], DType::F32);
    expect_err(
        run(&t(&[8, 2, 16], DType::F32), &k, &k, &causal(8)),
        &["q:", "rank 4", "[8, 2, 16]"],
    );
    expect_err(
        run(
            &t(&[1, 8, 2, 16], DType::F32),
            &t(&[8, 2, 16], DType::F32),
            &k,
            &causal(8),
        ),
        &["k:", "rank 4"],
    );
}

#[test]
fn dtypes() {
    let f64s = t(&[1, 8, 2, 16], DType::F64);
    expect_err(run(&f64s, &f64s, &f64s, &causal(8)), &["q:", "f32, f16 or bf16", "F64"]);
    let q = t(&[1, 8, 2, 16], DType::F32);
    let k = t(&[1, 8, 2, 16], DType::BF16);
    expect_err(run(&q, &k, &k, &causal(8)), &["k:", "dtype F32", "BF16"]);
}

#[test]
fn shapes() {
    let q = t(&[2, 8, 4, 16], DType::F32);
    let k = t(&[1, 8, 2, 16], DType::F32);
    expect_err(run(&q, &k, &k, &causal(8)), &["k:", "batch size 2", "[1, 8, 2, 16]"]);
    let k = t(&[2, 8, 2, 32], DType::F32);
    expect_err(run(&q, &k, &k, &causal(8)), &["k:", "head dim 16"]);
    let k = t(&[2, 8, 2, 16], DType::F32);
    let v = t(&[2, 9, 2, 16], DType::F32);
    expect_err(
        run(&q, &k, &v, &causal(8)),
        &["v:", "shape [2, 8, 2, 16]", "[2, 9, 2, 16]"],
    );
    let k = t(&[2, 8, 3, 16], DType::F32);
    expect_err(run(&q, &k, &k, &causal(8)), &["H = 4", "Hkv = 3", "multiple"]);
    let none = t(&[2, 8, 0, 16], DType::F32);
    expect_err(
        run(&none, &none, &none, &causal(8)),
        &["q:", "at least one head", "[2, 8, 0, 16]"],
    );
    expect_err(
        run(&q, &none, &none, &causal(8)),
        &["k:", "at least one head", "[2, 8, 0, 16]"],
    );
    let q = t(&[1, 8, 2, 300], DType::F32);
    expect_err(run(&q, &q, &q, &causal(8)), &["q:", "head dim D = 300", "1..=256"]);
}

#[test]
fn strides() {
    let base = t(&[1, 2, 16, 8], DType::F32);
    let q = base.transpose(2, 3).unwrap(); // [1, 2, 8, 16], last dim stride 8
    let k = t(&[1, 2, 8, 16], DType::F32);
    expect_err(run(&q, &k, &k, &causal(2)), &["q:", "contiguous", "stride"]);
}

#[test]
fn segment_ids() {
    let q = t(&[1, 5, 1, 8], DType::F32);
    let ids = Tensor::new(&[[0u32, 0, 2, 1, 3]], &Device::Cpu).unwrap();
    let mask = SegmentMask::self_attention(&ids, PairRule::new(Visibility::Causal, Visibility::Full)).unwrap();
    expect_err(
        run(&q, &q, &q, &mask),
        &["q_segments", "non-decreasing", "row 0", "id 1 at index 3", "after id 2"],
    );
    let f = Tensor::zeros((1, 5), DType::F32, &Device::Cpu).unwrap();
    expect_err(
        SegmentMask::self_attention(&f, PairRule::new(Visibility::Causal, Visibility::Full)),
        &["q_segments", "u32", "F32"],
    );
    let r1 = Tensor::zeros(5, DType::U32, &Device::Cpu).unwrap();
    expect_err(
        SegmentMask::self_attention(&r1, PairRule::new(Visibility::Causal, Visibility::Full)),
        &["rank 2"],
    );
    // Lengths that do not match q / k.
    expect_err(run(&q, &q, &q, &causal(6)), &["q_segments", "[1, 5]", "[1, 6]"]);
    let ids2 = Tensor::zeros((3, 5), DType::U32, &Device::Cpu).unwrap();
    let mask = SegmentMask::self_attention(&ids2, PairRule::new(Visibility::Causal, Visibility::Full)).unwrap();
    expect_err(run(&q, &q, &q, &mask), &["q_segments", "[1, 5]", "[3, 5]"]);
}

#[test]
fn pair_tables() {
    let dev = Device::Cpu;
    expect_err(
        PairTable::new(Tensor::zeros((2, 2), DType::U32, &dev).unwrap()),
        &["pair_table", "u8", "U32"],
    );
    expect_err(
        PairTable::new(Tensor::zeros((2, 3), DType::U8, &dev).unwrap()),
        &["pair_table", "[S, S]", "[2, 3]"],
    );
    expect_err(
        PairTable::new(Tensor::new(&[[0u8, 7], [1, 2]], &dev).unwrap()),
        &["pair_table", "got 7 at flat index 1"],
    );
    expect_err(
        PairTable::from_rules(&[vec![None, None], vec![None]], &dev),
        &["row 1 has 1 entries"],
    );
    let table = PairTable::new(Tensor::zeros((3, 2, 2), DType::U8, &dev).unwrap()).unwrap();
    let ids = Tensor::zeros((2, 4), DType::U32, &dev).unwrap();
    let mask = SegmentMask::self_attention(
        &ids,
        PairRule::new(Visibility::Causal, Visibility::Full).with_table(table),
    )
    .unwrap();
    let q = t(&[2, 4, 1, 8], DType::F32);
    expect_err(
        run(&q, &q, &q, &mask),
        &["pair_table", "batch size 1 or 2", "[3, 2, 2]"],
    );
}

#[test]
fn presets() {
    let dev = Device::Cpu;
    expect_err(
        SegmentMask::prefix_lm(10, 11, &dev),
        &["prefix_len", "at most len = 10", "11"],
    );
    expect_err(
        SegmentMask::documents(&[&[3, 4][..], &[2, 2][..]], &dev),
        &["doc_lens", "row 0 has 7", "row 1 has 4"],
    );
    let empty: [&[usize]; 0] = [];
    expect_err(SegmentMask::documents(&empty, &dev), &["doc_lens", "at least one"]);
    expect_err(SegmentMask::packed_prompts(&[], &dev), &["prompts", "at least one"]);
    expect_err(
        SegmentMask::pine_batch(&[PineLayout::new(1, &[2], 1), PineLayout::new(1, &[3], 1)], &dev),
        &["layouts", "row 0 has 4", "row 1 has 5"],
    );
    expect_err(causal(8).last_queries(9), &["q_len", "at most the key length 8", "9"]);
}

#[test]
fn scale() {
    let q = t(&[1, 4, 1, 8], DType::F32);
    let mask = causal(4);
    expect_err(
        SegmentAttention::new(&mask).scale(f64::NAN).forward(&q, &q, &q),
        &["scale", "finite"],
    );
}

#[test]
fn merge() {
    let o = t(&[1, 3, 2, 8], DType::F32);
    let lse = t(&[1, 2, 3], DType::F32);
    expect_err(
        merge_partials(&o, &lse, &t(&[1, 3, 2, 4], DType::F32), &lse),
        &["out_b", "[1, 3, 2, 8]", "[1, 3, 2, 4]"],
    );
    expect_err(
        merge_partials(&o, &t(&[1, 3, 2], DType::F32), &o, &lse),
        &["lse_a", "[1, 2, 3]", "[1, 3, 2]"],
    );
    expect_err(
        merge_partials(&o, &lse, &o, &t(&[1, 2, 3], DType::F16)),
        &["lse_b", "f32"],
    );
}

/// PINE's own arguments: the layouts, the RoPE configuration, and what prefill and decode expect
/// of the token counts.
#[test]
fn pine() {
    use segattn::pine::{Llama3Scaling, PineAttention, Rope};
    let layout = PineLayout::new(4, &[3, 5, 2], 3);
    let l = layout.len();
    let x = |len: usize, d: usize| t(&[1, len, 2, d], DType::F32);
    let pine = |rope: Rope| PineAttention::new(std::slice::from_ref(&layout), rope).unwrap();
    let prefill = |rope: Rope| pine(rope).prefill(&x(l, 8), &x(l, 8), &x(l, 8));

    expect_err(PineAttention::new(&[], Rope::new(1e4)), &["layouts", "got none"]);
    expect_err(
        PineAttention::new(&[PineLayout::new(4, &[3, 0], 1)], Rope::new(1e4)),
        &["layouts", "row 0", "segment 2 has no token"],
    );
    expect_err(
        PineAttention::new(
            &[PineLayout::new(2, &[3, 3], 1), PineLayout::new(1, &[2, 2], 1)],
            Rope::new(1e4),
        ),
        &["layouts", "row 0 has 9", "row 1 has 6"],
    );

    expect_err(prefill(Rope::new(f64::NAN)), &["rope", "theta > 1", "NaN"]);
    let scaled = |f: fn(&mut Llama3Scaling)| {
        let mut s = Llama3Scaling::llama31();
        f(&mut s);
        Rope::new(1e4).with_llama3_scaling(s)
    };
    expect_err(
        prefill(scaled(|s| s.factor = 0.0)),
        &["Llama-3 scaling", "factor > 0", "got 0"],
    );
    expect_err(
        prefill(scaled(|s| s.original_max_position = f64::INFINITY)),
        &["original_max_position", "inf"],
    );
    expect_err(
        prefill(scaled(|s| s.high_freq_factor = 1.0)),
        &["high_freq_factor > low_freq_factor = 1", "got 1"],
    );
    assert!(prefill(scaled(|_| {})).is_ok(), "Llama-3.1's own values");
    let tables =
        |pos: usize, half: usize| Rope::from_tables(&t(&[pos, half], DType::F32), &t(&[pos, half], DType::F32));
    expect_err(
        Rope::from_tables(&t(&[10, 4], DType::F32), &t(&[10, 3], DType::F32)),
        &["sin", "[10, 4]", "[10, 3]"],
    );
    expect_err(prefill(tables(100, 3).unwrap()), &["rope", "D/2 = 4", "got D/2 = 3"]);
    expect_err(prefill(tables(5, 4).unwrap()), &["rope", "cover 5 positions"]);

    let rope = || Rope::new(1e4);
    expect_err(
        pine(rope()).prefill(&x(l, 7), &x(l, 7), &x(l, 7)),
        &["q", "even head dimension", "D = 7"],
    );
    expect_err(
        pine(rope()).prefill(&x(l + 1, 8), &x(l + 1, 8), &x(l + 1, 8)),
        &["q", "whole prompt", "L = 17", "Lq = 18"],
    );
    expect_err(
        pine(rope()).prefill(
            &t(&[2, l, 2, 8], DType::F32),
            &t(&[2, l, 2, 8], DType::F32),
            &t(&[2, l, 2, 8], DType::F32),
        ),
        &["q", "batch 1", "B = 2"],
    );
    expect_err(
        pine(rope()).decode(&x(1, 8), &x(l - 1, 8), &x(l - 1, 8)),
        &["k_cache", "at least the prompt (17 tokens)", "Lk = 16"],
    );
    expect_err(
        pine(rope()).decode(&x(5, 8), &x(l, 8), &x(l, 8)),
        &["q", "after the segments", "end at token 14", "token 12"],
    );
}
