//! What the eviction policy has not been told yet: the events since its previous call, and
//! the residents those events introduce. A resident the policy has not heard of is never
//! offered as a victim. The live store and the replay lab keep the same log.

use crate::policy::{Event, EventKind, Tier};

use super::residency::BitSet;

pub struct EventLog {
    events: Vec<Event>,
    experts_per_layer: u32,
    /// Inserted since the last `take`, by tier (device, host).
    unreported: [BitSet; 2],
}

impl EventLog {
    pub fn new(experts_per_layer: u32) -> Self {
        Self {
            events: Vec::new(),
            experts_per_layer,
            unreported: [BitSet::new(0), BitSet::new(0)],
        }
    }

    /// Makes room for the dense keys below `n` (the model's).
    pub fn fit(&mut self, n: usize) {
        for u in &mut self.unreported {
            u.fit(n);
        }
    }

    fn slot(tier: Tier) -> usize {
        usize::from(tier != Tier::Device)
    }

    /// Records an event about dense key `k` for the policy's next call.
    pub fn push(&mut self, kind: EventKind, tier: Tier, k: u32) {
        self.unreported[Self::slot(tier)].fit(k as usize + 1);
        match kind {
            EventKind::Insert => self.unreported[Self::slot(tier)].set(k),
            EventKind::Remove => self.unreported[Self::slot(tier)].clear(k),
            EventKind::Access => {}
        }
        let e = self.experts_per_layer;
        self.events.push(Event {
            kind,
            tier,
            expert: crate::policy::ExpertKey {
                layer: k / e,
                expert: k % e,
            },
        });
    }

    /// The events since the previous call, for the policy's call now: it knows every resident
    /// afterwards. Hand the vector back with `recycle` to reuse its allocation.
    pub fn take(&mut self) -> Vec<Event> {
        let e = self.experts_per_layer;
        for ev in &self.events {
            if ev.kind == EventKind::Insert {
                self.unreported[Self::slot(ev.tier)].clear(ev.expert.layer * e + ev.expert.expert);
            }
        }
        std::mem::take(&mut self.events)
    }

    /// Gives back a vector `take` returned, once its events are delivered.
    pub fn recycle(&mut self, mut v: Vec<Event>) {
        if self.events.is_empty() {
            v.clear();
            self.events = v;
        }
    }

    /// Residents of `tier` inserted since the last `take`: not candidates yet.
    pub fn unreported(&self, tier: Tier) -> &BitSet {
        &self.unreported[Self::slot(tier)]
    }
}
