//! The replay lab: routing traces (`crate::trace`) replayed through eviction and prefetch
//! policy plugins, exactly and fast, next to Belady's offline optimum; a two-tier cost model;
//! tables, JSON and plots. Semantics in docs/traces.md ("Replay semantics").
//!
//! One concept per file:
//! - `schedule` — a trace as the stream of (step, layer) visits and their accesses;
//! - `residency` — what is resident in the device and host tiers, pools, victim requests;
//! - `engine` — the simulator (one pass, the live store's order of events);
//! - `belady` — Belady's MIN with a next-use index (the bound; also drives the oracle prefetch);
//! - `plugin` — eviction/prefetch policies driven through their contract (WASM);
//! - `cost` — link presets and the stall / tokens-per-second estimate;
//! - `sweep` — the combinations, run in parallel, as rows;
//! - `report`, `plot` — text tables, JSON, SVG/PNG;
//! - `summary` — across traces: geometric means of the ratio to Belady, tuned vs held-out;
//! - `bench` — replay speed in accesses per second.

pub mod belady;
pub mod bench;
pub mod cost;
pub mod engine;
pub mod plot;
pub mod plugin;
pub mod report;
pub mod schedule;
pub mod summary;
pub mod sweep;

pub use cost::{Link, K2_FP8_EXPERT_BYTES};
pub use engine::{simulate, Counters, SimConfig};
pub use schedule::Schedule;
pub use sweep::{run, Capacity, ReplayConfig, Row};
