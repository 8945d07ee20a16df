//! The replay lab on real routing (tests/data/traces/decode-batch1.safetensors, copied from the
//! tiny-k2 traces) and on random traces: the reference hit rates, Belady as the bound (and
//! equal to an exhaustive optimum on tiny cases), LRU against a brute-force reference, plugins
//! against native code, prefetch and host-tier accounting, determinism, the CLI; and how the
//! shipped policies generalise to a real model they were not written for (FLAME-MoE-290M,
//! tests/data/traces/flame-moe-290m.safetensors, imported from ../shared/traces).

mod support;

use support::{assert_ok, batch1_path, moehost};

use moehost::policy::wasm::RuntimeLimits;
use moehost::replay::cost::{estimate, Link};
use moehost::replay::sweep::{run_job, EvictionSpec, Job, PrefetchSpec, ReplayConfig};
use moehost::replay::{Capacity, Counters, Schedule};
use moehost::trace::{Trace, TraceMeta};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

fn batch1() -> &'static Schedule {
    static S: OnceLock<Schedule> = OnceLock::new();
    S.get_or_init(|| Schedule::from_trace("decode-batch1", &Trace::load(&batch1_path()).unwrap()))
}

fn limits() -> RuntimeLimits {
    moehost::replay::sweep::replay_limits()
}

/// Compiled once per test binary.
fn spec(name: &str) -> EvictionSpec {
    static SPECS: OnceLock<std::sync::Mutex<BTreeMap<String, EvictionSpec>>> = OnceLock::new();
    let m = SPECS.get_or_init(Default::default);
    let mut m = m.lock().unwrap();
    m.entry(name.to_owned())
        .or_insert_with(|| EvictionSpec::load(name).unwrap())
        .clone()
}

fn prefetch(name: &str) -> PrefetchSpec {
    PrefetchSpec::load(name).unwrap()
}

fn job(eviction: EvictionSpec, capacity: u32) -> Job {
    Job {
        trace: 0,
        capacity,
        host_capacity: None,
        eviction,
        prefetch: None,
    }
}

fn replay(s: &Schedule, j: &Job, per_layer: bool) -> Counters {
    let r = run_job(s, j, per_layer, s.expert_bytes.max(1), limits()).unwrap();
    if let Some(st) = &r.eviction_stats {
        assert_eq!(st.fallbacks, 0, "eviction plugin failed: {st:?}");
    }
    r.counters
}

fn rate(c: &Counters) -> f64 {
    c.hits as f64 / c.accesses as f64
}

// ---------------------------------------------------------------------------------------------
// An independent reference: the replay semantics written out plainly, with an LRU.

/// (layer, expert) visits of a trace, computed without `Schedule`.
fn visits(t: &Trace) -> Vec<Vec<(u32, u32)>> {
    let mut by_step: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
    for (tok, &s) in t.step.iter().enumerate() {
        by_step.entry(s).or_default().push(tok);
    }
    let mut out = Vec::new();
    for toks in by_step.values() {
        for l in 0..t.layers() {
            let set: BTreeSet<(u32, u32)> = toks
                .iter()
                .flat_map(|&tok| t.row(tok, l).iter())
                .filter(|&&x| x >= 0)
                .map(|&x| (l as u32, x as u32))
                .collect();
            if !set.is_empty() {
                out.push(set.into_iter().collect());
            }
        }
    }
    out
}

/// Brute-force LRU replay: a recency list (front = least recent). Accesses touch in ascending
/// order when the visit's facts are delivered; inserted misses are touched at the next
/// delivery, before that visit's accesses (`touch_inserts = false`: recency by accesses only).
fn brute_lru(t: &Trace, cap: usize, per_layer: bool, touch_inserts: bool) -> u64 {
    let mut recency: Vec<(u32, u32)> = Vec::new();
    let mut resident: Vec<(u32, u32)> = Vec::new();
    let mut pending: Vec<(u32, u32)> = Vec::new();
    let mut hits = 0u64;
    let touch = |r: &mut Vec<(u32, u32)>, k: (u32, u32)| {
        r.retain(|&x| x != k);
        r.push(k);
    };
    for keys in visits(t) {
        if touch_inserts {
            for k in pending.drain(..) {
                touch(&mut recency, k);
            }
        }
        pending.clear();
        for &k in &keys {
            touch(&mut recency, k);
        }
        let layer = keys[0].0;
        let in_pool = |k: &(u32, u32)| !per_layer || k.0 == layer;
        let misses: Vec<(u32, u32)> = keys
            .iter()
            .copied()
            .filter(|k| !resident.contains(k))
            .collect();
        hits += (keys.len() - misses.len()) as u64;
        let used = resident.iter().filter(|k| in_pool(k)).count();
        let need = (used + misses.len()).saturating_sub(cap);
        if need > 0 {
            let victims: Vec<(u32, u32)> = recency
                .iter()
                .copied()
                .filter(|k| resident.contains(k) && in_pool(k) && !keys.contains(k))
                .take(need)
                .collect();
            resident.retain(|k| !victims.contains(k));
        }
        let room = cap - resident.iter().filter(|k| in_pool(k)).count();
        for &k in misses.iter().take(room) {
            resident.push(k);
            pending.push(k);
        }
    }
    hits
}

/// The best any eviction choice can do: exhaustive search over every victim set, memoised on
/// (visit, resident set). Tiny traces only (at most 32 experts).
fn optimum(t: &Trace, cap: usize, per_layer: bool) -> u64 {
    let e = t.meta.n_routed_experts;
    let vs: Vec<Vec<u32>> = visits(t)
        .into_iter()
        .map(|v| v.into_iter().map(|(l, x)| l * e + x).collect())
        .collect();
    assert!(t.layers() as u32 * e <= 32);
    fn go(
        vs: &[Vec<u32>],
        i: usize,
        resident: u32,
        cap: usize,
        pool_mask: &dyn Fn(u32) -> u32,
        memo: &mut std::collections::HashMap<(usize, u32), u64>,
    ) -> u64 {
        if i == vs.len() {
            return 0;
        }
        if let Some(&m) = memo.get(&(i, resident)) {
            return m;
        }
        let keys = &vs[i];
        let pool = pool_mask(keys[0]);
        let pinned: u32 = keys.iter().map(|&k| 1u32 << k).sum();
        let misses: Vec<u32> = keys
            .iter()
            .copied()
            .filter(|&k| resident >> k & 1 == 0)
            .collect();
        let hits = (keys.len() - misses.len()) as u64;
        let used = (resident & pool).count_ones() as usize;
        let need = (used + misses.len()).saturating_sub(cap);
        let cands: Vec<u32> = (0..32)
            .filter(|&k| (resident & pool & !pinned) >> k & 1 == 1)
            .collect();
        let count = need.min(cands.len());
        let mut best = 0;
        for mask in 0u32..(1 << cands.len()) {
            if mask.count_ones() as usize != count {
                continue;
            }
            let mut r = resident;
            for (j, &c) in cands.iter().enumerate() {
                if mask >> j & 1 == 1 {
                    r &= !(1 << c);
                }
            }
            let room = cap - (r & pool).count_ones() as usize;
            for &k in misses.iter().take(room) {
                r |= 1 << k;
            }
            best = best.max(go(vs, i + 1, r, cap, pool_mask, memo));
        }
        memo.insert((i, resident), hits + best);
        hits + best
    }
    let n = t.layers() as u32 * e;
    let all = if n == 32 { u32::MAX } else { (1u32 << n) - 1 };
    let pool_mask = move |k: u32| -> u32 {
        if per_layer {
            let l = k / e;
            (((1u64 << e) - 1) as u32) << (l * e)
        } else {
            all
        }
    };
    go(&vs, 0, 0, cap, &pool_mask, &mut Default::default())
}

/// A random trace: `layers` x `experts`, top-`k`, `steps` of 1..=`max_tokens` tokens.
fn random_trace(layers: u32, experts: u32, k: u32, rows: &[(u8, Vec<u32>)]) -> Trace {
    let mut step = Vec::new();
    let mut ex = Vec::new();
    let mut s = 0i32;
    let per_token = (layers * k) as usize;
    for (new_step, choice) in rows {
        if *new_step % 2 == 0 && !step.is_empty() {
            s += 1;
        }
        step.push(s);
        // Distinct experts per (token, layer), ascending, from the random picks.
        for l in 0..layers as usize {
            let mut picked: Vec<i32> = Vec::new();
            for j in 0..k as usize {
                let x = (choice[(l * k as usize + j) % per_token] % experts) as i32;
                if !picked.contains(&x) {
                    picked.push(x);
                }
            }
            picked.sort_unstable();
            picked.resize(k as usize, -1);
            ex.extend(picked);
        }
    }
    let n = step.len();
    Trace {
        meta: TraceMeta {
            model: "random".into(),
            kind: "test".into(),
            n_routed_experts: experts,
            moe_layers: (1..=layers).collect(),
            k,
            expert_bytes: 1000,
            how: "proptest".into(),
            extra: BTreeMap::new(),
        },
        weights: vec![0.5; ex.len()],
        experts: ex,
        step,
        doc: vec![0; n],
        token_ids: None,
        speculative: None,
    }
}

fn arb_trace(max_layers: u32, max_experts: u32, max_tokens: usize) -> impl Strategy<Value = Trace> {
    (1..=max_layers, 2..=max_experts, 1u32..=3).prop_flat_map(move |(l, e, k)| {
        let k = k.min(e);
        prop::collection::vec(
            (
                any::<u8>(),
                prop::collection::vec(0u32..64, (l * k) as usize),
            ),
            1..=max_tokens,
        )
        .prop_map(move |rows| random_trace(l, e, k, &rows))
    })
}

// ---------------------------------------------------------------------------------------------
// The reference figures

#[test]
fn reference_figures_of_decode_batch1() {
    let s = batch1();
    assert_eq!(s.tokens, 3200);
    assert_eq!(s.steps, 20 * 129);
    assert_eq!(s.accesses(), 114_251);
    // Global pool of C of 448 experts: (C, Belady hits, lru-plugin hits).
    let want = [
        (22, 33_212, 0),
        (44, 56_043, 29_524),
        (112, 87_358, 60_799),
        (224, 106_589, 93_544),
    ];
    // The notes' table, 3 decimals: Belady 0.291 / 0.491 / 0.765 / 0.933; LRU 0.000 / 0.258 /
    // 0.533 / 0.819 (0.533 is LRU ranked by accesses only; the lru plugin, which an insert
    // also touches, gives 0.532 there: both are checked below).
    let belady_3 = [0.291, 0.491, 0.765, 0.933];
    let lru_3 = [0.000, 0.258, 0.532, 0.819];
    let t = Trace::load(&batch1_path()).unwrap();
    for (i, &(c, belady_hits, lru_hits)) in want.iter().enumerate() {
        let b = replay(s, &job(EvictionSpec::Belady, c), false);
        let l = replay(s, &job(spec("lru"), c), false);
        assert_eq!(b.hits, belady_hits, "Belady at C={c}");
        assert_eq!(l.hits, lru_hits, "lru at C={c}");
        assert_eq!(format!("{:.3}", rate(&b)), format!("{:.3}", belady_3[i]));
        assert_eq!(format!("{:.3}", rate(&l)), format!("{:.3}", lru_3[i]));
        // The plugin replay equals the brute-force reference.
        assert_eq!(brute_lru(&t, c as usize, false, true), lru_hits, "C={c}");
    }
    let access_only = brute_lru(&t, 112, false, false) as f64 / 114_251.0;
    assert_eq!(format!("{access_only:.3}"), "0.533");
}

#[test]
fn plugins_equal_native_code_on_real_routing() {
    let s = batch1();
    let t = Trace::load(&batch1_path()).unwrap();
    for per_layer in [false, true] {
        let caps: &[u32] = if per_layer {
            &[3, 6, 16]
        } else {
            &[22, 70, 200]
        };
        for &c in caps {
            let wasm = replay(s, &job(spec("lru"), c), per_layer);
            let native = replay(s, &job(spec("native-lru"), c), per_layer);
            assert_eq!(wasm, native, "C={c} per_layer={per_layer}");
            assert_eq!(
                brute_lru(&t, c as usize, per_layer, true),
                wasm.hits,
                "C={c} per_layer={per_layer}"
            );
            let b = replay(s, &job(EvictionSpec::Belady, c), per_layer);
            for p in ["lfu", "layer-cycle"] {
                let r = replay(s, &job(spec(p), c), per_layer);
                assert!(b.hits >= r.hits, "{p} beat Belady at C={c}");
                assert_eq!(r.accesses, b.accesses);
            }
            assert!(b.hits >= wasm.hits);
        }
    }
}

#[test]
fn host_tier_is_driven_through_the_policy() {
    let s = batch1();
    for (c, h) in [(44, 60), (112, 150)] {
        let mut j = job(spec("lru"), c);
        j.host_capacity = Some(h);
        let wasm = replay(s, &j, false);
        let mut j2 = j.clone();
        j2.eviction = spec("native-lru");
        assert_eq!(wasm, replay(s, &j2, false));
        // Every device load is a host hit or a disk read; the host tier evicted something.
        assert_eq!(wasm.host_hits + wasm.host_misses, wasm.demand_loads);
        assert!(wasm.host_evictions > 0 && wasm.host_hits > 0 && wasm.host_misses > 0);
        let mut jb = j.clone();
        jb.eviction = EvictionSpec::Belady;
        let b = replay(s, &jb, false);
        assert!(b.hits >= wasm.hits);
        // Without a host limit nothing is read from disk.
        let free = replay(s, &job(spec("lru"), c), false);
        assert_eq!(free.host_misses, 0);
        assert_eq!(
            free.hits, wasm.hits,
            "the host tier does not change device hits for LRU"
        );
    }
}

#[test]
fn prefetch_accounting_and_the_oracle() {
    let s = batch1();
    for c in [44u32, 112] {
        let b = replay(s, &job(EvictionSpec::Belady, c), false);
        let o = replay(s, &job(EvictionSpec::Oracle, c), false);
        assert_eq!(o.accesses, b.accesses);
        assert_eq!(
            o.hits,
            o.accesses - b.streamed,
            "every cached load is prefetched"
        );
        assert_eq!(
            o.prefetch_loads + o.demand_loads,
            b.demand_loads,
            "Belady's loads"
        );
        assert_eq!(o.prefetch_used, o.prefetch_issued);

        let mut j = job(spec("lru"), c);
        j.prefetch = Some(prefetch("transitions"));
        let r = replay(s, &j, false);
        assert!(r.prefetch_issued > 0);
        assert_eq!(r.prefetch_used + r.prefetch_wasted, r.prefetch_issued);
        assert_eq!(r.hits + r.misses, r.accesses);
        assert!(o.hits >= r.hits);
        // next-layer-gate needs speculative scores, which this trace has not: it never asks.
        j.prefetch = Some(prefetch("next-layer-gate"));
        let g = replay(s, &j, false);
        assert_eq!(g.prefetch_issued, 0);
        assert_eq!(g, replay(s, &job(spec("lru"), c), false));
    }
}

#[test]
fn cost_model_matches_the_notes() {
    // A Kimi-K2 decode token that misses all 480 routed experts moves 21.1 GB: 0.39 s over
    // PCIe Gen5 (54.8 GB/s), about 2.6 tokens/s.
    let c = Counters {
        accesses: 480,
        misses: 480,
        demand_loads: 480,
        ..Default::default()
    };
    let k2 = moehost::replay::K2_FP8_EXPERT_BYTES;
    let e = estimate(&c, 1, k2, &Link::default());
    assert_eq!(e.bytes_moved, 480 * 44_050_944);
    assert!((e.stall_ms_per_token - 385.9).abs() < 0.5, "{e:?}");
    assert!((e.tokens_per_s - 2.55).abs() < 0.02, "{e:?}");
    // All hits: only HBM reads, 21.1 GB / 3.35 TB/s.
    let hit = Counters {
        accesses: 480,
        hits: 480,
        ..Default::default()
    };
    let e = estimate(&hit, 1, k2, &Link::default());
    assert_eq!(e.stall_ms_per_token, 0.0);
    assert!((e.tokens_per_s - 158.4).abs() < 0.5, "{e:?}");
    // Disk reads add NVMe time; prefetches hide behind the HBM time.
    let disk = Counters {
        demand_disk_loads: 480,
        ..c.clone()
    };
    let gen5 = Link::preset("h100-pcie5-nvme5").unwrap();
    let slow = estimate(&disk, 1, k2, &Link::default()).stall_ms_per_token;
    let fast = estimate(&disk, 1, k2, &gen5).stall_ms_per_token;
    assert!(
        (slow - fast - (480.0 * 44_050_944.0 / 7e9 - 480.0 * 44_050_944.0 / 14e9) * 1e3).abs()
            < 1e-6
    );
    let pf = Counters {
        accesses: 480,
        hits: 480,
        prefetch_loads: 1,
        ..Default::default()
    };
    assert_eq!(estimate(&pf, 1, k2, &Link::default()).stall_s, 0.0);
    assert!(Link::preset("nope").is_err());
}

// ---------------------------------------------------------------------------------------------
// Properties on random traces

/// Distinct experts of the largest (step, layer).
fn max_visit(s: &Schedule) -> u32 {
    s.visits.iter().map(|v| v.len() as u32).max().unwrap_or(0)
}

fn pool(s: &Schedule, per_layer: bool) -> u32 {
    if per_layer {
        s.experts_per_layer
    } else {
        s.layers * s.experts_per_layer
    }
}

/// A capacity between the largest visit and the pool (`frac` in [0, 1]): no visit overflows the
/// cache, the regime in which Belady's MIN is the optimum.
fn fitting(s: &Schedule, per_layer: bool, frac: f64) -> u32 {
    let (lo, hi) = (max_visit(s), pool(s, per_layer));
    lo + ((hi - lo) as f64 * frac) as u32
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(300))]

    /// LRU (native) equals the brute-force reference at any capacity; Belady never loses to it
    /// when no visit overflows the cache.
    #[test]
    fn lru_matches_brute_force(t in arb_trace(3, 8, 40), cap in 1u32..12, per_layer in any::<bool>()) {
        let s = Schedule::from_trace("random", &t);
        let cap = cap.min(pool(&s, per_layer));
        let lru = replay(&s, &job(spec("native-lru"), cap), per_layer);
        prop_assert_eq!(lru.hits, brute_lru(&t, cap as usize, per_layer, true));
        let b = replay(&s, &job(EvictionSpec::Belady, cap), per_layer);
        prop_assert_eq!(b.hits + b.misses, b.accesses);
        // Streamed accesses depend on the visits' sizes only, not on the policy.
        prop_assert_eq!(b.streamed, lru.streamed);
        if b.streamed == 0 {
            prop_assert!(b.hits >= lru.hits);
        }
    }

    /// Belady is the optimum: equal to an exhaustive search over every eviction choice.
    #[test]
    fn belady_is_optimal(t in arb_trace(2, 4, 9), frac in 0.0..1.0f64, per_layer in any::<bool>()) {
        let s = Schedule::from_trace("random", &t);
        let cap = fitting(&s, per_layer, frac);
        let b = replay(&s, &job(EvictionSpec::Belady, cap), per_layer);
        prop_assert_eq!(b.hits, optimum(&t, cap as usize, per_layer));
    }
}

proptest! {
    #![proptest_config(config(32))]

    /// Belady's hits >= every shipped eviction plugin's; the oracle prefetch >= every prefetch
    /// combination; prefetch accounting adds up.
    #[test]
    fn belady_bounds_every_plugin(t in arb_trace(4, 16, 60), frac in 0.0..1.0f64, per_layer in any::<bool>()) {
        let s = Schedule::from_trace("random", &t);
        let cap = fitting(&s, per_layer, frac);
        let b = replay(&s, &job(EvictionSpec::Belady, cap), per_layer);
        let o = replay(&s, &job(EvictionSpec::Oracle, cap), per_layer);
        prop_assert!(o.hits >= b.hits);
        prop_assert_eq!(o.hits, o.accesses);
        for p in ["lru", "lfu", "layer-cycle", "native-lru"] {
            let r = replay(&s, &job(spec(p), cap), per_layer);
            prop_assert!(b.hits >= r.hits, "{} {} > belady {}", p, r.hits, b.hits);
            let mut j = job(spec(p), cap);
            j.prefetch = Some(prefetch("transitions"));
            let r = replay(&s, &j, per_layer);
            prop_assert_eq!(r.hits + r.misses, r.accesses);
            prop_assert_eq!(r.prefetch_used + r.prefetch_wasted, r.prefetch_issued);
            prop_assert!(o.hits >= r.hits);
        }
    }
}

/// When a (step, layer) routes to more experts than the cache holds, the overflow streams
/// through uncached, and Belady's rule (with its lowest-key tie-break) is no longer the
/// optimum: experts 1 and 2 are both next used at visit 2, where only three of its four
/// experts fit; Belady evicts 1 (the lower id), the optimum evicts 2 and keeps 1 for visit 3.
/// Proptest found this case; the docs state the limit.
#[test]
fn belady_is_not_the_optimum_when_visits_overflow() {
    let rows: [(i32, [i32; 2]); 6] = [
        (0, [1, -1]),
        (0, [2, 3]),
        (1, [0, 3]),
        (2, [2, 3]),
        (2, [0, 1]),
        (3, [1, -1]),
    ];
    let mut t = random_trace(1, 4, 2, &[]);
    for (step, ex) in rows {
        t.step.push(step);
        t.doc.push(0);
        t.experts.extend(ex);
        t.weights.extend([0.5, 0.5]);
    }
    t.validate().unwrap();
    let s = Schedule::from_trace("overflow", &t);
    let b = replay(&s, &job(EvictionSpec::Belady, 3), false);
    assert_eq!((b.hits, b.streamed), (4, 1));
    assert_eq!(optimum(&t, 3, false), 5);
}

// ---------------------------------------------------------------------------------------------
// Determinism and the sweep

fn sweep_config() -> ReplayConfig {
    ReplayConfig {
        traces: vec![batch1_path()],
        evictions: vec!["lru".into(), "lfu".into(), "layer-cycle".into()],
        prefetches: vec!["none".into(), "transitions".into()],
        capacities: vec![
            Capacity::Percent(5.0),
            Capacity::Slots(100),
            Capacity::Percent(50.0),
        ],
        ..Default::default()
    }
}

#[test]
fn sweeps_are_identical_run_to_run_and_thread_count() {
    let cfg = sweep_config();
    let a = moehost::replay::run(&cfg).unwrap();
    let b = moehost::replay::run(&cfg).unwrap();
    assert_eq!(a, b);
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let c = one.install(|| moehost::replay::run(&cfg).unwrap());
    assert_eq!(a, c);
    // 3 capacities x (Belady + oracle + 3 evictions x 2 prefetch policies).
    assert_eq!(a.len(), 3 * (2 + 3 * 2));
    assert_eq!(a[0].policy, "belady");
    assert_eq!(a[1].policy, "oracle-prefetch");
    assert_eq!(a[2].policy, "lru+none");
    assert_eq!(a[0].capacity, 22);
    assert_eq!(a[8].capacity, 100);
    for (i, r) in a.iter().enumerate() {
        // Demand paging never beats Belady; with prefetch (a prefetched hit is not a demand
        // hit) the bound is the oracle prefetch row of the same capacity.
        let block = i / 8 * 8;
        if r.prefetch == "none" {
            assert!(r.hit_rate <= r.belady_hit_rate, "{r:?}");
        } else {
            assert!(r.hit_rate <= a[block + 1].hit_rate, "{r:?}");
        }
        assert_eq!(r.policy_fallbacks, 0);
    }
    // LRU + transitions beats Belady's hit rate at 5% by prefetching, and pays in bytes.
    let (b, t) = (&a[0], &a[3]);
    assert_eq!(t.policy, "lru+transitions");
    assert!(t.hit_rate > b.hit_rate && t.bytes_moved > b.bytes_moved);
}

// ---------------------------------------------------------------------------------------------
// Generalisation: the shipped policies on FLAME-MoE-290M (64 experts, top-6 softmax) and tiny-k2

fn flame_path() -> std::path::PathBuf {
    support::data_dir().join("traces/flame-moe-290m.safetensors")
}

#[test]
fn prefetch_pairs_beat_the_demand_paging_bound_on_real_traces() {
    // Belady is the bound of any eviction policy without prefetch. layer-cycle +
    // next-layer-fill must beat it at 10% and 25% resident on both real traces; the default
    // pair (layer-cycle + next-layer-blend) prefetches only what it is confident of, so most of
    // its prefetches are used; every eviction policy alone stays under the bound.
    let cfg = ReplayConfig {
        traces: vec![flame_path()],
        held_out: vec![batch1_path()],
        evictions: vec!["lru".into(), "lfu".into(), "layer-cycle".into()],
        prefetches: vec![
            "none".into(),
            "next-layer-blend".into(),
            "next-layer-fill".into(),
        ],
        capacities: vec![Capacity::Percent(10.0), Capacity::Percent(25.0)],
        ..Default::default()
    };
    let rows = moehost::replay::run(&cfg).unwrap();
    for trace in ["flame-moe-290m", "decode-batch1"] {
        for cap in [0.10, 0.25] {
            let at: Vec<_> = rows
                .iter()
                .filter(|r| r.trace == trace && (r.resident_fraction - cap).abs() < 0.01)
                .collect();
            let row = |policy: &str| *at.iter().find(|r| r.policy == policy).unwrap();
            let belady = row("belady").hit_rate;
            assert!(belady > 0.4, "{trace} {cap}: {belady}");
            for r in &at {
                assert_eq!(r.policy_fallbacks, 0, "{r:?}");
                if r.prefetch == "none" {
                    assert!(r.hit_rate <= belady, "{r:?}");
                }
            }
            let fill = row("layer-cycle+next-layer-fill");
            assert!(
                fill.hit_rate > belady,
                "{trace} at {cap}: {} vs Belady {belady}",
                fill.hit_rate
            );
            let blend = row("layer-cycle+next-layer-blend");
            let alone = row("layer-cycle+none");
            assert!(blend.hit_rate > alone.hit_rate, "{blend:?}");
            assert!(fill.hit_rate > blend.hit_rate, "{fill:?}");
            assert!(
                blend.prefetch_used * 3 > blend.prefetch_issued * 2,
                "{blend:?}"
            );
            assert!(fill.prefetch_issued > blend.prefetch_issued, "{fill:?}");
        }
    }
    // The summary keeps the two sets apart and is the geometric mean of the rows' ratios.
    let summary = moehost::replay::summary::summarize(&rows);
    let find = |policy: &str, set: &str, capacity: Option<&str>| {
        summary
            .iter()
            .find(|s| s.policy == policy && s.set == set && s.capacity.as_deref() == capacity)
            .unwrap_or_else(|| panic!("{policy} {set} {capacity:?}: {summary:?}"))
            .clone()
    };
    assert!(summary.iter().all(|s| s.policy != "belady"));
    let all = find("layer-cycle+none", "tuned", None);
    assert_eq!((all.rows, all.left_out), (2, 0));
    let ratios: Vec<f64> = rows
        .iter()
        .filter(|r| r.policy == "layer-cycle+none" && !r.held_out)
        .map(|r| r.vs_belady)
        .collect();
    let want = (ratios[0] * ratios[1]).sqrt();
    assert!((all.geomean_vs_belady.unwrap() - want).abs() < 1e-12);
    // 10% is 51 of FLAME's 512 experts and 44 of tiny-k2's 448: one column all the same.
    let held = find("layer-cycle+next-layer-fill", "held-out", Some("10%"));
    assert_eq!(held.rows, 1);
    assert!(held.geomean_vs_belady.unwrap() > 1.0);
}

// ---------------------------------------------------------------------------------------------
// The command line

#[test]
fn cli_json_rows() {
    let out = moehost()
        .args(["replay", "--trace"])
        .arg(batch1_path())
        .args(["--eviction", "lru", "--capacity", "10%,25%", "--json"])
        .args(["--expert-bytes", "k2-fp8"])
        .output()
        .unwrap();
    assert_ok(&out);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 4);
    let r = &rows[0];
    for key in [
        "trace",
        "policy",
        "capacity",
        "per_layer",
        "hits",
        "misses",
        "hit_rate",
    ] {
        assert!(r.get(key).is_some(), "missing {key}");
    }
    assert_eq!(r["policy"], "belady");
    assert_eq!(r["trace"], "decode-batch1");
    assert_eq!(r["capacity"], 44);
    assert_eq!(r["per_layer"], false);
    assert_eq!(r["hits"], 56_043);
    assert_eq!(r["expert_bytes"], 44_050_944);
    assert_eq!(rows[1]["policy"], "lru");
    assert_eq!(rows[3]["hits"], 60_799);
    assert!(rows[1]["stall_ms_per_token"].as_f64().unwrap() > 0.0);
}

#[test]
fn cli_table_plot_and_bench() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("p.svg");
    let png = dir.path().join("p.png");
    for plot in [&svg, &png] {
        let out = moehost()
            .args(["replay", "--trace"])
            .arg(batch1_path())
            .args(["--eviction", "lru", "--eviction", "layer-cycle"])
            .args(["--capacity", "5%", "--capacity", "10%,25%", "--plot"])
            .arg(plot)
            .output()
            .unwrap();
        assert_ok(&out);
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.contains("decode-batch1: 3,200 tokens, 114,251 accesses"),
            "{text}"
        );
        assert!(text.contains("layer-cycle"));
    }
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.starts_with("<svg") && s.contains("Belady (bound)") && s.contains("layer-cycle"));
    let p = std::fs::read(&png).unwrap();
    assert_eq!(&p[..8], b"\x89PNG\r\n\x1a\n");
    assert!(p.len() > 5000);

    let out = moehost()
        .args(["replay", "--bench", "--repeats", "1", "--trace"])
        .arg(batch1_path())
        .args(["--capacity", "25%", "--json"])
        .output()
        .unwrap();
    assert_ok(&out);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["policy"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "belady",
            "native-lru",
            "lru (wasm)",
            "lru (wasm, unguarded)"
        ]
    );
    for r in rows.as_array().unwrap() {
        assert!(r["accesses_per_s"].as_f64().unwrap() > 0.0);
    }
    // native and wasm LRU replay the same hits, whichever guard
    for i in 2..4 {
        assert_eq!(rows[1]["hit_rate"], rows[i]["hit_rate"]);
    }
}

#[test]
fn cli_summary_across_traces() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("summary.json");
    let out = moehost()
        .args(["replay", "--trace"])
        .arg(flame_path())
        .arg("--held-out")
        .arg(batch1_path())
        .args([
            "--eviction",
            "layer-cycle",
            "--capacity",
            "10%,25%",
            "--summary",
        ])
        .arg(&json)
        .output()
        .unwrap();
    assert_ok(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("flame-moe-290m: 2,048 tokens"), "{text}");
    assert!(text.contains("Across traces: geometric mean"), "{text}");
    let line = |set: &str| {
        text.lines()
            .find(|l| l.contains("layer-cycle") && l.contains(set))
            .unwrap_or_else(|| panic!("no {set} line: {text}"))
            .to_owned()
    };
    assert!(line("tuned").contains("(1)") && line("held-out").contains("(1)"));
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let s = s.as_array().unwrap();
    // layer-cycle: (tuned, held-out) x (10%, 25%, all)
    assert_eq!(s.len(), 6);
    assert_eq!(s[0]["set"], "tuned");
    assert_eq!(s[0]["capacity"], "10%");
    assert_eq!(s[1]["capacity"], "25%");
    assert_eq!(s[2]["capacity"], serde_json::Value::Null);
    assert_eq!(s[3]["set"], "held-out");
    for x in s {
        let g = x["geomean_vs_belady"].as_f64().unwrap();
        assert!(g > 0.1 && g <= 1.0, "{x}");
    }
}

fn fails(args: &[&str], want: &str) {
    let out = moehost().args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(want), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn cli_bad_inputs() {
    let trace = batch1_path();
    let t = trace.to_str().unwrap();
    fails(
        &[
            "replay",
            "--trace",
            "/nonexistent.safetensors",
            "--capacity",
            "4",
        ],
        "/nonexistent.safetensors",
    );
    fails(
        &["replay", "--trace", t, "--capacity", "abc"],
        "invalid capacity \"abc\"",
    );
    fails(
        &["replay", "--trace", t, "--capacity", "120%"],
        "percentage",
    );
    fails(
        &[
            "replay",
            "--trace",
            t,
            "--capacity",
            "4",
            "--eviction",
            "nope",
        ],
        "no bundled policy named \"nope\"",
    );
    fails(
        &[
            "replay",
            "--trace",
            t,
            "--capacity",
            "4",
            "--eviction",
            "transitions",
        ],
        "transitions is a prefetch policy, not an eviction policy",
    );
    fails(
        &[
            "replay",
            "--trace",
            t,
            "--capacity",
            "4",
            "--prefetch",
            "lru",
        ],
        "lru is an eviction policy, not a prefetch policy",
    );
    fails(
        &["replay", "--trace", t, "--capacity", "4", "--link", "fast"],
        "no link preset named \"fast\"",
    );
    fails(
        &[
            "replay",
            "--trace",
            t,
            "--capacity",
            "4",
            "--plot",
            "/tmp/x.gif",
        ],
        "must end in .svg or .png",
    );
    // A trace that is not one, named in the message.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("garbage.safetensors");
    std::fs::write(&bad, b"not a trace at all").unwrap();
    fails(
        &[
            "replay",
            "--trace",
            bad.to_str().unwrap(),
            "--capacity",
            "4",
        ],
        "garbage.safetensors: not a safetensors file",
    );
}

// ---------------------------------------------------------------------------------------------
// Misbehaving plugins

/// Answers like LRU but names an expert out of range on every `every`-th request.
struct Liar {
    inner: moehost::policy::builtin::Lru,
    every: u32,
    n: u32,
}

impl moehost::policy::Eviction for Liar {
    fn init(
        &mut self,
        args: &moehost::policy::InitArgs,
    ) -> moehost::policy::PolicyResult<moehost::policy::PolicyInfo> {
        self.inner.init(args)
    }
    fn on_step(
        &mut self,
        facts: &moehost::policy::StepFacts,
        request: Option<&moehost::policy::VictimRequest<'_>>,
    ) -> moehost::policy::PolicyResult<Vec<moehost::policy::ExpertKey>> {
        let mut v = self.inner.on_step(facts, request)?;
        if request.is_some() {
            self.n += 1;
            if self.n.is_multiple_of(self.every) {
                v[0].expert = 9999;
            }
        }
        Ok(v)
    }
    fn victims(
        &mut self,
        r: &moehost::policy::VictimRequest<'_>,
    ) -> moehost::policy::PolicyResult<Vec<moehost::policy::ExpertKey>> {
        self.inner.victims(r)
    }
}

#[test]
fn failing_plugins_fall_back_to_lru_and_are_counted() {
    use moehost::policy::GuardedEviction;
    use moehost::replay::engine::{simulate, SimConfig};
    use moehost::replay::plugin::ContractEvictor;
    let s = batch1();
    let native = replay(s, &job(spec("native-lru"), 44), false);
    for (name, timeout_ms) in [
        (support::fixture("trap"), 2000),
        (support::fixture("loop-forever"), 5),
    ] {
        let mut l = limits();
        l.call_timeout = std::time::Duration::from_millis(timeout_ms);
        let r = run_job(s, &job(spec(&name), 44), false, 1, l).unwrap();
        let st = r.eviction_stats.unwrap();
        assert!(st.quarantined, "{name}: {st:?}");
        assert_eq!(st.fallbacks, st.calls, "{name}: every call served by LRU");
        assert!(st.traps + st.timeouts >= 3, "{name}: {st:?}");
        assert_eq!(r.counters, native, "{name}: LRU served every call");
    }
    // Invalid answers now and then: counted, served by LRU, quarantined once 3 x 3 recent
    // failures pile up. Failures fade by 1/1000 a call, so one call in 50 failing gets there at
    // its 12th failure (sum over j < 12 of 0.999^(50 j) = 9.25; 11 give 8.6).
    let recent = |n: i32| (0..n).map(|j| 0.999f64.powi(50 * j)).sum::<f64>();
    assert!(recent(11) < 9.0 && recent(12) >= 9.0);
    let sim = SimConfig {
        capacity: 44,
        per_layer: false,
        host_capacity: None,
        oracle_prefetch: false,
        expert_bytes: 1,
    };
    let shape = moehost::policy::ModelShape {
        moe_layers: s.layers,
        experts_per_layer: s.experts_per_layer,
        top_k: s.top_k,
        expert_bytes: 1,
    };
    let args =
        moehost::experts::tiered::residency::Residency::new(shape, false, 44, None).init_args();
    let liar = Liar {
        inner: Default::default(),
        every: 50,
        n: 0,
    };
    let mut g = GuardedEviction::new(Some(Box::new(liar)), "liar", "test", 3);
    g.init(&args).unwrap();
    g.set_quiet(true);
    let c = simulate(
        s,
        &sim,
        &mut ContractEvictor::new(&mut g, s.experts_per_layer),
        None,
    );
    let st = g.stats().clone();
    assert_eq!(st.invalid_answers, 12, "{st:?}");
    assert!(st.quarantined && st.reinits == 12 - 1, "{st:?}");
    assert_eq!(c.accesses, native.accesses);
}

/// The server's shadow caches (`OnlineSim`, fed one live layer step at a time) count exactly
/// what an offline replay of the same stream counts, with eviction and prefetch plugins.
#[test]
fn online_simulation_equals_the_offline_replay() {
    use moehost::policy::wasm::load_component;
    use moehost::policy::PolicySource;
    use moehost::replay::engine::{OnlineSim, Prefetcher, SimConfig};
    use moehost::replay::plugin::{guarded_eviction, guarded_prefetch, ContractEvictor};
    let s = batch1();
    let shape = moehost::policy::ModelShape {
        moe_layers: s.layers,
        experts_per_layer: s.experts_per_layer,
        top_k: s.top_k,
        expert_bytes: s.expert_bytes.max(1),
    };
    for (eviction, pf, capacity, host) in [
        ("lfu", None, 44, None),
        ("layer-cycle", Some("transitions"), 112, Some(150)),
    ] {
        let mut j = job(spec(eviction), capacity);
        j.prefetch = pf.map(prefetch);
        j.host_capacity = host;
        let offline = replay(s, &j, false);

        let cfg = SimConfig {
            capacity,
            per_layer: false,
            host_capacity: host,
            oracle_prefetch: false,
            expert_bytes: shape.expert_bytes,
        };
        let mut sim = OnlineSim::new(shape, cfg);
        let args = sim.init_args();
        let load = |n: &str| {
            let src = PolicySource::parse(n);
            load_component(&src.bytes().unwrap(), n).unwrap()
        };
        let mut g = guarded_eviction(&load(eviction), eviction, limits(), &args).unwrap();
        let mut p = pf.map(|n| guarded_prefetch(&load(n), n, limits(), &args).unwrap());
        let mut ev = ContractEvictor::new(&mut g, s.experts_per_layer);
        for v in &s.visits {
            let experts: Vec<u32> = s
                .keys_of(v)
                .iter()
                .map(|k| k % s.experts_per_layer)
                .collect();
            sim.step(
                v.step,
                v.layer,
                v.tokens,
                &experts,
                None,
                &mut ev,
                p.as_mut().map(|p| p as &mut dyn Prefetcher),
            );
        }
        let mut online = sim.counters().clone();
        // The offline replay counts prefetches never used by the end as wasted.
        online.prefetch_wasted = offline.prefetch_wasted;
        assert_eq!(online, offline, "{eviction}+{pf:?}");
        assert!(online.hits > 0 && online.evictions > 0, "{online:?}");
    }
}

/// The live store and the replay lab keep their tiers in the same residency under the same
/// rules: a generation under tight budgets counts, tier by tier, exactly what the replay of its
/// recorded routing counts, for every bundled eviction policy.
#[test]
fn the_live_store_counts_what_the_replay_of_its_routing_counts() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = "The quick brown fox";
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(&prompts, format!("{{\"prompt\": \"{prompt}\"}}\n")).unwrap();
    let trace = dir.path().join("live.safetensors");
    assert_ok(
        &moehost()
            .args(["trace", "record", "--max-tokens", "24", "--prompts"])
            .arg(&prompts)
            .arg("--out")
            .arg(&trace)
            .output()
            .unwrap(),
    );
    for eviction in ["lru", "lfu", "layer-cycle"] {
        // Prefill and 24 decode steps: the passes the trace recorded.
        let out = moehost()
            .args([
                "generate",
                "--prompt",
                prompt,
                "--max-tokens",
                "25",
                "--temperature",
                "0",
            ])
            .args(["--device-mem", "4MiB", "--host-mem", "6MiB", "--stats"])
            .args(["--eviction", eviction])
            .output()
            .unwrap();
        assert_ok(&out);
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stats: serde_json::Value =
            serde_json::from_str(stdout.lines().rfind(|l| l.starts_with('{')).unwrap()).unwrap();
        let (device, host) = (&stats["device"], &stats["host"]);
        let (slots, host_slots) = (
            device["slots"].as_u64().unwrap(),
            host["slots"].as_u64().unwrap(),
        );
        assert!(
            slots < 448 / 4 && host_slots < 448 / 2,
            "budgets must be tight"
        );
        let out = moehost()
            .args(["replay", "--trace"])
            .arg(&trace)
            .args(["--eviction", eviction, "--json"])
            .args(["--capacity", &slots.to_string()])
            .args(["--host-capacity", &host_slots.to_string()])
            .output()
            .unwrap();
        assert_ok(&out);
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let row = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["eviction"] == eviction)
            .unwrap();
        let live = |tier: &serde_json::Value, key: &str| tier[key].as_u64().unwrap();
        let accesses = live(device, "hits") + live(device, "misses");
        assert_eq!(
            row["accesses"].as_u64(),
            Some(accesses),
            "{eviction}: accesses"
        );
        assert!(
            live(device, "hits") > 0,
            "{eviction}: the device tier must hit"
        );
        assert_eq!(
            row["hits"].as_u64(),
            Some(live(device, "hits")),
            "{eviction}: hits"
        );
        assert_eq!(
            row["misses"].as_u64(),
            Some(live(device, "misses")),
            "{eviction}"
        );
        assert_eq!(row["streamed"], stats["streamed"], "{eviction}: streamed");
        assert_eq!(
            row["host_hits"].as_u64(),
            Some(live(host, "hits")),
            "{eviction}: host"
        );
        assert_eq!(
            row["host_misses"].as_u64(),
            Some(live(host, "misses")),
            "{eviction}"
        );
    }
}
