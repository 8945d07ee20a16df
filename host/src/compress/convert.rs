//! `moehost convert`: a smaller checkpoint of the same architecture ("K2-Mini"): the first
//! dense layers plus the N-dense most important MoE layers (or evenly spaced ones), M experts
//! per kept MoE layer, the router sliced to them, config.json made consistent.
//!
//! The result is an ordinary DeepSeek-V3 checkpoint (transformers loads it). Kept experts keep
//! their relative order (the router breaks ties to the lower id, so the order matters), and a
//! kept expert's router row and correction bias move with it, so routing among the kept
//! experts is exactly the source's. Tensors stream one at a time from the memory-mapped source
//! into shards of bounded size, written into a temporary folder beside the output that is
//! renamed into place only when everything is written: a failure leaves nothing behind.

use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::profile::Profile;
use crate::model::config::ModelConfig;
use crate::weights::checkpoint::{decode_f32, Checkpoint};

/// How the kept layers are chosen.
#[derive(Debug, Clone)]
pub enum LayerChoice {
    /// The MoE layers with the highest block influence in the profile.
    Profile,
    /// Evenly spaced MoE layers.
    Uniform,
}

/// Output dtype of the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutDtype {
    /// As stored in the source.
    Keep,
    /// FP8 weights dequantized to bf16 (their scale tensors dropped).
    Bf16,
    /// FP8 kept with its scale tensors (the source must be FP8).
    Fp8,
}

#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Decoder layers of the result, the dense ones included.
    pub layers: usize,
    /// Routed experts per MoE layer of the result.
    pub experts: usize,
    pub layer_choice: LayerChoice,
    /// Ranks experts by routed mass and (with `LayerChoice::Profile`) layers by influence.
    /// Without one, experts 0..M are kept.
    pub profile: Option<Profile>,
    pub dtype: OutDtype,
    /// Ranks experts with a pruning plugin (`wit/policy.wit`, interface `pruning`) instead of
    /// by routed mass; needs a profile (its statistics are what the plugin sees).
    pub ranker: Option<crate::policy::PolicySource>,
    /// Store routed experts in moehost's int8/int4 format (`crate::weights::quant`).
    pub quantize_experts: Option<crate::weights::quant::Bits>,
    /// Replace an existing non-empty output folder.
    pub force: bool,
    /// Largest shard, bytes.
    pub shard_bytes: u64,
    pub show_progress: bool,
}

/// What was kept, for the user and for tests.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertReport {
    /// Source layer of each output layer.
    pub layers: Vec<usize>,
    /// Per output MoE layer (in output order): the source expert ids kept, ascending.
    pub experts: BTreeMap<usize, Vec<u32>>,
    pub tensors: usize,
    pub shards: usize,
    pub bytes: u64,
    /// What ranked the experts: `routed-mass`, `expert-id` (no profile) or the plugin's name.
    pub experts_ranked_by: String,
    /// Layers where the plugin failed and routed mass ranked instead.
    pub ranker_fallbacks: usize,
}

/// A tensor of the output and where its bytes come from.
struct Planned {
    name: String,
    source: String,
    /// Rows (first dimension) to keep, for the router's weight and bias.
    rows: Option<Vec<u32>>,
    /// A routed expert's projection weight (quantized with `quantize_experts`).
    expert_weight: bool,
}

pub fn convert(src: &Path, dst: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    let src_canon = src
        .canonicalize()
        .with_context(|| format!("cannot open source model folder {}", src.display()))?;
    let dst_parent = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let parent_canon = dst_parent.canonicalize().with_context(|| {
        format!(
            "the output's parent folder {} does not exist",
            dst_parent.display()
        )
    })?;
    let dst_canon = parent_canon.join(dst.file_name().context("the output needs a folder name")?);
    ensure!(
        !dst_canon.starts_with(&src_canon) && !src_canon.starts_with(&dst_canon),
        "the output {} must not be the source folder, inside it, or contain it",
        dst.display()
    );
    if dst_canon.exists() {
        let empty = std::fs::read_dir(&dst_canon)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        ensure!(
            empty || opts.force,
            "the output {} exists and is not empty (use --force to replace it)",
            dst.display()
        );
    }

    let config_path = src.join("config.json");
    let config_text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let cfg = ModelConfig::from_json(&config_text)
        .with_context(|| format!("in {}", config_path.display()))?;
    let mut config: serde_json::Value = serde_json::from_str(&config_text)?;
    let ckpt = Checkpoint::open(src, cfg.quantization())?;
    // Every tensor the architecture needs, with the right shape (headers only): a damaged
    // source fails here, before anything is written.
    crate::model::deepseek_v3::check_tensors(&cfg, &ckpt)
        .with_context(|| format!("{} is not a complete checkpoint", src.display()))?;

    let mut ranker = match &opts.ranker {
        Some(src) => {
            ensure!(
                opts.profile.is_some(),
                "ranking experts with a plugin needs --profile (the statistics it ranks by)"
            );
            Some(crate::policy::wasm::PruningPlugin::load(
                &src.bytes()?,
                &src.describe(),
                crate::policy::wasm::RuntimeLimits::default(),
            )?)
        }
        None => None,
    };
    let (layers, experts, ranker_fallbacks) = choose(&cfg, opts, ranker.as_mut())?;
    let experts_ranked_by = match (&ranker, &opts.profile) {
        (Some(r), _) => r.name.clone(),
        (None, Some(_)) => "routed-mass".into(),
        (None, None) => "expert-id".into(),
    };
    let fp8_source = cfg.fp8_block.is_some();
    if opts.dtype == OutDtype::Fp8 {
        ensure!(
            fp8_source,
            "--dtype fp8 keeps FP8 weights, but {} is not FP8 (no quantization_config)",
            src.display()
        );
    }
    let dequantize = opts.dtype == OutDtype::Bf16 && fp8_source;

    // The output tensors, in order.
    let mut by_layer: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let mut global = Vec::new();
    for name in ckpt.tensor_names() {
        match layer_of(name) {
            Some((l, _)) => by_layer.entry(l).or_default().push(name.to_owned()),
            None => global.push(name.to_owned()),
        }
    }
    global.sort();
    let mut plan: Vec<Planned> = Vec::new();
    for name in &global {
        plan.push(Planned {
            name: name.clone(),
            source: name.clone(),
            rows: None,
            expert_weight: false,
        });
    }
    let mut kept_experts = BTreeMap::new();
    for (j, &i) in layers.iter().enumerate() {
        let mut names = by_layer.remove(&i).unwrap_or_default();
        names.sort();
        ensure!(
            !names.is_empty(),
            "layer {i} has no tensors in the checkpoint"
        );
        let keep = experts.get(&i);
        if let Some(k) = keep {
            kept_experts.insert(j, k.clone());
        }
        for name in names {
            let (_, rest) = layer_of(&name).expect("a layer tensor");
            let out_rest = match (keep, expert_of(rest)) {
                (Some(k), Some((e, tail))) => match k.binary_search(&e) {
                    Ok(new) => format!("mlp.experts.{new}.{tail}"),
                    Err(_) => continue,
                },
                _ => rest.to_owned(),
            };
            let rows = match (keep, rest) {
                (Some(k), "mlp.gate.weight" | "mlp.gate.e_score_correction_bias") => {
                    Some(k.clone())
                }
                _ => None,
            };
            let expert_weight = expert_of(rest).is_some_and(|(_, t)| t.ends_with("_proj.weight"));
            plan.push(Planned {
                name: format!("model.layers.{j}.{out_rest}"),
                source: name,
                rows,
                expert_weight,
            });
        }
    }
    if dequantize {
        plan.retain(|p| !p.source.ends_with("_scale_inv"));
    }
    if opts.quantize_experts.is_some() {
        // Quantized experts carry their own scales.
        plan.retain(|p| {
            let own_scale = p.source.ends_with("_scale_inv") || p.source.ends_with("_qscale");
            !(own_scale && layer_of(&p.source).is_some_and(|(_, r)| expert_of(r).is_some()))
        });
    }

    // Write into a temporary folder beside the output.
    let tmp = tempfile::Builder::new()
        .prefix(".moehost-convert-")
        .tempdir_in(&parent_canon)
        .with_context(|| format!("cannot create a folder in {}", parent_canon.display()))?;
    let bar = super::progress(plan.len() as u64, "convert");
    if !opts.show_progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut weight_map = BTreeMap::new();
    let mut shard: Vec<OutTensor<'_>> = Vec::new();
    let mut shard_size = 0u64;
    let mut shard_files: Vec<Vec<String>> = Vec::new();
    let mut total = 0u64;
    let flush =
        |shard: &mut Vec<OutTensor<'_>>, shard_files: &mut Vec<Vec<String>>| -> Result<()> {
            if shard.is_empty() {
                return Ok(());
            }
            let n = shard_files.len() + 1;
            let file = format!("model-{n:05}.safetensors");
            let views: Vec<(String, TensorView<'_>)> = shard
                .iter()
                .map(|(name, dtype, shape, data)| {
                    TensorView::new(*dtype, shape.clone(), data.bytes())
                        .map(|v| (name.clone(), v))
                        .map_err(|e| anyhow::anyhow!("tensor {name}: {e}"))
                })
                .collect::<Result<_>>()?;
            let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
            safetensors::serialize_to_file(views, Some(meta), &tmp.path().join(&file))
                .with_context(|| format!("cannot write {file}"))?;
            shard_files.push(shard.drain(..).map(|(name, ..)| name).collect());
            Ok(())
        };
    for p in &plan {
        let raw = ckpt.raw(&p.source)?;
        if let (Some(bits), true) = (opts.quantize_experts, p.expert_weight) {
            let logical = crate::weights::format::logical_shape(raw.dtype, raw.shape);
            ensure!(logical.len() == 2, "tensor {} is not 2-D", p.source);
            let w = ckpt.read_f32(&p.source, &logical)?;
            let (data, scales) = crate::weights::quant::quantize(&w, logical[0], logical[1], bits);
            let scale_shape = crate::weights::quant::scale_shape(logical[0], logical[1]).to_vec();
            for (name, dtype, shape, bytes) in [
                (
                    p.name.clone(),
                    bits.dtype(),
                    crate::weights::format::stored_shape(bits.dtype(), &logical),
                    data,
                ),
                (
                    format!("{}_qscale", p.name),
                    Dtype::F16,
                    scale_shape,
                    scales,
                ),
            ] {
                let size = bytes.len() as u64;
                if shard_size > 0 && shard_size + size > opts.shard_bytes {
                    flush(&mut shard, &mut shard_files)?;
                    shard_size = 0;
                }
                shard_size += size;
                total += size;
                shard.push((name, dtype, shape, Data::Owned(bytes)));
            }
            bar.inc(1);
            continue;
        }
        let (dtype, shape, data) = if dequantize && raw.dtype == Dtype::F8_E4M3 {
            let scales = ckpt.scales(&raw)?;
            let f = decode_f32(&raw, scales.as_deref(), cfg.fp8_block)?;
            let bytes: Vec<u8> = f
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect();
            (Dtype::BF16, raw.shape.to_vec(), Data::Owned(bytes))
        } else if let Some(rows) = &p.rows {
            ensure!(
                raw.dtype != Dtype::F8_E4M3,
                "tensor {}: slicing an FP8 router is not supported",
                p.source
            );
            let n = raw.shape.first().copied().unwrap_or(0);
            ensure!(
                n == cfg.n_routed_experts,
                "tensor {} has {n} rows, expected n_routed_experts = {}",
                p.source,
                cfg.n_routed_experts
            );
            let row = raw.bytes.len() / n.max(1);
            let mut bytes = Vec::with_capacity(rows.len() * row);
            for &r in rows {
                bytes.extend_from_slice(&raw.bytes[r as usize * row..(r as usize + 1) * row]);
            }
            let mut shape = raw.shape.to_vec();
            shape[0] = rows.len();
            (raw.dtype, shape, Data::Owned(bytes))
        } else {
            (raw.dtype, raw.shape.to_vec(), Data::Borrowed(raw.bytes))
        };
        let size = data.bytes().len() as u64;
        if shard_size > 0 && shard_size + size > opts.shard_bytes {
            flush(&mut shard, &mut shard_files)?;
            shard_size = 0;
        }
        shard_size += size;
        total += size;
        shard.push((p.name.clone(), dtype, shape, data));
        bar.inc(1);
    }
    flush(&mut shard, &mut shard_files)?;
    bar.finish_and_clear();
    // Name the shards `-of-` now that their count is known.
    let count = shard_files.len();
    for (i, names) in shard_files.iter().enumerate() {
        let from = tmp.path().join(format!("model-{:05}.safetensors", i + 1));
        let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        std::fs::rename(&from, tmp.path().join(&file))?;
        for n in names {
            weight_map.insert(n.clone(), file.clone());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?,
    )?;

    // config.json, made consistent with what was kept.
    let m = opts.experts;
    let obj = config
        .as_object_mut()
        .context("config.json is not a JSON object")?;
    obj.insert("num_hidden_layers".into(), layers.len().into());
    obj.insert("n_routed_experts".into(), m.into());
    obj.insert(
        "num_experts_per_tok".into(),
        cfg.num_experts_per_tok.min(m).into(),
    );
    let (groups, topk_groups) = groups_for(cfg.n_group, cfg.topk_group, m);
    obj.insert("n_group".into(), groups.into());
    obj.insert("topk_group".into(), topk_groups.into());
    if obj.contains_key("num_nextn_predict_layers") {
        // Multi-token-prediction layers are not carried over.
        obj.insert("num_nextn_predict_layers".into(), 0.into());
    }
    if dequantize {
        obj.remove("quantization_config");
        obj.insert("torch_dtype".into(), "bfloat16".into());
    }
    if let Some(bits) = opts.quantize_experts {
        // Informative: the tensors' dtypes say how they are stored (see `crate::weights::quant`).
        obj.insert(
            "moehost_quantization".into(),
            serde_json::json!({"experts": bits.name(), "group_size": crate::weights::quant::GROUP,
                               "scale": "f16 per group of consecutive input columns"}),
        );
    }
    std::fs::write(
        tmp.path().join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    // Everything else that is not weights: tokenizer, generation config, chat template...
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // The source's README describes the source, not this model.
        let skip = name.ends_with(".safetensors")
            || name == "model.safetensors.index.json"
            || name == "config.json"
            || name.starts_with("README")
            || name.starts_with('.');
        if !skip && entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), tmp.path().join(&name))
                .with_context(|| format!("cannot copy {name}"))?;
        }
    }

    // Into place.
    let written = tmp.keep();
    let replace = || -> Result<()> {
        if dst_canon.exists() {
            let old = parent_canon.join(format!(".moehost-replaced-{}", std::process::id()));
            std::fs::rename(&dst_canon, &old)?;
            std::fs::rename(&written, &dst_canon)?;
            std::fs::remove_dir_all(&old)?;
        } else {
            std::fs::rename(&written, &dst_canon)?;
        }
        Ok(())
    };
    if let Err(e) = replace() {
        let _ = std::fs::remove_dir_all(&written);
        return Err(e.context(format!("cannot move the result into {}", dst.display())));
    }
    Ok(ConvertReport {
        layers,
        experts: kept_experts,
        tensors: plan.len(),
        shards: count,
        bytes: total,
        experts_ranked_by,
        ranker_fallbacks,
    })
}

/// An output tensor waiting in the current shard: name, dtype, shape, bytes.
type OutTensor<'a> = (String, Dtype, Vec<usize>, Data<'a>);

/// Bytes of an output tensor: borrowed from the source mapping, or built here.
enum Data<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

impl Data<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Data::Borrowed(b) => b,
            Data::Owned(v) => v,
        }
    }
}

/// Per kept source MoE layer, the experts kept (ascending).
type KeptExperts = HashMap<usize, Vec<u32>>;

/// The source layers to keep (ascending), per kept MoE layer the experts to keep, and how
/// often the ranker failed.
fn choose(
    cfg: &ModelConfig,
    opts: &ConvertOptions,
    mut ranker: Option<&mut crate::policy::wasm::PruningPlugin>,
) -> Result<(Vec<usize>, KeptExperts, usize)> {
    let moe = cfg.moe_layers();
    let dense: Vec<usize> = (0..cfg.num_hidden_layers)
        .filter(|l| !moe.contains(l))
        .collect();
    ensure!(
        dense.iter().all(|&l| l < cfg.first_k_dense_replace),
        "only models whose dense layers come first are supported (moe_layer_freq {})",
        cfg.moe_layer_freq
    );
    let n = opts.layers;
    ensure!(
        n > dense.len() && n <= cfg.num_hidden_layers,
        "--layers {n}: the model has {} layers, the first {} dense; keep between {} and {}",
        cfg.num_hidden_layers,
        dense.len(),
        dense.len() + 1,
        cfg.num_hidden_layers
    );
    let m = opts.experts;
    ensure!(
        m >= 1 && m <= cfg.n_routed_experts,
        "--experts {m}: the model has {} routed experts per layer",
        cfg.n_routed_experts
    );
    if let Some(p) = &opts.profile {
        ensure!(
            p.num_hidden_layers == cfg.num_hidden_layers
                && p.n_routed_experts == cfg.n_routed_experts,
            "the profile is of a model with {} layers x {} experts, not {} x {}",
            p.num_hidden_layers,
            p.n_routed_experts,
            cfg.num_hidden_layers,
            cfg.n_routed_experts
        );
    }
    let keep_moe = n - dense.len();
    let mut kept: Vec<usize> = match (&opts.layer_choice, &opts.profile) {
        (LayerChoice::Uniform, _) => (0..keep_moe)
            .map(|i| moe[(2 * i + 1) * moe.len() / (2 * keep_moe)])
            .collect(),
        (LayerChoice::Profile, Some(p)) => {
            let mut ranked = moe.clone();
            let bi = |l: usize| p.layers.get(l).map_or(0.0, |s| s.block_influence);
            // Most influential first; ties to the earlier layer.
            ranked.sort_by(|a, b| bi(*b).total_cmp(&bi(*a)).then(a.cmp(b)));
            ranked.truncate(keep_moe);
            ranked
        }
        (LayerChoice::Profile, None) => {
            bail!("choosing layers by importance needs --profile (or use --uniform)")
        }
    };
    kept.sort_unstable();
    kept.dedup();
    let mut experts = HashMap::new();
    let mut fallbacks = 0;
    let moe_index = |l: usize| moe.iter().position(|&x| x == l).unwrap_or(0) as u32;
    for &l in &kept {
        let mut ids: Vec<u32> = (0..cfg.n_routed_experts as u32).collect();
        if let Some(stats) = opts
            .profile
            .as_ref()
            .and_then(|p| p.layers.get(l))
            .filter(|s| s.experts.len() == cfg.n_routed_experts)
        {
            let mass = |e: u32| stats.experts[e as usize].mass;
            // Most routed mass first; ties to the lower id.
            ids.sort_by(|a, b| mass(*b).total_cmp(&mass(*a)).then(a.cmp(b)));
            if let Some(r) = ranker.as_deref_mut() {
                let shape = crate::policy::ModelShape {
                    moe_layers: moe.len() as u32,
                    experts_per_layer: cfg.n_routed_experts as u32,
                    top_k: cfg.num_experts_per_tok as u32,
                    expert_bytes: 0,
                };
                let counts: Vec<u32> = stats
                    .experts
                    .iter()
                    .map(|e| e.count.min(u64::from(u32::MAX)) as u32)
                    .collect();
                let masses: Vec<f32> = stats.experts.iter().map(|e| e.mass as f32).collect();
                match r.rank(shape, moe_index(l), &counts, &masses, m as u32) {
                    Ok(ranked) => ids = ranked,
                    Err(e) => {
                        fallbacks += 1;
                        eprintln!(
                            "moehost: pruning plugin {} failed on layer {l} ({e}); ranked by routed mass",
                            r.name
                        );
                    }
                }
            }
        }
        ids.truncate(m);
        ids.sort_unstable();
        experts.insert(l, ids);
    }
    let layers: Vec<usize> = dense.into_iter().chain(kept).collect();
    Ok((layers, experts, fallbacks))
}

/// Group-limited routing needs every group to hold experts: keep the source's groups when
/// they still divide the experts (at least two per group, as DeepSeek scores a group by its
/// top two), else one group.
fn groups_for(n_group: usize, topk_group: usize, experts: usize) -> (usize, usize) {
    if n_group > 1 && experts.is_multiple_of(n_group) && experts / n_group >= 2 {
        (n_group, topk_group.min(n_group))
    } else {
        (1, 1)
    }
}

/// `model.layers.{i}.{rest}` -> `(i, rest)`.
fn layer_of(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (i, rest) = rest.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

/// `mlp.experts.{e}.{tail}` -> `(e, tail)`.
fn expert_of(rest: &str) -> Option<(u32, &str)> {
    let r = rest.strip_prefix("mlp.experts.")?;
    let (e, tail) = r.split_once('.')?;
    Some((e.parse().ok()?, tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_groups() {
        assert_eq!(
            layer_of("model.layers.12.mlp.gate.weight"),
            Some((12, "mlp.gate.weight"))
        );
        assert_eq!(layer_of("model.norm.weight"), None);
        assert_eq!(
            expert_of("mlp.experts.7.down_proj.weight"),
            Some((7, "down_proj.weight"))
        );
        assert_eq!(expert_of("mlp.shared_experts.down_proj.weight"), None);
        // Kimi-K2: 1 group; DeepSeek-V3: 8 groups of 32, top 4.
        assert_eq!(groups_for(1, 1, 16), (1, 1));
        assert_eq!(groups_for(8, 4, 64), (8, 4));
        assert_eq!(groups_for(8, 4, 12), (1, 1));
        assert_eq!(groups_for(8, 4, 8), (1, 1));
    }
}
