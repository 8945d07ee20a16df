//! The built-in policies: the safe defaults every plugin call falls back to.
//!
//! Exact top-k (the model's own routing, bit for bit), LRU eviction, no prefetch, placement by
//! cost model. They never fail and answer within the contract for any valid input.

use super::*;
use crate::model::router::top_k_indices;

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

/// Least recently used: victims are the residents of the tier whose last access or insertion
/// (or `init` residency, in list order) is oldest, least recent first.
///
/// It keeps its own view of each cached tier's residents, from `init` and the events, as a
/// recency-ordered intrusive list over dense expert numbers, so picking `count` victims costs
/// O(count + excluded), not O(residents). Every pick is checked against the host's candidate
/// set; should the view ever disagree with the host, the rest comes from the host's list.
pub struct Lru {
    name: &'static str,
    shape: Option<ModelShape>,
    /// Per cached tier (device, host): `prev`/`next` over `n + 1` nodes, node `n` the head.
    lists: [RecencyList; 2],
}

impl Default for Lru {
    fn default() -> Self {
        Self::named("builtin-lru")
    }
}

const NIL: u32 = u32::MAX;

/// A doubly linked list of dense ids, least recent at the front.
#[derive(Default)]
struct RecencyList {
    prev: Vec<u32>,
    next: Vec<u32>,
}

impl RecencyList {
    fn reset(&mut self, n: usize) {
        let head = n as u32;
        self.prev = vec![NIL; n + 1];
        self.next = vec![NIL; n + 1];
        self.prev[n] = head;
        self.next[n] = head;
    }

    fn head(&self) -> u32 {
        (self.next.len() - 1) as u32
    }

    fn contains(&self, k: u32) -> bool {
        self.prev[k as usize] != NIL
    }

    fn unlink(&mut self, k: u32) {
        let (p, n) = (self.prev[k as usize], self.next[k as usize]);
        if p == NIL {
            return;
        }
        self.next[p as usize] = n;
        self.prev[n as usize] = p;
        self.prev[k as usize] = NIL;
        self.next[k as usize] = NIL;
    }

    fn push_back(&mut self, k: u32) {
        let head = self.head();
        let last = self.prev[head as usize];
        self.next[last as usize] = k;
        self.prev[k as usize] = last;
        self.next[k as usize] = head;
        self.prev[head as usize] = k;
    }

    /// Ids from least to most recent.
    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let head = self.head();
        std::iter::successors(Some(self.next[head as usize]), move |&k| {
            Some(self.next[k as usize])
        })
        .take_while(move |&k| k != head)
    }
}

impl Lru {
    /// The same rule under another name (the replay lab's `native-lru`).
    pub fn named(name: &'static str) -> Self {
        Self {
            name,
            shape: None,
            lists: Default::default(),
        }
    }

    fn dense(&self, e: ExpertKey) -> Option<u32> {
        let s = self.shape?;
        (e.layer < s.moe_layers && e.expert < s.experts_per_layer).then(|| s.id_of(e))
    }

    /// A use of `k`: it moves to the most recent end of every list holding it, and of list
    /// `join` (an insert into that tier) whether it held it or not.
    fn touch(&mut self, k: u32, join: Option<usize>) {
        for (i, l) in self.lists.iter_mut().enumerate() {
            if join == Some(i) || l.contains(k) {
                l.unlink(k);
                l.push_back(k);
            }
        }
    }

    fn observe(&mut self, ev: &Event) {
        let Some(k) = self.dense(ev.expert) else {
            return;
        };
        let list = match ev.tier {
            Tier::Device => Some(0),
            Tier::Host => Some(1),
            Tier::Disk => None,
        };
        match ev.kind {
            EventKind::Access => self.touch(k, None),
            EventKind::Insert => self.touch(k, list),
            EventKind::Remove => {
                if let Some(t) = list {
                    self.lists[t].unlink(k);
                }
            }
        }
    }

    fn pick(&mut self, r: &VictimRequest<'_>) -> Vec<ExpertKey> {
        let want = r.count as usize;
        let mut out = Vec::with_capacity(want);
        if let (Some(shape), Some(t)) = (
            self.shape,
            (r.tier != Tier::Disk).then_some(r.tier as usize),
        ) {
            for k in self.lists[t].iter() {
                if out.len() == want {
                    break;
                }
                let e = shape.key_of(k).expect("dense ids are in range");
                if r.only_layer.is_some_and(|l| l != e.layer) || r.excluded.contains(&e) {
                    continue;
                }
                if r.candidates.contains(e) {
                    out.push(e);
                }
            }
            // The host removes what we name; its remove events will follow (no-ops then).
            for e in &out {
                self.lists[t].unlink(shape.id_of(*e));
            }
        }
        if out.len() < want {
            // The view disagrees with the host (or was never initialised): fill from its list.
            for e in r.candidates.list() {
                if out.len() == want {
                    break;
                }
                if !out.contains(&e) {
                    out.push(e);
                }
            }
        }
        out
    }
}

impl Eviction for Lru {
    fn init(&mut self, args: &InitArgs) -> PolicyResult<PolicyInfo> {
        let n = (args.shape.moe_layers * args.shape.experts_per_layer) as usize;
        self.shape = Some(args.shape);
        for l in &mut self.lists {
            l.reset(n);
        }
        for (e, t) in &args.resident {
            self.observe(&Event {
                kind: EventKind::Insert,
                tier: *t,
                expert: *e,
            });
        }
        Ok(PolicyInfo {
            name: self.name.into(),
            description: "least recently used (access or insert)".into(),
        })
    }

    fn on_step(
        &mut self,
        facts: &StepFacts,
        request: Option<&VictimRequest<'_>>,
    ) -> PolicyResult<Vec<ExpertKey>> {
        for ev in &facts.events {
            self.observe(ev);
        }
        Ok(request.map(|r| self.pick(r)).unwrap_or_default())
    }

    fn victims(&mut self, request: &VictimRequest<'_>) -> PolicyResult<Vec<ExpertKey>> {
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

/// Placement by this step's cost: per expert, fetching it (copy over the link, run on the
/// device) against running it where it lives (activations over the link, run on the host),
/// each as a roofline time from `LinkCosts`. Ties go to the device, which keeps the expert
/// cached. While device slots are free a fetch evicts nothing, so the first free slots are
/// always filled.
#[derive(Default)]
pub struct CostModel;

impl CostModel {
    pub fn decide(r: &PlacementRequest<'_>) -> Vec<Place> {
        let mut free = r.free_device_slots;
        r.tokens
            .iter()
            .zip(r.tiers)
            .map(|(&t, &tier)| {
                if free > 0 {
                    free -= 1;
                    return Place::Device;
                }
                let host = r.costs.host_seconds(t, r.expert_bytes, tier);
                if host < r.costs.fetch_seconds(t, r.expert_bytes) {
                    Place::Host
                } else {
                    Place::Device
                }
            })
            .collect()
    }
}

impl Placement for CostModel {
    fn init(&mut self, _: &InitArgs) -> PolicyResult<PolicyInfo> {
        Ok(PolicyInfo {
            name: "builtin-cost-model".into(),
            description:
                "fetch or run on the host, whichever this step's link and compute costs favour"
                    .into(),
        })
    }

    fn place(&mut self, r: &PlacementRequest<'_>) -> PolicyResult<Vec<Place>> {
        Ok(Self::decide(r))
    }
}
