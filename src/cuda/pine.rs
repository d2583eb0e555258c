//! PINE on the GPU: the order and shifts kernel (`kernels/pine/shifts.cu`) as the CUDA side of
//! the shifts op, and the rotation inputs of the forward kernel's `segattn_fwd_rope_*` entry
//! points. The shifts never leave the device: the importance scores (the per-segment mass kernel)
//! feed the shifts kernel, whose output the attention kernel reads.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::{CudaStorage, Layout, Result, Storage, Tensor};

use super::driver_err;
use super::module;
use crate::error::invalid_arg;
use crate::kernel_params::to_i32;
use crate::params::{SegattnDecodeScoresParams, SegattnFwdParams, SegattnRotation, SegattnShiftsParams};
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
    // [num_segs | first_suffix_row | segment_lens], one upload.
    let mut meta = Vec::with_capacity(2 * batch + g.segment_lens.len());
    meta.extend_from_slice(&g.num_segs);
    meta.extend_from_slice(&g.first_suffix_row);
    meta.extend_from_slice(&g.segment_lens);
    let meta = stream
        .clone_htod(&meta)
        .map_err(|e| driver_err(format!("uploading {} words of PINE layout metadata", meta.len()), e))?;
    // SAFETY: the kernel writes every element.
    let mut out = unsafe { stream.alloc::<u32>(n_out.max(1)) }.map_err(|e| driver_err("allocating the shifts", e))?;
    let kernels = module::kernels(stream.context())?;
    let func = kernels
        .module()
        .load_function("segattn_pine_shifts")
        .map_err(|e| driver_err("looking up segattn_pine_shifts in the embedded fatbin", e))?;
    {
        let rs = r.as_cuda_slice::<f32>()?;
        let ss = s.as_cuda_slice::<f32>()?;
        let (rp, _gr) = rs.device_ptr(&stream);
        let (sp, _gs) = ss.device_ptr(&stream);
        let (mp, _gm) = meta.device_ptr(&stream);
        let (op_ptr, _go) = out.device_ptr_mut(&stream);
        let at = |base: u64, words: usize| (base + 4 * words as u64) as *const u32;
        let params = SegattnShiftsParams {
            segment_scores: if op.has_segments {
                (sp + 4 * s0 as u64) as *const f32
            } else {
                std::ptr::null()
            },
            row_scores: (rp + 4 * r0 as u64) as *const f32,
            num_segs: at(mp, 0),
            first_suffix_row: at(mp, batch),
            segment_lens: at(mp, 2 * batch),
            shifts: op_ptr as *mut u32,
            batch: to_i32("batch", batch)?,
            num_heads: to_i32("num_heads", heads)?,
            groups: to_i32("query groups", g.groups)?,
            num_segments: to_i32("key segments", g.sk)?,
            q_len: to_i32("q_len", op.q_len)?,
            scored_rows: to_i32("scored rows", if op.has_rows { op.scored_rows } else { 0 })?,
        };
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
    stream
        .context()
        .check_err()
        .map_err(|e| driver_err("after launching segattn_pine_shifts", e))?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// The rotation inputs of one launch on the device: the RoPE table `[cos | sin]` and the rows'
/// `[q_pos | row_group]`, uploaded with one copy each; the shifts are the shifts op's output.
pub(crate) struct RotationBuffers<'a> {
    rot: &'a PineRotation,
    tables: CudaSlice<f32>,
    rows: CudaSlice<u32>,
}

impl<'a> RotationBuffers<'a> {
    pub(crate) fn upload(stream: &Arc<CudaStream>, rot: &'a PineRotation) -> Result<Self> {
        rot.check_kernel_limits()?;
        let t = &rot.table;
        let mut tables = Vec::with_capacity(t.cos.len() + t.sin.len());
        tables.extend_from_slice(&t.cos);
        tables.extend_from_slice(&t.sin);
        let tables = stream
            .clone_htod(&tables)
            .map_err(|e| driver_err(format!("uploading the RoPE table ({} floats)", tables.len()), e))?;
        let s = &rot.shifts;
        let mut rows = Vec::with_capacity(2 * s.q_pos.len() + 1);
        rows.extend_from_slice(&s.q_pos);
        rows.extend_from_slice(&s.row_group);
        rows.push(0); // never an empty allocation
        let rows = stream.clone_htod(&rows).map_err(|e| {
            driver_err(
                format!("uploading PINE's row positions and groups ({} words)", rows.len()),
                e,
            )
        })?;
        Ok(Self { rot, tables, rows })
    }

    /// Fills `p.rotation` with device addresses. (The read guards end here: the buffers and the
    /// shifts tensor are immutable and outlive the launch, which is ordered on candle's single
    /// stream.)
    pub(crate) fn fill(&self, stream: &Arc<CudaStream>, p: &mut SegattnFwdParams) -> Result<()> {
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
        let (rp, _gr) = self.rows.device_ptr(stream);
        let half = self.rot.table.half;
        let n_rows = self.rot.shifts.q_pos.len();
        p.rotation = SegattnRotation {
            cos: tp as *const f32,
            sin: (tp + 4 * self.rot.table.cos.len() as u64) as *const f32,
            table_len: to_i32("rope table", self.rot.table.cos.len() / half)?,
            groups: to_i32("query groups", self.rot.shifts.groups)?,
            q_pos: rp as *const u32,
            row_group: (rp + 4 * n_rows as u64) as *const u32,
            shifts: sp as *const u32,
            num_segments: to_i32("key segments", self.rot.shifts.sk)?,
        };
        Ok(())
    }
}

// SAFETY: a plain C struct (bindgen of kernels/segattn_params.h) passed by value as the kernel's
// only parameter; its pointers are device addresses.
unsafe impl DeviceRepr for SegattnDecodeScoresParams {}

/// The importance `[B, H, Lq, sk]` of decode rows `q` (un-rotated) against the rotated cache
/// `k_cache` (`kernels/pine/decode_scores.cu`); `words` = `[key_pos | key_seg | seg_lens]`.
pub(crate) fn pine_decode_scores(
    q: &Tensor,
    k_cache: &Tensor,
    words: &[u32],
    table: &RopeTable,
    scale: f32,
    sk: usize,
) -> Result<Tensor> {
    let shape = AttentionShape::of(q, k_cache, k_cache)?;
    let Some(dtype) = crate::kernel_params::dtype_code(q.dtype()) else {
        invalid_arg!("q: the CUDA kernels support dtype bf16 or f16, got {:?}", q.dtype());
    };
    let smem = 4 * (shape.head_dim + sk + 4);
    if smem > 48 * 1024 {
        invalid_arg!("layouts: PINE's decode importance on the GPU holds at most ~12000 segment ids, got {sk}");
    }
    let dev = match q.device() {
        candle_core::Device::Cuda(d) => d.clone(),
        other => invalid_arg!("q: expected a CUDA tensor, got {:?}", other.location()),
    };
    let stream = dev.cuda_stream();
    let (b, lk) = (shape.batch, shape.kv_len);
    let meta = stream
        .clone_htod(words)
        .map_err(|e| driver_err(format!("uploading {} words of PINE decode metadata", words.len()), e))?;
    let mut tables = Vec::with_capacity(table.cos.len() + table.sin.len());
    tables.extend_from_slice(&table.cos);
    tables.extend_from_slice(&table.sin);
    let tables = stream
        .clone_htod(&tables)
        .map_err(|e| driver_err(format!("uploading the RoPE table ({} floats)", tables.len()), e))?;
    let n_out = b * shape.num_heads * shape.q_len * sk;
    let mut out = stream
        .alloc_zeros::<f32>(n_out.max(1))
        .map_err(|e| driver_err("allocating the decode importance", e))?;
    let kernels = module::kernels(stream.context())?;
    let name = if q.dtype() == candle_core::DType::BF16 {
        "segattn_pine_decode_scores_bf16"
    } else {
        "segattn_pine_decode_scores_f16"
    };
    let func = kernels
        .module()
        .load_function(name)
        .map_err(|e| driver_err(format!("looking up {name} in the embedded fatbin"), e))?;
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
        let (mp, _gm) = meta.device_ptr(&stream);
        let (tp, _gt) = tables.device_ptr(&stream);
        let (op, _go) = out.device_ptr_mut(&stream);
        let at = |words: usize| (mp + 4 * words as u64) as *const u32;
        let params = SegattnDecodeScoresParams {
            q: (qp + elem * ql.start_offset() as u64) as *const std::ffi::c_void,
            q_strides: crate::kernel_params::strides_of(ql),
            k: (kp + elem * kl.start_offset() as u64) as *const std::ffi::c_void,
            k_strides: crate::kernel_params::strides_of(kl),
            key_pos: at(0),
            key_seg: at(b * lk),
            seg_lens: at(2 * b * lk),
            cos: tp as *const f32,
            sin: (tp + 4 * table.cos.len() as u64) as *const f32,
            out: op as *mut f32,
            batch: to_i32("batch", b)?,
            q_len: to_i32("q_len", shape.q_len)?,
            kv_len: to_i32("kv_len", lk)?,
            num_heads: to_i32("num_heads", shape.num_heads)?,
            num_kv_heads: to_i32("num_kv_heads", shape.num_kv_heads)?,
            head_dim: to_i32("head_dim", shape.head_dim)?,
            num_segments: to_i32("key segments", sk)?,
            dtype,
            scale,
        };
        super::launch::check_grid_of(name, b, shape.num_heads)?;
        let cfg = LaunchConfig {
            grid_dim: (shape.q_len as u32, shape.num_heads as u32, b as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut builder = stream.launch_builder(&func);
        builder.arg(&params);
        // SAFETY: the kernel's one parameter is a SegattnDecodeScoresParams by value whose
        // pointers are live device allocations of the stated sizes (q, the cache, `meta`,
        // `tables`, `out`), held until the launch is ordered on `stream`.
        unsafe { builder.launch(cfg) }
            .map_err(|e| driver_err(format!("launching {name} (grid {:?})", cfg.grid_dim), e))?;
        super::launch::sync_if_asked(&stream, name)?;
    }
    stream
        .context()
        .check_err()
        .map_err(|e| driver_err(format!("after launching {name}"), e))?;
    let storage = CudaStorage::wrap_cuda_slice(out, dev);
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        (b, shape.num_heads, shape.q_len, sk),
        candle_core::op::BackpropOp::none(),
        false,
    ))
}
