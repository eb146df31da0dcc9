//! Config and checkpoint parsing: every supported spelling, clear errors
//! for malformed input, 4-bit checkpoints against quantize-then-dequantize,
//! sharded checkpoints, and a property test that the parsers never panic.

mod common;

use std::path::Path;

use candle_core::Device as CDevice;
use proptest::prelude::*;
use tli_kernels::model::synthetic::{self, random_weights, tiny_config};
use tli_kernels::model::weights::safetensors_bytes;
use tli_kernels::model::{
    Checkpoint, ForwardOptions, Llama, LlamaConfig, LoadOptions, ProjectionWeight, RopeScaling,
};
use tli_kernels::nf4::checkpoint::{TensorBuf, nf4_entries};
use tli_kernels::nf4::quantize::{QuantizeOptions, quantize};
use tli_kernels::{DType, Error};

const LLAMA31_CONFIG: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
  "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
  "mlp_bias": false, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
  "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 128256
}"#;

fn parse(text: &str) -> Result<LlamaConfig, Error> {
    LlamaConfig::from_json_str(text, Path::new("config.json"))
}

#[test]
fn llama31_config_in_both_spellings() {
    let c = parse(LLAMA31_CONFIG).unwrap();
    assert_eq!(
        (
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads
        ),
        (4096, 32, 32, 8)
    );
    assert_eq!(
        (c.head_dim, c.intermediate_size, c.vocab_size),
        (128, 14336, 128256)
    );
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!(c.rope_theta, 500000.0);
    assert_eq!(
        c.rope_scaling,
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0
        }
    );
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.torch_dtype, Some(DType::BF16));
    assert_eq!(c.eos_token_ids, vec![128001]);
    // transformers 5 spelling of the same, and our own writer's.
    let v5 = LLAMA31_CONFIG
        .replace(
            r#""rope_scaling": {"#,
            r#""rope_parameters": {"rope_theta": 500000.0, "#,
        )
        .replace(r#""rope_theta": 500000.0, "tie"#, r#""tie"#)
        .replace("torch_dtype", "dtype");
    assert_eq!(parse(&v5).unwrap(), c);
    let ours = c.to_json().to_string();
    let back = parse(&ours).unwrap();
    assert_eq!(back.rope_scaling, c.rope_scaling);
    assert_eq!(back.head_dim, 128);
}

#[test]
fn bad_configs_are_clear_errors() {
    let cases: &[(&str, &str, &str)] = &[
        ("{", "", "not valid JSON"),
        ("[1]", "", "not a JSON object"),
        (LLAMA31_CONFIG, "\"hidden_size\": 4096,", ""),
        (
            LLAMA31_CONFIG,
            "\"num_key_value_heads\": 8",
            "\"num_key_value_heads\": 5",
        ),
        (
            LLAMA31_CONFIG,
            "\"hidden_act\": \"silu\"",
            "\"hidden_act\": \"gelu\"",
        ),
        (
            LLAMA31_CONFIG,
            "\"rope_type\": \"llama3\"",
            "\"rope_type\": \"yarn\"",
        ),
        (LLAMA31_CONFIG, "\"factor\": 8.0,", ""),
        (
            LLAMA31_CONFIG,
            "\"model_type\": \"llama\"",
            "\"model_type\": \"mistral\"",
        ),
        (
            LLAMA31_CONFIG,
            "\"use_cache\": true",
            "\"sliding_window\": 4096",
        ),
        (
            LLAMA31_CONFIG,
            "\"torch_dtype\": \"bfloat16\"",
            "\"torch_dtype\": \"int8\"",
        ),
        (
            LLAMA31_CONFIG,
            "\"hidden_size\": 4096",
            "\"hidden_size\": -4",
        ),
    ];
    let want = [
        "not valid JSON",
        "not a JSON object",
        "hidden_size is missing",
        "num_attention_heads 32 is not a multiple of num_key_value_heads 5",
        "hidden_act is \"gelu\"",
        "rope_type is \"yarn\"",
        "rope_scaling.factor is missing",
        "model_type is \"mistral\"",
        "sliding_window is 4096",
        "torch_dtype is \"int8\"",
        "hidden_size is -4",
    ];
    for ((base, from, to), want) in cases.iter().zip(want) {
        let text = if from.is_empty() {
            base.to_string()
        } else {
            base.replace(from, to)
        };
        assert_ne!(&text, LLAMA31_CONFIG);
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.starts_with("config.json: ") && e.contains(want),
            "{e:?} should contain {want:?}"
        );
    }
    let q = LLAMA31_CONFIG.replace(
        "\"use_cache\": true",
        r#""quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_type": "fp4"}"#,
    );
    assert!(
        parse(&q)
            .unwrap_err()
            .to_string()
            .contains("bnb_4bit_quant_type is \"fp4\"")
    );
    let q8 = LLAMA31_CONFIG.replace(
        "\"use_cache\": true",
        r#""quantization_config": {"load_in_8bit": true}"#,
    );
    assert!(parse(&q8).unwrap_err().to_string().contains("load_in_8bit"));
}

fn write(dir: &Path, cfg: &LlamaConfig, tensors: &[(String, TensorBuf)]) {
    std::fs::write(dir.join("config.json"), cfg.to_json().to_string()).unwrap();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors_bytes(tensors).unwrap(),
    )
    .unwrap();
}

#[test]
fn missing_tensors_wrong_shapes_and_truncated_files() {
    let cfg = tiny_config(300, Some(0), Some(1));
    let good = random_weights(&cfg, 1);
    let dir = tempfile::tempdir().unwrap();
    let load = || {
        Llama::load(dir.path(), &LoadOptions::default())
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };

    let missing: Vec<_> = good
        .iter()
        .filter(|(n, _)| n != "model.layers.2.mlp.up_proj.weight")
        .cloned()
        .collect();
    write(dir.path(), &cfg, &missing);
    let e = load();
    assert!(
        e.contains("model.safetensors")
            && e.contains("missing tensor `model.layers.2.mlp.up_proj.weight`"),
        "{e}"
    );

    let mut wrong = good.clone();
    let i = wrong
        .iter()
        .position(|(n, _)| n == "model.layers.1.self_attn.k_proj.weight")
        .unwrap();
    wrong[i].1.shape = vec![64, 32];
    write(dir.path(), &cfg, &wrong);
    let e = load();
    assert!(
        e.contains(
            "`model.layers.1.self_attn.k_proj.weight` has shape [64, 32], expected [32, 64]"
        ),
        "{e}"
    );

    let mut ints = good.clone();
    let i = ints
        .iter()
        .position(|(n, _)| n == "model.norm.weight")
        .unwrap();
    ints[i].1.dtype = safetensors::Dtype::I32;
    write(dir.path(), &cfg, &ints);
    assert!(load().contains("`model.norm.weight` has dtype I32"));

    write(dir.path(), &cfg, &good);
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        &bytes[..bytes.len() - 100],
    )
    .unwrap();
    let e = load();
    assert!(
        e.contains("model.safetensors") && e.contains("truncated or corrupt"),
        "{e}"
    );

    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert!(load().contains("no model.safetensors or model.safetensors.index.json"));
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert!(load().contains("config.json"));
}

/// Write `t` as bitsandbytes' 4-bit keys in place of the dense weights.
fn four_bit(tensors: &[(String, TensorBuf)], opts: QuantizeOptions) -> Vec<(String, TensorBuf)> {
    let mut out = Vec::new();
    for (n, t) in tensors {
        if n.ends_with("proj.weight") {
            let vals: Vec<f32> = t
                .data
                .as_chunks::<4>()
                .0
                .iter()
                .map(|c| f32::from_le_bytes(*c))
                .collect();
            let q = quantize(&vals, &t.shape, DType::F32, opts).unwrap();
            out.extend(nf4_entries(n, &q).unwrap());
        } else {
            out.push((n.clone(), t.clone()));
        }
    }
    out
}

#[test]
fn four_bit_checkpoints_equal_quantize_then_dequantize() {
    let cfg = tiny_config(300, Some(0), Some(1));
    let dense = random_weights(&cfg, 5);
    let tok = synthetic::tokenizer().unwrap();
    let batch = tok.encode_batch(&["kitabu cha mwalimu", "a book"]).unwrap();
    let ids: Vec<Vec<u32>> = batch
        .ids
        .iter()
        .map(|r| r.iter().map(|&i| i % 300).collect())
        .collect();
    let b = tli_kernels::model::EncodedBatch { ids, ..batch };
    let (ids, mask) = b.tensors(&CDevice::Cpu).unwrap();
    for opts in [
        QuantizeOptions {
            blocksize: 64,
            double_quant: false,
        },
        QuantizeOptions {
            blocksize: 128,
            double_quant: true,
        },
    ] {
        // Reference: dense weights replaced by dequantize(quantize(W)).
        let deq: Vec<(String, TensorBuf)> = dense
            .iter()
            .map(|(n, t)| {
                if !n.ends_with("proj.weight") {
                    return (n.clone(), t.clone());
                }
                let vals: Vec<f32> = t
                    .data
                    .as_chunks::<4>()
                    .0
                    .iter()
                    .map(|c| f32::from_le_bytes(*c))
                    .collect();
                let q = quantize(&vals, &t.shape, DType::F32, opts).unwrap();
                let d: Vec<f32> = tli_kernels::nf4::dequant::dequantize(&q.view()).unwrap();
                (
                    n.clone(),
                    TensorBuf {
                        data: d.iter().flat_map(|v| v.to_le_bytes()).collect(),
                        ..t.clone()
                    },
                )
            })
            .collect();
        let from = |t: &[(String, TensorBuf)], o: &LoadOptions| {
            let ck = Checkpoint::from_bytes("m.safetensors", safetensors_bytes(t).unwrap());
            Llama::from_tensors(cfg.clone(), &ck.tensors().unwrap(), o).unwrap()
        };
        let reference = from(&deq, &LoadOptions::default());
        let stored = from(&four_bit(&dense, opts), &LoadOptions::default());
        let on_load = from(
            &dense,
            &LoadOptions {
                quantize: Some(opts),
                ..LoadOptions::default()
            },
        );
        for m in [&stored, &on_load] {
            assert!(
                m.blocks
                    .iter()
                    .flat_map(|b| &b.projections)
                    .all(|p| matches!(p.weight, ProjectionWeight::Nf4(_)))
            );
        }
        let r = reference
            .hidden_states(&ids, &mask, &ForwardOptions::default())
            .unwrap();
        for m in [&stored, &on_load] {
            let h = m
                .hidden_states(&ids, &mask, &ForwardOptions::default())
                .unwrap();
            for (x, y) in r.iter().zip(&h) {
                // Same f32 weights, same operations: identical bits.
                let d = (x - y)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert_eq!(d, 0.0, "{opts:?}");
            }
        }
    }
}

#[test]
fn sharded_checkpoint_loads_like_one_file() {
    let cfg = tiny_config(300, Some(0), Some(1));
    let all = random_weights(&cfg, 9);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), cfg.to_json().to_string()).unwrap();
    let (a, b) = all.split_at(all.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        std::fs::write(dir.path().join(file), safetensors_bytes(part).unwrap()).unwrap();
        for (n, _) in part {
            map.insert(n.clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let sharded = Llama::load(dir.path(), &LoadOptions::default()).unwrap();
    let one = dir.path().join("one");
    std::fs::create_dir(&one).unwrap();
    write(&one, &cfg, &all);
    let single = Llama::load(&one, &LoadOptions::default()).unwrap();
    let ids = candle_core::Tensor::new(&[[0u32, 5, 9, 200]], &CDevice::Cpu).unwrap();
    let mask = candle_core::Tensor::new(&[[1u32, 1, 1, 1]], &CDevice::Cpu).unwrap();
    let x = sharded
        .hidden_states(&ids, &mask, &ForwardOptions::default())
        .unwrap();
    let y = single
        .hidden_states(&ids, &mask, &ForwardOptions::default())
        .unwrap();
    assert_eq!(
        x.last().unwrap().to_vec3::<f32>().unwrap(),
        y.last().unwrap().to_vec3::<f32>().unwrap()
    );

    // An index naming the wrong file for a tensor is an error naming both.
    let mut bad = map.clone();
    bad.insert(
        "model.norm.weight".into(),
        "model-00001-of-00002.safetensors".into(),
    );
    assert!(b.iter().any(|(n, _)| n == "model.norm.weight"));
    let index = serde_json::json!({"weight_map": bad});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let e = Llama::load(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`model.norm.weight` is in model-00001-of-00002.safetensors"),
        "{e}"
    );
}

proptest! {
    #![proptest_config(common::proptest_config(256))]

    /// Config parsing never panics: mutate a real config's text at random.
    #[test]
    fn config_parser_never_panics(cut in 0usize..1200, junk in "[ -~]{0,12}", drop in 0usize..40) {
        let mut text = LLAMA31_CONFIG.to_string();
        let at = cut.min(text.len());
        let at = (0..=at).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        text.insert_str(at, &junk);
        let lines: Vec<&str> = text.lines().collect();
        let kept: String = lines.iter().enumerate().filter(|(i, _)| *i != drop).map(|(_, l)| *l).collect::<Vec<_>>().join("\n");
        let _ = parse(&kept);
    }

    /// Checkpoint parsing never panics on corrupted bytes of a real file.
    #[test]
    fn checkpoint_parser_never_panics(flips in proptest::collection::vec((0usize..4000, any::<u8>()), 1..8), cut in 0usize..5000) {
        let cfg = tiny_config(40, Some(0), Some(1));
        let mut small = cfg.clone();
        small.num_hidden_layers = 1;
        let mut bytes = safetensors_bytes(&four_bit(&random_weights(&small, 2), QuantizeOptions { blocksize: 64, double_quant: true })).unwrap();
        for (i, b) in flips {
            let n = bytes.len();
            bytes[i % n] = b;
        }
        bytes.truncate(bytes.len().saturating_sub(cut % 64));
        let ck = Checkpoint::from_bytes("fuzz.safetensors", bytes);
        if let Ok(t) = ck.tensors() {
            let _ = Llama::from_tensors(small, &t, &LoadOptions::default());
        }
    }
}
