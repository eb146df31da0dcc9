//! A deterministic tiny random Llama with a small real tokenizer, built in
//! process: for `tli demo`, tests and benches. **It is synthetic**: its
//! weights are random numbers from a seed, so its hidden states say nothing
//! about any language; it exists to exercise the whole pipeline without a
//! multi-gigabyte download.
//!
//! * Tokenizer: byte-level BPE trained (deterministically) on a fixed list of
//!   English and Swahili words, so common words of both languages are single
//!   tokens and any text at all tokenizes (bytes are the base alphabet). Its
//!   post-processor prepends `<|begin_of_text|>` as Llama 3's does;
//!   `<|end_of_text|>` is EOS and pads.
//! * Model ([`tiny_config`]): 4 blocks, hidden 64, 4 query heads sharing 2
//!   key/value heads (GQA), llama3 rope scaling whose bands all occur in a
//!   16-wide head, untied embeddings.

use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use safetensors::Dtype;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use super::config::{LlamaConfig, RopeScaling};
use super::llama::{Llama, LoadOptions, PROJECTION_NAMES, projection_parent};
use super::tokenizer::{LlamaTokenizer, SpecialTokens};
use super::weights::{Checkpoint, safetensors_bytes};
use crate::io::write_atomic;
use crate::nf4::checkpoint::TensorBuf;
use crate::{Error, Result};

/// BOS of the synthetic tokenizer (Llama 3's name).
pub const BOS: &str = "<|begin_of_text|>";
/// EOS (and padding) of the synthetic tokenizer.
pub const EOS: &str = "<|end_of_text|>";

/// English words the tokenizer learns as whole tokens.
pub const ENGLISH_WORDS: &[&str] = &[
    "the", "and", "water", "fire", "house", "child", "children", "mother", "father", "friend",
    "book", "school", "teacher", "student", "food", "bread", "rice", "meat", "fish", "milk",
    "tree", "forest", "river", "lake", "sea", "mountain", "sun", "moon", "star", "rain", "wind",
    "city", "village", "road", "car", "market", "money", "work", "day", "night", "morning",
    "evening", "year", "week", "time", "good", "bad", "big", "small", "new", "old", "red", "black",
    "white", "green", "eat", "drink", "sleep", "walk", "run", "read", "write", "speak", "love",
    "hope", "peace", "health", "doctor", "hospital", "church", "language", "word", "name",
    "country", "people", "person", "man", "woman", "dog", "cat", "cow", "goat", "chicken", "bird",
    "lion", "elephant", "one", "two", "three", "four", "five", "hand", "head", "eye", "heart",
    "door", "window", "chair", "table", "today", "tomorrow",
];

/// Swahili words the tokenizer learns as whole tokens (translations of
/// [`ENGLISH_WORDS`], roughly in order, and a few more).
pub const SWAHILI_WORDS: &[&str] = &[
    "na",
    "maji",
    "moto",
    "nyumba",
    "mtoto",
    "watoto",
    "mama",
    "baba",
    "rafiki",
    "kitabu",
    "shule",
    "mwalimu",
    "mwanafunzi",
    "chakula",
    "mkate",
    "mchele",
    "nyama",
    "samaki",
    "maziwa",
    "mti",
    "msitu",
    "mto",
    "ziwa",
    "bahari",
    "mlima",
    "jua",
    "mwezi",
    "nyota",
    "mvua",
    "upepo",
    "mji",
    "kijiji",
    "barabara",
    "gari",
    "soko",
    "pesa",
    "kazi",
    "siku",
    "usiku",
    "asubuhi",
    "jioni",
    "mwaka",
    "wiki",
    "wakati",
    "nzuri",
    "mbaya",
    "kubwa",
    "ndogo",
    "mpya",
    "zamani",
    "nyekundu",
    "nyeusi",
    "nyeupe",
    "kijani",
    "kula",
    "kunywa",
    "kulala",
    "kutembea",
    "kukimbia",
    "kusoma",
    "kuandika",
    "kuzungumza",
    "upendo",
    "tumaini",
    "amani",
    "afya",
    "daktari",
    "hospitali",
    "kanisa",
    "lugha",
    "neno",
    "jina",
    "nchi",
    "watu",
    "mtu",
    "mwanamume",
    "mwanamke",
    "mbwa",
    "paka",
    "ng'ombe",
    "mbuzi",
    "kuku",
    "ndege",
    "simba",
    "tembo",
    "moja",
    "mbili",
    "tatu",
    "nne",
    "tano",
    "mkono",
    "kichwa",
    "jicho",
    "moyo",
    "mlango",
    "dirisha",
    "kiti",
    "meza",
    "leo",
    "kesho",
    "habari",
    "asante",
    "karibu",
];

/// The synthetic tokenizer (the same every time).
///
/// # Errors
/// [`Error::Format`] if the `tokenizers` crate fails to train or configure
/// it (it does not for this fixed input).
pub fn tokenizer() -> Result<LlamaTokenizer> {
    let label = "<synthetic tokenizer>";
    let fail = |e: tokenizers::Error| Error::format(label, e.to_string());
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    let mut trainer: TrainerWrapper = BpeTrainer::builder()
        .vocab_size(1000)
        .min_frequency(1)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![
            AddedToken::from(BOS, true),
            AddedToken::from(EOS, true),
        ])
        .build()
        .into();
    // Each word as a sentence of its own (with a leading space too, the form
    // it takes inside a sentence), several times, so its merges win.
    let corpus: Vec<String> = ENGLISH_WORDS
        .iter()
        .chain(SWAHILI_WORDS)
        .flat_map(|w| [w.to_string(), format!(" {w}"), format!("{w} {w}")])
        .collect();
    tok.train(&mut trainer, corpus.iter()).map_err(fail)?;
    let bos = tok
        .token_to_id(BOS)
        .ok_or_else(|| Error::format(label, "BOS missing"))?;
    let post = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .and_then(|b| b.try_pair(format!("{BOS} $A {BOS}:1 $B:1")))
        .map_err(|e| Error::format(label, e))?
        .special_tokens(vec![(BOS, bos)])
        .build()
        .map_err(|e| Error::format(label, e.to_string()))?;
    tok.with_post_processor(Some(post));
    let special = SpecialTokens {
        bos: Some(BOS.into()),
        eos: Some(EOS.into()),
        pad: None,
    };
    LlamaTokenizer::new(tok, &special, (None, None, None), label)
}

/// The synthetic model's architecture for a vocabulary of `vocab_size`.
pub fn tiny_config(vocab_size: usize, bos: Option<u32>, eos: Option<u32>) -> LlamaConfig {
    LlamaConfig {
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        vocab_size,
        rms_norm_eps: 1e-5,
        // With a 16-wide head the 8 wavelengths are 2π·500000^(k/8): 6.3
        // (kept), 32.5 (smoothed), 168 and up (divided by the factor).
        rope_theta: 500_000.0,
        rope_scaling: RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        },
        tie_word_embeddings: false,
        attention_bias: false,
        mlp_bias: false,
        torch_dtype: Some(crate::DType::F32),
        bos_token_id: bos,
        eos_token_ids: eos.into_iter().collect(),
        pad_token_id: None,
        quantization: None,
        ignored_keys: Vec::new(),
    }
}

fn f32_buf(shape: Vec<usize>, values: Vec<f32>) -> TensorBuf {
    TensorBuf {
        dtype: Dtype::F32,
        shape,
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Random f32 weights for `cfg` under transformers' names, seeded:
/// embeddings and LM head `N(0, 1)`, projections `N(0, 1/in)`, norm weights
/// `1 + N(0, 0.1²)`. Sorted by name.
pub fn random_weights(cfg: &LlamaConfig, seed: u64) -> Vec<(String, TensorBuf)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut draw = |n: usize, mean: f32, sd: f32| -> Vec<f32> {
        // sd > 0 and finite for every call below.
        let d = Normal::new(mean, sd)
            .unwrap_or_else(|_| Normal::new(0.0, 1.0).unwrap_or_else(|_| unreachable!()));
        (0..n).map(|_| d.sample(&mut rng)).collect()
    };
    let h = cfg.hidden_size;
    let mut out = Vec::new();
    out.push((
        "model.embed_tokens.weight".to_string(),
        f32_buf(vec![cfg.vocab_size, h], draw(cfg.vocab_size * h, 0.0, 1.0)),
    ));
    for i in 0..cfg.num_hidden_layers {
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            out.push((
                format!("model.layers.{i}.{norm}.weight"),
                f32_buf(vec![h], draw(h, 1.0, 0.1)),
            ));
        }
        for name in PROJECTION_NAMES {
            let (n, k) = match name {
                "q_proj" => (cfg.q_dim(), h),
                "k_proj" | "v_proj" => (cfg.kv_dim(), h),
                "o_proj" => (h, cfg.q_dim()),
                "gate_proj" | "up_proj" => (cfg.intermediate_size, h),
                _ => (h, cfg.intermediate_size),
            };
            out.push((
                format!("model.layers.{i}.{}.{name}.weight", projection_parent(name)),
                f32_buf(vec![n, k], draw(n * k, 0.0, (k as f32).powf(-0.5))),
            ));
        }
    }
    out.push((
        "model.norm.weight".to_string(),
        f32_buf(vec![h], draw(h, 1.0, 0.1)),
    ));
    if !cfg.tie_word_embeddings {
        out.push((
            "lm_head.weight".to_string(),
            f32_buf(vec![cfg.vocab_size, h], draw(cfg.vocab_size * h, 0.0, 1.0)),
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The synthetic model (seeded) and its tokenizer, built in memory.
///
/// # Errors
/// As [`tokenizer`] and [`Llama::from_tensors`].
pub fn build(seed: u64, opts: &LoadOptions) -> Result<(Llama, LlamaTokenizer)> {
    let tok = tokenizer()?;
    let cfg = tiny_config(tok.vocab_size(), tok.bos_id, tok.eos_id);
    let bytes = safetensors_bytes(&random_weights(&cfg, seed))?;
    let ckpt = Checkpoint::from_bytes("<synthetic model.safetensors>", bytes);
    let model = Llama::from_tensors(cfg, &ckpt.tensors()?, opts)?;
    Ok((model, tok))
}

/// Write the synthetic model as a checkpoint directory transformers can
/// read: `config.json`, `model.safetensors`, `tokenizer.json`,
/// `tokenizer_config.json`.
///
/// # Errors
/// [`Error::Io`] if `dir` cannot be created or written; as [`build`].
pub fn write_dir(dir: impl AsRef<Path>, seed: u64) -> Result<()> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tok = tokenizer()?;
    let cfg = tiny_config(tok.vocab_size(), tok.bos_id, tok.eos_id);
    let write = |name: &str, bytes: &[u8]| -> Result<()> {
        let path = dir.join(name);
        write_atomic(&path, |w| {
            w.write_all(bytes).map_err(|e| Error::io(&path, e))
        })
    };
    let json = serde_json::to_string_pretty(&cfg.to_json())
        .map_err(|e| Error::invalid("config", e.to_string()))?;
    write("config.json", json.as_bytes())?;
    write(
        "model.safetensors",
        &safetensors_bytes(&random_weights(&cfg, seed))?,
    )?;
    let tj = tok
        .inner()
        .to_string(true)
        .map_err(|e| Error::format(dir.join("tokenizer.json"), e.to_string()))?;
    write("tokenizer.json", tj.as_bytes())?;
    let tc = serde_json::json!({
        "bos_token": BOS,
        "eos_token": EOS,
        "model_max_length": 64,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    write("tokenizer_config.json", tc.to_string().as_bytes())?;
    Ok(())
}
