//! What the live store holds where, under its state lock: residency (shared with the replay
//! lab), the device entries and host copies behind it, the events not yet told to the eviction
//! policy, and the counters; victim requests, eviction and demotion.

use std::sync::{Arc, Condvar, Mutex};

use crate::experts::{ExpertBytes, ExpertWeights};
use crate::policy::*;

use super::events::EventLog;
use super::residency::{BitSet, Offered, Request, Residency};
use super::rules::victims_wanted;
use super::stats::{PlacementCounters, PrefetchCounters, TierCounters};
use super::Inner;
use crate::policy::set::PolicySet;

/// A device slot: ready, or being filled by a prefetch worker.
pub(super) enum DeviceEntry {
    Ready(ExpertWeights),
    Loading(Arc<LoadCell>),
}

/// Where a prefetch worker puts its result; `Some(None)` = cancelled or failed.
#[derive(Default)]
pub(super) struct LoadCell {
    pub(super) value: Mutex<Option<Option<ExpertWeights>>>,
    pub(super) ready: Condvar,
}

impl LoadCell {
    pub(super) fn set(&self, v: Option<ExpertWeights>) {
        *self.value.lock().unwrap() = Some(v);
        self.ready.notify_all();
    }

    pub(super) fn wait(&self) -> Option<ExpertWeights> {
        let mut g = self.value.lock().unwrap();
        while g.is_none() {
            g = self.ready.wait(g).unwrap();
        }
        g.clone().unwrap()
    }
}

pub(super) struct State {
    /// Which experts hold a slot where (one pool for the model). A device slot is held by a
    /// ready entry or by one still loading.
    pub(super) res: Residency,
    /// By dense key: the device entries and host copies behind `res`.
    device: Vec<Option<DeviceEntry>>,
    host: Vec<Option<Arc<ExpertBytes>>>,
    /// Device slots a prefetch worker is still filling: never candidates, not yet resident
    /// for the policies.
    loading: BitSet,
    /// Events not yet delivered to the eviction policy.
    pub(super) log: EventLog,
    /// Prefetched into the device tier and not used yet.
    prefetched_unused: BitSet,
    pub(super) device_c: TierCounters,
    pub(super) host_c: TierCounters,
    pub(super) disk_c: TierCounters,
    pub(super) streamed: u64,
    pub(super) placement_c: PlacementCounters,
    pub(super) wait_ns: u64,
    pub(super) prefetch_c: PrefetchCounters,
}

impl State {
    pub(super) fn new(shape: ModelShape, device_slots: usize, host_slots: usize) -> Self {
        let n = (shape.moe_layers * shape.experts_per_layer) as usize;
        Self {
            res: Residency::new(shape, false, device_slots as u32, Some(host_slots as u32)),
            device: (0..n).map(|_| None).collect(),
            host: vec![None; n],
            loading: BitSet::new(n),
            log: {
                let mut log = EventLog::new(shape.experts_per_layer);
                log.fit(n);
                log
            },
            prefetched_unused: BitSet::new(n),
            device_c: TierCounters::default(),
            host_c: TierCounters::default(),
            disk_c: TierCounters::default(),
            streamed: 0,
            placement_c: PlacementCounters::default(),
            wait_ns: 0,
            prefetch_c: PrefetchCounters::default(),
        }
    }

    /// The dense key of `e` (the store only names experts of its own shape).
    pub(super) fn dense(&self, e: ExpertKey) -> u32 {
        self.res
            .dense(e)
            .expect("expert key within the model's shape")
    }

    /// Records an event for the eviction policy's next call.
    pub(super) fn event(&mut self, kind: EventKind, tier: Tier, e: ExpertKey) {
        let k = self.dense(e);
        self.log.push(kind, tier, k);
    }

    pub(super) fn device_entry(&self, e: ExpertKey) -> Option<&DeviceEntry> {
        self.device[self.dense(e) as usize].as_ref()
    }

    /// Holds a device slot (ready or loading).
    pub(super) fn on_device(&self, e: ExpertKey) -> bool {
        self.res.on_device(self.dense(e))
    }

    pub(super) fn is_ready(&self, e: ExpertKey) -> bool {
        matches!(self.device_entry(e), Some(DeviceEntry::Ready(_)))
    }

    pub(super) fn host_copy(&self, e: ExpertKey) -> Option<Arc<ExpertBytes>> {
        self.host[self.dense(e) as usize].clone()
    }

    /// The host copy a demand read of `e` uses, counted as a host hit, or a host miss and a
    /// disk read.
    pub(super) fn read_from_host(&mut self, e: ExpertKey) -> Option<Arc<ExpertBytes>> {
        let copy = self.host_copy(e);
        if copy.is_some() {
            self.host_c.hits += 1;
        } else {
            self.host_c.misses += 1;
            self.disk_c.hits += 1;
        }
        copy
    }

    pub(super) fn on_host(&self, e: ExpertKey) -> bool {
        self.res.on_host(self.dense(e))
    }

    pub(super) fn device_len(&self) -> usize {
        self.res.device_count(0) as usize
    }

    pub(super) fn host_len(&self) -> usize {
        self.res.host_count(0) as usize
    }

    /// Puts `entry` in `e`'s device slot, taking a slot if it holds none.
    pub(super) fn set_device(&mut self, e: ExpertKey, entry: DeviceEntry) {
        let k = self.dense(e);
        if !self.res.on_device(k) {
            self.res.insert(k, Tier::Device);
        }
        match entry {
            DeviceEntry::Loading(_) => self.loading.set(k),
            DeviceEntry::Ready(_) => self.loading.clear(k),
        }
        self.device[k as usize] = Some(entry);
    }

    /// Frees `e`'s device slot.
    pub(super) fn remove_device(&mut self, e: ExpertKey) {
        let k = self.dense(e);
        self.res.remove(k, Tier::Device);
        self.loading.clear(k);
        self.device[k as usize] = None;
    }

    pub(super) fn set_host(&mut self, e: ExpertKey, bytes: Arc<ExpertBytes>) {
        let k = self.dense(e);
        if !self.res.on_host(k) {
            self.res.insert(k, Tier::Host);
        }
        self.host[k as usize] = Some(bytes);
    }

    /// Drops `e`'s host copy; false if there was none.
    pub(super) fn remove_host(&mut self, e: ExpertKey) -> bool {
        let k = self.dense(e);
        self.host[k as usize] = None;
        self.res.remove(k, Tier::Host)
    }

    pub(super) fn mark_prefetched(&mut self, e: ExpertKey) {
        let k = self.dense(e);
        self.prefetched_unused.set(k);
    }

    /// Whether `e` was prefetched and not used yet; it counts as used (or wasted) from now on.
    pub(super) fn take_prefetched(&mut self, e: ExpertKey) -> bool {
        let k = self.dense(e);
        let was = self.prefetched_unused.has(k);
        self.prefetched_unused.clear(k);
        was
    }

    /// Pins (or unpins) the experts of the step being served: never victims.
    pub(super) fn pin(&mut self, keys: &[ExpertKey], on: bool) {
        let keys: Vec<u32> = keys.iter().map(|&e| self.dense(e)).collect();
        self.res.pinned.set_all(keys, on);
    }

    /// Marks (or unmarks) experts being admitted: a host victim request leaves them out.
    pub(super) fn mark_extra(&mut self, keys: &[ExpertKey], on: bool) {
        let keys: Vec<u32> = keys.iter().map(|&e| self.dense(e)).collect();
        self.res.extra.set_all(keys, on);
    }

    /// What a victim request for `tier` leaves out besides its pinned and extra keys: slots
    /// still loading, and residents the policy has not been told of.
    fn hidden(&self, tier: Tier) -> ([&BitSet; 2], usize) {
        match tier {
            Tier::Device => ([&self.loading, self.log.unreported(tier)], 2),
            _ => ([self.log.unreported(tier), &self.loading], 1),
        }
    }

    /// A victim request for `count` experts of `tier`: pinned experts are left out of device
    /// requests, marked extra ones out of host requests.
    pub(super) fn request(tier: Tier, count: u32) -> Request {
        match tier {
            Tier::Device => Request::device(0, count, false),
            _ => Request::host(0, count),
        }
    }

    /// Device slots not taken (ready or loading).
    pub(super) fn device_free(&self) -> usize {
        self.res.device_free(0) as usize
    }

    /// Host slots not taken.
    pub(super) fn host_free(&self) -> usize {
        let cap = self
            .res
            .host_cap
            .expect("the store's host tier has a capacity");
        cap.saturating_sub(self.res.host_count(0)) as usize
    }

    /// The victim request that makes room for `want` more experts of `tier` with `free` slots
    /// free, and the residents it leaves out; `None` when they fit or none may go.
    pub(super) fn victim_request(
        &self,
        tier: Tier,
        want: usize,
        free: usize,
    ) -> Option<(Request, Vec<ExpertKey>)> {
        let probe = Self::request(tier, 0);
        let count = victims_wanted(want, free, self.candidate_count(&probe))?;
        Some((Self::request(tier, count), self.excluded(&probe)))
    }

    /// How many victims `r`'s tier may give up now.
    pub(super) fn candidate_count(&self, r: &Request) -> usize {
        let (hidden, n) = self.hidden(r.tier);
        self.res.candidate_count(r, &hidden[..n]) as usize
    }

    /// The residents `r` leaves out (ready ones: a loading slot is no resident yet).
    pub(super) fn excluded(&self, r: &Request) -> Vec<ExpertKey> {
        let mut v = Vec::new();
        self.res
            .excluded(r, &[&self.loading], |k| v.push(self.res.key(k)));
        v
    }

    /// `r`'s candidates as the eviction policy sees them.
    fn offered<T>(&self, r: &Request, f: impl FnOnce(&Offered) -> T) -> T {
        let (hidden, n) = self.hidden(r.tier);
        f(&Offered {
            res: &self.res,
            request: *r,
            hidden: &hidden[..n],
        })
    }

    /// Fastest tier of each expert of MoE layer `layer` (a loading slot is not there yet).
    pub(super) fn layer_tiers(&self, layer: u32) -> Vec<Tier> {
        let e = self.res.shape.experts_per_layer;
        (layer * e..(layer + 1) * e)
            .map(|k| {
                if self.res.on_device(k) && !self.loading.has(k) {
                    Tier::Device
                } else if self.res.on_host(k) {
                    Tier::Host
                } else {
                    Tier::Disk
                }
            })
            .collect()
    }

    /// What a policy's `init` gets (ready device entries and host copies are resident).
    pub(super) fn init_args(&self, device_slot_bytes: u64) -> InitArgs {
        self.res.init_args_with(
            device_slot_bytes,
            self.res.shape.expert_bytes,
            &[&self.loading],
        )
    }
}

/// A victim request's candidates, looked up under the state lock (which the caller must not
/// hold) at each call: prefetch workers keep filling slots while the policy decides.
pub(super) struct TierCandidates<'a> {
    pub(super) inner: &'a Inner,
    pub(super) request: Request,
}

impl Candidates for TierCandidates<'_> {
    fn contains(&self, e: ExpertKey) -> bool {
        let s = self.inner.state.lock().unwrap();
        s.offered(&self.request, |o| o.contains(e))
    }

    fn list(&self) -> Vec<ExpertKey> {
        let s = self.inner.state.lock().unwrap();
        s.offered(&self.request, |o| o.list())
    }
}

impl Inner {
    /// Asks the eviction policy for victims in a further request of this step (not `on_step`):
    /// room for `want` more experts of `tier`, given `free` slots. The caller has pinned or
    /// marked what the request must leave out.
    pub(super) fn victims_for(
        &self,
        p: &mut PolicySet,
        tier: Tier,
        want: usize,
        free: usize,
    ) -> Vec<ExpertKey> {
        let Some((request, excluded)) = self.state.lock().unwrap().victim_request(tier, want, free)
        else {
            return Vec::new();
        };
        let candidates = TierCandidates {
            inner: self,
            request,
        };
        let req = VictimRequest {
            tier,
            count: request.count,
            only_layer: None,
            excluded: &excluded,
            candidates: &candidates,
        };
        p.eviction.victims(&req, &|| self.init_args())
    }

    /// Removes `victims` from the device tier and demotes them to the host tier.
    pub(super) fn evict_device(
        &self,
        s: &mut State,
        victims: &[ExpertKey],
        demote: &mut Vec<ExpertKey>,
    ) {
        for &v in victims {
            if s.is_ready(v) {
                s.remove_device(v);
                s.event(EventKind::Remove, Tier::Device, v);
                if s.take_prefetched(v) {
                    s.prefetch_c.wasted += 1;
                }
                if self.host_slots > 0 && !s.on_host(v) {
                    demote.push(v);
                }
            }
        }
    }

    /// Puts `keys` into the host tier (copying their storage bytes), evicting by policy.
    pub(super) fn admit_host(&self, p: &mut PolicySet, keys: &[ExpertKey]) {
        if keys.is_empty() || self.host_slots == 0 {
            return;
        }
        let free = {
            let mut s = self.state.lock().unwrap();
            s.mark_extra(keys, true);
            s.host_free()
        };
        let victims = self.victims_for(p, Tier::Host, keys.len(), free);
        let mut room = free;
        {
            let mut s = self.state.lock().unwrap();
            s.mark_extra(keys, false);
            for v in victims {
                if s.remove_host(v) {
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
                    if s.host_len() >= self.host_slots || s.on_host(*k) {
                        continue;
                    }
                    s.host_c.bytes_in += b.storage_bytes() as u64;
                    s.set_host(*k, Arc::new(b));
                    s.event(EventKind::Insert, Tier::Host, *k);
                }
                Err(e) => tracing::error!("cannot copy expert {k:?} to host memory: {e:#}"),
            }
        }
    }
}
