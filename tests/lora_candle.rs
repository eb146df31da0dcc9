//! The candle op [`Nf4LoraLinear`]: its forward pass is the fused op
//! (`ops::lora_matmul::forward`) bit for bit, its autograd gradients are the
//! op's explicit backward bit for bit (up to the sign of zero), and those gradients are the
//! derivatives of the forward pass (a finite-difference check with a
//! derived tolerance). The op's own numerics against an f64 reference are
//! `tests/lora_matmul.rs`' job.

mod common;

use std::sync::Arc;

use candle_core::{DType as CDType, Device as CDevice, Tensor, Var, WithDType};
use common::{assert_bits_eq, rng};
use half::{bf16, f16};
use rand::Rng;
use tli_kernels::candle_ops::lora::{LinearWeight, LoraBranch, Nf4LoraLinear};
use tli_kernels::lora::{
    BackwardArgs, BaseWeight, Dropout, ForwardArgs, Grads, LinearDims, LoraFactors,
};
use tli_kernels::nf4::{DoubleQuant, Nf4Tensor, Scales};
use tli_kernels::ops::lora_matmul;
use tli_kernels::{Device, Element};

#[derive(Debug, Clone, Copy)]
enum WFormat {
    Dense,
    Nf4,
    Nf4Dq,
}

/// One layer and its inputs, as host vectors (the reference's operands) and
/// as the candle op.
struct Case<T> {
    /// Leading shape of x (its product is M).
    lead: Vec<usize>,
    dims: LinearDims,
    x: Vec<T>,
    dense: Option<Vec<T>>,
    nf4: Option<Arc<Nf4Tensor>>,
    a: Vec<T>,
    b: Vec<T>,
    rank: Option<usize>,
    scale: f32,
    bias: Option<Vec<T>>,
    dropout: Option<Dropout>,
}

fn uniform<T: Element>(r: &mut impl Rng, len: usize, amp: f32) -> Vec<T> {
    (0..len)
        .map(|_| T::from_f32(r.random_range(-amp..amp)))
        .collect()
}

impl<T: Element + WithDType> Case<T> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        seed: u64,
        lead: &[usize],
        n: usize,
        k: usize,
        rank: Option<usize>,
        w: WFormat,
        bias: bool,
        dropout: Option<f32>,
    ) -> Self {
        let mut r = rng(seed);
        let m: usize = lead.iter().product();
        let numel = n * k;
        let bs = 64;
        let nb = numel.div_ceil(bs);
        let nf4 = |scales| {
            Arc::new(Nf4Tensor {
                packed: (0..numel.div_ceil(2))
                    .map(|i| (i * 37 + 11) as u8)
                    .collect(),
                scales,
                blocksize: bs,
                shape: vec![n, k],
                dtype: <T as Element>::DTYPE,
            })
        };
        let (dense, nf4) = match w {
            WFormat::Dense => (Some(uniform(&mut r, numel, 1.0)), None),
            WFormat::Nf4 => (
                None,
                Some(nf4(Scales::Plain(
                    (0..nb).map(|_| r.random_range(0.5f32..2.0)).collect(),
                ))),
            ),
            WFormat::Nf4Dq => (
                None,
                Some(nf4(Scales::Double(DoubleQuant {
                    qabsmax: (0..nb).map(|_| r.random()).collect(),
                    absmax2: (0..nb.div_ceil(4))
                        .map(|_| r.random_range(0.5f32..2.0))
                        .collect(),
                    code2: (0..256).map(|_| r.random_range(-1.0f32..1.0)).collect(),
                    offset: 0.5,
                    nested_blocksize: 4,
                }))),
            ),
        };
        let rk = rank.unwrap_or(0);
        Case {
            lead: lead.to_vec(),
            dims: LinearDims { m, n, k },
            x: uniform(&mut r, m * k, 1.0),
            dense,
            nf4,
            a: uniform(&mut r, rk * k, 0.5),
            b: uniform(&mut r, n * rk, 0.5),
            rank,
            scale: 2.0,
            bias: bias.then(|| uniform(&mut r, n, 1.0)),
            dropout: dropout.map(|p| Dropout { p, seed: seed ^ 7 }),
        }
    }

    fn args(&self) -> ForwardArgs<'_, T> {
        ForwardArgs {
            dims: self.dims,
            x: &self.x,
            weight: match (&self.dense, &self.nf4) {
                (Some(d), _) => BaseWeight::Dense(d),
                (None, Some(q)) => BaseWeight::Nf4(q.view()),
                (None, None) => unreachable!("a case has a weight"),
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

    fn layer(&self) -> Nf4LoraLinear {
        let cpu = CDevice::Cpu;
        let LinearDims { n, k, .. } = self.dims;
        let weight = match (&self.dense, &self.nf4) {
            (Some(d), _) => LinearWeight::Dense(Tensor::from_slice(d, (n, k), &cpu).unwrap()),
            (None, Some(q)) => LinearWeight::Nf4(q.clone()),
            (None, None) => unreachable!("a case has a weight"),
        };
        let bias = self
            .bias
            .as_ref()
            .map(|b| Tensor::from_slice(b, n, &cpu).unwrap());
        Nf4LoraLinear::new(weight, bias, n, k).unwrap()
    }

    fn x_shape(&self) -> Vec<usize> {
        let mut s = self.lead.clone();
        s.push(self.dims.k);
        s
    }

    /// `(x, A, B)` as candle variables.
    fn vars(&self) -> (Var, Var, Var) {
        let cpu = CDevice::Cpu;
        let LinearDims { n, k, .. } = self.dims;
        let r = self.rank.unwrap_or(1);
        let x =
            Var::from_tensor(&Tensor::from_slice(&self.x, self.x_shape(), &cpu).unwrap()).unwrap();
        let (a, b) = if self.rank.is_some() {
            (
                Tensor::from_slice(&self.a, (r, k), &cpu).unwrap(),
                Tensor::from_slice(&self.b, (n, r), &cpu).unwrap(),
            )
        } else {
            (
                Tensor::zeros((1, k), <T as WithDType>::DTYPE, &cpu).unwrap(),
                Tensor::zeros((n, 1), <T as WithDType>::DTYPE, &cpu).unwrap(),
            )
        };
        (
            x,
            Var::from_tensor(&a).unwrap(),
            Var::from_tensor(&b).unwrap(),
        )
    }

    fn forward(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> Tensor {
        let branch = LoraBranch {
            a,
            b,
            scale: self.scale,
            dropout: self.dropout,
        };
        self.layer().forward(x, self.rank.map(|_| &branch)).unwrap()
    }
}

fn flat<T: WithDType>(t: &Tensor) -> Vec<T> {
    t.flatten_all().unwrap().to_vec1::<T>().unwrap()
}

fn every_case<T: Element + WithDType>(mut f: impl FnMut(String, Case<T>)) {
    let mut seed = 0;
    for w in [WFormat::Dense, WFormat::Nf4, WFormat::Nf4Dq] {
        for rank in [None, Some(1), Some(8)] {
            for (lead, n, k) in [(vec![1], 33, 70), (vec![2, 9], 40, 66)] {
                for (bias, dropout) in [(false, None), (true, Some(0.25))] {
                    seed += 1;
                    let dropout = dropout.filter(|_| rank.is_some());
                    let label = format!(
                        "{:?} {w:?} r={rank:?} lead={lead:?} n={n} k={k} bias={bias} dropout={dropout:?}",
                        <T as Element>::DTYPE
                    );
                    f(
                        label,
                        Case::<T>::new(seed, &lead, n, k, rank, w, bias, dropout),
                    );
                }
            }
        }
    }
}

fn forward_is_the_op<T: Element + WithDType>() {
    every_case::<T>(|label, c| {
        let (x, a, b) = c.vars();
        let y = c.forward(x.as_tensor(), a.as_tensor(), b.as_tensor());
        let mut shape = c.lead.clone();
        shape.push(c.dims.n);
        assert_eq!(y.dims(), &shape[..], "{label}");
        assert_eq!(y.dtype(), <T as WithDType>::DTYPE, "{label}");
        let mut want = vec![T::from_f32(f32::NAN); c.dims.m * c.dims.n];
        lora_matmul::forward(Device::Cpu, &c.args(), &mut want).unwrap();
        assert_bits_eq(&label, &flat::<T>(&y), &want);
    });
}

#[test]
fn forward_is_the_fused_op_bit_for_bit() {
    forward_is_the_op::<f32>();
    forward_is_the_op::<bf16>();
    forward_is_the_op::<f16>();
}

/// Upstream gradient values exact in `T`, so `dy` reaches the op unrounded.
fn upstream<T: Element>(seed: u64, len: usize) -> Vec<T> {
    uniform(&mut rng(seed), len, 1.0)
}

/// `assert_bits_eq` up to the sign of zero: candle's backward pass adds each
/// gradient into a zero-initialised accumulator, and `+0 + −0 = +0`, so an
/// exact `−0` from the op (a dropped column of `dA`) arrives as `+0`.
fn assert_grad_eq<T: Element>(label: &str, got: &[T], want: &[T]) {
    let canon = |v: &[T]| -> Vec<T> {
        v.iter()
            .map(|&e| {
                if e.to_f32() == 0.0 {
                    T::from_f32(0.0)
                } else {
                    e
                }
            })
            .collect()
    };
    assert_bits_eq(label, &canon(got), &canon(want));
}

fn autograd_is_the_backward<T: Element + WithDType>() {
    every_case::<T>(|label, c| {
        let LinearDims { m, n, k } = c.dims;
        let (x, a, b) = c.vars();
        let y = c.forward(x.as_tensor(), a.as_tensor(), b.as_tensor());
        let dy: Vec<T> = upstream(m as u64 * 31 + n as u64, m * n);
        let dyt = Tensor::from_slice(&dy, y.dims(), &CDevice::Cpu).unwrap();
        // loss = Σ y·dy in f32: its gradient with respect to y is dy.
        let loss = (y.to_dtype(CDType::F32).unwrap() * dyt.to_dtype(CDType::F32).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let r = c.rank.unwrap_or(0);
        let mut dx = vec![T::from_f32(f32::NAN); m * k];
        let mut da = vec![T::from_f32(f32::NAN); r * k];
        let mut db = vec![T::from_f32(f32::NAN); n * r];
        let args = BackwardArgs {
            fwd: c.args(),
            dy: &dy,
        };
        let want = Grads {
            dx: Some(&mut dx),
            da: c.rank.map(|_| &mut da[..]),
            db: c.rank.map(|_| &mut db[..]),
        };
        lora_matmul::backward(Device::Cpu, &args, want).unwrap();
        let got = grads.get(x.as_tensor()).expect("dx");
        assert_eq!(got.dims(), x.as_tensor().dims(), "{label}");
        assert_grad_eq(&format!("{label} dx"), &flat::<T>(got), &dx);
        if c.rank.is_some() {
            assert_grad_eq(
                &format!("{label} dA"),
                &flat::<T>(grads.get(a.as_tensor()).expect("dA")),
                &da,
            );
            assert_grad_eq(
                &format!("{label} dB"),
                &flat::<T>(grads.get(b.as_tensor()).expect("dB")),
                &db,
            );
        } else {
            assert!(grads.get(a.as_tensor()).is_none(), "{label}");
        }
    });
}

#[test]
fn autograd_gradients_are_the_explicit_backward_bit_for_bit() {
    autograd_is_the_backward::<f32>();
    autograd_is_the_backward::<bf16>();
    autograd_is_the_backward::<f16>();
}

#[test]
fn a_frozen_input_gets_no_gradient_and_the_factors_theirs() {
    let c = Case::<f32>::new(5, &[7], 24, 40, Some(4), WFormat::Nf4Dq, true, Some(0.1));
    let (x, a, b) = c.vars();
    let frozen = x.as_tensor().detach();
    let y = c.forward(&frozen, a.as_tensor(), b.as_tensor());
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&frozen).is_none());
    // Same dA, dB as with a trainable x.
    let y2 = c.forward(x.as_tensor(), a.as_tensor(), b.as_tensor());
    let grads2 = y2.sum_all().unwrap().backward().unwrap();
    for v in [&a, &b] {
        assert_bits_eq(
            "factor gradient",
            &flat::<f32>(grads.get(v.as_tensor()).unwrap()),
            &flat::<f32>(grads2.get(v.as_tensor()).unwrap()),
        );
    }
}

/// Central differences of `L = Σ_ij R_ij · y_ij` against the autograd
/// gradient, in f32.
///
/// `y` is linear in each of `x`, `A` and `B` separately (dropout's mask is
/// fixed by its seed), so the central difference has no truncation error:
/// `(L(v + h) − L(v − h)) / 2h` is the exact derivative up to the rounding
/// of the two evaluations of `L`. Each evaluation is a sum of f32 products
/// whose error is bounded (first order, as in `tests/common/lora_ref.rs`)
/// by `E = len · 2⁻²³ · S` with, computed in f64 at the perturbed point,
///
/// ```text
///   S = Σ_ij |R_ij| · (Σ_l |x_il·w_jl| + s·ks·Σ_q (Σ_l |x_il·a_ql|)·|b_jq| + |bias_j|)
/// ```
///
/// (`ks = 1/(1−p)` the dropout rescale) and `len = K + r + M·N + 8` (the
/// longest reduction, the final sum over the output included). The
/// quotient is then off by at most
/// `(E₊ + E₋) / 2h`. The autograd gradient has its own rounding error, of
/// the same construction over its own terms; each of those terms times `h`
/// is a term of `S₊` or `S₋` (the perturbed coordinate is at least `h` in
/// size at one of the two points), so that error is at most
/// `(E₊ + E₋) / h`. The test allows the sum, `3 · (E₊ + E₋) / 2h`. A large
/// step (`h = 4`) keeps the bound small next to the gradients, which the
/// test also checks, so the comparison has teeth.
#[test]
fn gradients_match_central_differences() {
    let c = Case::<f32>::new(
        11,
        &[3, 2],
        20,
        36,
        Some(4),
        WFormat::Nf4Dq,
        true,
        Some(0.2),
    );
    let LinearDims { m, n, k } = c.dims;
    let r = c.rank.unwrap();
    let rw: Vec<f32> = upstream(99, m * n);
    let rt = Tensor::from_slice(&rw, (3, 2, n), &CDevice::Cpu).unwrap();
    let loss_of = |x: &[f32], a: &[f32], b: &[f32]| -> f32 {
        let cpu = CDevice::Cpu;
        let xt = Tensor::from_slice(x, c.x_shape(), &cpu).unwrap();
        let at = Tensor::from_slice(a, (r, k), &cpu).unwrap();
        let bt = Tensor::from_slice(b, (n, r), &cpu).unwrap();
        let y = c.forward(&xt, &at, &bt);
        (y * &rt)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (x, a, b) = c.vars();
    let y = c.forward(x.as_tensor(), a.as_tensor(), b.as_tensor());
    let grads = (y * &rt).unwrap().sum_all().unwrap().backward().unwrap();
    let gx = flat::<f32>(grads.get(x.as_tensor()).unwrap());
    let ga = flat::<f32>(grads.get(a.as_tensor()).unwrap());
    let gb = flat::<f32>(grads.get(b.as_tensor()).unwrap());

    // The weights the op sees, for S.
    let w: Vec<f64> = {
        let mut v = vec![0.0f32; n * k];
        tli_kernels::ops::nf4_dequant::dequantize_into(
            Device::Cpu,
            &c.nf4.as_ref().unwrap().view(),
            &mut v,
        )
        .unwrap();
        v.iter().map(|&e| f64::from(e)).collect()
    };
    let keep = f64::from(c.dropout.unwrap().keep_scale());
    let len = (k + r + m * n + 8) as f64;
    let bound_of = |x: &[f32], a: &[f32], b: &[f32]| -> f64 {
        let mut s_sum = 0.0f64;
        for i in 0..m {
            let u: Vec<f64> = (0..r)
                .map(|q| {
                    (0..k)
                        .map(|l| (f64::from(x[i * k + l]) * f64::from(a[q * k + l])).abs())
                        .sum()
                })
                .collect();
            for j in 0..n {
                let mut t = f64::from(c.bias.as_ref().unwrap()[j].abs());
                for l in 0..k {
                    t += (f64::from(x[i * k + l]) * w[j * k + l]).abs();
                }
                for q in 0..r {
                    t += f64::from(c.scale) * keep * u[q] * f64::from(b[j * r + q]).abs();
                }
                s_sum += f64::from(rw[i * n + j]).abs() * t;
            }
        }
        len * 2f64.powi(-23) * s_sum
    };
    let h = 4.0f32;

    let mut checked = 0;
    let mut worst_ratio = 0.0f64;
    let mut probe = |what: &str, which: usize, grad: &[f32]| {
        let n_v = grad.len();
        for idx in (0..n_v).step_by(n_v.div_ceil(12)) {
            let (mut xp, mut ap, mut bp) = (c.x.clone(), c.a.clone(), c.b.clone());
            let (mut xm, mut am, mut bm) = (c.x.clone(), c.a.clone(), c.b.clone());
            match which {
                0 => (xp[idx], xm[idx]) = (xp[idx] + h, xm[idx] - h),
                1 => (ap[idx], am[idx]) = (ap[idx] + h, am[idx] - h),
                _ => (bp[idx], bm[idx]) = (bp[idx] + h, bm[idx] - h),
            }
            let fd = (f64::from(loss_of(&xp, &ap, &bp)) - f64::from(loss_of(&xm, &am, &bm)))
                / (2.0 * f64::from(h));
            let e2 = (bound_of(&xp, &ap, &bp) + bound_of(&xm, &am, &bm)) / (2.0 * f64::from(h));
            let tol = 3.0 * e2;
            let err = (fd - f64::from(grad[idx])).abs();
            assert!(
                err <= tol,
                "{what}[{idx}]: autograd {} central difference {fd} (|Δ| {err:e} > bound {tol:e})",
                grad[idx]
            );
            let typical = grad.iter().map(|v| f64::from(v.abs())).sum::<f64>() / n_v as f64;
            worst_ratio = worst_ratio.max(tol / typical);
            checked += 1;
        }
    };
    probe("dx", 0, &gx);
    probe("dA", 1, &ga);
    probe("dB", 2, &gb);
    assert!(checked >= 30, "{checked}");
    // The bound is tight enough to mean something: a gradient wrong by 5 %
    // of its typical size (a missing dropout rescale is 25 %) would fail.
    assert!(
        worst_ratio < 0.05,
        "bound / typical gradient = {worst_ratio}"
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let c = Case::<f32>::new(3, &[4], 8, 16, Some(2), WFormat::Nf4, false, None);
    let (x, a, b) = c.vars();
    let layer = c.layer();
    let branch = |a, b| LoraBranch {
        a,
        b,
        scale: 2.0,
        dropout: None,
    };
    let err = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();

    // Wrong feature count.
    let x9 = Tensor::zeros((4, 9), CDType::F32, &CDevice::Cpu).unwrap();
    let e = err(layer.forward(&x9, None));
    assert!(e.contains("9 features") && e.contains("[8, 16]"), "{e}");

    // Factor dtype differs from x.
    let a16 = a.as_tensor().to_dtype(CDType::BF16).unwrap();
    let e = err(layer.forward(x.as_tensor(), Some(&branch(&a16, b.as_tensor()))));
    assert!(e.contains("lora_A is BF16") && e.contains("F32"), "{e}");

    // lora_B with the wrong shape.
    let b_bad = Tensor::zeros((8, 3), CDType::F32, &CDevice::Cpu).unwrap();
    let e = err(layer.forward(x.as_tensor(), Some(&branch(a.as_tensor(), &b_bad))));
    assert!(
        e.contains("lora_B") && e.contains("[8, 3]") && e.contains("[8, 2]"),
        "{e}"
    );

    // Rank beyond the kernels' limit.
    let a65 = Tensor::zeros((65, 16), CDType::F32, &CDevice::Cpu).unwrap();
    let b65 = Tensor::zeros((8, 65), CDType::F32, &CDevice::Cpu).unwrap();
    let e = err(layer.forward(x.as_tensor(), Some(&branch(&a65, &b65))));
    assert!(e.contains("rank 65"), "{e}");

    // Dropout probability out of range.
    let bad = LoraBranch {
        dropout: Some(Dropout { p: 1.5, seed: 0 }),
        ..branch(a.as_tensor(), b.as_tensor())
    };
    let e = err(layer.forward(x.as_tensor(), Some(&bad)));
    assert!(e.contains("dropout probability 1.5"), "{e}");

    // Integer input.
    let xi = Tensor::zeros((4, 16), CDType::U32, &CDevice::Cpu).unwrap();
    let e = err(layer.forward(&xi, None));
    assert!(e.contains("U32") && e.contains("f32, bf16, f16"), "{e}");

    // Construction checks the weight and bias shapes.
    let q = c.nf4.clone().unwrap();
    let e = Nf4LoraLinear::new(LinearWeight::Nf4(q.clone()), None, 16, 8)
        .unwrap_err()
        .to_string();
    assert!(e.contains("[16, 8]") && e.contains("[8, 16]"), "{e}");
    let bias = Tensor::zeros(7, CDType::F32, &CDevice::Cpu).unwrap();
    let e = Nf4LoraLinear::new(LinearWeight::Nf4(q), Some(bias), 8, 16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bias") && e.contains("[7]"), "{e}");
}
