//! The tiered expert store and the policy runtime, end to end on the bundled model:
//! caching never changes a token, misbehaving plugins never hurt the host, policies swap while
//! a generation runs.

mod support;

use moehost::experts::tiered::{StoreConfig, TieredExperts};
use moehost::policy::{PolicyKind, PolicySource};
use moehost::{Engine, Logits};
use proptest::prelude::*;
use std::sync::{Arc, OnceLock};

const PROMPT: &str = "<|bos|>The software is distributed in the hope that it will be useful";
const NEW_TOKENS: usize = 24;

/// All-resident reference: prefill logits (bits) and greedy tokens.
fn baseline() -> &'static (Vec<u32>, Vec<u32>) {
    static B: OnceLock<(Vec<u32>, Vec<u32>)> = OnceLock::new();
    B.get_or_init(|| run(&Engine::open(&support::bf16_model()).unwrap()))
}

fn run(engine: &Engine) -> (Vec<u32>, Vec<u32>) {
    let ids = engine.encode(PROMPT).unwrap();
    let out = engine
        .model
        .forward(&ids, &mut engine.model.new_cache(), Logits::All, false)
        .unwrap();
    let bits = out.logits.iter().map(|x| x.to_bits()).collect();
    let gen = engine
        .generate(&ids, NEW_TOKENS, &Default::default(), |_| {})
        .unwrap();
    (bits, gen.ids)
}

fn config(
    selection: &str,
    eviction: &str,
    prefetch: &str,
    device: Option<u64>,
    host: Option<u64>,
) -> StoreConfig {
    StoreConfig {
        device_bytes: device,
        host_bytes: host,
        selection: PolicySource::parse(selection),
        eviction: PolicySource::parse(eviction),
        prefetch: PolicySource::parse(prefetch),
        // No test depends on a deadline being met: a loaded CI machine can stall a good
        // plugin's call past the 10 ms default, which would count as a fallback.
        limits: moehost::policy::wasm::RuntimeLimits {
            call_timeout: std::time::Duration::from_secs(10),
            init_timeout: std::time::Duration::from_secs(30),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn open(c: &StoreConfig) -> (Engine, Arc<TieredExperts>) {
    Engine::open_tiered(&support::bf16_model(), c).unwrap()
}

/// One tiny-k2 expert in the device tier's compute form. The CPU keeps a BF16 checkpoint's
/// weights as they are stored (kernels widen them exactly), so this is its bf16 size:
/// 3 x 256 x 64 x 2 bytes.
const EXPERT_COMPUTE: u64 = 3 * 256 * 64 * 2;
/// One tiny-k2 expert in the host tier's storage format (bf16).
const EXPERT_BF16: u64 = 3 * 256 * 64 * 2;

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() })]

    /// Exact selection + any eviction/prefetch policy + any budget = the same logits and
    /// tokens, bit for bit, as every expert resident.
    #[test]
    fn caching_never_changes_results(
        eviction in prop::sample::select(vec!["lru", "lfu", "layer-cycle"]),
        prefetch in prop::sample::select(vec!["none", "next-layer-gate", "transitions"]),
        device_slots in prop::option::weighted(0.85, 0u64..=460),
        host_slots in prop::option::weighted(0.7, 0u64..=460),
    ) {
        let c = config("topk", eviction, prefetch, device_slots.map(|s| s * EXPERT_COMPUTE), host_slots.map(|s| s * EXPERT_BF16));
        let (engine, store) = open(&c);
        let got = run(&engine);
        let stats = store.stats();
        prop_assert!(got == *baseline(), "{eviction}/{prefetch} device {device_slots:?} host {host_slots:?}: results differ");
        prop_assert_eq!(stats.policies.selection.fallbacks + stats.policies.eviction.fallbacks + stats.policies.prefetch.fallbacks, 0);
        prop_assert!(stats.device.resident <= stats.device.slots);
        prop_assert!(stats.host.resident <= stats.host.slots);
    }
}

#[test]
fn small_device_tier_moves_experts_and_counts_it() {
    // 10% of the 448 experts on the device, 25% in host RAM.
    let c = config(
        "topk",
        "lru",
        "next-layer-gate",
        Some(45 * EXPERT_COMPUTE),
        Some(112 * EXPERT_BF16),
    );
    let (engine, store) = open(&c);
    assert_eq!(store.slots(), (45, 112));
    assert_eq!(run(&engine), *baseline());
    let s = store.stats();
    assert!(s.device.hits > 0 && s.device.misses > 0, "{s:?}");
    assert!(s.device.bytes_in > 0 && s.host.bytes_in > 0, "{s:?}");
    assert!(
        s.host.hits > 0,
        "demoted experts are found in host RAM: {s:?}"
    );
    assert!(s.prefetch.issued > 0, "{s:?}");
    assert!(
        s.prefetch.used + s.prefetch.wasted <= s.prefetch.issued + s.prefetch.used,
        "{s:?}"
    );
    // Full, but for what the last layer step's prefetches hold: a queued device prefetch whose
    // victim already left is cancelled by the next call and gives its slot back, and one call
    // asks for at most top-k (6) of them per decoded token.
    assert!(
        (45 - 6..=45).contains(&s.device.resident),
        "{}",
        s.device.resident
    );
}

/// Prefetching makes room with `victims` requests between layer steps, when the eviction
/// policy has not yet heard of the latest inserts: the host must only count residents it has
/// reported, or a plugin tracking residency from the events comes up short (a regression).
#[test]
fn eviction_plugins_serve_prefetch_victim_requests_without_fallbacks() {
    for eviction in ["lru", "lfu", "layer-cycle"] {
        for prefetch in ["next-layer-gate", "transitions"] {
            let c = config(
                "topk",
                eviction,
                prefetch,
                Some(10 * EXPERT_COMPUTE),
                Some(40 * EXPERT_BF16),
            );
            let (engine, store) = open(&c);
            assert_eq!(run(&engine), *baseline(), "{eviction}+{prefetch}");
            let s = store.stats();
            let p = &s.policies;
            assert!(s.prefetch.issued > 0, "{eviction}+{prefetch}: {s:?}");
            assert_eq!(
                p.selection.fallbacks + p.eviction.fallbacks + p.prefetch.fallbacks,
                0,
                "{eviction}+{prefetch}: {p:?}"
            );
        }
    }
}

/// A misbehaving eviction plugin: the host survives, counts the failure kind, serves the calls
/// with LRU, produces the same tokens, and quarantines the plugin.
fn misbehaving_eviction(fixture: &str) -> moehost::policy::PolicyStats {
    let mut c = config("topk", fixture, "none", Some(30 * EXPERT_COMPUTE), None);
    // A small memory limit, so the allocation bomb meets it well within the call deadline,
    // and a short deadline, so the endless loop is cut quickly.
    c.limits.memory_bytes = 4 << 20;
    c.limits.call_timeout = std::time::Duration::from_millis(50);
    let (engine, store) = open(&c);
    assert_eq!(run(&engine), *baseline(), "{fixture}");
    let s = store.stats().policies.eviction;
    assert!(s.quarantined, "{fixture}: {s:?}");
    assert!(s.fallbacks >= 3, "{fixture}: {s:?}");
    s
}

#[test]
fn plugin_that_loops_forever_times_out() {
    let s = misbehaving_eviction(&support::fixture("loop-forever"));
    assert!(s.timeouts >= 1, "{s:?}");
}

#[test]
fn plugin_that_allocates_without_bound_hits_its_memory_limit() {
    let s = misbehaving_eviction(&support::fixture("alloc-bomb"));
    assert!(s.out_of_memory >= 1, "{s:?}");
}

#[test]
fn plugin_that_traps_is_replaced_by_the_builtin() {
    let s = misbehaving_eviction(&support::fixture("trap"));
    assert!(s.traps >= 1, "{s:?}");
}

#[test]
fn selection_with_out_of_range_ids_falls_back_to_exact_topk() {
    let c = config(&support::fixture("bad-ids"), "lru", "none", None, None);
    let (engine, store) = open(&c);
    assert_eq!(run(&engine), *baseline());
    let s = store.stats().policies.selection;
    assert!(s.invalid_answers >= 1 && s.quarantined, "{s:?}");
}

/// A selection plugin cannot buy unbounded substitution by declaring it: its gap is held to the
/// host's ceiling (`--max-score-gap`, 0.05), so routing every token to its worst experts is
/// rejected and exact top-k serves. An operator who raises the ceiling gets what they allowed.
#[test]
fn declared_score_gaps_are_held_to_the_hosts_ceiling() {
    let c = config(
        &support::fixture("worst-experts"),
        "lru",
        "none",
        None,
        None,
    );
    let (engine, store) = open(&c);
    assert_eq!(run(&engine), *baseline());
    let s = store.stats().policies.selection;
    assert!(s.invalid_answers >= 1 && s.quarantined, "{s:?}");

    let mut c = config(
        &support::fixture("worst-experts"),
        "lru",
        "none",
        None,
        None,
    );
    c.limits.max_score_gap = f32::INFINITY;
    let (engine, store) = open(&c);
    assert_ne!(
        run(&engine).1,
        baseline().1,
        "the worst experts were routed to"
    );
    let s = store.stats().policies.selection;
    assert_eq!(s.invalid_answers, 0, "{s:?}");
}

/// A plugin built against the frozen contract 0.1 still loads and routes exactly, next to
/// 0.2 eviction and prefetch plugins, with a small device tier.
/// Serves the bundled model with a legacy selection fixture (and `prefetch`) at a small
/// budget; the routing must equal the all-resident run's. Returns the policies' counters.
fn legacy_selection(fixture: &str, prefetch: &str) -> moehost::experts::tiered::PolicyStatsSet {
    let c = config(fixture, "lru", prefetch, Some(45 * EXPERT_COMPUTE), None);
    let (engine, store) = open(&c);
    assert_eq!(run(&engine), *baseline());
    let s = store.stats().policies;
    assert!(s.selection.calls > 0, "{s:?}");
    s
}

#[test]
fn plugin_built_against_contract_0_1_still_works() {
    let s = legacy_selection(&support::fixture("legacy-v0.1"), "next-layer-gate");
    assert_eq!(s.selection.name, "legacy-topk", "{s:?}");
    assert_eq!(s.selection.version, "0.1.0", "{s:?}");
    assert_eq!(s.eviction.version, "0.2.1", "{s:?}");
    assert_eq!(
        s.selection.fallbacks + s.eviction.fallbacks + s.prefetch.fallbacks,
        0,
        "{s:?}"
    );
}

#[test]
fn plugin_built_against_contract_0_2_0_loads_into_the_0_2_1_host() {
    let s = legacy_selection(&support::fixture("legacy-v0.2"), "none");
    assert_eq!(s.selection.name, "legacy-v0.2", "{s:?}");
    assert_eq!(s.selection.version, "0.2.0", "{s:?}");
    assert_eq!(s.selection.fallbacks, 0, "{s:?}");
}

/// A store with `placement` weighing the `link` preset.
fn placed(placement: &str, link: &str, device_slots: u64, host_slots: Option<u64>) -> StoreConfig {
    StoreConfig {
        placement: PolicySource::parse(placement),
        link: link.into(),
        ..config(
            "topk",
            "lru",
            "none",
            Some(device_slots * EXPERT_COMPUTE),
            host_slots.map(|s| s * EXPERT_BF16),
        )
    }
}

#[test]
fn placement_never_changes_results() {
    // (placement, link, device slots, host slots): the built-in cost model on each preset,
    // the hot-fetch plugin, and a plugin whose answers are garbage.
    let bad_place = support::fixture("bad-place");
    let cases = [
        ("cost-model", "local", 20, None),
        ("cost-model", "slow-link", 0, None),
        ("cost-model", "slow-link", 30, Some(10)),
        ("cost-model", "h100-pcie5", 60, None),
        ("hot-fetch", "h100-pcie5", 40, Some(100)),
        (bad_place.as_str(), "slow-link", 10, None),
    ];
    for (placement, link, device, host) in cases {
        let (engine, store) = open(&placed(placement, link, device, host));
        let what = format!("{placement} on {link}, {device} device slots, host {host:?}");
        assert!(run(&engine) == *baseline(), "{what}: results differ");
        let st = store.stats();
        let p = &st.placement;
        assert_eq!(
            p.fetched + p.on_host,
            st.device.misses,
            "{what}: every device miss is placed once: {p:?}"
        );
        assert!(st.device.resident <= st.device.slots, "{what}");
        let pol = &st.policies.placement;
        if placement == bad_place {
            assert!(
                pol.invalid_answers > 0 && pol.fallbacks > 0,
                "{what}: {pol:?}"
            );
        } else {
            assert_eq!(pol.fallbacks, 0, "{what}: {pol:?}");
        }
    }
}

#[test]
fn cost_model_runs_missing_experts_on_the_host_when_the_link_is_slow() {
    // Over a fast "local" link every miss is fetched (ties go to the device tier).
    let (engine, store) = open(&placed("cost-model", "local", 10, None));
    run(&engine);
    let local = store.stats();
    assert_eq!(local.device_backend, "cpu");
    assert_eq!(local.placement.on_host, 0, "{:?}", local.placement);
    assert!(local.device.bytes_in > 0);

    // Over a 1 GB/s link one token is cheaper to compute where the expert lives: once the
    // device slots are taken, misses run from the host tier and nothing is evicted.
    let (engine, store) = open(&placed("cost-model", "slow-link", 10, None));
    run(&engine);
    let slow = store.stats();
    assert!(
        slow.placement.on_host > slow.placement.fetched,
        "{:?}",
        slow.placement
    );
    assert_eq!(slow.placement.fetched, 10, "only the free slots are filled");
    assert!(slow.device.bytes_in < local.device.bytes_in);
    assert!(slow.placement.host_tokens >= slow.placement.on_host);
}

#[test]
fn plugin_importing_wasi_is_refused() {
    let c = config("topk", &support::fixture("wasi-import"), "none", None, None);
    let err = match Engine::open_tiered(&support::bf16_model(), &c) {
        Ok(_) => panic!("a WASI-importing plugin must be refused"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("imports") && err.contains("wasi"), "{err}");
}

#[test]
fn wrong_kind_and_garbage_are_refused() {
    let err = format!(
        "{:#}",
        Engine::open_tiered(
            &support::bf16_model(),
            &config("lru", "lru", "none", None, None)
        )
        .err()
        .unwrap()
    );
    assert!(
        err.contains("is a eviction policy, not a selection policy"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm not really").unwrap();
    let err = format!(
        "{:#}",
        Engine::open_tiered(
            &support::bf16_model(),
            &config("topk", junk.to_str().unwrap(), "none", None, None)
        )
        .err()
        .unwrap()
    );
    assert!(
        err.contains("junk.wasm") && err.contains("not a valid WebAssembly component"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        Engine::open_tiered(
            &support::bf16_model(),
            &config("topk", "no-such-policy", "none", None, None)
        )
        .err()
        .unwrap()
    );
    assert!(
        err.contains("no bundled policy named \"no-such-policy\""),
        "{err}"
    );
}

#[test]
fn hot_swap_during_a_running_generation() {
    let c = config(
        "topk",
        "lru",
        "none",
        Some(40 * EXPERT_COMPUTE),
        Some(100 * EXPERT_BF16),
    );
    let (engine, store) = open(&c);
    let ids = engine.encode(PROMPT).unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    let gen = std::thread::scope(|scope| {
        let swapper = scope.spawn(|| {
            let mut n = 0;
            let policies = ["lfu", "layer-cycle", "lru"];
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let p = policies[n % policies.len()];
                store
                    .swap_policy(PolicyKind::Eviction, &PolicySource::parse(p))
                    .unwrap();
                store
                    .swap_policy(
                        PolicyKind::Prefetch,
                        &PolicySource::parse(if n % 2 == 0 { "transitions" } else { "none" }),
                    )
                    .unwrap();
                n += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            n
        });
        let gen = engine
            .generate(&ids, 64, &Default::default(), |_| {})
            .unwrap();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(swapper.join().unwrap() > 0);
        gen
    });
    let reference = Engine::open(&support::bf16_model())
        .unwrap()
        .generate(&ids, 64, &Default::default(), |_| {})
        .unwrap();
    assert_eq!(gen.ids, reference.ids);
    let s = store.stats();
    assert!(s.policy_swaps > 0, "{s:?}");
    assert_eq!(s.policies.eviction.fallbacks, 0);
}

#[test]
fn changing_the_plugin_file_swaps_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evict.wasm");
    std::fs::write(&path, PolicySource::parse("lru").bytes().unwrap()).unwrap();
    let c = config(
        "topk",
        path.to_str().unwrap(),
        "none",
        Some(40 * EXPERT_COMPUTE),
        None,
    );
    let (engine, store) = open(&c);
    store.watch_policy(PolicyKind::Eviction, &path).unwrap();
    let before = store.stats().policies.eviction.name;
    std::fs::write(&path, PolicySource::parse("lfu").bytes().unwrap()).unwrap();
    let ids = engine.encode(PROMPT).unwrap();
    // The swap lands between forward passes once the watcher's debounce has passed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.stats().policy_swaps == 0 && std::time::Instant::now() < deadline {
        engine
            .model
            .forward(&ids, &mut engine.model.new_cache(), Logits::Last, false)
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let after = store.stats().policies.eviction.name;
    assert_eq!(store.stats().policy_swaps, 1);
    assert_ne!(before, after, "the new plugin's name is reported");
}

#[test]
fn experts_run_from_their_storage_format_bit_for_bit() {
    use moehost::experts::ExpertBytes;
    use moehost::weights::checkpoint::Checkpoint;
    // bf16, and FP8 with 128x128 blocks over 64-row matrices (ragged edge blocks).
    for dir in [support::bf16_model(), support::fp8_model()] {
        let cfg = moehost::ModelConfig::from_dir(&dir).unwrap();
        let ckpt = Checkpoint::open(&dir, cfg.quantization()).unwrap();
        let h = cfg.hidden_size;
        for (layer, expert) in [(1, 0), (4, 37), (7, 63)] {
            let stored = ExpertBytes::read(&ckpt, layer, expert).unwrap();
            let compute = stored.to_ffn().unwrap();
            // Up to the row-invariant kernels' limit and past it (the blocked GEMM).
            support::assert_same_bits(
                &[1, 2, 7, 64, 65],
                [h, h],
                expert,
                |x, out| compute.forward(x, h, out),
                |x, out| stored.forward(x, h, out).unwrap(),
                &format!("{}: expert {expert} of layer {layer}", dir.display()),
            );
        }
    }
}

/// Score rows that stress the guests' vectorised top-k against the host's own routing order
/// (higher score first, NaN last, then the lower id): random, every score tied (too many
/// candidates for the fast path), a few ties at the top, NaN and infinities, signed zeros, and
/// the real router's scores of one token.
fn adversarial_rows(experts: usize) -> Vec<Vec<f32>> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 40) as f32 / (1u64 << 24) as f32
    };
    let random: Vec<f32> = (0..experts).map(|_| next()).collect();
    let mut top_ties = random.clone();
    for e in (3..experts).step_by(experts / 5) {
        top_ties[e] = 2.0;
    }
    let mut specials = random.clone();
    for (e, s) in specials.iter_mut().enumerate() {
        match e % 11 {
            0 => *s = f32::NAN,
            3 => *s = f32::NEG_INFINITY,
            7 if e % 3 == 0 => *s = f32::INFINITY,
            _ => {}
        }
    }
    let zeros: Vec<f32> = (0..experts)
        .map(|e| match e % 4 {
            0 => 0.0,
            1 => -0.0,
            2 => -1.0,
            _ => f32::NAN,
        })
        .collect();
    let quantised: Vec<f32> = (0..experts).map(|_| (next() * 16.0).floor()).collect();
    vec![
        random,
        vec![0.5; experts],
        top_ties,
        specials,
        zeros,
        quantised,
    ]
}

#[test]
fn the_topk_guest_routes_exactly_as_the_host_on_adversarial_scores() {
    use moehost::policy::builtin::ExactTopK;
    use moehost::policy::wasm::{load_component, RuntimeLimits, WasmPolicy};
    use moehost::policy::{Selection, Tier};
    let mut args = moehost::policy::check::k2_init_args();
    let src = PolicySource::parse("topk");
    for experts in [384u32, 64, 72] {
        args.shape.experts_per_layer = experts;
        let mut guest = WasmPolicy::new(
            load_component(&src.bytes().unwrap(), "topk").unwrap(),
            RuntimeLimits::default(),
        );
        Selection::init(&mut guest, &args).unwrap();
        let residency = vec![Tier::Disk; experts as usize];
        let rows = adversarial_rows(experts as usize);
        for (r, row) in rows.iter().enumerate() {
            for k in 1..=8 {
                let want = ExactTopK.select(0, 1, k, row, &residency).unwrap();
                let got = guest.select(0, 1, k, row, &residency).unwrap();
                assert_eq!(got, want, "{experts} experts, row {r}, k {k}");
            }
        }
        // All rows in one call, as a batched step sends them.
        let all: Vec<f32> = rows.concat();
        let t = rows.len() as u32;
        let want = ExactTopK.select(0, t, 8, &all, &residency).unwrap();
        assert_eq!(guest.select(0, t, 8, &all, &residency).unwrap(), want);
    }
}

#[test]
fn direct_calls_answer_exactly_as_the_generic_component_path() {
    // `policy bench` drives every call twice, into the core module directly and through
    // wasmtime's generic component path, and fails unless a digest of every answer (experts
    // chosen, victims, prefetch requests) is the same.
    for (selection, eviction, prefetch) in [
        ("topk", "lru", "next-layer-gate"),
        ("cache-aware", "lfu", "transitions"),
        ("topk", "layer-cycle", "none"),
        ("topk", "layer-cycle", "next-layer-blend"),
    ] {
        let report = moehost::policy::bench::run(selection, eviction, prefetch, 6)
            .unwrap_or_else(|e| panic!("{selection}/{eviction}/{prefetch}: {e:#}"));
        assert!(report.direct_calls, "{selection}/{eviction}/{prefetch}");
    }
}

#[test]
fn which_components_are_called_directly() {
    use moehost::policy::wasm::load_component;
    let loaded = |name: &str| {
        let src = PolicySource::parse(name);
        load_component(&src.bytes().unwrap(), name).unwrap()
    };
    // Contract 0.2.x, plain wit-bindgen shape: direct (0.2.0 under its own export names).
    assert!(loaded("lru").is_direct());
    assert!(loaded(&support::fixture("legacy-v0.2")).is_direct());
    // Contract 0.1 and placement policies run on wasmtime's generic component path.
    assert!(!loaded(&support::fixture("legacy-v0.1")).is_direct());
    assert!(!loaded("hot-fetch").is_direct());
    assert!(!loaded("lru").generic_path().is_direct());
}

/// Runs `moehost ARGS` and returns its stdout and its own peak resident set, bytes (`wait4`).
// Reaped by wait4, which clippy does not know.
#[allow(clippy::zombie_processes)]
fn run_measured(args: &[&str]) -> (String, u64) {
    use std::io::Read;
    let mut child = support::moehost()
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, which nothing else reaps; `usage` is a valid rusage.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "moehost {args:?} failed"
    );
    (out, usage.ru_maxrss as u64 * 1024)
}

/// A plugin with several linear memories, and one growing a function table, each take what they
/// can on every call: the host's peak memory stays within `--policy-memory` of a run with no
/// such plugin (plus an overhead for the plugin's code and instance), every failed growth is
/// counted, and the tokens are unchanged.
#[test]
fn plugin_memories_and_tables_stay_within_the_policy_memory_budget() {
    const BUDGET_MIB: u64 = 32;
    const OVERHEAD_MIB: u64 = 32;
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/plugins");
    let model = support::bf16_model();
    let budget = format!("{BUDGET_MIB}MiB");
    let gen = |prefetch: &str| {
        run_measured(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "Once upon a time",
            "--max-tokens",
            "60",
            "--temperature",
            "0",
            "--device-mem",
            "1MiB",
            "--policy-memory",
            &budget,
            "--prefetch",
            prefetch,
            "--stats",
        ])
    };
    let (want, base_rss) = gen("none");
    let text = |out: &str| {
        out.lines()
            .filter(|l| !l.starts_with('{'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    for fixture in ["multi-memory", "table-grow"] {
        let (out, rss) = gen(&format!("{data}/{fixture}.wasm"));
        assert_eq!(text(&out), text(&want), "{fixture} changed the tokens");
        let stats: serde_json::Value =
            serde_json::from_str(out.lines().find(|l| l.starts_with('{')).unwrap()).unwrap();
        let p = &stats["policies"]["prefetch"];
        assert_eq!(p["name"], fixture);
        let refused = p["out_of_memory"].as_u64().unwrap() + p["traps"].as_u64().unwrap();
        assert!(refused >= 1, "{fixture} never hit its budget: {p}");
        let grew = rss.saturating_sub(base_rss);
        assert!(
            grew < (BUDGET_MIB + OVERHEAD_MIB) << 20,
            "{fixture}: peak RSS {} MiB over the run without it (budget {BUDGET_MIB} MiB + {OVERHEAD_MIB} MiB overhead)",
            grew >> 20
        );
    }
}
