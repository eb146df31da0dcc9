//! The fused NF4 + LoRA linear at Llama-3-8B projection shapes, forward and
//! backward, against the unfused composite on the same backend.
//!
//! Napkin math (bf16 activations, NF4 block size 64 = 0.5625 B/weight,
//! r = 16): the forward does `2·M·N·K + 2·M·r·(K + N)` flops and must read
//! `0.5625·N·K` bytes of weight plus `2·M·(K + N)` of activations. Below
//! M ≈ 83 tokens an H100 is bound by the weight stream, above it by its
//! tensor cores; a 2-core CPU is compute bound from M ≈ 1 on (the f32 GEMM
//! rate measured below is its ceiling). Each row prints both floors.
//!
//! Run: `cargo bench --bench lora_matmul` (add `--features cuda` on a GPU
//! machine for the device rows). The M = 4096 rows take minutes on two
//! cores; filter with e.g. `cargo bench --bench lora_matmul -- "M=16"`.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tli_kernels::lora::cpu;
use tli_kernels::lora::{
    BackwardArgs, BaseWeight, ForwardArgs, Grads, LinearDims, LoraFactors, forward_macs,
};
use tli_kernels::nf4::{Nf4Tensor, Scales};
use tli_kernels::roofline::{
    H100_SXM, format_duration, measure_copy_bandwidth, measure_cpu_gemm_flops,
};
use tli_kernels::{DType, Device};

/// (name, N = out_features, K = in_features) of the Llama-3-8B projections.
const SHAPES: &[(&str, usize, usize)] = &[
    ("q_proj 4096x4096", 4096, 4096),
    ("v_proj 1024x4096", 1024, 4096),
    ("mlp 14336x4096", 14336, 4096),
];
const TOKENS: &[usize] = &[1, 16, 512, 4096];
const RANK: usize = 16;
const BLOCKSIZE: usize = 64;

/// A random NF4 weight (random codes and scales: the op's cost does not
/// depend on the values).
fn nf4_weight(r: &mut ChaCha8Rng, n: usize, k: usize) -> Nf4Tensor {
    let numel = n * k;
    Nf4Tensor {
        packed: (0..numel.div_ceil(2)).map(|_| r.random()).collect(),
        scales: Scales::Plain(
            (0..numel.div_ceil(BLOCKSIZE))
                .map(|_| r.random_range(0.01f32..0.1))
                .collect(),
        ),
        blocksize: BLOCKSIZE,
        shape: vec![n, k],
        dtype: DType::BF16,
    }
}

fn random_bf16(r: &mut ChaCha8Rng, len: usize, amp: f32) -> Vec<bf16> {
    (0..len)
        .map(|_| bf16::from_f32(r.random_range(-amp..amp)))
        .collect()
}

/// One benched problem: a projection's weight and LoRA factors, and `M`
/// tokens of input and output gradient.
struct Problem {
    dims: LinearDims,
    w: Nf4Tensor,
    a: Vec<bf16>,
    b: Vec<bf16>,
    x: Vec<bf16>,
    dy: Vec<bf16>,
}

impl Problem {
    fn new(r: &mut ChaCha8Rng, w: &Nf4Tensor, a: &[bf16], b: &[bf16], m: usize) -> Self {
        let (n, k) = (w.shape[0], w.shape[1]);
        Self {
            dims: LinearDims { m, n, k },
            w: w.clone(),
            a: a.to_vec(),
            b: b.to_vec(),
            x: random_bf16(r, m * k, 1.0),
            dy: random_bf16(r, m * n, 1.0),
        }
    }

    fn args(&self) -> ForwardArgs<'_, bf16> {
        ForwardArgs {
            dims: self.dims,
            x: &self.x,
            weight: BaseWeight::Nf4(self.w.view()),
            lora: Some(LoraFactors {
                a: &self.a,
                b: &self.b,
                rank: RANK,
                scale: 2.0,
            }),
            bias: None,
            dropout: None,
        }
    }

    /// Forward flops, and the bytes the forward must move (NF4 weight,
    /// bf16 activations in and out).
    fn cost(&self) -> (f64, f64) {
        let LinearDims { m, n, k } = self.dims;
        let flops = 2.0 * forward_macs(self.dims, RANK) as f64;
        let bytes = 0.5625 * (n * k) as f64 + 2.0 * (m * (k + n)) as f64;
        (flops, bytes)
    }
}

struct Machine {
    copy_bw: f64,
    gemm_flops: f64,
}

fn floors(m: &Machine, bytes: f64, flops: f64) -> String {
    let cpu = (bytes / m.copy_bw).max(flops / m.gemm_flops);
    format!(
        "floor {} on {}, {} on this CPU",
        format_duration(H100_SXM.floor(bytes, flops)),
        H100_SXM.name,
        format_duration(Duration::from_secs_f64(cpu)),
    )
}

fn bench_cpu(c: &mut Criterion, machine: &Machine) {
    let mut group = c.benchmark_group("lora_matmul/cpu/bf16");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(2));
    let mut r = ChaCha8Rng::seed_from_u64(7);
    for &(name, n, k) in SHAPES {
        let w = nf4_weight(&mut r, n, k);
        let a = random_bf16(&mut r, RANK * k, 0.05);
        let b = random_bf16(&mut r, n * RANK, 0.05);
        for &m in TOKENS {
            let p = Problem::new(&mut r, &w, &a, &b, m);
            let args = p.args();
            let (flops, bytes) = p.cost();
            let label = format!("{name} M={m} r={RANK}");
            println!(
                "lora_matmul/cpu/bf16/{label}: {:.1} GFLOP, {:.1} MB; {}",
                flops / 1e9,
                bytes / 1e6,
                floors(machine, bytes, flops)
            );
            let mut out = vec![bf16::ZERO; m * n];
            group.bench_function(BenchmarkId::new("forward fused", &label), |bch| {
                bch.iter(|| cpu::forward(&args, &mut out).expect("forward"))
            });
            group.bench_function(BenchmarkId::new("forward unfused", &label), |bch| {
                bch.iter(|| cpu::forward_unfused(&args, &mut out).expect("forward unfused"))
            });
            // Backward: dx is the same GEMM as the forward, dA and dB add
            // 2·M·r·(K + N) multiply-adds each way.
            let mut dx = vec![bf16::ZERO; m * k];
            let mut da = vec![bf16::ZERO; RANK * k];
            let mut db = vec![bf16::ZERO; n * RANK];
            let bwd = BackwardArgs {
                fwd: args,
                dy: &p.dy,
            };
            group.bench_function(BenchmarkId::new("backward fused", &label), |bch| {
                bch.iter(|| {
                    cpu::backward(
                        &bwd,
                        Grads {
                            dx: Some(&mut dx),
                            da: Some(&mut da),
                            db: Some(&mut db),
                        },
                    )
                    .expect("backward")
                })
            });
            group.bench_function(BenchmarkId::new("backward unfused", &label), |bch| {
                bch.iter(|| {
                    cpu::backward_unfused(
                        &bwd,
                        Grads {
                            dx: Some(&mut dx),
                            da: Some(&mut da),
                            db: Some(&mut db),
                        },
                    )
                    .expect("backward unfused")
                })
            });
            if m >= 512 {
                let mut out2 = out.clone();
                let fwd_ratio = paired_ratio(
                    || cpu::forward(&args, &mut out).expect("forward"),
                    || cpu::forward_unfused(&args, &mut out2).expect("forward unfused"),
                );
                let (mut dx2, mut da2, mut db2) = (dx.clone(), da.clone(), db.clone());
                let bwd_ratio = paired_ratio(
                    || {
                        cpu::backward(
                            &bwd,
                            Grads {
                                dx: Some(&mut dx),
                                da: Some(&mut da),
                                db: Some(&mut db),
                            },
                        )
                        .expect("backward")
                    },
                    || {
                        cpu::backward_unfused(
                            &bwd,
                            Grads {
                                dx: Some(&mut dx2),
                                da: Some(&mut da2),
                                db: Some(&mut db2),
                            },
                        )
                        .expect("backward unfused")
                    },
                );
                println!(
                    "lora_matmul/cpu/bf16/{label}: fused / unfused, median of {AB_PAIRS} interleaved pairs: forward {}, backward {}",
                    fwd_ratio, bwd_ratio
                );
            }
        }
    }
    group.finish();
}

/// Interleaved A/B runs for the GEMM-bound rows, where fused and unfused
/// run the same f32 GEMM and differ by the decode (well under 1 % of the
/// time at M = 4096): criterion measures one after the other, so load that
/// changes over minutes on a shared machine can flip their order. Pairs of
/// (fused, unfused) back to back see the same load.
const AB_PAIRS: usize = 9;

/// The median over [`AB_PAIRS`] back-to-back pairs of `time(a) / time(b)`,
/// with the smallest and largest ratio, formatted.
fn paired_ratio(mut a: impl FnMut(), mut b: impl FnMut()) -> String {
    let time = |f: &mut dyn FnMut()| {
        let t = std::time::Instant::now();
        f();
        t.elapsed().as_secs_f64()
    };
    let mut ratios: Vec<f64> = (0..AB_PAIRS)
        .map(|i| {
            // Alternate which goes first, so neither always runs on a
            // cache the other warmed.
            if i % 2 == 0 {
                let ta = time(&mut a);
                ta / time(&mut b)
            } else {
                let tb = time(&mut b);
                time(&mut a) / tb
            }
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    format!(
        "{:.3} ({:.3}–{:.3})",
        ratios[AB_PAIRS / 2],
        ratios[0],
        ratios[AB_PAIRS - 1]
    )
}

#[cfg(tli_cuda)]
fn bench_cuda(c: &mut Criterion) {
    use tli_kernels::backend::cuda::Cuda;
    let gpu = match Cuda::global() {
        Ok(g) => g,
        Err(e) => {
            println!("lora_matmul/cuda: skipped: {e}");
            return;
        }
    };
    let mut group = c.benchmark_group(format!("lora_matmul/cuda/{}", gpu.name()));
    group.sample_size(20);
    let mut r = ChaCha8Rng::seed_from_u64(7);
    for &(name, n, k) in SHAPES {
        let w = nf4_weight(&mut r, n, k);
        let a = random_bf16(&mut r, RANK * k, 0.05);
        let b = random_bf16(&mut r, n * RANK, 0.05);
        for &m in TOKENS {
            let p = Problem::new(&mut r, &w, &a, &b, m);
            let args = p.args();
            let (flops, bytes) = p.cost();
            let label = format!("{name} M={m} r={RANK}");
            println!(
                "lora_matmul/cuda/bf16/{label}: floor {} on {} (host-slice API: includes copies)",
                format_duration(H100_SXM.floor(bytes, flops)),
                H100_SXM.name
            );
            let mut out = vec![bf16::ZERO; m * n];
            group.bench_function(
                BenchmarkId::new("forward fused (host slices)", &label),
                |bch| {
                    bch.iter(|| {
                        tli_kernels::ops::lora_matmul::forward(Device::Cuda, &args, &mut out)
                            .expect("forward")
                    })
                },
            );
        }
    }
    group.finish();
}

#[cfg(not(tli_cuda))]
fn bench_cuda(_c: &mut Criterion) {
    let _ = Device::Cuda;
    println!("lora_matmul/cuda: skipped: built without the `cuda` feature");
}

fn main() {
    let machine = Machine {
        copy_bw: measure_copy_bandwidth(512 << 20, 5),
        gemm_flops: measure_cpu_gemm_flops(2048, 3),
    };
    println!(
        "this machine: {} rayon threads, memory copy {:.2} GB/s, f32 GEMM {:.1} GFLOP/s (gemm crate, 2048^3, best of 3)",
        rayon::current_num_threads(),
        machine.copy_bw / 1e9,
        machine.gemm_flops / 1e9
    );
    let mut c = Criterion::default().configure_from_args();
    bench_cpu(&mut c, &machine);
    bench_cuda(&mut c);
    c.final_summary();
}
