//! One MoE layer step in the live store: accesses, placement of the misses, the eviction
//! policy's turn, demotion, then loading (cached while there is room, streamed past it) and
//! waiting for prefetches in flight.

use anyhow::Result;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::experts::{ExpertBytes, ExpertWeights};
use crate::policy::*;

use super::state::{DeviceEntry, LoadCell, TierCandidates};
use super::Inner;

impl Inner {
    /// The weights of `experts` of decoder layer `layer` for one step (`ExpertProvider::fetch`).
    pub(super) fn fetch_step(
        &self,
        layer: usize,
        experts: &[u32],
        tokens: &[u32],
    ) -> Result<Vec<ExpertWeights>> {
        let t0 = Instant::now();
        let keys: Vec<ExpertKey> = experts.iter().map(|&e| self.key(layer, e)).collect();
        for k in &keys {
            anyhow::ensure!(
                (k.expert as usize) < self.n_experts,
                "expert {} out of range",
                k.expert
            );
        }
        let mut p = self.policies.lock().unwrap();

        // 1. What is where; the step's accesses.
        let mut ready: Vec<Option<ExpertWeights>> = vec![None; keys.len()];
        let mut waiting: Vec<(usize, Arc<LoadCell>)> = Vec::new();
        let mut misses: Vec<usize> = Vec::new();
        let mut miss_tiers: Vec<Tier> = Vec::new();
        let (facts, free) = {
            let mut s = self.state.lock().unwrap();
            for (i, k) in keys.iter().enumerate() {
                s.event(EventKind::Access, Tier::Device, *k);
                match s.device_entry(*k) {
                    Some(DeviceEntry::Ready(w)) => {
                        ready[i] = Some(w.clone());
                        s.device_c.hits += 1;
                        if s.take_prefetched(*k) {
                            s.prefetch_c.used += 1;
                        }
                    }
                    Some(DeviceEntry::Loading(c)) => {
                        // Counted as used once it arrives (below).
                        waiting.push((i, c.clone()));
                        s.device_c.hits += 1;
                    }
                    None => {
                        // The host and disk tiers count the read when it happens: this step's
                        // host victims may still take the copy.
                        s.device_c.misses += 1;
                        miss_tiers.push(if s.on_host(*k) {
                            Tier::Host
                        } else {
                            Tier::Disk
                        });
                        misses.push(i);
                    }
                }
            }
            // This call delivers every pending event, so the policy then knows every resident.
            let facts = StepFacts {
                step: self.step.load(Ordering::Relaxed),
                layer: keys.first().map_or(0, |k| k.layer),
                events: s.log.take(),
            };
            (facts, s.device_free())
        };

        // 2. Placement: fetch each miss into the device tier, or run it where it lives.
        if !misses.is_empty() {
            let miss_keys: Vec<ExpertKey> = misses.iter().map(|&i| keys[i]).collect();
            let miss_tokens: Vec<u32> = misses
                .iter()
                .map(|&i| tokens.get(i).copied().unwrap_or(1))
                .collect();
            let request = PlacementRequest {
                layer: facts.layer,
                experts: &miss_keys,
                tokens: &miss_tokens,
                tiers: &miss_tiers,
                free_device_slots: free as u32,
                expert_bytes: self.shape.expert_bytes,
                costs: self.costs,
            };
            let places = p.placement.place(&request, &|| self.init_args());
            let mut fetched = Vec::with_capacity(misses.len());
            let mut on_host = Vec::new();
            for ((&i, place), t) in misses.iter().zip(places).zip(miss_tokens) {
                match place {
                    Place::Device => fetched.push(i),
                    Place::Host => on_host.push((i, t)),
                }
            }
            let hosts: Vec<Option<Arc<ExpertBytes>>> = {
                let mut s = self.state.lock().unwrap();
                s.placement_c.fetched += fetched.len() as u64;
                s.placement_c.on_host += on_host.len() as u64;
                s.placement_c.host_tokens +=
                    on_host.iter().map(|&(_, t)| u64::from(t)).sum::<u64>();
                on_host
                    .iter()
                    .map(|&(i, _)| s.read_from_host(keys[i]))
                    .collect()
            };
            for (&(i, _), host) in on_host.iter().zip(hosts) {
                ready[i] = Some(ExpertWeights::Stored(self.stored(keys[i], host)?));
            }
            misses = fetched;
        }

        // 3. The eviction policy hears the facts and, if room is needed, names victims among
        //    the residents this step does not use.
        let (request, excluded) = {
            let mut s = self.state.lock().unwrap();
            s.pin(&keys, true);
            s.victim_request(Tier::Device, misses.len(), free).unzip()
        };
        let excluded = excluded.unwrap_or_default();
        let candidates = request.map(|request| TierCandidates {
            inner: self,
            request,
        });
        let request = request
            .zip(candidates.as_ref())
            .map(|(r, c)| VictimRequest {
                tier: Tier::Device,
                count: r.count,
                only_layer: None,
                excluded: &excluded,
                candidates: c,
            });
        let victims = p
            .eviction
            .on_step(&facts, request.as_ref(), &|| self.init_args());
        let mut demote = Vec::new();
        let room = {
            let mut s = self.state.lock().unwrap();
            s.log.recycle(facts.events);
            self.evict_device(&mut s, &victims, &mut demote);
            s.pin(&keys, false);
            s.device_free()
        };
        self.admit_host(&mut p, &demote);
        drop(p);

        // 4. Load the fetched misses; cache as many as there is room for, stream the rest.
        let hosts: Vec<Option<Arc<ExpertBytes>>> = {
            let mut s = self.state.lock().unwrap();
            misses.iter().map(|&i| s.read_from_host(keys[i])).collect()
        };
        for (n, (&i, host)) in misses.iter().zip(hosts).enumerate() {
            let w = self.load_compute(keys[i], host, n < room)?;
            let mut s = self.state.lock().unwrap();
            s.device_c.bytes_in += w.bytes() as u64;
            if n < room {
                s.set_device(keys[i], DeviceEntry::Ready(w.clone()));
                s.event(EventKind::Insert, Tier::Device, keys[i]);
            } else {
                s.streamed += 1;
            }
            ready[i] = Some(w);
        }
        // 5. Wait for prefetches in flight (a cancelled one is loaded here).
        for (i, cell) in waiting {
            ready[i] = Some(match cell.wait() {
                Some(w) => {
                    let mut s = self.state.lock().unwrap();
                    s.take_prefetched(keys[i]);
                    s.prefetch_c.used += 1;
                    w
                }
                None => {
                    let host = self.state.lock().unwrap().host_copy(keys[i]);
                    self.load_compute(keys[i], host, false)?
                }
            });
        }
        self.state.lock().unwrap().wait_ns += t0.elapsed().as_nanos() as u64;
        Ok(ready
            .into_iter()
            .map(|w| w.expect("every expert resolved"))
            .collect())
    }
}
