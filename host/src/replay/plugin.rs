//! Driving an eviction policy through its contract (`wit/policy.wit`), as the live store does:
//! one `on-step` call per (step, layer) with every event since the previous call (the previous
//! visit's removes and inserts, then this visit's accesses) and one victim request when the
//! misses need room; `victims` for further requests in the same visit. Candidates are listed in
//! ascending (layer, expert) order, so a replay is deterministic.

use crate::policy::wasm::{LoadedComponent, RuntimeLimits, WasmPolicy};
use crate::policy::{
    EventKind, Eviction, ExpertKey, GuardedEviction, GuardedPrefetch, InitArgs, PolicyStats,
    PrefetchRequest, RoutedStep, StepFacts, Tier, VictimRequest,
};

use super::engine::{Evictor, Prefetcher};
use super::schedule::Visit;
use crate::experts::tiered::events::EventLog;
use crate::experts::tiered::residency::{Offered, Request, Residency};

/// An eviction policy behind its calls: a guarded plugin, or a trusted native policy.
///
/// `init` gives the current residency for a re-initialisation.
pub trait EvictionCalls: Send {
    fn on_step(
        &mut self,
        facts: &StepFacts,
        request: Option<&VictimRequest<'_>>,
        init: &dyn Fn() -> InitArgs,
    ) -> Vec<ExpertKey>;
    fn victims(
        &mut self,
        request: &VictimRequest<'_>,
        init: &dyn Fn() -> InitArgs,
    ) -> Vec<ExpertKey>;
    /// The guard's counters (plugins only).
    fn stats(&self) -> Option<PolicyStats>;
}

/// The host's own guard (`policy::guard`), as the live store uses it.
impl EvictionCalls for GuardedEviction {
    fn on_step(
        &mut self,
        facts: &StepFacts,
        request: Option<&VictimRequest<'_>>,
        init: &dyn Fn() -> InitArgs,
    ) -> Vec<ExpertKey> {
        GuardedEviction::on_step(self, facts, request, init)
    }

    fn victims(
        &mut self,
        request: &VictimRequest<'_>,
        init: &dyn Fn() -> InitArgs,
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
        request: Option<&VictimRequest<'_>>,
        _: &dyn Fn() -> InitArgs,
    ) -> Vec<ExpertKey> {
        self.0
            .on_step(facts, request)
            .expect("native eviction policies do not fail")
    }

    fn victims(&mut self, request: &VictimRequest<'_>, _: &dyn Fn() -> InitArgs) -> Vec<ExpertKey> {
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
    step: u64,
    layer: u32,
    /// What the policy has not been told yet, as the live store keeps it.
    log: EventLog,
    excluded: Vec<ExpertKey>,
}

impl<'p> ContractEvictor<'p> {
    pub fn new(calls: &'p mut dyn EvictionCalls, experts_per_layer: u32) -> Self {
        Self {
            calls,
            step: 0,
            layer: 0,
            log: EventLog::new(experts_per_layer),
            excluded: Vec::new(),
        }
    }

    /// The guard's counters of the policy behind this evictor (plugins only).
    pub fn stats(&self) -> Option<PolicyStats> {
        self.calls.stats()
    }

    /// Fills `self.excluded` for `r`.
    fn exclude(&mut self, res: &Residency, r: &Request) {
        self.excluded.clear();
        let excluded = &mut self.excluded;
        res.excluded(r, &[], |k| excluded.push(res.key(k)));
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
            self.log.push(EventKind::Access, Tier::Device, k);
        }
    }

    fn on_step(&mut self, res: &Residency, request: Option<Request>, out: &mut Vec<u32>) {
        // This call delivers every pending event: the policy then knows every resident.
        let facts = StepFacts {
            step: self.step,
            layer: self.layer,
            events: self.log.take(),
        };
        if let Some(r) = &request {
            self.exclude(res, r);
        }
        let candidates = request.map(|request| Offered {
            res,
            request,
            hidden: &[],
        });
        let request = request
            .as_ref()
            .zip(candidates.as_ref())
            .map(|(r, c)| VictimRequest {
                tier: r.tier,
                count: r.count,
                only_layer: res.per_layer.then_some(r.pool),
                excluded: &self.excluded,
                candidates: c,
            });
        let victims = self
            .calls
            .on_step(&facts, request.as_ref(), &|| res.init_args());
        dense(res, victims, out);
        self.log.recycle(facts.events);
    }

    fn victims(&mut self, res: &Residency, request: Request, out: &mut Vec<u32>) {
        self.exclude(res, &request);
        self.log.fit(res.n_keys() as usize);
        let hidden = [self.log.unreported(request.tier)];
        // Residents the policy has not heard of are not offered.
        let count = request.count.min(res.candidate_count(&request, &hidden));
        if count == 0 {
            return;
        }
        let candidates = Offered {
            res,
            request,
            hidden: &hidden,
        };
        let r = VictimRequest {
            tier: request.tier,
            count,
            only_layer: res.per_layer.then_some(request.pool),
            excluded: &self.excluded,
            candidates: &candidates,
        };
        let victims = self.calls.victims(&r, &|| res.init_args());
        dense(res, victims, out);
    }

    fn inserted(&mut self, key: u32, tier: Tier) {
        self.log.push(EventKind::Insert, tier, key);
    }

    fn removed(&mut self, key: u32, tier: Tier) {
        self.log.push(EventKind::Remove, tier, key);
    }
}
