//! Specificity of an alignment: did the translations move together, or did
//! every embedding move toward a shared direction?
//!
//! A triplet objective can raise every cosine at once. On a small or random
//! model the embeddings drift toward one direction: the cosine of each
//! Swahili word with its translation rises, and so does its cosine with
//! every other English word. Per-pair cosines and the paired t-test cannot
//! tell these apart; the numbers here can.
//!
//! # The matrix
//!
//! For a set of `N` pairs, `C[i][j] = cos(swahili_i, english_j)`: row `i` is
//! Swahili word `i` against every English word of the set, column `j` is
//! English word `j` against every Swahili word. The diagonal holds the
//! translations (*matching* pairs), the off-diagonal the `N·(N − 1)`
//! *non-matching* pairs. The pipeline computes `C` with the fused cosine
//! matrix op ([`crate::ops::cosine::cosine_matrix_default`]) from the same
//! pooled embeddings the per-pair cosines come from (one model pass).
//!
//! # Definitions
//!
//! * **Matching mean**: the mean of the diagonal of `C`. It equals the mean
//!   of the per-pair cosines up to f32 rounding (the matrix op and the
//!   per-pair op compute the same cosine along different code paths); the
//!   margin uses the diagonal so that both of its terms come from one
//!   matrix.
//! * **Non-matching mean**: the mean of the off-diagonal of `C`. NaN (JSON
//!   `null`) for `N = 1`, where there is none.
//! * **Margin**: matching mean − non-matching mean (NaN for `N = 1`).
//! * **Rank** of the true match of row `i` (Swahili → English):
//!   `1 + #{j ≠ i : C[i][j] ≥ C[i][i]}`. Ties count **against** the true
//!   match: a fully collapsed set, where every cosine is equal, ranks every
//!   translation last (`N`), not first. Counting ties in its favour would
//!   make collapse look like perfect retrieval, which is exactly what these
//!   numbers exist to expose. A NaN anywhere in the comparison also counts
//!   against the match (the test is `!(C[i][j] < C[i][i])`), so a NaN on
//!   the diagonal ranks `N`.
//! * The reverse direction (English → Swahili, the `_en_sw` fields) ranks
//!   each column: `1 + #{i ≠ j : C[i][j] ≥ C[j][j]}`, same tie rule.
//! * **top-k**: the fraction of rows (columns) with rank ≤ k. With `N ≤ 5`
//!   every rank is at most 5, so top-5 is 1 by construction. **MRR**: the
//!   mean of `1 / rank`. For `N = 1` every rank is 1.
//!
//! Means are accumulated in f64 from the f32 matrix.
//!
//! Ranks are by position in the set, not by text: two pairs that share an
//! English gloss have (up to rounding) the same English embedding, so each
//! Swahili word meets its gloss twice and may rank 2. The shipped lists
//! have no repeated gloss; for other lists, read top-1 with that in mind.
//!
//! # The verdict
//!
//! [`verdict`] compares a set before and after. With `gain` the change of
//! the mean per-pair cosine (`after_mean − before_mean` of the evaluation)
//! and `Δmargin = margin_after − margin_before`:
//!
//! * **not specific** ⇔ `gain > tie` and `Δmargin ≤ tie`: pair cosines
//!   rose, but non-matching cosines rose at least as much;
//! * **specific** ⇔ `gain > tie` and `Δmargin > tie`;
//! * no judgement (`specific` is `None`, JSON `null`) when `gain ≤ tie`
//!   (nothing to explain) or when `gain` or `Δmargin` is NaN (`N = 1`).
//!
//! Changes within f32 rounding are no changes: `gain` and `Δmargin` must
//! exceed [`COSINE_TIE`](super::stats::COSINE_TIE) (1e-6) to count as
//! positive, so rounding noise between two runs of the same model is "no
//! gain to judge", never "specific". The text prints the numbers so the
//! size of each change can be judged, and the retrieval numbers sit beside
//! it.

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use crate::{Error, Result};

/// Specificity of one set's cosine matrix (see the [module docs](self) for
/// the definitions). Serialised without `n`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Specificity {
    /// Number of pairs (the matrix is `n × n`).
    #[serde(skip)]
    pub n: usize,
    /// Mean of the diagonal (the translations).
    pub matching_mean: f64,
    /// Mean of the off-diagonal (NaN for `n = 1`).
    pub nonmatching_mean: f64,
    /// `matching_mean − nonmatching_mean` (NaN for `n = 1`).
    pub margin: f64,
    /// Swahili → English: fraction of rows whose translation ranks first.
    pub top1: f64,
    /// Swahili → English: fraction of rows whose translation ranks ≤ 5.
    pub top5: f64,
    /// Swahili → English: mean reciprocal rank.
    pub mrr: f64,
    /// English → Swahili: fraction of columns whose translation ranks first.
    pub top1_en_sw: f64,
    /// English → Swahili: fraction of columns whose translation ranks ≤ 5.
    pub top5_en_sw: f64,
    /// English → Swahili: mean reciprocal rank.
    pub mrr_en_sw: f64,
}

fn check(c: &[f32], n: usize) -> Result<()> {
    const OP: &str = "specificity";
    if n == 0 {
        return Err(Error::invalid(OP, "an empty set has no cosine matrix"));
    }
    let want = n
        .checked_mul(n)
        .ok_or_else(|| Error::invalid(OP, format!("{n} x {n} overflows usize")))?;
    if c.len() != want {
        return Err(Error::shape(
            OP,
            format!("cosine matrix of {n} pairs"),
            want,
            c.len(),
        ));
    }
    Ok(())
}

/// `!(v < d)`: `v` ties with, beats, or cannot be compared with (NaN) the
/// true match `d`; all of these count against the match.
fn not_below(v: f32, d: f32) -> bool {
    !matches!(v.partial_cmp(&d), Some(std::cmp::Ordering::Less))
}

/// Rank of the true match of each row of the row-major `n × n` matrix `c`
/// (Swahili → English): `1 + #{j ≠ i : !(c[i][j] < c[i][i])}`, ties and
/// NaN counting against the match.
///
/// # Errors
/// [`Error::InvalidArgument`] for `n = 0`; [`Error::ShapeMismatch`] when
/// `c.len() != n²`.
pub fn row_ranks(c: &[f32], n: usize) -> Result<Vec<usize>> {
    check(c, n)?;
    Ok((0..n)
        .map(|i| {
            let row = &c[i * n..(i + 1) * n];
            let d = row[i];
            1 + row
                .iter()
                .enumerate()
                .filter(|&(j, &v)| j != i && not_below(v, d))
                .count()
        })
        .collect())
}

/// Rank of the true match of each column of the row-major `n × n` matrix
/// `c` (English → Swahili): `1 + #{i ≠ j : !(c[i][j] < c[j][j])}`.
///
/// # Errors
/// As [`row_ranks`].
pub fn column_ranks(c: &[f32], n: usize) -> Result<Vec<usize>> {
    check(c, n)?;
    Ok((0..n)
        .map(|j| {
            let d = c[j * n + j];
            1 + (0..n)
                .filter(|&i| i != j && not_below(c[i * n + j], d))
                .count()
        })
        .collect())
}

/// `(top-1, top-5, MRR)` of a list of ranks.
fn retrieval(ranks: &[usize]) -> (f64, f64, f64) {
    let n = ranks.len() as f64;
    let within = |k: usize| ranks.iter().filter(|&&r| r <= k).count() as f64 / n;
    let mrr = ranks.iter().map(|&r| 1.0 / r as f64).sum::<f64>() / n;
    (within(1), within(5), mrr)
}

/// The specificity of the row-major `n × n` cosine matrix `c`
/// (`c[i·n + j] = cos(swahili_i, english_j)`).
///
/// # Errors
/// As [`row_ranks`].
pub fn specificity(c: &[f32], n: usize) -> Result<Specificity> {
    let rows = row_ranks(c, n)?;
    let cols = column_ranks(c, n)?;
    let mut diag = 0.0f64;
    let mut off = 0.0f64;
    for i in 0..n {
        for j in 0..n {
            let v = f64::from(c[i * n + j]);
            if i == j {
                diag += v;
            } else {
                off += v;
            }
        }
    }
    let matching_mean = diag / n as f64;
    let nonmatching_mean = if n > 1 {
        off / (n * (n - 1)) as f64
    } else {
        f64::NAN
    };
    let (top1, top5, mrr) = retrieval(&rows);
    let (top1_en_sw, top5_en_sw, mrr_en_sw) = retrieval(&cols);
    Ok(Specificity {
        n,
        matching_mean,
        nonmatching_mean,
        margin: matching_mean - nonmatching_mean,
        top1,
        top5,
        mrr,
        top1_en_sw,
        top5_en_sw,
        mrr_en_sw,
    })
}

/// The judgement of [`verdict`].
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// `Some(true)`: specific; `Some(false)`: not specific; `None`: no
    /// judgement (no gain, or undefined numbers).
    pub specific: Option<bool>,
    /// One plain-language line with the numbers (without the set's name).
    pub text: String,
}

/// A signed change for a verdict line: three decimals, or two significant
/// digits when it is smaller than that shows (so a tiny nonzero change
/// does not read as `+0.000`).
pub fn format_change(x: f64) -> String {
    if x != 0.0 && x.abs() < 5e-4 {
        format!("{x:+.1e}")
    } else {
        format!("{x:+.3}")
    }
}

/// Judge whether a gain in pair cosines is specific (the rule is in the
/// [module docs](self#the-verdict)): `pair_before` and `pair_after` are the
/// mean per-pair cosines, `before` and `after` the specificity of the set's
/// matrix at the same two moments.
pub fn verdict(
    pair_before: f64,
    pair_after: f64,
    before: &Specificity,
    after: &Specificity,
) -> Verdict {
    let gain = pair_after - pair_before;
    let dm = after.margin - before.margin;
    let dn = after.nonmatching_mean - before.nonmatching_mean;
    let (g, m, nm) = (format_change(gain), format_change(dm), format_change(dn));
    if before.n < 2 || after.n < 2 {
        return Verdict {
            specific: None,
            text: "specificity undefined: a single pair has no non-matching pairs".to_string(),
        };
    }
    if gain.is_nan() || dm.is_nan() {
        return Verdict {
            specific: None,
            text: format!(
                "specificity undefined: a change is not a number (pair cosines {g}, margin {m})"
            ),
        };
    }
    let tie = super::stats::COSINE_TIE;
    if gain <= tie {
        return Verdict {
            specific: None,
            text: format!(
                "no gain to judge: pair cosines changed by {g} (margin {m}, non-matching pairs {nm})"
            ),
        };
    }
    if dm > tie {
        Verdict {
            specific: Some(true),
            text: format!(
                "gain is specific: pair cosines rose by {g} and the margin grew by {m} \
                 (non-matching pairs changed by {nm})"
            ),
        }
    } else {
        let how = if dm < -tie {
            format!("fell by {m}")
        } else {
            format!("did not grow ({m})")
        };
        Verdict {
            specific: Some(false),
            text: format!(
                "gain is not specific: pair cosines rose by {g} but the margin {how} \
                 (non-matching pairs rose as much: {nm})"
            ),
        }
    }
}

/// A set's specificity before and after, and the [`verdict`]. Serialises
/// flat, each [`Specificity`] field with a `_before` / `_after` suffix
/// (`nonmatching_mean_before`, …, `mrr_en_sw_after`), then `specific` and
/// `verdict`.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecificityChange {
    /// Before the adapter.
    pub before: Specificity,
    /// After the adapter.
    pub after: Specificity,
    /// [`Verdict::specific`].
    pub specific: Option<bool>,
    /// [`Verdict::text`].
    pub verdict: String,
}

impl SpecificityChange {
    /// Judge the change: `pair_before` / `pair_after` are the mean
    /// per-pair cosines (see [`verdict`]).
    pub fn new(pair_before: f64, pair_after: f64, before: Specificity, after: Specificity) -> Self {
        let v = verdict(pair_before, pair_after, &before, &after);
        Self {
            before,
            after,
            specific: v.specific,
            verdict: v.text,
        }
    }
}

impl Serialize for SpecificityChange {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let (b, a) = (&self.before, &self.after);
        let fields: [(&str, f64, f64); 9] = [
            ("matching_mean", b.matching_mean, a.matching_mean),
            ("nonmatching_mean", b.nonmatching_mean, a.nonmatching_mean),
            ("margin", b.margin, a.margin),
            ("top1", b.top1, a.top1),
            ("top5", b.top5, a.top5),
            ("mrr", b.mrr, a.mrr),
            ("top1_en_sw", b.top1_en_sw, a.top1_en_sw),
            ("top5_en_sw", b.top5_en_sw, a.top5_en_sw),
            ("mrr_en_sw", b.mrr_en_sw, a.mrr_en_sw),
        ];
        let mut m = s.serialize_map(Some(2 * fields.len() + 2))?;
        for (name, vb, va) in fields {
            m.serialize_entry(&format!("{name}_before"), &vb)?;
            m.serialize_entry(&format!("{name}_after"), &va)?;
        }
        m.serialize_entry("specific", &self.specific)?;
        m.serialize_entry("verdict", &self.verdict)?;
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_count_against_the_match() {
        // Every cosine equal: collapse ranks every translation last.
        let c = vec![0.5f32; 9];
        assert_eq!(row_ranks(&c, 3).unwrap(), [3, 3, 3]);
        assert_eq!(column_ranks(&c, 3).unwrap(), [3, 3, 3]);
        let s = specificity(&c, 3).unwrap();
        assert_eq!((s.top1, s.margin), (0.0, 0.0));
        assert!((s.mrr - 1.0 / 3.0).abs() < 1e-15);
    }

    #[test]
    fn one_pair_and_bad_shapes() {
        let s = specificity(&[0.25], 1).unwrap();
        assert!(s.nonmatching_mean.is_nan() && s.margin.is_nan());
        assert_eq!((s.top1, s.top5, s.mrr, s.top1_en_sw), (1.0, 1.0, 1.0, 1.0));
        assert!(specificity(&[], 0).is_err());
        assert!(specificity(&[0.0; 3], 2).is_err());
        // NaN on the diagonal ranks last.
        assert_eq!(row_ranks(&[f32::NAN, 0.1, 0.2, 0.9], 2).unwrap(), [2, 1]);
    }

    #[test]
    fn change_formatting() {
        assert_eq!(format_change(0.65), "+0.650");
        assert_eq!(format_change(-0.012), "-0.012");
        assert_eq!(format_change(0.0), "+0.000");
        assert_eq!(format_change(4.2e-5), "+4.2e-5");
    }
}
