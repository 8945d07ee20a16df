//! Model folders as their owners publish them: Kimi-K2's `tiktoken.model` tokenizer (against
//! ids the `tiktoken` library gave), the cheap files checked before any weight is read, and the
//! parts of a folder moehost refuses or skips on purpose.

mod support;

use moehost::tokenizer::Tokenizer;
use support::{assert_ok, moehost};

#[test]
fn kimi_tiktoken_folder_tokenizes_exactly_as_tiktoken() {
    let tok = Tokenizer::from_dir(&support::kimi_tokenizer_dir()).unwrap();
    assert!(matches!(tok, Tokenizer::Tiktoken { .. }));
    let expected = support::kimi_expected();
    assert!(expected.cases.len() >= 10);
    for (text, ids) in &expected.cases {
        assert_eq!(&tok.encode(text, None).unwrap(), ids, "{text:?}");
        assert_eq!(&tok.decode(ids, false).unwrap(), text);
    }
    // Special tokens by name, at Kimi-K2's offsets after the ranks.
    let r = expected.ranks;
    for (name, offset) in [
        ("[BOS]", 0),
        ("[EOS]", 1),
        ("<|im_end|>", 2),
        ("<|im_user|>", 3),
        ("<|im_assistant|>", 4),
        ("<|im_system|>", 10),
        ("<|tool_calls_section_begin|>", 11),
        ("<|tool_call_end|>", 15),
        ("<|im_middle|>", 17),
    ] {
        assert_eq!(tok.token_to_id(name), Some(r + offset), "{name}");
    }
    let reserved = format!("<|reserved_token_{}|>", r + 100);
    assert_eq!(tok.token_to_id(&reserved), Some(r + 100));
    assert_eq!(tok.vocab_size(), r as usize + 256);
    // Decoding for the user leaves special tokens out.
    let chat = &expected.cases.last().unwrap().1;
    let plain = tok.decode(chat, true).unwrap();
    assert!(!plain.contains("<|im_") && plain.contains("What is 2+2?"));
}

#[test]
fn kimi_layout_folder_generates_from_tiktoken_ids() {
    let dir = support::kimi_layout_folder();
    let expected = support::kimi_expected();
    let (text, ids) = &expected.cases[2]; // Chinese
    let out = moehost()
        .args(["generate", "--max-tokens", "3", "--json", "--prompt", text])
        .arg("--model")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<u32> = v["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    // tokenizer_config.json sets no add_bos_token: the prompt is tiktoken's ids alone.
    assert_eq!(&got, ids);
}

/// Writes a folder whose weights cannot be read (a shard of garbage) next to the bundled
/// config.json, plus `files`; returns the error `moehost generate` prints.
fn error_before_weights(files: &[(&str, &[u8])]) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        support::bf16_model().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    fails(&["generate", "--prompt", "x"], dir.path())
}

#[test]
fn tokenizer_and_chat_template_are_checked_before_any_weight() {
    let tt = std::fs::read(support::kimi_tokenizer_dir().join("tiktoken.model")).unwrap();
    let cfg = std::fs::read(support::kimi_tokenizer_dir().join("tokenizer_config.json")).unwrap();

    let err = error_before_weights(&[]);
    assert!(err.contains("no tokenizer"), "{err}");

    let err = error_before_weights(&[
        ("tiktoken.model", b"@@@ 0\n"),
        ("tokenizer_config.json", &cfg),
    ]);
    assert!(
        err.contains("tiktoken.model") && err.contains("base64"),
        "{err}"
    );

    let err = error_before_weights(&[("tokenizer.json", b"{ not json")]);
    assert!(err.contains("tokenizer.json"), "{err}");

    let err = error_before_weights(&[
        ("tiktoken.model", &tt),
        ("tokenizer_config.json", &cfg),
        (
            "chat_template.jinja",
            b"{% for m in messages %}{{ m.content }",
        ),
    ]);
    assert!(err.contains("chat_template.jinja"), "{err}");

    // With every cheap file good, the error is the weights'.
    let err = error_before_weights(&[("tiktoken.model", &tt), ("tokenizer_config.json", &cfg)]);
    assert!(err.contains("model.safetensors"), "{err}");
}

/// DeepSeek-V3 ships one multi-token-prediction layer after its decoder layers
/// (`num_nextn_predict_layers` 1, tensors `model.layers.61.*`): moehost says it skips it and
/// runs the decoder exactly as without it.
#[test]
fn multi_token_prediction_layer_is_skipped_and_said_so() {
    let src = support::data_dir().join("variants/dsv3-groups");
    let mtp_layer = 3; // num_hidden_layers
    let extra: Vec<(String, Vec<usize>, Vec<u8>)> = [
        ("eh_proj.weight", vec![64, 128]),
        ("enorm.weight", vec![64]),
        ("hnorm.weight", vec![64]),
    ]
    .into_iter()
    .map(|(n, shape)| {
        let len = shape.iter().product::<usize>() * 4;
        (
            format!("model.layers.{mtp_layer}.{n}"),
            shape,
            vec![0u8; len],
        )
    })
    .collect();
    let dir = variant_copy(
        "dsv3-groups",
        |c| {
            assert_eq!(c["num_hidden_layers"], mtp_layer);
            c["num_nextn_predict_layers"] = 1.into();
        },
        |_, b| Some(b.to_vec()),
        &extra,
    );
    let golden = support::Golden::from_path(&src.join("golden.safetensors"));
    let ids: Vec<String> = golden
        .ids(0, "input_ids")
        .iter()
        .map(|i| i.to_string())
        .collect();
    let run = |model: &std::path::Path| {
        let out_path = dir.path().join("out.safetensors");
        let out = moehost()
            .args(["forward", "--ids", &ids.join(","), "--out"])
            .arg(&out_path)
            .arg("--model")
            .arg(model)
            .output()
            .unwrap();
        assert_ok(&out);
        (
            std::fs::read(&out_path).unwrap(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (with_mtp, said) = run(dir.path());
    assert!(
        said.contains("multi-token-prediction")
            && said.contains(&format!("model.layers.{mtp_layer}")),
        "{said}"
    );
    let (without, said) = run(&src);
    assert!(!said.contains("multi-token-prediction"));
    assert_eq!(with_mtp, without);
}

/// Kimi-K2-Thinking's layout (compressed-tensors INT4 experts): `convert` keeps the experts
/// packed as stored and the result runs; keeping every layer and expert gives the source's
/// logits bit for bit. `bench --baseline` reports it next to the float original.
#[test]
fn int4_folder_converts_and_benches_against_its_original() {
    let src = support::data_dir().join("variants/dsv3-groups-int4");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mini");
    let run = |args: &[&str]| {
        let o = moehost().args(args).output().unwrap();
        assert_ok(&o);
        o
    };
    let s = src.to_str().unwrap();
    run(&[
        "convert",
        "--model",
        s,
        "--out",
        out.to_str().unwrap(),
        "--layers",
        "3",
        "--experts",
        "64",
        "--uniform",
    ]);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["quantization_config"]["quant_method"],
        "compressed-tensors"
    );
    let shard = std::fs::read(out.join("model-00001-of-00001.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&shard).unwrap();
    let packed = st
        .tensor("model.layers.1.mlp.experts.5.gate_proj.weight_packed")
        .unwrap();
    assert_eq!(packed.dtype(), safetensors::Dtype::I32);
    let ids = "0,17,99,3,250,41,7";
    let logits = |model: &str| {
        let f = dir.path().join(format!("{}.safetensors", model.len()));
        run(&[
            "forward",
            "--model",
            model,
            "--ids",
            ids,
            "--out",
            f.to_str().unwrap(),
        ]);
        let bytes = std::fs::read(&f).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensor("logits").unwrap().data().to_vec()
    };
    assert_eq!(logits(out.to_str().unwrap()), logits(s));

    let base = support::data_dir().join("variants/dsv3-groups");
    let o = run(&[
        "bench",
        "--model",
        s,
        "--baseline",
        base.to_str().unwrap(),
        "--prompt-tokens",
        "32",
        "--decode-tokens",
        "8",
        "--repeats",
        "1",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["model"]["model"]
        .as_str()
        .unwrap()
        .ends_with("dsv3-groups-int4"));
    assert!(v["baseline"]["model"]
        .as_str()
        .unwrap()
        .ends_with("dsv3-groups"));
    let ratio = v["decode_ratio"].as_f64().unwrap();
    let want = v["model"]["decode_tokens_per_s"].as_f64().unwrap()
        / v["baseline"]["decode_tokens_per_s"].as_f64().unwrap();
    assert!((ratio - want).abs() < 1e-9 && ratio > 0.0);
}

/// A damaged INT4 (compressed-tensors) folder fails naming the tensor: a missing scale when
/// opened, a `weight_shape` that disagrees with the packed data when the expert is read.
#[test]
fn damaged_int4_experts_are_named() {
    let forward = ["forward", "--ids", "0,5,9", "--out", "/dev/null"];
    let scale = "model.layers.1.mlp.experts.7.up_proj.weight_scale";
    let dir = variant_copy(
        "dsv3-groups-int4",
        |_| {},
        |n, b| (n != scale).then(|| b.to_vec()),
        &[],
    );
    let err = fails(&forward, dir.path());
    assert!(err.contains(scale), "{err}");
    // Every weight_shape says [1, 8], in its own integer width.
    let dir = variant_copy(
        "dsv3-groups-int4",
        |_| {},
        |n, b| {
            Some(match (n.ends_with(".weight_shape"), b.len()) {
                (false, _) => b.to_vec(),
                (true, 16) => [1i64, 8].iter().flat_map(|v| v.to_le_bytes()).collect(),
                (true, _) => [1i32, 8].iter().flat_map(|v| v.to_le_bytes()).collect(),
            })
        },
        &[],
    );
    let err = fails(&forward, dir.path());
    assert!(
        err.contains(".weight_shape") && err.contains("[1, 8]"),
        "{err}"
    );
}

/// A tokenizer.json whose post-processor prepends BOS (as DeepSeek-V3's does): a text that
/// already starts with the BOS token gets one BOS, not two (tests/data/bos-tokenizer, made with
/// the `tokenizers` library, which itself gives two).
#[test]
fn a_prompt_starting_with_bos_gets_one() {
    let tok = Tokenizer::from_dir(&support::data_dir().join("bos-tokenizer")).unwrap();
    let (h, i) = (b'H' as u32, b'i' as u32);
    assert_eq!(tok.encode("Hi", Some(0)).unwrap(), [0, h, i]);
    assert_eq!(tok.encode("<|bos|>Hi", Some(0)).unwrap(), [0, h, i]);
    // A model without a BOS token: the tokenizer's output as it is.
    assert_eq!(tok.encode("<|bos|>Hi", None).unwrap(), [0, 0, h, i]);
    // A tokenizer that adds nothing keeps the BOS tokens the text has, however many.
    let plain = Tokenizer::from_dir(&support::data_dir().join("variants/grouped")).unwrap();
    assert_eq!(
        plain.encode("<|bos|><|bos|>Hi", Some(0)).unwrap(),
        [0, 0, h, i]
    );
    // tiktoken folders add BOS only with add_bos_token (Kimi-K2 sets none).
    let kimi = Tokenizer::from_dir(&support::kimi_tokenizer_dir()).unwrap();
    let bos = support::kimi_expected().ranks;
    assert_eq!(kimi.encode("[BOS]x", Some(bos)).unwrap()[..1], [bos]);
    assert_ne!(kimi.encode("x", Some(bos)).unwrap()[0], bos);
    let dir = tempfile::tempdir().unwrap();
    let src = support::kimi_tokenizer_dir();
    std::fs::copy(
        src.join("tiktoken.model"),
        dir.path().join("tiktoken.model"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("tokenizer_config.json")).unwrap()).unwrap();
    cfg["add_bos_token"] = true.into();
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let with_bos = Tokenizer::from_dir(dir.path()).unwrap();
    let x = kimi.encode("x", None).unwrap();
    assert_eq!(
        with_bos.encode("x", Some(bos)).unwrap(),
        [&[bos], &x[..]].concat()
    );
    assert_eq!(
        with_bos.encode("[BOS]x", Some(bos)).unwrap(),
        [&[bos], &x[..]].concat()
    );
}

/// A shard of NaN weights is an error naming where it shows, never garbage tokens.
#[test]
fn non_finite_weights_are_an_error_naming_the_layer() {
    let target = "model.layers.1.self_attn.o_proj.weight";
    let dir = variant_copy(
        "dsv3-groups",
        |_| {},
        |n, b| {
            Some(if n == target {
                b.chunks(4).flat_map(|_| f32::NAN.to_le_bytes()).collect()
            } else {
                b.to_vec()
            })
        },
        &[],
    );
    let err = fails(
        &["generate", "--prompt-ids", "0,5,9", "--max-tokens", "2"],
        dir.path(),
    );
    assert!(
        err.contains("layer 1") && err.contains("not finite"),
        "{err}"
    );
}

/// A copy of variant `name` in a new folder (config.json through `config`, tokenizer.json as
/// is) whose model.safetensors is rewritten: each tensor's bytes through `edit` (`None` drops
/// the tensor), then `extra` tensors (name, F32 shape, bytes) added.
fn variant_copy(
    name: &str,
    config: impl Fn(&mut serde_json::Value),
    edit: impl Fn(&str, &[u8]) -> Option<Vec<u8>>,
    extra: &[(String, Vec<usize>, Vec<u8>)],
) -> tempfile::TempDir {
    use safetensors::tensor::TensorView;
    let src = support::data_dir().join("variants").join(name);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    config(&mut cfg);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        src.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let edited: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors()
            .into_iter()
            .filter_map(|(n, v)| {
                let data = edit(&n, v.data())?;
                Some((n, v.dtype(), v.shape().to_vec(), data))
            })
            .chain(extra.iter().map(|(n, shape, b)| {
                (n.clone(), safetensors::Dtype::F32, shape.clone(), b.clone())
            }))
            .collect();
    let views: Vec<(String, TensorView)> = edited
        .iter()
        .map(|(n, d, shape, b)| (n.clone(), TensorView::new(*d, shape.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    dir
}

/// `moehost ARGS --model DIR`, which must fail: its stderr.
fn fails(args: &[&str], model: &std::path::Path) -> String {
    let out = moehost()
        .args(args)
        .arg("--model")
        .arg(model)
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Both tokenizer kinds read special-token text as a control token when asked (`encode_bare`)
/// and as ordinary characters otherwise (`encode_plain`: a user's chat text).
#[test]
fn plain_encoding_never_yields_special_tokens() {
    for dir in [support::bf16_model(), support::kimi_tokenizer_dir()] {
        let tok = Tokenizer::from_dir(&dir).unwrap();
        for name in tok.special_tokens() {
            let id = tok.token_to_id(&name).unwrap();
            let text = format!("a{name}b");
            assert!(tok.encode_bare(&text).unwrap().contains(&id), "{name}");
            let plain = tok.encode_plain(&text).unwrap();
            assert!(!plain.contains(&id), "{name} in {plain:?}");
            assert_eq!(tok.decode(&plain, false).unwrap(), text);
        }
    }
}
