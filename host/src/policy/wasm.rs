//! Policies as WebAssembly components (wasmtime, component model).
//!
//! Owns: the shared engine with its epoch ticker, loading and checking a component (it must
//! export exactly one supported policy world and import nothing), instantiating it in a store
//! with memory limits, and calling it under a deadline. A trapped store is dropped; the next
//! `init` instantiates afresh from the cached `InstancePre`.
//! Does not own: validating answers or falling back (`guard`).

use anyhow::{bail, Result};
use std::sync::OnceLock;
use std::time::Duration;
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};

use super::*;

wasmtime::component::bindgen!({
    path: "../wit",
    world: "policy-host",
});

use exports::moehost::policy::eviction as wev;
use exports::moehost::policy::prefetch as wpf;
use exports::moehost::policy::selection as wsel;
use moehost::policy::types as wt;

/// The WIT package version this host implements; components of any 0.1.x load.
pub const WIT_VERSION: &str = "0.1.0";
/// The type-only interface every plugin imports implicitly.
const TYPES_PREFIX: &str = "moehost:policy/types@";
const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Bounds on every plugin.
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
}

impl Default for RuntimeLimits {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_millis(10),
            init_timeout: Duration::from_millis(500),
            memory_bytes: 128 << 20,
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
}

#[derive(Clone)]
struct PolicyHostIndicesPre {
    pre: InstancePre<StoreState>,
}

/// Compiles `bytes` and checks the component: one exported policy world of a supported
/// version and no imports.
pub fn load_component(bytes: &[u8], origin: &str) -> Result<LoadedComponent> {
    let engine = engine();
    let component = Component::from_binary(engine, bytes)
        .map_err(|e| anyhow::anyhow!("{origin} is not a valid WebAssembly component: {e:#}"))?;
    let ty = component.component_type();
    // The one import allowed is the contract's own type-only `types` interface, which the
    // component model imports implicitly because the exported interfaces `use` it.
    let imports: Vec<String> = ty
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
    let mut found = Vec::new();
    for (name, _) in ty.exports(engine) {
        for (kind, prefix) in [
            (PolicyKind::Selection, "moehost:policy/selection@"),
            (PolicyKind::Eviction, "moehost:policy/eviction@"),
            (PolicyKind::Prefetch, "moehost:policy/prefetch@"),
        ] {
            if let Some(version) = name.strip_prefix(prefix) {
                found.push((kind, name.to_owned(), version.to_owned()));
            }
        }
    }
    let (kind, export, version) = match found.len() {
        0 => bail!(
            "{origin} exports no moehost policy (expected moehost:policy/selection, /eviction or \
             /prefetch @{WIT_VERSION})"
        ),
        1 => found.pop().unwrap(),
        _ => bail!("{origin} exports several policy interfaces; a plugin is one policy"),
    };
    if !version.starts_with("0.1.") {
        bail!("{origin} exports {export}, but this moehost supports moehost:policy@0.1.x");
    }
    let mut linker = Linker::<StoreState>::new(engine);
    linker
        .instance(&format!("{TYPES_PREFIX}{WIT_VERSION}"))
        .map_err(|e| anyhow::anyhow!("cannot define the types interface: {e:#}"))?;
    let pre = linker
        .instantiate_pre(&component)
        .map_err(|e| anyhow::anyhow!("cannot prepare {origin}: {e:#}"))?;
    Ok(LoadedComponent {
        kind,
        export,
        version,
        pre: PolicyHostIndicesPre { pre },
    })
}

struct StoreState {
    limits: StoreLimits,
}

enum Guest {
    Selection(wsel::Guest),
    Eviction(wev::Guest),
    Prefetch(wpf::Guest),
}

struct Live {
    store: Store<StoreState>,
    guest: Guest,
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

    /// A fresh store and instance (any previous one is dropped).
    fn instantiate(&mut self) -> PolicyResult<&mut Live> {
        self.live = None;
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.memory_bytes)
            .instances(4)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(engine(), StoreState { limits });
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(deadline_ticks(self.limits.init_timeout));
        let pre = &self.component.pre.pre;
        let instance = pre.instantiate(&mut store).map_err(|e| classify(&e))?;
        let guest = match self.component.kind {
            PolicyKind::Selection => Guest::Selection(
                wsel::GuestIndices::new(pre)
                    .and_then(|i| i.load(&mut store, &instance))
                    .map_err(|e| classify(&e))?,
            ),
            PolicyKind::Eviction => Guest::Eviction(
                wev::GuestIndices::new(pre)
                    .and_then(|i| i.load(&mut store, &instance))
                    .map_err(|e| classify(&e))?,
            ),
            PolicyKind::Prefetch => Guest::Prefetch(
                wpf::GuestIndices::new(pre)
                    .and_then(|i| i.load(&mut store, &instance))
                    .map_err(|e| classify(&e))?,
            ),
        };
        Ok(self.live.insert(Live { store, guest }))
    }

    /// Runs `f` on the live instance under the call deadline; a failure kills the instance.
    fn call<R>(
        &mut self,
        timeout: Duration,
        f: impl FnOnce(&Guest, &mut Store<StoreState>) -> wasmtime::Result<R>,
    ) -> PolicyResult<R> {
        let live = self.live.as_mut().ok_or_else(|| PolicyError {
            kind: FailureKind::Trap,
            message: "plugin is not initialised".into(),
        })?;
        live.store.set_epoch_deadline(deadline_ticks(timeout));
        match f(&live.guest, &mut live.store) {
            Ok(r) => Ok(r),
            Err(e) => {
                self.live = None;
                Err(classify(&e))
            }
        }
    }

    fn init_args(args: &InitArgs) -> (wt::ModelShape, Vec<wt::TierCapacity>, Vec<wt::Residency>) {
        let s = args.shape;
        (
            wt::ModelShape {
                moe_layers: s.moe_layers,
                experts_per_layer: s.experts_per_layer,
                top_k: s.top_k,
                expert_bytes: s.expert_bytes,
            },
            args.capacities
                .iter()
                .map(|c| wt::TierCapacity {
                    tier: tier_out(c.tier),
                    slots: c.slots,
                    bytes: c.bytes,
                })
                .collect(),
            args.resident
                .iter()
                .map(|(e, t)| wt::Residency {
                    expert: key_out(*e),
                    tier: tier_out(*t),
                })
                .collect(),
        )
    }

    fn wrong_kind(&self, want: PolicyKind) -> PolicyError {
        PolicyError {
            kind: FailureKind::InvalidAnswer,
            message: format!("plugin is a {} policy, used as {want}", self.component.kind),
        }
    }
}

fn deadline_ticks(d: Duration) -> u64 {
    (d.as_micros() as u64)
        .div_ceil(EPOCH_TICK.as_micros() as u64)
        .max(1)
        + 1
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

fn tier_out(t: Tier) -> wt::Tier {
    match t {
        Tier::Device => wt::Tier::Device,
        Tier::Host => wt::Tier::Host,
        Tier::Disk => wt::Tier::Disk,
    }
}

fn tier_in(t: wt::Tier) -> Tier {
    match t {
        wt::Tier::Device => Tier::Device,
        wt::Tier::Host => Tier::Host,
        wt::Tier::Disk => Tier::Disk,
    }
}

fn key_out(e: ExpertKey) -> wt::ExpertRef {
    wt::ExpertRef {
        layer: e.layer,
        expert: e.expert,
    }
}

fn key_in(e: wt::ExpertRef) -> ExpertKey {
    ExpertKey {
        layer: e.layer,
        expert: e.expert,
    }
}

fn info_in(i: wt::PolicyInfo) -> PolicyInfo {
    PolicyInfo {
        name: i.name,
        description: i.description,
    }
}

fn request_out(r: &VictimRequest) -> wev::VictimRequest {
    wev::VictimRequest {
        tier: tier_out(r.tier),
        count: r.count,
        candidates: r.candidates.iter().map(|e| key_out(*e)).collect(),
    }
}

impl Selection for WasmPolicy {
    fn init(&mut self, args: &InitArgs) -> PolicyResult<SelectionInfo> {
        let (shape, caps, resident) = Self::init_args(args);
        self.instantiate()?;
        let timeout = self.limits.init_timeout;
        let r = self.call(timeout, |g, s| match g {
            Guest::Selection(g) => g.call_init(s, shape, &caps, &resident).map(Some),
            _ => Ok(None),
        })?;
        let r = r.ok_or_else(|| self.wrong_kind(PolicyKind::Selection))?;
        Ok(SelectionInfo {
            info: info_in(r.info),
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
        let residency: Vec<wt::Tier> = residency.iter().map(|t| tier_out(*t)).collect();
        let timeout = self.limits.call_timeout;
        let r = self.call(timeout, |g, s| match g {
            Guest::Selection(g) => g
                .call_select(s, layer, tokens, k, scores, &residency)
                .map(Some),
            _ => Ok(None),
        })?;
        r.ok_or_else(|| self.wrong_kind(PolicyKind::Selection))
    }
}

impl Eviction for WasmPolicy {
    fn init(&mut self, args: &InitArgs) -> PolicyResult<PolicyInfo> {
        let (shape, caps, resident) = Self::init_args(args);
        self.instantiate()?;
        let timeout = self.limits.init_timeout;
        let r = self.call(timeout, |g, s| match g {
            Guest::Eviction(g) => g.call_init(s, shape, &caps, &resident).map(Some),
            _ => Ok(None),
        })?;
        r.map(info_in)
            .ok_or_else(|| self.wrong_kind(PolicyKind::Eviction))
    }

    fn on_step(
        &mut self,
        facts: &StepFacts,
        request: Option<&VictimRequest>,
    ) -> PolicyResult<Vec<ExpertKey>> {
        let facts = wev::StepFacts {
            step: facts.step,
            layer: facts.layer,
            events: facts
                .events
                .iter()
                .map(|e| wev::Event {
                    kind: match e.kind {
                        EventKind::Access => wev::EventKind::Access,
                        EventKind::Insert => wev::EventKind::Insert,
                        EventKind::Remove => wev::EventKind::Remove,
                    },
                    tier: tier_out(e.tier),
                    expert: key_out(e.expert),
                })
                .collect(),
        };
        let request = request.map(request_out);
        let timeout = self.limits.call_timeout;
        let r = self.call(timeout, |g, s| match g {
            Guest::Eviction(g) => g.call_on_step(s, &facts, request.as_ref()).map(Some),
            _ => Ok(None),
        })?;
        r.map(|v| v.into_iter().map(key_in).collect())
            .ok_or_else(|| self.wrong_kind(PolicyKind::Eviction))
    }

    fn victims(&mut self, request: &VictimRequest) -> PolicyResult<Vec<ExpertKey>> {
        let request = request_out(request);
        let timeout = self.limits.call_timeout;
        let r = self.call(timeout, |g, s| match g {
            Guest::Eviction(g) => g.call_victims(s, &request).map(Some),
            _ => Ok(None),
        })?;
        r.map(|v| v.into_iter().map(key_in).collect())
            .ok_or_else(|| self.wrong_kind(PolicyKind::Eviction))
    }
}

impl Prefetch for WasmPolicy {
    fn init(&mut self, args: &InitArgs) -> PolicyResult<PrefetchInfo> {
        let (shape, caps, resident) = Self::init_args(args);
        self.instantiate()?;
        let timeout = self.limits.init_timeout;
        let r = self.call(timeout, |g, s| match g {
            Guest::Prefetch(g) => g.call_init(s, shape, &caps, &resident).map(Some),
            _ => Ok(None),
        })?;
        let r = r.ok_or_else(|| self.wrong_kind(PolicyKind::Prefetch))?;
        Ok(PrefetchInfo {
            info: info_in(r.info),
            lookahead: r.lookahead,
        })
    }

    fn on_routed(&mut self, step: &RoutedStep) -> PolicyResult<Vec<PrefetchRequest>> {
        let step = wpf::RoutedStep {
            step: step.step,
            layer: step.layer,
            tokens: step.tokens,
            experts: step.experts.clone(),
            outlook: step
                .outlook
                .iter()
                .map(|o| wpf::LayerOutlook {
                    layer: o.layer,
                    scores: o.scores.clone(),
                    residency: o.residency.iter().map(|t| tier_out(*t)).collect(),
                })
                .collect(),
        };
        let timeout = self.limits.call_timeout;
        let r = self.call(timeout, |g, s| match g {
            Guest::Prefetch(g) => g.call_on_routed(s, &step).map(Some),
            _ => Ok(None),
        })?;
        let r = r.ok_or_else(|| self.wrong_kind(PolicyKind::Prefetch))?;
        Ok(r.into_iter()
            .map(|p| PrefetchRequest {
                expert: key_in(p.expert),
                tier: tier_in(p.tier),
                priority: p.priority,
            })
            .collect())
    }
}
