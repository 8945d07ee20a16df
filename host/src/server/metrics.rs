//! Server counters and their Prometheus text exposition (`GET /metrics`).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::store::TieredExperts;

#[derive(Default)]
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
    pub ttft_count: AtomicU64,
    pub ttft_ns: AtomicU64,
    pub started: std::sync::OnceLock<std::time::Instant>,
}

impl Metrics {
    pub fn observe_ttft(&self, d: Duration) {
        self.ttft_count.fetch_add(1, Ordering::Relaxed);
        self.ttft_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Prometheus text format, with the expert store's and policies' counters.
    pub fn render(&self, store: &TieredExperts) -> String {
        let mut o = String::new();
        let g = |x: &AtomicU64| x.load(Ordering::Relaxed);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(o, "# HELP moehost_{name} {help}");
            let _ = writeln!(o, "# TYPE moehost_{name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(o, "moehost_{name}{labels} {v}");
            }
        };
        metric(
            "requests_total",
            "counter",
            "Completed HTTP inference requests by outcome.",
            &[
                ("{outcome=\"ok\"}".into(), g(&self.requests_ok) as f64),
                (
                    "{outcome=\"client_error\"}".into(),
                    g(&self.requests_client_error) as f64,
                ),
                (
                    "{outcome=\"rejected\"}".into(),
                    g(&self.requests_rejected) as f64,
                ),
            ],
        );
        metric(
            "prompt_tokens_total",
            "counter",
            "Prompt tokens prefilled.",
            &[(String::new(), g(&self.prompt_tokens) as f64)],
        );
        metric(
            "completion_tokens_total",
            "counter",
            "Tokens generated.",
            &[(String::new(), g(&self.completion_tokens) as f64)],
        );
        let uptime = self
            .started
            .get()
            .map_or(0.0, |t| t.elapsed().as_secs_f64())
            .max(1e-9);
        metric(
            "tokens_per_second",
            "gauge",
            "Generated tokens per second since start.",
            &[(String::new(), g(&self.completion_tokens) as f64 / uptime)],
        );
        metric(
            "queue_depth",
            "gauge",
            "Requests waiting for admission.",
            &[(String::new(), g(&self.queue_depth) as f64)],
        );
        metric(
            "active_sequences",
            "gauge",
            "Sequences being decoded.",
            &[(String::new(), g(&self.active) as f64)],
        );
        metric(
            "time_to_first_token_seconds",
            "summary",
            "Time from request to its first token.",
            &[
                ("_sum".into(), g(&self.ttft_ns) as f64 / 1e9),
                ("_count".into(), g(&self.ttft_count) as f64),
            ],
        );
        metric(
            "decode_steps_total",
            "counter",
            "Batched decode forward passes.",
            &[(String::new(), g(&self.decode_steps) as f64)],
        );
        let s = store.stats();
        let tiers = [("device", &s.device), ("host", &s.host), ("disk", &s.disk)];
        metric(
            "expert_hits_total",
            "counter",
            "Expert accesses served from a tier.",
            &tiers
                .iter()
                .map(|(t, c)| (format!("{{tier=\"{t}\"}}"), c.hits as f64))
                .collect::<Vec<_>>(),
        );
        metric(
            "expert_misses_total",
            "counter",
            "Expert accesses that missed a tier.",
            &tiers
                .iter()
                .map(|(t, c)| (format!("{{tier=\"{t}\"}}"), c.misses as f64))
                .collect::<Vec<_>>(),
        );
        metric(
            "expert_bytes_in_total",
            "counter",
            "Bytes copied into a tier.",
            &tiers
                .iter()
                .map(|(t, c)| (format!("{{tier=\"{t}\"}}"), c.bytes_in as f64))
                .collect::<Vec<_>>(),
        );
        metric(
            "expert_wait_seconds_total",
            "counter",
            "Time the forward pass waited for experts.",
            &[(String::new(), s.wait_ms / 1e3)],
        );
        let pols = [
            ("selection", &s.policies.selection),
            ("eviction", &s.policies.eviction),
            ("prefetch", &s.policies.prefetch),
        ];
        let label = |k: &str, p: &crate::policy::PolicyStats| {
            format!("{{kind=\"{k}\",policy=\"{}\",arm=\"default\"}}", p.name)
        };
        metric(
            "policy_calls_total",
            "counter",
            "Policy calls.",
            &pols
                .iter()
                .map(|(k, p)| (label(k, p), p.calls as f64))
                .collect::<Vec<_>>(),
        );
        metric(
            "policy_errors_total",
            "counter",
            "Policy calls that trapped, timed out, ran out of memory or answered invalidly.",
            &pols
                .iter()
                .map(|(k, p)| {
                    (
                        label(k, p),
                        (p.timeouts + p.out_of_memory + p.traps + p.invalid_answers) as f64,
                    )
                })
                .collect::<Vec<_>>(),
        );
        metric(
            "policy_fallbacks_total",
            "counter",
            "Policy calls served by the built-in policy.",
            &pols
                .iter()
                .map(|(k, p)| (label(k, p), p.fallbacks as f64))
                .collect::<Vec<_>>(),
        );
        metric(
            "policy_swaps_total",
            "counter",
            "Hot swaps applied.",
            &[(String::new(), s.policy_swaps as f64)],
        );
        o
    }
}
