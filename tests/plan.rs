//! `moehost plan`: Kimi-K2 on one H100 from its config alone, checked against the model's known
//! figures (../shared/design/notes.md), and the planner's expert sizes against the live store.

mod support;

use moehost::plan::{plan, PlanOptions};
use moehost::replay::cost::Link;
use moehost::weights::format::WeightFormat;
use moehost::ModelConfig;
use support::{assert_ok, data_dir, moehost};

fn k2() -> ModelConfig {
    ModelConfig::from_json(
        &std::fs::read_to_string(data_dir().join("kimi-k2-config.json")).unwrap(),
    )
    .unwrap()
}

fn h100(hit_rate: Option<f64>) -> PlanOptions {
    PlanOptions {
        device_bytes: 80 << 30,
        host_bytes: 1 << 40,
        link: Link::preset("h100-pcie5").unwrap(),
        context: 8192,
        batch: 1,
        experts: None,
        reserve_bytes: 4 << 30,
        hit_rate,
        cpu: None,
        prompt_tokens: 8192,
    }
}

#[test]
fn kimi_k2_on_one_h100() {
    let p = plan(&k2(), &h100(None)).unwrap();
    // One FP8 expert with its 128x128 block scales; 23,040 of them; ~1T parameters, ~32B active.
    assert_eq!(p.expert_bytes, 44_050_944);
    assert_eq!(p.params.experts, 23_040);
    assert!(
        (1.0e12..1.05e12).contains(&(p.params.total as f64)),
        "{:?}",
        p.params
    );
    assert!(
        (32e9..34e9).contains(&(p.params.active as f64)),
        "{:?}",
        p.params
    );
    // Always-resident weights in FP8: 12-15 GB; MLA KV cache ~140 KB per token (f32).
    assert!(
        (12e9..15e9).contains(&(p.resident_bytes as f64)),
        "{}",
        p.resident_bytes
    );
    assert_eq!(p.kv_bytes_per_token, 61 * (512 + 64) * 4);
    // ~1,300-1,600 experts on the device (about 6%), all of them in 1 TiB of host RAM.
    assert!(
        (1300..1700).contains(&p.device.expert_slots),
        "{:?}",
        p.device
    );
    assert_eq!((p.host.expert_slots, p.disk_experts), (23_040, 0));
    // Missing (nearly) every expert moves 480 x 44 MB = 21.1 GB per token over 54.8 GB/s:
    // about 2.6 tokens/s; 74% hits give about 10 tokens/s (the link bound, HBM time on top).
    assert_eq!(p.per_token.expert_accesses, 480.0);
    assert!(
        (2.4..2.9).contains(&p.per_token.tokens_per_s),
        "{:?}",
        p.per_token
    );
    let hits = plan(&k2(), &h100(Some(0.74))).unwrap();
    assert!(
        (8.5..10.5).contains(&hits.per_token.tokens_per_s),
        "{:?}",
        hits.per_token
    );
    // int4 experts: about 11% on the device.
    let mut o = h100(None);
    o.experts = Some(WeightFormat::Int4);
    let q = plan(&k2(), &o).unwrap();
    assert!((0.10..0.13).contains(&q.device.share), "{:?}", q.device);
    // A device that cannot hold the resident part is refused, saying why.
    let mut small = h100(None);
    small.device_bytes = 10 << 30;
    let err = plan(&k2(), &small).unwrap_err().to_string();
    assert!(err.contains("always-resident weights"), "{err}");
}

/// Kimi-K2-Thinking: the same architecture with its routed experts in compressed-tensors INT4
/// (4 bits and a bf16 scale per 32 columns) and everything else bf16; the planner reads the
/// format from its quantization_config.
#[test]
fn kimi_k2_thinking_plans_its_int4_experts() {
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data_dir().join("kimi-k2-config.json")).unwrap())
            .unwrap();
    json["quantization_config"] = serde_json::json!({
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": null,
            "weights": {"num_bits": 4, "type": "int", "symmetric": true, "strategy": "group",
                        "group_size": 32, "dynamic": false}}},
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*"]
    });
    let cfg = ModelConfig::from_json(&json.to_string()).unwrap();
    assert!(cfg.packed_int4 && cfg.fp8_block.is_none());
    let p = plan(&cfg, &h100(None)).unwrap();
    assert_eq!(p.expert_format, WeightFormat::Int4);
    // gate and up [2048, 7168], down [7168, 2048]: 4 bits per weight, 2 bytes per 32.
    let one = |r: u64, c: u64| r * c / 2 + r * (c / 32) * 2;
    assert_eq!(p.expert_bytes, 2 * one(2048, 7168) + one(7168, 2048));
    // Non-expert weights are bf16 in this checkpoint, not FP8.
    assert!(p.resident_bytes > plan(&k2(), &h100(None)).unwrap().resident_bytes);
    // Any other compressed-tensors layout is refused, naming the field.
    json["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 128.into();
    let err = format!(
        "{:#}",
        ModelConfig::from_json(&json.to_string()).unwrap_err()
    );
    assert!(err.contains("group_size"), "{err}");
}

#[test]
fn the_planner_sizes_experts_as_the_store_does() {
    use moehost::experts::tiered::StoreConfig;
    let dir = support::bf16_model();
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let budget = 2u64 << 20;
    let mut o = h100(None);
    o.host_bytes = budget;
    let p = plan(&cfg, &o).unwrap();
    assert_eq!(p.expert_bytes, 3 * 256 * 64 * 2);
    let (_, store) = moehost::Engine::open_tiered(
        &dir,
        &StoreConfig {
            host_bytes: Some(budget),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(store.slots().1 as u64, p.host.expert_slots);

    let out = moehost()
        .args(["plan", "--json", "--config"])
        .arg(data_dir().join("kimi-k2-config.json"))
        .args([
            "--device-mem",
            "80GiB",
            "--host-mem",
            "512GiB",
            "--hit-rate",
            "0.5",
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // 512 GiB holds about half the experts; the rest are read from disk.
    assert!(v["disk_experts"].as_u64().unwrap() > 9000, "{v}");
    assert!(v["per_token"]["disk_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(v["per_token"]["hit_rate"], 0.5);
}

/// Every command takes the same `--link` names: `plan` on a slower link than the H100 default
/// plans a slower ceiling, as placement in `generate` weighs the same preset.
#[test]
fn plan_takes_every_link_preset_generate_takes() {
    let plan = |link: &str| -> serde_json::Value {
        let out = moehost()
            .args(["plan", "--json", "--config"])
            .arg(data_dir().join("kimi-k2-config.json"))
            .args(["--device-mem", "80GiB", "--link", link])
            .output()
            .unwrap();
        assert_ok(&out);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let fast = plan("h100-pcie5")["per_token"]["tokens_per_s"]
        .as_f64()
        .unwrap();
    let pcie4 = plan("h100-pcie4")["per_token"]["tokens_per_s"]
        .as_f64()
        .unwrap();
    let slow = plan("slow-link")["per_token"]["tokens_per_s"]
        .as_f64()
        .unwrap();
    assert!(slow < pcie4 && pcie4 < fast, "{slow} {pcie4} {fast}");
    for link in ["slow-link", "h100-pcie4", "h100-pcie5-nvme5"] {
        let out = moehost()
            .args([
                "generate",
                "--prompt",
                "Hi",
                "--max-tokens",
                "2",
                "--link",
                link,
            ])
            .output()
            .unwrap();
        assert_ok(&out);
    }
}

/// The hybrid path: the CPU computes the misses where they lie while the GPU computes its
/// hits, each MoE step the slower side; every figure follows from the formula written in
/// `plan.rs` and docs/h100.md, and moves the way the machine does.
#[test]
fn kimi_k2_hybrid_decode_and_prefill() {
    let fp8 = plan(&k2(), &h100(None)).unwrap();
    let h = &fp8.hybrid;
    // The preset host: 128 cores x the measured FP8 core rate is above 300 GB/s: memory-bound.
    assert_eq!(h.cpu.cores, 128);
    assert_eq!(h.cpu_expert_gbps, 300.0);
    // The CPU's side: every miss's bytes at that rate.
    let misses = fp8.per_token.expert_accesses * (1.0 - fp8.per_token.hit_rate);
    let cpu_ms = misses * fp8.expert_bytes as f64 / 300e9 * 1e3;
    assert!((h.cpu_moe_ms - cpu_ms).abs() < 1e-9, "{h:?}");
    let step = h.serial_ms + h.gpu_moe_ms.max(h.cpu_moe_ms) + h.sync_ms + h.disk_ms;
    assert!((h.tokens_per_s - 1e3 / step).abs() < 1e-9, "{h:?}");
    // With uniform routing the CPU is the slower side, and the hybrid path beats streaming
    // every miss over the link (300 GB/s of host memory against 54.8 GB/s of PCIe).
    assert!(h.cpu_moe_ms > h.gpu_moe_ms);
    assert!(h.tokens_per_s > 4.0 * fp8.per_token.tokens_per_s, "{h:?}");
    // A host reading twice as fast decodes faster; INT4 experts (fewer bytes) faster still.
    let mut o = h100(None);
    o.cpu = Some(moehost::plan::HostCpu {
        read_gbps: 600.0,
        ..moehost::plan::HostCpu::of(moehost::hardware::preset("h100-pcie5").unwrap())
    });
    let fast = plan(&k2(), &o).unwrap();
    assert!(
        fast.hybrid.tokens_per_s > 1.5 * h.tokens_per_s,
        "{:?}",
        fast.hybrid
    );
    let mut o = h100(None);
    o.experts = Some(WeightFormat::Int4);
    let int4 = plan(&k2(), &o).unwrap();
    assert!(int4.hybrid.tokens_per_s > h.tokens_per_s);
    // A few cores make the kernels, not memory, the bound: cores x the core rate.
    let mut o = h100(None);
    o.cpu = Some(moehost::plan::HostCpu {
        cores: 8,
        core_gbps: Some(6.0),
        ..moehost::plan::HostCpu::of(moehost::hardware::preset("h100-pcie5").unwrap())
    });
    assert_eq!(plan(&k2(), &o).unwrap().hybrid.cpu_expert_gbps, 48.0);

    // Prefill: a long prompt streams each layer's missed experts to the GPU (the CPU is
    // compute-bound there), a short one computes them on the CPU; the switch lies between.
    let pf = &h.prefill;
    assert_eq!((pf.tokens, pf.path), (8192, "stream"));
    assert!(pf.stream_layer_ms < pf.cpu_layer_ms);
    let from = pf.stream_from_tokens.unwrap();
    assert!((64..8192).contains(&from), "{pf:?}");
    let mut o = h100(None);
    o.prompt_tokens = from - 1;
    let short = plan(&k2(), &o).unwrap();
    assert_eq!(
        short.hybrid.prefill.path, "cpu",
        "{:?}",
        short.hybrid.prefill
    );
    // Streaming moves the layer's missed experts over the link once per prompt.
    let layer_bytes = 384.0 * (1.0 - fp8.device.share) * fp8.expert_bytes as f64;
    assert!(
        (pf.stream_layer_ms - layer_bytes / 54.8e9 * 1e3).abs() < 1e-6,
        "{pf:?}"
    );
    let moe_layers = 60.0;
    let want = 8192.0 / ((moe_layers * pf.stream_layer_ms + pf.gpu_ms) / 1e3);
    assert!((pf.tokens_per_s - want).abs() < 1e-6, "{pf:?}");
}

/// `plan`'s host CPU flags reach the hybrid figures; bad values are refused, naming the flag.
#[test]
fn plan_takes_the_host_cpu_from_its_flags() {
    let run = |extra: &[&str]| {
        moehost()
            .args(["plan", "--json", "--config"])
            .arg(data_dir().join("kimi-k2-config.json"))
            .args(extra)
            .output()
            .unwrap()
    };
    let json = |extra: &[&str]| -> serde_json::Value {
        let out = run(extra);
        assert_ok(&out);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let preset = json(&[]);
    let given = json(&[
        "--cpu-read-gbps",
        "150",
        "--cpu-cores",
        "16",
        "--cpu-core-gbps",
        "5",
        "--prompt-tokens",
        "512",
    ]);
    assert_eq!(preset["hybrid"]["cpu"]["read_gbps"], 300.0);
    assert_eq!(given["hybrid"]["cpu"]["read_gbps"], 150.0);
    // 16 cores x 5 GB/s = 80 GB/s, below the 150 GB/s read rate.
    assert_eq!(given["hybrid"]["cpu_expert_gbps"], 80.0);
    assert_eq!(given["hybrid"]["prefill"]["tokens"], 512);
    let speed = |v: &serde_json::Value| v["hybrid"]["tokens_per_s"].as_f64().unwrap();
    assert!(speed(&given) < speed(&preset));
    for (flag, value) in [("--cpu-read-gbps", "0"), ("--cpu-core-gbps", "-1")] {
        let out = run(&[&format!("{flag}={value}")]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{err}");
    }
}
