//! `tli scan`: alignment of word pairs at every layer, under one or both
//! pooling rules.
//!
//! A layer's alignment is the mean over pairs of the cosine of the Swahili
//! and English embeddings (see [`super::embed`]); the report keeps every
//! pair's cosine, in input order, so any other statistic can be computed
//! from the JSON.
//!
//! JSON (stable; fields may be added):
//!
//! ```text
//! {"pooling": "words"|"all"|"both",
//!  "layers": [{"index": i, "pooling": "words"|"all", "mean": m, "sd": s,
//!              "cosines": [per pair, input order],
//!              "matching_mean", "nonmatching_mean", "margin",
//!              "top1", "top5", "mrr", "top1_en_sw", "top5_en_sw",
//!              "mrr_en_sw"}, ...],
//!  "pairs": [[sw, en], ...], "device": "cpu"|"sim"|"cuda",
//!  "bos": {"mode": "auto"|"always"|"never", "tokenizer_adds_bos", "prepended",
//!          "token", "id", "word_at_position_0", "note"}}
//! ```
//!
//! `layers` is ordered by index, and within an index `words` before `all`.
//! `bos` is the tokenizer's [`BosOutcome`]: what its BOS mode came to
//! (`token`, `id` and `note` may be `null`).
//! `sd` is the sample standard deviation (`null` for a single pair).
//!
//! The specificity fields describe the cosine matrix of all scanned pairs,
//! `C[i][j] = cos(swahili_i, english_j)`, at that layer and pooling
//! (definitions in [`super::specificity`](mod@super::specificity)):
//! `matching_mean` is the mean of its diagonal (`mean` up to f32 rounding),
//! `nonmatching_mean` the mean of the off-diagonal (`null` for one pair),
//! `margin` their difference; `top1`, `top5`, `mrr` rank each Swahili word's
//! translation among all the English words, the `_en_sw` fields the reverse,
//! ties counting against the translation. A high `mean` with a margin near 0
//! means every word is close to every other word there, not that the
//! translations align.
//!
//! Memory: the matrices need every pair's pooled embeddings, and a layer's
//! embeddings are complete only after the last chunk of pairs has run
//! through the model (all layers come out of the same forward passes), so
//! the scan holds `2 · n · dim` f32 per (layer, pooling) until then:
//! `8 · n · dim · layers · poolings` bytes, 1.35 GB for 623 pairs on
//! Llama-3-8B (width 4096, 33 indices, both poolings). Each set of vectors
//! is released as soon as its matrix is reduced; the `n × n` matrix itself
//! exists for one (layer, pooling) at a time. Scan fewer layers or one
//! pooling to lower the peak.

use serde::Serialize;

use super::embed::{Pooling, pair_embeddings};
use super::specificity::Specificity;
use super::stats::{mean, sd};
use crate::model::{BosOutcome, Llama, LlamaTokenizer};
use crate::pairs::Pair;
use crate::{Device, Error, Result};

/// Which pooling rules a scan reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingChoice {
    /// One rule.
    One(Pooling),
    /// Both, side by side (`words` then `all`).
    Both,
}

impl PoolingChoice {
    /// The rules, in report order.
    pub fn rules(self) -> Vec<Pooling> {
        match self {
            PoolingChoice::One(p) => vec![p],
            PoolingChoice::Both => vec![Pooling::Words, Pooling::All],
        }
    }

    /// `"words"`, `"all"` or `"both"`.
    pub fn name(self) -> &'static str {
        match self {
            PoolingChoice::One(p) => p.name(),
            PoolingChoice::Both => "both",
        }
    }
}

impl std::str::FromStr for PoolingChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if s.trim().eq_ignore_ascii_case("both") {
            Ok(PoolingChoice::Both)
        } else {
            s.parse::<Pooling>().map(PoolingChoice::One).map_err(|_| {
                Error::invalid(
                    "pooling",
                    format!("unknown pooling {s:?} (expected words, all or both)"),
                )
            })
        }
    }
}

/// Options of [`scan`].
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// Hidden-state indices to scan; `None` for every one (`0..=L`).
    pub layers: Option<Vec<usize>>,
    /// Pooling rule(s).
    pub pooling: PoolingChoice,
    /// Where the pooling and cosine kernels run.
    pub device: Device,
}

impl Default for ScanOptions {
    fn default() -> Self {
        Self {
            layers: None,
            pooling: PoolingChoice::Both,
            device: Device::Cpu,
        }
    }
}

/// One layer under one pooling rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerAlignment {
    /// Hidden-state index.
    pub index: usize,
    /// Pooling rule.
    pub pooling: Pooling,
    /// Mean cosine over pairs.
    pub mean: f64,
    /// Sample standard deviation of the cosines (NaN, `null` in JSON, for
    /// one pair).
    pub sd: f64,
    /// Each pair's cosine, in input order.
    pub cosines: Vec<f32>,
    /// Specificity of the cosine matrix of all pairs at this layer and
    /// pooling (flattened into the entry: `nonmatching_mean`, `margin`,
    /// `top1`, …).
    #[serde(flatten)]
    pub specificity: Specificity,
}

/// What [`scan`] measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScanReport {
    /// `"words"`, `"all"` or `"both"`.
    pub pooling: &'static str,
    /// Per layer and pooling rule (by index, `words` first).
    pub layers: Vec<LayerAlignment>,
    /// The pairs, `[swahili, english]`, in input order.
    pub pairs: Vec<(String, String)>,
    /// The device the pooling and cosine kernels ran on.
    pub device: String,
    /// How BOS was handled ([`LlamaTokenizer::bos`]).
    pub bos: BosOutcome,
}

/// Scan `pairs` through `model` (with whatever adapters it carries).
///
/// # Errors
/// [`Error::InvalidArgument`] for an empty or repeated layer list or a layer
/// beyond the model; as [`pair_embeddings`] and the cosine-matrix op.
pub fn scan(
    model: &Llama,
    tok: &LlamaTokenizer,
    pairs: &[Pair],
    opts: &ScanOptions,
) -> Result<ScanReport> {
    let last = model.config.num_hidden_layers;
    let mut layers = opts.layers.clone().unwrap_or_else(|| (0..=last).collect());
    if layers.is_empty() {
        return Err(Error::invalid("scan", "no layers asked for"));
    }
    layers.sort_unstable();
    if let Some(w) = layers.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::invalid(
            "scan",
            format!("layer {} asked for twice", w[0]),
        ));
    }
    let rules = opts.pooling.rules();
    let emb = pair_embeddings(model, tok, pairs, &layers, &rules, opts.device)?;
    let mut out = Vec::with_capacity(layers.len() * rules.len());
    for (per_layer, &index) in emb.into_iter().zip(&layers) {
        for (e, &pooling) in per_layer.into_iter().zip(&rules) {
            let specificity = e.specificity(opts.device)?;
            let c64: Vec<f64> = e.cos.iter().map(|&v| f64::from(v)).collect();
            // `e` (its pooled vectors) is dropped here.
            out.push(LayerAlignment {
                index,
                pooling,
                mean: mean(&c64),
                sd: sd(&c64),
                cosines: e.cos,
                specificity,
            });
        }
    }
    Ok(ScanReport {
        pooling: opts.pooling.name(),
        layers: out,
        pairs: pairs
            .iter()
            .map(|p| (p.swahili.clone(), p.english.clone()))
            .collect(),
        device: opts.device.to_string(),
        bos: tok.bos().clone(),
    })
}

impl ScanReport {
    /// The report as pretty JSON.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if serialisation fails (it does not for
    /// these types).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| Error::invalid("scan json", e.to_string()))
    }

    /// The pooling rules present, in order.
    pub fn rules(&self) -> Vec<Pooling> {
        let mut r: Vec<Pooling> = self.layers.iter().map(|l| l.pooling).collect();
        r.sort_unstable();
        r.dedup();
        r
    }

    /// The entry for `index` under `pooling`.
    pub fn get(&self, index: usize, pooling: Pooling) -> Option<&LayerAlignment> {
        self.layers
            .iter()
            .find(|l| l.index == index && l.pooling == pooling)
    }

    /// A terminal table: one row per layer; per pooling rule side by side
    /// `mean (sd)` of the pair cosines, the margin (matching minus
    /// non-matching mean cosine) and the top-1 retrieval accuracy
    /// (Swahili → English).
    pub fn table(&self) -> String {
        let rules = self.rules();
        let mut indices: Vec<usize> = self.layers.iter().map(|l| l.index).collect();
        indices.dedup();
        let mut s = format!("{:>5}", "layer");
        for r in &rules {
            s.push_str(&format!(
                "  {:>17}  {:>12}  {:>10}",
                format!("{} mean (sd)", r.name()),
                format!("{} margin", r.name()),
                format!("{} top1", r.name())
            ));
        }
        s.push('\n');
        for i in indices {
            s.push_str(&format!("{i:>5}"));
            for &r in &rules {
                match self.get(i, r) {
                    Some(l) => s.push_str(&format!(
                        "  {:>8.4} ({:>6.4})  {:>12.4}  {:>10.3}",
                        l.mean, l.sd, l.specificity.margin, l.specificity.top1
                    )),
                    None => s.push_str(&format!("  {:>17}  {:>12}  {:>10}", "-", "-", "-")),
                }
            }
            s.push('\n');
        }
        s
    }
}
