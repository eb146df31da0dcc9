//! `tli eval`: per-pair alignment before and after an adapter, with a paired
//! t-test per set, and whether the gain is specific to the translations.
//!
//! JSON (stable; fields may be added):
//!
//! ```text
//! {"layer": i, "pooling": "words"|"all",
//!  "sets": {"trained": {"n", "before_mean", "before_sd", "after_mean",
//!                       "after_sd", "change", "change_pct", "t", "df", "p",
//!                       "improved", "worsened",
//!                       "matching_mean_before", "matching_mean_after",
//!                       "nonmatching_mean_before", "nonmatching_mean_after",
//!                       "margin_before", "margin_after",
//!                       "top1_before", "top1_after", "top5_before",
//!                       "top5_after", "mrr_before", "mrr_after",
//!                       "top1_en_sw_before", "top1_en_sw_after",
//!                       "top5_en_sw_before", "top5_en_sw_after",
//!                       "mrr_en_sw_before", "mrr_en_sw_after",
//!                       "specific": true|false|null, "verdict": "...",
//!                       "before": [...], "after": [...],
//!                       "pairs": [[sw, en], ...]},
//!           "control": {...}},
//!  "bos": {"mode": "auto"|"always"|"never", "tokenizer_adds_bos", "prepended",
//!          "token", "id", "word_at_position_0", "note"}}
//! ```
//!
//! Sets appear in the order given (`trained`, then `control`). `bos` is the
//! tokenizer's [`BosOutcome`] (what its BOS mode came to). `change` is
//! `after_mean − before_mean`, `change_pct` is `100 · change / before_mean`.
//! `t`, `df`, `p` are the paired t-test of [`super::stats::paired_t_test`]
//! (`null` where undefined), taken with ties as no change. A pair
//! *improved* when its cosine after exceeds the one before by more than
//! [`super::stats::COSINE_TIE`] (1e-6, f32 rounding of a cosine), *worsened*
//! when it falls by more; the rest are ties.
//!
//! The specificity fields describe the set's cosine matrix `C[i][j] =
//! cos(swahili_i, english_j)` before and after (definitions in
//! [`super::specificity`](mod@super::specificity)): `matching_mean` is the mean
//! of its diagonal (the per-pair cosines up to f32 rounding),
//! `nonmatching_mean` the mean of the off-diagonal, `margin` their difference;
//! `top1`, `top5`, `mrr` rank each Swahili word's translation among the set's
//! English words, the `_en_sw` fields each English word's translation among the
//! Swahili words, ties counting against the translation. `specific` and
//! `verdict` are [`super::specificity::verdict`]: `false` when the pair cosines
//! rose but the margin did not grow (collapse toward a shared direction),
//! `true` when both rose, `null` when there is no gain to judge or `n = 1`
//! (where the non-matching mean and the margin are `null`). The matrix is
//! computed by the fused cosine-matrix op on the evaluation's device from the
//! pooled embeddings of the same model pass as the per-pair cosines.

use std::path::Path;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use super::embed::{Pooling, pair_cosines, pair_embeddings};
use super::specificity::{Specificity, SpecificityChange};
use super::stats::{mean, paired_t_test, sd};
use crate::model::{BosOutcome, Llama, LlamaTokenizer};
use crate::pairs::Pair;
use crate::{Device, Error, Result};

/// One set's before/after comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SetReport {
    /// Number of pairs.
    pub n: usize,
    /// Mean cosine before.
    pub before_mean: f64,
    /// Sample standard deviation before.
    pub before_sd: f64,
    /// Mean cosine after.
    pub after_mean: f64,
    /// Sample standard deviation after.
    pub after_sd: f64,
    /// `after_mean − before_mean`.
    pub change: f64,
    /// `100 · change / before_mean`.
    pub change_pct: f64,
    /// Paired t statistic.
    pub t: f64,
    /// Degrees of freedom (`n − 1`).
    pub df: usize,
    /// Two-sided p value.
    pub p: f64,
    /// Pairs whose cosine rose.
    pub improved: usize,
    /// Pairs whose cosine fell.
    pub worsened: usize,
    /// Specificity before and after and the verdict, flattened into the
    /// JSON (`nonmatching_mean_before`, …, `specific`, `verdict`).
    /// [`evaluate`] always fills it; `None` (no such fields) for a report
    /// built by [`SetReport::new`] from cosines alone.
    #[serde(flatten)]
    pub specificity: Option<SpecificityChange>,
    /// Per-pair cosines before, input order.
    pub before: Vec<f32>,
    /// Per-pair cosines after, input order.
    pub after: Vec<f32>,
    /// The pairs, `[swahili, english]`.
    pub pairs: Vec<(String, String)>,
}

impl SetReport {
    /// Summarise per-pair cosines before and after.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when the lengths of `pairs`, `before` and
    /// `after` differ; as [`paired_t_test`].
    pub fn new(pairs: &[Pair], before: Vec<f32>, after: Vec<f32>) -> Result<Self> {
        if before.len() != pairs.len() {
            return Err(Error::shape(
                "eval",
                "cosines before",
                pairs.len(),
                before.len(),
            ));
        }
        let b: Vec<f64> = before.iter().map(|&v| f64::from(v)).collect();
        let a: Vec<f64> = after.iter().map(|&v| f64::from(v)).collect();
        // Changes within f32 rounding are ties (stats::COSINE_TIE): they
        // enter the t-test as no change and count as neither improved nor
        // worsened.
        let changes: Vec<f64> = b
            .iter()
            .zip(&a)
            .map(|(&x, &y)| super::stats::cosine_change(x, y))
            .collect();
        let tied: Vec<f64> = b.iter().zip(&changes).map(|(x, d)| x + d).collect();
        let test = paired_t_test(&b, &tied)?;
        let (before_mean, after_mean) = (mean(&b), mean(&a));
        let change = after_mean - before_mean;
        Ok(Self {
            n: pairs.len(),
            before_mean,
            before_sd: sd(&b),
            after_mean,
            after_sd: sd(&a),
            change,
            change_pct: 100.0 * change / before_mean,
            t: test.t,
            df: test.df,
            p: test.p,
            improved: changes.iter().filter(|&&d| d > 0.0).count(),
            worsened: changes.iter().filter(|&&d| d < 0.0).count(),
            specificity: None,
            before,
            after,
            pairs: pairs
                .iter()
                .map(|p| (p.swahili.clone(), p.english.clone()))
                .collect(),
        })
    }

    /// [`SetReport::new`] with the specificity of the set's cosine matrix
    /// before and after, and the verdict on the change.
    ///
    /// # Errors
    /// As [`SetReport::new`]; [`Error::ShapeMismatch`] when a measurement's
    /// specificity is not of `pairs.len()` pairs.
    pub fn with_specificity(
        pairs: &[Pair],
        before: Measurement,
        after: Measurement,
    ) -> Result<Self> {
        for (what, m) in [
            ("specificity before", &before),
            ("specificity after", &after),
        ] {
            if m.specificity.n != pairs.len() {
                return Err(Error::shape("eval", what, pairs.len(), m.specificity.n));
            }
        }
        let mut r = Self::new(pairs, before.cosines, after.cosines)?;
        r.specificity = Some(SpecificityChange::new(
            r.before_mean,
            r.after_mean,
            before.specificity,
            after.specificity,
        ));
        Ok(r)
    }
}

/// One set measured once: per-pair cosines and the specificity of its
/// cosine matrix, from the same model pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// Per-pair cosines, input order.
    pub cosines: Vec<f32>,
    /// The set's [`Specificity`].
    pub specificity: Specificity,
}

/// What [`evaluate`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// Hidden-state index.
    pub layer: usize,
    /// Pooling rule.
    pub pooling: Pooling,
    /// `(name, report)` per set, in the order given.
    pub sets: Vec<(String, SetReport)>,
    /// How BOS was handled ([`LlamaTokenizer::bos`]).
    pub bos: BosOutcome,
}

struct OrderedSets<'a>(&'a [(String, SetReport)]);

impl Serialize for OrderedSets<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl Serialize for EvalReport {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("layer", &self.layer)?;
        m.serialize_entry("pooling", &self.pooling)?;
        m.serialize_entry("sets", &OrderedSets(&self.sets))?;
        m.serialize_entry("bos", &self.bos)?;
        m.end()
    }
}

/// Options of [`evaluate`].
#[derive(Debug, Clone, Copy)]
pub struct EvalOptions {
    /// Hidden-state index (the paper: 2).
    pub layer: usize,
    /// Pooling rule (the paper: words).
    pub pooling: Pooling,
    /// Where the pooling and cosine kernels run.
    pub device: Device,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            layer: 2,
            pooling: Pooling::Words,
            device: Device::Cpu,
        }
    }
}

/// Per-pair cosines of one set at one layer under one pooling rule.
///
/// # Errors
/// As [`pair_cosines`].
pub fn measure(
    model: &Llama,
    tok: &LlamaTokenizer,
    pairs: &[Pair],
    opts: &EvalOptions,
) -> Result<Vec<f32>> {
    let mut c = pair_cosines(
        model,
        tok,
        pairs,
        &[opts.layer],
        &[opts.pooling],
        opts.device,
    )?;
    Ok(c.pop().and_then(|mut v| v.pop()).unwrap_or_default())
}

/// Per-pair cosines of one set and the [`Specificity`] of its cosine
/// matrix: one model pass keeps the pooled embeddings, and the fused
/// cosine-matrix op computes the matrix on `opts.device`. The embeddings
/// (`2 · n · dim` f32) and the `n × n` matrix live only during the call.
///
/// # Errors
/// As [`pair_embeddings`] and [`super::embed::PairEmbeddings::specificity`].
pub fn measure_set(
    model: &Llama,
    tok: &LlamaTokenizer,
    pairs: &[Pair],
    opts: &EvalOptions,
) -> Result<Measurement> {
    let e = pair_embeddings(
        model,
        tok,
        pairs,
        &[opts.layer],
        &[opts.pooling],
        opts.device,
    )?
    .pop()
    .and_then(|mut v| v.pop())
    .ok_or_else(|| Error::invalid("eval", "internal: no embeddings measured"))?;
    let specificity = e.specificity(opts.device)?;
    Ok(Measurement {
        cosines: e.cos,
        specificity,
    })
}

/// Evaluate an adapter: measure every set on `model` as it is (the
/// "before"), apply the adapter with `apply` (e.g. load a PEFT directory),
/// measure again (the "after") and compare, specificity included.
///
/// # Errors
/// [`Error::InvalidArgument`] for no sets; as [`measure_set`], `apply` and
/// [`SetReport::with_specificity`].
pub fn evaluate<F>(
    model: &mut Llama,
    tok: &LlamaTokenizer,
    sets: &[(&str, &[Pair])],
    opts: &EvalOptions,
    apply: F,
) -> Result<EvalReport>
where
    F: FnOnce(&mut Llama) -> Result<()>,
{
    if sets.is_empty() {
        return Err(Error::invalid("eval", "no sets to evaluate"));
    }
    let before: Vec<Measurement> = sets
        .iter()
        .map(|(_, p)| measure_set(model, tok, p, opts))
        .collect::<Result<_>>()?;
    apply(model)?;
    let mut out = Vec::with_capacity(sets.len());
    for ((name, pairs), b) in sets.iter().zip(before) {
        let a = measure_set(model, tok, pairs, opts)?;
        out.push((name.to_string(), SetReport::with_specificity(pairs, b, a)?));
    }
    Ok(EvalReport {
        layer: opts.layer,
        pooling: opts.pooling,
        sets: out,
        bos: tok.bos().clone(),
    })
}

/// [`evaluate`] with the PEFT adapter in `adapter_dir`.
///
/// # Errors
/// As [`evaluate`] and [`crate::model::lora::load_peft`].
pub fn evaluate_adapter(
    model: &mut Llama,
    tok: &LlamaTokenizer,
    sets: &[(&str, &[Pair])],
    adapter_dir: &Path,
    opts: &EvalOptions,
) -> Result<EvalReport> {
    evaluate(model, tok, sets, opts, |m| {
        crate::model::lora::load_peft(m, adapter_dir).map(|_| ())
    })
}

/// A p value for a table: 3 significant digits, or `< 1e-300` when it
/// underflows to 0 (t beyond about 40 with hundreds of pairs).
pub fn format_p(p: f64) -> String {
    if p == 0.0 {
        "< 1e-300".to_string()
    } else {
        format!("{p:.3e}")
    }
}

impl EvalReport {
    /// The report as pretty JSON.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if serialisation fails (it does not for
    /// these types).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| Error::invalid("eval json", e.to_string()))
    }

    /// One CSV row per pair: `set,swahili,english,before,after,change`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if the CSV writer fails (it does not when
    /// writing to memory).
    pub fn to_csv(&self) -> Result<String> {
        let fail = |e: csv::Error| Error::invalid("eval csv", e.to_string());
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(["set", "swahili", "english", "before", "after", "change"])
            .map_err(fail)?;
        for (name, s) in &self.sets {
            for ((sw, en), (b, a)) in s.pairs.iter().zip(s.before.iter().zip(&s.after)) {
                w.write_record([
                    name.as_str(),
                    sw.as_str(),
                    en.as_str(),
                    &b.to_string(),
                    &a.to_string(),
                    &(f64::from(*a) - f64::from(*b)).to_string(),
                ])
                .map_err(fail)?;
            }
        }
        let bytes = w
            .into_inner()
            .map_err(|e| Error::invalid("eval csv", e.to_string()))?;
        String::from_utf8(bytes).map_err(|e| Error::invalid("eval csv", e.to_string()))
    }

    /// A terminal table: one row per set.
    pub fn table(&self) -> String {
        let mut s = format!(
            "layer {}, pooling {}\n{:<8} {:>5}  {:>16}  {:>16}  {:>9}  {:>14}  {:>9}  {:>8}  {:>8}\n",
            self.layer,
            self.pooling,
            "set",
            "n",
            "before (sd)",
            "after (sd)",
            "change",
            "paired t (df)",
            "p",
            "improved",
            "worsened"
        );
        for (name, r) in &self.sets {
            s.push_str(&format!(
                "{:<8} {:>5}  {:>7.4} ({:.4})  {:>7.4} ({:.4})  {:>+8.2}%  {:>8.2} ({:>3})  {:>9}  {:>8}  {:>8}\n",
                name,
                r.n,
                r.before_mean,
                r.before_sd,
                r.after_mean,
                r.after_sd,
                r.change_pct,
                r.t,
                r.df,
                format_p(r.p),
                r.improved,
                r.worsened
            ));
        }
        s.push_str(&self.specificity_table());
        s
    }

    /// The specificity table (one row per set, `before -> after`) and one
    /// verdict line per set; empty when no set carries specificity.
    pub fn specificity_table(&self) -> String {
        let rows: Vec<(&String, &SpecificityChange)> = self
            .sets
            .iter()
            .filter_map(|(name, r)| r.specificity.as_ref().map(|c| (name, c)))
            .collect();
        if rows.is_empty() {
            return String::new();
        }
        let cell = |b: f64, a: f64| format!("{b:.3} -> {a:.3}");
        let mut s = String::from(
            "specificity: C[i][j] = cos(Swahili i, English j) within a set; non-matching = mean \
             off-diagonal, margin = mean diagonal - non-matching;\n\
             top-1 / MRR: rank of each word's translation among the set's words (ties count \
             against it), sw->en by rows, en->sw by columns\n",
        );
        s.push_str(&format!(
            "{:<8}  {:>16}  {:>16}  {:>16}  {:>16}  {:>16}  {:>16}\n",
            "set",
            "non-matching",
            "margin",
            "top-1 sw->en",
            "MRR sw->en",
            "top-1 en->sw",
            "MRR en->sw"
        ));
        for (name, c) in &rows {
            let (b, a) = (&c.before, &c.after);
            s.push_str(&format!(
                "{:<8}  {:>16}  {:>16}  {:>16}  {:>16}  {:>16}  {:>16}\n",
                name,
                cell(b.nonmatching_mean, a.nonmatching_mean),
                cell(b.margin, a.margin),
                cell(b.top1, a.top1),
                cell(b.mrr, a.mrr),
                cell(b.top1_en_sw, a.top1_en_sw),
                cell(b.mrr_en_sw, a.mrr_en_sw),
            ));
        }
        for (name, c) in &rows {
            s.push_str(&format!("{name}: {}\n", c.verdict));
        }
        s
    }
}
