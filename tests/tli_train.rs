//! Training you can trust: the optimizer against a hand-written PyTorch
//! step, a first step from an adapter recomputed by hand, reproducible logs,
//! and an interrupted-then-resumed run equal to an uninterrupted one.

#[path = "common/fd.rs"]
mod fd;

use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{DType as CDType, Device as CDevice, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use tli_kernels::model::lora::{self, load_peft, named_trainable_vars, save_peft};
use tli_kernels::model::{
    BosMode, ForwardOptions, Llama, LlamaTokenizer, LoadOptions, LoraConfig, SpecialTokens,
    TargetModules, synthetic,
};
use tli_kernels::pairs::{Pair, shipped};
use tli_kernels::tli::optim::{AdamW, AdamWConfig};
use tli_kernels::tli::train::{
    CHECKPOINT_DIR, OPTIMIZER_FILE, ResumeOptions, StepInfo, TrainOptions, batch_loss, resume,
    resumed_bos, train,
};

const SEED: u64 = 11;

fn model() -> (Llama, LlamaTokenizer) {
    synthetic::build(SEED, &LoadOptions::default()).unwrap()
}

fn train_pairs(n: usize) -> Vec<Pair> {
    shipped().unwrap().0.into_iter().take(n).collect()
}

fn go(_: &StepInfo) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

/// A progress hook that stops the run after step `n`.
fn stop_at(n: usize) -> impl FnMut(&StepInfo) -> ControlFlow<()> {
    move |s| {
        if s.step == n {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

/// A hand-written f64 AdamW step as `torch.optim.AdamW` does it (its
/// single-tensor path), for one parameter at its step `t`.
fn torch_adamw(
    theta: &mut [f64],
    m: &mut [f64],
    v: &mut [f64],
    g: &[f64],
    t: i32,
    lr: f64,
    c: AdamWConfig,
) {
    for i in 0..theta.len() {
        theta[i] *= 1.0 - lr * c.weight_decay;
        m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g[i];
        v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * g[i] * g[i];
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let denom = v[i].sqrt() / bc2.sqrt() + c.eps;
        theta[i] -= lr / bc1 * m[i] / denom;
    }
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

fn values(v: &Var) -> Vec<f32> {
    v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn adamw_is_torch_adamw_and_its_state_round_trips() {
    let w0 = [0.5f32, -1.25, 2.0, 0.0];
    let u0 = [3.0f32, -0.5];
    // Gradients (loss = Σ c·w): `u` gets none at step 2, so its step count
    // lags (torch skips parameters whose grad is None).
    let cw = [
        [0.3f32, -2.0, 1e-3, 0.7],
        [-0.1, 0.5, 4.0, -0.7],
        [0.2, 0.2, -3.0, 1e-4],
        [1.0, -1.0, 0.5, 0.25],
    ];
    let cu = [
        Some([0.4f32, -0.2]),
        None,
        Some([-1.5, 0.01]),
        Some([0.3, 0.3]),
    ];
    let lrs = [0.05, 0.1, 0.02, 0.03];
    let cfg = AdamWConfig::default();
    let dev = CDevice::Cpu;
    let new_opt = |w: &Var, u: &Var| {
        AdamW::new(vec![("w".into(), w.clone()), ("u".into(), u.clone())], cfg).unwrap()
    };
    let w = Var::from_vec(w0.to_vec(), 4, &dev).unwrap();
    let u = Var::from_vec(u0.to_vec(), 2, &dev).unwrap();
    let mut opt = new_opt(&w, &u);
    let step = |opt: &mut AdamW, w: &Var, u: &Var, k: usize| {
        let c = Tensor::from_vec(cw[k].to_vec(), 4, &dev).unwrap();
        let mut loss = w.as_tensor().mul(&c).unwrap().sum_all().unwrap();
        if let Some(cu) = cu[k] {
            let c = Tensor::from_vec(cu.to_vec(), 2, &dev).unwrap();
            loss = (loss + u.as_tensor().mul(&c).unwrap().sum_all().unwrap()).unwrap();
        }
        opt.step(&loss.backward().unwrap(), lrs[k]).unwrap();
    };
    let (mut tw, mut mw, mut vw) = (to64(&w0), vec![0.0; 4], vec![0.0; 4]);
    let (mut tu, mut mu, mut vu) = (to64(&u0), vec![0.0; 2], vec![0.0; 2]);
    let mut tu_steps = 0;
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("optimizer.safetensors");
    let mut resumed: Option<(Var, Var, AdamW)> = None;
    for k in 0..4 {
        step(&mut opt, &w, &u, k);
        torch_adamw(
            &mut tw,
            &mut mw,
            &mut vw,
            &to64(&cw[k]),
            k as i32 + 1,
            lrs[k],
            cfg,
        );
        if let Some(c) = cu[k] {
            tu_steps += 1;
            torch_adamw(&mut tu, &mut mu, &mut vu, &to64(&c), tu_steps, lrs[k], cfg);
        }
        if let Some((w2, u2, opt2)) = &mut resumed {
            step(opt2, w2, u2, k);
        }
        for (label, got, want) in [("w", values(&w), &tw), ("u", values(&u), &tu)] {
            for (i, (&g, &e)) in got.iter().zip(want.iter()).enumerate() {
                // f32 parameters: a few ulps of the value, or of the
                // update for values near 0.
                assert!(
                    (f64::from(g) - e).abs() <= 4.0 * f64::from(f32::EPSILON) * e.abs().max(0.1),
                    "step {} {label}[{i}]: {g} vs {e}",
                    k + 1
                );
            }
        }
        if k == 1 {
            assert_eq!(opt.steps_of("w"), Some(2));
            assert_eq!(opt.steps_of("u"), Some(1));
            // Save here; a fresh optimizer on copies of the parameters
            // loads it and must take the remaining steps bit for bit.
            opt.save(&saved).unwrap();
            let w2 = Var::from_vec(values(&w), 4, &dev).unwrap();
            let u2 = Var::from_vec(values(&u), 2, &dev).unwrap();
            let mut opt2 = new_opt(&w2, &u2);
            opt2.load(&saved).unwrap();
            assert_eq!(opt2.steps_of("u"), Some(1));
            resumed = Some((w2, u2, opt2));
        }
    }
    let (w2, u2, _) = resumed.unwrap();
    assert_eq!(values(&w), values(&w2));
    assert_eq!(values(&u), values(&u2));

    // A state for other parameters, or a negative learning rate, is an
    // error naming it.
    let x = Var::from_vec(vec![1f32; 4], 4, &dev).unwrap();
    let mut other = AdamW::new(vec![("x".into(), x)], cfg).unwrap();
    let e = other.load(&saved).unwrap_err().to_string();
    assert!(e.contains("w.exp_avg") || e.contains("u.exp_avg"), "{e}");
    let e = other
        .step(&Tensor::new(0f32, &dev).unwrap().backward().unwrap(), -1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("-1"), "{e}");
    let e = AdamW::new(vec![("w".into(), w.clone()), ("w".into(), u.clone())], cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"w\" appears twice"), "{e}");
}

/// An adapter on `v_proj` of block 0, rank 2, with seeded nonzero `A` and
/// `B` and a dropout the run must override.
fn start_adapter(dir: &Path) {
    let (mut m, _) = model();
    let cfg = LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.3,
        target_modules: TargetModules::Names(vec!["v_proj".into()]),
        layers: Some(vec![0]),
        ..LoraConfig::default()
    };
    lora::attach(&mut m, &cfg, 5).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    for (_, v) in named_trainable_vars(&m) {
        let dims = v.as_tensor().dims().to_vec();
        let n: usize = dims.iter().product();
        // On a grid of 2⁻¹⁴ so that the finite-difference steps of the
        // first-step test are exact in f32.
        let x: Vec<f32> = (0..n)
            .map(|_| fd::on_grid(rng.random_range(-0.3f32..0.3), 2f32.powi(-14)))
            .collect();
        v.set(&Tensor::from_vec(x, dims, &CDevice::Cpu).unwrap())
            .unwrap();
    }
    save_peft(&m, &cfg, dir).unwrap();
}

fn cos64(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// The embedding of one text alone: every token's hidden state at `layer`
/// averaged in f64.
fn embed64(m: &Llama, tok: &LlamaTokenizer, text: &str, layer: usize) -> Vec<f64> {
    let enc = tok.encode_batch(&[text]).unwrap();
    let (ids, mask) = enc.tensors(&CDevice::Cpu).unwrap();
    let fo = ForwardOptions {
        up_to: Some(layer),
        train_seed: None,
    };
    let rows = m.hidden_states(&ids, &mask, &fo).unwrap()[layer]
        .to_dtype(CDType::F64)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let mut out = vec![0.0; rows[0].len()];
    for r in &rows {
        for (o, v) in out.iter_mut().zip(r) {
            *o += v / rows.len() as f64;
        }
    }
    out
}

#[test]
fn first_step_from_an_adapter_matches_a_hand_computation() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init");
    start_adapter(&init);
    let log = dir.path().join("log.jsonl");
    let pairs = train_pairs(8);
    let (lr, margin) = (1e-2, 0.4);
    let opts = TrainOptions {
        layer: 1,
        lora: LoraConfig {
            dropout: 0.0,
            ..LoraConfig::default()
        },
        lr,
        warmup: 0,
        epochs: 1,
        batch: 4,
        margin,
        shuffle: false,
        init_adapter: Some(init.clone()),
        log: Some(log.clone()),
        ..TrainOptions::default()
    };
    let (mut m, tok) = model();
    // Stop after the first step.
    let r = train(&mut m, &tok, &pairs, &opts, &mut |_| ControlFlow::Break(())).unwrap();
    assert!(!r.completed);
    assert_eq!(r.steps.len(), 1);
    let s = r.steps[0];
    assert_eq!((s.step, s.total, s.epoch, s.batch), (1, 2, 1, 4));
    // Warm-up 0: the first step runs at the peak rate (2 steps: factor 2/2).
    assert_eq!(s.lr, lr);
    assert_eq!(r.lora.rank, 2);
    assert_eq!(r.lora.dropout, 0.0);
    assert_eq!(r.trainable_params, 2 * 64 + 32 * 2);

    // The reference: the initial adapter on a fresh model, no dropout.
    let (mut r0, _) = model();
    load_peft(&mut r0, &init).unwrap();
    let first: Vec<&Pair> = pairs[..4].iter().collect();
    let loss32 = |m: &Llama| -> f64 {
        let l = batch_loss(m, &tok, &first, 1, margin, None).unwrap();
        f64::from(l.to_scalar::<f32>().unwrap())
    };
    // Dropout 0 is off exactly, and without shuffling the first batch is
    // the first four lines: the logged loss is that batch's, bit for bit.
    assert_eq!(s.loss, loss32(&r0));
    // ... and equals the f64 hand computation: each word alone, every
    // token pooled at index 1, hardest negative, hinge, mean.
    let sw: Vec<Vec<f64>> = first
        .iter()
        .map(|p| embed64(&r0, &tok, &p.swahili, 1))
        .collect();
    let en: Vec<Vec<f64>> = first
        .iter()
        .map(|p| embed64(&r0, &tok, &p.english, 1))
        .collect();
    let mut want = 0.0;
    for i in 0..4 {
        let neg = (0..4)
            .filter(|&j| j != i)
            .map(|j| cos64(&sw[i], &en[j]))
            .fold(f64::NEG_INFINITY, f64::max);
        want += (margin + neg - cos64(&sw[i], &en[i])).max(0.0) / 4.0;
    }
    assert!(want > 0.0, "the batch must have an open hinge");
    assert!((s.loss - want).abs() < 1e-5, "loss {} vs {want}", s.loss);

    // The gradient by finite differences of the loss, parameter by
    // parameter (fd::richardson: steps 2⁻⁶, 2⁻⁷, 2⁻⁸, all exact on the
    // adapter's 2⁻¹⁴ grid). ε, the error of one f32 evaluation of the loss:
    // the batch's four embeddings come out of one block and a mean pool,
    // their cosines from length-64 reductions, then a hinge and a mean; 16
    // ulps of the loss cover those roundings.
    let eps = 16.0 * f64::from(f32::EPSILON) * s.loss.abs();
    let h = 2f64.powi(-6);
    let mut g_fd: Vec<Vec<fd::Derivative>> = Vec::new();
    for (_, v) in named_trainable_vars(&r0) {
        let x0 = values(&v);
        let dims = v.as_tensor().dims().to_vec();
        let at = |x: &[f32]| {
            v.set(&Tensor::from_vec(x.to_vec(), dims.clone(), &CDevice::Cpu).unwrap())
                .unwrap()
        };
        let mut g = Vec::with_capacity(x0.len());
        for i in 0..x0.len() {
            g.push(fd::richardson(
                |step| {
                    let mut x = x0.clone();
                    x[i] = x0[i] + step as f32; // exact: on the grid
                    at(&x);
                    loss32(&r0)
                },
                h,
                eps,
            ));
        }
        at(&x0);
        g_fd.push(g);
    }
    // ‖g‖ − ‖g_fd‖ is at most ‖g − g_fd‖ (the triangle inequality), which
    // the per-element bounds bound; autograd's own f32 error (a few ulps of
    // each gradient element) is far below them.
    let norm_fd = g_fd
        .iter()
        .flatten()
        .map(|d| d.value * d.value)
        .sum::<f64>()
        .sqrt();
    let norm_bound = g_fd
        .iter()
        .flatten()
        .map(|d| d.bound * d.bound)
        .sum::<f64>()
        .sqrt();
    assert!(
        norm_fd > 20.0 * norm_bound,
        "gradient norm {norm_fd} too small to test against its bound {norm_bound}"
    );
    assert!(
        (s.grad_norm - norm_fd).abs() <= norm_bound + 1e-6 * norm_fd,
        "grad norm {} vs finite differences {norm_fd} (bound {norm_bound})",
        s.grad_norm
    );
    let n = g_fd.iter().map(Vec::len).sum::<usize>() as f64;

    // The first AdamW step by hand: m = (1−β₁)g, v = (1−β₂)g², so after
    // bias correction θ₁ = θ₀·(1 − lr·λ) − lr·g/(|g| + ε), which is
    // lr·sign(g) but for lr·ε/|g|.
    let (wd, eps) = (opts.weight_decay, opts.eps);
    let mut checked = 0;
    for ((_, v0), ((_, v1), g)) in named_trainable_vars(&r0)
        .iter()
        .zip(named_trainable_vars(&m).iter().zip(&g_fd))
    {
        for ((&t0, &t1), d) in values(v0).iter().zip(&values(v1)).zip(g) {
            let (gi, noise) = (d.value, d.bound);
            let decayed = f64::from(t0) * (1.0 - lr * wd);
            let moved = f64::from(t1) - decayed;
            if gi.abs() > noise {
                let want = -lr * gi / (gi.abs() + eps);
                // Two f32 roundings of values below 0.5 (the decay and
                // the update: half an ulp, 3e-8, each), the f32 update
                // arithmetic (a few ulps of lr: 1e-8), and the effect of
                // the finite-difference noise on the ε term:
                // lr·ε·noise/g².
                let tol = 6e-8 + 1e-8 + lr * eps * noise / (gi * gi);
                assert!(
                    (moved - want).abs() <= tol,
                    "θ {t0} → {t1}: moved {moved}, want {want} (g {gi}, tolerance {tol})"
                );
                checked += 1;
            } else {
                assert!(moved.abs() <= lr * (1.0 + 1e-6), "θ {t0} → {t1}");
            }
        }
    }
    assert!(
        checked as f64 > 0.8 * n,
        "only {checked} of {n} signs were certain"
    );

    // The log holds the step, with the documented fields.
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().count(), 1);
    let v: Value = serde_json::from_str(text.trim()).unwrap();
    for k in [
        "step",
        "total",
        "epoch",
        "lr",
        "loss",
        "grad_norm",
        "batch",
        "seconds",
    ] {
        assert!(v.get(k).is_some(), "log line lacks {k}: {v}");
    }
    assert_eq!(v["lr"].as_f64(), Some(lr));
    assert_eq!(v["loss"].as_f64(), Some(s.loss));
}

/// Every log line without `seconds`.
fn log_without_time(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v
        })
        .collect()
}

/// Options of a small run with shuffling and dropout on, 3 epochs of 5
/// steps (24 pairs, batch 5: the last batch of each epoch has 4).
fn small_run(out: Option<&Path>, log: &Path, seed: u64) -> TrainOptions {
    TrainOptions {
        epochs: 3,
        batch: 5,
        warmup: 3,
        lr: 5e-3,
        seed,
        save_every: Some(4),
        out: out.map(Path::to_path_buf),
        log: Some(log.to_path_buf()),
        setup: Some("f32".into()),
        ..TrainOptions::default()
    }
}

#[test]
fn the_same_seed_gives_the_same_log() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = train_pairs(24);
    let logs: Vec<Vec<Value>> = [(1, 7), (2, 7), (3, 8)]
        .iter()
        .map(|&(i, seed)| {
            let log = dir.path().join(format!("{i}.jsonl"));
            let (mut m, tok) = model();
            train(&mut m, &tok, &pairs, &small_run(None, &log, seed), &mut go).unwrap();
            log_without_time(&log)
        })
        .collect();
    assert_eq!(logs[0].len(), 15);
    assert_eq!(logs[0], logs[1]);
    assert_ne!(logs[0], logs[2], "another seed must change the run");
}

fn file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn an_interrupted_run_resumed_equals_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = train_pairs(24);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let (log_a, log_b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));

    let (mut m, tok) = model();
    let full = train(
        &mut m,
        &tok,
        &pairs,
        &small_run(Some(&a), &log_a, 7),
        &mut go,
    )
    .unwrap();
    assert!(full.completed);
    assert_eq!(full.steps.len(), 15);

    // Stop at step 7 (mid-epoch 2, after the step-4 checkpoint).
    let (mut m, tok) = model();
    let part = train(
        &mut m,
        &tok,
        &pairs,
        &small_run(Some(&b), &log_b, 7),
        &mut stop_at(7),
    )
    .unwrap();
    assert!(!part.completed);
    assert_eq!(part.steps.len(), 7);
    // A crash between the two renames of a save leaves checkpoint.old only.
    std::fs::rename(b.join(CHECKPOINT_DIR), b.join("checkpoint.old")).unwrap();

    let ropts = ResumeOptions {
        log: Some(log_b.clone()),
        save_every: None,
        setup: Some("f32".into()),
    };
    let (mut m, tok) = model();
    let rest = resume(&mut m, &tok, &pairs, &b, &ropts, &mut go).unwrap();
    assert!(rest.completed);
    assert_eq!(rest.resumed_at, 7);
    assert_eq!(rest.steps.len(), 15);
    // Same adapter, same optimizer state, same log (but for the clock).
    for f in [lora::WEIGHTS_FILE, lora::CONFIG_FILE] {
        assert!(file(&a.join(f)) == file(&b.join(f)), "{f} differs");
    }
    let (ca, cb) = (a.join(CHECKPOINT_DIR), b.join(CHECKPOINT_DIR));
    assert!(file(&ca.join(OPTIMIZER_FILE)) == file(&cb.join(OPTIMIZER_FILE)));
    assert_eq!(log_without_time(&log_a), log_without_time(&log_b));
    assert!(!b.join("checkpoint.old").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&b)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // A finished run has nothing to resume; other pairs or another model
    // setup are refused, naming the difference.
    let (mut m, tok) = model();
    let e = resume(&mut m, &tok, &pairs, &b, &ropts, &mut go)
        .unwrap_err()
        .to_string();
    assert!(e.contains("finished all 15 steps"), "{e}");
    let (mut m, tok) = model();
    let part = train(
        &mut m,
        &tok,
        &pairs,
        &small_run(Some(&b), &log_b, 7),
        &mut stop_at(2),
    )
    .unwrap();
    assert_eq!(part.steps.len(), 2);
    let mut other = pairs.clone();
    other.swap(3, 4);
    let (mut m, tok) = model();
    let e = resume(&mut m, &tok, &other, &b, &ropts, &mut go)
        .unwrap_err()
        .to_string();
    assert!(e.contains("pair 4 is"), "{e}");
    let e = resume(
        &mut m,
        &tok,
        &pairs,
        &b,
        &ResumeOptions {
            setup: Some("bf16".into()),
            ..ropts.clone()
        },
        &mut go,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("\"f32\"") && e.contains("\"bf16\""), "{e}");
    let e = resume(&mut m, &tok, &pairs, dir.path(), &ropts, &mut go)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no checkpoint"), "{e}");
}

#[test]
fn an_initial_adapter_without_trainable_modules_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init");
    let (mut m, _) = model();
    let cfg = LoraConfig {
        layers: Some(vec![3]),
        ..LoraConfig::default()
    };
    lora::attach(&mut m, &cfg, 1).unwrap();
    save_peft(&m, &cfg, &init).unwrap();
    let (mut m, tok) = model();
    let opts = TrainOptions {
        init_adapter: Some(init),
        ..TrainOptions::default()
    };
    let e = train(&mut m, &tok, &train_pairs(4), &opts, &mut go)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no module in blocks 0..2"), "{e}");
}

/// The synthetic tokenizer without its BOS post-processor (as SmolLM2's
/// adds none); `config.json`'s `bos_token_id` is the synthetic BOS.
fn tokenizer_without_bos() -> LlamaTokenizer {
    let with = synthetic::tokenizer().unwrap();
    let mut inner = with.inner().clone();
    inner.with_post_processor(None::<tokenizers::processors::PostProcessorWrapper>);
    let special = SpecialTokens {
        bos: Some(synthetic::BOS.into()),
        eos: Some(synthetic::EOS.into()),
        pad: None,
    };
    LlamaTokenizer::new(
        inner,
        &special,
        (with.bos_id, None, None),
        "<no-BOS tokenizer>",
    )
    .unwrap()
}

#[test]
fn a_prepended_bos_trains_as_the_post_processors_does() {
    let pairs = train_pairs(8);
    let refs: Vec<&Pair> = pairs.iter().collect();
    let (m, tok) = model();
    let bare = tokenizer_without_bos();
    assert!(bare.bos().prepended && !tok.bos().prepended);
    let loss = |t: &LlamaTokenizer| {
        batch_loss(&m, t, &refs, 2, 0.4, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    // The same token ids, so the same loss, bit for bit.
    assert_eq!(loss(&tok), loss(&bare));
    let never = bare.with_bos(BosMode::Never).unwrap();
    assert!(never.bos().word_at_position_0);
    assert_ne!(loss(&tok), loss(&never));
}

#[test]
fn resume_refuses_another_bos_mode_and_reads_old_states_as_never() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = train_pairs(24);
    let out = dir.path().join("run");
    let log = dir.path().join("log.jsonl");
    let (mut m, tok) = model();
    train(
        &mut m,
        &tok,
        &pairs,
        &small_run(Some(&out), &log, 7),
        &mut stop_at(4),
    )
    .unwrap();
    let state_path = out.join(CHECKPOINT_DIR).join("trainer_state.json");
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    assert_eq!(state["settings"]["bos"], "auto");
    assert_eq!(resumed_bos(&out).unwrap(), Some(BosMode::Auto));
    let ropts = ResumeOptions {
        log: Some(log.clone()),
        save_every: None,
        setup: Some("f32".into()),
    };
    for mode in [BosMode::Never, BosMode::Always] {
        let (mut m, tok) = model();
        let tok = tok.with_bos(mode).unwrap();
        let e = resume(&mut m, &tok, &pairs, &out, &ropts, &mut go)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("used --bos auto") && e.contains(&format!("this one --bos {mode}")),
            "{e}"
        );
    }

    // A state from before --bos: the tokenizer as is. A mode that prepends
    // nothing continues it; one that prepends a BOS is refused.
    let mut old = state.clone();
    old["settings"].as_object_mut().unwrap().remove("bos");
    std::fs::write(&state_path, old.to_string()).unwrap();
    assert_eq!(resumed_bos(&out).unwrap(), None);
    let (mut m, _) = model();
    let e = resume(
        &mut m,
        &tokenizer_without_bos(),
        &pairs,
        &out,
        &ropts,
        &mut go,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("--bos never (its trainer state predates --bos") && e.contains("--bos auto"),
        "{e}"
    );
    let (mut m, tok) = model();
    let r = resume(&mut m, &tok, &pairs, &out, &ropts, &mut go).unwrap();
    assert!(r.completed && r.resumed_at == 4);
    // The resumed run records its mode.
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    assert_eq!(state["settings"]["bos"], "auto");
}
