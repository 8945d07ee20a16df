//! The policy plugins built from `plugins/` by `build.rs` and embedded in the binary.

include!(concat!(env!("OUT_DIR"), "/bundled_plugins.rs"));

/// The component bytes of bundled plugin `name` (e.g. `lru`).
pub fn bytes(name: &str) -> Option<&'static [u8]> {
    BUNDLED.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

/// Names of the bundled policies.
pub fn names() -> Vec<&'static str> {
    BUNDLED.iter().map(|(n, _)| *n).collect()
}
