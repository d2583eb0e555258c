//! PINE on the GPU: the order and shifts kernel (`kernels/pine/shifts.cu`) as the CUDA side of
//! the shifts op, and the rotation inputs of the forward kernel's `segattn_fwd_rope_*` entry
//! points. The shifts never leave the device: the importance scores (the per-segment mass kernel)
//! feed the shifts kernel, whose output the attention kernel reads.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::{CudaStorage, Layout, Result, Storage, Tensor};

use super::device_copies::{DeviceCopies, Uploaded};
use super::driver_err;
use super::module;
use crate::error::invalid_arg;
use crate::params::{SegattnDecodeScoresParams, SegattnFwdParams, SegattnShiftsParams};
use crate::pine::kernel_args::{decode_scores_params, rotation_params, shifts_params, DecodeOrder, DecodePartials};
use crate::pine::order::GroupLayout;
use crate::pine::shifts::ShiftsOp;
use crate::pine::{PineRotation, RopeTable};
use crate::validate::AttentionShape;

// SAFETY: a plain C struct (bindgen of kernels/segattn_params.h) passed by value as the kernel's
// only parameter; its pointers are device addresses.
unsafe impl DeviceRepr for SegattnShiftsParams {}

/// Threads per block of `segattn_pine_shifts` (`kShiftsThreads`).
const SHIFTS_THREADS: u32 = 128;

/// The shifts `[B, H, groups, Sk]` u32 of `op` from the row scores `r` and segment scores `s`
/// (f32, contiguous; an absent input is a stand-in that is not read).
pub(crate) fn pine_shifts(
    op: &ShiftsOp,
    (r, rl): (&CudaStorage, &Layout),
    (s, sl): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = r.device().clone();
    let stream = dev.cuda_stream();
    let g = &op.groups;
    let (batch, heads) = (g.num_segs.len(), op.heads);
    let n_out = batch * heads * g.groups * g.sk;
    let (Some((r0, _)), Some((s0, _))) = (rl.contiguous_offsets(), sl.contiguous_offsets()) else {
        invalid_arg!("internal error: PINE scores not contiguous");
    };
    // Uploaded once per step (every layer's call shares the step's groups).
    let meta = g
        .device_meta
        .get_or_upload(&stream, "PINE layout metadata", || g.packed_meta())?;
    // SAFETY: the kernel writes every element.
    let mut out = unsafe { stream.alloc::<u32>(n_out.max(1)) }.map_err(|e| driver_err("allocating the shifts", e))?;
    let kernels = module::kernels(stream.context())?;
    let func = kernels.function("segattn_pine_shifts")?;
    {
        let rs = r.as_cuda_slice::<f32>()?;
        let ss = s.as_cuda_slice::<f32>()?;
        let (rp, _gr) = rs.device_ptr(&stream);
        let (sp, _gs) = ss.device_ptr(&stream);
        let (mp, _gm) = meta.as_ref().device_ptr(&stream);
        let (op_ptr, _go) = out.device_ptr_mut(&stream);
        let params = shifts_params(
            g,
            heads,
            op.q_len,
            if op.has_rows { op.scored_rows } else { 0 },
            if op.has_segments {
                (sp + 4 * s0 as u64) as *const f32
            } else {
                std::ptr::null()
            },
            (rp + 4 * r0 as u64) as *const f32,
            mp as *const u32,
            op_ptr as *mut u32,
        )?;
        let cfg = LaunchConfig {
            grid_dim: (
                (g.groups * g.sk).div_ceil(SHIFTS_THREADS as usize) as u32,
                heads as u32,
                batch as u32,
            ),
            block_dim: (SHIFTS_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        super::launch::check_grid_of("segattn_pine_shifts", batch, heads)?;
        let mut builder = stream.launch_builder(&func);
        builder.arg(&params);
        // SAFETY: the kernel's one parameter is a SegattnShiftsParams by value whose pointers are
        // live device allocations of the stated sizes (the scores, `meta`, `out`), held until the
        // launch is ordered on `stream`.
        unsafe { builder.launch(cfg) }
            .map_err(|e| driver_err(format!("launching segattn_pine_shifts (grid {:?})", cfg.grid_dim), e))?;
        super::launch::sync_if_asked(&stream, "segattn_pine_shifts")?;
    }
    super::recorded_errors(&stream, "segattn_pine_shifts")?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// The packed copies (`[cos | sin]`, [`RopeTable::packed`]) of one RoPE table on the CUDA
/// contexts it was used in: uploaded on first use, then shared by every launch that reads the
/// table (tables are immutable; a longer one is a new table).
pub(crate) type DeviceTables = DeviceCopies<f32>;

/// The rotation inputs of one launch on the device: the RoPE table `[cos | sin]` (the table's
/// cached device copy) and the rows' `[q_pos | row_group]` (uploaded with one copy); the shifts
/// are the shifts op's output.
pub(crate) struct RotationBuffers<'a> {
    rot: &'a PineRotation,
    tables: Arc<Uploaded<f32>>,
    rows: Arc<Uploaded<u32>>,
}

impl<'a> RotationBuffers<'a> {
    pub(crate) fn upload(stream: &Arc<CudaStream>, rot: &'a PineRotation) -> Result<Self> {
        rot.check_kernel_limits()?;
        let tables = rot
            .table
            .device
            .get_or_upload(stream, "the RoPE table", || rot.table.packed())?;
        // Uploaded once per step (shared by the step's groups).
        let rows = rot
            .shifts
            .device_rows
            .get_or_upload(stream, "PINE's row positions and groups", || rot.shifts.packed_rows())?;
        Ok(Self { rot, tables, rows })
    }

    /// Fills `p.rotation` with device addresses (`packed_heads`: see [`rotation_params`]). (The
    /// read guards end here: the buffers and the shifts tensor are immutable and outlive the
    /// launch, which is ordered on candle's single stream.)
    pub(crate) fn fill(&self, stream: &Arc<CudaStream>, p: &mut SegattnFwdParams, packed_heads: usize) -> Result<()> {
        let sp = {
            let (storage, layout) = self.rot.shift_tensor.storage_and_layout();
            let Storage::Cuda(shifts) = &*storage else {
                invalid_arg!("internal error: PINE's shifts are not on the GPU of q");
            };
            let Some((s0, _)) = layout.contiguous_offsets() else {
                invalid_arg!("internal error: PINE's shifts are not contiguous");
            };
            let (sp, _guard) = shifts.as_cuda_slice::<u32>()?.device_ptr(stream);
            sp + 4 * s0 as u64
        };
        let (tp, _gt) = self.tables.device_ptr(stream);
        let (rp, _gr) = self.rows.as_ref().device_ptr(stream);
        p.rotation = rotation_params(
            self.rot,
            tp as *const f32,
            rp as *const u32,
            sp as *const u32,
            packed_heads,
        )?;
        Ok(())
    }
}

// SAFETY: a plain C struct (bindgen of kernels/segattn_params.h) passed by value as the kernel's
// only parameter; its pointers are device addresses.
unsafe impl DeviceRepr for SegattnDecodeScoresParams {}

/// The importance `[B, H, Lq, sk]` of decode rows `q` (un-rotated) against the rotated cache
/// `k_cache`, and their order as the shifts `[B, H, groups, sk]` of `groups`, in one launch
/// (`kernels/pine/decode_scores.cu`); `words` = `[key_pos | key_seg | seg_lens]`, whose device
/// copies `device_words` keeps (uploaded once per step).
#[allow(clippy::too_many_arguments)]
pub(crate) fn pine_decode_scores(
    q: &Tensor,
    k_cache: &Tensor,
    words: &[u32],
    device_words: &DeviceCopies<u32>,
    groups: &GroupLayout,
    table: &RopeTable,
    scale: f32,
    sk: usize,
) -> Result<(Tensor, Tensor)> {
    // The kernel reads key rows in 16-byte pieces: a cache view it cannot read in place (an
    // unaligned start or strides that are not multiples of 8 elements) is copied first.
    let k_cache = &crate::kernel_params::kernel_readable(k_cache)?;
    let shape = AttentionShape::of(q, k_cache, k_cache)?;
    crate::kernel_params::check_pine_dims(q.dtype(), shape.head_dim)?;
    let heads_per_kv = shape.num_heads / shape.num_kv_heads;
    let smem = crate::emulated::decode_scores_smem_bytes(heads_per_kv, shape.head_dim, sk)?;
    if smem > 48 * 1024 {
        invalid_arg!(
            "layouts: PINE's decode importance on the GPU holds {heads_per_kv} x {sk} segment sums (query heads \
             per KV head x segment ids) in 48 KiB of shared memory: too many segments ({sk})"
        );
    }
    let dev = match q.device() {
        candle_core::Device::Cuda(d) => d.clone(),
        other => invalid_arg!("q: expected a CUDA tensor, got {:?}", other.location()),
    };
    let stream = dev.cuda_stream();
    if let candle_core::Device::Cuda(k_dev) = k_cache.device() {
        super::per_stream::check_one_stream(("q", &stream), &[("k_cache", &k_dev.cuda_stream())])?;
    }
    let b = shape.batch;
    let meta = device_words.get_or_upload(&stream, "PINE decode metadata", || words.to_vec())?;
    let group_meta = groups
        .device_meta
        .get_or_upload(&stream, "PINE layout metadata", || groups.packed_meta())?;
    let n_shifts = b * shape.num_heads * groups.groups * sk;
    // SAFETY: the kernel writes every element of the shifts.
    let mut shifts =
        unsafe { stream.alloc::<u32>(n_shifts.max(1)) }.map_err(|e| driver_err("allocating the shifts", e))?;
    let tables = table
        .device
        .get_or_upload(&stream, "the RoPE table", || table.packed())?;
    let n_out = b * shape.num_heads * shape.q_len * sk;
    // SAFETY: the kernel (one slice, or the last slice of each row) writes every element.
    let mut out =
        unsafe { stream.alloc::<f32>(n_out.max(1)) }.map_err(|e| driver_err("allocating the decode importance", e))?;
    let kernels = module::kernels(stream.context())?;
    let splits = decode_score_slices(shape.q_len * shape.num_kv_heads * b, shape.kv_len, kernels.sm_count);
    let (n_rows, n_acc) = DecodePartials::sizes(&shape, sk, splits);
    // With slices: the three partial arrays in one allocation (max, totals, per-segment sums; f32
    // throughout, so every part stays 4-byte aligned), and the counters by which the last slice
    // of each (row, KV head) to finish merges (the stream's zeroed counters, left zero).
    let partials_and_done = if splits > 1 {
        Some((
            // The stream's scratch: the kernel writes every element of the partials before the
            // merge reads them.
            super::per_stream::scratch(&stream, 2 * n_rows + n_acc)?,
            super::per_stream::zeroed_counters(&stream, DecodePartials::counters(&shape))?,
        ))
    } else {
        None
    };
    let name = match (q.dtype() == candle_core::DType::BF16, shape.head_dim == 256) {
        (true, false) => "segattn_pine_decode_scores_bf16",
        (false, false) => "segattn_pine_decode_scores_f16",
        (true, true) => "segattn_pine_decode_scores_d256_bf16",
        (false, true) => "segattn_pine_decode_scores_d256_f16",
    };
    let func = kernels.function(name)?;
    {
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k_cache.storage_and_layout();
        let (Storage::Cuda(qs), Storage::Cuda(ks)) = (&*qs, &*ks) else {
            invalid_arg!("q: expected q and the cache on the GPU");
        };
        let elem = 2u64;
        let (qp, _gq) = match q.dtype() {
            candle_core::DType::BF16 => qs.as_cuda_slice::<half::bf16>()?.device_ptr(&stream),
            _ => qs.as_cuda_slice::<half::f16>()?.device_ptr(&stream),
        };
        let (kp, _gk) = match q.dtype() {
            candle_core::DType::BF16 => ks.as_cuda_slice::<half::bf16>()?.device_ptr(&stream),
            _ => ks.as_cuda_slice::<half::f16>()?.device_ptr(&stream),
        };
        // kernel_readable judged the layout on the premise that the storage starts 16-byte
        // aligned (a whole cudarc allocation); one that does not is an error, not a misaligned load.
        let k_addr = kp + elem * kl.start_offset() as u64;
        if !k_addr.is_multiple_of(16) {
            invalid_arg!(
                "k_cache: the decode importance reads 16-byte chunks: its storage's address {k_addr:#x} is not 16-byte \
                 aligned"
            );
        }
        let (mp, _gm) = meta.as_ref().device_ptr(&stream);
        let (tp, _gt) = tables.device_ptr(&stream);
        let (op, _go) = out.device_ptr_mut(&stream);
        let (gp, _gg) = group_meta.as_ref().device_ptr(&stream);
        let (sp, _gs) = shifts.device_ptr_mut(&stream);
        // (The stream's scratch and counters: only this stream's launches touch them, in order.)
        let partials = match &partials_and_done {
            Some((scratch, done)) => {
                let base = scratch.addr as *mut f32;
                DecodePartials {
                    splits,
                    max: base,
                    total: base.wrapping_add(n_rows),
                    acc: base.wrapping_add(2 * n_rows),
                    done: done.addr as *mut u32,
                }
            }
            None => DecodePartials::none(),
        };
        let order = DecodeOrder {
            shifts: sp as *mut u32,
            meta: gp as *const u32,
            groups: groups.groups,
        };
        let params = decode_scores_params(
            &shape,
            q.dtype(),
            sk,
            scale,
            (
                (qp + elem * ql.start_offset() as u64) as *const std::ffi::c_void,
                crate::kernel_params::strides_of(ql),
            ),
            (k_addr as *const std::ffi::c_void, crate::kernel_params::strides_of(kl)),
            mp as *const u32,
            table,
            tp as *const f32,
            op as *mut f32,
            partials,
            order,
        )?;
        super::launch::check_grid_of(name, b, shape.q_len * shape.num_kv_heads)?;
        let cfg = LaunchConfig {
            grid_dim: (splits as u32, (shape.q_len * shape.num_kv_heads) as u32, b as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut builder = stream.launch_builder(&func);
        builder.arg(&params);
        // SAFETY: the kernel's one parameter is a SegattnDecodeScoresParams by value whose
        // pointers are live device allocations of the stated sizes (q, the cache, `meta`,
        // `tables`, `out`, the partials and counters, the group metadata, the shifts), held until
        // the launch is ordered on `stream`.
        unsafe { builder.launch(cfg) }
            .map_err(|e| driver_err(format!("launching {name} (grid {:?})", cfg.grid_dim), e))?;
        super::launch::sync_if_asked(&stream, name)?;
    }
    super::recorded_errors(&stream, name)?;
    let importance = Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone())),
        (b, shape.num_heads, shape.q_len, sk),
        candle_core::op::BackpropOp::none(),
        false,
    );
    let shifts = Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(shifts, dev)),
        (b, shape.num_heads, groups.groups, sk),
        candle_core::op::BackpropOp::none(),
        false,
    );
    Ok((importance, shifts))
}

/// Key slices of a decode-importance launch for `blocks` (rows x KV heads x batch) over `kv_len`
/// keys: about four blocks per SM when the blocks alone leave the GPU idle, each slice a whole
/// number of the kernel's 32-key rounds (a partial round costs a whole one). The kernel is bound
/// by load latency (one round of keys per warp in flight), so many short slices beat few long
/// ones; the merge reads `splits` partials per row (at most 128: their weights are kept in
/// shared memory).
fn decode_score_slices(blocks: usize, kv_len: usize, sm_count: usize) -> usize {
    const ROUND: usize = 32;
    if blocks >= 4 * sm_count || kv_len == 0 {
        return 1;
    }
    let wanted = (4 * sm_count)
        .div_ceil(blocks)
        .min(kv_len.div_ceil(ROUND))
        .clamp(1, crate::params::SEGATTN_DECODE_SCORES_MAX_SPLITS as usize);
    // ceil(kv_len / per) <= wanted, and none of the kernel's slices of ceil(kv_len / splits) is empty.
    kv_len.div_ceil(kv_len.div_ceil(wanted).next_multiple_of(ROUND))
}

#[cfg(test)]
mod tests {
    use super::decode_score_slices;

    #[test]
    fn decode_slices_are_whole_rounds() {
        // The RAG step on 132 SMs: 8 blocks of (row, KV head), 3,320 keys: 52 slices of 64 keys.
        assert_eq!(decode_score_slices(8, 3320, 132), 52);
        // The judge step: 1,161 keys, 37 slices of 32 (the last one 9 keys).
        assert_eq!(decode_score_slices(8, 1161, 132), 37);
        // Enough blocks already, or no keys: one slice.
        assert_eq!(decode_score_slices(528, 3320, 132), 1);
        assert_eq!(decode_score_slices(8, 0, 132), 1);
        // Long caches: at most 128 slices.
        for (blocks, len) in [(1, 1_000_000), (2, 5_000), (3, 31), (64, 70_000)] {
            let splits = decode_score_slices(blocks, len, 132);
            // The kernel's slices of ceil(len / splits) keys: none empty.
            let per = len.div_ceil(splits);
            assert!((1..=128).contains(&splits), "{blocks} {len}: {splits}");
            assert!((splits - 1) * per < len, "{blocks} {len}: {splits} slices of {per}");
        }
    }
}
