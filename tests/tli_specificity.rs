//! Specificity metrics (non-matching cosines, margin, retrieval ranks) and
//! the collapse verdict: on hand-made vectors against hand-computed ranks
//! and an f64 recomputation written here, on constructed collapse and
//! specific changes, and through `scan` / `eval` on the synthetic model
//! against an f64 recomputation from each word run through the model alone.

mod common;

use candle_core::{DType as CDType, Device as CDevice};
use rand::Rng;
use serde_json::Value;
use tli_kernels::Device;
use tli_kernels::cosine::Hidden;
use tli_kernels::model::lora::{self, load_peft, save_peft};
use tli_kernels::model::{
    ForwardOptions, Llama, LlamaTokenizer, LoadOptions, LoraConfig, synthetic,
};
use tli_kernels::ops::cosine::cosine_matrix_default;
use tli_kernels::pairs::{Pair, shipped};
use tli_kernels::tli::Pooling;
use tli_kernels::tli::eval::{EvalOptions, evaluate_adapter};
use tli_kernels::tli::scan::{PoolingChoice, ScanOptions, scan};
use tli_kernels::tli::specificity::{
    Specificity, SpecificityChange, column_ranks, format_change, row_ranks, specificity, verdict,
};

// ---- an independent f64 reference ------------------------------------------

fn cos64(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// `m[i][j] = cos(sw_i, en_j)` in f64.
fn matrix64(sw: &[Vec<f64>], en: &[Vec<f64>]) -> Vec<Vec<f64>> {
    sw.iter()
        .map(|s| en.iter().map(|e| cos64(s, e)).collect())
        .collect()
}

/// The transpose, so column ranks are row ranks of it.
fn transpose(m: &[Vec<f64>]) -> Vec<Vec<f64>> {
    (0..m[0].len())
        .map(|j| m.iter().map(|row| row[j]).collect())
        .collect()
}

/// Rank bounds of each row's diagonal entry when every entry may be off
/// by up to `tol`: `(best, worst)`, ties counting against the match. With
/// `tol = 0` both are the exact rank.
fn rank_bounds(m: &[Vec<f64>], tol: f64) -> Vec<(usize, usize)> {
    m.iter()
        .enumerate()
        .map(|(i, row)| {
            let d = row[i];
            let others = || row.iter().enumerate().filter(move |&(j, _)| j != i);
            let best = 1 + others().filter(|&(_, &v)| v > d + 2.0 * tol).count();
            let worst = 1 + others().filter(|&(_, &v)| v >= d - 2.0 * tol).count();
            (best, worst)
        })
        .collect()
}

/// Exact ranks, ties counting against the match.
fn exact_ranks(m: &[Vec<f64>]) -> Vec<usize> {
    rank_bounds(m, 0.0).into_iter().map(|(_, w)| w).collect()
}

/// `(top1, top5, mrr)` of ranks.
fn retrieval64(ranks: &[usize]) -> (f64, f64, f64) {
    let n = ranks.len() as f64;
    (
        ranks.iter().filter(|&&r| r == 1).count() as f64 / n,
        ranks.iter().filter(|&&r| r <= 5).count() as f64 / n,
        ranks.iter().map(|&r| 1.0 / r as f64).sum::<f64>() / n,
    )
}

/// `(matching mean, non-matching mean)` of an f64 matrix.
fn means64(m: &[Vec<f64>]) -> (f64, f64) {
    let n = m.len();
    let diag: f64 = (0..n).map(|i| m[i][i]).sum();
    let all: f64 = m.iter().flatten().sum();
    let off = if n > 1 {
        (all - diag) / (n * (n - 1)) as f64
    } else {
        f64::NAN
    };
    (diag / n as f64, off)
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a - b).abs() <= tol
}

/// The crate's specificity of `sw` against `en` (f32 vectors through the
/// cosine-matrix op on `device`).
fn crate_spec(device: Device, sw: &[Vec<f64>], en: &[Vec<f64>]) -> (Vec<f32>, Specificity) {
    let d = sw[0].len();
    let flat = |v: &[Vec<f64>]| -> Vec<f32> { v.iter().flatten().map(|&x| x as f32).collect() };
    let (a, b) = (flat(sw), flat(en));
    let n = sw.len();
    let c =
        cosine_matrix_default(device, &Hidden::rows(&a, n, d), &Hidden::rows(&b, n, d)).unwrap();
    let s = specificity(&c, n).unwrap();
    (c, s)
}

fn v(x: &[f64]) -> Vec<f64> {
    x.to_vec()
}

fn unit(d: usize, i: usize) -> Vec<f64> {
    let mut e = vec![0.0; d];
    e[i] = 1.0;
    e
}

// ---- hand-made vectors ------------------------------------------------------

/// Swahili vectors are the unit vectors of R⁵, so `C[i][j]` is component
/// `i` of `en_j / |en_j|`:
///
/// ```text
///            en0=(2,0,0,1,0)/√5  en1=(2,1,0,0,0)/√5  en2=(0,3,2,0,0)/√13
///            en3=(1,0,1,2,0)/√6  en4=(2,2,0,0,1)/3
/// row 0: .894  .894  0     .408  .667  -> tie with en1: rank 2
/// row 1: 0     .447  .832  0     .667  -> en2, en4 above: rank 3
/// row 2: 0     0     .555  .408  0     -> rank 1
/// row 3: .447  0     0     .816  0     -> rank 1
/// row 4: 0     0     0     0     .333  -> rank 1
/// ```
///
/// Columns: col 0 rank 1; col 1 (.894 above .447) rank 2; col 2 (.832
/// above .555) rank 2; col 3 rank 1; col 4 (.667 twice above .333) rank 3.
fn hand_case() -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let sw: Vec<Vec<f64>> = (0..5).map(|i| unit(5, i)).collect();
    let en = vec![
        v(&[2.0, 0.0, 0.0, 1.0, 0.0]),
        v(&[2.0, 1.0, 0.0, 0.0, 0.0]),
        v(&[0.0, 3.0, 2.0, 0.0, 0.0]),
        v(&[1.0, 0.0, 1.0, 2.0, 0.0]),
        v(&[2.0, 2.0, 0.0, 0.0, 1.0]),
    ];
    (sw, en)
}

#[test]
fn hand_computed_ranks_ties_against_the_match_and_second_place() {
    let (sw, en) = hand_case();
    for device in common::host_devices() {
        let (c, s) = crate_spec(device, &sw, &en);
        // The tie is exact: both entries are 2/√5 from identical sums.
        assert_eq!(c[0], c[1], "{device}");
        assert_eq!(row_ranks(&c, 5).unwrap(), [2, 3, 1, 1, 1], "{device}");
        assert_eq!(column_ranks(&c, 5).unwrap(), [1, 2, 2, 1, 3], "{device}");
        assert_eq!(s.n, 5);
        assert!(close(s.top1, 3.0 / 5.0, 1e-15), "{s:?}");
        assert!(close(s.top5, 1.0, 0.0), "{s:?}");
        assert!(close(s.mrr, (0.5 + 1.0 / 3.0 + 3.0) / 5.0, 1e-15), "{s:?}");
        assert!(close(s.top1_en_sw, 2.0 / 5.0, 1e-15), "{s:?}");
        assert!(close(s.top5_en_sw, 1.0, 0.0), "{s:?}");
        assert!(
            close(
                s.mrr_en_sw,
                (1.0 + 0.5 + 0.5 + 1.0 + 1.0 / 3.0) / 5.0,
                1e-15
            ),
            "{s:?}"
        );
        // Means against the f64 matrix, and by hand: the diagonal is
        // 2/√5, 1/√5, 2/√13, 2/√6, 1/3.
        let m = matrix64(&sw, &en);
        let (mm, nm) = means64(&m);
        let diag = (2.0 / 5f64.sqrt()
            + 1.0 / 5f64.sqrt()
            + 2.0 / 13f64.sqrt()
            + 2.0 / 6f64.sqrt()
            + 1.0 / 3.0)
            / 5.0;
        assert!(close(mm, diag, 1e-15));
        // Entries are f32 cosines of exactly representable vectors: each
        // within a few f32 ulps of the f64 value.
        assert!(close(s.matching_mean, mm, 1e-6), "{} {mm}", s.matching_mean);
        assert!(
            close(s.nonmatching_mean, nm, 1e-6),
            "{} {nm}",
            s.nonmatching_mean
        );
        assert!(close(s.margin, mm - nm, 2e-6));
        // The f64 reference ranks agree (no near-ties besides the exact
        // one).
        assert_eq!(exact_ranks(&m), [2, 3, 1, 1, 1]);
        assert_eq!(exact_ranks(&transpose(&m)), [1, 2, 2, 1, 3]);
    }
}

#[test]
fn full_collapse_ranks_last_and_one_pair_is_defined() {
    // Seven identical vectors: every cosine is 1, every translation ties
    // with six others and ranks 7: top-1 and top-5 are 0, not 1.
    let same: Vec<Vec<f64>> = (0..7).map(|_| v(&[0.6, 0.8, 0.0])).collect();
    for device in common::host_devices() {
        let (c, s) = crate_spec(device, &same, &same);
        assert_eq!(row_ranks(&c, 7).unwrap(), [7; 7]);
        assert_eq!(column_ranks(&c, 7).unwrap(), [7; 7]);
        assert_eq!(
            (s.top1, s.top5, s.top1_en_sw, s.top5_en_sw),
            (0.0, 0.0, 0.0, 0.0)
        );
        assert!(close(s.mrr, 1.0 / 7.0, 1e-15) && close(s.mrr_en_sw, 1.0 / 7.0, 1e-15));
        assert!(close(s.margin, 0.0, 1e-6), "{}", s.margin);
        // One pair: nothing to compare with.
        let (c, s) = crate_spec(device, &[v(&[1.0, 2.0])], &[v(&[2.0, 1.0])]);
        assert!(close(s.matching_mean, f64::from(c[0]), 0.0));
        assert!(s.nonmatching_mean.is_nan() && s.margin.is_nan());
        assert_eq!((s.top1, s.top5, s.mrr), (1.0, 1.0, 1.0));
        assert_eq!((s.top1_en_sw, s.top5_en_sw, s.mrr_en_sw), (1.0, 1.0, 1.0));
    }
}

#[test]
fn random_vectors_match_the_f64_reference_including_top5() {
    // 12 pairs in 3 dimensions: crowded, so ranks spread over 1..12 and
    // top-5 is not trivially 1.
    let mut rng = common::rng(7);
    let mut draw = || -> Vec<f64> { (0..3).map(|_| rng.random_range(-1.0..1.0)).collect() };
    let sw: Vec<Vec<f64>> = (0..12).map(|_| draw()).collect();
    let en: Vec<Vec<f64>> = (0..12).map(|_| draw()).collect();
    let m = matrix64(&sw, &en);
    // Entries of the f32 op differ from f64 by ~1e-7; ranks are compared
    // exactly, so the draw must have no near-ties at that level.
    for (lo, hi) in rank_bounds(&m, 1e-6)
        .into_iter()
        .chain(rank_bounds(&transpose(&m), 1e-6))
    {
        assert_eq!(lo, hi, "seed gives a near-tie; pick another");
    }
    let rows = exact_ranks(&m);
    let cols = exact_ranks(&transpose(&m));
    assert!(
        rows.iter().any(|&r| r > 5) && rows.iter().any(|&r| r <= 5),
        "{rows:?}"
    );
    let (t1, t5, mrr) = retrieval64(&rows);
    let (c1, c5, cmrr) = retrieval64(&cols);
    let (mm, nm) = means64(&m);
    for device in common::host_devices() {
        let (c, s) = crate_spec(device, &sw, &en);
        assert_eq!(row_ranks(&c, 12).unwrap(), rows, "{device}");
        assert_eq!(column_ranks(&c, 12).unwrap(), cols, "{device}");
        assert_eq!((s.top1, s.top5), (t1, t5));
        assert!(close(s.mrr, mrr, 1e-15));
        assert_eq!((s.top1_en_sw, s.top5_en_sw), (c1, c5));
        assert!(close(s.mrr_en_sw, cmrr, 1e-15));
        assert!(close(s.matching_mean, mm, 1e-6) && close(s.nonmatching_mean, nm, 1e-6));
    }
}

// ---- the verdict on constructed changes ------------------------------------

/// Six pairs in R⁸ before any change: `sw_i = e_i`, `en_i = e_i +
/// 0.5·e_{i+1 mod 6}`: distinct directions, pair cosine 2/√5.
fn base_case() -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let sw: Vec<Vec<f64>> = (0..6).map(|i| unit(8, i)).collect();
    let en: Vec<Vec<f64>> = (0..6)
        .map(|i| {
            let mut e = unit(8, i);
            e[(i + 1) % 6] = 0.5;
            e
        })
        .collect();
    (sw, en)
}

/// `(pair mean, specificity)` with the pair mean from the f64 diagonal.
fn measured(sw: &[Vec<f64>], en: &[Vec<f64>]) -> (f64, Specificity) {
    let (_, s) = crate_spec(Device::Cpu, sw, en);
    (means64(&matrix64(sw, en)).0, s)
}

#[test]
fn a_shared_direction_is_flagged_as_not_specific() {
    let (sw, en) = base_case();
    // Collapse: every vector pushed along the same unused direction e_7.
    let push = |v: &[Vec<f64>]| -> Vec<Vec<f64>> {
        v.iter()
            .map(|x| {
                let mut y = x.clone();
                y[7] += 3.0;
                y
            })
            .collect()
    };
    let (sw2, en2) = (push(&sw), push(&en));
    let (pb, sb) = measured(&sw, &en);
    let (pa, sa) = measured(&sw2, &en2);
    // The construction does what it should (f64): pair cosines rise, the
    // non-matching ones rise more, the margin falls.
    let (mb, nb) = means64(&matrix64(&sw, &en));
    let (ma, na) = means64(&matrix64(&sw2, &en2));
    assert!(ma > mb && na - nb > ma - mb, "{mb} {nb} -> {ma} {na}");
    let v = verdict(pb, pa, &sb, &sa);
    assert_eq!(v.specific, Some(false), "{v:?}");
    assert!(v.text.starts_with("gain is not specific"), "{}", v.text);
    let gain = format!("pair cosines rose by {}", format_change(pa - pb));
    let fall = format!(
        "the margin fell by {}",
        format_change(sa.margin - sb.margin)
    );
    assert!(
        v.text.contains(&gain) && v.text.contains(&fall),
        "{}",
        v.text
    );
    assert!(sa.margin - sb.margin < -0.1, "{sb:?} {sa:?}");
}

#[test]
fn pulling_each_translation_closer_is_specific() {
    let (sw, en) = base_case();
    // Each English vector moves toward its own Swahili word only.
    let en2: Vec<Vec<f64>> = en
        .iter()
        .zip(&sw)
        .map(|(e, s)| e.iter().zip(s).map(|(x, y)| x + y).collect())
        .collect();
    let (pb, sb) = measured(&sw, &en);
    let (pa, sa) = measured(&sw, &en2);
    assert!(pa > pb && sa.margin > sb.margin, "{sb:?} {sa:?}");
    let v = verdict(pb, pa, &sb, &sa);
    assert_eq!(v.specific, Some(true), "{v:?}");
    assert!(v.text.starts_with("gain is specific"), "{}", v.text);
    assert!(
        v.text.contains(&format!(
            "margin grew by {}",
            format_change(sa.margin - sb.margin)
        )),
        "{}",
        v.text
    );
    // Reversed, the pair cosines fall: no gain to judge.
    let v = verdict(pa, pb, &sa, &sb);
    assert_eq!(v.specific, None, "{v:?}");
    assert!(v.text.starts_with("no gain to judge"), "{}", v.text);
    // A margin exactly unchanged while pair cosines rose is not specific
    // (the rule is `<=`).
    let v = verdict(0.2, 0.5, &sb, &sb);
    assert_eq!(v.specific, Some(false), "{v:?}");
    assert!(v.text.contains("did not grow"), "{}", v.text);
    // One pair: undefined.
    let (_, one) = crate_spec(Device::Cpu, &[v1()], &[v1()]);
    let v = verdict(0.2, 0.5, &one, &one);
    assert_eq!(v.specific, None);
}

fn v1() -> Vec<f64> {
    v(&[1.0, 0.0])
}

#[test]
fn specificity_change_serialises_flat_with_suffixes() {
    let (sw, en) = base_case();
    let (pb, sb) = measured(&sw, &en);
    let c = SpecificityChange::new(pb, pb + 0.1, sb, sb);
    let j = serde_json::to_value(&c).unwrap();
    for name in [
        "matching_mean",
        "nonmatching_mean",
        "margin",
        "top1",
        "top5",
        "mrr",
        "top1_en_sw",
        "top5_en_sw",
        "mrr_en_sw",
    ] {
        for when in ["before", "after"] {
            assert!(
                j.get(format!("{name}_{when}")).is_some(),
                "{name}_{when}: {j}"
            );
        }
    }
    assert_eq!(j["specific"], false);
    assert!(j["verdict"].as_str().unwrap().contains("not specific"));
    assert_eq!(j.as_object().unwrap().len(), 20);
    let (_, one) = crate_spec(Device::Cpu, &[v1()], &[v1()]);
    let j = serde_json::to_value(SpecificityChange::new(0.5, 0.6, one, one)).unwrap();
    assert!(j["nonmatching_mean_before"].is_null() && j["margin_after"].is_null());
    assert!(j["specific"].is_null(), "{j}");
}

// ---- scan and eval on the synthetic model -----------------------------------

const SEED: u64 = 11;

fn model() -> (Llama, LlamaTokenizer) {
    synthetic::build(SEED, &LoadOptions::default()).unwrap()
}

/// A text's pooled embedding at every layer, the text run through the model
/// alone and pooled in f64 (`words`: non-special tokens; `all`: every one).
fn embed_alone(model: &Llama, tok: &LlamaTokenizer, text: &str, pooling: Pooling) -> Vec<Vec<f64>> {
    let enc = tok.encode_batch(&[text]).unwrap();
    let (ids, mask) = enc.tensors(&CDevice::Cpu).unwrap();
    let states = model
        .hidden_states(&ids, &mask, &ForwardOptions::default())
        .unwrap();
    let keep: Vec<bool> = enc.special_mask[0]
        .iter()
        .map(|&s| pooling == Pooling::All || !s)
        .collect();
    states
        .iter()
        .map(|s| {
            let rows = s
                .to_dtype(CDType::F64)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f64>()
                .unwrap();
            let mut out = vec![0.0; rows[0].len()];
            let mut c = 0.0;
            for (r, &k) in rows.iter().zip(&keep) {
                if k {
                    c += 1.0;
                    for (o, x) in out.iter_mut().zip(r) {
                        *o += x;
                    }
                }
            }
            out.iter().map(|x| x / c).collect()
        })
        .collect()
}

/// The f64 cosine matrix of `pairs` at `layer`, every word alone.
fn reference_matrix(
    model: &Llama,
    tok: &LlamaTokenizer,
    pairs: &[Pair],
    layer: usize,
    pooling: Pooling,
) -> Vec<Vec<f64>> {
    let sw: Vec<Vec<f64>> = pairs
        .iter()
        .map(|p| embed_alone(model, tok, &p.swahili, pooling).swap_remove(layer))
        .collect();
    let en: Vec<Vec<f64>> = pairs
        .iter()
        .map(|p| embed_alone(model, tok, &p.english, pooling).swap_remove(layer))
        .collect();
    matrix64(&sw, &en)
}

/// Tolerance of one matrix entry. The pipeline runs the model in f32 on a
/// padded batch; the reference runs each word alone and pools in f64. The
/// two differ by the f32 rounding of the forward pass (unit roundoff 2⁻²⁴
/// per operation, with different matmul shapes under padding) and of the
/// pooling and cosine: a length-64 dot product of unit vectors plus the two
/// norms is within about `(64 + 8) · 2⁻²⁴` ≈ 4.3e-6 of exact. 1e-5 covers
/// that with room for the forward pass; the scan test checks every
/// per-pair cosine (same vectors, the fused pair op) against the reference
/// diagonal at a tenth of it (observed: below 3e-7). Means of entries
/// inherit the bound; ranks are checked against the range of ranks that
/// entries off by this much allow.
const TOL: f64 = 1e-5;

/// Check one report entry (its JSON object, with `suffix` on every name)
/// against the reference matrix: means within `TOL`, retrieval within what
/// entries off by `TOL` allow. Returns how many rows and columns had a rank
/// that `TOL` leaves ambiguous.
fn check_against(j: &Value, suffix: &str, m: &[Vec<f64>], what: &str) -> usize {
    let f = |k: &str| -> f64 {
        let key = format!("{k}{suffix}");
        let v = j
            .get(&key)
            .unwrap_or_else(|| panic!("{what}: {key} missing"));
        v.as_f64().unwrap_or(f64::NAN)
    };
    let (mm, nm) = means64(m);
    assert!(
        close(f("matching_mean"), mm, TOL),
        "{what}: {} vs {mm}",
        f("matching_mean")
    );
    assert!(
        close(f("nonmatching_mean"), nm, TOL),
        "{what}: {} vs {nm}",
        f("nonmatching_mean")
    );
    assert!(close(f("margin"), mm - nm, 2.0 * TOL), "{what}: margin");
    let mut ambiguous = 0;
    for (dir, mat) in [("", m.to_vec()), ("_en_sw", transpose(m))] {
        let bounds = rank_bounds(&mat, TOL);
        ambiguous += bounds.iter().filter(|(a, b)| a != b).count();
        let best: Vec<usize> = bounds.iter().map(|b| b.0).collect();
        let worst: Vec<usize> = bounds.iter().map(|b| b.1).collect();
        let (b1, b5, bm) = retrieval64(&best);
        let (w1, w5, wm) = retrieval64(&worst);
        for (k, lo, hi) in [("top1", w1, b1), ("top5", w5, b5), ("mrr", wm, bm)] {
            let got = f(&format!("{k}{dir}"));
            assert!(
                got >= lo - 1e-12 && got <= hi + 1e-12,
                "{what}: {k}{dir}{suffix} = {got}, reference [{lo}, {hi}]"
            );
        }
    }
    ambiguous
}

#[test]
fn scan_specificity_matches_an_f64_recomputation() {
    let (model, tok) = model();
    // 70 pairs: two forward chunks (64 + 6), so the pooled vectors of both
    // chunks must land in one matrix in order.
    let pairs: Vec<Pair> = shipped().unwrap().0.into_iter().take(70).collect();
    let opts = ScanOptions {
        layers: Some(vec![0, 2, 4]),
        pooling: PoolingChoice::Both,
        device: Device::Cpu,
    };
    let r = scan(&model, &tok, &pairs, &opts).unwrap();
    let json: Value = serde_json::from_str(&r.to_json().unwrap()).unwrap();
    let layers = json["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 6);
    let mut ambiguous = 0;
    for l in layers {
        for key in [
            "nonmatching_mean",
            "margin",
            "top1",
            "top5",
            "mrr",
            "top1_en_sw",
            "top5_en_sw",
            "mrr_en_sw",
        ] {
            assert!(l.get(key).is_some(), "{key} missing: {l}");
        }
        let index = l["index"].as_u64().unwrap() as usize;
        let pooling: Pooling = l["pooling"].as_str().unwrap().parse().unwrap();
        let m = reference_matrix(&model, &tok, &pairs, index, pooling);
        let a = check_against(l, "", &m, &format!("layer {index} {pooling}"));
        ambiguous += a;
        // The tolerance holds where it can be seen entry by entry: the
        // per-pair cosines (the same pooled vectors) against the reference
        // diagonal.
        let cos = l["cosines"].as_array().unwrap();
        for (i, c) in cos.iter().enumerate() {
            let err = (c.as_f64().unwrap() - m[i][i]).abs();
            assert!(
                err < TOL / 10.0,
                "layer {index} {pooling} pair {i}: {err:e}"
            );
        }
        // The diagonal mean is the pair mean up to f32 rounding.
        assert!(close(
            l["matching_mean"].as_f64().unwrap(),
            l["mean"].as_f64().unwrap(),
            1e-6
        ));
    }
    // The rank checks have teeth: almost every rank is pinned down.
    assert!(ambiguous <= 6 * 2 * 70 / 50, "{ambiguous} ambiguous ranks");
    let table = r.table();
    assert!(
        table.contains("words margin") && table.contains("all top1"),
        "{table}"
    );
    assert_eq!(table.lines().count(), 4, "{table}");
    let svg = tli_kernels::tli::plot::scan_svg(&r).unwrap();
    assert!(svg.contains("margin: words"), "margin line missing");
}

#[test]
fn scan_specificity_on_sim_agrees_with_cpu() {
    let (model, tok) = model();
    let pairs: Vec<Pair> = shipped().unwrap().1.into_iter().take(10).collect();
    let run = |device| {
        scan(
            &model,
            &tok,
            &pairs,
            &ScanOptions {
                layers: Some(vec![1, 3]),
                pooling: PoolingChoice::One(Pooling::Words),
                device,
            },
        )
        .unwrap()
    };
    let (c, s) = (run(Device::Cpu), run(Device::Sim));
    for (a, b) in c.layers.iter().zip(&s.layers) {
        let (x, y) = (a.specificity, b.specificity);
        assert!(
            close(x.nonmatching_mean, y.nonmatching_mean, 1e-6),
            "{x:?} {y:?}"
        );
        assert!(close(x.margin, y.margin, 1e-6), "{x:?} {y:?}");
    }
}

/// An adapter on layers 0 and 1 with nonzero `B`, saved in PEFT format.
fn random_adapter(dir: &std::path::Path) {
    let (mut m, _) = model();
    let cfg = LoraConfig {
        layers: Some(vec![0, 1]),
        ..LoraConfig::default()
    };
    lora::attach(&mut m, &cfg, 5).unwrap();
    common::randomize_lora_b(&m, 500, 0.3);
    save_peft(&m, &cfg, dir).unwrap();
}

#[test]
fn eval_specificity_matches_an_f64_recomputation_and_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    random_adapter(dir.path());
    let (mut m, tok) = model();
    let (train, control) = shipped().unwrap();
    let trained: Vec<Pair> = train.into_iter().take(20).collect();
    let control: Vec<Pair> = control.into_iter().take(15).collect();
    let r = evaluate_adapter(
        &mut m,
        &tok,
        &[("trained", &trained), ("control", &control)],
        dir.path(),
        &EvalOptions::default(),
    )
    .unwrap();
    let json: Value = serde_json::from_str(&r.to_json().unwrap()).unwrap();
    let (base, _) = model();
    let (mut adapted, _) = model();
    load_peft(&mut adapted, dir.path()).unwrap();
    let mut ambiguous = 0;
    for (name, pairs) in [("trained", &trained), ("control", &control)] {
        let s = &json["sets"][name];
        for key in [
            "nonmatching_mean_before",
            "nonmatching_mean_after",
            "margin_before",
            "margin_after",
            "top1_before",
            "top1_after",
            "top5_before",
            "top5_after",
            "mrr_before",
            "mrr_after",
            "top1_en_sw_before",
            "top1_en_sw_after",
            "top5_en_sw_before",
            "top5_en_sw_after",
            "mrr_en_sw_before",
            "mrr_en_sw_after",
            "specific",
            "verdict",
            // The existing fields stay.
            "before_mean",
            "after_mean",
            "t",
            "before",
            "after",
            "pairs",
        ] {
            assert!(s.get(key).is_some(), "{name}: {key} missing");
        }
        let mb = reference_matrix(&base, &tok, pairs, 2, Pooling::Words);
        let ma = reference_matrix(&adapted, &tok, pairs, 2, Pooling::Words);
        ambiguous += check_against(s, "_before", &mb, &format!("{name} before"));
        ambiguous += check_against(s, "_after", &ma, &format!("{name} after"));
        // The adapter moves the non-matching cosines too.
        let g = |k: &str| s[k].as_f64().unwrap();
        assert!((g("nonmatching_mean_after") - g("nonmatching_mean_before")).abs() > 1e-3);
        // The verdict follows the documented rule on the reported numbers.
        let gain = g("after_mean") - g("before_mean");
        let dm = g("margin_after") - g("margin_before");
        let want = if gain > 0.0 {
            Value::Bool(dm > 0.0)
        } else {
            Value::Null
        };
        assert_eq!(s["specific"], want, "{name}: {s}");
        let text = s["verdict"].as_str().unwrap();
        assert!(text.contains(&format_change(gain)), "{name}: {text}");
    }
    assert!(ambiguous <= 4, "{ambiguous} ambiguous ranks");
    let table = r.table();
    for needle in [
        "non-matching",
        "margin",
        "MRR sw->en",
        "trained: ",
        "control: ",
    ] {
        assert!(table.contains(needle), "{needle}:\n{table}");
    }
    let svg = tli_kernels::tli::plot::eval_svg(&r).unwrap();
    assert!(
        svg.contains("Specificity") && svg.contains("non-matching"),
        "panel missing"
    );
}
