//! The tiered expert store: every routed expert stays available, spread over three tiers with
//! byte budgets, moved by policies.
//!
//! - device: compute-ready weights (on the CPU, f32 or bf16 as stored; in GPU memory, the
//!   storage format the GPU kernels read);
//! - host: host RAM in storage format (the checkpoint's bytes, e.g. FP8 + scales);
//! - disk: the memory-mapped checkpoint, always complete.
//!
//! Owns: residency and budgets, placement (a missing expert is fetched into the device tier or
//! run where it lives, as the placement policy decides), promotion (disk/host -> device on a
//! miss or a prefetch),
//! demotion (device victims go to the host tier), pinning (the experts of the step being served
//! are never offered as victims, and the model holds its `Arc`s while computing), the prefetch
//! queue (worker threads, priorities, cancellation by newer requests), the counters, and hot
//! swap of policies between forward passes. Policy calls happen on the forward thread only.
//! Does not own: the arithmetic, or validating plugins (`policy::guard`).
//!
//! Caching never changes results: an expert's compute form is the same f32 values whichever
//! tier it came from (`ExpertBytes::to_ffn` and `FfnWeights::load` share one decoder).

use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::experts::{ExpertBytes, ExpertProvider, ExpertWeights, FfnWeights};
use crate::policy::smoke;
use crate::policy::wasm::{load_component, RuntimeLimits, WasmPolicy};
use crate::policy::*;

/// Budgets and policies of a store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Device-tier budget in bytes (`None`: every expert fits).
    pub device_bytes: Option<u64>,
    /// Host-tier budget in bytes (`None`: every expert fits).
    pub host_bytes: Option<u64>,
    pub selection: PolicySource,
    pub eviction: PolicySource,
    pub prefetch: PolicySource,
    /// `cost-model` (built in) or a placement plugin.
    pub placement: PolicySource,
    /// The `LinkCosts` preset placement weighs (`local`, `h100-pcie5`, ...).
    pub link: String,
    /// Where the device tier lives and computes.
    pub device: Device,
    pub limits: RuntimeLimits,
    /// Threads serving the prefetch queue.
    pub prefetch_workers: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            device_bytes: None,
            host_bytes: None,
            selection: PolicySource::Bundled("topk".into()),
            eviction: PolicySource::Bundled("layer-cycle".into()),
            prefetch: PolicySource::Bundled("none".into()),
            placement: PolicySource::Bundled(BUILTIN_PLACEMENT.into()),
            link: "local".into(),
            device: Device::Cpu,
            limits: RuntimeLimits::default(),
            prefetch_workers: 2,
        }
    }
}

/// Parses a byte size: `512MiB`, `2GiB`, `1.5GB`, `4096` (bytes), `0`.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.trim().parse().with_context(|| {
        format!("invalid size {s:?}: expected a number with an optional unit, e.g. 512MiB")
    })?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024f64.powi(2),
        "g" | "gb" => 1e9,
        "gib" => 1024f64.powi(3),
        "t" | "tb" => 1e12,
        "tib" => 1024f64.powi(4),
        other => anyhow::bail!("invalid size {s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"),
    };
    anyhow::ensure!(
        value >= 0.0 && value.is_finite(),
        "invalid size {s:?}: must be a non-negative number"
    );
    Ok((value * mult) as u64)
}

/// Where the device tier's experts live and run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// Dequantized f32 in host RAM, computed by the CPU kernels.
    Cpu,
    /// GPU memory, computed by the CUDA kernel (feature `cuda`); falls back to `Cpu`, saying
    /// why, when there is no driver, no device, or no `cuda` feature.
    Cuda,
}

impl Device {
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            other => anyhow::bail!("unknown device {other:?}: cpu or cuda"),
        }
    }
}

/// The GPU memory a `Device::Cuda` store's device tier lives in (`slots` experts of
/// `slot_bytes`, plus a few for experts still computing after their eviction), or `None`
/// after saying why not.
#[cfg(feature = "cuda")]
fn open_gpu(
    device: Device,
    slot_bytes: usize,
    slots: usize,
    workers: usize,
) -> Option<Arc<crate::gpu::GpuPool>> {
    if device != Device::Cuda {
        return None;
    }
    let pool = crate::gpu::gpu()
        .map_err(|e| anyhow::anyhow!(e))
        .and_then(|g| crate::gpu::GpuPool::new(&g, slot_bytes, slots + 8, workers + 2));
    match pool {
        Ok(p) => Some(Arc::new(p)),
        Err(why) => {
            tracing::warn!("no CUDA device for the device tier ({why:#}); running on the CPU");
            None
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn open_gpu(device: Device, _: usize, _: usize, _: usize) {
    if device == Device::Cuda {
        tracing::warn!(
            "this moehost was built without the `cuda` feature; the device tier runs on the CPU"
        );
    }
}

/// The placement source naming the built-in cost model (there is no bundled plugin of it).
pub const BUILTIN_PLACEMENT: &str = "cost-model";

/// Loads a policy of `kind` from `source` into its guarded slot (no plugin init yet).
fn guarded(kind: PolicyKind, source: &PolicySource, limits: RuntimeLimits) -> Result<AnyGuarded> {
    if kind == PolicyKind::Placement && *source == PolicySource::Bundled(BUILTIN_PLACEMENT.into()) {
        let q = limits.quarantine_after;
        return Ok(AnyGuarded::Placement(GuardedPlacement::new(
            None, "builtin", "", q,
        )));
    }
    let bytes = source.bytes()?;
    let component = load_component(&bytes, &source.describe())?;
    anyhow::ensure!(
        component.kind == kind,
        "{} is a {} policy, not a {kind} policy",
        source.describe(),
        component.kind
    );
    let version = component.version.clone();
    let plugin = WasmPolicy::new(component, limits);
    let src = source.describe();
    let q = limits.quarantine_after;
    Ok(match kind {
        PolicyKind::Selection => AnyGuarded::Selection(GuardedSelection::new(
            Some(Box::new(plugin)),
            &src,
            &version,
            q,
            limits.max_score_gap,
        )),
        PolicyKind::Eviction => AnyGuarded::Eviction(GuardedEviction::new(
            Some(Box::new(plugin)),
            &src,
            &version,
            q,
        )),
        PolicyKind::Prefetch => AnyGuarded::Prefetch(GuardedPrefetch::new(
            Some(Box::new(plugin)),
            &src,
            &version,
            q,
        )),
        PolicyKind::Placement => AnyGuarded::Placement(GuardedPlacement::new(
            Some(Box::new(plugin)),
            &src,
            &version,
            q,
        )),
    })
}

enum AnyGuarded {
    Selection(GuardedSelection),
    Eviction(GuardedEviction),
    Prefetch(GuardedPrefetch),
    Placement(GuardedPlacement),
}

struct Policies {
    selection: GuardedSelection,
    eviction: GuardedEviction,
    prefetch: GuardedPrefetch,
    placement: GuardedPlacement,
}

/// A device slot: ready, or being filled by a prefetch worker.
enum DeviceEntry {
    Ready(ExpertWeights),
    Loading(Arc<LoadCell>),
}

/// Where a prefetch worker puts its result; `Some(None)` = cancelled or failed.
#[derive(Default)]
struct LoadCell {
    value: Mutex<Option<Option<ExpertWeights>>>,
    ready: Condvar,
}

impl LoadCell {
    fn set(&self, v: Option<ExpertWeights>) {
        *self.value.lock().unwrap() = Some(v);
        self.ready.notify_all();
    }

    fn wait(&self) -> Option<ExpertWeights> {
        let mut g = self.value.lock().unwrap();
        while g.is_none() {
            g = self.ready.wait(g).unwrap();
        }
        g.clone().unwrap()
    }
}

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

#[derive(Debug, Clone, Serialize)]
pub struct PolicyStatsSet {
    pub selection: PolicyStats,
    pub eviction: PolicyStats,
    pub prefetch: PolicyStats,
    pub placement: PolicyStats,
}

#[derive(Default)]
struct State {
    device: HashMap<ExpertKey, DeviceEntry>,
    host: HashMap<ExpertKey, Arc<ExpertBytes>>,
    /// Events not yet delivered to the eviction policy.
    events: Vec<Event>,
    /// Residents whose insert event is among `events`: the policy does not know them yet, so
    /// a victim request must not count them as candidates.
    unreported: HashSet<(ExpertKey, Tier)>,
    /// Prefetched into the device tier and not used yet.
    prefetched_unused: HashSet<ExpertKey>,
    device_c: TierCounters,
    host_c: TierCounters,
    disk_c: TierCounters,
    streamed: u64,
    placement_c: PlacementCounters,
    wait_ns: u64,
    prefetch_c: PrefetchCounters,
}

struct Job {
    priority: u32,
    seq: u64,
    generation: u64,
    key: ExpertKey,
    tier: Tier,
    cell: Option<Arc<LoadCell>>,
}

impl PartialEq for Job {
    fn eq(&self, o: &Self) -> bool {
        (self.priority, self.seq) == (o.priority, o.seq)
    }
}
impl Eq for Job {}
impl PartialOrd for Job {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Job {
    /// Higher priority first; among equals, first asked first served.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.priority.cmp(&o.priority).then(o.seq.cmp(&self.seq))
    }
}

#[derive(Default)]
struct Queue {
    jobs: Mutex<BinaryHeap<Job>>,
    more: Condvar,
    shutdown: AtomicBool,
    generation: AtomicU64,
    seq: AtomicU64,
}

struct Inner {
    ckpt: Arc<Checkpoint>,
    hidden: usize,
    intermediate: usize,
    n_experts: usize,
    top_k: usize,
    /// Decoder layer -> MoE layer index.
    moe_index: Vec<Option<u32>>,
    /// MoE layer index -> decoder layer.
    moe_layers: Vec<usize>,
    shape: ModelShape,
    device_slots: usize,
    host_slots: usize,
    device_bytes: u64,
    host_bytes: u64,
    state: Mutex<State>,
    policies: Mutex<Policies>,
    pending: Mutex<Vec<AnyGuarded>>,
    swaps: AtomicU64,
    step: AtomicU64,
    /// All policies' time per token against `limits.token_budget_us`.
    budget: Mutex<crate::policy::budget::TokenBudget>,
    queue: Queue,
    limits: RuntimeLimits,
    /// What placement weighs.
    costs: LinkCosts,
    /// The GPU memory the device tier lives in (`None`: the CPU).
    #[cfg(feature = "cuda")]
    gpu: Option<Arc<crate::gpu::GpuPool>>,
}

/// The tiered expert store; the `ExpertProvider` the engine uses.
pub struct TieredExperts {
    inner: Arc<Inner>,
    workers: Vec<std::thread::JoinHandle<()>>,
    _watchers: Mutex<Vec<notify::RecommendedWatcher>>,
    observer: Mutex<Option<Observer>>,
}

/// One live MoE layer step as an observer (the server's shadow policies) sees it.
#[derive(Debug, Clone)]
pub struct ObservedStep {
    pub step: u64,
    /// MoE layer index.
    pub layer: u32,
    pub tokens: u32,
    /// The distinct experts routed to, ascending.
    pub experts: Vec<u32>,
    /// The next MoE layer's speculative scores (`[tokens x experts]`), when asked for.
    pub outlook: Option<(u32, Vec<f32>)>,
}

struct Observer {
    tx: std::sync::mpsc::SyncSender<ObservedStep>,
    /// Speculative layers the observer wants computed.
    lookahead: u32,
    /// Steps dropped because the observer fell behind (the forward pass never waits).
    dropped: Arc<AtomicU64>,
}

impl Drop for TieredExperts {
    fn drop(&mut self) {
        self.inner.queue.shutdown.store(true, Ordering::SeqCst);
        self.inner.queue.more.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl TieredExperts {
    /// Builds the store and loads and initialises its three policies.
    pub fn new(ckpt: Arc<Checkpoint>, cfg: &ModelConfig, config: &StoreConfig) -> Result<Self> {
        let moe_layers = cfg.moe_layers();
        let mut moe_index = vec![None; cfg.num_hidden_layers];
        for (i, &l) in moe_layers.iter().enumerate() {
            moe_index[l] = Some(i as u32);
        }
        let total = moe_layers.len() * cfg.n_routed_experts;
        // Byte sizes from the first expert's headers (all experts share them).
        let (storage, cpu_compute) = match moe_layers.first() {
            Some(&l) => {
                let prefix = crate::experts::expert_prefix(l, 0);
                let mut storage = 0u64;
                let mut bf16 = true;
                for p in ["gate_proj", "up_proj", "down_proj"] {
                    let raw = ckpt.raw(&format!("{prefix}.{p}.weight"))?;
                    storage += raw.bytes.len() as u64;
                    bf16 &= raw.dtype == safetensors::Dtype::BF16;
                    if let Ok(s) = ckpt.raw(&format!("{prefix}.{p}.weight_scale_inv")) {
                        storage += s.bytes.len() as u64;
                    }
                }
                // The CPU's compute form keeps BF16 weights as they are (FfnWeights); other
                // dtypes are f32.
                let element = if bf16 && config.device == Device::Cpu {
                    2
                } else {
                    4
                };
                (
                    storage,
                    (3 * cfg.hidden_size * cfg.moe_intermediate_size * element) as u64,
                )
            }
            None => (1, 1),
        };
        // A CUDA device tier's slot: what `GpuPool` stages for the first expert (its storage
        // format where a kernel reads it).
        #[cfg(feature = "cuda")]
        let gpu_compute = match moe_layers.first() {
            Some(&l) if config.device == Device::Cuda && crate::gpu::gpu().is_ok() => {
                let first = ExpertBytes::read(&ckpt, l, 0)?;
                Some(crate::gpu::expert_slot_bytes(&first)? as u64)
            }
            _ => None,
        };
        let slots = |budget: Option<u64>, per: u64| {
            budget.map_or(total, |b| ((b / per.max(1)) as usize).min(total))
        };
        #[cfg(feature = "cuda")]
        let mut compute = gpu_compute.unwrap_or(cpu_compute);
        #[cfg(not(feature = "cuda"))]
        let compute = cpu_compute;
        #[allow(unused_mut)]
        let mut device_slots = slots(config.device_bytes, compute);
        let host_slots = slots(config.host_bytes, storage);
        let shape = ModelShape {
            moe_layers: moe_layers.len() as u32,
            experts_per_layer: cfg.n_routed_experts as u32,
            top_k: cfg.num_experts_per_tok as u32,
            expert_bytes: storage,
        };
        let take = |kind| guarded(kind, &config.source_of(kind), config.limits);
        let costs = LinkCosts::preset(&config.link, cfg.hidden_size, cfg.moe_intermediate_size)?;
        let workers = config.prefetch_workers;
        #[cfg(feature = "cuda")]
        let gpu = open_gpu(config.device, compute as usize, device_slots, workers);
        // Slots sized for the GPU's storage format, but the tier runs on the CPU after all (e.g.
        // its memory could not be allocated): the budget buys compute-form experts there.
        #[cfg(feature = "cuda")]
        if gpu.is_none() && compute != cpu_compute {
            compute = cpu_compute;
            device_slots = slots(config.device_bytes, compute);
        }
        #[cfg(not(feature = "cuda"))]
        open_gpu(config.device, compute as usize, device_slots, workers);
        let (
            AnyGuarded::Selection(selection),
            AnyGuarded::Eviction(eviction),
            AnyGuarded::Prefetch(prefetch),
            AnyGuarded::Placement(placement),
        ) = (
            take(PolicyKind::Selection)?,
            take(PolicyKind::Eviction)?,
            take(PolicyKind::Prefetch)?,
            take(PolicyKind::Placement)?,
        )
        else {
            unreachable!("guarded() returns the kind asked for")
        };
        let inner = Arc::new(Inner {
            ckpt,
            hidden: cfg.hidden_size,
            intermediate: cfg.moe_intermediate_size,
            n_experts: cfg.n_routed_experts,
            top_k: cfg.num_experts_per_tok,
            moe_index,
            moe_layers,
            shape,
            device_slots,
            host_slots,
            device_bytes: device_slots as u64 * compute,
            host_bytes: host_slots as u64 * storage,
            state: Mutex::new(State::default()),
            policies: Mutex::new(Policies {
                selection,
                eviction,
                prefetch,
                placement,
            }),
            pending: Mutex::new(Vec::new()),
            swaps: AtomicU64::new(0),
            step: AtomicU64::new(0),
            budget: Mutex::new(crate::policy::budget::TokenBudget::new(
                config.limits.token_budget_us,
            )),
            queue: Queue::default(),
            limits: config.limits,
            costs,
            #[cfg(feature = "cuda")]
            gpu,
        });
        {
            let args = inner.init_args();
            let mut p = inner.policies.lock().unwrap();
            let fail = |kind: PolicyKind, src: &PolicySource, e: PolicyError| {
                anyhow::anyhow!("{kind} policy {} failed to initialise: {e}", src.describe())
            };
            p.selection
                .init(&args)
                .map_err(|e| fail(PolicyKind::Selection, &config.selection, e))?;
            p.eviction
                .init(&args)
                .map_err(|e| fail(PolicyKind::Eviction, &config.eviction, e))?;
            p.prefetch
                .init(&args)
                .map_err(|e| fail(PolicyKind::Prefetch, &config.prefetch, e))?;
            p.placement
                .init(&args)
                .map_err(|e| fail(PolicyKind::Placement, &config.placement, e))?;
        }
        let workers = (0..config.prefetch_workers)
            .map(|i| {
                let inner = inner.clone();
                std::thread::Builder::new()
                    .name(format!("moehost-prefetch-{i}"))
                    .spawn(move || inner.worker())
                    .expect("cannot start a prefetch worker")
            })
            .collect();
        Ok(Self {
            inner,
            workers,
            _watchers: Mutex::new(Vec::new()),
            observer: Mutex::new(None),
        })
    }

    /// Counters, and each policy's.
    pub fn stats(&self) -> StoreStats {
        let p = self.inner.policies.lock().unwrap();
        let s = self.inner.state.lock().unwrap();
        let mut device = s.device_c.clone();
        device.slots = self.inner.device_slots as u64;
        device.resident = s.device.len() as u64;
        let mut host = s.host_c.clone();
        host.slots = self.inner.host_slots as u64;
        host.resident = s.host.len() as u64;
        let mut disk = s.disk_c.clone();
        disk.slots = (self.inner.moe_layers.len() * self.inner.n_experts) as u64;
        disk.resident = disk.slots;
        StoreStats {
            device,
            host,
            disk,
            device_backend: self.inner.device_backend(),
            gpu_transfers: self.inner.gpu_transfers(),
            streamed: s.streamed,
            placement: s.placement_c.clone(),
            wait_ms: s.wait_ns as f64 / 1e6,
            prefetch: s.prefetch_c.clone(),
            policy_swaps: self.inner.swaps.load(Ordering::Relaxed),
            policy_budget: self.inner.budget.lock().unwrap().stats(),
            policies: PolicyStatsSet {
                selection: p.selection.stats().clone(),
                eviction: p.eviction.stats().clone(),
                prefetch: p.prefetch.stats().clone(),
                placement: p.placement.stats().clone(),
            },
        }
    }

    /// Device and host tier sizes in experts.
    /// Sends every MoE layer step to `tx` from now on (replacing any earlier observer), with
    /// `lookahead` speculative layers computed for it. A full channel drops the step and
    /// counts it in `dropped`: the forward pass never waits for an observer.
    pub fn observe(
        &self,
        tx: std::sync::mpsc::SyncSender<ObservedStep>,
        lookahead: u32,
        dropped: Arc<AtomicU64>,
    ) {
        *self.observer.lock().unwrap() = Some(Observer {
            tx,
            lookahead: lookahead.min(crate::policy::guard::MAX_LOOKAHEAD),
            dropped,
        });
    }

    /// The model's shape as policies see it.
    pub fn shape(&self) -> ModelShape {
        self.inner.shape
    }

    pub fn slots(&self) -> (usize, usize) {
        (self.inner.device_slots, self.inner.host_slots)
    }

    /// Loads `source` as the new `kind` policy and smoke-tests it off the hot path; it takes
    /// over at the start of the next forward pass (steps in flight finish on the old one).
    pub fn swap_policy(&self, kind: PolicyKind, source: &PolicySource) -> Result<()> {
        self.inner.swap_policy(kind, source)
    }

    /// Watches `path` and hot-swaps the `kind` policy whenever the file changes (debounced).
    pub fn watch_policy(&self, kind: PolicyKind, path: &Path) -> Result<()> {
        use notify::Watcher;
        let file = path
            .canonicalize()
            .with_context(|| format!("cannot watch policy plugin {}", path.display()))?;
        let dir = file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let target = file.clone();
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = ev {
                if ev.paths.iter().any(|p| p == &target) && !ev.kind.is_access() {
                    let _ = tx.send(());
                }
            }
        })
        .context("cannot start the file watcher")?;
        watcher
            .watch(&dir, notify::RecursiveMode::NonRecursive)
            .with_context(|| format!("cannot watch {}", dir.display()))?;
        let inner = Arc::downgrade(&self.inner);
        std::thread::Builder::new()
            .name("moehost-policy-watch".into())
            .spawn(move || {
                // Debounce: act once the file has been quiet for 400 ms.
                while rx.recv().is_ok() {
                    while rx.recv_timeout(Duration::from_millis(400)).is_ok() {}
                    let Some(inner) = inner.upgrade() else { break };
                    match inner.swap_policy(kind, &PolicySource::File(file.clone())) {
                        Ok(()) => {
                            tracing::info!(%kind, file = %file.display(), "policy reloaded")
                        }
                        Err(e) => tracing::warn!(
                            %kind, file = %file.display(), "policy not reloaded: {e:#}"
                        ),
                    }
                }
            })
            .context("cannot start the policy watch thread")?;
        self._watchers.lock().unwrap().push(watcher);
        Ok(())
    }
}

impl StoreConfig {
    /// Every policy kind with its source.
    pub fn sources(&self) -> [(PolicyKind, &PolicySource); 4] {
        [
            (PolicyKind::Selection, &self.selection),
            (PolicyKind::Eviction, &self.eviction),
            (PolicyKind::Prefetch, &self.prefetch),
            (PolicyKind::Placement, &self.placement),
        ]
    }

    fn source_of(&self, kind: PolicyKind) -> PolicySource {
        let (_, source) = self
            .sources()
            .into_iter()
            .find(|(k, _)| *k == kind)
            .expect("every kind has a source");
        source.clone()
    }
}

impl State {
    /// Records an event for the eviction policy's next call.
    fn event(&mut self, kind: EventKind, tier: Tier, expert: ExpertKey) {
        match kind {
            EventKind::Insert => {
                self.unreported.insert((expert, tier));
            }
            EventKind::Remove => {
                self.unreported.remove(&(expert, tier));
            }
            EventKind::Access => {}
        }
        self.events.push(Event { kind, tier, expert });
    }

    /// The events since the policy's previous call; it knows every resident afterwards.
    fn take_events(&mut self) -> Vec<Event> {
        self.unreported.clear();
        std::mem::take(&mut self.events)
    }

    /// Victim candidates in `tier`: residents (device: ready ones) the policy has been told
    /// about, minus `excluded`.
    fn is_candidate(&self, e: ExpertKey, tier: Tier, excluded: &[ExpertKey]) -> bool {
        let resident = match tier {
            Tier::Device => matches!(self.device.get(&e), Some(DeviceEntry::Ready(_))),
            _ => self.host.contains_key(&e),
        };
        resident && !excluded.contains(&e) && !self.unreported.contains(&(e, tier))
    }

    /// How many candidates a request for `tier` with `excluded` has.
    fn candidate_count(&self, tier: Tier, excluded: &[ExpertKey]) -> usize {
        let resident = match tier {
            Tier::Device => self
                .device
                .values()
                .filter(|e| matches!(e, DeviceEntry::Ready(_)))
                .count(),
            _ => self.host.len(),
        };
        let resident_excluded = excluded
            .iter()
            .filter(|e| match tier {
                Tier::Device => matches!(self.device.get(e), Some(DeviceEntry::Ready(_))),
                _ => self.host.contains_key(e),
            })
            .count();
        let unreported = self
            .unreported
            .iter()
            .filter(|(e, t)| {
                *t == tier && !excluded.contains(e) && {
                    match tier {
                        Tier::Device => matches!(self.device.get(e), Some(DeviceEntry::Ready(_))),
                        _ => self.host.contains_key(e),
                    }
                }
            })
            .count();
        resident - resident_excluded - unreported
    }
}

/// A victim request's candidates: the residents of one tier (device: ready entries) minus
/// `excluded`, looked up under the state lock (which the caller must not hold).
struct TierCandidates<'a> {
    inner: &'a Inner,
    tier: Tier,
    excluded: &'a [ExpertKey],
}

impl Candidates for TierCandidates<'_> {
    fn contains(&self, e: ExpertKey) -> bool {
        let s = self.inner.state.lock().unwrap();
        s.is_candidate(e, self.tier, self.excluded)
    }

    fn list(&self) -> Vec<ExpertKey> {
        let s = self.inner.state.lock().unwrap();
        let mut v: Vec<ExpertKey> = match self.tier {
            Tier::Device => s.device.keys().copied().collect(),
            _ => s.host.keys().copied().collect(),
        };
        v.retain(|k| s.is_candidate(*k, self.tier, self.excluded));
        v.sort_unstable();
        v
    }
}

impl Inner {
    /// Ends the previous forward pass in the per-token budget (warned once near it).
    fn close_budget_pass(&self) {
        let total = {
            let p = self.policies.lock().unwrap();
            p.selection.stats().call_ns
                + p.eviction.stats().call_ns
                + p.prefetch.stats().call_ns
                + p.placement.stats().call_ns
        };
        let mut b = self.budget.lock().unwrap();
        if let Some(mean) = b.end_pass(total) {
            tracing::warn!(
                per_token_us = mean.round(),
                budget_us = self.limits.token_budget_us,
                "the policies together take most of their per-token budget (--policy-budget-us): \
                 time every token waits on"
            );
        }
    }

    fn gpu_transfers(&self) -> Option<crate::transfer::TransferStats> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return Some(g.stats());
        }
        None
    }

    fn device_backend(&self) -> String {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return g.name().to_owned();
        }
        "cpu".into()
    }

    fn key(&self, layer: usize, expert: u32) -> ExpertKey {
        ExpertKey {
            layer: self.moe_index[layer].expect("routed experts only in MoE layers"),
            expert,
        }
    }

    fn init_args(&self) -> InitArgs {
        let s = self.state.lock().unwrap();
        let mut resident: Vec<(ExpertKey, Tier)> = s
            .device
            .iter()
            .filter(|(_, e)| matches!(e, DeviceEntry::Ready(_)))
            .map(|(k, _)| (*k, Tier::Device))
            .chain(s.host.keys().map(|k| (*k, Tier::Host)))
            .collect();
        resident.sort();
        InitArgs {
            shape: self.shape,
            capacities: vec![
                TierCapacity {
                    tier: Tier::Device,
                    slots: self.device_slots as u32,
                    bytes: self.device_bytes,
                },
                TierCapacity {
                    tier: Tier::Host,
                    slots: self.host_slots as u32,
                    bytes: self.host_bytes,
                },
                TierCapacity {
                    tier: Tier::Disk,
                    slots: self.shape.moe_layers * self.shape.experts_per_layer,
                    bytes: self.shape.moe_layers as u64
                        * self.shape.experts_per_layer as u64
                        * self.shape.expert_bytes,
                },
            ],
            resident,
        }
    }

    fn residency(s: &State, moe_layer: u32, n: usize) -> Vec<Tier> {
        (0..n as u32)
            .map(|e| {
                let k = ExpertKey {
                    layer: moe_layer,
                    expert: e,
                };
                if matches!(s.device.get(&k), Some(DeviceEntry::Ready(_))) {
                    Tier::Device
                } else if s.host.contains_key(&k) {
                    Tier::Host
                } else {
                    Tier::Disk
                }
            })
            .collect()
    }

    fn swap_policy(&self, kind: PolicyKind, source: &PolicySource) -> Result<()> {
        let mut g = guarded(kind, source, self.limits)?;
        // Smoke test: init with the current residency and a few representative calls.
        let args = self.init_args();
        let what = || format!("{kind} policy {}", source.describe());
        match &mut g {
            AnyGuarded::Selection(s) => smoke::selection(s, &args).map(drop),
            AnyGuarded::Eviction(v) => smoke::eviction(v, &args).map(drop),
            AnyGuarded::Prefetch(p) => smoke::prefetch(p, &args).map(drop),
            AnyGuarded::Placement(p) => smoke::placement(p, &args).map(drop),
        }
        .with_context(what)?;
        self.pending.lock().unwrap().push(g);
        Ok(())
    }

    /// Applies pending swaps (forward thread, between passes).
    fn apply_swaps(&self) {
        let pending: Vec<AnyGuarded> = std::mem::take(&mut *self.pending.lock().unwrap());
        if pending.is_empty() {
            return;
        }
        let mut p = self.policies.lock().unwrap();
        for g in pending {
            // Re-initialise with the residency of now, not of the smoke test.
            let args = self.init_args();
            let ok = match g {
                AnyGuarded::Selection(mut s) => s.init(&args).map(|_| p.selection = s).is_ok(),
                AnyGuarded::Eviction(mut v) => v.init(&args).map(|_| p.eviction = v).is_ok(),
                AnyGuarded::Prefetch(mut f) => f.init(&args).map(|_| p.prefetch = f).is_ok(),
                AnyGuarded::Placement(mut f) => f.init(&args).map(|_| p.placement = f).is_ok(),
            };
            if ok {
                self.swaps.fetch_add(1, Ordering::Relaxed);
            } else {
                tracing::warn!(
                    "a swapped-in policy failed to re-initialise; keeping the previous one"
                );
            }
        }
    }

    /// Removes `victims` from the device tier and demotes them to the host tier.
    fn evict_device(&self, s: &mut State, victims: &[ExpertKey], demote: &mut Vec<ExpertKey>) {
        for v in victims {
            if let Some(DeviceEntry::Ready(_)) = s.device.get(v) {
                s.device.remove(v);
                s.event(EventKind::Remove, Tier::Device, *v);
                if s.prefetched_unused.remove(v) {
                    s.prefetch_c.wasted += 1;
                }
                if self.host_slots > 0 && !s.host.contains_key(v) {
                    demote.push(*v);
                }
            }
        }
    }

    /// Puts `keys` into the host tier (copying their storage bytes), evicting by policy.
    fn admit_host(&self, p: &mut Policies, keys: &[ExpertKey]) {
        if keys.is_empty() || self.host_slots == 0 {
            return;
        }
        let (free, excluded, available) = {
            let s = self.state.lock().unwrap();
            let excluded: Vec<ExpertKey> = keys
                .iter()
                .filter(|k| s.host.contains_key(k))
                .copied()
                .collect();
            let available = s.candidate_count(Tier::Host, &excluded);
            (
                self.host_slots.saturating_sub(s.host.len()),
                excluded,
                available,
            )
        };
        let mut room = free;
        if keys.len() > free && available > 0 {
            let candidates = TierCandidates {
                inner: self,
                tier: Tier::Host,
                excluded: &excluded,
            };
            let req = VictimRequest {
                tier: Tier::Host,
                count: (keys.len() - free).min(available) as u32,
                only_layer: None,
                excluded: &excluded,
                candidates: &candidates,
            };
            let victims = p.eviction.victims(&req, &|| self.init_args());
            let mut s = self.state.lock().unwrap();
            for v in victims {
                if s.host.remove(&v).is_some() {
                    room += 1;
                    s.event(EventKind::Remove, Tier::Host, v);
                }
            }
        }
        for k in keys.iter().take(room) {
            let layer = self.moe_layers[k.layer as usize];
            match ExpertBytes::read(&self.ckpt, layer, k.expert) {
                Ok(b) => {
                    let mut s = self.state.lock().unwrap();
                    // A prefetch worker may have taken the room meanwhile: never exceed it.
                    if s.host.len() >= self.host_slots || s.host.contains_key(k) {
                        continue;
                    }
                    s.host_c.bytes_in += b.storage_bytes() as u64;
                    s.host.insert(*k, Arc::new(b));
                    s.event(EventKind::Insert, Tier::Host, *k);
                }
                Err(e) => tracing::error!("cannot copy expert {k:?} to host memory: {e:#}"),
            }
        }
    }

    /// `key` in storage format: the host tier's copy if given, else read from the checkpoint.
    fn stored(&self, key: ExpertKey, host: Option<Arc<ExpertBytes>>) -> Result<Arc<ExpertBytes>> {
        match host {
            Some(b) => Ok(b),
            None => {
                let layer = self.moe_layers[key.layer as usize];
                Ok(Arc::new(ExpertBytes::read(&self.ckpt, layer, key.expert)?))
            }
        }
    }

    /// The compute form of `key`, from the host tier if there, else from the checkpoint. On a
    /// GPU store an expert to be `cached` is copied into GPU memory (when a slot is free); one
    /// computed once and dropped stays on the CPU.
    fn load_compute(
        &self,
        key: ExpertKey,
        host: Option<Arc<ExpertBytes>>,
        cached: bool,
    ) -> Result<ExpertWeights> {
        let layer = self.moe_layers[key.layer as usize];
        #[cfg(feature = "cuda")]
        if let (Some(pool), true) = (&self.gpu, cached) {
            // The storage format crosses the link; the GPU converts FP8 and bf16 itself.
            let bytes = self.stored(key, host)?;
            let source = crate::gpu::ExpertSource::Stored(&bytes);
            if let Some(g) = pool.load(key, source)? {
                return Ok(ExpertWeights::Gpu(Arc::new(g)));
            }
            return Ok(ExpertWeights::Compute(Arc::new(bytes.to_ffn()?)));
        }
        #[cfg(not(feature = "cuda"))]
        let _ = cached;
        let w = match host {
            Some(b) => b.to_ffn()?,
            None => FfnWeights::load(
                &self.ckpt,
                &crate::experts::expert_prefix(layer, key.expert),
                self.hidden,
                self.intermediate,
            )?,
        };
        Ok(ExpertWeights::Compute(Arc::new(w)))
    }

    fn worker(&self) {
        loop {
            let job = {
                let mut jobs = self.queue.jobs.lock().unwrap();
                loop {
                    if self.queue.shutdown.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Some(j) = jobs.pop() {
                        break j;
                    }
                    jobs = self.queue.more.wait(jobs).unwrap();
                }
            };
            let stale = job.generation < self.queue.generation.load(Ordering::SeqCst);
            match job.tier {
                Tier::Device => {
                    let cell = job.cell.expect("device jobs carry a cell");
                    let result = if stale {
                        None
                    } else {
                        let host = self.state.lock().unwrap().host.get(&job.key).cloned();
                        match self.load_compute(job.key, host, true) {
                            Ok(w) => {
                                let mut s = self.state.lock().unwrap();
                                s.device_c.bytes_in += w.bytes() as u64;
                                Some(w)
                            }
                            Err(e) => {
                                tracing::warn!("prefetch of {:?} failed: {e:#}", job.key);
                                None
                            }
                        }
                    };
                    let mut s = self.state.lock().unwrap();
                    let ours = matches!(s.device.get(&job.key), Some(DeviceEntry::Loading(c)) if Arc::ptr_eq(c, &cell));
                    match (&result, ours) {
                        (Some(w), true) => {
                            s.device.insert(job.key, DeviceEntry::Ready(w.clone()));
                            s.prefetched_unused.insert(job.key);
                            s.event(EventKind::Insert, Tier::Device, job.key);
                        }
                        (None, true) => {
                            s.device.remove(&job.key);
                            s.prefetch_c.cancelled += 1;
                            s.prefetch_c.wasted += 1;
                        }
                        _ => {}
                    }
                    drop(s);
                    cell.set(result);
                }
                Tier::Host | Tier::Disk => {
                    if stale {
                        let mut s = self.state.lock().unwrap();
                        s.prefetch_c.cancelled += 1;
                        s.prefetch_c.wasted += 1;
                        continue;
                    }
                    let layer = self.moe_layers[job.key.layer as usize];
                    if let Ok(b) = ExpertBytes::read(&self.ckpt, layer, job.key.expert) {
                        let mut s = self.state.lock().unwrap();
                        if s.host.len() < self.host_slots && !s.host.contains_key(&job.key) {
                            s.host_c.bytes_in += b.storage_bytes() as u64;
                            s.host.insert(job.key, Arc::new(b));
                            s.event(EventKind::Insert, Tier::Host, job.key);
                        }
                    }
                }
            }
        }
    }
}

impl ExpertProvider for TieredExperts {
    fn begin_step(&self) {
        self.inner.step.fetch_add(1, Ordering::Relaxed);
        self.inner.close_budget_pass();
        self.inner.apply_swaps();
    }

    fn select(&self, layer: usize, tokens: usize, k: usize, biased: &[f32]) -> Option<Vec<u32>> {
        let inner = &self.inner;
        let moe = inner.moe_index[layer]?;
        if moe == 0 {
            inner.budget.lock().unwrap().note_tokens(tokens);
        }
        let residency = Inner::residency(&inner.state.lock().unwrap(), moe, inner.n_experts);
        let mut p = inner.policies.lock().unwrap();
        Some(
            p.selection
                .select(moe, tokens as u32, k as u32, biased, &residency, &|| {
                    inner.init_args()
                }),
        )
    }

    fn lookahead(&self) -> usize {
        let live = self.inner.policies.lock().unwrap().prefetch.lookahead();
        let observer = self
            .observer
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |o| o.lookahead);
        live.max(observer) as usize
    }

    fn fetch(&self, layer: usize, experts: &[u32], tokens: &[u32]) -> Result<Vec<ExpertWeights>> {
        let inner = &self.inner;
        let t0 = Instant::now();
        let keys: Vec<ExpertKey> = experts.iter().map(|&e| inner.key(layer, e)).collect();
        for k in &keys {
            anyhow::ensure!(
                (k.expert as usize) < inner.n_experts,
                "expert {} out of range",
                k.expert
            );
        }
        let current: HashSet<ExpertKey> = keys.iter().copied().collect();
        let mut p = inner.policies.lock().unwrap();

        // 1. What is where; the step's accesses.
        let mut ready: Vec<Option<ExpertWeights>> = vec![None; keys.len()];
        let mut waiting: Vec<(usize, Arc<LoadCell>)> = Vec::new();
        let mut misses: Vec<usize> = Vec::new();
        let mut miss_tiers: Vec<Tier> = Vec::new();
        let (facts, free) = {
            let mut s = inner.state.lock().unwrap();
            for (i, k) in keys.iter().enumerate() {
                s.event(EventKind::Access, Tier::Device, *k);
                match s.device.get(k) {
                    Some(DeviceEntry::Ready(w)) => {
                        ready[i] = Some(w.clone());
                        s.device_c.hits += 1;
                        if s.prefetched_unused.remove(k) {
                            s.prefetch_c.used += 1;
                        }
                    }
                    Some(DeviceEntry::Loading(c)) => {
                        // Counted as used once it arrives (below).
                        waiting.push((i, c.clone()));
                        s.device_c.hits += 1;
                    }
                    None => {
                        s.device_c.misses += 1;
                        if s.host.contains_key(k) {
                            s.host_c.hits += 1;
                            miss_tiers.push(Tier::Host);
                        } else {
                            s.host_c.misses += 1;
                            s.disk_c.hits += 1;
                            miss_tiers.push(Tier::Disk);
                        }
                        misses.push(i);
                    }
                }
            }
            // This call delivers every pending event, so the policy then knows every resident.
            let facts = StepFacts {
                step: inner.step.load(Ordering::Relaxed),
                layer: keys.first().map_or(0, |k| k.layer),
                events: s.take_events(),
            };
            (facts, inner.device_slots.saturating_sub(s.device.len()))
        };

        // 2. Placement: fetch each miss into the device tier, or run it where it lives.
        if !misses.is_empty() {
            let miss_keys: Vec<ExpertKey> = misses.iter().map(|&i| keys[i]).collect();
            let miss_tokens: Vec<u32> = misses
                .iter()
                .map(|&i| tokens.get(i).copied().unwrap_or(1))
                .collect();
            let request = PlacementRequest {
                layer: facts.layer,
                experts: &miss_keys,
                tokens: &miss_tokens,
                tiers: &miss_tiers,
                free_device_slots: free as u32,
                expert_bytes: inner.shape.expert_bytes,
                costs: inner.costs,
            };
            let places = p.placement.place(&request, &|| inner.init_args());
            let mut fetched = Vec::with_capacity(misses.len());
            let mut on_host = Vec::new();
            for ((&i, place), t) in misses.iter().zip(places).zip(miss_tokens) {
                match place {
                    Place::Device => fetched.push(i),
                    Place::Host => on_host.push((i, t)),
                }
            }
            let hosts: Vec<Option<Arc<ExpertBytes>>> = {
                let mut s = inner.state.lock().unwrap();
                s.placement_c.fetched += fetched.len() as u64;
                s.placement_c.on_host += on_host.len() as u64;
                s.placement_c.host_tokens +=
                    on_host.iter().map(|&(_, t)| u64::from(t)).sum::<u64>();
                on_host
                    .iter()
                    .map(|&(i, _)| s.host.get(&keys[i]).cloned())
                    .collect()
            };
            for (&(i, _), host) in on_host.iter().zip(hosts) {
                ready[i] = Some(ExpertWeights::Stored(inner.stored(keys[i], host)?));
            }
            misses = fetched;
        }

        // 3. The eviction policy hears the facts and, if room is needed, names victims.
        let need = {
            let s = inner.state.lock().unwrap();
            if misses.len() > free {
                let excluded: Vec<ExpertKey> = current
                    .iter()
                    .filter(|k| matches!(s.device.get(k), Some(DeviceEntry::Ready(_))))
                    .copied()
                    .collect();
                let available = s.candidate_count(Tier::Device, &excluded);
                (available > 0).then(|| (((misses.len() - free).min(available)) as u32, excluded))
            } else {
                None
            }
        };
        let candidates;
        let request = match &need {
            Some((count, excluded)) => {
                candidates = TierCandidates {
                    inner,
                    tier: Tier::Device,
                    excluded,
                };
                Some(VictimRequest {
                    tier: Tier::Device,
                    count: *count,
                    only_layer: None,
                    excluded,
                    candidates: &candidates,
                })
            }
            None => None,
        };
        let victims = p
            .eviction
            .on_step(&facts, request.as_ref(), &|| inner.init_args());
        let mut demote = Vec::new();
        let room = {
            let mut s = inner.state.lock().unwrap();
            inner.evict_device(&mut s, &victims, &mut demote);
            inner.device_slots.saturating_sub(s.device.len())
        };
        inner.admit_host(&mut p, &demote);
        drop(p);

        // 4. Load the fetched misses; cache as many as there is room for, stream the rest.
        let hosts: Vec<Option<Arc<ExpertBytes>>> = {
            let s = inner.state.lock().unwrap();
            misses
                .iter()
                .map(|&i| s.host.get(&keys[i]).cloned())
                .collect()
        };
        for (n, (&i, host)) in misses.iter().zip(hosts).enumerate() {
            let w = inner.load_compute(keys[i], host, n < room)?;
            let mut s = inner.state.lock().unwrap();
            s.device_c.bytes_in += w.bytes() as u64;
            if n < room {
                s.device.insert(keys[i], DeviceEntry::Ready(w.clone()));
                s.event(EventKind::Insert, Tier::Device, keys[i]);
            } else {
                s.streamed += 1;
            }
            ready[i] = Some(w);
        }
        // 5. Wait for prefetches in flight (a cancelled one is loaded here).
        for (i, cell) in waiting {
            ready[i] = Some(match cell.wait() {
                Some(w) => {
                    let mut s = inner.state.lock().unwrap();
                    s.prefetched_unused.remove(&keys[i]);
                    s.prefetch_c.used += 1;
                    w
                }
                None => {
                    let host = inner.state.lock().unwrap().host.get(&keys[i]).cloned();
                    inner.load_compute(keys[i], host, false)?
                }
            });
        }
        inner.state.lock().unwrap().wait_ns += t0.elapsed().as_nanos() as u64;
        Ok(ready
            .into_iter()
            .map(|w| w.expect("every expert resolved"))
            .collect())
    }

    fn routed(&self, layer: usize, tokens: usize, experts: &[u32], outlook: &[(usize, Vec<f32>)]) {
        let inner = &self.inner;
        let Some(moe) = inner.moe_index[layer] else {
            return;
        };
        if let Some(o) = self.observer.lock().unwrap().as_ref() {
            let seen = ObservedStep {
                step: inner.step.load(Ordering::Relaxed),
                layer: moe,
                tokens: tokens as u32,
                experts: experts.to_vec(),
                outlook: outlook
                    .first()
                    .filter(|_| o.lookahead > 0)
                    .and_then(|(l, scores)| Some((inner.moe_index[*l]?, scores.clone()))),
            };
            if o.tx.try_send(seen).is_err() {
                o.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut p = inner.policies.lock().unwrap();
        if !p.prefetch.has_plugin() {
            return;
        }
        // The outlook may be longer than this policy asked for (an observer wanted more).
        let outlook = &outlook[..outlook.len().min(p.prefetch.lookahead() as usize)];
        let step = {
            let s = inner.state.lock().unwrap();
            RoutedStep {
                step: inner.step.load(Ordering::Relaxed),
                layer: moe,
                tokens: tokens as u32,
                experts: experts.to_vec(),
                outlook: outlook
                    .iter()
                    .filter_map(|(l, scores)| {
                        let m = inner.moe_index[*l]?;
                        Some(Outlook {
                            layer: m,
                            scores: scores.clone(),
                            residency: Inner::residency(&s, m, inner.n_experts),
                        })
                    })
                    .collect(),
            }
        };
        let mut reqs = p.prefetch.on_routed(&step, &|| inner.init_args());
        if reqs.is_empty() {
            return;
        }
        // Newer requests cancel queued ones.
        let generation = inner.queue.generation.fetch_add(1, Ordering::SeqCst) + 1;
        reqs.sort_by_key(|r| std::cmp::Reverse(r.priority));
        let mut seen = HashSet::new();
        reqs.retain(|r| seen.insert((r.expert, r.tier)));
        // At most one layer step's worth of device prefetches per call.
        let cap = (inner.top_k * tokens).max(inner.top_k);
        let current: HashSet<ExpertKey> = experts
            .iter()
            .map(|&e| ExpertKey {
                layer: moe,
                expert: e,
            })
            .collect();
        let (device_reqs, host_reqs): (Vec<PrefetchRequest>, Vec<PrefetchRequest>) = {
            let s = inner.state.lock().unwrap();
            let d: Vec<_> = reqs
                .iter()
                .filter(|r| r.tier == Tier::Device && !s.device.contains_key(&r.expert))
                .take(cap)
                .copied()
                .collect();
            let h: Vec<_> = reqs
                .iter()
                .filter(|r| {
                    r.tier == Tier::Host
                        && !s.host.contains_key(&r.expert)
                        && !s.device.contains_key(&r.expert)
                })
                .take(cap)
                .copied()
                .collect();
            (d, h)
        };
        let mut accepted = Vec::new();
        if !device_reqs.is_empty() {
            let (free, excluded, available) = {
                let s = inner.state.lock().unwrap();
                let mut excluded: Vec<ExpertKey> = current
                    .iter()
                    .copied()
                    .chain(device_reqs.iter().map(|r| r.expert))
                    .filter(|k| matches!(s.device.get(k), Some(DeviceEntry::Ready(_))))
                    .collect();
                excluded.sort_unstable();
                excluded.dedup();
                let available = s.candidate_count(Tier::Device, &excluded);
                (
                    inner.device_slots.saturating_sub(s.device.len()),
                    excluded,
                    available,
                )
            };
            let mut room = free;
            if device_reqs.len() > free && available > 0 {
                let candidates = TierCandidates {
                    inner,
                    tier: Tier::Device,
                    excluded: &excluded,
                };
                let req = VictimRequest {
                    tier: Tier::Device,
                    count: (device_reqs.len() - free).min(available) as u32,
                    only_layer: None,
                    excluded: &excluded,
                    candidates: &candidates,
                };
                let victims = p.eviction.victims(&req, &|| inner.init_args());
                let mut demote = Vec::new();
                {
                    let mut s = inner.state.lock().unwrap();
                    let before = s.device.len();
                    inner.evict_device(&mut s, &victims, &mut demote);
                    room += before - s.device.len();
                }
                inner.admit_host(&mut p, &demote);
            }
            let mut s = inner.state.lock().unwrap();
            for r in device_reqs.into_iter().take(room) {
                let cell = Arc::new(LoadCell::default());
                s.device
                    .insert(r.expert, DeviceEntry::Loading(cell.clone()));
                accepted.push((r, Some(cell)));
            }
        }
        accepted.extend(host_reqs.into_iter().map(|r| (r, None)));
        if accepted.is_empty() {
            return;
        }
        inner.state.lock().unwrap().prefetch_c.issued += accepted.len() as u64;
        let mut jobs = inner.queue.jobs.lock().unwrap();
        for (r, cell) in accepted {
            jobs.push(Job {
                priority: r.priority,
                seq: inner.queue.seq.fetch_add(1, Ordering::Relaxed),
                generation,
                key: r.expert,
                tier: r.tier,
                cell,
            });
        }
        drop(jobs);
        inner.queue.more.notify_all();
    }
}
