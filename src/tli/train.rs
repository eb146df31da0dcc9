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
//! * **Optimizer.** [`AdamW`], PyTorch's
//!   `torch.optim.AdamW` step for step: decoupled weight decay
//!   (`θ ← θ·(1 − lr·λ)` with the current learning rate) then the
//!   bias-corrected Adam update; betas 0.9/0.999, eps 1e-8, weight decay
//!   0.01. Parameters without a gradient are left alone. Its state (both
//!   moments and the step count of every factor) is saved with each
//!   checkpoint.
//! * **Schedule** ([`LinearSchedule`]): transformers'
//!   `get_linear_schedule_with_warmup`, advanced after each optimizer step:
//!   step `k` (0-based) uses `lr · k / warmup` while `k < warmup`, then
//!   `lr · (total − k) / (total − warmup)`, down to 0. **The first step
//!   uses learning rate 0 when `warmup > 0`** (as in PyTorch/transformers:
//!   the scheduler's first value is 0), so it only initialises the moments;
//!   the weights first move at step 2.
//! * **Batches.** Batch 8, every epoch a fresh shuffle from a seeded RNG
//!   (the last batch of an epoch is smaller when the pairs do not divide
//!   evenly: 623 pairs give 78 steps per epoch); with
//!   [`TrainOptions::shuffle`] off, batches are consecutive pairs of the
//!   list, in order. Dropout masks are seeded per step from the same seed
//!   (`dropout` 0 switches them off exactly), so a run is reproducible on
//!   one backend.
//! * **Starting point.** Fresh adapters initialised as PEFT does, or an
//!   existing PEFT adapter ([`TrainOptions::init_adapter`]).
//! * **Checkpoints** ([`TrainOptions::out`]): after every epoch, every
//!   [`TrainOptions::save_every`] steps, when stopped, and at the end. A
//!   checkpoint is the PEFT adapter in `out` (each file written
//!   atomically) and, in `out/checkpoint/`, everything a resumed run needs:
//!   the adapter, the optimizer state (`optimizer.safetensors`, see
//!   [`super::optim`]) and `trainer_state.json` (settings, among them the
//!   tokenizer's BOS mode, the pairs, the step reached and every step's log
//!   entry). That directory is built
//!   beside the old one and swapped in by renames, so an interruption
//!   leaves either the old or the new checkpoint whole ([`resume`] also
//!   accepts the `checkpoint.old` a crash between the two renames leaves).
//! * **Resuming** ([`resume`]): the adapter and optimizer state are
//!   reloaded, the epoch shuffles replayed from the seed and the batches
//!   already taken skipped, so the run continues with exactly the steps an
//!   uninterrupted run takes: same batches, dropout masks, learning rates
//!   and final adapter (on the same backend). The tokenizer must have the
//!   run's [`BosMode`] (a state without one, from before BOS modes, ran
//!   the tokenizer as is: any mode that prepends nothing continues it).
//! * **Log** ([`TrainOptions::log`]): one JSON object per optimizer step
//!   ([`StepInfo`]: `step`, `total`, `epoch`, `lr`, `loss`, `grad_norm`,
//!   `batch`, `seconds`), appended as each step ends (so `tail -f` follows
//!   a run); a resumed run first rewrites it from the checkpoint, so it
//!   never holds steps that the checkpoint does not. Two runs with the same
//!   settings log the same values except `seconds`.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType as CDType, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::optim::{AdamW, AdamWConfig};
use crate::candle_ops::cosine::{cosine_matrix, masked_mean_pool};
use crate::io::write_atomic;
use crate::model::lora::{attach, load_peft, named_trainable_vars, save_peft};
use crate::model::{BosMode, ForwardOptions, Llama, LlamaTokenizer, LoraConfig};
use crate::pairs::Pair;
use crate::{Error, Result};

const OP: &str = "train";

/// Settings of a training run (defaults: the paper's).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Hidden-state index the loss reads (2).
    pub layer: usize,
    /// Adapter settings (rank 16, alpha 32, dropout 0.05, `q_proj` and
    /// `v_proj`). `layers` is filled with `0..layer` when `None`. With
    /// [`TrainOptions::init_adapter`] only `dropout` is used: the rest
    /// comes from the adapter's config.
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
    /// Start from this PEFT adapter directory (its factors, rank, alpha,
    /// target modules and layers) instead of fresh adapters.
    pub init_adapter: Option<PathBuf>,
    /// Checkpoint directory: the PEFT adapter, and `checkpoint/` for
    /// [`resume`] (see the module docs). Written after every epoch, every
    /// [`TrainOptions::save_every`] steps, when stopped, and at the end.
    pub out: Option<PathBuf>,
    /// Also checkpoint every this many optimizer steps.
    pub save_every: Option<usize>,
    /// Append each step's [`StepInfo`] here as a JSON line.
    pub log: Option<PathBuf>,
    /// What the model is (e.g. its compute dtype and quantization),
    /// recorded in the checkpoint; [`resume`] refuses a different one.
    pub setup: Option<String>,
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
            init_adapter: None,
            out: None,
            save_every: None,
            log: None,
            setup: None,
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
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
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
    /// Seconds spent training up to the end of this step (a resumed run
    /// continues the count of the run it resumes).
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
    /// Seconds spent training (over every session of a resumed run).
    pub seconds: f64,
    /// False when the progress hook stopped the run early (a checkpoint
    /// was written at the last step when [`TrainOptions::out`] is set).
    pub completed: bool,
    /// The step this session started from (0 unless resumed).
    pub resumed_at: usize,
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

/// Check the options against the model and return the adapter config a
/// fresh run uses (layers `0..layer` when none are named).
///
/// # Errors
/// [`Error::InvalidArgument`] naming the bad value.
pub fn resolve_config(model: &Llama, opts: &TrainOptions) -> Result<LoraConfig> {
    check_options(model, opts)?;
    let mut cfg = opts.lora.clone();
    if cfg.layers.is_none() {
        cfg.layers = Some((0..opts.layer).collect());
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The checks of [`resolve_config`] that do not concern the adapter.
fn check_options(model: &Llama, opts: &TrainOptions) -> Result<()> {
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
    if opts.save_every == Some(0) {
        return bad("save_every 0: checkpoint every N > 0 steps, or not at all".into());
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
    if !(opts.lora.dropout >= 0.0 && opts.lora.dropout < 1.0) {
        return bad(format!("dropout {} is not in [0, 1)", opts.lora.dropout));
    }
    Ok(())
}

/// Load the adapter in `dir` onto `model` as the starting point, with
/// `dropout` instead of the one its config names; returns its config.
fn load_initial(model: &mut Llama, dir: &Path, layer: usize, dropout: f32) -> Result<LoraConfig> {
    let mut cfg = load_peft(model, dir)?;
    cfg.dropout = dropout;
    let mut trainable = false;
    for (l, block) in model.blocks.iter_mut().enumerate() {
        for p in &mut block.projections {
            if let Some(lora) = &mut p.lora {
                lora.dropout = dropout;
                trainable |= l < layer;
            }
        }
    }
    if !trainable {
        return Err(Error::invalid(
            OP,
            format!(
                "the adapter in {} has no module in blocks 0..{layer} (layers {:?}), \
                 so the loss at hidden-state index {layer} cannot train it",
                dir.display(),
                cfg.layers
            ),
        ));
    }
    Ok(cfg)
}

/// Train adapters on `model` with `pairs`: fresh ones, or those of
/// [`TrainOptions::init_adapter`]. `on_step` is called after every
/// optimizer step (progress bars; returning [`ControlFlow::Break`] stops
/// the run after a checkpoint, e.g. on Ctrl-C).
///
/// The model keeps the trained adapters afterwards.
///
/// # Errors
/// [`Error::InvalidArgument`] for no pairs or bad options (see
/// [`resolve_config`]), or an initial adapter with nothing to train; model,
/// tokenizer and I/O errors (loading, saving).
pub fn train(
    model: &mut Llama,
    tok: &LlamaTokenizer,
    pairs: &[Pair],
    opts: &TrainOptions,
    on_step: &mut dyn FnMut(&StepInfo) -> ControlFlow<()>,
) -> Result<TrainReport> {
    if pairs.is_empty() {
        return Err(Error::invalid(OP, "no training pairs"));
    }
    total_steps(pairs.len(), opts)?;
    super::embed::check_pairs(tok, pairs)?;
    let cfg = match &opts.init_adapter {
        Some(dir) => {
            check_options(model, opts)?;
            load_initial(model, dir, opts.layer, opts.lora.dropout)?
        }
        None => {
            let cfg = resolve_config(model, opts)?;
            attach(model, &cfg, mix_seed(opts.seed, STREAM_INIT))?;
            cfg
        }
    };
    let optim = AdamW::new(named_trainable_vars(model), adamw_config(opts))?;
    run(
        model,
        tok,
        pairs,
        opts,
        &cfg,
        optim,
        Progress::default(),
        on_step,
    )
}

/// The number of optimizer steps `opts` takes over `n_pairs` pairs, checked
/// (never wrapping).
///
/// # Errors
/// [`Error::InvalidArgument`] for batch 0, or when epochs × steps per epoch
/// does not fit a `usize`.
pub fn total_steps(n_pairs: usize, opts: &TrainOptions) -> Result<usize> {
    if opts.batch == 0 {
        return Err(Error::invalid(
            OP,
            "batch 0: the batch size must be positive",
        ));
    }
    let per_epoch = steps_per_epoch(n_pairs, opts.batch);
    per_epoch.checked_mul(opts.epochs).ok_or_else(|| {
        Error::invalid(
            OP,
            format!(
                "{} epochs of {per_epoch} steps each is more steps than can be counted",
                opts.epochs
            ),
        )
    })
}

/// Warnings about a schedule that runs but is probably not what was meant:
/// a warm-up at least as long as the run keeps the learning rate below its
/// peak throughout (`--warmup 100000` on a 5-step run trains at about
/// `lr · 5e-5`).
///
/// # Errors
/// As [`total_steps`].
pub fn schedule_warnings(n_pairs: usize, opts: &TrainOptions) -> Result<Vec<String>> {
    let total = total_steps(n_pairs, opts)?;
    let mut out = Vec::new();
    if opts.warmup >= total && opts.warmup > 0 {
        let peak = opts.lr * total.saturating_sub(1) as f64 / opts.warmup as f64;
        out.push(format!(
            "--warmup {} is not shorter than the run ({total} steps): the learning rate never \
             reaches --lr {:e} (its largest value is {peak:.3e})",
            opts.warmup, opts.lr
        ));
    }
    Ok(out)
}

/// Options of [`resume`]: where the log goes and what may change.
#[derive(Debug, Clone, Default)]
pub struct ResumeOptions {
    /// Append the per-step log here (rewritten first with the steps the
    /// checkpoint holds).
    pub log: Option<PathBuf>,
    /// Checkpoint every this many steps (`None`: as the run did).
    pub save_every: Option<usize>,
    /// The model setup ([`TrainOptions::setup`]); an error if the run
    /// recorded a different one.
    pub setup: Option<String>,
}

/// The settings a run saves with its checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Settings {
    layer: usize,
    lr: f64,
    warmup: usize,
    epochs: usize,
    batch: usize,
    margin: f64,
    seed: u64,
    shuffle: bool,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    save_every: Option<usize>,
    /// The tokenizer's BOS mode; absent (`None`) in states written before
    /// BOS modes existed, whose runs used the tokenizer as is
    /// ([`BosMode::Never`]).
    #[serde(default)]
    bos: Option<BosMode>,
}

/// `checkpoint/trainer_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    format: String,
    version: u32,
    step: usize,
    total: usize,
    seconds: f64,
    setup: Option<String>,
    settings: Settings,
    pairs: Vec<(String, String)>,
    steps: Vec<StepInfo>,
}

const STATE_FORMAT: &str = "tli-trainer-state";
const STATE_VERSION: u32 = 1;
/// The resumable checkpoint's directory inside [`TrainOptions::out`].
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// Where the previous checkpoint waits while the new one is swapped in.
const CHECKPOINT_OLD: &str = "checkpoint.old";
/// The optimizer state inside [`CHECKPOINT_DIR`].
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The trainer state inside [`CHECKPOINT_DIR`].
pub const STATE_FILE: &str = "trainer_state.json";

/// Continue the run checkpointed in `dir` (its [`TrainOptions::out`]) on
/// `model`, which must be the same model without adapters, with the same
/// `pairs` and a tokenizer with the run's BOS mode ([`resumed_bos`]). The
/// settings are the run's own; the result is the one the run would have
/// reached uninterrupted.
///
/// # Errors
/// [`Error::InvalidArgument`] when `dir` holds no checkpoint, the run had
/// already finished, or the pairs, model setup or BOS mode differ from the
/// run's (naming the first difference); [`Error::Format`] for a damaged
/// checkpoint; as [`train`].
pub fn resume(
    model: &mut Llama,
    tok: &LlamaTokenizer,
    pairs: &[Pair],
    dir: &Path,
    ropts: &ResumeOptions,
    on_step: &mut dyn FnMut(&StepInfo) -> ControlFlow<()>,
) -> Result<TrainReport> {
    let (ckpt, state) = read_state(dir)?;
    let path = ckpt.join(STATE_FILE);
    if state.step >= state.total {
        return Err(Error::invalid(
            OP,
            format!(
                "the run in {} finished all {} steps: nothing to resume",
                dir.display(),
                state.total
            ),
        ));
    }
    if state.steps.len() != state.step {
        return Err(Error::format(
            &path,
            format!("step {} but {} log entries", state.step, state.steps.len()),
        ));
    }
    check_same_pairs(&state.pairs, pairs, dir)?;
    if let (Some(was), Some(now)) = (&state.setup, &ropts.setup)
        && was != now
    {
        return Err(Error::invalid(
            OP,
            format!(
                "the run in {} used model setup {was:?}, this one is {now:?}",
                dir.display()
            ),
        ));
    }
    check_same_bos(state.settings.bos, tok, dir)?;
    let s = &state.settings;
    let opts = TrainOptions {
        layer: s.layer,
        lr: s.lr,
        warmup: s.warmup,
        epochs: s.epochs,
        batch: s.batch,
        margin: s.margin,
        seed: s.seed,
        shuffle: s.shuffle,
        beta1: s.beta1,
        beta2: s.beta2,
        eps: s.eps,
        weight_decay: s.weight_decay,
        save_every: ropts.save_every.or(s.save_every),
        out: Some(dir.to_path_buf()),
        log: ropts.log.clone(),
        setup: state.setup.clone(),
        init_adapter: None,
        lora: LoraConfig::default(),
    };
    check_options(model, &opts)?;
    let total = steps_per_epoch(pairs.len(), opts.batch) * opts.epochs;
    if total != state.total {
        return Err(Error::format(
            &path,
            format!("{} steps recorded, the settings give {total}", state.total),
        ));
    }
    let cfg = load_peft(model, &ckpt)?;
    let mut optim = AdamW::new(named_trainable_vars(model), adamw_config(&opts))?;
    optim.load(&ckpt.join(OPTIMIZER_FILE))?;
    let progress = Progress {
        step: state.step,
        seconds: state.seconds,
        steps: state.steps,
    };
    run(model, tok, pairs, &opts, &cfg, optim, progress, on_step)
}

/// A resumed run must encode words as the run did: the same BOS mode, or
/// for a state written before BOS modes existed (the tokenizer as is), any
/// mode that prepends nothing.
fn check_same_bos(was: Option<BosMode>, tok: &LlamaTokenizer, dir: &Path) -> Result<()> {
    let now = tok.bos();
    let same = match was {
        Some(m) => m == now.mode,
        None => now.mode == BosMode::Never || !now.prepended,
    };
    if same {
        return Ok(());
    }
    let was = match was {
        Some(m) => format!("--bos {m}"),
        None => "--bos never (its trainer state predates --bos: the tokenizer as is)".into(),
    };
    Err(Error::invalid(
        OP,
        format!(
            "the run in {} used {was}, this one --bos {} ({now}): resume with the run's mode",
            dir.display(),
            now.mode
        ),
    ))
}

/// The BOS mode of the run checkpointed in `dir`: `None` for a trainer
/// state written before BOS modes existed (such runs used the tokenizer as
/// is, [`BosMode::Never`]).
///
/// # Errors
/// As [`resume`] for a missing or damaged checkpoint.
pub fn resumed_bos(dir: &Path) -> Result<Option<BosMode>> {
    Ok(read_state(dir)?.1.settings.bos)
}

/// How many blocks [`resume`] needs loaded for the run checkpointed in
/// `dir`: those its loss reads and those its adapter names (`None`: every
/// block, for an adapter on all layers).
///
/// # Errors
/// As [`resume`] for a missing or damaged checkpoint.
pub fn resumed_blocks(dir: &Path) -> Result<Option<usize>> {
    let (ckpt, state) = read_state(dir)?;
    let cfg = LoraConfig::from_file(ckpt.join(crate::model::lora::CONFIG_FILE))?;
    Ok(cfg.layers.map(|l| {
        l.iter()
            .map(|&i| i + 1)
            .max()
            .unwrap_or(0)
            .max(state.settings.layer)
    }))
}

/// The checkpoint directory of `dir` and its parsed trainer state.
fn read_state(dir: &Path) -> Result<(PathBuf, TrainerState)> {
    let ckpt = checkpoint_dir(dir)?;
    let path = ckpt.join(STATE_FILE);
    let text = crate::io::read_text(&path)?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| Error::format(&path, format!("not a trainer state: {e}")))?;
    if state.format != STATE_FORMAT || state.version != STATE_VERSION {
        return Err(Error::format(
            &path,
            format!(
                "format {:?} version {}, expected {STATE_FORMAT:?} version {STATE_VERSION}",
                state.format, state.version
            ),
        ));
    }
    Ok((ckpt, state))
}

/// The checkpoint directory of the run in `dir`: `checkpoint`, or the
/// `checkpoint.old` a crash between the two renames of a save leaves.
fn checkpoint_dir(dir: &Path) -> Result<PathBuf> {
    for name in [CHECKPOINT_DIR, CHECKPOINT_OLD] {
        let p = dir.join(name);
        if p.join(STATE_FILE).is_file() {
            return Ok(p);
        }
    }
    Err(Error::invalid(
        OP,
        format!(
            "{} holds no checkpoint to resume ({}/{STATE_FILE} is missing; a run writes it \
             at its first save)",
            dir.display(),
            CHECKPOINT_DIR
        ),
    ))
}

fn check_same_pairs(was: &[(String, String)], now: &[Pair], dir: &Path) -> Result<()> {
    let differ = |what: String| {
        Err(Error::invalid(
            OP,
            format!(
                "the pairs differ from those of the run in {}: {what}",
                dir.display()
            ),
        ))
    };
    if was.len() != now.len() {
        return differ(format!("{} pairs now, {} then", now.len(), was.len()));
    }
    if let Some((i, (w, n))) = was
        .iter()
        .zip(now)
        .enumerate()
        .find(|(_, (w, n))| w.0 != n.swahili || w.1 != n.english)
    {
        return differ(format!(
            "pair {} is {:?} / {:?} now, {:?} / {:?} then",
            i + 1,
            n.swahili,
            n.english,
            w.0,
            w.1
        ));
    }
    Ok(())
}

fn adamw_config(opts: &TrainOptions) -> AdamWConfig {
    AdamWConfig {
        beta1: opts.beta1,
        beta2: opts.beta2,
        eps: opts.eps,
        weight_decay: opts.weight_decay,
    }
}

/// Where a run stands: steps done, seconds spent, their log entries.
#[derive(Debug, Default)]
struct Progress {
    step: usize,
    seconds: f64,
    steps: Vec<StepInfo>,
}

/// The training loop, from `progress` to the end or until `on_step` stops
/// it.
#[allow(clippy::too_many_arguments)]
fn run(
    model: &mut Llama,
    tok: &LlamaTokenizer,
    pairs: &[Pair],
    opts: &TrainOptions,
    cfg: &LoraConfig,
    mut optim: AdamW,
    progress: Progress,
    on_step: &mut dyn FnMut(&StepInfo) -> ControlFlow<()>,
) -> Result<TrainReport> {
    let vars = named_trainable_vars(model);
    let trainable_params = vars.iter().map(|(_, v)| v.as_tensor().elem_count()).sum();
    let per_epoch = steps_per_epoch(pairs.len(), opts.batch);
    let sched = LinearSchedule {
        lr: opts.lr,
        warmup: opts.warmup,
        total: per_epoch * opts.epochs,
    };
    let resumed_at = progress.step;
    let Progress {
        step: mut k,
        seconds: seconds0,
        mut steps,
    } = progress;
    let mut log = LogWriter::open(opts.log.as_deref(), &steps)?;
    let start = Instant::now();
    let elapsed = |start: &Instant| seconds0 + start.elapsed().as_secs_f64();
    let mut saved_at = k;
    let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(opts.seed, STREAM_SHUFFLE));
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    let (first_epoch, skip) = (resumed_at / per_epoch, resumed_at % per_epoch);
    for e in 0..opts.epochs {
        // Every epoch's shuffle is drawn, also those a resumed run skips,
        // so the RNG is where the uninterrupted run's was.
        if opts.shuffle {
            order.shuffle(&mut rng);
        }
        if e < first_epoch {
            continue;
        }
        let epoch = e + 1;
        let already = if e == first_epoch { skip } else { 0 };
        for idx in order.chunks(opts.batch).skip(already) {
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
            for (_, v) in &vars {
                if let Some(g) = grads.get(v.as_tensor()) {
                    sq += g
                        .to_dtype(CDType::F64)
                        .and_then(|g| g.sqr())
                        .and_then(|s| s.sum_all())
                        .and_then(|s| s.to_scalar::<f64>())
                        .map_err(Error::candle(OP))?;
                }
            }
            // A non-finite loss or gradient would poison every parameter at
            // the optimizer step: stop before it. The last checkpoint (all
            // finite: save_peft refuses anything else) stays as it was.
            if !loss_value.is_finite() || !sq.is_finite() {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "step {} of {} (epoch {epoch}, lr {lr:e}): the loss is {loss_value} and \
                         the gradient norm {}; training stopped before the optimizer step, and \
                         the last checkpoint ({}) is kept. Lower --lr (or raise --warmup), or check \
                         the model and adapter for NaN/Inf values",
                        k + 1,
                        sched.total,
                        sq.sqrt(),
                        if saved_at > 0 {
                            format!("step {saved_at}")
                        } else {
                            "none yet".to_string()
                        }
                    ),
                ));
            }
            optim.step(&grads, lr)?;
            k += 1;
            let info = StepInfo {
                step: k,
                total: sched.total,
                epoch,
                lr,
                loss: loss_value,
                grad_norm: sq.sqrt(),
                batch: batch.len(),
                seconds: elapsed(&start),
            };
            steps.push(info);
            log.append(&info)?;
            let stop = on_step(&info).is_break();
            let due = opts.save_every.is_some_and(|n| k % n == 0);
            if stop || due {
                save(
                    model,
                    tok,
                    cfg,
                    opts,
                    &optim,
                    pairs,
                    &steps,
                    elapsed(&start),
                )?;
                saved_at = k;
            }
            if stop {
                return Ok(TrainReport {
                    lora: cfg.clone(),
                    steps,
                    trainable_params,
                    seconds: elapsed(&start),
                    completed: false,
                    resumed_at,
                });
            }
        }
        if saved_at != k {
            save(
                model,
                tok,
                cfg,
                opts,
                &optim,
                pairs,
                &steps,
                elapsed(&start),
            )?;
            saved_at = k;
        }
    }
    Ok(TrainReport {
        lora: cfg.clone(),
        steps,
        trainable_params,
        seconds: elapsed(&start),
        completed: true,
        resumed_at,
    })
}

/// Write a checkpoint (see the module docs) when [`TrainOptions::out`] is
/// set.
#[allow(clippy::too_many_arguments)]
fn save(
    model: &Llama,
    tok: &LlamaTokenizer,
    cfg: &LoraConfig,
    opts: &TrainOptions,
    optim: &AdamW,
    pairs: &[Pair],
    steps: &[StepInfo],
    seconds: f64,
) -> Result<()> {
    let Some(out) = &opts.out else {
        return Ok(());
    };
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let state = TrainerState {
        format: STATE_FORMAT.into(),
        version: STATE_VERSION,
        step: steps.len(),
        total: steps_per_epoch(pairs.len(), opts.batch) * opts.epochs,
        seconds,
        setup: opts.setup.clone(),
        settings: Settings {
            layer: opts.layer,
            lr: opts.lr,
            warmup: opts.warmup,
            epochs: opts.epochs,
            batch: opts.batch,
            margin: opts.margin,
            seed: opts.seed,
            shuffle: opts.shuffle,
            beta1: opts.beta1,
            beta2: opts.beta2,
            eps: opts.eps,
            weight_decay: opts.weight_decay,
            save_every: opts.save_every,
            bos: Some(tok.bos().mode),
        },
        pairs: pairs
            .iter()
            .map(|p| (p.swahili.clone(), p.english.clone()))
            .collect(),
        steps: steps.to_vec(),
    };
    // Build the new checkpoint beside the old one; a failure part-way
    // deletes it (TempDir's drop) and leaves the old one alone.
    let tmp = tempfile::Builder::new()
        .prefix(".checkpoint.")
        .suffix(".tmp")
        .tempdir_in(out)
        .map_err(|e| Error::io(out, e))?;
    save_peft(model, cfg, tmp.path())?;
    optim.save(&tmp.path().join(OPTIMIZER_FILE))?;
    let json = serde_json::to_string(&state).map_err(|e| Error::invalid(OP, e.to_string()))?;
    let spath = tmp.path().join(STATE_FILE);
    write_atomic(&spath, |w| {
        w.write_all(json.as_bytes())
            .map_err(|e| Error::io(&spath, e))
    })?;
    // Swap it in: checkpoint → checkpoint.old, new → checkpoint, drop old.
    // Between the two renames only checkpoint.old exists, and `resume`
    // takes it.
    let (cur, old) = (out.join(CHECKPOINT_DIR), out.join(CHECKPOINT_OLD));
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    if cur.exists() {
        std::fs::rename(&cur, &old).map_err(|e| Error::io(&cur, e))?;
    }
    let built = tmp.keep();
    std::fs::rename(&built, &cur).map_err(|e| Error::io(&built, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    // The user-facing adapter, file by file (each atomic).
    save_peft(model, cfg, out)
}

/// The per-step log: rewritten with the steps already taken, then
/// appended to line by line.
struct LogWriter {
    file: Option<(PathBuf, std::fs::File)>,
}

impl LogWriter {
    fn open(path: Option<&Path>, steps: &[StepInfo]) -> Result<Self> {
        let Some(path) = path else {
            return Ok(Self { file: None });
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let mut text = String::new();
        for s in steps {
            text.push_str(&log_line(s)?);
        }
        write_atomic(path, |w| {
            w.write_all(text.as_bytes()).map_err(|e| Error::io(path, e))
        })?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Self {
            file: Some((path.to_path_buf(), file)),
        })
    }

    fn append(&mut self, s: &StepInfo) -> Result<()> {
        if let Some((path, f)) = &mut self.file {
            let line = log_line(s)?;
            f.write_all(line.as_bytes())
                .and_then(|()| f.flush())
                .map_err(|e| Error::io(&*path, e))?;
        }
        Ok(())
    }
}

fn log_line(s: &StepInfo) -> Result<String> {
    let mut line = serde_json::to_string(s).map_err(|e| Error::invalid(OP, e.to_string()))?;
    line.push('\n');
    Ok(line)
}
