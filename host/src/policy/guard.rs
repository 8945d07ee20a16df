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

/// Expert selection with exact top-k as the safety net.
pub struct GuardedSelection {
    slot: Slot<dyn Selection>,
    builtin: ExactTopK,
    max_score_gap: f32,
    /// The host's ceiling on any declared gap (`--max-score-gap`).
    gap_ceiling: f32,
}

impl GuardedSelection {
    /// Failures are counted but not logged (smoke tests report them themselves).
    pub fn set_quiet(&mut self, quiet: bool) {
        self.slot.quiet = quiet;
    }

    pub fn new(
        plugin: Option<Box<dyn Selection>>,
        source: &str,
        version: &str,
        quarantine_after: u32,
        gap_ceiling: f32,
    ) -> Self {
        let mut slot = Slot::new(
            PolicyKind::Selection,
            plugin,
            source,
            version,
            quarantine_after,
        );
        slot.stats.name = "builtin-topk".into();
        Self {
            slot,
            builtin: ExactTopK,
            max_score_gap: 0.0,
            gap_ceiling: if gap_ceiling >= 0.0 { gap_ceiling } else { 0.0 },
        }
    }

    /// The gap answers are held to: what the plugin declared (NaN or negative: none), at most
    /// the host's ceiling; a plugin declaring more is told so once.
    fn held_gap(&mut self, declared: f32) -> f32 {
        let held = held_gap(declared, self.gap_ceiling);
        if declared > self.gap_ceiling && !self.slot.quiet && self.max_score_gap != self.gap_ceiling
        {
            tracing::warn!(
                policy = ?self.slot.stats.name, declared, ceiling = self.gap_ceiling,
                "selection policy declares a max-score-gap over the host's ceiling \
                 (--max-score-gap); its substitutions are held to the ceiling"
            );
        }
        held
    }

    /// Initialises the plugin now (load time / hot swap), so a broken one is reported at once.
    pub fn init(&mut self, args: &InitArgs) -> PolicyResult<SelectionInfo> {
        let info = match self.slot.plugin.as_mut() {
            Some(p) => p.init(args)?,
            None => self.builtin.init(args)?,
        };
        self.slot.stats.set_name(&info.info.name);
        self.max_score_gap = self.held_gap(info.max_score_gap);
        self.slot.needs_init = false;
        Ok(info)
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
        let reinit: std::cell::Cell<Option<SelectionInfo>> = std::cell::Cell::new(None);
        let current_gap = self.max_score_gap;
        let ceiling = self.gap_ceiling;
        let answer = self.slot.run(
            |p| {
                reinit.set(Some(p.init(&args())?));
                Ok(())
            },
            |p| p.select(layer, tokens, k, scores, residency),
            |ids| {
                let info = reinit.take();
                let gap = info
                    .as_ref()
                    .map_or(current_gap, |i| held_gap(i.max_score_gap, ceiling));
                reinit.set(info);
                validate_selection(ids, scores, e, k as usize, gap)
            },
        );
        if let Some(info) = reinit.take() {
            self.slot.stats.set_name(&info.info.name);
            self.max_score_gap = self.held_gap(info.max_score_gap);
        }
        answer.unwrap_or_else(|| {
            self.builtin
                .select(layer, tokens, k, scores, residency)
                .expect("built-in selection cannot fail")
        })
    }

    pub fn stats(&self) -> &PolicyStats {
        &self.slot.stats
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
        let above = row.iter().filter(|&&s| s > lowest + max_gap).count();
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

/// Eviction with LRU as the safety net.
pub struct GuardedEviction {
    slot: Slot<dyn Eviction>,
    builtin: Lru,
}

impl GuardedEviction {
    /// Failures are counted but not logged (smoke tests report them themselves).
    pub fn set_quiet(&mut self, quiet: bool) {
        self.slot.quiet = quiet;
    }

    pub fn new(
        plugin: Option<Box<dyn Eviction>>,
        source: &str,
        version: &str,
        quarantine_after: u32,
    ) -> Self {
        let mut slot = Slot::new(
            PolicyKind::Eviction,
            plugin,
            source,
            version,
            quarantine_after,
        );
        slot.stats.name = "builtin-lru".into();
        Self {
            slot,
            builtin: Lru::default(),
        }
    }

    pub fn init(&mut self, args: &InitArgs) -> PolicyResult<PolicyInfo> {
        let builtin = self.builtin.init(args)?;
        let info = match self.slot.plugin.as_mut() {
            Some(p) => p.init(args)?,
            None => builtin,
        };
        self.slot.stats.set_name(&info.name);
        self.slot.needs_init = false;
        Ok(info)
    }

    /// Delivers the step's facts; returns exactly `request.count` victims from its candidates.
    pub fn on_step(
        &mut self,
        facts: &StepFacts,
        request: Option<&VictimRequest<'_>>,
        args: &dyn Fn() -> InitArgs,
    ) -> Vec<ExpertKey> {
        // The built-in policy always observes (so a fallback finds it warm), but only picks
        // victims when it has to serve the call.
        self.builtin
            .on_step(facts, None)
            .expect("built-in eviction cannot fail");
        let name = std::cell::Cell::new(None);
        let answer = self.slot.run(
            |p| {
                name.set(Some(p.init(&args())?.name));
                Ok(())
            },
            |p| p.on_step(facts, request),
            |v| match request {
                Some(r) => validate_victims(v, r),
                None if v.is_empty() => Ok(()),
                None => Err(format!(
                    "returned {} victims when none were asked for",
                    v.len()
                )),
            },
        );
        if let Some(n) = name.take() {
            self.slot.stats.set_name(&n);
        }
        answer.unwrap_or_else(|| {
            request
                .map(|r| {
                    self.builtin
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
        let name = std::cell::Cell::new(None);
        let answer = self.slot.run(
            |p| {
                name.set(Some(p.init(&args())?.name));
                Ok(())
            },
            |p| p.victims(request),
            |v| validate_victims(v, request),
        );
        if let Some(n) = name.take() {
            self.slot.stats.set_name(&n);
        }
        answer.unwrap_or_else(|| {
            self.builtin
                .victims(request)
                .expect("built-in eviction cannot fail")
        })
    }

    pub fn stats(&self) -> &PolicyStats {
        &self.slot.stats
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

/// Prefetch with "no prefetch" as the safety net.
pub struct GuardedPrefetch {
    slot: Slot<dyn Prefetch>,
    lookahead: u32,
    shape: Option<ModelShape>,
}

/// Most speculative layers the host computes for a prefetch policy.
pub const MAX_LOOKAHEAD: u32 = 4;

impl GuardedPrefetch {
    /// Failures are counted but not logged (smoke tests report them themselves).
    pub fn set_quiet(&mut self, quiet: bool) {
        self.slot.quiet = quiet;
    }

    pub fn new(
        plugin: Option<Box<dyn Prefetch>>,
        source: &str,
        version: &str,
        quarantine_after: u32,
    ) -> Self {
        let mut slot = Slot::new(
            PolicyKind::Prefetch,
            plugin,
            source,
            version,
            quarantine_after,
        );
        slot.stats.name = "builtin-none".into();
        Self {
            slot,
            lookahead: 0,
            shape: None,
        }
    }

    pub fn init(&mut self, args: &InitArgs) -> PolicyResult<PrefetchInfo> {
        self.shape = Some(args.shape);
        let info = match self.slot.plugin.as_mut() {
            Some(p) => p.init(args)?,
            None => NoPrefetch.init(args)?,
        };
        self.lookahead = info.lookahead.min(MAX_LOOKAHEAD);
        self.slot.stats.set_name(&info.info.name);
        self.slot.needs_init = false;
        Ok(info)
    }

    /// Whether a (non-quarantined) plugin is in use.
    pub fn has_plugin(&self) -> bool {
        self.slot.plugin.is_some()
    }

    /// Layers of speculative scores wanted (0 when quarantined or built-in).
    pub fn lookahead(&self) -> u32 {
        if self.slot.plugin.is_some() {
            self.lookahead
        } else {
            0
        }
    }

    pub fn on_routed(
        &mut self,
        step: &RoutedStep,
        args: &dyn Fn() -> InitArgs,
    ) -> Vec<PrefetchRequest> {
        let shape = self.shape;
        let reinit = std::cell::Cell::new(None);
        let answer = self.slot.run(
            |p| {
                reinit.set(Some(p.init(&args())?));
                Ok(())
            },
            |p| p.on_routed(step),
            |reqs| validate_prefetch(reqs, shape),
        );
        if let Some(info) = reinit.take() {
            self.lookahead = info.lookahead.min(MAX_LOOKAHEAD);
            self.slot.stats.set_name(&info.info.name);
        }
        answer.unwrap_or_default()
    }

    pub fn stats(&self) -> &PolicyStats {
        &self.slot.stats
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

/// Placement with the built-in cost model as the safety net.
pub struct GuardedPlacement {
    slot: Slot<dyn Placement>,
}

impl GuardedPlacement {
    /// Failures are counted but not logged (smoke tests report them themselves).
    pub fn set_quiet(&mut self, quiet: bool) {
        self.slot.quiet = quiet;
    }

    pub fn new(
        plugin: Option<Box<dyn Placement>>,
        source: &str,
        version: &str,
        quarantine_after: u32,
    ) -> Self {
        let mut slot = Slot::new(
            PolicyKind::Placement,
            plugin,
            source,
            version,
            quarantine_after,
        );
        slot.stats.name = "builtin-cost-model".into();
        Self { slot }
    }

    pub fn init(&mut self, args: &InitArgs) -> PolicyResult<PolicyInfo> {
        let info = match self.slot.plugin.as_mut() {
            Some(p) => p.init(args)?,
            None => CostModel.init(args)?,
        };
        self.slot.stats.set_name(&info.name);
        self.slot.needs_init = false;
        Ok(info)
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
        let reinit = std::cell::Cell::new(None);
        let want = request.experts.len();
        let answer = self.slot.run(
            |p| {
                reinit.set(Some(p.init(&args())?));
                Ok(())
            },
            |p| p.place(request),
            |places: &Vec<Place>| {
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
        if let Some(info) = reinit.take() {
            self.slot.stats.set_name(&info.name);
        }
        answer.unwrap_or_else(|| CostModel::decide(request))
    }

    pub fn stats(&self) -> &PolicyStats {
        &self.slot.stats
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
