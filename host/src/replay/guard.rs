//! The replay's guard around an eviction plugin: the contract of `policy::guard`
//! (`GuardedEviction`), at replay speed.
//!
//! Same rules: every answer is validated (exactly min(count, candidates) victims, each a
//! candidate, none twice); a trap, timeout, out-of-memory or invalid answer is counted and that
//! call is served by LRU; the plugin is re-initialised (fresh instance, current residency)
//! before its next call; after `quarantine_after` failures in a row (or 3x that many in all) it
//! is no longer called. The LRU fallback observes every call's facts, so it is warm.
//!
//! Why not `GuardedEviction` itself: its fallback answers every call eagerly (a hashed LRU
//! touch per event and a hashed pick over all candidates per request) and its validation
//! scans the candidates per victim: harmless once per 50 ms layer step in the live store, but
//! about 40% of a replay's time. Here the fallback is the dense `native-lru`, it only picks
//! when a call failed, and a victim is validated against the residency bitsets in O(1).

use std::time::Instant;

use crate::policy::guard::validate_victims;
use crate::policy::{
    Eviction, ExpertKey, FailureKind, InitArgs, PolicyError, PolicyStats, StepFacts, VictimRequest,
};

use super::lru::DenseLru;
use super::plugin::EvictionCalls;

const LOG_FIRST: u64 = 5;
const QUARANTINE_TOTAL_FACTOR: u64 = 3;

pub struct ReplayGuard {
    plugin: Option<Box<dyn Eviction>>,
    fallback: DenseLru,
    needs_init: bool,
    consecutive: u32,
    quarantine_after: u32,
    /// Log failures to stderr (the first few, and the quarantine).
    pub verbose: bool,
    stats: PolicyStats,
}

impl ReplayGuard {
    /// Initialises `plugin` (an error here is the caller's: a plugin that cannot start is not
    /// replayed) and the fallback.
    pub fn new(
        mut plugin: Box<dyn Eviction>,
        source: &str,
        version: &str,
        quarantine_after: u32,
        args: &InitArgs,
    ) -> Result<Self, PolicyError> {
        let info = plugin.init(args)?;
        let mut fallback = DenseLru::default();
        fallback.init(args)?;
        Ok(Self {
            plugin: Some(plugin),
            fallback,
            needs_init: false,
            consecutive: 0,
            quarantine_after: quarantine_after.max(1),
            verbose: true,
            stats: PolicyStats {
                name: info.name,
                source: source.to_owned(),
                version: version.to_owned(),
                ..Default::default()
            },
        })
    }

    fn fail(&mut self, e: PolicyError) {
        let s = &mut self.stats;
        match e.kind {
            FailureKind::Timeout => s.timeouts += 1,
            FailureKind::OutOfMemory => s.out_of_memory += 1,
            FailureKind::Trap => s.traps += 1,
            FailureKind::InvalidAnswer => s.invalid_answers += 1,
        }
        s.fallbacks += 1;
        self.needs_init = true;
        self.consecutive += 1;
        let failures = s.timeouts + s.out_of_memory + s.traps + s.invalid_answers;
        if self.verbose && failures <= LOG_FIRST {
            eprintln!(
                "moehost: eviction policy {} failed ({e}); served by LRU",
                s.name
            );
        }
        let too_many = failures >= u64::from(self.quarantine_after) * QUARANTINE_TOTAL_FACTOR;
        if (self.consecutive >= self.quarantine_after || too_many) && !s.quarantined {
            s.quarantined = true;
            self.plugin = None;
            if self.verbose {
                eprintln!(
                    "moehost: eviction policy {} quarantined after {failures} failures; LRU serves the rest of the replay",
                    s.name
                );
            }
        }
    }

    /// One guarded call; `None`: LRU serves it.
    fn run(
        &mut self,
        init: &dyn Fn() -> InitArgs,
        call: impl FnOnce(&mut dyn Eviction) -> Result<Vec<ExpertKey>, PolicyError>,
        validate: impl FnOnce(&[ExpertKey]) -> Result<(), String>,
    ) -> Option<Vec<ExpertKey>> {
        self.stats.calls += 1;
        let Some(plugin) = self.plugin.as_deref_mut() else {
            self.stats.fallbacks += 1;
            return None;
        };
        let t0 = Instant::now();
        let mut reinit = None;
        let result = (|| {
            if self.needs_init {
                reinit = Some(plugin.init(&init())?.name);
            }
            let v = call(plugin)?;
            validate(&v).map_err(|message| PolicyError {
                kind: FailureKind::InvalidAnswer,
                message,
            })?;
            Ok(v)
        })();
        self.stats.call_ns += t0.elapsed().as_nanos() as u64;
        if let Some(name) = reinit {
            self.needs_init = false;
            self.stats.reinits += 1;
            self.stats.name = name;
        }
        match result {
            Ok(v) => {
                self.consecutive = 0;
                Some(v)
            }
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }
}

impl EvictionCalls for ReplayGuard {
    fn on_step(
        &mut self,
        facts: &StepFacts,
        request: Option<&VictimRequest>,
        init: &dyn Fn() -> InitArgs,
        is_candidate: &dyn Fn(ExpertKey) -> bool,
    ) -> Vec<ExpertKey> {
        // The fallback hears every call's facts, so it is warm when it must answer.
        self.fallback
            .on_step(facts, None)
            .expect("native-lru does not fail");
        let answer = self.run(
            init,
            |p| p.on_step(facts, request),
            |v| match request {
                Some(r) => validate_victims(v, r, is_candidate),
                None if v.is_empty() => Ok(()),
                None => Err(format!(
                    "returned {} victims when none were asked for",
                    v.len()
                )),
            },
        );
        answer.unwrap_or_else(|| {
            request.map_or_else(Vec::new, |r| {
                self.fallback.victims(r).expect("native-lru does not fail")
            })
        })
    }

    fn victims(
        &mut self,
        request: &VictimRequest,
        init: &dyn Fn() -> InitArgs,
        is_candidate: &dyn Fn(ExpertKey) -> bool,
    ) -> Vec<ExpertKey> {
        let answer = self.run(
            init,
            |p| p.victims(request),
            |v| validate_victims(v, request, is_candidate),
        );
        answer.unwrap_or_else(|| {
            self.fallback
                .victims(request)
                .expect("native-lru does not fail")
        })
    }

    fn stats(&self) -> Option<PolicyStats> {
        Some(self.stats.clone())
    }
}
