//! `config.json` of Llama-family checkpoints.
//!
//! Both spellings transformers has used are read: `rope_theta` +
//! `rope_scaling` + `torch_dtype` (transformers 4) and `rope_parameters` +
//! `dtype` (transformers 5). Every key either changes what [`LlamaConfig`]
//! holds, is checked to have the one value this crate implements
//! (`hidden_act: "silu"`, `partial_rotary_factor: 1`, ...), or is on a short
//! list of keys that do not affect hidden states (`use_cache`,
//! `initializer_range`, token ids, ...). Anything else is an error naming the
//! key, so a model this crate does not implement is never run with a silent
//! default.

use std::path::Path;

use serde_json::{Map, Value};

use crate::{DType, Error, Result};

/// Keys that do not change hidden states and are accepted with any value.
/// (Keys starting with `_`, such as `_name_or_path`, are accepted too.)
const IGNORED_KEYS: &[&str] = &[
    "architectures",
    "transformers_version",
    "use_cache",
    "initializer_range",
    "max_position_embeddings",
    "pretraining_tp",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "is_decoder",
    "unsloth_version",
    "unsloth_fixed",
    "use_return_dict",
];

/// How rotary embedding frequencies are computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// The original RoPE: `inv_freq[i] = 1 / theta^(2i / head_dim)`.
    Default,
    /// Llama 3.1's frequency-dependent smoothing (transformers' `llama3`
    /// rope type).
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original_max_position_embeddings /
        /// low_freq_factor` are divided by `factor`.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position_embeddings /
        /// high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Context length of pre-training.
        original_max_position_embeddings: f64,
    },
}

/// `quantization_config` of a bitsandbytes 4-bit checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Bnb4bitConfig {
    /// `bnb_4bit_use_double_quant`.
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype` (the dtype the projections compute in).
    pub compute_dtype: Option<DType>,
    /// `llm_int8_skip_modules`: modules left in full precision.
    pub skip_modules: Vec<String>,
}

/// The architecture of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// Whether the LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Bias on `q/k/v/o_proj`.
    pub attention_bias: bool,
    /// Bias on `gate/up/down_proj`.
    pub mlp_bias: bool,
    /// `torch_dtype` / `dtype`: the dtype the weights were saved in.
    pub torch_dtype: Option<DType>,
    /// BOS token id, when given.
    pub bos_token_id: Option<u32>,
    /// EOS token ids (one or several), when given.
    pub eos_token_ids: Vec<u32>,
    /// Pad token id, when given.
    pub pad_token_id: Option<u32>,
    /// bitsandbytes 4-bit quantization, when the checkpoint is stored so.
    pub quantization: Option<Bnb4bitConfig>,
}

/// Reads one config file, naming it and the key in every error.
struct Reader<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
    prefix: &'static str,
}

impl<'a> Reader<'a> {
    fn err(&self, reason: impl std::fmt::Display) -> Error {
        Error::format(self.path, reason.to_string())
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|u| usize::try_from(u).ok())
                    .ok_or_else(|| {
                        self.err(format!(
                            "{}{key} is {v}, expected a non-negative integer",
                            self.prefix
                        ))
                    })
            })
            .transpose()
    }

    fn req_usize(&self, key: &str) -> Result<usize> {
        let v = self
            .usize(key)?
            .ok_or_else(|| self.err(format!("{}{key} is missing", self.prefix)))?;
        if v == 0 {
            return Err(self.err(format!("{}{key} is 0", self.prefix)));
        }
        Ok(v)
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
                    self.err(format!(
                        "{}{key} is {v}, expected a finite number",
                        self.prefix
                    ))
                })
            })
            .transpose()
    }

    fn req_f64(&self, key: &str) -> Result<f64> {
        self.f64(key)?
            .ok_or_else(|| self.err(format!("{}{key} is missing", self.prefix)))
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.as_bool().ok_or_else(|| {
                    self.err(format!(
                        "{}{key} is {v}, expected true or false",
                        self.prefix
                    ))
                })
            })
            .transpose()
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>> {
        self.get(key)
            .map(|v| {
                v.as_str().ok_or_else(|| {
                    self.err(format!("{}{key} is {v}, expected a string", self.prefix))
                })
            })
            .transpose()
    }

    fn token_id(&self, key: &str) -> Result<Option<u32>> {
        self.usize(key)?
            .map(|u| {
                u32::try_from(u).map_err(|_| self.err(format!("{key} {u} does not fit in 32 bits")))
            })
            .transpose()
    }

    fn dtype(&self, key: &str) -> Result<Option<DType>> {
        self.str(key)?
            .map(|s| {
                s.parse::<DType>().map_err(|_| {
                    self.err(format!(
                        "{}{key} is {s:?}; supported: \"float32\", \"bfloat16\", \"float16\"",
                        self.prefix
                    ))
                })
            })
            .transpose()
    }
}

impl LlamaConfig {
    /// Read and check `config.json`.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read; [`Error::Format`] naming the
    /// file and the key for invalid JSON, a missing or mistyped field, an
    /// inconsistent shape (heads not dividing the hidden size, ...), or a
    /// setting this crate does not implement.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parse the text of a `config.json`; `path` names it in errors.
    ///
    /// # Errors
    /// As [`LlamaConfig::from_file`], without the I/O.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let Value::Object(obj) = &value else {
            return Err(Error::format(path, "not a JSON object"));
        };
        let r = Reader {
            path,
            obj,
            prefix: "",
        };

        if let Some(mt) = r.str("model_type")?
            && mt != "llama"
        {
            return Err(r.err(format!(
                "model_type is {mt:?}; only \"llama\" models are supported"
            )));
        }
        if let Some(act) = r.str("hidden_act")?
            && act != "silu"
        {
            return Err(r.err(format!(
                "hidden_act is {act:?}; only \"silu\" (SwiGLU) is supported"
            )));
        }
        if let Some(p) = r.f64("partial_rotary_factor")?
            && p != 1.0
        {
            return Err(r.err(format!(
                "partial_rotary_factor is {p}; only 1.0 (rotary over the whole head) is supported"
            )));
        }
        if let Some(p) = r.f64("attention_dropout")?
            && p != 0.0
        {
            return Err(r.err(format!("attention_dropout is {p}; only 0.0 is supported")));
        }

        let hidden_size = r.req_usize("hidden_size")?;
        let intermediate_size = r.req_usize("intermediate_size")?;
        let num_hidden_layers = r.req_usize("num_hidden_layers")?;
        let num_attention_heads = r.req_usize("num_attention_heads")?;
        let num_key_value_heads = match r.usize("num_key_value_heads")? {
            Some(0) => return Err(r.err("num_key_value_heads is 0")),
            Some(n) => n,
            None => num_attention_heads,
        };
        let vocab_size = r.req_usize("vocab_size")?;
        let head_dim = match r.usize("head_dim")? {
            Some(0) => return Err(r.err("head_dim is 0")),
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(r.err(format!(
                        "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"
                    )));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(r.err(format!(
                "head_dim {head_dim} is odd; rotary embeddings need an even head width"
            )));
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(r.err(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        let rms_norm_eps = r.f64("rms_norm_eps")?.unwrap_or(1e-6);
        if rms_norm_eps <= 0.0 {
            return Err(r.err(format!("rms_norm_eps is {rms_norm_eps}, expected > 0")));
        }

        let (rope_theta, rope_scaling) = rope(&r)?;

        let torch_dtype = match (r.dtype("dtype")?, r.dtype("torch_dtype")?) {
            (Some(a), Some(b)) if a != b => {
                return Err(r.err(format!(
                    "dtype is {a} but torch_dtype is {b}; they must agree"
                )));
            }
            (a, b) => a.or(b),
        };

        let eos_token_ids = match r.get("eos_token_id") {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().and_then(|u| u32::try_from(u).ok()))
                .collect::<Option<Vec<u32>>>()
                .ok_or_else(|| {
                    r.err(format!(
                        "eos_token_id is {}, expected token ids",
                        Value::Array(items.clone())
                    ))
                })?,
            Some(_) => vec![r.token_id("eos_token_id")?.unwrap_or_default()],
        };

        let quantization = match r.get("quantization_config") {
            None => None,
            Some(Value::Object(q)) => Some(quantization(path, q)?),
            Some(other) => {
                return Err(r.err(format!(
                    "quantization_config is {other}, expected an object"
                )));
            }
        };

        let known = [
            "model_type",
            "hidden_act",
            "partial_rotary_factor",
            "attention_dropout",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "head_dim",
            "rms_norm_eps",
            "rope_theta",
            "rope_scaling",
            "rope_parameters",
            "dtype",
            "torch_dtype",
            "tie_word_embeddings",
            "attention_bias",
            "mlp_bias",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "quantization_config",
            "original_max_position_embeddings",
        ];
        for key in obj.keys() {
            if !key.starts_with('_')
                && !known.contains(&key.as_str())
                && !IGNORED_KEYS.contains(&key.as_str())
            {
                return Err(r.err(format!(
                    "unknown setting {key:?} = {}; this crate implements the Llama architecture \
                     and does not know whether {key:?} changes it",
                    obj[key]
                )));
            }
        }

        Ok(Self {
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: r.bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: r.bool("attention_bias")?.unwrap_or(false),
            mlp_bias: r.bool("mlp_bias")?.unwrap_or(false),
            torch_dtype,
            bos_token_id: r.token_id("bos_token_id")?,
            eos_token_ids,
            pad_token_id: r.token_id("pad_token_id")?,
            quantization,
        })
    }

    /// The config as transformers 5 writes it (`rope_parameters`, `dtype`),
    /// for checkpoints this crate writes.
    pub fn to_json(&self) -> Value {
        let mut rope = Map::new();
        rope.insert("rope_theta".into(), self.rope_theta.into());
        match self.rope_scaling {
            RopeScaling::Default => {
                rope.insert("rope_type".into(), "default".into());
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                rope.insert("rope_type".into(), "llama3".into());
                rope.insert("factor".into(), factor.into());
                rope.insert("low_freq_factor".into(), low_freq_factor.into());
                rope.insert("high_freq_factor".into(), high_freq_factor.into());
                rope.insert(
                    "original_max_position_embeddings".into(),
                    (original_max_position_embeddings as u64).into(),
                );
            }
        }
        let mut o = Map::new();
        o.insert("architectures".into(), vec!["LlamaForCausalLM"].into());
        o.insert("model_type".into(), "llama".into());
        o.insert("hidden_act".into(), "silu".into());
        o.insert("hidden_size".into(), self.hidden_size.into());
        o.insert("intermediate_size".into(), self.intermediate_size.into());
        o.insert("num_hidden_layers".into(), self.num_hidden_layers.into());
        o.insert(
            "num_attention_heads".into(),
            self.num_attention_heads.into(),
        );
        o.insert(
            "num_key_value_heads".into(),
            self.num_key_value_heads.into(),
        );
        o.insert("head_dim".into(), self.head_dim.into());
        o.insert("vocab_size".into(), self.vocab_size.into());
        o.insert("rms_norm_eps".into(), self.rms_norm_eps.into());
        o.insert("rope_parameters".into(), Value::Object(rope));
        o.insert(
            "tie_word_embeddings".into(),
            self.tie_word_embeddings.into(),
        );
        o.insert("attention_bias".into(), self.attention_bias.into());
        o.insert("mlp_bias".into(), self.mlp_bias.into());
        if let Some(d) = self.torch_dtype {
            o.insert("dtype".into(), d.torch_name().into());
        }
        if let Some(b) = self.bos_token_id {
            o.insert("bos_token_id".into(), b.into());
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                o.insert("eos_token_id".into(), (*one).into());
            }
            many => {
                o.insert("eos_token_id".into(), many.to_vec().into());
            }
        }
        if let Some(p) = self.pad_token_id {
            o.insert("pad_token_id".into(), p.into());
        }
        Value::Object(o)
    }

    /// Query heads sharing one key/value head.
    pub fn num_kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Output width of `q_proj` (`num_attention_heads · head_dim`).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Output width of `k_proj` and `v_proj`.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

/// `rope_theta` and the scaling, from `rope_parameters` (transformers 5) or
/// `rope_theta` + `rope_scaling` (transformers 4).
fn rope(r: &Reader<'_>) -> Result<(f64, RopeScaling)> {
    let params = match (r.get("rope_parameters"), r.get("rope_scaling")) {
        (Some(_), Some(_)) => {
            return Err(r.err(
                "both rope_parameters and rope_scaling are given; expected one (transformers 5 writes rope_parameters, 4 writes rope_scaling)",
            ));
        }
        (Some(p), None) => Some(("rope_parameters", p)),
        (None, Some(p)) => Some(("rope_scaling", p)),
        (None, None) => None,
    };
    let mut theta = r.f64("rope_theta")?;
    let mut scaling = RopeScaling::Default;
    if let Some((name, p)) = params {
        let Value::Object(p) = p else {
            return Err(r.err(format!("{name} is {p}, expected an object")));
        };
        let prefix: &'static str = if name == "rope_parameters" {
            "rope_parameters."
        } else {
            "rope_scaling."
        };
        let pr = Reader {
            path: r.path,
            obj: p,
            prefix,
        };
        if let Some(t) = pr.f64("rope_theta")? {
            if theta.is_some_and(|outer| outer != t) {
                return Err(r.err(format!(
                    "rope_theta {} disagrees with {prefix}rope_theta {t}",
                    theta.unwrap_or_default()
                )));
            }
            theta = Some(t);
        }
        if let Some(f) = pr.f64("partial_rotary_factor")?
            && f != 1.0
        {
            return Err(r.err(format!(
                "{prefix}partial_rotary_factor is {f}; only 1.0 is supported"
            )));
        }
        let ty = match (pr.str("rope_type")?, pr.str("type")?) {
            (Some(a), _) => a,
            (None, Some(b)) => b,
            (None, None) => "default",
        };
        let allowed: &[&str] = match ty {
            "default" => &["rope_type", "type", "rope_theta", "partial_rotary_factor"],
            "llama3" => {
                let orig = pr.f64("original_max_position_embeddings")?.or(r
                    .f64("original_max_position_embeddings")?)
                    .or(r.f64("max_position_embeddings")?)
                    .ok_or_else(|| {
                        r.err(format!(
                            "{prefix}original_max_position_embeddings is missing (and so is max_position_embeddings)"
                        ))
                    })?;
                let factor = pr.req_f64("factor")?;
                let low = pr.req_f64("low_freq_factor")?;
                let high = pr.req_f64("high_freq_factor")?;
                if !(factor > 0.0 && low > 0.0 && high > low && orig > 0.0) {
                    return Err(r.err(format!(
                        "llama3 rope scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor \
                         and original_max_position_embeddings > 0; got factor {factor}, \
                         low_freq_factor {low}, high_freq_factor {high}, original_max_position_embeddings {orig}"
                    )));
                }
                scaling = RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: orig,
                };
                &[
                    "rope_type",
                    "type",
                    "rope_theta",
                    "partial_rotary_factor",
                    "factor",
                    "low_freq_factor",
                    "high_freq_factor",
                    "original_max_position_embeddings",
                ]
            }
            other => {
                return Err(r.err(format!(
                    "{prefix}rope_type is {other:?}; supported: \"default\", \"llama3\""
                )));
            }
        };
        if let Some(k) = p.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(r.err(format!(
                "{prefix}{k} = {} is not a setting of rope type {ty:?}",
                p[k]
            )));
        }
    }
    let theta = theta.unwrap_or(10_000.0);
    if theta <= 0.0 {
        return Err(r.err(format!("rope_theta is {theta}, expected > 0")));
    }
    Ok((theta, scaling))
}

fn quantization(path: &Path, q: &Map<String, Value>) -> Result<Bnb4bitConfig> {
    let r = Reader {
        path,
        obj: q,
        prefix: "quantization_config.",
    };
    let method = r.str("quant_method")?.unwrap_or("bitsandbytes");
    if method != "bitsandbytes" {
        return Err(r.err(format!(
            "quantization_config.quant_method is {method:?}; only bitsandbytes 4-bit (NF4) checkpoints are supported"
        )));
    }
    if r.bool("load_in_8bit")? == Some(true) {
        return Err(r.err(
            "quantization_config.load_in_8bit is true; only 4-bit (NF4) checkpoints are supported",
        ));
    }
    if r.bool("load_in_4bit")? != Some(true) {
        return Err(r.err(
            "quantization_config.load_in_4bit is not true; only bitsandbytes 4-bit (NF4) checkpoints are supported",
        ));
    }
    let qt = r.str("bnb_4bit_quant_type")?.unwrap_or("fp4");
    if qt != "nf4" {
        return Err(r.err(format!(
            "quantization_config.bnb_4bit_quant_type is {qt:?}; only \"nf4\" is supported"
        )));
    }
    if let Some(s) = r.str("bnb_4bit_quant_storage")?
        && s != "uint8"
    {
        return Err(r.err(format!(
            "quantization_config.bnb_4bit_quant_storage is {s:?}; only \"uint8\" is supported"
        )));
    }
    let skip_modules = match r.get("llm_int8_skip_modules") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                r.err("quantization_config.llm_int8_skip_modules is not a list of strings")
            })?,
        Some(other) => {
            return Err(r.err(format!(
                "quantization_config.llm_int8_skip_modules is {other}, expected a list of strings"
            )));
        }
    };
    Ok(Bnb4bitConfig {
        double_quant: r.bool("bnb_4bit_use_double_quant")?.unwrap_or(false),
        compute_dtype: r.dtype("bnb_4bit_compute_dtype")?,
        skip_modules,
    })
}
