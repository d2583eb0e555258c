//! GQA decode packing for the CUDA kernels (the GPU launcher and the emulated launches) and the
//! CPU path (`src/op.rs`).
//!
//! A decode step has one query row per head: `q [B, 1, H, D]`. The forward kernel gives each
//! (head, batch row) a block of 64 query rows, so a step would use 1 row of 64 and read each KV
//! head's K and V once per query head sharing it (H / Hkv times); the CPU path likewise converted
//! each K / V tile once per query head, with register blocks of 4 rows holding one. Packed, the `P = H / Hkv` query
//! heads of a KV head become the rows of one block: the kernel sees `q_len = P` rows and
//! `num_heads = Hkv` heads through strides alone (row stride = q's head stride, head stride = P
//! times it; the same for the output), so K and V are read once per KV head and the block does P
//! rows of work. The LSE `[B, H, 1]` index `(b H + h) Lq + i` is the packed one unchanged.
//!
//! Exactness: the one query row sits at position `Lk - 1`, where a causal rule shows every key, so
//! the packed rows (which the kernel places at `Lk - P .. Lk - 1`) get the original row's segment
//! id and the rule with causal turned into full: every row sees exactly the original row's keys.
//! PINE's rotation reads the original row's position, group and per-head shifts through
//! `SegattnRotation::packed_heads` (CPU: `QueryRotation::packed_heads`). Not used with the fused mass (its output is laid out per head
//! and row) nor without GQA. `SEGATTN_GQA_PACK=0` turns it off (benchmarks).

use std::sync::OnceLock;

use candle_core::Result;

use crate::mask::{HostMask, SegmentSpans, Visibility};
use crate::params::SegattnStrides;
use crate::validate::AttentionShape;

/// A decode launch in packed form.
pub(crate) struct DecodePacking {
    /// Query heads per KV head, now kernel rows.
    pub heads_per_row_block: usize,
    /// The shape the kernel sees: `q_len = P`, `num_heads = num_kv_heads = Hkv`.
    pub shape: AttentionShape,
    /// The mask of the packed rows.
    pub host: HostMask,
}

/// `SEGATTN_GQA_PACK=0`: never pack.
fn disabled() -> bool {
    static FLAG: OnceLock<bool> = OnceLock::new();
    *FLAG.get_or_init(|| std::env::var_os("SEGATTN_GQA_PACK").is_some_and(|v| v == "0"))
}

impl DecodePacking {
    /// The packed form of a launch of `shape` under `host`, when it is a GQA decode step (one
    /// query row, `H > Hkv`) and packing is `allowed` (and not turned off by the environment).
    pub fn plan(shape: &AttentionShape, host: &HostMask, allowed: bool) -> Result<Option<Self>> {
        let group = shape.num_heads / shape.num_kv_heads.max(1);
        if !allowed || disabled() || shape.q_len != 1 || group <= 1 || shape.kv_len == 0 {
            return Ok(None);
        }
        // The P rows: the original row's id in every batch row of the ids.
        let rows = host.q.rows();
        let ids: Vec<u32> = host
            .q
            .ids()
            .iter()
            .flat_map(|&id| std::iter::repeat_n(id, group))
            .collect();
        let q = SegmentSpans::from_ids("q_segments", ids, rows, group)?;
        let full = |v: Visibility| if v == Visibility::Causal { Visibility::Full } else { v };
        let mut rule = host.rule.clone();
        rule.intra = full(rule.intra);
        rule.inter = full(rule.inter);
        for code in &mut rule.table {
            if *code == Visibility::Causal.code() {
                *code = Visibility::Full.code();
            }
        }
        let packed_shape = AttentionShape {
            q_len: group,
            num_heads: shape.num_kv_heads,
            ..*shape
        };
        Ok(Some(Self {
            heads_per_row_block: group,
            shape: packed_shape,
            host: HostMask {
                q,
                kv: host.kv.clone(),
                rule,
                pos_offset: shape.kv_len as i64 - group as i64,
                // The same mask's buffers: the launcher keys them by the packing.
                #[cfg(feature = "cuda")]
                device: host.device.clone(),
            },
        }))
    }

    /// Strides of a `[B, 1, H, D]` tensor (q or the output) as the packed `[B, P, Hkv, D]`.
    pub fn strides(&self, s: SegattnStrides) -> SegattnStrides {
        SegattnStrides {
            batch: s.batch,
            row: s.head,
            head: s.head * self.heads_per_row_block as i64,
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::mask::SegmentMask;
    use crate::{PairRule, PairTable};

    /// Every packed row sees exactly the keys the one original row sees (causal, segment rules,
    /// a table with causal entries, per-batch ids).
    #[test]
    fn packed_rows_see_what_the_row_sees() -> Result<()> {
        let dev = Device::Cpu;
        let lk = 37;
        let kv_ids: Vec<u32> = (0..2 * lk as u32).map(|i| (i % lk as u32) / 9).collect();
        let kv_ids = Tensor::from_vec(kv_ids, (2, lk), &dev)?;
        let q_ids = Tensor::new(&[[4u32], [2]], &dev)?;
        let table = PairTable::from_rules(
            &[
                vec![None; 5],
                vec![None; 5],
                vec![Some(Visibility::Causal), None, Some(Visibility::Blocked), None, None],
                vec![None; 5],
                vec![Some(Visibility::Blocked), Some(Visibility::Causal), None, None, None],
            ],
            &dev,
        )?;
        for rule in [
            PairRule::new(Visibility::Causal, Visibility::Causal),
            PairRule::new(Visibility::Causal, Visibility::Blocked),
            PairRule::new(Visibility::Full, Visibility::Causal).with_table(table),
        ] {
            let mask = SegmentMask::new(&q_ids, &kv_ids, rule)?;
            let host = mask.host_metadata(2, 1, lk)?;
            let shape = AttentionShape {
                batch: 2,
                q_len: 1,
                kv_len: lk,
                num_heads: 8,
                num_kv_heads: 2,
                head_dim: 64,
            };
            let packed = DecodePacking::plan(&shape, &host, true)?.expect("a GQA decode step");
            assert_eq!((packed.shape.q_len, packed.shape.num_heads), (4, 2));
            for b in 0..2 {
                for j in 0..lk {
                    for i in 0..4 {
                        assert_eq!(
                            packed.host.visible(b, i, j),
                            host.visible(b, 0, j),
                            "b {b} row {i} key {j}"
                        );
                    }
                }
            }
        }
        let plain = AttentionShape {
            batch: 1,
            q_len: 1,
            kv_len: 10,
            num_heads: 4,
            num_kv_heads: 4,
            head_dim: 64,
        };
        let host = SegmentMask::causal(10, &dev)?
            .last_queries(1)?
            .host_metadata(1, 1, 10)?;
        assert!(
            DecodePacking::plan(&plain, &host, true)?.is_none(),
            "no GQA: nothing to pack"
        );
        Ok(())
    }
}
