//! Prefetch from the next layer's gate (mixtral-offloading's trick): with lookahead 1 the host
//! passes layer L+1's router scores computed on the current hidden state; per token, its top-k
//! there are the likely experts of the next step. Request those not on the device, into the
//! device tier, once each, the best-scoring first.
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::vec::Vec;

/// The requests for one outlook layer: `(expert, priority)`, each expert once (its best
/// priority), highest priority first (ties: lower id). `resident[e]`: already on the device.
/// Priority = score x 1e6, saturating (negative and NaN scores give 0).
pub fn requests(
    scores: &[f32],
    tokens: usize,
    k: usize,
    resident: impl Fn(u32) -> bool,
) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    requests_into(scores, tokens, k, resident, &mut Vec::new(), &mut out);
    out
}

/// [`requests`] into `out`, with `best` as scratch: the guest keeps both between calls, so a
/// step allocates nothing.
pub fn requests_into(
    scores: &[f32],
    tokens: usize,
    k: usize,
    resident: impl Fn(u32) -> bool,
    best: &mut Vec<u32>,
    out: &mut Vec<(u32, u32)>,
) {
    out.clear();
    if tokens == 0 || scores.len() < tokens {
        return;
    }
    let experts = scores.len() / tokens;
    // (expert, priority) of every token's non-resident picks: tokens x k entries, no
    // per-expert table (a decode step has only k of them).
    for row in scores.chunks_exact(experts).take(tokens) {
        best.clear();
        common::top_k_into(row, k, best);
        for &e in best.iter() {
            if !resident(e) {
                let p = (row[e as usize] * 1e6) as u32; // saturating cast, NaN -> 0
                out.push((e, p));
            }
        }
    }
    if tokens > 1 {
        // Each expert once, with its best priority.
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        out.dedup_by_key(|r| r.0);
    }
    out.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
}

#[cfg(target_arch = "wasm32")]
mod guest {
    use super::*;
    use alloc::string::ToString;
    use common::Global;

    wit_bindgen::generate!({
        world: "prefetch-policy",
        path: "../../wit/policy.wit",
    });

    use exports::moehost::policy::prefetch::{Guest, PrefetchInfo, PrefetchRequest, RoutedStep};
    use moehost::policy::types::{ModelShape, PolicyInfo, ResidentSet, Tier, TierCapacity};

    /// The model's shape (from init): layers, experts per layer, top-k.
    static SHAPE: Global<(u32, u32, u32)> = Global::new((0, 0, 0));
    /// `requests_into`'s scratch (top-k ids) and result buffers, kept between calls.
    type Scratch = (Vec<u32>, Vec<(u32, u32)>);
    static SCRATCH: Global<Scratch> = Global::new((Vec::new(), Vec::new()));

    struct NextLayerGate;

    impl Guest for NextLayerGate {
        fn init(shape: ModelShape, _: Vec<TierCapacity>, _: ResidentSet) -> PrefetchInfo {
            SHAPE.with(|s| *s = (shape.moe_layers, shape.experts_per_layer, shape.top_k));
            PrefetchInfo {
                info: PolicyInfo {
                    name: "next-layer-gate".to_string(),
                    description: "prefetch each token's top-k of the next layer's gate applied \
                                  to the current hidden state"
                        .to_string(),
                },
                lookahead: 1,
            }
        }

        fn on_routed(step: RoutedStep) -> Vec<PrefetchRequest> {
            let (layers, experts, k) = SHAPE.with(|s| *s);
            let mut out = Vec::new();
            for outlook in step.outlook.iter().take(1) {
                if outlook.layer >= layers {
                    continue;
                }
                let on_device =
                    |e: u32| outlook.residency.get(e as usize) == Some(&common::tier::DEVICE);
                let base = outlook.layer * experts;
                SCRATCH.with(|(best, reqs)| {
                    let tokens = step.tokens as usize;
                    requests_into(&outlook.scores, tokens, k as usize, on_device, best, reqs);
                    out.extend(
                        reqs.iter()
                            .filter(|&&(e, _)| e < experts)
                            .map(|&(e, priority)| PrefetchRequest {
                                expert: base + e,
                                tier: Tier::Device,
                                priority,
                            }),
                    );
                });
            }
            out
        }
    }

    export!(NextLayerGate);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_per_token_deduplicated_by_priority() {
        // 2 tokens x 4 experts, k = 2.
        let scores = [0.9, 0.1, 0.5, 0.3, 0.2, 0.8, 0.6, 0.1];
        let got = requests(&scores, 2, 2, |_| false);
        assert_eq!(got, vec![(0, 900_000), (1, 800_000), (2, 600_000)]);
        // expert 0 already on the device
        let got = requests(&scores, 2, 2, |e| e == 0);
        assert_eq!(got, vec![(1, 800_000), (2, 600_000)]);
    }

    #[test]
    fn negative_and_nan_scores_get_priority_zero() {
        let scores = [-0.5, f32::NAN, -0.7];
        assert_eq!(requests(&scores, 1, 2, |_| false), vec![(0, 0), (2, 0)]);
        assert!(requests(&[], 0, 2, |_| false).is_empty());
    }
}
