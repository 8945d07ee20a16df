//! No prefetch: asks for no lookahead and never requests anything (the built-in default, as a
//! plugin: the baseline to compare prefetchers with).
#![cfg_attr(target_arch = "wasm32", no_std)]

#[cfg(target_arch = "wasm32")]
mod guest {
    extern crate alloc;

    use alloc::string::ToString;
    use alloc::vec::Vec;

    // The shared runtime (allocator, panic handler, cabi_realloc).
    use common as _;

    wit_bindgen::generate!({
        world: "prefetch-policy",
        path: "../../wit/policy.wit",
    });

    use exports::moehost::policy::prefetch::{Guest, PrefetchInfo, PrefetchRequest, RoutedStep};
    use moehost::policy::types::{ModelShape, PolicyInfo, ResidentSet, TierCapacity};

    struct NoPrefetch;

    impl Guest for NoPrefetch {
        fn init(_: ModelShape, _: Vec<TierCapacity>, _: ResidentSet) -> PrefetchInfo {
            PrefetchInfo {
                info: PolicyInfo {
                    name: "none".to_string(),
                    description: "no prefetch".to_string(),
                },
                lookahead: 0,
            }
        }

        fn on_routed(_: RoutedStep) -> Vec<PrefetchRequest> {
            Vec::new()
        }
    }

    export!(NoPrefetch);
}
