//! Visibility rules for a pair of segments (query segment, key segment).

use candle_core::{DType, Device, Result, Tensor};

use crate::error::invalid_arg;

/// Which keys of a key segment a query of a query segment may see.
///
/// Positions: query row `i` of `Lq` sits at position `i + (Lk - Lq)` (bottom-right aligned, as in
/// FlashAttention), key `j` at position `j`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Visibility {
    /// No key of the segment is visible.
    Blocked = 0,
    /// Key `j` is visible to query `i` iff `j <= pos(i)`.
    Causal = 1,
    /// Every key of the segment is visible.
    Full = 2,
}

/// Entry of a pair table that does not override the default rule.
pub const TABLE_DEFAULT: u8 = 3;

impl Visibility {
    /// The code of this rule in pair tables and in the kernels' parameters.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The rule with this code, `None` for [`TABLE_DEFAULT`] and invalid codes.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::Blocked),
            1 => Some(Self::Causal),
            2 => Some(Self::Full),
            _ => None,
        }
    }

    /// Whether key position `k_pos` is visible to query position `q_pos` under this rule.
    #[inline]
    pub fn allows(self, q_pos: i64, k_pos: i64) -> bool {
        match self {
            Self::Blocked => false,
            Self::Causal => k_pos <= q_pos,
            Self::Full => true,
        }
    }
}

/// The rule for every pair of segments: a default pair (`intra` for a query and key in the same
/// segment, `inter` for different segments, O(1) memory for any number of segments) and an
/// optional explicit pair table whose entries override the default.
#[derive(Clone, Debug)]
pub struct PairRule {
    /// Rule when `seg(q) == seg(k)`.
    pub intra: Visibility,
    /// Rule when `seg(q) != seg(k)`.
    pub inter: Visibility,
    /// Optional overrides, see [`PairTable`].
    pub table: Option<PairTable>,
}

impl PairRule {
    /// A default-only rule.
    pub fn new(intra: Visibility, inter: Visibility) -> Self {
        Self {
            intra,
            inter,
            table: None,
        }
    }

    /// Adds an explicit pair table whose entries override `intra` / `inter`.
    pub fn with_table(mut self, table: PairTable) -> Self {
        self.table = Some(table);
        self
    }
}

/// An explicit table of rules, `u8` tensor of shape `[S, S]` (shared by every batch row) or
/// `[B, S, S]` (one per row; `[1, S, S]` is shared too). Entry `[sq, sk]` is the code of the
/// [`Visibility`] for query segment id `sq` and key segment id `sk` (0 = Blocked, 1 = Causal,
/// 2 = Full), or [`TABLE_DEFAULT`] (3) to use the default pair. Ids `>= S` use the default pair.
#[derive(Clone, Debug)]
pub struct PairTable {
    rules: Tensor,
}

impl PairTable {
    /// Wraps a `u8` tensor of shape `[S, S]` or `[B, S, S]`.
    ///
    /// ```
    /// use segattn::{PairTable, Visibility, TABLE_DEFAULT};
    /// use candle_core::{Device, Tensor};
    /// // Segment 0 sees nothing of segment 1; everything else uses the default pair.
    /// let t = Tensor::new(&[[TABLE_DEFAULT, 0u8], [TABLE_DEFAULT, TABLE_DEFAULT]], &Device::Cpu)?;
    /// let table = PairTable::new(t)?;
    /// assert_eq!(table.size(), 2);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn new(rules: Tensor) -> Result<Self> {
        if rules.dtype() != DType::U8 {
            invalid_arg!(
                "pair_table: expected dtype u8 (rule codes 0..=3), got {:?}",
                rules.dtype()
            );
        }
        let dims = rules.dims();
        let square = match dims {
            [s1, s2] | [_, s1, s2] => s1 == s2,
            _ => false,
        };
        if !square || dims.contains(&0) {
            invalid_arg!(
                "pair_table: expected shape [S, S] or [B, S, S] with S >= 1, got {:?}",
                dims
            );
        }
        let codes = rules.flatten_all()?.to_vec1::<u8>()?;
        if let Some(pos) = codes.iter().position(|&c| c > TABLE_DEFAULT) {
            invalid_arg!(
                "pair_table: entries must be rule codes 0 (blocked), 1 (causal), 2 (full) or 3 \
                 (default), got {} at flat index {pos}",
                codes[pos]
            );
        }
        Ok(Self { rules })
    }

    /// Builds a shared `[S, S]` table from rows of rules (`None` = default).
    pub fn from_rules(rows: &[Vec<Option<Visibility>>], device: &Device) -> Result<Self> {
        let s = rows.len();
        let mut codes = Vec::with_capacity(s * s);
        for (i, row) in rows.iter().enumerate() {
            if row.len() != s {
                invalid_arg!(
                    "pair_table: row {i} has {} entries, expected {s} (a square table)",
                    row.len()
                );
            }
            codes.extend(row.iter().map(|r| r.map_or(TABLE_DEFAULT, Visibility::code)));
        }
        Self::new(Tensor::from_vec(codes, (s, s), device)?)
    }

    /// The number of segment ids `S` the table covers.
    pub fn size(&self) -> usize {
        *self.rules.dims().last().unwrap_or(&0)
    }

    /// The rules tensor, `[S, S]` or `[B, S, S]` u8.
    pub fn rules(&self) -> &Tensor {
        &self.rules
    }
}

/// A host copy of a [`PairRule`], resolved for lookups by the CPU code.
#[derive(Clone, Debug)]
pub(crate) struct HostRule {
    pub intra: Visibility,
    pub inter: Visibility,
    /// Table codes, `[Bt, S, S]` flattened, with `Bt` = 1 (shared) or the batch size.
    pub table: Vec<u8>,
    pub table_size: usize,
    pub table_batches: usize,
    /// Whether some pair of segments may be causal (see [`HostRule::has_causal`]), found once
    /// here: the launchers ask at every call, and a table can hold millions of codes.
    causal: bool,
}

impl HostRule {
    /// The default pair and the table codes (`[batches, size, size]` flattened; empty, 0, 0: none).
    pub fn new(
        (intra, inter): (Visibility, Visibility),
        table: Vec<u8>,
        table_size: usize,
        table_batches: usize,
    ) -> Self {
        let causal =
            intra == Visibility::Causal || inter == Visibility::Causal || table.contains(&Visibility::Causal.code());
        Self {
            intra,
            inter,
            table,
            table_size,
            table_batches,
            causal,
        }
    }

    pub fn from_rule(rule: &PairRule) -> Result<Self> {
        let (table, table_size, table_batches) = match &rule.table {
            None => (Vec::new(), 0, 0),
            Some(t) => {
                let s = t.size();
                let codes = t.rules().flatten_all()?.to_vec1::<u8>()?;
                let batches = codes.len() / (s * s);
                (codes, s, batches)
            }
        };
        Ok(Self::new((rule.intra, rule.inter), table, table_size, table_batches))
    }

    /// Whether some pair of segments may be causal (the default pair or a table entry): the masks
    /// whose tiles along the diagonal are partial, where the 64-row forward kernel is the faster.
    pub fn has_causal(&self) -> bool {
        self.causal
    }

    /// The table slice of batch row `b` (empty when there is no table).
    pub fn table_row(&self, b: usize) -> &[u8] {
        if self.table_size == 0 {
            return &[];
        }
        let ss = self.table_size * self.table_size;
        let tb = if self.table_batches == 1 { 0 } else { b };
        &self.table[tb * ss..(tb + 1) * ss]
    }

    /// The rule for the pair (query segment `sq`, key segment `sk`) in batch row table `table`.
    #[inline]
    pub fn lookup(&self, table: &[u8], sq: u32, sk: u32) -> Visibility {
        let s = self.table_size;
        if (sq as usize) < s && (sk as usize) < s {
            if let Some(v) = Visibility::from_code(table[sq as usize * s + sk as usize]) {
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
