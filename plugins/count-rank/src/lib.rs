//! Expert pruning by activation count: `moehost convert --selection count-rank` keeps, per
//! layer, the experts the calibration text routed the most tokens to (ties: more routed mass,
//! then the lower id). The host's default ranks by routed mass; this is the frequency view.
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::vec::Vec;
use core::cmp::Ordering;

/// Expert numbers, most tokens first (ties: more mass, then lower id).
pub fn rank(counts: &[u32], mass: &[f32]) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..counts.len() as u32).collect();
    let m = |e: u32| mass.get(e as usize).copied().unwrap_or(0.0);
    ids.sort_by(|&a, &b| {
        counts[b as usize]
            .cmp(&counts[a as usize])
            .then(m(b).partial_cmp(&m(a)).unwrap_or(Ordering::Equal))
            .then(a.cmp(&b))
    });
    ids
}

#[cfg(target_arch = "wasm32")]
mod guest {
    use super::*;
    use alloc::string::ToString;

    // The shared runtime (allocator, panic handler, cabi_realloc).
    use common as _;

    wit_bindgen::generate!({
        world: "pruning-policy",
        path: "../../wit/policy.wit",
    });

    use exports::moehost::policy::pruning::{Guest, LayerStats};
    use moehost::policy::types::{ModelShape, PolicyInfo};

    struct CountRank;

    impl Guest for CountRank {
        fn info() -> PolicyInfo {
            PolicyInfo {
                name: "count-rank".to_string(),
                description: "keep the experts routed to most often".to_string(),
            }
        }

        fn rank_experts(_: ModelShape, stats: LayerStats, _keep: u32) -> Vec<u32> {
            rank(&stats.counts, &stats.mass)
        }
    }

    export!(CountRank);
}

#[cfg(test)]
mod tests {
    #[test]
    fn most_tokens_first_then_mass_then_id() {
        let counts = [5, 9, 9, 1, 9];
        let mass = [3.0, 2.0, 4.0, 0.5, 2.0];
        assert_eq!(super::rank(&counts, &mass), [2, 1, 4, 0, 3]);
    }
}
