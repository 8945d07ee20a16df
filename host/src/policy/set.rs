//! The four policy kinds as one table: a guarded policy of any kind (`AnyGuarded`: loaded,
//! smoke-tested and swapped in as one), and a full set (`PolicySet`: one of each, as a store
//! serves them). A new kind is a row here.

use anyhow::Result;
use serde::Serialize;

use super::wasm::WasmPolicy;
use super::*;

/// A guarded policy of any kind.
pub enum AnyGuarded {
    Selection(GuardedSelection),
    Eviction(GuardedEviction),
    Prefetch(GuardedPrefetch),
    Placement(GuardedPlacement),
}

/// `$e` with `$g` bound to the guard inside `$any`, whatever its kind (`Guarded<K>`'s generic
/// methods serve every arm).
macro_rules! each {
    ($any:expr, $g:ident => $e:expr) => {
        match $any {
            AnyGuarded::Selection($g) => $e,
            AnyGuarded::Eviction($g) => $e,
            AnyGuarded::Prefetch($g) => $e,
            AnyGuarded::Placement($g) => $e,
        }
    };
}

impl AnyGuarded {
    /// `plugin` (of `kind`; `None`: the built-in policy alone) in its guard; a selection
    /// policy's substitutions are held to `max_score_gap`.
    pub fn new(
        kind: PolicyKind,
        plugin: Option<WasmPolicy>,
        source: &str,
        version: &str,
        quarantine_after: u32,
        max_score_gap: f32,
    ) -> Self {
        let (src, v, q) = (source, version, quarantine_after);
        match kind {
            PolicyKind::Selection => {
                let p = plugin.map(|p| Box::new(p) as Box<dyn Selection>);
                AnyGuarded::Selection(GuardedSelection::new(p, src, v, q, max_score_gap))
            }
            PolicyKind::Eviction => {
                let p = plugin.map(|p| Box::new(p) as Box<dyn Eviction>);
                AnyGuarded::Eviction(GuardedEviction::new(p, src, v, q))
            }
            PolicyKind::Prefetch => {
                let p = plugin.map(|p| Box::new(p) as Box<dyn Prefetch>);
                AnyGuarded::Prefetch(GuardedPrefetch::new(p, src, v, q))
            }
            PolicyKind::Placement => {
                let p = plugin.map(|p| Box::new(p) as Box<dyn Placement>);
                AnyGuarded::Placement(GuardedPlacement::new(p, src, v, q))
            }
        }
    }

    pub fn init(&mut self, args: &InitArgs) -> PolicyResult<()> {
        each!(self, g => g.init(args).map(drop))
    }

    /// Init and a few representative calls, failing on any fallback (`smoke`); what the
    /// policy says of itself.
    pub fn smoke(&mut self, args: &InitArgs) -> Result<PolicyInfo> {
        match self {
            AnyGuarded::Selection(g) => smoke::selection(g, args).map(|i| i.info),
            AnyGuarded::Eviction(g) => smoke::eviction(g, args),
            AnyGuarded::Prefetch(g) => smoke::prefetch(g, args).map(|i| i.info),
            AnyGuarded::Placement(g) => smoke::placement(g, args),
        }
    }

    pub fn stats(&self) -> &PolicyStats {
        each!(self, g => g.stats())
    }
}

/// Each policy's counters, by kind.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyStatsSet {
    pub selection: PolicyStats,
    pub eviction: PolicyStats,
    pub prefetch: PolicyStats,
    pub placement: PolicyStats,
}

/// One policy of each kind.
pub struct PolicySet {
    pub selection: GuardedSelection,
    pub eviction: GuardedEviction,
    pub prefetch: GuardedPrefetch,
    pub placement: GuardedPlacement,
}

impl PolicySet {
    /// A set of the policies `load` gives for each kind.
    pub fn load(mut load: impl FnMut(PolicyKind) -> Result<AnyGuarded>) -> Result<Self> {
        let loaded = (
            load(PolicyKind::Selection)?,
            load(PolicyKind::Eviction)?,
            load(PolicyKind::Prefetch)?,
            load(PolicyKind::Placement)?,
        );
        let (
            AnyGuarded::Selection(selection),
            AnyGuarded::Eviction(eviction),
            AnyGuarded::Prefetch(prefetch),
            AnyGuarded::Placement(placement),
        ) = loaded
        else {
            anyhow::bail!("a policy loader answered with another kind than asked for");
        };
        Ok(Self {
            selection,
            eviction,
            prefetch,
            placement,
        })
    }

    /// Initialises every policy; the first failure, by kind.
    pub fn init(&mut self, args: &InitArgs) -> Result<(), (PolicyKind, PolicyError)> {
        let fail = |kind| move |e| (kind, e);
        self.selection
            .init(args)
            .map_err(fail(PolicyKind::Selection))?;
        self.eviction
            .init(args)
            .map_err(fail(PolicyKind::Eviction))?;
        self.prefetch
            .init(args)
            .map_err(fail(PolicyKind::Prefetch))?;
        self.placement
            .init(args)
            .map_err(fail(PolicyKind::Placement))?;
        Ok(())
    }

    /// Puts `g` in its kind's place.
    pub fn install(&mut self, g: AnyGuarded) {
        match g {
            AnyGuarded::Selection(g) => self.selection = g,
            AnyGuarded::Eviction(g) => self.eviction = g,
            AnyGuarded::Prefetch(g) => self.prefetch = g,
            AnyGuarded::Placement(g) => self.placement = g,
        }
    }

    pub fn stats(&self) -> PolicyStatsSet {
        PolicyStatsSet {
            selection: self.selection.stats().clone(),
            eviction: self.eviction.stats().clone(),
            prefetch: self.prefetch.stats().clone(),
            placement: self.placement.stats().clone(),
        }
    }

    /// Time spent in every policy's calls so far, nanoseconds.
    pub fn call_ns(&self) -> u64 {
        self.selection.stats().call_ns
            + self.eviction.stats().call_ns
            + self.prefetch.stats().call_ns
            + self.placement.stats().call_ns
    }
}
