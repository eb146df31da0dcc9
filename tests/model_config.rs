//! `config.json` as the hubs ship it: the well-known Llama-architecture
//! families (written from their published key sets) parse to their published
//! shapes; both rope and dtype spellings are accepted when they agree and
//! refused, naming both values, when they do not; every setting that changes
//! the Llama math and is not implemented is refused by name; other unknown
//! keys are accepted and named.

use std::path::Path;

use serde_json::{Value, json};
use tli_kernels::model::config::UNSUPPORTED;
use tli_kernels::model::{LlamaConfig, RopeScaling};
use tli_kernels::{DType, Error};

fn parse(text: &str) -> Result<LlamaConfig, Error> {
    LlamaConfig::from_json_str(text, Path::new("config.json"))
}

fn parse_value(v: &Value) -> Result<LlamaConfig, Error> {
    parse(&v.to_string())
}

/// The error message of a config that must be refused.
fn refused(v: &Value) -> String {
    match parse_value(v) {
        Ok(c) => panic!("accepted {v}: {c:?}"),
        Err(e) => e.to_string(),
    }
}

/// `base` with `key` set to `value`.
fn with(base: &Value, key: &str, value: Value) -> Value {
    let mut v = base.clone();
    v.as_object_mut().unwrap().insert(key.to_string(), value);
    v
}

/// `base` without `key`.
fn without(base: &Value, key: &str) -> Value {
    let mut v = base.clone();
    v.as_object_mut().unwrap().remove(key);
    v
}

/// The shape facts of a config, in one comparable tuple: hidden,
/// intermediate, layers, heads, kv heads, head_dim, vocab.
fn shape(c: &LlamaConfig) -> [usize; 7] {
    [
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.vocab_size,
    ]
}

fn llama2_7b() -> Value {
    json!({
      "_name_or_path": "meta-llama/Llama-2-7b-hf",
      "architectures": ["LlamaForCausalLM"],
      "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
      "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
      "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
      "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
      "rope_scaling": null, "tie_word_embeddings": false, "torch_dtype": "float16",
      "transformers_version": "4.31.0.dev0", "use_cache": true, "vocab_size": 32000
    })
}

fn llama3_8b() -> Value {
    json!({
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
      "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
      "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
      "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
      "rope_scaling": null, "rope_theta": 500000.0, "tie_word_embeddings": false,
      "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0", "use_cache": true,
      "vocab_size": 128256
    })
}

fn llama31_8b_instruct() -> Value {
    json!({
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
      "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
      "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
      "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
      "pretraining_tp": 1, "rms_norm_eps": 1e-05,
      "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
      "transformers_version": "4.42.3", "use_cache": true, "vocab_size": 128256
    })
}

fn llama32_1b() -> Value {
    json!({
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
      "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
      "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
      "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
      "pretraining_tp": 1, "rms_norm_eps": 1e-05,
      "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
      "transformers_version": "4.45.0.dev0", "use_cache": true, "vocab_size": 128256
    })
}

fn tinyllama() -> Value {
    json!({
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 1,
      "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
      "intermediate_size": 5632, "max_position_embeddings": 2048, "model_type": "llama",
      "num_attention_heads": 32, "num_hidden_layers": 22, "num_key_value_heads": 4,
      "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null, "rope_theta": 10000.0,
      "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.35.0",
      "use_cache": true, "vocab_size": 32000
    })
}

/// SmolLM2 as its hub ships it (nanotron's extra keys included); the three
/// sizes differ in the shape keys and rope_theta.
fn smollm2(hidden: u64, inter: u64, layers: u64, heads: u64, kv: u64, theta: u64) -> Value {
    json!({
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": hidden,
      "initializer_range": 0.041666666666666664, "intermediate_size": inter,
      "is_llama_config": true, "max_position_embeddings": 8192, "mlp_bias": false,
      "model_type": "llama", "num_attention_heads": heads, "num_hidden_layers": layers,
      "num_key_value_heads": kv, "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
      "rope_interleaved": false, "rope_scaling": null, "rope_theta": theta,
      "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.42.3",
      "transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16", "fp16": "float16"}},
      "use_cache": true, "vocab_size": 49152
    })
}

/// SmolLM2-135M-Instruct loaded by transformers 5 and written back with
/// `save_pretrained`: both rope spellings, both dtype spellings,
/// `unk_token_id`.
fn smollm2_135m_transformers5() -> Value {
    json!({
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 1, "dtype": "float32", "eos_token_id": 2, "head_dim": 64,
      "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.02,
      "intermediate_size": 1536, "max_position_embeddings": 8192, "mlp_bias": false,
      "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
      "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
      "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
      "rope_scaling": {"rope_theta": 100000.0, "rope_type": "default"},
      "rope_theta": 100000, "tie_word_embeddings": true, "torch_dtype": "float32",
      "transformers_version": "5.23.0", "unk_token_id": 0, "use_cache": true,
      "vocab_size": 49152
    })
}

fn mistral_7b_instruct_v02() -> Value {
    json!({
      "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
      "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
      "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
      "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
      "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": null,
      "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.36.0",
      "use_cache": true, "vocab_size": 32000
    })
}

fn mistral_7b_v01() -> Value {
    json!({
      "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
      "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
      "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
      "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
      "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
      "tie_word_embeddings": false, "torch_dtype": "bfloat16",
      "transformers_version": "4.34.0.dev0", "use_cache": true, "vocab_size": 32000
    })
}

const LLAMA31_ROPE: RopeScaling = RopeScaling::Llama3 {
    factor: 8.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_max_position_embeddings: 8192.0,
};

#[test]
fn llama_families_parse_to_their_published_shapes() {
    let c = parse_value(&llama2_7b()).unwrap();
    assert_eq!(shape(&c), [4096, 11008, 32, 32, 32, 128, 32000]);
    assert_eq!(
        (c.rope_theta, c.rope_scaling, c.rms_norm_eps),
        (10000.0, RopeScaling::Default, 1e-5)
    );
    assert_eq!(c.torch_dtype, Some(DType::F16));
    assert_eq!(
        (c.bos_token_id, c.eos_token_ids.clone()),
        (Some(1), vec![2])
    );
    assert!(!c.tie_word_embeddings);

    let c = parse_value(&llama3_8b()).unwrap();
    assert_eq!(shape(&c), [4096, 14336, 32, 32, 8, 128, 128256]);
    assert_eq!(c.num_kv_groups(), 4);
    assert_eq!(
        (c.rope_theta, c.rope_scaling),
        (500000.0, RopeScaling::Default)
    );
    assert_eq!(c.torch_dtype, Some(DType::BF16));

    let c = parse_value(&llama31_8b_instruct()).unwrap();
    assert_eq!(shape(&c), [4096, 14336, 32, 32, 8, 128, 128256]);
    assert_eq!((c.rope_theta, c.rope_scaling), (500000.0, LLAMA31_ROPE));
    assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);

    let c = parse_value(&llama32_1b()).unwrap();
    assert_eq!(shape(&c), [2048, 8192, 16, 32, 8, 64, 128256]);
    assert!(c.tie_word_embeddings);
    assert_eq!(
        c.rope_scaling,
        RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0
        }
    );

    let c = parse_value(&tinyllama()).unwrap();
    assert_eq!(shape(&c), [2048, 5632, 22, 32, 4, 64, 32000]);
    assert_eq!(c.num_kv_groups(), 8);

    for c in [
        llama2_7b(),
        llama3_8b(),
        llama31_8b_instruct(),
        llama32_1b(),
        tinyllama(),
    ] {
        assert_eq!(parse_value(&c).unwrap().ignored_keys, Vec::<String>::new());
    }
}

#[test]
fn smollm2_sizes_parse_and_name_their_extra_keys() {
    let cases = [
        (
            smollm2(576, 1536, 30, 9, 3, 100000),
            [576, 1536, 30, 9, 3, 64, 49152],
            100000.0,
        ),
        (
            smollm2(960, 2560, 32, 15, 5, 100000),
            [960, 2560, 32, 15, 5, 64, 49152],
            100000.0,
        ),
        (
            smollm2(2048, 8192, 24, 32, 32, 130000),
            [2048, 8192, 24, 32, 32, 64, 49152],
            130000.0,
        ),
    ];
    for (cfg, want, theta) in cases {
        let c = parse_value(&cfg).unwrap();
        assert_eq!(shape(&c), want);
        assert_eq!(
            (c.rope_theta, c.rope_scaling),
            (theta, RopeScaling::Default)
        );
        assert!(c.tie_word_embeddings);
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert_eq!(
            (c.bos_token_id, c.eos_token_ids.clone(), c.pad_token_id),
            (Some(1), vec![2], Some(2))
        );
        assert_eq!(c.torch_dtype, Some(DType::BF16));
        assert_eq!(
            c.ignored_keys,
            [
                "is_llama_config",
                "rope_interleaved",
                "transformers.js_config"
            ]
        );
    }
}

#[test]
fn transformers5_output_with_both_spellings_is_accepted() {
    let cfg = smollm2_135m_transformers5();
    let c = parse_value(&cfg).unwrap();
    assert_eq!(shape(&c), [576, 1536, 30, 9, 3, 64, 49152]);
    assert_eq!(
        (c.rope_theta, c.rope_scaling),
        (100000.0, RopeScaling::Default)
    );
    assert_eq!(c.torch_dtype, Some(DType::F32));
    assert_eq!(c.ignored_keys, ["unk_token_id"]);
    // Each spelling alone gives the same config.
    for drop in [
        &["rope_parameters"][..],
        &["rope_scaling", "rope_theta"],
        &["rope_scaling"],
        &["dtype"],
        &["torch_dtype"],
    ] {
        let mut v = cfg.clone();
        for k in drop {
            v = without(&v, k);
        }
        assert_eq!(parse_value(&v).unwrap(), c, "without {drop:?}");
    }

    // llama3 rope in both spellings (integers against floats), and dtype
    // spelled two ways that mean the same.
    let v = with(
        &with(
            &llama31_8b_instruct(),
            "rope_parameters",
            json!({"rope_type": "llama3", "rope_theta": 500000, "factor": 8,
                   "low_freq_factor": 1, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192.0}),
        ),
        "dtype",
        json!("torch.bfloat16"),
    );
    let c = parse_value(&v).unwrap();
    assert_eq!((c.rope_theta, c.rope_scaling), (500000.0, LLAMA31_ROPE));
    assert_eq!(c.torch_dtype, Some(DType::BF16));
    assert_eq!(c.ignored_keys, Vec::<String>::new());
}

#[test]
fn contradictory_spellings_are_refused_naming_both_values() {
    let base = smollm2_135m_transformers5();
    let e = refused(&with(&base, "rope_theta", json!(10000.0)));
    assert!(
        e.contains("rope_theta is 10000") && e.contains("rope_parameters.rope_theta is 100000"),
        "{e}"
    );
    let e = refused(&with(
        &base,
        "rope_scaling",
        json!({"rope_theta": 500000.0, "rope_type": "default"}),
    ));
    assert!(
        e.contains("is 100000") && e.contains("rope_scaling.rope_theta is 500000"),
        "{e}"
    );
    let e = refused(&with(&base, "dtype", json!("bfloat16")));
    assert!(
        e.contains(r#"dtype is "bfloat16""#) && e.contains(r#"torch_dtype is "float32""#),
        "{e}"
    );

    let llama3 = |factor: f64| {
        json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192})
    };
    let e = refused(&with(
        &llama31_8b_instruct(),
        "rope_parameters",
        llama3(32.0),
    ));
    assert!(
        e.contains("rope_parameters.factor is 32 but rope_scaling.factor is 8"),
        "{e}"
    );
    let e = refused(&with(
        &llama31_8b_instruct(),
        "rope_parameters",
        json!({"rope_type": "default", "rope_theta": 500000.0}),
    ));
    assert!(
        e.contains(
            r#"rope_parameters.rope_type is "default" but rope_scaling.rope_type is "llama3""#
        ),
        "{e}"
    );
}

#[test]
fn mistral_is_accepted_only_without_a_sliding_window() {
    let c = parse_value(&mistral_7b_instruct_v02()).unwrap();
    assert_eq!(shape(&c), [4096, 14336, 32, 32, 8, 128, 32000]);
    assert_eq!(c.rope_theta, 1e6);
    assert_eq!(c.ignored_keys, Vec::<String>::new());

    let e = refused(&mistral_7b_v01());
    assert!(e.contains("sliding_window is 4096"), "{e}");
    // Mistral's default window applies when the key is absent.
    let e = refused(&without(&mistral_7b_instruct_v02(), "sliding_window"));
    assert!(
        e.contains(r#"model_type is "mistral""#) && e.contains("sliding_window is not given"),
        "{e}"
    );
    // A Llama config without the key has no window.
    assert!(parse_value(&without(&llama3_8b(), "sliding_window")).is_ok());
}

#[test]
fn other_architectures_are_refused_by_model_type() {
    for mt in [
        "qwen2", "gemma", "gemma2", "phi3", "olmo2", "mixtral", "granite",
    ] {
        let e = refused(&with(&llama3_8b(), "model_type", json!(mt)));
        assert!(e.contains(&format!("model_type is {mt:?}")), "{e}");
        assert!(e.contains(r#""llama", "mistral""#), "{e}");
    }
}

/// Every refused setting, with a value that changes the Llama math and one
/// that keeps it.
#[test]
fn each_unimplemented_setting_is_refused_by_name() {
    let cases: &[(&str, Value, Value)] = &[
        ("hidden_act", json!("gelu"), json!("silu")),
        (
            "hidden_activation",
            json!("gelu_pytorch_tanh"),
            json!("silu"),
        ),
        ("partial_rotary_factor", json!(0.5), json!(1)),
        ("sliding_window", json!(4096), Value::Null),
        ("use_sliding_window", json!(true), json!(false)),
        (
            "layer_types",
            json!(["sliding_attention", "full_attention"]),
            json!(["full_attention", "full_attention"]),
        ),
        ("attn_logit_softcapping", json!(50.0), Value::Null),
        ("final_logit_softcapping", json!(30.0), Value::Null),
        ("qk_norm", json!(true), json!(false)),
        ("use_qk_norm", json!(true), json!(false)),
        ("qk_layernorm", json!(true), json!(false)),
        ("attention_dropout", json!(0.1), json!(0.0)),
        ("num_local_experts", json!(8), json!(1)),
        ("num_experts", json!(16), Value::Null),
        ("embedding_multiplier", json!(12.0), json!(1.0)),
        ("residual_multiplier", json!(0.22), json!(1)),
        ("attention_multiplier", json!(0.0078125), Value::Null),
    ];
    // The test covers the whole list, and the list has a reason per entry.
    let mut tested: Vec<&str> = cases.iter().map(|c| c.0).collect();
    let mut listed: Vec<&str> = UNSUPPORTED.iter().map(|u| u.key).collect();
    tested.sort_unstable();
    listed.sort_unstable();
    assert_eq!(tested, listed);
    assert!(UNSUPPORTED.iter().all(|u| u.why.len() > 20));

    let base = llama3_8b();
    for (key, bad, good) in cases {
        let e = refused(&with(&base, key, bad.clone()));
        assert!(
            e.starts_with("config.json: ") && e.contains(&format!("{key} is {bad}")),
            "{key}: {e}"
        );
        let c = parse_value(&with(&base, key, good.clone()))
            .unwrap_or_else(|e| panic!("{key} = {good}: {e}"));
        assert_eq!(c.ignored_keys, Vec::<String>::new(), "{key}");
        assert_eq!(shape(&c), [4096, 14336, 32, 32, 8, 128, 128256]);
    }
    // A window switched off is no window (Qwen2's spelling).
    let qwen_style = with(
        &with(&base, "sliding_window", json!(4096)),
        "use_sliding_window",
        json!(false),
    );
    assert!(parse_value(&qwen_style).is_ok());

    // Inside the rope settings: unknown rope types and partial rotary.
    for (name, key) in [
        ("rope_scaling", "rope_type"),
        ("rope_parameters", "rope_type"),
        ("rope_scaling", "type"),
    ] {
        let e = refused(&with(
            &base,
            name,
            json!({key: "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}),
        ));
        assert!(e.contains(&format!("{name}.rope_type is \"yarn\"")), "{e}");
    }
    let e = refused(&with(
        &base,
        "rope_parameters",
        json!({"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.25}),
    ));
    assert!(
        e.contains("rope_parameters.partial_rotary_factor is 0.25"),
        "{e}"
    );
}

#[test]
fn unknown_keys_are_accepted_and_named_sorted() {
    let v = with(
        &with(
            &with(&llama2_7b(), "unk_token_id", json!(0)),
            "attn_implementation",
            json!("sdpa"),
        ),
        "_commit_hash",
        json!("abc"),
    );
    let c = parse_value(&v).unwrap();
    assert_eq!(c.ignored_keys, ["attn_implementation", "unk_token_id"]);
    // Apart from the list, the config is the one without the keys.
    let plain = parse_value(&llama2_7b()).unwrap();
    assert_eq!(
        LlamaConfig {
            ignored_keys: Vec::new(),
            ..c
        },
        plain
    );
}

/// Values of every JSON kind, nested a little.
fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (-3i64..200_000).prop_map(Value::from),
        (-2.0f64..2.0e6).prop_map(Value::from),
        "[a-z_0-9]{0,10}".prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("rope_type".to_string()),
                    Just("rope_theta".to_string()),
                    Just("factor".to_string()),
                    "[a-z_]{1,8}"
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]

    /// Setting any key (read, refused, neutral or unknown) of a real
    /// transformers 5 file to any value never panics, and an accepted
    /// config names only keys it neither read nor checked.
    #[test]
    fn config_with_any_value_never_panics(
        key in proptest::sample::select(vec![
            "rope_parameters", "rope_scaling", "rope_theta", "dtype", "torch_dtype",
            "model_type", "sliding_window", "use_sliding_window", "layer_types",
            "partial_rotary_factor", "head_dim", "hidden_size", "eos_token_id",
            "quantization_config", "unk_token_id", "max_position_embeddings",
        ]),
        value in any_json(),
    ) {
        let v = with(&smollm2_135m_transformers5(), key, value);
        if let Ok(c) = parse_value(&v) {
            let extra: Vec<&str> = c.ignored_keys.iter().map(String::as_str).collect();
            proptest::prop_assert!(extra == ["unk_token_id"], "{extra:?}");
        }
    }
}
