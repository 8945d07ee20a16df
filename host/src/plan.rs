//! `moehost plan`: the memory layout and expected decode figures of a model on a machine, from
//! its `config.json` alone (no weights needed), for models too large for this one: Kimi-K2 on
//! one H100 is 12 GB of always-resident weights and 23,040 FP8 experts of 44 MB.
//!
//! Two models of a decoded token, both memory-bound:
//! - streaming (the replay lab's, `replay::cost`): the bytes read from device memory at HBM
//!   bandwidth, plus every missed expert's transfer at the link's bandwidth (and a disk read
//!   when the host tier does not hold it);
//! - hybrid: the CPU computes the missed experts where they lie (`stored_dot`), at
//!   `min(read bandwidth, cores x a core's kernel rate)`, while the GPU computes its hits and
//!   the shared expert; a MoE layer step costs the slower side. Prefill of a prompt runs each
//!   layer's missed experts on the CPU (compute-bound: FLOPs over the CPU's GEMM rate) or
//!   streams them to the GPU (the link), whichever is faster.
//!
//! Without a measured hit rate, routing is taken as uniform (hit rate = the device tier's share
//! of experts); pass one measured by `moehost replay` on real traces (`--hit-rate`). Figures are
//! ceilings: attention arithmetic and kernel launches are left out.

use anyhow::{ensure, Result};
use serde::Serialize;

use crate::hardware::{Link, Machine};
use crate::model::config::ModelConfig;
use crate::weights::format::WeightFormat;

#[derive(Debug, Clone)]
pub struct PlanOptions {
    pub device_bytes: u64,
    pub host_bytes: u64,
    pub link: Link,
    /// Tokens of context per sequence the KV cache must hold.
    pub context: usize,
    /// Sequences decoded together.
    pub batch: usize,
    /// Default: int4 for compressed-tensors INT4 (Kimi-K2-Thinking), FP8 for an FP8
    /// quantization_config, else bf16.
    pub experts: Option<WeightFormat>,
    /// Device memory kept for activations and workspace.
    pub reserve_bytes: u64,
    /// Device-tier hit rate to assume (default: the device tier's share of experts).
    pub hit_rate: Option<f64>,
    /// The host CPU of the hybrid path (default: the `link` preset's host).
    pub cpu: Option<HostCpu>,
    /// Prompt length the prefill figure is for.
    pub prompt_tokens: usize,
}

/// The host CPU that computes the experts the device tier does not hold.
#[derive(Debug, Clone, Serialize)]
pub struct HostCpu {
    /// Where the figures come from (a preset's name, or "measured").
    pub basis: String,
    /// Read-only memory bandwidth, GB/s.
    pub read_gbps: f64,
    pub cores: usize,
    /// GB of weights per second one core's kernels compute a decode step's experts at, for
    /// the expert format (default: `hardware::cpu_core_expert_gbps`).
    pub core_gbps: Option<f64>,
    /// f32 GEMM rate (a prefill's experts), GFLOP/s.
    pub gflops: f64,
}

impl HostCpu {
    /// The host of preset `m`.
    pub fn of(m: &Machine) -> Self {
        HostCpu {
            basis: m.name.to_owned(),
            read_gbps: m.host_memory_bytes_per_second / 1e9,
            cores: m.host_cores,
            core_gbps: None,
            gflops: m.host_flops / 1e9,
        }
    }
}

/// The hybrid path's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Hybrid {
    pub cpu: HostCpu,
    /// The CPU's expert rate: `min(read_gbps, cores x core_gbps)`, GB/s of weights.
    pub cpu_expert_gbps: f64,
    /// Per decode step: the GPU's serial part (attention, dense layers, head, KV cache), its
    /// side of the MoE steps (hits and shared experts), the CPU's side (the misses), the
    /// layers' hand-offs (two link latencies per MoE layer), the disk.
    pub serial_ms: f64,
    pub gpu_moe_ms: f64,
    pub cpu_moe_ms: f64,
    pub sync_ms: f64,
    pub disk_ms: f64,
    /// `batch / (serial + max(gpu_moe, cpu_moe) + sync + disk)`.
    pub tokens_per_s: f64,
    pub prefill: Prefill,
}

/// A prompt's prefill on the hybrid path, per MoE layer: its missed experts on the CPU
/// (`max(FLOPs / CPU rate, bytes / CPU expert rate)`) or streamed to the GPU (`bytes / link`,
/// double-buffered behind the GPU's compute), whichever is faster; either way after reading
/// those only on disk.
#[derive(Debug, Clone, Serialize)]
pub struct Prefill {
    pub tokens: usize,
    pub cpu_layer_ms: f64,
    pub stream_layer_ms: f64,
    /// "cpu" or "stream".
    pub path: &'static str,
    /// The GPU's dense work for the prompt (non-expert weights, hits).
    pub gpu_ms: f64,
    pub tokens_per_s: f64,
    /// Prompt length from which streaming the layers beats the CPU (none below 2^20).
    pub stream_from_tokens: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub params: Params,
    pub expert_format: WeightFormat,
    /// One routed expert in its storage format (scales included).
    pub expert_bytes: u64,
    /// Every always-resident weight: embeddings, attention, dense layers, shared experts,
    /// routers, norms (linear weights in FP8 when the checkpoint is FP8).
    pub resident_bytes: u64,
    /// KV cache (MLA latent + rope key, f32) per token, and for `context x batch` tokens.
    pub kv_bytes_per_token: u64,
    pub kv_cache_bytes: u64,
    pub device: Tier,
    pub host: Tier,
    /// Experts only on disk.
    pub disk_experts: u64,
    pub per_token: PerToken,
    pub hybrid: Hybrid,
}

#[derive(Debug, Clone, Serialize)]
pub struct Params {
    pub total: u64,
    pub routed_experts: u64,
    pub always_resident: u64,
    /// Read per decoded token at batch 1.
    pub active: u64,
    pub experts: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Tier {
    pub budget_bytes: u64,
    /// Budget left for routed experts.
    pub expert_bytes: u64,
    pub expert_slots: u64,
    /// Share of all routed experts.
    pub share: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PerToken {
    /// Expert accesses per decode step (`moe_layers x top_k` per sequence, at most every
    /// expert of a layer).
    pub expert_accesses: f64,
    pub hit_rate: f64,
    /// Device-memory bytes read per step (resident weights + accessed experts + KV cache).
    pub hbm_bytes: f64,
    /// Bytes moved host -> device (misses found in the host tier) and disk -> device per step.
    pub link_bytes: f64,
    pub disk_bytes: f64,
    pub hbm_ms: f64,
    pub link_ms: f64,
    pub disk_ms: f64,
    /// Decoded tokens per second, all sequences together: with everything resident, and with
    /// the misses.
    pub tokens_per_s_all_resident: f64,
    pub tokens_per_s: f64,
}

pub fn plan(cfg: &ModelConfig, opts: &PlanOptions) -> Result<Plan> {
    let h = cfg.hidden_size as u64;
    let moe = cfg.moe_layers().len() as u64;
    let dense = cfg.num_hidden_layers as u64 - moe;
    let e = cfg.n_routed_experts as u64;
    let mi = cfg.moe_intermediate_size as u64;
    let nh = cfg.num_attention_heads as u64;
    let (nope, rope, v, lora) = (
        cfg.qk_nope_head_dim as u64,
        cfg.qk_rope_head_dim as u64,
        cfg.v_head_dim as u64,
        cfg.kv_lora_rank as u64,
    );
    let qk = nope + rope;
    let fp8 = cfg.fp8_block.is_some();
    let format = opts.experts.unwrap_or(if cfg.packed_int4 {
        // compressed-tensors INT4 (Kimi-K2-Thinking): 4 bits and a bf16 scale per 32 columns.
        WeightFormat::Int4
    } else if fp8 {
        WeightFormat::Fp8
    } else {
        WeightFormat::Bf16
    });

    // Linear weights as (rows, cols); everything else (norms, bias) is small and bf16.
    let attn: Vec<(u64, u64)> = {
        let mut w = match cfg.q_lora_rank {
            Some(r) => vec![(r as u64, h), (nh * qk, r as u64)],
            None => vec![(nh * qk, h)],
        };
        w.extend([(lora + rope, h), (nh * (nope + v), lora), (h, nh * v)]);
        w
    };
    let ffn = |i: u64| vec![(i, h), (i, h), (h, i)];
    let mut linears: Vec<(u64, u64)> = Vec::new();
    for _ in 0..cfg.num_hidden_layers {
        linears.extend(&attn);
    }
    for _ in 0..dense {
        linears.extend(ffn(cfg.intermediate_size as u64));
    }
    for _ in 0..moe {
        linears.extend(ffn(mi * cfg.n_shared_experts as u64));
    }
    let embed = cfg.vocab_size as u64 * h;
    let heads = if cfg.tie_word_embeddings { 1 } else { 2 };
    let router = moe * e * h;
    let norms = cfg.num_hidden_layers as u64 * (2 * h + lora + cfg.q_lora_rank.unwrap_or(0) as u64)
        + h
        + moe * e;
    let linear_params: u64 = linears.iter().map(|(r, c)| r * c).sum();
    let always = linear_params + heads * embed + router + norms;
    let expert_params = 3 * h * mi;
    let routed = moe * e * expert_params;

    let block = cfg.fp8_block.unwrap_or([128, 128]);
    let resident_format = if fp8 {
        WeightFormat::Fp8
    } else {
        WeightFormat::Bf16
    };
    let resident_linear: u64 = linears
        .iter()
        .map(|&(r, c)| resident_format.stored_bytes(r, c, block))
        .sum();
    let resident_bytes = resident_linear + 2 * (heads * embed + router + norms);
    let expert_bytes = ffn(mi)
        .into_iter()
        .map(|(r, c)| format.stored_bytes(r, c, block))
        .sum::<u64>();

    // moehost's cache holds f32 (on the CPU and in GPU memory): the latent and the rope key.
    let kv_bytes_per_token = cfg.num_hidden_layers as u64 * (lora + rope) * 4;
    let kv_cache_bytes = kv_bytes_per_token * (opts.context * opts.batch) as u64;
    let fixed = resident_bytes + kv_cache_bytes + opts.reserve_bytes;
    ensure!(
        opts.device_bytes >= fixed,
        "the device budget ({:.1} GiB) does not hold the always-resident weights ({:.1} GiB), \
         the KV cache for {} x {} tokens ({:.1} GiB) and the {:.1} GiB reserve",
        gib(opts.device_bytes),
        gib(resident_bytes),
        opts.batch,
        opts.context,
        gib(kv_cache_bytes),
        gib(opts.reserve_bytes)
    );
    let all = moe * e;
    let device_room = opts.device_bytes - fixed;
    let device_slots = (device_room / expert_bytes).min(all);
    let host_slots = (opts.host_bytes / expert_bytes).min(all);
    let tier = |budget: u64, room: u64, slots: u64| Tier {
        budget_bytes: budget,
        expert_bytes: room,
        expert_slots: slots,
        share: slots as f64 / all.max(1) as f64,
    };
    let device = tier(opts.device_bytes, device_room, device_slots);
    let host = tier(opts.host_bytes, opts.host_bytes, host_slots);
    // Experts not on the device live in host RAM first, the rest on disk.
    let off_device = all - device_slots;
    let in_host = host_slots.min(off_device);
    let disk_experts = off_device - in_host;

    let k = cfg.num_experts_per_tok as f64;
    let per_layer = (k * opts.batch as f64).min(e as f64);
    let accesses = moe as f64 * per_layer;
    let hit = opts.hit_rate.unwrap_or(device.share).clamp(0.0, 1.0);
    let misses = accesses * (1.0 - hit);
    let host_share = if off_device == 0 {
        1.0
    } else {
        in_host as f64 / off_device as f64
    };
    let hbm_bytes = resident_bytes as f64
        + accesses * expert_bytes as f64
        + (kv_bytes_per_token * (opts.context * opts.batch) as u64) as f64;
    let link_bytes = misses * expert_bytes as f64;
    let disk_bytes = misses * (1.0 - host_share) * expert_bytes as f64;
    let ms = |bytes: f64, gbps: f64| bytes / (gbps * 1e9) * 1e3;
    let (hbm_ms, link_ms, disk_ms) = (
        ms(hbm_bytes, opts.link.hbm_gbps),
        ms(link_bytes, opts.link.h2d_gbps),
        ms(disk_bytes, opts.link.disk_gbps),
    );
    let per_s = |ms: f64| opts.batch as f64 / (ms / 1e3);

    // The hybrid path.
    let machine = crate::hardware::preset(&opts.link.name).unwrap_or(&crate::hardware::PRESETS[1]);
    let cpu = opts.cpu.clone().unwrap_or_else(|| HostCpu::of(machine));
    let core_gbps = cpu
        .core_gbps
        .unwrap_or_else(|| crate::hardware::cpu_core_expert_gbps(format));
    let cpu_expert_gbps = (cpu.cores as f64 * core_gbps).min(cpu.read_gbps);
    let shared_bytes: u64 = moe
        * ffn(mi * cfg.n_shared_experts as u64)
            .into_iter()
            .map(|(r, c)| resident_format.stored_bytes(r, c, block))
            .sum::<u64>();
    let kv_read = (kv_bytes_per_token * (opts.context * opts.batch) as u64) as f64;
    let serial_ms = ms(
        (resident_bytes - shared_bytes) as f64 + kv_read,
        opts.link.hbm_gbps,
    );
    let gpu_moe_ms = ms(
        accesses * hit * expert_bytes as f64 + shared_bytes as f64,
        opts.link.hbm_gbps,
    );
    let cpu_moe_ms = ms(misses * expert_bytes as f64, cpu_expert_gbps);
    let sync_ms = moe as f64 * 2.0 * machine.link_latency_seconds * 1e3;
    let hybrid_ms = serial_ms + gpu_moe_ms.max(cpu_moe_ms) + sync_ms + disk_ms;

    // Prefill: per MoE layer, the missed experts' tokens on the CPU or the layer streamed.
    let off = 1.0 - device.share;
    let expert_flops = 2.0 * expert_params as f64;
    // Either way, the missed experts only on disk are read first.
    let disk_layer_ms = |touched: f64| {
        ms(
            touched * (1.0 - host_share) * expert_bytes as f64,
            opts.link.disk_gbps,
        )
    };
    let cpu_layer_ms = |p: usize| {
        let routed = p as f64 * k;
        let touched = routed.min(e as f64) * off;
        let flops_ms = routed * off * expert_flops / (cpu.gflops * 1e9) * 1e3;
        flops_ms.max(ms(touched * expert_bytes as f64, cpu_expert_gbps)) + disk_layer_ms(touched)
    };
    let stream_layer_ms = |p: usize| {
        let touched = (p as f64 * k).min(e as f64) * off;
        let gpu_ms = p as f64 * k * off * expert_flops / machine.device_flops * 1e3;
        ms(touched * expert_bytes as f64, opts.link.h2d_gbps).max(gpu_ms) + disk_layer_ms(touched)
    };
    let p = opts.prompt_tokens.max(1);
    let (cpu_l, stream_l) = (cpu_layer_ms(p), stream_layer_ms(p));
    // The GPU's share: 2 FLOPs per always-resident weight and per device-held expert weight
    // a token uses.
    let gpu_prefill_ms =
        p as f64 * 2.0 * (always as f64 + moe as f64 * k * (1.0 - off) * expert_params as f64)
            / machine.device_flops
            * 1e3;
    let prefill_ms = moe as f64 * cpu_l.min(stream_l) + gpu_prefill_ms;
    let stream_from_tokens = {
        let pays = |p: usize| stream_layer_ms(p) < cpu_layer_ms(p);
        let (mut lo, mut hi) = (1usize, 1 << 20);
        if pays(lo) {
            Some(1)
        } else if !pays(hi) {
            None
        } else {
            // Smallest p that pays: the CPU's cost grows with p, streaming's barely.
            while hi - lo > 1 {
                let mid = (lo + hi) / 2;
                if pays(mid) {
                    hi = mid
                } else {
                    lo = mid
                }
            }
            Some(hi)
        }
    };
    let hybrid = Hybrid {
        cpu: HostCpu {
            core_gbps: Some(core_gbps),
            ..cpu
        },
        cpu_expert_gbps,
        serial_ms,
        gpu_moe_ms,
        cpu_moe_ms,
        sync_ms,
        disk_ms,
        tokens_per_s: per_s(hybrid_ms),
        prefill: Prefill {
            tokens: p,
            cpu_layer_ms: cpu_l,
            stream_layer_ms: stream_l,
            path: if stream_l < cpu_l { "stream" } else { "cpu" },
            gpu_ms: gpu_prefill_ms,
            tokens_per_s: p as f64 / (prefill_ms / 1e3),
            stream_from_tokens,
        },
    };
    Ok(Plan {
        params: Params {
            total: always + routed,
            routed_experts: routed,
            always_resident: always,
            active: always + (moe as f64 * k) as u64 * expert_params,
            experts: all,
        },
        expert_format: format,
        expert_bytes,
        resident_bytes,
        kv_bytes_per_token,
        kv_cache_bytes,
        device,
        host,
        disk_experts,
        per_token: PerToken {
            expert_accesses: accesses,
            hit_rate: hit,
            hbm_bytes,
            link_bytes,
            disk_bytes,
            hbm_ms,
            link_ms,
            disk_ms,
            tokens_per_s_all_resident: per_s(hbm_ms),
            tokens_per_s: per_s(hbm_ms + link_ms + disk_ms),
        },
        hybrid,
    })
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

impl Plan {
    /// A short human-readable summary.
    pub fn summary(&self) -> String {
        let p = &self.per_token;
        let hy = &self.hybrid;
        let pf = &hy.prefill;
        let hybrid = format!(
            "hybrid, the CPU computing the misses ({}: {} cores x {:.1} GB/s, {:.0} GB/s read -> {:.0} GB/s of experts):\n\
             decode {:.1} tokens/s = 1 / (serial {:.1} ms + max(GPU {:.1} ms, CPU {:.1} ms) + hand-offs {:.1} ms + disk {:.1} ms)\n\
             prefill of {} tokens {:.0} tokens/s (per MoE layer: CPU {:.0} ms, streamed to the GPU {:.0} ms: {}); streaming pays from {} tokens",
            hy.cpu.basis,
            hy.cpu.cores,
            hy.cpu.core_gbps.unwrap_or(0.0),
            hy.cpu.read_gbps,
            hy.cpu_expert_gbps,
            hy.tokens_per_s,
            hy.serial_ms,
            hy.gpu_moe_ms,
            hy.cpu_moe_ms,
            hy.sync_ms,
            hy.disk_ms,
            pf.tokens,
            pf.tokens_per_s,
            pf.cpu_layer_ms,
            pf.stream_layer_ms,
            pf.path,
            pf.stream_from_tokens
                .map_or_else(|| "never (below 2^20)".to_owned(), |t| t.to_string()),
        );
        format!(
            "parameters {:.1} B ({:.1} B in routed experts, {:.1} B active per token)\n\
             always resident {:.1} GiB; one expert {:.1} MiB ({:?}); KV cache {:.2} GiB\n\
             device: {} experts ({:.1}% of {}); host: {} experts ({:.1}%); disk only: {}\n\
             per decoded step: {:.0} expert reads, hit rate {:.3}, HBM {:.1} ms, link {:.1} ms, disk {:.1} ms\n\
             streaming the misses: {:.1} tokens/s (all resident: {:.1})\n{}",
            self.params.total as f64 / 1e9,
            self.params.routed_experts as f64 / 1e9,
            self.params.active as f64 / 1e9,
            gib(self.resident_bytes),
            self.expert_bytes as f64 / (1u64 << 20) as f64,
            self.expert_format,
            gib(self.kv_cache_bytes),
            self.device.expert_slots,
            self.device.share * 100.0,
            self.params.experts,
            self.host.expert_slots,
            self.host.share * 100.0,
            self.disk_experts,
            p.expert_accesses,
            p.hit_rate,
            p.hbm_ms,
            p.link_ms,
            p.disk_ms,
            p.tokens_per_s,
            p.tokens_per_s_all_resident,
            hybrid,
        )
    }
}
