//! Rotary position embedding (RoPE), rotate-half (Llama / GPT-NeoX) convention.
//!
//! Dimension pairs are `(i, i + D/2)`; pair `i` turns by the angle `p * inv_freq[i]` at position
//! `p`. The frequencies come from a base `theta` (`inv_freq[i] = theta^(-2i / D)`), optionally
//! reshaped by Llama-3's frequency scaling, or from the caller's own cos / sin tables.
//!
//! PINE needs a rotation by `p + s` (the query's position plus its group's shift for a key
//! segment). It is applied as two rotations, by `p` then by `s`, both `< L`: a table of `L`
//! positions covers every call, and caller tables of the model's context length suffice.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor, D};

use crate::error::invalid_arg;

/// Llama-3's frequency scaling (the `rope_scaling` block of a Llama-3.1 config): long
/// wavelengths are divided by `factor`, short ones kept, the band between interpolated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Scaling {
    /// Divisor of the low frequencies (8 for Llama-3.1).
    pub factor: f64,
    /// Wavelengths above `original_max_position / low_freq_factor` are scaled (1).
    pub low_freq_factor: f64,
    /// Wavelengths below `original_max_position / high_freq_factor` are kept (4).
    pub high_freq_factor: f64,
    /// The pre-training context length (8192).
    pub original_max_position: f64,
}

impl Llama3Scaling {
    /// Llama-3.1's values: factor 8, low 1, high 4, original context 8192.
    pub fn llama31() -> Self {
        Self {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 8192.0,
        }
    }

    /// Values for which [`Llama3Scaling::apply`] is finite: a factor, two wavelength bounds in
    /// order (the blend divides by `high - low`) and a context length, all positive and finite.
    fn check(&self) -> Result<()> {
        for (name, x) in [
            ("factor", self.factor),
            ("low_freq_factor", self.low_freq_factor),
            ("original_max_position", self.original_max_position),
        ] {
            if !(x.is_finite() && x > 0.0) {
                invalid_arg!("rope: Llama-3 scaling: expected {name} > 0 and finite, got {x}");
            }
        }
        if !(self.high_freq_factor.is_finite() && self.high_freq_factor > self.low_freq_factor) {
            invalid_arg!(
                "rope: Llama-3 scaling: expected high_freq_factor > low_freq_factor = {}, got {}",
                self.low_freq_factor,
                self.high_freq_factor
            );
        }
        Ok(())
    }

    fn apply(&self, inv_freq: f64) -> f64 {
        let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
        let low_wavelen = self.original_max_position / self.low_freq_factor;
        let high_wavelen = self.original_max_position / self.high_freq_factor;
        if wavelen > low_wavelen {
            inv_freq / self.factor
        } else if wavelen < high_wavelen {
            inv_freq
        } else {
            let smooth = (self.original_max_position / wavelen - self.low_freq_factor)
                / (self.high_freq_factor - self.low_freq_factor);
            (1.0 - smooth) * inv_freq / self.factor + smooth * inv_freq
        }
    }
}

/// Where the rotation angles come from.
#[derive(Clone, Debug)]
enum Angles {
    /// `inv_freq[i] = theta^(-2i / D)`, optionally scaled.
    Theta { theta: f64, scaling: Option<Llama3Scaling> },
    /// The caller's tables `[max_pos, D/2]` (f32 on the CPU).
    Tables {
        cos: Vec<f32>,
        sin: Vec<f32>,
        max_pos: usize,
        half: usize,
    },
}

/// A RoPE configuration (rotate-half).
///
/// ```
/// use segattn::pine::{Llama3Scaling, Rope};
/// let rope = Rope::new(500_000.0).with_llama3_scaling(Llama3Scaling::llama31());
/// # let _ = rope;
/// ```
#[derive(Clone, Debug)]
pub struct Rope {
    angles: Angles,
    /// Pairs rotated (theta form): those past it keep frequency 0, and the frequencies are those
    /// of head dim `2 x pairs`; `None`: every pair of the tensor's D. Set by [`Rope::padded`].
    pairs: Option<usize>,
    /// The longest table built so far (shared by clones): a decode step asks for the same table
    /// as the step before it, and building one costs two f64 sin / cos per entry.
    cache: Arc<Mutex<Option<Arc<RopeTable>>>>,
}

impl Rope {
    /// Frequencies from the base `theta` (10 000 for Llama-2, 500 000 for Llama-3).
    pub fn new(theta: f64) -> Self {
        Self {
            angles: Angles::Theta { theta, scaling: None },
            pairs: None,
            cache: Arc::default(),
        }
    }

    /// Adds Llama-3's frequency scaling (only for [`Rope::new`]; tables are taken as given).
    pub fn with_llama3_scaling(mut self, scaling: Llama3Scaling) -> Self {
        if let Angles::Theta { scaling: s, .. } = &mut self.angles {
            *s = Some(scaling);
        }
        self.cache = Arc::default();
        self
    }

    /// The caller's tables: `cos` and `sin` `[max_pos, D/2]` (any float dtype, any device),
    /// `cos[p, i] = cos(p * f_i)` for a frequency `f_i` per pair. They must be a true rotation
    /// linear in the position (PINE's identity relies on it); positions used are below the
    /// sequence length.
    pub fn from_tables(cos: &Tensor, sin: &Tensor) -> Result<Self> {
        let (max_pos, half) = cos.dims2().map_err(|_| {
            candle_core::Error::Msg(format!(
                "segattn: cos: expected rank 2 [max_pos, D/2], got shape {:?}",
                cos.dims()
            ))
        })?;
        if sin.dims() != cos.dims() {
            invalid_arg!("sin: expected the shape of cos {:?}, got {:?}", cos.dims(), sin.dims());
        }
        let host = |t: &Tensor| -> Result<Vec<f32>> { t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>() };
        Ok(Self {
            angles: Angles::Tables {
                cos: host(cos)?,
                sin: host(sin)?,
                max_pos,
                half,
            },
            pairs: None,
            cache: Arc::default(),
        })
    }

    /// This rotation for head dim `d` as it acts on inputs zero-padded to `width`
    /// ([`crate::head_dim::pad`]: each half padded): pairs `i < d / 2` turn as they do at D = `d`,
    /// the padding pairs not at all (frequency 0: cos 1, sin 0). A new table cache.
    pub(crate) fn padded(&self, d: usize, width: usize) -> Self {
        let (half, wide) = (d / 2, width / 2);
        let (angles, pairs) = match &self.angles {
            theta @ Angles::Theta { .. } => (theta.clone(), Some(half)),
            Angles::Tables { cos, sin, max_pos, .. } => {
                let widen = |t: &[f32], fill: f32| -> Vec<f32> {
                    t.chunks(half.max(1))
                        .flat_map(|row| row.iter().copied().chain(std::iter::repeat_n(fill, wide - half)))
                        .collect()
                };
                let tables = Angles::Tables {
                    cos: widen(cos, 1.0),
                    sin: widen(sin, 0.0),
                    max_pos: *max_pos,
                    half: wide,
                };
                (tables, None) // the widened tables carry the padding pairs themselves
            }
        };
        Self {
            angles,
            pairs,
            cache: Arc::default(),
        }
    }

    /// The base `theta` and scaling, when the angles are not given as tables.
    pub(crate) fn theta(&self) -> Option<(f64, Option<Llama3Scaling>)> {
        match &self.angles {
            Angles::Theta { theta, scaling } => Some((*theta, *scaling)),
            Angles::Tables { .. } => None,
        }
    }

    /// The frequency of every pair for head dimension `d`, in f64 (theta form only).
    pub fn inv_freq(&self, d: usize) -> Option<Vec<f64>> {
        let (theta, scaling) = self.theta()?;
        // A padded rotation (crate-internal): the real head dim's frequencies, then zeros.
        let pairs = self.pairs.unwrap_or(d / 2).min(d / 2);
        let real_d = 2 * pairs;
        Some(
            (0..d / 2)
                .map(|i| {
                    if i >= pairs {
                        return 0.0;
                    }
                    let f = theta.powf(-2.0 * i as f64 / real_d as f64);
                    scaling.map_or(f, |s| s.apply(f))
                })
                .collect(),
        )
    }

    /// Checks the configuration against head dimension `d` and positions `< len` (tables: `len`
    /// may reach twice their length, the rest comes from angle addition).
    pub(crate) fn check(&self, d: usize, len: usize) -> Result<()> {
        if !d.is_multiple_of(2) {
            invalid_arg!("q: RoPE needs an even head dimension, got D = {d}");
        }
        match &self.angles {
            Angles::Theta { theta, .. } if !(theta.is_finite() && *theta > 1.0) => {
                invalid_arg!("rope: expected theta > 1, got {theta}")
            }
            Angles::Theta {
                scaling: Some(scaling), ..
            } => scaling.check(),
            Angles::Tables { half, .. } if *half != d / 2 => {
                invalid_arg!("rope: expected tables [max_pos, D/2 = {}], got D/2 = {half}", d / 2)
            }
            Angles::Tables { max_pos, .. } if len >= 2 * *max_pos => {
                invalid_arg!(
                    "rope: the tables cover {max_pos} positions; PINE needs positions up to {} (a query's position \
                     plus its shift), at most 2 x {max_pos} - 1 from angle addition",
                    len - 1
                )
            }
            _ => Ok(()),
        }
    }

    /// cos / sin of every position `0..len` and pair, f32 `[len, D/2]`, on the host.
    pub(crate) fn table(&self, d: usize, len: usize) -> Result<Arc<RopeTable>> {
        self.check(d, len)?;
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| candle_core::Error::Msg("segattn: RoPE table cache poisoned by a panic".into()))?;
        if let Some(t) = cache.as_ref() {
            if t.half == d / 2 && t.cos.len() >= len * t.half {
                return Ok(t.clone());
            }
        }
        // Grown geometrically, so that a growing decode cache rebuilds it O(log L) times.
        let grown = cache.as_ref().filter(|t| t.half == d / 2).map_or(len, |t| {
            let have = t.cos.len() / t.half;
            len.max(have + have / 2)
        });
        let len = if self.check(d, grown).is_ok() { grown } else { len };
        let table = Arc::new(self.build_table(d, len));
        *cache = Some(table.clone());
        Ok(table)
    }

    /// cos / sin of every position `0..len` and pair (the configuration already checked).
    fn build_table(&self, d: usize, len: usize) -> RopeTable {
        let half = d / 2;
        let (cos, sin) = match &self.angles {
            Angles::Tables { cos, sin, max_pos, .. } => {
                // Positions past the table (a query turned by its position plus a shift) by angle
                // addition: p = a + b with a, b inside the table.
                let mut c = cos[..len.min(*max_pos) * half].to_vec();
                let mut s = sin[..len.min(*max_pos) * half].to_vec();
                for p in *max_pos..len {
                    let (a, b) = (max_pos - 1, p - (max_pos - 1));
                    for i in 0..half {
                        let (ca, sa) = (f64::from(cos[a * half + i]), f64::from(sin[a * half + i]));
                        let (cb, sb) = (f64::from(cos[b * half + i]), f64::from(sin[b * half + i]));
                        c.push((ca * cb - sa * sb) as f32);
                        s.push((sa * cb + ca * sb) as f32);
                    }
                }
                (c, s)
            }
            Angles::Theta { .. } => {
                let f = self.inv_freq(d).expect("theta form");
                let mut cos = Vec::with_capacity(len * half);
                let mut sin = Vec::with_capacity(len * half);
                for p in 0..len {
                    for &fi in &f {
                        let (s, c) = (p as f64 * fi).sin_cos();
                        cos.push(c as f32);
                        sin.push(s as f32);
                    }
                }
                (cos, sin)
            }
        };
        RopeTable {
            half,
            cos,
            sin,
            #[cfg(feature = "cuda")]
            device: Default::default(),
            tensors: Default::default(),
        }
    }

    /// Rotates `x` `[B, L, heads, D]` at `positions` `[B, L]` (u32; batch 1 is shared), as
    /// tensor ops on the device of `x`, computed in f32 and returned in the dtype of `x`. With
    /// `inverse`, rotates by minus the position (undoes a rotation). Positions must be below the
    /// table length (tables) — any position works with `theta`.
    pub fn rotate(&self, x: &Tensor, positions: &Tensor, inverse: bool) -> Result<Tensor> {
        let (b, l, _h, _d) = x.dims4()?;
        let (pb, pl) = positions.dims2()?;
        if (pb != b && pb != 1) || pl != l {
            invalid_arg!(
                "positions: expected shape [{b}, {l}] (or [1, {l}]), got {:?}",
                positions.dims()
            );
        }
        let pos: Vec<u32> = positions.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
        self.rotate_at(x, &pos, pb, inverse)?.to_dtype(x.dtype())
    }

    /// [`Rope::rotate`] at host positions `pos` (`[pb, L]`, row-major; no device read), f32
    /// whatever the dtype of `x` (no final rounding) — except for bf16 / f16 on a CUDA device,
    /// where one kernel returns the dtype of `x` (rounded once: what every caller rounds to).
    pub(crate) fn rotate_at(&self, x: &Tensor, pos: &[u32], pb: usize, inverse: bool) -> Result<Tensor> {
        let (b, l, heads, d) = x.dims4()?;
        let len = pos.iter().copied().max().map_or(0, |m| m as usize + 1);
        let table = self.table(d, len)?;
        if x.device().is_cpu() {
            // One pass over x (the tensor-op form below makes five, with as many allocations).
            let mut out = cpu_f32(x)?;
            let sign = if inverse { -1.0 } else { 1.0 };
            let half = d / 2;
            let mut sn = vec![0f32; half];
            for (t, token) in out.chunks_exact_mut(heads * d).enumerate() {
                let p = pos[if pb == 1 { t % l } else { t }] as usize;
                let (c, sin) = table.angles(p);
                for (dst, &x) in sn.iter_mut().zip(sin) {
                    *dst = sign * x;
                }
                for row in token.chunks_exact_mut(d) {
                    let (lo, hi) = row.split_at_mut(half);
                    for (((x1, x2), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(c).zip(&sn) {
                        (*x1, *x2) = turn(*x1, *x2, c, s);
                    }
                }
            }
            return Tensor::from_vec(out, (b, l, heads, d), x.device());
        }
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && matches!(x.dtype(), DType::BF16 | DType::F16) {
            // One kernel, in the dtype of x (the callers round to it anyway).
            return crate::cuda::rope_rows(x, pos, pb, &table, inverse);
        }
        let (cos, sin) = table.gather(pos, (pb, l), x.device())?;
        let sin = if inverse { sin.neg()? } else { sin };
        let x = x.to_dtype(DType::F32)?;
        let half = d / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let lo = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let hi = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Tensor::cat(&[lo, hi], D::Minus1)
    }
}

/// cos / sin of positions `0..len`, f32 `[len, half]` row-major, on the host (immutable: a longer
/// table is a new one).
#[derive(Clone, Debug)]
pub(crate) struct RopeTable {
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    /// Its packed copy on each CUDA device it was used on, uploaded once (a decode step would
    /// otherwise copy the whole table to the GPU twice).
    #[cfg(feature = "cuda")]
    pub device: crate::cuda::DeviceTables,
    /// cos and sin as `[len, half]` tensors on each non-CPU device the tensor-op rotation ran on,
    /// uploaded once: the rotation then gathers its rows there from the positions alone.
    tensors: TableTensors,
}

/// Device copies of a table as tensors, by device (see [`RopeTable::gather`]).
#[derive(Clone, Default)]
struct TableTensors(Arc<Mutex<Vec<(Device, Tensor, Tensor)>>>);

impl std::fmt::Debug for TableTensors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map_or(0, |v| v.len());
        write!(f, "TableTensors({n} devices)")
    }
}

impl RopeTable {
    /// [`RopeTable::gather`] by `index_select` on the table's copy on `device`.
    fn gather_on_device(&self, pos: &[u32], (pb, l): (usize, usize), device: &Device) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = self.on_device(device)?;
        let idx = Tensor::from_slice(pos, pos.len(), device)?;
        let h = self.half;
        Ok((
            cos.index_select(&idx, 0)?.reshape((pb, l, 1, h))?,
            sin.index_select(&idx, 0)?.reshape((pb, l, 1, h))?,
        ))
    }

    /// The table as `[len, half]` cos and sin tensors on `device`, uploaded on first use.
    fn on_device(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let mut copies = self
            .tensors
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("segattn: RoPE table cache poisoned by a panic".into()))?;
        if let Some((_, c, s)) = copies.iter().find(|(d, _, _)| d.same_device(device)) {
            return Ok((c.clone(), s.clone()));
        }
        let rows = self.cos.len() / self.half.max(1);
        let cos = Tensor::from_slice(&self.cos, (rows, self.half), device)?;
        let sin = Tensor::from_slice(&self.sin, (rows, self.half), device)?;
        copies.push((device.clone(), cos.clone(), sin.clone()));
        Ok((cos, sin))
    }

    /// Rotates one row (`2 * half` values, rotate-half pairs) in place by position `p`.
    /// Inlined into the CPU loops' SIMD builds (out of line it ran in the baseline build).
    #[inline(always)]
    pub fn rotate_row(&self, row: &mut [f32], p: usize) {
        let (c, s) = self.angles(p);
        let (lo, hi) = row[..2 * self.half].split_at_mut(self.half);
        for i in 0..self.half {
            (lo[i], hi[i]) = turn(lo[i], hi[i], c[i], s[i]);
        }
    }

    /// `dst` = `src` rotated by position `p` ([`RopeTable::rotate_row`]'s values, without first
    /// copying `src` into `dst`); elements past `2 * half` are left alone.
    #[inline(always)]
    pub fn rotate_row_into(&self, dst: &mut [f32], src: &[f32], p: usize) {
        let (c, s) = self.angles(p);
        let (x1, x2) = src[..2 * self.half].split_at(self.half);
        let (lo, hi) = dst[..2 * self.half].split_at_mut(self.half);
        for i in 0..self.half {
            (lo[i], hi[i]) = turn(x1[i], x2[i], c[i], s[i]);
        }
    }

    /// The cos and sin rows of position `p` (`half` values each).
    #[inline(always)]
    fn angles(&self, p: usize) -> (&[f32], &[f32]) {
        let h = self.half;
        (&self.cos[p * h..(p + 1) * h], &self.sin[p * h..(p + 1) * h])
    }

    /// cos and sin gathered at `pos` (`[pb, l]`), as `[pb, l, 1, half]` f32 tensors on `device`.
    /// On a GPU the rows are gathered there from the table's device copy (uploaded once), so a
    /// call uploads its positions (4 bytes a token), not 2 x half floats a token.
    fn gather(&self, pos: &[u32], (pb, l): (usize, usize), device: &Device) -> Result<(Tensor, Tensor)> {
        let h = self.half;
        if !device.is_cpu() {
            return self.gather_on_device(pos, (pb, l), device);
        }
        let mut cos = Vec::with_capacity(pos.len() * h);
        let mut sin = Vec::with_capacity(pos.len() * h);
        for &p in pos {
            let (c, s) = self.angles(p as usize);
            cos.extend_from_slice(c);
            sin.extend_from_slice(s);
        }
        Ok((
            Tensor::from_vec(cos, (pb, l, 1, h), device)?,
            Tensor::from_vec(sin, (pb, l, 1, h), device)?,
        ))
    }
}

/// The rotate-half pair `(x1, x2)` (dims i and i + D/2) turned by the angle of cos `c`, sin `s`.
#[inline(always)]
fn turn(x1: f32, x2: f32, c: f32, s: f32) -> (f32, f32) {
    (x1 * c - x2 * s, x2 * c + x1 * s)
}

/// The elements of a CPU tensor as one new f32 vector, read straight from its storage when it is
/// contiguous (one allocation: a large fresh buffer costs its page faults, so copies add up).
fn cpu_f32(x: &Tensor) -> Result<Vec<f32>> {
    use candle_core::{CpuStorage, Storage};
    {
        let (storage, layout) = x.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) {
            match cpu {
                CpuStorage::F32(v) => return Ok(v[a..b].to_vec()),
                CpuStorage::BF16(v) => return Ok(v[a..b].iter().map(|x| x.to_f32()).collect()),
                CpuStorage::F16(v) => return Ok(v[a..b].iter().map(|x| x.to_f32()).collect()),
                _ => {}
            }
        }
    }
    x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device gather (index_select on the table's device copy; here the CPU stands in for a
    /// GPU) gives the host gather's rows, batch-shared positions or not, and uploads the table
    /// once per device.
    #[test]
    fn device_gather_equals_host_gather() -> Result<()> {
        let rope = Rope::new(10_000.0);
        let table = rope.table(16, 40)?;
        let pos: Vec<u32> = vec![0, 3, 39, 7, 7, 12, 1, 38];
        for (pb, l) in [(1usize, 8usize), (2, 4)] {
            let (hc, hs) = table.gather(&pos, (pb, l), &Device::Cpu)?;
            let (dc, ds) = table.gather_on_device(&pos, (pb, l), &Device::Cpu)?;
            assert_eq!(dc.dims(), &[pb, l, 1, 8]);
            let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            assert_eq!(flat(&hc)?, flat(&dc)?);
            assert_eq!(flat(&hs)?, flat(&ds)?);
        }
        assert_eq!(table.tensors.0.lock().unwrap().len(), 1);
        Ok(())
    }
}
