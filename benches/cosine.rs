//! Cosine similarity: the fused pair path against the unfused composite
//! (pool, normalise, dot as separate passes), and the N×M matrix.
//!
//! Napkin math (bf16, D = 4096): a pair of single vectors reads 2 · 8 KiB,
//! so N = 10k pairs is 164 MB: 49 µs at H100's 3.35 TB/s. The composite
//! additionally writes and re-reads two `[N, D]` f32 intermediates
//! (pooled, then normalised in place): 4 more f32 passes over 2·N·D values
//! on top of the input. The matrix is compared with the same steps as
//! separate candle ops (widen, norm, divide, matmul, clamp), whose extra
//! passes are O(N·D) next to the product's O(N·M·D): the gap should be
//! small and shrink with N. The 8k × 8k matrix at D = 4096 is 550 GFLOP: 0.56 ms
//! at 990 dense bf16 TFLOP/s.
//!
//! Run: `cargo bench --bench cosine` (add `--features cuda` on a GPU machine
//! for the device rows).

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tli_kernels::cosine::{self, COSINE_EPS, Hidden, NORMALIZE_EPS, PairOptions, cpu};
use tli_kernels::ops::cosine::{cosine_matrix, pooled_cosine};
use tli_kernels::roofline::{H100_SXM, format_duration, measure_copy_bandwidth};
use tli_kernels::{DType, Device};

const DIM: usize = 4096;

fn data(seed: u64, len: usize) -> Vec<bf16> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..len)
        .map(|_| bf16::from_f32(r.random_range(-1.0f32..1.0)))
        .collect()
}

/// Every row pools positions 0..3 of 8, plus each later one with
/// probability 1/2 (padding and special tokens masked out).
fn mask(seed: u64, n: usize, seq: usize) -> Vec<u8> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n * seq)
        .map(|i| u8::from(i % seq < 3 || r.random_bool(0.5)))
        .collect()
}

/// The unfused composite on the CPU: pool both sides into `[N, D]` f32,
/// normalise both in place, dot the rows.
fn composite(
    a: &Hidden<'_, bf16>,
    ma: Option<&[u8]>,
    b: &Hidden<'_, bf16>,
    mb: Option<&[u8]>,
    pa: &mut [f32],
    pb: &mut [f32],
    out: &mut [f32],
) {
    cpu::pool_into(a, ma, None, pa);
    cpu::pool_into(b, mb, None, pb);
    cpu::normalize_rows(pa, DIM, NORMALIZE_EPS);
    cpu::normalize_rows(pb, DIM, NORMALIZE_EPS);
    cpu::dot_rows(pa, pb, DIM, out);
}

/// The unfused matrix composite as one would write it in candle: widen to
/// f32, normalise each side (`x / max(‖x‖, eps)`: norm, clamp, divide as
/// separate passes), multiply (candle's CPU matmul, the same `gemm` crate
/// the fused path calls), clamp to [-1, 1].
fn matrix_composite(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    let unit = |t: &candle_core::Tensor| -> candle_core::Result<candle_core::Tensor> {
        let t = t.to_dtype(candle_core::DType::F32)?;
        let norm = t
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(f64::from(COSINE_EPS), f64::INFINITY)?;
        t.broadcast_div(&norm)
    };
    unit(a)?.matmul(&unit(b)?.t()?)?.clamp(-1.0, 1.0)
}

fn bench_pairs(c: &mut Criterion, copy_bw: f64, label: &str, seq: usize, sizes: &[usize]) {
    let mut group = c.benchmark_group(format!("cosine/{label}/cpu"));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for &n in sizes {
        let a = data(1, n * seq * DIM);
        let b = data(2, n * seq * DIM);
        let masks = (seq > 1).then(|| (mask(3, n, seq), mask(4, n, seq)));
        let (ma, mb) = match &masks {
            Some((x, y)) => (Some(x.as_slice()), Some(y.as_slice())),
            None => (None, None),
        };
        let set = |m: Option<&[u8]>| m.map_or(n * seq, |m| m.iter().filter(|&&x| x != 0).count());
        let bytes = cosine::pairs_traffic_bytes(
            DType::BF16,
            DIM,
            set(ma),
            set(mb),
            masks.as_ref().map_or(0, |_| 2 * n * seq),
            n,
        );
        println!(
            "cosine/{label}/N={n} (bf16, D={DIM}, seq {seq}): fused reads {:.1} MB; floor {} on {} ({:.2} TB/s), {} on this CPU (copy {:.1} GB/s)",
            bytes as f64 / 1e6,
            format_duration(H100_SXM.floor(bytes as f64, 0.0)),
            H100_SXM.name,
            H100_SXM.bytes_per_s / 1e12,
            format_duration(Duration::from_secs_f64(bytes as f64 / copy_bw)),
            copy_bw / 1e9,
        );
        let (ha, hb) = (
            Hidden::contiguous(&a, n, seq, DIM),
            Hidden::contiguous(&b, n, seq, DIM),
        );
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(BenchmarkId::new("fused", n), |bch| {
            bch.iter(|| {
                pooled_cosine(Device::Cpu, &ha, ma, &hb, mb, PairOptions::default()).expect("fused")
            })
        });
        let mut pa = vec![0.0f32; n * DIM];
        let mut pb = vec![0.0f32; n * DIM];
        let mut out = vec![0.0f32; n];
        group.bench_function(BenchmarkId::new("unfused", n), |bch| {
            bch.iter(|| composite(&ha, ma, &hb, mb, &mut pa, &mut pb, &mut out))
        });
    }
    group.finish();
}

fn bench_matrix(c: &mut Criterion) {
    let mut group = c.benchmark_group("cosine/matrix/cpu");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for &n in &[1024usize, 8192] {
        let a = data(5, n * DIM);
        let b = data(6, n * DIM);
        let flops = cosine::matrix_flops(n, n, DIM);
        let bytes = (2 * n * DIM * 2 + n * n * 4) as f64;
        println!(
            "cosine/matrix/{n}x{n} (bf16, D={DIM}): {:.1} GFLOP, {:.1} MB; floor {} on {} (990 TFLOP/s, 3.35 TB/s)",
            flops / 1e9,
            bytes / 1e6,
            format_duration(H100_SXM.floor(bytes, flops)),
            H100_SXM.name,
        );
        let (ha, hb) = (Hidden::rows(&a, n, DIM), Hidden::rows(&b, n, DIM));
        group.throughput(Throughput::Elements(flops as u64));
        group.bench_function(BenchmarkId::new("fused", format!("{n}x{n}")), |bch| {
            bch.iter(|| cosine_matrix(Device::Cpu, &ha, &hb, COSINE_EPS).expect("matrix"))
        });
        let dev = candle_core::Device::Cpu;
        let ta = candle_core::Tensor::from_slice(&a, (n, DIM), &dev).expect("tensor");
        let tb = candle_core::Tensor::from_slice(&b, (n, DIM), &dev).expect("tensor");
        group.bench_function(BenchmarkId::new("unfused", format!("{n}x{n}")), |bch| {
            bch.iter(|| matrix_composite(&ta, &tb).expect("composite"))
        });
    }
    group.finish();
}

#[cfg(tli_cuda)]
fn bench_cuda(c: &mut Criterion) {
    cuda::bench(c);
}

#[cfg(not(tli_cuda))]
fn bench_cuda(_c: &mut Criterion) {
    println!("cosine/cuda: skipped: built without the `cuda` feature");
}

#[cfg(tli_cuda)]
mod cuda {
    use super::*;
    use tli_kernels::backend::cuda::{Cuda, DeviceHidden};

    pub fn bench(c: &mut Criterion) {
        let gpu = match Cuda::global() {
            Ok(g) => g,
            Err(e) => {
                println!("cosine/cuda: skipped: {e}");
                return;
            }
        };
        let mut group = c.benchmark_group(format!("cosine/cuda/{}", gpu.name()));
        group.sample_size(20);
        for &n in &[1000usize, 10_000, 100_000] {
            let a = gpu.to_device(&data(1, n * DIM)).expect("upload");
            let b = gpu.to_device(&data(2, n * DIM)).expect("upload");
            let mut out = gpu.alloc_zeros::<f32>(n).expect("alloc");
            let bytes = cosine::pairs_traffic_bytes(DType::BF16, DIM, n, n, 0, n);
            println!(
                "cosine/cuda/pairs N={n}: {:.1} MB; floor {} on {}",
                bytes as f64 / 1e6,
                format_duration(H100_SXM.floor(bytes as f64, 0.0)),
                H100_SXM.name
            );
            let view = |s| DeviceHidden {
                data: s,
                batch: n,
                seq: 1,
                dim: DIM,
                stride_b: DIM,
                stride_t: DIM,
            };
            group.throughput(Throughput::Bytes(bytes as u64));
            group.bench_function(BenchmarkId::new("pairs", n), |bch| {
                bch.iter(|| {
                    gpu.cosine_pairs(
                        &view(a.as_view()),
                        None,
                        &view(b.as_view()),
                        None,
                        COSINE_EPS,
                        &mut out.as_view_mut(),
                        None,
                    )
                    .expect("launch");
                    gpu.synchronize().expect("sync");
                })
            });
        }
        for &n in &[1024usize, 8192] {
            let a = gpu.to_device(&data(5, n * DIM)).expect("upload");
            let b = gpu.to_device(&data(6, n * DIM)).expect("upload");
            let mut out = gpu.alloc_zeros::<f32>(n * n).expect("alloc");
            let flops = cosine::matrix_flops(n, n, DIM);
            let view = |s| DeviceHidden {
                data: s,
                batch: n,
                seq: 1,
                dim: DIM,
                stride_b: DIM,
                stride_t: DIM,
            };
            group.throughput(Throughput::Elements(flops as u64));
            group.bench_function(BenchmarkId::new("matrix", n), |bch| {
                bch.iter(|| {
                    gpu.cosine_matrix(
                        &view(a.as_view()),
                        &view(b.as_view()),
                        COSINE_EPS,
                        &mut out.as_view_mut(),
                    )
                    .expect("launch");
                    gpu.synchronize().expect("sync");
                })
            });
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
    // Plain vector pairs (seq 1) at the sizes, then the evaluation
    // shape: 8-position sequences with masks (100k of those would need
    // 13 GB of hidden states, more than this machine should hold).
    bench_pairs(&mut c, copy_bw, "pairs", 1, &[1000, 10_000, 100_000]);
    bench_pairs(&mut c, copy_bw, "pooled-seq8", 8, &[1000, 10_000]);
    bench_matrix(&mut c);
    bench_cuda(&mut c);
    c.final_summary();
}
