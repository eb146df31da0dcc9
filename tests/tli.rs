//! The TLI pipeline on the synthetic model: scan and eval against an f64
//! recomputation, the loss against hand-computed batches, the schedule, the
//! optimizer step, training and the PEFT round trip.

mod common;
#[path = "common/fd.rs"]
mod fd;

use std::ops::ControlFlow;

use candle_core::{DType as CDType, Device as CDevice, Tensor, Var};
use serde_json::Value;
use tli_kernels::Device;
use tli_kernels::model::lora::{self, load_peft, save_peft};
use tli_kernels::model::{
    ForwardOptions, Llama, LlamaTokenizer, LoadOptions, LoraConfig, synthetic,
};
use tli_kernels::pairs::{Pair, shipped};
use tli_kernels::tli::eval::{EvalOptions, evaluate_adapter};
use tli_kernels::tli::scan::{PoolingChoice, ScanOptions, scan};
use tli_kernels::tli::train::{
    LinearSchedule, TrainOptions, batch_loss, steps_per_epoch, train, triplet_loss,
};
use tli_kernels::tli::{Pooling, stats};

const SEED: u64 = 11;

fn model() -> (Llama, LlamaTokenizer) {
    synthetic::build(SEED, &LoadOptions::default()).unwrap()
}

fn train_pairs(n: usize) -> Vec<Pair> {
    shipped().unwrap().0.into_iter().take(n).collect()
}

fn control_pairs(n: usize) -> Vec<Pair> {
    shipped().unwrap().1.into_iter().take(n).collect()
}

/// The hidden states of one text alone (no padding), `[layer][token][dim]`
/// in f64, and which tokens are special.
fn states_alone(
    model: &Llama,
    tok: &LlamaTokenizer,
    text: &str,
) -> (Vec<Vec<Vec<f64>>>, Vec<bool>) {
    let enc = tok.encode_batch(&[text]).unwrap();
    let (ids, mask) = enc.tensors(&CDevice::Cpu).unwrap();
    let states = model
        .hidden_states(&ids, &mask, &ForwardOptions::default())
        .unwrap();
    let per_layer = states
        .iter()
        .map(|s| {
            s.to_dtype(CDType::F64)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f64>()
                .unwrap()
        })
        .collect();
    (per_layer, enc.special_mask[0].clone())
}

/// Mean of the selected rows, in f64.
fn pool64(rows: &[Vec<f64>], keep: &[bool]) -> Vec<f64> {
    let d = rows[0].len();
    let mut out = vec![0.0; d];
    let mut c = 0.0;
    for (r, &k) in rows.iter().zip(keep) {
        if k {
            c += 1.0;
            for (o, v) in out.iter_mut().zip(r) {
                *o += v;
            }
        }
    }
    out.iter()
        .map(|v| if c > 0.0 { v / c } else { 0.0 })
        .collect()
}

/// A JSON number written from an f32 (shortest decimal), as that f32
/// widened to f64.
fn json_f32(v: &Value) -> f64 {
    f64::from(v.as_f64().unwrap() as f32)
}

fn cos64(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Independent per-pair cosine: each word through the model alone, pooled
/// in f64 (`words`: non-special tokens; `all`: every token).
fn reference_cos(
    model: &Llama,
    tok: &LlamaTokenizer,
    p: &Pair,
    layer: usize,
    pooling: Pooling,
) -> f64 {
    let (sa, spa) = states_alone(model, tok, &p.swahili);
    let (sb, spb) = states_alone(model, tok, &p.english);
    let keep =
        |sp: &[bool]| -> Vec<bool> { sp.iter().map(|&s| pooling == Pooling::All || !s).collect() };
    cos64(
        &pool64(&sa[layer], &keep(&spa)),
        &pool64(&sb[layer], &keep(&spb)),
    )
}

#[test]
fn scan_matches_an_f64_recomputation_and_has_the_documented_json() {
    let (model, tok) = model();
    // 70 pairs: two forward chunks (64 + 6), so chunking is exercised.
    let pairs = train_pairs(70);
    for device in [Device::Cpu, Device::Sim] {
        let opts = ScanOptions {
            layers: None,
            pooling: PoolingChoice::Both,
            device,
        };
        let r = scan(&model, &tok, &pairs, &opts).unwrap();
        let json: Value = serde_json::from_str(&r.to_json().unwrap()).unwrap();
        assert_eq!(json["pooling"], "both");
        let layers = json["layers"].as_array().unwrap();
        // Indices 0..=4 of the 4-block model, words then all.
        assert_eq!(layers.len(), 10);
        for (k, l) in layers.iter().enumerate() {
            let index = k / 2;
            let pooling = if k % 2 == 0 {
                Pooling::Words
            } else {
                Pooling::All
            };
            assert_eq!(l["index"], index);
            assert_eq!(l["pooling"], pooling.name());
            let cos: Vec<f64> = l["cosines"]
                .as_array()
                .unwrap()
                .iter()
                .map(json_f32)
                .collect();
            assert_eq!(cos.len(), pairs.len());
            // Summary statistics of the listed cosines, recomputed.
            let m = cos.iter().sum::<f64>() / cos.len() as f64;
            let v = cos.iter().map(|c| (c - m) * (c - m)).sum::<f64>() / (cos.len() - 1) as f64;
            assert!((l["mean"].as_f64().unwrap() - m).abs() < 1e-12);
            assert!((l["sd"].as_f64().unwrap() - v.sqrt()).abs() < 1e-12);
            // Every pair against the word-by-word f64 reference (a sample
            // of pairs on the simulator, which is slower). The model runs
            // in f32 with ~1e-7 relative rounding per operation; padding
            // changes the matmul shapes, so rows differ from the
            // one-text run at that level: 1e-4 is generous.
            let step = if device == Device::Sim { 17 } else { 1 };
            for i in (0..pairs.len()).step_by(step) {
                let want = reference_cos(&model, &tok, &pairs[i], index, pooling);
                assert!(
                    (cos[i] - want).abs() < 1e-4,
                    "{device} layer {index} {pooling} pair {i} {:?}: {} vs {want}",
                    pairs[i],
                    cos[i]
                );
            }
        }
        let jp = json["pairs"].as_array().unwrap();
        assert_eq!(jp.len(), pairs.len());
        assert_eq!(jp[3][0], pairs[3].swahili.as_str());
        assert_eq!(jp[3][1], pairs[3].english.as_str());
        // Layer 0 holds the embeddings: all-tokens pooling shares BOS's
        // embedding between the two words, so it is not the words-only
        // value.
        let w0 = r.get(0, Pooling::Words).unwrap().mean;
        let a0 = r.get(0, Pooling::All).unwrap().mean;
        assert!((w0 - a0).abs() > 1e-3, "{w0} {a0}");
        let table = r.table();
        assert!(
            table.contains("words mean (sd)") && table.contains("all mean (sd)"),
            "{table}"
        );
        assert_eq!(table.lines().count(), 6, "{table}");
    }
}

#[test]
fn scan_selects_layers_and_rejects_bad_ones() {
    let (model, tok) = model();
    let pairs = train_pairs(5);
    let r = scan(
        &model,
        &tok,
        &pairs,
        &ScanOptions {
            layers: Some(vec![2, 0]),
            pooling: PoolingChoice::One(Pooling::Words),
            device: Device::Cpu,
        },
    )
    .unwrap();
    assert_eq!(r.pooling, "words");
    let idx: Vec<usize> = r.layers.iter().map(|l| l.index).collect();
    assert_eq!(idx, [0, 2]);
    assert!(r.layers.iter().all(|l| l.pooling == Pooling::Words));
    for bad in [vec![5], vec![], vec![1, 1]] {
        let e = scan(
            &model,
            &tok,
            &pairs,
            &ScanOptions {
                layers: Some(bad.clone()),
                ..ScanOptions::default()
            },
        )
        .unwrap_err();
        assert!(!e.to_string().is_empty(), "{bad:?}");
    }
    assert!(scan(&model, &tok, &[], &ScanOptions::default()).is_err());
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
fn eval_matches_an_f64_recomputation_and_has_the_documented_json() {
    let dir = tempfile::tempdir().unwrap();
    random_adapter(dir.path());
    let (mut m, tok) = model();
    let trained = train_pairs(12);
    let control = control_pairs(9);
    let opts = EvalOptions::default();
    let r = evaluate_adapter(
        &mut m,
        &tok,
        &[("trained", &trained), ("control", &control)],
        dir.path(),
        &opts,
    )
    .unwrap();
    let json: Value = serde_json::from_str(&r.to_json().unwrap()).unwrap();
    assert_eq!(json["layer"], 2);
    assert_eq!(json["pooling"], "words");
    let sets = json["sets"].as_object().unwrap();
    assert_eq!(sets.len(), 2);

    let (base, _) = model();
    let (mut adapted, _) = model();
    load_peft(&mut adapted, dir.path()).unwrap();
    for (name, pairs) in [("trained", &trained), ("control", &control)] {
        let s = &json["sets"][name];
        for key in [
            "n",
            "before_mean",
            "before_sd",
            "after_mean",
            "after_sd",
            "change_pct",
            "t",
            "df",
            "p",
            "improved",
            "worsened",
            "before",
            "after",
        ] {
            assert!(s.get(key).is_some(), "{name}: {key} missing");
        }
        let want_b: Vec<f64> = pairs
            .iter()
            .map(|p| reference_cos(&base, &tok, p, 2, Pooling::Words))
            .collect();
        let want_a: Vec<f64> = pairs
            .iter()
            .map(|p| reference_cos(&adapted, &tok, p, 2, Pooling::Words))
            .collect();
        let got = |k: &str| -> Vec<f64> { s[k].as_array().unwrap().iter().map(json_f32).collect() };
        let (gb, ga) = (got("before"), got("after"));
        for i in 0..pairs.len() {
            assert!((gb[i] - want_b[i]).abs() < 1e-4, "{name} before {i}");
            assert!((ga[i] - want_a[i]).abs() < 1e-4, "{name} after {i}");
        }
        // The adapter changes the embeddings.
        assert!(
            gb.iter().zip(&ga).any(|(b, a)| (a - b).abs() > 1e-3),
            "{name}"
        );
        // Summary numbers recomputed by hand from the per-pair lists.
        let n = pairs.len() as f64;
        let mb = gb.iter().sum::<f64>() / n;
        let ma = ga.iter().sum::<f64>() / n;
        let d: Vec<f64> = ga.iter().zip(&gb).map(|(a, b)| a - b).collect();
        let md = d.iter().sum::<f64>() / n;
        let sdd = (d.iter().map(|x| (x - md) * (x - md)).sum::<f64>() / (n - 1.0)).sqrt();
        let t = md / (sdd / n.sqrt());
        assert_eq!(s["n"], pairs.len());
        assert_eq!(s["df"], pairs.len() - 1);
        assert!((s["before_mean"].as_f64().unwrap() - mb).abs() < 1e-12);
        assert!((s["after_mean"].as_f64().unwrap() - ma).abs() < 1e-12);
        assert!((s["change_pct"].as_f64().unwrap() - 100.0 * (ma - mb) / mb).abs() < 1e-9);
        assert!((s["t"].as_f64().unwrap() - t).abs() < 1e-9 * t.abs().max(1.0));
        let p = stats::two_sided_p(t, n - 1.0).unwrap();
        assert!((s["p"].as_f64().unwrap() - p).abs() <= 1e-9 * p.max(1e-300));
        let up = d.iter().filter(|&&x| x > 0.0).count();
        let down = d.iter().filter(|&&x| x < 0.0).count();
        assert_eq!(s["improved"], up);
        assert_eq!(s["worsened"], down);
    }
    let csv = r.to_csv().unwrap();
    assert_eq!(csv.lines().count(), 1 + 12 + 9);
    assert!(
        csv.starts_with("set,swahili,english,before,after,change\n"),
        "{csv}"
    );
    let table = r.table();
    assert!(
        table.contains("trained") && table.contains("control"),
        "{table}"
    );
}

#[test]
fn schedule_values_by_hand() {
    // The paper: 623 pairs, batch 8 -> 78 steps per epoch, 390 in all.
    assert_eq!(steps_per_epoch(623, 8), 78);
    assert_eq!(steps_per_epoch(624, 8), 78);
    assert_eq!(steps_per_epoch(625, 8), 79);
    let s = LinearSchedule {
        lr: 2e-4,
        warmup: 50,
        total: 390,
    };
    let cases = [
        (0, 0.0),
        (1, 2e-4 / 50.0),
        (25, 1e-4),
        (49, 2e-4 * 49.0 / 50.0),
        (50, 2e-4),
        (51, 2e-4 * 339.0 / 340.0),
        (220, 1e-4),
        (389, 2e-4 / 340.0),
        (390, 0.0),
        (500, 0.0),
    ];
    for (k, want) in cases {
        let got = s.lr_at(k);
        assert!((got - want).abs() < 1e-18, "step {k}: {got} vs {want}");
    }
    // No warm-up: full rate at once, then decay.
    let s = LinearSchedule {
        lr: 1.0,
        warmup: 0,
        total: 4,
    };
    let got: Vec<f64> = (0..5).map(|k| s.lr_at(k)).collect();
    assert_eq!(got, [1.0, 0.75, 0.5, 0.25, 0.0]);
}

#[test]
fn triplet_loss_on_hand_computed_batches() {
    let t = |rows: &[[f32; 2]]| {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (rows.len(), 2), &CDevice::Cpu).unwrap()
    };
    let value = |a: &Tensor, p: &Tensor, margin: f64| {
        f64::from(
            triplet_loss(a, p, margin)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        )
    };
    let r = std::f64::consts::FRAC_1_SQRT_2;
    // Anchors (1,0), (0,1), (1,1); positives (1,0), (1,1), (0,1) — the
    // anchors scaled by 3 (the loss normalises).
    // Row 0: pos 1, other cosines r and 0 -> max(0, 0.4 + r − 1).
    // Row 1: pos r, others 0 and 1     -> 0.4 + 1 − r.
    // Row 2: pos r, others r and 1     -> 0.4 + 1 − r.
    let a = t(&[[3.0, 0.0], [0.0, 3.0], [3.0, 3.0]]);
    let p = t(&[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]);
    let want = ((0.4 + r - 1.0) + 2.0 * (1.4 - r)) / 3.0;
    let got = value(&a, &p, 0.4);
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    // Margin 0.2: row 0's hinge is closed (0.2 + r − 1 < 0).
    let want = 2.0 * (1.2 - r) / 3.0;
    let got = value(&a, &p, 0.2);
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    // Well separated: every hinge closed.
    let a = t(&[[1.0, 0.0], [0.0, 1.0]]);
    assert_eq!(value(&a, &a, 0.4), 0.0);
    // Opposite positives: cos(a_i, p_i) = −1 and the negative is 0.
    let a = t(&[[1.0, 0.0], [0.0, 1.0]]);
    let p = t(&[[-1.0, 0.0], [0.0, -1.0]]);
    assert!((value(&a, &p, 0.4) - 1.4).abs() < 1e-6);
    // One pair: no negative, no loss.
    let a = t(&[[1.0, 0.0]]);
    let p = t(&[[0.0, 1.0]]);
    assert_eq!(value(&a, &p, 0.4), 0.0);
    assert!(triplet_loss(&t(&[[1.0, 0.0]]), &t(&[[1.0, 0.0], [0.0, 1.0]]), 0.4).is_err());
}

#[test]
fn triplet_loss_gradient_matches_finite_differences() {
    let a0: Vec<f32> = vec![0.9, 0.1, -0.3, 0.2, 0.5, 0.7, -0.4, 0.6, 0.1];
    let p0: Vec<f32> = vec![0.8, 0.3, -0.1, 0.4, 0.2, 0.9, 0.3, -0.5, 0.2];
    let a = Var::from_vec(a0.clone(), (3, 3), &CDevice::Cpu).unwrap();
    let p = Tensor::from_vec(p0.clone(), (3, 3), &CDevice::Cpu).unwrap();
    let loss = triplet_loss(a.as_tensor(), &p, 0.4).unwrap();
    let g = loss.backward().unwrap();
    let ga: Vec<f32> = g
        .get(a.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // f64 loss for central differences.
    let loss64 = |a: &[f64]| -> f64 {
        let p: Vec<f64> = p0.iter().map(|&v| f64::from(v)).collect();
        let row = |m: &[f64], i: usize| m[3 * i..3 * i + 3].to_vec();
        let mut total = 0.0;
        for i in 0..3 {
            let pos = cos64(&row(a, i), &row(&p, i));
            let neg = (0..3)
                .filter(|&j| j != i)
                .map(|j| cos64(&row(a, i), &row(&p, j)))
                .fold(f64::NEG_INFINITY, f64::max);
            total += (0.4 + neg - pos).max(0.0);
        }
        total / 3.0
    };
    let base: Vec<f64> = a0.iter().map(|&v| f64::from(v)).collect();
    // The f32 autograd value's own error: each element is a mean over the
    // 3 rows of at most two cosine gradients, p/(‖a‖‖p‖) − cos·a/‖a‖², whose
    // terms are below 2/‖a‖ ≤ 2.2 here (every row of `a` has ‖a‖ > 0.9),
    // each from about 20 f32 operations: 32 ulps of 2 · 2.2 is a bound.
    let g_err = 32.0 * f64::from(f32::EPSILON) * 2.0 * 2.2;
    for k in 0..9 {
        // f64 evaluations (ε: a few ulps of the O(1) loss); steps far from
        // the hinge's and the max's kinks at these inputs.
        let d = fd::richardson(
            |s| {
                let mut x = base.clone();
                x[k] += s;
                loss64(&x)
            },
            1e-4,
            1e-15,
        );
        assert!(
            d.agrees(f64::from(ga[k]), g_err),
            "element {k}: autograd {} vs finite differences {d:?} (autograd error {g_err:e})",
            ga[k]
        );
    }
}

#[test]
fn first_step_loss_equals_an_f64_recomputation() {
    let (mut m, tok) = model();
    let pairs = train_pairs(6);
    let opts = TrainOptions {
        epochs: 1,
        batch: 6,
        shuffle: false,
        ..TrainOptions::default()
    };
    let (base, _) = model();
    let r = train(&mut m, &tok, &pairs, &opts, &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(r.steps.len(), 1);
    let s = r.steps[0];
    assert_eq!((s.step, s.total, s.epoch, s.batch), (1, 1, 1, 6));
    // Warm-up 50 > 0: the first step runs at learning rate 0.
    assert_eq!(s.lr, 0.0);
    // At initialisation B = 0, so the adapted model is the base model:
    // every word alone, all tokens pooled at index 2, f64 cosines.
    let emb = |text: &str| {
        let (st, sp) = states_alone(&base, &tok, text);
        pool64(&st[2], &vec![true; sp.len()])
    };
    let sw: Vec<Vec<f64>> = pairs.iter().map(|p| emb(&p.swahili)).collect();
    let en: Vec<Vec<f64>> = pairs.iter().map(|p| emb(&p.english)).collect();
    let mut want = 0.0;
    for i in 0..6 {
        let pos = cos64(&sw[i], &en[i]);
        let neg = (0..6)
            .filter(|&j| j != i)
            .map(|j| cos64(&sw[i], &en[j]))
            .fold(f64::NEG_INFINITY, f64::max);
        want += (0.4 + neg - pos).max(0.0);
    }
    want /= 6.0;
    assert!(want > 0.0, "the test batch must have an open hinge");
    assert!((s.loss - want).abs() < 1e-5, "{} vs {want}", s.loss);
    assert!(s.grad_norm > 0.0 && s.grad_norm.is_finite());
    // The saved config names the trained blocks.
    assert_eq!(r.lora.layers, Some(vec![0, 1]));
    assert_eq!(
        r.trainable_params,
        2 * (16 * 64 + 64 * 16) + 2 * (16 * 64 + 32 * 16)
    );
}

/// The training objective over all `pairs` as one batch, no dropout.
fn objective(m: &Llama, tok: &LlamaTokenizer, pairs: &[Pair]) -> f64 {
    let refs: Vec<&Pair> = pairs.iter().collect();
    let l = batch_loss(m, tok, &refs, 2, 0.4, None).unwrap();
    f64::from(l.to_scalar::<f32>().unwrap())
}

#[test]
fn training_lowers_the_loss_is_reproducible_and_round_trips_through_peft() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter");
    let log = dir.path().join("log.jsonl");
    let pairs = train_pairs(32);
    let opts = TrainOptions {
        epochs: 4,
        warmup: 2,
        lr: 5e-3,
        seed: 3,
        out: Some(out.clone()),
        log: Some(log.clone()),
        ..TrainOptions::default()
    };
    let (mut m, tok) = model();
    let before = objective(&m, &tok, &pairs);
    let mut seen = 0;
    let r = train(&mut m, &tok, &pairs, &opts, &mut |s| {
        seen += 1;
        assert_eq!(s.step, seen);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(seen, 16);
    assert_eq!(r.steps.len(), 16);
    let after = objective(&m, &tok, &pairs);
    assert!(after < 0.8 * before, "loss {before} -> {after}");
    let e = r.epoch_losses();
    assert!(e[3] < e[0], "{e:?}");

    // The same seed gives the same run.
    let (mut m2, _) = model();
    let r2 = train(
        &mut m2,
        &tok,
        &pairs,
        &TrainOptions {
            out: None,
            log: None,
            ..opts.clone()
        },
        &mut |_| ControlFlow::Continue(()),
    )
    .unwrap();
    let l1: Vec<f64> = r.steps.iter().map(|s| s.loss).collect();
    let l2: Vec<f64> = r2.steps.iter().map(|s| s.loss).collect();
    assert_eq!(l1, l2);

    // The log has one line per step.
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().count(), 16);
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], 16);
    assert_eq!(last["epoch"], 4);

    // The PEFT adapter loads onto a fresh model and gives the trained
    // model's hidden states.
    let (mut fresh, _) = model();
    let cfg = load_peft(&mut fresh, &out).unwrap();
    assert_eq!(cfg.layers, Some(vec![0, 1]));
    assert_eq!(cfg.rank, 16);
    let enc = tok.encode_batch(&["maji", "water"]).unwrap();
    let (ids, mask) = enc.tensors(&CDevice::Cpu).unwrap();
    let fo = ForwardOptions {
        up_to: Some(2),
        train_seed: None,
    };
    let h1: Vec<f32> = m.hidden_states(&ids, &mask, &fo).unwrap()[2]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let h2: Vec<f32> = fresh.hidden_states(&ids, &mask, &fo).unwrap()[2]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(h1, h2);
    // ... and it is not the base model.
    let (base, _) = model();
    let h0: Vec<f32> = base.hidden_states(&ids, &mask, &fo).unwrap()[2]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_ne!(h0, h1);
}

#[test]
fn bad_training_options_are_errors() {
    let (mut m, tok) = model();
    let pairs = train_pairs(4);
    for (opts, needle) in [
        (
            TrainOptions {
                layer: 0,
                ..TrainOptions::default()
            },
            "layer 0",
        ),
        (
            TrainOptions {
                layer: 9,
                ..TrainOptions::default()
            },
            "layer 9",
        ),
        (
            TrainOptions {
                batch: 0,
                ..TrainOptions::default()
            },
            "batch 0",
        ),
        (
            TrainOptions {
                lr: f64::NAN,
                ..TrainOptions::default()
            },
            "lr",
        ),
    ] {
        let e = train(&mut m, &tok, &pairs, &opts, &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap_err();
        assert!(e.to_string().contains(needle), "{e}");
    }
    let e = train(&mut m, &tok, &[], &TrainOptions::default(), &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err();
    assert!(e.to_string().contains("no training pairs"), "{e}");
}

/// The finite-difference helper itself (tests/common/fd.rs), on functions
/// with known derivatives.
mod fd_helper {
    use super::fd::richardson;

    /// A function with known derivatives: the bound holds and is tight.
    #[test]
    fn richardson_bounds_its_error_on_a_known_function() {
        // f = exp(x)·sin(3x) at x = 0.4, computed in f64 (ε ≈ 1e-16).
        let x = 0.4f64;
        let exact = x.exp() * (3.0 * x).sin() + 3.0 * x.exp() * (3.0 * x).cos();
        for h in [0.2, 0.1, 0.05] {
            let d = richardson(|s| (x + s).exp() * (3.0 * (x + s)).sin(), h, 1e-15);
            let err = (d.value - exact).abs();
            assert!(
                err <= d.bound,
                "h {h}: error {err:e} above bound {:e}",
                d.bound
            );
            assert!(
                d.bound < 1e-3 * exact.abs(),
                "h {h}: bound {:e} too loose",
                d.bound
            );
            assert!((d.central - exact).abs() > err, "extrapolation must help");
        }
    }

    /// Rounding noise of the stated size keeps the estimate within the bound.
    #[test]
    fn richardson_bound_covers_rounding_noise() {
        // f = x³ with every evaluation off by ±ε (alternating by step).
        let eps = 1e-6;
        let mut k = 0u32;
        let d = richardson(
            |s| {
                k += 1;
                let noise = if k.is_multiple_of(2) { eps } else { -eps };
                (1.0 + s).powi(3) + noise
            },
            0.1,
            eps,
        );
        assert!((d.value - 3.0).abs() <= d.bound, "{d:?}");
    }
}
