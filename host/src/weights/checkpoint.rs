//! A safetensors checkpoint, sharded or single-file, memory-mapped and read tensor by tensor.
//!
//! Owns: finding shards (`model.safetensors.index.json` or `*.safetensors`), validating headers
//! (a truncated or garbled file is an error naming it), and turning one stored tensor into f32:
//! bf16 / f16 / f32 directly, FP8 e4m3 through its `*_scale_inv` block scales.
//! Does not own: which tensors a model needs (see `deepseek_v3`) or when they are read
//! (experts are read on demand by an `ExpertProvider`). Nothing here loads a whole model.

use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::weights::format::WeightFormat;
use crate::weights::fp8;
use crate::weights::scales::{ScaleType, Scales};
pub use crate::weights::stored_bytes::StoredBytes;

struct Shard {
    path: PathBuf,
    mmap: Arc<Mmap>,
    /// Start of the data section (8-byte length + JSON header).
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

/// An opened checkpoint: every shard mapped, every header parsed; no tensor data read yet.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name -> index into `shards`.
    index: HashMap<String, usize>,
    fp8_block: Option<[usize; 2]>,
    /// compressed-tensors packed INT4 weights under moehost's int4 names (see [`PackedAlias`]).
    packed: HashMap<String, PackedAlias>,
}

/// A compressed-tensors `pack-quantized` INT4 weight seen as moehost's int4 format, which has
/// the same bits: `<w>.weight_packed` (int32 `[rows, cols / 8]`, eight values per word, low
/// nibble first, each stored as value + 8) read as little-endian bytes is `U8 [rows, cols / 2]`
/// with the even column in the low nibble, stored as value + 8; `<w>.weight_scale` (bf16, one
/// per 32 columns) serves as `<w>.weight_qscale`. Nothing is converted or copied.
struct PackedAlias {
    /// The stored tensor this name reads.
    target: String,
    /// U8 `[rows, cols / 2]` for the weight; the scale keeps its stored dtype and shape.
    dtype: Dtype,
    shape: Vec<usize>,
    /// For the weight: `<w>.weight_shape`, checked against `[rows, cols]` when read.
    weight_shape: Option<String>,
}

/// A stored tensor's bytes and layout, borrowed from the mapping.
pub struct RawTensor<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl Checkpoint {
    /// Opens the checkpoint in `dir`, stored as `config.json`'s `quantization_config` says.
    pub fn open(dir: &Path, quant: crate::model::config::Quantization) -> Result<Self> {
        let fp8_block = quant.fp8_block;
        let index_path = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .with_context(|| format!("cannot read {}", index_path.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", index_path.display()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| {
                    format!("{} has no \"weight_map\" object", index_path.display())
                })?;
            let mut names: Vec<String> = map
                .values()
                .map(|v| {
                    v.as_str().map(str::to_owned).with_context(|| {
                        format!(
                            "{}: weight_map values must be file names",
                            index_path.display()
                        )
                    })
                })
                .collect::<Result<_>>()?;
            names.sort();
            names.dedup();
            names
        } else {
            let single = dir.join("model.safetensors");
            if single.exists() {
                vec!["model.safetensors".into()]
            } else {
                let mut names: Vec<String> = std::fs::read_dir(dir)
                    .with_context(|| format!("cannot list model folder {}", dir.display()))?
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".safetensors"))
                    .collect();
                names.sort();
                ensure!(
                    !names.is_empty(),
                    "no weights in {}: expected model.safetensors.index.json, model.safetensors \
                     or *.safetensors shards",
                    dir.display()
                );
                names
            }
        };

        let mut shards = Vec::with_capacity(shard_names.len());
        let mut index = HashMap::new();
        for name in shard_names {
            ensure!(
                !name.contains('/') && !name.contains('\\') && name != ".." && name != ".",
                "shard name {name:?} in the index is not a plain file name"
            );
            let path = dir.join(&name);
            let shard = open_shard(&path)?;
            for tensor in shard.tensors.keys() {
                if let Some(prev) = index.insert(tensor.clone(), shards.len()) {
                    let prev: &Shard = &shards[prev];
                    bail!(
                        "tensor {tensor} appears in two shards: {} and {}",
                        prev.path.display(),
                        path.display()
                    );
                }
            }
            shards.push(shard);
        }
        let mut ckpt = Self {
            dir: dir.to_owned(),
            shards,
            index,
            fp8_block,
            packed: HashMap::new(),
        };
        if quant.packed_int4 {
            ckpt.alias_packed_int4()?;
        }
        Ok(ckpt)
    }

    /// Registers every `<w>.weight_packed` as `<w>.weight` (and its scale as
    /// `<w>.weight_qscale`), after checking the stored layout.
    fn alias_packed_int4(&mut self) -> Result<()> {
        let packed: Vec<String> = self
            .index
            .keys()
            .filter(|n| n.ends_with(".weight_packed"))
            .cloned()
            .collect();
        for name in packed {
            let base = &name[..name.len() - "_packed".len()];
            let info = self.info(&name).expect("indexed");
            ensure!(
                info.dtype == Dtype::I32 && info.shape.len() == 2,
                "tensor {name} is {:?} {:?}; compressed-tensors packs INT4 weights as I32 [rows, cols / 8]",
                info.dtype,
                info.shape
            );
            let (rows, words) = (info.shape[0], info.shape[1]);
            ensure!(
                !self.index.contains_key(base),
                "tensor {base} is stored both plain and packed ({name})"
            );
            let scale = format!("{base}_scale");
            let s = self.info(&scale).with_context(|| {
                format!("tensor {scale} (the scales of {name}) is missing from the checkpoint")
            })?;
            let want = [
                rows,
                (words * 8).div_ceil(crate::model::config::PACKED_INT4_GROUP),
            ];
            ensure!(
                matches!(s.dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32) && s.shape == want,
                "tensor {scale} is {:?} {:?}; expected a float [{}, {}]: one scale per {} columns of {name}",
                s.dtype,
                s.shape,
                want[0],
                want[1],
                crate::model::config::PACKED_INT4_GROUP
            );
            let (scale_dtype, scale_shape) = (s.dtype, s.shape.clone());
            let shape_name = format!("{base}_shape");
            self.packed.insert(
                base.to_owned(),
                PackedAlias {
                    target: name.clone(),
                    dtype: Dtype::U8,
                    shape: vec![rows, words * 4],
                    weight_shape: self.index.contains_key(&shape_name).then_some(shape_name),
                },
            );
            self.packed.insert(
                format!("{base}_qscale"),
                PackedAlias {
                    target: scale,
                    dtype: scale_dtype,
                    shape: scale_shape,
                    weight_shape: None,
                },
            );
        }
        Ok(())
    }

    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index
            .get(name)
            .and_then(|&s| self.shards[s].tensors.get(name))
    }

    pub fn fp8_block(&self) -> Option<[usize; 2]> {
        self.fp8_block
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name) || self.packed.contains_key(name)
    }

    /// All tensor names, unordered.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Dtype and shape of tensor `name` (as [`Checkpoint::raw`] gives them) from the headers
    /// alone: no tensor data is touched.
    pub fn header(&self, name: &str) -> Result<(Dtype, &[usize])> {
        if let Some(alias) = self.packed.get(name) {
            return Ok((alias.dtype, &alias.shape));
        }
        let info = self.info(name).with_context(|| {
            format!(
                "tensor {name} is missing from the checkpoint in {}",
                self.dir.display()
            )
        })?;
        Ok((info.dtype, &info.shape))
    }

    /// The stored bytes of tensor `name` (a compressed-tensors INT4 weight under its moehost
    /// int4 name, see [`PackedAlias`]).
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        if let Some((name, alias)) = self.packed.get_key_value(name) {
            let stored = self.raw(&alias.target)?;
            if let Some(shape_name) = &alias.weight_shape {
                let s = self.raw(shape_name)?;
                let dims: Vec<i64> = match s.dtype {
                    Dtype::I32 => s
                        .bytes
                        .chunks_exact(4)
                        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                        .collect(),
                    Dtype::I64 => s
                        .bytes
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                        .collect(),
                    other => bail!("tensor {shape_name} is {other:?}; expected I32 [2]"),
                };
                let logical = [alias.shape[0] as i64, alias.shape[1] as i64 * 2];
                ensure!(
                    dims == logical,
                    "tensor {shape_name} says the weight is {dims:?}, but {} holds {logical:?} \
                     (moehost reads packed INT4 weights whose columns are a multiple of 8)",
                    alias.target
                );
            }
            return Ok(RawTensor {
                name,
                dtype: alias.dtype,
                shape: &alias.shape,
                bytes: stored.bytes,
            });
        }
        let &shard_idx = self.index.get(name).with_context(|| {
            format!(
                "tensor {name} is missing from the checkpoint in {}",
                self.dir.display()
            )
        })?;
        let shard = &self.shards[shard_idx];
        let (name, info) = shard.tensors.get_key_value(name).expect("indexed");
        let (s, e) = info.data_offsets;
        Ok(RawTensor {
            name,
            dtype: info.dtype,
            shape: &info.shape,
            bytes: &shard.mmap[shard.data_start + s..shard.data_start + e],
        })
    }

    /// Tensor `name`'s bytes as a view of its shard's mapping (nothing copied; the pages are
    /// read when used), with the tensor's header.
    pub fn mapped(&self, name: &str) -> Result<(RawTensor<'_>, StoredBytes)> {
        let raw = self.raw(name)?;
        let at = raw.bytes.as_ptr() as usize;
        let shard = self
            .shards
            .iter()
            .find(|s| {
                let base = s.mmap.as_ptr() as usize;
                (base..=base + s.mmap.len()).contains(&at)
            })
            .expect("a tensor's bytes lie in one of the checkpoint's mappings");
        let start = at - shard.mmap.as_ptr() as usize;
        let bytes = StoredBytes::Mapped {
            map: shard.mmap.clone(),
            range: start..start + raw.bytes.len(),
        };
        Ok((raw, bytes))
    }

    /// Reads tensor `name` as f32, checking that its shape is `shape`. FP8 weights are
    /// dequantized with their `<name>_scale_inv` blocks (`weight` -> `weight_scale_inv`).
    pub fn read_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let raw = self.raw(name)?;
        ensure!(
            raw.shape == crate::weights::format::stored_shape(raw.dtype, shape),
            "tensor {name} has shape {:?}, expected {shape:?} from config.json",
            raw.shape
        );
        let scales = self.scales(&raw)?;
        decode_f32(&raw, scales.as_deref(), self.fp8_block)
    }

    /// Reads weight matrix `name` in compute form (see [`Matrix`]): a BF16 tensor as it is
    /// stored, any other as [`Checkpoint::read_f32`] does.
    pub fn read_matrix(&self, name: &str, shape: &[usize]) -> Result<crate::kernels::Matrix> {
        let raw = self.raw(name)?;
        match bf16_values(raw.dtype, raw.bytes) {
            Some(w) => {
                ensure!(
                    raw.shape == shape,
                    "tensor {name} has shape {:?}, expected {shape:?} from config.json",
                    raw.shape
                );
                Ok(crate::kernels::Matrix::Bf16(w))
            }
            None => Ok(crate::kernels::Matrix::F32(self.read_f32(name, shape)?)),
        }
    }

    /// The scales a stored tensor needs, widened to f32: FP8 block scales, or the group scales
    /// of moehost's int8/int4 format (`crate::weights::quant`); `None` for plain float tensors.
    pub fn scales(&self, raw: &RawTensor<'_>) -> Result<Option<Vec<f32>>> {
        let Some((name, shape)) = self.scale_tensor(raw)? else {
            return Ok(None);
        };
        self.read_f32(&name, &shape)
            .map(Some)
            .with_context(|| format!("scales of {} tensor {}", raw_kind(raw), raw.name))
    }

    /// [`Self::scales`] as stored (F32, F16 or BF16): a view of the mapped shard when
    /// `mapped`, else a copy of their bytes.
    pub fn stored_scales(&self, raw: &RawTensor<'_>, mapped: bool) -> Result<Option<Scales>> {
        let Some((name, shape)) = self.scale_tensor(raw)? else {
            return Ok(None);
        };
        let context = || format!("scales of {} tensor {}", raw_kind(raw), raw.name);
        let (s, bytes) = if mapped {
            self.mapped(&name).with_context(context)?
        } else {
            let s = self.raw(&name).with_context(context)?;
            let bytes = StoredBytes::Owned(s.bytes.to_vec());
            (s, bytes)
        };
        ensure!(
            s.shape == shape,
            "scale tensor {name} has shape {:?}, expected {shape:?}",
            s.shape
        );
        Ok(Some(Scales {
            ty: ScaleType::of(&name, s.dtype)?,
            bytes,
        }))
    }

    /// The name and shape of the scale tensor `raw` needs, if any: FP8's `<name>_scale_inv`
    /// (`ceil`-sized blocks), the int formats' `<name>_qscale` (a scale per 32 columns).
    fn scale_tensor(&self, raw: &RawTensor<'_>) -> Result<Option<(String, Vec<usize>)>> {
        let name = raw.name;
        Ok(match WeightFormat::of_dtype(raw.dtype) {
            Some(WeightFormat::Fp8) => {
                ensure!(
                    raw.shape.len() == 2,
                    "FP8 tensor {name} must be 2-D (rows x cols), got shape {:?}",
                    raw.shape
                );
                let block = self.fp8_block.with_context(|| {
                    format!(
                        "tensor {name} is FP8 but config.json has no quantization_config.weight_block_size"
                    )
                })?;
                let shape = vec![
                    raw.shape[0].div_ceil(block[0]),
                    raw.shape[1].div_ceil(block[1]),
                ];
                Some((format!("{name}_scale_inv"), shape))
            }
            Some(f) if f.is_grouped() => {
                let logical = f.logical_shape(raw.shape);
                ensure!(
                    logical.len() == 2,
                    "quantized tensor {name} must be 2-D, got shape {:?}",
                    raw.shape
                );
                let shape = crate::weights::quant::scale_shape(logical[0], logical[1]).to_vec();
                Some((format!("{name}_qscale"), shape))
            }
            _ => None,
        })
    }

    /// Reads a 1-D or 2-D tensor that must be stored in F32 (e.g. `e_score_correction_bias`)
    /// or any float dtype; the shape is checked.
    pub fn read_vec(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.read_f32(name, &[len])
    }
}

/// What a tensor with scales is called in errors.
fn raw_kind(raw: &RawTensor<'_>) -> &'static str {
    match WeightFormat::of_dtype(raw.dtype) {
        Some(WeightFormat::Fp8) => "FP8",
        _ => "quantized",
    }
}

/// A BF16 tensor's values (little-endian bf16 bits); `None` for any other dtype.
pub fn bf16_values(dtype: Dtype, bytes: &[u8]) -> Option<Vec<crate::kernels::Bf16>> {
    (dtype == Dtype::BF16).then(|| {
        bytes
            .chunks_exact(2)
            .map(|c| crate::kernels::Bf16(u16::from_le_bytes([c[0], c[1]])))
            .collect()
    })
}

/// Converts a stored tensor to f32. FP8 needs its block `scales` and the block size.
pub fn decode_f32(
    raw: &RawTensor<'_>,
    scales: Option<&[f32]>,
    fp8_block: Option<[usize; 2]>,
) -> Result<Vec<f32>> {
    let name = raw.name;
    let shape = raw.shape;
    let format = WeightFormat::of_dtype(raw.dtype);
    if format.is_some_and(WeightFormat::is_grouped) {
        let logical = crate::weights::format::logical_shape(raw.dtype, shape);
        ensure!(
            logical.len() == 2,
            "quantized tensor {name} must be 2-D, got shape {shape:?}"
        );
        let scales = scales.with_context(|| format!("quantized tensor {name} needs its scales"))?;
        let mut out = vec![0f32; logical[0] * logical[1]];
        crate::weights::quant::dequantize(
            name, raw.dtype, raw.bytes, logical[0], logical[1], scales, &mut out,
        )?;
        return Ok(out);
    }
    let n: usize = shape.iter().product();
    let mut out = vec![0f32; n];
    match format {
        Some(WeightFormat::F32) => {
            for (o, c) in out.iter_mut().zip(raw.bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Some(WeightFormat::Bf16) => {
            for (o, c) in out.iter_mut().zip(raw.bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        Some(WeightFormat::F16) => {
            for (o, c) in out.iter_mut().zip(raw.bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        Some(WeightFormat::Fp8) => {
            let (Some(scales), Some(block)) = (scales, fp8_block) else {
                bail!("FP8 tensor {name} needs block scales and quantization_config.weight_block_size");
            };
            ensure!(
                shape.len() == 2,
                "FP8 tensor {name} must be 2-D, got shape {shape:?}"
            );
            fp8::dequantize_blocks(raw.bytes, shape[0], shape[1], scales, block, &mut out);
        }
        Some(WeightFormat::Int8 | WeightFormat::Int4) => unreachable!("decoded above"),
        None => bail!(
            "tensor {name} has dtype {:?}; moehost reads F32, BF16, F16, F8_E4M3 and its own int8/int4 (I8/U8) weights",
            raw.dtype
        ),
    }
    Ok(out)
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = File::open(path)
        .with_context(|| format!("missing or unreadable shard {}", path.display()))?;
    // SAFETY: the mapping is read-only; checkpoints are not modified while served
    // (moehost never writes into a model folder).
    let mmap =
        unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
    let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a valid safetensors file (truncated or corrupt?): {e}",
            path.display()
        )
    })?;
    let tensors = metadata
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.clone()))
        .collect();
    Ok(Shard {
        path: path.to_owned(),
        mmap: Arc::new(mmap),
        data_start: 8 + header_len,
        tensors,
    })
}
