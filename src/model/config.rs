//! `config.json` of Llama-family checkpoints, accepted as transformers
//! accepts them.
//!
//! Both spellings transformers has used are read: `rope_theta` +
//! `rope_scaling` + `torch_dtype` (transformers 4) and `rope_parameters` +
//! `dtype` (transformers 5); files that carry both (transformers 5 writes
//! such) are accepted when the two agree and refused, naming both values,
//! when they do not.
//!
//! Every key is one of four kinds:
//! * read into [`LlamaConfig`] (`hidden_size`, `rope_theta`, ...);
//! * a setting that changes the Llama math in a way this crate does not
//!   implement: [`UNSUPPORTED`], the one list of them, each with its reason.
//!   Such a key is accepted only with the value that keeps plain Llama
//!   (`sliding_window: null`, `partial_rotary_factor: 1`, ...) and refused,
//!   naming the key and the value, otherwise;
//! * a key known not to change hidden states ([`NEUTRAL_KEYS`], and keys
//!   starting with `_`), accepted silently;
//! * anything else: accepted and named in [`LlamaConfig::ignored_keys`], so
//!   that a caller can say which keys were not read.

use std::path::Path;

use serde_json::{Map, Value};

use crate::{DType, Error, Result};

/// `model_type` values accepted, with why: those whose architecture, under
/// the checks of [`UNSUPPORTED`], is exactly Llama's (same modules, weight
/// names and math). A missing `model_type` is accepted too.
pub const MODEL_TYPES: &[(&str, &str)] = &[
    ("llama", "the architecture this crate implements"),
    (
        "mistral",
        "Mistral's modules, weight names and math are Llama's except for the sliding attention \
         window, which Mistral applies unless its config says `\"sliding_window\": null` (its \
         default is a 4096-token window), so a mistral config is accepted only with that key \
         present and null",
    ),
];

/// A config key whose non-default values change the Llama math in a way
/// this crate does not implement.
#[derive(Debug)]
pub struct Unsupported {
    /// The key.
    pub key: &'static str,
    /// The values accepted (those that keep plain Llama), as shown in errors.
    pub accepted: &'static str,
    /// Why other values are refused.
    pub why: &'static str,
    /// Whether a present, non-null value is one of the accepted ones; gets
    /// the whole config for keys that depend on another one.
    pub accepts: fn(&Value, &Map<String, Value>) -> bool,
}

fn is_str(v: &Value, want: &str) -> bool {
    v.as_str() == Some(want)
}

fn is_num(v: &Value, want: f64) -> bool {
    v.as_f64() == Some(want)
}

/// The one list of refused settings. A key that is absent or `null` keeps
/// transformers' default, which for all of these is plain Llama (except
/// `sliding_window` under `model_type: "mistral"`, see [`MODEL_TYPES`]).
/// Rotary embedding types are checked where `rope_parameters` /
/// `rope_scaling` are read ([`ROPE_TYPES`]), and quantization methods where
/// `quantization_config` is.
pub const UNSUPPORTED: &[Unsupported] = &[
    Unsupported {
        key: "hidden_act",
        accepted: "\"silu\"",
        why: "Llama's MLP is SwiGLU, a SiLU-gated product; other activations are not implemented",
        accepts: |v, _| is_str(v, "silu"),
    },
    Unsupported {
        key: "hidden_activation",
        accepted: "\"silu\"",
        why: "Gemma's spelling of the MLP activation; only SiLU (SwiGLU) is implemented",
        accepts: |v, _| is_str(v, "silu"),
    },
    Unsupported {
        key: "partial_rotary_factor",
        accepted: "1",
        why: "rotary embeddings over only part of each head (Phi, StableLM) are not implemented",
        accepts: |v, _| is_num(v, 1.0),
    },
    Unsupported {
        key: "sliding_window",
        accepted: "null (or any value with use_sliding_window false)",
        why: "attention limited to a window of recent tokens (Mistral v0.1, Qwen2) is not implemented",
        accepts: |_, cfg| cfg.get("use_sliding_window") == Some(&Value::Bool(false)),
    },
    Unsupported {
        key: "use_sliding_window",
        accepted: "false",
        why: "attention limited to a window of recent tokens is not implemented",
        accepts: |v, _| v == &Value::Bool(false),
    },
    Unsupported {
        key: "layer_types",
        accepted: "a list of \"full_attention\"",
        why: "per-layer sliding or chunked attention is not implemented",
        accepts: |v, _| {
            v.as_array()
                .is_some_and(|a| a.iter().all(|t| is_str(t, "full_attention")))
        },
    },
    Unsupported {
        key: "attn_logit_softcapping",
        accepted: "null",
        why: "tanh soft-capping of attention scores (Gemma 2) is not implemented",
        accepts: |_, _| false,
    },
    Unsupported {
        key: "final_logit_softcapping",
        accepted: "null",
        why: "tanh soft-capping of the output logits (Gemma 2) is not implemented",
        accepts: |_, _| false,
    },
    Unsupported {
        key: "qk_norm",
        accepted: "false",
        why: "RMSNorm on queries and keys (OLMo 2, Qwen 3, Llama 4) is not implemented",
        accepts: |v, _| v == &Value::Bool(false),
    },
    Unsupported {
        key: "use_qk_norm",
        accepted: "false",
        why: "RMSNorm on queries and keys (Llama 4) is not implemented",
        accepts: |v, _| v == &Value::Bool(false),
    },
    Unsupported {
        key: "qk_layernorm",
        accepted: "false",
        why: "LayerNorm on queries and keys (Persimmon, StableLM) is not implemented",
        accepts: |v, _| v == &Value::Bool(false),
    },
    Unsupported {
        key: "attention_dropout",
        accepted: "0",
        why: "dropout on attention probabilities during training is not implemented",
        accepts: |v, _| is_num(v, 0.0),
    },
    Unsupported {
        key: "num_local_experts",
        accepted: "1",
        why: "mixture-of-experts MLPs (Mixtral) are not implemented",
        accepts: |v, _| is_num(v, 1.0),
    },
    Unsupported {
        key: "num_experts",
        accepted: "1",
        why: "mixture-of-experts MLPs are not implemented",
        accepts: |v, _| is_num(v, 1.0),
    },
    Unsupported {
        key: "embedding_multiplier",
        accepted: "1",
        why: "scaled token embeddings (Granite) are not implemented",
        accepts: |v, _| is_num(v, 1.0),
    },
    Unsupported {
        key: "residual_multiplier",
        accepted: "1",
        why: "scaled residual branches (Granite) are not implemented",
        accepts: |v, _| is_num(v, 1.0),
    },
    Unsupported {
        key: "attention_multiplier",
        accepted: "null",
        why: "an attention scale other than head_dim^-1/2 (Granite) is not implemented",
        accepts: |_, _| false,
    },
];

/// Rotary embedding types implemented (`rope_type`, or `type` in older
/// files): the original RoPE and Llama 3.1's frequency smoothing. Others
/// (`linear`, `dynamic`, `yarn`, `longrope`, ...) compute other frequencies
/// or scale attention and are refused.
pub const ROPE_TYPES: &[&str] = &["default", "llama3"];

/// Keys that do not change hidden states, accepted with any value and not
/// reported. (Keys starting with `_`, such as `_name_or_path`, are too.)
pub const NEUTRAL_KEYS: &[&str] = &[
    "architectures",
    "transformers_version",
    "use_cache",
    "initializer_range",
    "max_position_embeddings",
    // transformers 4 splits the projections into this many slices when
    // > 1: the same sums in another order.
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
    /// Keys of the file this crate neither reads, checks nor knows to be
    /// irrelevant, sorted: accepted and not used.
    /// Empty for configs not read from a file.
    pub ignored_keys: Vec<String>,
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
        let text = crate::io::read_text(path)?;
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

        check_architecture(&r)?;

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
                    "dtype is {} but torch_dtype is {}; they must agree",
                    obj["dtype"], obj["torch_dtype"]
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

        let read = [
            "model_type",
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
        let mut ignored_keys: Vec<String> = obj
            .keys()
            .filter(|k| {
                !k.starts_with('_')
                    && !read.contains(&k.as_str())
                    && !NEUTRAL_KEYS.contains(&k.as_str())
                    && !UNSUPPORTED.iter().any(|u| u.key == k.as_str())
            })
            .cloned()
            .collect();
        ignored_keys.sort();

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
            ignored_keys,
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

/// `model_type` against [`MODEL_TYPES`] and every key of [`UNSUPPORTED`].
fn check_architecture(r: &Reader<'_>) -> Result<()> {
    if let Some(mt) = r.str("model_type")? {
        if !MODEL_TYPES.iter().any(|(t, _)| *t == mt) {
            let names: Vec<String> = MODEL_TYPES.iter().map(|(t, _)| format!("{t:?}")).collect();
            return Err(r.err(format!(
                "model_type is {mt:?}; supported: {} (the architectures that are exactly Llama's)",
                names.join(", ")
            )));
        }
        if mt == "mistral" && r.obj.get("sliding_window") != Some(&Value::Null) {
            return Err(r.err(format!(
                "model_type is \"mistral\" and sliding_window is {}; Mistral applies a sliding \
                 attention window unless sliding_window is null (its default is 4096), and \
                 sliding-window attention is not implemented",
                r.obj
                    .get("sliding_window")
                    .map_or_else(|| "not given".to_string(), Value::to_string)
            )));
        }
    }
    for u in UNSUPPORTED {
        if let Some(v) = r.get(u.key)
            && !(u.accepts)(v, r.obj)
        {
            return Err(r.err(format!(
                "{} is {v}, and only {} is supported: {}",
                u.key, u.accepted, u.why
            )));
        }
    }
    Ok(())
}

/// `rope_theta` and the scaling, from `rope_parameters` (transformers 5)
/// and/or `rope_theta` + `rope_scaling` (transformers 4). When several are
/// given they must agree, compared as numbers.
fn rope(r: &Reader<'_>) -> Result<(f64, RopeScaling)> {
    let mut thetas: Vec<(&'static str, f64)> = Vec::new();
    if let Some(t) = r.f64("rope_theta")? {
        thetas.push(("rope_theta", t));
    }
    let mut scalings: Vec<(&'static str, RopeScaling)> = Vec::new();
    for (name, inner) in [
        ("rope_parameters", "rope_parameters.rope_theta"),
        ("rope_scaling", "rope_scaling.rope_theta"),
    ] {
        if let Some(p) = r.get(name) {
            let (t, scaling) = rope_dict(r, name, p)?;
            if let Some(t) = t {
                thetas.push((inner, t));
            }
            scalings.push((name, scaling));
        }
    }
    for (i, (n1, t1)) in thetas.iter().enumerate() {
        if let Some((n2, t2)) = thetas[i + 1..].iter().find(|(_, t2)| t2 != t1) {
            return Err(r.err(format!("{n1} is {t1} but {n2} is {t2}; they must agree")));
        }
    }
    let scaling = match scalings.as_slice() {
        [] => RopeScaling::Default,
        [(_, s)] => *s,
        [(n1, s1), (n2, s2), ..] => {
            let (f1, f2) = (rope_fields(s1), rope_fields(s2));
            if let Some(((field, v1), (_, v2))) = f1.iter().zip(&f2).find(|(a, b)| a != b) {
                return Err(r.err(format!(
                    "{n1}.{field} is {v1} but {n2}.{field} is {v2}; they must agree"
                )));
            }
            if f1 != f2 {
                return Err(r.err(format!(
                    "{n1} is {} but {n2} is {}; they must agree",
                    r.obj[*n1], r.obj[*n2]
                )));
            }
            *s1
        }
    };
    let theta = thetas.first().map_or(10_000.0, |(_, t)| *t);
    if theta <= 0.0 {
        return Err(r.err(format!("rope_theta is {theta}, expected > 0")));
    }
    Ok((theta, scaling))
}

/// The settings of a rope scaling as (name, value) pairs, for comparing two
/// spellings field by field.
fn rope_fields(s: &RopeScaling) -> Vec<(&'static str, String)> {
    match *s {
        RopeScaling::Default => vec![("rope_type", "\"default\"".into())],
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => vec![
            ("rope_type", "\"llama3\"".into()),
            ("factor", factor.to_string()),
            ("low_freq_factor", low_freq_factor.to_string()),
            ("high_freq_factor", high_freq_factor.to_string()),
            (
                "original_max_position_embeddings",
                original_max_position_embeddings.to_string(),
            ),
        ],
    }
}

/// One of `rope_parameters` / `rope_scaling`: its own `rope_theta`, when it
/// has one, and the scaling it describes.
fn rope_dict(r: &Reader<'_>, name: &'static str, p: &Value) -> Result<(Option<f64>, RopeScaling)> {
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
    let theta = pr.f64("rope_theta")?;
    if let Some(f) = pr.f64("partial_rotary_factor")?
        && f != 1.0
    {
        return Err(r.err(format!(
            "{prefix}partial_rotary_factor is {f}; only 1 is supported: rotary embeddings over \
             only part of each head are not implemented"
        )));
    }
    let ty = match (pr.str("rope_type")?, pr.str("type")?) {
        (Some(a), _) => a,
        (None, Some(b)) => b,
        (None, None) => "default",
    };
    let mut scaling = RopeScaling::Default;
    let allowed: &[&str] = match ty {
        "default" => &["rope_type", "type", "rope_theta", "partial_rotary_factor"],
        "llama3" => {
            let orig = pr
                .f64("original_max_position_embeddings")?
                .or(r.f64("original_max_position_embeddings")?)
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
            let names: Vec<String> = ROPE_TYPES.iter().map(|t| format!("{t:?}")).collect();
            return Err(r.err(format!(
                "{prefix}rope_type is {other:?}; supported: {} (other types compute other \
                 frequencies or scale attention, and are not implemented)",
                names.join(", ")
            )));
        }
    };
    if let Some(k) = p.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(r.err(format!(
            "{prefix}{k} = {} is not a setting of rope type {ty:?}",
            p[k]
        )));
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
