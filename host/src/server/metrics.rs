//! Server counters and `GET /metrics` in the OpenMetrics text format (prometheus-client).
//!
//! Owns: the server's own counters and latency histograms (time to first token, inter-token
//! latency, queue wait, decode step time), and the scrape-time snapshot of every arm's store,
//! policies and shadows. Label values are escaped here: prometheus-client writes them raw, and
//! plugin names are untrusted text.

use prometheus_client::encoding::{
    text::encode, DescriptorEncoder, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::arms::Arms;
use super::shadow::Shadows;

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A label value, escaped as the text format requires.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Esc(pub String);

impl EncodeLabelValue for Esc {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(&label(&self.0))
    }
}

/// Labels of a per-arm series.
pub type ArmLabel = Vec<(&'static str, Esc)>;

pub fn arm_label(arm: &str) -> ArmLabel {
    vec![("arm", Esc(arm.to_owned()))]
}

/// `buckets` buckets doubling from `start` seconds.
fn doubling(start: f64, buckets: u16) -> Histogram {
    Histogram::new(exponential_buckets(start, 2.0, buckets))
}

type ArmHistograms = Family<ArmLabel, Histogram, fn() -> Histogram>;

pub struct Metrics {
    pub requests_ok: AtomicU64,
    pub requests_client_error: AtomicU64,
    pub requests_rejected: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub queue_depth: AtomicU64,
    pub active: AtomicU64,
    pub decode_steps: AtomicU64,
    pub decode_ns: AtomicU64,
    /// Prompts prefilled inside a decode step's forward pass, beside decoding sequences.
    pub prefills_in_step: AtomicU64,
    /// Forward passes that prefilled prompts alone (too long to join a step).
    pub prefill_passes: AtomicU64,
    pub started: std::sync::OnceLock<std::time::Instant>,
    /// Request received to its first token, per arm (5 ms to ~80 s).
    pub ttft: ArmHistograms,
    /// Between a sequence's consecutive tokens, per arm (1 ms to ~16 s).
    pub inter_token: ArmHistograms,
    /// Request received to admitted by the scheduler (1 ms to ~65 s).
    pub queue_wait: Histogram,
    /// One batched decode forward pass, per arm (1 ms to ~16 s).
    pub step: ArmHistograms,
}

impl Default for Metrics {
    fn default() -> Self {
        fn ttft() -> Histogram {
            doubling(0.005, 15)
        }
        fn fine() -> Histogram {
            doubling(0.001, 15)
        }
        Self {
            requests_ok: AtomicU64::new(0),
            requests_client_error: AtomicU64::new(0),
            requests_rejected: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            active: AtomicU64::new(0),
            decode_steps: AtomicU64::new(0),
            decode_ns: AtomicU64::new(0),
            prefills_in_step: AtomicU64::new(0),
            prefill_passes: AtomicU64::new(0),
            started: std::sync::OnceLock::new(),
            ttft: Family::new_with_constructor(ttft),
            inter_token: Family::new_with_constructor(fine),
            queue_wait: doubling(0.001, 17),
            step: Family::new_with_constructor(fine),
        }
    }
}

/// One metric family's samples, read at scrape time.
#[derive(Debug)]
struct Snapshot {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    samples: Vec<(Vec<(&'static str, Esc)>, Value)>,
}

#[derive(Debug, Clone, Copy)]
enum Value {
    Int(u64),
    Float(f64),
}

#[derive(Debug, Default)]
struct Snapshots(Vec<Snapshot>);

impl Snapshots {
    fn add(
        &mut self,
        name: &'static str,
        kind: MetricType,
        help: &'static str,
        samples: Vec<(Vec<(&'static str, Esc)>, Value)>,
    ) {
        self.0.push(Snapshot {
            name,
            help,
            kind,
            samples,
        });
    }

    fn one(&mut self, name: &'static str, kind: MetricType, help: &'static str, v: Value) {
        self.add(name, kind, help, vec![(Vec::new(), v)]);
    }
}

fn encode_value(
    kind: &MetricType,
    v: Value,
    e: prometheus_client::encoding::MetricEncoder,
) -> Result<(), std::fmt::Error> {
    match (kind, v) {
        (MetricType::Counter, Value::Int(x)) => ConstCounter::new(x).encode(e),
        (MetricType::Counter, Value::Float(x)) => ConstCounter::new(x).encode(e),
        (_, Value::Int(x)) => ConstGauge::new(x as i64).encode(e),
        (_, Value::Float(x)) => ConstGauge::new(x).encode(e),
    }
}

impl prometheus_client::collector::Collector for Snapshots {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let mut family = encoder.encode_descriptor(f.name, f.help, None, f.kind)?;
            for (labels, v) in &f.samples {
                if labels.is_empty() {
                    encode_value(&f.kind, *v, family)?;
                    break;
                }
                encode_value(&f.kind, *v, family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

impl Metrics {
    /// Scrape text: the server's counters and histograms, each arm's counters, its expert
    /// store's and policies' counters (label `arm`), and the shadow policies' simulated hit
    /// rates. OpenMetrics: a counter family `x` has samples `x_total`.
    pub fn render(&self, arms: &Arms, shadows: &Option<Shadows>) -> String {
        let mut o = Snapshots::default();
        let g = |x: &AtomicU64| x.load(Ordering::Relaxed);
        use MetricType::{Counter, Gauge};
        let int = |x: &AtomicU64| Value::Int(g(x));
        let outcome = |o: &str, x: &AtomicU64| (vec![("outcome", Esc(o.into()))], int(x));
        o.add(
            "requests",
            Counter,
            "Completed HTTP inference requests by outcome.",
            vec![
                outcome("ok", &self.requests_ok),
                outcome("client_error", &self.requests_client_error),
                outcome("rejected", &self.requests_rejected),
            ],
        );
        o.one(
            "prompt_tokens",
            Counter,
            "Prompt tokens prefilled.",
            int(&self.prompt_tokens),
        );
        o.one(
            "completion_tokens",
            Counter,
            "Tokens generated.",
            int(&self.completion_tokens),
        );
        let uptime = self
            .started
            .get()
            .map_or(0.0, |t| t.elapsed().as_secs_f64())
            .max(1e-9);
        o.one(
            "tokens_per_second",
            Gauge,
            "Generated tokens per second since start.",
            Value::Float(g(&self.completion_tokens) as f64 / uptime),
        );
        o.one(
            "queue_depth",
            Gauge,
            "Requests waiting for admission.",
            int(&self.queue_depth),
        );
        o.one(
            "active_sequences",
            Gauge,
            "Sequences being decoded.",
            int(&self.active),
        );
        o.one(
            "decode_steps",
            Counter,
            "Batched decode forward passes.",
            int(&self.decode_steps),
        );
        o.one(
            "prefills_in_step",
            Counter,
            "Prompts prefilled inside a batched step, beside decoding sequences.",
            int(&self.prefills_in_step),
        );
        o.one(
            "prefill_passes",
            Counter,
            "Forward passes that prefilled prompts too long to join a step.",
            int(&self.prefill_passes),
        );
        let per_arm = |f: &dyn Fn(&super::arms::Arm) -> Value| {
            arms.arms
                .iter()
                .map(|a| (arm_label(&a.name), f(a)))
                .collect::<Vec<_>>()
        };
        o.add(
            "arm_weight",
            Gauge,
            "Share of requests routed to an arm by weight (relative).",
            per_arm(&|a| Value::Float(a.weight)),
        );
        o.add(
            "arm_requests",
            Counter,
            "Requests admitted per arm.",
            per_arm(&|a| int(&a.metrics.requests)),
        );
        o.add(
            "arm_prompt_tokens",
            Counter,
            "Prompt tokens prefilled per arm.",
            per_arm(&|a| int(&a.metrics.prompt_tokens)),
        );
        o.add(
            "arm_completion_tokens",
            Counter,
            "Tokens generated per arm.",
            per_arm(&|a| int(&a.metrics.completion_tokens)),
        );
        o.add(
            "arm_decode_steps",
            Counter,
            "Batched decode forward passes per arm.",
            per_arm(&|a| int(&a.metrics.decode_steps)),
        );
        o.add(
            "arm_decode_seconds",
            Counter,
            "Time in batched decode forward passes per arm.",
            per_arm(&|a| Value::Float(g(&a.metrics.decode_ns) as f64 / 1e9)),
        );
        let stats: Vec<_> = arms
            .arms
            .iter()
            .map(|a| (a.name.as_str(), a.store.stats()))
            .collect();
        let tier_samples = |f: &dyn Fn(&crate::experts::tiered::TierCounters) -> u64| {
            let mut v = Vec::new();
            for (arm, s) in &stats {
                for (t, c) in [("device", &s.device), ("host", &s.host), ("disk", &s.disk)] {
                    v.push((
                        vec![("arm", Esc((*arm).into())), ("tier", Esc(t.into()))],
                        Value::Int(f(c)),
                    ));
                }
            }
            v
        };
        o.add(
            "expert_hits",
            Counter,
            "Expert accesses served from a tier.",
            tier_samples(&|c| c.hits),
        );
        o.add(
            "expert_misses",
            Counter,
            "Expert accesses that missed a tier.",
            tier_samples(&|c| c.misses),
        );
        o.add(
            "expert_bytes_in",
            Counter,
            "Bytes copied into a tier.",
            tier_samples(&|c| c.bytes_in),
        );
        let store_samples = |f: &dyn Fn(&crate::experts::tiered::StoreStats) -> Value| {
            stats
                .iter()
                .map(|(arm, s)| (arm_label(arm), f(s)))
                .collect::<Vec<_>>()
        };
        o.add(
            "expert_wait_seconds",
            Counter,
            "Time the forward pass waited for experts.",
            store_samples(&|s| Value::Float(s.wait_ms / 1e3)),
        );
        let mut placed = Vec::new();
        for (arm, s) in &stats {
            for (place, n) in [
                ("fetched", s.placement.fetched),
                ("host", s.placement.on_host),
            ] {
                placed.push((
                    vec![("arm", Esc((*arm).into())), ("where", Esc(place.into()))],
                    Value::Int(n),
                ));
            }
        }
        o.add(
            "expert_placements",
            Counter,
            "Missed experts by where they ran: fetched into the device tier, or computed where \
             they live (host).",
            placed,
        );
        o.add(
            "expert_host_tokens",
            Counter,
            "Tokens computed by experts run where they live (host placement).",
            store_samples(&|s| Value::Int(s.placement.host_tokens)),
        );
        let policy_samples = |f: &dyn Fn(&crate::policy::PolicyStats) -> Value| {
            let mut v = Vec::new();
            for (arm, s) in &stats {
                for (k, p) in [
                    ("selection", &s.policies.selection),
                    ("eviction", &s.policies.eviction),
                    ("prefetch", &s.policies.prefetch),
                    ("placement", &s.policies.placement),
                ] {
                    v.push((
                        vec![
                            ("kind", Esc(k.into())),
                            ("policy", Esc(p.name.clone())),
                            ("arm", Esc((*arm).into())),
                        ],
                        f(p),
                    ));
                }
            }
            v
        };
        o.add(
            "policy_calls",
            Counter,
            "Policy calls.",
            policy_samples(&|p| Value::Int(p.calls)),
        );
        o.add(
            "policy_errors",
            Counter,
            "Policy calls that trapped, timed out, ran out of memory or answered invalidly.",
            policy_samples(&|p| {
                Value::Int(p.timeouts + p.out_of_memory + p.traps + p.invalid_answers)
            }),
        );
        o.add(
            "policy_fallbacks",
            Counter,
            "Policy calls served by the built-in policy.",
            policy_samples(&|p| Value::Int(p.fallbacks)),
        );
        o.add(
            "policy_call_seconds",
            Gauge,
            "Mean time of a policy's recent calls (about the last thousand).",
            policy_samples(&|p| Value::Float(p.recent_call_us / 1e6)),
        );
        o.add(
            "policy_slow",
            Gauge,
            "1 while a policy's recent calls average over 100 us (time the model waits on).",
            policy_samples(&|p| Value::Int(u64::from(p.slow))),
        );
        o.add(
            "policy_quarantined",
            Gauge,
            "1 once a policy is quarantined (its calls served by the built-in policy).",
            policy_samples(&|p| Value::Int(u64::from(p.quarantined))),
        );
        o.add(
            "policy_seconds_per_token",
            Gauge,
            "All policies' time per token computed, over about the last hundred passes.",
            store_samples(&|s| Value::Float(s.policy_budget.per_token_us / 1e6)),
        );
        o.add(
            "policy_token_budget_seconds",
            Gauge,
            "The per-token policy budget (--policy-budget-us); warned near 80% of it.",
            store_samples(&|s| Value::Float(s.policy_budget.budget_us / 1e6)),
        );
        o.one(
            "policy_swaps",
            Counter,
            "Hot swaps applied.",
            Value::Int(stats.iter().map(|(_, s)| s.policy_swaps).sum()),
        );
        if let Some(sh) = shadows {
            let labels = |s: &super::shadow::ShadowStats| {
                vec![
                    ("arm", Esc(sh.arm.clone())),
                    ("policy", Esc(s.policy.clone())),
                    ("role", Esc(if s.live { "live" } else { "shadow" }.into())),
                ]
            };
            let st = sh.stats();
            let each = |f: &dyn Fn(&super::shadow::ShadowStats) -> Value| {
                st.iter().map(|s| (labels(s), f(s))).collect::<Vec<_>>()
            };
            o.add(
                "shadow_accesses",
                Counter,
                "Expert accesses replayed on a shadow policy's simulated cache.",
                each(&|s| Value::Int(s.accesses)),
            );
            o.add(
                "shadow_hits",
                Counter,
                "Hits on a shadow policy's simulated cache (role live: the live policies, simulated).",
                each(&|s| Value::Int(s.hits)),
            );
            o.add(
                "shadow_hit_rate",
                Gauge,
                "Hit rate of a shadow policy's simulated cache.",
                each(&|s| Value::Float(s.hit_rate)),
            );
            o.add(
                "shadow_fallbacks",
                Counter,
                "Shadow policy calls served by the built-in policy.",
                each(&|s| Value::Int(s.policy_fallbacks)),
            );
            o.add(
                "shadow_dropped_steps",
                Counter,
                "Live layer steps the shadows missed because they fell behind.",
                vec![(
                    arm_label(&sh.arm),
                    Value::Int(sh.dropped_steps.load(Ordering::Relaxed)),
                )],
            );
        }

        let mut registry = Registry::with_prefix("moehost");
        registry.register_collector(Box::new(o));
        registry.register(
            "time_to_first_token_seconds",
            "Time from a request's arrival to its first token, per arm.",
            self.ttft.clone(),
        );
        registry.register(
            "inter_token_latency_seconds",
            "Time between a sequence's consecutive tokens, per arm.",
            self.inter_token.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time from a request's arrival to its admission by the scheduler.",
            self.queue_wait.clone(),
        );
        registry.register(
            "decode_step_seconds",
            "Time of one batched decode forward pass, per arm.",
            self.step.clone(),
        );
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &registry);
        text
    }

    pub fn observe_ttft(&self, arm: &str, d: Duration) {
        self.ttft
            .get_or_create(&arm_label(arm))
            .observe(d.as_secs_f64());
    }
}

/// A Prometheus label value: backslash, double quote and newline escaped as the text format
/// requires.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_cannot_break_the_text_format() {
        let hostile = "x\"} moehost_requests_total{outcome=\"ok\"} 999999\n\\";
        let v = label(hostile);
        assert_eq!(
            v,
            "x\\\"} moehost_requests_total{outcome=\\\"ok\\\"} 999999\\n\\\\"
        );
        // Inside quotes, every quote left is escaped and no line ends.
        assert!(!v.contains('\n'));
        let unescaped_quotes = v
            .char_indices()
            .filter(|&(i, c)| c == '"' && !v[..i].ends_with('\\'))
            .count();
        assert_eq!(unescaped_quotes, 0);
    }
}
