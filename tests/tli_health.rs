//! Training and evaluation that never produce or keep non-finite numbers:
//! a diverging run stops with the step named and nothing non-finite saved;
//! a NaN adapter is neither saved nor loaded; NaN weights make scan an error
//! naming the layer and the word, never a table of NaNs.

mod common;

use std::ops::ControlFlow;

use candle_core::Tensor;
use tli_kernels::model::lora::{self, LoraConfig, load_peft, save_peft};
use tli_kernels::model::{LoadOptions, synthetic};
use tli_kernels::pairs::shipped;
use tli_kernels::tli::scan::{ScanOptions, scan};
use tli_kernels::tli::train::{TrainOptions, train};

const SEED: u64 = 11;

#[test]
fn a_diverging_run_stops_at_the_step_and_saves_nothing_non_finite() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let (mut m, tok) = synthetic::build(SEED, &LoadOptions::default()).unwrap();
    let pairs: Vec<_> = shipped().unwrap().0.into_iter().take(16).collect();
    let opts = TrainOptions {
        lr: 1e30,
        warmup: 0,
        epochs: 3,
        batch: 4,
        out: Some(out.clone()),
        ..TrainOptions::default()
    };
    let mut steps = 0;
    let e = train(&mut m, &tok, &pairs, &opts, &mut |_| {
        steps += 1;
        ControlFlow::Continue(())
    })
    .unwrap_err()
    .to_string();
    // The first step moves every parameter by about lr; the next loss or
    // gradient is no longer finite, and the run stops there.
    assert!(steps >= 1, "{e}");
    assert!(
        e.contains(&format!("step {} of", steps + 1)) && e.contains("Lower --lr"),
        "{e}"
    );
    assert!(
        e.contains("NaN") || e.contains("inf"),
        "the message names the value: {e}"
    );
    // Nothing was saved (the first epoch never ended).
    assert!(!out.join("checkpoint").exists(), "{e}");
}

#[test]
fn non_finite_adapters_are_neither_saved_nor_loaded() {
    let d = tempfile::tempdir().unwrap();
    let (mut m, _) = synthetic::build(SEED, &LoadOptions::default()).unwrap();
    let cfg = LoraConfig::default();
    lora::attach(&mut m, &cfg, 5).unwrap();
    common::randomize_lora_b(&m, 3, 0.1);
    // A good adapter, saved.
    let good = d.path().join("good");
    save_peft(&m, &cfg, &good).unwrap();
    // One NaN in one factor: refused, and nothing is written.
    let b = lora::trainable_vars(&m)[1].clone();
    let mut v = b
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    v[3] = f32::NAN;
    b.set(&Tensor::from_vec(v, b.as_tensor().dims(), b.as_tensor().device()).unwrap())
        .unwrap();
    let bad = d.path().join("bad");
    let e = save_peft(&m, &cfg, &bad).unwrap_err().to_string();
    assert!(e.contains("non-finite") && e.contains("index 3"), "{e}");
    assert!(!bad.join("adapter_model.safetensors").exists());
    // A file holding an infinity (the last f32 of the data section, which
    // safetensors puts at the end of the file): refused on load.
    let file = good.join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&f32::INFINITY.to_le_bytes());
    std::fs::write(&file, &bytes).unwrap();
    let (mut fresh, _) = synthetic::build(SEED, &LoadOptions::default()).unwrap();
    let e = load_peft(&mut fresh, &good).unwrap_err().to_string();
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("inf"),
        "{e}"
    );
}

#[test]
fn scan_refuses_non_finite_hidden_states_naming_layer_and_word() {
    let (mut m, tok) = synthetic::build(SEED, &LoadOptions::default()).unwrap();
    // A NaN in block 1's adapter reaches hidden state 2 and later, not 0 or 1.
    let cfg = LoraConfig {
        layers: Some(vec![1]),
        ..LoraConfig::default()
    };
    lora::attach(&mut m, &cfg, 5).unwrap();
    for v in lora::trainable_vars(&m) {
        let dims = v.as_tensor().dims().to_vec();
        let n: usize = dims.iter().product();
        v.set(&Tensor::from_vec(vec![f32::NAN; n], dims, v.as_tensor().device()).unwrap())
            .unwrap();
    }
    let pairs: Vec<_> = shipped().unwrap().0.into_iter().take(3).collect();
    let early = ScanOptions {
        layers: Some(vec![0, 1]),
        ..ScanOptions::default()
    };
    scan(&m, &tok, &pairs, &early).unwrap();
    let e = scan(&m, &tok, &pairs, &ScanOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("hidden state 2") && e.contains(&format!("{:?}", pairs[0].swahili)),
        "{e}"
    );
}
