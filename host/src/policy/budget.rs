//! The per-token policy budget: how much time all of a store's policies together (selection,
//! eviction, prefetch, placement, validation included) cost per token the model computes, over
//! about the last hundred forward passes, against `--policy-budget-us`.
//!
//! Owns: the accounting and the warning. Does not own: per-call deadlines (`wasm`) or the
//! per-plugin slow flag (`guard`): a plugin can stay inside both and still, called once per
//! layer step for each of four kinds, cost more per token than the model can afford.

use serde::Serialize;

/// Default budget: what `moehost policy bench` allows all kinds together at Kimi-K2's shape.
pub const DEFAULT_TOKEN_BUDGET_US: f64 = 250.0;

/// Share of the budget at which the store warns (once).
const WARN_SHARE: f64 = 0.8;
/// Passes the recent mean spans (each pass weighs 1/WINDOW).
const WINDOW: f64 = 100.0;
/// Passes seen before the mean is trusted enough to warn.
const WARMUP: u64 = 20;

/// What `/metrics` and `--stats` show.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BudgetStats {
    /// Policy time per token over about the last hundred passes, microseconds.
    pub per_token_us: f64,
    pub budget_us: f64,
    /// Recent use is over [`WARN_SHARE`] of the budget.
    pub near_limit: bool,
}

#[derive(Debug)]
pub struct TokenBudget {
    budget_us: f64,
    /// Policy time of all kinds at the end of the previous pass, nanoseconds.
    last_total_ns: u64,
    /// Tokens routed in the pass under way.
    tokens: u64,
    mean_us: f64,
    passes: u64,
    warned: bool,
}

impl TokenBudget {
    pub fn new(budget_us: f64) -> Self {
        Self {
            budget_us,
            last_total_ns: 0,
            tokens: 0,
            mean_us: 0.0,
            passes: 0,
            warned: false,
        }
    }

    /// Tokens routed in this pass (once per pass: at its first MoE layer).
    pub fn note_tokens(&mut self, tokens: usize) {
        self.tokens += tokens as u64;
    }

    /// Closes a pass given the policies' total call time so far; `Some(mean)` the first time
    /// the recent mean per token nears the budget (to warn).
    pub fn end_pass(&mut self, total_ns: u64) -> Option<f64> {
        let spent = total_ns.saturating_sub(self.last_total_ns);
        self.last_total_ns = total_ns;
        let tokens = std::mem::take(&mut self.tokens);
        if tokens == 0 {
            return None;
        }
        let us = spent as f64 / 1e3 / tokens as f64;
        self.passes += 1;
        let keep = 1.0 - 1.0 / WINDOW.min(self.passes as f64);
        self.mean_us = self.mean_us * keep + us * (1.0 - keep);
        let near = self.near_limit();
        if near && !self.warned {
            self.warned = true;
            return Some(self.mean_us);
        }
        None
    }

    fn near_limit(&self) -> bool {
        self.passes >= WARMUP && self.mean_us > WARN_SHARE * self.budget_us
    }

    pub fn stats(&self) -> BudgetStats {
        BudgetStats {
            per_token_us: self.mean_us,
            budget_us: self.budget_us,
            near_limit: self.near_limit(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_is_per_token_and_warns_once_near_the_budget() {
        let mut b = TokenBudget::new(100.0);
        let mut total = 0;
        // A 50-token prefill pass costing 1 ms: 20 us a token, not 1000.
        b.note_tokens(50);
        total += 1_000_000;
        assert_eq!(b.end_pass(total), None);
        assert!((b.stats().per_token_us - 20.0).abs() < 1e-9);
        // Decode passes at 90 us a token: past 80% of the budget, warned once after warm-up.
        let mut warnings = 0;
        for _ in 0..300 {
            b.note_tokens(1);
            total += 90_000;
            warnings += usize::from(b.end_pass(total).is_some());
        }
        assert_eq!(warnings, 1);
        let s = b.stats();
        assert!(s.near_limit && (s.per_token_us - 90.0).abs() < 1.0, "{s:?}");
        // A pass that routed nothing (no MoE layer reached) changes nothing.
        assert_eq!(b.end_pass(total + 5_000_000), None);
        assert!((b.stats().per_token_us - s.per_token_us).abs() < 1e-9);
    }

    #[test]
    fn cheap_policies_stay_quiet() {
        let mut b = TokenBudget::new(250.0);
        let mut total = 0;
        for _ in 0..500 {
            b.note_tokens(1);
            total += 5_000;
            assert_eq!(b.end_pass(total), None);
        }
        assert!(!b.stats().near_limit);
    }
}
