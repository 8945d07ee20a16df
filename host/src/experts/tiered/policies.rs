//! The store's four guarded policies: loading one from its source, smoke-testing a replacement
//! off the hot path, swapping it in between forward passes, and watching a plugin file.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::policy::smoke;
use crate::policy::wasm::{load_component, RuntimeLimits, WasmPolicy};
use crate::policy::*;

use super::{Inner, TieredExperts};

/// The placement source naming the built-in cost model (there is no bundled plugin of it).
pub const BUILTIN_PLACEMENT: &str = "cost-model";

/// Loads a policy of `kind` from `source` into its guarded slot (no plugin init yet).
pub(super) fn guarded(
    kind: PolicyKind,
    source: &PolicySource,
    limits: RuntimeLimits,
) -> Result<AnyGuarded> {
    if kind == PolicyKind::Placement && *source == PolicySource::Bundled(BUILTIN_PLACEMENT.into()) {
        let q = limits.quarantine_after;
        return Ok(AnyGuarded::Placement(GuardedPlacement::new(
            None, "builtin", "", q,
        )));
    }
    let bytes = source.bytes()?;
    let component = load_component(&bytes, &source.describe())?;
    anyhow::ensure!(
        component.kind == kind,
        "{} is a {} policy, not a {kind} policy",
        source.describe(),
        component.kind
    );
    let version = component.version.clone();
    let plugin = WasmPolicy::new(component, limits);
    let src = source.describe();
    let q = limits.quarantine_after;
    Ok(match kind {
        PolicyKind::Selection => AnyGuarded::Selection(GuardedSelection::new(
            Some(Box::new(plugin)),
            &src,
            &version,
            q,
            limits.max_score_gap,
        )),
        PolicyKind::Eviction => AnyGuarded::Eviction(GuardedEviction::new(
            Some(Box::new(plugin)),
            &src,
            &version,
            q,
        )),
        PolicyKind::Prefetch => AnyGuarded::Prefetch(GuardedPrefetch::new(
            Some(Box::new(plugin)),
            &src,
            &version,
            q,
        )),
        PolicyKind::Placement => AnyGuarded::Placement(GuardedPlacement::new(
            Some(Box::new(plugin)),
            &src,
            &version,
            q,
        )),
    })
}

pub(super) enum AnyGuarded {
    Selection(GuardedSelection),
    Eviction(GuardedEviction),
    Prefetch(GuardedPrefetch),
    Placement(GuardedPlacement),
}

pub(super) struct Policies {
    pub(super) selection: GuardedSelection,
    pub(super) eviction: GuardedEviction,
    pub(super) prefetch: GuardedPrefetch,
    pub(super) placement: GuardedPlacement,
}

impl Inner {
    pub(super) fn swap_policy(&self, kind: PolicyKind, source: &PolicySource) -> Result<()> {
        let mut g = guarded(kind, source, self.limits)?;
        // Smoke test: init with the current residency and a few representative calls.
        let args = self.init_args();
        let what = || format!("{kind} policy {}", source.describe());
        match &mut g {
            AnyGuarded::Selection(s) => smoke::selection(s, &args).map(drop),
            AnyGuarded::Eviction(v) => smoke::eviction(v, &args).map(drop),
            AnyGuarded::Prefetch(p) => smoke::prefetch(p, &args).map(drop),
            AnyGuarded::Placement(p) => smoke::placement(p, &args).map(drop),
        }
        .with_context(what)?;
        self.pending.lock().unwrap().push(g);
        Ok(())
    }

    /// Applies pending swaps (forward thread, between passes).
    pub(super) fn apply_swaps(&self) {
        let pending: Vec<AnyGuarded> = std::mem::take(&mut *self.pending.lock().unwrap());
        if pending.is_empty() {
            return;
        }
        let mut p = self.policies.lock().unwrap();
        for g in pending {
            // Re-initialise with the residency of now, not of the smoke test.
            let args = self.init_args();
            let ok = match g {
                AnyGuarded::Selection(mut s) => s.init(&args).map(|_| p.selection = s).is_ok(),
                AnyGuarded::Eviction(mut v) => v.init(&args).map(|_| p.eviction = v).is_ok(),
                AnyGuarded::Prefetch(mut f) => f.init(&args).map(|_| p.prefetch = f).is_ok(),
                AnyGuarded::Placement(mut f) => f.init(&args).map(|_| p.placement = f).is_ok(),
            };
            if ok {
                self.swaps.fetch_add(1, Ordering::Relaxed);
            } else {
                tracing::warn!(
                    "a swapped-in policy failed to re-initialise; keeping the previous one"
                );
            }
        }
    }
}

impl TieredExperts {
    /// Watches `path` and hot-swaps the `kind` policy whenever the file changes (debounced).
    pub fn watch_policy(&self, kind: PolicyKind, path: &Path) -> Result<()> {
        use notify::Watcher;
        let file = path
            .canonicalize()
            .with_context(|| format!("cannot watch policy plugin {}", path.display()))?;
        let dir = file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let target = file.clone();
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = ev {
                if ev.paths.iter().any(|p| p == &target) && !ev.kind.is_access() {
                    let _ = tx.send(());
                }
            }
        })
        .context("cannot start the file watcher")?;
        watcher
            .watch(&dir, notify::RecursiveMode::NonRecursive)
            .with_context(|| format!("cannot watch {}", dir.display()))?;
        let inner = Arc::downgrade(&self.inner);
        std::thread::Builder::new()
            .name("moehost-policy-watch".into())
            .spawn(move || {
                // Debounce: act once the file has been quiet for 400 ms.
                while rx.recv().is_ok() {
                    while rx.recv_timeout(Duration::from_millis(400)).is_ok() {}
                    let Some(inner) = inner.upgrade() else { break };
                    match inner.swap_policy(kind, &PolicySource::File(file.clone())) {
                        Ok(()) => {
                            tracing::info!(%kind, file = %file.display(), "policy reloaded")
                        }
                        Err(e) => tracing::warn!(
                            %kind, file = %file.display(), "policy not reloaded: {e:#}"
                        ),
                    }
                }
            })
            .context("cannot start the policy watch thread")?;
        self._watchers.lock().unwrap().push(watcher);
        Ok(())
    }
}
