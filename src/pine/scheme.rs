//! Position schemes: where each token of a `[prefix][segments][suffix]` prompt sits for RoPE, and
//! which mask goes with it. PINE and the baselines its paper compares with.

use candle_core::{Device, Result};

use crate::mask::{PineLayout, SegmentMask, Visibility};

use Visibility::{Blocked, Causal, Full};

/// How segments are positioned and masked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PositionScheme {
    /// PINE: segments see each other bidirectionally; each query group orders the segments by
    /// importance and re-assigns their positions (the paper's method).
    #[default]
    Pine,
    /// Ordinary causal attention at sequence positions (what the model was trained with).
    Vanilla,
    /// Parallel context windows: every segment positioned right after the prefix, segments
    /// blocked from each other; the suffix follows the longest segment.
    Pcw,
    /// No inter-segment attention: segments blocked from each other, sequence positions.
    Nia,
}

impl PositionScheme {
    /// The RoPE position of every token `0..len` of `layout` (tokens beyond the layout are
    /// generated ones, part of the suffix). For PINE: the original positions, at which keys are
    /// rotated once (segments right-aligned to end at `E - 1`, `E` = prefix + segment tokens).
    pub fn positions(self, layout: &PineLayout, len: usize) -> Vec<u32> {
        let p = layout.prefix_len;
        let seg_total: usize = layout.segment_lens.iter().sum();
        let end = p + seg_total;
        let mut pos: Vec<u32> = (0..p as u32).collect();
        match self {
            PositionScheme::Vanilla | PositionScheme::Nia => return (0..len as u32).collect(),
            PositionScheme::Pine => {
                for &l in &layout.segment_lens {
                    pos.extend((end - l..end).map(|x| x as u32));
                }
                pos.extend(end as u32..len as u32);
            }
            PositionScheme::Pcw => {
                for &l in &layout.segment_lens {
                    pos.extend((p..p + l).map(|x| x as u32));
                }
                let longest = layout.segment_lens.iter().copied().max().unwrap_or(0);
                pos.extend((0..len.saturating_sub(end)).map(|s| (p + longest + s) as u32));
            }
        }
        pos.truncate(len);
        pos
    }

    /// The mask of this scheme over `len` tokens (`len >= layout.len()` for every layout; the
    /// extra tokens extend the suffix).
    pub fn mask(self, layouts: &[PineLayout], len: usize, device: &Device) -> Result<SegmentMask> {
        let extended: Vec<PineLayout> = layouts.iter().map(|l| extend(l, len)).collect();
        match self {
            PositionScheme::Pine => SegmentMask::pine_batch(&extended, device),
            PositionScheme::Vanilla => SegmentMask::causal(len, device),
            PositionScheme::Pcw | PositionScheme::Nia => blocked_segments(&extended, device),
        }
    }
}

/// `layout` with its suffix grown to cover `len` tokens.
pub(crate) fn extend(layout: &PineLayout, len: usize) -> PineLayout {
    let mut l = layout.clone();
    l.suffix_len += len.saturating_sub(layout.len());
    l
}

/// PCW / NIA: the prefix causal; a segment sees the prefix fully and itself causally, no other
/// segment; the suffix causal over everything.
fn blocked_segments(layouts: &[PineLayout], device: &Device) -> Result<SegmentMask> {
    SegmentMask::from_layouts(layouts, device, |q, k, n| match (q, k) {
        (0, 0) => Causal,
        (0, _) => Blocked,
        (q, k) if q == n + 1 => {
            if k == q {
                Causal
            } else {
                Full
            }
        }
        (_, 0) => Full,
        (q, k) if q == k => Causal,
        _ => Blocked,
    })
}
