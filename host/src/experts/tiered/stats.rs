//! The store's counters, as `--stats`, `/metrics` and the server's arms report them.

use serde::Serialize;

pub use crate::policy::set::PolicyStatsSet;

/// Counters of the store, as `--stats` prints them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TierCounters {
    /// Accesses served from this tier.
    pub hits: u64,
    /// Accesses that found the expert absent from this tier.
    pub misses: u64,
    /// Bytes copied into this tier.
    pub bytes_in: u64,
    pub slots: u64,
    pub resident: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PrefetchCounters {
    pub issued: u64,
    /// Prefetched experts accessed before leaving the tier.
    pub used: u64,
    /// Prefetched experts evicted unused, or cancelled.
    pub wasted: u64,
    pub cancelled: u64,
}

/// Where the experts missing from the device tier ran (hybrid execution).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PlacementCounters {
    /// Fetched into the device tier and run there.
    pub fetched: u64,
    /// Run where they live, from the storage format.
    pub on_host: u64,
    /// Tokens those host runs computed.
    pub host_tokens: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StoreStats {
    pub device: TierCounters,
    pub host: TierCounters,
    pub disk: TierCounters,
    /// Where the device tier lives: `cpu`, or the GPU's name.
    pub device_backend: String,
    /// Copies into GPU memory through the pinned slab and the copy stream (GPU stores only).
    pub gpu_transfers: Option<crate::transfer::TransferStats>,
    /// Experts computed without being cached because every resident one was pinned.
    pub streamed: u64,
    pub placement: PlacementCounters,
    /// Time the forward pass waited for expert weights, milliseconds.
    pub wait_ms: f64,
    pub prefetch: PrefetchCounters,
    pub policy_swaps: u64,
    /// All policies' recent time per token against the budget.
    pub policy_budget: crate::policy::budget::BudgetStats,
    pub policies: PolicyStatsSet,
}
