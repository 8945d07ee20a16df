//! What the live store holds where, under its state lock: the device and host tiers' entries,
//! the events not yet told to the eviction policy, and the counters; eviction and demotion.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::experts::{ExpertBytes, ExpertWeights};
use crate::policy::*;

use super::policies::Policies;
use super::prefetch::LoadCell;
use super::stats::{PlacementCounters, PrefetchCounters, TierCounters};
use super::Inner;

/// A device slot: ready, or being filled by a prefetch worker.
pub(super) enum DeviceEntry {
    Ready(ExpertWeights),
    Loading(Arc<LoadCell>),
}

#[derive(Default)]
pub(super) struct State {
    pub(super) device: HashMap<ExpertKey, DeviceEntry>,
    pub(super) host: HashMap<ExpertKey, Arc<ExpertBytes>>,
    /// Events not yet delivered to the eviction policy.
    pub(super) events: Vec<Event>,
    /// Residents whose insert event is among `events`: the policy does not know them yet, so
    /// a victim request must not count them as candidates.
    pub(super) unreported: HashSet<(ExpertKey, Tier)>,
    /// Prefetched into the device tier and not used yet.
    pub(super) prefetched_unused: HashSet<ExpertKey>,
    pub(super) device_c: TierCounters,
    pub(super) host_c: TierCounters,
    pub(super) disk_c: TierCounters,
    pub(super) streamed: u64,
    pub(super) placement_c: PlacementCounters,
    pub(super) wait_ns: u64,
    pub(super) prefetch_c: PrefetchCounters,
}

impl State {
    /// Records an event for the eviction policy's next call.
    pub(super) fn event(&mut self, kind: EventKind, tier: Tier, expert: ExpertKey) {
        match kind {
            EventKind::Insert => {
                self.unreported.insert((expert, tier));
            }
            EventKind::Remove => {
                self.unreported.remove(&(expert, tier));
            }
            EventKind::Access => {}
        }
        self.events.push(Event { kind, tier, expert });
    }

    /// The events since the policy's previous call; it knows every resident afterwards.
    pub(super) fn take_events(&mut self) -> Vec<Event> {
        self.unreported.clear();
        std::mem::take(&mut self.events)
    }

    /// Victim candidates in `tier`: residents (device: ready ones) the policy has been told
    /// about, minus `excluded`.
    pub(super) fn is_candidate(&self, e: ExpertKey, tier: Tier, excluded: &[ExpertKey]) -> bool {
        let resident = match tier {
            Tier::Device => matches!(self.device.get(&e), Some(DeviceEntry::Ready(_))),
            _ => self.host.contains_key(&e),
        };
        resident && !excluded.contains(&e) && !self.unreported.contains(&(e, tier))
    }

    /// How many candidates a request for `tier` with `excluded` has.
    pub(super) fn candidate_count(&self, tier: Tier, excluded: &[ExpertKey]) -> usize {
        let resident = match tier {
            Tier::Device => self
                .device
                .values()
                .filter(|e| matches!(e, DeviceEntry::Ready(_)))
                .count(),
            _ => self.host.len(),
        };
        let resident_excluded = excluded
            .iter()
            .filter(|e| match tier {
                Tier::Device => matches!(self.device.get(e), Some(DeviceEntry::Ready(_))),
                _ => self.host.contains_key(e),
            })
            .count();
        let unreported = self
            .unreported
            .iter()
            .filter(|(e, t)| {
                *t == tier && !excluded.contains(e) && {
                    match tier {
                        Tier::Device => matches!(self.device.get(e), Some(DeviceEntry::Ready(_))),
                        _ => self.host.contains_key(e),
                    }
                }
            })
            .count();
        resident - resident_excluded - unreported
    }
}

/// A victim request's candidates: the residents of one tier (device: ready entries) minus
/// `excluded`, looked up under the state lock (which the caller must not hold).
pub(super) struct TierCandidates<'a> {
    pub(super) inner: &'a Inner,
    pub(super) tier: Tier,
    pub(super) excluded: &'a [ExpertKey],
}

impl Candidates for TierCandidates<'_> {
    fn contains(&self, e: ExpertKey) -> bool {
        let s = self.inner.state.lock().unwrap();
        s.is_candidate(e, self.tier, self.excluded)
    }

    fn list(&self) -> Vec<ExpertKey> {
        let s = self.inner.state.lock().unwrap();
        let mut v: Vec<ExpertKey> = match self.tier {
            Tier::Device => s.device.keys().copied().collect(),
            _ => s.host.keys().copied().collect(),
        };
        v.retain(|k| s.is_candidate(*k, self.tier, self.excluded));
        v.sort_unstable();
        v
    }
}

impl Inner {
    /// Removes `victims` from the device tier and demotes them to the host tier.
    pub(super) fn evict_device(
        &self,
        s: &mut State,
        victims: &[ExpertKey],
        demote: &mut Vec<ExpertKey>,
    ) {
        for v in victims {
            if let Some(DeviceEntry::Ready(_)) = s.device.get(v) {
                s.device.remove(v);
                s.event(EventKind::Remove, Tier::Device, *v);
                if s.prefetched_unused.remove(v) {
                    s.prefetch_c.wasted += 1;
                }
                if self.host_slots > 0 && !s.host.contains_key(v) {
                    demote.push(*v);
                }
            }
        }
    }

    /// Puts `keys` into the host tier (copying their storage bytes), evicting by policy.
    pub(super) fn admit_host(&self, p: &mut Policies, keys: &[ExpertKey]) {
        if keys.is_empty() || self.host_slots == 0 {
            return;
        }
        let (free, excluded, available) = {
            let s = self.state.lock().unwrap();
            let excluded: Vec<ExpertKey> = keys
                .iter()
                .filter(|k| s.host.contains_key(k))
                .copied()
                .collect();
            let available = s.candidate_count(Tier::Host, &excluded);
            (
                self.host_slots.saturating_sub(s.host.len()),
                excluded,
                available,
            )
        };
        let mut room = free;
        if keys.len() > free && available > 0 {
            let candidates = TierCandidates {
                inner: self,
                tier: Tier::Host,
                excluded: &excluded,
            };
            let req = VictimRequest {
                tier: Tier::Host,
                count: (keys.len() - free).min(available) as u32,
                only_layer: None,
                excluded: &excluded,
                candidates: &candidates,
            };
            let victims = p.eviction.victims(&req, &|| self.init_args());
            let mut s = self.state.lock().unwrap();
            for v in victims {
                if s.host.remove(&v).is_some() {
                    room += 1;
                    s.event(EventKind::Remove, Tier::Host, v);
                }
            }
        }
        for k in keys.iter().take(room) {
            let layer = self.moe_layers[k.layer as usize];
            match ExpertBytes::read(&self.ckpt, layer, k.expert) {
                Ok(b) => {
                    let mut s = self.state.lock().unwrap();
                    // A prefetch worker may have taken the room meanwhile: never exceed it.
                    if s.host.len() >= self.host_slots || s.host.contains_key(k) {
                        continue;
                    }
                    s.host_c.bytes_in += b.storage_bytes() as u64;
                    s.host.insert(*k, Arc::new(b));
                    s.event(EventKind::Insert, Tier::Host, *k);
                }
                Err(e) => tracing::error!("cannot copy expert {k:?} to host memory: {e:#}"),
            }
        }
    }
}
