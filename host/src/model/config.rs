//! `config.json` of a DeepSeek-V3-family checkpoint (DeepSeek-V3, Kimi-K2), parsed and validated.
//!
//! Owns: every architecture field the forward pass reads, with Hugging Face's defaults where
//! transformers' `DeepseekV3Config` has one, and a clear error for values moehost does not support.
//! Does not own: tensors (see `checkpoint`), tokenizer or generation settings (see `model_dir`).

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// The raw JSON, field for field. Defaults are those of transformers' `DeepseekV3Config`.
#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    /// DeepSeek-V3's multi-token-prediction layers (`model.layers.{num_hidden_layers}.*`).
    #[serde(default)]
    num_nextn_predict_layers: usize,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    moe_intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    q_lora_rank: Option<usize>,
    kv_lora_rank: usize,
    qk_nope_head_dim: usize,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
    n_routed_experts: usize,
    num_experts_per_tok: usize,
    #[serde(default = "default_one")]
    n_shared_experts: usize,
    #[serde(default = "default_n_group")]
    n_group: usize,
    #[serde(default = "default_topk_group")]
    topk_group: usize,
    #[serde(default = "default_first_k_dense")]
    first_k_dense_replace: usize,
    #[serde(default = "default_one")]
    moe_layer_freq: usize,
    #[serde(default = "default_topk_method")]
    topk_method: String,
    #[serde(default = "default_scoring")]
    scoring_func: String,
    #[serde(default = "default_true")]
    norm_topk_prob: bool,
    #[serde(default = "default_routed_scaling")]
    routed_scaling_factor: f64,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_true")]
    rope_interleave: bool,
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default)]
    bos_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    quantization_config: Option<RawQuant>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawQuant {
    quant_method: Option<String>,
    fmt: Option<String>,
    weight_block_size: Option<Vec<usize>>,
    /// compressed-tensors: `pack-quantized`.
    format: Option<String>,
    /// compressed-tensors: `{name: {weights: {num_bits, type, symmetric, strategy, group_size}, ...}}`.
    config_groups: Option<serde_json::Map<String, serde_json::Value>>,
}

/// How a checkpoint's quantized weights are stored, as `config.json` declares it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quantization {
    /// FP8 e4m3 with `weight_scale_inv` blocks of this size (DeepSeek-V3, Kimi-K2).
    pub fp8_block: Option<[usize; 2]>,
    /// compressed-tensors `pack-quantized` INT4 (Kimi-K2-Thinking's routed experts):
    /// `weight_packed` int32 (eight 4-bit values each, low nibble first, stored as value + 8),
    /// `weight_scale` bf16 per 32 columns, `weight_shape`; symmetric, no zero point.
    pub packed_int4: bool,
}

/// Columns sharing a scale in the compressed-tensors INT4 layouts moehost reads (Kimi-K2-Thinking).
pub const PACKED_INT4_GROUP: usize = 32;

/// The compressed-tensors configuration moehost runs: weight-only symmetric INT4 in groups of
/// 32 columns, packed into int32 (`pack-quantized`). Anything else is an error naming the field.
fn parse_compressed_tensors(q: &RawQuant) -> Result<()> {
    let format = q.format.as_deref().unwrap_or("");
    ensure!(
        format == "pack-quantized",
        "unsupported quantization_config.format {format:?} for compressed-tensors: only \
         \"pack-quantized\" (INT4 weights packed in int32, as Kimi-K2-Thinking) is supported"
    );
    let groups = q
        .config_groups
        .as_ref()
        .filter(|g| !g.is_empty())
        .context("quantization_config.config_groups is missing or empty")?;
    for (name, group) in groups {
        let at = |field: &str| format!("quantization_config.config_groups.{name}.{field}");
        let w = group
            .get("weights")
            .filter(|w| !w.is_null())
            .with_context(|| format!("{} is missing", at("weights")))?;
        let want: [(&str, serde_json::Value); 5] = [
            ("num_bits", 4.into()),
            ("type", "int".into()),
            ("symmetric", true.into()),
            ("strategy", "group".into()),
            ("group_size", PACKED_INT4_GROUP.into()),
        ];
        for (field, value) in want {
            let got = w.get(field).cloned().unwrap_or(serde_json::Value::Null);
            ensure!(
                got == value,
                "unsupported {} {got}: moehost reads compressed-tensors INT4 with num_bits 4, \
                 type \"int\", symmetric, strategy \"group\", group_size {PACKED_INT4_GROUP} \
                 (Kimi-K2-Thinking's layout)",
                at(&format!("weights.{field}"))
            );
        }
        if let Some(a) = group.get("input_activations").filter(|a| !a.is_null()) {
            bail!(
                "unsupported {} {a}: only weight-only quantization is supported",
                at("input_activations")
            );
        }
    }
    Ok(())
}

fn default_one() -> usize {
    1
}
fn default_n_group() -> usize {
    8
}
fn default_topk_group() -> usize {
    4
}
fn default_first_k_dense() -> usize {
    3
}
fn default_topk_method() -> String {
    "noaux_tc".into()
}
fn default_scoring() -> String {
    "sigmoid".into()
}
fn default_true() -> bool {
    true
}
fn default_routed_scaling() -> f64 {
    2.5
}
fn default_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_act() -> String {
    "silu".into()
}

/// YaRN rope scaling (`rope_scaling.type == "yarn"`), as transformers' `_compute_yarn_parameters`.
#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// `mscale` and `mscale_all_dim`: 0.0 when absent (falsy in the reference).
    pub mscale: f64,
    pub mscale_all_dim: f64,
    /// Explicit `attention_factor`, if the config sets one.
    pub attention_factor: Option<f64>,
    pub truncate: bool,
}

/// The validated architecture of a DeepSeek-V3-family model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: String,
    /// Multi-token-prediction layers in the checkpoint, after the decoder layers. They only
    /// draft tokens for speculative decoding, which moehost does not do: never read.
    pub num_nextn_predict_layers: usize,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub n_routed_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_shared_experts: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: Option<Yarn>,
    pub rope_interleave: bool,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// FP8 block size `[rows, cols]` when the checkpoint is FP8-quantized.
    pub fp8_block: Option<[usize; 2]>,
    /// Whether quantized weights are compressed-tensors packed INT4 (see [`Quantization`]).
    pub packed_int4: bool,
}

impl ModelConfig {
    /// Reads and validates `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("invalid model config {}", path.display()))
    }

    /// Parses and validates the JSON text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).context("config.json is not valid")?;
        Self::validate(raw)
    }

    fn validate(raw: RawConfig) -> Result<Self> {
        let model_type = raw.model_type.clone().unwrap_or_default();
        ensure!(
            model_type != "deepseek_v32",
            "model_type \"deepseek_v32\" (DeepSeek-V3.2) is not supported: its attention is \
             DeepSeek Sparse Attention (a lightning indexer picks the keys each query attends to), \
             which moehost does not implement; DeepSeek-V3, V3.1, R1 and Kimi-K2 are supported"
        );
        ensure!(
            matches!(model_type.as_str(), "deepseek_v3" | "kimi_k2"),
            "unsupported model_type {model_type:?}: moehost runs DeepSeek-V3-family models \
             (model_type \"deepseek_v3\" or \"kimi_k2\")"
        );
        if let Some(archs) = &raw.architectures {
            ensure!(
                archs.iter().any(|a| a == "DeepseekV3ForCausalLM"),
                "unsupported architectures {archs:?}: expected DeepseekV3ForCausalLM"
            );
        }
        ensure!(
            raw.scoring_func == "sigmoid",
            "unsupported scoring_func {:?}: only \"sigmoid\" (DeepSeek-V3 / Kimi-K2) is supported",
            raw.scoring_func
        );
        ensure!(
            raw.topk_method == "noaux_tc",
            "unsupported topk_method {:?}: only \"noaux_tc\" is supported",
            raw.topk_method
        );
        ensure!(
            raw.hidden_act == "silu",
            "unsupported hidden_act {:?}: only \"silu\" is supported",
            raw.hidden_act
        );
        ensure!(
            !raw.attention_bias,
            "attention_bias = true is not supported"
        );
        // Positive, and within bounds far above any real model (Kimi-K2: 61 layers, hidden
        // 7168, 384 experts, vocab 163,840): a damaged value is refused here, before anything
        // is sized from it.
        for (name, v, max) in [
            ("vocab_size", raw.vocab_size, 1 << 23),
            ("hidden_size", raw.hidden_size, 1 << 17),
            ("intermediate_size", raw.intermediate_size, 1 << 20),
            ("moe_intermediate_size", raw.moe_intermediate_size, 1 << 20),
            ("num_hidden_layers", raw.num_hidden_layers, 1 << 10),
            ("num_attention_heads", raw.num_attention_heads, 1 << 12),
            ("kv_lora_rank", raw.kv_lora_rank, 1 << 16),
            ("qk_nope_head_dim", raw.qk_nope_head_dim, 1 << 12),
            ("v_head_dim", raw.v_head_dim, 1 << 12),
            ("n_routed_experts", raw.n_routed_experts, 1 << 16),
            ("num_experts_per_tok", raw.num_experts_per_tok, 1 << 10),
            ("n_group", raw.n_group, 1 << 16),
            ("topk_group", raw.topk_group, 1 << 16),
            ("moe_layer_freq", raw.moe_layer_freq, 1 << 10),
            (
                "max_position_embeddings",
                raw.max_position_embeddings,
                1 << 24,
            ),
            ("qk_rope_head_dim", raw.qk_rope_head_dim.max(1), 1 << 12),
            ("q_lora_rank", raw.q_lora_rank.unwrap_or(1), 1 << 16),
            (
                "first_k_dense_replace",
                raw.first_k_dense_replace.max(1),
                1 << 10,
            ),
            ("n_shared_experts", raw.n_shared_experts.max(1), 1 << 10),
            (
                "num_nextn_predict_layers",
                raw.num_nextn_predict_layers.max(1),
                1 << 4,
            ),
        ] {
            ensure!(v > 0, "{name} must be positive, got 0");
            ensure!(
                v <= max,
                "{name} is {v}, beyond any model moehost can run (at most {max}): config.json is damaged?"
            );
        }
        ensure!(
            raw.qk_rope_head_dim > 0 && raw.qk_rope_head_dim.is_multiple_of(2),
            "qk_rope_head_dim must be a positive even number, got {}",
            raw.qk_rope_head_dim
        );
        if let Some(r) = raw.q_lora_rank {
            ensure!(r > 0, "q_lora_rank must be positive or null, got 0");
        }
        let e = raw.n_routed_experts;
        ensure!(
            e.is_multiple_of(raw.n_group),
            "n_routed_experts ({e}) must be divisible by n_group ({})",
            raw.n_group
        );
        let group_size = e / raw.n_group;
        ensure!(
            raw.n_group == 1 || group_size >= 2,
            "groups of n_routed_experts / n_group = {group_size} experts are too small: \
             group scores sum each group's top-2"
        );
        ensure!(
            raw.topk_group <= raw.n_group,
            "topk_group ({}) must not exceed n_group ({})",
            raw.topk_group,
            raw.n_group
        );
        ensure!(
            raw.num_experts_per_tok <= raw.topk_group * group_size,
            "num_experts_per_tok ({}) exceeds the experts in topk_group ({}) groups of {group_size}",
            raw.num_experts_per_tok,
            raw.topk_group
        );
        ensure!(
            raw.routed_scaling_factor.is_finite()
                && raw.routed_scaling_factor > 0.0
                && raw.routed_scaling_factor <= 1e4,
            "routed_scaling_factor must be a positive number up to 1e4 (DeepSeek-V3: 2.5), got {}",
            raw.routed_scaling_factor
        );
        ensure!(
            raw.rms_norm_eps.is_finite() && raw.rms_norm_eps >= 0.0,
            "rms_norm_eps must be a non-negative number"
        );
        ensure!(
            raw.rope_theta.is_finite() && raw.rope_theta > 1.0,
            "rope_theta must be a number above 1"
        );
        let rope_scaling =
            parse_rope_scaling(raw.rope_scaling.as_ref(), raw.max_position_embeddings)?;
        let packed_int4 = match &raw.quantization_config {
            Some(q) if q.quant_method.as_deref() == Some("compressed-tensors") => {
                parse_compressed_tensors(q)?;
                true
            }
            _ => false,
        };
        let fp8_block = match &raw.quantization_config {
            None => None,
            Some(_) if packed_int4 => None,
            Some(q) => {
                let method = q.quant_method.as_deref().unwrap_or("");
                ensure!(
                    method == "fp8",
                    "unsupported quantization_config.quant_method {method:?}: only \"fp8\" and \
                     \"compressed-tensors\" (pack-quantized INT4) are supported"
                );
                let fmt = q.fmt.as_deref().unwrap_or("e4m3");
                ensure!(
                    fmt == "e4m3",
                    "unsupported quantization_config.fmt {fmt:?}: only \"e4m3\" is supported"
                );
                match q.weight_block_size.as_deref() {
                    Some(&[r, c]) if r > 0 && c > 0 => Some([r, c]),
                    other => bail!(
                        "quantization_config.weight_block_size must be two positive numbers, got {other:?}"
                    ),
                }
            }
        };
        let eos_token_ids = match &raw.eos_token_id {
            None | Some(serde_json::Value::Null) => vec![],
            Some(v) => token_id_list(v).context("eos_token_id")?,
        };
        Ok(Self {
            model_type,
            num_nextn_predict_layers: raw.num_nextn_predict_layers,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            moe_intermediate_size: raw.moe_intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            q_lora_rank: raw.q_lora_rank,
            kv_lora_rank: raw.kv_lora_rank,
            qk_nope_head_dim: raw.qk_nope_head_dim,
            qk_rope_head_dim: raw.qk_rope_head_dim,
            v_head_dim: raw.v_head_dim,
            n_routed_experts: raw.n_routed_experts,
            num_experts_per_tok: raw.num_experts_per_tok,
            n_shared_experts: raw.n_shared_experts,
            n_group: raw.n_group,
            topk_group: raw.topk_group,
            first_k_dense_replace: raw.first_k_dense_replace,
            moe_layer_freq: raw.moe_layer_freq,
            norm_topk_prob: raw.norm_topk_prob,
            routed_scaling_factor: raw.routed_scaling_factor as f32,
            rms_norm_eps: raw.rms_norm_eps as f32,
            rope_theta: raw.rope_theta,
            rope_scaling,
            rope_interleave: raw.rope_interleave,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
            fp8_block,
            packed_int4,
        })
    }

    /// Whether decoder layer `layer` has a routed-expert MLP (DeepSeek's rule:
    /// `layer >= first_k_dense_replace and layer % moe_layer_freq == 0`).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        layer >= self.first_k_dense_replace && layer.is_multiple_of(self.moe_layer_freq)
    }

    /// How the checkpoint's quantized weights are stored.
    pub fn quantization(&self) -> Quantization {
        Quantization {
            fp8_block: self.fp8_block,
            packed_int4: self.packed_int4,
        }
    }

    /// Decoder-layer indices of the MoE layers, in order.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers)
            .filter(|&l| self.is_moe_layer(l))
            .collect()
    }

    /// Per-head query/key width: `qk_nope_head_dim + qk_rope_head_dim`.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Softmax scale of attention: `qk_head_dim^-0.5`, times `mscale^2` under YaRN with
    /// `mscale_all_dim` (DeepseekV3Attention.__init__).
    pub fn softmax_scale(&self) -> f32 {
        let mut scale = (self.qk_head_dim() as f64).powf(-0.5);
        if let Some(y) = &self.rope_scaling {
            if y.mscale_all_dim != 0.0 {
                let m = yarn_get_mscale(y.factor, y.mscale_all_dim);
                scale *= m * m;
            }
        }
        scale as f32
    }
}

/// `yarn_get_mscale` of the reference: `0.1 * mscale * ln(scale) + 1` for scale > 1.
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

fn token_id_list(v: &serde_json::Value) -> Result<Vec<u32>> {
    let one = |v: &serde_json::Value| -> Result<u32> {
        v.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .with_context(|| format!("expected a token id, got {v}"))
    };
    match v {
        serde_json::Value::Array(items) => items.iter().map(one).collect(),
        other => Ok(vec![one(other)?]),
    }
}

/// Parses `eos_token_id` as found in config.json or generation_config.json (int or list).
pub fn parse_token_ids(v: &serde_json::Value) -> Result<Vec<u32>> {
    if v.is_null() {
        return Ok(vec![]);
    }
    token_id_list(v)
}

fn parse_rope_scaling(v: Option<&serde_json::Value>, max_pos: usize) -> Result<Option<Yarn>> {
    let Some(v) = v else { return Ok(None) };
    if v.is_null() {
        return Ok(None);
    }
    let obj = v
        .as_object()
        .context("rope_scaling must be null or an object")?;
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("");
    match kind {
        "default" => return Ok(None),
        "yarn" => {}
        other => {
            bail!("unsupported rope_scaling type {other:?}: only \"yarn\" (or null) is supported")
        }
    }
    let num = |key: &str| -> Result<Option<f64>> {
        match obj.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(x) => x
                .as_f64()
                .filter(|f| f.is_finite())
                .map(Some)
                .with_context(|| format!("rope_scaling.{key} must be a number, got {x}")),
        }
    };
    let factor = num("factor")?.context("rope_scaling.factor is required for yarn")?;
    ensure!(factor > 0.0, "rope_scaling.factor must be positive");
    let original = match num("original_max_position_embeddings")? {
        Some(o) => {
            ensure!(
                o >= 1.0,
                "rope_scaling.original_max_position_embeddings must be positive"
            );
            o as usize
        }
        None => max_pos,
    };
    // The reference uses `or` defaults, so 0 / null both mean the default.
    let or_default = |x: Option<f64>, d: f64| match x {
        Some(v) if v != 0.0 => v,
        _ => d,
    };
    Ok(Some(Yarn {
        factor,
        original_max_position_embeddings: original,
        beta_fast: or_default(num("beta_fast")?, 32.0),
        beta_slow: or_default(num("beta_slow")?, 1.0),
        mscale: num("mscale")?.unwrap_or(0.0),
        mscale_all_dim: num("mscale_all_dim")?.unwrap_or(0.0),
        attention_factor: num("attention_factor")?,
        truncate: obj
            .get("truncate")
            .and_then(|t| t.as_bool())
            .unwrap_or(true),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> serde_json::Value {
        serde_json::from_str(include_str!("../../models/tiny-k2/config.json")).unwrap()
    }

    #[test]
    fn parses_tiny_k2() {
        let c = ModelConfig::from_json(&tiny().to_string()).unwrap();
        assert_eq!(c.moe_layers(), (1..8).collect::<Vec<_>>());
        assert_eq!(c.q_lora_rank, Some(64));
        let y = c.rope_scaling.as_ref().unwrap();
        assert_eq!(y.factor, 4.0);
        // The README of tiny-k2: the softmax scale is multiplied by (0.1 ln 4 + 1)^2.
        let m = 0.1 * 4f64.ln() + 1.0;
        assert!((c.softmax_scale() as f64 - 48f64.powf(-0.5) * m * m).abs() < 1e-7);
        assert_eq!(c.eos_token_ids, vec![1]);
    }

    #[test]
    fn rejects_unsupported_values() {
        for (key, value, needle) in [
            ("scoring_func", serde_json::json!("softmax"), "scoring_func"),
            ("topk_method", serde_json::json!("greedy"), "topk_method"),
            ("model_type", serde_json::json!("llama"), "model_type"),
            (
                "num_hidden_layers",
                serde_json::json!(1_000_000_000_000u64),
                "num_hidden_layers is 1000000000000",
            ),
            (
                "routed_scaling_factor",
                serde_json::json!(1e300),
                "routed_scaling_factor",
            ),
            (
                "model_type",
                serde_json::json!("deepseek_v32"),
                "DeepSeek Sparse Attention",
            ),
            ("n_group", serde_json::json!(3), "divisible"),
            (
                "rope_scaling",
                serde_json::json!({"type": "linear", "factor": 2.0}),
                "rope_scaling",
            ),
            (
                "hidden_size",
                serde_json::json!("wide"),
                "config.json is not valid",
            ),
        ] {
            let mut c = tiny();
            c[key] = value;
            let err = format!("{:#}", ModelConfig::from_json(&c.to_string()).unwrap_err());
            assert!(err.contains(needle), "{key}: {err}");
        }
    }

    #[test]
    fn missing_required_field_is_named() {
        let mut c = tiny();
        c.as_object_mut().unwrap().remove("kv_lora_rank");
        let err = format!("{:#}", ModelConfig::from_json(&c.to_string()).unwrap_err());
        assert!(err.contains("kv_lora_rank"), "{err}");
    }

    #[test]
    fn moe_layer_freq_is_honoured() {
        let mut c = tiny();
        c["first_k_dense_replace"] = serde_json::json!(2);
        c["moe_layer_freq"] = serde_json::json!(2);
        let c = ModelConfig::from_json(&c.to_string()).unwrap();
        assert_eq!(c.moe_layers(), vec![2, 4, 6]);
    }
}
