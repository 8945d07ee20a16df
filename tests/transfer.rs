//! The transfer scheduler and hybrid placement against a simulated device: the same scheduler
//! code the CUDA copy engine runs, over a fake copy engine with a configurable bandwidth whose
//! device slots fill chunk by chunk while a copy runs.

use moehost::policy::builtin::CostModel;
use moehost::policy::{ExpertKey, LinkCosts, Place, PlacementRequest, Tier};
use moehost::transfer::{measure_bandwidth, CopyEngine, SimulatedLink, TransferScheduler};
use std::time::{Duration, Instant};

const SLOT: usize = 256 * 1024;

fn key(e: u32) -> ExpertKey {
    ExpertKey {
        layer: 0,
        expert: e,
    }
}

/// A distinct byte pattern per expert.
fn pattern(e: u32) -> Vec<u8> {
    (0..SLOT)
        .map(|i| (i as u32 * 31 + e * 7 + 1) as u8)
        .collect()
}

/// `host` staged slots (slot i holds expert i), `device` slots, a link of `mb_s` MB/s.
fn link(host: usize, device: usize, mb_s: f64) -> SimulatedLink {
    let l = SimulatedLink::new(SLOT, host, device, mb_s * 1e6, Duration::from_micros(200));
    for e in 0..host {
        l.stage(e, &[&pattern(e as u32)]).unwrap();
    }
    l
}

#[test]
fn compute_never_reads_an_expert_before_its_copy_completed() {
    // 20 MB/s: one 256 KiB copy takes ~13 ms, plenty of time to catch a torn read.
    let sched = TransferScheduler::new(link(8, 4, 20.0), 2);
    for e in 0..4 {
        assert!(sched.prefetch(key(e), e as usize, 10 - e).unwrap());
    }
    for e in 0..4 {
        let pinned = sched.demand(key(e), e as usize).unwrap();
        let bytes = sched.engine().read_device(pinned.slot).unwrap();
        assert!(
            bytes == pattern(e),
            "expert {e} read before its copy completed"
        );
    }
    // The tier is full: a cold expert needs an eviction first; a pinned one cannot go.
    let held = sched.demand(key(0), 0).unwrap();
    assert!(sched.demand(key(5), 5).is_err());
    assert!(!sched.evict(key(0)), "a pinned expert was evicted");
    drop(held);
    assert!(sched.evict(key(0)));
    let pinned = sched.demand(key(5), 5).unwrap();
    assert!(sched.engine().read_device(pinned.slot).unwrap() == pattern(5));
    let st = sched.stats();
    assert_eq!(st.copies, 5);
    assert_eq!(st.demand_cold, 1, "{st:?}");
}

#[test]
fn a_demand_load_overtakes_queued_prefetches_and_waits_only_for_its_own_copy() {
    // Window 1: one copy on the "stream" at a time; 12 prefetches queued (~160 ms of copies).
    let sched = TransferScheduler::new(link(16, 16, 20.0), 1);
    for e in 0..12 {
        sched.prefetch(key(e), e as usize, 1).unwrap();
    }
    let one_copy = SLOT as f64 / 20e6;
    let t0 = Instant::now();
    let pinned = sched.demand(key(11), 11).unwrap();
    let waited = t0.elapsed().as_secs_f64();
    assert!(sched.engine().read_device(pinned.slot).unwrap() == pattern(11));
    // It waited for the copy in flight and its own, not for the 10 queued ahead of it.
    assert!(
        waited < 6.0 * one_copy,
        "waited {waited:.3}s, one copy takes {one_copy:.3}s"
    );
    assert!(
        !sched.is_ready(key(10)),
        "the queue was drained before the demand load"
    );
    // Prefetches still queued are cancelled by a newer prediction; their slots are free.
    sched.cancel_queued();
    let st = sched.stats();
    assert!(st.cancelled >= 5, "{st:?}");
    assert_eq!(st.demand_in_flight, 1, "{st:?}");
    for e in 12..16 {
        assert!(
            sched.prefetch(key(e), e as usize, 1).unwrap(),
            "slot not freed"
        );
    }
}

#[test]
fn the_cost_model_computes_on_the_cpu_when_the_measured_link_is_slow() {
    // Kimi-K2's expert (hidden 7168, intermediate 2048, FP8: 44 MB) on an H100 host, with the
    // link bandwidth measured on the simulated device instead of the preset's 54.8 GB/s.
    let l = link(4, 4, 50.0);
    let measured = measure_bandwidth(&l, 4).unwrap();
    assert!(
        (measured / 50e6 - 1.0).abs() < 0.35,
        "measured {measured:.0} B/s on a 50 MB/s link"
    );
    let place = |link_bytes_per_second: f64, tokens: u32| {
        let costs = LinkCosts {
            link_bytes_per_second,
            ..LinkCosts::preset("h100-pcie5", 7168, 2048).unwrap()
        };
        let experts = [key(0)];
        let r = PlacementRequest {
            layer: 0,
            experts: &experts,
            tokens: &[tokens],
            tiers: &[Tier::Host],
            free_device_slots: 0,
            expert_bytes: 44_050_944,
            costs,
        };
        CostModel::decide(&r)[0]
    };
    assert_eq!(place(measured, 1), Place::Host);
    assert_eq!(
        place(measured, 512),
        Place::Host,
        "a 50 MB/s link never pays"
    );
    // On the real PCIe Gen5 figure a large batch is worth the copy, one token is not.
    assert_eq!(place(54.8e9, 1), Place::Host);
    assert_eq!(place(54.8e9, 512), Place::Device);
}

/// The GPU suite: the same scheduler over the CUDA copy engine (pinned slab, copy stream,
/// events). Built with `--features cuda`; it runs where a driver and a device are present and
/// says why it skipped elsewhere.
#[cfg(feature = "cuda")]
#[test]
fn gpu_copies_through_the_scheduler_complete_before_compute_reads_them() {
    use moehost::transfer::cuda::{probe, CudaCopyEngine};
    let (ctx, info) = match probe() {
        Ok(found) => found,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    eprintln!("device: {info:?}");
    // 16 MiB slots: each copy takes long enough at ~50 GB/s that a torn read would show.
    let slot = 16usize << 20;
    let engine = CudaCopyEngine::new(ctx, slot, 8, 4, true).unwrap();
    let pat = |e: u32| -> Vec<u8> {
        (0..slot)
            .map(|i| (i as u32 * 131 + e * 17 + 3) as u8)
            .collect()
    };
    for e in 0..8 {
        engine.stage(e as usize, &[&pat(e)]).unwrap();
    }
    let sched = TransferScheduler::new(engine, 2);
    for e in 0..4 {
        assert!(sched.prefetch(key(e), e as usize, 1).unwrap());
    }
    for e in 0..4 {
        let p = sched.demand(key(e), e as usize).unwrap();
        assert!(
            sched.engine().read_device(p.slot).unwrap() == pat(e),
            "expert {e}"
        );
    }
    // Restaging a host slot waits for the copy reading it; the new bytes arrive intact.
    assert!(sched.evict(key(0)));
    sched.engine().stage(4, &[&pat(40)]).unwrap();
    let p = sched.demand(key(4), 4).unwrap();
    assert!(sched.engine().read_device(p.slot).unwrap() == pat(40));
    let bw = measure_bandwidth(sched.engine(), 8).unwrap();
    eprintln!("pinned host->device: {:.1} GB/s", bw / 1e9);
    assert!(bw > 1e9, "{bw} B/s: pinned copies should run at PCIe speed");
}
