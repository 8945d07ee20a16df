//! Memory policies: expert selection, cache eviction, prefetch prediction, placement.
//!
//! Owns: the native mirror of the WIT types (`wit/policy.wit`), the four policy traits that
//! both built-in and WebAssembly policies implement, and `Guarded*`, which is what the expert
//! store calls: it validates every answer, counts and logs failures, serves failed calls with
//! the built-in policy, re-initialises a failed plugin and quarantines one that keeps failing.
//! Does not own: tiers and loading (the expert store), or the wasmtime details (`wasm`).

pub mod bench;
pub mod budget;
pub mod builtin;
pub mod bundled;
pub mod check;
pub mod costs;
pub mod deadline;
mod direct;
pub mod guard;
pub mod limiter;
pub mod set;
pub mod smoke;
pub mod wasm;

use serde::Serialize;

pub use guard::{
    GuardedEviction, GuardedPlacement, GuardedPrefetch, GuardedSelection, PolicyStats,
};

/// The kinds of policy the expert store runs (pruning, offline only, is not one of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    Selection,
    Eviction,
    Prefetch,
    /// Hybrid execution (contract 0.2.1): fetch a missing expert or run it where it lives.
    Placement,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 4] = [
        PolicyKind::Selection,
        PolicyKind::Eviction,
        PolicyKind::Prefetch,
        PolicyKind::Placement,
    ];

    /// `selection`, `eviction`, `prefetch` or `placement`.
    pub fn parse(s: &str) -> Option<PolicyKind> {
        PolicyKind::ALL.into_iter().find(|k| k.to_string() == s)
    }
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PolicyKind::Selection => "selection",
            PolicyKind::Eviction => "eviction",
            PolicyKind::Prefetch => "prefetch",
            PolicyKind::Placement => "placement",
        })
    }
}

/// An expert: `layer` counts MoE layers only (0 = the first MoE layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ExpertKey {
    pub layer: u32,
    pub expert: u32,
}

/// Memory tiers, fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Device,
    Host,
    Disk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ModelShape {
    pub moe_layers: u32,
    pub experts_per_layer: u32,
    pub top_k: u32,
    pub expert_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TierCapacity {
    pub tier: Tier,
    pub slots: u32,
    pub bytes: u64,
}

/// What an `init` call gets: the shape, the tier capacities and what is resident now.
#[derive(Debug, Clone)]
pub struct InitArgs {
    pub shape: ModelShape,
    pub capacities: Vec<TierCapacity>,
    pub resident: Vec<(ExpertKey, Tier)>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyInfo {
    pub name: String,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SelectionInfo {
    pub info: PolicyInfo,
    pub max_score_gap: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrefetchInfo {
    pub info: PolicyInfo,
    pub lookahead: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Access,
    Insert,
    Remove,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub tier: Tier,
    pub expert: ExpertKey,
}

#[derive(Debug, Clone)]
pub struct StepFacts {
    pub step: u64,
    pub layer: u32,
    pub events: Vec<Event>,
}

/// A request for victims: exactly `count` distinct experts among `candidates`.
///
/// The candidates are the experts resident in `tier` (within `only_layer` when set), minus
/// `excluded`. The host guarantees at least `count` of them. Plugins on contract 0.2 get only
/// `excluded` (they track residency from events); 0.1 plugins and the built-in fallback may
/// ask for the full list.
#[derive(Clone, Copy)]
pub struct VictimRequest<'a> {
    pub tier: Tier,
    pub count: u32,
    /// Victims must come from this MoE layer (a per-layer cache, as the replay lab models).
    pub only_layer: Option<u32>,
    /// Resident in `tier` but not to be evicted now: in use by this step, or wanted by the
    /// request being made room for.
    pub excluded: &'a [ExpertKey],
    pub candidates: &'a dyn Candidates,
}

impl std::fmt::Debug for VictimRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VictimRequest")
            .field("tier", &self.tier)
            .field("count", &self.count)
            .field("only_layer", &self.only_layer)
            .field("excluded", &self.excluded)
            .finish_non_exhaustive()
    }
}

/// The candidate set of a victim request, as the host knows it: membership in O(1) (what
/// validation needs), the full list only on demand.
pub trait Candidates {
    fn contains(&self, e: ExpertKey) -> bool;
    /// Every candidate, ascending by (layer, expert).
    fn list(&self) -> Vec<ExpertKey>;
}

/// An explicit candidate list (tests, smoke tests, benchmarks): membership by scan.
#[derive(Debug, Clone, Default)]
pub struct CandidateList(pub Vec<ExpertKey>);

impl Candidates for CandidateList {
    fn contains(&self, e: ExpertKey) -> bool {
        self.0.contains(&e)
    }

    fn list(&self) -> Vec<ExpertKey> {
        let mut v = self.0.clone();
        v.sort_unstable();
        v.dedup();
        v
    }
}

impl ModelShape {
    /// The model-wide number of `e` (contract 0.2's `expert-id`).
    pub fn id_of(&self, e: ExpertKey) -> u32 {
        e.layer * self.experts_per_layer + e.expert
    }

    /// The expert numbered `id`, `None` when out of range.
    pub fn key_of(&self, id: u32) -> Option<ExpertKey> {
        let e = self.experts_per_layer.max(1);
        (id < self.moe_layers * e).then(|| ExpertKey {
            layer: id / e,
            expert: id % e,
        })
    }
}

impl Tier {
    /// The tier's code in contract 0.2's flat lists.
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(c: u8) -> Option<Tier> {
        match c {
            0 => Some(Tier::Device),
            1 => Some(Tier::Host),
            2 => Some(Tier::Disk),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Outlook {
    pub layer: u32,
    pub scores: Vec<f32>,
    pub residency: Vec<Tier>,
}

#[derive(Debug, Clone)]
pub struct RoutedStep {
    pub step: u64,
    pub layer: u32,
    pub tokens: u32,
    pub experts: Vec<u32>,
    pub outlook: Vec<Outlook>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefetchRequest {
    pub expert: ExpertKey,
    pub tier: Tier,
    pub priority: u32,
}

/// Where an expert that is not in the device tier runs this step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Place {
    /// Copy it into the device tier (evicting if it is full) and run it there.
    Device,
    /// Run it where it lives: on the CPU, straight from its storage format.
    Host,
}

impl Place {
    /// The code in contract 0.2.1's `place` answer.
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(c: u8) -> Option<Place> {
        match c {
            0 => Some(Place::Device),
            1 => Some(Place::Host),
            _ => None,
        }
    }
}

/// What placement weighs (WIT `link-costs`): bandwidths in bytes/s, throughputs in FLOP/s.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LinkCosts {
    pub link_bytes_per_second: f64,
    pub link_latency_seconds: f64,
    pub device_flops: f64,
    pub device_memory_bytes_per_second: f64,
    pub host_flops: f64,
    pub host_memory_bytes_per_second: f64,
    pub flops_per_token: f64,
    pub activation_bytes: u32,
}

/// A placement request: one layer step's routed experts that are neither in the device tier
/// nor on their way there (ascending), with the tokens routed to each and the tier each is in.
#[derive(Debug, Clone)]
pub struct PlacementRequest<'a> {
    pub layer: u32,
    pub experts: &'a [ExpertKey],
    pub tokens: &'a [u32],
    pub tiers: &'a [Tier],
    pub free_device_slots: u32,
    /// Bytes one expert occupies in storage format (what a fetch moves).
    pub expert_bytes: u64,
    pub costs: LinkCosts,
}

/// Why a policy call was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The call ran past its deadline.
    Timeout,
    /// The plugin hit its memory limit.
    OutOfMemory,
    /// Any other trap (unreachable, out-of-bounds, stack overflow, ...).
    Trap,
    /// It answered, but the answer broke the contract (ids out of range, wrong count, ...).
    InvalidAnswer,
}

/// A failed policy call.
#[derive(Debug)]
pub struct PolicyError {
    pub kind: FailureKind,
    pub message: String,
}

impl std::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for PolicyError {}

pub type PolicyResult<T> = Result<T, PolicyError>;

/// Chooses each token's experts.
pub trait Selection: Send {
    fn init(&mut self, args: &InitArgs) -> PolicyResult<SelectionInfo>;
    fn select(
        &mut self,
        layer: u32,
        tokens: u32,
        k: u32,
        scores: &[f32],
        residency: &[Tier],
    ) -> PolicyResult<Vec<u32>>;
}

/// Chooses victims in a full tier.
pub trait Eviction: Send {
    fn init(&mut self, args: &InitArgs) -> PolicyResult<PolicyInfo>;
    fn on_step(
        &mut self,
        facts: &StepFacts,
        request: Option<&VictimRequest<'_>>,
    ) -> PolicyResult<Vec<ExpertKey>>;
    fn victims(&mut self, request: &VictimRequest<'_>) -> PolicyResult<Vec<ExpertKey>>;
}

/// Predicts experts to load ahead of use.
pub trait Prefetch: Send {
    fn init(&mut self, args: &InitArgs) -> PolicyResult<PrefetchInfo>;
    fn on_routed(&mut self, step: &RoutedStep) -> PolicyResult<Vec<PrefetchRequest>>;
}

/// Chooses where missing experts run (hybrid execution).
pub trait Placement: Send {
    fn init(&mut self, args: &InitArgs) -> PolicyResult<PolicyInfo>;
    fn place(&mut self, request: &PlacementRequest<'_>) -> PolicyResult<Vec<Place>>;
}

/// Where a policy comes from, as given on the command line: a bundled plugin's name or a
/// path to a `.wasm` component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    Bundled(String),
    File(std::path::PathBuf),
}

impl PolicySource {
    /// `lru` -> bundled; anything with a `/` or ending in `.wasm` -> a file.
    pub fn parse(s: &str) -> Self {
        if s.ends_with(".wasm") || s.contains('/') || s.contains(std::path::MAIN_SEPARATOR) {
            PolicySource::File(s.into())
        } else {
            PolicySource::Bundled(s.to_owned())
        }
    }

    /// The component's bytes.
    pub fn bytes(&self) -> anyhow::Result<Vec<u8>> {
        match self {
            PolicySource::Bundled(name) => bundled::bytes(name).map(<[u8]>::to_vec).ok_or_else(|| {
                anyhow::anyhow!(
                    "no bundled policy named {name:?}; bundled: {} (or give a path to a .wasm file)",
                    bundled::names().join(", ")
                )
            }),
            PolicySource::File(p) => {
                std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read policy plugin {}: {e}", p.display()))
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            PolicySource::Bundled(n) => n.clone(),
            PolicySource::File(p) => p.display().to_string(),
        }
    }
}
