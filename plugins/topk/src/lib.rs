//! Exact top-k selection: per token the k highest scores, best first, ties to the lower id, NaN
//! last. The model's own routing, bit for bit (`max-score-gap` 0.0).
#![cfg_attr(target_arch = "wasm32", no_std)]

#[cfg(target_arch = "wasm32")]
mod guest {
    extern crate alloc;

    use alloc::string::ToString;
    use alloc::vec::Vec;

    wit_bindgen::generate!({
        world: "selection-policy",
        path: "../../wit/policy.wit",
    });

    use exports::moehost::policy::selection::{Guest, SelectionInfo};
    use moehost::policy::types::{ModelShape, PolicyInfo, ResidentSet, TierCapacity};

    struct TopK;

    impl Guest for TopK {
        fn init(_: ModelShape, _: Vec<TierCapacity>, _: ResidentSet) -> SelectionInfo {
            SelectionInfo {
                info: PolicyInfo {
                    name: "topk".to_string(),
                    description: "exact top-k: the model's own routing".to_string(),
                },
                max_score_gap: 0.0,
            }
        }

        fn select(_layer: u32, tokens: u32, k: u32, scores: Vec<f32>, _: Vec<u8>) -> Vec<u32> {
            common::top_k_rows(&scores, tokens, k)
        }
    }

    export!(TopK);
}
