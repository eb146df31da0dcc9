//! `tli train`: the TLI step — early-layer LoRA trained with a triplet loss
//! on word-pair embeddings.
//!
//! What one run does, with the paper's settings as defaults
//! ([`TrainOptions::default`]):
//!
//! * **Adapters.** LoRA on `q_proj` and `v_proj`, rank 16, alpha 32
//!   (scale 2), dropout 0.05, initialised as PEFT does (`A`
//!   Kaiming-uniform, `B` zero, so the model starts unchanged). The loss
//!   reads hidden-state index `layer` (2), so only blocks `0..layer` can
//!   receive gradient: the adapters are attached to those blocks
//!   (`layers_to_transform = [0, .., layer − 1]` in the saved config). This
//!   is the same model as adapters on every block — an untrained adapter has
//!   `B = 0` and adds nothing — and the forward pass stops at `layer`.
//! * **Loss.** Each pair's Swahili word is the anchor and its English
//!   translation the positive; every other English word of the batch is a
//!   negative and the hardest (highest cosine) one is used. Embeddings are
//!   all-tokens mean pools (BOS included) at index `layer`, L2-normalised:
//!   `loss_i = max(0, margin + max_{j≠i} cos(sw_i, en_j) − cos(sw_i, en_i))`,
//!   averaged over the batch ([`triplet_loss`]). A batch of one pair has no
//!   negative; its loss is 0 (no gradient).
//! * **Optimizer.** AdamW from `candle-nn`, checked to follow PyTorch's
//!   `torch.optim.AdamW`: decoupled weight decay (`θ ← θ·(1 − lr·λ)` before
//!   the Adam update, with the current learning rate) and bias correction
//!   (`m̂ = m/(1−β₁ᵗ)`, `v̂ = v/(1−β₂ᵗ)`, update `lr·m̂/(√v̂ + ε)`, which is
//!   torch's `lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)` rearranged); betas
//!   0.9/0.999, eps 1e-8, weight decay 0.01. Parameters without a gradient
//!   are left alone (torch skips parameters whose `grad` is `None`).
//!   `tests/tli_train.rs` holds it to a hand-written f64 AdamW step.
//! * **Schedule** ([`LinearSchedule`]): transformers'
//!   `get_linear_schedule_with_warmup`, advanced after each optimizer step:
//!   step `k` (0-based) uses `lr · k / warmup` while `k < warmup`, then
//!   `lr · (total − k) / (total − warmup)`, down to 0. **The first step
//!   uses learning rate 0 when `warmup > 0`** (as in PyTorch/transformers).
//! * **Batches.** Batch 8, every epoch a fresh shuffle from a seeded RNG
//!   (the last batch of an epoch is smaller when the pairs do not divide
//!   evenly: 623 pairs give 78 steps per epoch). Dropout masks are seeded
//!   per step from the same seed, so a run is reproducible on one backend.
//! * **Checkpoints.** When [`TrainOptions::out`] is set, the adapter is
//!   saved in PEFT format after every epoch and at the end, each file
//!   written atomically, so an interrupted run leaves the last complete
//!   checkpoint. The per-step log ([`StepInfo`], one JSON object per line)
//!   is rewritten atomically alongside when [`TrainOptions::log`] is set.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType as CDType, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::candle_ops::cosine::{cosine_matrix, masked_mean_pool};
use crate::io::write_atomic;
use crate::model::lora::{attach, save_peft, trainable_vars};
use crate::model::{ForwardOptions, Llama, LlamaTokenizer, LoraConfig};
use crate::pairs::Pair;
use crate::{Error, Result};

const OP: &str = "train";

/// Settings of a training run (defaults: the paper's).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Hidden-state index the loss reads (2).
    pub layer: usize,
    /// Adapter settings (rank 16, alpha 32, dropout 0.05, `q_proj` and
    /// `v_proj`). `layers` is filled with `0..layer` when `None`.
    pub lora: LoraConfig,
    /// Peak learning rate (2e-4).
    pub lr: f64,
    /// Warm-up steps (50).
    pub warmup: usize,
    /// Epochs (5).
    pub epochs: usize,
    /// Pairs per batch (8).
    pub batch: usize,
    /// Triplet margin (0.4).
    pub margin: f64,
    /// Seed of the adapter initialisation, the shuffles and the dropout
    /// masks.
    pub seed: u64,
    /// Shuffle the pairs every epoch (true); false keeps the list's order.
    pub shuffle: bool,
    /// AdamW `beta1` (0.9).
    pub beta1: f64,
    /// AdamW `beta2` (0.999).
    pub beta2: f64,
    /// AdamW `eps` (1e-8).
    pub eps: f64,
    /// AdamW decoupled weight decay (0.01).
    pub weight_decay: f64,
    /// Save the adapter here after every epoch and at the end.
    pub out: Option<PathBuf>,
    /// Write the per-step log here (JSON lines) with every checkpoint.
    pub log: Option<PathBuf>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            layer: 2,
            lora: LoraConfig::default(),
            lr: 2e-4,
            warmup: 50,
            epochs: 5,
            batch: 8,
            margin: 0.4,
            seed: 0,
            shuffle: true,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            out: None,
            log: None,
        }
    }
}

/// Linear warm-up then linear decay to 0 (transformers'
/// `get_linear_schedule_with_warmup`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearSchedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// Total optimizer steps.
    pub total: usize,
}

impl LinearSchedule {
    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        let factor = if step < self.warmup {
            step as f64 / self.warmup.max(1) as f64
        } else {
            let rest = self.total.saturating_sub(step) as f64;
            (rest / self.total.saturating_sub(self.warmup).max(1) as f64).max(0.0)
        };
        self.lr * factor
    }
}

/// Optimizer steps of one epoch over `n` pairs in batches of `batch`
/// (the last batch may be smaller).
pub fn steps_per_epoch(n: usize, batch: usize) -> usize {
    n.div_ceil(batch.max(1))
}

/// One optimizer step, as reported to the progress hook and logged.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepInfo {
    /// Steps done, 1-based (this is step `step` of `total`).
    pub step: usize,
    /// Total steps of the run.
    pub total: usize,
    /// Epoch, 1-based.
    pub epoch: usize,
    /// The learning rate this step used.
    pub lr: f64,
    /// The batch loss (before the update).
    pub loss: f64,
    /// Global L2 norm of the LoRA gradients, before the update.
    pub grad_norm: f64,
    /// Pairs in the batch.
    pub batch: usize,
    /// Seconds since training started, at the end of the step.
    pub seconds: f64,
}

/// What [`train`] did.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// The adapter settings (as saved).
    pub lora: LoraConfig,
    /// Every step.
    pub steps: Vec<StepInfo>,
    /// Trainable parameters (elements of every `A` and `B`).
    pub trainable_params: usize,
    /// Wall time of the whole run, seconds.
    pub seconds: f64,
}

impl TrainReport {
    /// Mean loss of each epoch.
    pub fn epoch_losses(&self) -> Vec<f64> {
        let epochs = self.steps.iter().map(|s| s.epoch).max().unwrap_or(0);
        (1..=epochs)
            .map(|e| {
                let l: Vec<f64> = self
                    .steps
                    .iter()
                    .filter(|s| s.epoch == e)
                    .map(|s| s.loss)
                    .collect();
                super::stats::mean(&l)
            })
            .collect()
    }
}

/// The triplet loss with the hardest in-batch negative, on `anchor` and
/// `positive` embeddings (`[B, D]` each, any norm: they are L2-normalised
/// here as `F.cosine_similarity` does):
/// `mean_i max(0, margin + max_{j≠i} cos(a_i, p_j) − cos(a_i, p_i))`.
/// A scalar f32 tensor with autograd; 0 when `B = 1`.
///
/// # Errors
/// [`Error::ShapeMismatch`] for operands of different shapes;
/// [`Error::Candle`] if a tensor operation fails.
pub fn triplet_loss(anchor: &Tensor, positive: &Tensor, margin: f64) -> Result<Tensor> {
    const OP: &str = "triplet loss";
    if anchor.dims() != positive.dims() || anchor.rank() != 2 {
        return Err(Error::shape(
            OP,
            "positive",
            format!("[B, D] as anchor {:?}", anchor.dims()),
            format!("{:?}", positive.dims()),
        ));
    }
    let c = Error::candle(OP);
    let b = anchor.dims()[0];
    if b < 2 {
        return Tensor::zeros((), CDType::F32, anchor.device()).map_err(c);
    }
    let cos = cosine_matrix(anchor, positive).map_err(Error::candle(OP))?;
    let eye: Vec<f32> = (0..b * b)
        .map(|k| if k / b == k % b { 1.0 } else { 0.0 })
        .collect();
    let eye = Tensor::from_vec(eye, (b, b), anchor.device()).map_err(Error::candle(OP))?;
    let loss = (|| {
        let pos = cos.mul(&eye)?.sum(1)?;
        // Cosines lie in [-1, 1]: lowering the diagonal by 4 keeps it from
        // ever being the maximum, and leaves the others untouched.
        let neg = cos.sub(&(&eye * 4.0)?)?.max(1)?;
        ((neg - pos)? + margin)?.relu()?.mean_all()
    })()
    .map_err(Error::candle(OP))?;
    Ok(loss)
}

/// The loss of one batch of pairs through `model`: all-tokens pooling at
/// index `layer`, forward stopped there, dropout seeded by `train_seed`
/// (`None`: no dropout).
///
/// # Errors
/// As [`triplet_loss`], the tokenizer and [`Llama::hidden_states`].
pub fn batch_loss(
    model: &Llama,
    tok: &LlamaTokenizer,
    batch: &[&Pair],
    layer: usize,
    margin: f64,
    train_seed: Option<u64>,
) -> Result<Tensor> {
    if batch.is_empty() {
        return Err(Error::invalid(OP, "empty batch"));
    }
    let b = batch.len();
    let texts: Vec<&str> = batch
        .iter()
        .map(|p| p.swahili.as_str())
        .chain(batch.iter().map(|p| p.english.as_str()))
        .collect();
    let enc = tok.encode_batch(&texts)?;
    let (ids, mask) = enc.tensors(&model.device)?;
    let states = model.hidden_states(
        &ids,
        &mask,
        &ForwardOptions {
            up_to: Some(layer),
            train_seed,
        },
    )?;
    let pooled = masked_mean_pool(&states[layer], &mask).map_err(Error::candle(OP))?;
    let anchor = pooled.narrow(0, 0, b).map_err(Error::candle(OP))?;
    let positive = pooled.narrow(0, b, b).map_err(Error::candle(OP))?;
    triplet_loss(&anchor, &positive, margin)
}

/// SplitMix64 of `seed` and a stream number: independent seeds for the
/// adapter initialisation, the shuffles and each step's dropout.
pub fn mix_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Stream of the adapter initialisation seed.
const STREAM_INIT: u64 = 0;
/// Stream of the shuffling RNG.
const STREAM_SHUFFLE: u64 = 1;
/// First stream of the per-step dropout seeds.
const STREAM_DROPOUT: u64 = 1 << 32;

/// Check the options against the model and return the adapter config the
/// run uses (layers `0..layer` when none are named).
///
/// # Errors
/// [`Error::InvalidArgument`] naming the bad value.
pub fn resolve_config(model: &Llama, opts: &TrainOptions) -> Result<LoraConfig> {
    let bad = |m: String| Err(Error::invalid(OP, m));
    if opts.layer == 0 {
        return bad("layer 0 is the embedding output: no block can be trained for it".into());
    }
    if opts.layer > model.blocks.len() {
        return bad(format!(
            "layer {} needs {} blocks, {} are loaded",
            opts.layer,
            opts.layer,
            model.blocks.len()
        ));
    }
    if opts.batch == 0 || opts.epochs == 0 {
        return bad(format!(
            "batch {} and epochs {} must be positive",
            opts.batch, opts.epochs
        ));
    }
    for (name, v) in [
        ("lr", opts.lr),
        ("margin", opts.margin),
        ("eps", opts.eps),
        ("weight decay", opts.weight_decay),
    ] {
        if !v.is_finite() || v < 0.0 {
            return bad(format!("{name} {v} must be finite and not negative"));
        }
    }
    for (name, v) in [("beta1", opts.beta1), ("beta2", opts.beta2)] {
        if !(0.0..1.0).contains(&v) {
            return bad(format!("{name} {v} must be in [0, 1)"));
        }
    }
    let mut cfg = opts.lora.clone();
    if cfg.layers.is_none() {
        cfg.layers = Some((0..opts.layer).collect());
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Train fresh adapters on `model` with `pairs`; `on_step` is called after
/// every optimizer step (for progress bars).
///
/// The model keeps the trained adapters afterwards.
///
/// # Errors
/// [`Error::InvalidArgument`] for no pairs or bad options (see
/// [`resolve_config`]); model, tokenizer and I/O errors (saving).
pub fn train(
    model: &mut Llama,
    tok: &LlamaTokenizer,
    pairs: &[Pair],
    opts: &TrainOptions,
    on_step: &mut dyn FnMut(&StepInfo),
) -> Result<TrainReport> {
    if pairs.is_empty() {
        return Err(Error::invalid(OP, "no training pairs"));
    }
    let cfg = resolve_config(model, opts)?;
    attach(model, &cfg, mix_seed(opts.seed, STREAM_INIT))?;
    let vars: Vec<Var> = trainable_vars(model);
    let trainable_params = vars.iter().map(|v| v.as_tensor().elem_count()).sum();
    let mut optim = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: 0.0,
            beta1: opts.beta1,
            beta2: opts.beta2,
            eps: opts.eps,
            weight_decay: opts.weight_decay,
        },
    )
    .map_err(Error::candle(OP))?;
    let per_epoch = steps_per_epoch(pairs.len(), opts.batch);
    let sched = LinearSchedule {
        lr: opts.lr,
        warmup: opts.warmup,
        total: per_epoch * opts.epochs,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(opts.seed, STREAM_SHUFFLE));
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    let mut steps = Vec::with_capacity(sched.total);
    let start = Instant::now();
    let mut k = 0usize;
    for epoch in 1..=opts.epochs {
        if opts.shuffle {
            order.shuffle(&mut rng);
        }
        for idx in order.chunks(opts.batch) {
            let batch: Vec<&Pair> = idx.iter().map(|&i| &pairs[i]).collect();
            let lr = sched.lr_at(k);
            let loss = batch_loss(
                model,
                tok,
                &batch,
                opts.layer,
                opts.margin,
                Some(mix_seed(opts.seed, STREAM_DROPOUT + k as u64)),
            )?;
            let loss_value = f64::from(
                loss.to_dtype(CDType::F32)
                    .and_then(|l| l.to_scalar::<f32>())
                    .map_err(Error::candle(OP))?,
            );
            let grads = loss.backward().map_err(Error::candle(OP))?;
            let mut sq = 0.0f64;
            for v in &vars {
                if let Some(g) = grads.get(v.as_tensor()) {
                    let s = g
                        .sqr()
                        .and_then(|s| s.sum_all())
                        .and_then(|s| s.to_dtype(CDType::F64))
                        .and_then(|s| s.to_scalar::<f64>())
                        .map_err(Error::candle(OP))?;
                    sq += s;
                }
            }
            optim.set_learning_rate(lr);
            optim.step(&grads).map_err(Error::candle(OP))?;
            k += 1;
            let info = StepInfo {
                step: k,
                total: sched.total,
                epoch,
                lr,
                loss: loss_value,
                grad_norm: sq.sqrt(),
                batch: batch.len(),
                seconds: start.elapsed().as_secs_f64(),
            };
            steps.push(info);
            on_step(&info);
        }
        checkpoint(model, &cfg, opts, &steps)?;
    }
    Ok(TrainReport {
        lora: cfg,
        steps,
        trainable_params,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Save the adapter and the log (each file atomically), where asked.
fn checkpoint(
    model: &Llama,
    cfg: &LoraConfig,
    opts: &TrainOptions,
    steps: &[StepInfo],
) -> Result<()> {
    if let Some(dir) = &opts.out {
        save_peft(model, cfg, dir)?;
    }
    if let Some(path) = &opts.log {
        let mut text = String::new();
        for s in steps {
            let line = serde_json::to_string(s).map_err(|e| Error::invalid(OP, e.to_string()))?;
            text.push_str(&line);
            text.push('\n');
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        write_atomic(path, |w| {
            w.write_all(text.as_bytes()).map_err(|e| Error::io(path, e))
        })?;
    }
    Ok(())
}
