//! Validation of attention inputs. Every check names the argument, the expected and the actual.

use candle_core::{DType, Layout, Result, Tensor};

use crate::error::invalid_arg;

/// Largest head dimension the CPU path supports.
pub const MAX_HEAD_DIM_CPU: usize = 256;

/// The sizes of an attention call, read from q `[B, Lq, H, D]` and k, v `[B, Lk, Hkv, D]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// B.
    pub batch: usize,
    /// Lq.
    pub q_len: usize,
    /// Lk.
    pub kv_len: usize,
    /// H, query heads.
    pub num_heads: usize,
    /// Hkv, key/value heads (H % Hkv == 0).
    pub num_kv_heads: usize,
    /// D.
    pub head_dim: usize,
}

impl AttentionShape {
    /// Validates q, k, v and returns their sizes.
    pub fn of(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Self> {
        for (name, t) in [("q", q), ("k", k), ("v", v)] {
            if t.rank() != 4 {
                let want = if name == "q" {
                    "[B, Lq, H, D]"
                } else {
                    "[B, Lk, Hkv, D]"
                };
                invalid_arg!("{name}: expected rank 4 {want}, got shape {:?}", t.dims());
            }
        }
        let dtype = q.dtype();
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            invalid_arg!("q: expected dtype f32, f16 or bf16, got {dtype:?}");
        }
        for (name, t) in [("k", k), ("v", v)] {
            if t.dtype() != dtype {
                invalid_arg!("{name}: expected dtype {dtype:?} (the dtype of q), got {:?}", t.dtype());
            }
            if t.device().location() != q.device().location() {
                invalid_arg!(
                    "{name}: expected device {:?} (the device of q), got {:?}",
                    q.device().location(),
                    t.device().location()
                );
            }
        }
        let (batch, q_len, num_heads, head_dim) = q.dims4()?;
        let (kb, kv_len, num_kv_heads, kd) = k.dims4()?;
        if kb != batch {
            invalid_arg!(
                "k: expected batch size {batch} (the batch of q), got shape {:?}",
                k.dims()
            );
        }
        if kd != head_dim {
            invalid_arg!(
                "k: expected head dim {head_dim} (the last dim of q), got shape {:?}",
                k.dims()
            );
        }
        if v.dims() != k.dims() {
            invalid_arg!("v: expected shape {:?} (the shape of k), got {:?}", k.dims(), v.dims());
        }
        if num_heads == 0 {
            invalid_arg!(
                "q: expected at least one head (dim 2 of [B, Lq, H, D]), got shape {:?}",
                q.dims()
            );
        }
        if num_kv_heads == 0 {
            invalid_arg!(
                "k: expected at least one head (dim 2 of [B, Lk, Hkv, D]), got shape {:?}",
                k.dims()
            );
        }
        if num_heads % num_kv_heads != 0 {
            invalid_arg!(
                "k: the number of query heads H = {num_heads} must be a multiple of the number of \
                 key/value heads Hkv = {num_kv_heads} (GQA), got shape {:?}",
                k.dims()
            );
        }
        if head_dim == 0 || head_dim > MAX_HEAD_DIM_CPU {
            invalid_arg!("q: unsupported head dim D = {head_dim}, expected 1..={MAX_HEAD_DIM_CPU}");
        }
        for (name, t) in [("q", q), ("k", k), ("v", v)] {
            check_last_dim_contiguous(name, t.layout())?;
        }
        Ok(Self {
            batch,
            q_len,
            kv_len,
            num_heads,
            num_kv_heads,
            head_dim,
        })
    }

    /// Number of query heads that share one key/value head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

/// Checks that the last dimension of a layout has stride 1.
pub(crate) fn check_last_dim_contiguous(name: &str, layout: &Layout) -> Result<()> {
    let stride = layout.stride();
    if stride.last().is_some_and(|&s| s != 1) && layout.dims().last().is_some_and(|&d| d > 1) {
        invalid_arg!(
            "{name}: expected the last dimension to be contiguous (stride 1), got strides {stride:?} \
             for shape {:?}; call .contiguous() first",
            layout.dims()
        );
    }
    Ok(())
}

/// Strides (batch, row, head) in elements and the start offset of a rank-4 layout.
pub(crate) fn strides4(layout: &Layout) -> ([usize; 3], usize) {
    let s = layout.stride();
    ([s[0], s[1], s[2]], layout.start_offset())
}

/// The default softmax scale, `1 / sqrt(D)`.
pub fn default_scale(head_dim: usize) -> f64 {
    1.0 / (head_dim as f64).sqrt()
}
