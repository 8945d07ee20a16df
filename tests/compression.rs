//! K2-Mini: `profile`, `convert` and `eval` on the bundled tiny-k2. A converted model is a valid
//! DeepSeek-V3 checkpoint whose logits equal transformers' on the same folder; damaged sources
//! fail cleanly and leave nothing behind; the source is never written to.

mod support;

use moehost::compress::convert::{convert, ConvertOptions, LayerChoice, OutDtype};
use moehost::compress::profile::Profile;
use moehost::{Engine, Logits};
use std::path::{Path, PathBuf};
use support::{assert_ok, bf16_model, data_dir, fp8_model, max_abs_diff, moehost, Golden};

fn profile() -> Profile {
    Profile::load(&data_dir().join("compression/profile.json")).unwrap()
}

fn options(layers: usize, experts: usize) -> ConvertOptions {
    ConvertOptions {
        layers,
        experts,
        layer_choice: LayerChoice::Profile,
        profile: Some(profile()),
        ranker: None,
        dtype: OutDtype::Keep,
        quantize_experts: None,
        force: false,
        shard_bytes: 4 << 30,
        show_progress: false,
    }
}

/// `moehost quantize` of the bf16 tiny-k2 with `bits` (int8, int4) experts into `out`.
fn quantize_experts(bits: &str, out: &Path) {
    let o = moehost()
        .args(["quantize", "--model"])
        .arg(bf16_model())
        .arg("--out")
        .arg(out)
        .args(["--experts", bits])
        .output()
        .unwrap();
    assert_ok(&o);
}

fn leftovers(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".moehost-"))
        .collect()
}

#[test]
fn converted_model_matches_transformers_on_the_converted_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mini4");
    let report = convert(&bf16_model(), &out, &options(4, 16)).unwrap();
    // The dense layer plus the three most influential MoE layers of the profile.
    assert_eq!(report.layers, vec![0, 1, 3, 5]);
    assert_eq!(report.experts.len(), 3);
    for ids in report.experts.values() {
        assert_eq!(ids.len(), 16);
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ascending: {ids:?}");
    }
    // config.json is consistent with the tensors.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 4);
    assert_eq!(cfg["n_routed_experts"], 16);
    assert_eq!(cfg["num_experts_per_tok"], 6);
    assert_eq!(cfg["n_group"], 1);
    assert!(out.join("tokenizer.json").exists() && !out.join("README.md").exists());
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let names: Vec<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert!(names.contains(&"model.layers.3.mlp.experts.15.down_proj.weight"));
    assert!(!names.iter().any(|n| n.starts_with("model.layers.4.")));
    assert!(!names.contains(&"model.layers.1.mlp.experts.16.up_proj.weight"));
    assert!(leftovers(tmp.path()).is_empty());

    // The router moved with its experts: the kept rows, in order.
    let src = Engine::open(&bf16_model()).unwrap();
    let dst = Engine::open(&out).unwrap();
    let (kept, moe1) = (&report.experts[&1], 1usize);
    let src_gate = src
        .checkpoint
        .read_f32("model.layers.1.mlp.gate.weight", &[64, 256])
        .unwrap();
    let dst_gate = dst
        .checkpoint
        .read_f32(&format!("model.layers.{moe1}.mlp.gate.weight"), &[16, 256])
        .unwrap();
    for (j, &e) in kept.iter().enumerate() {
        assert_eq!(
            &dst_gate[j * 256..(j + 1) * 256],
            &src_gate[e as usize * 256..(e as usize + 1) * 256]
        );
    }

    // Logits and greedy tokens equal transformers' on this folder (tests/data/compression).
    let golden = Golden::from_path(&data_dir().join("compression/golden-mini4.safetensors"));
    assert_eq!(golden.prompts(), 2);
    for p in 0..golden.prompts() {
        let ids = golden.ids(p, "input_ids");
        let out = dst
            .model
            .forward(&ids, &mut dst.model.new_cache(), Logits::All, false)
            .unwrap();
        let want = &golden.get(p, "logits").f32;
        let diff = max_abs_diff(&out.logits, want);
        assert!(diff < 1e-3, "prompt {p}: logits differ by {diff}");
        let gen = dst.generate(&ids, 16, &Default::default(), |_| {}).unwrap();
        assert_eq!(gen.ids, golden.ids(p, "greedy_ids"), "prompt {p}");
    }
}

#[test]
fn profile_and_eval_measure_and_compression_costs_perplexity() {
    let text = data_dir().join("text/heldout.txt");
    let cal = data_dir().join("text/calibration.txt");
    let tmp = tempfile::tempdir().unwrap();
    let prof = tmp.path().join("profile.json");
    let out = moehost()
        .args(["profile", "--text"])
        .arg(&cal)
        .args(["--max-tokens", "2000", "--out"])
        .arg(&prof)
        .output()
        .unwrap();
    assert_ok(&out);
    let p = Profile::load(&prof).unwrap();
    assert_eq!(p.tokens, 2000 + 2000_u64.div_ceil(511));
    assert_eq!(p.layers.len(), 8);
    assert!(!p.layers[0].moe && p.layers[0].experts.is_empty());
    for l in &p.layers[1..] {
        assert!(l.moe && l.experts.len() == 64);
        assert!(l.block_influence > 0.0 && l.block_influence < 1.0);
        // Every token routes to 6 experts; the normalised weights of a token sum to 1.
        let count: u64 = l.experts.iter().map(|e| e.count).sum();
        let mass: f64 = l.experts.iter().map(|e| e.mass).sum();
        assert_eq!(count, 6 * p.tokens);
        assert!(
            (mass - p.tokens as f64).abs() < 1e-2 * p.tokens as f64,
            "{mass}"
        );
    }

    let eval = |model: Option<&Path>| -> f64 {
        let mut cmd = moehost();
        cmd.args(["eval", "--json", "--max-tokens", "3000", "--text"])
            .arg(&text);
        if let Some(m) = model {
            cmd.arg("--model").arg(m);
        }
        let out = cmd.output().unwrap();
        assert_ok(&out);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["perplexity"].as_f64().unwrap()
    };
    let full = eval(None);
    let mini = tmp.path().join("mini");
    let out = moehost()
        .args(["convert", "--model"])
        .arg(bf16_model())
        .arg("--out")
        .arg(&mini)
        .args(["--layers", "6", "--experts", "32", "--profile"])
        .arg(&prof)
        .output()
        .unwrap();
    assert_ok(&out);
    let small = eval(Some(&mini));
    assert!(full > 1.0 && full < 200.0, "{full}");
    assert!(
        small > full,
        "compression costs something: {small} vs {full}"
    );
}

#[test]
fn fp8_sources_keep_fp8_or_dequantize_to_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    let keep = tmp.path().join("fp8");
    let bf16 = tmp.path().join("bf16");
    let mut o = options(3, 8);
    o.dtype = OutDtype::Fp8;
    convert(&fp8_model(), &keep, &o).unwrap();
    o.dtype = OutDtype::Bf16;
    convert(&fp8_model(), &bf16, &o).unwrap();
    let read = |d: &PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap()
    };
    assert!(read(&keep).get("quantization_config").is_some());
    assert!(read(&bf16).get("quantization_config").is_none());
    let a = Engine::open(&keep).unwrap();
    let b = Engine::open(&bf16).unwrap();
    let name = "model.layers.2.mlp.experts.7.down_proj.weight";
    assert!(a.checkpoint.contains(&format!("{name}_scale_inv")));
    assert!(!b.checkpoint.contains(&format!("{name}_scale_inv")));
    assert_eq!(
        b.checkpoint.raw(name).unwrap().dtype,
        safetensors::Dtype::BF16
    );
    // The same weights, rounded to bf16 once: close logits.
    let ids = a.encode("<|bos|>Copyright (C) the authors").unwrap();
    let la = a
        .model
        .forward(&ids, &mut a.model.new_cache(), Logits::Last, false)
        .unwrap()
        .logits;
    let lb = b
        .model
        .forward(&ids, &mut b.model.new_cache(), Logits::Last, false)
        .unwrap()
        .logits;
    assert!(max_abs_diff(&la, &lb) < 0.1, "{}", max_abs_diff(&la, &lb));
    // bf16 to FP8 is not a conversion this command makes.
    let mut o = options(3, 8);
    o.dtype = OutDtype::Fp8;
    let err = convert(&bf16_model(), &tmp.path().join("x"), &o).unwrap_err();
    assert!(format!("{err:#}").contains("not FP8"), "{err:#}");
}

#[test]
fn damaged_sources_and_bad_outputs_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = |name: &str| -> PathBuf {
        let d = tmp.path().join(name);
        std::fs::create_dir(&d).unwrap();
        for e in std::fs::read_dir(bf16_model()).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        d
    };
    let fails = |src: &Path, want: &str| {
        let out = tmp.path().join("out");
        let err = convert(src, &out, &options(4, 16)).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(want), "{msg}");
        assert!(!out.exists(), "no partial output");
        assert!(
            leftovers(tmp.path()).is_empty(),
            "{:?}",
            leftovers(tmp.path())
        );
    };
    // A missing shard.
    let missing = copy("missing");
    std::fs::remove_file(missing.join("model-00002-of-00002.safetensors")).unwrap();
    fails(&missing, "model-00002-of-00002.safetensors");
    // A truncated shard.
    let truncated = copy("truncated");
    let shard = truncated.join("model-00001-of-00002.safetensors");
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    fails(&truncated, "model-00001-of-00002.safetensors");
    // config.json promising a different shape than the tensors have.
    let wrong = copy("wrong");
    let cfg = std::fs::read_to_string(wrong.join("config.json")).unwrap();
    std::fs::write(
        wrong.join("config.json"),
        cfg.replace(
            "\"moe_intermediate_size\": 64",
            "\"moe_intermediate_size\": 96",
        ),
    )
    .unwrap();
    fails(&wrong, "shape");

    // Never into the source, never over a non-empty folder without --force.
    let src = copy("src");
    let err = convert(&src, &src.join("inside"), &options(4, 16)).unwrap_err();
    assert!(
        format!("{err:#}").contains("must not be the source"),
        "{err:#}"
    );
    let busy = tmp.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("keep.txt"), "mine").unwrap();
    let err = convert(&src, &busy, &options(4, 16)).unwrap_err();
    assert!(format!("{err:#}").contains("--force"), "{err:#}");
    assert!(busy.join("keep.txt").exists());
    let mut o = options(4, 16);
    o.force = true;
    convert(&src, &busy, &o).unwrap();
    assert!(!busy.join("keep.txt").exists() && busy.join("config.json").exists());
    // Bad sizes name the limit.
    let err = convert(&src, &tmp.path().join("o2"), &options(1, 16)).unwrap_err();
    assert!(format!("{err:#}").contains("--layers 1"), "{err:#}");
    let err = convert(&src, &tmp.path().join("o3"), &options(4, 65)).unwrap_err();
    assert!(format!("{err:#}").contains("--experts 65"), "{err:#}");
}

#[test]
fn quantized_experts_load_run_close_to_bf16_and_fill_the_host_tier_denser() {
    use moehost::experts::tiered::StoreConfig;
    let tmp = tempfile::tempdir().unwrap();
    let src = Engine::open(&bf16_model()).unwrap();
    let ids = src.encode("<|bos|>The software is distributed").unwrap();
    let logits = |e: &Engine| {
        e.model
            .forward(&ids, &mut e.model.new_cache(), Logits::All, false)
            .unwrap()
            .logits
    };
    let want = logits(&src);
    let mut host_slots = Vec::new();
    for (bits, max_q) in [("int8", 127f32), ("int4", 7.0)] {
        let out = tmp.path().join(bits);
        quantize_experts(bits, &out);
        let q = Engine::open(&out).unwrap();
        let name = "model.layers.3.mlp.experts.5.up_proj.weight";
        let raw = q.checkpoint.raw(name).unwrap();
        let (dtype, cols) = if bits == "int8" {
            (safetensors::Dtype::I8, 256)
        } else {
            (safetensors::Dtype::U8, 128)
        };
        assert_eq!((raw.dtype, raw.shape.to_vec()), (dtype, vec![64, cols]));
        assert!(q.checkpoint.contains(&format!("{name}_qscale")));
        // Attention and the shared expert stay as stored.
        assert_eq!(
            q.checkpoint
                .raw("model.layers.3.mlp.shared_experts.up_proj.weight")
                .unwrap()
                .dtype,
            safetensors::Dtype::BF16
        );
        // Every weight within half a quantization step of the source's.
        let a = q.checkpoint.read_f32(name, &[64, 256]).unwrap();
        let b = src.checkpoint.read_f32(name, &[64, 256]).unwrap();
        let step = b.iter().fold(0f32, |m, x| m.max(x.abs())) / max_q;
        let err = max_abs_diff(&a, &b);
        assert!(
            err > 0.0 && err <= step * 0.51,
            "{bits}: weight error {err}, step {step}"
        );
        // Logits move a little (near-tied routing can flip downstream; tiny-k2's perplexity on
        // held-out text is unchanged to 0.1%: docs/compression.md).
        let l = logits(&q);
        let mean = l.iter().zip(&want).map(|(x, y)| (x - y).abs()).sum::<f32>() / want.len() as f32;
        assert!(mean > 0.0 && mean < 0.2, "{bits}: mean logit change {mean}");
        // The same host budget holds more experts.
        let c = StoreConfig {
            host_bytes: Some(2 << 20),
            ..Default::default()
        };
        let (_, store) = Engine::open_tiered(&out, &c).unwrap();
        host_slots.push(store.slots().1);
        // The tiers produce the same tokens as the all-resident engine on this model.
        let small = StoreConfig {
            device_bytes: Some(30 * 3 * 256 * 64 * 4),
            host_bytes: Some(2 << 20),
            ..Default::default()
        };
        let (tiered, _) = Engine::open_tiered(&out, &small).unwrap();
        let a = q.generate(&ids, 12, &Default::default(), |_| {}).unwrap();
        let b = tiered
            .generate(&ids, 12, &Default::default(), |_| {})
            .unwrap();
        assert_eq!(a.ids, b.ids, "{bits}");
    }
    let (_, bf16_store) = Engine::open_tiered(
        &bf16_model(),
        &StoreConfig {
            host_bytes: Some(2 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    let bf16 = bf16_store.slots().1;
    assert!(
        host_slots[0] * 10 >= bf16 * 17 && host_slots[1] * 10 >= bf16 * 30,
        "host slots bf16 {bf16}, int8 {}, int4 {}",
        host_slots[0],
        host_slots[1]
    );
}

#[test]
fn a_pruning_plugin_ranks_the_experts_and_a_bad_one_falls_back_to_routed_mass() {
    use moehost::policy::PolicySource;
    let tmp = tempfile::tempdir().unwrap();
    let p = profile();
    let mut o = options(4, 16);
    o.ranker = Some(PolicySource::parse("count-rank"));
    let r = convert(&bf16_model(), &tmp.path().join("count"), &o).unwrap();
    assert_eq!(
        (r.experts_ranked_by.as_str(), r.ranker_fallbacks),
        ("count-rank", 0)
    );
    for (j, kept) in &r.experts {
        // The 16 experts with the most tokens in the profile (ties: mass, then id).
        let stats = &p.layers[r.layers[*j]].experts;
        let mut want: Vec<u32> = (0..64).collect();
        want.sort_by(|&a, &b| {
            let (x, y) = (&stats[a as usize], &stats[b as usize]);
            y.count
                .cmp(&x.count)
                .then(y.mass.total_cmp(&x.mass))
                .then(a.cmp(&b))
        });
        want.truncate(16);
        want.sort_unstable();
        assert_eq!(kept, &want, "layer {j}");
    }
    assert!(Engine::open(&tmp.path().join("count")).is_ok());

    // Garbage answers: every layer falls back to the built-in ranking, and says so.
    o.ranker = Some(PolicySource::parse(&support::fixture("bad-rank")));
    let bad = convert(&bf16_model(), &tmp.path().join("bad"), &o).unwrap();
    let mass = convert(&bf16_model(), &tmp.path().join("mass"), &options(4, 16)).unwrap();
    assert_eq!(bad.ranker_fallbacks, 3);
    assert_eq!(bad.experts, mass.experts);
    assert_eq!(mass.experts_ranked_by, "routed-mass");

    // Not a ranker, or no statistics to rank by: clear errors, nothing written.
    o.ranker = Some(PolicySource::parse("topk"));
    let err = convert(&bf16_model(), &tmp.path().join("x"), &o).unwrap_err();
    assert!(
        format!("{err:#}").contains("moehost:policy/pruning"),
        "{err:#}"
    );
    o.ranker = Some(PolicySource::parse("count-rank"));
    o.profile = None;
    o.layer_choice = LayerChoice::Uniform;
    let err = convert(&bf16_model(), &tmp.path().join("y"), &o).unwrap_err();
    assert!(format!("{err:#}").contains("needs --profile"), "{err:#}");
    assert!(!tmp.path().join("x").exists() && !tmp.path().join("y").exists());
}

/// `--activations q8` on int4 and int8 copies: its int8-activation arithmetic is defined, so
/// any memory budget and thread count give the same logits and routing in that mode; it stays
/// close to the exact f32 arithmetic, and differs from it (the mode is really used). A CPU
/// without AVX-512 VNNI refuses the mode, naming what it lacks.
#[test]
fn int8_activations_keep_the_invariant_within_their_mode() {
    for bits in ["int4", "int8"] {
        int8_activations_on(bits);
    }
}

fn int8_activations_on(bits: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join(bits);
    quantize_experts(bits, &model);
    let ids = "1,41,93,7,204,30,15,99,100,5,17,23,42,88,31,102";
    let forward = |extra: &[&str], name: &str| {
        let out = tmp.path().join(name);
        let o = moehost()
            .args(extra)
            .args(["forward", "--ids", ids, "--model"])
            .arg(&model)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        (o, out)
    };
    let tensor = |path: &Path, name: &str| -> Vec<u8> {
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensor(name).unwrap().data().to_vec()
    };
    let f32s = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let (o, q8) = forward(&["--activations", "q8"], "q8.safetensors");
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("VNNI"), "{err}");
        eprintln!("skipped: {err}");
        return;
    }
    let (o, q8_one_thread) = forward(
        &["--activations", "q8", "--threads", "1"],
        "q8-1.safetensors",
    );
    assert_ok(&o);
    let (o, exact) = forward(&[], "exact.safetensors");
    assert_ok(&o);
    // Tight budgets: every expert through the host tier's storage bytes and back.
    let out = tmp.path().join("q8-tight.safetensors");
    let o = moehost()
        .args(["--activations", "q8", "forward", "--ids", ids, "--model"])
        .arg(&model)
        .args(["--device-mem", "64KiB", "--host-mem", "128KiB", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_ok(&o);
    for other in [&q8_one_thread, &out] {
        assert_eq!(tensor(&q8, "logits"), tensor(other, "logits"));
        assert_eq!(
            tensor(&q8, "routed_experts"),
            tensor(other, "routed_experts")
        );
    }
    let (a, b) = (
        f32s(&tensor(&q8, "logits")),
        f32s(&tensor(&exact, "logits")),
    );
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = max_abs_diff(&a, &b);
    assert!(d > 0.0, "{bits}: the q8 mode changed nothing");
    assert!(
        d < 0.05 * scale,
        "{bits}: q8 logits {d} from exact (scale {scale})"
    );
}
