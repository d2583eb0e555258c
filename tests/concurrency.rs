//! Calls from several host threads at once on the CPU: every call must give the bits of the same
//! call made alone. The CPU path shares state between calls (each rayon worker's kept tile
//! buffers, a call's K / V tiles prepared once, a PINE layer's cached step layout, a mask's host
//! metadata): this checks none of it leaks from one call into another. (The GPU twin, per-thread
//! streams: `tests/gpu_pine.rs` `decode_steps_from_several_threads_give_the_bits_of_one`.)

mod common;

use candle_core::{DType, Result, Tensor};
use common::{bits, random_tensor, Rng};
use segattn::pine::{PineAttention, Rope};
use segattn::{PineLayout, SegmentAttention, SegmentMask, SegmentScoreOptions};

/// One kind of call, and the bits of its outputs.
type Call<'a> = Box<dyn Fn() -> Result<Vec<u32>> + Send + Sync + 'a>;

#[test]
fn calls_from_several_threads_give_the_bits_of_one() -> Result<()> {
    let mut rng = Rng::new(2026);
    let dev = candle_core::Device::Cpu;
    let (h, hkv, d) = (8, 2, 64);
    let layout = PineLayout::new(40, &[70, 33, 1, 90], 30);
    let len = layout.len();
    let qkv = |rng: &mut Rng, lq: usize, lk: usize, dtype: DType| -> Result<(Tensor, Tensor, Tensor)> {
        Ok((
            random_tensor(rng, &[1, lq, h, d], dtype)?,
            random_tensor(rng, &[1, lk, hkv, d], dtype)?,
            random_tensor(rng, &[1, lk, hkv, d], dtype)?,
        ))
    };
    let prefill_bf16 = qkv(&mut rng, len, len, DType::BF16)?;
    let prefill_f32 = qkv(&mut rng, len, len, DType::F32)?;
    let decode = qkv(&mut rng, 1, len + 1, DType::BF16)?;
    let causal = SegmentMask::causal(len, &dev)?;
    let documents = SegmentMask::documents(&[[200, 1, 63]], &dev)?;
    let step_mask = SegmentMask::causal(len + 1, &dev)?.last_queries(1)?;
    let pine = PineAttention::new(std::slice::from_ref(&layout), Rope::new(10_000.0))?;
    let calls: Vec<Call> = vec![
        // Prefill, bf16 (pair loops and K / V tiles prepared per call where the CPU has them).
        Box::new(|| {
            let (q, k, v) = &prefill_bf16;
            bits(&SegmentAttention::new(&causal).forward(q, k, v)?.out)
        }),
        // f32 with the fused per-segment mass and the LSE.
        Box::new(|| {
            let (q, k, v) = &prefill_f32;
            let r = SegmentAttention::new(&documents)
                .return_lse(true)
                .return_segment_mass(SegmentScoreOptions::new())
                .forward(q, k, v)?;
            let mut all = bits(&r.out)?;
            all.extend(bits(r.lse.as_ref().expect("asked"))?);
            all.extend(bits(r.segment_mass.as_ref().expect("asked"))?);
            Ok(all)
        }),
        // A GQA decode step (decode-sized tiles read K and V rows as stored).
        Box::new(|| {
            let (q, k, v) = &decode;
            bits(&SegmentAttention::new(&step_mask).forward(q, k, v)?.out)
        }),
        // PINE prefill and decode on one shared layer (its step layouts cached between calls).
        Box::new(|| {
            let (q, k, v) = &prefill_f32;
            bits(&pine.prefill(q, k, v)?.out)
        }),
        Box::new(|| {
            let (q, k, v) = &decode;
            bits(&pine.decode(q, k, v)?.out)
        }),
    ];
    let alone: Vec<Vec<u32>> = calls.iter().map(|c| c()).collect::<Result<_>>()?;
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (calls, alone) = (&calls, &alone);
                s.spawn(move || -> Result<()> {
                    for round in 0..25 {
                        let i = (t + round) % calls.len();
                        assert!(calls[i]()? == alone[i], "thread {t} round {round}: call {i} differs");
                    }
                    Ok(())
                })
            })
            .collect();
        threads
            .into_iter()
            .try_for_each(|t| t.join().expect("a thread panicked"))
    })
}
