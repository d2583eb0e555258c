//! A tiny Llama-style decoder with seeded random weights, whose attention is a pluggable
//! [`PineAttention`] (PINE or one of the baseline [`PositionScheme`]s). Test support for
//! `tests/pine_invariance.rs` and the model of `examples/pine_judge.rs`.
//!
//! Per layer: RmsNorm -> q / k / v (GQA) -> attention -> o_proj -> residual -> RmsNorm ->
//! SwiGLU MLP -> residual; then a final RmsNorm and the LM head. Prefill hands the attention
//! un-rotated q, k, v; the KV cache keeps K rotated once at the scheme's key positions
//! ([`PineAttention::rotate_keys`]) and V.
#![allow(dead_code)]

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, Linear, RmsNorm};
use segattn::pine::{Llama3Scaling, PineAttention, PositionScheme, Rope};
use segattn::PineLayout;

/// A small deterministic generator (SplitMix64): weights and token ids are replayable from a seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Uniform integer in `0..n`.
    pub fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % n as u64) as u32
    }

    /// `n` token ids in `0..vocab`.
    pub fn tokens(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n).map(|_| self.below(vocab as u32)).collect()
    }

    /// An f32 tensor of `mean + std * N(0, 1)` entries.
    pub fn randn(&mut self, shape: &[usize], mean: f64, std: f64, device: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| (mean + std * self.normal()) as f32).collect();
        Tensor::from_vec(data, shape, device)
    }
}

/// The model's shape.
#[derive(Clone, Debug)]
pub struct Config {
    pub vocab: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub rope_theta: f64,
    pub llama3_scaling: Option<Llama3Scaling>,
    pub eps: f64,
}

impl Config {
    /// vocab 256, hidden 128, 4 query heads, 2 KV heads, head dim 32, 3 layers, theta 10 000.
    pub fn tiny() -> Self {
        Self {
            vocab: 256,
            hidden: 128,
            heads: 4,
            kv_heads: 2,
            head_dim: 32,
            intermediate: 256,
            layers: 3,
            rope_theta: 10_000.0,
            llama3_scaling: None,
            eps: 1e-5,
        }
    }

    pub fn rope(&self) -> Rope {
        let rope = Rope::new(self.rope_theta);
        match self.llama3_scaling {
            Some(s) => rope.with_llama3_scaling(s),
            None => rope,
        }
    }
}

struct Block {
    attn_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    mlp_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// The per-prompt state: the attention (layouts + scheme), per layer K (rotated) and V.
pub struct KvCache {
    pub attn: PineAttention,
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Tokens so far (prompt + generated).
    pub len: usize,
}

/// Greedy generation: `tokens[b]` the generated ids of row `b`, `logits[i]` `[B, vocab]` the
/// distribution that chose the `i`-th token of every row.
pub struct Generation {
    pub tokens: Vec<Vec<u32>>,
    pub logits: Vec<Tensor>,
}

pub struct TinyLlama {
    cfg: Config,
    rope: Rope,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    device: Device,
}

impl TinyLlama {
    /// Random weights from `seed`: linear layers N(0, 1/fan_in), embeddings N(0, 1), norm gains
    /// 1 + N(0, 0.1^2).
    pub fn new(cfg: Config, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = Rng::new(seed);
        let (h, hd) = (cfg.hidden, cfg.head_dim);
        let mut linear = |out: usize, inp: usize| -> Result<Linear> {
            Ok(Linear::new(
                rng.randn(&[out, inp], 0.0, (inp as f64).powf(-0.5), device)?,
                None,
            ))
        };
        let mut blocks_w = Vec::new();
        for _ in 0..cfg.layers {
            blocks_w.push((
                linear(cfg.heads * hd, h)?,
                linear(cfg.kv_heads * hd, h)?,
                linear(cfg.kv_heads * hd, h)?,
                linear(h, cfg.heads * hd)?,
                linear(cfg.intermediate, h)?,
                linear(cfg.intermediate, h)?,
                linear(h, cfg.intermediate)?,
            ));
        }
        let lm_head = linear(cfg.vocab, h)?;
        let mut norm = || -> Result<RmsNorm> { Ok(RmsNorm::new(rng.randn(&[h], 1.0, 0.1, device)?, cfg.eps)) };
        let blocks = blocks_w
            .into_iter()
            .map(|(q, k, v, o, gate, up, down)| {
                Ok(Block {
                    attn_norm: norm()?,
                    q,
                    k,
                    v,
                    o,
                    mlp_norm: norm()?,
                    gate,
                    up,
                    down,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_norm = norm()?;
        let embed = Embedding::new(Rng::new(seed ^ 0xE3B).randn(&[cfg.vocab, h], 0.0, 1.0, device)?, h);
        Ok(Self {
            rope: cfg.rope(),
            cfg,
            embed,
            blocks,
            norm: final_norm,
            lm_head,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The whole prompt of every batch row (all rows the same length, one layout per row) under
    /// `scheme`: logits `[B, L, vocab]` and the KV cache.
    pub fn prefill(
        &self,
        tokens: &[Vec<u32>],
        layouts: &[PineLayout],
        scheme: PositionScheme,
    ) -> Result<(Tensor, KvCache)> {
        let attn = PineAttention::new(layouts, self.rope.clone())?.scheme(scheme);
        let (b, l) = (tokens.len(), tokens[0].len());
        let ids = Tensor::from_vec(tokens.concat(), (b, l), &self.device)?;
        let mut x = self.embed.forward(&ids)?;
        let mut cache = KvCache {
            attn,
            k: Vec::new(),
            v: Vec::new(),
            len: l,
        };
        for blk in &self.blocks {
            let (q, k, v) = self.qkv(blk, &x)?;
            let a = cache.attn.prefill(&q, &k, &v)?.out;
            cache.k.push(cache.attn.rotate_keys(&k)?);
            cache.v.push(v);
            x = self.finish_block(blk, &x, &a)?;
        }
        Ok((self.head(&x)?, cache))
    }

    /// One generated token per row: appends it to the cache and returns logits `[B, 1, vocab]`.
    pub fn decode_step(&self, cache: &mut KvCache, next: &[u32]) -> Result<Tensor> {
        let t = cache.len;
        let ids = Tensor::from_vec(next.to_vec(), (next.len(), 1), &self.device)?;
        let mut x = self.embed.forward(&ids)?;
        for (i, blk) in self.blocks.iter().enumerate() {
            let (q, k, v) = self.qkv(blk, &x)?;
            // Rotated once at this token's position under the scheme.
            let k = cache.attn.rotate_keys_from(&k, t)?;
            cache.k[i] = Tensor::cat(&[&cache.k[i], &k], 1)?;
            cache.v[i] = Tensor::cat(&[&cache.v[i], &v], 1)?;
            let a = cache.attn.decode(&q, &cache.k[i], &cache.v[i])?.out;
            x = self.finish_block(blk, &x, &a)?;
        }
        cache.len += 1;
        self.head(&x)
    }

    /// Greedy decoding of `steps` tokens after the prompt (one prefill, `steps - 1` decode steps).
    pub fn generate(
        &self,
        tokens: &[Vec<u32>],
        layouts: &[PineLayout],
        scheme: PositionScheme,
        steps: usize,
    ) -> Result<Generation> {
        let (logits, mut cache) = self.prefill(tokens, layouts, scheme)?;
        let l = logits.dim(1)?;
        let mut last = logits.narrow(1, l - 1, 1)?.squeeze(1)?;
        let mut gen = Generation {
            tokens: vec![Vec::new(); tokens.len()],
            logits: Vec::new(),
        };
        for step in 0..steps {
            let next: Vec<u32> = last.argmax(D::Minus1)?.to_vec1()?;
            for (row, &t) in gen.tokens.iter_mut().zip(&next) {
                row.push(t);
            }
            gen.logits.push(last);
            if step + 1 == steps {
                break;
            }
            last = self.decode_step(&mut cache, &next)?.squeeze(1)?;
        }
        Ok(gen)
    }

    /// q `[B, L, H, D]`, k and v `[B, L, Hkv, D]`, un-rotated.
    fn qkv(&self, blk: &Block, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, l, _) = x.dims3()?;
        let c = &self.cfg;
        let h = blk.attn_norm.forward(x)?;
        let q = blk.q.forward(&h)?.reshape((b, l, c.heads, c.head_dim))?;
        let k = blk.k.forward(&h)?.reshape((b, l, c.kv_heads, c.head_dim))?;
        let v = blk.v.forward(&h)?.reshape((b, l, c.kv_heads, c.head_dim))?;
        Ok((q, k, v))
    }

    /// `x + o_proj(attention)`, then the SwiGLU MLP with its residual.
    fn finish_block(&self, blk: &Block, x: &Tensor, attn: &Tensor) -> Result<Tensor> {
        let (b, l, _, _) = attn.dims4()?;
        let x = (x + blk.o.forward(&attn.reshape((b, l, ()))?)?)?;
        let h = blk.mlp_norm.forward(&x)?;
        let mlp = blk
            .down
            .forward(&(candle_nn::ops::silu(&blk.gate.forward(&h)?)? * blk.up.forward(&h)?)?)?;
        x + mlp
    }

    fn head(&self, x: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(&self.norm.forward(x)?)?.to_dtype(DType::F32)
    }
}
