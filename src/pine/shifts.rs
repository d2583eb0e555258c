//! Step 2 as a candle op, so that it runs where the importance scores are: the order and shifts of
//! every query group, `[B, H, groups, Sk]` u32, from the scores tensors. On the CPU: a stable sort
//! per group ([`super::order::query_shifts`]); on CUDA: `kernels/pine/shifts.cu` (ranking by
//! counting, the same order), with no copy to the host between the scores and the attention.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::importance::{HostImportance, Importance};
use super::order::{query_shifts, GroupLayout};
use crate::error::invalid_arg;

/// The shifts of `groups` from `imp`, on the device of the scores (`device` when there are none).
pub(crate) fn shifts(
    imp: &Importance,
    groups: &GroupLayout,
    heads: usize,
    q_len: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let op = ShiftsOp {
        groups: groups.clone(),
        heads,
        q_len,
        scored_rows: imp.scored_rows,
        has_rows: imp.rows.is_some(),
        has_segments: imp.segments.is_some(),
    };
    // Absent inputs are stood in for by the other one (never read).
    let Some(first) = imp.rows.as_ref().or(imp.segments.as_ref()) else {
        // No scores at all (no segment group needs any and no suffix row is a query): the order
        // is by index, a CPU computation on O(B H groups Sk) integers.
        let host = HostImportance {
            segments: None,
            rows: Vec::new(),
            scored_rows: 0,
        };
        let s = query_shifts(groups.clone(), heads, q_len, &host).shifts;
        return Tensor::from_vec(s, op.out_dims(), device);
    };
    let second = imp.segments.as_ref().unwrap_or(first);
    let rows = imp.rows.as_ref().unwrap_or(first);
    rows.contiguous()?.apply_op2_no_bwd(&second.contiguous()?, &op)
}

/// The op: inputs (row scores `[B, H, m, Sk]`, segment scores `[B, H, Sk, Sk]`), f32, contiguous.
pub(crate) struct ShiftsOp {
    pub groups: GroupLayout,
    pub heads: usize,
    pub q_len: usize,
    pub scored_rows: usize,
    pub has_rows: bool,
    pub has_segments: bool,
}

impl ShiftsOp {
    pub fn out_dims(&self) -> (usize, usize, usize, usize) {
        (
            self.groups.num_segs.len(),
            self.heads,
            self.groups.groups,
            self.groups.sk,
        )
    }
}

impl CustomOp2 for ShiftsOp {
    fn name(&self) -> &'static str {
        "segattn-pine-shifts"
    }

    fn cpu_fwd(&self, r: &CpuStorage, rl: &Layout, s: &CpuStorage, sl: &Layout) -> Result<(CpuStorage, Shape)> {
        let slice = |st: &CpuStorage, l: &Layout| -> Result<Vec<f32>> {
            let Some((a, b)) = l.contiguous_offsets() else {
                invalid_arg!("internal error: PINE scores not contiguous");
            };
            Ok(st.as_slice::<f32>()?[a..b].to_vec())
        };
        let host = HostImportance {
            segments: if self.has_segments { Some(slice(s, sl)?) } else { None },
            rows: if self.has_rows { slice(r, rl)? } else { Vec::new() },
            scored_rows: self.scored_rows,
        };
        let out = query_shifts(self.groups.clone(), self.heads, self.q_len, &host).shifts;
        Ok((CpuStorage::U32(out), Shape::from(self.out_dims())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        r: &candle_core::CudaStorage,
        rl: &Layout,
        s: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        if r.dtype() != candle_core::DType::F32 || s.dtype() != candle_core::DType::F32 {
            invalid_arg!("internal error: PINE scores must be f32");
        }
        let out = crate::cuda::pine_shifts(self, (r, rl), (s, sl))?;
        Ok((out, Shape::from(self.out_dims())))
    }
}
