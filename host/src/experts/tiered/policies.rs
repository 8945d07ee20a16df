//! The store's four guarded policies: loading one from its source, smoke-testing a replacement
//! off the hot path, swapping it in between forward passes, and watching a plugin file.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::policy::set::AnyGuarded;
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
    let q = limits.quarantine_after;
    if kind == PolicyKind::Placement && *source == PolicySource::Bundled(BUILTIN_PLACEMENT.into()) {
        return Ok(AnyGuarded::new(kind, None, "builtin", "", q, 0.0));
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
    Ok(AnyGuarded::new(
        kind,
        Some(plugin),
        &src,
        &version,
        q,
        limits.max_score_gap,
    ))
}

impl Inner {
    pub(super) fn swap_policy(&self, kind: PolicyKind, source: &PolicySource) -> Result<()> {
        let mut g = guarded(kind, source, self.limits)?;
        // Smoke test: init with the current residency and a few representative calls.
        let args = self.init_args();
        g.smoke(&args)
            .with_context(|| format!("{kind} policy {}", source.describe()))?;
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
            let mut g = g;
            let ok = g.init(&args).is_ok();
            if ok {
                p.install(g);
            }
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
