//! Summary statistics and the paired t-test of the before/after evaluation.
//!
//! * Means and standard deviations are computed in f64. The standard
//!   deviation is the sample one (divisor `n − 1`, as pandas' `std()` and
//!   scipy's tests use); it is NaN for fewer than two values.
//! * The paired t-test is scipy's `ttest_rel`: on the differences
//!   `d_i = after_i − before_i`, `t = mean(d) / (sd(d) / √n)` with
//!   `df = n − 1`, and the two-sided p value `2 · P(T_df > |t|)` from the
//!   Student's t distribution of the `statrs` crate (its survival function,
//!   so a p value of 1e-240 keeps its digits instead of rounding to 0).

use serde::Serialize;
use statrs::distribution::{ContinuousCDF, StudentsT};

use crate::{Error, Result};

/// Arithmetic mean (NaN for an empty slice).
pub fn mean(x: &[f64]) -> f64 {
    if x.is_empty() {
        return f64::NAN;
    }
    x.iter().sum::<f64>() / x.len() as f64
}

/// Sample standard deviation, divisor `n − 1` (NaN for fewer than two
/// values).
pub fn sd(x: &[f64]) -> f64 {
    if x.len() < 2 {
        return f64::NAN;
    }
    let m = mean(x);
    let ss: f64 = x.iter().map(|v| (v - m) * (v - m)).sum();
    (ss / (x.len() - 1) as f64).sqrt()
}

/// The two-sided p value of a t statistic with `df` degrees of freedom:
/// `2 · P(T_df > |t|)`, from `statrs`' Student's t distribution.
///
/// `t = ±∞` gives 0; a NaN `t` gives NaN.
///
/// # Errors
/// [`Error::InvalidArgument`] for `df` that is not positive (or NaN).
pub fn two_sided_p(t: f64, df: f64) -> Result<f64> {
    let dist = StudentsT::new(0.0, 1.0, df).map_err(|e| {
        Error::invalid(
            "t distribution",
            format!("degrees of freedom {df} are not valid: {e}"),
        )
    })?;
    if t.is_nan() {
        return Ok(f64::NAN);
    }
    if t.is_infinite() {
        return Ok(0.0);
    }
    Ok((2.0 * dist.sf(t.abs())).min(1.0))
}

/// The result of a paired t-test.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PairedTTest {
    /// Number of pairs.
    pub n: usize,
    /// Mean of `after − before`.
    pub mean_diff: f64,
    /// Sample standard deviation of `after − before`.
    pub sd_diff: f64,
    /// `mean_diff / (sd_diff / √n)`; NaN when undefined (fewer than two
    /// pairs, or all differences zero), ±∞ when every difference is the same
    /// nonzero value.
    pub t: f64,
    /// Degrees of freedom, `n − 1`.
    pub df: usize,
    /// Two-sided p value (NaN when `t` is).
    pub p: f64,
}

/// Two cosines closer than this are equal: they are f32 dot products of
/// unit vectors, and the same word run twice through differently batched
/// or blocked computations differs by a few ulps of a value near 1 (an ulp
/// of 1.0 in f32 is 1.19e-7; eight of them are 9.5e-7). Differences within
/// it are ties: they count neither as improved nor as worsened, enter the
/// t-test as 0, and no verdict calls a gain below it a gain.
pub const COSINE_TIE: f64 = 1e-6;

/// `after − before`, with differences within [`COSINE_TIE`] set to 0.
pub fn cosine_change(before: f64, after: f64) -> f64 {
    let d = after - before;
    if d.abs() <= COSINE_TIE { 0.0 } else { d }
}

/// Paired t-test of `after` against `before` (scipy's `ttest_rel`).
///
/// # Errors
/// [`Error::ShapeMismatch`] when the two slices differ in length;
/// [`Error::InvalidArgument`] when they are empty or hold a non-finite
/// value.
pub fn paired_t_test(before: &[f64], after: &[f64]) -> Result<PairedTTest> {
    const OP: &str = "paired t-test";
    if before.len() != after.len() {
        return Err(Error::shape(OP, "after", before.len(), after.len()));
    }
    if before.is_empty() {
        return Err(Error::invalid(OP, "no pairs"));
    }
    if let Some(i) = before
        .iter()
        .zip(after)
        .position(|(b, a)| !b.is_finite() || !a.is_finite())
    {
        return Err(Error::invalid(
            OP,
            format!(
                "pair {i} is not finite (before {}, after {})",
                before[i], after[i]
            ),
        ));
    }
    let d: Vec<f64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    let n = d.len();
    let mean_diff = mean(&d);
    let sd_diff = sd(&d);
    let (t, p) = if n < 2 {
        (f64::NAN, f64::NAN)
    } else if sd_diff == 0.0 {
        if mean_diff == 0.0 {
            (f64::NAN, f64::NAN)
        } else {
            (mean_diff.signum() * f64::INFINITY, 0.0)
        }
    } else {
        let t = mean_diff / (sd_diff / (n as f64).sqrt());
        (t, two_sided_p(t, (n - 1) as f64)?)
    };
    Ok(PairedTTest {
        n,
        mean_diff,
        sd_diff,
        t,
        df: n.saturating_sub(1),
        p,
    })
}
