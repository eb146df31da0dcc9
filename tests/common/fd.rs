//! Gradient checks by finite differences, with error bounds derived rather
//! than guessed.
//!
//! A central difference `D(s) = (f(x+s) − f(x−s)) / 2s` of a smooth `f`
//! has a truncation error `c₂s² + c₄s⁴ + …` and, when `f` is computed with
//! an absolute error of at most `ε`, a rounding error of at most `ε/s`.
//! Richardson's extrapolation `R(s) = (4·D(s/2) − D(s)) / 3` cancels the
//! `s²` term, leaving `−c₄s⁴/4`. Two of them, `R₁ = R(h)` and
//! `R₂ = R(h/2)`, estimate their own error: at leading order
//! `R₁ − R₂ = 15 · (R₂ − f′)`, so
//!
//! ```text
//!   |R₂ − f′| ≤ (|R₁ − R₂| + n₁ + n₂) / 15 + n₂,
//! ```
//!
//! with `n₁ = 3ε/h` and `n₂ = 6ε/h` the rounding bounds of `R₁` and `R₂`
//! (`(4·ε/(h/2) + ε/h) / 3` and `(4·ε/(h/4) + ε/(h/2)) / 3`). The truncation
//! part is doubled for the neglected `s⁶` terms. A step `h` much larger than
//! the rounding noise keeps `n₂` small, and the extrapolation keeps the
//! truncation small, so neither a fixed percentage nor a lucky point is
//! needed. The bound is returned with the estimate so the caller can assert
//! that it is also small next to the gradient (a check with teeth).
#![allow(dead_code)]

/// A derivative estimated from finite differences, with a bound on its
/// error.
#[derive(Debug, Clone, Copy)]
pub struct Derivative {
    /// The extrapolated estimate `R(h/2)`.
    pub value: f64,
    /// A bound on `|value − f′(x)|`, derived in the module docs.
    pub bound: f64,
    /// The plain central difference at the largest step, `D(h)`, for
    /// messages.
    pub central: f64,
}

impl Derivative {
    /// Whether `g` (an autograd value with its own error bound `g_err`)
    /// agrees with this estimate.
    pub fn agrees(&self, g: f64, g_err: f64) -> bool {
        (g - self.value).abs() <= self.bound + g_err
    }
}

/// The derivative at `δ = 0` of `f(δ)` (the loss with one parameter moved
/// by `δ`), from central differences at steps `h`, `h/2` and `h/4` and
/// Richardson's extrapolation. `eps` bounds the absolute error of each
/// evaluation of `f`. The caller makes each `x ± s` exactly representable
/// in the parameter's type (for f32: `x` a multiple of a power of two `q`
/// with `h/4` a multiple of `q`, and `|x| + h` below 2²⁴·q).
pub fn richardson(mut f: impl FnMut(f64) -> f64, h: f64, eps: f64) -> Derivative {
    let mut d = |s: f64| (f(s) - f(-s)) / (2.0 * s);
    let (d1, d2, d4) = (d(h), d(h / 2.0), d(h / 4.0));
    let r1 = (4.0 * d2 - d1) / 3.0;
    let r2 = (4.0 * d4 - d2) / 3.0;
    let (n1, n2) = (3.0 * eps / h, 6.0 * eps / h);
    Derivative {
        value: r2,
        bound: 2.0 * ((r1 - r2).abs() + n1 + n2) / 15.0 + n2,
        central: d1,
    }
}

/// `x` rounded to a multiple of `q` (a power of two), so that `x ± s` is
/// exact in f32 for every step `s` that is a multiple of `q` and small
/// next to 2²⁴·q.
pub fn on_grid(x: f32, q: f32) -> f32 {
    (x / q).round() * q
}
