//! Driving an eviction policy through its contract (`wit/policy.wit`), as the live store does:
//! one `on-step` call per (step, layer) with every event since the previous call (the previous
//! visit's removes and inserts, then this visit's accesses) and one victim request when the
//! misses need room; `victims` for further requests in the same visit. Candidates are listed in
//! ascending (layer, expert) order, so a replay is deterministic.

use crate::policy::wasm::{LoadedComponent, RuntimeLimits, WasmPolicy};
use crate::policy::{
    Event, EventKind, Eviction, ExpertKey, GuardedEviction, GuardedPrefetch, InitArgs, PolicyStats,
    PrefetchRequest, RoutedStep, StepFacts, Tier, VictimRequest,
};

use super::engine::{Evictor, Prefetcher};
use super::residency::{Request, Residency};
use super::schedule::Visit;

/// An eviction policy behind its calls: a guarded plugin, or a trusted native policy.
///
/// `init` gives the current residency for a re-initialisation; `is_candidate` tells whether a
/// key is one of the request's candidates (for validation without scanning them).
pub trait EvictionCalls: Send {
    fn on_step(
        &mut self,
        facts: &StepFacts,
        request: Option<&VictimRequest>,
        init: &dyn Fn() -> InitArgs,
        is_candidate: &dyn Fn(ExpertKey) -> bool,
    ) -> Vec<ExpertKey>;
    fn victims(
        &mut self,
        request: &VictimRequest,
        init: &dyn Fn() -> InitArgs,
        is_candidate: &dyn Fn(ExpertKey) -> bool,
    ) -> Vec<ExpertKey>;
    /// The guard's counters (plugins only).
    fn stats(&self) -> Option<PolicyStats>;
}

/// The host's own guard (`policy::guard`), as the live store uses it.
impl EvictionCalls for GuardedEviction {
    fn on_step(
        &mut self,
        facts: &StepFacts,
        request: Option<&VictimRequest>,
        init: &dyn Fn() -> InitArgs,
        _: &dyn Fn(ExpertKey) -> bool,
    ) -> Vec<ExpertKey> {
        GuardedEviction::on_step(self, facts, request, init)
    }

    fn victims(
        &mut self,
        request: &VictimRequest,
        init: &dyn Fn() -> InitArgs,
        _: &dyn Fn(ExpertKey) -> bool,
    ) -> Vec<ExpertKey> {
        GuardedEviction::victims(self, request, init)
    }

    fn stats(&self) -> Option<PolicyStats> {
        Some(GuardedEviction::stats(self).clone())
    }
}

/// A native policy called directly (it cannot fail; its answers are trusted).
pub struct Native<E: Eviction>(pub E);

impl<E: Eviction> EvictionCalls for Native<E> {
    fn on_step(
        &mut self,
        facts: &StepFacts,
        request: Option<&VictimRequest>,
        _: &dyn Fn() -> InitArgs,
        _: &dyn Fn(ExpertKey) -> bool,
    ) -> Vec<ExpertKey> {
        self.0
            .on_step(facts, request)
            .expect("native eviction policies do not fail")
    }

    fn victims(
        &mut self,
        request: &VictimRequest,
        _: &dyn Fn() -> InitArgs,
        _: &dyn Fn(ExpertKey) -> bool,
    ) -> Vec<ExpertKey> {
        self.0
            .victims(request)
            .expect("native eviction policies do not fail")
    }

    fn stats(&self) -> Option<PolicyStats> {
        None
    }
}

/// A guarded WebAssembly eviction plugin, initialised for `args`.
pub fn guarded_eviction(
    component: &LoadedComponent,
    source: &str,
    limits: RuntimeLimits,
    args: &InitArgs,
) -> anyhow::Result<GuardedEviction> {
    let plugin = WasmPolicy::new(component.clone(), limits);
    let mut g = GuardedEviction::new(
        Some(Box::new(plugin)),
        source,
        &component.version,
        limits.quarantine_after,
    );
    g.init(args)
        .map_err(|e| anyhow::anyhow!("eviction policy {source} failed to initialise: {e}"))?;
    Ok(g)
}

/// A WebAssembly eviction plugin behind the replay's guard (`super::guard`).
pub fn replay_guarded_eviction(
    component: &LoadedComponent,
    source: &str,
    limits: RuntimeLimits,
    args: &InitArgs,
) -> anyhow::Result<super::guard::ReplayGuard> {
    let plugin = WasmPolicy::new(component.clone(), limits);
    super::guard::ReplayGuard::new(
        Box::new(plugin),
        source,
        &component.version,
        limits.quarantine_after,
        args,
    )
    .map_err(|e| anyhow::anyhow!("eviction policy {source} failed to initialise: {e}"))
}

/// A guarded WebAssembly prefetch plugin, initialised for `args`.
pub fn guarded_prefetch(
    component: &LoadedComponent,
    source: &str,
    limits: RuntimeLimits,
    args: &InitArgs,
) -> anyhow::Result<GuardedPrefetch> {
    let plugin = WasmPolicy::new(component.clone(), limits);
    let mut g = GuardedPrefetch::new(
        Some(Box::new(plugin)),
        source,
        &component.version,
        limits.quarantine_after,
    );
    g.init(args)
        .map_err(|e| anyhow::anyhow!("prefetch policy {source} failed to initialise: {e}"))?;
    Ok(g)
}

impl Prefetcher for GuardedPrefetch {
    fn lookahead(&self) -> u32 {
        GuardedPrefetch::lookahead(self)
    }

    fn on_routed(
        &mut self,
        step: &RoutedStep,
        init: &dyn Fn() -> InitArgs,
    ) -> Vec<PrefetchRequest> {
        GuardedPrefetch::on_routed(self, step, init)
    }
}

/// An `Evictor` that speaks the policy contract.
pub struct ContractEvictor<'p> {
    calls: &'p mut dyn EvictionCalls,
    experts_per_layer: u32,
    step: u64,
    layer: u32,
    events: Vec<Event>,
    candidates: Vec<ExpertKey>,
}

impl<'p> ContractEvictor<'p> {
    pub fn new(calls: &'p mut dyn EvictionCalls, experts_per_layer: u32) -> Self {
        Self {
            calls,
            experts_per_layer,
            step: 0,
            layer: 0,
            events: Vec::new(),
            candidates: Vec::new(),
        }
    }

    fn request(&mut self, res: &Residency, r: &Request) -> VictimRequest {
        let mut candidates = std::mem::take(&mut self.candidates);
        candidates.clear();
        res.candidates(r, |k| candidates.push(res.key(k)));
        VictimRequest {
            tier: r.tier,
            count: r.count,
            candidates,
        }
    }

    fn key(&self, k: u32) -> ExpertKey {
        ExpertKey {
            layer: k / self.experts_per_layer,
            expert: k % self.experts_per_layer,
        }
    }

    fn event(&mut self, kind: EventKind, tier: Tier, key: ExpertKey) {
        self.events.push(Event {
            kind,
            tier,
            expert: key,
        });
    }
}

fn dense(res: &Residency, victims: Vec<ExpertKey>, out: &mut Vec<u32>) {
    out.extend(victims.into_iter().filter_map(|e| res.dense(e)));
}

impl Evictor for ContractEvictor<'_> {
    fn begin_visit(&mut self, _vi: usize, v: &Visit, keys: &[u32]) {
        self.step = v.step;
        self.layer = v.layer;
        for &k in keys {
            let key = self.key(k);
            self.event(EventKind::Access, Tier::Device, key);
        }
    }

    fn on_step(&mut self, res: &Residency, request: Option<Request>, out: &mut Vec<u32>) {
        let facts = StepFacts {
            step: self.step,
            layer: self.layer,
            events: std::mem::take(&mut self.events),
        };
        let dense_request = request;
        let request = request.map(|r| self.request(res, &r));
        let is_candidate = |e: ExpertKey| {
            dense_request.is_some_and(|r| res.dense(e).is_some_and(|k| res.is_candidate(k, &r)))
        };
        let victims =
            self.calls
                .on_step(&facts, request.as_ref(), &|| res.init_args(), &is_candidate);
        dense(res, victims, out);
        self.events = facts.events;
        self.events.clear();
        if let Some(r) = request {
            self.candidates = r.candidates;
        }
    }

    fn victims(&mut self, res: &Residency, request: Request, out: &mut Vec<u32>) {
        let r = self.request(res, &request);
        let is_candidate =
            |e: ExpertKey| res.dense(e).is_some_and(|k| res.is_candidate(k, &request));
        let victims = self.calls.victims(&r, &|| res.init_args(), &is_candidate);
        dense(res, victims, out);
        self.candidates = r.candidates;
    }

    fn inserted(&mut self, key: u32, tier: Tier) {
        let k = self.key(key);
        self.event(EventKind::Insert, tier, k);
    }

    fn removed(&mut self, key: u32, tier: Tier) {
        let k = self.key(key);
        self.event(EventKind::Remove, tier, k);
    }
}
