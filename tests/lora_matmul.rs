//! The fused NF4 + LoRA linear on every host backend — the kernels
//! (`kernels/lora_matmul.cu`) under the simulator, the CPU fused path, the
//! CPU unfused composite, and the `ops` dispatch — against the independent
//! f64 reference in `tests/common/lora_ref.rs` with per-element bounds
//! derived there (the bounds hold for any order of the f32 additions, so the
//! GEMM's blocked order and the kernels' fragment order are both covered).
//!
//! Every variant (tile forward on tensor cores / SIMT f32, GEMV forward,
//! backward dx, dA/dB) runs on every dtype and weight format (dense, NF4
//! plain, NF4 double-quant with blocks that cross rows), with M = 1, 7, 16
//! and ~100, K and N that are not multiples of any tile, ranks 1, 8, 16, 64,
//! bias and dropout on and off. Both forward variants are forced on every M.
//! Outputs start as poison (a NaN), so an element never written fails.
//! The simulator is slow, so shapes stay small.
#![cfg(feature = "sim")]

mod common;
#[path = "common/lora_ref.rs"]
mod lora_ref;

use common::{poison, rng};
use half::{bf16, f16};
use lora_ref::{Problem, assert_within};
use rand::Rng;
use tli_kernels::backend::sim;
use tli_kernels::lora::cpu;
use tli_kernels::lora::kernel::ForwardVariant;
use tli_kernels::lora::{
    BackwardArgs, BaseWeight, Dropout, ForwardArgs, Grads, LinearDims, LoraFactors,
};
use tli_kernels::nf4::{DoubleQuant, Nf4Tensor, Scales};
use tli_kernels::ops::lora_matmul;
use tli_kernels::{DType, Device, Element, Error};

/// How the base weight is stored in a case.
#[derive(Debug, Clone, Copy)]
enum WFormat {
    Dense,
    /// NF4 with plain absmax, block size.
    Nf4(usize),
    /// NF4 with double-quant scales: block size, nested block size.
    Nf4Dq(usize, usize),
}

enum WData<T> {
    Dense(Vec<T>),
    Nf4(Nf4Tensor),
}

struct Case<T> {
    dims: LinearDims,
    x: Vec<T>,
    w: WData<T>,
    a: Vec<T>,
    b: Vec<T>,
    rank: Option<usize>,
    scale: f32,
    bias: Option<Vec<T>>,
    dropout: Option<Dropout>,
}

#[derive(Debug, Clone, Copy)]
struct Spec {
    m: usize,
    n: usize,
    k: usize,
    rank: Option<usize>,
    w: WFormat,
    bias: bool,
    dropout: Option<f32>,
}

fn uniform<T: Element>(r: &mut impl Rng, len: usize, amp: f32) -> Vec<T> {
    (0..len)
        .map(|_| T::from_f32(r.random_range(-amp..amp)))
        .collect()
}

impl<T: Element> Case<T> {
    fn new(seed: u64, s: Spec) -> Case<T> {
        let mut r = rng(seed);
        let Spec { m, n, k, .. } = s;
        let x = uniform(&mut r, m * k, 1.0);
        let w = match s.w {
            WFormat::Dense => WData::Dense(uniform(&mut r, n * k, 1.0)),
            WFormat::Nf4(bs) | WFormat::Nf4Dq(bs, _) => {
                let numel = n * k;
                let nb = numel.div_ceil(bs);
                let scales = match s.w {
                    WFormat::Nf4Dq(_, nested) => Scales::Double(DoubleQuant {
                        qabsmax: (0..nb).map(|_| r.random()).collect(),
                        absmax2: (0..nb.div_ceil(nested))
                            .map(|_| r.random_range(0.5f32..2.0))
                            .collect(),
                        code2: (0..256).map(|_| r.random_range(-1.0f32..1.0)).collect(),
                        offset: r.random_range(0.25f32..1.0),
                        nested_blocksize: nested,
                    }),
                    _ => Scales::Plain((0..nb).map(|_| r.random_range(0.5f32..2.0)).collect()),
                };
                WData::Nf4(Nf4Tensor {
                    packed: (0..numel.div_ceil(2)).map(|_| r.random()).collect(),
                    scales,
                    blocksize: bs,
                    shape: vec![n, k],
                    dtype: T::DTYPE,
                })
            }
        };
        let rk = s.rank.unwrap_or(0);
        Case {
            dims: LinearDims { m, n, k },
            x,
            w,
            a: uniform(&mut r, rk * k, 0.5),
            b: uniform(&mut r, n * rk, 0.5),
            rank: s.rank,
            scale: r.random_range(0.25f32..2.0),
            bias: s.bias.then(|| uniform(&mut r, n, 1.0)),
            dropout: s.dropout.map(|p| Dropout {
                p,
                seed: seed ^ 0x5eed,
            }),
        }
    }

    fn args(&self) -> ForwardArgs<'_, T> {
        ForwardArgs {
            dims: self.dims,
            x: &self.x,
            weight: match &self.w {
                WData::Dense(w) => BaseWeight::Dense(w),
                WData::Nf4(t) => BaseWeight::Nf4(t.view()),
            },
            lora: self.rank.map(|rank| LoraFactors {
                a: &self.a,
                b: &self.b,
                rank,
                scale: self.scale,
            }),
            bias: self.bias.as_deref(),
            dropout: self.dropout,
        }
    }

    fn problem(&self) -> Problem {
        let args = self.args();
        Problem::new(
            self.dims,
            &self.x,
            &args.weight,
            self.rank.map(|r| (&self.a[..], &self.b[..], r, self.scale)),
            self.bias.as_deref(),
            self.dropout,
        )
    }
}

fn check_forward<T: Element>(seed: u64, s: Spec, variants: &[ForwardVariant]) {
    let case = Case::<T>::new(seed, s);
    let want = case.problem().forward();
    for &v in variants {
        let label = format!("forward {v:?} {} {s:?}", T::DTYPE);
        let mut out = vec![poison::<T>(); s.m * s.n];
        sim::lora_forward_variant(&case.args(), &mut out, v)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_within(&label, &out, &want);
    }
    let label = format!("forward cpu {} {s:?}", T::DTYPE);
    let mut out = vec![poison::<T>(); s.m * s.n];
    lora_matmul::forward(Device::Cpu, &case.args(), &mut out)
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    assert_within(&label, &out, &want);
    let label = format!("forward cpu unfused {} {s:?}", T::DTYPE);
    let mut out = vec![poison::<T>(); s.m * s.n];
    cpu::forward_unfused(&case.args(), &mut out).unwrap_or_else(|e| panic!("{label}: {e}"));
    assert_within(&label, &out, &want);
}

/// The backward pass on the simulator (when `sim`) and the CPU against the
/// reference.
fn check_backward<T: Element>(seed: u64, s: Spec, sim: bool) {
    let case = Case::<T>::new(seed, s);
    let mut r = rng(seed ^ 0xd1);
    let dy: Vec<T> = uniform(&mut r, s.m * s.n, 1.0);
    let dyf: Vec<f64> = dy.iter().map(|v| f64::from(v.to_f32())).collect();
    let p = case.problem();
    let label = format!("backward {} {s:?}", T::DTYPE);
    let rk = s.rank.unwrap_or(0);
    let mut dx = vec![poison::<T>(); s.m * s.k];
    let mut da = vec![poison::<T>(); rk * s.k];
    let mut db = vec![poison::<T>(); s.n * rk];
    let args = BackwardArgs {
        fwd: case.args(),
        dy: &dy,
    };
    let grads = Grads {
        dx: Some(&mut dx),
        da: s.rank.map(|_| &mut da[..]),
        db: s.rank.map(|_| &mut db[..]),
    };
    if sim {
        sim::lora_backward(&args, grads).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_within(&format!("{label} dx"), &dx, &p.dx(&dyf));
        if s.rank.is_some() {
            assert_within(&format!("{label} dA"), &da, &p.da(&dyf));
            assert_within(&format!("{label} dB"), &db, &p.db(&dyf));
        }
    }
    let label = format!("backward cpu {} {s:?}", T::DTYPE);
    for g in [&mut dx, &mut da, &mut db] {
        g.fill(poison::<T>());
    }
    let grads = Grads {
        dx: Some(&mut dx),
        da: s.rank.map(|_| &mut da[..]),
        db: s.rank.map(|_| &mut db[..]),
    };
    lora_matmul::backward(Device::Cpu, &args, grads).unwrap_or_else(|e| panic!("{label}: {e}"));
    assert_within(&format!("{label} dx"), &dx, &p.dx(&dyf));
    if s.rank.is_some() {
        assert_within(&format!("{label} dA"), &da, &p.da(&dyf));
        assert_within(&format!("{label} dB"), &db, &p.db(&dyf));
    }
    let label = format!("backward cpu unfused {} {s:?}", T::DTYPE);
    for g in [&mut dx, &mut da, &mut db] {
        g.fill(poison::<T>());
    }
    let grads = Grads {
        dx: Some(&mut dx),
        da: s.rank.map(|_| &mut da[..]),
        db: s.rank.map(|_| &mut db[..]),
    };
    cpu::backward_unfused(&args, grads).unwrap_or_else(|e| panic!("{label}: {e}"));
    assert_within(&format!("{label} dx"), &dx, &p.dx(&dyf));
    if s.rank.is_some() {
        assert_within(&format!("{label} dA"), &da, &p.da(&dyf));
        assert_within(&format!("{label} dB"), &db, &p.db(&dyf));
    }
}

/// M, N, K, rank, bias, dropout p.
type Shape = (usize, usize, usize, Option<usize>, bool, Option<f32>);

const BOTH: [ForwardVariant; 2] = [ForwardVariant::Tiled, ForwardVariant::Gemv];

/// The small-shape sweep, per dtype: every weight format, both forward
/// variants at M = 1, 7, 16 and 37, the four ranks, bias and dropout
/// combinations, K and N off every tile size (and K odd, so NF4 rows start
/// mid-byte and blocks straddle rows).
fn forward_sweep<T: Element>(seed: u64) {
    let formats = [WFormat::Dense, WFormat::Nf4(64), WFormat::Nf4Dq(32, 4)];
    // (M, N, K, rank, bias, dropout p)
    let shapes: [Shape; 4] = [
        (1, 45, 77, Some(1), true, None),
        (7, 70, 45, Some(8), false, Some(0.4)),
        (16, 33, 96, Some(64), true, Some(0.25)),
        (37, 66, 51, Some(16), true, None),
    ];
    for (fi, &w) in formats.iter().enumerate() {
        for (si, &(m, n, k, rank, bias, dropout)) in shapes.iter().enumerate() {
            let spec = Spec {
                m,
                n,
                k,
                rank,
                w,
                bias,
                dropout,
            };
            check_forward::<T>(seed + (fi * 10 + si) as u64, spec, &BOTH);
        }
    }
}

#[test]
fn forward_f32_every_variant_format_and_shape() {
    forward_sweep::<f32>(100);
}

#[test]
fn forward_bf16_every_variant_format_and_shape() {
    forward_sweep::<bf16>(200);
}

#[test]
fn forward_f16_every_variant_format_and_shape() {
    forward_sweep::<f16>(300);
}

#[test]
fn forward_without_lora_and_a_hundred_rows() {
    // A plain NF4 linear (no LoRA branch), and M ≈ 100 over two row tiles.
    for (i, w) in [WFormat::Nf4(64), WFormat::Nf4Dq(64, 2)]
        .into_iter()
        .enumerate()
    {
        let spec = Spec {
            m: 5,
            n: 40,
            k: 128,
            rank: None,
            w,
            bias: true,
            dropout: None,
        };
        check_forward::<bf16>(400 + i as u64, spec, &BOTH);
    }
    let spec = Spec {
        m: 100,
        n: 72,
        k: 80,
        rank: Some(16),
        w: WFormat::Nf4(64),
        bias: true,
        dropout: Some(0.1),
    };
    check_forward::<bf16>(410, spec, &[ForwardVariant::Auto]);
    check_forward::<f16>(411, spec, &[ForwardVariant::Tiled]);
    check_forward::<f32>(412, spec, &[ForwardVariant::Auto]);
}

/// From M = 256 the CPU path switches to 256-wide panels (forward) and
/// strips (backward), from M = 512 to the GEMM-bound path; N and K here
/// leave a partial last panel. CPU only: the simulator would take minutes
/// at these sizes.
#[test]
fn cpu_wide_panels_for_many_rows() {
    let spec = Spec {
        m: 260,
        n: 300,
        k: 290,
        rank: Some(16),
        w: WFormat::Nf4Dq(64, 4),
        bias: true,
        dropout: Some(0.1),
    };
    check_forward::<bf16>(450, spec, &[]);
    check_forward::<f32>(451, spec, &[]);
    check_backward::<bf16>(452, spec, false);
    check_backward::<f32>(
        453,
        Spec {
            w: WFormat::Dense,
            ..spec
        },
        false,
    );
    // From M = 512 the GEMM-bound path: 1024-row panels and 1024-column
    // strips, here each with a partial second one.
    let spec = Spec {
        m: 515,
        n: 1030,
        k: 1027,
        rank: Some(8),
        w: WFormat::Nf4Dq(64, 4),
        bias: true,
        dropout: Some(0.2),
    };
    check_forward::<bf16>(454, spec, &[]);
    check_backward::<bf16>(455, spec, false);
    let plain = Spec {
        w: WFormat::Dense,
        rank: None,
        dropout: None,
        ..spec
    };
    check_forward::<f32>(456, plain, &[]);
}

#[test]
fn auto_picks_gemv_up_to_eight_rows() {
    assert_eq!(ForwardVariant::Auto.resolve(1), ForwardVariant::Gemv);
    assert_eq!(ForwardVariant::Auto.resolve(8), ForwardVariant::Gemv);
    assert_eq!(ForwardVariant::Auto.resolve(9), ForwardVariant::Tiled);
    assert_eq!(ForwardVariant::Gemv.resolve(100), ForwardVariant::Gemv);
    assert_eq!(ForwardVariant::Tiled.resolve(1), ForwardVariant::Tiled);
}

fn backward_sweep<T: Element>(seed: u64) {
    let cases = [
        (WFormat::Dense, 7, 45, 70, Some(8), Some(0.3)),
        (WFormat::Nf4(64), 16, 70, 37, Some(1), None),
        (WFormat::Nf4Dq(32, 2), 37, 33, 66, Some(64), Some(0.5)),
        (WFormat::Nf4(32), 1, 20, 96, Some(16), Some(0.2)),
        (WFormat::Nf4(64), 9, 50, 30, None, None),
    ];
    for (i, &(w, m, n, k, rank, dropout)) in cases.iter().enumerate() {
        let spec = Spec {
            m,
            n,
            k,
            rank,
            w,
            bias: false,
            dropout,
        };
        check_backward::<T>(seed + i as u64, spec, true);
    }
}

#[test]
fn backward_f32_dx_da_db() {
    backward_sweep::<f32>(500);
}

#[test]
fn backward_bf16_dx_da_db() {
    backward_sweep::<bf16>(600);
}

#[test]
fn backward_f16_dx_da_db() {
    backward_sweep::<f16>(700);
}

#[test]
fn backward_a_hundred_rows_and_partial_gradients() {
    let spec = Spec {
        m: 100,
        n: 40,
        k: 72,
        rank: Some(8),
        w: WFormat::Nf4Dq(64, 4),
        bias: false,
        dropout: Some(0.1),
    };
    check_backward::<bf16>(800, spec, true);
    // Only dB: dx and dA stay untouched (poison), dB is right.
    let spec = Spec { m: 20, ..spec };
    let case = Case::<f16>::new(801, spec);
    let dy: Vec<f16> = uniform(&mut rng(802), spec.m * spec.n, 1.0);
    let dyf: Vec<f64> = dy.iter().map(|v| f64::from(v.to_f32())).collect();
    let mut db = vec![poison::<f16>(); spec.n * 8];
    sim::lora_backward(
        &BackwardArgs {
            fwd: case.args(),
            dy: &dy,
        },
        Grads {
            dx: None,
            da: None,
            db: Some(&mut db),
        },
    )
    .unwrap();
    assert_within("dB only", &db, &case.problem().db(&dyf));
}

#[test]
fn bad_inputs_are_errors_before_any_launch() {
    let spec = Spec {
        m: 4,
        n: 8,
        k: 16,
        rank: Some(4),
        w: WFormat::Nf4(32),
        bias: false,
        dropout: None,
    };
    let case = Case::<bf16>::new(900, spec);
    let args = case.args();
    let mut out = vec![bf16::ZERO; 31];
    let e = sim::lora_forward(&args, &mut out).unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { .. }) && e.to_string().contains("32"),
        "{e}"
    );
    let mut out = vec![bf16::ZERO; 32];
    let bad = ForwardArgs {
        x: &case.x[..63],
        ..args
    };
    assert!(matches!(
        sim::lora_forward(&bad, &mut out),
        Err(Error::ShapeMismatch { .. })
    ));
    let a65 = vec![bf16::ZERO; 65 * 16];
    let b65 = vec![bf16::ZERO; 8 * 65];
    let bad = ForwardArgs {
        lora: Some(LoraFactors {
            a: &a65,
            b: &b65,
            rank: 65,
            scale: 1.0,
        }),
        ..args
    };
    let e = sim::lora_forward(&bad, &mut out).unwrap_err().to_string();
    assert!(e.contains("rank 65"), "{e}");
    let bad = ForwardArgs {
        lora: None,
        dropout: Some(Dropout { p: 0.5, seed: 1 }),
        ..args
    };
    assert!(matches!(
        sim::lora_forward(&bad, &mut out),
        Err(Error::InvalidArgument { .. })
    ));
    // Backward: a gradient of the wrong length, dA without LoRA factors.
    let dy = vec![bf16::ZERO; 32];
    let mut dx = vec![bf16::ZERO; 63];
    let e = sim::lora_backward(
        &BackwardArgs { fwd: args, dy: &dy },
        Grads {
            dx: Some(&mut dx),
            da: None,
            db: None,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("dx [M=4, K=16]"), "{e}");
    let mut da = vec![bf16::ZERO; 64];
    let e = sim::lora_backward(
        &BackwardArgs {
            fwd: ForwardArgs { lora: None, ..args },
            dy: &dy,
        },
        Grads {
            dx: None,
            da: Some(&mut da),
            db: None,
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    // An f32 run must not be confused with another dtype's kernels.
    assert_eq!(<f32 as Element>::DTYPE, DType::F32);
}

#[test]
fn bad_inputs_are_errors_on_every_host_device() {
    let spec = Spec {
        m: 4,
        n: 8,
        k: 16,
        rank: Some(4),
        w: WFormat::Nf4(32),
        bias: false,
        dropout: None,
    };
    let case = Case::<f32>::new(950, spec);
    let args = case.args();
    for dev in [Device::Cpu, Device::Sim] {
        let mut out = vec![0.0f32; 31];
        let e = lora_matmul::forward(dev, &args, &mut out).unwrap_err();
        assert!(
            e.to_string().contains("output [M, N]") && e.to_string().contains("31"),
            "{dev}: {e}"
        );
        let mut out = vec![0.0f32; 32];
        let short_b = &case.b[..case.b.len() - 1];
        let bad = ForwardArgs {
            lora: Some(LoraFactors {
                a: &case.a,
                b: short_b,
                rank: 4,
                scale: 1.0,
            }),
            ..args
        };
        let e = lora_matmul::forward(dev, &bad, &mut out)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lora_B [N=8, r=4]") && e.contains("31 values"),
            "{dev}: {e}"
        );
        let e = cpu::forward_unfused(&bad, &mut out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lora_B"), "{e}");
        let dy = vec![0.0f32; 31];
        let e = lora_matmul::backward(
            dev,
            &BackwardArgs { fwd: args, dy: &dy },
            Grads {
                dx: None,
                da: None,
                db: None,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("dy [M=4, N=8]"), "{dev}: {e}");
    }
    #[cfg(not(tli_cuda))]
    {
        let mut out = vec![0.0f32; 32];
        let e = lora_matmul::forward(Device::Cuda, &args, &mut out).unwrap_err();
        assert!(matches!(e, Error::NoCudaDevice { .. }), "{e}");
    }
}
