//! `tli bench`: the three ops at Llama-3-8B shapes, timed on one device,
//! with throughput and roofline floors.
//!
//! Each case is run once to warm up, then repeated until `min_time` has
//! passed (at least `min_reps` times); the best and the median wall times
//! are reported. Throughput is computed from the best time: bytes the op
//! must move (GB/s) for the memory-bound ops, flops (TFLOP/s) for the
//! matrix ones. Floors are [`crate::roofline::Peak::floor`] for H100 SXM
//! and, on the CPU, for this machine's measured copy bandwidth and f32 GEMM
//! rate (a vendor peak would overstate what the CPU paths can reach).
//!
//! The criterion benches in `benches/` sweep more variants; this is the
//! quick look a user runs on their own machine.

use std::time::{Duration, Instant};

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::cosine::{Hidden, PairOptions, matrix_flops, pairs_traffic_bytes};
use crate::lora::{BaseWeight, ForwardArgs, LinearDims, LoraFactors, forward_macs};
use crate::nf4::quantize::{QuantizeOptions, quantize};
use crate::nf4::{Nf4Tensor, dequant_traffic_bytes};
use crate::roofline::{H100_SXM, Peak, measure_copy_bandwidth, measure_cpu_gemm_flops};
use crate::{DType, Device, Error, Result};

/// Which ops to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchOp {
    /// NF4 dequantization to bf16.
    Nf4,
    /// The fused NF4 + LoRA linear, forward.
    Lora,
    /// Fused pool + normalise + pair cosine, and the cosine matrix.
    Cosine,
}

/// Options of [`run`].
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Ops to run, in order.
    pub ops: Vec<BenchOp>,
    /// Device (cpu or cuda; the simulator proves logic, not speed).
    pub device: Device,
    /// Divide every dimension of the Llama-3-8B shapes by this (1: the real
    /// shapes; tests use more).
    pub shrink: usize,
    /// Keep repeating a case until this much time has passed.
    pub min_time: Duration,
    /// Run each case at least this many times (after the warm-up).
    pub min_reps: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            ops: vec![BenchOp::Nf4, BenchOp::Lora, BenchOp::Cosine],
            device: Device::Cpu,
            shrink: 1,
            min_time: Duration::from_millis(500),
            min_reps: 3,
        }
    }
}

/// One timed case.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// `nf4`, `lora` or `cosine`.
    pub op: &'static str,
    /// What was run, with its shape.
    pub case: String,
    /// Timed repetitions.
    pub reps: usize,
    /// Best wall time, seconds.
    pub best_s: f64,
    /// Median wall time, seconds.
    pub median_s: f64,
    /// Bytes the op must move at least.
    pub bytes: f64,
    /// Flops it does (multiply-add = 2).
    pub flops: f64,
    /// `bytes / best_s` in GB/s.
    pub gb_per_s: f64,
    /// `flops / best_s` in TFLOP/s.
    pub tflop_per_s: f64,
    /// Roofline floor on H100 SXM, seconds.
    pub floor_h100_s: f64,
    /// Roofline floor on this machine (CPU only: measured copy bandwidth
    /// and GEMM rate), seconds.
    pub floor_here_s: Option<f64>,
}

/// What [`run`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Device name.
    pub device: String,
    /// This CPU's measured copy bandwidth (bytes/s), when the device is the
    /// CPU.
    pub cpu_copy_bytes_per_s: Option<f64>,
    /// This CPU's measured f32 GEMM rate (flop/s), when the device is the
    /// CPU.
    pub cpu_gemm_flop_per_s: Option<f64>,
    /// Every case.
    pub results: Vec<BenchResult>,
}

struct Timer<'a> {
    opts: &'a BenchOptions,
    here: Option<Peak>,
    results: Vec<BenchResult>,
}

impl Timer<'_> {
    fn case(
        &mut self,
        op: &'static str,
        case: String,
        bytes: f64,
        flops: f64,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        f()?;
        let mut times = Vec::new();
        let start = Instant::now();
        while times.len() < self.opts.min_reps.max(1) || start.elapsed() < self.opts.min_time {
            let t = Instant::now();
            f()?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let best = times[0].max(1e-12);
        self.results.push(BenchResult {
            op,
            case,
            reps: times.len(),
            best_s: best,
            median_s: times[times.len() / 2],
            bytes,
            flops,
            gb_per_s: bytes / best / 1e9,
            tflop_per_s: flops / best / 1e12,
            floor_h100_s: H100_SXM.floor(bytes, flops).as_secs_f64(),
            floor_here_s: self.here.map(|p| p.floor(bytes, flops).as_secs_f64()),
        });
        Ok(())
    }
}

/// Llama-3-8B projection shapes `(name, N, K)`.
const SHAPES: [(&str, usize, usize); 3] = [
    ("q_proj", 4096, 4096),
    ("v_proj", 1024, 4096),
    ("mlp", 14336, 4096),
];

fn weight(r: &mut ChaCha8Rng, n: usize, k: usize) -> Result<Nf4Tensor> {
    let v: Vec<f32> = (0..n * k).map(|_| r.random_range(-0.05f32..0.05)).collect();
    quantize(
        &v,
        &[n, k],
        DType::BF16,
        QuantizeOptions {
            blocksize: 64,
            double_quant: false,
        },
    )
}

fn random_bf16(r: &mut ChaCha8Rng, len: usize) -> Vec<bf16> {
    (0..len)
        .map(|_| bf16::from_f32(r.random_range(-1.0f32..1.0)))
        .collect()
}

/// Run the benchmark.
///
/// # Errors
/// [`Error::InvalidArgument`] for the simulator, no ops or `shrink` 0;
/// [`Error::NoCudaDevice`] when CUDA is asked for and cannot run; errors of
/// the ops.
pub fn run(opts: &BenchOptions) -> Result<BenchReport> {
    const OP: &str = "bench";
    if opts.device == Device::Sim {
        return Err(Error::invalid(
            OP,
            "the simulator proves kernel logic, not speed: bench on cpu or cuda",
        ));
    }
    if opts.ops.is_empty() || opts.shrink == 0 {
        return Err(Error::invalid(
            OP,
            format!(
                "{} ops and shrink {}: nothing to run",
                opts.ops.len(),
                opts.shrink
            ),
        ));
    }
    opts.device.check_available()?;
    let (copy, gemm) = if opts.device == Device::Cpu {
        (
            Some(measure_copy_bandwidth(256 << 20, 3)),
            Some(measure_cpu_gemm_flops(1024, 3)),
        )
    } else {
        (None, None)
    };
    let here = copy.zip(gemm).map(|(c, g)| Peak {
        name: "this CPU",
        bytes_per_s: c,
        bf16_flop_per_s: g,
    });
    let mut t = Timer {
        opts,
        here,
        results: Vec::new(),
    };
    let dev = opts.device;
    let s = opts.shrink;
    let mut r = ChaCha8Rng::seed_from_u64(0);
    for op in &opts.ops {
        match op {
            BenchOp::Nf4 => {
                for (name, n, k) in SHAPES {
                    let (n, k) = (n / s, k / s);
                    let w = weight(&mut r, n, k)?;
                    let bytes = dequant_traffic_bytes(n * k, 64, false, 2) as f64;
                    let mut out = vec![bf16::ZERO; n * k];
                    t.case("nf4", format!("{name} {n}x{k} -> bf16"), bytes, 0.0, || {
                        crate::ops::nf4_dequant::dequantize_into(dev, &w.view(), &mut out)
                    })?;
                }
            }
            BenchOp::Lora => {
                let rank = 16;
                for (name, n, k) in SHAPES {
                    let (n, k) = (n / s, k / s);
                    let w = weight(&mut r, n, k)?;
                    let a = random_bf16(&mut r, rank * k);
                    let b = random_bf16(&mut r, n * rank);
                    for m in [(16 / s).max(1), (512 / s).max(1)] {
                        let x = random_bf16(&mut r, m * k);
                        let dims = LinearDims { m, n, k };
                        let args = ForwardArgs {
                            dims,
                            x: &x,
                            weight: BaseWeight::Nf4(w.view()),
                            lora: Some(LoraFactors {
                                a: &a,
                                b: &b,
                                rank,
                                scale: 2.0,
                            }),
                            bias: None,
                            dropout: None,
                        };
                        let flops = 2.0 * forward_macs(dims, rank) as f64;
                        // NF4 weight (half a byte per element plus an f32
                        // scale per 64) once, x in, y out, bf16.
                        let bytes = 0.5625 * (n * k) as f64 + 2.0 * (m * (k + n)) as f64;
                        let mut y = vec![bf16::ZERO; m * n];
                        t.case(
                            "lora",
                            format!("{name} NF4 {n}x{k} + r{rank}, {m} tokens, bf16"),
                            bytes,
                            flops,
                            || crate::ops::lora_matmul::forward(dev, &args, &mut y),
                        )?;
                    }
                }
            }
            BenchOp::Cosine => {
                let (pairs, seq, dim) = (1024 / s, 8, 4096 / s);
                let ha = random_bf16(&mut r, pairs * seq * dim);
                let hb = random_bf16(&mut r, pairs * seq * dim);
                let mask: Vec<u8> = (0..pairs * seq).map(|i| u8::from(i % seq != 0)).collect();
                let set = mask.iter().filter(|&&m| m != 0).count();
                let a = Hidden::contiguous(&ha, pairs, seq, dim);
                let b = Hidden::contiguous(&hb, pairs, seq, dim);
                let bytes =
                    pairs_traffic_bytes(DType::BF16, dim, set, set, 2 * mask.len(), pairs) as f64;
                t.case(
                    "cosine",
                    format!("pool+normalize+cosine {pairs} pairs x {seq} tokens x {dim}, bf16"),
                    bytes,
                    // Sums of the pooled positions, then three dot products
                    // of width dim per pair (two norms and the product).
                    (2 * set * dim + 6 * pairs * dim) as f64,
                    || {
                        crate::ops::cosine::pooled_cosine(
                            dev,
                            &a,
                            Some(&mask),
                            &b,
                            Some(&mask),
                            PairOptions::default(),
                        )
                        .map(|_| ())
                    },
                )?;
                let (rows, dim) = (1024 / s, 4096 / s);
                let ma = random_bf16(&mut r, rows * dim);
                let mb = random_bf16(&mut r, rows * dim);
                let va = Hidden::rows(&ma, rows, dim);
                let vb = Hidden::rows(&mb, rows, dim);
                t.case(
                    "cosine",
                    format!("cosine matrix {rows}x{rows} x {dim}, bf16"),
                    (2 * rows * dim * 2 + rows * rows * 4) as f64,
                    matrix_flops(rows, rows, dim),
                    || crate::ops::cosine::cosine_matrix_default(dev, &va, &vb).map(|_| ()),
                )?;
            }
        }
    }
    Ok(BenchReport {
        device: dev.to_string(),
        cpu_copy_bytes_per_s: copy,
        cpu_gemm_flop_per_s: gemm,
        results: t.results,
    })
}

impl BenchReport {
    /// A terminal table.
    pub fn table(&self) -> String {
        let fmt = |s: f64| crate::roofline::format_duration(Duration::from_secs_f64(s));
        let mut out = String::new();
        if let (Some(c), Some(g)) = (self.cpu_copy_bytes_per_s, self.cpu_gemm_flop_per_s) {
            out.push_str(&format!(
                "this CPU: copy {:.1} GB/s, f32 GEMM {:.1} GFLOP/s (measured; the floors 'here' use them)\n",
                c / 1e9,
                g / 1e9
            ));
        }
        out.push_str(&format!(
            "{:<62} {:>10} {:>10} {:>9} {:>9} {:>11} {:>11}\n",
            "case", "best", "median", "GB/s", "TFLOP/s", "floor here", "floor H100"
        ));
        for r in &self.results {
            out.push_str(&format!(
                "{:<62} {:>10} {:>10} {:>9.2} {:>9.4} {:>11} {:>11}\n",
                r.case,
                fmt(r.best_s),
                fmt(r.median_s),
                r.gb_per_s,
                r.tflop_per_s,
                r.floor_here_s.map_or("-".to_string(), fmt),
                fmt(r.floor_h100_s)
            ));
        }
        out
    }
}
