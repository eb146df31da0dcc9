//! `tli`: the command-line driver of `tli-kernels`.
//!
//! Each verb is a thin layer over a library function: it parses arguments,
//! shows progress on stderr when that is a terminal, and turns errors into a
//! message naming the files and values plus a non-zero exit code. Verbs are
//! grouped as `tli <area> <action>` where an area has several (`tli nf4 ...`)
//! and stand alone otherwise (`tli info`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use regex::Regex;
use tli_kernels::nf4::checkpoint::{self, FileReport, Progress};
use tli_kernels::nf4::quantize::QuantizeOptions;
use tli_kernels::{DType, Device, kernels};

// In a subdirectory: a file directly in src/bin/ would be taken for a binary.
#[path = "tli/pipeline.rs"]
mod pipeline;

/// Targeted Lexical Injection with hand-written NF4 / LoRA / cosine kernels.
#[derive(Debug, Parser)]
#[command(name = "tli", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// NF4 (bitsandbytes 4-bit) checkpoints: quantize and dequantize
    /// safetensors files.
    #[command(subcommand)]
    Nf4(Nf4Command),
    /// Alignment of word pairs at every layer (mean, sd, per-pair cosine),
    /// both pooling rules side by side.
    Scan(pipeline::ScanArgs),
    /// The TLI step: LoRA on the early blocks trained with a triplet loss
    /// on word pairs; writes a PEFT adapter.
    Train(pipeline::TrainArgs),
    /// Per-pair alignment before and after an adapter, with a paired t-test
    /// per set (trained, control).
    Eval(pipeline::EvalArgs),
    /// Time the ops at Llama-3-8B shapes: GB/s or TFLOP/s and roofline
    /// floors (this CPU, H100).
    Bench(pipeline::BenchArgs),
    /// Run the pipeline on a synthetic model built in process (no download,
    /// no GPU needed): quantize to NF4, dequantize on every device, compare;
    /// then scan, train and evaluate TLI on a tiny synthetic Llama.
    Demo(DemoArgs),
    /// Version, compiled features, kernels and embedded PTX, and whether a
    /// CUDA device can be used here.
    Info,
}

#[derive(Debug, Subcommand)]
enum Nf4Command {
    /// Replace every bitsandbytes NF4 tensor by its dequantized values (same
    /// name, original shape); copy every other tensor unchanged.
    Dequantize(DequantizeArgs),
    /// Quantize the selected floating-point tensors to NF4 in the exact form
    /// bitsandbytes / transformers save; copy every other tensor unchanged.
    Quantize(QuantizeArgs),
}

#[derive(Debug, Args)]
struct DequantizeArgs {
    /// Input safetensors file.
    input: PathBuf,
    /// Output safetensors file (written atomically).
    output: PathBuf,
    /// Output dtype [default: each tensor's quant-state dtype].
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// Where to run the dequantization kernel.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
}

#[derive(Debug, Args)]
struct QuantizeArgs {
    /// Input safetensors file.
    input: PathBuf,
    /// Output safetensors file (written atomically).
    output: PathBuf,
    /// Elements per scale block: a power of two from 32 to 4096.
    #[arg(long, default_value_t = tli_kernels::nf4::DEFAULT_BLOCKSIZE)]
    blocksize: usize,
    /// Also quantize the per-block scales (bitsandbytes'
    /// `compress_statistics`, transformers' `bnb_4bit_use_double_quant`).
    #[arg(long)]
    double_quant: bool,
    /// Quantize the tensors whose name this regex matches (anywhere in the
    /// name; anchor with ^...$). They must be f32/bf16/f16. [default: 2-D
    /// float tensors whose name ends in `proj.weight`]
    #[arg(long, value_name = "REGEX", value_parser = parse_regex)]
    include: Option<Regex>,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Seed of the synthetic weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Devices to run on; the first is the reference the others must match
    /// bit for bit. Devices that cannot run here are reported and skipped.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "cpu,sim,cuda"
    )]
    devices: Vec<DeviceArg>,
    /// Keep the files it writes in this directory (default: a temporary
    /// directory, removed afterwards).
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
    /// Training epochs of the TLI stage (0 skips scan, train and eval).
    #[arg(long, default_value_t = 5)]
    epochs: usize,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
    F16,
}

impl From<DtypeArg> for DType {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::F32 => DType::F32,
            DtypeArg::Bf16 => DType::BF16,
            DtypeArg::F16 => DType::F16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    Cpu,
    Sim,
    Cuda,
}

impl From<DeviceArg> for Device {
    fn from(d: DeviceArg) -> Self {
        match d {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Sim => Device::Sim,
            DeviceArg::Cuda => Device::Cuda,
        }
    }
}

fn parse_regex(s: &str) -> Result<Regex, String> {
    Regex::new(s).map_err(|e| format!("invalid regex {s:?}: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, joined with ": ". A cause whose text the
/// previous message already ends with is skipped (the library's errors
/// include their source in their own message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Nf4(Nf4Command::Dequantize(a)) => nf4_dequantize(&a),
        Command::Nf4(Nf4Command::Quantize(a)) => nf4_quantize(&a),
        Command::Scan(a) => pipeline::scan_cmd(&a),
        Command::Train(a) => pipeline::train_cmd(&a),
        Command::Eval(a) => pipeline::eval_cmd(&a),
        Command::Bench(a) => pipeline::bench_cmd(&a),
        Command::Demo(a) => demo(&a),
        Command::Info => info(),
    }
}

/// A byte-counting progress bar on stderr, or a hidden one when stderr is
/// not a terminal (pipes, CI logs).
fn progress_bar() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{bar:32}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {wide_msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Feed library progress events to `bar`.
fn track(bar: &ProgressBar) -> impl FnMut(Progress<'_>) + '_ {
    move |p| match p {
        Progress::Start { total_bytes } => bar.set_length(total_bytes),
        Progress::Done { name, bytes } => {
            bar.set_message(name.to_string());
            bar.inc(bytes);
        }
    }
}

fn summary(verb: &str, report: &FileReport, output: &Path) {
    println!(
        "{verb} {} tensor(s), copied {} unchanged -> {}",
        report.converted.len(),
        report.copied.len(),
        output.display()
    );
}

fn nf4_dequantize(a: &DequantizeArgs) -> Result<()> {
    let dtype = a.dtype.map(DType::from);
    let device = Device::from(a.device);
    let bar = progress_bar();
    let report = checkpoint::dequantize_file_with_progress(
        &a.input,
        &a.output,
        dtype,
        device,
        &mut track(&bar),
    );
    bar.finish_and_clear();
    let report = report.with_context(|| {
        format!(
            "dequantizing {} into {} (dtype {}, device {device})",
            a.input.display(),
            a.output.display(),
            dtype.map_or("from quant state".to_string(), |d| d.to_string()),
        )
    })?;
    summary("dequantized", &report, &a.output);
    Ok(())
}

fn nf4_quantize(a: &QuantizeArgs) -> Result<()> {
    let opts = QuantizeOptions {
        blocksize: a.blocksize,
        double_quant: a.double_quant,
    };
    let bar = progress_bar();
    let report = checkpoint::quantize_file_with_progress(
        &a.input,
        &a.output,
        opts,
        a.include.as_ref(),
        &mut track(&bar),
    );
    bar.finish_and_clear();
    let report = report.with_context(|| {
        format!(
            "quantizing {} into {} (blocksize {}, double quant {}, include {})",
            a.input.display(),
            a.output.display(),
            a.blocksize,
            a.double_quant,
            a.include.as_ref().map_or(
                format!(
                    "default: 2-D float *{}",
                    checkpoint::DEFAULT_QUANTIZE_SUFFIX
                ),
                |r| { format!("{:?}", r.as_str()) }
            ),
        )
    })?;
    if report.converted.is_empty() {
        eprintln!(
            "warning: no tensor was selected for quantization; the output is a copy of the input"
        );
    }
    summary("quantized", &report, &a.output);
    Ok(())
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn info() -> Result<()> {
    println!("tli {} (tli-kernels)", env!("CARGO_PKG_VERSION"));
    println!(
        "features: sim={} cuda={}",
        yes_no(cfg!(feature = "sim")),
        yes_no(cfg!(tli_cuda))
    );
    println!("kernel sources: {}", kernel_list(kernels::KERNEL_SOURCES));
    if kernels::CUDA_IMAGES.is_empty() {
        println!("embedded CUDA images: none (built without the `cuda` feature)");
    } else {
        let archs: Vec<String> = kernels::CUDA_ARCHS
            .iter()
            .map(|a| format!("sm_{a}"))
            .collect();
        let ptx_isa = kernels::CUDA_IMAGES
            .iter()
            .filter_map(|m| m.ptx_isa())
            .max()
            .map_or("?".to_string(), |(a, b)| format!("{a}.{b}"));
        println!(
            "embedded CUDA images: SASS for {} (ptxas {}), PTX {ptx_isa} for sm_{} (NVRTC {}); {} images",
            archs.join(", "),
            kernels::PTXAS_VERSION,
            kernels::PTX_ARCH,
            kernels::NVRTC_VERSION,
            kernels::CUDA_IMAGES.len()
        );
    }
    for device in [Device::Cpu, Device::Sim, Device::Cuda] {
        match device.check_available() {
            Ok(()) => {
                println!("device {device}: available");
                if device == Device::Cuda {
                    cuda_images_info();
                }
            }
            Err(e) => println!("device {device}: not available: {e}"),
        }
    }
    Ok(())
}

/// The driver's CUDA version and the image each kernel file loads on
/// device 0.
#[cfg(tli_cuda)]
fn cuda_images_info() {
    match tli_kernels::backend::cuda::Cuda::global() {
        Ok(cuda) => {
            let (major, minor) = cuda.driver_version();
            let (cc_major, cc_minor) = cuda.compute_capability();
            println!(
                "cuda device 0: {} (compute capability {cc_major}.{cc_minor}), driver for CUDA {major}.{minor}",
                cuda.name()
            );
            for name in kernels::KERNEL_SOURCES {
                match cuda.image(name) {
                    Some(m) => println!("  kernels/{name}.cu: loads {}", m.describe()),
                    None => println!("  kernels/{name}.cu: no embedded image runs on this device"),
                }
            }
        }
        Err(e) => println!("cuda device 0: {e}"),
    }
}

#[cfg(not(tli_cuda))]
fn cuda_images_info() {}

fn kernel_list(names: &[&str]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names
            .iter()
            .map(|n| format!("kernels/{n}.cu"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn demo(a: &DemoArgs) -> Result<()> {
    use tli_kernels::demo::{self, DemoOptions, DeviceOutcome};
    let opts = DemoOptions {
        seed: a.seed,
        devices: a.devices.iter().copied().map(Device::from).collect(),
        dir: a.keep.clone(),
        ..DemoOptions::default()
    };
    if let Some(dir) = &opts.dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let s = opts.shape;
    println!(
        "tli demo: SYNTHETIC model (random N(0, 0.02) bf16 weights, seed {}), one Llama-style \
         layer: hidden {}, kv {}, intermediate {}",
        opts.seed, s.hidden, s.kv, s.intermediate
    );
    let r = demo::run(&opts)?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "nf4 quantize (cpu, blocksize 64, double quant): {} params, {:.2} MiB bf16 -> {:.2} MiB, {:.1} ms",
        r.quantized_params,
        mib(r.file_bytes.0),
        mib(r.file_bytes.1),
        r.quantize_time.as_secs_f64() * 1e3
    );
    for (i, (dev, outcome)) in r.devices.iter().enumerate() {
        match outcome {
            DeviceOutcome::Ran { time, mismatches } => {
                let cmp = if i == 0 {
                    "reference".to_string()
                } else if *mismatches == 0 {
                    format!("bit-identical to {}", r.devices[0].0)
                } else {
                    format!("{mismatches} element(s) DIFFER from {}", r.devices[0].0)
                };
                println!(
                    "nf4 dequantize -> f32 on {dev:<4}: {:8.1} ms (file to file)  {cmp}",
                    time.as_secs_f64() * 1e3
                );
            }
            DeviceOutcome::Skipped(why) => println!("nf4 dequantize on {dev:<4}: skipped: {why}"),
        }
    }
    println!(
        "reconstruction: ||deq(W) - W|| / ||W|| = {:.4}; worst |error| / block absmax = {:.4}",
        r.relative_error, r.max_block_error
    );
    if !r.all_bit_exact() {
        anyhow::bail!("devices disagree: see above");
    }
    if a.epochs > 0 {
        pipeline::demo_tli(a.seed, a.epochs, &opts.devices, a.keep.as_deref())?;
    }
    if let Some(dir) = &opts.dir {
        println!("files kept in {}", dir.display());
    }
    Ok(())
}
