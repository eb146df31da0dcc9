//! GGUF loading: the synthetic Llama written as llama.cpp writes GGUF files
//! (candle's GGUF writer, q/k rows permuted as `convert_hf_to_gguf.py` does)
//! and read back; quantized tensors against bounds derived from their
//! formats; refusals; a hand-built SentencePiece vocabulary; and the real
//! SmolLM2 GGUF when it is there (`TLI_SMOLLM2_GGUF`, or the cache
//! `scripts/fetch-smollm2` fills).

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{D, DType as CDType, Device as CDevice, IndexOp, Tensor};
use half::f16;
use tli_kernels::model::gguf::{self, GgufFile, permute_rows, unpermute_rows};
use tli_kernels::model::synthetic::{self, random_weights, tiny_config};
use tli_kernels::model::weights::safetensors_bytes;
use tli_kernels::model::{
    Checkpoint, ForwardOptions, Llama, LlamaConfig, LlamaTokenizer, LoadOptions, RopeScaling,
};
use tli_kernels::nf4::checkpoint::TensorBuf;
use tli_kernels::nf4::quantize::QuantizeOptions;

const SEED: u64 = 13;

/// transformers' block tensor names → GGUF's.
const NAMES: [(&str, &str); 9] = [
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        _ => {
            let rest = hf.strip_prefix("model.layers.").unwrap();
            let (i, t) = rest.split_once('.').unwrap();
            let t = t.strip_suffix(".weight").unwrap();
            let g = NAMES.iter().find(|(h, _)| *h == t).unwrap().1;
            format!("blk.{i}.{g}.weight")
        }
    }
}

/// The synthetic model's config with the original RoPE (GGUF carries
/// llama3 scaling only as a `rope_freqs` tensor, which is refused).
fn config(tok: &LlamaTokenizer) -> LlamaConfig {
    let mut cfg = tiny_config(tok.vocab_size(), tok.bos_id, tok.eos_id);
    cfg.rope_scaling = RopeScaling::Default;
    cfg.rope_theta = 10_000.0;
    // GGUF stores epsilon as f32; keep the value it can hold.
    cfg.rms_norm_eps = f64::from(1e-5f32);
    cfg
}

fn f32s(t: &TensorBuf) -> Vec<f32> {
    t.data
        .as_chunks::<4>()
        .0
        .iter()
        .map(|c| f32::from_le_bytes(*c))
        .collect()
}

/// The synthetic tokenizer's vocabulary (by id) and merges, from its JSON.
fn vocab_and_merges(tok: &LlamaTokenizer) -> (Vec<String>, Vec<String>) {
    let json: serde_json::Value =
        serde_json::from_str(&tok.inner().to_string(false).unwrap()).unwrap();
    let vocab = json["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    assert!(tokens.iter().all(|t| !t.is_empty()));
    let merges = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(p) => {
                format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap())
            }
            other => panic!("merge {other}"),
        })
        .collect();
    (tokens, merges)
}

fn strings(v: &[String]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.clone())).collect())
}

/// Options of [`write_gguf`].
struct Spec<'a> {
    /// Type of the 2-D weights (norms stay F32, as llama.cpp keeps them).
    qtype: GgmlDType,
    /// Leave out `output.weight` (tied embeddings).
    tied: bool,
    /// Metadata to replace or add.
    meta: Vec<(&'a str, Value)>,
}

/// The synthetic model (weights `w`, config `cfg`, tokenizer `tok`) as a
/// GGUF file, as llama.cpp's converter writes it.
fn write_gguf(
    path: &Path,
    cfg: &LlamaConfig,
    w: &[(String, TensorBuf)],
    tok: &LlamaTokenizer,
    spec: &Spec,
) {
    let (tokens, merges) = vocab_and_merges(tok);
    let types: Vec<Value> = (0..tokens.len() as u32)
        .map(|id| Value::I32(if tok.is_special(id) { 3 } else { 1 }))
        .collect();
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String("synthetic".into())),
        (
            "llama.block_count".into(),
            Value::U32(cfg.num_hidden_layers as u32),
        ),
        ("llama.context_length".into(), Value::U32(64)),
        (
            "llama.embedding_length".into(),
            Value::U32(cfg.hidden_size as u32),
        ),
        (
            "llama.feed_forward_length".into(),
            Value::U32(cfg.intermediate_size as u32),
        ),
        (
            "llama.attention.head_count".into(),
            Value::U32(cfg.num_attention_heads as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(cfg.num_key_value_heads as u32),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(cfg.rope_theta as f32),
        ),
        (
            "llama.rope.dimension_count".into(),
            Value::U32(cfg.head_dim as u32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("llama.vocab_size".into(), Value::U32(tokens.len() as u32)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        ("tokenizer.ggml.tokens".into(), strings(&tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), strings(&merges)),
        (
            "tokenizer.ggml.bos_token_id".into(),
            Value::U32(tok.bos_id.unwrap()),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(tok.eos_id.unwrap()),
        ),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
    ];
    for (k, v) in &spec.meta {
        meta.retain(|(key, _)| key != k);
        meta.push((k.to_string(), v.clone()));
    }
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in w {
        if spec.tied && name == "lm_head.weight" {
            continue;
        }
        let mut data = f32s(t);
        if name.ends_with("q_proj.weight") {
            data = permute_rows(&data, t.shape[0], t.shape[1], cfg.num_attention_heads).unwrap();
        } else if name.ends_with("k_proj.weight") {
            data = permute_rows(&data, t.shape[0], t.shape[1], cfg.num_key_value_heads).unwrap();
        }
        let dense = Tensor::from_vec(data, t.shape.clone(), &CDevice::Cpu).unwrap();
        let ty = if t.shape.len() == 2 {
            spec.qtype
        } else {
            GgmlDType::F32
        };
        tensors.push((gguf_name(name), QTensor::quantize(&dense, ty).unwrap()));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

/// The synthetic model (default RoPE) built directly from its weights.
fn direct(cfg: &LlamaConfig, w: &[(String, TensorBuf)], opts: &LoadOptions) -> Llama {
    let ckpt = Checkpoint::from_bytes("<direct>", safetensors_bytes(w).unwrap());
    Llama::from_tensors(cfg.clone(), &ckpt.tensors().unwrap(), opts).unwrap()
}

const TEXTS: &[&str] = &[
    "the water",
    "maji ya mto",
    "children, 1234 books!",
    "  two  spaces",
    "ng'ombe <|end_of_text|> kula",
];

fn hidden(model: &Llama, tok: &LlamaTokenizer) -> Vec<Tensor> {
    let enc = tok.encode_batch(TEXTS).unwrap();
    let (ids, mask) = enc.tensors(&model.device).unwrap();
    model
        .hidden_states(&ids, &mask, &ForwardOptions::default())
        .unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(CDType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn setup() -> (LlamaTokenizer, LlamaConfig, Vec<(String, TensorBuf)>) {
    let tok = synthetic::tokenizer().unwrap();
    let cfg = config(&tok);
    let w = random_weights(&cfg, SEED);
    (tok, cfg, w)
}

#[test]
fn permutation_inverse_and_hand_example() {
    // 2 heads of width 6: llama.cpp interleaves the halves (0 1 2 | 3 4 5)
    // of each head as 0 3 1 4 2 5.
    let (rows, cols) = (12, 2);
    let data: Vec<u32> = (0..rows * cols)
        .map(|i| (i / cols * 10 + i % cols) as u32)
        .collect();
    let fwd = permute_rows(&data, rows, cols, 2).unwrap();
    let order: Vec<u32> = fwd.chunks(cols).map(|r| r[0] / 10).collect();
    assert_eq!(order, [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]);
    assert!(fwd.chunks(cols).all(|r| r[1] == r[0] + 1));
    assert_eq!(unpermute_rows(&fwd, rows, cols, 2).unwrap(), data);
    // Round trips on other shapes: inverse ∘ forward = forward ∘ inverse = id.
    for (rows, cols, heads) in [(8, 3, 2), (16, 5, 4), (4, 1, 1), (24, 2, 3)] {
        let d: Vec<usize> = (0..rows * cols).collect();
        let f = permute_rows(&d, rows, cols, heads).unwrap();
        assert_ne!(f, d, "{rows}x{cols}/{heads} is not the identity");
        assert_eq!(unpermute_rows(&f, rows, cols, heads).unwrap(), d);
        assert_eq!(
            permute_rows(
                &unpermute_rows(&d, rows, cols, heads).unwrap(),
                rows,
                cols,
                heads
            )
            .unwrap(),
            d
        );
    }
    let e = permute_rows(&[0u8; 12], 6, 2, 2).unwrap_err().to_string();
    assert!(e.contains("6 rows") && e.contains("2 heads"), "{e}");
}

#[test]
fn f32_gguf_gives_the_synthetic_models_hidden_states_bit_for_bit() {
    let (tok, cfg, w) = setup();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(
        &path,
        &cfg,
        &w,
        &tok,
        &Spec {
            qtype: GgmlDType::F32,
            tied: false,
            meta: vec![],
        },
    );

    let g = GgufFile::open(&path).unwrap();
    let mut expected = cfg.clone();
    expected.torch_dtype = None;
    assert_eq!(g.config().unwrap(), expected);

    let (model, gtok) = gguf::load(&path, &LoadOptions::default()).unwrap();
    let want = direct(&cfg, &w, &LoadOptions::default());
    for t in TEXTS {
        let a = gtok.inner().encode(*t, true).unwrap();
        let b = tok.inner().encode(*t, true).unwrap();
        assert_eq!(a.get_ids(), b.get_ids(), "{t:?}");
    }
    let ea = gtok.encode_batch(TEXTS).unwrap();
    let eb = tok.encode_batch(TEXTS).unwrap();
    assert_eq!(ea, eb);
    assert_eq!(
        (gtok.bos_id, gtok.eos_id, gtok.pad_id),
        (tok.bos_id, tok.eos_id, tok.pad_id)
    );

    let (a, b) = (hidden(&model, &gtok), hidden(&want, &tok));
    assert_eq!(a.len(), cfg.num_hidden_layers + 1);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let (x, y) = (flat(x), flat(y));
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "hidden state {i} differs"
        );
    }

    // Without the q/k permutation undone the model would differ: the test
    // can fail.
    let mut wrong = w.clone();
    for (name, t) in wrong.iter_mut() {
        if name.ends_with("q_proj.weight") {
            let p =
                permute_rows(&f32s(t), t.shape[0], t.shape[1], cfg.num_attention_heads).unwrap();
            t.data = p.iter().flat_map(|v| v.to_le_bytes()).collect();
        }
    }
    let bad = direct(&cfg, &wrong, &LoadOptions::default());
    let last = |m: &Llama, t: &LlamaTokenizer| flat(hidden(m, t).last().unwrap());
    assert_ne!(last(&bad, &tok), last(&model, &gtok));
}

#[test]
fn gguf_loads_bf16_nf4_and_few_layers_as_safetensors_does() {
    let (tok, cfg, w) = setup();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(
        &path,
        &cfg,
        &w,
        &tok,
        &Spec {
            qtype: GgmlDType::F32,
            tied: true,
            meta: vec![],
        },
    );
    assert!(
        GgufFile::open(&path)
            .unwrap()
            .config()
            .unwrap()
            .tie_word_embeddings
    );
    for opts in [
        LoadOptions {
            quantize: Some(QuantizeOptions::default()),
            ..LoadOptions::default()
        },
        LoadOptions {
            dtype: CDType::BF16,
            ..LoadOptions::default()
        },
        LoadOptions {
            num_layers: Some(2),
            ..LoadOptions::default()
        },
    ] {
        let (model, gtok) = gguf::load(&path, &opts).unwrap();
        let want = direct(&cfg, &w, &opts);
        assert_eq!(model.blocks.len(), want.blocks.len());
        let enc = gtok.encode_batch(TEXTS).unwrap();
        let (ids, mask) = enc.tensors(&CDevice::Cpu).unwrap();
        let up_to = Some(model.blocks.len());
        let fo = ForwardOptions {
            up_to,
            ..ForwardOptions::default()
        };
        let a = model.hidden_states(&ids, &mask, &fo).unwrap();
        let b = want.hidden_states(&ids, &mask, &fo).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.dtype(), opts.dtype);
            let (x, y) = (flat(x), flat(y));
            assert!(
                x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{opts:?}"
            );
        }
    }
}

/// f16 rounding of a scale, as stored in a block.
fn h(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

#[test]
fn q8_0_and_q4_1_weights_within_their_format_bounds() {
    let (tok, cfg, w) = setup();
    let dir = tempfile::tempdir().unwrap();
    for qtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
        let path = dir.path().join(format!("tiny-{qtype:?}.gguf"));
        write_gguf(
            &path,
            &cfg,
            &w,
            &tok,
            &Spec {
                qtype,
                tied: false,
                meta: vec![],
            },
        );
        let g = GgufFile::open(&path).unwrap();
        let (model, _) = gguf::load(&path, &LoadOptions::default()).unwrap();
        let mut checked = 0;
        for (name, t) in &w {
            if t.shape.len() != 2 || name == "lm_head.weight" {
                continue;
            }
            let gname = gguf_name(name);
            let (shape, got) = g.dequantized(&gname).unwrap();
            assert_eq!(shape, t.shape);
            // Compare in the stored (permuted) layout, block by block.
            let mut orig = f32s(t);
            let heads = if name.contains("q_proj") {
                Some(cfg.num_attention_heads)
            } else if name.contains("k_proj") {
                Some(cfg.num_key_value_heads)
            } else {
                None
            };
            if let Some(n) = heads {
                orig = permute_rows(&orig, t.shape[0], t.shape[1], n).unwrap();
            }
            for (xs, ys) in orig.chunks(32).zip(got.chunks(32)) {
                let bound = match qtype {
                    // q = round(x/d), d = amax/127 stored as f16:
                    // |x − q·d16| ≤ d/2 + 127·|d − d16|.
                    GgmlDType::Q8_0 => {
                        let d = xs.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                        d / 2.0 + 127.0 * (d - h(d)).abs()
                    }
                    // q = round((x − min)/d) ∈ 0..15, d = (max − min)/15,
                    // d and min stored as f16:
                    // |x − (q·d16 + min16)| ≤ d/2 + 15·|d − d16| + |min − min16|.
                    _ => {
                        let lo = xs.iter().fold(f32::INFINITY, |m, x| m.min(*x));
                        let hi = xs.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x));
                        let d = (hi - lo) / 15.0;
                        d / 2.0 + 15.0 * (d - h(d)).abs() + (lo - h(lo)).abs()
                    }
                };
                let amax = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
                for (x, y) in xs.iter().zip(ys) {
                    // f32 rounding of the arithmetic: a few ulps of the block.
                    assert!(
                        (x - y).abs() <= bound * (1.0 + 1e-5) + amax * 1e-6,
                        "{qtype:?} {gname}: {x} vs {y}, bound {bound}"
                    );
                }
                // The bound is not vacuous: below the block's range.
                assert!(bound < 0.2 * amax.max(1e-6) || bound == 0.0);
            }
            // The model holds exactly the dequantized weight, permutation
            // undone.
            if let Some(n) = heads {
                let i: usize = name.split('.').nth(2).unwrap().parse().unwrap();
                let p = if name.contains("q_proj") {
                    "q_proj"
                } else {
                    "k_proj"
                };
                let proj = model.blocks[i].projection(p).unwrap();
                let like = Tensor::zeros(1, CDType::F32, &CDevice::Cpu).unwrap();
                let wt = flat(&proj.base_weight(CDType::F32, &like).unwrap());
                assert_eq!(wt, unpermute_rows(&got, t.shape[0], t.shape[1], n).unwrap());
            }
            checked += 1;
        }
        assert_eq!(checked, 1 + 7 * cfg.num_hidden_layers);
        let (_, gtok) = gguf::load(&path, &LoadOptions::default()).unwrap();
        assert!(
            hidden(&model, &gtok)
                .iter()
                .all(|t| flat(t).iter().all(|v| v.is_finite()))
        );
    }
}

#[test]
fn every_supported_type_dequantizes_within_a_sanity_bound() {
    // A 4×256 Gaussian-ish matrix (k-quants need rows of 256).
    let values: Vec<f32> = (0..1024)
        .map(|i| ((i as f32 * 0.7311).sin() + (i as f32 * 0.1237).cos()) * 0.5)
        .collect();
    let rms = (values.iter().map(|v| v * v).sum::<f32>() / 1024.0).sqrt();
    let dense = Tensor::from_vec(values.clone(), (4, 256), &CDevice::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // (type, bits): the RMS error of a b-bit grid over a block is below
    // 2^-(b-1) of the data's RMS for these smooth values.
    for (ty, bits, name) in [
        (GgmlDType::F16, 11, "F16"),
        (GgmlDType::BF16, 8, "BF16"),
        (GgmlDType::Q8_0, 8, "Q8_0"),
        (GgmlDType::Q4_0, 4, "Q4_0"),
        (GgmlDType::Q4_1, 4, "Q4_1"),
        (GgmlDType::Q5_0, 5, "Q5_0"),
        (GgmlDType::Q5_1, 5, "Q5_1"),
        (GgmlDType::Q2K, 2, "Q2_K"),
        (GgmlDType::Q3K, 3, "Q3_K"),
        (GgmlDType::Q4K, 4, "Q4_K"),
        (GgmlDType::Q5K, 5, "Q5_K"),
        (GgmlDType::Q6K, 6, "Q6_K"),
    ] {
        let q = QTensor::quantize(&dense, ty).unwrap();
        let path = dir.path().join(format!("{name}.gguf"));
        let arch = Value::String("llama".into());
        let mut f = std::fs::File::create(&path).unwrap();
        gguf_file::write(
            &mut f,
            &[("general.architecture", &arch)],
            &[("m.weight", &q)],
        )
        .unwrap();
        drop(f);
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.tensor_info("m.weight").unwrap(), (name, vec![4, 256]));
        let (shape, got) = g.dequantized("m.weight").unwrap();
        assert_eq!(shape, [4, 256]);
        let err = (values
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>()
            / 1024.0)
            .sqrt();
        let bound = rms * 0.5f32.powi(bits - 1);
        assert!(err <= bound, "{name}: rms error {err} > {bound}");
        if bits < 11 {
            assert!(err > 0.0, "{name}: lossy type reproduced the data exactly");
        }
    }
}

/// Replace the u32 type id of tensor `name` in a GGUF file's header.
fn patch_type(bytes: &mut [u8], name: &str, ndims: usize, id: u32) {
    let pat = name.as_bytes();
    let at = bytes.windows(pat.len()).position(|w| w == pat).unwrap();
    let ty = at + pat.len() + 4 + 8 * ndims;
    assert_eq!(
        u32::from_le_bytes(
            bytes[at + pat.len()..at + pat.len() + 4]
                .try_into()
                .unwrap()
        ),
        ndims as u32
    );
    bytes[ty..ty + 4].copy_from_slice(&id.to_le_bytes());
}

fn err_of(path: &Path) -> String {
    let e = match GgufFile::open(path) {
        Err(e) => e,
        Ok(g) => match g.config() {
            Err(e) => e,
            Ok(cfg) => g
                .checkpoint(&cfg, None, safetensors::Dtype::F32)
                .unwrap_err(),
        },
    };
    e.to_string()
}

#[test]
fn refusals_name_the_file_tensor_type_and_key() {
    let (tok, cfg, w) = setup();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    write_gguf(
        &good,
        &cfg,
        &w,
        &tok,
        &Spec {
            qtype: GgmlDType::F32,
            tied: false,
            meta: vec![],
        },
    );
    let bytes = std::fs::read(&good).unwrap();
    let at = |name: &str, b: &[u8]| -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };

    // Truncated: the last tensor's bytes run past the end.
    let p = at("cut.gguf", &bytes[..bytes.len() - 100]);
    let e = err_of(&p);
    assert!(
        e.contains("cut.gguf")
            && e.contains("truncated")
            && e.contains("tensor `")
            && e.contains("F32"),
        "{e}"
    );
    // Cut inside the header: candle's error, wrapped with the file name.
    let p = at("header.gguf", &bytes[..200]);
    let e = err_of(&p);
    assert!(
        e.contains("header.gguf") && e.contains("not a readable GGUF file"),
        "{e}"
    );
    let p = at("notgguf.gguf", b"GGUF\x63\0\0\0 and then nothing useful");
    let e = err_of(&p);
    assert!(
        e.contains("notgguf.gguf") && e.contains("not a readable GGUF"),
        "{e}"
    );

    // A type candle does not know (IQ4_NL): the tensor and type named.
    let mut b = bytes.clone();
    patch_type(&mut b, "blk.1.attn_q.weight", 2, 20);
    let e = err_of(&at("iq.gguf", &b));
    assert!(
        e.contains("iq.gguf") && e.contains("blk.1.attn_q.weight") && e.contains("IQ4_NL"),
        "{e}"
    );
    // One candle knows but llama.cpp never stores as weights (Q8_K).
    let mut b = bytes.clone();
    patch_type(&mut b, "blk.2.ffn_up.weight", 2, 15);
    let e = err_of(&at("q8k.gguf", &b));
    assert!(
        e.contains("blk.2.ffn_up.weight") && e.contains("Q8_K") && e.contains("supported:"),
        "{e}"
    );

    // Another architecture, MoE, rope scaling, an extra tensor.
    for (file, meta, needle) in [
        (
            "qwen.gguf",
            vec![("general.architecture", Value::String("qwen2".into()))],
            "\"qwen2\"",
        ),
        (
            "moe.gguf",
            vec![("llama.expert_count", Value::U32(8))],
            "llama.expert_count is 8",
        ),
        (
            "yarn.gguf",
            vec![("llama.rope.scaling.type", Value::String("yarn".into()))],
            "llama.rope.scaling.type is \"yarn\"",
        ),
        (
            "rot.gguf",
            vec![("llama.rope.dimension_count", Value::U32(8))],
            "llama.rope.dimension_count is 8",
        ),
        (
            "noblocks.gguf",
            vec![("llama.block_count", Value::String("four".into()))],
            "llama.block_count is string \"four\"",
        ),
        (
            "tok.gguf",
            vec![("tokenizer.ggml.model", Value::String("t5".into()))],
            "tokenizer.ggml.model is \"t5\"",
        ),
        (
            "bos.gguf",
            vec![("tokenizer.ggml.bos_token_id", Value::U32(99_999))],
            "tokenizer.ggml.bos_token_id is 99999",
        ),
    ] {
        let p = dir.path().join(file);
        write_gguf(
            &p,
            &cfg,
            &w,
            &tok,
            &Spec {
                qtype: GgmlDType::F32,
                tied: false,
                meta,
            },
        );
        let e = match GgufFile::open(&p).and_then(|g| g.config().and_then(|_| g.tokenizer())) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{file} loaded"),
        };
        assert!(e.contains(file) && e.contains(needle), "{file}: {e}");
    }
    // A tensor the architecture lacks (the name of a norm, renamed in
    // place to one of the same length).
    let mut b = bytes.clone();
    let from = b"blk.0.attn_norm.weight";
    let pos = b.windows(from.len()).position(|x| x == from).unwrap();
    b[pos..pos + from.len()].copy_from_slice(b"blk.0.attn_sink.weight");
    let e = err_of(&at("extra.gguf", &b));
    assert!(
        e.contains("extra.gguf")
            && e.contains("blk.0.attn_sink.weight")
            && e.contains("not part of the Llama"),
        "{e}"
    );
}

#[test]
fn sentencepiece_vocabulary_tokenizes_as_transformers_builds_it() {
    // A hand-made SentencePiece vocabulary without merges: transformers
    // derives merges from the scores (higher first).
    let tokens = [
        "<unk>", "<s>", "</s>", "<0x21>", "▁", "h", "i", "▁h", "hi", "▁hi",
    ];
    let scores = [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0];
    let types = [2, 3, 3, 6, 1, 1, 1, 1, 1, 1];
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("tokenizer.ggml.model", Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(
                tokens
                    .iter()
                    .map(|t| Value::String(t.to_string()))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.scores",
            Value::Array(scores.iter().map(|s| Value::F32(*s)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.iter().map(|t| Value::I32(*t)).collect()),
        ),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spm.gguf");
    let refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &refs, &[]).unwrap();
    let tok = GgufFile::open(&path).unwrap().tokenizer().unwrap();
    let ids = |t: &str| tok.inner().encode(t, true).unwrap().get_ids().to_vec();
    // "hi hi!" → "▁hi▁hi!" (prefix ▁, spaces → ▁); merges by score:
    // (▁,h) [score of ▁h] first, then (h,i) (no pair left), then
    // (▁h,i) → ▁hi; "!" is not a token: byte fallback <0x21>.
    // BOS is added (llama vocabularies default to add_bos_token).
    assert_eq!(ids("hi hi!"), [1, 9, 9, 3]);
    // "ih" → ▁ i h: no merge applies.
    assert_eq!(ids("ih"), [1, 4, 6, 5]);
    // "z": neither a token nor a byte token → <unk>.
    assert_eq!(ids("z"), [1, 4, 0]);
    // Special tokens in text are matched whole.
    assert_eq!(ids("hi</s>"), [1, 9, 2]);
    assert_eq!((tok.bos_id, tok.eos_id, tok.pad_id), (Some(1), Some(2), 2));
    assert!(tok.is_special(1) && tok.is_special(2) && !tok.is_special(9));
}

/// The real SmolLM2-135M-Instruct GGUF (Q4_1 projections, Q8_0 embedding).
#[test]
fn smollm2_gguf_when_present() {
    let Some(path) = common::smollm2_gguf("smollm2_gguf_when_present") else {
        return;
    };
    let g = GgufFile::open(&path).unwrap();
    let cfg = g.config().unwrap();
    assert_eq!(
        (
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads
        ),
        (30, 576, 9, 3)
    );
    assert_eq!(
        (cfg.vocab_size, cfg.intermediate_size, cfg.head_dim),
        (49152, 1536, 64)
    );
    assert!(cfg.tie_word_embeddings);
    assert_eq!(cfg.rope_theta, 100_000.0);
    assert_eq!(cfg.rope_scaling, RopeScaling::Default);
    assert_eq!(
        (
            cfg.bos_token_id,
            cfg.eos_token_ids.as_slice(),
            cfg.pad_token_id
        ),
        (Some(1), &[2][..], Some(2))
    );
    assert_eq!(
        g.tensor_info("blk.0.attn_q.weight").unwrap(),
        ("Q4_1", vec![576, 576])
    );
    assert_eq!(
        g.tensor_info("blk.0.attn_k.weight").unwrap(),
        ("Q4_1", vec![192, 576])
    );
    assert_eq!(
        g.tensor_info("token_embd.weight").unwrap(),
        ("Q8_0", vec![49152, 576])
    );

    let tok = g.tokenizer().unwrap();
    let vocab = tok.inner().get_vocab(false);
    let id = |t: &str| vocab[t];
    let ids = |t: &str| tok.inner().encode(t, true).unwrap().get_ids().to_vec();
    // Whole words of the vocabulary come out as themselves; no BOS (the
    // file says add_bos_token = false).
    assert_eq!(ids("Hello"), [id("Hello")]);
    assert_eq!(ids("Hello world"), [id("Hello"), id("Ġworld")]);
    assert_eq!(ids("water fire"), [id("water"), id("Ġfire")]);
    assert_eq!(ids("<|im_start|>user"), [1, id("user")]);
    assert_eq!(tok.bos_id, Some(1));
    assert!(tok.is_special(0) && tok.is_special(1) && tok.is_special(2));

    let (model, tok) = gguf::load(&path, &LoadOptions::default()).unwrap();
    let enc = tok
        .encode_batch(&["water", "the house by the river"])
        .unwrap();
    let (ids, mask) = enc.tensors(&CDevice::Cpu).unwrap();
    let hs = model
        .hidden_states(&ids, &mask, &ForwardOptions::default())
        .unwrap();
    assert_eq!(hs.len(), 31);
    for t in &hs {
        assert_eq!(t.dims(), [2, enc.ids[0].len(), 576]);
        assert!(flat(t).iter().all(|v| v.is_finite()));
    }
    // The model works as a language model (the tied LM head on the last
    // hidden state): a wrong rotary permutation or tokenizer would not
    // complete these.
    for (text, next) in [
        ("The capital of France is", "ĠParis"),
        ("One, two, three, four,", "Ġfive"),
    ] {
        let enc = tok.encode_batch(&[text]).unwrap();
        let (ids, mask) = enc.tensors(&CDevice::Cpu).unwrap();
        let hs = model
            .hidden_states(&ids, &mask, &ForwardOptions::default())
            .unwrap();
        let n = enc.ids[0].len();
        let h = hs
            .last()
            .unwrap()
            .i((0, n - 1))
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let logits = model.embed.matmul(&h).unwrap().squeeze(1).unwrap();
        let top = logits
            .argmax(D::Minus1)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        assert_eq!(
            tok.inner().id_to_token(top).as_deref(),
            Some(next),
            "{text:?}"
        );
    }
}

/// The same synthetic model as a checkpoint directory transformers' way.
fn write_model_dir(dir: &Path, cfg: &LlamaConfig, w: &[(String, TensorBuf)], tok: &LlamaTokenizer) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_json().to_string()).unwrap();
    std::fs::write(dir.join("model.safetensors"), safetensors_bytes(w).unwrap()).unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        tok.inner().to_string(true).unwrap(),
    )
    .unwrap();
    let tc = serde_json::json!({"bos_token": synthetic::BOS, "eos_token": synthetic::EOS});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}

fn tli(args: &[&std::ffi::OsStr]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tli"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tli {args:?}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn cli_scan_train_eval_take_a_gguf_file() {
    let (tok, cfg, w) = setup();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = d.join("tiny.gguf");
    write_gguf(
        &file,
        &cfg,
        &w,
        &tok,
        &Spec {
            qtype: GgmlDType::F32,
            tied: false,
            meta: vec![],
        },
    );
    let model_dir = d.join("model");
    write_model_dir(&model_dir, &cfg, &w, &tok);
    let (train, control) = tli_kernels::pairs::shipped().unwrap();
    let write_pairs = |name: &str, list: &[tli_kernels::pairs::Pair], n: usize| {
        let p = d.join(name);
        let s: String = list
            .iter()
            .take(n)
            .map(|p| format!("{}\t{}\n", p.swahili, p.english))
            .collect();
        std::fs::write(&p, s).unwrap();
        p
    };
    let train = write_pairs("train.tsv", &train, 24);
    let control = write_pairs("control.tsv", &control, 8);
    let os = |p: &Path| p.as_os_str().to_owned();
    let s = |x: &str| std::ffi::OsString::from(x);

    // scan: the GGUF file and the checkpoint directory give the same report.
    let mut reports = Vec::new();
    for (model, json) in [(&file, d.join("a.json")), (&model_dir, d.join("b.json"))] {
        tli(&[
            &s("scan"),
            &s("--model"),
            &os(model),
            &s("--pairs"),
            &os(&train),
            &s("--json"),
            &os(&json),
        ]
        .map(|x| x.as_os_str()));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        reports.push(v["layers"].clone());
    }
    assert!(reports[0].as_array().is_some_and(|l| !l.is_empty()));
    assert_eq!(reports[0], reports[1]);

    // train on the GGUF file, then eval the adapter on it.
    let adapter = d.join("adapter");
    let out = tli(&[
        &s("train"),
        &s("--model"),
        &os(&file),
        &s("--pairs"),
        &os(&train),
        &s("--out"),
        &os(&adapter),
        &s("--epochs"),
        &s("1"),
        &s("--warmup"),
        &s("0"),
        &s("--seed"),
        &s("3"),
    ]
    .map(|x| x.as_os_str()));
    assert!(out.contains("mean loss"), "{out}");
    assert!(adapter.join("adapter_model.safetensors").is_file());
    let ejson = d.join("eval.json");
    tli(&[
        &s("eval"),
        &s("--model"),
        &os(&file),
        &s("--adapter"),
        &os(&adapter),
        &s("--train"),
        &os(&train),
        &s("--control"),
        &os(&control),
        &s("--json"),
        &os(&ejson),
    ]
    .map(|x| x.as_os_str()));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ejson).unwrap()).unwrap();
    assert_eq!(v["sets"]["trained"]["n"], 24);
    assert_eq!(v["sets"]["control"]["n"], 8);
}
