//! The `moehost` binary as a user runs it: the bundled model by default, `forward` output in
//! the golden layout, `generate` streaming and JSON, errors as messages with a failing status.

mod support;

use support::{assert_ok, moehost};

use support::{max_abs_diff, Golden};

#[test]
fn forward_writes_golden_layout() {
    let golden = Golden::load("tiny-k2");
    let p = 2;
    let ids = golden.ids(p, "input_ids");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fwd.safetensors");
    let ids_arg: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let status = moehost()
        .args(["forward", "--ids", &ids_arg.join(","), "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = ids.len();
    let logits = st.tensor("logits").unwrap();
    assert_eq!(logits.shape(), [t, 4096]);
    let logits: Vec<f32> = logits
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    for (r, &pos) in golden.get(p, "logit_rows").i32.iter().enumerate() {
        let pos = pos as usize;
        let d = max_abs_diff(
            &logits[pos * 4096..(pos + 1) * 4096],
            &golden.get(p, "logits").f32[r * 4096..(r + 1) * 4096],
        );
        assert!(d <= 1e-3, "position {pos}: {d}");
    }
    let experts = st.tensor("routed_experts").unwrap();
    assert_eq!(experts.shape(), [t, 7, 6]);
    assert_eq!(experts.dtype(), safetensors::Dtype::I32);
    let experts: Vec<i32> = experts
        .data()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    // Golden is [layer, token, k]; the dump is [token, layer, k]: compare layer 3, token 5.
    let g = &golden.get(p, "routed_experts").i32;
    assert_eq!(&experts[(5 * 7 + 3) * 6..][..6], &g[(3 * t + 5) * 6..][..6]);
    let weights = st.tensor("routed_weights").unwrap();
    assert_eq!(weights.shape(), [t, 7, 6]);
    let w: Vec<f32> = weights
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let sum: f32 = w[..6].iter().sum();
    assert!(
        (sum - 1.0).abs() < 1e-5,
        "weights are normalised before routed_scaling_factor: {sum}"
    );
}

#[test]
fn generate_json_on_bundled_model() {
    let golden = Golden::load("tiny-k2");
    let out = moehost()
        .args([
            "generate",
            "--prompt",
            "<|bos|>The quick brown fox",
            "--max-tokens",
            "32",
            "--json",
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<u32> = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let prompt_ids: Vec<u32> = v["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(prompt_ids, golden.ids(1, "input_ids"));
    assert_eq!(ids, golden.ids(1, "greedy_ids"));
    assert!(v["text"].as_str().unwrap().starts_with(" of the world"));
}

#[test]
fn generate_streams_text() {
    let out = moehost()
        .args([
            "generate",
            "--prompt",
            "<|bos|>The quick brown fox",
            "--max-tokens",
            "32",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(support::data_dir().join("golden/tiny-k2.index.json")).unwrap(),
    )
    .unwrap();
    let want = index["prompts"][1]["greedy_text"].as_str().unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{want}\n"));
}

#[test]
fn sampling_is_seeded() {
    let run = |seed: &str| {
        let out = moehost()
            .args([
                "generate",
                "--prompt",
                "<|bos|>def",
                "--max-tokens",
                "24",
                "--temperature",
                "1.0",
            ])
            .args(["--top-p", "0.9", "--seed", seed, "--json"])
            .output()
            .unwrap();
        assert!(out.status.success());
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["ids"].clone()
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(
        run("7"),
        run("8"),
        "different seeds should sample differently"
    );
}

#[test]
fn errors_are_messages_not_panics() {
    let out = moehost()
        .args([
            "generate",
            "--model",
            "/nonexistent/model",
            "--prompt",
            "hi",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/model") && err.contains("does not exist"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let out = moehost()
        .args([
            "forward",
            "--ids",
            "0,99999",
            "--out",
            "/tmp/never.safetensors",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("token id 99999 out of range"));

    let out = moehost()
        .args(["generate", "--prompt", "<|bos|>x", "--temperature=-1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("temperature"));
}

#[test]
fn stats_follow_the_json_output() {
    let out = moehost()
        .args([
            "generate",
            "--prompt",
            "<|bos|>The quick brown fox",
            "--max-tokens",
            "8",
            "--json",
            "--stats",
        ])
        .args([
            "--policy-timeout-ms",
            "10000",
            "--device-mem",
            "400KiB",
            "--eviction",
            "lfu",
            "--prefetch",
            "transitions",
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let result: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(result["ids"].as_array().unwrap().len(), 8);
    let stats: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    // 400 KiB holds 4 tiny-k2 experts: the CPU's compute form keeps a BF16 checkpoint's
    // weights as they are (3 x 256 x 64 x 2 = 96 KiB each).
    assert_eq!(stats["device"]["slots"], 4);
    assert!(stats["device"]["misses"].as_u64().unwrap() > 0);
    assert_eq!(stats["policies"]["eviction"]["name"], "lfu");
    assert_eq!(stats["policies"]["prefetch"]["source"], "transitions");
    assert_eq!(stats["policies"]["eviction"]["fallbacks"], 0);
}

/// All policies' time per token is measured against `--policy-budget-us`: a budget of 1 us is
/// nearly used up by any real policy set, which is flagged in the stats and warned once.
#[test]
fn the_per_token_policy_budget_is_measured_and_warned() {
    let out = moehost()
        .args([
            "generate",
            "--prompt",
            "<|bos|>The quick brown fox",
            "--max-tokens",
            "40",
            "--stats",
            "--policy-budget-us",
            "1",
            "--policy-timeout-ms",
            "10000",
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    let stats: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let b = &stats["policy_budget"];
    assert_eq!(b["budget_us"], 1.0);
    assert!(b["per_token_us"].as_f64().unwrap() > 0.8, "{b}");
    assert_eq!(b["near_limit"], true, "{b}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("per-token budget").count(), 1, "{err}");
}

#[test]
fn policy_check_reports_world_and_refuses_wasi() {
    let out = moehost()
        .args(["policy", "check", "layer-cycle"])
        .output()
        .unwrap();
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["world"], "moehost:policy/eviction-policy");
    assert_eq!(v["export"], "moehost:policy/eviction@0.2.1");
    assert_eq!(v["version"], "0.2.1");
    assert_eq!(v["name"], "layer-cycle");
    assert_eq!(v["direct_calls"], true);

    let out = moehost()
        .args(["policy", "check", &support::fixture("loop-forever")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("smoke test") && err.contains("last failure: Timeout"),
        "{err}"
    );

    let out = moehost()
        .args(["policy", "check", &support::fixture("wasi-import")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("imports wasi:") && err.contains("no_std"),
        "{err}"
    );

    let out = moehost()
        .args(["generate", "--prompt", "x", "--device-mem", "lots"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap reports a bad size");
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid size"));
}

#[test]
fn doctor_measures_this_machine_and_plans_kimi_k2_without_a_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("host.json");
    let out = support::moehost()
        .args(["doctor", "--json", "--save-profile"])
        .arg(&profile)
        .output()
        .unwrap();
    support::assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cpu = &v["cpu"];
    // The saved profile holds the measured expert rates, and placement takes it: the tokens
    // are those of a run without it (placement never changes them); a missing file is named.
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&profile).unwrap()).unwrap();
    assert_eq!(saved["threads"], cpu["threads"], "{saved}");
    for (format, measured) in [
        ("fp8", "k2_expert_gbps"),
        ("int4", "k2_int4_expert_gbps"),
        ("int8", "k2_int8_expert_gbps"),
        ("bf16", "k2_bf16_expert_gbps"),
    ] {
        assert_eq!(saved["cpu_expert_gbps"][format], cpu[measured], "{saved}");
    }
    let generate = |extra: &[&std::ffi::OsStr]| {
        support::moehost()
            .args(["generate", "--prompt", "<|bos|>The quick brown fox"])
            .args([
                "--max-tokens",
                "6",
                "--device-mem",
                "2MiB",
                "--link",
                "h100-pcie5",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let plain = generate(&[]);
    support::assert_ok(&plain);
    let with = generate(&["--host-profile".as_ref(), profile.as_os_str()]);
    support::assert_ok(&with);
    assert_eq!(with.stdout, plain.stdout);
    let missing = dir.path().join("none.json");
    let out = generate(&["--host-profile".as_ref(), missing.as_os_str()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("none.json"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for k in [
        "matmul_gflops",
        "memory_gbps",
        "memory_read_gbps",
        "fp8_dequant_gbps",
        "k2_expert_gbps",
        "k2_int4_expert_gbps",
        "k2_int8_expert_gbps",
        "k2_bf16_expert_gbps",
    ] {
        assert!(cpu[k].as_f64().unwrap() > 0.0, "{k}: {cpu}");
    }
    // Linux lists at least one NUMA node, with CPUs.
    if std::path::Path::new("/sys/devices/system/node/node0").exists() {
        assert!(
            cpu["numa_nodes"][0]["cpus"]
                .as_str()
                .is_some_and(|c| !c.is_empty()),
            "{cpu}"
        );
    }
    // The bundled model's shards were read in full.
    assert!(
        v["disk"]["bytes"].as_u64().unwrap() > 50_000_000,
        "{}",
        v["disk"]
    );
    // No GPU in CI: said plainly, and the plan falls back to an H100's preset figures.
    if v["gpu"]["Err"].is_string() {
        assert!(v["link_basis"].as_str().unwrap().contains("no GPU"));
    }
    // Kimi-K2's figures (the plan test checks them in detail).
    assert_eq!(v["kimi_k2"]["expert_bytes"], 44_050_944);
    assert!(v["kimi_k2"]["device"]["expert_slots"].as_u64().unwrap() > 1000);
    // Its hybrid path on this host, as measured: the CPU's expert rate is the measured
    // FP8 rate (per thread, times the threads), at most the read rate.
    let hybrid = &v["kimi_k2"]["hybrid"];
    assert_eq!(hybrid["cpu"]["basis"], "measured");
    assert_eq!(hybrid["cpu"]["read_gbps"], cpu["memory_read_gbps"]);
    let rate = hybrid["cpu_expert_gbps"].as_f64().unwrap();
    let measured = cpu["k2_expert_gbps"].as_f64().unwrap();
    let read = cpu["memory_read_gbps"].as_f64().unwrap();
    assert!(
        (rate - measured.min(read)).abs() < 1e-6 * measured,
        "{hybrid}"
    );
    assert!(hybrid["tokens_per_s"].as_f64().unwrap() > 0.0, "{hybrid}");
}

#[test]
fn bench_measures_batched_decode_against_the_single_stream() {
    let bench = |extra: &[&str]| -> serde_json::Value {
        let out = support::moehost()
            .args(["bench", "--json", "--prompt-tokens", "8"])
            .args(["--decode-tokens", "3", "--repeats", "1"])
            .args(extra)
            .output()
            .unwrap();
        support::assert_ok(&out);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let v = bench(&["--batch", "4"]);
    assert_eq!(v["batch"], 4, "{v}");
    let batched = v["batch_decode_tokens_per_s"].as_f64().unwrap();
    let single = v["decode_tokens_per_s"].as_f64().unwrap();
    assert!(batched > 0.0 && single > 0.0, "{v}");
    let speedup = v["batch_speedup"].as_f64().unwrap();
    assert!((speedup - batched / single).abs() < 1e-9 * speedup, "{v}");
    // Without --batch nothing batched is measured.
    let v = bench(&[]);
    assert_eq!(v["batch"], 1);
    assert!(v["batch_decode_tokens_per_s"].is_null() && v["batch_speedup"].is_null());
    let out = support::moehost()
        .args(["bench", "--batch", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--batch"));
}

#[test]
fn bench_on_cuda_says_where_it_ran() {
    let out = support::moehost()
        .args([
            "bench",
            "--device",
            "cuda",
            "--json",
            "--prompt-tokens",
            "8",
        ])
        .args(["--decode-tokens", "2", "--repeats", "1"])
        .output()
        .unwrap();
    support::assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
    let device = v["device"].as_str().unwrap();
    // Without a GPU (or the `cuda` feature) it says why on stderr and runs on the CPU.
    if device == "cpu" {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("runs on the CPU"), "{err}");
    }
}
