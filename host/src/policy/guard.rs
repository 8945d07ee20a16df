//! The host's distrust of plugins, in one place.
//!
//! Every plugin answer is validated; a trap, timeout, out-of-memory or invalid answer is
//! counted, logged (the first few, then at quarantine), and that call is served by the built-in
//! policy. The plugin is re-initialised (fresh instance, current residency) before its next
//! call, and after `quarantine_after` failures in a row (or 3x that many in all) it is no
//! longer called. The
//! built-in policy always observes the same facts, so falling back keeps its state warm.

use serde::Serialize;
use std::time::Instant;

use super::builtin::{CostModel, ExactTopK, Lru, NoPrefetch};
use super::*;

/// Counters of one policy slot.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PolicyStats {
    /// The plugin in use (`builtin-...` when none).
    pub name: String,
    pub source: String,
    pub version: String,
    pub calls: u64,
    /// Calls served by the built-in policy because the plugin failed or is quarantined.
    pub fallbacks: u64,
    pub timeouts: u64,
    pub out_of_memory: u64,
    pub traps: u64,
    pub invalid_answers: u64,
    pub reinits: u64,
    pub quarantined: bool,
    /// Time spent in plugin calls (validation included), nanoseconds.
    pub call_ns: u64,
    /// The most recent failure, e.g. `InvalidAnswer: returned 3 victims, 4 were asked for`.
    pub last_error: Option<String>,
    /// Mean time of its recent calls (over about the last thousand), microseconds.
    pub recent_call_us: f64,
    /// Its recent calls take more than [`SLOW_CALL_US`] on average: within its deadline, but
    /// costing the model real time (warned once).
    pub slow: bool,
    /// Calls in the recent mean.
    #[serde(skip)]
    recent_calls: u64,
}

/// A plugin whose calls average more than this is flagged slow: at Kimi-K2's 60 MoE layers one
/// such call per layer step costs 6 ms a token per policy kind, where the bundled policies
/// take 1-2 us (`moehost policy bench`).
pub const SLOW_CALL_US: f64 = 100.0;

/// Longest plugin name kept: a name lands in logs, `/metrics` and the admin API.
pub const MAX_PLUGIN_NAME: usize = 64;

impl PolicyStats {
    /// Sets the name a plugin reports: cut to [`MAX_PLUGIN_NAME`] characters, control
    /// characters replaced by `?` (a plugin's text is never trusted).
    pub fn set_name(&mut self, name: &str) {
        self.name = name
            .chars()
            .take(MAX_PLUGIN_NAME)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
    }
}

const LOG_FIRST: u64 = 5;
/// A plugin that fails only some calls is quarantined once its recent failures reach this
/// multiple of `quarantine_after`, in a row or not (so one failing function cannot cost a
/// deadline forever).
const QUARANTINE_TOTAL_FACTOR: f64 = 3.0;
/// "Recent" spans about this many calls: each call decays the failure count by 1/WINDOW, so a
/// good plugin's rare failures (a deadline missed under load now and then) fade instead of
/// adding up over a long-running server's life.
const QUARANTINE_WINDOW: f64 = 1000.0;

/// A plugin slot: the plugin (if any), its health and its counters.
struct Slot<P: ?Sized> {
    kind: PolicyKind,
    plugin: Option<Box<P>>,
    needs_init: bool,
    consecutive_failures: u32,
    /// Failures decayed per call (see [`QUARANTINE_WINDOW`]).
    recent_failures: f64,
    quarantine_after: u32,
    /// Smoke tests report failures themselves.
    quiet: bool,
    stats: PolicyStats,
}

impl<P: ?Sized> Slot<P> {
    fn new(
        kind: PolicyKind,
        plugin: Option<Box<P>>,
        source: &str,
        version: &str,
        quarantine_after: u32,
    ) -> Self {
        Self {
            kind,
            needs_init: plugin.is_some(),
            plugin,
            consecutive_failures: 0,
            recent_failures: 0.0,
            quarantine_after,
            quiet: false,
            stats: PolicyStats {
                source: source.to_owned(),
                version: version.to_owned(),
                ..Default::default()
            },
        }
    }

    fn fail(&mut self, e: PolicyError) {
        match e.kind {
            FailureKind::Timeout => self.stats.timeouts += 1,
            FailureKind::OutOfMemory => self.stats.out_of_memory += 1,
            FailureKind::Trap => self.stats.traps += 1,
            FailureKind::InvalidAnswer => self.stats.invalid_answers += 1,
        }
        self.stats.fallbacks += 1;
        self.needs_init = true;
        self.consecutive_failures += 1;
        self.stats.last_error = Some(e.to_string());
        let failures = self.stats.timeouts
            + self.stats.out_of_memory
            + self.stats.traps
            + self.stats.invalid_answers;
        if failures <= LOG_FIRST && !self.quiet {
            tracing::warn!(
                kind = %self.kind, policy = ?self.stats.name, error = %e,
                "policy call failed; served by the built-in policy"
            );
        }
        self.recent_failures += 1.0;
        let too_many =
            self.recent_failures >= f64::from(self.quarantine_after) * QUARANTINE_TOTAL_FACTOR;
        if (self.consecutive_failures >= self.quarantine_after || too_many)
            && !self.stats.quarantined
        {
            self.stats.quarantined = true;
            self.plugin = None;
            if self.quiet {
                return;
            }
            tracing::warn!(
                kind = %self.kind, policy = ?self.stats.name, failures,
                in_a_row = self.consecutive_failures,
                "policy quarantined; the built-in policy serves its calls"
            );
        }
    }

    /// Folds one call's time into the recent mean; flags (and warns of) a slow plugin once
    /// enough calls show it.
    fn note_call_time(&mut self, ns: u64) {
        let keep = 1.0 - 1.0 / QUARANTINE_WINDOW;
        let us = ns as f64 / 1e3;
        self.stats.recent_calls += 1;
        self.stats.recent_call_us = if self.stats.recent_calls == 1 {
            us
        } else {
            self.stats.recent_call_us * keep + us * (1.0 - keep)
        };
        let slow = self.stats.recent_calls >= 100 && self.stats.recent_call_us > SLOW_CALL_US;
        if slow && !self.stats.slow && !self.quiet {
            tracing::warn!(
                kind = %self.kind, policy = ?self.stats.name,
                mean_call_us = self.stats.recent_call_us.round(),
                "policy is slow: its calls average over {SLOW_CALL_US} us, time the model waits on every layer step"
            );
        }
        self.stats.slow = slow;
    }

    /// Calls the plugin (initialising it first if needed) and validates its answer.
    /// `None`: the built-in policy must serve this call.
    fn run<R>(
        &mut self,
        init: impl FnOnce(&mut P) -> PolicyResult<()>,
        call: impl FnOnce(&mut P) -> PolicyResult<R>,
        validate: impl FnOnce(&R) -> Result<(), String>,
    ) -> Option<R> {
        self.stats.calls += 1;
        self.recent_failures *= 1.0 - 1.0 / QUARANTINE_WINDOW;
        let Some(plugin) = self.plugin.as_mut() else {
            if self.stats.quarantined {
                self.stats.fallbacks += 1;
            }
            return None;
        };
        let t0 = Instant::now();
        let result = (|| {
            if self.needs_init {
                init(plugin)?;
                self.stats.reinits += 1;
                self.needs_init = false;
            }
            let r = call(plugin)?;
            validate(&r).map_err(|message| PolicyError {
                kind: FailureKind::InvalidAnswer,
                message,
            })?;
            Ok(r)
        })();
        let ns = t0.elapsed().as_nanos() as u64;
        self.stats.call_ns += ns;
        self.note_call_time(ns);
        match result {
            Ok(r) => {
                self.consecutive_failures = 0;
                Some(r)
            }
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }
}

/// What the guard knows of a policy kind: the plugin's interface, what `init` answers, and
/// the state the guard keeps beside the plugin (the built-in policy that serves whenever the
/// plugin cannot, and what it takes from `init`).
pub trait Kind: Sized {
    type Plugin: ?Sized;
    type Info;
    type State;
    const KIND: PolicyKind;
    /// The built-in policy's name, shown until a plugin names itself.
    const BUILTIN: &'static str;
    fn plugin_init(p: &mut Self::Plugin, args: &InitArgs) -> PolicyResult<Self::Info>;
    /// The built-in policy's `init`; `needed`: no plugin serves. `None` when it is not run.
    fn builtin_init(
        s: &mut Self::State,
        args: &InitArgs,
        needed: bool,
    ) -> PolicyResult<Option<Self::Info>>;
    fn name(info: &Self::Info) -> &str;
    /// Takes what an `init` answered (the plugin's at load, swap or re-initialisation, or the
    /// built-in's).
    fn adopt(_g: &mut Guarded<Self>, _info: &Self::Info) {}
}

/// A policy of kind `K` behind the host's guard: the plugin (if any) in its slot, and the
/// kind's state.
pub struct Guarded<K: Kind> {
    slot: Slot<K::Plugin>,
    state: K::State,
}

impl<K: Kind> Guarded<K> {
    fn with_state(
        plugin: Option<Box<K::Plugin>>,
        source: &str,
        version: &str,
        quarantine_after: u32,
        state: K::State,
    ) -> Self {
        let mut slot = Slot::new(K::KIND, plugin, source, version, quarantine_after);
        slot.stats.name = K::BUILTIN.into();
        Self { slot, state }
    }

    /// Failures are counted but not logged (smoke tests report them themselves).
    pub fn set_quiet(&mut self, quiet: bool) {
        self.slot.quiet = quiet;
    }

    pub fn stats(&self) -> &PolicyStats {
        &self.slot.stats
    }

    /// Whether a (non-quarantined) plugin is in use.
    pub fn has_plugin(&self) -> bool {
        self.slot.plugin.is_some()
    }

    /// Initialises the plugin now (load time / hot swap), so a broken one is reported at once.
    pub fn init(&mut self, args: &InitArgs) -> PolicyResult<K::Info> {
        let needed = self.slot.plugin.is_none();
        let builtin = K::builtin_init(&mut self.state, args, needed)?;
        let info = match self.slot.plugin.as_mut() {
            Some(p) => K::plugin_init(p, args)?,
            None => builtin.expect("the built-in policy initialises when it serves"),
        };
        self.take_init(&info);
        self.slot.needs_init = false;
        Ok(info)
    }

    fn take_init(&mut self, info: &K::Info) {
        self.slot.stats.set_name(K::name(info));
        K::adopt(self, info);
    }

    /// Calls the plugin, re-initialising it first if it needs it (with `args()`, the residency
    /// of now), and validates its answer: `validate` is given the answer, what a
    /// re-initialisation in this call answered, and the kind's state. `None`: the built-in
    /// policy must serve this call.
    fn call<R>(
        &mut self,
        args: &dyn Fn() -> InitArgs,
        call: impl FnOnce(&mut K::Plugin) -> PolicyResult<R>,
        validate: impl FnOnce(&R, Option<&K::Info>, &K::State) -> Result<(), String>,
    ) -> Option<R> {
        let reinit = std::cell::Cell::new(None);
        let state = &self.state;
        let answer = self.slot.run(
            |p| {
                reinit.set(Some(K::plugin_init(p, &args())?));
                Ok(())
            },
            call,
            |r| {
                let info = reinit.take();
                let verdict = validate(r, info.as_ref(), state);
                reinit.set(info);
                verdict
            },
        );
        if let Some(info) = reinit.take() {
            self.take_init(&info);
        }
        answer
    }
}

/// Expert selection, exact top-k as the safety net.
pub struct SelectionKind;

pub struct SelectionState {
    builtin: ExactTopK,
    /// The gap answers are held to now.
    max_score_gap: f32,
    /// The host's ceiling on any declared gap (`--max-score-gap`).
    gap_ceiling: f32,
}

impl Kind for SelectionKind {
    type Plugin = dyn Selection;
    type Info = SelectionInfo;
    type State = SelectionState;
    const KIND: PolicyKind = PolicyKind::Selection;
    const BUILTIN: &'static str = "builtin-topk";

    fn plugin_init(p: &mut Self::Plugin, args: &InitArgs) -> PolicyResult<SelectionInfo> {
        p.init(args)
    }

    fn builtin_init(
        s: &mut SelectionState,
        args: &InitArgs,
        needed: bool,
    ) -> PolicyResult<Option<SelectionInfo>> {
        needed.then(|| s.builtin.init(args)).transpose()
    }

    fn name(info: &SelectionInfo) -> &str {
        &info.info.name
    }

    /// Holds answers to the declared gap, at most the host's ceiling; a plugin declaring more
    /// is told so once.
    fn adopt(g: &mut GuardedSelection, info: &SelectionInfo) {
        let declared = info.max_score_gap;
        let ceiling = g.state.gap_ceiling;
        if declared > ceiling && !g.slot.quiet && g.state.max_score_gap != ceiling {
            tracing::warn!(
                policy = ?g.slot.stats.name, declared, ceiling,
                "selection policy declares a max-score-gap over the host's ceiling \
                 (--max-score-gap); its substitutions are held to the ceiling"
            );
        }
        g.state.max_score_gap = held_gap(declared, ceiling);
    }
}

pub type GuardedSelection = Guarded<SelectionKind>;

impl GuardedSelection {
    pub fn new(
        plugin: Option<Box<dyn Selection>>,
        source: &str,
        version: &str,
        quarantine_after: u32,
        gap_ceiling: f32,
    ) -> Self {
        let state = SelectionState {
            builtin: ExactTopK,
            max_score_gap: 0.0,
            gap_ceiling: if gap_ceiling >= 0.0 { gap_ceiling } else { 0.0 },
        };
        Self::with_state(plugin, source, version, quarantine_after, state)
    }

    /// `tokens x k` expert ids for `scores` (`tokens x experts`: the model's selection scores,
    /// sigmoid + bias with the group limit applied).
    pub fn select(
        &mut self,
        layer: u32,
        tokens: u32,
        k: u32,
        scores: &[f32],
        residency: &[Tier],
        args: &dyn Fn() -> InitArgs,
    ) -> Vec<u32> {
        let e = scores.len() / tokens.max(1) as usize;
        let answer = self.call(
            args,
            |p| p.select(layer, tokens, k, scores, residency),
            |ids, reinit, s| {
                let gap = reinit.map_or(s.max_score_gap, |i| {
                    held_gap(i.max_score_gap, s.gap_ceiling)
                });
                validate_selection(ids, scores, e, k as usize, gap)
            },
        );
        answer.unwrap_or_else(|| {
            self.state
                .builtin
                .select(layer, tokens, k, scores, residency)
                .expect("built-in selection cannot fail")
        })
    }
}

/// A declared score gap as answers are held to it: none if NaN or negative, at most `ceiling`.
fn held_gap(declared: f32, ceiling: f32) -> f32 {
    if declared >= 0.0 {
        declared.min(ceiling)
    } else {
        0.0
    }
}

fn validate_selection(
    ids: &[u32],
    scores: &[f32],
    e: usize,
    k: usize,
    max_gap: f32,
) -> Result<(), String> {
    let tokens = scores.len() / e.max(1);
    if ids.len() != tokens * k {
        return Err(format!(
            "returned {} ids for {tokens} tokens x k={k}",
            ids.len()
        ));
    }
    for (t, (row, chosen)) in scores.chunks_exact(e).zip(ids.chunks_exact(k)).enumerate() {
        let mut lowest = f32::INFINITY;
        for (i, &id) in chosen.iter().enumerate() {
            if id as usize >= e {
                return Err(format!("token {t}: expert id {id} out of range (0..{e})"));
            }
            if chosen[..i].contains(&id) {
                return Err(format!("token {t}: expert {id} chosen twice"));
            }
            let s = row[id as usize];
            if s.is_nan() {
                return Err(format!("token {t}: expert {id} has no score (NaN)"));
            }
            lowest = lowest.min(s);
        }
        // Every pick is within the bound of the k-th best score exactly when fewer than k
        // experts score above (lowest pick + bound): one pass, no sort (NaN never counts).
        // Counted in u32 lanes: four compares per SSE2 instruction, not two (Kimi-K2: 384
        // scores per token, every layer step).
        let bound = lowest + max_gap;
        let above = row.iter().map(|&s| u32::from(s > bound)).sum::<u32>() as usize;
        if above >= k {
            let mut sorted: Vec<f32> = row.iter().copied().filter(|s| !s.is_nan()).collect();
            sorted.sort_unstable_by(|a, b| b.total_cmp(a));
            let kth = sorted.get(k - 1).copied().unwrap_or(f32::NEG_INFINITY);
            return Err(format!(
                "token {t}: an expert scores {lowest}, more than the stated bound {max_gap} below the k-th best {kth}"
            ));
        }
    }
    Ok(())
}

/// Eviction, LRU as the safety net. The built-in always observes (so a fallback finds it warm).
pub struct EvictionKind;

impl Kind for EvictionKind {
    type Plugin = dyn Eviction;
    type Info = PolicyInfo;
    type State = Lru;
    const KIND: PolicyKind = PolicyKind::Eviction;
    const BUILTIN: &'static str = "builtin-lru";

    fn plugin_init(p: &mut Self::Plugin, args: &InitArgs) -> PolicyResult<PolicyInfo> {
        p.init(args)
    }

    fn builtin_init(lru: &mut Lru, args: &InitArgs, _: bool) -> PolicyResult<Option<PolicyInfo>> {
        lru.init(args).map(Some)
    }

    fn name(info: &PolicyInfo) -> &str {
        &info.name
    }
}

pub type GuardedEviction = Guarded<EvictionKind>;

impl GuardedEviction {
    pub fn new(
        plugin: Option<Box<dyn Eviction>>,
        source: &str,
        version: &str,
        quarantine_after: u32,
    ) -> Self {
        Self::with_state(plugin, source, version, quarantine_after, Lru::default())
    }

    /// Delivers the step's facts; returns exactly `request.count` victims from its candidates.
    pub fn on_step(
        &mut self,
        facts: &StepFacts,
        request: Option<&VictimRequest<'_>>,
        args: &dyn Fn() -> InitArgs,
    ) -> Vec<ExpertKey> {
        // The built-in policy only picks victims when it has to serve the call.
        self.state
            .on_step(facts, None)
            .expect("built-in eviction cannot fail");
        let answer = self.call(
            args,
            |p| p.on_step(facts, request),
            |v, _, _| match request {
                Some(r) => validate_victims(v, r),
                None if v.is_empty() => Ok(()),
                None => Err(format!(
                    "returned {} victims when none were asked for",
                    v.len()
                )),
            },
        );
        answer.unwrap_or_else(|| {
            request
                .map(|r| {
                    self.state
                        .victims(r)
                        .expect("built-in eviction cannot fail")
                })
                .unwrap_or_default()
        })
    }

    /// A further victim request in the same step.
    pub fn victims(
        &mut self,
        request: &VictimRequest<'_>,
        args: &dyn Fn() -> InitArgs,
    ) -> Vec<ExpertKey> {
        let answer = self.call(
            args,
            |p| p.victims(request),
            |v, _, _| validate_victims(v, request),
        );
        answer.unwrap_or_else(|| {
            self.state
                .victims(request)
                .expect("built-in eviction cannot fail")
        })
    }
}

/// Exactly `count` victims, each a candidate, none twice. Shared by the live store and the
/// replay lab, so both hold plugins to the same contract.
pub fn validate_victims(v: &[ExpertKey], r: &VictimRequest<'_>) -> Result<(), String> {
    let want = r.count as usize;
    if v.len() != want {
        return Err(format!(
            "returned {} victims, {want} were asked for",
            v.len()
        ));
    }
    for (i, e) in v.iter().enumerate() {
        if !r.candidates.contains(*e) || r.excluded.contains(e) {
            return Err(format!(
                "victim {e:?} is not a candidate (not resident in the {:?} tier, or excluded)",
                r.tier
            ));
        }
        if r.only_layer.is_some_and(|l| l != e.layer) {
            return Err(format!(
                "victim {e:?} is outside layer {}",
                r.only_layer.unwrap()
            ));
        }
        if v[..i].contains(e) {
            return Err(format!("victim {e:?} named twice"));
        }
    }
    Ok(())
}

/// Prefetch, "no prefetch" as the safety net.
pub struct PrefetchKind;

pub struct PrefetchState {
    lookahead: u32,
    shape: Option<ModelShape>,
}

/// Most speculative layers the host computes for a prefetch policy.
pub const MAX_LOOKAHEAD: u32 = 4;

impl Kind for PrefetchKind {
    type Plugin = dyn Prefetch;
    type Info = PrefetchInfo;
    type State = PrefetchState;
    const KIND: PolicyKind = PolicyKind::Prefetch;
    const BUILTIN: &'static str = "builtin-none";

    fn plugin_init(p: &mut Self::Plugin, args: &InitArgs) -> PolicyResult<PrefetchInfo> {
        p.init(args)
    }

    fn builtin_init(
        s: &mut PrefetchState,
        args: &InitArgs,
        needed: bool,
    ) -> PolicyResult<Option<PrefetchInfo>> {
        s.shape = Some(args.shape);
        needed.then(|| NoPrefetch.init(args)).transpose()
    }

    fn name(info: &PrefetchInfo) -> &str {
        &info.info.name
    }

    fn adopt(g: &mut GuardedPrefetch, info: &PrefetchInfo) {
        g.state.lookahead = info.lookahead.min(MAX_LOOKAHEAD);
    }
}

pub type GuardedPrefetch = Guarded<PrefetchKind>;

impl GuardedPrefetch {
    pub fn new(
        plugin: Option<Box<dyn Prefetch>>,
        source: &str,
        version: &str,
        quarantine_after: u32,
    ) -> Self {
        let state = PrefetchState {
            lookahead: 0,
            shape: None,
        };
        Self::with_state(plugin, source, version, quarantine_after, state)
    }

    /// Layers of speculative scores wanted (0 when quarantined or built-in).
    pub fn lookahead(&self) -> u32 {
        if self.slot.plugin.is_some() {
            self.state.lookahead
        } else {
            0
        }
    }

    pub fn on_routed(
        &mut self,
        step: &RoutedStep,
        args: &dyn Fn() -> InitArgs,
    ) -> Vec<PrefetchRequest> {
        self.call(
            args,
            |p| p.on_routed(step),
            |reqs, _, s| validate_prefetch(reqs, s.shape),
        )
        .unwrap_or_default()
    }
}

fn validate_prefetch(reqs: &[PrefetchRequest], shape: Option<ModelShape>) -> Result<(), String> {
    let Some(s) = shape else { return Ok(()) };
    let max = (s.moe_layers as usize * s.experts_per_layer as usize).max(1);
    if reqs.len() > max {
        return Err(format!(
            "returned {} requests, more than the {max} experts of the model",
            reqs.len()
        ));
    }
    for r in reqs {
        if r.expert.layer >= s.moe_layers || r.expert.expert >= s.experts_per_layer {
            return Err(format!("request for expert {:?} is out of range", r.expert));
        }
        if r.tier == Tier::Disk {
            return Err("a prefetch cannot target the disk tier".into());
        }
    }
    Ok(())
}

/// Placement, the built-in cost model as the safety net.
pub struct PlacementKind;

impl Kind for PlacementKind {
    type Plugin = dyn Placement;
    type Info = PolicyInfo;
    type State = ();
    const KIND: PolicyKind = PolicyKind::Placement;
    const BUILTIN: &'static str = "builtin-cost-model";

    fn plugin_init(p: &mut Self::Plugin, args: &InitArgs) -> PolicyResult<PolicyInfo> {
        p.init(args)
    }

    fn builtin_init(_: &mut (), args: &InitArgs, needed: bool) -> PolicyResult<Option<PolicyInfo>> {
        needed.then(|| CostModel.init(args)).transpose()
    }

    fn name(info: &PolicyInfo) -> &str {
        &info.name
    }
}

pub type GuardedPlacement = Guarded<PlacementKind>;

impl GuardedPlacement {
    pub fn new(
        plugin: Option<Box<dyn Placement>>,
        source: &str,
        version: &str,
        quarantine_after: u32,
    ) -> Self {
        Self::with_state(plugin, source, version, quarantine_after, ())
    }

    /// One placement per expert of `request`, in its order.
    pub fn place(
        &mut self,
        request: &PlacementRequest<'_>,
        args: &dyn Fn() -> InitArgs,
    ) -> Vec<Place> {
        if request.experts.is_empty() {
            return Vec::new();
        }
        let want = request.experts.len();
        let answer = self.call(
            args,
            |p| p.place(request),
            |places: &Vec<Place>, _, _| {
                if places.len() == want {
                    Ok(())
                } else {
                    Err(format!(
                        "placed {} experts, {want} were asked about",
                        places.len()
                    ))
                }
            },
        );
        answer.unwrap_or_else(|| CostModel::decide(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `calls` calls of a plugin that fails every `every`-th call; whether it ends up
    /// quarantined.
    fn quarantined_after(calls: u32, every: u32) -> bool {
        let mut slot: Slot<u32> = Slot::new(PolicyKind::Eviction, Some(Box::new(0)), "t", "0", 3);
        slot.quiet = true;
        for i in 1..=calls {
            slot.run(
                |_| Ok(()),
                |_| {
                    if i % every == 0 {
                        Err(PolicyError {
                            kind: FailureKind::Timeout,
                            message: "late".into(),
                        })
                    } else {
                        Ok(())
                    }
                },
                |_| Ok(()),
            );
        }
        slot.stats.quarantined
    }

    #[test]
    fn plugin_names_are_cut_and_cleaned() {
        let mut s = PolicyStats::default();
        s.set_name(&format!("evil\"}}\n{}", "x".repeat(24 << 20)));
        assert_eq!(s.name.chars().count(), MAX_PLUGIN_NAME);
        assert!(s.name.starts_with("evil\"}?"));
        assert!(!s.name.chars().any(char::is_control));
    }

    #[test]
    fn a_plugin_whose_calls_average_over_the_budget_is_flagged() {
        let mut slot: Slot<u32> = Slot::new(PolicyKind::Eviction, Some(Box::new(0)), "t", "0", 3);
        slot.quiet = true;
        for _ in 0..500 {
            slot.note_call_time(2_000); // 2 us: the bundled policies' range
        }
        assert!(!slot.stats.slow && slot.stats.recent_call_us < 3.0);
        for _ in 0..3_000 {
            slot.note_call_time(1_600_000); // 1.6 ms, inside a 10 ms deadline
        }
        assert!(slot.stats.slow, "{}", slot.stats.recent_call_us);
        // Fast again: the flag clears as the mean comes back down.
        for _ in 0..10_000 {
            slot.note_call_time(2_000);
        }
        assert!(!slot.stats.slow, "{}", slot.stats.recent_call_us);
    }

    #[test]
    fn rare_failures_fade_and_frequent_ones_quarantine() {
        // A deadline missed once in 2,000 calls, for 200,000 calls: never quarantined.
        assert!(!quarantined_after(200_000, 2_000));
        // One call in two failing: quarantined quickly.
        assert!(quarantined_after(40, 2));
        // Three in a row: quarantined.
        assert!(quarantined_after(3, 1));
    }
}
