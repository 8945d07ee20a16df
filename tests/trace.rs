//! Routing traces: the public format read back exactly, every kind of bad file refused with a
//! message naming it, `trace record` on the bundled model (routing identical to `forward`,
//! tokens identical to `generate`) and replayed, `trace import` / `export` round trips, and
//! FLAME-MoE-Traces' dense CSV imported like the JSON-lines conversion of the same routing.

mod support;

use support::{assert_ok, batch1_path, moehost};

use moehost::trace::{import_jsonl, ImportOptions, Trace};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

#[test]
fn reads_the_shared_trace() {
    let t = Trace::load(&batch1_path()).unwrap();
    let m = &t.meta;
    assert_eq!(m.model, "tiny-k2");
    assert_eq!(m.kind, "decode");
    assert_eq!(m.n_routed_experts, 64);
    assert_eq!(m.moe_layers, (1..=7).collect::<Vec<u32>>());
    assert_eq!(m.k, 6);
    assert_eq!(m.expert_bytes, 98_304);
    let s = t.summary();
    assert_eq!((s.tokens, s.steps, s.docs), (3200, 20 * 129, 20));
    assert!(!s.has_speculative && !s.has_token_ids);
    // Every continuation: one 32-token prompt step, then 128 one-token steps.
    assert_eq!(t.step[..33], [[0; 32].as_slice(), &[1]].concat()[..]);
    assert_eq!(t.row(0, 0).len(), 6);
    // Saved and read back: identical.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("copy.safetensors");
    t.save(&p).unwrap();
    assert_eq!(Trace::load(&p).unwrap(), t);
}

// ---------------------------------------------------------------------------------------------
// Bad files

/// A trace file from parts; `None` leaves a tensor out.
struct Parts {
    meta: HashMap<String, String>,
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
}

fn good_parts() -> Parts {
    // 3 tokens x 2 layers x k=2, 4 experts.
    let i32b = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let f32b = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let meta: HashMap<String, String> = [
        ("format", "moehost-trace/1"),
        ("model", "toy"),
        ("kind", "decode"),
        ("n_routed_experts", "4"),
        ("moe_layers", "[1, 2]"),
        ("k", "2"),
        ("expert_bytes", "1000"),
        ("how", "by hand"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    Parts {
        meta,
        tensors: vec![
            (
                "experts".into(),
                Dtype::I32,
                vec![3, 2, 2],
                i32b(&[0, 1, 2, 3, 1, 2, 0, 3, 2, 3, -1, 1]),
            ),
            (
                "weights".into(),
                Dtype::F32,
                vec![3, 2, 2],
                f32b(&[0.5; 12]),
            ),
            ("step".into(), Dtype::I32, vec![3], i32b(&[0, 0, 1])),
            ("doc".into(), Dtype::I32, vec![3], i32b(&[0, 0, 0])),
        ],
    }
}

impl Parts {
    fn write(&self, path: &Path) {
        let views: Vec<(String, TensorView)> = self
            .tensors
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let meta = (!self.meta.is_empty()).then(|| self.meta.clone());
        safetensors::serialize_to_file(views, meta, path).unwrap();
    }

    fn without(mut self, name: &str) -> Self {
        self.tensors.retain(|t| t.0 != name);
        self
    }

    fn set_meta(mut self, k: &str, v: Option<&str>) -> Self {
        match v {
            Some(v) => self.meta.insert(k.into(), v.into()),
            None => self.meta.remove(k),
        };
        self
    }

    fn tensor(mut self, name: &str, dtype: Dtype, shape: &[usize], bytes: Vec<u8>) -> Self {
        self.tensors.retain(|t| t.0 != name);
        self.tensors
            .push((name.into(), dtype, shape.to_vec(), bytes));
        self
    }
}

fn refused(parts: Parts, want: &str) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad-trace.safetensors");
    parts.write(&p);
    let e = format!("{:#}", Trace::load(&p).unwrap_err());
    assert!(e.contains("bad-trace.safetensors"), "{e}");
    assert!(e.contains(want), "wanted {want:?} in: {e}");
    // The CLI says the same, on one line, with a failing status.
    let out = moehost().args(["trace", "info"]).arg(&p).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(want) && err.contains("bad-trace.safetensors"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
}

#[test]
fn bad_files_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ok = dir.path().join("ok.safetensors");
    good_parts().write(&ok);
    let t = Trace::load(&ok).unwrap();
    assert_eq!(t.row(2, 1), [-1, 1]);

    let i32b = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    refused(good_parts().without("step"), "tensor \"step\" is missing");
    refused(
        good_parts().without("weights"),
        "tensor \"weights\" is missing",
    );
    refused(
        good_parts().tensor("experts", Dtype::F32, &[3, 2, 2], vec![0; 48]),
        "tensor \"experts\" is F32, expected I32",
    );
    refused(
        good_parts().tensor("experts", Dtype::I32, &[3, 2, 1], vec![0; 24]),
        "tensor \"experts\" has shape [3, 2, 1], expected [3, 2, 2]",
    );
    refused(
        good_parts().tensor("doc", Dtype::I32, &[2], i32b(&[0, 0])),
        "tensor \"doc\" has shape [2], expected [3]",
    );
    refused(
        good_parts().set_meta("moe_layers", Some("[1, 2, 3]")),
        "tensor \"experts\" has shape [3, 2, 2], expected [3, 3, 2]",
    );
    refused(
        good_parts().set_meta("moe_layers", Some("1,2")),
        "metadata moe_layers = \"1,2\" is not a JSON list",
    );
    refused(
        good_parts().set_meta("k", Some("two")),
        "metadata k = \"two\" is not a non-negative integer",
    );
    refused(
        good_parts().set_meta("n_routed_experts", None),
        "metadata key \"n_routed_experts\" is missing",
    );
    refused(
        good_parts().set_meta("format", Some("other/2")),
        "metadata format is \"other/2\", expected \"moehost-trace/1\"",
    );
    refused(
        good_parts().set_meta("n_routed_experts", Some("3")),
        "experts[0, 1, 1] = 3 is out of range (0..3, or -1 for none)",
    );
    refused(
        good_parts().tensor("step", Dtype::I32, &[3], i32b(&[0, 1, 0])),
        "step must be non-decreasing",
    );
    refused(
        good_parts().tensor("speculative", Dtype::F32, &[3, 2, 5], vec![0; 120]),
        "tensor \"speculative\" has shape [3, 2, 5], expected [3, 2, 4]",
    );
    let mut no_meta = good_parts();
    no_meta.meta.clear();
    refused(no_meta, "has no __metadata__");
    // Not safetensors at all.
    let p = dir.path().join("bad-trace.safetensors");
    std::fs::write(&p, b"{\"hello\": 1}").unwrap();
    let e = format!("{:#}", Trace::load(&p).unwrap_err());
    assert!(
        e.contains("bad-trace.safetensors: not a safetensors file"),
        "{e}"
    );
    let e = format!(
        "{:#}",
        Trace::load(&dir.path().join("absent.safetensors")).unwrap_err()
    );
    assert!(
        e.contains("cannot read trace") && e.contains("absent.safetensors"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// JSON lines

/// A small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// (doc, token, layer) -> (experts, weights), as a dump would hold them.
type Records = Vec<((i64, i64, u32), Vec<i64>, Vec<f32>)>;

fn random_records(seed: u64) -> Records {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    for doc in [3i64, 0, 7] {
        for token in 0..(2 + rng.next(6) as i64) {
            for layer in [1u32, 2, 3, 5] {
                if rng.next(5) == 0 {
                    continue; // a (token, layer) without a record
                }
                let mut ex: Vec<i64> = Vec::new();
                while ex.len() < 3 {
                    let x = rng.next(16) as i64;
                    if !ex.contains(&x) {
                        ex.push(x);
                    }
                }
                let w: Vec<f32> = (0..3).map(|_| rng.next(8) as f32 / 8.0).collect();
                out.push(((doc, token * 10, layer), ex, w));
            }
        }
    }
    out
}

fn write_jsonl(path: &Path, recs: &Records) {
    let mut text = String::new();
    for ((doc, token, layer), ex, w) in recs.iter().rev() {
        let v = serde_json::json!({"doc": doc, "token": token, "layer": layer, "experts": ex, "weights": w});
        text.push_str(&format!("{v}\n\n"));
    }
    std::fs::write(path, text).unwrap();
}

/// (doc, layer, experts ascending, weights aligned) per record, for comparing sets.
fn normalise(recs: &Records) -> BTreeSet<(i64, u32, Vec<i64>, Vec<u32>)> {
    recs.iter()
        .map(|((doc, _, layer), ex, w)| {
            let mut p: Vec<(i64, f32)> = ex.iter().copied().zip(w.iter().copied()).collect();
            p.sort_by_key(|x| x.0);
            (
                *doc,
                *layer,
                p.iter().map(|x| x.0).collect(),
                p.iter().map(|x| x.1.to_bits()).collect(),
            )
        })
        .collect()
}

#[test]
fn import_and_export_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let recs = random_records(0x5eed);
    let input = dir.path().join("dump.jsonl");
    write_jsonl(&input, &recs);
    let out = dir.path().join("imported.safetensors");
    let status = moehost()
        .args(["trace", "import", "--from", "jsonl"])
        .arg(&input)
        .arg("--out")
        .arg(&out)
        .args(["--expert-bytes", "k2-fp8", "--model-name", "dump"])
        .status()
        .unwrap();
    assert!(status.success());
    let t = Trace::load(&out).unwrap();
    assert_eq!(t.meta.moe_layers, [1, 2, 3, 5]);
    assert_eq!(t.meta.k, 3);
    assert_eq!(t.meta.n_routed_experts, 16);
    assert_eq!(t.meta.expert_bytes, 44_050_944);
    assert_eq!(t.meta.model, "dump");
    // One step per distinct (doc, token), ordered by doc then token.
    let mut tokens: Vec<(i64, i64)> = recs.iter().map(|r| (r.0 .0, r.0 .1)).collect();
    tokens.sort();
    tokens.dedup();
    assert_eq!(t.tokens(), tokens.len());
    assert_eq!(t.step, (0..tokens.len() as i32).collect::<Vec<_>>());
    assert_eq!(t.doc, tokens.iter().map(|x| x.0 as i32).collect::<Vec<_>>());
    for ((doc, token, layer), ex, _) in &recs {
        let ti = tokens.iter().position(|x| *x == (*doc, *token)).unwrap();
        let li = [1, 2, 3, 5].iter().position(|l| l == layer).unwrap();
        let mut want: Vec<i32> = ex.iter().map(|&x| x as i32).collect();
        want.sort();
        assert_eq!(t.row(ti, li), want);
    }
    // A (token, layer) without a record has no expert.
    let missing = (0..t.tokens())
        .flat_map(|ti| (0..4).map(move |li| (ti, li)))
        .filter(|&(ti, li)| t.row(ti, li) == [-1, -1, -1])
        .count();
    assert_eq!(missing, t.tokens() * 4 - recs.len());

    // Export, then import again: the same trace.
    let exported = moehost()
        .args(["trace", "export"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(exported.status.success());
    let text = String::from_utf8(exported.stdout).unwrap();
    assert_eq!(text.lines().count(), recs.len());
    let back: Records = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let ex: Vec<i64> = serde_json::from_value(v["experts"].clone()).unwrap();
            let w: Vec<f32> = serde_json::from_value(v["weights"].clone()).unwrap();
            (
                (
                    v["doc"].as_i64().unwrap(),
                    v["token"].as_i64().unwrap(),
                    v["layer"].as_u64().unwrap() as u32,
                ),
                ex,
                w,
            )
        })
        .collect();
    assert_eq!(normalise(&back), normalise(&recs));
    let again = dir.path().join("again.jsonl");
    std::fs::write(&again, &text).unwrap();
    let t2 = import_jsonl(
        &again,
        &ImportOptions {
            n_routed_experts: Some(16),
            expert_bytes: Some(44_050_944),
            model: Some("dump".into()),
        },
    )
    .unwrap();
    assert_eq!(t2.experts, t.experts);
    assert_eq!(t2.weights, t.weights);
    assert_eq!(t2.doc, t.doc);
    assert_eq!(t2.step, t.step);
}

#[test]
fn a_decode_trace_survives_export_and_import() {
    // decode-batch1's one-token steps come back as the same steps (prompts, one step of 32
    // tokens each, become 32 steps): the decode part replays identically.
    let t = Trace::load(&batch1_path()).unwrap();
    let mut buf = Vec::new();
    moehost::trace::export_jsonl(&t, &mut buf).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b1.jsonl");
    std::fs::write(&p, &buf).unwrap();
    let back = import_jsonl(
        &p,
        &ImportOptions {
            n_routed_experts: Some(64),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(back.tokens(), t.tokens());
    assert_eq!(back.experts, t.experts);
    assert_eq!(back.weights, t.weights);
    assert_eq!(back.doc, t.doc);
    assert_eq!(back.summary().steps, 3200);
}

fn import_fails(lines: &str, opts: ImportOptions, want: &str) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dump.jsonl");
    std::fs::write(&p, lines).unwrap();
    let e = format!("{:#}", import_jsonl(&p, &opts).unwrap_err());
    assert!(
        e.contains("dump.jsonl") && e.contains(want),
        "wanted {want:?} in: {e}"
    );
}

#[test]
fn malformed_jsonl_names_the_line() {
    let good = r#"{"doc": 0, "token": 0, "layer": 1, "experts": [1, 2], "weights": [0.5, 0.5]}"#;
    let none = ImportOptions::default();
    import_fails(
        &format!("{good}\n\n{{\"doc\": 0, \"token\": 1, \"layer\": 1, \"experts\": [1, 2]\n"),
        none.clone(),
        "line 3: not a routing record",
    );
    import_fails(
        &format!(
            "{good}\n{{\"token\": 1, \"layer\": 1, \"experts\": [1, 2], \"weights\": [1.0]}}\n"
        ),
        none.clone(),
        "line 2: 1 weights for 2 experts",
    );
    import_fails(
        &format!("{good}\n{{\"token\": 1, \"layer\": 1, \"experts\": []}}\n"),
        none.clone(),
        "line 2: \"experts\" is empty",
    );
    import_fails(
        &format!("{good}\n{{\"layer\": 1, \"experts\": [3]}}\n"),
        none.clone(),
        "line 2: not a routing record (missing field `token`",
    );
    import_fails(
        &format!("{good}\n{{\"token\": 0, \"layer\": 2, \"experts\": [-4]}}\n"),
        none.clone(),
        "line 2: expert id -4 is out of range",
    );
    import_fails(
        &format!("{good}\n{good}\n"),
        none.clone(),
        "line 2: doc 0 token 0 layer 1 was already given on line 1",
    );
    import_fails(
        &format!("{good}\n{{\"token\": 1, \"layer\": 1, \"experts\": [7]}}\n"),
        ImportOptions {
            n_routed_experts: Some(4),
            ..Default::default()
        },
        "line 2: expert id 7 is out of range (0..4)",
    );
    import_fails("\n\n", none, "no routing records");
    // Through the CLI: one line, status 1.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dump.jsonl");
    std::fs::write(&p, format!("{good}\nnot json\n")).unwrap();
    let out = moehost()
        .args(["trace", "import", "--from", "jsonl"])
        .arg(&p)
        .arg("--out")
        .arg(dir.path().join("x.safetensors"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dump.jsonl: line 2: not a routing record"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Recording on the bundled model

const PROMPTS: [&str; 2] = [
    "<|bos|>The quick brown fox",
    "<|bos|>THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY",
];

/// FLAME-MoE-Traces' own per-layer CSV export (the first 64 rows of each MoE layer of the
/// published encoder batch, `tests/data/traces/flame-csv/`) imports to exactly the routing of
/// the JSON-lines conversion behind `flame-moe-290m.safetensors`, made independently from the
/// dataset's `.pt` files: the first 8 positions of each of the 8 sequences.
#[test]
fn flame_dense_csv_imports_like_the_jsonl_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("flame.safetensors");
    let csv = support::data_dir().join("traces/flame-csv");
    let layers: Vec<_> = (2..=9).map(|l| csv.join(format!("layer{l}.csv"))).collect();
    let run = moehost()
        .args(["trace", "import", "--from", "dense-csv"])
        .args(&layers)
        .args([
            "--interleave",
            "8",
            "--model-name",
            "flame-moe-290m",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert_ok(&run);
    let got = Trace::load(&out).unwrap();
    let full = Trace::load(&support::data_dir().join("traces/flame-moe-290m.safetensors")).unwrap();
    assert_eq!((got.tokens(), got.layers(), got.k()), (64, 8, 6));
    assert_eq!(got.meta.n_routed_experts, 64);
    let (l, k) = (8, 6);
    for doc in 0..8usize {
        for pos in 0..8usize {
            let g = doc * 8 + pos;
            let f = doc * 256 + pos;
            assert_eq!(got.doc[g], doc as i32);
            assert_eq!(
                got.experts[g * l * k..(g + 1) * l * k],
                full.experts[f * l * k..(f + 1) * l * k],
                "doc {doc} position {pos}"
            );
            assert_eq!(
                got.weights[g * l * k..(g + 1) * l * k],
                full.weights[f * l * k..(f + 1) * l * k]
            );
        }
    }
    // Read as one sequence, the same rows are position-major: another order of steps.
    let plain = moehost::trace::import_dense_csv(&layers, 1, &ImportOptions::default()).unwrap();
    assert_eq!(
        plain.experts[l * k..2 * l * k],
        got.experts[8 * l * k..9 * l * k]
    );
    assert!(plain.doc.iter().all(|&d| d == 0));
}

#[test]
fn malformed_dense_csv_names_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let good = write(
        "a.csv",
        "layer_id,token_id,expert_0,expert_1,expert_2\n0,0,0.5,0,0.25\n0,1,0,0.7,0.1\n",
    );
    let fails = |files: &[std::path::PathBuf], want: &str| {
        let err =
            moehost::trace::import_dense_csv(files, 1, &ImportOptions::default()).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(want), "{msg}");
    };
    let t =
        moehost::trace::import_dense_csv(std::slice::from_ref(&good), 1, &ImportOptions::default())
            .unwrap();
    assert_eq!((t.tokens(), t.k(), t.meta.n_routed_experts), (2, 2, 3));
    assert_eq!(t.experts, vec![0, 2, 1, 2]);
    let bad_header = write("h.csv", "token,e0,e1\n0,1,0\n");
    fails(&[bad_header], "not a dense routing CSV");
    let narrow = write(
        "n.csv",
        "layer_id,token_id,expert_0,expert_1\n0,0,1,0\n0,1,1,0\n",
    );
    fails(&[good.clone(), narrow], "2 expert columns, but");
    let negative = write(
        "m.csv",
        "layer_id,token_id,expert_0,expert_1\n0,0,1,0\n0,1,-1,1\n",
    );
    fails(
        &[negative],
        "m.csv: line 3: expert_0 is \"-1\", not a probability",
    );
    let empty_row = write("z.csv", "layer_id,token_id,expert_0,expert_1\n0,0,0,0\n");
    fails(
        &[empty_row],
        "z.csv: line 2: no expert has a probability above 0",
    );
    let short = write("s.csv", "layer_id,token_id,expert_0,expert_1\n0,0,1\n");
    fails(&[short], "s.csv: line 2: 3 fields, the header has 4");
    fails(&[], "no CSV file given");
}

#[test]
fn record_on_the_bundled_model_then_replay() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    let text: String = PROMPTS
        .iter()
        .map(|p| format!("{}\n", serde_json::json!({ "prompt": p })))
        .collect();
    std::fs::write(&prompts, text).unwrap();
    let out = dir.path().join("rec.safetensors");
    let max_tokens = 5;
    let status = moehost()
        .args(["trace", "record", "--prompts"])
        .arg(&prompts)
        .arg("--out")
        .arg(&out)
        .args(["--max-tokens", &max_tokens.to_string(), "--speculative"])
        .status()
        .unwrap();
    assert!(status.success());
    let t = Trace::load(&out).unwrap();
    assert_eq!(t.meta.model, "tiny-k2");
    assert_eq!(t.meta.moe_layers, (1..=7).collect::<Vec<u32>>());
    assert_eq!((t.meta.k, t.meta.n_routed_experts), (6, 64));
    assert_eq!(t.meta.expert_bytes, 3 * 256 * 64 * 2, "bf16 expert bytes");

    // The same model through the library: prefill routing and greedy tokens.
    let engine = moehost::Engine::open(&support::bf16_model()).unwrap();
    let ids = t.token_ids.clone().unwrap();
    let mut at = 0usize;
    let mut step = 0i32;
    for (d, p) in PROMPTS.iter().enumerate() {
        let prompt = engine.encode(p).unwrap();
        let gen = engine
            .generate(&prompt, max_tokens, &Default::default(), |_| {})
            .unwrap();
        let n = prompt.len();
        // Prefill: one step, routing identical to `forward`.
        assert!(t.step[at..at + n].iter().all(|&s| s == step));
        assert!(t.doc[at..at + n].iter().all(|&x| x == d as i32));
        let dump = moehost::forward_dump::run(&engine.model, &prompt).unwrap();
        assert_eq!(&t.experts[at * 42..(at + n) * 42], &dump.routed_experts[..]);
        assert_eq!(&t.weights[at * 42..(at + n) * 42], &dump.routed_weights[..]);
        assert_eq!(
            ids[at..at + n],
            prompt.iter().map(|&x| x as i32).collect::<Vec<_>>()[..]
        );
        at += n;
        step += 1;
        // Decode: one step per generated token fed back, the greedy continuation.
        let fed = gen.ids.len().min(max_tokens);
        assert_eq!(
            ids[at..at + fed],
            gen.ids.iter().map(|&x| x as i32).collect::<Vec<_>>()[..fed]
        );
        for i in 0..fed {
            assert_eq!(t.step[at + i], step + i as i32);
        }
        at += fed;
        step += fed as i32;
    }
    assert_eq!(at, t.tokens());

    // Speculative scores: [tokens, 7, 64]; layer 0 unused, the others sigmoid + bias scores
    // whose top-6 overlaps the routing of that layer (they predict it).
    let spec = t.speculative.as_ref().unwrap();
    assert_eq!(spec.len(), t.tokens() * 7 * 64);
    let mut overlap = 0usize;
    let mut total = 0usize;
    for tok in 0..t.tokens() {
        assert!(spec[tok * 7 * 64..tok * 7 * 64 + 64]
            .iter()
            .all(|&x| x == 0.0));
        for l in 1..7 {
            let row = &spec[(tok * 7 + l) * 64..(tok * 7 + l + 1) * 64];
            assert!(row.iter().all(|x| x.is_finite()) && row.iter().any(|&x| x != 0.0));
            let mut order: Vec<usize> = (0..64).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            let routed = t.row(tok, l);
            overlap += order[..6]
                .iter()
                .filter(|&&e| routed.contains(&(e as i32)))
                .count();
            total += 6;
        }
    }
    assert!(
        overlap * 4 > total,
        "speculative top-6 predicts {overlap}/{total}"
    );

    // Replay it, with the prefetch policy that needs the speculative scores.
    let rep = moehost()
        .args(["replay", "--trace"])
        .arg(&out)
        .args([
            "--eviction",
            "lru",
            "--prefetch",
            "next-layer-gate",
            "--prefetch",
            "none",
        ])
        .args(["--capacity", "25%", "--json"])
        .output()
        .unwrap();
    assert!(
        rep.status.success(),
        "{}",
        String::from_utf8_lossy(&rep.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&rep.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    let policies: Vec<&str> = rows.iter().map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(
        policies,
        [
            "belady",
            "oracle-prefetch",
            "lru+next-layer-gate",
            "lru+none"
        ]
    );
    let gate = &rows[2];
    assert!(gate["prefetch_issued"].as_u64().unwrap() > 0, "{gate}");
    assert!(gate["prefetch_used"].as_u64().unwrap() > 0, "{gate}");
    assert_eq!(rows[3]["prefetch_issued"], 0);
    assert_eq!(rows[0]["tokens"].as_u64().unwrap() as usize, t.tokens());
}

#[test]
fn record_refuses_bad_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("prompts.jsonl");
    for (text, want) in [
        (
            "{\"prompt\": \"a\"}\n{\"text\": \"b\"}\n",
            "line 2: needs a string \"prompt\" field",
        ),
        ("{\"prompt\": \"\"}\n", "line 1: the prompt is empty"),
        ("[1, 2\n", "line 1: not a JSON object"),
        ("\n", "no prompts"),
    ] {
        std::fs::write(&p, text).unwrap();
        let out = moehost()
            .args(["trace", "record", "--prompts"])
            .arg(&p)
            .arg("--out")
            .arg(dir.path().join("x.safetensors"))
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("prompts.jsonl") && err.contains(want), "{err}");
    }
}
