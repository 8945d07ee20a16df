//! Breaks a policy call's cost at Kimi-K2 shape into raw plugin time and host validation.
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

fn main() {
    let args = k2_init_args();
    let n = 2000;
    let scores: Vec<f32> = (0..384)
        .map(|i| ((i * 7919) % 384) as f32 / 384.0)
        .collect();
    let residency = vec![Tier::Disk; 384];
    let mut sel = plugin("topk");
    Selection::init(&mut sel, &args).unwrap();
    let t0 = Instant::now();
    for l in 0..n {
        sel.select(l % 60, 1, 8, &scores, &residency).unwrap();
    }
    println!(
        "selection raw: {:.2} us/call",
        t0.elapsed().as_secs_f64() / n as f64 * 1e6
    );
    for cands in [0usize, 64, 1300] {
        let mut ev = plugin("lru");
        Eviction::init(&mut ev, &args).unwrap();
        let req = VictimRequest {
            tier: Tier::Device,
            count: 8,
            candidates: (0..cands as u32)
                .map(|i| ExpertKey {
                    layer: i % 60,
                    expert: i / 60,
                })
                .collect(),
        };
        let facts = StepFacts {
            step: 0,
            layer: 0,
            events: (0..24)
                .map(|i| Event {
                    kind: EventKind::Access,
                    tier: Tier::Device,
                    expert: ExpertKey {
                        layer: 0,
                        expert: i,
                    },
                })
                .collect(),
        };
        let t0 = Instant::now();
        for _ in 0..n {
            ev.on_step(&facts, if cands > 0 { Some(&req) } else { None })
                .unwrap();
        }
        println!(
            "eviction raw, {cands} candidates: {:.2} us/call",
            t0.elapsed().as_secs_f64() / n as f64 * 1e6
        );
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
    println!(
        "prefetch raw: {:.2} us/call",
        t0.elapsed().as_secs_f64() / n as f64 * 1e6
    );
}
