//! Belady's MIN, the offline bound: evict the resident expert whose next access is furthest in
//! the future (never accessed again = infinitely far), ties to the lowest (layer, expert).
//!
//! Each tier and pool keeps its residents in an ordered set keyed by (next use, reversed key),
//! so a victim is the set's last element: O(log C) per access, O(log C) per victim (pinned
//! experts, which have just been moved to their next use, are skipped from the top).

use std::collections::BTreeSet;

use crate::policy::Tier;

use super::engine::Evictor;
use super::schedule::{Schedule, Visit};
use crate::experts::tiered::residency::{Request, Residency};

pub struct Belady<'s> {
    /// Per access: the visit of the key's next access.
    next_access: &'s [u32],
    /// Per key: its next access from now.
    next: Vec<u32>,
    /// `[tier][pool]` residents.
    sets: [Vec<BTreeSet<u64>>; 2],
    member: [Vec<bool>; 2],
    per_layer_e: Option<u32>,
}

#[inline]
fn entry(next: u32, key: u32) -> u64 {
    (u64::from(next) << 32) | u64::from(u32::MAX - key)
}

#[inline]
fn key_of(entry: u64) -> u32 {
    u32::MAX - (entry & 0xffff_ffff) as u32
}

fn tier_index(t: Tier) -> usize {
    match t {
        Tier::Device => 0,
        _ => 1,
    }
}

impl<'s> Belady<'s> {
    pub fn new(s: &'s Schedule, per_layer: bool) -> Self {
        let pools = if per_layer { s.layers as usize } else { 1 };
        let n = s.n_keys();
        Self {
            next_access: s.next_use(),
            next: s.first_use(),
            sets: [vec![BTreeSet::new(); pools], vec![BTreeSet::new(); pools]],
            member: [vec![false; n], vec![false; n]],
            per_layer_e: per_layer.then_some(s.experts_per_layer),
        }
    }

    fn pool(&self, key: u32) -> usize {
        self.per_layer_e.map_or(0, |e| (key / e) as usize)
    }

    fn choose(&self, res: &Residency, r: Request, out: &mut Vec<u32>) {
        let set = &self.sets[tier_index(r.tier)][r.pool as usize];
        for &e in set.iter().rev() {
            if out.len() as u32 >= r.count {
                break;
            }
            let key = key_of(e);
            if (r.skip_pinned && res.pinned.has(key)) || (r.skip_extra && res.extra.has(key)) {
                continue;
            }
            out.push(key);
        }
    }
}

impl Evictor for Belady<'_> {
    fn begin_visit(&mut self, _vi: usize, v: &Visit, keys: &[u32]) {
        for (i, &key) in keys.iter().enumerate() {
            let old = self.next[key as usize];
            let new = self.next_access[v.start as usize + i];
            let pool = self.pool(key);
            for t in 0..2 {
                if self.member[t][key as usize] {
                    let set = &mut self.sets[t][pool];
                    set.remove(&entry(old, key));
                    set.insert(entry(new, key));
                }
            }
            self.next[key as usize] = new;
        }
    }

    fn on_step(&mut self, res: &Residency, request: Option<Request>, out: &mut Vec<u32>) {
        if let Some(r) = request {
            self.choose(res, r, out);
        }
    }

    fn victims(&mut self, res: &Residency, request: Request, out: &mut Vec<u32>) {
        self.choose(res, request, out);
    }

    fn inserted(&mut self, key: u32, tier: Tier) {
        let t = tier_index(tier);
        if !self.member[t][key as usize] {
            self.member[t][key as usize] = true;
            let pool = self.pool(key);
            self.sets[t][pool].insert(entry(self.next[key as usize], key));
        }
    }

    fn removed(&mut self, key: u32, tier: Tier) {
        let t = tier_index(tier);
        if self.member[t][key as usize] {
            self.member[t][key as usize] = false;
            let pool = self.pool(key);
            self.sets[t][pool].remove(&entry(self.next[key as usize], key));
        }
    }
}
