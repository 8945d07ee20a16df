//! The built-in policies: the safe defaults every plugin call falls back to.
//!
//! Exact top-k (the model's own routing, bit for bit), LRU eviction, no prefetch. They never
//! fail and answer within the contract for any valid input.

use std::collections::HashMap;

use super::*;
use crate::router::top_k_indices;

/// The model's own routing: per token the k best scores, ties to the lower id.
#[derive(Default)]
pub struct ExactTopK;

impl Selection for ExactTopK {
    fn init(&mut self, _: &InitArgs) -> PolicyResult<SelectionInfo> {
        Ok(SelectionInfo {
            info: PolicyInfo {
                name: "builtin-topk".into(),
                description: "exact top-k: the model's own routing".into(),
            },
            max_score_gap: 0.0,
        })
    }

    fn select(
        &mut self,
        _layer: u32,
        tokens: u32,
        k: u32,
        scores: &[f32],
        _: &[Tier],
    ) -> PolicyResult<Vec<u32>> {
        let e = scores.len() / tokens.max(1) as usize;
        Ok(scores
            .chunks_exact(e)
            .flat_map(|row| top_k_indices(row, k as usize))
            .collect())
    }
}

/// Least recently used: an access or an insertion makes an expert the most recent.
#[derive(Default)]
pub struct Lru {
    clock: u64,
    last_use: HashMap<ExpertKey, u64>,
}

impl Lru {
    fn touch(&mut self, e: ExpertKey) {
        self.clock += 1;
        self.last_use.insert(e, self.clock);
    }

    fn pick(&self, request: &VictimRequest) -> Vec<ExpertKey> {
        let mut c: Vec<(u64, ExpertKey)> = request
            .candidates
            .iter()
            .map(|e| (self.last_use.get(e).copied().unwrap_or(0), *e))
            .collect();
        let n = (request.count as usize).min(c.len());
        if n < c.len() {
            c.select_nth_unstable(n);
            c.truncate(n);
        }
        c.into_iter().map(|(_, e)| e).collect()
    }
}

impl Eviction for Lru {
    fn init(&mut self, args: &InitArgs) -> PolicyResult<PolicyInfo> {
        self.clock = 0;
        self.last_use.clear();
        for (e, _) in &args.resident {
            self.touch(*e);
        }
        Ok(PolicyInfo {
            name: "builtin-lru".into(),
            description: "least recently used".into(),
        })
    }

    fn on_step(
        &mut self,
        facts: &StepFacts,
        request: Option<&VictimRequest>,
    ) -> PolicyResult<Vec<ExpertKey>> {
        for ev in &facts.events {
            match ev.kind {
                EventKind::Access | EventKind::Insert => self.touch(ev.expert),
                EventKind::Remove => {}
            }
        }
        Ok(request.map(|r| self.pick(r)).unwrap_or_default())
    }

    fn victims(&mut self, request: &VictimRequest) -> PolicyResult<Vec<ExpertKey>> {
        Ok(self.pick(request))
    }
}

/// Never prefetches.
#[derive(Default)]
pub struct NoPrefetch;

impl Prefetch for NoPrefetch {
    fn init(&mut self, _: &InitArgs) -> PolicyResult<PrefetchInfo> {
        Ok(PrefetchInfo {
            info: PolicyInfo {
                name: "builtin-none".into(),
                description: "no prefetch".into(),
            },
            lookahead: 0,
        })
    }

    fn on_routed(&mut self, _: &RoutedStep) -> PolicyResult<Vec<PrefetchRequest>> {
        Ok(Vec::new())
    }
}
