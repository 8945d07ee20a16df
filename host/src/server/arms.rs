//! A/B arms: named policy sets that requests are routed to, by weight or by the
//! `x-moehost-arm` request header, each with its own counters.
//!
//! An arm is a complete expert store (`TieredExperts`) with its own three policies and the
//! server's tier budgets, serving the same model weights: the arms never share a cache, so
//! one arm's policy cannot help or hurt another's hit rate, and with exact selection every
//! arm produces the same tokens (the caching invariant). Budgets therefore apply per arm.
//! Owns: parsing `--arm`, building the stores, picking an arm per request, per-arm counters.
//! Does not own: batching (the scheduler runs one batch per arm) or HTTP.

use anyhow::{bail, Context, Result};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use crate::engine::Engine;
use crate::experts::tiered::{StoreConfig, TieredExperts};
use crate::policy::{PolicyKind, PolicySource};

/// The arm every server has: the policies of the command line.
pub const DEFAULT_ARM: &str = "default";
/// The request header that picks an arm by name.
pub const ARM_HEADER: &str = "x-moehost-arm";

/// An arm as given on the command line:
/// `NAME=KIND:POLICY[,KIND:POLICY...][,weight:W]`, e.g. `b=eviction:lfu,prefetch:transitions`.
/// Kinds not named keep the default arm's policy; the weight defaults to 1. `default=weight:W`
/// sets the default arm's weight (weight 0: reached only through the header).
#[derive(Debug, Clone, PartialEq)]
pub struct ArmSpec {
    pub name: String,
    pub weight: f64,
    pub policies: Vec<(PolicyKind, PolicySource)>,
}

impl std::str::FromStr for ArmSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "expected NAME=KIND:POLICY[,KIND:POLICY...][,weight:W], \
                     e.g. b=eviction:lfu,prefetch:transitions,weight:0.5";
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("arm {s:?}: {usage}"))?;
        let name = name.trim();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "arm name {name:?} must be letters, digits, '-' or '_'"
            ));
        }
        let mut spec = ArmSpec {
            name: name.to_owned(),
            weight: 1.0,
            policies: Vec::new(),
        };
        for part in rest.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once(':')
                .ok_or_else(|| format!("arm {name}: {part:?}: {usage}"))?;
            let kind = match key.trim() {
                "weight" => {
                    spec.weight = value
                        .trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|w| w.is_finite() && *w >= 0.0)
                        .ok_or_else(|| {
                            format!("arm {name}: weight {value:?} must be a number >= 0")
                        })?;
                    continue;
                }
                other => PolicyKind::parse(other).ok_or_else(|| {
                    format!(
                        "arm {name}: unknown key {other:?} (selection, eviction, prefetch, placement or weight)"
                    )
                })?,
            };
            if spec.policies.iter().any(|(k, _)| *k == kind) {
                return Err(format!("arm {name}: {kind} given twice"));
            }
            spec.policies
                .push((kind, PolicySource::parse(value.trim())));
        }
        if name == DEFAULT_ARM && !spec.policies.is_empty() {
            return Err(format!(
                "arm {DEFAULT_ARM} takes its policies from --selection/--eviction/--prefetch; \
                 give it only a weight"
            ));
        }
        Ok(spec)
    }
}

/// Counters of one arm.
#[derive(Default)]
pub struct ArmMetrics {
    pub requests: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub decode_steps: AtomicU64,
    pub decode_ns: AtomicU64,
}

/// One arm: its store, the configuration it was built from, its counters.
pub struct Arm {
    pub name: String,
    pub weight: f64,
    pub store: Arc<TieredExperts>,
    pub config: StoreConfig,
    pub metrics: ArmMetrics,
}

/// Every arm of a server (the default one first) and the weighted picker.
pub struct Arms {
    pub arms: Vec<Arm>,
    /// Smooth weighted round robin (as nginx): deterministic, and each arm's share of any
    /// window of requests is as close to its weight as whole requests allow.
    current: Mutex<Vec<f64>>,
}

impl Arms {
    /// The default arm (the engine's own store) plus one store per extra spec.
    pub fn build(
        engine: &Engine,
        default_store: Arc<TieredExperts>,
        default_config: &StoreConfig,
        specs: &[ArmSpec],
    ) -> Result<Self> {
        let mut default_weight = 1.0;
        let mut arms = Vec::new();
        let mut seen = vec![DEFAULT_ARM.to_owned()];
        for spec in specs {
            if spec.name == DEFAULT_ARM {
                default_weight = spec.weight;
                continue;
            }
            if seen.contains(&spec.name) {
                bail!("arm {} is given twice", spec.name);
            }
            seen.push(spec.name.clone());
            let mut config = default_config.clone();
            for (kind, source) in &spec.policies {
                *config.source_mut(*kind) = source.clone();
            }
            let store =
                TieredExperts::new(engine.checkpoint.clone(), engine.model.config(), &config)
                    .with_context(|| format!("cannot build arm {}", spec.name))?;
            arms.push(Arm {
                name: spec.name.clone(),
                weight: spec.weight,
                store: Arc::new(store),
                config,
                metrics: ArmMetrics::default(),
            });
        }
        arms.insert(
            0,
            Arm {
                name: DEFAULT_ARM.to_owned(),
                weight: default_weight,
                store: default_store,
                config: default_config.clone(),
                metrics: ArmMetrics::default(),
            },
        );
        if arms.iter().all(|a| a.weight == 0.0) {
            bail!("every arm has weight 0: no request could be routed without the {ARM_HEADER} header");
        }
        let n = arms.len();
        Ok(Self {
            arms,
            current: Mutex::new(vec![0.0; n]),
        })
    }

    /// Only the default arm, on `store`.
    pub fn single(store: Arc<TieredExperts>, config: &StoreConfig) -> Self {
        Self {
            arms: vec![Arm {
                name: DEFAULT_ARM.to_owned(),
                weight: 1.0,
                store,
                config: config.clone(),
                metrics: ArmMetrics::default(),
            }],
            current: Mutex::new(vec![0.0]),
        }
    }

    pub fn by_name(&self, name: &str) -> Option<usize> {
        self.arms.iter().position(|a| a.name == name)
    }

    /// The arm for a request: the one `header` names, else the next by weight.
    pub fn pick(&self, header: Option<&str>) -> Result<usize, String> {
        if let Some(name) = header {
            return self.by_name(name.trim()).ok_or_else(|| {
                format!(
                    "unknown arm {name:?} in the {ARM_HEADER} header; arms: {}",
                    self.names().join(", ")
                )
            });
        }
        let mut current = self.current.lock().unwrap();
        let total: f64 = self.arms.iter().map(|a| a.weight).sum();
        let mut best = 0;
        for (i, a) in self.arms.iter().enumerate() {
            current[i] += a.weight;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        Ok(best)
    }

    pub fn names(&self) -> Vec<&str> {
        self.arms.iter().map(|a| a.name.as_str()).collect()
    }

    pub fn default_arm(&self) -> &Arm {
        &self.arms[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_arm_specs_and_refuses_bad_ones() {
        let a: ArmSpec = "b=eviction:lfu,prefetch:transitions,weight:0.5"
            .parse()
            .unwrap();
        assert_eq!(a.name, "b");
        assert_eq!(a.weight, 0.5);
        assert_eq!(
            a.policies,
            vec![
                (PolicyKind::Eviction, PolicySource::Bundled("lfu".into())),
                (
                    PolicyKind::Prefetch,
                    PolicySource::Bundled("transitions".into())
                ),
            ]
        );
        let d: ArmSpec = "default=weight:3".parse().unwrap();
        assert_eq!((d.weight, d.policies.len()), (3.0, 0));
        for bad in [
            "noequals",
            "=eviction:lfu",
            "b=eviction",
            "b=cache:lru",
            "b=weight:-1",
            "b=eviction:lru,eviction:lfu",
            "default=eviction:lfu",
            "b c=eviction:lfu",
        ] {
            assert!(bad.parse::<ArmSpec>().is_err(), "{bad}");
        }
    }
}
