//! A sweep: every trace x capacity x (eviction x prefetch) combination plus Belady (and the
//! oracle prefetch bound when prefetch policies are compared), run in parallel over the cores.
//! Each combination is independent (its own plugin instances); rows come back in a fixed order,
//! so a sweep's output is the same run to run.

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;

use crate::policy::builtin::Lru;
use crate::policy::wasm::{load_component, LoadedComponent, RuntimeLimits};
use crate::policy::{PolicyKind, PolicySource, PolicyStats};
use crate::trace::Trace;

use super::belady::Belady;
use super::cost::{estimate, Link};
use super::engine::{simulate, Counters, Evictor, Prefetcher, SimConfig};
use super::plugin::{guarded_eviction, guarded_prefetch, ContractEvictor, EvictionCalls, Native};
use super::schedule::Schedule;
use crate::experts::tiered::residency::Residency;

/// A cache size: a number of experts, or a percentage of the pool (`10%`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Capacity {
    Slots(u32),
    Percent(f64),
}

impl Capacity {
    pub fn parse(s: &str) -> Result<Capacity> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p
                .trim()
                .parse()
                .with_context(|| format!("invalid capacity {s:?}: expected e.g. 64 or 10%"))?;
            anyhow::ensure!(
                (0.0..=100.0).contains(&v),
                "invalid capacity {s:?}: a percentage from 0 to 100"
            );
            Ok(Capacity::Percent(v))
        } else {
            let v: u32 = t
                .parse()
                .with_context(|| format!("invalid capacity {s:?}: expected e.g. 64 or 10%"))?;
            Ok(Capacity::Slots(v))
        }
    }

    /// As given: `64` or `10%`.
    pub fn label(&self) -> String {
        match *self {
            Capacity::Slots(n) => n.to_string(),
            Capacity::Percent(p) => format!("{p}%"),
        }
    }

    /// Slots for a pool of `pool` experts (percentages round down).
    pub fn slots(&self, pool: u32) -> u32 {
        match *self {
            Capacity::Slots(n) => n.min(pool),
            Capacity::Percent(p) => ((pool as f64 * p / 100.0) + 1e-9).floor() as u32,
        }
    }
}

/// What to replay and how.
#[derive(Debug, Clone)]
pub struct ReplayConfig {
    pub traces: Vec<PathBuf>,
    /// Traces replayed alike but reported apart in the summary: those no policy was tuned on.
    pub held_out: Vec<PathBuf>,
    /// Eviction policies: bundled names, `.wasm` paths, or `native-lru`.
    pub evictions: Vec<String>,
    /// Prefetch policies; empty = no prefetch (and no oracle row).
    pub prefetches: Vec<String>,
    pub capacities: Vec<Capacity>,
    pub per_layer: bool,
    /// Host tier size (same layout); `None`: the host tier holds every expert.
    pub host_capacity: Option<Capacity>,
    /// Overrides the traces' expert size (bytes).
    pub expert_bytes: Option<u64>,
    pub link: Link,
    pub limits: RuntimeLimits,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            traces: Vec::new(),
            held_out: Vec::new(),
            evictions: vec!["lru".into()],
            prefetches: Vec::new(),
            capacities: Vec::new(),
            per_layer: false,
            host_capacity: None,
            expert_bytes: None,
            link: Link::default(),
            limits: replay_limits(),
            progress: false,
        }
    }
}

/// Plugin limits for replays: a generous deadline, so a result never depends on machine load.
pub fn replay_limits() -> RuntimeLimits {
    RuntimeLimits {
        call_timeout: std::time::Duration::from_secs(2),
        init_timeout: std::time::Duration::from_secs(10),
        ..RuntimeLimits::default()
    }
}

/// One result line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub trace: String,
    /// Given with `--held-out`: a trace no policy was tuned on.
    pub held_out: bool,
    /// `belady`, `oracle-prefetch`, or the eviction policy (with `+prefetch` when one is used).
    pub policy: String,
    pub eviction: String,
    pub prefetch: String,
    /// Device slots per pool.
    pub capacity: u32,
    /// The capacity as given (`10%`, `64`): the same across traces of different sizes.
    pub capacity_given: String,
    /// Experts in a pool: all of them, or one layer's with `per_layer`.
    pub pool_experts: u32,
    /// `capacity` as a share of the pool's experts.
    pub resident_fraction: f64,
    pub per_layer: bool,
    /// Host slots per pool (`null`: every expert).
    pub host_capacity: Option<u32>,
    pub accesses: u64,
    pub hits: u64,
    pub misses: u64,
    pub hit_rate: f64,
    /// Belady's hit rate at the same trace and capacity.
    pub belady_hit_rate: f64,
    /// `hit_rate / belady_hit_rate` (1 when both are 0).
    pub vs_belady: f64,
    pub streamed: u64,
    pub evictions: u64,
    pub host_hits: u64,
    pub host_misses: u64,
    pub prefetch_issued: u64,
    pub prefetch_used: u64,
    pub prefetch_wasted: u64,
    pub expert_bytes: u64,
    pub bytes_moved: u64,
    pub disk_bytes: u64,
    pub tokens: u64,
    pub stall_ms_per_token: f64,
    pub tokens_per_s_ceiling: f64,
    pub link: String,
    /// Plugin calls served by the built-in policy (failures), eviction + prefetch.
    pub policy_fallbacks: u64,
    pub counters: Counters,
}

/// A policy ready to instantiate per job.
#[derive(Clone)]
pub enum EvictionSpec {
    Belady,
    Oracle,
    NativeLru,
    Plugin {
        label: String,
        component: LoadedComponent,
    },
}

impl EvictionSpec {
    pub fn label(&self) -> String {
        match self {
            EvictionSpec::Belady => "belady".into(),
            EvictionSpec::Oracle => "oracle-prefetch".into(),
            EvictionSpec::NativeLru => "native-lru".into(),
            EvictionSpec::Plugin { label, .. } => label.clone(),
        }
    }

    /// `native-lru`, or a plugin (bundled name or `.wasm` path) that must be an eviction policy.
    pub fn load(arg: &str) -> Result<EvictionSpec> {
        if arg == "native-lru" {
            return Ok(EvictionSpec::NativeLru);
        }
        if arg == "belady" {
            bail!("belady is always replayed as the bound; name eviction plugins with --eviction");
        }
        Ok(EvictionSpec::Plugin {
            label: arg.to_owned(),
            component: load_kind(arg, PolicyKind::Eviction)?,
        })
    }
}

/// A prefetch plugin ready to instantiate per job.
#[derive(Clone)]
pub struct PrefetchSpec {
    pub label: String,
    /// `None` for `none` (nothing is ever requested, so nothing is called).
    pub component: Option<LoadedComponent>,
}

impl PrefetchSpec {
    pub fn load(arg: &str) -> Result<PrefetchSpec> {
        Ok(PrefetchSpec {
            label: arg.to_owned(),
            component: if arg == "none" {
                None
            } else {
                Some(load_kind(arg, PolicyKind::Prefetch)?)
            },
        })
    }
}

fn load_kind(arg: &str, kind: PolicyKind) -> Result<LoadedComponent> {
    let src = PolicySource::parse(arg);
    let c = load_component(&src.bytes()?, &src.describe())?;
    let a = |k: PolicyKind| match k {
        PolicyKind::Eviction => "an",
        _ => "a",
    };
    anyhow::ensure!(
        c.kind == kind,
        "{} is {} {} policy, not {} {kind} policy",
        src.describe(),
        a(c.kind),
        c.kind,
        a(kind)
    );
    Ok(c)
}

/// A loaded trace.
pub struct LoadedTrace {
    pub path: PathBuf,
    pub schedule: Schedule,
}

pub fn load_trace(path: &std::path::Path) -> Result<LoadedTrace> {
    let trace = Trace::load(path)?;
    let name = path.file_stem().map_or_else(
        || path.display().to_string(),
        |s| s.to_string_lossy().into_owned(),
    );
    Ok(LoadedTrace {
        path: path.to_owned(),
        schedule: Schedule::from_trace(&name, &trace),
    })
}

/// One combination.
#[derive(Clone)]
pub struct Job {
    pub trace: usize,
    pub capacity: u32,
    pub host_capacity: Option<u32>,
    pub eviction: EvictionSpec,
    pub prefetch: Option<PrefetchSpec>,
}

/// Counters of one job, and the plugins' failure counts.
pub struct JobResult {
    pub counters: Counters,
    pub eviction_stats: Option<PolicyStats>,
    pub prefetch_stats: Option<PolicyStats>,
}

/// Runs one combination on `s`.
pub fn run_job(
    s: &Schedule,
    job: &Job,
    per_layer: bool,
    expert_bytes: u64,
    limits: RuntimeLimits,
) -> Result<JobResult> {
    let cfg = SimConfig {
        capacity: job.capacity,
        per_layer,
        host_capacity: job.host_capacity,
        oracle_prefetch: matches!(job.eviction, EvictionSpec::Oracle),
        expert_bytes,
    };
    let shape = crate::policy::ModelShape {
        moe_layers: s.layers,
        experts_per_layer: s.experts_per_layer,
        top_k: s.top_k,
        expert_bytes,
    };
    let args = Residency::new(shape, per_layer, cfg.capacity, cfg.host_capacity).init_args();
    let mut pf = match &job.prefetch {
        Some(PrefetchSpec {
            label,
            component: Some(c),
        }) => Some(guarded_prefetch(c, label, limits, &args)?),
        _ => None,
    };
    let pf_dyn = pf.as_mut().map(|p| p as &mut dyn Prefetcher);
    let (counters, eviction_stats) = match &job.eviction {
        EvictionSpec::Belady | EvictionSpec::Oracle => {
            let mut b = Belady::new(s, per_layer);
            (simulate(s, &cfg, &mut b as &mut dyn Evictor, pf_dyn), None)
        }
        EvictionSpec::NativeLru => {
            let mut lru = Lru::named("native-lru");
            crate::policy::Eviction::init(&mut lru, &args)
                .map_err(|e| anyhow::anyhow!("native-lru: {e}"))?;
            let mut calls = Native(lru);
            let mut ev = ContractEvictor::new(&mut calls, s.experts_per_layer);
            (simulate(s, &cfg, &mut ev, pf_dyn), None)
        }
        EvictionSpec::Plugin { label, component } => {
            let mut g = guarded_eviction(component, label, limits, &args)?;
            let c = {
                let mut ev = ContractEvictor::new(&mut g, s.experts_per_layer);
                simulate(s, &cfg, &mut ev, pf_dyn)
            };
            (c, EvictionCalls::stats(&g))
        }
    };
    Ok(JobResult {
        counters,
        eviction_stats,
        prefetch_stats: pf.map(|p| p.stats().clone()),
    })
}

/// Runs the whole sweep; rows ordered by trace, capacity, then Belady, the oracle, and the
/// policies in the order given (each eviction with each prefetch policy).
pub fn run(cfg: &ReplayConfig) -> Result<Vec<Row>> {
    anyhow::ensure!(!cfg.traces.is_empty(), "no trace given (--trace FILE)");
    anyhow::ensure!(
        !cfg.capacities.is_empty(),
        "no capacity given (--capacity N or N%)"
    );
    let traces: Vec<Arc<LoadedTrace>> = cfg
        .traces
        .iter()
        .chain(&cfg.held_out)
        .map(|p| load_trace(p).map(Arc::new))
        .collect::<Result<_>>()?;
    let evictions: Vec<EvictionSpec> = cfg
        .evictions
        .iter()
        .map(|a| EvictionSpec::load(a))
        .collect::<Result<_>>()?;
    let prefetches: Vec<PrefetchSpec> = cfg
        .prefetches
        .iter()
        .map(|a| PrefetchSpec::load(a))
        .collect::<Result<_>>()?;
    let jobs = plan(cfg, &traces, &evictions, &prefetches)?;
    let bar = cfg.progress.then(|| progress_bar(jobs.len() as u64));
    let results: Vec<Result<JobResult>> = jobs
        .par_iter()
        .map(|job| {
            let t = &traces[job.trace];
            let eb = cfg.expert_bytes.unwrap_or(t.schedule.expert_bytes);
            let r = run_job(&t.schedule, job, cfg.per_layer, eb, cfg.limits)
                .with_context(|| format!("replaying {}", t.path.display()));
            if let Some(b) = &bar {
                b.inc(1);
            }
            r
        })
        .collect();
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let mut rows = Vec::with_capacity(jobs.len());
    for (job, r) in jobs.iter().zip(results) {
        let mut row = make_row(cfg, &traces[job.trace], job, r?);
        row.held_out = job.trace >= cfg.traces.len();
        rows.push(row);
    }
    fill_belady(&mut rows, &jobs);
    Ok(rows)
}

/// The combinations, in output order.
pub fn plan(
    cfg: &ReplayConfig,
    traces: &[Arc<LoadedTrace>],
    evictions: &[EvictionSpec],
    prefetches: &[PrefetchSpec],
) -> Result<Vec<Job>> {
    let mut jobs = Vec::new();
    for (ti, t) in traces.iter().enumerate() {
        let s = &t.schedule;
        let pool = if cfg.per_layer {
            s.experts_per_layer
        } else {
            s.layers * s.experts_per_layer
        };
        let host_capacity = cfg.host_capacity.map(|c| c.slots(pool));
        let mut caps: Vec<u32> = cfg.capacities.iter().map(|c| c.slots(pool)).collect();
        caps.dedup();
        for capacity in caps {
            let job = |eviction: EvictionSpec, prefetch: Option<PrefetchSpec>| Job {
                trace: ti,
                capacity,
                host_capacity,
                eviction,
                prefetch,
            };
            jobs.push(job(EvictionSpec::Belady, None));
            if !prefetches.is_empty() {
                jobs.push(job(EvictionSpec::Oracle, None));
            }
            for ev in evictions {
                if prefetches.is_empty() {
                    jobs.push(job(ev.clone(), None));
                }
                for pf in prefetches {
                    jobs.push(job(ev.clone(), Some(pf.clone())));
                }
            }
        }
    }
    Ok(jobs)
}

fn make_row(cfg: &ReplayConfig, t: &LoadedTrace, job: &Job, r: JobResult) -> Row {
    let s = &t.schedule;
    let c = &r.counters;
    let eb = cfg.expert_bytes.unwrap_or(s.expert_bytes);
    let cost = estimate(c, s.tokens, eb, &cfg.link);
    let pool = if cfg.per_layer {
        s.experts_per_layer
    } else {
        s.layers * s.experts_per_layer
    };
    let eviction = job.eviction.label();
    let prefetch = match (&job.eviction, &job.prefetch) {
        (EvictionSpec::Oracle, _) => "oracle".to_owned(),
        (_, Some(p)) => p.label.clone(),
        (_, None) => "none".to_owned(),
    };
    let policy = match &job.prefetch {
        Some(p) => format!("{eviction}+{}", p.label),
        None => eviction.clone(),
    };
    let fallbacks = r.eviction_stats.as_ref().map_or(0, |s| s.fallbacks)
        + r.prefetch_stats.as_ref().map_or(0, |s| s.fallbacks);
    Row {
        trace: s.name.clone(),
        held_out: false,
        policy,
        eviction,
        prefetch,
        capacity: job.capacity,
        capacity_given: cfg
            .capacities
            .iter()
            .find(|c| c.slots(pool) == job.capacity)
            .map_or_else(|| job.capacity.to_string(), Capacity::label),
        pool_experts: pool,
        resident_fraction: job.capacity as f64 / pool.max(1) as f64,
        per_layer: cfg.per_layer,
        host_capacity: job.host_capacity,
        accesses: c.accesses,
        hits: c.hits,
        misses: c.misses,
        hit_rate: ratio(c.hits, c.accesses),
        belady_hit_rate: 0.0,
        vs_belady: 0.0,
        streamed: c.streamed,
        evictions: c.evictions,
        host_hits: c.host_hits,
        host_misses: c.host_misses,
        prefetch_issued: c.prefetch_issued,
        prefetch_used: c.prefetch_used,
        prefetch_wasted: c.prefetch_wasted,
        expert_bytes: eb,
        bytes_moved: cost.bytes_moved,
        disk_bytes: cost.disk_bytes,
        tokens: s.tokens,
        stall_ms_per_token: cost.stall_ms_per_token,
        tokens_per_s_ceiling: cost.tokens_per_s,
        link: cfg.link.name.clone(),
        policy_fallbacks: fallbacks,
        counters: c.clone(),
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Fills `belady_hit_rate` and `vs_belady` from the Belady row of the same trace and capacity.
fn fill_belady(rows: &mut [Row], jobs: &[Job]) {
    let bounds: Vec<(usize, u32, f64)> = jobs
        .iter()
        .zip(rows.iter())
        .filter(|(j, _)| matches!(j.eviction, EvictionSpec::Belady))
        .map(|(j, r)| (j.trace, j.capacity, r.hit_rate))
        .collect();
    for (r, j) in rows.iter_mut().zip(jobs) {
        if let Some(&(_, _, b)) = bounds
            .iter()
            .find(|(t, c, _)| *t == j.trace && *c == j.capacity)
        {
            r.belady_hit_rate = b;
            r.vs_belady = if b > 0.0 {
                r.hit_rate / b
            } else if r.hit_rate == 0.0 {
                1.0
            } else {
                f64::INFINITY
            };
        }
    }
}

fn progress_bar(n: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(n);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "replay {bar:40} {pos}/{len} combinations, {elapsed} elapsed, ~{eta} left",
        )
        .expect("a valid template"),
    );
    bar
}
