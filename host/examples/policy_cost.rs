//! Breaks a policy call's cost at Kimi-K2 shape into raw plugin time and the guard's share
//! (validation, the built-in policy's bookkeeping), for the bundled topk, lru and
//! next-layer-gate. `cargo run --release --example policy_cost`
use moehost::policy::check::k2_init_args;
use moehost::policy::wasm::{load_component, RuntimeLimits, WasmPolicy};
use moehost::policy::*;
use std::time::Instant;

fn plugin(name: &str) -> WasmPolicy {
    let src = PolicySource::parse(name);
    WasmPolicy::new(
        load_component(&src.bytes().unwrap(), name).unwrap(),
        RuntimeLimits::default(),
    )
}

fn us(t: Instant, n: usize) -> f64 {
    t.elapsed().as_secs_f64() / n as f64 * 1e6
}

fn main() {
    let mut args = k2_init_args();
    let n = 20_000;
    let mut x = 0x9e3779b97f4a7c15u64;
    let scores: Vec<f32> = (0..384)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect();
    let residency = vec![Tier::Disk; 384];
    let init = {
        let a = args.clone();
        move || a.clone()
    };

    let mut sel = plugin("topk");
    Selection::init(&mut sel, &args).unwrap();
    let t0 = Instant::now();
    for l in 0..n {
        sel.select(l as u32 % 60, 1, 8, &scores, &residency)
            .unwrap();
    }
    println!("selection raw:     {:.2} us/call", us(t0, n));
    let mut g = GuardedSelection::new(
        Some(Box::new(plugin("topk"))),
        "topk",
        "",
        3,
        moehost::policy::wasm::DEFAULT_MAX_SCORE_GAP,
    );
    g.init(&args).unwrap();
    let t0 = Instant::now();
    for l in 0..n {
        g.select(l as u32 % 60, 1, 8, &scores, &residency, &init);
    }
    println!("selection guarded: {:.2} us/call", us(t0, n));

    // A device tier of 1,300 residents; each call touches 8, evicts 8 and re-inserts them.
    let resident: Vec<ExpertKey> = (0..1300u32)
        .map(|i| ExpertKey {
            layer: i % 60,
            expert: i / 60,
        })
        .collect();
    args.resident = resident.iter().map(|k| (*k, Tier::Device)).collect();
    let candidates = CandidateList(resident.clone());
    let request = VictimRequest {
        tier: Tier::Device,
        count: 8,
        only_layer: None,
        excluded: &[],
        candidates: &candidates,
    };
    let access = |i: u32| Event {
        kind: EventKind::Access,
        tier: Tier::Device,
        expert: resident[(i * 37 % 1300) as usize],
    };
    for guarded in [false, true] {
        let mut raw = plugin("lru");
        let mut g = GuardedEviction::new(Some(Box::new(plugin("lru"))), "lru", "", 3);
        if guarded {
            g.init(&args).unwrap();
        } else {
            Eviction::init(&mut raw, &args).unwrap();
        }
        let mut back: Vec<ExpertKey> = Vec::new();
        let t0 = Instant::now();
        for s in 0..n as u32 {
            let mut events: Vec<Event> = (0..8).map(|i| access(s * 8 + i)).collect();
            events.extend(back.iter().map(|&expert| Event {
                kind: EventKind::Insert,
                tier: Tier::Device,
                expert,
            }));
            let facts = StepFacts {
                step: s as u64,
                layer: s % 60,
                events,
            };
            back = if guarded {
                g.on_step(&facts, Some(&request), &|| args.clone())
            } else {
                raw.on_step(&facts, Some(&request)).unwrap()
            };
        }
        let what = if guarded { "guarded" } else { "raw    " };
        println!("eviction {what}:  {:.2} us/call", us(t0, n));
    }

    let mut pf = plugin("next-layer-gate");
    let info = Prefetch::init(&mut pf, &args).unwrap();
    let step = RoutedStep {
        step: 0,
        layer: 0,
        tokens: 1,
        experts: (0..8).collect(),
        outlook: (0..info.lookahead)
            .map(|l| Outlook {
                layer: l + 1,
                scores: scores.clone(),
                residency: residency.clone(),
            })
            .collect(),
    };
    let t0 = Instant::now();
    for _ in 0..n {
        pf.on_routed(&step).unwrap();
    }
    println!("prefetch raw:      {:.2} us/call", us(t0, n));
}
