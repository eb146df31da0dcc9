//! `tli scan`, `tli train`, `tli eval`: argument parsing and terminal
//! output over [`tli_kernels::tli`].

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::DType as CDType;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tli_kernels::Device;
use tli_kernels::model::lora::CONFIG_FILE;
use tli_kernels::model::{BosMode, BosOutcome, LoraConfig, TargetModules};
use tli_kernels::pairs::{Pair, check_disjoint, read_pairs};
use tli_kernels::tli::embed::adapter_blocks;
use tli_kernels::tli::plot::{eval_svg, scan_svg, write_text};
use tli_kernels::tli::scan::{PoolingChoice, ScanOptions, scan};
use tli_kernels::tli::train::{
    ResumeOptions, StepInfo, TrainOptions, resume, resumed_blocks, resumed_bos, schedule_warnings,
    total_steps, train,
};
use tli_kernels::tli::{EvalOptions, ModelOptions, Pooling, evaluate_adapter, load_model};

/// Where the model and the kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RunDevice {
    /// The model and every kernel on the CPU.
    Cpu,
    /// The model on the CPU, the pooling/cosine kernels under the simulator
    /// (slow; proves the kernel source).
    Sim,
    /// The model and the kernels on CUDA device 0 (needs a GPU and a build
    /// with `--features candle-cuda`).
    Cuda,
}

impl RunDevice {
    fn kernels(self) -> Device {
        match self {
            RunDevice::Cpu => Device::Cpu,
            RunDevice::Sim => Device::Sim,
            RunDevice::Cuda => Device::Cuda,
        }
    }
}

/// Quantization applied while loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Quantize {
    /// bitsandbytes NF4, blocksize 64 (as `load_in_4bit`).
    Nf4,
}

/// Compute dtype of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ComputeDtype {
    /// f32.
    F32,
    /// bf16 (the paper's compute dtype; slow on most CPUs).
    Bf16,
}

/// Options shared by the verbs that load a model.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Model directory (`config.json`, `model.safetensors` or shards,
    /// `tokenizer.json`), a GGUF file of a Llama, or a hub id
    /// `org/name[@revision]` already in the local Hugging Face cache (nothing
    /// is downloaded).
    #[arg(long, value_name = "DIR|FILE.gguf|ORG/NAME")]
    model: PathBuf,
    /// Quantize the projections while loading.
    #[arg(long, value_enum)]
    quantize: Option<Quantize>,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = RunDevice::Cpu)]
    device: RunDevice,
    /// Compute dtype.
    #[arg(long, value_enum, default_value_t = ComputeDtype::F32)]
    dtype: ComputeDtype,
    /// BOS before each word: auto prepends the config's bos_token_id when
    /// the tokenizer adds no BOS itself; always prepends it unless already
    /// there; never uses the tokenizer as is [default: auto; with --resume,
    /// the run's].
    #[arg(long, value_enum)]
    bos: Option<BosMode>,
    /// The most tokens one word may encode to; a longer line is an error
    /// naming it, before any model work.
    #[arg(long, value_name = "N", default_value_t = tli_kernels::model::tokenizer::DEFAULT_MAX_WORD_TOKENS)]
    max_word_tokens: usize,
}

impl ModelArgs {
    fn options(&self) -> ModelOptions {
        ModelOptions {
            dtype: match self.dtype {
                ComputeDtype::F32 => CDType::F32,
                ComputeDtype::Bf16 => CDType::BF16,
            },
            quantize: self.quantize.is_some(),
            cuda: self.device == RunDevice::Cuda,
            bos: self.bos.unwrap_or_default(),
            max_word_tokens: self.max_word_tokens,
        }
    }

    /// What makes a resumed run compute the same thing: compute dtype and
    /// quantization (recorded in the checkpoint).
    fn setup(&self) -> String {
        format!(
            "{}{}",
            match self.dtype {
                ComputeDtype::F32 => "f32",
                ComputeDtype::Bf16 => "bf16",
            },
            if self.quantize.is_some() {
                ", NF4 blocksize 64"
            } else {
                ""
            }
        )
    }

    fn describe(&self) -> String {
        format!(
            "{} ({}, {}{})",
            self.model.display(),
            match self.device {
                RunDevice::Cpu => "cpu",
                RunDevice::Sim => "cpu, kernels on sim",
                RunDevice::Cuda => "cuda",
            },
            match self.dtype {
                ComputeDtype::F32 => "f32",
                ComputeDtype::Bf16 => "bf16",
            },
            if self.quantize.is_some() { ", NF4" } else { "" }
        )
    }
}

/// Pooling choice for `scan`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PoolArg {
    /// The word's own tokens (BOS/EOS/padding excluded).
    Words,
    /// Every token, BOS included.
    All,
    /// Both, side by side.
    Both,
}

/// Pooling rule for `eval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PoolOne {
    /// The word's own tokens (BOS/EOS/padding excluded).
    Words,
    /// Every token, BOS included.
    All,
}

impl From<PoolOne> for Pooling {
    fn from(p: PoolOne) -> Self {
        match p {
            PoolOne::Words => Pooling::Words,
            PoolOne::All => Pooling::All,
        }
    }
}

#[derive(Debug, Args)]
pub struct ScanArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Word pairs (`swahili<TAB>english` per line).
    #[arg(long, value_name = "FILE")]
    pairs: PathBuf,
    /// Pooling rule(s).
    #[arg(long, value_enum, default_value_t = PoolArg::Both)]
    pool: PoolArg,
    /// Hidden-state indices, comma-separated, or `all` (0 is the embedding
    /// output, i the output of block i − 1).
    #[arg(long, default_value = "all")]
    layers: String,
    /// Apply this PEFT LoRA adapter first.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Write the report as JSON here (`-` for standard output).
    #[arg(long, value_name = "OUT")]
    json: Option<PathBuf>,
    /// Plot alignment by layer into this SVG file.
    #[arg(long, value_name = "OUT.svg")]
    plot: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Training pairs (`swahili<TAB>english` per line).
    #[arg(long, value_name = "FILE")]
    pairs: PathBuf,
    /// Adapter directory to write: the PEFT adapter, and `checkpoint/` to
    /// resume from (rewritten atomically after every epoch).
    #[arg(long, value_name = "ADAPTER_DIR", required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Continue the run checkpointed in this directory (its --out), with
    /// its own settings; give the same --model, --pairs, --dtype and
    /// --quantize.
    #[arg(long, value_name = "ADAPTER_DIR", conflicts_with_all = [
        "out", "init_adapter", "layer", "modules", "rank", "alpha", "dropout", "lr",
        "warmup", "epochs", "batch", "margin", "seed", "weight_decay", "shuffle",
    ])]
    resume: Option<PathBuf>,
    /// Start from this PEFT adapter instead of fresh adapters (its rank,
    /// alpha, modules and layers unless given; a different value is an
    /// error).
    #[arg(long, value_name = "ADAPTER_DIR")]
    init_adapter: Option<PathBuf>,
    /// Hidden-state index the loss reads.
    #[arg(long, default_value_t = 2)]
    layer: usize,
    /// Projections that get an adapter [default: q_proj,v_proj].
    #[arg(long, value_delimiter = ',')]
    modules: Option<Vec<String>>,
    /// LoRA rank [default: 16].
    #[arg(long)]
    rank: Option<usize>,
    /// LoRA alpha (scale = alpha / rank) [default: 32].
    #[arg(long)]
    alpha: Option<f64>,
    /// LoRA dropout; 0 switches it off [default: 0.05, or the
    /// --init-adapter's lora_dropout].
    #[arg(long)]
    dropout: Option<f32>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Linear warm-up steps (the first step runs at learning rate 0).
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    /// Epochs.
    #[arg(long, default_value_t = 5)]
    epochs: usize,
    /// Pairs per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Triplet margin.
    #[arg(long, default_value_t = 0.4)]
    margin: f64,
    /// Seed of the adapter initialisation, shuffles and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// AdamW weight decay (decoupled).
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Shuffle the pairs every epoch; `--shuffle false` keeps the file's
    /// order (batches are consecutive lines).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    shuffle: bool,
    /// Also checkpoint every N optimizer steps.
    #[arg(long, value_name = "N")]
    save_every: Option<usize>,
    /// Per-step log, one JSON object per line [default:
    /// ADAPTER_DIR/train_log.jsonl].
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The trained PEFT adapter.
    #[arg(long, value_name = "ADAPTER_DIR")]
    adapter: PathBuf,
    /// The trained pairs.
    #[arg(long, value_name = "FILE")]
    train: PathBuf,
    /// Held-out control pairs (must share no Swahili word with --train).
    #[arg(long, value_name = "FILE")]
    control: Option<PathBuf>,
    /// Hidden-state index.
    #[arg(long, default_value_t = 2)]
    layer: usize,
    /// Pooling rule.
    #[arg(long, value_enum, default_value_t = PoolOne::Words)]
    pool: PoolOne,
    /// Write the report as JSON here (`-` for standard output).
    #[arg(long, value_name = "OUT")]
    json: Option<PathBuf>,
    /// Write one row per pair as CSV here.
    #[arg(long, value_name = "OUT")]
    csv: Option<PathBuf>,
    /// Plot each pair's cosine after against before into this SVG file.
    #[arg(long, value_name = "OUT.svg")]
    plot: Option<PathBuf>,
}

fn read_list(path: &Path) -> Result<Vec<Pair>> {
    let pairs = read_pairs(path)?;
    if pairs.is_empty() {
        bail!("{}: no pairs in the file", path.display());
    }
    Ok(pairs)
}

/// Write `text` to `path` atomically, or to standard output for `-`.
fn emit(path: &Path, text: &str, what: &str) -> Result<()> {
    if path.as_os_str() == "-" {
        println!("{text}");
        return Ok(());
    }
    write_text(path, text).with_context(|| format!("writing the {what}"))?;
    eprintln!("{what} written to {}", path.display());
    Ok(())
}

fn spinner(msg: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
        bar.set_style(style);
    }
    bar.set_message(msg.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

fn parse_layers(s: &str) -> Result<Option<Vec<usize>>> {
    if s.trim().eq_ignore_ascii_case("all") {
        return Ok(None);
    }
    s.split(',')
        .map(|p| {
            p.trim().parse::<usize>().with_context(|| {
                format!("--layers: {p:?} is not a layer index (use e.g. 0,1,2 or all)")
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

pub fn scan_cmd(a: &ScanArgs) -> Result<()> {
    let pairs = read_list(&a.pairs)?;
    let layers = parse_layers(&a.layers)?;
    let mut blocks = layers.as_ref().and_then(|l| l.iter().copied().max());
    if let Some(dir) = &a.adapter {
        match (blocks, adapter_blocks(dir)?) {
            (Some(b), Some(n)) => blocks = Some(b.max(n)),
            (_, None) => blocks = None,
            (None, _) => {}
        }
    }
    let t = Instant::now();
    let bar = spinner("loading the model");
    let loaded = load_model(&a.model.model, &a.model.options(), blocks);
    bar.finish_and_clear();
    let (mut model, tok) = loaded.with_context(|| format!("loading {}", a.model.describe()))?;
    note_ignored_keys(&model);
    if let Some(dir) = &a.adapter {
        tli_kernels::model::lora::load_peft(&mut model, dir)
            .with_context(|| format!("loading the adapter {}", dir.display()))?;
    }
    let load_s = t.elapsed().as_secs_f64();
    let pooling = match a.pool {
        PoolArg::Words => PoolingChoice::One(Pooling::Words),
        PoolArg::All => PoolingChoice::One(Pooling::All),
        PoolArg::Both => PoolingChoice::Both,
    };
    let opts = ScanOptions {
        layers,
        pooling,
        device: a.model.device.kernels(),
    };
    let t = Instant::now();
    let bar = spinner(&format!("scanning {} pairs", pairs.len()));
    let r = scan(&model, &tok, &pairs, &opts);
    bar.finish_and_clear();
    let r = r.context("scanning")?;
    println!(
        "tli scan: {} pairs from {}, model {}{}",
        pairs.len(),
        a.pairs.display(),
        a.model.describe(),
        a.adapter
            .as_ref()
            .map_or(String::new(), |d| format!(", adapter {}", d.display()))
    );
    print_bos(tok.bos());
    println!(
        "alignment = mean cosine of Swahili and English embeddings (masked mean, L2-normalised); \
         words: the word's own tokens, all: every token incl. BOS"
    );
    println!(
        "margin = mean cosine of translations - mean cosine of non-matching pairs (every Swahili \
         word against every other English word); top1 = share of Swahili words whose translation \
         is the nearest English word (ties count against it). A high mean with a margin near 0 is \
         every word close to every other, not alignment"
    );
    print!("{}", r.table());
    println!(
        "load {load_s:.2} s, scan {:.2} s (pooling/cosine kernels on {})",
        t.elapsed().as_secs_f64(),
        opts.device
    );
    if let Some(p) = &a.json {
        emit(p, &r.to_json()?, "JSON report")?;
    }
    if let Some(p) = &a.plot {
        emit(p, &scan_svg(&r)?, "plot")?;
    }
    Ok(())
}

/// The BOS line of a report header, and the attention-sink warning when
/// a word's first token sits at position 0.
fn print_bos(b: &BosOutcome) {
    println!("BOS: {b}");
    if let Some(w) = b.sink_warning() {
        println!("{w}");
    }
}

/// The adapter settings of a fresh or `--init-adapter` run: flags over the
/// initial adapter's config over the defaults; a flag that contradicts the
/// initial adapter is an error.
fn train_lora(a: &TrainArgs) -> Result<LoraConfig> {
    let base_model = Some(
        tli_kernels::model::resolve_model_path(&a.model.model)
            .with_context(|| format!("--model {}", a.model.model.display()))?
            .base_model_name(),
    );
    let Some(init) = &a.init_adapter else {
        let d = LoraConfig::default();
        return Ok(LoraConfig {
            rank: a.rank.unwrap_or(d.rank),
            alpha: a.alpha.unwrap_or(d.alpha),
            dropout: a.dropout.unwrap_or(d.dropout),
            target_modules: a
                .modules
                .clone()
                .map_or(d.target_modules, TargetModules::Names),
            base_model,
            ..d
        });
    };
    let c = LoraConfig::from_file(init.join(CONFIG_FILE))
        .with_context(|| format!("reading --init-adapter {}", init.display()))?;
    let shown = init.display();
    if let Some(r) = a.rank.filter(|&r| r != c.rank) {
        bail!(
            "--rank {r}: the adapter in {shown} (--init-adapter) has rank {}",
            c.rank
        );
    }
    if let Some(al) = a.alpha.filter(|&al| al != c.alpha) {
        bail!(
            "--alpha {al}: the adapter in {shown} (--init-adapter) has lora_alpha {}",
            c.alpha
        );
    }
    if let Some(m) = &a.modules {
        let want = TargetModules::Names(m.clone());
        if want != c.target_modules {
            bail!(
                "--modules {}: the adapter in {shown} (--init-adapter) targets {:?}",
                m.join(","),
                c.target_modules
            );
        }
    }
    Ok(LoraConfig {
        dropout: a.dropout.unwrap_or(c.dropout),
        base_model: c.base_model.clone().or(base_model),
        ..c
    })
}

/// Name, once on stderr, the config keys the model loader did not use.
fn note_ignored_keys(model: &tli_kernels::model::Llama) {
    let keys = &model.config.ignored_keys;
    if !keys.is_empty() {
        eprintln!("ignored config keys: {}", keys.join(", "));
    }
}

/// Set a flag on Ctrl-C (a second Ctrl-C exits at once; every file is
/// written atomically, so that loses at most the current step).
fn stop_on_ctrl_c() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let installed = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\nCtrl-C or SIGTERM: stopping after this step with a checkpoint (again to quit now)"
        );
    });
    if let Err(e) = installed {
        eprintln!("warning: Ctrl-C will not checkpoint before stopping: {e}");
    }
    stop
}

pub fn train_cmd(a: &TrainArgs) -> Result<()> {
    if a.model.device == RunDevice::Sim {
        bail!(
            "--device sim: training runs on cpu or cuda (the simulator proves kernels, it does not train)"
        );
    }
    let pairs = read_list(&a.pairs)?;
    let Some(dir) = a.resume.as_ref().or(a.out.as_ref()).cloned() else {
        bail!("give --out ADAPTER_DIR (or --resume ADAPTER_DIR)");
    };
    let lora = match a.resume {
        Some(_) => None,
        None => {
            // Checked before the model loads and before anything is written.
            let lora = train_lora(a)?;
            lora.validate()?;
            Some(lora)
        }
    };
    // Blocks to load: those the loss reads, and any the adapter names.
    let blocks = match (&a.resume, &a.init_adapter) {
        (Some(r), _) => resumed_blocks(r)?,
        (None, Some(init)) => adapter_blocks(init)?.map(|n| n.max(a.layer)),
        (None, None) => Some(a.layer),
    };
    let mut options = a.model.options();
    if let (Some(r), None) = (&a.resume, a.model.bos) {
        // A state from before --bos ran the tokenizer as is.
        options.bos = resumed_bos(r)?.unwrap_or(BosMode::Never);
    }
    let t = Instant::now();
    let bar = spinner("loading the model");
    let loaded = load_model(&a.model.model, &options, blocks);
    bar.finish_and_clear();
    let (mut model, tok) = loaded.with_context(|| format!("loading {}", a.model.describe()))?;
    note_ignored_keys(&model);
    let load_s = t.elapsed().as_secs_f64();
    let log = a.log.clone().unwrap_or_else(|| dir.join("train_log.jsonl"));
    let total;
    if let Some(lora) = &lora {
        // Checked (never wrapping), and a warm-up that outlasts the run is
        // said before it starts.
        let schedule = TrainOptions {
            lr: a.lr,
            warmup: a.warmup,
            epochs: a.epochs,
            batch: a.batch,
            ..TrainOptions::default()
        };
        total = total_steps(pairs.len(), &schedule)?;
        for w in schedule_warnings(pairs.len(), &schedule)? {
            eprintln!("warning: {w}");
        }
        println!(
            "tli train: {} pairs from {}, model {}; layer {}, LoRA r{} alpha {} dropout {} on {:?}{}, \
             lr {} (warm-up {}), {} epochs of {} steps (batch {}{}), margin {}, seed {}",
            pairs.len(),
            a.pairs.display(),
            a.model.describe(),
            a.layer,
            lora.rank,
            lora.alpha,
            lora.dropout,
            lora.target_modules,
            a.init_adapter
                .as_ref()
                .map(|d| format!(" from {}", d.display()))
                .unwrap_or_default(),
            a.lr,
            a.warmup,
            a.epochs,
            total / a.epochs.max(1),
            a.batch,
            if a.shuffle {
                ", shuffled"
            } else {
                ", in file order"
            },
            a.margin,
            a.seed
        );
    } else {
        total = 0;
        println!(
            "tli train: resuming the run in {} ({} pairs from {}, model {})",
            dir.display(),
            pairs.len(),
            a.pairs.display(),
            a.model.describe()
        );
    }
    print_bos(tok.bos());
    let bar = if std::io::stderr().is_terminal() {
        let b = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "[{bar:30}] {pos}/{len} steps  {per_sec}  eta {eta}  {msg}",
        ) {
            b.set_style(style.progress_chars("=> "));
        }
        b
    } else {
        ProgressBar::hidden()
    };
    let stop = stop_on_ctrl_c();
    let mut on_step = |s: &StepInfo| {
        bar.set_length(s.total as u64);
        bar.set_message(format!(
            "epoch {} loss {:.4} lr {:.2e}",
            s.epoch, s.loss, s.lr
        ));
        bar.set_position(s.step as u64);
        if stop.load(Ordering::SeqCst) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let r = match lora {
        Some(lora) => {
            let opts = TrainOptions {
                layer: a.layer,
                lora,
                lr: a.lr,
                warmup: a.warmup,
                epochs: a.epochs,
                batch: a.batch,
                margin: a.margin,
                seed: a.seed,
                shuffle: a.shuffle,
                weight_decay: a.weight_decay,
                init_adapter: a.init_adapter.clone(),
                out: Some(dir.clone()),
                save_every: a.save_every,
                log: Some(log.clone()),
                setup: Some(a.model.setup()),
                ..TrainOptions::default()
            };
            train(&mut model, &tok, &pairs, &opts, &mut on_step)
        }
        None => {
            let ropts = ResumeOptions {
                log: Some(log.clone()),
                save_every: a.save_every,
                setup: Some(a.model.setup()),
            };
            resume(&mut model, &tok, &pairs, &dir, &ropts, &mut on_step)
        }
    };
    bar.finish_and_clear();
    let r = r.context("training")?;
    if r.resumed_at > 0 {
        println!(
            "resumed at step {} of {}",
            r.resumed_at,
            r.steps.first().map_or(0, |s| s.total)
        );
    }
    println!("{:>5}  {:>10}", "epoch", "mean loss");
    for (e, l) in r.epoch_losses().iter().enumerate() {
        println!("{:>5}  {:>10.5}", e + 1, l);
    }
    let this_session = (r.steps.len() - r.resumed_at) as f64;
    let session_s = r.steps.last().map_or(0.0, |s| s.seconds)
        - r.resumed_at
            .checked_sub(1)
            .and_then(|i| r.steps.get(i))
            .map_or(0.0, |s| s.seconds);
    println!(
        "{} steps in {:.2} s ({:.1} steps/s), load {load_s:.2} s; {} trainable parameters",
        this_session,
        session_s,
        this_session / session_s.max(1e-9),
        r.trainable_params
    );
    println!("adapter (PEFT) written to {}", dir.display());
    println!("loss log written to {}", log.display());
    if !r.completed {
        let total = r.steps.last().map_or(0, |s| s.total);
        bail!(
            "stopped at step {} of {total}; the checkpoint in {} continues with: \
             tli train --resume {} --model {} --pairs {}",
            r.steps.len(),
            dir.display(),
            dir.display(),
            a.model.model.display(),
            a.pairs.display()
        );
    }
    Ok(())
}

pub fn eval_cmd(a: &EvalArgs) -> Result<()> {
    let trained = read_list(&a.train)?;
    let control = a.control.as_deref().map(read_list).transpose()?;
    if let Some(c) = &control {
        check_disjoint(&trained, c).context("--train and --control")?;
    }
    let blocks = adapter_blocks(&a.adapter)
        .with_context(|| format!("reading the adapter {}", a.adapter.display()))?
        .map(|n| n.max(a.layer));
    let t = Instant::now();
    let bar = spinner("loading the model");
    let loaded = load_model(&a.model.model, &a.model.options(), blocks);
    bar.finish_and_clear();
    let (mut model, tok) = loaded.with_context(|| format!("loading {}", a.model.describe()))?;
    note_ignored_keys(&model);
    let load_s = t.elapsed().as_secs_f64();
    let mut sets: Vec<(&str, &[Pair])> = vec![("trained", &trained)];
    if let Some(c) = &control {
        sets.push(("control", c));
    }
    let opts = EvalOptions {
        layer: a.layer,
        pooling: a.pool.into(),
        device: a.model.device.kernels(),
    };
    let t = Instant::now();
    let bar = spinner("measuring before and after");
    let r = evaluate_adapter(&mut model, &tok, &sets, &a.adapter, &opts);
    bar.finish_and_clear();
    let r = r.with_context(|| format!("evaluating the adapter {}", a.adapter.display()))?;
    println!(
        "tli eval: adapter {}, model {}",
        a.adapter.display(),
        a.model.describe()
    );
    print_bos(&r.bos);
    if let Ok(Some(m)) = resumed_bos(&a.adapter)
        && m != r.bos.mode
    {
        println!(
            "note: the adapter was trained with --bos {m}, this eval uses --bos {}",
            r.bos.mode
        );
    }
    print!("{}", r.table());
    println!(
        "paired t-test on per-pair cosines (after - before), two-sided p; a rise in pair cosines \
         is specific only if the margin over non-matching pairs grew too; load {load_s:.2} s, \
         eval {:.2} s",
        t.elapsed().as_secs_f64()
    );
    if let Some(p) = &a.json {
        emit(p, &r.to_json()?, "JSON report")?;
    }
    if let Some(p) = &a.csv {
        emit(p, &r.to_csv()?, "CSV")?;
    }
    if let Some(p) = &a.plot {
        emit(p, &eval_svg(&r)?, "plot")?;
    }
    Ok(())
}

/// The TLI stage of `tli demo`: scan → train → eval on the synthetic
/// model, printed.
pub fn demo_tli(seed: u64, epochs: usize, devices: &[Device], keep: Option<&Path>) -> Result<()> {
    use tli_kernels::demo::{KernelOutcome, TliDemoOptions, run_tli};
    let opts = TliDemoOptions {
        seed,
        train: TrainOptions {
            epochs,
            ..TrainOptions::default()
        },
        kernel_devices: devices.to_vec(),
        dir: keep.map(Path::to_path_buf),
        ..TliDemoOptions::default()
    };
    let t = &opts.train;
    println!();
    println!(
        "TLI on a SYNTHETIC model: a tiny random Llama (seed {seed}) with a toy English/Swahili \
         tokenizer. Its weights are random numbers, so the numbers below show that the pipeline \
         works, not anything about the languages."
    );
    let bar = spinner("scan, train, eval on the synthetic model");
    let r = run_tli(&opts);
    bar.finish_and_clear();
    let r = r.context("the TLI stage of the demo")?;
    let c = &r.config;
    println!(
        "model: {} blocks, hidden {}, {} heads ({} kv), MLP {}, vocab {}, projections {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.intermediate_size,
        c.vocab_size,
        if r.nf4 { "NF4 (blocksize 64)" } else { "f32" }
    );
    println!(
        "word lists (shipped): {} training pairs, {} control pairs",
        r.pairs.0, r.pairs.1
    );
    println!(
        "\n1. scan of the training pairs before training ({:.2} s):",
        r.times[1].as_secs_f64()
    );
    print!("{}", r.scan.table());
    println!(
        "\n2. train: layer {}, LoRA r{} alpha {} dropout {} on q_proj,v_proj of blocks 0..{}, \
         lr {} (warm-up {}), {} epochs, batch {}, margin {} ({} steps, {:.2} s, {:.1} steps/s; \
         model on candle cpu)",
        t.layer,
        t.lora.rank,
        t.lora.alpha,
        t.lora.dropout,
        t.layer,
        t.lr,
        t.warmup,
        t.epochs,
        t.batch,
        t.margin,
        r.train.steps.len(),
        r.times[2].as_secs_f64(),
        r.train.steps.len() as f64 / r.times[2].as_secs_f64().max(1e-9)
    );
    let losses: Vec<String> = r
        .train
        .epoch_losses()
        .iter()
        .map(|l| format!("{l:.4}"))
        .collect();
    println!("   mean loss per epoch: {}", losses.join(", "));
    println!(
        "\n3. eval of the saved PEFT adapter on a freshly built model ({:.2} s):",
        r.times[3].as_secs_f64()
    );
    print!("{}", r.eval.table());
    println!(
        "   (a triplet objective can raise every cosine by pulling all embeddings toward one \
         direction; the margin and the ranks above say how much of the gain is specific to \
         the translations)"
    );
    for (dev, o) in &r.kernels {
        match o {
            KernelOutcome::Ran { time, max_abs_diff } => println!(
                "   pooling/cosine kernel on {dev:<4}: {:8.1} ms (forward included), max |diff| from the eval {max_abs_diff:.2e}",
                time.as_secs_f64() * 1e3
            ),
            KernelOutcome::Skipped(why) => {
                println!("   pooling/cosine kernel on {dev:<4}: skipped: {why}")
            }
        }
    }
    println!(
        "TLI stage: build {:.2} s, scan {:.2} s, train {:.2} s, eval {:.2} s",
        r.times[0].as_secs_f64(),
        r.times[1].as_secs_f64(),
        r.times[2].as_secs_f64(),
        r.times[3].as_secs_f64()
    );
    Ok(())
}

/// Ops for `bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchOpArg {
    /// NF4 dequantization.
    Nf4,
    /// Fused NF4 + LoRA linear (forward).
    Lora,
    /// Pool + normalise + cosine, and the cosine matrix.
    Cosine,
    /// All three.
    All,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which op(s).
    #[arg(long, value_enum, default_value_t = BenchOpArg::All)]
    op: BenchOpArg,
    /// Where to run (cpu or cuda).
    #[arg(long, value_enum, default_value_t = RunDevice::Cpu)]
    device: RunDevice,
    /// Divide every dimension by this (1: the Llama-3-8B shapes).
    #[arg(long, default_value_t = 1)]
    shrink: usize,
    /// Minimum time per case, milliseconds.
    #[arg(long, default_value_t = 500)]
    min_ms: u64,
    /// Write the results as JSON here (`-` for standard output).
    #[arg(long, value_name = "OUT")]
    json: Option<PathBuf>,
}

pub fn bench_cmd(a: &BenchArgs) -> Result<()> {
    use tli_kernels::bench::{BenchOp, BenchOptions, run};
    let ops = match a.op {
        BenchOpArg::Nf4 => vec![BenchOp::Nf4],
        BenchOpArg::Lora => vec![BenchOp::Lora],
        BenchOpArg::Cosine => vec![BenchOp::Cosine],
        BenchOpArg::All => vec![BenchOp::Nf4, BenchOp::Lora, BenchOp::Cosine],
    };
    let opts = BenchOptions {
        ops,
        device: a.device.kernels(),
        shrink: a.shrink,
        min_time: std::time::Duration::from_millis(a.min_ms),
        ..BenchOptions::default()
    };
    let bar = spinner("benchmarking");
    let r = run(&opts);
    bar.finish_and_clear();
    let r = r.context("tli bench")?;
    println!(
        "tli bench on {} (Llama-3-8B shapes{}); floors: the least time the bytes and flops allow",
        r.device,
        if a.shrink > 1 {
            format!(", every dimension / {}", a.shrink)
        } else {
            String::new()
        }
    );
    print!("{}", r.table());
    if let Some(p) = &a.json {
        let text = serde_json::to_string_pretty(&r).context("JSON")?;
        emit(p, &text, "JSON report")?;
    }
    Ok(())
}
