//! The access stream of a trace under the replay semantics: for each step in order, for each
//! MoE layer in order, the distinct experts the step's tokens route to at that layer, ascending.
//! One (step, layer) with at least one expert is a *visit*; each of its experts is an *access*.
//!
//! Experts are numbered densely: key = layer x experts-per-layer + expert.

use std::sync::OnceLock;

use crate::trace::Trace;

/// One (step, layer) of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Visit {
    /// The trace's step number.
    pub step: u64,
    /// MoE layer index (0 = the first MoE layer).
    pub layer: u32,
    /// Tokens of the step.
    pub tokens: u32,
    /// Index of the step's first token in the trace.
    pub first_token: u32,
    /// The visit's keys are `keys[start..end]`.
    pub start: u32,
    pub end: u32,
}

impl Visit {
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// "Never accessed again".
pub const NEVER: u32 = u32::MAX;

/// A trace compiled for replay.
#[derive(Debug)]
pub struct Schedule {
    /// Display name (the file stem).
    pub name: String,
    pub model: String,
    pub layers: u32,
    pub experts_per_layer: u32,
    pub top_k: u32,
    /// Expert size from the trace's metadata.
    pub expert_bytes: u64,
    pub tokens: u64,
    pub steps: u64,
    pub visits: Vec<Visit>,
    /// Every access's key, visit after visit, ascending within a visit.
    pub keys: Vec<u32>,
    /// `[tokens, layers, experts]` speculative scores, when the trace has them.
    pub speculative: Option<Vec<f32>>,
    next_use: OnceLock<Vec<u32>>,
}

impl Schedule {
    pub fn from_trace(name: &str, trace: &Trace) -> Schedule {
        let l = trace.layers();
        let k = trace.k();
        let e = trace.meta.n_routed_experts as usize;
        let n = trace.tokens();
        let mut visits = Vec::new();
        let mut keys = Vec::new();
        let mut mark = vec![false; e];
        let mut steps = 0u64;
        let mut t0 = 0usize;
        while t0 < n {
            let s = trace.step[t0];
            let mut t1 = t0 + 1;
            while t1 < n && trace.step[t1] == s {
                t1 += 1;
            }
            steps += 1;
            for layer in 0..l {
                for t in t0..t1 {
                    for &x in &trace.experts[(t * l + layer) * k..(t * l + layer + 1) * k] {
                        if x >= 0 {
                            mark[x as usize] = true;
                        }
                    }
                }
                let start = keys.len() as u32;
                for (x, m) in mark.iter_mut().enumerate() {
                    if *m {
                        keys.push((layer * e + x) as u32);
                        *m = false;
                    }
                }
                let end = keys.len() as u32;
                if end > start {
                    visits.push(Visit {
                        step: s as u64,
                        layer: layer as u32,
                        tokens: (t1 - t0) as u32,
                        first_token: t0 as u32,
                        start,
                        end,
                    });
                }
            }
            t0 = t1;
        }
        Schedule {
            name: name.to_owned(),
            model: trace.meta.model.clone(),
            layers: l as u32,
            experts_per_layer: e as u32,
            top_k: trace.meta.k,
            expert_bytes: trace.meta.expert_bytes,
            tokens: n as u64,
            steps,
            visits,
            keys,
            speculative: trace.speculative.clone(),
            next_use: OnceLock::new(),
        }
    }

    /// Experts in the model (layers x experts per layer).
    pub fn n_keys(&self) -> usize {
        self.layers as usize * self.experts_per_layer as usize
    }

    pub fn accesses(&self) -> u64 {
        self.keys.len() as u64
    }

    pub fn keys_of(&self, v: &Visit) -> &[u32] {
        &self.keys[v.start as usize..v.end as usize]
    }

    /// For each access, the index of the next visit that accesses the same key (`NEVER` if
    /// none). Computed once.
    pub fn next_use(&self) -> &[u32] {
        self.next_use.get_or_init(|| {
            let mut next = vec![NEVER; self.keys.len()];
            let mut later = vec![NEVER; self.n_keys()];
            for (vi, v) in self.visits.iter().enumerate().rev() {
                let range = v.start as usize..v.end as usize;
                for (n, &key) in next[range.clone()].iter_mut().zip(&self.keys[range]) {
                    *n = later[key as usize];
                    later[key as usize] = vi as u32;
                }
            }
            next
        })
    }

    /// The first visit of each key (`NEVER` if never accessed).
    pub fn first_use(&self) -> Vec<u32> {
        let mut first = vec![NEVER; self.n_keys()];
        for (vi, v) in self.visits.iter().enumerate().rev() {
            for &key in self.keys_of(v) {
                first[key as usize] = vi as u32;
            }
        }
        first
    }

    /// Speculative scores of MoE layer `layer` for the tokens of `v`'s step, row-major
    /// `[tokens x experts]`, if the trace has them.
    pub fn speculative_rows(&self, v: &Visit, layer: u32) -> Option<Vec<f32>> {
        let spec = self.speculative.as_ref()?;
        let (l, e) = (self.layers as usize, self.experts_per_layer as usize);
        let mut out = Vec::with_capacity(v.tokens as usize * e);
        for t in v.first_token as usize..(v.first_token + v.tokens) as usize {
            let at = (t * l + layer as usize) * e;
            out.extend_from_slice(&spec[at..at + e]);
        }
        Some(out)
    }
}
