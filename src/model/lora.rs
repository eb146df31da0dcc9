//! LoRA adapters on the model's projections, in PEFT's format.
//!
//! An adapter directory holds `adapter_config.json` and
//! `adapter_model.safetensors` with PEFT's key names,
//! `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
//! (`[r, in]`) and `...lora_B.weight` (`[out, r]`), f32. The output of a
//! projection becomes `W·x + scale · B·(A·dropout(x))` with
//! `scale = lora_alpha / r` (`lora_alpha / √r` with `use_rslora`), as
//! PEFT's `LoraLayer` computes it.
//!
//! Supported: `peft_type: "LORA"`, `target_modules` as a list (a module
//! matches when its full name equals an entry or ends with `.entry`) or as a
//! regular expression (matched against the whole module name, as PEFT
//! does), `layers_to_transform`, `use_rslora`. Anything that would change
//! the computation in a way not implemented here (`use_dora`, a `bias`
//! other than `"none"`, `fan_in_fan_out`, `rank_pattern`/`alpha_pattern`,
//! `modules_to_save`, ...) is an error naming the field.

use std::path::Path;

use candle_core::{DType as CDType, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Uniform};
use regex::Regex;
use serde_json::{Map, Value};

use super::llama::{Llama, PROJECTION_NAMES, projection_parent};
use super::projection::LoraAdapter;
use super::weights::{Checkpoint, safetensors_bytes};
use crate::io::write_atomic;
use crate::nf4::checkpoint::TensorBuf;
use crate::{Error, Result};

/// File name of the adapter's settings.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter's tensors.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Prefix PEFT puts before the base model's own names.
pub const KEY_PREFIX: &str = "base_model.model.";

/// Which modules get an adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetModules {
    /// Module names or name suffixes (`q_proj`, `self_attn.v_proj`, ...).
    Names(Vec<String>),
    /// A regular expression matched against the whole module name
    /// (`model.layers.0.self_attn.q_proj`).
    Regex(String),
}

/// The settings of a LoRA adapter (the parts of PEFT's `LoraConfig` that
/// matter here).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r`.
    pub rank: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// `lora_dropout`.
    pub dropout: f32,
    /// `target_modules`.
    pub target_modules: TargetModules,
    /// `layers_to_transform` (`None`: every layer).
    pub layers: Option<Vec<usize>>,
    /// `use_rslora`: scale by `alpha / √r` instead of `alpha / r`.
    pub use_rslora: bool,
    /// `base_model_name_or_path`, written back on save.
    pub base_model: Option<String>,
}

impl Default for LoraConfig {
    /// The TLI paper's settings: `q_proj` and `v_proj`, rank 16, alpha 32,
    /// dropout 0.05, every layer.
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            dropout: 0.05,
            target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            layers: None,
            use_rslora: false,
            base_model: None,
        }
    }
}

/// PEFT's module name of projection `name` in layer `layer`
/// (`model.layers.0.self_attn.q_proj`).
pub fn module_name(layer: usize, name: &str) -> String {
    format!("model.layers.{layer}.{}.{name}", projection_parent(name))
}

impl LoraConfig {
    /// The factor the adapter's output is multiplied by.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Check the settings.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a rank outside
    /// `1..=`[`MAX_RANK`](crate::lora::MAX_RANK), a non-finite alpha, a dropout
    /// outside `[0, 1)`, no target modules, or an invalid regular expression.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "lora config";
        if self.rank == 0 || self.rank > crate::lora::MAX_RANK {
            return Err(Error::invalid(
                OP,
                format!(
                    "rank r = {} is not in 1..={} (the largest rank the fused LoRA kernels take)",
                    self.rank,
                    crate::lora::MAX_RANK
                ),
            ));
        }
        if !self.alpha.is_finite() {
            return Err(Error::invalid(
                OP,
                format!("lora_alpha {} is not finite", self.alpha),
            ));
        }
        if !(self.dropout >= 0.0 && self.dropout < 1.0) {
            return Err(Error::invalid(
                OP,
                format!("lora_dropout {} is not in [0, 1)", self.dropout),
            ));
        }
        match &self.target_modules {
            TargetModules::Names(v) if v.is_empty() => {
                Err(Error::invalid(OP, "target_modules is empty"))
            }
            TargetModules::Regex(r) => Regex::new(&format!("^(?:{r})$"))
                .map(|_| ())
                .map_err(|e| Error::invalid(OP, format!("target_modules regex {r:?}: {e}"))),
            _ => Ok(()),
        }
    }

    /// Whether projection `name` of layer `layer` gets an adapter.
    pub fn targets(&self, layer: usize, name: &str) -> bool {
        if self.layers.as_ref().is_some_and(|l| !l.contains(&layer)) {
            return false;
        }
        let full = module_name(layer, name);
        match &self.target_modules {
            TargetModules::Names(v) => v
                .iter()
                .any(|t| full == *t || full.ends_with(&format!(".{t}"))),
            TargetModules::Regex(r) => {
                Regex::new(&format!("^(?:{r})$")).is_ok_and(|re| re.is_match(&full))
            }
        }
    }

    /// Read `adapter_config.json`.
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be read; [`Error::Format`] naming the file
    /// and field for invalid JSON, a missing or mistyped field, or a setting
    /// not implemented here.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = crate::io::read_text(path)?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let Value::Object(o) = v else {
            return Err(Error::format(path, "not a JSON object"));
        };
        let err = |m: String| Error::format(path, m);
        let get = |k: &str| o.get(k).filter(|v| !v.is_null());
        match get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            other => {
                return Err(err(format!(
                    "peft_type is {other:?}; only \"LORA\" adapters are supported"
                )));
            }
        }
        let rank = get("r")
            .and_then(Value::as_u64)
            .and_then(|r| usize::try_from(r).ok())
            .ok_or_else(|| err(format!("r is {:?}, expected a positive integer", get("r"))))?;
        let alpha = get("lora_alpha").and_then(Value::as_f64).ok_or_else(|| {
            err(format!(
                "lora_alpha is {:?}, expected a number",
                get("lora_alpha")
            ))
        })?;
        let dropout = match get("lora_dropout") {
            None => 0.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| err(format!("lora_dropout is {v}, expected a number")))?
                as f32,
        };
        let target_modules = match get("target_modules") {
            Some(Value::String(s)) => TargetModules::Regex(s.clone()),
            Some(Value::Array(a)) => {
                // PEFT keeps a set (and writes it in arbitrary order).
                let mut names = a
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| err("target_modules is not a list of strings".into()))?;
                names.sort();
                names.dedup();
                TargetModules::Names(names)
            }
            other => {
                return Err(err(format!(
                    "target_modules is {other:?}, expected a list or a regex string"
                )));
            }
        };
        let layers = match get("layers_to_transform") {
            None => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| v.as_u64().and_then(|u| usize::try_from(u).ok()))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        err("layers_to_transform is not a list of layer indices".into())
                    })?,
            ),
            Some(v) => Some(vec![
                v.as_u64()
                    .and_then(|u| usize::try_from(u).ok())
                    .ok_or_else(|| {
                        err(format!(
                            "layers_to_transform is {v}, expected layer indices"
                        ))
                    })?,
            ]),
        };
        let flag = |k: &str| get(k).and_then(Value::as_bool).unwrap_or(false);
        for k in ["use_dora", "fan_in_fan_out", "lora_bias", "use_qalora"] {
            if flag(k) {
                return Err(err(format!("{k} is true; not supported")));
            }
        }
        if let Some(b) = get("bias").and_then(Value::as_str)
            && b != "none"
        {
            return Err(err(format!("bias is {b:?}; only \"none\" is supported")));
        }
        for k in ["rank_pattern", "alpha_pattern"] {
            if get(k)
                .and_then(Value::as_object)
                .is_some_and(|m| !m.is_empty())
            {
                return Err(err(format!(
                    "{k} is {}; per-module ranks and alphas are not supported",
                    o[k]
                )));
            }
        }
        for k in [
            "modules_to_save",
            "layer_replication",
            "target_parameters",
            "exclude_modules",
            "trainable_token_indices",
            "alora_invocation_tokens",
        ] {
            let empty = match get(k) {
                None => true,
                Some(Value::Array(a)) => a.is_empty(),
                Some(Value::Object(m)) => m.is_empty(),
                Some(_) => false,
            };
            if !empty {
                return Err(err(format!("{k} is {}; not supported", o[k])));
            }
        }
        let cfg = Self {
            rank,
            alpha,
            dropout,
            target_modules,
            layers,
            use_rslora: flag("use_rslora"),
            base_model: get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
        };
        cfg.validate().map_err(|e| err(e.to_string()))?;
        Ok(cfg)
    }

    /// `adapter_config.json` as PEFT writes it (the fields PEFT needs to
    /// rebuild the adapter; PEFT fills the rest with its defaults).
    pub fn to_peft_json(&self) -> Value {
        let mut o = Map::new();
        let alpha = if self.alpha.fract() == 0.0 && self.alpha.abs() < 1e15 {
            Value::from(self.alpha as i64)
        } else {
            Value::from(self.alpha)
        };
        o.insert("peft_type".into(), "LORA".into());
        o.insert("task_type".into(), "CAUSAL_LM".into());
        o.insert(
            "base_model_name_or_path".into(),
            self.base_model.clone().map_or(Value::Null, Value::from),
        );
        o.insert("r".into(), self.rank.into());
        o.insert("lora_alpha".into(), alpha);
        // The shortest decimal of the f32 (0.05, not 0.05000000074505806).
        let dropout: f64 = self
            .dropout
            .to_string()
            .parse()
            .unwrap_or(f64::from(self.dropout));
        o.insert("lora_dropout".into(), dropout.into());
        o.insert(
            "target_modules".into(),
            match &self.target_modules {
                TargetModules::Names(v) => v.clone().into(),
                TargetModules::Regex(r) => r.clone().into(),
            },
        );
        o.insert(
            "layers_to_transform".into(),
            self.layers.clone().map_or(Value::Null, Value::from),
        );
        o.insert("layers_pattern".into(), Value::Null);
        o.insert("bias".into(), "none".into());
        o.insert("fan_in_fan_out".into(), false.into());
        o.insert("use_rslora".into(), self.use_rslora.into());
        o.insert("use_dora".into(), false.into());
        o.insert("modules_to_save".into(), Value::Null);
        o.insert("rank_pattern".into(), Value::Object(Map::new()));
        o.insert("alpha_pattern".into(), Value::Object(Map::new()));
        o.insert("init_lora_weights".into(), true.into());
        o.insert("inference_mode".into(), true.into());
        o.insert("revision".into(), Value::Null);
        Value::Object(o)
    }
}

/// PEFT's tensor key of factor `ab` (`"A"` or `"B"`) of a module.
pub fn tensor_key(layer: usize, name: &str, ab: &str) -> String {
    format!("{KEY_PREFIX}{}.lora_{ab}.weight", module_name(layer, name))
}

/// The targeted `(layer, projection)` pairs of `model` under `cfg`.
fn targets(model: &Llama, cfg: &LoraConfig) -> Result<Vec<(usize, &'static str)>> {
    let t: Vec<_> = (0..model.blocks.len())
        .flat_map(|l| PROJECTION_NAMES.iter().map(move |n| (l, *n)))
        .filter(|(l, n)| cfg.targets(*l, n))
        .collect();
    if t.is_empty() {
        return Err(Error::invalid(
            "lora",
            format!(
                "target_modules {:?} (layers {:?}) match no projection of the loaded blocks",
                cfg.target_modules, cfg.layers
            ),
        ));
    }
    Ok(t)
}

/// Attach fresh adapters as PEFT initialises them: `A` Kaiming-uniform
/// (`U(−1/√in, 1/√in)`), `B` zero, so the model's output is unchanged.
/// Seeded; replaces any adapter already there.
///
/// # Errors
/// As [`LoraConfig::validate`]; [`Error::InvalidArgument`] if no projection
/// matches; [`Error::Candle`] if the device cannot hold the factors.
pub fn attach(model: &mut Llama, cfg: &LoraConfig, seed: u64) -> Result<()> {
    cfg.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let c = || Error::candle("attach LoRA");
    for (l, name) in targets(model, cfg)? {
        let dev = model.device.clone();
        let p = model.blocks[l]
            .projection_mut(name)
            .ok_or_else(|| Error::invalid("lora", name))?;
        let bound = (p.in_features as f32).powf(-0.5);
        let dist =
            Uniform::new(-bound, bound).map_err(|e| Error::invalid("lora", e.to_string()))?;
        let a: Vec<f32> = (0..cfg.rank * p.in_features)
            .map(|_| dist.sample(&mut rng))
            .collect();
        let a = Tensor::from_vec(a, (cfg.rank, p.in_features), &dev).map_err(c())?;
        let b = Tensor::zeros((p.out_features, cfg.rank), CDType::F32, &dev).map_err(c())?;
        p.lora = Some(LoraAdapter {
            a: Var::from_tensor(&a).map_err(c())?,
            b: Var::from_tensor(&b).map_err(c())?,
            scale: cfg.scale(),
            dropout: cfg.dropout,
        });
    }
    Ok(())
}

/// Load a PEFT adapter directory onto `model`; returns its settings.
///
/// # Errors
/// As [`LoraConfig::from_file`]; [`Error::Format`] naming the file and key
/// for a missing factor, a factor of the wrong shape or dtype, a factor
/// holding a NaN or an infinity, or a key that is not a factor of a
/// targeted module; [`Error::Candle`] if the device
/// cannot hold them.
pub fn load_peft(model: &mut Llama, dir: impl AsRef<Path>) -> Result<LoraConfig> {
    let dir = dir.as_ref();
    let cfg = LoraConfig::from_file(dir.join(CONFIG_FILE))?;
    let path = dir.join(WEIGHTS_FILE);
    let file = crate::io::MappedFile::open(&path)?;
    let ckpt = Checkpoint::from_bytes(&path, file.bytes().to_vec());
    let t = ckpt.tensors()?;
    let wanted = targets(model, &cfg)?;
    let mut expected = std::collections::HashSet::new();
    let mut adapters = Vec::with_capacity(wanted.len());
    for &(l, name) in &wanted {
        let p = model.blocks[l]
            .projection(name)
            .ok_or_else(|| Error::invalid("lora", name))?;
        let (ka, kb) = (tensor_key(l, name, "A"), tensor_key(l, name, "B"));
        let a = t.dense(&ka, &[cfg.rank, p.in_features], CDType::F32, &model.device)?;
        let b = t.dense(&kb, &[p.out_features, cfg.rank], CDType::F32, &model.device)?;
        for (key, factor) in [(&ka, &a), (&kb, &b)] {
            let values: Vec<f32> = factor
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .map_err(Error::candle("load LoRA"))?;
            check_finite("load LoRA", key, &values)
                .map_err(|e| Error::format(&path, e.to_string()))?;
        }
        expected.insert(ka);
        expected.insert(kb);
        adapters.push((l, name, a, b));
    }
    if let Some(extra) = t.names().into_iter().find(|n| !expected.contains(*n)) {
        return Err(Error::format(
            &path,
            format!("tensor `{extra}` is not a LoRA factor of a module the adapter config targets"),
        ));
    }
    for (l, name, a, b) in adapters {
        let c = Error::candle("load LoRA");
        let lora = LoraAdapter {
            a: Var::from_tensor(&a).map_err(c)?,
            b: Var::from_tensor(&b).map_err(Error::candle("load LoRA"))?,
            scale: cfg.scale(),
            dropout: cfg.dropout,
        };
        if let Some(p) = model.blocks[l].projection_mut(name) {
            p.lora = Some(lora);
        }
    }
    Ok(cfg)
}

/// `values` of the factor `key` are all finite, or an error naming the
/// factor, how many are not and the first of them: an adapter with a NaN or
/// an infinity is never saved, loaded or trained from.
fn check_finite(op: &'static str, key: &str, values: &[f32]) -> Result<()> {
    let bad = values.iter().filter(|v| !v.is_finite()).count();
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::invalid(
            op,
            format!(
                "`{key}` has {bad} non-finite value(s) of {} (the first, at index {i}, is {})",
                values.len(),
                values[i]
            ),
        )),
    }
}

/// Save `model`'s adapters in PEFT format under `dir` (created if needed;
/// each file written atomically).
///
/// `cfg` must describe the adapters that are attached (the usual case: the
/// config they were attached or loaded with).
///
/// # Errors
/// [`Error::InvalidArgument`] if a projection `cfg` targets has no adapter
/// or one of another rank, or if a factor holds a NaN or an infinity
/// (nothing is written then); [`Error::Io`] if writing fails;
/// [`Error::Candle`] if the factors cannot be read back.
pub fn save_peft(model: &Llama, cfg: &LoraConfig, dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    cfg.validate()?;
    let mut tensors = Vec::new();
    for (l, name) in targets(model, cfg)? {
        let p = model.blocks[l]
            .projection(name)
            .ok_or_else(|| Error::invalid("lora", name))?;
        let Some(lora) = &p.lora else {
            return Err(Error::invalid(
                "save LoRA",
                format!(
                    "{} is targeted by the config but has no adapter",
                    module_name(l, name)
                ),
            ));
        };
        if lora.rank() != cfg.rank {
            return Err(Error::invalid(
                "save LoRA",
                format!(
                    "{} has an adapter of rank {}, the config says {}",
                    module_name(l, name),
                    lora.rank(),
                    cfg.rank
                ),
            ));
        }
        for (ab, var) in [("A", &lora.a), ("B", &lora.b)] {
            let t = var.as_tensor();
            let values: Vec<f32> = t
                .to_dtype(CDType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .map_err(Error::candle("save LoRA"))?;
            check_finite("save LoRA", &tensor_key(l, name, ab), &values)?;
            tensors.push((
                tensor_key(l, name, ab),
                TensorBuf {
                    dtype: safetensors::Dtype::F32,
                    shape: t.dims().to_vec(),
                    data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                },
            ));
        }
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let bytes = safetensors_bytes(&tensors)?;
    let wpath = dir.join(WEIGHTS_FILE);
    write_atomic(&wpath, |w| {
        w.write_all(&bytes).map_err(|e| Error::io(&wpath, e))
    })?;
    let cpath = dir.join(CONFIG_FILE);
    let json = serde_json::to_string_pretty(&cfg.to_peft_json())
        .map_err(|e| Error::invalid("save LoRA", e.to_string()))?;
    write_atomic(&cpath, |w| {
        w.write_all(json.as_bytes())
            .map_err(|e| Error::io(&cpath, e))
    })
}

/// Every adapter factor of `model` with its PEFT tensor key
/// ([`tensor_key`]), in layer and projection order, `A` before `B`: the
/// names the optimizer state is saved under.
pub fn named_trainable_vars(model: &Llama) -> Vec<(String, Var)> {
    let mut out = Vec::new();
    for (l, block) in model.blocks.iter().enumerate() {
        for name in PROJECTION_NAMES {
            if let Some(lora) = block.projection(name).and_then(|p| p.lora.as_ref()) {
                out.push((tensor_key(l, name, "A"), lora.a.clone()));
                out.push((tensor_key(l, name, "B"), lora.b.clone()));
            }
        }
    }
    out
}

/// Every adapter factor of `model` (the trainable parameters), in layer and
/// projection order, `A` before `B`.
pub fn trainable_vars(model: &Llama) -> Vec<Var> {
    model
        .blocks
        .iter()
        .flat_map(|b| b.projections.iter())
        .filter_map(|p| p.lora.as_ref())
        .flat_map(|l| [l.a.clone(), l.b.clone()])
        .collect()
}
