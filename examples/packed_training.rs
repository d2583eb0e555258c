//! Packed training with segattn: a tiny one-layer attention model learns, over rows packed with
//! many short documents, to predict the first token of the document each position belongs to
//! (positions restart at every document, as in packed pre-training). Trained twice on the same
//! batches: with `SegmentMask::documents` each token sees only its own document and the task is
//! solvable; with a plain causal mask over the packed row, the other documents' starts leak in
//! and the loss stays high. Before training it also checks that the
//! packed row's gradients equal those of its documents run one by one.
//!
//! cargo run --release --example packed_training

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{
    embedding, linear_no_bias, AdamW, Embedding, Linear, Module, Optimizer, ParamsAdamW, VarBuilder, VarMap,
};
use segattn::{segment_attention, SegmentMask};

const VOCAB: usize = 32;
const MODEL: usize = 64;
const HEADS: usize = 4;
const MAX_DOC: usize = 48;
const ROW: usize = 512;
const BATCH: usize = 4;
const STEPS: usize = 150;

/// Embeddings of tokens and in-document positions, one attention layer, a readout.
struct Model {
    tokens: Embedding,
    positions: Embedding,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    readout: Linear,
}

impl Model {
    fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            tokens: embedding(VOCAB, MODEL, vb.pp("tokens"))?,
            positions: embedding(MAX_DOC, MODEL, vb.pp("positions"))?,
            q: linear_no_bias(MODEL, MODEL, vb.pp("q"))?,
            k: linear_no_bias(MODEL, MODEL, vb.pp("k"))?,
            v: linear_no_bias(MODEL, MODEL, vb.pp("v"))?,
            out: linear_no_bias(MODEL, MODEL, vb.pp("out"))?,
            readout: linear_no_bias(MODEL, VOCAB, vb.pp("readout"))?,
        })
    }

    /// Logits `[B, L, VOCAB]` for tokens and in-document positions `[B, L]` under `mask`.
    fn forward(&self, tokens: &Tensor, positions: &Tensor, mask: &SegmentMask) -> Result<Tensor> {
        let x = (self.tokens.forward(tokens)? + self.positions.forward(positions)?)?;
        let (b, l, _) = x.dims3()?;
        let heads = |t: Tensor| t.reshape((b, l, HEADS, MODEL / HEADS));
        let (q, k, v) = (
            heads(self.q.forward(&x)?)?,
            heads(self.k.forward(&x)?)?,
            heads(self.v.forward(&x)?)?,
        );
        let attended = segment_attention(&q, &k, &v, mask)?.reshape((b, l, MODEL))?;
        self.readout.forward(&(x + self.out.forward(&attended)?)?)
    }
}

/// A reproducible generator (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// A batch of packed rows: tokens, in-document positions, targets (the document's first token)
/// and the documents' lengths per row.
fn batch(rng: &mut Rng, dev: &Device) -> Result<(Tensor, Tensor, Tensor, Vec<Vec<usize>>)> {
    let (mut tokens, mut positions, mut targets, mut docs) = (vec![], vec![], vec![], vec![]);
    for _ in 0..BATCH {
        let mut lens = vec![];
        let mut left = ROW;
        while left > 0 {
            let n = (4 + rng.below(MAX_DOC - 4)).min(left);
            let first = rng.below(VOCAB) as u32;
            for p in 0..n {
                tokens.push(if p == 0 { first } else { rng.below(VOCAB) as u32 });
                positions.push(p as u32);
                targets.push(first);
            }
            lens.push(n);
            left -= n;
        }
        docs.push(lens);
    }
    let t = |v: Vec<u32>| Tensor::from_vec(v, (BATCH, ROW), dev);
    Ok((t(tokens)?, t(positions)?, t(targets)?, docs))
}

fn loss(model: &Model, tokens: &Tensor, positions: &Tensor, targets: &Tensor, mask: &SegmentMask) -> Result<Tensor> {
    let logits = model.forward(tokens, positions, mask)?;
    candle_nn::loss::cross_entropy(&logits.reshape((BATCH * ROW, VOCAB))?, &targets.flatten_all()?)
}

/// The packed row's dq, dk, dv against its documents run one by one under causal masks.
fn check_packing_is_exact(rng: &mut Rng, dev: &Device) -> Result<f32> {
    let (_, _, _, docs) = batch(rng, dev)?;
    let r = |shape: (usize, usize, usize, usize)| Tensor::randn(0f32, 1.0, shape, dev);
    let (q, k, v, w) = (
        r((1, ROW, HEADS, 16))?,
        r((1, ROW, HEADS, 16))?,
        r((1, ROW, HEADS, 16))?,
        r((1, ROW, HEADS, 16))?,
    );
    let grads = |q: &Tensor, k: &Tensor, v: &Tensor, w: &Tensor, mask: &SegmentMask| -> Result<Vec<Tensor>> {
        let vars = [Var::from_tensor(q)?, Var::from_tensor(k)?, Var::from_tensor(v)?];
        let out = segment_attention(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), mask)?;
        let g = (out * w)?.sum_all()?.backward()?;
        vars.iter()
            .map(|x| {
                g.get(x.as_tensor())
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg("no gradient".into()))
            })
            .collect()
    };
    let packed = grads(&q, &k, &v, &w, &SegmentMask::documents(&[docs[0].clone()], dev)?)?;
    let (mut start, mut worst) = (0, 0f32);
    for &n in &docs[0] {
        let part = |t: &Tensor| t.narrow(1, start, n);
        let alone = grads(
            &part(&q)?,
            &part(&k)?,
            &part(&v)?,
            &part(&w)?,
            &SegmentMask::causal(n, dev)?,
        )?;
        for (p, a) in packed.iter().zip(&alone) {
            let diff = (part(p)? - a)?.abs()?.max_all()?.to_scalar::<f32>()?;
            worst = worst.max(diff);
        }
        start += n;
    }
    Ok(worst)
}

fn train(name: &str, packed_documents: bool, dev: &Device) -> Result<f32> {
    let varmap = VarMap::new();
    let model = Model::new(VarBuilder::from_varmap(&varmap, DType::F32, dev))?;
    let params = ParamsAdamW {
        lr: 3e-3,
        ..Default::default()
    };
    let mut opt = AdamW::new(varmap.all_vars(), params)?;
    let mut rng = Rng(0x5eed);
    let t0 = Instant::now();
    let mut last = f32::NAN;
    for step in 1..=STEPS {
        let (tokens, positions, targets, docs) = batch(&mut rng, dev)?;
        let mask = if packed_documents {
            SegmentMask::documents(&docs, dev)?
        } else {
            SegmentMask::causal(ROW, dev)?
        };
        let l = loss(&model, &tokens, &positions, &targets, &mask)?;
        opt.backward_step(&l)?;
        last = l.to_scalar::<f32>()?;
        if step % 25 == 0 || step == 1 {
            println!("  {name:<28} step {step:>3}: loss {last:.3}");
        }
    }
    println!("  {name:<28} {STEPS} steps in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(last)
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let worst = check_packing_is_exact(&mut Rng(7), &dev)?;
    println!("packed row vs its documents one by one: max |gradient difference| {worst:.2e}");
    println!(
        "task: predict the first token of your document ({BATCH} rows of {ROW} tokens, documents of 4-{MAX_DOC}; \
         chance: loss {:.2})",
        (VOCAB as f32).ln()
    );
    let docs = train("documents mask (packed)", true, &dev)?;
    let causal = train("causal mask over the row", false, &dev)?;
    println!("final loss: documents mask {docs:.3}, causal mask {causal:.3}");
    Ok(())
}
