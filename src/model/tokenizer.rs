//! `tokenizer.json` through the `tokenizers` crate, with the special tokens
//! the tokenizer files declare and a per-token "special" mask for pooling.
//!
//! * BOS (or anything else) is added exactly as the tokenizer's
//!   post-processor says; nothing is prepended here.
//! * Special tokens: `bos_token`, `eos_token`, `pad_token` of
//!   `tokenizer_config.json` (or `special_tokens_map.json`), strings or
//!   `{"content": ...}` objects; when absent, the ids of `config.json`.
//!   Without a pad token, padding uses EOS (as the TLI experiments do).
//! * A token is *special* when the tokenizer marks it so (post-processor
//!   tokens, added tokens with `special: true`), or it is BOS, EOS or
//!   padding. Word-token pooling keeps only the others.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::{Device as CDevice, Tensor};
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
}

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
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
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
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
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
    /// `fallback_ids` (BOS, EOS, pad) are used where `special` names none.
    ///
    /// # Errors
    /// [`Error::Format`] (naming `label`) when a named special token is not
    /// in the vocabulary, or there is neither a pad nor an EOS token.
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
        Ok(Self {
            inner,
            label,
            bos_id,
            eos_id,
            pad_id,
            special_ids,
        })
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
        let mut rows = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let enc = self.inner.encode(*text, true).map_err(|e| {
                Error::format(&self.label, format!("encoding text {i} ({text:?}): {e}"))
            })?;
            if enc.get_ids().is_empty() {
                return Err(Error::invalid(
                    "encode",
                    format!("text {i} ({text:?}) encodes to no tokens"),
                ));
            }
            let special: Vec<bool> = enc
                .get_ids()
                .iter()
                .zip(enc.get_special_tokens_mask())
                .map(|(&id, &m)| m == 1 || self.is_special(id))
                .collect();
            rows.push((enc.get_ids().to_vec(), special));
        }
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
}
