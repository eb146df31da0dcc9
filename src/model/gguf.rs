//! GGUF files (llama.cpp's format): a Llama's weights, architecture and
//! tokenizer in one file, read as transformers' GGUF loader reads them.
//!
//! * **Reader**: candle-core's [`gguf_file`] parses the header; every error
//!   it gives is wrapped with the file name. Before any tensor is read, every
//!   tensor's name, type and byte range are checked (a file shorter than its
//!   header says is refused naming the first tensor that does not fit).
//! * **Weights**: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K,
//!   Q4_K, Q5_K and Q6_K tensors are dequantized (by candle) to f32 and
//!   stored in the compute dtype, or in f32 when the projections are to be
//!   quantized to NF4 while loading. Other types (the `IQ*` family, `Q8_1`,
//!   `Q8_K`, ...) are refused naming the tensor and the type.
//! * **Rotary layout**: llama.cpp's converter permutes the rows of `q_proj`
//!   and `k_proj` (`LlamaModel.permute` in `convert_hf_to_gguf.py`: per
//!   head, the two rotary halves are interleaved). [`unpermute_rows`]
//!   undoes it, as transformers does when it loads a GGUF; [`permute_rows`]
//!   is llama.cpp's direction.
//! * **Names and shapes**: GGUF lists dimensions innermost first; candle's
//!   reader reverses them, so shapes here are PyTorch's (`[out, in]`).
//!   `token_embd`, `blk.N.{attn_q, attn_k, attn_v, attn_output, ffn_gate,
//!   ffn_up, ffn_down, attn_norm, ffn_norm}`, `output_norm` map to
//!   transformers' names; `output` (the LM head) is not loaded, and its
//!   absence means tied embeddings. Any other tensor (biases, experts,
//!   `rope_freqs`) is refused: it would change the computation.
//! * **Config** from `llama.*` metadata ([`GgufFile::config`]); only
//!   `general.architecture = "llama"` is accepted.
//! * **Tokenizer** from `tokenizer.ggml.*` ([`GgufFile::tokenizer`]), built
//!   as transformers' `GGUFLlamaConverter` builds it (see there).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{DType as CDType, Device as CDevice};
use half::{bf16, f16};
use safetensors::Dtype;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence as NormSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use super::config::LlamaConfig;
use super::llama::{Llama, LoadOptions};
use super::tokenizer::{LlamaTokenizer, SpecialTokens};
use super::weights::{Checkpoint, safetensors_bytes};
use crate::nf4::checkpoint::TensorBuf;
use crate::{Error, Result};

/// The tensor types this crate dequantizes, as llama.cpp names them.
pub const SUPPORTED_TYPES: &str =
    "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

/// llama.cpp's name of ggml type id `id` (`ggml.h`, `enum ggml_type`).
pub fn ggml_type_name(id: u32) -> String {
    let name = match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        4 => "Q4_2 (removed from ggml)",
        5 => "Q4_3 (removed from ggml)",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return format!("unknown ggml type {id}"),
    };
    name.to_string()
}

/// llama.cpp's name of a candle ggml dtype.
fn dtype_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// Whether tensors of type `t` are loaded (the intermediate types `Q8_1`
/// and `Q8_K`, which llama.cpp never writes as weights, are not).
fn is_supported(t: GgmlDType) -> bool {
    !matches!(t, GgmlDType::Q8_1 | GgmlDType::Q8K)
}

/// Whether `path` is a GGUF file: a regular file named `*.gguf` or starting
/// with the magic `GGUF`.
pub fn is_gguf(path: &Path) -> bool {
    if !path.is_file() {
        return false;
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// Undo llama.cpp's rotary row permutation of a `[rows, cols]` row-major
/// `q_proj` (`n_head` = query heads) or `k_proj` (`n_head` = key/value
/// heads) weight: row `h·d + 2i + j` of the GGUF tensor is row
/// `h·d + j·d/2 + i` of transformers' (`d` = `rows / n_head`, `j` ∈ {0, 1}).
///
/// # Errors
/// [`Error::InvalidArgument`] when `rows` is not a multiple of `2·n_head` or
/// `data` is not `rows · cols` long.
pub fn unpermute_rows<T: Copy>(
    data: &[T],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> Result<Vec<T>> {
    rotary_rows(data, rows, cols, n_head, false)
}

/// llama.cpp's rotary row permutation (`LlamaModel.permute`: reshape to
/// `[n_head, 2, rows/n_head/2, cols]`, swap axes 1 and 2), the inverse of
/// [`unpermute_rows`]: for writing GGUF files as llama.cpp does.
///
/// # Errors
/// As [`unpermute_rows`].
pub fn permute_rows<T: Copy>(
    data: &[T],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> Result<Vec<T>> {
    rotary_rows(data, rows, cols, n_head, true)
}

fn rotary_rows<T: Copy>(
    data: &[T],
    rows: usize,
    cols: usize,
    n_head: usize,
    forward: bool,
) -> Result<Vec<T>> {
    const OP: &str = "gguf rotary permutation";
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        return Err(Error::invalid(
            OP,
            format!("{rows} rows do not split into {n_head} heads of two rotary halves"),
        ));
    }
    if data.len() != rows * cols {
        return Err(Error::shape(
            OP,
            "data",
            format!("{rows}·{cols} = {}", rows * cols),
            data.len(),
        ));
    }
    let d = rows / n_head;
    let half = d / 2;
    let mut out = Vec::with_capacity(data.len());
    for r in 0..rows {
        let (h, k) = (r / d, r % d);
        // Row r of the output comes from row `src` of the input.
        let src = if forward {
            // llama.cpp: output (h, i, j) ← input (h, j, i), k = 2i + j.
            h * d + (k % 2) * half + k / 2
        } else {
            // Inverse: output (h, j, i) ← input (h, i, j), k = j·half + i.
            h * d + (k % half) * 2 + k / half
        };
        out.extend_from_slice(&data[src * cols..(src + 1) * cols]);
    }
    Ok(out)
}

/// What a metadata value is, for error messages.
fn kind(v: &Value) -> String {
    match v {
        Value::U8(x) => format!("u8 {x}"),
        Value::I8(x) => format!("i8 {x}"),
        Value::U16(x) => format!("u16 {x}"),
        Value::I16(x) => format!("i16 {x}"),
        Value::U32(x) => format!("u32 {x}"),
        Value::I32(x) => format!("i32 {x}"),
        Value::U64(x) => format!("u64 {x}"),
        Value::I64(x) => format!("i64 {x}"),
        Value::F32(x) => format!("f32 {x}"),
        Value::F64(x) => format!("f64 {x}"),
        Value::Bool(x) => format!("bool {x}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(a) => format!("an array of {} values", a.len()),
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    match *v {
        Value::F32(x) => Some(x.into()),
        Value::F64(x) => Some(x),
        _ => as_u64(v).map(|u| u as f64),
    }
}

/// The tensors a Llama block has in GGUF, with transformers' names.
const BLOCK_TENSORS: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// An open GGUF file: its parsed header, tensors not yet read.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    file: File,
    file_size: u64,
    content: gguf_file::Content,
}

impl GgufFile {
    /// Open and parse `path`, then check every tensor: a name of the Llama
    /// architecture, a supported type, and bytes inside the file.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be opened; [`Error::Format`]
    /// naming the file for a header candle cannot parse (not GGUF, truncated
    /// header), and naming the tensor and its type for an unsupported type,
    /// an unknown tensor, or a tensor whose bytes lie beyond the end of the
    /// file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let file_size = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        let content = {
            let mut r = BufReader::new(&file);
            gguf_file::Content::read(&mut r).map_err(|e| {
                // candle's reader stops at a type id it does not know
                // without naming the tensor; find it.
                let msg = e.to_string();
                let named = if msg.contains("unknown dtype") {
                    unsupported_type_tensor(&path)
                } else {
                    None
                };
                match named {
                    Some((name, id)) => Error::format(
                        &path,
                        format!(
                            "tensor `{name}` has type {} (ggml type {id}), which this crate \
                             does not dequantize; supported: {SUPPORTED_TYPES}",
                            ggml_type_name(id)
                        ),
                    ),
                    None => Error::format(
                        &path,
                        format!("not a readable GGUF file ({file_size} bytes): {msg}"),
                    ),
                }
            })?
        };
        let out = Self {
            path,
            file,
            file_size,
            content,
        };
        out.check_tensors()?;
        Ok(out)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The metadata value of `key`, if present.
    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// Every tensor name, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .content
            .tensor_infos
            .keys()
            .map(String::as_str)
            .collect();
        v.sort_unstable();
        v
    }

    /// Type (llama.cpp's name) and shape (PyTorch order, `[out, in]`) of
    /// tensor `name`.
    ///
    /// # Errors
    /// [`Error::Format`] if there is no such tensor.
    pub fn tensor_info(&self, name: &str) -> Result<(&'static str, Vec<usize>)> {
        let info = self.info(name)?;
        Ok((dtype_name(info.ggml_dtype), info.shape.dims().to_vec()))
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::format(&self.path, reason)
    }

    fn info(&self, name: &str) -> Result<&gguf_file::TensorInfo> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.err(format!("missing tensor `{name}`")))
    }

    /// Byte size of a tensor, or an error naming it.
    fn byte_size(&self, name: &str, info: &gguf_file::TensorInfo) -> Result<u64> {
        let elems = info.shape.elem_count();
        let block = info.ggml_dtype.block_size();
        if !elems.is_multiple_of(block) {
            return Err(self.err(format!(
                "tensor `{name}` ({}, shape {:?}) has {elems} elements, not a multiple of the \
                 type's block of {block}",
                dtype_name(info.ggml_dtype),
                info.shape.dims()
            )));
        }
        Ok((elems / block * info.ggml_dtype.type_size()) as u64)
    }

    fn check_tensors(&self) -> Result<()> {
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort_by_key(|n| (self.content.tensor_infos[*n].offset, n.as_str()));
        for name in names {
            let info = &self.content.tensor_infos[name];
            if !is_supported(info.ggml_dtype) {
                return Err(self.err(format!(
                    "tensor `{name}` has type {}, which this crate does not dequantize; \
                     supported: {SUPPORTED_TYPES}",
                    dtype_name(info.ggml_dtype)
                )));
            }
            let size = self.byte_size(name, info)?;
            let start = self.content.tensor_data_offset.saturating_add(info.offset);
            let end = start.saturating_add(size);
            if end > self.file_size {
                return Err(self.err(format!(
                    "tensor `{name}` ({}, shape {:?}) needs bytes {start}..{end}, but the file \
                     has only {} bytes (truncated?)",
                    dtype_name(info.ggml_dtype),
                    info.shape.dims(),
                    self.file_size
                )));
            }
        }
        Ok(())
    }

    /// Tensor `name` (GGUF's name) dequantized to f32 on the host, as
    /// stored (no permutation undone), with its PyTorch-order shape.
    ///
    /// # Errors
    /// [`Error::Format`] naming the file and tensor if it is missing or
    /// candle cannot read it.
    pub fn dequantized(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.info(name)?;
        let mut r = &self.file;
        let q = info
            .read(&mut r, self.content.tensor_data_offset, &CDevice::Cpu)
            .map_err(|e| {
                self.err(format!(
                    "tensor `{name}` ({}): {e}",
                    dtype_name(info.ggml_dtype)
                ))
            })?;
        let t = q
            .dequantize(&CDevice::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_dtype(CDType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| self.err(format!("tensor `{name}`: dequantizing: {e}")))?;
        Ok((info.shape.dims().to_vec(), t))
    }

    fn str_meta(&self, key: &str) -> Result<Option<&str>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(format!("{key} is {}, expected a string", kind(v)))),
        }
    }

    fn u64_meta(&self, key: &str) -> Result<Option<u64>> {
        self.metadata(key)
            .map(|v| {
                as_u64(v).ok_or_else(|| {
                    self.err(format!(
                        "{key} is {}, expected a non-negative integer",
                        kind(v)
                    ))
                })
            })
            .transpose()
    }

    fn req_u64(&self, key: &str) -> Result<u64> {
        self.u64_meta(key)?
            .ok_or_else(|| self.err(format!("metadata {key} is missing")))
    }

    fn f64_meta(&self, key: &str) -> Result<Option<f64>> {
        self.metadata(key)
            .map(|v| {
                as_f64(v)
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| self.err(format!("{key} is {}, expected a number", kind(v))))
            })
            .transpose()
    }

    fn bool_meta(&self, key: &str) -> Result<Option<bool>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(format!("{key} is {}, expected true or false", kind(v)))),
        }
    }

    fn array_meta(&self, key: &str) -> Result<Option<&[Value]>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.err(format!("{key} is {}, expected an array", kind(v)))),
        }
    }

    fn token_id_meta(&self, key: &str, n_tokens: usize) -> Result<Option<u32>> {
        self.u64_meta(key)?
            .map(|id| {
                u32::try_from(id)
                    .ok()
                    .filter(|&i| (i as usize) < n_tokens)
                    .ok_or_else(|| {
                        self.err(format!(
                            "{key} is {id}, outside the vocabulary of {n_tokens} tokens"
                        ))
                    })
            })
            .transpose()
    }

    /// `tokenizer.ggml.tokens`.
    fn tokens(&self) -> Result<Vec<&str>> {
        const KEY: &str = "tokenizer.ggml.tokens";
        let arr = self
            .array_meta(KEY)?
            .ok_or_else(|| self.err(format!("metadata {KEY} is missing")))?;
        arr.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                other => Err(self.err(format!("{KEY}[{i}] is {}, expected a string", kind(other)))),
            })
            .collect()
    }

    /// The architecture from the `llama.*` metadata, as the crate's
    /// [`LlamaConfig`] (built as the `config.json` transformers derives from
    /// the same keys, and checked by [`LlamaConfig::from_json_str`]).
    ///
    /// `block_count`, `embedding_length`, `feed_forward_length`,
    /// `attention.head_count` are required; `attention.head_count_kv`
    /// defaults to the head count, `attention.layer_norm_rms_epsilon` to
    /// 1e-5 and `rope.freq_base` to 10000 (llama.cpp's defaults). The
    /// vocabulary size is the length of `tokenizer.ggml.tokens`; embeddings
    /// are tied when there is no `output.weight`.
    ///
    /// # Errors
    /// [`Error::Format`] naming the file and key when
    /// `general.architecture` is not `llama`, a required key is missing or
    /// mistyped, or the file asks for something this crate does not
    /// implement: mixture of experts (`llama.expert_count` > 0), rope scaling
    /// other than none (`llama.rope.scaling.type`), a rotary width other than
    /// the head width (`llama.rope.dimension_count`), value heads of another
    /// width than key heads, or per-frequency rope factors
    /// (`rope_freqs.weight`).
    pub fn config(&self) -> Result<LlamaConfig> {
        let label = PathBuf::from(format!("{} (llama.* metadata)", self.path.display()));
        LlamaConfig::from_json_str(&self.config_json()?.to_string(), &label)
    }

    /// The `config.json` transformers derives from the `llama.*` metadata,
    /// which [`Self::config`] parses.
    ///
    /// # Errors
    /// As [`Self::config`].
    pub fn config_json(&self) -> Result<serde_json::Value> {
        let arch = self
            .str_meta("general.architecture")?
            .ok_or_else(|| self.err("metadata general.architecture is missing"))?;
        if arch != "llama" {
            return Err(self.err(format!(
                "general.architecture is {arch:?}; only \"llama\" is supported"
            )));
        }
        let k = |s: &str| format!("llama.{s}");
        let hidden = self.req_u64(&k("embedding_length"))?;
        let heads = self.req_u64(&k("attention.head_count"))?;
        let kv_heads = self
            .u64_meta(&k("attention.head_count_kv"))?
            .unwrap_or(heads);
        if let Some(n) = self.u64_meta(&k("expert_count"))?
            && n > 0
        {
            return Err(self.err(format!(
                "llama.expert_count is {n}: mixture-of-experts models are not supported"
            )));
        }
        let key_len = self.u64_meta(&k("attention.key_length"))?;
        let value_len = self.u64_meta(&k("attention.value_length"))?;
        if let (Some(a), Some(b)) = (key_len, value_len)
            && a != b
        {
            return Err(self.err(format!(
                "llama.attention.key_length is {a} but llama.attention.value_length is {b}; \
                 only equal widths are supported"
            )));
        }
        let head_dim = key_len
            .or(value_len)
            .or((heads > 0).then(|| hidden / heads));
        if let (Some(rot), Some(hd)) = (self.u64_meta(&k("rope.dimension_count"))?, head_dim)
            && rot != hd
        {
            return Err(self.err(format!(
                "llama.rope.dimension_count is {rot} but the head width is {hd}; only rotary \
                 embeddings over the whole head are supported"
            )));
        }
        match self.str_meta(&k("rope.scaling.type"))? {
            None | Some("none") => {}
            Some(t) => {
                return Err(self.err(format!(
                    "llama.rope.scaling.type is {t:?}; only \"none\" is supported (llama3 \
                     scaling comes as a rope_freqs tensor, which is not supported either)"
                )));
            }
        }
        if let Some(f) = self.f64_meta(&k("rope.scale_linear"))?
            && f != 1.0
        {
            return Err(self.err(format!(
                "llama.rope.scale_linear is {f}; linear rope scaling is not supported"
            )));
        }
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(self.err(
                "tensor `rope_freqs.weight` (per-frequency rope factors, llama.cpp's form of \
                 llama3 rope scaling) is not supported",
            ));
        }
        let tokens = self.tokens()?;
        let vocab = tokens.len();
        if let Some(v) = self.u64_meta(&k("vocab_size"))?
            && v as usize != vocab
        {
            return Err(self.err(format!(
                "llama.vocab_size is {v} but tokenizer.ggml.tokens has {vocab} tokens"
            )));
        }
        let mut cfg = serde_json::json!({
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": hidden,
            "intermediate_size": self.req_u64(&k("feed_forward_length"))?,
            "num_hidden_layers": self.req_u64(&k("block_count"))?,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "vocab_size": vocab,
            "rms_norm_eps": self.f64_meta(&k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            "rope_theta": self.f64_meta(&k("rope.freq_base"))?.unwrap_or(10_000.0),
            "tie_word_embeddings": !self.content.tensor_infos.contains_key("output.weight"),
        });
        let obj = cfg
            .as_object_mut()
            .ok_or_else(|| self.err("internal: config is not an object"))?;
        if let Some(d) = key_len.or(value_len) {
            obj.insert("head_dim".into(), d.into());
        }
        // `llama.context_length` (transformers' `max_position_embeddings`)
        // does not change hidden states and is not carried over.
        self.u64_meta(&k("context_length"))?;
        for (key, json) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
            ("tokenizer.ggml.padding_token_id", "pad_token_id"),
        ] {
            if let Some(id) = self.token_id_meta(key, vocab)? {
                obj.insert(json.into(), id.into());
            }
        }
        // Checked here too, so that a config.json written from it loads.
        let label = PathBuf::from(format!("{} (llama.* metadata)", self.path.display()));
        LlamaConfig::from_json_str(&cfg.to_string(), &label)?;
        Ok(cfg)
    }

    /// Write the model as a transformers-style checkpoint directory:
    /// `config.json` ([`Self::config_json`]), `model.safetensors` (every
    /// tensor dequantized to f32 under transformers' names, the rotary
    /// permutation undone; see [`Self::checkpoint`]) and `tokenizer.json`
    /// ([`Self::tokenizer`]). Each file is written atomically.
    ///
    /// # Errors
    /// As [`Self::config_json`], [`Self::checkpoint`] and
    /// [`Self::tokenizer`]; [`Error::Io`] naming the file that could not be
    /// written.
    pub fn write_checkpoint_dir(&self, dir: &Path) -> Result<()> {
        let cfg = self.config_json()?;
        let config = self.config()?;
        let ckpt = self.checkpoint(&config, None, Dtype::F32)?;
        let t = ckpt.tensors()?;
        let mut tensors = Vec::new();
        for name in t.names() {
            let (dtype, shape, bytes) = t.raw(name)?;
            tensors.push((
                name.to_string(),
                TensorBuf {
                    dtype,
                    shape,
                    data: bytes.to_vec(),
                },
            ));
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let weights = safetensors_bytes(&tensors)?;
        let tokenizer = self
            .tokenizer()?
            .inner()
            .to_string(true)
            .map_err(|e| self.err(format!("serialising the tokenizer: {e}")))?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let config_text = serde_json::to_string_pretty(&cfg)
            .map_err(|e| self.err(format!("serialising the config: {e}")))?;
        for (name, bytes) in [
            ("config.json", config_text.as_bytes()),
            ("model.safetensors", &weights[..]),
            ("tokenizer.json", tokenizer.as_bytes()),
        ] {
            let path = dir.join(name);
            crate::io::write_atomic(&path, |w| {
                w.write_all(bytes).map_err(|e| Error::io(&path, e))
            })?;
        }
        Ok(())
    }

    /// The tokenizer from `tokenizer.ggml.*`, built as transformers'
    /// `GGUFLlamaConverter` builds it for `general.architecture = "llama"`:
    ///
    /// * a BPE model over `tokens` (id = position) with `merges`
    ///   (`"a b"` strings), `unknown_token_id` as the unknown token, byte
    ///   fallback on;
    /// * `model = "gpt2"` (byte-level BPE): no normalizer and the GPT-2
    ///   byte-level pre-tokenizer (its regex), whatever `tokenizer.ggml.pre`
    ///   names: transformers ignores `pre`. (For SmolLM2's `"smollm"`,
    ///   llama.cpp and the original `tokenizer.json` also split digits one by
    ///   one; transformers' GGUF loader, the reference here, does not.)
    /// * `model = "llama"` (SentencePiece-style): merges, when the file has
    ///   none, derived from `scores` as transformers derives them; normalizer
    ///   `▁`-prefix (unless `add_space_prefix` is false) and spaces to `▁`;
    /// * tokens of `token_type` 3 (control) are special tokens;
    /// * BOS is prepended when `add_bos_token` says so (absent: `llama`
    ///   vocabularies yes, `gpt2` no, as llama.cpp defaults), EOS appended
    ///   when `add_eos_token` is true;
    /// * BOS, EOS and padding ids from `bos_token_id`, `eos_token_id`,
    ///   `padding_token_id` (padding defaults to EOS).
    ///
    /// # Errors
    /// [`Error::Format`] naming the file and key when a key is missing or
    /// mistyped, the model is neither `gpt2` nor `llama`, a merge is not two
    /// tokens of the vocabulary, or an id is outside the vocabulary.
    pub fn tokenizer(&self) -> Result<LlamaTokenizer> {
        let model = self
            .str_meta("tokenizer.ggml.model")?
            .ok_or_else(|| self.err("metadata tokenizer.ggml.model is missing"))?;
        let spm = match model {
            "gpt2" => false,
            "llama" => true,
            other => {
                return Err(self.err(format!(
                    "tokenizer.ggml.model is {other:?}; supported: \"gpt2\" (byte-level BPE) and \
                     \"llama\" (SentencePiece BPE)"
                )));
            }
        };
        let tokens = self.tokens()?;
        let n = tokens.len();
        let token_types = self
            .array_meta("tokenizer.ggml.token_type")?
            .map(|a| {
                if a.len() != n {
                    return Err(self.err(format!(
                        "tokenizer.ggml.token_type has {} entries for {n} tokens",
                        a.len()
                    )));
                }
                a.iter()
                    .enumerate()
                    .map(|(i, v)| {
                        as_u64(v).ok_or_else(|| {
                            self.err(format!(
                                "tokenizer.ggml.token_type[{i}] is {}, expected an integer",
                                kind(v)
                            ))
                        })
                    })
                    .collect::<Result<Vec<u64>>>()
            })
            .transpose()?;
        let merges = match self.array_meta("tokenizer.ggml.merges")? {
            Some(a) => self.parse_merges(a, &tokens)?,
            None if spm => self.merges_from_scores(&tokens)?,
            None => return Err(self.err("metadata tokenizer.ggml.merges is missing")),
        };
        let unk = self.token_id_meta("tokenizer.ggml.unknown_token_id", n)?;
        let bos = self.token_id_meta("tokenizer.ggml.bos_token_id", n)?;
        let eos = self.token_id_meta("tokenizer.ggml.eos_token_id", n)?;
        let pad = self.token_id_meta("tokenizer.ggml.padding_token_id", n)?;
        let add_bos = self
            .bool_meta("tokenizer.ggml.add_bos_token")?
            .unwrap_or(spm);
        let add_eos = self
            .bool_meta("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false);
        let add_space_prefix = self
            .bool_meta("tokenizer.ggml.add_space_prefix")?
            .unwrap_or(true);

        let fail = |what: &str, e: &dyn std::fmt::Display| {
            self.err(format!("building the tokenizer ({what}): {e}"))
        };
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let mut bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .fuse_unk(true)
            .byte_fallback(true);
        if let Some(u) = unk {
            bpe = bpe.unk_token(tokens[u as usize].to_string());
        }
        let bpe = bpe.build().map_err(|e| fail("BPE model", &e))?;
        let mut tok = Tokenizer::new(bpe);
        if spm {
            let mut seq: Vec<NormalizerWrapper> = Vec::new();
            if add_space_prefix {
                seq.push(Prepend::new("▁".into()).into());
            }
            seq.push(
                Replace::new(" ", "▁")
                    .map_err(|e| fail("normalizer", &e))?
                    .into(),
            );
            tok.with_normalizer(Some(NormSequence::new(seq)))
                .map_err(|e| fail("normalizer", &e))?;
            let mut dec: Vec<DecoderWrapper> = vec![
                ByteFallback::new().into(),
                Fuse::new().into(),
                Replace::new("▁", " ")
                    .map_err(|e| fail("decoder", &e))?
                    .into(),
            ];
            if add_space_prefix {
                dec.push(Strip::new(' ', 1, 0).into());
            }
            tok.with_decoder(Some(DecoderSequence::new(dec)));
        } else {
            tok.with_pre_tokenizer(Some(ByteLevel::new(false, false, true)));
            tok.with_decoder(Some(ByteLevel::new(false, false, true)));
        }
        if let Some(types) = &token_types {
            let special: Vec<AddedToken> = types
                .iter()
                .zip(&tokens)
                .filter(|(t, _)| **t == 3)
                .map(|(_, s)| AddedToken::from(s.to_string(), true).normalized(false))
                .collect();
            tok.add_special_tokens(special)
                .map_err(|e| fail("special tokens", &e))?;
        } else {
            let special: Vec<AddedToken> = [unk, bos, eos]
                .into_iter()
                .flatten()
                .map(|id| AddedToken::from(tokens[id as usize].to_string(), true).normalized(false))
                .collect();
            tok.add_special_tokens(special)
                .map_err(|e| fail("special tokens", &e))?;
        }
        let mut affixes: Vec<(String, u32)> = Vec::new();
        let (mut single, mut pair) = (Vec::new(), Vec::new());
        for (add, id, piece) in [(add_bos, bos, "bos"), (add_eos, eos, "eos")] {
            if !add {
                continue;
            }
            let Some(id) = id else {
                return Err(self.err(format!(
                    "tokenizer.ggml.add_{piece}_token is true but tokenizer.ggml.{piece}_token_id \
                     is missing"
                )));
            };
            affixes.push((tokens[id as usize].to_string(), id));
        }
        if !affixes.is_empty() {
            let bos_t = add_bos.then(|| affixes[0].0.clone());
            let eos_t = add_eos.then(|| affixes[affixes.len() - 1].0.clone());
            for (seq, out) in [("A", &mut single), ("B", &mut pair)] {
                let type_id = if seq == "A" { 0 } else { 1 };
                out.extend(bos_t.iter().map(|b| format!("{b}:{type_id}")));
                out.push(format!("${seq}:{type_id}"));
                out.extend(eos_t.iter().map(|e| format!("{e}:{type_id}")));
            }
            let pair: Vec<String> = single.iter().cloned().chain(pair).collect();
            let post = TemplateProcessing::builder()
                .try_single(single)
                .and_then(|b| b.try_pair(pair))
                .map_err(|e| fail("post-processor", &e))?
                .special_tokens(affixes)
                .build()
                .map_err(|e| fail("post-processor", &e))?;
            tok.with_post_processor(Some(post));
        }
        LlamaTokenizer::new(
            tok,
            &SpecialTokens::default(),
            (bos, eos, pad),
            self.path.clone(),
        )
    }

    fn parse_merges(&self, arr: &[Value], tokens: &[&str]) -> Result<Vec<(String, String)>> {
        let known: HashSet<&str> = tokens.iter().copied().collect();
        arr.iter()
            .enumerate()
            .map(|(i, v)| {
                let Value::String(s) = v else {
                    return Err(self.err(format!(
                        "tokenizer.ggml.merges[{i}] is {}, expected a string",
                        kind(v)
                    )));
                };
                match s.split_once(' ') {
                    Some((a, b)) if known.contains(a) && known.contains(b) => {
                        Ok((a.to_string(), b.to_string()))
                    }
                    _ => Err(self.err(format!(
                        "tokenizer.ggml.merges[{i}] is {s:?}, expected two tokens of the \
                         vocabulary separated by a space"
                    ))),
                }
            })
            .collect()
    }

    /// Merges of a SentencePiece vocabulary without a merge list, derived
    /// from the scores as transformers' `GGUFTokenizerSkeleton` does: every
    /// split of a token into two tokens is a merge ranked by the whole
    /// token's score (higher first; ties keep vocabulary order, and splits of
    /// one token are ordered by their halves' scores, higher first).
    fn merges_from_scores(&self, tokens: &[&str]) -> Result<Vec<(String, String)>> {
        const KEY: &str = "tokenizer.ggml.scores";
        let arr = self
            .array_meta(KEY)?
            .ok_or_else(|| self.err(format!("{KEY} is missing (and there are no merges)")))?;
        if arr.len() != tokens.len() {
            return Err(self.err(format!(
                "{KEY} has {} entries for {} tokens",
                arr.len(),
                tokens.len()
            )));
        }
        // transformers' `{token: score}`: a repeated token keeps its first
        // position and its last score.
        let mut score: HashMap<&str, f64> = HashMap::new();
        let mut order: Vec<&str> = Vec::new();
        for (i, (t, v)) in tokens.iter().zip(arr).enumerate() {
            let s = as_f64(v)
                .ok_or_else(|| self.err(format!("{KEY}[{i}] is {}, expected a number", kind(v))))?;
            if score.insert(t, s).is_none() {
                order.push(t);
            }
        }
        let cmp = |a: f64, b: f64| b.partial_cmp(&a).unwrap_or(std::cmp::Ordering::Equal);
        let mut merges: Vec<(&str, &str, f64)> = Vec::new();
        for t in order {
            let piece_score = score[t];
            let mut local: Vec<(&str, &str, f64)> = t
                .char_indices()
                .skip(1)
                .map(|(i, _)| t.split_at(i))
                .filter(|(l, r)| score.contains_key(l) && score.contains_key(r))
                .map(|(l, r)| (l, r, piece_score))
                .collect();
            local.sort_by(|a, b| cmp(score[a.0], score[b.0]).then(cmp(score[a.1], score[b.1])));
            merges.extend(local);
        }
        merges.sort_by(|a, b| cmp(a.2, b.2));
        Ok(merges
            .into_iter()
            .map(|(l, r, _)| (l.to_string(), r.to_string()))
            .collect())
    }

    /// The model's tensors under transformers' names, dequantized and with
    /// the rotary permutation of `q_proj`/`k_proj` undone, as an in-memory
    /// safetensors checkpoint of dtype `store` (F32, BF16 or F16). Only the
    /// first `num_layers` blocks when given; `output.weight` is left out
    /// (hidden states do not use the LM head).
    ///
    /// # Errors
    /// [`Error::Format`] naming the file and GGUF tensor when one is missing,
    /// has another shape than `config` implies, or cannot be read;
    /// [`Error::InvalidArgument`] for another `store` dtype.
    pub fn checkpoint(
        &self,
        config: &LlamaConfig,
        num_layers: Option<usize>,
        store: Dtype,
    ) -> Result<Checkpoint> {
        if !matches!(store, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            return Err(Error::invalid(
                "gguf checkpoint",
                format!("store dtype {store:?} is not F32, BF16 or F16"),
            ));
        }
        self.check_names(config)?;
        let h = config.hidden_size;
        let layers = num_layers.map_or(config.num_hidden_layers, |n| {
            n.min(config.num_hidden_layers)
        });
        let mut out: Vec<(String, TensorBuf)> = Vec::new();
        let mut put = |hf: String, gguf: &str, shape: Vec<usize>, heads: Option<usize>| {
            let (got, mut data) = self.dequantized(gguf)?;
            if got != shape {
                return Err(self.err(format!(
                    "tensor `{gguf}` has shape {got:?} (PyTorch order), expected {shape:?}"
                )));
            }
            if let Some(n_head) = heads {
                data = unpermute_rows(&data, shape[0], shape[1], n_head)
                    .map_err(|e| self.err(format!("tensor `{gguf}`: {e}")))?;
            }
            let bytes: Vec<u8> = match store {
                Dtype::BF16 => data
                    .iter()
                    .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                    .collect(),
                Dtype::F16 => data
                    .iter()
                    .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                    .collect(),
                _ => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            };
            out.push((
                hf,
                TensorBuf {
                    dtype: store,
                    shape,
                    data: bytes,
                },
            ));
            Ok(())
        };
        put(
            "model.embed_tokens.weight".into(),
            "token_embd.weight",
            vec![config.vocab_size, h],
            None,
        )?;
        put(
            "model.norm.weight".into(),
            "output_norm.weight",
            vec![h],
            None,
        )?;
        for i in 0..layers {
            for (g, hf) in BLOCK_TENSORS {
                let (shape, heads) = match g {
                    "attn_norm" | "ffn_norm" => (vec![h], None),
                    "attn_q" => (vec![config.q_dim(), h], Some(config.num_attention_heads)),
                    "attn_k" => (vec![config.kv_dim(), h], Some(config.num_key_value_heads)),
                    "attn_v" => (vec![config.kv_dim(), h], None),
                    "attn_output" => (vec![h, config.q_dim()], None),
                    "ffn_gate" | "ffn_up" => (vec![config.intermediate_size, h], None),
                    _ => (vec![h, config.intermediate_size], None),
                };
                put(
                    format!("model.layers.{i}.{hf}.weight"),
                    &format!("blk.{i}.{g}.weight"),
                    shape,
                    heads,
                )?;
            }
        }
        let bytes = safetensors_bytes(&out)?;
        drop(out);
        Ok(Checkpoint::from_bytes(
            format!("{} (dequantized)", self.path.display()),
            bytes,
        ))
    }

    /// Refuse tensors outside the Llama architecture (they would change the
    /// computation if ignored) and blocks beyond `block_count`.
    fn check_names(&self, config: &LlamaConfig) -> Result<()> {
        for name in self.tensor_names() {
            let ok = match name {
                "token_embd.weight" | "output_norm.weight" | "output.weight" => true,
                _ => name
                    .strip_prefix("blk.")
                    .and_then(|rest| rest.split_once('.'))
                    .is_some_and(|(i, t)| {
                        i.parse::<usize>()
                            .is_ok_and(|i| i < config.num_hidden_layers)
                            && t.strip_suffix(".weight")
                                .is_some_and(|t| BLOCK_TENSORS.iter().any(|(g, _)| *g == t))
                    }),
            };
            if !ok {
                let (ty, shape) = self.tensor_info(name)?;
                return Err(self.err(format!(
                    "tensor `{name}` ({ty}, shape {shape:?}) is not part of the Llama \
                     architecture this crate implements ({} blocks of attn_q/k/v/output, \
                     ffn_gate/up/down, attn_norm, ffn_norm weights)",
                    config.num_hidden_layers
                )));
            }
        }
        Ok(())
    }
}

/// Find the first tensor whose ggml type id candle does not know, reading
/// the header with a minimal walker of the GGUF layout (v2/v3: u64 lengths;
/// v1: u32). `None` when the header cannot be walked or every type is known.
fn unsupported_type_tensor(path: &Path) -> Option<(String, u32)> {
    let mut r = BufReader::new(File::open(path).ok()?);
    let mut b4 = [0u8; 4];
    let mut b8 = [0u8; 8];
    let mut u32_ = |r: &mut BufReader<File>| -> Option<u32> {
        r.read_exact(&mut b4).ok()?;
        Some(u32::from_le_bytes(b4))
    };
    if u32_(&mut r)? != u32::from_le_bytes(*b"GGUF") {
        return None;
    }
    let version = u32_(&mut r)?;
    let len = |r: &mut BufReader<File>| -> Option<u64> {
        if version == 1 {
            let mut b = [0u8; 4];
            r.read_exact(&mut b).ok()?;
            Some(u32::from_le_bytes(b).into())
        } else {
            r.read_exact(&mut b8).ok()?;
            Some(u64::from_le_bytes(b8))
        }
    };
    let mut len = len;
    let n_tensors = len(&mut r)?;
    let n_kv = len(&mut r)?;
    fn skip(r: &mut BufReader<File>, n: u64) -> Option<()> {
        r.seek_relative(i64::try_from(n).ok()?).ok()
    }
    fn read_u32(r: &mut BufReader<File>) -> Option<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }
    fn skip_value(
        r: &mut BufReader<File>,
        ty: u32,
        len: &mut dyn FnMut(&mut BufReader<File>) -> Option<u64>,
        depth: usize,
    ) -> Option<()> {
        match ty {
            0 | 1 | 7 => skip(r, 1),
            2 | 3 => skip(r, 2),
            4..=6 => skip(r, 4),
            10..=12 => skip(r, 8),
            8 => {
                let n = len(r)?;
                skip(r, n)
            }
            9 if depth < 64 => {
                let et = read_u32(r)?;
                let n = len(r)?;
                for _ in 0..n {
                    skip_value(r, et, len, depth + 1)?;
                }
                Some(())
            }
            _ => None,
        }
    }
    for _ in 0..n_kv {
        let n = len(&mut r)?;
        skip(&mut r, n)?;
        let ty = read_u32(&mut r)?;
        skip_value(&mut r, ty, &mut len, 0)?;
    }
    for _ in 0..n_tensors {
        let n = usize::try_from(len(&mut r)?)
            .ok()
            .filter(|&n| n < 1 << 20)?;
        let mut name = vec![0u8; n];
        r.read_exact(&mut name).ok()?;
        let dims = read_u32(&mut r)?;
        let dim_bytes = if version == 1 { 4 } else { 8 };
        skip(&mut r, u64::from(dims).checked_mul(dim_bytes)?)?;
        let ty = read_u32(&mut r)?;
        skip(&mut r, 8)?;
        let known = matches!(ty, 0..=3 | 6..=15 | 30);
        if !known {
            return Some((String::from_utf8_lossy(&name).into_owned(), ty));
        }
    }
    None
}

/// Load a GGUF Llama: config, tokenizer, and the model built from the
/// dequantized weights with [`Llama::from_tensors`] (so
/// [`LoadOptions::quantize`] quantizes the projections to NF4 exactly as for
/// a safetensors checkpoint: from f32 weights).
///
/// # Errors
/// As [`GgufFile::open`], [`GgufFile::config`], [`GgufFile::tokenizer`],
/// [`GgufFile::checkpoint`] and [`Llama::from_tensors`].
pub fn load(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<(Llama, LlamaTokenizer)> {
    let g = GgufFile::open(path)?;
    let config = g.config()?;
    let tok = g.tokenizer()?;
    let store = if opts.quantize.is_some() {
        Dtype::F32
    } else {
        match opts.dtype {
            CDType::BF16 => Dtype::BF16,
            CDType::F16 => Dtype::F16,
            _ => Dtype::F32,
        }
    };
    let ckpt = g.checkpoint(&config, opts.num_layers, store)?;
    let model = Llama::from_tensors(config, &ckpt.tensors()?, opts)?;
    Ok((model, tok))
}
