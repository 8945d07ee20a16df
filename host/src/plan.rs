//! `moehost plan`: the memory layout and expected decode figures of a model on a machine, from
//! its `config.json` alone (no weights needed), for models too large for this one: Kimi-K2 on
//! one H100 is 12 GB of always-resident weights and 23,040 FP8 experts of 44 MB.
//!
//! The model is the replay lab's (`replay::cost`): decode is memory-bound, so a token costs the
//! bytes it reads from device memory at HBM bandwidth, plus every missed expert's transfer at the
//! link's bandwidth (and a disk read when the host tier does not hold it). Without a measured
//! hit rate, routing is taken as uniform (hit rate = the device tier's share of experts); pass
//! one measured by `moehost replay` on real traces (`--hit-rate`). Figures are ceilings:
//! attention arithmetic, kernel launches and overlap are left out.

use anyhow::{ensure, Result};
use serde::Serialize;

use crate::hardware::Link;
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
    })
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

impl Plan {
    /// A short human-readable summary.
    pub fn summary(&self) -> String {
        let p = &self.per_token;
        format!(
            "parameters {:.1} B ({:.1} B in routed experts, {:.1} B active per token)\n\
             always resident {:.1} GiB; one expert {:.1} MiB ({:?}); KV cache {:.2} GiB\n\
             device: {} experts ({:.1}% of {}); host: {} experts ({:.1}%); disk only: {}\n\
             per decoded step: {:.0} expert reads, hit rate {:.3}, HBM {:.1} ms, link {:.1} ms, disk {:.1} ms\n\
             ceiling: {:.1} tokens/s (all resident: {:.1})",
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
        )
    }
}
