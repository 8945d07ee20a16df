//! Fill each layer step's prefetch quota with the `next-layer` predictor's best guesses that
//! are missing, as long as they beat chance (a learned hit rate of at least top-k /
//! experts-per-layer): the highest hit rate, paid for in transfers. See
//! ../next-layer-blend/README.md.
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

next_layer::guest!(
    "next-layer-fill",
    "fill the prefetch quota with the next layer's likeliest missing experts that beat chance: \
     gate outlook, learned transitions and recent use, weighed by their measured hit rates",
    next_layer::Threshold::Chance(1.0)
);
