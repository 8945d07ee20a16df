//! Prefetch the next layer's experts the `next-layer` predictor is confident of: those whose
//! learned hit rate is at least [`next_layer::CONFIDENT`], so that more prefetches are used than
//! wasted. See README.md.
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

next_layer::guest!(
    "next-layer-blend",
    "prefetch the next layer's experts it is confident of (learned hit rate >= 0.5): gate \
     outlook, learned transitions and recent use, weighed by their measured hit rates",
    next_layer::CONFIDENT
);
