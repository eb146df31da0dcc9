//! Word embeddings at a layer and the per-pair cosines scan and eval report.
//!
//! Each word or phrase is tokenized alone, with no prompt (BOS first: added
//! by the tokenizer's post-processor, or prepended by its
//! [`BosMode`]). Its embedding at hidden-state index `i`
//! (transformers' `output_hidden_states` numbering: 0 is the embedding
//! output, `i` the output of block `i − 1`) is the masked mean of that
//! layer's hidden states, L2-normalised; the alignment of a pair is the
//! cosine of its Swahili and English embeddings. Two pooling rules
//! ([`Pooling`]): every attention-masked token (BOS included), or the word's
//! own tokens only.
//!
//! The pooling and cosine run through [`crate::ops::cosine::pooled_cosine`]
//! (the fused kernel) on the [`Device`] asked for; the model itself runs on
//! candle. [`pair_embeddings`] also keeps the pooled vectors of the same
//! pass, from which [`PairEmbeddings::cosine_matrix`] computes every
//! Swahili word against every English word with the fused cosine-matrix op
//! (the input of [`super::specificity`](mod@super::specificity)).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::DType as CDType;
use serde::{Serialize, Serializer};

use super::specificity::Specificity;
use crate::cosine::{Hidden, PairOptions};
use crate::model::{BosMode, ForwardOptions, LlamaConfig, LlamaTokenizer, LoadOptions};
use crate::model::{EncodedBatch, Llama, candle_device};
use crate::nf4::quantize::QuantizeOptions;
use crate::pairs::Pair;
use crate::{Device, Error, Result};

/// How a word's hidden states are pooled into one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pooling {
    /// The word's own tokens: BOS, EOS and padding excluded (the paper's
    /// before/after evaluation).
    Words,
    /// Every attention-masked token, BOS included (the paper's pilot scan
    /// and its training loss). From block 1 on BOS dominates this mean, so
    /// it gives near-1 cosines for every pair.
    All,
}

impl Pooling {
    /// `"words"` or `"all"`.
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Words => "words",
            Pooling::All => "all",
        }
    }
}

impl fmt::Display for Pooling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Pooling {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "words" | "word" => Ok(Pooling::Words),
            "all" => Ok(Pooling::All),
            other => Err(Error::invalid(
                "pooling",
                format!("unknown pooling {other:?} (expected words or all)"),
            )),
        }
    }
}

impl Serialize for Pooling {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// How many pairs go through the model in one forward pass.
pub const CHUNK_PAIRS: usize = 64;

/// One set at one layer under one pooling rule: the per-pair cosines and
/// the pooled embeddings they came from.
#[derive(Debug, Clone, PartialEq)]
pub struct PairEmbeddings {
    /// `cos(swahili_i, english_i)` per pair, input order (what
    /// [`pair_cosines`] returns).
    pub cos: Vec<f32>,
    /// The Swahili words' pooled vectors (masked mean, not normalised),
    /// row-major `[n, dim]`; empty when not kept.
    pub swahili: Vec<f32>,
    /// The English words' pooled vectors, as `swahili`.
    pub english: Vec<f32>,
    /// Embedding width (0 when the vectors were not kept).
    pub dim: usize,
}

impl PairEmbeddings {
    /// Number of pairs.
    pub fn n(&self) -> usize {
        self.cos.len()
    }

    /// The cosine matrix `C[i][j] = cos(swahili_i, english_j)`, row-major
    /// `[n, n]` f32, by the fused cosine-matrix op
    /// ([`crate::ops::cosine::cosine_matrix_default`]) on `device`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the vectors were not kept; as the
    /// op.
    pub fn cosine_matrix(&self, device: Device) -> Result<Vec<f32>> {
        let n = self.n();
        if self.dim == 0 || self.swahili.len() != n * self.dim || self.english.len() != n * self.dim
        {
            return Err(Error::invalid(
                "cosine matrix",
                "the pooled vectors were not kept (use pair_embeddings)",
            ));
        }
        crate::ops::cosine::cosine_matrix_default(
            device,
            &Hidden::rows(&self.swahili, n, self.dim),
            &Hidden::rows(&self.english, n, self.dim),
        )
    }

    /// The [`Specificity`] of the set: [`Self::cosine_matrix`] on `device`,
    /// then [`super::specificity::specificity`].
    ///
    /// # Errors
    /// As [`Self::cosine_matrix`].
    pub fn specificity(&self, device: Device) -> Result<Specificity> {
        let c = self.cosine_matrix(device)?;
        super::specificity::specificity(&c, self.n())
    }
}

/// Per-pair cosines of `pairs` at hidden-state indices `layers` under each
/// of `poolings`: `out[l][p][i]` is pair `i` at `layers[l]` pooled by
/// `poolings[p]`. No dropout (inference); adapters attached to `model` are
/// applied.
///
/// # Errors
/// [`Error::InvalidArgument`] for no pairs, no layers or no poolings, or a
/// layer beyond the model or the loaded blocks; tokenizer, model and
/// cosine-op errors (a `device` that cannot run here gives
/// [`Error::NoCudaDevice`] or [`Error::InvalidArgument`]).
pub fn pair_cosines(
    model: &Llama,
    tok: &LlamaTokenizer,
    pairs: &[Pair],
    layers: &[usize],
    poolings: &[Pooling],
    device: Device,
) -> Result<Vec<Vec<Vec<f32>>>> {
    let e = run(model, tok, pairs, layers, poolings, device, false)?;
    Ok(e.into_iter()
        .map(|per_layer| per_layer.into_iter().map(|p| p.cos).collect())
        .collect())
}

/// [`pair_cosines`] that also keeps the pooled embeddings, from the same
/// model pass: `out[l][p]` is every pair at `layers[l]` pooled by
/// `poolings[p]`.
///
/// Memory: the kept vectors take `2 · n · dim · 4` bytes per (layer,
/// pooling) on the host, all held until the last chunk of pairs has run
/// (every layer is complete only then). For 623 pairs at width 4096 that is
/// 20 MB per (layer, pooling), 1.35 GB for all 33 hidden-state indices of
/// Llama-3-8B under both poolings.
///
/// # Errors
/// As [`pair_cosines`].
pub fn pair_embeddings(
    model: &Llama,
    tok: &LlamaTokenizer,
    pairs: &[Pair],
    layers: &[usize],
    poolings: &[Pooling],
    device: Device,
) -> Result<Vec<Vec<PairEmbeddings>>> {
    run(model, tok, pairs, layers, poolings, device, true)
}

fn run(
    model: &Llama,
    tok: &LlamaTokenizer,
    pairs: &[Pair],
    layers: &[usize],
    poolings: &[Pooling],
    device: Device,
    keep: bool,
) -> Result<Vec<Vec<PairEmbeddings>>> {
    const OP: &str = "pair cosines";
    if pairs.is_empty() {
        return Err(Error::invalid(OP, "no pairs"));
    }
    if layers.is_empty() || poolings.is_empty() {
        return Err(Error::invalid(
            OP,
            "no layers or no pooling rules asked for",
        ));
    }
    let top = layers.iter().copied().max().unwrap_or(0);
    let l = model.config.num_hidden_layers;
    if top > l {
        return Err(Error::invalid(
            OP,
            format!("hidden-state index {top} asked for, the model has indices 0..={l}"),
        ));
    }
    device.check_available()?;
    let empty = PairEmbeddings {
        cos: Vec::with_capacity(pairs.len()),
        swahili: Vec::new(),
        english: Vec::new(),
        dim: 0,
    };
    let mut out = vec![vec![empty; poolings.len()]; layers.len()];
    let opts = PairOptions {
        keep_pooled: keep,
        ..PairOptions::default()
    };
    for chunk in pairs.chunks(CHUNK_PAIRS) {
        let c = chunk.len();
        let texts: Vec<&str> = chunk
            .iter()
            .map(|p| p.swahili.as_str())
            .chain(chunk.iter().map(|p| p.english.as_str()))
            .collect();
        let enc = tok.encode_batch(&texts)?;
        check_words_have_tokens(&enc, chunk)?;
        let (ids, mask) = enc.tensors(&model.device)?;
        let states = model.hidden_states(
            &ids,
            &mask,
            &ForwardOptions {
                up_to: Some(top),
                train_seed: None,
            },
        )?;
        let s = enc.ids[0].len();
        let masks: Vec<Vec<u8>> = poolings
            .iter()
            .map(|p| {
                let rows = match p {
                    Pooling::All => enc.attention_mask.clone(),
                    Pooling::Words => enc.word_mask(),
                };
                rows.into_iter()
                    .flatten()
                    .map(|v| u8::from(v != 0))
                    .collect()
            })
            .collect();
        for (li, &layer) in layers.iter().enumerate() {
            let h: Vec<f32> = states[layer]
                .to_dtype(CDType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .map_err(Error::candle(OP))?;
            let d = h.len() / (2 * c * s);
            check_finite_states(&h, &enc.attention_mask, &texts, layer, s, d)?;
            let (ha, hb) = h.split_at(c * s * d);
            let a = Hidden::contiguous(ha, c, s, d);
            let b = Hidden::contiguous(hb, c, s, d);
            for (pi, m) in masks.iter().enumerate() {
                let (ma, mb) = m.split_at(c * s);
                let r =
                    crate::ops::cosine::pooled_cosine(device, &a, Some(ma), &b, Some(mb), opts)?;
                let e = &mut out[li][pi];
                e.cos.extend(r.cos);
                if let (Some(pa), Some(pb)) = (r.pooled_a, r.pooled_b) {
                    if e.swahili.is_empty() {
                        e.swahili.reserve_exact(pairs.len() * d);
                        e.english.reserve_exact(pairs.len() * d);
                    }
                    e.swahili.extend(pa);
                    e.english.extend(pb);
                    e.dim = d;
                }
            }
        }
    }
    Ok(out)
}

/// Encode every pair once, checking each word against the tokenizer's
/// token limit and [`check_words_have_tokens`]: what [`pair_cosines`] and
/// training would find only when they reach the word, found before any
/// model work.
///
/// # Errors
/// As [`LlamaTokenizer::encode_batch`] and [`check_words_have_tokens`].
pub fn check_pairs(tok: &LlamaTokenizer, pairs: &[Pair]) -> Result<()> {
    for chunk in pairs.chunks(CHUNK_PAIRS) {
        let texts: Vec<&str> = chunk
            .iter()
            .map(|p| p.swahili.as_str())
            .chain(chunk.iter().map(|p| p.english.as_str()))
            .collect();
        check_words_have_tokens(&tok.encode_batch(&texts)?, chunk)?;
    }
    Ok(())
}

/// Every word of `chunk` (its Swahili words, then its English ones, as
/// `enc` holds them) has a token that is not special: a word made only of
/// special tokens (`<|begin_of_text|>`, say) has nothing to pool as a word,
/// and would otherwise enter the means and tests as a silent cosine of 0.
pub fn check_words_have_tokens(enc: &EncodedBatch, chunk: &[Pair]) -> Result<()> {
    let c = chunk.len();
    for (r, special) in enc.special_mask.iter().enumerate() {
        if special[..enc.lengths[r]].iter().all(|&s| s) {
            let (pair, side, word) = if r < c {
                (&chunk[r], "Swahili", &chunk[r].swahili)
            } else {
                (&chunk[r - c], "English", &chunk[r - c].english)
            };
            return Err(Error::Pairs {
                source_name: "word pairs".into(),
                line: pair.line,
                reason: format!(
                    "the {side} word {word:?} is made only of special tokens: it has nothing \
                     to pool as a word; remove the line"
                ),
            });
        }
    }
    Ok(())
}

/// Every real (attended) token's hidden state in `h` (`[texts, s, d]`) is
/// finite, or an error naming the hidden-state index, the text and the
/// token: a NaN or an infinity in a state would otherwise turn into a NaN
/// cosine, a `null` in the JSON and a meaningless ranking.
fn check_finite_states(
    h: &[f32],
    attention: &[Vec<u32>],
    texts: &[&str],
    layer: usize,
    s: usize,
    d: usize,
) -> Result<()> {
    for (r, row) in attention.iter().enumerate() {
        for (t, _) in row.iter().enumerate().filter(|&(_, &m)| m != 0) {
            let v = &h[(r * s + t) * d..(r * s + t + 1) * d];
            if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
                return Err(Error::invalid(
                    "pair cosines",
                    format!(
                        "hidden state {layer} of {:?} (token {t}) holds {bad}: the model's \
                         weights, norms or adapter hold a NaN or an infinity, or a value \
                         overflowed the compute dtype (try --dtype f32)",
                        texts[r]
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// How to load a model directory.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// Compute dtype (f32, bf16 or f16).
    pub dtype: CDType,
    /// Quantize the projections to NF4 while loading (bitsandbytes'
    /// defaults: blocksize 64, no double quantization), as
    /// `load_in_4bit` does.
    pub quantize: bool,
    /// Run the model on CUDA device 0 (needs the `candle-cuda` feature and
    /// a GPU).
    pub cuda: bool,
    /// Whether a BOS is prepended to each word (see [`BosMode`]).
    pub bos: BosMode,
    /// The most tokens a word may encode to
    /// ([`LlamaTokenizer::with_max_tokens`]).
    pub max_word_tokens: usize,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            dtype: CDType::F32,
            quantize: false,
            cuda: false,
            bos: BosMode::Auto,
            max_word_tokens: crate::model::tokenizer::DEFAULT_MAX_WORD_TOKENS,
        }
    }
}

/// Load the model and tokenizer in `dir` (a directory, a GGUF file — see
/// [`crate::model::gguf::load`] — or a hub id `org/name[@revision]` in the
/// local Hugging Face cache, see [`crate::model::resolve_model_path`]), with
/// only the first `num_layers` blocks when given (enough for hidden states
/// up to that index). Config keys that were not used are in the model's
/// [`LlamaConfig::ignored_keys`]; the tokenizer handles BOS as
/// [`ModelOptions::bos`] says ([`LlamaTokenizer::bos`] tells what that came
/// to).
///
/// # Errors
/// [`Error::NoCudaDevice`] when CUDA is asked for and cannot be used; as
/// [`crate::model::resolve_model_path`], [`Llama::load`],
/// [`LlamaTokenizer::from_dir`] and [`LlamaTokenizer::with_bos`], or for a
/// GGUF file as [`crate::model::gguf::load`].
pub fn load_model(
    dir: &Path,
    opts: &ModelOptions,
    num_layers: Option<usize>,
) -> Result<(Llama, LlamaTokenizer)> {
    let resolved = crate::model::resolve_model_path(dir)?;
    let dir = resolved.path.as_path();
    let device = candle_device(opts.cuda.then_some(0))?;
    let load = |num_layers| LoadOptions {
        dtype: opts.dtype,
        device: device.clone(),
        quantize: opts.quantize.then(QuantizeOptions::default),
        num_layers,
    };
    let (model, tok) = if crate::model::gguf::is_gguf(dir) {
        crate::model::gguf::load(dir, &load(num_layers))?
    } else {
        let config = LlamaConfig::from_file(dir.join("config.json"))?;
        let tok = LlamaTokenizer::from_dir(dir, Some(&config))?;
        let num_layers = num_layers.map(|n| n.min(config.num_hidden_layers));
        (Llama::load(dir, &load(num_layers))?, tok)
    };
    Ok((
        model,
        tok.with_bos(opts.bos)?
            .with_max_tokens(opts.max_word_tokens),
    ))
}

/// The number of blocks that must be loaded to apply the adapter in
/// `adapter_dir` (all of them unless its config names
/// `layers_to_transform`), or `None` for all.
///
/// # Errors
/// As [`crate::model::LoraConfig::from_file`].
pub fn adapter_blocks(adapter_dir: &Path) -> Result<Option<usize>> {
    let cfg =
        crate::model::LoraConfig::from_file(adapter_dir.join(crate::model::lora::CONFIG_FILE))?;
    Ok(cfg
        .layers
        .and_then(|l| l.iter().copied().max())
        .map(|m| m + 1))
}
