//! The two-tier cost model: what a replay's loads would cost on a real machine.
//!
//! - Every access reads its expert once from device memory (HBM): `accesses x bytes / HBM`.
//!   That is the time of the routed experts' arithmetic when decode is memory-bound, and a
//!   floor under any policy.
//! - A demand load (a miss) stalls the forward pass: host -> device over the link, plus a disk
//!   read first when the host tier does not hold the expert.
//! - A prefetch load runs beside the computation: it costs only the part of all prefetch
//!   transfers that the HBM time does not cover (aggregate overlap, an optimistic bound).
//!
//! stall = demand + max(0, prefetch - hbm); time = hbm + stall; tokens/s ceiling =
//! tokens / time. Attention, the shared expert and everything else are left out, so the
//! ceiling is an upper bound.

use serde::Serialize;

use super::engine::Counters;

pub use crate::hardware::{Link, K2_FP8_EXPERT_BYTES};

/// Estimated times of one replay.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Cost {
    /// Bytes copied into the device tier (demand + prefetch).
    pub bytes_moved: u64,
    /// Bytes read from disk.
    pub disk_bytes: u64,
    pub hbm_s: f64,
    pub demand_s: f64,
    pub prefetch_s: f64,
    pub stall_s: f64,
    /// Stall per trace token, milliseconds.
    pub stall_ms_per_token: f64,
    /// Tokens per second the routed experts' traffic allows at best.
    pub tokens_per_s: f64,
}

pub fn estimate(c: &Counters, tokens: u64, expert_bytes: u64, link: &Link) -> Cost {
    let b = expert_bytes as f64;
    let gb = 1e9;
    let hbm_s = c.accesses as f64 * b / (link.hbm_gbps * gb);
    let demand_s = c.demand_loads as f64 * b / (link.h2d_gbps * gb)
        + c.demand_disk_loads as f64 * b / (link.disk_gbps * gb);
    let prefetch_s = c.prefetch_loads as f64 * b / (link.h2d_gbps * gb)
        + c.prefetch_disk_loads as f64 * b / (link.disk_gbps * gb);
    let stall_s = demand_s + (prefetch_s - hbm_s).max(0.0);
    let total = hbm_s + stall_s;
    let tokens_f = tokens.max(1) as f64;
    Cost {
        bytes_moved: (c.demand_loads + c.prefetch_loads) * expert_bytes,
        disk_bytes: (c.demand_disk_loads + c.prefetch_disk_loads) * expert_bytes,
        hbm_s,
        demand_s,
        prefetch_s,
        stall_s,
        stall_ms_per_token: stall_s / tokens_f * 1e3,
        tokens_per_s: if total > 0.0 {
            tokens_f / total
        } else {
            f64::INFINITY
        },
    }
}
