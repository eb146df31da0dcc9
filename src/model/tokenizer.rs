//! `tokenizer.json` through the `tokenizers` crate, with the special tokens
//! the tokenizer files declare and a per-token "special" mask for pooling.
//!
//! * BOS: the tokenizer's post-processor adds what it adds; on top of that
//!   a [`BosMode`] says whether a BOS is prepended ([`LlamaTokenizer::with_bos`],
//!   default [`BosMode::Auto`]: prepend one when the post-processor adds
//!   none). Without a BOS a word's first token sits at position 0 and
//!   becomes the attention sink; [`BosOutcome`] records what was decided.
//! * Special tokens: `bos_token`, `eos_token`, `pad_token` of
//!   `tokenizer_config.json` (or `special_tokens_map.json`), strings or
//!   `{"content": ...}` objects; when absent, the ids of `config.json`.
//!   Without a pad token, padding uses EOS (as the TLI experiments do).
//! * A token is *special* when the tokenizer marks it so (post-processor
//!   tokens, added tokens with `special: true`), or it is BOS, EOS or
//!   padding (and a prepended BOS is special too). Word-token pooling
//!   keeps only the others.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{Device as CDevice, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result};

/// A tokenizer with its special tokens resolved.
#[derive(Debug, Clone)]
pub struct LlamaTokenizer {
    inner: tokenizers::Tokenizer,
    label: PathBuf,
    /// BOS token id, when the tokenizer has one.
    pub bos_id: Option<u32>,
    /// EOS token id, when the tokenizer has one.
    pub eos_id: Option<u32>,
    /// Padding id (the pad token, else EOS).
    pub pad_id: u32,
    special_ids: HashSet<u32>,
    /// `bos_token_id` of `config.json` (the BOS a [`BosMode`] prepends).
    config_bos: Option<u32>,
    /// The id [`LlamaTokenizer::encode_batch`] prepends to a text whose
    /// encoding does not already start with it.
    prepend: Option<u32>,
    bos: BosOutcome,
    /// The most tokens one text may encode to ([`Self::with_max_tokens`]).
    max_tokens: usize,
}

/// The default most tokens a text (a word or short phrase) may encode to:
/// far above any word (the shipped lists top out near 10 tokens) and far
/// below any context length, so a runaway line (a 10,000-character "word")
/// is an error before a batch is padded to its length.
pub const DEFAULT_MAX_WORD_TOKENS: usize = 128;

/// Whether a BOS token is prepended to each encoded text, on top of what
/// the tokenizer's post-processor adds.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum BosMode {
    /// Prepend the BOS when the tokenizer's post-processor adds none and a
    /// BOS token is known; otherwise the tokenizer as is (with a note when
    /// no BOS token is known).
    #[default]
    Auto,
    /// Prepend the BOS to every text that does not already start with it;
    /// an error when no BOS token is known.
    Always,
    /// The tokenizer as is (the behaviour before BOS modes existed).
    Never,
}

impl BosMode {
    /// `"auto"`, `"always"` or `"never"`.
    pub fn name(self) -> &'static str {
        match self {
            BosMode::Auto => "auto",
            BosMode::Always => "always",
            BosMode::Never => "never",
        }
    }
}

impl fmt::Display for BosMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BosMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(BosMode::Auto),
            "always" => Ok(BosMode::Always),
            "never" => Ok(BosMode::Never),
            other => Err(Error::invalid(
                "bos",
                format!("unknown BOS mode {other:?} (expected auto, always or never)"),
            )),
        }
    }
}

/// What a [`BosMode`] came to on a tokenizer: recorded in scan and eval
/// reports and printed by the CLI ([`fmt::Display`] gives the one-line
/// summary, [`BosOutcome::sink_warning`] the attention-sink warning).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BosOutcome {
    /// The mode asked for.
    pub mode: BosMode,
    /// Whether the tokenizer's own post-processor puts the BOS first (a
    /// probe text encoded with special tokens starts with [`Self::id`]).
    pub tokenizer_adds_bos: bool,
    /// Whether [`Self::id`] is prepended to every text that does not
    /// already start with it.
    pub prepended: bool,
    /// The BOS token's text, when a BOS token is known.
    pub token: Option<String>,
    /// The BOS id: `bos_token_id` of `config.json`, else the tokenizer
    /// files' `bos_token`; `None` when neither names one.
    pub id: Option<u32>,
    /// Whether a word's first token is the first token of its encoding
    /// (nothing special precedes it): that token is then the attention
    /// sink, and its hidden state dominates pooled similarities.
    pub word_at_position_0: bool,
    /// Why the mode did not do what it usually does (`auto` without a
    /// usable BOS token), when it did not.
    pub note: Option<String>,
}

impl BosOutcome {
    /// The warning to show when a word's first token is the attention sink
    /// ([`Self::word_at_position_0`]); `None` otherwise.
    pub fn sink_warning(&self) -> Option<String> {
        if !self.word_at_position_0 {
            return None;
        }
        let fix = match (self.mode, &self.token, self.id) {
            (BosMode::Never, Some(t), Some(id)) => {
                format!("; --bos auto prepends {t} (id {id})")
            }
            _ => String::new(),
        };
        Some(format!(
            "warning: nothing precedes a word's first token, so it sits at position 0 and is \
             the attention sink: its hidden state dominates pooled similarities (on a \
             pretrained model every pair reads near 1 from the early layers on, and \
             \"words\" like \"all\"){fix}"
        ))
    }
}

impl fmt::Display for BosOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tok = match (&self.token, self.id) {
            (Some(t), Some(id)) => format!("{t} (id {id})"),
            (None, Some(id)) => format!("id {id}"),
            _ => "BOS".to_string(),
        };
        match (self.mode, self.tokenizer_adds_bos, self.prepended) {
            (BosMode::Never, true, _) => write!(
                f,
                "--bos never: the tokenizer as is (it adds BOS {tok} itself)"
            ),
            (BosMode::Never, false, _) => {
                write!(f, "--bos never: the tokenizer as is, which adds no BOS")
            }
            (_, true, _) => write!(f, "tokenizer adds BOS {tok} itself: nothing prepended"),
            (BosMode::Auto, false, true) => write!(
                f,
                "tokenizer adds no BOS: prepending {tok}; --bos never to disable"
            ),
            (BosMode::Always, false, true) => {
                write!(f, "tokenizer adds no BOS: prepending {tok} (--bos always)")
            }
            (_, false, false) => write!(
                f,
                "tokenizer adds no BOS and none is prepended{}",
                self.note
                    .as_ref()
                    .map(|n| format!(": {n}"))
                    .unwrap_or_default()
            ),
        }
    }
}

/// The text whose encoding shows whether the post-processor adds a BOS.
const PROBE: &str = "a";

/// A right-padded batch of encoded texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedBatch {
    /// Token ids, every row padded to the longest with the pad id.
    pub ids: Vec<Vec<u32>>,
    /// 1 for a token, 0 for padding.
    pub attention_mask: Vec<Vec<u32>>,
    /// True for BOS/EOS/padding and every other special token.
    pub special_mask: Vec<Vec<bool>>,
    /// Unpadded length of each row.
    pub lengths: Vec<usize>,
}

impl EncodedBatch {
    /// `(input_ids, attention_mask)` as `[batch, seq]` u32 tensors.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty batch; [`Error::Candle`] if the
    /// device cannot hold them.
    pub fn tensors(&self, device: &CDevice) -> Result<(Tensor, Tensor)> {
        let b = self.ids.len();
        let s = self.ids.first().map_or(0, Vec::len);
        if b == 0 || s == 0 {
            return Err(Error::invalid("encode", "empty batch"));
        }
        let flat = |rows: &[Vec<u32>]| rows.iter().flatten().copied().collect::<Vec<u32>>();
        let ids =
            Tensor::from_vec(flat(&self.ids), (b, s), device).map_err(Error::candle("encode"))?;
        let mask = Tensor::from_vec(flat(&self.attention_mask), (b, s), device)
            .map_err(Error::candle("encode"))?;
        Ok((ids, mask))
    }

    /// The pooling mask of word tokens (`attention_mask` and not special), as
    /// 0/1 per token.
    pub fn word_mask(&self) -> Vec<Vec<u32>> {
        self.attention_mask
            .iter()
            .zip(&self.special_mask)
            .map(|(a, s)| {
                a.iter()
                    .zip(s)
                    .map(|(&a, &s)| u32::from(a == 1 && !s))
                    .collect()
            })
            .collect()
    }
}

/// The text of a special-token entry: `"<s>"` or `{"content": "<s>", ...}`.
fn token_text(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

/// Special-token names declared in the JSON files of a tokenizer directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `bos_token`.
    pub bos: Option<String>,
    /// `eos_token`.
    pub eos: Option<String>,
    /// `pad_token`.
    pub pad: Option<String>,
}

impl SpecialTokens {
    /// Read `tokenizer_config.json`, then `special_tokens_map.json` for what
    /// it lacks; missing files give nothing.
    ///
    /// # Errors
    /// [`Error::Io`] for an unreadable file; [`Error::Format`] for invalid
    /// JSON or a token entry that is neither a string nor an object with a
    /// `content` string.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut out = Self::default();
        for file in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(file);
            if !path.is_file() {
                continue;
            }
            let text = crate::io::read_text(&path)?;
            let json: Value = serde_json::from_str(&text)
                .map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))?;
            for (key, slot) in [
                ("bos_token", &mut out.bos),
                ("eos_token", &mut out.eos),
                ("pad_token", &mut out.pad),
            ] {
                match json.get(key) {
                    None | Some(Value::Null) => {}
                    Some(v) => {
                        let t = token_text(v).ok_or_else(|| {
                            Error::format(
                                &path,
                                format!("{key} is {v}, expected a string or {{\"content\": ...}}"),
                            )
                        })?;
                        if slot.is_none() {
                            *slot = Some(t.to_string());
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

impl LlamaTokenizer {
    /// Load `tokenizer.json` from `dir`, with special tokens from
    /// [`SpecialTokens::from_dir`], falling back to the ids in `config`
    /// (`bos_token_id`, `eos_token_id`, `pad_token_id`).
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::Format`] naming the file when it is missing
    /// or not a tokenizer; as [`LlamaTokenizer::new`].
    pub fn from_dir(dir: impl AsRef<Path>, config: Option<&super::LlamaConfig>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join("tokenizer.json");
        let bytes = crate::io::read_input(&path, crate::io::max_text_bytes())?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::format(&path, format!("not a tokenizer.json: {e}")))?;
        let special = SpecialTokens::from_dir(dir)?;
        let ids = config.map(|c| {
            (
                c.bos_token_id,
                c.eos_token_ids.first().copied(),
                c.pad_token_id,
            )
        });
        Self::new(inner, &special, ids.unwrap_or_default(), path)
    }

    /// Wrap a tokenizer. Token names in `special` must be in its vocabulary;
    /// `fallback_ids` (BOS, EOS, pad) are used where `special` names none,
    /// except that the BOS a [`BosMode`] prepends is `fallback_ids.0` (the
    /// config's `bos_token_id`) when given. The tokenizer starts in
    /// [`BosMode::Auto`] ([`LlamaTokenizer::with_bos`] changes it).
    ///
    /// # Errors
    /// [`Error::Format`] (naming `label`) when a named special token is not
    /// in the vocabulary, there is neither a pad nor an EOS token, or the
    /// BOS probe fails to encode.
    pub fn new(
        inner: tokenizers::Tokenizer,
        special: &SpecialTokens,
        fallback_ids: (Option<u32>, Option<u32>, Option<u32>),
        label: impl Into<PathBuf>,
    ) -> Result<Self> {
        let label = label.into();
        let lookup = |name: &Option<String>, what: &str| -> Result<Option<u32>> {
            name.as_ref()
                .map(|t| {
                    inner.token_to_id(t).ok_or_else(|| {
                        Error::format(&label, format!("{what} {t:?} is not in the vocabulary"))
                    })
                })
                .transpose()
        };
        let bos_id = lookup(&special.bos, "bos_token")?.or(fallback_ids.0);
        let eos_id = lookup(&special.eos, "eos_token")?.or(fallback_ids.1);
        let pad_id = lookup(&special.pad, "pad_token")?
            .or(fallback_ids.2)
            .or(eos_id)
            .ok_or_else(|| Error::format(&label, "no pad token and no EOS token to pad with"))?;
        let mut special_ids: HashSet<u32> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        special_ids.extend(bos_id);
        special_ids.extend(eos_id);
        special_ids.insert(pad_id);
        let tok = Self {
            inner,
            label,
            bos_id,
            eos_id,
            pad_id,
            special_ids,
            config_bos: fallback_ids.0,
            prepend: None,
            bos: BosOutcome {
                mode: BosMode::Never,
                tokenizer_adds_bos: false,
                prepended: false,
                token: None,
                id: None,
                word_at_position_0: false,
                note: None,
            },
            max_tokens: DEFAULT_MAX_WORD_TOKENS,
        };
        tok.with_bos(BosMode::Auto)
    }

    /// This tokenizer with BOS handled by `mode` (see [`BosMode`]; a new
    /// tokenizer has [`BosMode::Auto`]).
    ///
    /// The BOS is `bos_token_id` of `config.json` when given, else the
    /// `bos_token` of the tokenizer files. The tokenizer adds it itself
    /// when a probe text encoded with special tokens starts with it. A
    /// prepended BOS is special: excluded from word-token pooling, included
    /// in all-token pooling, and a text whose encoding already starts with
    /// it gets no second one.
    ///
    /// # Errors
    /// [`Error::Format`] naming the tokenizer when `mode` is
    /// [`BosMode::Always`] and no BOS token is known or its id is not in
    /// the vocabulary (where [`BosMode::Auto`] falls back to the tokenizer
    /// as is, with a [`BosOutcome::note`]), or when the probe fails to
    /// encode.
    pub fn with_bos(mut self, mode: BosMode) -> Result<Self> {
        let id = self.config_bos.or(self.bos_id);
        let token = id.and_then(|i| self.inner.id_to_token(i));
        let probe = self.inner.encode(PROBE, true).map_err(|e| {
            Error::format(&self.label, format!("encoding the probe {PROBE:?}: {e}"))
        })?;
        let adds = id.is_some() && probe.get_ids().first().copied() == id;
        let missing = "no BOS token is known (config.json has no bos_token_id and the \
                       tokenizer files name no bos_token)"
            .to_string();
        let unknown = |i: u32| {
            format!(
                "the BOS id {i} (bos_token_id) is not in the vocabulary of {} tokens",
                self.vocab_size()
            )
        };
        let (prepend, note) = match (mode, adds, id) {
            (BosMode::Never, ..) | (_, true, _) => (None, None),
            (BosMode::Auto, false, None) => (None, Some(missing)),
            (BosMode::Auto, false, Some(i)) if token.is_none() => (None, Some(unknown(i))),
            (BosMode::Always, false, None) => {
                return Err(Error::format(
                    &self.label,
                    format!("--bos always: {missing}; use --bos auto or never"),
                ));
            }
            (BosMode::Always, false, Some(i)) if token.is_none() => {
                return Err(Error::format(
                    &self.label,
                    format!("--bos always: {}", unknown(i)),
                ));
            }
            (_, false, Some(i)) => (Some(i), None),
        };
        // What comes first in an encoding: the prepended BOS, else the
        // tokenizer's first token (a word token unless it is special).
        let first = probe
            .get_ids()
            .first()
            .zip(probe.get_special_tokens_mask().first());
        let word_at_position_0 = match (prepend, first) {
            (Some(b), Some((&f, _))) if f != b => false,
            (Some(_), None) => false,
            (_, Some((&f, &m))) => m != 1 && !self.is_special(f),
            (None, None) => true,
        };
        self.prepend = prepend;
        if let Some(b) = prepend {
            self.special_ids.insert(b);
        }
        self.bos = BosOutcome {
            mode,
            tokenizer_adds_bos: adds,
            prepended: prepend.is_some(),
            token,
            id,
            word_at_position_0,
            note,
        };
        Ok(self)
    }

    /// What the tokenizer's [`BosMode`] came to.
    pub fn bos(&self) -> &BosOutcome {
        &self.bos
    }

    /// The same tokenizer with at most `n` tokens per text
    /// ([`DEFAULT_MAX_WORD_TOKENS`] unless set): [`Self::encode_batch`]
    /// refuses a longer text, naming it, before anything is padded to its
    /// length.
    pub fn with_max_tokens(mut self, n: usize) -> Self {
        self.max_tokens = n.max(1);
        self
    }

    /// The most tokens one text may encode to.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether `id` counts as special for pooling.
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// Encode texts (special tokens added by the post-processor), right-pad
    /// them to the longest, and mark special tokens.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty batch or a text that encodes
    /// to no tokens; [`Error::Format`] if the tokenizer fails.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<EncodedBatch> {
        if texts.is_empty() {
            return Err(Error::invalid("encode", "no texts"));
        }
        let rows = texts
            .iter()
            .enumerate()
            .map(|(i, text)| self.encode_one(i, text))
            .collect::<Result<Vec<_>>>()?;
        let s = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let mut out = EncodedBatch {
            ids: Vec::new(),
            attention_mask: Vec::new(),
            special_mask: Vec::new(),
            lengths: Vec::new(),
        };
        for (mut ids, mut special) in rows {
            let n = ids.len();
            let mut mask = vec![1u32; n];
            ids.resize(s, self.pad_id);
            special.resize(s, true);
            mask.resize(s, 0);
            out.ids.push(ids);
            out.attention_mask.push(mask);
            out.special_mask.push(special);
            out.lengths.push(n);
        }
        Ok(out)
    }

    /// Text `i` of a batch: its ids (with the BOS prepended when the mode
    /// says so) and special mask.
    fn encode_one(&self, i: usize, text: &str) -> Result<(Vec<u32>, Vec<bool>)> {
        let enc = self.inner.encode(text, true).map_err(|e| {
            Error::format(&self.label, format!("encoding text {i} ({text:?}): {e}"))
        })?;
        if enc.get_ids().is_empty() {
            return Err(Error::invalid(
                "encode",
                format!("text {i} ({text:?}) encodes to no tokens"),
            ));
        }
        let mut ids = Vec::with_capacity(enc.get_ids().len() + 1);
        let mut special = Vec::with_capacity(ids.capacity());
        if let Some(b) = self.prepend
            && enc.get_ids().first() != Some(&b)
        {
            ids.push(b);
            special.push(true);
        }
        ids.extend_from_slice(enc.get_ids());
        if ids.len() > self.max_tokens {
            let preview: String = text.chars().take(40).collect();
            return Err(Error::invalid(
                "encode",
                format!(
                    "text {i} ({preview:?}{}, {} characters) is {} tokens, more than the {} \
                     a word may have (--max-word-tokens raises the limit)",
                    if text.chars().count() > 40 { "…" } else { "" },
                    text.chars().count(),
                    ids.len(),
                    self.max_tokens
                ),
            ));
        }
        special.extend(
            enc.get_ids()
                .iter()
                .zip(enc.get_special_tokens_mask())
                .map(|(&id, &m)| m == 1 || self.is_special(id)),
        );
        Ok((ids, special))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::processors::template::TemplateProcessing;

    /// A word-level tokenizer: `<s>` 0, `</s>` 1, `[UNK]` 2, `hello` 3,
    /// `world` 4, `a` 5; with a post-processor that puts `<s>` first when
    /// `adds_bos`.
    fn word_level(adds_bos: bool) -> tokenizers::Tokenizer {
        let json = r#"{
          "version": "1.0", "truncation": null, "padding": null,
          "added_tokens": [
            {"id": 0, "content": "<s>", "single_word": false, "lstrip": false,
             "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "</s>", "single_word": false, "lstrip": false,
             "rstrip": false, "normalized": false, "special": true}],
          "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
          "post_processor": null, "decoder": null,
          "model": {"type": "WordLevel", "unk_token": "[UNK]",
                    "vocab": {"<s>": 0, "</s>": 1, "[UNK]": 2, "hello": 3,
                              "world": 4, "a": 5}}}"#;
        let mut t = tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap();
        if adds_bos {
            let post = TemplateProcessing::builder()
                .try_single("<s> $A")
                .unwrap()
                .special_tokens(vec![("<s>", 0)])
                .build()
                .unwrap();
            t.with_post_processor(Some(post));
        }
        t
    }

    /// `bos` names the BOS in the tokenizer files; `config_bos` is
    /// `bos_token_id` of config.json.
    fn tok(adds_bos: bool, bos: Option<&str>, config_bos: Option<u32>) -> LlamaTokenizer {
        let special = SpecialTokens {
            bos: bos.map(String::from),
            eos: Some("</s>".into()),
            pad: None,
        };
        LlamaTokenizer::new(
            word_level(adds_bos),
            &special,
            (config_bos, None, None),
            "t.json",
        )
        .unwrap()
    }

    fn ids(t: &LlamaTokenizer, texts: &[&str]) -> EncodedBatch {
        t.encode_batch(texts).unwrap()
    }

    #[test]
    fn a_tokenizer_that_adds_bos_is_left_alone_by_every_mode() {
        for mode in [BosMode::Auto, BosMode::Always, BosMode::Never] {
            let t = tok(true, None, Some(0)).with_bos(mode).unwrap();
            let b = t.bos();
            assert_eq!(b.mode, mode);
            assert!(b.tokenizer_adds_bos, "{mode}");
            assert!(!b.prepended, "{mode}");
            assert!(!b.word_at_position_0, "{mode}");
            assert_eq!((b.token.as_deref(), b.id), (Some("<s>"), Some(0)));
            assert_eq!(b.sink_warning(), None);
            // One BOS, never two; it is special.
            let e = ids(&t, &["hello world", "a"]);
            assert_eq!(e.ids, [vec![0, 3, 4], vec![0, 5, 1]], "{mode}");
            assert_eq!(e.special_mask[0], [true, false, false]);
            assert_eq!(e.word_mask(), [vec![0, 1, 1], vec![0, 1, 0]]);
            assert_eq!(e.attention_mask, [vec![1, 1, 1], vec![1, 1, 0]]);
            let line = b.to_string();
            match mode {
                BosMode::Never => assert!(line.contains("adds BOS <s> (id 0) itself"), "{line}"),
                _ => assert_eq!(
                    line,
                    "tokenizer adds BOS <s> (id 0) itself: nothing prepended"
                ),
            }
        }
    }

    #[test]
    fn a_tokenizer_without_bos_gets_one_under_auto_and_always() {
        // A new tokenizer is in auto mode.
        let t = tok(false, Some("<s>"), Some(0));
        assert_eq!(t.bos().mode, BosMode::Auto);
        for mode in [BosMode::Auto, BosMode::Always] {
            let t = t.clone().with_bos(mode).unwrap();
            let b = t.bos();
            assert!(!b.tokenizer_adds_bos && b.prepended, "{mode}");
            assert!(!b.word_at_position_0 && b.sink_warning().is_none());
            let e = ids(&t, &["hello world", "a"]);
            assert_eq!(e.ids, [vec![0, 3, 4], vec![0, 5, 1]], "{mode}");
            assert_eq!(e.lengths, [3, 2]);
            // BOS excluded from word pooling, included in all-token pooling.
            assert_eq!(
                e.special_mask,
                [vec![true, false, false], vec![true, false, true]]
            );
            assert_eq!(e.word_mask(), [vec![0, 1, 1], vec![0, 1, 0]]);
            assert_eq!(e.attention_mask, [vec![1, 1, 1], vec![1, 1, 0]]);
            // A text that already starts with BOS does not get a second.
            assert_eq!(ids(&t, &["<s> hello"]).ids, [vec![0, 3]]);
        }
        let auto = t.clone().with_bos(BosMode::Auto).unwrap();
        assert_eq!(
            auto.bos().to_string(),
            "tokenizer adds no BOS: prepending <s> (id 0); --bos never to disable"
        );
        let always = t.clone().with_bos(BosMode::Always).unwrap();
        assert!(always.bos().to_string().contains("(--bos always)"));

        let never = t.with_bos(BosMode::Never).unwrap();
        let b = never.bos();
        assert!(!b.tokenizer_adds_bos && !b.prepended && b.word_at_position_0);
        let e = ids(&never, &["hello world"]);
        assert_eq!(e.ids, [vec![3, 4]]);
        assert_eq!(e.word_mask(), [vec![1, 1]]);
        let w = b.sink_warning().unwrap();
        assert!(
            w.contains("is the attention sink: its hidden state dominates")
                && w.ends_with("; --bos auto prepends <s> (id 0)")
                && !w.contains("  "),
            "{w}"
        );
        // Modes switch back and forth on the same tokenizer.
        let again = never.with_bos(BosMode::Auto).unwrap();
        assert_eq!(ids(&again, &["hello world"]).ids, [vec![0, 3, 4]]);
    }

    #[test]
    fn the_config_bos_id_comes_before_the_tokenizer_files_bos_token() {
        // config.json says `</s>` (1) is BOS, the tokenizer files `<s>`.
        let t = tok(false, Some("<s>"), Some(1));
        assert_eq!(
            (t.bos().id, t.bos().token.as_deref()),
            (Some(1), Some("</s>"))
        );
        assert_eq!(ids(&t, &["hello"]).ids, [vec![1, 3]]);
        // Without bos_token_id the tokenizer files' bos_token is used.
        let t = tok(false, Some("<s>"), None);
        assert_eq!(ids(&t, &["hello"]).ids, [vec![0, 3]]);
    }

    #[test]
    fn without_a_bos_token_auto_falls_back_and_always_is_an_error() {
        let t = tok(false, None, None);
        let b = t.bos();
        assert_eq!(b.mode, BosMode::Auto);
        assert!(!b.prepended && b.word_at_position_0);
        assert_eq!((b.id, b.token.as_deref()), (None, None));
        let note = b.note.clone().unwrap();
        assert!(note.contains("no bos_token_id"), "{note}");
        let line = b.to_string();
        assert!(
            line.starts_with("tokenizer adds no BOS and none is prepended: no BOS token"),
            "{line}"
        );
        assert!(b.sink_warning().is_some());
        assert_eq!(ids(&t, &["hello world"]).ids, [vec![3, 4]]);
        let e = t.with_bos(BosMode::Always).unwrap_err().to_string();
        assert!(
            e.contains("t.json") && e.contains("--bos always") && e.contains("bos_token_id"),
            "{e}"
        );
    }

    #[test]
    fn a_bos_id_outside_the_vocabulary_falls_back_under_auto_and_fails_always() {
        let t = tok(false, None, Some(99));
        let b = t.bos();
        assert!(!b.prepended && b.word_at_position_0);
        let note = b.note.clone().unwrap();
        assert!(
            note.contains("BOS id 99") && note.contains("6 tokens"),
            "{note}"
        );
        assert!(b.to_string().contains("BOS id 99"));
        assert_eq!(ids(&t, &["hello"]).ids, [vec![3]]);
        assert!(t.clone().with_bos(BosMode::Never).is_ok());
        let e = t.with_bos(BosMode::Always).unwrap_err().to_string();
        assert!(e.contains("t.json") && e.contains("BOS id 99"), "{e}");
    }

    #[test]
    fn modes_parse_print_and_serialise_by_name() {
        for (m, s) in [
            (BosMode::Auto, "auto"),
            (BosMode::Always, "always"),
            (BosMode::Never, "never"),
        ] {
            assert_eq!(m.to_string(), s);
            assert_eq!(s.parse::<BosMode>().unwrap(), m);
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{s}\""));
            assert_eq!(
                serde_json::from_str::<BosMode>(&format!("\"{s}\"")).unwrap(),
                m
            );
        }
        let e = "sometimes".parse::<BosMode>().unwrap_err().to_string();
        assert!(
            e.contains("\"sometimes\"") && e.contains("auto, always or never"),
            "{e}"
        );
        assert_eq!(BosMode::default(), BosMode::Auto);
    }
}
