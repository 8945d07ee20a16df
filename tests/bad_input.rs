//! Damaged model folders and bad requests fail with an error that names the problem.

mod support;

use moehost::Engine;
use safetensors::tensor::{Dtype, TensorView};
use std::path::{Path, PathBuf};

/// A copy of the bundled model in a temporary folder: files that a test damages are real
/// copies, the rest are links (the original is never written).
fn model_copy(damaged: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let src = support::bf16_model();
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("model");
    std::fs::create_dir(&dst).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let to = dst.join(&name);
        if damaged.iter().any(|d| name == **d) {
            std::fs::copy(entry.path(), &to).unwrap();
        } else {
            std::os::unix::fs::symlink(entry.path(), &to).unwrap();
        }
    }
    (tmp, dst)
}

fn open_err(dir: &Path) -> String {
    match Engine::open(dir) {
        Ok(_) => panic!("opening {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

const SHARD2: &str = "model-00002-of-00002.safetensors";

#[test]
fn missing_config() {
    let (_t, dir) = model_copy(&[]);
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let err = open_err(&dir);
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn garbled_config() {
    let (_t, dir) = model_copy(&["config.json"]);
    std::fs::write(
        dir.join("config.json"),
        "{\"model_type\": \"deepseek_v3\", ",
    )
    .unwrap();
    let err = open_err(&dir);
    assert!(
        err.contains("config.json") && err.contains("not valid"),
        "{err}"
    );
}

#[test]
fn missing_shard() {
    let (_t, dir) = model_copy(&[]);
    std::fs::remove_file(dir.join(SHARD2)).unwrap();
    let err = open_err(&dir);
    assert!(err.contains(SHARD2) && err.contains("missing"), "{err}");
}

#[test]
fn truncated_shard() {
    let (_t, dir) = model_copy(&[SHARD2]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(SHARD2))
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len / 2).unwrap();
    let err = open_err(&dir);
    assert!(err.contains(SHARD2) && err.contains("truncated"), "{err}");
}

/// Rewrites shard 2 with `model.norm.weight` replaced by `(dtype, shape, bytes)`.
fn replace_norm(dir: &Path, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) {
    let path = dir.join(SHARD2);
    let original = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&original).unwrap();
    let mut tensors: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "model.norm.weight")
        .collect();
    tensors.push((
        "model.norm.weight".into(),
        TensorView::new(dtype, shape, &bytes).unwrap(),
    ));
    std::fs::remove_file(&path).unwrap();
    safetensors::serialize_to_file(tensors, None, &path).unwrap();
}

#[test]
fn tensor_of_wrong_shape() {
    let (_t, dir) = model_copy(&[]);
    replace_norm(&dir, Dtype::BF16, vec![128], vec![0u8; 256]);
    let err = open_err(&dir);
    assert!(
        err.contains("model.norm.weight") && err.contains("shape [128]"),
        "{err}"
    );
}

#[test]
fn tensor_of_wrong_dtype() {
    let (_t, dir) = model_copy(&[]);
    replace_norm(&dir, Dtype::I32, vec![256], vec![0u8; 1024]);
    let err = open_err(&dir);
    assert!(
        err.contains("model.norm.weight") && err.contains("I32"),
        "{err}"
    );
}

#[test]
fn config_disagreeing_with_weights() {
    let (_t, dir) = model_copy(&["config.json"]);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["n_routed_experts"] = serde_json::json!(65);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let err = open_err(&dir);
    assert!(
        err.contains("mlp.gate.weight") && err.contains("[65, 256]"),
        "{err}"
    );
}

#[test]
fn prompt_longer_than_context() {
    let engine = Engine::open(&support::bf16_model()).unwrap();
    let max = engine.model.config().max_position_embeddings;
    let prompt = vec![5u32; max + 1];
    let err = format!(
        "{:#}",
        engine
            .generate(&prompt, 4, &Default::default(), |_| {})
            .unwrap_err()
    );
    assert!(err.contains("max_position_embeddings"), "{err}");
    // Exactly at the limit, one token can still be produced, and no more.
    let gen = engine
        .generate(&vec![5u32; max], 4, &Default::default(), |_| {})
        .unwrap();
    assert!(gen.ids.len() <= 1);
}
