//! What a PINE call derives from the layouts alone, for its position scheme and shape (query rows,
//! keys): the layouts extended to the keys, the query groups, the attention's mask, the
//! importance's scoring masks and the decode importance's key metadata. Every layer of a decode
//! step (or of a prefill) has the same, so a [`super::PineAttention`] keeps the last one built
//! ([`StepCache`]), with the device copies of its arrays: a 32-layer decode step builds and
//! uploads them once, not 32 times.

#[cfg(feature = "cuda")]
use std::sync::OnceLock;
use std::sync::{Arc, Mutex};

use candle_core::{Device, DeviceLocation, Result};

use super::importance::ScoringMasks;
use super::order::GroupLayout;
use super::scheme::PositionScheme;
use crate::mask::{PineLayout, SegmentMask};

/// The shape a [`StepLayout`] was built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StepKey {
    pub scheme: PositionScheme,
    pub q_len: usize,
    pub kv_len: usize,
}

/// See the module documentation. Immutable once built.
pub(crate) struct StepLayout {
    pub key: StepKey,
    /// The layouts extended to `kv_len` keys (generated tokens join the suffix).
    pub extended: Vec<PineLayout>,
    /// Key segment ids (`max n + 2`).
    pub sk: usize,
    /// How many last query rows are suffix / generated rows in at least one batch row.
    pub scored_rows: usize,
    /// The query groups of the last `q_len` rows (with the device copies of their metadata).
    pub groups: GroupLayout,
    /// The attention's mask, on the CPU (the launchers read its host metadata; it keeps its
    /// packed device copy).
    pub mask: SegmentMask,
    /// The importance's scoring masks, on the device of the call that first needed them (a
    /// prefill's 32 layers build and upload them once).
    scoring: Mutex<Option<(DeviceLocation, Arc<ScoringMasks>)>>,
    /// `[key_pos | key_seg | seg_lens]` of the GPU decode importance, built on first use.
    #[cfg(feature = "cuda")]
    decode_words: OnceLock<Vec<u32>>,
    /// Its device copies.
    #[cfg(feature = "cuda")]
    pub device_words: crate::cuda::DeviceCopies<u32>,
}

impl StepLayout {
    pub fn new(
        key: StepKey,
        extended: Vec<PineLayout>,
        sk: usize,
        scored_rows: usize,
        groups: GroupLayout,
        mask: SegmentMask,
    ) -> Self {
        Self {
            key,
            extended,
            sk,
            scored_rows,
            groups,
            mask,
            scoring: Mutex::new(None),
            #[cfg(feature = "cuda")]
            decode_words: OnceLock::new(),
            #[cfg(feature = "cuda")]
            device_words: Default::default(),
        }
    }

    /// The scoring masks of this step on `device`: the kept ones, or built now (and kept, replacing
    /// those of another device).
    pub fn scoring_masks(&self, device: &Device) -> Result<Arc<ScoringMasks>> {
        let mut kept = self
            .scoring
            .lock()
            .map_err(|_| candle_core::Error::Msg("segattn: PINE scoring-mask cache poisoned by a panic".into()))?;
        let location = device.location();
        if let Some((at, masks)) = kept.as_ref() {
            if *at == location {
                return Ok(masks.clone());
            }
        }
        let masks = Arc::new(ScoringMasks::new(
            &self.extended,
            device,
            self.key.q_len,
            self.key.kv_len,
            self.scored_rows,
        )?);
        *kept = Some((location, masks.clone()));
        Ok(masks)
    }

    /// The decode importance's key metadata, built by `build` the first time.
    #[cfg(feature = "cuda")]
    pub fn decode_words(&self, build: impl FnOnce() -> Vec<u32>) -> &[u32] {
        self.decode_words.get_or_init(build)
    }
}

/// The last [`StepLayout`] a PINE layer built; clones of the layer share it.
#[derive(Clone, Default)]
pub(crate) struct StepCache(Arc<Mutex<Option<Arc<StepLayout>>>>);

impl std::fmt::Debug for StepCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = self.0.lock().ok().and_then(|s| s.as_ref().map(|s| s.key));
        write!(f, "StepCache({key:?})")
    }
}

impl StepCache {
    /// The step layout for `key`: the kept one if it was built for `key`, else `build()`'s,
    /// which replaces it.
    pub fn get_or_build(&self, key: StepKey, build: impl FnOnce() -> Result<StepLayout>) -> Result<Arc<StepLayout>> {
        let mut kept = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("segattn: PINE step cache poisoned by a panic".into()))?;
        if let Some(step) = kept.as_ref().filter(|s| s.key == key) {
            return Ok(step.clone());
        }
        let step = Arc::new(build()?);
        *kept = Some(step.clone());
        Ok(step)
    }
}
