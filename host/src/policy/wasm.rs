//! Policies as WebAssembly components (wasmtime, component model).
//!
//! Owns: the shared engine with its epoch ticker, loading and checking a component (it must
//! export exactly one supported policy world and import nothing), instantiating it in a store
//! with memory limits, and calling it under a deadline (in CPU time: `deadline`). A trapped
//! store is dropped; the next `init` instantiates afresh from the cached `InstancePre`.
//! Does not own: validating answers or falling back (`guard`).

use anyhow::{bail, Result};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Config, Engine, Store, UpdateDeadline};

use super::direct::{DirectGuest, DirectModule, InitAnswer, InitFlat, OutlookFlat, VictimsFlat};
use super::*;

/// Bindings of the current contract, `wit/policy.wit` (0.2.1). Components built against
/// 0.2.0 (`wit/deps/moehost-policy-0.2.0`) bind to them too: wasmtime matches 0.2.x exports.
mod v2 {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "moehost:policy/policy-host@0.2.1",
    });
}

/// Bindings of the frozen 0.1 contract, `wit/deps/moehost-policy-0.1.0`.
mod v1 {
    wasmtime::component::bindgen!({
        path: "../wit/deps/moehost-policy-0.1.0",
        world: "policy-host",
    });
}

use v1::exports::moehost::policy::eviction as wev1;
use v1::exports::moehost::policy::prefetch as wpf1;
use v1::exports::moehost::policy::selection as wsel1;
use v1::moehost::policy::types as wt1;
use v2::exports::moehost::policy0_2_1::eviction as wev;
use v2::exports::moehost::policy0_2_1::placement as wpl;
use v2::exports::moehost::policy0_2_1::prefetch as wpf;
use v2::exports::moehost::policy0_2_1::selection as wsel;
use v2::moehost::policy0_2_1::types as wt;

/// The WIT package version this host implements; components of 0.1.x and 0.2.x load.
pub const WIT_VERSION: &str = "0.2.1";
/// Contract versions a component may export (`major.minor.` prefixes).
const SUPPORTED: [&str; 2] = ["0.2.", "0.1."];
/// The type-only interface every plugin imports implicitly.
const TYPES_PREFIX: &str = "moehost:policy/types@";
const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Bounds on every plugin.
/// The bundled `cache-aware` policy's gap: the substitution this project has measured.
pub const DEFAULT_MAX_SCORE_GAP: f32 = 0.05;

#[derive(Debug, Clone, Copy)]
pub struct RuntimeLimits {
    /// Deadline of one hot-path call.
    pub call_timeout: Duration,
    /// Deadline of `init` (which may size large state).
    pub init_timeout: Duration,
    /// Linear memory a plugin may grow to.
    pub memory_bytes: usize,
    /// Consecutive failures after which a plugin is quarantined.
    pub quarantine_after: u32,
    /// The most a selection plugin may substitute: however large a `max-score-gap` it
    /// declares, each expert it picks must score within this of the token's k-th best.
    pub max_score_gap: f32,
    /// Time all of a store's policies together may take per token, microseconds (warned
    /// near it; `policy::budget`).
    pub token_budget_us: f64,
}

impl Default for RuntimeLimits {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_millis(10),
            init_timeout: Duration::from_millis(500),
            memory_bytes: 128 << 20,
            max_score_gap: DEFAULT_MAX_SCORE_GAP,
            token_budget_us: super::budget::DEFAULT_TOKEN_BUDGET_US,
            quarantine_after: 3,
        }
    }
}

/// The process-wide engine: epoch interruption on, ticked every millisecond by one thread.
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // `MOEHOST_PERFMAP=1`: write /tmp/perf-<pid>.map so `perf` names plugin functions.
        if std::env::var_os("MOEHOST_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config).expect("wasmtime engine configuration is valid");
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("moehost-epoch".into())
            .spawn(move || {
                while let Some(engine) = ticker.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .expect("cannot start the epoch ticker thread");
        engine
    })
}

/// A checked, compiled component, ready to instantiate.
#[derive(Clone)]
pub struct LoadedComponent {
    pub kind: PolicyKind,
    /// The interface it exports, e.g. `moehost:policy/eviction@0.1.0`.
    pub export: String,
    /// The version part of `export`.
    pub version: String,
    pre: PolicyHostIndicesPre,
    /// The core module, called directly (`direct`), when the component has the plain shape.
    direct: Option<Arc<DirectModule<StoreState>>>,
}

impl LoadedComponent {
    /// Whether calls go straight to the core module (`policy::direct`) rather than through
    /// wasmtime's generic component path.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The same component on wasmtime's generic component path (to compare the two paths).
    pub fn generic_path(mut self) -> Self {
        self.direct = None;
        self
    }
}

#[derive(Clone)]
struct PolicyHostIndicesPre {
    pre: InstancePre<StoreState>,
}

/// Compiles `bytes` and refuses every import but the contract's type-only `types`
/// interface (which the component model imports implicitly because the exported interfaces
/// `use` it).
fn compile(bytes: &[u8], origin: &str) -> Result<Component> {
    let engine = engine();
    let component = Component::from_binary(engine, bytes)
        .map_err(|e| anyhow::anyhow!("{origin} is not a valid WebAssembly component: {e:#}"))?;
    let imports: Vec<String> = component
        .component_type()
        .imports(engine)
        .map(|(n, _)| n.to_owned())
        .filter(|n| !n.starts_with(TYPES_PREFIX))
        .collect();
    if !imports.is_empty() {
        bail!(
            "{origin} imports {}: policies get no imports (no WASI, filesystem, network or clock); \
             build it as a no_std guest (see docs/plugins.md)",
            imports.join(", ")
        );
    }
    Ok(component)
}

/// Links `component` (its only import, `types`, has no functions: an empty instance of the
/// version it imports, else `version`) and prepares it for instantiation.
fn prepare(component: &Component, origin: &str, version: &str) -> Result<InstancePre<StoreState>> {
    let engine = engine();
    let mut linker = Linker::<StoreState>::new(engine);
    let types = component
        .component_type()
        .imports(engine)
        .map(|(n, _)| n.to_owned())
        .find(|n| n.starts_with(TYPES_PREFIX))
        .unwrap_or_else(|| format!("{TYPES_PREFIX}{version}"));
    linker
        .instance(&types)
        .map_err(|e| anyhow::anyhow!("cannot define the types interface: {e:#}"))?;
    linker
        .instantiate_pre(component)
        .map_err(|e| anyhow::anyhow!("cannot prepare {origin}: {e:#}"))
}

/// A fresh store with the plugin's memory limit and the `init` deadline set.
fn new_store(limits: &RuntimeLimits) -> Store<StoreState> {
    let mut store = Store::new(
        engine(),
        StoreState {
            limits: super::limiter::PluginLimiter::new(limits.memory_bytes),
            clock: super::deadline::CallClock::start(limits.init_timeout, EPOCH_TICK),
        },
    );
    store.limiter(|s| &mut s.limits);
    store.epoch_deadline_callback(|mut ctx| {
        Ok(if ctx.data_mut().clock.expired() {
            UpdateDeadline::Interrupt
        } else {
            UpdateDeadline::Continue(1)
        })
    });
    arm_deadline(&mut store, limits.init_timeout);
    store
}

/// Compiles `bytes` and checks the component: one exported policy world of a supported
/// version and no imports.
pub fn load_component(bytes: &[u8], origin: &str) -> Result<LoadedComponent> {
    if let Some(hit) =
        compiled_cache(|c| c.iter().find(|(b, _)| **b == *bytes).map(|e| e.1.clone()))
    {
        return Ok(hit);
    }
    let loaded = compile_and_check(bytes, origin)?;
    compiled_cache(|c| {
        if c.len() == COMPILED_KEPT {
            c.pop_front();
        }
        c.push_back((bytes.into(), loaded.clone()));
    });
    Ok(loaded)
}

/// Components compiled lately, by their bytes: uploading a plugin checks it, and activating it
/// (or a hot reload of the same file, or each A/B arm) would compile it again, both the
/// component and its core module.
const COMPILED_KEPT: usize = 16;

fn compiled_cache<R>(
    f: impl FnOnce(&mut std::collections::VecDeque<(Box<[u8]>, LoadedComponent)>) -> R,
) -> R {
    static CACHE: std::sync::Mutex<std::collections::VecDeque<(Box<[u8]>, LoadedComponent)>> =
        std::sync::Mutex::new(std::collections::VecDeque::new());
    f(&mut CACHE.lock().unwrap_or_else(|e| e.into_inner()))
}

fn compile_and_check(bytes: &[u8], origin: &str) -> Result<LoadedComponent> {
    let component = compile(bytes, origin)?;
    let mut found = Vec::new();
    for (name, _) in component.component_type().exports(engine()) {
        for (kind, prefix) in [
            (PolicyKind::Selection, "moehost:policy/selection@"),
            (PolicyKind::Eviction, "moehost:policy/eviction@"),
            (PolicyKind::Prefetch, "moehost:policy/prefetch@"),
            (PolicyKind::Placement, "moehost:policy/placement@"),
        ] {
            if let Some(version) = name.strip_prefix(prefix) {
                found.push((kind, name.to_owned(), version.to_owned()));
            }
        }
    }
    let (kind, export, version) = match found.len() {
        0 => bail!(
            "{origin} exports no moehost policy (expected moehost:policy/selection, /eviction, \
             /prefetch or /placement @{WIT_VERSION})"
        ),
        1 => found.pop().unwrap(),
        _ => bail!("{origin} exports several policy interfaces; a plugin is one policy"),
    };
    if !SUPPORTED.iter().any(|v| version.starts_with(v)) {
        bail!(
            "{origin} exports {export}, but this moehost supports moehost:policy@0.2.x and @0.1.x"
        );
    }
    let pre = prepare(&component, origin, &version)?;
    // Not the plain shape (or its core module will not compile on its own): the generic
    // component path serves it, with the same results.
    let direct = DirectModule::new(engine(), bytes, kind, &export)
        .ok()
        .flatten()
        .map(Arc::new);
    Ok(LoadedComponent {
        kind,
        export,
        version,
        pre: PolicyHostIndicesPre { pre },
        direct,
    })
}

struct StoreState {
    limits: super::limiter::PluginLimiter,
    /// The call under way's CPU-time deadline.
    clock: super::deadline::CallClock,
}

/// Arms the deadline of the call about to run: the clock starts now, and wasmtime asks it on
/// every epoch tick.
fn arm_deadline(store: &mut Store<StoreState>, timeout: Duration) {
    store.data_mut().clock = super::deadline::CallClock::start(timeout, EPOCH_TICK);
    store.set_epoch_deadline(1);
}

enum Guest {
    Selection(wsel::Guest),
    Eviction(wev::Guest),
    Prefetch(wpf::Guest),
    Placement(wpl::Guest),
    SelectionV1(wsel1::Guest),
    EvictionV1(wev1::Guest),
    PrefetchV1(wpf1::Guest),
    Direct(Box<DirectGuest>),
}

impl Guest {
    fn kind(&self) -> PolicyKind {
        match self {
            Guest::Selection(_) | Guest::SelectionV1(_) => PolicyKind::Selection,
            Guest::Eviction(_) | Guest::EvictionV1(_) => PolicyKind::Eviction,
            Guest::Prefetch(_) | Guest::PrefetchV1(_) => PolicyKind::Prefetch,
            Guest::Placement(_) => PolicyKind::Placement,
            Guest::Direct(g) => g.kind(),
        }
    }
}

struct Live {
    store: Store<StoreState>,
    guest: Guest,
    /// From the last `init`: turns expert keys into 0.2's model-wide ids and back.
    shape: ModelShape,
    /// Reused buffers for the flat lists of 0.2 calls.
    codes: Vec<u8>,
    ids: Vec<u32>,
    excluded: Vec<u32>,
}

/// One plugin: its component and, once initialised, a live instance.
pub struct WasmPolicy {
    component: LoadedComponent,
    limits: RuntimeLimits,
    live: Option<Live>,
}

impl WasmPolicy {
    pub fn new(component: LoadedComponent, limits: RuntimeLimits) -> Self {
        Self {
            component,
            limits,
            live: None,
        }
    }

    pub fn kind(&self) -> PolicyKind {
        self.component.kind
    }

    pub fn version(&self) -> &str {
        &self.component.version
    }

    /// Whether calls go straight to the core module (see [`LoadedComponent::is_direct`]).
    pub fn is_direct(&self) -> bool {
        self.component.is_direct()
    }

    /// A fresh store and instance (any previous one is dropped).
    fn instantiate(&mut self, shape: ModelShape) -> PolicyResult<&mut Live> {
        self.live = None;
        let mut store = new_store(&self.limits);
        let guest = match &self.component.direct {
            Some(direct) => Guest::Direct(Box::new(
                direct.instantiate(&mut store).map_err(|e| classify(&e))?,
            )),
            None => self.component_guest(&mut store)?,
        };
        Ok(self.live.insert(Live {
            store,
            guest,
            shape,
            codes: Vec::new(),
            ids: Vec::new(),
            excluded: Vec::new(),
        }))
    }

    /// An instance on wasmtime's generic component path, with the bindings of its version.
    fn component_guest(&self, store: &mut Store<StoreState>) -> PolicyResult<Guest> {
        let pre = &self.component.pre.pre;
        let instance = pre.instantiate(&mut *store).map_err(|e| classify(&e))?;
        let v1 = self.component.version.starts_with("0.1.");
        // Each version's bindings for the component's kind, loaded from the instance.
        macro_rules! load {
            ($variant:ident, $bindings:ident) => {
                Guest::$variant(
                    $bindings::GuestIndices::new(pre)
                        .and_then(|i| i.load(&mut *store, &instance))
                        .map_err(|e| classify(&e))?,
                )
            };
        }
        let guest = match (self.component.kind, v1) {
            (PolicyKind::Selection, false) => load!(Selection, wsel),
            (PolicyKind::Eviction, false) => load!(Eviction, wev),
            (PolicyKind::Prefetch, false) => load!(Prefetch, wpf),
            (PolicyKind::Placement, false) => load!(Placement, wpl),
            (PolicyKind::Placement, true) => {
                return Err(PolicyError {
                    kind: FailureKind::InvalidAnswer,
                    message: "contract 0.1 has no placement interface".into(),
                })
            }
            (PolicyKind::Selection, true) => load!(SelectionV1, wsel1),
            (PolicyKind::Eviction, true) => load!(EvictionV1, wev1),
            (PolicyKind::Prefetch, true) => load!(PrefetchV1, wpf1),
        };
        Ok(guest)
    }

    /// Runs `f` under the call deadline.
    fn call_now<R>(
        &mut self,
        want: PolicyKind,
        f: impl FnOnce(&mut Live) -> wasmtime::Result<Option<R>>,
    ) -> PolicyResult<R> {
        let timeout = self.limits.call_timeout;
        self.call(timeout, f, want)
    }

    /// Runs `f` on the live instance under the call deadline; a failure kills the instance.
    fn call<R>(
        &mut self,
        timeout: Duration,
        f: impl FnOnce(&mut Live) -> wasmtime::Result<Option<R>>,
        want: PolicyKind,
    ) -> PolicyResult<R> {
        let live = self.live.as_mut().ok_or_else(|| PolicyError {
            kind: FailureKind::Trap,
            message: "plugin is not initialised".into(),
        })?;
        arm_deadline(&mut live.store, timeout);
        match f(live) {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(PolicyError {
                kind: FailureKind::InvalidAnswer,
                message: format!("plugin is a {} policy, used as {want}", self.component.kind),
            }),
            Err(e) => {
                self.live = None;
                Err(classify(&e))
            }
        }
    }

    /// `init` of a guest of kind `want`, in any contract version, as one answer.
    fn init_any(&mut self, args: &InitArgs, want: PolicyKind) -> PolicyResult<InitAnswer> {
        self.init_with(args, want, |l, a| {
            if l.guest.kind() != want {
                return Ok(None);
            }
            let answer = |name, description, max_score_gap, lookahead| InitAnswer {
                name,
                description,
                max_score_gap,
                lookahead,
            };
            let s = &mut l.store;
            Ok(Some(match &mut l.guest {
                Guest::Selection(g) => {
                    let r = g.call_init(s, a.shape, &a.caps, &a.resident)?;
                    answer(r.info.name, r.info.description, r.max_score_gap, 0)
                }
                Guest::SelectionV1(g) => {
                    let r = g.call_init(s, a.shape1, &a.caps1, &a.resident1)?;
                    answer(r.info.name, r.info.description, r.max_score_gap, 0)
                }
                Guest::Eviction(g) => {
                    let r = g.call_init(s, a.shape, &a.caps, &a.resident)?;
                    answer(r.name, r.description, 0.0, 0)
                }
                Guest::EvictionV1(g) => {
                    let r = g.call_init(s, a.shape1, &a.caps1, &a.resident1)?;
                    answer(r.name, r.description, 0.0, 0)
                }
                Guest::Prefetch(g) => {
                    let r = g.call_init(s, a.shape, &a.caps, &a.resident)?;
                    answer(r.info.name, r.info.description, 0.0, r.lookahead)
                }
                Guest::PrefetchV1(g) => {
                    let r = g.call_init(s, a.shape1, &a.caps1, &a.resident1)?;
                    answer(r.info.name, r.info.description, 0.0, r.lookahead)
                }
                Guest::Placement(g) => {
                    let r = g.call_init(s, a.shape, &a.caps, &a.resident)?;
                    answer(r.name, r.description, 0.0, 0)
                }
                Guest::Direct(g) => g.init(s, &a.flat())?,
            }))
        })
    }

    /// Instantiates afresh and calls `init` under the init deadline.
    fn init_with<R>(
        &mut self,
        args: &InitArgs,
        want: PolicyKind,
        f: impl FnOnce(&mut Live, &Init) -> wasmtime::Result<Option<R>>,
    ) -> PolicyResult<R> {
        self.instantiate(args.shape)?;
        let init = Init::new(args);
        let timeout = self.limits.init_timeout;
        self.call(timeout, |l| f(l, &init), want)
    }
}

/// `init`'s arguments in both contract versions.
struct Init {
    shape: wt::ModelShape,
    caps: Vec<wt::TierCapacity>,
    resident: wt::ResidentSet,
    shape1: wt1::ModelShape,
    caps1: Vec<wt1::TierCapacity>,
    resident1: Vec<wt1::Residency>,
    /// `(tier code, slots, bytes)` per tier, for the direct path.
    caps_flat: Vec<(u8, u32, u64)>,
}

impl Init {
    fn new(args: &InitArgs) -> Self {
        let s = args.shape;
        Self {
            shape: wt::ModelShape {
                moe_layers: s.moe_layers,
                experts_per_layer: s.experts_per_layer,
                top_k: s.top_k,
                expert_bytes: s.expert_bytes,
            },
            caps: args
                .capacities
                .iter()
                .map(|c| wt::TierCapacity {
                    tier: tier_out(c.tier),
                    slots: c.slots,
                    bytes: c.bytes,
                })
                .collect(),
            resident: wt::ResidentSet {
                experts: args.resident.iter().map(|(e, _)| s.id_of(*e)).collect(),
                tiers: args.resident.iter().map(|(_, t)| t.code()).collect(),
            },
            shape1: wt1::ModelShape {
                moe_layers: s.moe_layers,
                experts_per_layer: s.experts_per_layer,
                top_k: s.top_k,
                expert_bytes: s.expert_bytes,
            },
            caps1: args
                .capacities
                .iter()
                .map(|c| wt1::TierCapacity {
                    tier: tier_out1(c.tier),
                    slots: c.slots,
                    bytes: c.bytes,
                })
                .collect(),
            caps_flat: args
                .capacities
                .iter()
                .map(|c| (c.tier.code(), c.slots, c.bytes))
                .collect(),
            resident1: args
                .resident
                .iter()
                .map(|(e, t)| wt1::Residency {
                    expert: key_out1(*e),
                    tier: tier_out1(*t),
                })
                .collect(),
        }
    }
}

impl Init {
    fn flat(&self) -> InitFlat<'_> {
        InitFlat {
            moe_layers: self.shape.moe_layers,
            experts_per_layer: self.shape.experts_per_layer,
            top_k: self.shape.top_k,
            expert_bytes: self.shape.expert_bytes,
            capacities: &self.caps_flat,
            resident_ids: &self.resident.experts,
            resident_tiers: &self.resident.tiers,
        }
    }
}

/// Sorts a wasmtime error into timeout / out-of-memory / trap.
fn classify(e: &wasmtime::Error) -> PolicyError {
    // One line: the trap (or the error's last line), not the wasm backtrace.
    let full = format!("{e:#}");
    let message = match e.downcast_ref::<wasmtime::Trap>() {
        Some(t) => t.to_string(),
        None => full.lines().last().unwrap_or_default().trim().to_owned(),
    };
    let kind = match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => FailureKind::Timeout,
        _ if full.contains("memory") && (full.contains("grow") || full.contains("limit")) => {
            FailureKind::OutOfMemory
        }
        _ => FailureKind::Trap,
    };
    PolicyError { kind, message }
}

/// `tier_out*` / `tier_in*`: the host's `Tier` to and from one contract version's.
macro_rules! tier_conversions {
    ($out:ident, $in:ident, $v:ident) => {
        fn $out(t: Tier) -> $v::Tier {
            match t {
                Tier::Device => $v::Tier::Device,
                Tier::Host => $v::Tier::Host,
                Tier::Disk => $v::Tier::Disk,
            }
        }

        fn $in(t: $v::Tier) -> Tier {
            match t {
                $v::Tier::Device => Tier::Device,
                $v::Tier::Host => Tier::Host,
                $v::Tier::Disk => Tier::Disk,
            }
        }
    };
}
tier_conversions!(tier_out, tier_in, wt);
tier_conversions!(tier_out1, tier_in1, wt1);

fn key_out1(e: ExpertKey) -> wt1::ExpertRef {
    wt1::ExpertRef {
        layer: e.layer,
        expert: e.expert,
    }
}

fn key_in1(e: wt1::ExpertRef) -> ExpertKey {
    ExpertKey {
        layer: e.layer,
        expert: e.expert,
    }
}

/// A model-wide id from the plugin back to a key; out of range stays out of range (the
/// guard rejects it) instead of wrapping onto a valid expert.
fn key_in(shape: &ModelShape, id: u32) -> ExpertKey {
    shape.key_of(id).unwrap_or(ExpertKey {
        layer: u32::MAX,
        expert: id,
    })
}

fn info_in(name: String, description: String) -> PolicyInfo {
    PolicyInfo { name, description }
}

/// Contract 0.2's packed event: `kind << 30 | tier << 28 | expert-id`.
fn event_out(shape: &ModelShape, e: &Event) -> u32 {
    let kind = match e.kind {
        EventKind::Access => 0u32,
        EventKind::Insert => 1,
        EventKind::Remove => 2,
    };
    kind << 30 | u32::from(e.tier.code()) << 28 | shape.id_of(e.expert)
}

fn request_out1(r: &VictimRequest<'_>) -> wev1::VictimRequest {
    wev1::VictimRequest {
        tier: tier_out1(r.tier),
        count: r.count,
        candidates: r.candidates.list().into_iter().map(key_out1).collect(),
    }
}

fn request_out(shape: &ModelShape, r: &VictimRequest<'_>) -> wev::VictimRequest {
    wev::VictimRequest {
        tier: tier_out(r.tier),
        count: r.count,
        excluded: r.excluded.iter().map(|e| shape.id_of(*e)).collect(),
        only_layer: r.only_layer,
    }
}

/// A victim request in 0.2's flat encoding; `excluded` is the buffer for its ids.
fn victims_flat<'a>(
    shape: &ModelShape,
    r: &VictimRequest<'_>,
    excluded: &'a mut Vec<u32>,
) -> VictimsFlat<'a> {
    excluded.clear();
    excluded.extend(r.excluded.iter().map(|e| shape.id_of(*e)));
    VictimsFlat {
        tier: r.tier.code(),
        count: r.count,
        excluded,
        only_layer: r.only_layer,
    }
}

/// 0.2's packed events (see [`event_out`]) into `out`.
fn events_into(out: &mut Vec<u32>, shape: &ModelShape, events: &[Event]) {
    out.clear();
    out.extend(events.iter().map(|e| event_out(shape, e)));
}

fn codes_into(out: &mut Vec<u8>, tiers: &[Tier]) {
    out.clear();
    out.extend(tiers.iter().map(|t| t.code()));
}

impl Selection for WasmPolicy {
    fn init(&mut self, args: &InitArgs) -> PolicyResult<SelectionInfo> {
        let r = self.init_any(args, PolicyKind::Selection)?;
        Ok(SelectionInfo {
            info: info_in(r.name, r.description),
            max_score_gap: r.max_score_gap,
        })
    }

    fn select(
        &mut self,
        layer: u32,
        tokens: u32,
        k: u32,
        scores: &[f32],
        residency: &[Tier],
    ) -> PolicyResult<Vec<u32>> {
        self.call_now(PolicyKind::Selection, |l| {
            Ok(match &mut l.guest {
                Guest::Selection(g) => {
                    codes_into(&mut l.codes, residency);
                    Some(g.call_select(&mut l.store, layer, tokens, k, scores, &l.codes)?)
                }
                Guest::SelectionV1(g) => {
                    let residency: Vec<wt1::Tier> =
                        residency.iter().map(|t| tier_out1(*t)).collect();
                    Some(g.call_select(&mut l.store, layer, tokens, k, scores, &residency)?)
                }
                Guest::Direct(g) => {
                    codes_into(&mut l.codes, residency);
                    g.select(&mut l.store, layer, tokens, k, scores, &l.codes)?
                }
                _ => None,
            })
        })
    }
}

impl Eviction for WasmPolicy {
    fn init(&mut self, args: &InitArgs) -> PolicyResult<PolicyInfo> {
        let r = self.init_any(args, PolicyKind::Eviction)?;
        Ok(info_in(r.name, r.description))
    }

    fn on_step(
        &mut self,
        facts: &StepFacts,
        request: Option<&VictimRequest<'_>>,
    ) -> PolicyResult<Vec<ExpertKey>> {
        self.call_now(PolicyKind::Eviction, |l| {
            Ok(match &mut l.guest {
                Guest::Eviction(g) => {
                    let shape = l.shape;
                    events_into(&mut l.ids, &shape, &facts.events);
                    let f = wev::StepFacts {
                        step: facts.step,
                        layer: facts.layer,
                        events: std::mem::take(&mut l.ids),
                    };
                    let r = request.map(|r| request_out(&shape, r));
                    let v = g.call_on_step(&mut l.store, &f, r.as_ref())?;
                    l.ids = f.events;
                    Some(v.into_iter().map(|id| key_in(&shape, id)).collect())
                }
                Guest::EvictionV1(g) => {
                    let f = wev1::StepFacts {
                        step: facts.step,
                        layer: facts.layer,
                        events: facts
                            .events
                            .iter()
                            .map(|e| wev1::Event {
                                kind: match e.kind {
                                    EventKind::Access => wev1::EventKind::Access,
                                    EventKind::Insert => wev1::EventKind::Insert,
                                    EventKind::Remove => wev1::EventKind::Remove,
                                },
                                tier: tier_out1(e.tier),
                                expert: key_out1(e.expert),
                            })
                            .collect(),
                    };
                    let r = request.map(request_out1);
                    let v = g.call_on_step(&mut l.store, &f, r.as_ref())?;
                    Some(v.into_iter().map(key_in1).collect())
                }
                Guest::Direct(g) => {
                    let shape = l.shape;
                    events_into(&mut l.ids, &shape, &facts.events);
                    let r = request.map(|r| victims_flat(&shape, r, &mut l.excluded));
                    let v = g.on_step(&mut l.store, facts.step, facts.layer, &l.ids, r.as_ref())?;
                    v.map(|v| v.into_iter().map(|id| key_in(&shape, id)).collect())
                }
                _ => None,
            })
        })
    }

    fn victims(&mut self, request: &VictimRequest<'_>) -> PolicyResult<Vec<ExpertKey>> {
        self.call_now(PolicyKind::Eviction, |l| {
            Ok(match &mut l.guest {
                Guest::Eviction(g) => {
                    let shape = l.shape;
                    let v = g.call_victims(&mut l.store, &request_out(&shape, request))?;
                    Some(v.into_iter().map(|id| key_in(&shape, id)).collect())
                }
                Guest::EvictionV1(g) => {
                    let v = g.call_victims(&mut l.store, &request_out1(request))?;
                    Some(v.into_iter().map(key_in1).collect())
                }
                Guest::Direct(g) => {
                    let shape = l.shape;
                    let r = victims_flat(&shape, request, &mut l.excluded);
                    let v = g.victims(&mut l.store, &r)?;
                    v.map(|v| v.into_iter().map(|id| key_in(&shape, id)).collect())
                }
                _ => None,
            })
        })
    }
}

/// A routed step in contract version `$v`'s types, residency codes by `$tier`.
macro_rules! routed_step {
    ($v:ident, $step:expr, $tier:expr) => {
        $v::RoutedStep {
            step: $step.step,
            layer: $step.layer,
            tokens: $step.tokens,
            experts: $step.experts.clone(),
            outlook: $step
                .outlook
                .iter()
                .map(|o| $v::LayerOutlook {
                    layer: o.layer,
                    scores: o.scores.clone(),
                    residency: o.residency.iter().map($tier).collect(),
                })
                .collect(),
        }
    };
}

/// A prefetch answer in the host's types (`$key`, `$tier`: the version's conversions).
macro_rules! prefetch_requests {
    ($answer:expr, $key:expr, $tier:expr) => {
        $answer
            .into_iter()
            .map(|p| PrefetchRequest {
                expert: $key(p.expert),
                tier: $tier(p.tier),
                priority: p.priority,
            })
            .collect()
    };
}

impl Prefetch for WasmPolicy {
    fn init(&mut self, args: &InitArgs) -> PolicyResult<PrefetchInfo> {
        let r = self.init_any(args, PolicyKind::Prefetch)?;
        Ok(PrefetchInfo {
            info: info_in(r.name, r.description),
            lookahead: r.lookahead,
        })
    }

    fn on_routed(&mut self, step: &RoutedStep) -> PolicyResult<Vec<PrefetchRequest>> {
        self.call_now(PolicyKind::Prefetch, |l| {
            Ok(match &mut l.guest {
                Guest::Prefetch(g) => {
                    let shape = l.shape;
                    let s = routed_step!(wpf, step, |t: &Tier| t.code());
                    let r = g.call_on_routed(&mut l.store, &s)?;
                    Some(prefetch_requests!(r, |e| key_in(&shape, e), tier_in))
                }
                Guest::PrefetchV1(g) => {
                    let s = routed_step!(wpf1, step, |t: &Tier| tier_out1(*t));
                    let r = g.call_on_routed(&mut l.store, &s)?;
                    Some(prefetch_requests!(r, key_in1, tier_in1))
                }
                Guest::Direct(g) => {
                    let shape = l.shape;
                    l.codes.clear();
                    for o in &step.outlook {
                        l.codes.extend(o.residency.iter().map(|t| t.code()));
                    }
                    let mut codes = l.codes.as_slice();
                    let outlook: Vec<OutlookFlat<'_>> = step
                        .outlook
                        .iter()
                        .map(|o| {
                            let (residency, rest) = codes.split_at(o.residency.len());
                            codes = rest;
                            OutlookFlat {
                                layer: o.layer,
                                scores: &o.scores,
                                residency,
                            }
                        })
                        .collect();
                    let r = g.on_routed(
                        &mut l.store,
                        step.step,
                        step.layer,
                        step.tokens,
                        &step.experts,
                        &outlook,
                    )?;
                    r.map(|r| {
                        r.into_iter()
                            .map(|(expert, tier, priority)| PrefetchRequest {
                                expert: key_in(&shape, expert),
                                // `direct` checked the code (0..=2).
                                tier: Tier::from_code(tier).unwrap_or(Tier::Disk),
                                priority,
                            })
                            .collect()
                    })
                }
                _ => None,
            })
        })
    }
}

impl Placement for WasmPolicy {
    fn init(&mut self, args: &InitArgs) -> PolicyResult<PolicyInfo> {
        let r = self.init_any(args, PolicyKind::Placement)?;
        Ok(info_in(r.name, r.description))
    }

    fn place(&mut self, r: &PlacementRequest<'_>) -> PolicyResult<Vec<Place>> {
        let codes = self.call_now(PolicyKind::Placement, |l| {
            Ok(match &mut l.guest {
                Guest::Placement(g) => {
                    let shape = l.shape;
                    let c = r.costs;
                    let request = wpl::PlacementRequest {
                        layer: r.layer,
                        experts: r.experts.iter().map(|e| shape.id_of(*e)).collect(),
                        tokens: r.tokens.to_vec(),
                        tiers: r.tiers.iter().map(|t| t.code()).collect(),
                        free_device_slots: r.free_device_slots,
                        costs: wpl::LinkCosts {
                            link_bytes_per_second: c.link_bytes_per_second,
                            link_latency_seconds: c.link_latency_seconds,
                            device_flops: c.device_flops,
                            device_memory_bytes_per_second: c.device_memory_bytes_per_second,
                            host_flops: c.host_flops,
                            host_memory_bytes_per_second: c.host_memory_bytes_per_second,
                            flops_per_token: c.flops_per_token,
                            activation_bytes: c.activation_bytes,
                        },
                    };
                    Some(g.call_place(&mut l.store, &request)?)
                }
                _ => None,
            })
        })?;
        codes
            .iter()
            .map(|&c| {
                Place::from_code(c).ok_or_else(|| PolicyError {
                    kind: FailureKind::InvalidAnswer,
                    message: format!("placement code {c} is neither 0 (fetch) nor 1 (host)"),
                })
            })
            .collect()
    }
}

use v2::exports::moehost::policy0_2_1::pruning as wpr;

/// An expert-pruning ranker (`wit/policy.wit`, interface `pruning`): used offline by
/// `moehost convert --selection`, under the same sandbox as every plugin (no imports, a
/// deadline per call, a memory limit).
pub struct PruningPlugin {
    store: Store<StoreState>,
    guest: wpr::Guest,
    limits: RuntimeLimits,
    pub name: String,
    pub description: String,
}

impl PruningPlugin {
    pub fn load(bytes: &[u8], origin: &str, limits: RuntimeLimits) -> Result<Self> {
        let component = compile(bytes, origin)?;
        let exports_pruning = component
            .component_type()
            .exports(engine())
            .any(|(n, _)| n.starts_with("moehost:policy/pruning@0.2."));
        if !exports_pruning {
            bail!(
                "{origin} exports no moehost:policy/pruning@0.2.x (an expert-pruning ranker: world \
                 pruning-policy in wit/policy.wit)"
            );
        }
        let pre = prepare(&component, origin, WIT_VERSION)?;
        let mut store = new_store(&limits);
        let instance = pre
            .instantiate(&mut store)
            .map_err(|e| anyhow::anyhow!("{origin}: {}", classify(&e)))?;
        let guest = wpr::GuestIndices::new(&pre)
            .and_then(|i| i.load(&mut store, &instance))
            .map_err(|e| anyhow::anyhow!("{origin}: {}", classify(&e)))?;
        let info = guest
            .call_info(&mut store)
            .map_err(|e| anyhow::anyhow!("{origin}: info failed: {}", classify(&e)))?;
        Ok(Self {
            store,
            guest,
            limits,
            name: info.name,
            description: info.description,
        })
    }

    /// The plugin's ranking of one layer's experts, validated: the first `keep` are distinct
    /// and in range. An error names what went wrong (the caller falls back).
    pub fn rank(
        &mut self,
        shape: ModelShape,
        layer: u32,
        counts: &[u32],
        mass: &[f32],
        keep: u32,
    ) -> PolicyResult<Vec<u32>> {
        let s = &mut self.store;
        arm_deadline(s, self.limits.init_timeout);
        let stats = wpr::LayerStats {
            layer,
            counts: counts.to_vec(),
            mass: mass.to_vec(),
        };
        let wshape = wt::ModelShape {
            moe_layers: shape.moe_layers,
            experts_per_layer: shape.experts_per_layer,
            top_k: shape.top_k,
            expert_bytes: shape.expert_bytes,
        };
        let ranked = self
            .guest
            .call_rank_experts(&mut *s, wshape, &stats, keep)
            .map_err(|e| classify(&e))?;
        let e = shape.experts_per_layer;
        let mut seen = vec![false; e as usize];
        let mut out = Vec::with_capacity(keep as usize);
        for &x in &ranked {
            if out.len() == keep as usize {
                break;
            }
            if x >= e || std::mem::replace(&mut seen[x as usize], true) {
                return Err(PolicyError {
                    kind: FailureKind::InvalidAnswer,
                    message: format!("expert {x} out of range (0..{e}) or ranked twice"),
                });
            }
            out.push(x);
        }
        if out.len() < keep as usize {
            return Err(PolicyError {
                kind: FailureKind::InvalidAnswer,
                message: format!("ranked {} experts, {keep} are kept", out.len()),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_bytes_are_compiled_once() {
        let lru = crate::policy::bundled::bytes("lru").unwrap();
        let direct = |c: &LoadedComponent| c.direct.clone().expect("lru is called directly");
        let a = load_component(lru, "a").unwrap();
        let b = load_component(lru, "b").unwrap();
        assert!(Arc::ptr_eq(&direct(&a), &direct(&b)));
        let lfu = load_component(crate::policy::bundled::bytes("lfu").unwrap(), "c").unwrap();
        assert!(!Arc::ptr_eq(&direct(&a), &direct(&lfu)));
        // What fails to load is not kept: it fails again, naming its origin.
        for origin in ["upload-7", "upload-8"] {
            let Err(e) = load_component(b"not wasm", origin) else {
                panic!("garbage loaded");
            };
            assert!(format!("{e:#}").contains(origin), "{e:#}");
        }
    }
}
