//! The statistics of `tli eval` against closed forms and textbook values.

use std::f64::consts::PI;

use tli_kernels::tli::stats::{mean, paired_t_test, sd, two_sided_p};

fn close(got: f64, want: f64, rel: f64) -> bool {
    (got - want).abs() <= rel * want.abs()
}

/// Two-sided p of Student's t with 1 degree of freedom (the Cauchy
/// distribution): `1 − (2/π)·atan|t|`.
fn p_df1(t: f64) -> f64 {
    1.0 - 2.0 / PI * t.abs().atan()
}

/// With 2 degrees of freedom: `1 − |t| / √(2 + t²)`.
fn p_df2(t: f64) -> f64 {
    1.0 - t.abs() / (2.0 + t * t).sqrt()
}

/// With 3 degrees of freedom:
/// `1 − (2/π)·(u/(1 + u²) + atan u)` with `u = |t|/√3`.
fn p_df3(t: f64) -> f64 {
    let u = t.abs() / 3f64.sqrt();
    1.0 - 2.0 / PI * (u / (1.0 + u * u) + u.atan())
}

#[test]
fn p_values_match_closed_forms_for_small_df() {
    for t in [0.0, 0.1, 0.5, 1.0, 2.0, -2.5, 4.0, 12.706, 30.0, -100.0] {
        let p = two_sided_p(t, 1.0).unwrap();
        assert!(
            close(p, p_df1(t), 1e-10),
            "df 1, t {t}: {p} vs {}",
            p_df1(t)
        );
        let p = two_sided_p(t, 2.0).unwrap();
        assert!(
            close(p, p_df2(t), 1e-10),
            "df 2, t {t}: {p} vs {}",
            p_df2(t)
        );
        let p = two_sided_p(t, 3.0).unwrap();
        assert!(close(p, p_df3(t), 1e-9), "df 3, t {t}: {p} vs {}", p_df3(t));
    }
}

#[test]
fn p_values_at_textbook_critical_values() {
    // Two-sided critical values of Student's t (printed tables; digits
    // checked with mpmath's incomplete beta function).
    for (t, df, p) in [
        (12.706204736, 1.0, 0.05),
        (2.228138852, 10.0, 0.05),
        (2.085963447, 20.0, 0.05),
        (2.749995654, 30.0, 0.01),
        (3.390491, 100.0, 0.001),
        (1.962339081, 1000.0, 0.05),
    ] {
        let got = two_sided_p(t, df).unwrap();
        assert!(close(got, p, 2e-6), "t {t} df {df}: p {got}, want {p}");
    }
}

#[test]
fn tiny_p_values_keep_their_digits() {
    // The TLI paper's tests: t and df as printed (t rounded to 2 decimals,
    // so the paper's p values, 1.33e-240 and 7.17e-27, differ by a few
    // percent). References: the regularized incomplete beta function
    // I_{df/(df+t²)}(df/2, 1/2) evaluated with mpmath at 40 digits.
    let p = two_sided_p(54.88, 622.0).unwrap();
    assert!(close(p, 1.38513137627e-240, 1e-7), "{p:e}");
    let p = two_sided_p(18.45, 62.0).unwrap();
    assert!(close(p, 7.2237228642e-27, 1e-7), "{p:e}");
    assert_eq!(two_sided_p(f64::INFINITY, 5.0).unwrap(), 0.0);
    assert!(two_sided_p(f64::NAN, 5.0).unwrap().is_nan());
    assert!(two_sided_p(1.0, 0.0).is_err());
    assert!(two_sided_p(1.0, -3.0).is_err());
}

#[test]
fn paired_t_test_by_hand() {
    // d = after − before = [1, 2, 2, 0]: mean 1.25, sample variance
    // (0.0625 + 0.5625 + 0.5625 + 1.5625) / 3 = 11/12.
    let before = [1.0, 2.0, 3.0, 4.0];
    let after = [2.0, 4.0, 5.0, 4.0];
    let r = paired_t_test(&before, &after).unwrap();
    let sd_d = (11.0f64 / 12.0).sqrt();
    let t = 1.25 / (sd_d / 2.0);
    assert_eq!(r.n, 4);
    assert_eq!(r.df, 3);
    assert!(close(r.mean_diff, 1.25, 1e-15));
    assert!(close(r.sd_diff, sd_d, 1e-14));
    assert!(close(r.t, t, 1e-14), "{} vs {t}", r.t);
    assert!(close(r.t, 2.611164839, 1e-9));
    assert!(close(r.p, p_df3(t), 1e-9), "{} vs {}", r.p, p_df3(t));
    // Swapping the sets flips the sign of t, not p.
    let s = paired_t_test(&after, &before).unwrap();
    assert!(close(s.t, -t, 1e-14));
    assert!(close(s.p, r.p, 1e-14));
}

#[test]
fn degenerate_and_invalid_inputs() {
    let r = paired_t_test(&[0.3], &[0.5]).unwrap();
    assert_eq!((r.n, r.df), (1, 0));
    assert!(r.t.is_nan() && r.p.is_nan());
    // Every pair moved by the same amount: t is infinite, p 0.
    let r = paired_t_test(&[0.25, 0.5, 1.0], &[0.75, 1.0, 1.5]).unwrap();
    assert!(r.t.is_infinite() && r.t > 0.0, "{}", r.t);
    assert_eq!(r.p, 0.0);
    // Nothing moved: undefined.
    let r = paired_t_test(&[0.1, 0.2], &[0.1, 0.2]).unwrap();
    assert!(r.t.is_nan());
    assert!(paired_t_test(&[], &[]).is_err());
    let e = paired_t_test(&[1.0, 2.0], &[1.0]).unwrap_err();
    assert!(
        e.to_string().contains('2') && e.to_string().contains('1'),
        "{e}"
    );
    let e = paired_t_test(&[1.0, f64::NAN], &[1.0, 2.0]).unwrap_err();
    assert!(e.to_string().contains("pair 1"), "{e}");
}

#[test]
fn mean_and_sample_sd() {
    assert!(close(mean(&[1.0, 2.0, 6.0]), 3.0, 1e-15));
    // Deviations −2, −1, 3: squares sum to 14, over n − 1 = 2.
    assert!(close(sd(&[1.0, 2.0, 6.0]), 7f64.sqrt(), 1e-15));
    assert!(mean(&[]).is_nan());
    assert!(sd(&[4.0]).is_nan());
}

#[test]
fn set_report_counts_ties_as_neither_and_writes_null_for_undefined_statistics() {
    use tli_kernels::pairs::Pair;
    use tli_kernels::tli::SetReport;
    let pair = |sw: &str, en: &str| Pair {
        swahili: sw.into(),
        english: en.into(),
        line: 1,
    };
    let pairs = [
        pair("maji", "water"),
        pair("moto", "fire"),
        pair("jua", "sun"),
    ];
    // Changes +0.25, 0, −0.25 (exact in binary).
    let r = SetReport::new(&pairs, vec![0.25, 0.5, 0.75], vec![0.5, 0.5, 0.5]).unwrap();
    assert_eq!((r.improved, r.worsened), (1, 1));
    assert_eq!(r.before_mean, 0.5);
    assert_eq!(r.after_mean, 0.5);
    assert_eq!(r.change, 0.0);
    assert_eq!(r.change_pct, 0.0);
    // Mean difference 0 with spread: t = 0, p = 1.
    assert_eq!(r.t, 0.0);
    assert!((r.p - 1.0).abs() < 1e-12, "{}", r.p);
    // One pair: sd, t and p are undefined and written as null.
    let one = SetReport::new(&pairs[..1], vec![0.25], vec![0.5]).unwrap();
    let json = serde_json::to_value(&one).unwrap();
    assert!(
        json["before_sd"].is_null() && json["t"].is_null() && json["p"].is_null(),
        "{json}"
    );
    assert_eq!(json["df"], 0);
    assert_eq!(json["change_pct"], 100.0);
    assert_eq!(json["pairs"][0][1], "water");
    assert!(SetReport::new(&pairs, vec![0.1], vec![0.2]).is_err());
}

/// Rounding noise is no change: before and after equal up to a few f32
/// ulps give no improved or worsened pair, no t statistic, and no verdict
/// of a gain (the eval case that reported t = 1.00, p = 0.5, "improved 1"
/// and "gain is specific: +6.0e-8").
#[test]
fn changes_within_f32_rounding_are_ties() {
    use tli_kernels::pairs::Pair;
    use tli_kernels::tli::eval::SetReport;
    use tli_kernels::tli::specificity::{specificity, verdict};
    use tli_kernels::tli::stats::{COSINE_TIE, cosine_change};
    let pairs: Vec<Pair> = (0..3)
        .map(|i| Pair {
            swahili: format!("s{i}"),
            english: format!("e{i}"),
            line: i + 1,
        })
        .collect();
    let before = vec![0.5f32, 0.6, 0.7];
    // One pair moved by one ulp (6e-8), the rest unchanged.
    let after = vec![f32::from_bits(0.5f32.to_bits() + 1), 0.6, 0.7];
    let r = SetReport::new(&pairs, before.clone(), after.clone()).unwrap();
    assert_eq!((r.improved, r.worsened), (0, 0));
    assert!(r.t.is_nan() && r.p.is_nan(), "t {} p {}", r.t, r.p);
    // A real change still counts.
    let moved = vec![0.5f32 + 1e-3, 0.6, 0.7];
    let r = SetReport::new(&pairs, before.clone(), moved).unwrap();
    assert_eq!((r.improved, r.worsened), (1, 0));
    assert_eq!(cosine_change(0.5, 0.5 + COSINE_TIE / 2.0), 0.0);
    assert_eq!(
        cosine_change(0.5, 0.5 + 2.0 * COSINE_TIE),
        0.5 + 2.0 * COSINE_TIE - 0.5
    );
    // The verdict: a 6e-8 gain with a 6e-8 margin growth is no gain.
    let m0 = [0.5f32, 0.1, 0.1, 0.5];
    let m1 = [0.50000006f32, 0.1, 0.1, 0.5];
    let v = verdict(
        0.5,
        0.5 + 6e-8,
        &specificity(&m0, 2).unwrap(),
        &specificity(&m1, 2).unwrap(),
    );
    assert_eq!(v.specific, None, "{}", v.text);
    assert!(v.text.starts_with("no gain to judge"), "{}", v.text);
}
