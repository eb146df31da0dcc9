//! NF4 dequantization at Llama-3-8B projection shapes.
//!
//! Napkin math (bf16 out, block size 64): each element moves 0.5 B of codes,
//! 4/64 B of absmax and 2 B of output, 2.5625 B in all. A 4096×4096 weight is
//! therefore 43.0 MB of traffic: 12.8 µs at H100's 3.35 TB/s, and on a CPU
//! the copy bandwidth measured below sets the floor the same way.
//!
//! Run: `cargo bench --bench nf4_dequant` (add `--features cuda` on a GPU
//! machine for the device rows).

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tli_kernels::nf4::quantize::{QuantizeOptions, quantize};
use tli_kernels::nf4::{Nf4Tensor, dequant, dequant_traffic_bytes};
use tli_kernels::roofline::{H100_SXM, format_duration, measure_copy_bandwidth};
use tli_kernels::{DType, Element};

/// (name, out_features, in_features) of the Llama-3-8B projections.
const SHAPES: &[(&str, usize, usize)] = &[
    ("q_proj 4096x4096", 4096, 4096),
    ("v_proj 1024x4096", 1024, 4096),
    ("mlp 14336x4096", 14336, 4096),
];

fn weight(rows: usize, cols: usize, double_quant: bool) -> Nf4Tensor {
    let mut r = ChaCha8Rng::seed_from_u64(rows as u64 * 31 + cols as u64);
    let data: Vec<f32> = (0..rows * cols)
        .map(|_| r.random_range(-0.05f32..0.05))
        .collect();
    let opts = QuantizeOptions {
        blocksize: 64,
        double_quant,
    };
    quantize(&data, &[rows, cols], DType::BF16, opts).expect("quantize bench weight")
}

fn bench_cpu<T: Element>(c: &mut Criterion, copy_bw: f64) {
    let mut group = c.benchmark_group(format!("nf4_dequant/cpu/{}", T::DTYPE));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for &(name, rows, cols) in SHAPES {
        for double in [false, true] {
            let w = weight(rows, cols, double);
            let n = w.numel();
            let bytes = dequant_traffic_bytes(n, w.blocksize, double, T::DTYPE.size());
            let label = format!("{name}{}", if double { " dq" } else { "" });
            println!(
                "nf4_dequant/cpu/{}/{label}: {:.1} MB moved; floor {} on {} ({:.2} TB/s), {} on this CPU (copy {:.1} GB/s)",
                T::DTYPE,
                bytes as f64 / 1e6,
                format_duration(H100_SXM.floor(bytes as f64, 0.0)),
                H100_SXM.name,
                H100_SXM.bytes_per_s / 1e12,
                format_duration(Duration::from_secs_f64(bytes as f64 / copy_bw)),
                copy_bw / 1e9,
            );
            group.throughput(Throughput::Bytes(bytes as u64));
            let mut out = vec![T::zeroed(); n];
            group.bench_function(BenchmarkId::from_parameter(&label), |b| {
                b.iter(|| dequant::dequantize_into(&w.view(), &mut out).expect("dequantize"))
            });
        }
    }
    group.finish();
}

#[cfg(tli_cuda)]
fn bench_cuda(c: &mut Criterion) {
    cuda::bench(c);
}

#[cfg(not(tli_cuda))]
fn bench_cuda(_c: &mut Criterion) {
    println!("nf4_dequant/cuda: skipped: built without the `cuda` feature");
}

#[cfg(tli_cuda)]
mod cuda {
    use super::*;
    use tli_kernels::backend::cuda::Cuda;

    pub fn bench(c: &mut Criterion) {
        let gpu = match Cuda::global() {
            Ok(g) => g,
            Err(e) => {
                println!("nf4_dequant/cuda: skipped: {e}");
                return;
            }
        };
        let mut group = c.benchmark_group(format!("nf4_dequant/cuda/{}", gpu.name()));
        group.sample_size(20);
        for &(name, rows, cols) in SHAPES {
            for double in [false, true] {
                let w = weight(rows, cols, double);
                let n = w.numel();
                let bytes = dequant_traffic_bytes(n, w.blocksize, double, 2);
                let label = format!("{name}{}", if double { " dq" } else { "" });
                println!(
                    "nf4_dequant/cuda/bf16/{label}: {:.1} MB moved; floor {} on {}",
                    bytes as f64 / 1e6,
                    format_duration(H100_SXM.floor(bytes as f64, 0.0)),
                    H100_SXM.name,
                );
                let dev = gpu.upload_nf4(&w.view()).expect("upload");
                let mut out = gpu.alloc_zeros::<bf16>(n).expect("alloc");
                group.throughput(Throughput::Bytes(bytes as u64));
                group.bench_function(BenchmarkId::from_parameter(&label), |b| {
                    b.iter(|| {
                        gpu.nf4_dequant(&dev, &mut out).expect("launch");
                        gpu.synchronize().expect("sync");
                    })
                });
            }
        }
        group.finish();
    }
}

fn main() {
    let copy_bw = measure_copy_bandwidth(512 << 20, 5);
    println!(
        "this machine: {} rayon threads, memory copy {:.2} GB/s (read + write, best of 5, 512 MiB)",
        rayon::current_num_threads(),
        copy_bw / 1e9
    );
    let mut c = Criterion::default().configure_from_args();
    bench_cpu::<bf16>(&mut c, copy_bw);
    bench_cpu::<f32>(&mut c, copy_bw);
    bench_cuda(&mut c);
    c.final_summary();
}
