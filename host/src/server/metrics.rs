//! Server counters and their Prometheus text exposition (`GET /metrics`).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::arms::Arms;
use super::shadow::Shadows;

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
    /// Prompts prefilled inside a decode step's forward pass, beside decoding sequences.
    pub prefills_in_step: AtomicU64,
    /// Forward passes that prefilled prompts alone (too long to join a step).
    pub prefill_passes: AtomicU64,
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

    /// Prometheus text format, with each arm's counters, its expert store's and policies'
    /// counters (label `arm`), and the shadow policies' simulated hit rates.
    pub fn render(&self, arms: &Arms, shadows: &Option<Shadows>) -> String {
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
        metric(
            "prefills_in_step_total",
            "counter",
            "Prompts prefilled inside a batched step, beside decoding sequences.",
            &[(String::new(), g(&self.prefills_in_step) as f64)],
        );
        metric(
            "prefill_passes_total",
            "counter",
            "Forward passes that prefilled prompts too long to join a step.",
            &[(String::new(), g(&self.prefill_passes) as f64)],
        );
        let per_arm = |f: &dyn Fn(&super::arms::Arm) -> f64| -> Vec<(String, f64)> {
            arms.arms
                .iter()
                .map(|a| (format!("{{arm=\"{}\"}}", label(&a.name)), f(a)))
                .collect()
        };
        metric(
            "arm_weight",
            "gauge",
            "Share of requests routed to an arm by weight (relative).",
            &per_arm(&|a| a.weight),
        );
        metric(
            "arm_requests_total",
            "counter",
            "Requests admitted per arm.",
            &per_arm(&|a| g(&a.metrics.requests) as f64),
        );
        metric(
            "arm_prompt_tokens_total",
            "counter",
            "Prompt tokens prefilled per arm.",
            &per_arm(&|a| g(&a.metrics.prompt_tokens) as f64),
        );
        metric(
            "arm_completion_tokens_total",
            "counter",
            "Tokens generated per arm.",
            &per_arm(&|a| g(&a.metrics.completion_tokens) as f64),
        );
        metric(
            "arm_decode_steps_total",
            "counter",
            "Batched decode forward passes per arm.",
            &per_arm(&|a| g(&a.metrics.decode_steps) as f64),
        );
        metric(
            "arm_decode_seconds_total",
            "counter",
            "Time in batched decode forward passes per arm.",
            &per_arm(&|a| g(&a.metrics.decode_ns) as f64 / 1e9),
        );
        let mut ttft = Vec::new();
        for a in &arms.arms {
            ttft.push((
                format!("_sum{{arm=\"{}\"}}", label(&a.name)),
                g(&a.metrics.ttft_ns) as f64 / 1e9,
            ));
            ttft.push((
                format!("_count{{arm=\"{}\"}}", label(&a.name)),
                g(&a.metrics.ttft_count) as f64,
            ));
        }
        metric(
            "arm_time_to_first_token_seconds",
            "summary",
            "Time from request to its first token, per arm.",
            &ttft,
        );
        let stats: Vec<_> = arms
            .arms
            .iter()
            .map(|a| (a.name.as_str(), a.store.stats()))
            .collect();
        let tier_samples = |f: &dyn Fn(&crate::store::TierCounters) -> f64| {
            let mut v = Vec::new();
            for (arm, s) in &stats {
                for (t, c) in [("device", &s.device), ("host", &s.host), ("disk", &s.disk)] {
                    v.push((format!("{{arm=\"{arm}\",tier=\"{t}\"}}"), f(c)));
                }
            }
            v
        };
        metric(
            "expert_hits_total",
            "counter",
            "Expert accesses served from a tier.",
            &tier_samples(&|c| c.hits as f64),
        );
        metric(
            "expert_misses_total",
            "counter",
            "Expert accesses that missed a tier.",
            &tier_samples(&|c| c.misses as f64),
        );
        metric(
            "expert_bytes_in_total",
            "counter",
            "Bytes copied into a tier.",
            &tier_samples(&|c| c.bytes_in as f64),
        );
        metric(
            "expert_wait_seconds_total",
            "counter",
            "Time the forward pass waited for experts.",
            &stats
                .iter()
                .map(|(arm, s)| (format!("{{arm=\"{arm}\"}}"), s.wait_ms / 1e3))
                .collect::<Vec<_>>(),
        );
        let policy_samples = |f: &dyn Fn(&crate::policy::PolicyStats) -> f64| {
            let mut v = Vec::new();
            for (arm, s) in &stats {
                for (k, p) in [
                    ("selection", &s.policies.selection),
                    ("eviction", &s.policies.eviction),
                    ("prefetch", &s.policies.prefetch),
                ] {
                    v.push((
                        format!(
                            "{{kind=\"{k}\",policy=\"{}\",arm=\"{}\"}}",
                            label(&p.name),
                            label(arm)
                        ),
                        f(p),
                    ));
                }
            }
            v
        };
        metric(
            "policy_calls_total",
            "counter",
            "Policy calls.",
            &policy_samples(&|p| p.calls as f64),
        );
        metric(
            "policy_errors_total",
            "counter",
            "Policy calls that trapped, timed out, ran out of memory or answered invalidly.",
            &policy_samples(&|p| {
                (p.timeouts + p.out_of_memory + p.traps + p.invalid_answers) as f64
            }),
        );
        metric(
            "policy_fallbacks_total",
            "counter",
            "Policy calls served by the built-in policy.",
            &policy_samples(&|p| p.fallbacks as f64),
        );
        metric(
            "policy_call_seconds",
            "gauge",
            "Mean time of a policy's recent calls (about the last thousand).",
            &policy_samples(&|p| p.recent_call_us / 1e6),
        );
        metric(
            "policy_slow",
            "gauge",
            "1 while a policy's recent calls average over 100 us (time the model waits on).",
            &policy_samples(&|p| f64::from(u8::from(p.slow))),
        );
        metric(
            "policy_quarantined",
            "gauge",
            "1 once a policy is quarantined (its calls served by the built-in policy).",
            &policy_samples(&|p| f64::from(u8::from(p.quarantined))),
        );
        metric(
            "policy_swaps_total",
            "counter",
            "Hot swaps applied.",
            &[(
                String::new(),
                stats.iter().map(|(_, s)| s.policy_swaps as f64).sum(),
            )],
        );
        if let Some(sh) = shadows {
            let labels = |s: &super::shadow::ShadowStats| {
                format!(
                    "{{arm=\"{}\",policy=\"{}\",role=\"{}\"}}",
                    label(&sh.arm),
                    label(&s.policy),
                    if s.live { "live" } else { "shadow" }
                )
            };
            let st = sh.stats();
            metric(
                "shadow_accesses_total",
                "counter",
                "Expert accesses replayed on a shadow policy's simulated cache.",
                &st.iter()
                    .map(|s| (labels(s), s.accesses as f64))
                    .collect::<Vec<_>>(),
            );
            metric(
                "shadow_hits_total",
                "counter",
                "Hits on a shadow policy's simulated cache (role live: the live policies, simulated).",
                &st.iter().map(|s| (labels(s), s.hits as f64)).collect::<Vec<_>>(),
            );
            metric(
                "shadow_hit_rate",
                "gauge",
                "Hit rate of a shadow policy's simulated cache.",
                &st.iter()
                    .map(|s| (labels(s), s.hit_rate))
                    .collect::<Vec<_>>(),
            );
            metric(
                "shadow_fallbacks_total",
                "counter",
                "Shadow policy calls served by the built-in policy.",
                &st.iter()
                    .map(|s| (labels(s), s.policy_fallbacks as f64))
                    .collect::<Vec<_>>(),
            );
            metric(
                "shadow_dropped_steps_total",
                "counter",
                "Live layer steps the shadows missed because they fell behind.",
                &[(
                    format!("{{arm=\"{}\"}}", sh.arm),
                    sh.dropped_steps.load(Ordering::Relaxed) as f64,
                )],
            );
        }
        o
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
