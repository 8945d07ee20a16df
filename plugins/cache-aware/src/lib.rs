//! Cache-conditional routing: start from the exact top-k; replace a chosen expert that is not
//! device-resident by the best device-resident expert not already chosen, when that expert
//! scores at least the token's k-th best score minus [`GAP`]. Fewer weight transfers for a small,
//! bounded change of routing.
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::vec::Vec;

/// The declared `max-score-gap`: a substitute scores at most this much below the token's k-th
/// best score.
pub const GAP: f32 = 0.05;

/// Whether `s` may replace an expert of a token whose k-th best score is `kth`. Checked in the
/// three ways a host may phrase the bound (f32 difference, f32 threshold, exact difference), so
/// an answer is never rejected over rounding. NaN never qualifies.
fn within_gap(s: f32, kth: f32) -> bool {
    kth - s <= GAP && s >= kth - GAP && (kth as f64 - s as f64) <= GAP as f64
}

/// One token's choice, appended to `out`: `k` distinct ids, best score first. `residency[e]` is
/// expert e's tier code (0 = device; a missing entry counts as not resident). `scratch` is
/// reused between tokens.
pub fn choose(row: &[f32], k: usize, residency: &[u8], out: &mut Vec<u32>, scratch: &mut Vec<u32>) {
    let start = out.len();
    common::top_k_into(row, k, out);
    let chosen = start..out.len();
    let Some(&kth_id) = out[chosen.clone()].last() else {
        return;
    };
    let kth = row[kth_id as usize];
    let is_device = |e: u32| residency.get(e as usize) == Some(&common::tier::DEVICE);
    let missing = out[chosen.clone()]
        .iter()
        .filter(|&&e| !is_device(e))
        .count();
    if missing == 0 {
        return;
    }
    // The best `missing` device-resident experts outside the exact choice, within the gap.
    scratch.clear();
    let chosen_ids = &out[chosen.clone()];
    let eligible =
        |e: u32| is_device(e) && !chosen_ids.contains(&e) && within_gap(row[e as usize], kth);
    common::top_k_filtered_into(row, missing, eligible, scratch);
    // Replace the lowest-scoring non-resident picks first: the best of them stay if substitutes
    // run out.
    let mut subs = scratch.iter();
    for slot in out[chosen.clone()].iter_mut().rev() {
        if !is_device(*slot) {
            match subs.next() {
                Some(&e) => *slot = e,
                None => break,
            }
        }
    }
    out[chosen].sort_by(|&a, &b| common::rank_cmp(row, a, b));
}

#[cfg(target_arch = "wasm32")]
mod guest {
    use super::*;
    use alloc::string::ToString;

    wit_bindgen::generate!({
        world: "selection-policy",
        path: "../../wit/policy.wit",
    });

    use exports::moehost::policy::selection::{Guest, SelectionInfo};
    use moehost::policy::types::{ModelShape, PolicyInfo, ResidentSet, TierCapacity};

    struct CacheAware;

    impl Guest for CacheAware {
        fn init(_: ModelShape, _: Vec<TierCapacity>, _: ResidentSet) -> SelectionInfo {
            SelectionInfo {
                info: PolicyInfo {
                    name: "cache-aware".to_string(),
                    description:
                        "top-k; a non-resident pick is swapped for the best device-resident \
                                  expert within 0.05 of the k-th score"
                            .to_string(),
                },
                max_score_gap: GAP,
            }
        }

        fn select(
            _layer: u32,
            tokens: u32,
            k: u32,
            scores: Vec<f32>,
            residency: Vec<u8>,
        ) -> Vec<u32> {
            let mut out = Vec::with_capacity(tokens as usize * k as usize);
            if tokens == 0 {
                return out;
            }
            let experts = scores.len() / tokens as usize;
            let mut scratch = Vec::with_capacity(k as usize);
            for row in scores.chunks_exact(experts.max(1)).take(tokens as usize) {
                choose(row, k as usize, &residency, &mut out, &mut scratch);
            }
            out
        }
    }

    export!(CacheAware);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `device[e]`: expert e is on the device (tier code 0), otherwise on the host (1) or,
    /// every third one, on disk (2).
    fn pick(row: &[f32], k: usize, device: &[bool]) -> Vec<u32> {
        let residency: Vec<u8> = device
            .iter()
            .enumerate()
            .map(|(e, &d)| if d { 0 } else { 1 + (e % 3 == 0) as u8 })
            .collect();
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        choose(row, k, &residency, &mut out, &mut scratch);
        out
    }

    #[test]
    fn short_residency_counts_as_not_resident() {
        let row = [0.9, 0.1, 0.5, 0.88];
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        choose(&row, 1, &[7, 0, 0, 0], &mut out, &mut scratch);
        assert_eq!(out, vec![3]);
        out.clear();
        choose(&row, 1, &[], &mut out, &mut scratch);
        assert_eq!(out, vec![0]);
    }

    #[test]
    fn all_resident_is_exact_top_k() {
        let row = [0.9, 0.1, 0.5, 0.7];
        assert_eq!(pick(&row, 2, &[true; 4]), vec![0, 3]);
    }

    #[test]
    fn swaps_only_within_gap_lowest_first() {
        // exact top-3: 0 (0.90), 1 (0.80), 2 (0.70); 1 and 2 are not resident.
        let row = [0.90, 0.80, 0.70, 0.66, 0.60, 0.68];
        let device = [true, false, false, true, true, true];
        // within 0.05 of 0.70: experts 3 (0.66) and 5 (0.68); 4 (0.60) is too far.
        assert_eq!(pick(&row, 3, &device), vec![0, 5, 3]);
        // only one substitute: the lower non-resident pick (2) goes, 1 stays.
        let device = [true, false, false, false, true, true];
        assert_eq!(pick(&row, 3, &device), vec![0, 1, 5]);
    }

    #[test]
    fn never_duplicates_and_ignores_nan() {
        let row = [0.5, f32::NAN, 0.5, 0.49];
        let device = [false, true, true, true];
        let got = pick(&row, 2, &device);
        assert_eq!(got, vec![2, 3]);
    }

    #[test]
    fn gap_bound_holds() {
        let mut x: u32 = 7;
        for _ in 0..300 {
            let row: Vec<f32> = (0..32)
                .map(|_| {
                    x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (x >> 8) as f32 / (1u32 << 24) as f32
                })
                .collect();
            let device: Vec<bool> = (0..32).map(|i| (x >> (i % 31)) & 1 == 1).collect();
            let got = pick(&row, 6, &device);
            let mut exact = Vec::new();
            common::top_k_into(&row, 6, &mut exact);
            let kth = row[exact[5] as usize];
            let mut sorted = got.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), 6);
            for &e in &got {
                assert!(kth - row[e as usize] <= GAP);
            }
        }
    }
}
