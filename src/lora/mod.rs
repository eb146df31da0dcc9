//! The fused NF4 + LoRA linear: shapes, arguments, validation and the
//! dropout mask shared by every backend.
//!
//! ```text
//!   y[M,N] = x[M,K] · Wᵀ  +  s · (x̃[M,K] · Aᵀ) · Bᵀ  (+ bias[N])
//!
//!            x ── K ──┐          W: [N,K], NF4 (bitsandbytes layout, the
//!            │        │             flattened row-major [N,K] tensor cut
//!            M        │             into blocks that may cross rows) or
//!            │        │             dense T
//!            └────────┘          A: [r,K]  (PEFT `lora_A.weight`)
//!                                B: [N,r]  (PEFT `lora_B.weight`)
//!                                s = alpha / r
//!                                x̃ = dropout(x) (training), else x
//! ```
//!
//! Numerics, the same on every backend: each weight enters the product as
//! `T(NF4[q] · scale)` — exactly what [`crate::ops::nf4_dequant`] writes for
//! output dtype `T` — and every product accumulates in f32. The LoRA
//! intermediate `x̃ · Aᵀ` stays f32 (PEFT rounds it to `T`; keeping it wide
//! is more accurate and costs nothing in a fused kernel). The result is
//! rounded to `T` once, after the bias is added.
//!
//! Backward (W frozen), with `u = x̃ · Aᵀ` `[M,r]` and `g = dy · B` `[M,r]`:
//!
//! ```text
//!   dx = dy · W  +  mask ⊙ (s · g · A) / (1 − p)      [M,K]
//!   dA = s · gᵀ · x̃                                    [r,K]
//!   dB = s · dyᵀ · u                                   [N,r]
//! ```

use crate::nf4::Nf4View;
use crate::{Element, Error, Result};

pub mod cpu;
pub mod kernel;

/// Largest LoRA rank the kernels take (the `x · Aᵀ` tile of a row block is
/// held on chip; 64 covers every rank in common use).
pub const MAX_RANK: usize = 64;

/// Problem size of one linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearDims {
    /// Rows of `x` (tokens).
    pub m: usize,
    /// Output features (rows of `W`).
    pub n: usize,
    /// Input features (columns of `W`).
    pub k: usize,
}

/// The frozen base weight `W`, `[N, K]` row-major.
#[derive(Debug, Clone, Copy)]
pub enum BaseWeight<'a, T> {
    /// Quantized to NF4; `numel` must be `N·K`.
    Nf4(Nf4View<'a>),
    /// Full precision, `N·K` values.
    Dense(&'a [T]),
}

/// The trainable LoRA factors.
#[derive(Debug, Clone, Copy)]
pub struct LoraFactors<'a, T> {
    /// `A`, `[rank, K]` row-major.
    pub a: &'a [T],
    /// `B`, `[N, rank]` row-major.
    pub b: &'a [T],
    /// `r`, in `1..=MAX_RANK`.
    pub rank: usize,
    /// `s = alpha / r`; any finite value.
    pub scale: f32,
}

/// Dropout on the LoRA branch's input (training only).
///
/// Element `(i, j)` of `x` (row `i`, column `j`) is kept when
/// [`dropout_keep`]`(seed, i·K + j, threshold)` is true, and a kept value is
/// multiplied by `1 / (1 − p)` in f32. The mask is a pure function of the
/// seed and the element index, so every backend draws the same one and the
/// backward pass recomputes it instead of storing it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// Drop probability, in `[0, 1)`.
    pub p: f32,
    /// Seed of the mask.
    pub seed: u64,
}

impl Dropout {
    /// The integer threshold [`dropout_keep`] compares with:
    /// `round(p · 2³²)`, so the drop probability is `p` to within 2⁻³³.
    pub fn threshold(&self) -> u32 {
        // p < 1, so p·2³² < 2³² and the conversion cannot saturate.
        (f64::from(self.p) * 4_294_967_296.0).round() as u32
    }

    /// `1 / (1 − p)` rounded to f32: the factor kept values are scaled by.
    pub fn keep_scale(&self) -> f32 {
        (1.0 / (1.0 - f64::from(self.p))) as f32
    }

    fn validate(&self, op: &'static str) -> Result<()> {
        if !(self.p >= 0.0 && self.p < 1.0) {
            return Err(Error::invalid(
                op,
                format!("dropout probability {} is not in [0, 1)", self.p),
            ));
        }
        Ok(())
    }
}

/// Whether dropout keeps element `index` (row-major index into `x`).
///
/// A SplitMix64 finaliser of `seed + index · γ` (γ the golden-ratio
/// constant); the element is dropped when the top 32 bits fall below
/// `threshold`. The kernels compute the same function
/// (`kernels/common/dropout.cuh`); tests hold the two equal.
#[inline]
pub fn dropout_keep(seed: u64, index: u64, threshold: u32) -> bool {
    let mut z = seed.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 32) as u32 >= threshold
}

/// Inputs of the forward pass.
#[derive(Debug, Clone, Copy)]
pub struct ForwardArgs<'a, T> {
    /// Problem size.
    pub dims: LinearDims,
    /// `x`, `[M, K]` row-major.
    pub x: &'a [T],
    /// `W`.
    pub weight: BaseWeight<'a, T>,
    /// LoRA factors; `None` for a plain linear.
    pub lora: Option<LoraFactors<'a, T>>,
    /// `bias`, `[N]`.
    pub bias: Option<&'a [T]>,
    /// Dropout on the LoRA branch's input; `None` (or `p = 0`) for none.
    pub dropout: Option<Dropout>,
}

/// Inputs of the backward pass: the forward's, plus `dy`.
#[derive(Debug, Clone, Copy)]
pub struct BackwardArgs<'a, T> {
    /// The forward inputs (the bias does not enter the backward).
    pub fwd: ForwardArgs<'a, T>,
    /// `dy`, `[M, N]` row-major.
    pub dy: &'a [T],
}

/// Where the backward pass writes; `None` skips that gradient.
#[derive(Debug)]
pub struct Grads<'a, T> {
    /// `dx`, `[M, K]`.
    pub dx: Option<&'a mut [T]>,
    /// `dA`, `[rank, K]` (needs LoRA factors).
    pub da: Option<&'a mut [T]>,
    /// `dB`, `[N, rank]` (needs LoRA factors).
    pub db: Option<&'a mut [T]>,
}

fn check_len(op: &'static str, what: &str, dims: &str, want: usize, got: usize) -> Result<()> {
    if want != got {
        return Err(Error::shape(
            op,
            format!("{what} {dims}"),
            format!("{want} values"),
            format!("{got} values"),
        ));
    }
    Ok(())
}

impl<T: Element> ForwardArgs<'_, T> {
    /// Check every length, the rank, the scale and the dropout against
    /// `dims`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a zero dimension, a rank outside
    /// `1..=MAX_RANK`, a non-finite scale or a bad dropout probability;
    /// [`Error::ShapeMismatch`] naming the operand, its expected shape and
    /// both lengths; whatever [`Nf4View::validate`] reports.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        let LinearDims { m, n, k } = self.dims;
        if m == 0 || n == 0 || k == 0 {
            return Err(Error::invalid(
                op,
                format!("empty problem: M = {m}, N = {n}, K = {k}"),
            ));
        }
        let (mk, nk) = match (m.checked_mul(k), n.checked_mul(k)) {
            (Some(a), Some(b)) => (a, b),
            _ => {
                return Err(Error::invalid(
                    op,
                    format!("M = {m}, N = {n}, K = {k} overflows"),
                ));
            }
        };
        check_len(op, "x", &format!("[M={m}, K={k}]"), mk, self.x.len())?;
        match self.weight {
            BaseWeight::Nf4(w) => {
                w.validate(op)?;
                check_len(op, "NF4 weight", &format!("[N={n}, K={k}]"), nk, w.numel)?;
            }
            BaseWeight::Dense(w) => {
                check_len(op, "weight", &format!("[N={n}, K={k}]"), nk, w.len())?
            }
        }
        if let Some(l) = &self.lora {
            if l.rank == 0 || l.rank > MAX_RANK {
                return Err(Error::invalid(
                    op,
                    format!("LoRA rank {} is not in 1..={MAX_RANK}", l.rank),
                ));
            }
            if !l.scale.is_finite() {
                return Err(Error::invalid(
                    op,
                    format!("LoRA scale {} is not finite", l.scale),
                ));
            }
            let r = l.rank;
            check_len(op, "lora_A", &format!("[r={r}, K={k}]"), r * k, l.a.len())?;
            check_len(op, "lora_B", &format!("[N={n}, r={r}]"), n * r, l.b.len())?;
        }
        if let Some(b) = self.bias {
            check_len(op, "bias", &format!("[N={n}]"), n, b.len())?;
        }
        if let Some(d) = &self.dropout {
            d.validate(op)?;
            if self.lora.is_none() && d.p > 0.0 {
                return Err(Error::invalid(
                    op,
                    format!("dropout p = {} given without LoRA factors", d.p),
                ));
            }
        }
        Ok(())
    }

    /// The output length, `M·N`.
    pub fn out_len(&self) -> usize {
        self.dims.m * self.dims.n
    }
}

impl<T: Element> BackwardArgs<'_, T> {
    /// Check the forward inputs, `dy`, and each requested gradient.
    ///
    /// # Errors
    /// As [`ForwardArgs::validate`]; [`Error::ShapeMismatch`] for `dy` or a
    /// gradient buffer of the wrong length; [`Error::InvalidArgument`] when
    /// `dA`/`dB` are asked for without LoRA factors.
    pub fn validate(&self, op: &'static str, grads: &Grads<'_, T>) -> Result<()> {
        self.fwd.validate(op)?;
        let LinearDims { m, n, k } = self.fwd.dims;
        check_len(op, "dy", &format!("[M={m}, N={n}]"), m * n, self.dy.len())?;
        if let Some(dx) = &grads.dx {
            check_len(op, "dx", &format!("[M={m}, K={k}]"), m * k, dx.len())?;
        }
        match &self.fwd.lora {
            Some(l) => {
                let r = l.rank;
                if let Some(da) = &grads.da {
                    check_len(op, "dA", &format!("[r={r}, K={k}]"), r * k, da.len())?;
                }
                if let Some(db) = &grads.db {
                    check_len(op, "dB", &format!("[N={n}, r={r}]"), n * r, db.len())?;
                }
            }
            None if grads.da.is_some() || grads.db.is_some() => {
                return Err(Error::invalid(
                    op,
                    "gradients of lora_A / lora_B asked for without LoRA factors",
                ));
            }
            None => {}
        }
        Ok(())
    }
}

/// Multiply-adds of the forward pass: `M·N·K` for the base product plus
/// `M·r·(K + N)` for the LoRA branch.
pub fn forward_macs(dims: LinearDims, rank: usize) -> u64 {
    let (m, n, k, r) = (dims.m as u64, dims.n as u64, dims.k as u64, rank as u64);
    m * n * k + m * r * (k + n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_rate_and_determinism() {
        // SplitMix64 reference values (seed 0, index 0 → z = 0 → 0; the
        // first output of the published SplitMix64 stream for state γ is
        // 0xE220A8397B1DCDAF, whose top half is 0xE220A839).
        assert!(dropout_keep(0, 0, 0));
        assert!(!dropout_keep(0, 0, 1));
        assert!(dropout_keep(0, 1, 0xE220_A839));
        assert!(!dropout_keep(0, 1, 0xE220_A83A));
        let d = Dropout { p: 0.1, seed: 42 };
        let n = 200_000u64;
        let kept = (0..n)
            .filter(|&i| dropout_keep(d.seed, i, d.threshold()))
            .count();
        // Binomial(n, 0.9): sd = sqrt(n·0.09) ≈ 134; allow 5 sd.
        let want = 0.9 * n as f64;
        assert!(
            (kept as f64 - want).abs() < 5.0 * (n as f64 * 0.09).sqrt(),
            "{kept}"
        );
        assert_eq!(Dropout { p: 0.0, seed: 1 }.threshold(), 0);
        assert_eq!(Dropout { p: 0.5, seed: 1 }.threshold(), 1 << 31);
        assert_eq!(Dropout { p: 0.5, seed: 1 }.keep_scale(), 2.0);
    }

    #[test]
    fn validation_names_the_operand() {
        let x = vec![0.0f32; 6];
        let w = vec![0.0f32; 12];
        let a = vec![0.0f32; 3];
        let b = vec![0.0f32; 4];
        let args = ForwardArgs {
            dims: LinearDims { m: 2, n: 4, k: 3 },
            x: &x,
            weight: BaseWeight::Dense(&w),
            lora: Some(LoraFactors {
                a: &a,
                b: &b,
                rank: 1,
                scale: 2.0,
            }),
            bias: None,
            dropout: None,
        };
        args.validate("t").unwrap();
        let bad = ForwardArgs { x: &x[..5], ..args };
        let e = bad.validate("t").unwrap_err().to_string();
        assert!(
            e.contains("x [M=2, K=3]") && e.contains('6') && e.contains('5'),
            "{e}"
        );
        let bad = ForwardArgs {
            lora: Some(LoraFactors {
                a: &a,
                b: &b,
                rank: 65,
                scale: 2.0,
            }),
            ..args
        };
        assert!(
            bad.validate("t")
                .unwrap_err()
                .to_string()
                .contains("rank 65")
        );
        let bad = ForwardArgs {
            dropout: Some(Dropout { p: 1.0, seed: 0 }),
            ..args
        };
        assert!(
            bad.validate("t")
                .unwrap_err()
                .to_string()
                .contains("dropout probability 1")
        );
        let dy = vec![0.0f32; 8];
        let mut da = vec![0.0f32; 4];
        let bw = BackwardArgs { fwd: args, dy: &dy };
        let e = bw
            .validate(
                "t",
                &Grads {
                    dx: None,
                    da: Some(&mut da),
                    db: None,
                },
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("dA [r=1, K=3]"), "{e}");
    }
}
