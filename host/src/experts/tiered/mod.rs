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
//!
//! One concept per file:
//! - `config` — budgets, policy sources, device;
//! - `residency` — which experts are in which tier, pools, victim requests (the replay lab
//!   keeps its cache in the same type);
//! - `rules` — the decisions the live store and the replay lab share: when and how many
//!   victims, which prefetch requests are carried out;
//! - `state` — the live entries under the state lock, events for the eviction policy,
//!   eviction and demotion;
//! - `step` — one MoE layer step (`fetch`);
//! - `prefetch` — the queue, its workers and cancellation;
//! - `load` — reading an expert into its storage or compute form;
//! - `policies` — loading, smoke-testing, swapping and watching the four policies;
//! - `stats` — the counters.

use anyhow::Result;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::experts::{ExpertProvider, ExpertWeights, LayerStep};
use crate::model::config::ModelConfig;
use crate::policy::wasm::RuntimeLimits;
use crate::policy::*;
use crate::weights::checkpoint::Checkpoint;
use crate::weights::format::WeightFormat;

mod config;
pub mod events;
mod load;
mod policies;
mod prefetch;
pub mod residency;
pub mod rules;
mod state;
mod stats;
mod step;
#[cfg(test)]
mod tests;

use crate::policy::set::{AnyGuarded, PolicySet};
pub use config::{parse_bytes, Device, StoreConfig};
use policies::guarded;
pub use policies::BUILTIN_PLACEMENT;
use prefetch::Queue;
use state::State;
pub use stats::{PlacementCounters, PolicyStatsSet, PrefetchCounters, StoreStats, TierCounters};

/// The GPU memory a `Device::Cuda` store's device tier lives in (`slots` experts of
/// `slot_bytes`, plus a few for experts still computing after their eviction), or `None`
/// after saying why not.
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
            tracing::warn!(
                "no CUDA device for the device tier ({why:#}); the device tier runs on the CPU"
            );
            None
        }
    }
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
    /// Bytes of a device slot (the compute form; a host slot holds `shape.expert_bytes`).
    device_slot_bytes: u64,
    state: Mutex<State>,
    policies: Mutex<PolicySet>,
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
        anyhow::ensure!(
            config.device != Device::Cuda || !crate::weights::q8::enabled(),
            "--activations q8 runs on the CPU only (the GPU kernels keep f32 activations)"
        );
        let moe_layers = cfg.moe_layers();
        let mut moe_index = vec![None; cfg.num_hidden_layers];
        for (i, &l) in moe_layers.iter().enumerate() {
            moe_index[l] = Some(i as u32);
        }
        let total = moe_layers.len() * cfg.n_routed_experts;
        // Byte sizes from the first expert's headers (all experts share them).
        let (storage, cpu_compute, format) = match moe_layers.first() {
            Some(&l) => {
                let prefix = crate::experts::expert_prefix(l, 0);
                let mut storage = 0u64;
                let mut bf16 = true;
                let mut format = None;
                for p in ["gate_proj", "up_proj", "down_proj"] {
                    let raw = ckpt.raw(&format!("{prefix}.{p}.weight"))?;
                    storage += raw.bytes.len() as u64;
                    format = WeightFormat::of_dtype(raw.dtype);
                    bf16 &= format == Some(WeightFormat::Bf16);
                    if let Some(s) = ckpt.stored_scales(&raw, true)? {
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
                    format,
                )
            }
            None => (1, 1, None),
        };
        // A CUDA device tier's slot: what `GpuPool` stages for the first expert (its storage
        // format where a kernel reads it).
        let gpu_compute = match moe_layers.first() {
            Some(&l) if config.device == Device::Cuda && crate::gpu::gpu().is_ok() => {
                let first = crate::experts::ExpertBytes::read(&ckpt, l, 0)?;
                Some(crate::gpu::expert_slot_bytes(&first)? as u64)
            }
            _ => None,
        };
        let slots = |budget: Option<u64>, per: u64| {
            budget.map_or(total, |b| ((b / per.max(1)) as usize).min(total))
        };
        let mut compute = gpu_compute.unwrap_or(cpu_compute);
        let mut device_slots = slots(config.device_bytes, compute);
        let host_slots = slots(config.host_bytes, storage);
        let shape = ModelShape {
            moe_layers: moe_layers.len() as u32,
            experts_per_layer: cfg.n_routed_experts as u32,
            top_k: cfg.num_experts_per_tok as u32,
            expert_bytes: storage,
        };
        let take = |kind| guarded(kind, &config.source_of(kind), config.limits);
        let mut costs =
            LinkCosts::preset(&config.link, cfg.hidden_size, cfg.moe_intermediate_size)?;
        // A miss computed on this CPU reads its expert no faster than this machine's threads
        // run the kernels for its format (as measured, when a host profile says), nor than the
        // preset's host memory.
        if let Some(f) = format {
            let cores = rayon::current_num_threads() as f64;
            let per_core = config
                .host_profile
                .as_ref()
                .and_then(|p| p.per_thread_gbps(f))
                .unwrap_or_else(|| crate::hardware::cpu_core_expert_gbps(f));
            costs.host_memory_bytes_per_second = costs
                .host_memory_bytes_per_second
                .min(cores * per_core * 1e9);
        }
        let workers = config.prefetch_workers;
        let gpu = open_gpu(config.device, compute as usize, device_slots, workers);
        // Slots sized for the GPU's storage format, but the tier runs on the CPU after all (e.g.
        // its memory could not be allocated): the budget buys compute-form experts there.
        if gpu.is_none() && compute != cpu_compute {
            compute = cpu_compute;
            device_slots = slots(config.device_bytes, compute);
        }
        let policies = PolicySet::load(take)?;
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
            device_slot_bytes: compute,
            state: Mutex::new(State::new(shape, device_slots, host_slots)),
            policies: Mutex::new(policies),
            pending: Mutex::new(Vec::new()),
            swaps: AtomicU64::new(0),
            step: AtomicU64::new(0),
            budget: Mutex::new(crate::policy::budget::TokenBudget::new(
                config.limits.token_budget_us,
            )),
            queue: Queue::default(),
            limits: config.limits,
            costs,
            gpu,
        });
        {
            let args = inner.init_args();
            let mut p = inner.policies.lock().unwrap();
            p.init(&args).map_err(|(kind, e)| {
                anyhow::anyhow!(
                    "{kind} policy {} failed to initialise: {e}",
                    config.source_of(kind).describe()
                )
            })?;
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
        device.resident = s.device_len() as u64;
        let mut host = s.host_c.clone();
        host.slots = self.inner.host_slots as u64;
        host.resident = s.host_len() as u64;
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
            policies: p.stats(),
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
}

impl Inner {
    /// Ends the previous forward pass in the per-token budget (warned once near it).
    fn close_budget_pass(&self) {
        let total = self.policies.lock().unwrap().call_ns();
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
        self.gpu.as_ref().map(|g| g.stats())
    }

    fn device_backend(&self) -> String {
        self.gpu
            .as_ref()
            .map_or("cpu".into(), |g| g.name().to_owned())
    }

    fn key(&self, layer: usize, expert: u32) -> ExpertKey {
        ExpertKey {
            layer: self.moe_index[layer].expect("routed experts only in MoE layers"),
            expert,
        }
    }

    fn init_args(&self) -> InitArgs {
        self.state.lock().unwrap().init_args(self.device_slot_bytes)
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
        let residency = inner.state.lock().unwrap().layer_tiers(moe);
        let mut p = inner.policies.lock().unwrap();
        Some(
            p.selection
                .select(moe, tokens as u32, k as u32, biased, &residency, &|| {
                    inner.init_args()
                }),
        )
    }

    fn step(&self, step: &LayerStep<'_>) -> Result<Vec<ExpertWeights>> {
        let weights = self.inner.fetch_step(step.layer, step.experts, step.rows)?;
        // The prefetch policy (and an observer) see the routed step, with as many layers of
        // speculative routing as they want.
        let lookahead = self.lookahead();
        let outlook = if lookahead > 0 {
            (step.outlook)(lookahead)
        } else {
            Vec::new()
        };
        self.routed(step.layer, step.tokens, step.experts, &outlook);
        Ok(weights)
    }
}

impl TieredExperts {
    /// Layers of speculative routing the prefetch policy or an observer wants.
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

    /// After a layer step: tell the observer, then let the prefetch policy queue its requests.
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
        self.inner.prefetch_after(moe, tokens, experts, outlook);
    }
}
