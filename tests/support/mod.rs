//! Shared helpers of the end-to-end tests: where the test data lives, golden-file access.
#![allow(dead_code)]

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::PathBuf;

/// The `moehost` binary built for these tests.
pub fn moehost() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_moehost"))
}

/// Fails the test with the command's stderr unless it succeeded.
pub fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The copy of the real tiny-k2 one-stream decode trace.
pub fn batch1_path() -> PathBuf {
    data_dir().join("traces/decode-batch1.safetensors")
}

/// Path of test guest `name` (a crate of `plugins/fixtures/`, built by the host's build script
/// and kept out of the release binary).
pub fn fixture(name: &str) -> String {
    format!("{}/{name}.wasm", env!("MOEHOST_TEST_PLUGINS"))
}

/// `tests/data` of this repository.
pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data")
}

/// The bundled bf16 tiny-k2 model.
pub fn bf16_model() -> PathBuf {
    moehost::bundled_model_dir()
}

/// The FP8 (128x128 block) copy of tiny-k2.
pub fn fp8_model() -> PathBuf {
    data_dir().join("tiny-k2-fp8")
}

/// A tensor from a golden file, as f32 or i32 values with its shape.
pub struct GoldenTensor {
    pub shape: Vec<usize>,
    pub f32: Vec<f32>,
    pub i32: Vec<i32>,
}

/// The subset of a golden file (see tests/data/golden/subset.py), keyed by tensor name.
pub struct Golden {
    tensors: HashMap<String, GoldenTensor>,
}

impl Golden {
    /// `name` is `tiny-k2` or `tiny-k2-fp8`.
    pub fn load(name: &str) -> Golden {
        Self::from_path(
            &data_dir()
                .join("golden")
                .join(format!("{name}.safetensors")),
        )
    }

    pub fn from_path(path: &std::path::Path) -> Golden {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors = HashMap::new();
        for (k, v) in st.tensors() {
            let data = v.data();
            let (f, i) = match v.dtype() {
                Dtype::F32 => (
                    data.chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                    vec![],
                ),
                Dtype::I32 => (
                    vec![],
                    data.chunks_exact(4)
                        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                ),
                other => panic!("unexpected dtype {other:?} for {k}"),
            };
            tensors.insert(
                k,
                GoldenTensor {
                    shape: v.shape().to_vec(),
                    f32: f,
                    i32: i,
                },
            );
        }
        Golden { tensors }
    }

    pub fn get(&self, prompt: usize, name: &str) -> &GoldenTensor {
        let key = format!("prompt{prompt}.{name}");
        self.tensors
            .get(&key)
            .unwrap_or_else(|| panic!("golden tensor {key} missing"))
    }

    pub fn ids(&self, prompt: usize, name: &str) -> Vec<u32> {
        self.get(prompt, name)
            .i32
            .iter()
            .map(|&x| x as u32)
            .collect()
    }

    pub fn prompts(&self) -> usize {
        (0..)
            .take_while(|p| self.tensors.contains_key(&format!("prompt{p}.input_ids")))
            .count()
    }
}

/// Largest absolute difference between two equal-length slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Deterministic inputs `[tokens, hidden]` in -1..1 for running one expert.
pub fn expert_input(tokens: usize, hidden: usize, salt: u32) -> Vec<f32> {
    (0..tokens * hidden)
        .map(|i| ((i * 7919 + salt as usize) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

/// For each token count, runs `reference` and `candidate` on the same
/// `expert_input(t, width_in, salt)` into `[t, width_out]` and asserts identical bits.
pub fn assert_same_bits(
    tokens: &[usize],
    [width_in, width_out]: [usize; 2],
    salt: u32,
    mut reference: impl FnMut(&[f32], &mut [f32]),
    mut candidate: impl FnMut(&[f32], &mut [f32]),
    what: &str,
) {
    for &t in tokens {
        let x = expert_input(t, width_in, salt);
        let (mut a, mut b) = (vec![0f32; t * width_out], vec![0f32; t * width_out]);
        reference(&x, &mut a);
        candidate(&x, &mut b);
        assert!(bits(&a) == bits(&b), "{what}, {t} tokens");
    }
}

/// One batched forward pass of `model`: sequence `i` feeds `inputs[i]` through `caches[i]`;
/// each sequence's last logits.
pub fn forward_batch<I: AsRef<[u32]>>(
    model: &moehost::DeepseekV3,
    inputs: &[I],
    caches: &mut [moehost::KvCache],
) -> Vec<Vec<f32>> {
    let mut seqs: Vec<moehost::Sequence> = inputs
        .iter()
        .zip(caches.iter_mut())
        .map(|(ids, cache)| moehost::Sequence {
            ids: ids.as_ref(),
            cache,
        })
        .collect();
    model.forward_batch(&mut seqs).unwrap()
}

/// The bit patterns of `v`, for exact comparisons.
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// The committed Kimi-K2 tokenizer fixture (tests/data/kimi-k2-tokenizer: `tiktoken.model`,
/// `tokenizer_config.json`, made with the `tiktoken` package).
pub fn kimi_tokenizer_dir() -> PathBuf {
    data_dir().join("kimi-k2-tokenizer")
}

/// What the `tiktoken` library gave for the fixture (tests/data/kimi-k2-tokenizer/expected.json).
pub struct KimiExpected {
    /// Number of ranks; the special tokens follow (`[BOS]` = ranks, `[EOS]` = ranks + 1).
    pub ranks: u32,
    /// The chat messages and tools whose prompt, rendered by Kimi-K2-Thinking's template, is
    /// the last case.
    pub chat: serde_json::Value,
    pub tools: serde_json::Value,
    /// `(text, ids)`.
    pub cases: Vec<(String, Vec<u32>)>,
}

pub fn kimi_expected() -> KimiExpected {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(kimi_tokenizer_dir().join("expected.json")).unwrap())
            .unwrap();
    let cases = v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let ids = c["ids"].as_array().unwrap();
            (
                c["text"].as_str().unwrap().to_owned(),
                ids.iter().map(|x| x.as_u64().unwrap() as u32).collect(),
            )
        })
        .collect();
    KimiExpected {
        ranks: v["ranks"].as_u64().unwrap() as u32,
        chat: v["chat"].clone(),
        tools: v["tools"].clone(),
        cases,
    }
}

/// A model folder laid out as Kimi-K2-Instruct publishes it: `config.json`, the safetensors
/// shards and index (the bundled tiny-k2's weights, linked), `tiktoken.model` and
/// `tokenizer_config.json` from the fixture, Kimi-K2-Thinking's `chat_template.jinja`, and no
/// `tokenizer.json`. config.json's bos/eos are the fixture's `[BOS]`/`[EOS]`.
pub fn kimi_layout_folder() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let src = bf16_model();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name.ends_with(".safetensors") || name == "model.safetensors.index.json" {
            std::os::unix::fs::symlink(&path, tmp.path().join(&name)).unwrap();
        }
    }
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    let ranks = kimi_expected().ranks;
    cfg["bos_token_id"] = ranks.into();
    cfg["eos_token_id"] = (ranks + 1).into();
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    for name in ["tiktoken.model", "tokenizer_config.json"] {
        std::fs::copy(kimi_tokenizer_dir().join(name), tmp.path().join(name)).unwrap();
    }
    std::fs::copy(
        data_dir().join("chat/kimi-k2-thinking.jinja"),
        tmp.path().join("chat_template.jinja"),
    )
    .unwrap();
    tmp
}
