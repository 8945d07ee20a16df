//! The decisions of a layer step that the live store and the replay lab share, so that a
//! replay follows the store exactly: when a tier asks its eviction policy for victims and how
//! many, and which of a prefetch policy's requests are carried out.

use crate::policy::{ExpertKey, PrefetchRequest, Tier};

/// How many victims to ask for so that `want` more experts fit a pool with `free` slots free
/// and `candidates` residents it may give up; `None` when they fit, or when none may go.
pub fn victims_wanted(want: usize, free: usize, candidates: usize) -> Option<u32> {
    (want > free && candidates > 0).then(|| (want - free).min(candidates) as u32)
}

/// The most prefetches of each tier carried out after one layer step: one step's worth.
pub fn prefetch_cap(top_k: usize, tokens: usize) -> usize {
    (top_k * tokens).max(top_k)
}

/// The prefetch requests carried out, in the order they are served.
#[derive(Debug, Default, PartialEq)]
pub struct Accepted {
    pub device: Vec<PrefetchRequest>,
    pub host: Vec<PrefetchRequest>,
}

/// Sorts a prefetch policy's answer (highest priority first, ties in the policy's order),
/// keeps each (expert, tier) once, and takes up to `cap` of each tier that are not there yet:
/// device requests for experts not in the device tier, host requests for experts in neither
/// tier. `on_device` and `on_host` answer true for keys that cannot be placed (out of range).
pub fn accept_prefetches(
    mut reqs: Vec<PrefetchRequest>,
    cap: usize,
    on_device: impl Fn(ExpertKey) -> bool,
    on_host: impl Fn(ExpertKey) -> bool,
) -> Accepted {
    reqs.sort_by_key(|r| std::cmp::Reverse(r.priority));
    let mut seen = std::collections::HashSet::new();
    reqs.retain(|r| seen.insert((r.expert, r.tier)));
    let device = reqs
        .iter()
        .filter(|r| r.tier == Tier::Device && !on_device(r.expert))
        .take(cap)
        .copied()
        .collect();
    let host = reqs
        .iter()
        .filter(|r| r.tier == Tier::Host && !on_host(r.expert) && !on_device(r.expert))
        .take(cap)
        .copied()
        .collect();
    Accepted { device, host }
}
