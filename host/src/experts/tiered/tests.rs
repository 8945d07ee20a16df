//! The tiered store's state machine, part by part: residency and victim requests, the event
//! log, the shared rules, the live state's loading slots and pins, and prefetch cancellation.
//! The replay lab runs on the same parts; `tests/replay.rs` checks that a live generation
//! counts what the replay of its routing counts.

use std::sync::Arc;

use crate::experts::{ExpertBytes, ExpertWeights};
use crate::policy::{Candidates, EventKind, ExpertKey, ModelShape, PrefetchRequest, Tier};

use super::events::EventLog;
use super::prefetch::Queue;
use super::residency::{BitSet, Offered, Request, Residency};
use super::rules::{accept_prefetches, prefetch_cap, victims_wanted};
use super::state::{DeviceEntry, LoadCell, State};

/// Expert 0 of the bundled model's first MoE layer, stored and computable.
fn an_expert() -> (Arc<ExpertBytes>, ExpertWeights) {
    let dir = crate::engine::bundled_model_dir();
    let cfg = crate::model::config::ModelConfig::from_dir(&dir).unwrap();
    let ckpt = crate::weights::checkpoint::Checkpoint::open(&dir, cfg.quantization()).unwrap();
    let bytes = ExpertBytes::read(&ckpt, cfg.moe_layers()[0], 0).unwrap();
    let w = ExpertWeights::Compute(Arc::new(bytes.to_ffn().unwrap()));
    (Arc::new(bytes), w)
}

fn shape() -> ModelShape {
    ModelShape {
        moe_layers: 2,
        experts_per_layer: 4,
        top_k: 2,
        expert_bytes: 100,
    }
}

fn key(layer: u32, expert: u32) -> ExpertKey {
    ExpertKey { layer, expert }
}

fn listed(res: &Residency, r: &Request, hidden: &[&BitSet]) -> Vec<u32> {
    let mut v = Vec::new();
    res.candidates(r, hidden, |k| v.push(k));
    v
}

#[test]
fn residency_pools_candidates_and_exclusions() {
    let mut res = Residency::new(shape(), true, 2, Some(1));
    for k in [0, 1, 5] {
        res.insert(k, Tier::Device);
    }
    res.insert(2, Tier::Host);
    assert_eq!((res.device_count(0), res.device_count(1)), (2, 1));
    assert_eq!((res.device_free(0), res.device_free(1)), (0, 1));
    assert!(res.on_host(2) && !res.on_host(0));
    // Per-layer pools: a request for layer 0 never offers layer 1's experts.
    assert_eq!(listed(&res, &Request::device(0, 1, false), &[]), vec![0, 1]);
    res.pinned.set(1);
    assert_eq!(listed(&res, &Request::device(0, 1, false), &[]), vec![0]);
    let mut excluded = Vec::new();
    res.excluded(&Request::device(0, 1, false), &[], |k| excluded.push(k));
    assert_eq!(excluded, vec![1]);
    let mut hidden = BitSet::new(8);
    hidden.set(0);
    assert_eq!(
        res.candidate_count(&Request::device(0, 1, false), &[&hidden]),
        0
    );
    assert!(!res.is_candidate(0, &Request::device(0, 1, false), &[&hidden]));
    // The policy's view of the same request.
    let offered = Offered {
        res: &res,
        request: Request::device(0, 1, false),
        hidden: &[],
    };
    assert_eq!(offered.list(), vec![key(0, 0)]);
    assert!(offered.contains(key(0, 0)) && !offered.contains(key(0, 1)));
    assert!(!offered.contains(key(1, 1)), "layer 1 is another pool");
    // Removing twice is refused; init lists what is resident, ascending, slots in all pools.
    assert!(res.remove(5, Tier::Device) && !res.remove(5, Tier::Device));
    let args = res.init_args();
    assert_eq!(
        args.resident,
        vec![
            (key(0, 0), Tier::Device),
            (key(0, 1), Tier::Device),
            (key(0, 2), Tier::Host)
        ]
    );
    assert_eq!(args.capacities[0].slots, 4);
    assert_eq!(args.capacities[1].slots, 2);
}

#[test]
fn the_event_log_hides_inserts_until_the_policy_hears_them() {
    let mut log = EventLog::new(4);
    log.push(EventKind::Access, Tier::Device, 1);
    log.push(EventKind::Insert, Tier::Device, 5);
    log.push(EventKind::Insert, Tier::Host, 6);
    assert!(log.unreported(Tier::Device).has(5) && !log.unreported(Tier::Device).has(6));
    assert!(log.unreported(Tier::Host).has(6));
    log.push(EventKind::Remove, Tier::Host, 6);
    assert!(
        !log.unreported(Tier::Host).has(6),
        "a removed resident is no candidate anyway"
    );
    let events = log.take();
    assert_eq!(events.len(), 4);
    assert_eq!(events[1].expert, key(1, 1));
    assert!(
        !log.unreported(Tier::Device).has(5),
        "told: a candidate from now on"
    );
    log.recycle(events);
    assert!(log.take().is_empty());
}

#[test]
fn rules_victims_and_prefetch_acceptance() {
    assert_eq!(victims_wanted(3, 5, 10), None, "fits");
    assert_eq!(victims_wanted(8, 5, 10), Some(3));
    assert_eq!(victims_wanted(8, 5, 2), Some(2), "no more than may go");
    assert_eq!(victims_wanted(8, 5, 0), None, "nothing may go: stream");
    assert_eq!(prefetch_cap(8, 3), 24);
    assert_eq!(prefetch_cap(8, 0), 8);
    let r = |layer, expert, tier, priority| PrefetchRequest {
        expert: key(layer, expert),
        tier,
        priority,
    };
    let reqs = vec![
        r(1, 0, Tier::Device, 1),
        r(1, 1, Tier::Device, 9),
        r(1, 1, Tier::Device, 3),
        r(1, 2, Tier::Device, 5),
        r(1, 3, Tier::Device, 5),
        r(0, 3, Tier::Host, 2),
        r(0, 2, Tier::Host, 2),
        r(0, 1, Tier::Host, 2),
    ];
    // (1, 3) is on the device already; (0, 2) is on the host and (0, 1) on the device.
    let on_device = |e: ExpertKey| e == key(1, 3) || e == key(0, 1);
    let on_host = |e: ExpertKey| e == key(0, 2);
    let a = accept_prefetches(reqs, 2, on_device, on_host);
    let device: Vec<(ExpertKey, u32)> = a.device.iter().map(|r| (r.expert, r.priority)).collect();
    assert_eq!(
        device,
        vec![(key(1, 1), 9), (key(1, 2), 5)],
        "by priority, once, capped"
    );
    let host: Vec<ExpertKey> = a.host.iter().map(|r| r.expert).collect();
    assert_eq!(host, vec![key(0, 3)]);
}

#[test]
fn loading_slots_and_pins_are_never_victims() {
    let mut s = State::new(shape(), 3, 2);
    let (bytes, w) = an_expert();
    let ready = |s: &mut State, e| {
        s.set_device(e, DeviceEntry::Ready(w.clone()));
        s.event(EventKind::Insert, Tier::Device, e);
    };
    ready(&mut s, key(0, 0));
    ready(&mut s, key(0, 1));
    s.set_device(
        key(1, 2),
        DeviceEntry::Loading(Arc::new(LoadCell::default())),
    );
    assert_eq!(s.device_len(), 3, "a loading slot is taken");
    let probe = State::request(Tier::Device, 0);
    assert_eq!(
        s.candidate_count(&probe),
        0,
        "inserts not yet told are no candidates"
    );
    s.log.take();
    assert_eq!(s.candidate_count(&probe), 2, "loading slots never are");
    assert_eq!(
        s.layer_tiers(1)[2],
        Tier::Disk,
        "a loading slot is not there yet"
    );
    assert_eq!(s.init_args(1).resident.len(), 2);
    s.pin(&[key(0, 1), key(1, 2)], true);
    assert_eq!(s.candidate_count(&probe), 1);
    assert_eq!(
        s.excluded(&probe),
        vec![key(0, 1)],
        "a ready pinned expert is excluded"
    );
    s.pin(&[key(0, 1), key(1, 2)], false);
    // Host requests leave out the experts being admitted instead.
    s.set_host(key(0, 3), bytes);
    s.log.take();
    s.mark_extra(&[key(0, 3)], true);
    let host = State::request(Tier::Host, 0);
    assert_eq!(s.candidate_count(&host), 0);
    assert_eq!(s.excluded(&host), vec![key(0, 3)]);
    s.mark_extra(&[key(0, 3)], false);
    assert_eq!(s.candidate_count(&host), 1);
    // A used prefetch counts once.
    s.mark_prefetched(key(0, 0));
    assert!(s.take_prefetched(key(0, 0)) && !s.take_prefetched(key(0, 0)));
    s.remove_device(key(1, 2));
    assert_eq!(s.device_len(), 2);
}

#[test]
fn a_newer_prefetch_answer_cancels_queued_jobs() {
    let q = Queue::default();
    let r = |expert, priority| PrefetchRequest {
        expert: key(0, expert),
        tier: Tier::Host,
        priority,
    };
    let first = q.newer();
    q.push([(r(0, 1), None), (r(1, 5), None), (r(2, 5), None)], first);
    let order: Vec<u32> = {
        let mut jobs = q.jobs.lock().unwrap();
        std::iter::from_fn(|| jobs.pop())
            .inspect(|j| assert!(!q.is_stale(j)))
            .map(|j| j.key.expert)
            .collect()
    };
    assert_eq!(
        order,
        vec![1, 2, 0],
        "highest priority first, then first asked"
    );
    q.push([(r(3, 1), None)], first);
    let second = q.newer();
    q.push([(r(4, 1), None)], second);
    let mut jobs = q.jobs.lock().unwrap();
    let stale: Vec<(u32, bool)> = std::iter::from_fn(|| jobs.pop())
        .map(|j| (j.key.expert, q.is_stale(&j)))
        .collect();
    assert_eq!(stale, vec![(3, true), (4, false)]);
}

/// Placement weighs a miss computed on this CPU at no more than its threads run the kernels
/// for the checkpoint's expert format (bf16 here), nor than the preset host's memory.
#[test]
fn placement_prices_cpu_misses_at_this_machines_kernel_rate() {
    let dir = crate::engine::bundled_model_dir();
    let cfg = crate::model::config::ModelConfig::from_dir(&dir).unwrap();
    let ckpt =
        Arc::new(crate::weights::checkpoint::Checkpoint::open(&dir, cfg.quantization()).unwrap());
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let config = super::StoreConfig {
            link: "h100-pcie5".into(),
            ..Default::default()
        };
        let store =
            pool.install(|| super::TieredExperts::new(ckpt.clone(), &cfg, &config).unwrap());
        let rate = threads as f64
            * crate::hardware::cpu_core_expert_gbps(crate::weights::format::WeightFormat::Bf16)
            * 1e9;
        assert_eq!(
            store.inner.costs.host_memory_bytes_per_second,
            rate.min(300e9),
            "{threads} threads"
        );
        // A host profile's measured rate for the format replaces the constant: per thread as
        // measured, times this pool's threads. A format it lacks keeps the constant.
        let profile = |format: &str| crate::hardware::HostProfile {
            version: crate::hardware::HostProfile::VERSION,
            threads: 4,
            cpu_expert_gbps: [(format.to_owned(), 2.0)].into_iter().collect(),
        };
        let with = |p| super::StoreConfig {
            link: "h100-pcie5".into(),
            host_profile: Some(p),
            ..Default::default()
        };
        let store = pool.install(|| {
            super::TieredExperts::new(ckpt.clone(), &cfg, &with(profile("bf16"))).unwrap()
        });
        assert_eq!(
            store.inner.costs.host_memory_bytes_per_second,
            threads as f64 * 0.5e9,
            "{threads} threads, measured"
        );
        let store = pool.install(|| {
            super::TieredExperts::new(ckpt.clone(), &cfg, &with(profile("fp8"))).unwrap()
        });
        assert_eq!(
            store.inner.costs.host_memory_bytes_per_second,
            rate.min(300e9),
            "{threads} threads, another format measured"
        );
    }
}
