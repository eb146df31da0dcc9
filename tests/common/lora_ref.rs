//! An independent f64 reference of the fused NF4 + LoRA linear and its
//! backward, with per-element error bounds, shared by `tests/lora_sim.rs`
//! and `tests/cuda_lora.rs` (included with `#[path]`).
//!
//! Weights are recomputed here from the published NF4 table (bitsandbytes
//! `functional.py`, `get_4bit_type("nf4")`), not taken from the crate: the
//! value that enters the product is `T(f32(NF4[q] · scale))`, with the
//! double-quant scale `f32(f32(code2[q] · absmax2[b / nested]) + offset)`.
//!
//! # Tolerance
//!
//! The kernels multiply values that are exact in `T` and accumulate in f32.
//! A sum of n terms computed with f32 additions (any order, any grouping,
//! each addition rounded to nearest or, as tensor cores may, truncated)
//! differs from the exact sum by at most (n − 1)·2⁻²³·Σ|terms|
//! (first-order bound, relative error per operation ≤ 2⁻²³ = twice the f32
//! unit roundoff to cover truncation; products of two bf16/f16 values are
//! exact in f32, and f32·f32 products add one more 2⁻²⁴ per term, which the
//! slack below covers). A scaled sum (`s·ks·Σ`) adds two more roundings.
//! The LoRA term is a sum over r of products of such sums with B (or A),
//! so its error is bounded by (K + r + 4)·2⁻²³·s·ks·Σ_j Σ_k |x̃·A|·|B|.
//! The bias add is one more rounding of the total. So before the final
//! cast the computed value v satisfies |v − y| ≤ E with
//!
//! ```text
//!   E = 2⁻²³ · ((L + 8) · Σ_l |p·w|  +  (L + r + 8) · s·ks · Σ_j Σ_l |p·a_j|·|b_j|  + |bias|)
//! ```
//!
//! (L the length of the reduction), and the cast to T adds at most
//! u_T·|v| ≤ u_T·(|y| + E) (u_T = 2⁻⁸ bf16, 2⁻¹¹ f16, 2⁻²⁴ f32), plus half
//! the smallest f16 subnormal (2⁻²⁵) where f16 underflows. The tests assert
//! |got − y| ≤ E·(1 + u_T) + u_T·|y| + 2⁻²⁵ per element: a bound from the
//! data, not a guessed constant. The same construction bounds dx, dA, dB
//! (`Bound` below carries Σ|terms| and the term count per element).
#![allow(dead_code)]

use tli_kernels::lora::{BaseWeight, Dropout, LinearDims, dropout_keep};
use tli_kernels::nf4::{Nf4View, ScalesView};
use tli_kernels::{DType, Element};

/// bitsandbytes' NF4 code values (functional.py, `get_4bit_type("nf4")`).
pub const NF4_PUBLISHED: [f64; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// Unit roundoff of `T`.
pub fn unit_roundoff(d: DType) -> f64 {
    match d {
        DType::F32 => 2f64.powi(-24),
        DType::BF16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
    }
}

/// The weight matrix `[N, K]` as the kernels see it: `T(NF4[q]·scale)`.
pub fn weight_values<T: Element>(w: &BaseWeight<'_, T>, n: usize, k: usize) -> Vec<f64> {
    match w {
        BaseWeight::Dense(d) => d.iter().map(|v| f64::from(v.to_f32())).collect(),
        BaseWeight::Nf4(v) => (0..n * k).map(|i| nf4_value::<T>(v, i)).collect(),
    }
}

fn nf4_value<T: Element>(v: &Nf4View<'_>, i: usize) -> f64 {
    let byte = v.packed[i / 2];
    let code = if i.is_multiple_of(2) {
        byte >> 4
    } else {
        byte & 15
    };
    let b = i / v.blocksize;
    let scale: f32 = match v.scales {
        ScalesView::Plain(a) => a[b],
        ScalesView::Double {
            qabsmax,
            absmax2,
            code2,
            offset,
            nested_blocksize,
        } => {
            let prod = code2[usize::from(qabsmax[b])] * absmax2[b / nested_blocksize];
            prod + offset
        }
    };
    let w = (NF4_PUBLISHED[usize::from(code)] as f32) * scale;
    f64::from(T::from_f32(w).to_f32())
}

/// Exact value and error bound of one output element.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bound {
    /// The exact result.
    pub value: f64,
    /// E of the module comment (before the final cast).
    pub err: f64,
}

impl Bound {
    /// Whether `got` (as produced in dtype `d`) is within the bound.
    pub fn admits(&self, got: f64, d: DType) -> bool {
        let u = unit_roundoff(d);
        let tol = self.err * (1.0 + u) + u * self.value.abs() + 2f64.powi(-25);
        (got - self.value).abs() <= tol
    }
}

const E23: f64 = 1.0 / 8_388_608.0; // 2^-23

/// Everything a reference needs, in f64.
pub struct Problem {
    pub dims: LinearDims,
    pub x: Vec<f64>,
    pub w: Vec<f64>,
    /// `(A [r,K], B [N,r], r, s)`.
    pub lora: Option<(Vec<f64>, Vec<f64>, usize, f64)>,
    pub bias: Option<Vec<f64>>,
    /// Keep mask of x (all true without dropout) and 1/(1−p) as f32.
    pub keep: Vec<bool>,
    pub ks: f64,
}

impl Problem {
    pub fn new<T: Element>(
        dims: LinearDims,
        x: &[T],
        weight: &BaseWeight<'_, T>,
        lora: Option<(&[T], &[T], usize, f32)>,
        bias: Option<&[T]>,
        dropout: Option<Dropout>,
    ) -> Problem {
        let f = |s: &[T]| -> Vec<f64> { s.iter().map(|v| f64::from(v.to_f32())).collect() };
        let LinearDims { m, n, k } = dims;
        let (keep, ks) = match dropout {
            Some(d) if d.p > 0.0 => (
                (0..m * k)
                    .map(|i| dropout_keep(d.seed, i as u64, d.threshold()))
                    .collect(),
                f64::from(d.keep_scale()),
            ),
            _ => (vec![true; m * k], 1.0),
        };
        Problem {
            dims,
            x: f(x),
            w: weight_values(weight, n, k),
            lora: lora.map(|(a, b, r, s)| (f(a), f(b), r, f64::from(s))),
            bias: bias.map(f),
            keep,
            ks,
        }
    }

    fn xt(&self, mi: usize, ki: usize) -> f64 {
        let i = mi * self.dims.k + ki;
        if self.keep[i] { self.x[i] } else { 0.0 }
    }

    /// u[m][j] = Σ_k x̃·A (without ks) and Σ|x̃·A|.
    fn u(&self) -> (Vec<f64>, Vec<f64>) {
        let LinearDims { m, k, .. } = self.dims;
        let Some((a, _, r, _)) = &self.lora else {
            return (Vec::new(), Vec::new());
        };
        let (mut u, mut ua) = (vec![0.0; m * r], vec![0.0; m * r]);
        for mi in 0..m {
            for j in 0..*r {
                for ki in 0..k {
                    let t = self.xt(mi, ki) * a[j * k + ki];
                    u[mi * r + j] += t;
                    ua[mi * r + j] += t.abs();
                }
            }
        }
        (u, ua)
    }

    /// g[m][j] = Σ_n dy·B and Σ|dy·B|.
    fn g(&self, dy: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let LinearDims { m, n, .. } = self.dims;
        let Some((_, b, r, _)) = &self.lora else {
            return (Vec::new(), Vec::new());
        };
        let (mut g, mut ga) = (vec![0.0; m * r], vec![0.0; m * r]);
        for mi in 0..m {
            for j in 0..*r {
                for ni in 0..n {
                    let t = dy[mi * n + ni] * b[ni * r + j];
                    g[mi * r + j] += t;
                    ga[mi * r + j] += t.abs();
                }
            }
        }
        (g, ga)
    }

    /// The forward result `[M, N]`.
    pub fn forward(&self) -> Vec<Bound> {
        let LinearDims { m, n, k } = self.dims;
        let (u, ua) = self.u();
        let mut out = vec![Bound::default(); m * n];
        for mi in 0..m {
            for ni in 0..n {
                let (mut v, mut mag) = (0.0, 0.0);
                for ki in 0..k {
                    let t = self.x[mi * k + ki] * self.w[ni * k + ki];
                    v += t;
                    mag += t.abs();
                }
                let mut err = (k as f64 + 8.0) * mag;
                if let Some((_, b, r, s)) = &self.lora {
                    let (mut l, mut lmag) = (0.0, 0.0);
                    for j in 0..*r {
                        l += u[mi * r + j] * b[ni * r + j];
                        lmag += ua[mi * r + j] * b[ni * r + j].abs();
                    }
                    v += s * self.ks * l;
                    err += (k + r + 8) as f64 * s.abs() * self.ks * lmag;
                }
                if let Some(bias) = &self.bias {
                    v += bias[ni];
                    err += bias[ni].abs() + v.abs();
                }
                out[mi * n + ni] = Bound {
                    value: v,
                    err: err * E23,
                };
            }
        }
        out
    }

    /// dx `[M, K]`.
    pub fn dx(&self, dy: &[f64]) -> Vec<Bound> {
        let LinearDims { m, n, k } = self.dims;
        let (g, ga) = self.g(dy);
        let mut out = vec![Bound::default(); m * k];
        for mi in 0..m {
            for ki in 0..k {
                let (mut v, mut mag) = (0.0, 0.0);
                for ni in 0..n {
                    let t = dy[mi * n + ni] * self.w[ni * k + ki];
                    v += t;
                    mag += t.abs();
                }
                let mut err = (n as f64 + 8.0) * mag;
                if let Some((a, _, r, s)) = &self.lora
                    && self.keep[mi * k + ki]
                {
                    let (mut l, mut lmag) = (0.0, 0.0);
                    for j in 0..*r {
                        l += g[mi * r + j] * a[j * k + ki];
                        lmag += ga[mi * r + j] * a[j * k + ki].abs();
                    }
                    v += s * self.ks * l;
                    err += (n + r + 8) as f64 * s.abs() * self.ks * lmag;
                }
                out[mi * k + ki] = Bound {
                    value: v,
                    err: err * E23,
                };
            }
        }
        out
    }

    /// dA `[r, K]` = s·ks·Σ_m g·(kept x).
    pub fn da(&self, dy: &[f64]) -> Vec<Bound> {
        let LinearDims { m, n, k } = self.dims;
        let Some((_, _, r, s)) = &self.lora else {
            return Vec::new();
        };
        let (g, ga) = self.g(dy);
        let mut out = vec![Bound::default(); r * k];
        for j in 0..*r {
            for ki in 0..k {
                let (mut v, mut mag) = (0.0, 0.0);
                for mi in 0..m {
                    let xv = self.xt(mi, ki);
                    v += g[mi * r + j] * xv;
                    mag += ga[mi * r + j] * xv.abs();
                }
                out[j * k + ki] = Bound {
                    value: s * self.ks * v,
                    err: (n + m + 8) as f64 * s.abs() * self.ks * mag * E23,
                };
            }
        }
        out
    }

    /// dB `[N, r]` = s·Σ_m dy·(ks·Σ_k x̃·A).
    pub fn db(&self, dy: &[f64]) -> Vec<Bound> {
        let LinearDims { m, n, k } = self.dims;
        let Some((_, _, r, s)) = &self.lora else {
            return Vec::new();
        };
        let (u, ua) = self.u();
        let mut out = vec![Bound::default(); n * r];
        for ni in 0..n {
            for j in 0..*r {
                let (mut v, mut mag) = (0.0, 0.0);
                for mi in 0..m {
                    let d = dy[mi * n + ni];
                    v += d * u[mi * r + j];
                    mag += d.abs() * ua[mi * r + j];
                }
                out[ni * r + j] = Bound {
                    value: s * self.ks * v,
                    err: (k + m + 8) as f64 * s.abs() * self.ks * mag * E23,
                };
            }
        }
        out
    }
}

/// Assert every element of `got` is within its bound.
pub fn assert_within<T: Element>(label: &str, got: &[T], want: &[Bound]) {
    assert_eq!(got.len(), want.len(), "{label}: length");
    let bad: Vec<String> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (g, w))| !w.admits(f64::from(g.to_f32()), T::DTYPE))
        .take(5)
        .map(|(i, (g, w))| {
            format!(
                "[{i}] got {} want {} (bound {:.3e} + rounding)",
                g.to_f32(),
                w.value,
                w.err
            )
        })
        .collect();
    assert!(bad.is_empty(), "{label}: {}", bad.join("; "));
}
