//! Tile classification is exact: SKIP iff no element of the tile is visible, FULL iff every one
//! is, PARTIAL otherwise — checked against the dense mask on random masks and tile sizes.

mod common;

use common::cases::{random_mask, MASK_KINDS};
use common::Rng;
use proptest::prelude::*;
use segattn::mask::tiles::{tile_map, TileClass};
use segattn::reference::dense_mask;

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn classes_match_the_dense_mask(
        seed in any::<u64>(),
        batch in 1usize..=2,
        lk in 1usize..=160,
        lq_cut in 0usize..160,
        kind in 0..MASK_KINDS.len(),
        tile_q in prop::sample::select(vec![1usize, 7, 16, 64]),
        tile_k in prop::sample::select(vec![1usize, 5, 32, 64]),
    ) {
        let mut rng = Rng::new(seed);
        let lq = lk - lq_cut.min(lk - 1);
        let mask = random_mask(&mut rng, kind, batch, lk).unwrap().last_queries(lq).unwrap();
        let dense = dense_mask(&mask, batch, lq, lk).unwrap().to_vec3::<u8>().unwrap();
        for (b, rows) in dense.iter().enumerate() {
            let classes = tile_map(&mask, batch, b, (lq, lk), (tile_q, tile_k)).unwrap();
            let kt = lk.div_ceil(tile_k);
            for (t, class) in classes.iter().enumerate() {
                let (q0, k0) = ((t / kt) * tile_q, (t % kt) * tile_k);
                let cells: Vec<u8> = rows[q0..(q0 + tile_q).min(lq)]
                    .iter()
                    .flat_map(|r| r[k0..(k0 + tile_k).min(lk)].iter().copied())
                    .collect();
                let want = if cells.iter().all(|&c| c == 0) {
                    TileClass::Skip
                } else if cells.iter().all(|&c| c == 1) {
                    TileClass::Full
                } else {
                    TileClass::Partial
                };
                prop_assert_eq!(*class, want, "tile ({}, {}) of row {} for {}", q0, k0, b, MASK_KINDS[kind]);
            }
        }
    }
}
