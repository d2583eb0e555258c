//! A segment mask as the peers' scripts read it (`bench/peers.py`, `bench/cpu_peers.py`): its
//! segment ids, its rule (intra, inter and pair table as `Visibility::code`s) and its exact
//! visible-pair count, one JSON object a mask. Shared by `examples/gpu_bench.rs` and
//! `benches/cpu_attention.rs` (`--export-masks FILE` in both), so that the peers run on exactly
//! the masks we run.

use candle_core::Result;
use segattn::{SegmentMask, Visibility};

/// The rule of (query id, key id), from the mask's public description.
pub struct Rules {
    intra: Visibility,
    inter: Visibility,
    table: Vec<u8>,
    size: usize,
}

impl Rules {
    pub fn of(mask: &SegmentMask) -> Result<Self> {
        let r = mask.rule();
        let (table, size) = match &r.table {
            // The benches' masks share one table across rows: its first [S, S] block.
            Some(t) => {
                let s = t.size();
                let codes = t.rules().flatten_all()?.to_vec1::<u8>()?;
                (codes[..s * s].to_vec(), s)
            }
            None => (Vec::new(), 0),
        };
        Ok(Self {
            intra: r.intra,
            inter: r.inter,
            table,
            size,
        })
    }

    fn get(&self, sq: u32, sk: u32) -> Visibility {
        let (a, b) = (sq as usize, sk as usize);
        if a < self.size && b < self.size {
            if let Some(v) = Visibility::from_code(self.table[a * self.size + b]) {
                return v;
            }
        }
        if sq == sk {
            self.intra
        } else {
            self.inter
        }
    }
}

/// Visible (q, k) pairs of a self-attention mask of one row (shared ids), exactly: per query, per
/// key segment, O(L x segments).
pub fn visible_pairs(mask: &SegmentMask) -> Result<u64> {
    let q_ids = mask.q_segments().to_vec2::<u32>()?.remove(0);
    let k_ids = mask.kv_segments().to_vec2::<u32>()?.remove(0);
    let rules = Rules::of(mask)?;
    let offset = k_ids.len() as i64 - q_ids.len() as i64;
    // Key segments as (id, start, end).
    let mut spans = Vec::new();
    let mut s = 0;
    for j in 1..=k_ids.len() {
        if j == k_ids.len() || k_ids[j] != k_ids[s] {
            spans.push((k_ids[s], s, j));
            s = j;
        }
    }
    let mut total = 0u64;
    for (i, &sq) in q_ids.iter().enumerate() {
        let pos = i as i64 + offset;
        for &(sk, a, b) in &spans {
            total += match rules.get(sq, sk) {
                Visibility::Blocked => 0,
                Visibility::Full => (b - a) as u64,
                Visibility::Causal => (b as i64).min(pos + 1).saturating_sub(a as i64).max(0) as u64,
            };
        }
    }
    Ok(total)
}

/// One mask as a JSON object: `{"mask", "len", "visible_pairs", "intra", "inter", "table" (null
/// or [S][S] codes), "ids" (the first batch row's query segment ids)}`.
pub fn mask_json(name: &str, len: usize, mask: &SegmentMask) -> Result<String> {
    let rules = Rules::of(mask)?;
    let ids = mask.q_segments().to_vec2::<u32>()?.remove(0);
    let list = |v: &[u32]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
    let table = if rules.size == 0 {
        "null".to_string()
    } else {
        let rows: Vec<String> = rules
            .table
            .chunks(rules.size)
            .map(|r| format!("[{}]", r.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")))
            .collect();
        format!("[{}]", rows.join(","))
    };
    Ok(format!(
        "{{\"mask\":\"{name}\",\"len\":{len},\"visible_pairs\":{},\"intra\":{},\"inter\":{},\"table\":{table},\"ids\":[{}]}}",
        visible_pairs(mask)?,
        rules.intra.code(),
        rules.inter.code(),
        list(&ids)
    ))
}

/// Writes `masks` (name, length, mask) to `path` as one JSON array.
pub fn write_masks<'a>(path: &str, masks: impl IntoIterator<Item = (&'a str, usize, SegmentMask)>) -> Result<()> {
    let mut objects = Vec::new();
    for (name, len, mask) in masks {
        objects.push(mask_json(name, len, &mask)?);
    }
    std::fs::write(path, format!("[\n{}\n]\n", objects.join(",\n")))?;
    eprintln!("wrote {} masks to {path}", objects.len());
    Ok(())
}
