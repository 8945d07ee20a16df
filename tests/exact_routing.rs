//! The model's own routing in the paths users run: `moehost forward` and `moehost generate` on
//! every golden (tiny-k2 bf16 and FP8, the three variants, and the DeepSeek-V3-shaped group
//! routing of `dsv3-groups`: 64 experts in 8 groups, the 4 best kept, top-8), with default
//! options and with tight tier budgets under every bundled eviction, prefetch and placement
//! policy and the exact selection guest. Whatever the budget and the policies, a run gives the
//! default run's logits and routing bit for bit, and the default run matches transformers.

mod support;

use std::path::{Path, PathBuf};
use support::{assert_ok, max_abs_diff, moehost, Golden};

const LOGIT_TOL: f32 = 1e-3;

struct Case {
    name: &'static str,
    dir: PathBuf,
    golden: Golden,
    /// A device budget that holds a few of the model's experts, not a layer's worth.
    tight: &'static str,
    /// Whether the golden routing has no near-ties (the variants are built that way), so the
    /// routed experts must equal transformers' exactly.
    tie_free: bool,
}

fn variant(name: &'static str, tight: &'static str) -> Case {
    let dir = support::data_dir().join("variants").join(name);
    Case {
        name,
        golden: Golden::from_path(&dir.join("golden.safetensors")),
        dir,
        tight,
        tie_free: true,
    }
}

/// Tier options and policies: the default, the README's `--device-mem 2MiB` (tight for
/// tiny-k2), and two sets with a budget `tight` for the model that
/// between them use every bundled eviction, prefetch and placement policy, the exact
/// selection guest, and links that make placement compute some misses on the host.
fn option_sets(tight: &str) -> Vec<Vec<String>> {
    let sets: [&[&str]; 4] = [
        &[],
        &["--device-mem", "2MiB"],
        &[
            "--device-mem",
            tight,
            "--host-mem",
            tight,
            "--selection",
            "topk",
            "--eviction",
            "lfu",
            "--prefetch",
            "next-layer-gate",
            "--placement",
            "hot-fetch",
            "--link",
            "h100-pcie5",
        ],
        &[
            "--device-mem",
            tight,
            "--eviction",
            "layer-cycle",
            "--prefetch",
            "transitions",
            "--placement",
            "cost-model",
            "--link",
            "slow-link",
        ],
    ];
    sets.iter()
        .map(|s| s.iter().map(|x| x.to_string()).collect())
        .collect()
}

struct Dump {
    logits: Vec<f32>,
    experts: Vec<i32>,
}

fn tensor(st: &safetensors::SafeTensors, name: &str) -> Vec<[u8; 4]> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| c.try_into().unwrap())
        .collect()
}

fn forward(dir: &Path, ids: &[u32], opts: &[String]) -> Dump {
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("fwd.safetensors");
    let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let out = moehost()
        .arg("forward")
        .arg("--model")
        .arg(dir)
        .args(["--ids", &ids.join(",")])
        .arg("--out")
        .arg(&out_path)
        .args(opts)
        .output()
        .unwrap();
    assert_ok(&out);
    let bytes = std::fs::read(&out_path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    Dump {
        logits: tensor(&st, "logits")
            .into_iter()
            .map(f32::from_le_bytes)
            .collect(),
        experts: tensor(&st, "routed_experts")
            .into_iter()
            .map(i32::from_le_bytes)
            .collect(),
    }
}

fn generate(dir: &Path, ids: &[u32], max_tokens: usize, opts: &[String]) -> Vec<u32> {
    let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let out = moehost()
        .arg("generate")
        .arg("--model")
        .arg(dir)
        .args(["--prompt-ids", &ids.join(",")])
        .args(["--max-tokens", &max_tokens.to_string()])
        .args(["--temperature", "0", "--json"])
        .args(opts)
        .output()
        .unwrap();
    assert_ok(&out);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn eos_ids(dir: &Path) -> Vec<u32> {
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    match &cfg["eos_token_id"] {
        serde_json::Value::Array(a) => a.iter().map(|x| x.as_u64().unwrap() as u32).collect(),
        x => x.as_u64().map(|x| x as u32).into_iter().collect(),
    }
}

/// Golden logits at the positions the golden keeps (`logit_rows`, or every position).
fn check_logits(case: &Case, p: usize, logits: &[f32], what: &str) {
    let want = case.golden.get(p, "logits");
    let vocab = *want.shape.last().unwrap();
    let t = logits.len() / vocab;
    let rows: Vec<usize> = if want.shape[0] == t && case.tie_free {
        (0..t).collect()
    } else {
        let r = &case.golden.get(p, "logit_rows").i32;
        r.iter().map(|&x| x as usize).collect()
    };
    for (r, &pos) in rows.iter().enumerate() {
        let d = max_abs_diff(
            &logits[pos * vocab..][..vocab],
            &want.f32[r * vocab..][..vocab],
        );
        assert!(
            d <= LOGIT_TOL,
            "{} prompt{p} position {pos} ({what}): logits differ by {d}",
            case.name
        );
    }
}

fn check(case: Case) {
    let p = case.golden.prompts() - 1; // the longest prompt
    let ids = case.golden.ids(p, "input_ids");
    let t = ids.len();
    let eos = eos_ids(&case.dir);
    let greedy = case.golden.ids(p, "greedy_ids");
    let want: Vec<u32> = greedy
        .iter()
        .copied()
        .take_while(|x| !eos.contains(x))
        .collect();
    let sets = option_sets(case.tight);
    let base = forward(&case.dir, &ids, &sets[0]);
    check_logits(&case, p, &base.logits, "default options");
    if case.tie_free {
        // Golden [layer, token, k] against the dump's [token, layer, k], both ascending.
        let g = &case.golden.get(p, "routed_experts");
        let (layers, k) = (g.shape[0], g.shape[2]);
        for l in 0..layers {
            for tok in 0..t {
                assert_eq!(
                    &base.experts[(tok * layers + l) * k..][..k],
                    &g.i32[(l * t + tok) * k..][..k],
                    "{} prompt{p} MoE layer {l} token {tok}: routed experts",
                    case.name
                );
            }
        }
    }
    for opts in &sets {
        let what = format!("options {opts:?}");
        let d = forward(&case.dir, &ids, opts);
        assert!(
            d.logits == base.logits,
            "{}: {what} changes the logits (max diff {})",
            case.name,
            max_abs_diff(&d.logits, &base.logits)
        );
        assert_eq!(
            d.experts, base.experts,
            "{}: {what} changes routing",
            case.name
        );
        let got = generate(&case.dir, &ids, greedy.len(), opts);
        assert_eq!(got, want, "{}: greedy generate with {what}", case.name);
    }
}

#[test]
fn tiny_k2_bf16() {
    check(Case {
        name: "tiny-k2",
        dir: support::bf16_model(),
        golden: Golden::load("tiny-k2"),
        tight: "2MiB",
        tie_free: false,
    });
}

#[test]
fn tiny_k2_fp8() {
    check(Case {
        name: "tiny-k2-fp8",
        dir: support::fp8_model(),
        golden: Golden::load("tiny-k2-fp8"),
        tight: "2MiB",
        tie_free: false,
    });
}

// A variant's expert is 12-24 KB in f32: 2 MiB holds them all, 64 KiB a few.

#[test]
fn deepseek_v3_group_routing() {
    check(variant("dsv3-groups", "64KiB"));
}

#[test]
fn kimi_k2_thinking_int4_experts() {
    check(variant("dsv3-groups-int4", "64KiB"));
}

#[test]
fn grouped_variant() {
    check(variant("grouped", "64KiB"));
}

#[test]
fn no_qlora_variant() {
    check(variant("no-qlora", "64KiB"));
}

#[test]
fn wide_heads_variant() {
    check(variant("wide-heads", "64KiB"));
}

/// The approximate bundled selection (`cache-aware`, substitutes within 0.05 of the k-th
/// selection score) on group-limited routing under a tight budget: every answer it gives is
/// valid against the group-masked scores (no fallback to exact top-k).
#[test]
fn cache_aware_selection_keeps_its_bound_on_group_routing() {
    let case = variant("dsv3-groups", "64KiB");
    let ids: Vec<String> = case
        .golden
        .ids(1, "input_ids")
        .iter()
        .map(|i| i.to_string())
        .collect();
    let out = moehost()
        .arg("generate")
        .arg("--model")
        .arg(&case.dir)
        .args([
            "--prompt-ids",
            &ids.join(","),
            "--max-tokens",
            "8",
            "--json",
        ])
        .args([
            "--selection",
            "cache-aware",
            "--device-mem",
            case.tight,
            "--stats",
        ])
        // No deadline to meet on a loaded machine: a fallback here can only be a bad answer.
        .args(["--policy-timeout-ms", "10000"])
        .output()
        .unwrap();
    assert_ok(&out);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stats: serde_json::Value = serde_json::from_str(stdout.lines().nth(1).unwrap()).unwrap();
    let sel = &stats["policies"]["selection"];
    assert_eq!(sel["name"], "cache-aware");
    assert!(sel["calls"].as_u64().unwrap() >= 16, "{sel}");
    assert_eq!(sel["invalid_answers"], 0, "{sel}");
    assert_eq!(sel["fallbacks"], 0, "{sel}");
}
