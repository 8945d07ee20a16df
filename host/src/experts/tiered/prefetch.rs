//! The prefetch queue: a prefetch policy's requests after a routed layer step become jobs for
//! worker threads (highest priority first; a newer request cancels queued ones), each filling a
//! device slot reserved for it or the host tier.

use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::experts::ExpertBytes;
use crate::policy::*;

use super::rules::{accept_prefetches, prefetch_cap, Accepted};
use super::state::{DeviceEntry, LoadCell};
use super::Inner;

pub(super) struct Job {
    pub(super) priority: u32,
    pub(super) seq: u64,
    pub(super) generation: u64,
    pub(super) key: ExpertKey,
    pub(super) tier: Tier,
    pub(super) cell: Option<Arc<LoadCell>>,
}

impl PartialEq for Job {
    fn eq(&self, o: &Self) -> bool {
        (self.priority, self.seq) == (o.priority, o.seq)
    }
}
impl Eq for Job {}
impl PartialOrd for Job {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Job {
    /// Higher priority first; among equals, first asked first served.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.priority.cmp(&o.priority).then(o.seq.cmp(&self.seq))
    }
}

#[derive(Default)]
pub(super) struct Queue {
    pub(super) jobs: Mutex<BinaryHeap<Job>>,
    pub(super) more: Condvar,
    pub(super) shutdown: AtomicBool,
    pub(super) generation: AtomicU64,
    pub(super) seq: AtomicU64,
}

impl Queue {
    /// A new prefetch answer: jobs queued for earlier ones are cancelled. Its generation.
    pub(super) fn newer(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Queues one answer's jobs of `generation` together (no worker is woken).
    pub(super) fn push(
        &self,
        accepted: impl IntoIterator<Item = (PrefetchRequest, Option<Arc<LoadCell>>)>,
        generation: u64,
    ) {
        let mut jobs = self.jobs.lock().unwrap();
        for (r, cell) in accepted {
            jobs.push(Job {
                priority: r.priority,
                seq: self.seq.fetch_add(1, Ordering::Relaxed),
                generation,
                key: r.expert,
                tier: r.tier,
                cell,
            });
        }
    }

    /// Whether a newer answer has cancelled `job`.
    pub(super) fn is_stale(&self, job: &Job) -> bool {
        job.generation < self.generation.load(Ordering::SeqCst)
    }
}

impl Inner {
    pub(super) fn worker(&self) {
        loop {
            let job = {
                let mut jobs = self.queue.jobs.lock().unwrap();
                loop {
                    if self.queue.shutdown.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Some(j) = jobs.pop() {
                        break j;
                    }
                    jobs = self.queue.more.wait(jobs).unwrap();
                }
            };
            let stale = self.queue.is_stale(&job);
            match job.tier {
                Tier::Device => {
                    let cell = job.cell.expect("device jobs carry a cell");
                    let result = if stale {
                        None
                    } else {
                        let host = self.state.lock().unwrap().host_copy(job.key);
                        match self.load_compute(job.key, host, true) {
                            Ok(w) => {
                                let mut s = self.state.lock().unwrap();
                                s.device_c.bytes_in += w.bytes() as u64;
                                Some(w)
                            }
                            Err(e) => {
                                tracing::warn!("prefetch of {:?} failed: {e:#}", job.key);
                                None
                            }
                        }
                    };
                    let mut s = self.state.lock().unwrap();
                    let ours = matches!(s.device_entry(job.key), Some(DeviceEntry::Loading(c)) if Arc::ptr_eq(c, &cell));
                    match (&result, ours) {
                        (Some(w), true) => {
                            s.set_device(job.key, DeviceEntry::Ready(w.clone()));
                            s.mark_prefetched(job.key);
                            s.event(EventKind::Insert, Tier::Device, job.key);
                        }
                        (None, true) => {
                            s.remove_device(job.key);
                            s.prefetch_c.cancelled += 1;
                            s.prefetch_c.wasted += 1;
                        }
                        _ => {}
                    }
                    drop(s);
                    cell.set(result);
                }
                Tier::Host | Tier::Disk => {
                    if stale {
                        let mut s = self.state.lock().unwrap();
                        s.prefetch_c.cancelled += 1;
                        s.prefetch_c.wasted += 1;
                        continue;
                    }
                    let layer = self.moe_layers[job.key.layer as usize];
                    if let Ok(b) = ExpertBytes::read(&self.ckpt, layer, job.key.expert) {
                        let mut s = self.state.lock().unwrap();
                        if s.host_len() < self.host_slots && !s.on_host(job.key) {
                            s.host_c.bytes_in += b.storage_bytes() as u64;
                            s.set_host(job.key, Arc::new(b));
                            s.event(EventKind::Insert, Tier::Host, job.key);
                        }
                    }
                }
            }
        }
    }

    /// The prefetch policy's turn after MoE layer `moe` was routed: its requests become jobs.
    pub(super) fn prefetch_after(
        &self,
        moe: u32,
        tokens: usize,
        experts: &[u32],
        outlook: &[(usize, Vec<f32>)],
    ) {
        let mut p = self.policies.lock().unwrap();
        if !p.prefetch.has_plugin() {
            return;
        }
        // The outlook may be longer than this policy asked for (an observer wanted more).
        let outlook = &outlook[..outlook.len().min(p.prefetch.lookahead() as usize)];
        let step = {
            let s = self.state.lock().unwrap();
            RoutedStep {
                step: self.step.load(Ordering::Relaxed),
                layer: moe,
                tokens: tokens as u32,
                experts: experts.to_vec(),
                outlook: outlook
                    .iter()
                    .filter_map(|(l, scores)| {
                        let m = self.moe_index[*l]?;
                        Some(Outlook {
                            layer: m,
                            scores: scores.clone(),
                            residency: s.layer_tiers(m),
                        })
                    })
                    .collect(),
            }
        };
        let reqs = p.prefetch.on_routed(&step, &|| self.init_args());
        if reqs.is_empty() {
            return;
        }
        // Newer requests cancel queued ones.
        let generation = self.queue.newer();
        let Accepted {
            device: device_reqs,
            host: host_reqs,
        } = {
            let s = self.state.lock().unwrap();
            accept_prefetches(
                reqs,
                prefetch_cap(self.top_k, tokens),
                |e| s.on_device(e),
                |e| s.on_host(e),
            )
        };
        let mut accepted = Vec::new();
        if !device_reqs.is_empty() {
            // Room for them, taken from the residents this step does not use.
            let current: Vec<ExpertKey> = experts
                .iter()
                .map(|&e| ExpertKey {
                    layer: moe,
                    expert: e,
                })
                .collect();
            let free = {
                let mut s = self.state.lock().unwrap();
                s.pin(&current, true);
                s.device_free()
            };
            let victims = self.victims_for(&mut p, Tier::Device, device_reqs.len(), free);
            let mut room = free;
            let mut demote = Vec::new();
            {
                let mut s = self.state.lock().unwrap();
                s.pin(&current, false);
                let before = s.device_len();
                self.evict_device(&mut s, &victims, &mut demote);
                room += before - s.device_len();
            }
            self.admit_host(&mut p, &demote);
            let mut s = self.state.lock().unwrap();
            for r in device_reqs.into_iter().take(room) {
                let cell = Arc::new(LoadCell::default());
                s.set_device(r.expert, DeviceEntry::Loading(cell.clone()));
                accepted.push((r, Some(cell)));
            }
        }
        accepted.extend(host_reqs.into_iter().map(|r| (r, None)));
        if accepted.is_empty() {
            return;
        }
        self.state.lock().unwrap().prefetch_c.issued += accepted.len() as u64;
        self.queue.push(accepted, generation);
        self.queue.more.notify_all();
    }
}
