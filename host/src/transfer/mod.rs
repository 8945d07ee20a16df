//! Host -> device expert copies: a staging slab, a copy engine, and the scheduler between them.
//!
//! Owns: `CopyEngine` (what a device's copy path must do: stage bytes in a host slot, copy a
//! host slot into a device slot asynchronously and in submission order, signal completion per
//! copy), `TransferScheduler` (device slots, a priority queue of copies with cancellation, a
//! small submission window so a demand load can overtake queued prefetches, pinning, and a
//! completion event per expert so compute waits only for the experts it needs), and
//! `SimulatedLink`, a copy engine with a configurable bandwidth that runs the same scheduler
//! where there is no GPU. The CUDA engine (pinned slab, dedicated copy stream, events) is
//! `cuda::CudaCopyEngine`, behind the `cuda` feature.
//! Does not own: which experts to copy or evict (policies, `store`), or the kernels.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod sim;

use anyhow::{bail, Result};
use serde::Serialize;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crate::policy::ExpertKey;

pub use sim::SimulatedLink;

/// A device's copy path. Copies run asynchronously, in the order submitted.
pub trait CopyEngine: Send + Sync + 'static {
    /// Completion of one copy.
    type Event: Send + Sync + 'static;
    /// Bytes of one slot (host and device slots are the same size: one expert).
    fn slot_bytes(&self) -> usize;
    fn host_slots(&self) -> usize;
    fn device_slots(&self) -> usize;
    /// Writes `parts`, one after another, into host slot `slot`, after any copy still reading it
    /// has finished.
    fn stage(&self, slot: usize, parts: &[&[u8]]) -> Result<()>;
    /// Bytes a copy of host slot `slot` moves (what was staged there last; the whole slot by
    /// default).
    fn staged_bytes(&self, _slot: usize) -> usize {
        self.slot_bytes()
    }
    /// Queues a copy of host slot `src` into device slot `dst` and returns at once.
    fn copy(&self, src: usize, dst: usize) -> Result<Self::Event>;
    /// Blocks until `event`'s copy has completed.
    fn wait(&self, event: &Self::Event) -> Result<()>;
    /// Device slot `slot`'s bytes (verification and tests; synchronous).
    fn read_device(&self, slot: usize) -> Result<Vec<u8>>;
}

/// Priority of a demand load: above every prefetch.
pub const DEMAND: u32 = u32::MAX;

#[derive(Debug, Clone, Default, Serialize)]
pub struct TransferStats {
    pub copies: u64,
    pub bytes: u64,
    /// Queued prefetches dropped before their copy started.
    pub cancelled: u64,
    /// Demand loads that found their expert ready / in flight / not yet asked for.
    pub demand_ready: u64,
    pub demand_in_flight: u64,
    pub demand_cold: u64,
    /// Time compute waited for copies, nanoseconds.
    pub wait_ns: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Queued,
    InFlight,
    Ready,
}

struct Resident {
    slot: usize,
    state: SlotState,
    pins: u32,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Queued {
    priority: u32,
    /// Older first among equals (reversed).
    order: std::cmp::Reverse<u64>,
    key: ExpertKey,
    host_slot: usize,
}

struct Sched<Ev> {
    resident: HashMap<ExpertKey, Resident>,
    free: Vec<usize>,
    queue: BinaryHeap<Queued>,
    in_flight: VecDeque<(ExpertKey, Arc<Ev>)>,
    seq: u64,
    stats: TransferStats,
    shutdown: bool,
    error: Option<String>,
}

struct Shared<E: CopyEngine> {
    engine: E,
    sched: Mutex<Sched<E::Event>>,
    changed: Condvar,
    /// Copies submitted to the engine at most at once: a short window keeps queued prefetches
    /// cancellable and lets a demand load overtake them (a stream cannot be reordered).
    window: usize,
}

/// Device slots filled by a copy engine, on demand or ahead of use.
pub struct TransferScheduler<E: CopyEngine> {
    shared: Arc<Shared<E>>,
    dispatcher: Option<std::thread::JoinHandle<()>>,
}

/// An expert held in its device slot: it cannot be evicted while this lives.
pub struct Pinned<E: CopyEngine> {
    shared: Arc<Shared<E>>,
    key: ExpertKey,
    pub slot: usize,
}

impl<E: CopyEngine> Drop for Pinned<E> {
    fn drop(&mut self) {
        let mut s = self.shared.sched.lock().unwrap();
        if let Some(r) = s.resident.get_mut(&self.key) {
            r.pins = r.pins.saturating_sub(1);
        }
    }
}

impl<E: CopyEngine> TransferScheduler<E> {
    pub fn new(engine: E, window: usize) -> Self {
        let free = (0..engine.device_slots()).rev().collect();
        let shared = Arc::new(Shared {
            engine,
            sched: Mutex::new(Sched {
                resident: HashMap::new(),
                free,
                queue: BinaryHeap::new(),
                in_flight: VecDeque::new(),
                seq: 0,
                stats: TransferStats::default(),
                shutdown: false,
                error: None,
            }),
            changed: Condvar::new(),
            window: window.max(1),
        });
        let s = shared.clone();
        let dispatcher = std::thread::Builder::new()
            .name("moehost-copy".into())
            .spawn(move || s.dispatch())
            .expect("cannot start the copy dispatcher");
        Self {
            shared,
            dispatcher: Some(dispatcher),
        }
    }

    pub fn engine(&self) -> &E {
        &self.shared.engine
    }

    /// Queues a copy of `key` (staged in `host_slot`) with `priority`. False when no device
    /// slot is free (evict first); true when it is queued, in flight or there already.
    pub fn prefetch(&self, key: ExpertKey, host_slot: usize, priority: u32) -> Result<bool> {
        let mut s = self.shared.sched.lock().unwrap();
        self.enqueue(&mut s, key, host_slot, priority)
    }

    fn enqueue(
        &self,
        s: &mut Sched<E::Event>,
        key: ExpertKey,
        host_slot: usize,
        priority: u32,
    ) -> Result<bool> {
        if host_slot >= self.shared.engine.host_slots() {
            bail!("host slot {host_slot} out of range");
        }
        if let Some(r) = s.resident.get(&key) {
            if r.state == SlotState::Queued && priority == DEMAND {
                // Raise it: re-queue at demand priority (the old entry is skipped when popped).
                self.push(s, key, host_slot, priority);
            }
            return Ok(true);
        }
        let Some(slot) = s.free.pop() else {
            return Ok(false);
        };
        s.resident.insert(
            key,
            Resident {
                slot,
                state: SlotState::Queued,
                pins: 0,
            },
        );
        self.push(s, key, host_slot, priority);
        Ok(true)
    }

    /// Queues a copy request behind the older ones of its priority and wakes the dispatcher.
    fn push(&self, s: &mut Sched<E::Event>, key: ExpertKey, host_slot: usize, priority: u32) {
        s.seq += 1;
        let order = std::cmp::Reverse(s.seq);
        s.queue.push(Queued {
            priority,
            order,
            key,
            host_slot,
        });
        self.shared.changed.notify_all();
    }

    /// The device slot holding `key`, once its copy has completed: queued at demand priority
    /// if it was not asked for, then waited for. Waits for this expert's copy only.
    pub fn demand(&self, key: ExpertKey, host_slot: usize) -> Result<Pinned<E>> {
        let t0 = Instant::now();
        let mut s = self.shared.sched.lock().unwrap();
        match s.resident.get(&key).map(|r| r.state) {
            Some(SlotState::Ready) => s.stats.demand_ready += 1,
            Some(SlotState::InFlight) => s.stats.demand_in_flight += 1,
            Some(SlotState::Queued) => {
                s.stats.demand_in_flight += 1;
                self.enqueue(&mut s, key, host_slot, DEMAND)?;
            }
            None => {
                if !self.enqueue(&mut s, key, host_slot, DEMAND)? {
                    bail!("no free device slot for {key:?}: evict first");
                }
                s.stats.demand_cold += 1;
            }
        }
        loop {
            if let Some(e) = &s.error {
                bail!("copy engine failed: {e}");
            }
            let Some(r) = s.resident.get_mut(&key) else {
                // Evicted between its copy and this wake-up: ask again.
                if !self.enqueue(&mut s, key, host_slot, DEMAND)? {
                    bail!("no free device slot for {key:?}: evict first");
                }
                continue;
            };
            if r.state == SlotState::Ready {
                r.pins += 1;
                let slot = r.slot;
                s.stats.wait_ns += t0.elapsed().as_nanos() as u64;
                return Ok(Pinned {
                    shared: self.shared.clone(),
                    key,
                    slot,
                });
            }
            s = self.shared.changed.wait(s).unwrap();
        }
    }

    /// Drops every queued prefetch whose copy has not started (a newer prediction replaces
    /// them); their slots are free again.
    pub fn cancel_queued(&self) {
        let mut s = self.shared.sched.lock().unwrap();
        let queued: Vec<Queued> = s.queue.drain().collect();
        let demanded: std::collections::HashSet<ExpertKey> = queued
            .iter()
            .filter(|q| q.priority == DEMAND)
            .map(|q| q.key)
            .collect();
        for q in queued {
            let key = q.key;
            if demanded.contains(&key) {
                if q.priority == DEMAND {
                    s.queue.push(q);
                }
                continue;
            }
            if let Some(r) = s.resident.get(&key) {
                if r.state == SlotState::Queued && r.pins == 0 {
                    let slot = r.slot;
                    s.resident.remove(&key);
                    s.free.push(slot);
                    s.stats.cancelled += 1;
                }
            }
        }
    }

    /// Frees `key`'s device slot if it is ready and not pinned.
    pub fn evict(&self, key: ExpertKey) -> bool {
        let mut s = self.shared.sched.lock().unwrap();
        match s.resident.get(&key) {
            Some(r) if r.state == SlotState::Ready && r.pins == 0 => {
                let slot = r.slot;
                s.resident.remove(&key);
                s.free.push(slot);
                true
            }
            _ => false,
        }
    }

    /// Whether `key` holds a device slot (queued, in flight or ready).
    pub fn is_resident(&self, key: ExpertKey) -> bool {
        self.shared
            .sched
            .lock()
            .unwrap()
            .resident
            .contains_key(&key)
    }

    pub fn is_ready(&self, key: ExpertKey) -> bool {
        let s = self.shared.sched.lock().unwrap();
        s.resident
            .get(&key)
            .is_some_and(|r| r.state == SlotState::Ready)
    }

    /// Copies submitted to the engine and not completed.
    pub fn in_flight(&self) -> usize {
        self.shared.sched.lock().unwrap().in_flight.len()
    }

    pub fn stats(&self) -> TransferStats {
        self.shared.sched.lock().unwrap().stats.clone()
    }
}

impl<E: CopyEngine> Drop for TransferScheduler<E> {
    fn drop(&mut self) {
        self.shared.sched.lock().unwrap().shutdown = true;
        self.shared.changed.notify_all();
        if let Some(d) = self.dispatcher.take() {
            let _ = d.join();
        }
    }
}

impl<E: CopyEngine> Shared<E> {
    /// The dispatcher thread: keeps up to `window` copies submitted, highest priority first,
    /// and marks each expert ready when its own copy's event completes.
    fn dispatch(&self) {
        let mut s = self.sched.lock().unwrap();
        loop {
            if s.shutdown {
                return;
            }
            while s.in_flight.len() < self.window {
                let Some(q) = s.queue.pop() else { break };
                let key = q.key;
                let slot = match s.resident.get(&key) {
                    Some(r) if r.state == SlotState::Queued => r.slot,
                    // Cancelled, or a stale entry of a raised request.
                    _ => continue,
                };
                match self.engine.copy(q.host_slot, slot) {
                    Ok(ev) => {
                        s.resident.get_mut(&key).unwrap().state = SlotState::InFlight;
                        s.in_flight.push_back((key, Arc::new(ev)));
                        s.stats.copies += 1;
                        s.stats.bytes += self.engine.staged_bytes(q.host_slot) as u64;
                    }
                    Err(e) => {
                        s.error = Some(format!("{e:#}"));
                        self.changed.notify_all();
                    }
                }
            }
            let Some((key, ev)) = s.in_flight.front().cloned() else {
                s = self.changed.wait(s).unwrap();
                continue;
            };
            drop(s);
            let done = self.engine.wait(&ev);
            s = self.sched.lock().unwrap();
            s.in_flight.pop_front();
            match done {
                Ok(()) => {
                    if let Some(r) = s.resident.get_mut(&key) {
                        r.state = SlotState::Ready;
                    }
                }
                Err(e) => s.error = Some(format!("{e:#}")),
            }
            self.changed.notify_all();
        }
    }
}

/// Host -> device bandwidth of `engine`, bytes per second: `copies` copies of one slot,
/// timed from the first submission to the last completion.
pub fn measure_bandwidth<E: CopyEngine>(engine: &E, copies: usize) -> Result<f64> {
    let n = copies.max(1);
    let t0 = Instant::now();
    let mut last = None;
    for i in 0..n {
        last = Some(engine.copy(i % engine.host_slots(), i % engine.device_slots())?);
    }
    if let Some(ev) = last {
        engine.wait(&ev)?;
    }
    Ok((n * engine.slot_bytes()) as f64 / t0.elapsed().as_secs_f64())
}
