//! The CUDA forward kernel (kernels/fwd/fwd.cu), run on the CPU under the SIMT emulator, against
//! the f64 reference: random shapes (ragged lengths, GQA, Lq <= Lk and cross attention), every
//! mask preset, random pair tables (shared and per batch row, with fully masked rows), bf16 and
//! f16, head dims 64 and 128, strided input views, and three thread schedules per case (forward,
//! high-first, random-warp), whose outputs must also be bitwise identical.
//!
//! Also checks that the kernel's tile classification (kernels/mask.cuh) agrees with
//! src/mask/tiles.rs on random metadata.
//!
//! `SEGATTN_EMU_CASES=n` sets the number of random kernel cases (default 256; the tile
//! classification check runs 8x that many, 8 tiles each).

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::{env_count, lse_tolerance, proptest_config, tolerance};
use proptest::prelude::*;
use segattn::emulated::{
    classify_tile_both, forward, forward_tiled, forward_wgmma, fwd_mass_rows_smem_bytes, fwd_smem_bytes, FwdVariant,
    Schedule, Tile,
};
use segattn::{reference, PairRule, PairTable, PineLayout, SegmentMask, Visibility};

const SCHEDULES: [Schedule; 3] = [Schedule::Forward, Schedule::HighFirst, Schedule::RandomWarp];

fn cases(default: u32) -> u32 {
    env_count("SEGATTN_EMU_CASES").unwrap_or(default)
}

/// splitmix64: every random detail of a case comes from its seed, so a failure replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n >= 1).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn coin(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn rule(&mut self) -> Visibility {
        Visibility::from_code(self.below(3) as u8).unwrap()
    }
}

/// Cuts `len` tokens into segment lengths: one segment, random pieces, single tokens, or single
/// tokens mixed with long runs.
fn cut(rng: &mut Rng, len: usize) -> Vec<usize> {
    let style = rng.below(4);
    let mut out = Vec::new();
    let mut left = len;
    while left > 0 {
        let l = match style {
            0 => left,
            1 => {
                let cap = [3, 16, 64, 150][rng.below(4)];
                1 + rng.below(cap.min(left))
            }
            2 => 1,
            _ => {
                if rng.coin(0.15) {
                    1 + rng.below(left.min(70))
                } else {
                    1
                }
            }
        };
        out.push(l);
        left -= l;
    }
    out
}

/// Non-decreasing ids for segment lengths, starting at 0 or 1, sometimes skipping ids.
fn ids_of(rng: &mut Rng, lens: &[usize]) -> Vec<u32> {
    let mut id = rng.below(2) as u32;
    let mut ids = Vec::new();
    for &l in lens {
        ids.extend(std::iter::repeat_n(id, l));
        id += 1 + if rng.coin(0.2) { rng.below(3) as u32 } else { 0 };
    }
    ids
}

/// `rows` rows of ids (each its own segmentation) as a `[rows, len]` tensor.
fn id_rows(rng: &mut Rng, rows: usize, len: usize) -> Result<Tensor> {
    let mut ids = Vec::with_capacity(rows * len);
    for _ in 0..rows {
        let lens = cut(rng, len);
        ids.extend(ids_of(rng, &lens));
    }
    Tensor::from_vec(ids, (rows, len), &Device::Cpu)
}

/// A random rule: random intra / inter and, usually, a random table (codes 0..=3, shared or per
/// batch row) of `max_size` ids at most.
fn random_rule(rng: &mut Rng, batch: usize, max_size: usize) -> Result<PairRule> {
    let rule = PairRule::new(rng.rule(), rng.rule());
    if rng.coin(0.2) {
        return Ok(rule);
    }
    let s = 1 + rng.below(max_size.max(1));
    let rows = match rng.below(3) {
        0 => None,
        1 => Some(1),
        _ => Some(batch),
    };
    let n = rows.unwrap_or(1) * s * s;
    // Mostly Blocked / Default, so that some rows see nothing at all.
    let codes: Vec<u8> = (0..n).map(|_| [0u8, 0, 1, 2, 3, 3][rng.below(6)]).collect();
    let t = match rows {
        None => Tensor::from_vec(codes, (s, s), &Device::Cpu)?,
        Some(r) => Tensor::from_vec(codes, (r, s, s), &Device::Cpu)?,
    };
    Ok(rule.with_table(PairTable::new(t)?))
}

/// A PINE layout of exactly `len` tokens.
fn pine_layout(rng: &mut Rng, len: usize) -> PineLayout {
    let pieces = cut(rng, len);
    let (prefix, rest) = if rng.coin(0.7) {
        (pieces[0], &pieces[1..])
    } else {
        (0, &pieces[..])
    };
    let (segs, suffix) = match rest.split_last() {
        Some((&last, segs)) if rng.coin(0.7) => (segs.to_vec(), last),
        _ => (rest.to_vec(), 0),
    };
    PineLayout::new(prefix, &segs, suffix)
}

const MASK_KINDS: usize = 11;

/// Mask kind `kind` for `batch` rows, `lq` queries and `lk` keys (kinds below 10 are
/// self-attention layouts over `lk`, narrowed to the last `lq` queries; 10 is cross attention
/// with independent query ids, any `lq`).
fn build_mask(rng: &mut Rng, kind: usize, batch: usize, lq: usize, lk: usize) -> Result<(String, SegmentMask)> {
    let dev = &Device::Cpu;
    let rows = if rng.coin(0.5) { 1 } else { batch };
    let (name, mask) = match kind {
        0 => ("causal".to_string(), SegmentMask::causal(lk, dev)?),
        1 => ("full".to_string(), SegmentMask::full(lk, dev)?),
        2 | 3 => {
            let docs: Vec<Vec<usize>> = (0..rows).map(|_| cut(rng, lk)).collect();
            if kind == 2 {
                (format!("documents {docs:?}"), SegmentMask::documents(&docs, dev)?)
            } else {
                (
                    format!("documents_bidirectional {docs:?}"),
                    SegmentMask::documents_bidirectional(&docs, dev)?,
                )
            }
        }
        4 => {
            let prefix = rng.below(lk + 1);
            (format!("prefix_lm {prefix}"), SegmentMask::prefix_lm(lk, prefix, dev)?)
        }
        5 => {
            let l = pine_layout(rng, lk);
            (
                format!("pine {l:?}"),
                SegmentMask::pine(l.prefix_len, &l.segment_lens, l.suffix_len, dev)?,
            )
        }
        6 => {
            let ls: Vec<PineLayout> = (0..rows).map(|_| pine_layout(rng, lk)).collect();
            (format!("pine_batch {ls:?}"), SegmentMask::pine_batch(&ls, dev)?)
        }
        7 => {
            let parts = cut(rng, lk);
            let ps: Vec<PineLayout> = parts.iter().map(|&l| pine_layout(rng, l)).collect();
            (format!("packed_prompts {ps:?}"), SegmentMask::packed_prompts(&ps, dev)?)
        }
        8 => {
            let ids = id_rows(rng, rows, lk)?;
            let rule = random_rule(rng, batch, 10)?;
            (
                format!("table ids {ids} rule {rule:?}"),
                SegmentMask::self_attention(&ids, rule)?,
            )
        }
        9 => {
            // Single-token segments: up to 64 x 64 piece pairs per tile.
            let ids: Vec<u32> = (0..lk as u32).collect();
            let ids = Tensor::from_vec(ids, (1, lk), dev)?;
            let rule = random_rule(rng, batch, lk.min(80))?;
            (
                format!("single tokens rule {rule:?}"),
                SegmentMask::self_attention(&ids, rule)?,
            )
        }
        _ => {
            let q_ids = id_rows(rng, rows, lq)?;
            let kv_rows = if rng.coin(0.5) { 1 } else { batch };
            let kv_ids = id_rows(rng, kv_rows, lk)?;
            let rule = random_rule(rng, batch, 10)?;
            let desc = format!("cross q ids {q_ids} kv ids {kv_ids} rule {rule:?}");
            return Ok((desc, SegmentMask::new(&q_ids, &kv_ids, rule)?));
        }
    };
    if lq == lk {
        Ok((name, mask))
    } else {
        Ok((format!("{name}, last {lq} queries"), mask.last_queries(lq)?))
    }
}

/// Values of magnitude in [0.25, 1] with random signs (never zero), rounded to `dtype`.
fn values(rng: &mut Rng, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let x = 0.25 + 0.75 * rng.unit();
            if rng.coin(0.5) {
                -x
            } else {
                x
            }
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
}

/// q `[B, Lq, H, D]`, k and v `[B, Lk, Hkv, D]`; with `strided`, views: q a transposed
/// `[B, H, Lq, D]`, k and v the two halves of a fused `[B, Lk, 2 Hkv, D]` tensor.
fn inputs(
    rng: &mut Rng,
    dims: (usize, usize, usize, usize, usize, usize),
    dtype: DType,
    strided: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, lq, lk, h, hkv, d) = dims;
    if strided {
        let q = values(rng, &[b, h, lq, d], dtype)?.transpose(1, 2)?;
        let kv = values(rng, &[b, lk, 2 * hkv, d], dtype)?;
        Ok((q, kv.narrow(2, 0, hkv)?, kv.narrow(2, hkv, hkv)?))
    } else {
        Ok((
            values(rng, &[b, lq, h, d], dtype)?,
            values(rng, &[b, lk, hkv, d], dtype)?,
            values(rng, &[b, lk, hkv, d], dtype)?,
        ))
    }
}

fn flat_f64(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// Runs one case under every schedule and checks it against the reference, with the plain kernel
/// `wide`: `Some(true)` the wide (128-row) one, `Some(false)` the 64-row one, `None` as the GPU
/// launcher decides. The wide kernel at D = 64 must give the 64-row
/// kernel's bits (same key tiles, same order of operations per row).
#[allow(clippy::too_many_arguments)]
fn check_case(
    desc: &str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &SegmentMask,
    scale: Option<f64>,
    seed: u64,
    wide: Option<bool>,
) -> Result<()> {
    let dtype = q.dtype();
    let want = reference::attention(q, k, v, mask, scale)?;
    let want_out = flat_f64(&want.out)?;
    let want_lse = flat_f64(&want.lse)?;
    let (b, lq, h, d) = q.dims4()?;
    let (atol, rtol) = tolerance(dtype);
    let mut first: Option<(Vec<u32>, Vec<u32>)> = None;
    for schedule in SCHEDULES {
        let got = match wide {
            None => forward(q, k, v, mask, scale, schedule, seed)?,
            Some(w) => forward_tiled(q, k, v, mask, scale, wide_tile(w), schedule, seed)?,
        };
        assert_eq!(got.out.dims(), &[b, lq, h, d], "{desc}");
        assert_eq!(got.out.dtype(), dtype, "{desc}");
        let lse = got.lse.expect("the emulated forward always returns the LSE");
        let got_out = flat_f64(&got.out)?;
        let got_lse = lse.flatten_all()?.to_vec1::<f32>()?;
        for (i, (&g, &w)) in got_out.iter().zip(&want_out).enumerate() {
            let ok = (g - w).abs() <= atol + rtol * w.abs();
            if !ok {
                let (row, head, dim) = ((i / (h * d)) % lq, (i / d) % h, i % d);
                panic!(
                    "{desc}\n{schedule:?}: out[b {}, row {row}, head {head}, dim {dim}] = {g}, want {w} (atol {atol}, rtol {rtol})",
                    i / (lq * h * d)
                );
            }
        }
        for (i, (&g, &w)) in got_lse.iter().zip(&want_lse).enumerate() {
            let g = f64::from(g);
            let (bb, head, row) = (i / (h * lq), (i / lq) % h, i % lq);
            if w == f64::NEG_INFINITY {
                assert!(
                    g == f64::NEG_INFINITY,
                    "{desc}\n{schedule:?}: lse[{bb}, {head}, {row}] = {g}, want -inf"
                );
                let o = &got_out[((bb * lq + row) * h + head) * d..][..d];
                assert!(
                    o.iter().all(|&x| x == 0.0),
                    "{desc}\n{schedule:?}: a row that sees no key must output 0"
                );
            } else {
                let ok = (g - w).abs() <= lse_tolerance(dtype);
                assert!(ok, "{desc}\n{schedule:?}: lse[{bb}, {head}, {row}] = {g}, want {w}");
            }
        }
        // Every schedule must give the same bits: a difference means a race.
        let bits = (common::bits(&got.out)?, common::bits(&lse)?);
        match &first {
            None => first = Some(bits),
            Some(f) => assert!(
                *f == bits,
                "{desc}\n{schedule:?}: output differs from the forward schedule's"
            ),
        }
    }
    if let (Some(false), true, Some(narrow)) = (wide, d <= 128, &first) {
        // The 64-row kernel on Hopper's wgmma (kernels/hopper/fwd_hopper.cu): under the emulator
        // its products sum in the mma.sync kernel's order, so its outputs are that kernel's bits
        // (checked above), every schedule (on a GPU, within the tolerances: tests/gpu_fwd.rs).
        for schedule in SCHEDULES {
            let got = forward_wgmma(q, k, v, mask, scale, Tile::Rows64, schedule, seed)?;
            let lse = got.lse.as_ref().expect("the emulated forward returns the LSE");
            assert!(
                *narrow == (common::bits(&got.out)?, common::bits(lse)?),
                "{desc}\n{schedule:?}: the wgmma kernel differs from the 64-row mma.sync kernel"
            );
        }
    }
    if wide == Some(true) {
        // 64-key tiles on both sides (the wide kernel's at D = 64, the wide64 entry's at D = 128):
        // the same operations per row in the same order, so the same bits, every schedule.
        let narrow = forward_tiled(q, k, v, mask, scale, Tile::Rows64, Schedule::Forward, seed)?;
        let tile = if d == 64 { Tile::Wide } else { Tile::WideKeys64 };
        for schedule in SCHEDULES {
            let wide_out = forward_tiled(q, k, v, mask, scale, tile, schedule, seed)?;
            assert!(
                common::bits(&narrow.out)? == common::bits(&wide_out.out)?,
                "{desc}\n{schedule:?}: the wide kernel with 64-key tiles (D = {d}) differs from the 64-row kernel"
            );
            if d <= 128 {
                // The 128-row wgmma kernel (two warpgroups sharing the key tiles): the same bits.
                let got = forward_wgmma(q, k, v, mask, scale, Tile::WideKeys64, schedule, seed)?;
                let lse = got.lse.as_ref().expect("the emulated forward returns the LSE");
                let narrow_lse = narrow.lse.as_ref().expect("the emulated forward returns the LSE");
                assert!(
                    (common::bits(&narrow.out)?, common::bits(narrow_lse)?)
                        == (common::bits(&got.out)?, common::bits(lse)?),
                    "{desc}\n{schedule:?}: the 128-row wgmma kernel differs from the 64-row mma.sync kernel"
                );
            }
        }
    }
    Ok(())
}

/// The tile of `wide`: the 128-row kernel or the 64-row one.
fn wide_tile(wide: bool) -> Tile {
    if wide {
        Tile::Wide
    } else {
        Tile::Rows64
    }
}

const HEADS: [(usize, usize); 3] = [(4, 2), (3, 1), (2, 2)];

/// A length in 1..=200 that is not a multiple of 64.
fn ragged(x: usize) -> usize {
    if x.is_multiple_of(64) {
        x - 1
    } else {
        x
    }
}

#[allow(clippy::too_many_arguments)]
fn run_random_case(
    seed: u64,
    bf16: bool,
    d: usize,
    batch: usize,
    heads: usize,
    lk: usize,
    lq_raw: usize,
    kind: usize,
    wide: Option<bool>,
) {
    let mut rng = Rng(seed);
    let dtype = if bf16 { DType::BF16 } else { DType::F16 };
    let (h, hkv) = HEADS[heads];
    let lk = ragged(lk);
    let lq = if kind == MASK_KINDS - 1 {
        ragged(lq_raw)
    } else if rng.coin(0.5) {
        lk
    } else {
        1 + (lq_raw - 1) % lk
    };
    let strided = rng.coin(0.3);
    let scale = if rng.coin(0.3) {
        Some(0.05 + 0.3 * f64::from(rng.unit()))
    } else {
        None
    };
    let (name, mask) = build_mask(&mut rng, kind, batch, lq, lk).unwrap();
    let desc = format!(
        "seed {seed}: {dtype:?} D {d} B {batch} Lq {lq} Lk {lk} H {h} Hkv {hkv} strided {strided} scale {scale:?} wide {wide:?} mask {name}"
    );
    let (q, k, v) = inputs(&mut rng, (batch, lq, lk, h, hkv, d), dtype, strided).unwrap();
    check_case(&desc, &q, &k, &v, &mask, scale, seed, wide).unwrap_or_else(|e| panic!("{desc}\n{e}"));
}

proptest! {
    #![proptest_config(proptest_config(cases(256)))]

    #[test]
    fn emulated_kernel_matches_reference(
        seed in any::<u64>(),
        bf16 in any::<bool>(),
        d128 in any::<bool>(),
        batch in 1usize..=2,
        heads in 0usize..HEADS.len(),
        lk in 1usize..=200,
        lq_raw in 1usize..=200,
        kind in 0usize..MASK_KINDS,
        tile in 0usize..3,
    ) {
        // The launcher's choice (wide from 128 rows on), or either kernel forced at any size.
        let wide = [None, Some(false), Some(true)][tile];
        run_random_case(seed, bf16, if d128 { 128 } else { 64 }, batch, heads, lk, lq_raw, kind, wide);
    }
}

proptest! {
    // A quarter of the cases: each costs twice a D = 128 one under the emulator.
    #![proptest_config(proptest_config(cases(256).div_ceil(4)))]

    /// D = 256 (plain attention, 64-row blocks of 32-key tiles, Q read from shared memory).
    #[test]
    fn emulated_d256_kernel_matches_reference(
        seed in any::<u64>(),
        bf16 in any::<bool>(),
        batch in 1usize..=2,
        heads in 0usize..HEADS.len(),
        lk in 1usize..=200,
        lq_raw in 1usize..=200,
        kind in 0usize..MASK_KINDS,
    ) {
        run_random_case(seed, bf16, 256, batch, heads, lk, lq_raw, kind, None);
    }
}

/// Every mask kind at least once in both dtypes and head dims, with both kernels (64 and 128
/// rows per block), whatever the random draw.
#[test]
fn every_mask_kind_every_instantiation() {
    for kind in 0..MASK_KINDS {
        let (bf16, d128) = (kind % 2 == 0, (kind / 2) % 2 == 0);
        for wide in [false, true] {
            let seed = 1000 + kind as u64 + if wide { 500 } else { 0 };
            let d = if d128 { 128 } else { 64 };
            run_random_case(seed, bf16, d, 2, kind % HEADS.len(), 150, 77, kind, Some(wide));
            run_random_case(
                seed + 1000,
                !bf16,
                if d128 { 64 } else { 128 },
                1,
                (kind + 1) % HEADS.len(),
                100,
                100,
                kind,
                Some(wide),
            );
        }
        // D = 256: the 64-row kernel only.
        run_random_case(
            3000 + kind as u64,
            !bf16,
            256,
            2,
            kind % HEADS.len(),
            150,
            77,
            kind,
            None,
        );
    }
}

/// Lengths that are exact multiples of the tiles (no ragged tile), and single rows / keys.
#[test]
fn tile_multiples_and_tiny_lengths() {
    for (lq, lk) in [(128, 128), (256, 256), (64, 192), (1, 1), (1, 128), (2, 65), (129, 161)] {
        let mut rng = Rng(lq as u64 * 1000 + lk as u64);
        let mask = SegmentMask::documents(&[&[lk / 2, lk - lk / 2][..]], &Device::Cpu)
            .unwrap()
            .last_queries(lq)
            .unwrap();
        for d in [64, 128, 256] {
            let (q, k, v) = inputs(&mut rng, (2, lq, lk, 4, 2, d), DType::BF16, false).unwrap();
            for wide in [false, true] {
                if d == 256 && wide {
                    continue; // D = 256 has the 64-row kernel only
                }
                let desc = format!("documents Lq {lq} Lk {lk} D {d} wide {wide}");
                check_case(&desc, &q, &k, &v, &mask, None, 7, Some(wide)).unwrap();
            }
        }
    }
}

/// A pair table with a Blocked row: the rows of that segment see nothing, output 0 and LSE -inf.
/// More key tiles than one window of tile classes (128 tiles, classified ahead one per thread):
/// the loop refills the window, for masks whose visible range spans it (causal, PINE's suffix
/// rows, tables, cross ids) and ones that skip most of it (documents).
#[test]
fn long_key_sequences_refill_the_class_window() {
    let (lq, lk) = (70, 128 * 64 + 300);
    for kind in [0usize, 2, 5, 8, 10] {
        let mut rng = Rng(9000 + kind as u64);
        let (name, mask) = build_mask(&mut rng, kind, 1, lq, lk).unwrap();
        let (q, k, v) = inputs(&mut rng, (1, lq, lk, 2, 1, 64), DType::BF16, false).unwrap();
        check_case(&format!("Lq {lq} Lk {lk} {name}"), &q, &k, &v, &mask, None, 3, None).unwrap();
    }
    // SKIP, FULL and PARTIAL tiles all along: every other run of keys is hidden.
    let mask = common::cases::alternating_runs(lq, lk).unwrap();
    let mut rng = Rng(9100);
    for d in [64, 128] {
        let (q, k, v) = inputs(&mut rng, (1, lq, lk, 2, 1, d), DType::BF16, false).unwrap();
        for wide in [false, true] {
            let desc = format!("alternating runs D {d} wide {wide}");
            check_case(&desc, &q, &k, &v, &mask, None, 3, Some(wide)).unwrap();
        }
    }
}

#[test]
fn fully_masked_rows() -> Result<()> {
    // Segment 1 (rows 40..90) is blocked from everything (itself included).
    let mask = common::cases::blocked_middle_segment()?;
    for dtype in [DType::BF16, DType::F16] {
        let mut rng = Rng(5);
        let (q, k, v) = inputs(&mut rng, (2, 147, 147, 2, 1, 128), dtype, false)?;
        check_case("blocked segment 1", &q, &k, &v, &mask, None, 3, None)?;
        let got = forward(&q, &k, &v, &mask, None, Schedule::Forward, 0)?;
        let lse = got.lse.unwrap().to_vec3::<f32>()?;
        assert!(lse[1][1][40..90].iter().all(|&x| x == f32::NEG_INFINITY));
        assert!(lse[1][1][..40].iter().all(|x| x.is_finite()));
        let rows = got
            .out
            .narrow(1, 40, 50)?
            .to_dtype(DType::F32)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(rows, 0.0);
    }
    Ok(())
}

/// Views the kernel's 16-byte loads cannot read in place (a start 2 bytes past an aligned one,
/// strides that are not multiples of 8 elements) are copied into fresh buffers first.
#[test]
fn views_the_kernel_cannot_load_are_copied() -> Result<()> {
    let mask = SegmentMask::causal(70, &Device::Cpu)?;
    for dtype in [DType::BF16, DType::F16] {
        let mut rng = Rng(11);
        let (b, l, h, hkv, d) = (1, 70, 4, 2, 64);
        let n = b * l * h * d;
        let q = values(&mut rng, &[n + 1], dtype)?
            .narrow(0, 1, n)?
            .reshape((b, l, h, d))?;
        let k = values(&mut rng, &[b, l, hkv, d + 3], dtype)?.narrow(3, 0, d)?;
        let v = values(&mut rng, &[b, l, hkv, d + 3], dtype)?.narrow(3, 3, d)?;
        check_case("misaligned views", &q, &k, &v, &mask, None, 5, None)?;
    }
    Ok(())
}

/// No key at all (Lk = 0): every row outputs 0 with LSE -inf.
#[test]
fn no_keys() -> Result<()> {
    let dev = &Device::Cpu;
    let q = Tensor::ones((1, 5, 2, 64), DType::BF16, dev)?;
    let k = Tensor::ones((1, 0, 2, 64), DType::BF16, dev)?;
    let ids_q = Tensor::zeros((1, 5), DType::U32, dev)?;
    let ids_k = Tensor::zeros((1, 0), DType::U32, dev)?;
    let mask = SegmentMask::new(&ids_q, &ids_k, PairRule::new(Visibility::Full, Visibility::Full))?;
    let got = forward(&q, &k, &k, &mask, None, Schedule::RandomWarp, 1)?;
    assert_eq!(got.out.to_dtype(DType::F32)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
    assert!(got
        .lse
        .unwrap()
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|&x| x == f32::NEG_INFINITY));
    Ok(())
}

/// Scores that grow along the keys by several log2 units a tile in some rows and stay flat in the
/// others (`common::cases::growing_scores`): every kernel shape against the reference.
#[test]
fn softmax_reference_moves_in_some_rows() -> Result<()> {
    let dev = &Device::Cpu;
    let (lq, lk) = (130, 330);
    for (d, dtype) in [(64, DType::BF16), (128, DType::F16)] {
        let (q, k, v) = common::cases::growing_scores(&mut common::Rng::new(11), (lq, lk, 2, d), dtype)?;
        for (name, mask) in [
            ("full", SegmentMask::full(lk, dev)?.last_queries(lq)?),
            ("causal", SegmentMask::causal(lk, dev)?.last_queries(lq)?),
        ] {
            for wide in [Some(false), Some(true)] {
                let desc = format!("growing scores, {name}, D {d} {dtype:?}, wide {wide:?}");
                check_case(&desc, &q, &k, &v, &mask, None, 7, wide)?;
            }
        }
    }
    Ok(())
}

/// Unsupported dtype or head dim: a clear error naming the argument, not a crash.
#[test]
fn unsupported_inputs_are_errors() -> Result<()> {
    let dev = &Device::Cpu;
    let mask = SegmentMask::causal(8, dev)?;
    let x = Tensor::ones((1, 8, 1, 64), DType::F32, dev)?;
    let e = forward(&x, &x, &x, &mask, None, Schedule::Forward, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("q:") && e.contains("dtype") && e.contains("F32"), "{e}");
    let x = Tensor::ones((1, 8, 1, 96), DType::BF16, dev)?;
    let e = forward(&x, &x, &x, &mask, None, Schedule::Forward, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("q:") && e.contains("head dim") && e.contains("96"), "{e}");
    assert_eq!(fwd_smem_bytes(DType::F32, 64, FwdVariant::Plain), None);
    assert_eq!(fwd_smem_bytes(DType::BF16, 96, FwdVariant::Plain), None);
    Ok(())
}

/// The shared-memory sizes the GPU launcher must request (traits: Q + 2 K + 2 V tiles + metadata).
#[test]
fn smem_sizes() {
    // D = 256: 32-key tiles (4 x 16 KiB) and Q in its own tile (32 KiB), two blocks per sm_90 SM.
    for (d, want) in [(64usize, 33_960usize), (128, 66_728), (256, 99_240)] {
        assert_eq!(fwd_smem_bytes(DType::BF16, d, FwdVariant::Plain), Some(want));
        assert_eq!(fwd_smem_bytes(DType::F16, d, FwdVariant::Plain), Some(want));
    }
    for variant in [
        FwdVariant::Mass,
        FwdVariant::Wide,
        FwdVariant::Wide64,
        FwdVariant::WideMass,
        FwdVariant::Hopper,
        FwdVariant::HopperWide,
    ] {
        assert_eq!(fwd_smem_bytes(DType::BF16, 256, variant), None, "{variant:?}");
    }
    // The wgmma kernel: the 64-row kernel's layout and 1,024 bytes to align its tiles.
    for (d, want) in [(64usize, 33_960usize), (128, 66_728)] {
        assert_eq!(fwd_smem_bytes(DType::BF16, d, FwdVariant::Hopper), Some(want + 1024));
        assert_eq!(fwd_smem_bytes(DType::F16, d, FwdVariant::Hopper), Some(want + 1024));
        // The two-warpgroup one: the wide kernel's layout with 64-key tiles, the key-tile scan's
        // and the class window's slots for 8 warps (+ 8 x 4 and + 128 bytes), the alignment.
        let wide = fwd_smem_bytes(DType::BF16, d, FwdVariant::Wide64).unwrap();
        assert_eq!(
            fwd_smem_bytes(DType::BF16, d, FwdVariant::HopperWide),
            Some(wide + 160 + 1024)
        );
        assert_eq!(
            fwd_smem_bytes(DType::F16, d, FwdVariant::HopperWide),
            Some(wide + 160 + 1024)
        );
    }
    // PINE's D = 256 kernel: the plain one's tiles, the turned Q (32 KiB) and each row's position
    // and shift row (2 x 64 x 4 B): one block per sm_90 SM, none on GPUs of 99 KiB a block (its
    // module entry is then unavailable, with a message).
    assert_eq!(
        fwd_smem_bytes(DType::BF16, 256, FwdVariant::Rope),
        Some(99_240 + 32_768 + 512)
    );
    // The fused mass keeps Q in its own tile at D = 128 (its accumulators take Q's registers).
    for (d, want) in [(64usize, 33_960usize), (128, 83_112)] {
        assert_eq!(fwd_smem_bytes(DType::BF16, d, FwdVariant::Mass), Some(want));
        assert_eq!(fwd_smem_bytes(DType::F16, d, FwdVariant::Mass), Some(want));
    }
    // The wide kernel: Q (128 rows) in its own tile; key tiles of 32 at D = 128.
    // D = 64: 4 x 8 KiB + 16 KiB + 1,712 B; D = 128: 4 x 8 KiB + 32 KiB + 1,456 B.
    for (d, want) in [(64usize, 50_864usize), (128, 66_992)] {
        assert_eq!(fwd_smem_bytes(DType::BF16, d, FwdVariant::Wide), Some(want));
        assert_eq!(fwd_smem_bytes(DType::F16, d, FwdVariant::Wide), Some(want));
    }
    // The wide kernel with 64-key tiles at D = 128: 4 x 16 KiB + 32 KiB + 1,712 B (two blocks per
    // SM on sm_90); at D = 64 the wide kernel's own.
    for (d, want) in [(64usize, 50_864usize), (128, 100_016)] {
        assert_eq!(fwd_smem_bytes(DType::BF16, d, FwdVariant::Wide64), Some(want));
        assert_eq!(fwd_smem_bytes(DType::F16, d, FwdVariant::Wide64), Some(want));
    }
    // ... and with the fused mass (D = 128 only): the same fixed layout, then the rows' sums
    // (128 rows x an odd number of f32, at least one; the second row tile 16 f32 further on).
    assert_eq!(fwd_smem_bytes(DType::BF16, 64, FwdVariant::WideMass), None);
    assert_eq!(fwd_smem_bytes(DType::BF16, 128, FwdVariant::WideMass), Some(100_016));
    for (sk, want) in [
        (0usize, 100_016 + 512 + 64),
        (22, 100_016 + 512 * 23 + 64),
        (29, 114_928),
    ] {
        assert_eq!(fwd_mass_rows_smem_bytes(DType::BF16, 128, sk), Some(want));
        assert_eq!(fwd_mass_rows_smem_bytes(DType::F16, 128, sk), Some(want));
    }
    assert_eq!(fwd_mass_rows_smem_bytes(DType::BF16, 64, 8), None);
    // PINE's variant keeps Q and the turned Q in their own tiles, and each row's position and
    // shift row (512 B).
    for (d, want) in [(64usize, 50_344usize + 512), (128, 99_496 + 512)] {
        assert_eq!(fwd_smem_bytes(DType::BF16, d, FwdVariant::Rope), Some(want));
        assert_eq!(fwd_smem_bytes(DType::F16, d, FwdVariant::Rope), Some(want));
    }
}

/// A random tile window inside `len`: start anywhere, 0..=64 long, clipped.
fn window(rng: &mut Rng, len: usize) -> (usize, usize) {
    let start = rng.below(len + 1);
    let end = (start + rng.below(65)).min(len);
    (start, end)
}

proptest! {
    #![proptest_config(proptest_config(cases(256) * 8))]

    /// kernels/mask.cuh (block-cooperative and one-thread, emulated) and src/mask/tiles.rs
    /// classify alike.
    #[test]
    fn kernel_tile_classification_matches_rust(
        seed in any::<u64>(),
        batch in 1usize..=2,
        lk in 1usize..=300,
        lq_raw in 1usize..=300,
        kind in 0usize..MASK_KINDS,
    ) {
        let mut rng = Rng(seed);
        let lq = if kind == MASK_KINDS - 1 || rng.coin(0.5) { lq_raw } else { 1 + (lq_raw - 1) % lk };
        let lq = if kind == MASK_KINDS - 1 { lq } else { lq.min(lk) };
        let (name, mask) = build_mask(&mut rng, kind, batch, lq, lk).unwrap();
        for _ in 0..8 {
            let b = rng.below(batch);
            let (q0, q1) = window(&mut rng, lq);
            let (k0, k1) = window(&mut rng, lk);
            let budget = [4, 64, usize::MAX][rng.below(3)];
            let c = classify_tile_both(&mask, batch, lq, lk, b, (q0, q1), (k0, k1), budget).unwrap();
            let at = format!("seed {seed} Lq {lq} Lk {lk} row {b} tile [{q0}, {q1}) x [{k0}, {k1}) budget {budget} mask {name}");
            prop_assert_eq!(c.rust, c.kernel, "{}", at);
            // The loop bound may only be conservative, and is exact with an unlimited budget.
            prop_assert!(c.may_be_visible || c.rust == 0, "{}", at);
            if budget == usize::MAX {
                prop_assert_eq!(c.may_be_visible, c.rust != 0, "{}", at);
            }
            // The loop's one-thread class is exact, or gives up (only past a limited budget).
            match c.alone {
                Some(alone) => prop_assert_eq!(alone, c.rust, "{}", at),
                None => prop_assert!(budget != usize::MAX, "{}", at),
            }
        }
    }
}

proptest! {
    #![proptest_config(proptest_config(cases(512)))]

    /// kernels/mask.cuh `key_runs` (one warp, emulated; what the masked tiles and the mass sums
    /// rely on) against the plain definition, on non-decreasing ids with one to many runs, ragged
    /// `valid`, and ids past `valid` that do not continue the sequence (the kernels zero-fill them).
    #[test]
    fn key_runs_match_the_definition(seed in any::<u64>(), valid in 1usize..=64, runs in 1usize..=6) {
        let mut rng = Rng(seed);
        let mut kid = [0u32; 64];
        let mut id = rng.below(5) as u32;
        for x in kid.iter_mut().take(valid) {
            if rng.coin(runs as f64 / 64.0) {
                id += 1 + rng.below(3) as u32;
            }
            *x = id;
        }
        for x in kid.iter_mut().skip(valid) {
            *x = if rng.coin(0.5) { 0 } else { id + 1 };
        }
        let (end0, id0, id1, at_most_two) = segattn::emulated::key_runs(&kid, valid).unwrap();
        let want_end0 = kid[..valid].iter().position(|&x| x != kid[0]).unwrap_or(valid);
        let want_id1 = kid[want_end0.min(valid - 1)];
        let want_two = kid[want_end0..valid].iter().all(|&x| x == want_id1);
        let at = format!("seed {seed} valid {valid} ids {:?}", &kid[..valid]);
        prop_assert_eq!(end0, want_end0, "{}", at);
        prop_assert_eq!(id0, kid[0], "{}", at);
        prop_assert_eq!(id1, want_id1, "{}", at);
        prop_assert_eq!(at_most_two, want_two, "{}", at);
    }
}
