//! Forward time of the Llama model: the synthetic tiny model, and one
//! decoder block of Llama-3-8B's shape (hidden 4096, 32 query heads over 8
//! key/value heads, MLP 14336) with random weights, dense and NF4. Criterion
//! reports time per forward and tokens per second (throughput in elements =
//! tokens). CUDA rows run when built with `candle-cuda` and a GPU is there.
//!
//! Until the fused NF4 + LoRA op lands, every projection is plain candle ops
//! (NF4: dequantize on the host, then an f32 matmul), so these numbers are
//! the baseline the fused op is measured against.

use candle_core::{Device as CDevice, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tli_kernels::model::synthetic::{self, random_weights, tiny_config};
use tli_kernels::model::weights::safetensors_bytes;
use tli_kernels::model::{
    Checkpoint, ForwardOptions, Llama, LlamaConfig, LoadOptions, candle_device,
};
use tli_kernels::nf4::quantize::QuantizeOptions;

fn devices() -> Vec<(&'static str, CDevice)> {
    let mut v = vec![("cpu", CDevice::Cpu)];
    match candle_device(Some(0)) {
        Ok(d) => v.push(("cuda", d)),
        Err(e) => eprintln!("llama bench: no CUDA rows ({e})"),
    }
    v
}

fn inputs(batch: usize, seq: usize, vocab: usize, dev: &CDevice) -> (Tensor, Tensor) {
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| ((i * 7919 + 13) % vocab) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (batch, seq), dev).expect("ids");
    let mask = Tensor::ones((batch, seq), candle_core::DType::U32, dev).expect("mask");
    (ids, mask)
}

fn tiny(c: &mut Criterion) {
    let mut g = c.benchmark_group("llama_tiny");
    let (batch, seq) = (8, 8);
    g.throughput(Throughput::Elements((batch * seq) as u64));
    for (name, dev) in devices() {
        let opts = LoadOptions {
            device: dev.clone(),
            ..LoadOptions::default()
        };
        let (model, _) = synthetic::build(1, &opts).expect("synthetic model");
        let (ids, mask) = inputs(batch, seq, model.config.vocab_size, &dev);
        g.bench_function(BenchmarkId::new("f32_all_states", name), |b| {
            b.iter(|| {
                model
                    .hidden_states(&ids, &mask, &ForwardOptions::default())
                    .expect("forward")
            })
        });
    }
    g.finish();
}

fn llama3_8b_block() -> LlamaConfig {
    let mut cfg = tiny_config(1024, Some(0), Some(1));
    cfg.hidden_size = 4096;
    cfg.intermediate_size = 14336;
    cfg.num_hidden_layers = 1;
    cfg.num_attention_heads = 32;
    cfg.num_key_value_heads = 8;
    cfg.head_dim = 128;
    cfg.rope_theta = 500_000.0;
    cfg
}

fn block_8b(c: &mut Criterion) {
    let cfg = llama3_8b_block();
    let bytes = safetensors_bytes(&random_weights(&cfg, 3)).expect("weights");
    let ckpt = Checkpoint::from_bytes("llama3-8b-block.safetensors", bytes);
    let tensors = ckpt.tensors().expect("tensors");
    let mut g = c.benchmark_group("llama3_8b_block");
    g.sample_size(10);
    let (batch, seq) = (1, 16);
    g.throughput(Throughput::Elements((batch * seq) as u64));
    for (name, dev) in devices() {
        for (label, quantize) in [
            ("f32", None),
            (
                "nf4",
                Some(QuantizeOptions {
                    blocksize: 64,
                    double_quant: true,
                }),
            ),
        ] {
            let opts = LoadOptions {
                device: dev.clone(),
                quantize,
                ..LoadOptions::default()
            };
            let model = Llama::from_tensors(cfg.clone(), &tensors, &opts).expect("block");
            let (ids, mask) = inputs(batch, seq, cfg.vocab_size, &dev);
            let fo = ForwardOptions {
                up_to: Some(1),
                train_seed: None,
            };
            g.bench_function(BenchmarkId::new(format!("{label}_16_tokens"), name), |b| {
                b.iter(|| model.hidden_states(&ids, &mask, &fo).expect("forward"))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, tiny, block_8b);
criterion_main!(benches);
