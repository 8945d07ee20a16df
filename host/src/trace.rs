//! Routing traces: the public `moehost-trace/1` format (see docs/traces.md), reading it with
//! every check a reader needs, writing it, recording one from a model, and importing simple
//! JSON-lines routing dumps.
//!
//! Owns: the file format and its validation (a bad file is an error naming the file and the
//! problem), `moehost trace record` (prefill + greedy decode of each prompt through the real
//! model, optionally with speculative next-layer gate scores), `moehost trace import` /
//! `export` (JSON lines). Does not own: what a trace means for a cache (the replay lab).

use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The value of the `format` metadata key this version writes and reads.
pub const FORMAT: &str = "moehost-trace/1";

/// The `__metadata__` of a trace (all values are strings in the file).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceMeta {
    /// The model that routed (e.g. `tiny-k2`, `Kimi-K2-Instruct`).
    pub model: String,
    /// `prefill`, `decode`, `mixed`, `import`, ... (free text, informative).
    pub kind: String,
    pub n_routed_experts: u32,
    /// Model layer index of each MoE layer, in order (the L axis of the tensors).
    pub moe_layers: Vec<u32>,
    /// Experts per token (the k axis).
    pub k: u32,
    /// Bytes of one routed expert in storage format.
    pub expert_bytes: u64,
    /// How the trace was made (free text).
    pub how: String,
    /// Any other metadata keys, kept as they are.
    pub extra: BTreeMap<String, String>,
}

/// A routing trace in memory. Token-major: token `t`, MoE layer `l`, slot `j` is at
/// `(t * layers + l) * k + j`.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub meta: TraceMeta,
    /// Routed expert ids `[tokens, layers, k]`; `-1` = no expert in that slot.
    pub experts: Vec<i32>,
    /// Gate weights `[tokens, layers, k]`, aligned with `experts`.
    pub weights: Vec<f32>,
    /// Forward pass that processed each token `[tokens]`, non-decreasing.
    pub step: Vec<i32>,
    /// Request / document of each token `[tokens]`.
    pub doc: Vec<i32>,
    /// Optional input token ids `[tokens]`.
    pub token_ids: Option<Vec<i32>>,
    /// Optional speculative scores `[tokens, layers, n_routed_experts]`: row `(t, l)` is MoE
    /// layer `l`'s gate (sigmoid + bias, group limit applied) applied to the hidden state that entered MoE layer
    /// `l - 1` for token `t` (what a lookahead-1 prefetch policy sees); row `l = 0` is unused.
    pub speculative: Option<Vec<f32>>,
}

impl Trace {
    pub fn tokens(&self) -> usize {
        self.step.len()
    }

    pub fn layers(&self) -> usize {
        self.meta.moe_layers.len()
    }

    pub fn k(&self) -> usize {
        self.meta.k as usize
    }

    /// The routed experts of token `t` at MoE layer `l` (`-1` entries included).
    pub fn row(&self, t: usize, l: usize) -> &[i32] {
        let k = self.k();
        let at = (t * self.layers() + l) * k;
        &self.experts[at..at + k]
    }

    /// Reads and validates a trace file.
    pub fn load(path: &Path) -> Result<Trace> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read trace {}", path.display()))?;
        Self::from_bytes(&bytes).with_context(|| format!("trace {}", path.display()))
    }

    /// Parses and validates a trace from the bytes of a safetensors file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Trace> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| anyhow::anyhow!("not a safetensors file ({e})"))?;
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| anyhow::anyhow!("not a safetensors file ({e})"))?;
        let meta_map = header.metadata().clone().with_context(|| {
            format!("has no __metadata__; a {FORMAT} file needs format, model, n_routed_experts, moe_layers, k, expert_bytes")
        })?;
        let meta = parse_meta(&meta_map)?;
        let l = meta.moe_layers.len();
        let k = meta.k as usize;
        let e = meta.n_routed_experts as usize;

        let step = read_i32(&st, "step")?;
        let n = step.data.len();
        ensure_shape("step", &step.shape, &[n])?;
        let doc = read_i32(&st, "doc")?;
        ensure_shape("doc", &doc.shape, &[n])?;
        let experts = read_i32(&st, "experts")?;
        ensure_shape("experts", &experts.shape, &[n, l, k])?;
        let weights = read_f32(&st, "weights")?;
        ensure_shape("weights", &weights.shape, &[n, l, k])?;
        let token_ids = match has(&st, "token_ids") {
            true => {
                let t = read_i32(&st, "token_ids")?;
                ensure_shape("token_ids", &t.shape, &[n])?;
                Some(t.data)
            }
            false => None,
        };
        let speculative = match has(&st, "speculative") {
            true => {
                let s = read_f32(&st, "speculative")?;
                ensure_shape("speculative", &s.shape, &[n, l, e])?;
                Some(s.data)
            }
            false => None,
        };
        let trace = Trace {
            meta,
            experts: experts.data,
            weights: weights.data,
            step: step.data,
            doc: doc.data,
            token_ids,
            speculative,
        };
        trace.validate()?;
        Ok(trace)
    }

    /// Checks the values: steps non-negative and non-decreasing, expert ids in range.
    pub fn validate(&self) -> Result<()> {
        let m = &self.meta;
        ensure!(m.k > 0, "metadata k must be at least 1");
        ensure!(
            m.n_routed_experts > 0,
            "metadata n_routed_experts must be at least 1"
        );
        ensure!(!m.moe_layers.is_empty(), "metadata moe_layers is empty");
        let n = self.tokens();
        let (l, k) = (self.layers(), self.k());
        ensure!(
            self.doc.len() == n
                && self.experts.len() == n * l * k
                && self.weights.len() == n * l * k,
            "tensor lengths disagree with {n} tokens x {l} layers x k={k}"
        );
        let mut prev = 0i32;
        for (t, &s) in self.step.iter().enumerate() {
            ensure!(s >= 0, "step[{t}] = {s} is negative");
            ensure!(
                s >= prev,
                "step must be non-decreasing (tokens of one forward pass are contiguous): step[{t}] = {s} follows {prev}"
            );
            prev = s;
        }
        let e = m.n_routed_experts as i32;
        for (i, &x) in self.experts.iter().enumerate() {
            if x < -1 || x >= e {
                let t = i / (l * k);
                let layer = i / k % l;
                bail!(
                    "experts[{t}, {layer}, {}] = {x} is out of range (0..{e}, or -1 for none)",
                    i % k
                );
            }
        }
        Ok(())
    }

    /// The metadata as stored in the file.
    pub fn metadata_map(&self) -> HashMap<String, String> {
        let m = &self.meta;
        let mut map: HashMap<String, String> = m.extra.clone().into_iter().collect();
        map.insert("format".into(), FORMAT.into());
        map.insert("model".into(), m.model.clone());
        map.insert("kind".into(), m.kind.clone());
        map.insert("n_routed_experts".into(), m.n_routed_experts.to_string());
        map.insert(
            "moe_layers".into(),
            serde_json::to_string(&m.moe_layers).expect("a list of integers"),
        );
        map.insert("k".into(), m.k.to_string());
        map.insert("expert_bytes".into(), m.expert_bytes.to_string());
        map.insert("how".into(), m.how.clone());
        map
    }

    /// Writes the trace as safetensors.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.validate()?;
        let n = self.tokens();
        let (l, k) = (self.layers(), self.k());
        let i32b = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let f32b = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let experts = i32b(&self.experts);
        let weights = f32b(&self.weights);
        let step = i32b(&self.step);
        let doc = i32b(&self.doc);
        let token_ids = self.token_ids.as_deref().map(i32b);
        let speculative = self.speculative.as_deref().map(f32b);
        let mut tensors = vec![
            (
                "experts",
                TensorView::new(Dtype::I32, vec![n, l, k], &experts)?,
            ),
            (
                "weights",
                TensorView::new(Dtype::F32, vec![n, l, k], &weights)?,
            ),
            ("step", TensorView::new(Dtype::I32, vec![n], &step)?),
            ("doc", TensorView::new(Dtype::I32, vec![n], &doc)?),
        ];
        if let Some(t) = &token_ids {
            tensors.push(("token_ids", TensorView::new(Dtype::I32, vec![n], t)?));
        }
        if let Some(s) = &speculative {
            let e = self.meta.n_routed_experts as usize;
            tensors.push((
                "speculative",
                TensorView::new(Dtype::F32, vec![n, l, e], s)?,
            ));
        }
        safetensors::serialize_to_file(tensors, Some(self.metadata_map()), path)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Counts for `moehost trace info`.
    pub fn summary(&self) -> TraceSummary {
        let n = self.tokens();
        let mut steps = 0usize;
        let mut docs = std::collections::BTreeSet::new();
        for (t, &s) in self.step.iter().enumerate() {
            if t == 0 || self.step[t - 1] != s {
                steps += 1;
            }
            docs.insert(self.doc[t]);
        }
        TraceSummary {
            meta: self.meta.clone(),
            tokens: n,
            steps,
            docs: docs.len(),
            has_token_ids: self.token_ids.is_some(),
            has_speculative: self.speculative.is_some(),
        }
    }
}

/// What `moehost trace info` prints.
#[derive(Debug, Clone, Serialize)]
pub struct TraceSummary {
    pub meta: TraceMeta,
    pub tokens: usize,
    pub steps: usize,
    pub docs: usize,
    pub has_token_ids: bool,
    pub has_speculative: bool,
}

fn parse_meta(map: &HashMap<String, String>) -> Result<TraceMeta> {
    let get = |key: &str| -> Result<&String> {
        map.get(key)
            .with_context(|| format!("metadata key {key:?} is missing"))
    };
    let format = get("format")?;
    ensure!(
        format == FORMAT || format.starts_with(&format!("{FORMAT}.")),
        "metadata format is {format:?}, expected {FORMAT:?}"
    );
    let int = |key: &str| -> Result<u64> {
        let v = get(key)?;
        v.trim()
            .parse::<u64>()
            .with_context(|| format!("metadata {key} = {v:?} is not a non-negative integer"))
    };
    let n_routed_experts = u32::try_from(int("n_routed_experts")?)
        .context("metadata n_routed_experts is too large")?;
    let k = u32::try_from(int("k")?).context("metadata k is too large")?;
    let expert_bytes = int("expert_bytes")?;
    let layers_text = get("moe_layers")?;
    let moe_layers: Vec<u32> = serde_json::from_str(layers_text).with_context(|| {
        format!("metadata moe_layers = {layers_text:?} is not a JSON list of layer indices")
    })?;
    ensure!(!moe_layers.is_empty(), "metadata moe_layers is empty");
    ensure!(k > 0, "metadata k must be at least 1");
    ensure!(
        n_routed_experts > 0,
        "metadata n_routed_experts must be at least 1"
    );
    ensure!(
        k <= n_routed_experts,
        "metadata k = {k} is larger than n_routed_experts = {n_routed_experts}"
    );
    let known = [
        "format",
        "model",
        "kind",
        "n_routed_experts",
        "moe_layers",
        "k",
        "expert_bytes",
        "how",
    ];
    let extra = map
        .iter()
        .filter(|(key, _)| !known.contains(&key.as_str()))
        .map(|(a, b)| (a.clone(), b.clone()))
        .collect();
    Ok(TraceMeta {
        model: map.get("model").cloned().unwrap_or_default(),
        kind: map.get("kind").cloned().unwrap_or_default(),
        n_routed_experts,
        moe_layers,
        k,
        expert_bytes,
        how: map.get("how").cloned().unwrap_or_default(),
        extra,
    })
}

struct Loaded<T> {
    shape: Vec<usize>,
    data: Vec<T>,
}

fn has(st: &SafeTensors, name: &str) -> bool {
    st.names().contains(&name)
}

fn view<'a>(st: &'a SafeTensors, name: &str, want: Dtype) -> Result<TensorView<'a>> {
    let v = st
        .tensor(name)
        .map_err(|_| anyhow::anyhow!("tensor {name:?} is missing"))?;
    ensure!(
        v.dtype() == want,
        "tensor {name:?} is {:?}, expected {want:?}",
        v.dtype()
    );
    Ok(v)
}

fn read_i32(st: &SafeTensors, name: &str) -> Result<Loaded<i32>> {
    let v = view(st, name, Dtype::I32)?;
    Ok(Loaded {
        shape: v.shape().to_vec(),
        data: v
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect(),
    })
}

fn read_f32(st: &SafeTensors, name: &str) -> Result<Loaded<f32>> {
    let v = view(st, name, Dtype::F32)?;
    Ok(Loaded {
        shape: v.shape().to_vec(),
        data: v
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect(),
    })
}

fn ensure_shape(name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    ensure!(
        got == want,
        "tensor {name:?} has shape {got:?}, expected {want:?} (tokens, moe_layers, k / n_routed_experts from the metadata)"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// JSON lines

/// Options of `moehost trace import --from jsonl`.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Routed experts per layer; default: the largest expert id seen + 1.
    pub n_routed_experts: Option<u32>,
    /// Bytes of one expert; default 0 (unknown: give `--expert-bytes` to replay).
    pub expert_bytes: Option<u64>,
    /// Model name for the metadata.
    pub model: Option<String>,
}

/// One line of a routing dump (other fields are ignored).
#[derive(serde::Deserialize)]
struct JsonRecord {
    #[serde(default)]
    doc: i64,
    token: i64,
    layer: i64,
    experts: Vec<i64>,
    #[serde(default)]
    weights: Option<Vec<f64>>,
}

/// Reads a JSON-lines routing dump: one `{"doc", "token", "layer", "experts", "weights"}` object
/// per line (`doc` optional, default 0; `weights` optional). Each distinct (doc, token) becomes
/// one decode step, ordered by doc then token; the distinct `layer` values, ascending, become
/// the MoE layers; `k` is the longest `experts` list (shorter ones are padded with -1).
pub fn import_jsonl(path: &Path, opts: &ImportOptions) -> Result<Trace> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open routing dump {}", path.display()))?;
    let mut records = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let lineno = i + 1;
        let line =
            line.with_context(|| format!("{}: line {lineno}: cannot read", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: JsonRecord = serde_json::from_str(&line).map_err(|e| {
            anyhow::anyhow!(
                "{}: line {lineno}: not a routing record ({e}); expected {{\"doc\": D, \"token\": T, \"layer\": L, \"experts\": [...], \"weights\": [...]}}",
                path.display()
            )
        })?;
        let fail = |msg: String| anyhow::anyhow!("{}: line {lineno}: {msg}", path.display());
        if r.experts.is_empty() {
            return Err(fail("\"experts\" is empty".into()));
        }
        if let Some(w) = &r.weights {
            if w.len() != r.experts.len() {
                return Err(fail(format!(
                    "{} weights for {} experts",
                    w.len(),
                    r.experts.len()
                )));
            }
        }
        if r.layer < 0 || r.layer > u32::MAX as i64 {
            return Err(fail(format!("layer {} is out of range", r.layer)));
        }
        if i32::try_from(r.doc).is_err() {
            return Err(fail(format!("doc {} does not fit a 32-bit integer", r.doc)));
        }
        for &x in &r.experts {
            let limit = opts.n_routed_experts.map_or(i32::MAX as i64, i64::from);
            if x < 0 || x >= limit {
                return Err(fail(format!("expert id {x} is out of range (0..{limit})")));
            }
        }
        records.push((format!("line {lineno}"), r));
    }
    build_trace(path, "jsonl", &records, opts)
}

/// Reads the dense per-layer CSV routing dumps of FLAME-MoE-Traces (CMU-FLAME, as exported
/// next to its `.pt` files): one file per MoE layer, given in layer order, each with the
/// header `layer_id,token_id,expert_0,...,expert_{E-1}` and one row per token holding every
/// expert's router probability, 0 for the experts not routed to. The experts above 0 are the
/// token's picks, their values its weights. `interleave` N > 1 reads rows that are
/// position-major across N sequences (row r is position r / N of sequence r % N, as in the
/// published encoder batches); 1 takes the rows as one sequence.
pub fn import_dense_csv(paths: &[PathBuf], interleave: u32, opts: &ImportOptions) -> Result<Trace> {
    ensure!(!paths.is_empty(), "no CSV file given (one per MoE layer)");
    ensure!(interleave >= 1, "--interleave must be at least 1");
    let mut records = Vec::new();
    let mut experts_per_layer: Option<(usize, &Path)> = None;
    for (layer, path) in paths.iter().enumerate() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read routing dump {}", path.display()))?;
        let mut lines = text.lines().enumerate();
        let header: Vec<&str> = lines
            .next()
            .map(|(_, h)| h.split(',').map(str::trim).collect())
            .unwrap_or_default();
        let token_col = header.iter().position(|&c| c == "token_id");
        let expert_cols: Vec<(usize, i64)> = header
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((i, c.strip_prefix("expert_")?.parse().ok()?)))
            .collect();
        let Some(token_col) = token_col.filter(|_| !expert_cols.is_empty()) else {
            bail!(
                "{}: not a dense routing CSV: expected a header `layer_id,token_id,expert_0,...`",
                path.display()
            );
        };
        match experts_per_layer {
            Some((n, first)) if n != expert_cols.len() => bail!(
                "{}: {} expert columns, but {} has {n}",
                path.display(),
                expert_cols.len(),
                first.display()
            ),
            _ => experts_per_layer = Some((expert_cols.len(), path)),
        }
        for (i, line) in lines {
            if line.trim().is_empty() {
                continue;
            }
            let at = format!("{}: line {}", path.display(), i + 1);
            let record_at = format!("line {} of {}", i + 1, path.display());
            let cells: Vec<&str> = line.split(',').map(str::trim).collect();
            ensure!(
                cells.len() == header.len(),
                "{at}: {} fields, the header has {}",
                cells.len(),
                header.len()
            );
            let row: i64 = cells[token_col]
                .parse()
                .ok()
                .filter(|&t: &i64| t >= 0)
                .with_context(|| {
                    format!("{at}: token_id {:?} is not a row number", cells[token_col])
                })?;
            let mut picks = Vec::new();
            for &(col, expert) in &expert_cols {
                let w: f64 = cells[col]
                    .parse()
                    .ok()
                    .filter(|w: &f64| w.is_finite() && *w >= 0.0)
                    .with_context(|| {
                        format!(
                            "{at}: expert_{expert} is {:?}, not a probability",
                            cells[col]
                        )
                    })?;
                if w > 0.0 {
                    picks.push((expert, w));
                }
            }
            ensure!(
                !picks.is_empty(),
                "{at}: no expert has a probability above 0"
            );
            let n = i64::from(interleave);
            records.push((
                record_at,
                JsonRecord {
                    doc: row % n,
                    token: row / n,
                    layer: layer as i64,
                    experts: picks.iter().map(|p| p.0).collect(),
                    weights: Some(picks.iter().map(|p| p.1).collect()),
                },
            ));
        }
    }
    let mut opts = opts.clone();
    if opts.n_routed_experts.is_none() {
        opts.n_routed_experts = experts_per_layer.map(|(n, _)| n as u32);
    }
    build_trace(&paths[0], "dense-csv", &records, &opts)
}

/// One trace from parsed records (`(where, record)`; see [`import_jsonl`] for the layout).
fn build_trace(
    path: &Path,
    format: &str,
    records: &[(String, JsonRecord)],
    opts: &ImportOptions,
) -> Result<Trace> {
    ensure!(
        !records.is_empty(),
        "{}: no routing records",
        path.display()
    );
    let mut layers: Vec<i64> = records.iter().map(|(_, r)| r.layer).collect();
    layers.sort_unstable();
    layers.dedup();
    let layer_index: HashMap<i64, usize> =
        layers.iter().enumerate().map(|(i, &l)| (l, i)).collect();
    let k = records
        .iter()
        .map(|(_, r)| r.experts.len())
        .max()
        .unwrap_or(1);
    let max_id = records
        .iter()
        .flat_map(|(_, r)| r.experts.iter().copied())
        .max()
        .unwrap_or(0);
    let n_experts = opts.n_routed_experts.unwrap_or((max_id + 1) as u32);
    ensure!(
        k <= n_experts as usize,
        "{}: {k} experts per record but only {n_experts} experts per layer",
        path.display()
    );
    let mut tokens: Vec<(i64, i64)> = records.iter().map(|(_, r)| (r.doc, r.token)).collect();
    tokens.sort_unstable();
    tokens.dedup();
    let token_index: HashMap<(i64, i64), usize> =
        tokens.iter().enumerate().map(|(i, &t)| (t, i)).collect();
    let n = tokens.len();
    let l = layers.len();
    let mut experts = vec![-1i32; n * l * k];
    let mut weights = vec![0f32; n * l * k];
    let mut seen: HashMap<(usize, usize), usize> = HashMap::new();
    for (i, (at, r)) in records.iter().enumerate() {
        let t = token_index[&(r.doc, r.token)];
        let li = layer_index[&r.layer];
        if let Some(first) = seen.insert((t, li), i) {
            bail!(
                "{}: {at}: doc {} token {} layer {} was already given on {}",
                path.display(),
                r.doc,
                r.token,
                r.layer,
                records[first].0
            );
        }
        let mut pairs: Vec<(i64, f64)> = r
            .experts
            .iter()
            .enumerate()
            .map(|(j, &x)| (x, r.weights.as_ref().map_or(0.0, |w| w[j])))
            .collect();
        pairs.sort_by_key(|p| p.0);
        let at = (t * l + li) * k;
        for (j, (x, w)) in pairs.into_iter().enumerate() {
            experts[at + j] = x as i32;
            weights[at + j] = w as f32;
        }
    }
    let step: Vec<i32> = (0..n)
        .map(|i| i32::try_from(i).context("more than 2^31 tokens"))
        .collect::<Result<_>>()?;
    let doc: Vec<i32> = tokens.iter().map(|&(d, _)| d as i32).collect();
    let trace = Trace {
        meta: TraceMeta {
            model: opts.model.clone().unwrap_or_else(|| "unknown".into()),
            kind: "import".into(),
            n_routed_experts: n_experts,
            moe_layers: layers.iter().map(|&x| x as u32).collect(),
            k: k as u32,
            expert_bytes: opts.expert_bytes.unwrap_or(0),
            how: format!(
                "moehost trace import --from {format} {}: one decode step per (doc, token)",
                path.file_name().map_or_else(
                    || path.display().to_string(),
                    |f| f.to_string_lossy().into_owned()
                )
            ),
            extra: BTreeMap::new(),
        },
        experts,
        weights,
        step,
        doc,
        token_ids: None,
        speculative: None,
    };
    trace.validate()?;
    Ok(trace)
}

/// Writes `trace` as JSON lines, one record per (token, layer) with at least one expert:
/// `token` is the token's index within its doc; `layer` the model layer index. A multi-token
/// step becomes one step per token when imported again.
pub fn export_jsonl(trace: &Trace, out: &mut dyn Write) -> Result<()> {
    let l = trace.layers();
    let mut position: HashMap<i32, i64> = HashMap::new();
    for t in 0..trace.tokens() {
        let d = trace.doc[t];
        let pos = position.entry(d).or_insert(0);
        for li in 0..l {
            let row = trace.row(t, li);
            let at = (t * l + li) * trace.k();
            let (ex, w): (Vec<i32>, Vec<f32>) = row
                .iter()
                .zip(&trace.weights[at..at + trace.k()])
                .filter(|(x, _)| **x >= 0)
                .map(|(x, w)| (*x, *w))
                .unzip();
            if ex.is_empty() {
                continue;
            }
            let rec = serde_json::json!({
                "doc": d,
                "token": *pos,
                "layer": trace.meta.moe_layers[li],
                "experts": ex,
                "weights": w,
            });
            writeln!(out, "{rec}")?;
        }
        *pos += 1;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Recording

/// Options of `moehost trace record`.
#[derive(Debug, Clone)]
pub struct RecordOptions {
    /// Decode steps per prompt after its prefill (stops early at an eos token).
    pub max_tokens: usize,
    /// Also record the `speculative` tensor (next-layer gate on the current hidden state).
    pub speculative: bool,
}

/// Reads a prompts file: one JSON object per line with a string `prompt` field.
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read prompts file {}", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fail = |m: &str| anyhow::anyhow!("{}: line {}: {m}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| fail(&format!("not a JSON object ({e})")))?;
        let p = v
            .get("prompt")
            .and_then(|p| p.as_str())
            .ok_or_else(|| fail("needs a string \"prompt\" field"))?;
        ensure!(!p.is_empty(), fail("the prompt is empty"));
        prompts.push(p.to_owned());
    }
    ensure!(!prompts.is_empty(), "{}: no prompts", path.display());
    Ok(prompts)
}

/// An expert provider that serves every expert resident and keeps the speculative scores the
/// model computes for a lookahead of one MoE layer.
struct Recorder {
    inner: crate::experts::ResidentExperts,
    speculative: bool,
    /// (decoder layer the scores are for, scores [tokens x experts]) of the current pass.
    outlook: Mutex<Vec<(usize, Vec<f32>)>>,
}

impl crate::experts::ExpertProvider for Recorder {
    fn step(
        &self,
        step: &crate::experts::LayerStep<'_>,
    ) -> Result<Vec<crate::experts::ExpertWeights>> {
        let weights = self.inner.fetch(step.layer, step.experts)?;
        if self.speculative {
            if let Some(o) = (step.outlook)(1).into_iter().next() {
                self.outlook.lock().unwrap().push(o);
            }
        }
        Ok(weights)
    }
}

/// Runs each prompt through the model in `dir`: one prefill step, then greedy decoding, one
/// step per generated token fed back (at most `max_tokens`, stopping at an eos token). Prompts
/// are served one after another; each is its own doc.
pub fn record(dir: &Path, prompts: &[String], opts: &RecordOptions) -> Result<Trace> {
    let mut recorder: Option<Arc<Recorder>> = None;
    let engine = crate::Engine::open_with(dir, |ckpt, cfg| {
        let r = Arc::new(Recorder {
            inner: crate::experts::ResidentExperts::new(ckpt, cfg),
            speculative: opts.speculative,
            outlook: Mutex::new(Vec::new()),
        });
        recorder = Some(r.clone());
        r
    })?;
    let recorder = recorder.expect("provider built");
    let cfg = engine.model.config().clone();
    let moe_layers = cfg.moe_layers();
    let moe_index: HashMap<usize, usize> = moe_layers
        .iter()
        .enumerate()
        .map(|(i, &l)| (l, i))
        .collect();
    let (l, k, e) = (
        moe_layers.len(),
        cfg.num_experts_per_tok,
        cfg.n_routed_experts,
    );
    ensure!(l > 0, "the model in {} has no MoE layers", dir.display());
    let expert_bytes = expert_storage_bytes(&engine, moe_layers[0])?;
    let mut trace = Trace {
        meta: TraceMeta {
            model: dir
                .file_name()
                .map_or_else(|| cfg.model_type.clone(), |f| f.to_string_lossy().into_owned()),
            kind: "mixed".into(),
            n_routed_experts: e as u32,
            moe_layers: moe_layers.iter().map(|&x| x as u32).collect(),
            k: k as u32,
            expert_bytes,
            how: format!(
                "moehost trace record: {} prompts served one after another, each a prefill step then up to {} greedy decode steps",
                prompts.len(),
                opts.max_tokens
            ),
            extra: BTreeMap::new(),
        },
        experts: Vec::new(),
        weights: Vec::new(),
        step: Vec::new(),
        doc: Vec::new(),
        token_ids: Some(Vec::new()),
        speculative: opts.speculative.then(Vec::new),
    };
    let mut step = 0i32;
    for (d, prompt) in prompts.iter().enumerate() {
        let ids = engine
            .encode(prompt)
            .with_context(|| format!("prompt {}", d + 1))?;
        ensure!(!ids.is_empty(), "prompt {} encodes to no tokens", d + 1);
        ensure!(
            ids.len() <= cfg.max_position_embeddings,
            "prompt {} has {} tokens, more than max_position_embeddings ({})",
            d + 1,
            ids.len(),
            cfg.max_position_embeddings
        );
        let mut cache = engine.model.new_cache();
        let mut chunk = ids;
        let mut decoded = 0usize;
        loop {
            recorder.outlook.lock().unwrap().clear();
            let out = engine
                .model
                .forward(&chunk, &mut cache, crate::Logits::Last, true)
                .with_context(|| format!("prompt {}", d + 1))?;
            let t = chunk.len();
            let (ex, w) = crate::forward_dump::token_major(&out.routing, t);
            trace.experts.extend(ex);
            trace.weights.extend(w);
            trace.step.extend(std::iter::repeat_n(step, t));
            trace.doc.extend(std::iter::repeat_n(d as i32, t));
            if let Some(ti) = trace.token_ids.as_mut() {
                ti.extend(chunk.iter().map(|&x| x as i32));
            }
            if let Some(spec) = trace.speculative.as_mut() {
                let mut rows = vec![0f32; t * l * e];
                for (layer, scores) in recorder.outlook.lock().unwrap().iter() {
                    let Some(&li) = moe_index.get(layer) else {
                        continue;
                    };
                    for tok in 0..t {
                        rows[(tok * l + li) * e..(tok * l + li + 1) * e]
                            .copy_from_slice(&scores[tok * e..(tok + 1) * e]);
                    }
                }
                spec.extend(rows);
            }
            step = step.checked_add(1).context("more than 2^31 steps")?;
            if decoded >= opts.max_tokens || cache.len() >= cfg.max_position_embeddings {
                break;
            }
            let next = crate::model::sampling::argmax(&out.logits);
            if engine.defaults.eos_token_ids.contains(&next) {
                break;
            }
            chunk = vec![next];
            decoded += 1;
        }
    }
    trace.validate()?;
    Ok(trace)
}

/// Bytes of one routed expert in storage format (weights + block scales), from the headers.
fn expert_storage_bytes(engine: &crate::Engine, layer: usize) -> Result<u64> {
    let prefix = crate::experts::expert_prefix(layer, 0);
    let mut total = 0u64;
    for p in ["gate_proj", "up_proj", "down_proj"] {
        total += engine
            .checkpoint
            .raw(&format!("{prefix}.{p}.weight"))?
            .bytes
            .len() as u64;
        if let Ok(s) = engine
            .checkpoint
            .raw(&format!("{prefix}.{p}.weight_scale_inv"))
        {
            total += s.bytes.len() as u64;
        }
    }
    Ok(total)
}
