//! Checkpoint tensors: `model.safetensors` or the shards a
//! `model.safetensors.index.json` names, memory-mapped, looked up by name.
//!
//! Dense tensors (F32, BF16, F16) become candle tensors of the compute
//! dtype; bitsandbytes 4-bit weights are read with
//! [`crate::nf4::checkpoint::read_nf4`] into [`Nf4Tensor`]s, packed codes
//! and scales only. Every lookup checks the shape, and every error names the
//! file and the tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType as CDType, Device as CDevice, Tensor};
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::io::MappedFile;
use crate::nf4::Nf4Tensor;
use crate::nf4::checkpoint::TensorBuf;
use crate::nf4::checkpoint::{NF4_QUANT_STATE_SUFFIX, QUANT_STATE_INFIX, read_nf4};
use crate::{Error, Result};

/// Name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The bytes of one safetensors file.
#[derive(Debug)]
enum Backing {
    Mapped(MappedFile),
    Owned(Vec<u8>),
}

/// One file of a checkpoint.
#[derive(Debug)]
struct Shard {
    path: PathBuf,
    bytes: Backing,
}

impl Shard {
    fn bytes(&self) -> &[u8] {
        match &self.bytes {
            Backing::Mapped(m) => m.bytes(),
            Backing::Owned(v) => v,
        }
    }
}

/// The safetensors files of a checkpoint (mapped, not read).
#[derive(Debug)]
pub struct Checkpoint {
    shards: Vec<Shard>,
    /// `weight_map` of the index file, when sharded: tensor → file name.
    weight_map: Option<(PathBuf, HashMap<String, String>)>,
}

impl Checkpoint {
    /// Open the checkpoint in `dir`: `model.safetensors.index.json` and the
    /// shards it names when it exists, else `model.safetensors`.
    ///
    /// # Errors
    /// [`Error::Io`] when neither file exists or a file cannot be mapped;
    /// [`Error::Format`] for an index that is not JSON, has no `weight_map`,
    /// or names a file outside `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            let text = crate::io::read_text(&index)?;
            let json: Value = serde_json::from_str(&text)
                .map_err(|e| Error::format(&index, format!("not valid JSON: {e}")))?;
            let Some(Value::Object(map)) = json.get("weight_map") else {
                return Err(Error::format(&index, "no `weight_map` object"));
            };
            let mut weight_map = HashMap::new();
            let mut files: Vec<String> = Vec::new();
            for (name, file) in map {
                let Some(file) = file.as_str() else {
                    return Err(Error::format(
                        &index,
                        format!("weight_map[{name:?}] is {file}, expected a file name"),
                    ));
                };
                if file.contains('/') || file.contains('\\') || file == ".." || file.is_empty() {
                    return Err(Error::format(
                        &index,
                        format!(
                            "weight_map[{name:?}] = {file:?} is not a file name in the checkpoint's directory"
                        ),
                    ));
                }
                if !files.iter().any(|f| f == file) {
                    files.push(file.to_string());
                }
                weight_map.insert(name.clone(), file.to_string());
            }
            files.sort();
            let shards = files
                .iter()
                .map(|f| {
                    let path = dir.join(f);
                    Ok(Shard {
                        bytes: Backing::Mapped(MappedFile::open(&path)?),
                        path,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Self {
                shards,
                weight_map: Some((index, weight_map)),
            })
        } else {
            let path = dir.join(SINGLE_FILE);
            if !path.is_file() {
                return Err(Error::io(
                    &path,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("no {SINGLE_FILE} or {INDEX_FILE} in the checkpoint directory"),
                    ),
                ));
            }
            Ok(Self {
                shards: vec![Shard {
                    bytes: Backing::Mapped(MappedFile::open(&path)?),
                    path,
                }],
                weight_map: None,
            })
        }
    }

    /// A checkpoint held in memory (one safetensors file's bytes); `label`
    /// names it in errors.
    pub fn from_bytes(label: impl Into<PathBuf>, bytes: Vec<u8>) -> Self {
        Self {
            shards: vec![Shard {
                path: label.into(),
                bytes: Backing::Owned(bytes),
            }],
            weight_map: None,
        }
    }

    /// Parse every file's header and index the tensor names.
    ///
    /// # Errors
    /// [`Error::Format`] naming the file for a truncated or corrupt file, a
    /// tensor stored in two files, or an index entry whose file does not hold
    /// that tensor.
    pub fn tensors(&self) -> Result<Tensors<'_>> {
        let mut files = Vec::with_capacity(self.shards.len());
        let mut index = HashMap::new();
        for (i, shard) in self.shards.iter().enumerate() {
            let st = SafeTensors::deserialize(shard.bytes()).map_err(|e| {
                Error::format(
                    &shard.path,
                    format!(
                        "not a valid safetensors file ({} bytes; truncated or corrupt?): {e}",
                        shard.bytes().len()
                    ),
                )
            })?;
            for name in st.names() {
                if let Some(j) = index.insert(name.to_string(), i) {
                    let first: &Path = &self.shards[j].path;
                    return Err(Error::format(
                        &shard.path,
                        format!("tensor `{name}` is also stored in {}", first.display()),
                    ));
                }
            }
            files.push((shard.path.as_path(), st));
        }
        if let Some((index_path, map)) = &self.weight_map {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort();
            for (name, file) in entries {
                let ok = index.get(name).is_some_and(|&i| {
                    files[i].0.file_name().and_then(|f| f.to_str()) == Some(file)
                });
                if !ok {
                    return Err(Error::format(
                        index_path,
                        format!(
                            "weight_map says tensor `{name}` is in {file}, but that file does not hold it"
                        ),
                    ));
                }
            }
        }
        Ok(Tensors { files, index })
    }
}

/// The parsed tensors of a [`Checkpoint`].
pub struct Tensors<'a> {
    files: Vec<(&'a Path, SafeTensors<'a>)>,
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for Tensors<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensors")
            .field(
                "files",
                &self.files.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            )
            .field("tensors", &self.index.len())
            .finish()
    }
}

/// A candle dtype for a safetensors float dtype.
fn candle_dtype(d: Dtype) -> Option<CDType> {
    match d {
        Dtype::F32 => Some(CDType::F32),
        Dtype::BF16 => Some(CDType::BF16),
        Dtype::F16 => Some(CDType::F16),
        _ => None,
    }
}

impl<'a> Tensors<'a> {
    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// The file holding tensors of a checkpoint with one file, or the first
    /// shard: for error messages that concern the checkpoint as a whole.
    pub fn first_path(&self) -> &Path {
        self.files
            .first()
            .map_or(Path::new("<empty checkpoint>"), |f| f.0)
    }

    fn view(&self, name: &str) -> Result<(&'a Path, TensorView<'a>)> {
        let Some(&i) = self.index.get(name) else {
            let files: Vec<String> = self
                .files
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect();
            return Err(Error::format(
                self.first_path(),
                format!("missing tensor `{name}` (looked in {})", files.join(", ")),
            ));
        };
        let (path, st) = &self.files[i];
        let v = st
            .tensor(name)
            .map_err(|e| Error::format(*path, format!("tensor `{name}`: {e}")))?;
        Ok((path, v))
    }

    /// Dtype and shape of tensor `name`.
    ///
    /// # Errors
    /// [`Error::Format`] if it is missing.
    pub fn info(&self, name: &str) -> Result<(Dtype, Vec<usize>)> {
        let (_, v) = self.view(name)?;
        Ok((v.dtype(), v.shape().to_vec()))
    }

    /// Dtype, shape and little-endian bytes of tensor `name`, as stored
    /// (for tensors that are not floats, such as step counters).
    ///
    /// # Errors
    /// [`Error::Format`] if it is missing.
    pub fn raw(&self, name: &str) -> Result<(Dtype, Vec<usize>, &'a [u8])> {
        let (_, v) = self.view(name)?;
        Ok((v.dtype(), v.shape().to_vec(), v.data()))
    }

    fn checked(&self, name: &str, shape: &[usize]) -> Result<(&'a Path, TensorView<'a>)> {
        let (path, v) = self.view(name)?;
        if v.shape() != shape {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    v.shape()
                ),
            ));
        }
        if candle_dtype(v.dtype()).is_none() {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{name}` has dtype {:?}; supported: F32, BF16, F16",
                    v.dtype()
                ),
            ));
        }
        Ok((path, v))
    }

    /// Dense tensor `name`, which must have `shape`, as a candle tensor of
    /// `dtype` on `device`.
    ///
    /// # Errors
    /// [`Error::Format`] naming the file and tensor when it is missing, has
    /// another shape or a dtype other than F32/BF16/F16;
    /// [`Error::Candle`] if the device cannot hold it.
    pub fn dense(
        &self,
        name: &str,
        shape: &[usize],
        dtype: CDType,
        device: &CDevice,
    ) -> Result<Tensor> {
        let (_, v) = self.checked(name, shape)?;
        let stored = candle_dtype(v.dtype()).unwrap_or(CDType::F32);
        Tensor::from_raw_buffer(v.data(), stored, shape, &CDevice::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .and_then(|t| t.to_device(device))
            .map_err(Error::candle("load tensor"))
    }

    /// Dense tensor `name`, which must have `shape`, widened exactly to f32
    /// on the host (for quantizing while loading).
    ///
    /// # Errors
    /// As [`Tensors::dense`].
    pub fn dense_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (_, v) = self.checked(name, shape)?;
        let data = v.data();
        Ok(match v.dtype() {
            Dtype::BF16 => data
                .as_chunks::<2>()
                .0
                .iter()
                .map(|c| bf16::from_le_bytes(*c).to_f32())
                .collect(),
            Dtype::F16 => data
                .as_chunks::<2>()
                .0
                .iter()
                .map(|c| f16::from_le_bytes(*c).to_f32())
                .collect(),
            _ => data
                .as_chunks::<4>()
                .0
                .iter()
                .map(|c| f32::from_le_bytes(*c))
                .collect(),
        })
    }

    /// The stored dtype of dense tensor `name`.
    ///
    /// # Errors
    /// [`Error::Format`] if it is missing or not F32/BF16/F16.
    pub fn dense_dtype(&self, name: &str) -> Result<crate::DType> {
        let (path, v) = self.view(name)?;
        crate::DType::from_safetensors(v.dtype()).ok_or_else(|| {
            Error::format(
                path,
                format!(
                    "tensor `{name}` has dtype {:?}; supported: F32, BF16, F16",
                    v.dtype()
                ),
            )
        })
    }

    /// Whether `base` (e.g. `model.layers.0.mlp.up_proj.weight`) is stored
    /// as a bitsandbytes 4-bit tensor (of any quant type).
    pub fn is_4bit(&self, base: &str) -> bool {
        let prefix = format!("{base}{QUANT_STATE_INFIX}");
        self.contains(&format!("{base}{NF4_QUANT_STATE_SUFFIX}"))
            || self.index.keys().any(|k| k.starts_with(&prefix))
    }

    /// NF4 tensor `base`, whose quant-state shape must be `shape`.
    ///
    /// # Errors
    /// As [`read_nf4`] (FP4 and malformed tensors included), and
    /// [`Error::Format`] when the stored shape is not `shape` or the
    /// companion tensors are not in the same file as the packed weight.
    pub fn nf4(&self, base: &str, shape: &[usize]) -> Result<Nf4Tensor> {
        let (path, _) = self.view(base)?;
        let i = self.index[base];
        let st = &self.files[i].1;
        let t = read_nf4(st, base, path).map_err(|e| match e {
            Error::Format { path, reason }
                if reason.contains("missing key") && self.files.len() > 1 =>
            {
                Error::format(
                    path,
                    format!("{reason} (the keys of one 4-bit tensor must be in one shard)"),
                )
            }
            other => other,
        })?;
        if t.shape != shape {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{base}` (NF4) has shape {:?}, expected {shape:?}",
                    t.shape
                ),
            ));
        }
        Ok(t)
    }
}

/// Serialize named tensors as a safetensors file (with transformers'
/// `{"format": "pt"}` metadata).
///
/// # Errors
/// [`Error::InvalidArgument`] if a tensor's bytes do not match its shape.
pub fn safetensors_bytes(tensors: &[(String, TensorBuf)]) -> Result<Vec<u8>> {
    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), meta)
        .map_err(|e| Error::invalid("safetensors", e.to_string()))
}
