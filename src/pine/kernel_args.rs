//! The parameters of PINE's kernels (`kernels/segattn_params.h`), filled in one place for the GPU
//! launcher (`src/cuda/pine.rs`, device addresses) and the emulated launches
//! (`src/emulated/pine.rs`, host addresses): sizes, 32-bit checks, and where each packed array
//! starts. The arrays themselves are packed by [`GroupLayout::packed_meta`],
//! [`QueryShifts::packed_rows`] and [`RopeTable::packed`], so both sides lay them out alike.

use candle_core::{DType, Result};

use super::order::{GroupLayout, QueryShifts};
use super::{PineRotation, RopeTable};
use crate::kernel_params::{dtype_code, to_i32};
use crate::params::{
    SegattnDecodeScoresParams, SegattnRopeRowsParams, SegattnRotation, SegattnShiftsParams, SegattnStrides,
};
use crate::validate::AttentionShape;

impl GroupLayout {
    /// `[num_segs | first_suffix_row | segment_lens]`: the layout metadata of the shifts kernel.
    pub(crate) fn packed_meta(&self) -> Vec<u32> {
        [&self.num_segs[..], &self.first_suffix_row, &self.segment_lens].concat()
    }

    /// Where the parts of a [`GroupLayout::packed_meta`] copy at `meta` start, for `batch` rows:
    /// (num_segs, first_suffix_row, segment_lens).
    fn meta_parts(meta: *const u32, batch: usize) -> (*const u32, *const u32, *const u32) {
        (meta, meta.wrapping_add(batch), meta.wrapping_add(2 * batch))
    }
}

impl QueryShifts {
    /// `[q_pos | row_group]`, plus one word (never an empty allocation).
    pub(crate) fn packed_rows(&self) -> Vec<u32> {
        [&self.q_pos[..], &self.row_group, &[0]].concat()
    }
}

impl RopeTable {
    /// `[cos | sin]`.
    pub(crate) fn packed(&self) -> Vec<f32> {
        [&self.cos[..], &self.sin].concat()
    }
}

/// The rotation of a `segattn_fwd_rope_*` launch: `table` holds [`RopeTable::packed`], `rows`
/// [`QueryShifts::packed_rows`], `shifts` the `[B, H, groups, Sk]` shifts; `packed_heads` query
/// heads per kernel row block (GQA decode packing, `src/decode_pack.rs`; 1: none).
pub(crate) fn rotation_params(
    rot: &PineRotation,
    table: *const f32,
    rows: *const u32,
    shifts: *const u32,
    packed_heads: usize,
) -> Result<SegattnRotation> {
    rot.check_kernel_limits()?;
    let (t, s) = (&rot.table, &rot.shifts);
    Ok(SegattnRotation {
        cos: table,
        sin: table.wrapping_add(t.cos.len()),
        table_len: to_i32("rope table", t.cos.len() / t.half)?,
        groups: to_i32("query groups", s.groups)?,
        q_pos: rows,
        row_group: rows.wrapping_add(s.q_pos.len()),
        shifts,
        num_segments: to_i32("key segments", s.sk)?,
        packed_heads: to_i32("packed heads", packed_heads)?,
    })
}

/// The shifts kernel's launch for `groups` x `heads` (`scored_rows` last query rows scored per
/// row, 0 when there are none): `meta` holds [`GroupLayout::packed_meta`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn shifts_params(
    groups: &GroupLayout,
    heads: usize,
    q_len: usize,
    scored_rows: usize,
    segment_scores: *const f32,
    row_scores: *const f32,
    meta: *const u32,
    out: *mut u32,
) -> Result<SegattnShiftsParams> {
    let batch = groups.num_segs.len();
    let (num_segs, first_suffix_row, segment_lens) = GroupLayout::meta_parts(meta, batch);
    Ok(SegattnShiftsParams {
        segment_scores,
        row_scores,
        num_segs,
        first_suffix_row,
        segment_lens,
        shifts: out,
        batch: to_i32("batch", batch)?,
        num_heads: to_i32("num_heads", heads)?,
        groups: to_i32("query groups", groups.groups)?,
        num_segments: to_i32("key segments", groups.sk)?,
        q_len: to_i32("q_len", q_len)?,
        scored_rows: to_i32("scored rows", scored_rows)?,
    })
}

/// The decode-importance kernel's key slices: `splits` of them, and (`splits > 1`) the partial
/// buffers `max`, `total` (`splits * rows` floats, rows = B H Lq) and `acc` (`splits * rows * Sk`),
/// and `done`, one zeroed counter per (batch row, query row, KV head) (the last slice to finish
/// merges).
#[derive(Clone, Copy)]
pub(crate) struct DecodePartials {
    pub splits: usize,
    pub max: *mut f32,
    pub total: *mut f32,
    pub acc: *mut f32,
    pub done: *mut u32,
}

impl DecodePartials {
    /// One slice: the kernel writes the output itself.
    pub fn none() -> Self {
        Self {
            splits: 1,
            max: std::ptr::null_mut(),
            total: std::ptr::null_mut(),
            acc: std::ptr::null_mut(),
            done: std::ptr::null_mut(),
        }
    }

    /// Floats of the `max` / `total` and the `acc` buffers for `splits` slices of `shape`.
    pub fn sizes(shape: &AttentionShape, sk: usize, splits: usize) -> (usize, usize) {
        let rows = shape.batch * shape.num_heads * shape.q_len;
        (splits * rows, splits * rows * sk)
    }

    /// Counters of `done`: one per (batch row, query row, KV head).
    pub fn counters(shape: &AttentionShape) -> usize {
        shape.batch * shape.q_len * shape.num_kv_heads
    }
}

/// Where the decode-importance kernel writes the order of its rows: `shifts` `[B, H,
/// groups.groups, Sk]` (every element), from the group metadata `meta` ([`GroupLayout::packed_meta`]
/// of `groups`).
#[derive(Clone, Copy)]
pub(crate) struct DecodeOrder {
    pub shifts: *mut u32,
    pub meta: *const u32,
    pub groups: usize,
}

/// The decode-importance kernel's launch: `words` holds `PineAttention::decode_keys`
/// (`[key_pos | key_seg | seg_lens]`), `table_addr` the [`RopeTable::packed`] of `table`; the
/// kernel also orders its rows (`order`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_scores_params(
    shape: &AttentionShape,
    dtype: DType,
    sk: usize,
    scale: f32,
    (q, q_strides): (*const std::ffi::c_void, SegattnStrides),
    (k, k_strides): (*const std::ffi::c_void, SegattnStrides),
    words: *const u32,
    table: &RopeTable,
    table_addr: *const f32,
    out: *mut f32,
    partials: DecodePartials,
    order: DecodeOrder,
) -> Result<SegattnDecodeScoresParams> {
    let Some(dtype) = dtype_code(dtype) else {
        crate::error::invalid_arg!("q: the CUDA kernels support dtype bf16 or f16, got {dtype:?}");
    };
    let max_splits = crate::params::SEGATTN_DECODE_SCORES_MAX_SPLITS as usize;
    if partials.splits > max_splits {
        crate::error::invalid_arg!(
            "kv_splits: PINE's decode importance merges at most {max_splits} key slices, got {}",
            partials.splits
        );
    }
    let (b, lk) = (shape.batch, shape.kv_len);
    // The decode words carry the segment lengths; the group metadata the counts and first rows.
    let (num_segs, first_suffix_row, _) = GroupLayout::meta_parts(order.meta, b);
    Ok(SegattnDecodeScoresParams {
        q,
        q_strides,
        k,
        k_strides,
        key_pos: words,
        key_seg: words.wrapping_add(b * lk),
        seg_lens: words.wrapping_add(2 * b * lk),
        cos: table_addr,
        sin: table_addr.wrapping_add(table.cos.len()),
        out,
        batch: to_i32("batch", b)?,
        q_len: to_i32("q_len", shape.q_len)?,
        kv_len: to_i32("kv_len", lk)?,
        num_heads: to_i32("num_heads", shape.num_heads)?,
        num_kv_heads: to_i32("num_kv_heads", shape.num_kv_heads)?,
        head_dim: to_i32("head_dim", shape.head_dim)?,
        num_segments: to_i32("key segments", sk)?,
        dtype,
        scale,
        kv_splits: to_i32("key slices", partials.splits)?,
        part_max: partials.max,
        part_total: partials.total,
        part_acc: partials.acc,
        done: partials.done,
        shifts: order.shifts,
        num_segs,
        first_suffix_row,
        groups: to_i32("query groups", order.groups)?,
    })
}

/// The rope-rows kernel's launch (`kernels/pine/rope_rows.cu`): `x` `[B, L, heads, D]` at
/// `x_addr` with `x_strides` (last dimension contiguous), positions `[pb, L]` at `pos`, the
/// [`RopeTable::packed`] of `table` at `table_addr` (longer than every position: the caller built
/// it so), `out` contiguous `[B, L, heads, D]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope_rows_params(
    dims: (usize, usize, usize, usize),
    dtype: DType,
    (x, x_strides): (*const std::ffi::c_void, SegattnStrides),
    (pos, pb): (*const u32, usize),
    table: &RopeTable,
    table_addr: *const f32,
    out: *mut std::ffi::c_void,
    inverse: bool,
) -> Result<SegattnRopeRowsParams> {
    let Some(code) = dtype_code(dtype) else {
        crate::error::invalid_arg!("x: the CUDA kernels support dtype bf16 or f16, got {dtype:?}");
    };
    let (b, l, heads, d) = dims;
    if d != 2 * table.half {
        crate::error::invalid_arg!("x: expected head dim {} (the RoPE table's), got {d}", 2 * table.half);
    }
    Ok(SegattnRopeRowsParams {
        x,
        x_strides,
        out,
        pos,
        pos_batches: to_i32("position rows", pb)?,
        cos: table_addr,
        sin: table_addr.wrapping_add(table.cos.len()),
        table_len: to_i32("rope table", table.cos.len() / table.half.max(1))?,
        batch: to_i32("batch", b)?,
        len: to_i32("len", l)?,
        heads: to_i32("heads", heads)?,
        head_dim: to_i32("head_dim", d)?,
        sign: if inverse { -1.0 } else { 1.0 },
        dtype: code,
    })
}
