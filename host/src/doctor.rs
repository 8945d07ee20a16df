//! `moehost doctor`: what this machine offers a Kimi-K2 deployment, measured.
//!
//! Owns: the measurements (CPU matmul throughput, memory bandwidth, FP8 dequantization rate,
//! the model folder's read bandwidth; with the `cuda` feature and a driver: the device, driver
//! version, free memory, host -> device bandwidth from pinned and from pageable memory through
//! the transfer scheduler's own copy engine, and a copy verified byte for byte) and the
//! projection: `plan` for Kimi-K2 on these figures, and where placement's cost model switches
//! from computing on the CPU to fetching. Without a GPU it says so and measures the CPU.
//! Does not own: the projection's arithmetic (`plan`, `policy::costs`).

use anyhow::Result;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

use crate::experts::ExpertBytes;
use crate::hardware::Link;
use crate::model::config::ModelConfig;
use crate::plan::{plan, Plan, PlanOptions};
use crate::policy::{LinkCosts, Tier};
use crate::weights::format::WeightFormat;

/// Kimi-K2's config.json (the model the projection is for).
const KIMI_K2_CONFIG: &str = include_str!("../../tests/data/kimi-k2-config.json");

#[derive(Debug, Clone, Serialize)]
pub struct Cpu {
    pub threads: usize,
    /// f32 GEMM (256 x 2048 x 2048) through the engine's own kernels.
    pub matmul_gflops: f64,
    /// Large parallel memcpy, GB/s (read + write counted once).
    pub memory_gbps: f64,
    /// Every thread summing its share of a 512 MiB buffer: the read bandwidth a kernel that
    /// only reads (a decode step's experts) can reach.
    pub memory_read_gbps: f64,
    /// FP8 (128 x 128 blocks) -> f32 dequantization, GB of FP8 per second.
    pub fp8_dequant_gbps: f64,
    /// A MoE layer step of `LAYER_STEP_EXPERTS` distinct Kimi-K2-shaped FP8 experts at one
    /// token each, computed on the CPU from their storage format (the host tier's experts
    /// that placement leaves there), in parallel as the MoE runs them: seconds, and GB of
    /// weights per second.
    pub k2_layer_step_s: f64,
    pub k2_expert_gbps: f64,
    /// The same layer step with Kimi-K2-Thinking's INT4 experts (compressed-tensors packed
    /// INT4, a scale per 32 columns), from their storage format.
    pub k2_int4_layer_step_s: f64,
    pub k2_int4_expert_gbps: f64,
    /// The same layer step with moehost's int8 experts and with bf16 experts (the other
    /// formats placement may leave on the host), GB of weights per second.
    pub k2_int8_expert_gbps: f64,
    pub k2_bf16_expert_gbps: f64,
    /// Total RAM from /proc/meminfo.
    pub ram_bytes: Option<u64>,
    /// The NUMA nodes (Linux's /sys/devices/system/node): each node's CPUs and memory. On more
    /// than one, a CPU reading another node's memory gets a fraction of its bandwidth.
    pub numa_nodes: Vec<NumaNode>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NumaNode {
    pub id: u32,
    /// As the kernel lists them (`0-15,32-47`).
    pub cpus: String,
    pub mem_bytes: Option<u64>,
}

/// The NUMA nodes with CPUs or memory, from sysfs (none where it is absent).
fn numa_nodes() -> Vec<NumaNode> {
    let Ok(dir) = std::fs::read_dir("/sys/devices/system/node") else {
        return Vec::new();
    };
    let mut nodes: Vec<NumaNode> = dir
        .filter_map(|e| {
            let e = e.ok()?;
            let id = e.file_name().to_str()?.strip_prefix("node")?.parse().ok()?;
            let read = |f: &str| std::fs::read_to_string(e.path().join(f)).ok();
            let mem_bytes = read("meminfo").and_then(|m| {
                let l = m.lines().find(|l| l.contains("MemTotal:"))?;
                Some(l.split_whitespace().rev().nth(1)?.parse::<u64>().ok()? * 1024)
            });
            Some(NumaNode {
                id,
                cpus: read("cpulist").unwrap_or_default().trim().to_owned(),
                mem_bytes,
            })
        })
        .collect();
    nodes.sort_by_key(|n| n.id);
    nodes
}

#[derive(Debug, Clone, Serialize)]
pub struct Disk {
    pub path: String,
    pub bytes: u64,
    /// Includes the page cache when the files were read recently.
    pub read_gbps: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Gpu {
    pub name: String,
    pub devices: i32,
    pub driver_version: i32,
    pub compute_capability: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// 64 MiB copies on the dedicated copy stream.
    pub h2d_pinned_gbps: f64,
    pub h2d_pageable_gbps: f64,
    /// A copy through the transfer scheduler read back byte for byte.
    pub copy_verified: bool,
    /// One Kimi-K2-shaped FP8 expert through moehost's exact kernels, against the device's
    /// own copy bandwidth; or why it could not be measured.
    pub k2_expert: std::result::Result<ExpertSpeed, String>,
}

pub use crate::hardware::ExpertSpeed;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub cpu: Cpu,
    pub disk: Disk,
    /// Why there is no GPU, when there is none.
    pub gpu: std::result::Result<Gpu, String>,
    /// Whether this build has the `cuda` feature.
    pub cuda_feature: bool,
    /// Figures the projection used for the link and device: measured, or the h100-pcie5 preset.
    pub link_basis: String,
    pub kimi_k2: Plan,
    /// Tokens per expert per step from which fetching beats computing on the CPU.
    pub fetch_pays_from_tokens: Option<u32>,
}

fn gbps(bytes: f64, secs: f64) -> f64 {
    bytes / secs.max(1e-9) / 1e9
}

/// Distinct experts in a Kimi-K2 MoE layer step: 8 routed and the shared one.
pub const LAYER_STEP_EXPERTS: usize = 9;

/// A Kimi-K2 MoE layer step's distinct experts, pseudo-random FP8 at K2's shape: what both
/// the CPU and the GPU measurements time (built once, ~400 MB).
fn k2_layer_step(k2: &ModelConfig) -> Vec<ExpertBytes> {
    let mut state = 0x9e37_79b9_u32;
    (0..LAYER_STEP_EXPERTS)
        .map(|_| ExpertBytes::synthetic_fp8(k2.hidden_size, k2.moe_intermediate_size, &mut state))
        .collect()
}

/// A layer step of experts (hidden size `h`) on the CPU from their storage format, as the MoE
/// runs them (one task per expert): seconds per step and weight GB/s.
fn measure_cpu_experts(experts: &[ExpertBytes], h: usize) -> (f64, f64) {
    use rayon::prelude::*;
    let bytes: usize = experts.iter().map(|e| e.storage_bytes()).sum();
    let x: Vec<f32> = (0..h).map(|v| (v % 97) as f32 / 97.0 - 0.5).collect();
    let step = || {
        experts.par_iter().for_each(|e| {
            let mut out = vec![0f32; h];
            crate::kernels::as_task(|| e.forward(&x, h, &mut out)).expect("a synthetic expert");
        })
    };
    step(); // warm up
    let reps = 3;
    let t0 = Instant::now();
    for _ in 0..reps {
        step();
    }
    let s = t0.elapsed().as_secs_f64() / reps as f64;
    (s, gbps(bytes as f64, s))
}

fn measure_cpu(k2_experts: &[ExpertBytes], hidden: usize) -> Cpu {
    let (t, n, k) = (256usize, 2048usize, 2048usize);
    let x: Vec<f32> = (0..t * k).map(|i| (i % 97) as f32 / 97.0).collect();
    let w: Vec<f32> = (0..n * k).map(|i| (i % 89) as f32 / 89.0).collect();
    let mut out = vec![0f32; t * n];
    crate::kernels::linear(&x, &w, k, &mut out); // warm up
    let reps = 3;
    let t0 = Instant::now();
    for _ in 0..reps {
        crate::kernels::linear(&x, &w, k, &mut out);
    }
    let matmul_gflops = (2 * t * n * k * reps) as f64 / t0.elapsed().as_secs_f64() / 1e9;

    // Every thread copying its share, as the CPU experts read their weights.
    use rayon::prelude::*;
    let src = vec![1u8; 512 << 20];
    let mut dst = vec![0u8; 512 << 20];
    let copy = |dst: &mut [u8]| {
        dst.par_chunks_mut(4 << 20)
            .zip(src.par_chunks(4 << 20))
            .for_each(|(d, s)| d.copy_from_slice(s))
    };
    copy(&mut dst);
    let t0 = Instant::now();
    copy(&mut dst);
    let memory_gbps = gbps(src.len() as f64, t0.elapsed().as_secs_f64());
    std::hint::black_box(&dst);
    let sum = || crate::bench::experts::read_sum(&[&src[..]]);
    std::hint::black_box(sum());
    let t0 = Instant::now();
    std::hint::black_box(sum());
    let memory_read_gbps = gbps(src.len() as f64, t0.elapsed().as_secs_f64());

    // One Kimi-K2 projection: [2048, 7168] FP8 with 128x128 block scales.
    let (rows, cols) = (2048usize, 7168usize);
    let fp8: Vec<u8> = (0..rows * cols).map(|i| (i % 251) as u8 & 0x7e).collect();
    let scales = vec![0.01f32; rows.div_ceil(128) * cols.div_ceil(128)];
    let mut f = vec![0f32; rows * cols];
    f.fill(1.0); // fault the pages in first: the rate is the decoder's, not the kernel's
    let t0 = Instant::now();
    crate::weights::fp8::dequantize_blocks(&fp8, rows, cols, &scales, [128, 128], &mut f);
    let fp8_dequant_gbps = gbps(fp8.len() as f64, t0.elapsed().as_secs_f64());

    let (k2_layer_step_s, k2_expert_gbps) = measure_cpu_experts(k2_experts, hidden);
    // The other formats, one at a time (a bf16 layer step is ~0.8 GB).
    let other = |format| {
        let inter = k2_experts[0].tensors[0].rows();
        let mut state = 0x2545_f491_u32;
        let experts: Vec<ExpertBytes> = (0..k2_experts.len())
            .map(|_| ExpertBytes::synthetic(format, hidden, inter, &mut state))
            .collect();
        measure_cpu_experts(&experts, hidden)
    };
    let (k2_int4_layer_step_s, k2_int4_expert_gbps) = other(WeightFormat::Int4);
    let k2_int8_expert_gbps = other(WeightFormat::Int8).1;
    let k2_bf16_expert_gbps = other(WeightFormat::Bf16).1;

    let ram_bytes = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    Cpu {
        threads: rayon::current_num_threads(),
        matmul_gflops,
        memory_gbps,
        memory_read_gbps,
        fp8_dequant_gbps,
        k2_layer_step_s,
        k2_expert_gbps,
        k2_int4_layer_step_s,
        k2_int4_expert_gbps,
        k2_int8_expert_gbps,
        k2_bf16_expert_gbps,
        ram_bytes,
        numa_nodes: numa_nodes(),
    }
}

fn measure_disk(dir: &Path) -> Result<Disk> {
    use std::io::Read;
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    anyhow::ensure!(
        !files.is_empty(),
        "no .safetensors files in {}",
        dir.display()
    );
    let mut buf = vec![0u8; 8 << 20];
    let mut bytes = 0u64;
    let t0 = Instant::now();
    for f in &files {
        let mut file = std::fs::File::open(f)?;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
        }
    }
    Ok(Disk {
        path: dir.display().to_string(),
        bytes,
        read_gbps: gbps(bytes as f64, t0.elapsed().as_secs_f64()),
    })
}

#[cfg(feature = "cuda")]
fn measure_gpu(k2_experts: &[ExpertBytes], hidden: usize) -> std::result::Result<Gpu, String> {
    use crate::transfer::cuda::{probe, CudaCopyEngine};
    use crate::transfer::{measure_bandwidth, CopyEngine, TransferScheduler};
    let (ctx, info) = probe()?;
    let slot = 64usize << 20;
    let bandwidth = |pinned: bool| -> Result<f64> {
        let e = CudaCopyEngine::new(ctx.clone(), slot, 2, 2, pinned)?;
        measure_bandwidth(&e, 2)?; // warm up
        measure_bandwidth(&e, 16)
    };
    let err = |e: anyhow::Error| format!("{e:#}");
    let pinned = bandwidth(true).map_err(err)?;
    let pageable = bandwidth(false).map_err(err)?;
    let verified = (|| -> Result<bool> {
        let e = CudaCopyEngine::new(ctx.clone(), 1 << 20, 2, 2, true)?;
        let pattern: Vec<u8> = (0..1 << 20).map(|i: usize| (i * 131 + 7) as u8).collect();
        e.stage(1, &[&pattern])?;
        let sched = TransferScheduler::new(e, 2);
        let key = crate::policy::ExpertKey {
            layer: 0,
            expert: 1,
        };
        let pinned = sched.demand(key, 1)?;
        Ok(sched.engine().read_device(pinned.slot)? == pattern)
    })()
    .map_err(err)?;
    Ok(Gpu {
        name: info.name,
        devices: info.devices,
        driver_version: info.driver_version,
        compute_capability: format!(
            "{}.{}",
            info.compute_capability.0, info.compute_capability.1
        ),
        total_bytes: info.total_bytes as u64,
        free_bytes: info.free_bytes as u64,
        h2d_pinned_gbps: pinned / 1e9,
        h2d_pageable_gbps: pageable / 1e9,
        copy_verified: verified,
        k2_expert: crate::gpu::gpu()
            .and_then(|g| crate::gpu::measure_expert(&g, k2_experts, hidden).map_err(err)),
    })
}

#[cfg(not(feature = "cuda"))]
fn measure_gpu(_: &[ExpertBytes], _: usize) -> std::result::Result<Gpu, String> {
    Err("this moehost was built without the `cuda` feature (cargo build --features cuda)".into())
}

/// Measures this machine; `model` is the folder whose read bandwidth stands for the disk tier.
pub fn run(model: &Path) -> Result<Report> {
    let k2 = ModelConfig::from_json(KIMI_K2_CONFIG)?;
    let k2_experts = k2_layer_step(&k2);
    let cpu = measure_cpu(&k2_experts, k2.hidden_size);
    let disk = measure_disk(model)?;
    let gpu = measure_gpu(&k2_experts, k2.hidden_size);
    drop(k2_experts);
    let mut link = Link::default();
    let mut device_bytes = 80u64 << 30;
    let link_basis = match &gpu {
        Ok(g) => {
            link.h2d_gbps = g.h2d_pinned_gbps;
            device_bytes = g.free_bytes;
            format!(
                "measured: {} ({} GiB free), pinned host->device {:.1} GB/s",
                g.name,
                g.free_bytes >> 30,
                g.h2d_pinned_gbps
            )
        }
        Err(_) => "no GPU here: an H100 80 GiB with the h100-pcie5 preset (54.8 GB/s)".into(),
    };
    link.disk_gbps = disk.read_gbps;
    let host_bytes = cpu.ram_bytes.map_or(1 << 40, |r| r / 10 * 9);
    let kimi_k2 = plan(
        &k2,
        &PlanOptions {
            device_bytes,
            host_bytes,
            link: link.clone(),
            context: 8192,
            batch: 1,
            experts: None,
            reserve_bytes: 4 << 30,
            hit_rate: None,
            // This host, measured: its FP8 expert rate per thread (Kimi-K2's experts are FP8).
            cpu: Some(crate::plan::HostCpu {
                basis: "measured".into(),
                read_gbps: cpu.memory_read_gbps,
                cores: cpu.threads,
                core_gbps: Some(cpu.k2_expert_gbps / cpu.threads.max(1) as f64),
                gflops: cpu.matmul_gflops,
            }),
            prompt_tokens: 8192,
        },
    )?;
    let mut costs = LinkCosts::preset("h100-pcie5", k2.hidden_size, k2.moe_intermediate_size)?;
    costs.link_bytes_per_second = link.h2d_gbps * 1e9;
    costs.host_flops = cpu.matmul_gflops * 1e9;
    // The CPU computes an expert no faster than it was measured to, nor than memory allows.
    costs.host_memory_bytes_per_second = cpu.memory_read_gbps.min(cpu.k2_expert_gbps) * 1e9;
    let bytes = kimi_k2.expert_bytes;
    let fetch_pays_from_tokens = (1..=4096)
        .find(|&t| costs.fetch_seconds(t, bytes) <= costs.host_seconds(t, bytes, Tier::Host));
    Ok(Report {
        cpu,
        disk,
        gpu,
        cuda_feature: cfg!(feature = "cuda"),
        link_basis,
        kimi_k2,
        fetch_pays_from_tokens,
    })
}

impl Report {
    /// The CPU's measured rates of computing experts from their storage format, as placement
    /// reads them (`--host-profile`): Kimi-K2-shaped layer steps in each expert format.
    pub fn host_profile(&self) -> crate::hardware::HostProfile {
        crate::hardware::HostProfile {
            version: crate::hardware::HostProfile::VERSION,
            threads: self.cpu.threads,
            cpu_expert_gbps: [
                ("fp8".to_owned(), self.cpu.k2_expert_gbps),
                ("int4".to_owned(), self.cpu.k2_int4_expert_gbps),
                ("int8".to_owned(), self.cpu.k2_int8_expert_gbps),
                ("bf16".to_owned(), self.cpu.k2_bf16_expert_gbps),
            ]
            .into_iter()
            .collect(),
        }
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        let c = &self.cpu;
        s += &format!(
            "CPU: {} threads, f32 matmul {:.1} GFLOP/s, memory {:.1} GB/s copied, {:.1} GB/s read, FP8 dequantization {:.2} GB/s{}\n",
            c.threads,
            c.matmul_gflops,
            c.memory_gbps,
            c.memory_read_gbps,
            c.fp8_dequant_gbps,
            c.ram_bytes.map(|r| format!(", RAM {} GiB", r >> 30)).unwrap_or_default()
        );
        if !c.numa_nodes.is_empty() {
            let nodes: Vec<String> = c
                .numa_nodes
                .iter()
                .map(|n| {
                    let mem = n.mem_bytes.map(|b| format!(", {} GiB", b >> 30));
                    format!("node {} (CPUs {}{})", n.id, n.cpus, mem.unwrap_or_default())
                })
                .collect();
            s += &format!(
                "NUMA: {}{}\n",
                nodes.join("; "),
                if nodes.len() > 1 {
                    " (moehost does not place experts by node yet: each is read from wherever \
                     its pages lie)"
                } else {
                    ""
                }
            );
        }
        s += &format!(
            "CPU experts: a Kimi-K2 FP8 layer step ({LAYER_STEP_EXPERTS} experts at 1 token, from their storage format) in {:.1} ms, {:.2} GB/s of weights ({:.2} of the read rate)\n",
            c.k2_layer_step_s * 1e3,
            c.k2_expert_gbps,
            c.k2_expert_gbps / c.memory_read_gbps
        );
        s += &format!(
            "CPU experts: a Kimi-K2-Thinking INT4 layer step (the same, compressed-tensors INT4) in {:.1} ms, {:.2} GB/s of weights ({:.2} of the read rate)\n",
            c.k2_int4_layer_step_s * 1e3,
            c.k2_int4_expert_gbps,
            c.k2_int4_expert_gbps / c.memory_read_gbps
        );
        s += &format!(
            "CPU experts: the same layer step with int8 experts {:.2} GB/s, bf16 {:.2} GB/s\n",
            c.k2_int8_expert_gbps, c.k2_bf16_expert_gbps
        );
        let d = &self.disk;
        s += &format!(
            "Disk: {} ({:.1} MB) read at {:.2} GB/s (the page cache counts if it was read recently)\n",
            d.path,
            d.bytes as f64 / 1e6,
            d.read_gbps
        );
        match &self.gpu {
            Ok(g) => {
                s += &format!(
                    "GPU: {} x{} (compute {}), driver {}.{}, {:.1} of {:.1} GiB free\n",
                    g.name,
                    g.devices,
                    g.compute_capability,
                    g.driver_version / 1000,
                    g.driver_version % 1000 / 10,
                    g.free_bytes as f64 / (1u64 << 30) as f64,
                    g.total_bytes as f64 / (1u64 << 30) as f64
                );
                s += &format!(
                    "Host->device: {:.1} GB/s from pinned memory, {:.1} GB/s from pageable ({:.1}x); scheduler copy verified: {}\n",
                    g.h2d_pinned_gbps,
                    g.h2d_pageable_gbps,
                    g.h2d_pinned_gbps / g.h2d_pageable_gbps.max(1e-9),
                    g.copy_verified
                );
                match &g.k2_expert {
                    Ok(e) => s += &format!(
                        "Kimi-K2 FP8 expert on the GPU (exact kernels): {:.0} us at 1 token ({:.0} GB/s of weights, {:.0}% of the device's {:.0} GB/s copy rate), {:.0} us at 8 tokens; a layer step of {} experts at 1 token: {:.0} us ({:.0} GB/s, {:.0}%)\n",
                        e.one_token_s * 1e6,
                        e.weights_gbps,
                        100.0 * e.weights_gbps / e.dtod_gbps.max(1e-9),
                        e.dtod_gbps,
                        e.eight_tokens_s * 1e6,
                        e.layer_step_experts,
                        e.layer_step_s * 1e6,
                        e.layer_step_gbps,
                        100.0 * e.layer_step_gbps / e.dtod_gbps.max(1e-9),
                    ),
                    Err(why) => s += &format!("Kimi-K2 FP8 expert on the GPU: not measured ({why})\n"),
                }
            }
            Err(why) => s += &format!("GPU: none ({why}); everything runs on the CPU\n"),
        }
        s += &format!("\nKimi-K2 on this machine ({}):\n", self.link_basis);
        s += &self.kimi_k2.summary();
        match self.fetch_pays_from_tokens {
            Some(1) => s += "\nPlacement (cost model on these figures): fetching beats computing on the CPU from one token on (the CPU reads an expert slower than the link moves it).\n",
            Some(t) => s += &format!(
                "\nPlacement (cost model on these figures): an expert with fewer than {t} tokens in a step is computed on the CPU; from {t} tokens it is fetched.\n"
            ),
            None => s += "\nPlacement: computing on the CPU beats fetching at every batch size on these figures.\n",
        }
        s
    }
}
