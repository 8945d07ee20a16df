//! `native-lru`: the `lru` plugin's rule (`plugins/lru`) in native Rust with dense tables, the
//! reference the WebAssembly plugin's replay speed is compared with. Same answers: stamps
//! per expert, touched by access and insert events in delivery order (and by the `init`
//! residency, in list order); victims are the oldest stamps, ties to the lower (layer, expert),
//! least recent first.

use crate::policy::{
    EventKind, Eviction, ExpertKey, InitArgs, PolicyInfo, PolicyResult, StepFacts, VictimRequest,
};

#[derive(Default)]
pub struct DenseLru {
    layers: u32,
    experts: u32,
    stamp: Vec<u64>,
    clock: u64,
    keyed: Vec<(u64, u32, u32)>,
}

impl DenseLru {
    fn slot(&self, e: ExpertKey) -> Option<usize> {
        (e.layer < self.layers && e.expert < self.experts)
            .then(|| (e.layer * self.experts + e.expert) as usize)
    }

    fn touch(&mut self, e: ExpertKey) {
        if let Some(s) = self.slot(e) {
            self.clock += 1;
            self.stamp[s] = self.clock;
        }
    }

    /// Candidates are distinct here (the replay lists each resident once).
    fn pick(&mut self, r: &VictimRequest) -> Vec<ExpertKey> {
        let mut keyed = std::mem::take(&mut self.keyed);
        keyed.clear();
        for &c in &r.candidates {
            if let Some(s) = self.slot(c) {
                keyed.push((self.stamp[s], c.layer, c.expert));
            }
        }
        let count = (r.count as usize).min(keyed.len());
        if count > 0 && count < keyed.len() {
            keyed.select_nth_unstable(count - 1);
        }
        keyed.truncate(count);
        keyed.sort_unstable();
        let out = keyed
            .iter()
            .map(|&(_, layer, expert)| ExpertKey { layer, expert })
            .collect();
        self.keyed = keyed;
        out
    }
}

impl Eviction for DenseLru {
    fn init(&mut self, args: &InitArgs) -> PolicyResult<PolicyInfo> {
        self.layers = args.shape.moe_layers;
        self.experts = args.shape.experts_per_layer;
        self.stamp = vec![0; (self.layers * self.experts) as usize];
        self.clock = 0;
        for (e, _) in &args.resident {
            self.touch(*e);
        }
        Ok(PolicyInfo {
            name: "native-lru".into(),
            description: "least recently used (native Rust, the lru plugin's rule)".into(),
        })
    }

    fn on_step(
        &mut self,
        facts: &StepFacts,
        request: Option<&VictimRequest>,
    ) -> PolicyResult<Vec<ExpertKey>> {
        for ev in &facts.events {
            if matches!(ev.kind, EventKind::Access | EventKind::Insert) {
                self.touch(ev.expert);
            }
        }
        Ok(request.map(|r| self.pick(r)).unwrap_or_default())
    }

    fn victims(&mut self, request: &VictimRequest) -> PolicyResult<Vec<ExpertKey>> {
        Ok(self.pick(request))
    }
}
