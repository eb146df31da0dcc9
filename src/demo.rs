//! `tli demo`: the crate's pipeline end to end on a synthetic model built in
//! process, so it runs on a fresh clone with no download and no GPU.
//!
//! Two stages. The NF4 stage ([`run`]):
//!
//! ```text
//!   seed ─► synthetic Llama layer (7 projections + a norm, bf16, N(0, 0.02))
//!        ─► model.safetensors
//!        ─► tli nf4 quantize    (bitsandbytes form, blocksize 64, double quant)
//!        ─► tli nf4 dequantize  on every device that can run here
//!        ─► compare: every device bit-identical to `cpu`;
//!                    reconstruction error against the original weights
//! ```
//!
//! The TLI stage ([`run_tli`]): a tiny synthetic Llama
//! ([`crate::model::synthetic`], NF4 projections) and the shipped word
//! lists go through `tli scan` (every layer, both pooling rules), `tli train`
//! (the paper's settings) and `tli eval` (the saved PEFT adapter on a
//! freshly built model, trained and control sets), and the evaluation's
//! cosine kernel is rerun on every device and compared.
//!
//! Every number it prints was measured in this run, on the device it names.
//! The weights are random, not a trained model: the demo shows that the
//! format and the kernels agree, not what a real checkpoint looks like.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use half::bf16;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use safetensors::Dtype;

use crate::io::{MappedFile, OutTensor, write_safetensors};
use crate::nf4::checkpoint::{dequantize_file, quantize_file};
use crate::nf4::quantize::QuantizeOptions;
use crate::{DType, Device, Error, Result};

/// Dimensions of the synthetic layer. Defaults are a Llama-3-8B layer scaled
/// down 16× in width (same 4:1 query-to-key/value head ratio, same 3.5×
/// MLP expansion), so the demo takes seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoShape {
    /// Hidden size (`q_proj`/`o_proj` are `[hidden, hidden]`).
    pub hidden: usize,
    /// Rows of `k_proj`/`v_proj` (`num_key_value_heads · head_dim`).
    pub kv: usize,
    /// MLP width (`gate_proj`/`up_proj` are `[intermediate, hidden]`).
    pub intermediate: usize,
}

impl Default for DemoShape {
    fn default() -> Self {
        Self {
            hidden: 256,
            kv: 64,
            intermediate: 896,
        }
    }
}

/// Options of [`run`].
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Seed of the synthetic weights.
    pub seed: u64,
    /// Layer dimensions.
    pub shape: DemoShape,
    /// Devices to dequantize on; the first is the one the others are
    /// compared with. Devices that cannot run here are reported and skipped.
    pub devices: Vec<Device>,
    /// Where the three files go; a fresh temporary directory (removed
    /// afterwards) when `None`.
    pub dir: Option<PathBuf>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            shape: DemoShape::default(),
            devices: vec![Device::Cpu, Device::Sim, Device::Cuda],
            dir: None,
        }
    }
}

/// How one device did.
#[derive(Debug, Clone)]
pub enum DeviceOutcome {
    /// It ran.
    Ran {
        /// Wall time of the whole `nf4 dequantize` (read, dequantize, write).
        time: Duration,
        /// Output elements whose bits differ from the first device's.
        mismatches: usize,
    },
    /// It cannot run here; the reason.
    Skipped(String),
}

/// What [`run`] measured.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Parameters quantized (the seven projections).
    pub quantized_params: usize,
    /// Bytes of the bf16 input file and of the NF4 file.
    pub file_bytes: (u64, u64),
    /// Wall time of `nf4 quantize` on the CPU.
    pub quantize_time: Duration,
    /// Per device, in the order asked.
    pub devices: Vec<(Device, DeviceOutcome)>,
    /// `‖deq(W) − W‖ / ‖W‖` over all projections (f64), from the first device.
    pub relative_error: f64,
    /// Largest `|deq(w) − w| / absmax(block)` seen. NF4's widest code gap is
    /// 0.3038 (between −1 and −0.6962), so rounding to the nearest code keeps
    /// this under 0.1519 plus the double-quantization error of the absmax.
    pub max_block_error: f64,
}

impl DemoReport {
    /// True when every device that ran matched the first bit for bit.
    pub fn all_bit_exact(&self) -> bool {
        self.devices.iter().all(|(_, o)| match o {
            DeviceOutcome::Ran { mismatches, .. } => *mismatches == 0,
            DeviceOutcome::Skipped(_) => true,
        })
    }
}

/// The projection names and shapes of the synthetic layer.
fn projections(s: DemoShape) -> Vec<(&'static str, [usize; 2])> {
    vec![
        ("self_attn.q_proj", [s.hidden, s.hidden]),
        ("self_attn.k_proj", [s.kv, s.hidden]),
        ("self_attn.v_proj", [s.kv, s.hidden]),
        ("self_attn.o_proj", [s.hidden, s.hidden]),
        ("mlp.gate_proj", [s.intermediate, s.hidden]),
        ("mlp.up_proj", [s.intermediate, s.hidden]),
        ("mlp.down_proj", [s.hidden, s.intermediate]),
    ]
}

const PREFIX: &str = "model.layers.0";
const BLOCKSIZE: usize = 64;

/// Run the demo.
///
/// # Errors
/// [`Error::InvalidArgument`] for an empty device list or a zero dimension;
/// I/O and format errors of the files it writes; errors of the ops.
pub fn run(opts: &DemoOptions) -> Result<DemoReport> {
    const OP: &str = "demo";
    let Some(&reference) = opts.devices.first() else {
        return Err(Error::invalid(OP, "no devices to run on"));
    };
    let s = opts.shape;
    if s.hidden == 0 || s.kv == 0 || s.intermediate == 0 {
        return Err(Error::invalid(OP, format!("zero dimension in {s:?}")));
    }
    let tmp;
    let dir: &Path = match &opts.dir {
        Some(d) => d,
        None => {
            tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
            tmp.path()
        }
    };
    let model = dir.join("model.safetensors");
    let nf4 = dir.join("model.nf4.safetensors");

    // Synthetic bf16 weights, kept as f64 for the error measurement.
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let normal = Normal::new(0.0f32, 0.02).map_err(|e| Error::invalid(OP, e.to_string()))?;
    let mut originals: HashMap<String, Vec<f32>> = HashMap::new();
    let mut tensors = Vec::new();
    for (name, [rows, cols]) in projections(s) {
        let w: Vec<bf16> = (0..rows * cols)
            .map(|_| bf16::from_f32(normal.sample(&mut rng)))
            .collect();
        let key = format!("{PREFIX}.{name}.weight");
        originals.insert(key.clone(), w.iter().map(|v| v.to_f32()).collect());
        tensors.push(OutTensor::bytes(
            key,
            Dtype::BF16,
            vec![rows, cols],
            bytemuck::cast_slice::<bf16, u8>(&w).to_vec(),
        ));
    }
    let norm = vec![bf16::ONE; s.hidden];
    tensors.push(OutTensor::bytes(
        format!("{PREFIX}.input_layernorm.weight"),
        Dtype::BF16,
        vec![s.hidden],
        bytemuck::cast_slice::<bf16, u8>(&norm).to_vec(),
    ));
    write_safetensors(&model, tensors, None, &mut |_, _| {})?;

    let t0 = Instant::now();
    let qopts = QuantizeOptions {
        blocksize: BLOCKSIZE,
        double_quant: true,
    };
    quantize_file(&model, &nf4, qopts, None)?;
    let quantize_time = t0.elapsed();

    let mut outcomes = Vec::new();
    let mut reference_out: Option<HashMap<String, Vec<f32>>> = None;
    for &dev in &opts.devices {
        if let Err(e) = dev.check_available() {
            outcomes.push((dev, DeviceOutcome::Skipped(e.to_string())));
            continue;
        }
        let out = dir.join(format!("model.deq.{dev}.safetensors"));
        let t = Instant::now();
        dequantize_file(&nf4, &out, Some(DType::F32), dev)?;
        let time = t.elapsed();
        let values = read_projections(&out, s)?;
        let mismatches = match &reference_out {
            None => 0,
            Some(r) => count_mismatches(r, &values),
        };
        if reference_out.is_none() {
            reference_out = Some(values);
        }
        outcomes.push((dev, DeviceOutcome::Ran { time, mismatches }));
    }
    let Some(deq) = reference_out else {
        return Err(Error::invalid(
            OP,
            format!("none of the devices could run here (asked for {reference} first)"),
        ));
    };

    let (relative_error, max_block_error) = errors(&originals, &deq);
    let size = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.len())
            .map_err(|e| Error::io(p, e))
    };
    Ok(DemoReport {
        quantized_params: originals.values().map(Vec::len).sum(),
        file_bytes: (size(&model)?, size(&nf4)?),
        quantize_time,
        devices: outcomes,
        relative_error,
        max_block_error,
    })
}

/// The dequantized projections of an f32 output file.
fn read_projections(path: &Path, s: DemoShape) -> Result<HashMap<String, Vec<f32>>> {
    let file = MappedFile::open(path)?;
    let st = file.safetensors()?;
    let mut out = HashMap::new();
    for (name, _) in projections(s) {
        let key = format!("{PREFIX}.{name}.weight");
        let view = st
            .tensor(&key)
            .map_err(|e| Error::format(path, format!("tensor `{key}`: {e}")))?;
        if view.dtype() != Dtype::F32 {
            return Err(Error::format(
                path,
                format!("tensor `{key}` is {:?}, expected F32", view.dtype()),
            ));
        }
        let (chunks, _) = view.data().as_chunks::<4>();
        let values = chunks.iter().map(|c| f32::from_le_bytes(*c)).collect();
        out.insert(key, values);
    }
    Ok(out)
}

fn count_mismatches(a: &HashMap<String, Vec<f32>>, b: &HashMap<String, Vec<f32>>) -> usize {
    a.iter()
        .map(|(k, va)| match b.get(k) {
            Some(vb) if vb.len() == va.len() => va
                .iter()
                .zip(vb)
                .filter(|(x, y)| x.to_bits() != y.to_bits())
                .count(),
            _ => va.len(),
        })
        .sum()
}

/// `‖deq − w‖/‖w‖` over everything, and the largest error relative to its
/// block's absmax.
fn errors(orig: &HashMap<String, Vec<f32>>, deq: &HashMap<String, Vec<f32>>) -> (f64, f64) {
    let (mut num, mut den, mut worst) = (0.0f64, 0.0f64, 0.0f64);
    for (k, w) in orig {
        let Some(d) = deq.get(k) else { continue };
        for (wb, db) in w.chunks(BLOCKSIZE).zip(d.chunks(BLOCKSIZE)) {
            let absmax = wb.iter().fold(0.0f64, |m, &v| m.max(f64::from(v).abs()));
            for (&x, &y) in wb.iter().zip(db) {
                let e = f64::from(y) - f64::from(x);
                num += e * e;
                den += f64::from(x) * f64::from(x);
                if absmax > 0.0 {
                    worst = worst.max(e.abs() / absmax);
                }
            }
        }
    }
    ((num / den).sqrt(), worst)
}

// ---- the TLI stage ---------------------------------------------------------

/// Options of [`run_tli`]: scan → train → eval on the synthetic Llama of
/// [`crate::model::synthetic`] with the shipped word lists.
#[derive(Debug, Clone)]
pub struct TliDemoOptions {
    /// Seed of the synthetic model and of training.
    pub seed: u64,
    /// Quantize the model's projections to NF4 while building it (as the
    /// paper loads its base model).
    pub nf4: bool,
    /// Training settings; the defaults are the paper's (layer 2, LoRA r16
    /// alpha 32 on `q_proj`/`v_proj`, lr 2e-4 with 50 warm-up steps, 5
    /// epochs of batch 8, margin 0.4).
    pub train: crate::tli::TrainOptions,
    /// Devices the evaluation's pooling/cosine kernel runs on; the first is
    /// the reference, the others are compared with it. Devices that cannot
    /// run here are reported and skipped.
    pub kernel_devices: Vec<Device>,
    /// Use only the first `n` training pairs (all when `None`).
    pub max_pairs: Option<usize>,
    /// Write the synthetic model directory, the adapter and the reports
    /// here; a temporary directory (removed afterwards) when `None`.
    pub dir: Option<PathBuf>,
}

impl Default for TliDemoOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            nf4: true,
            train: crate::tli::TrainOptions::default(),
            kernel_devices: vec![Device::Cpu, Device::Sim, Device::Cuda],
            max_pairs: None,
            dir: None,
        }
    }
}

/// How the evaluation's cosine kernel did on one device.
#[derive(Debug, Clone)]
pub enum KernelOutcome {
    /// It ran: wall time of the after-training measurement of the control
    /// set (model forward included), and the largest |cosine − evaluation's
    /// cosine|.
    Ran {
        /// Wall time.
        time: Duration,
        /// Largest difference from the evaluation (run on the first device).
        max_abs_diff: f64,
    },
    /// It cannot run here; the reason.
    Skipped(String),
}

/// What [`run_tli`] measured.
#[derive(Debug, Clone)]
pub struct TliDemoReport {
    /// The synthetic model's architecture.
    pub config: crate::model::LlamaConfig,
    /// Whether its projections were NF4.
    pub nf4: bool,
    /// Pairs trained on and held out.
    pub pairs: (usize, usize),
    /// The layer scan of the training pairs before training, both poolings.
    pub scan: crate::tli::ScanReport,
    /// The training run.
    pub train: crate::tli::TrainReport,
    /// Before/after evaluation of the saved adapter on a freshly built
    /// model.
    pub eval: crate::tli::EvalReport,
    /// The evaluation's kernels per device.
    pub kernels: Vec<(Device, KernelOutcome)>,
    /// Wall times: building the model, scan, train, eval.
    pub times: [Duration; 4],
}

/// Run scan → train → eval on the synthetic model with the shipped lists.
///
/// The model is built twice from the same seed: once to scan and train,
/// and once fresh for the evaluation, which loads the adapter from the
/// PEFT files training wrote (so the round trip is part of the demo).
///
/// # Errors
/// [`Error::InvalidArgument`] for an empty device list; errors of the
/// model, the ops, training and the files it writes.
pub fn run_tli(opts: &TliDemoOptions) -> Result<TliDemoReport> {
    use crate::model::{LoadOptions, synthetic};
    use crate::tli::{EvalOptions, Pooling, PoolingChoice, ScanOptions};

    const OP: &str = "demo";
    let Some(&reference) = opts.kernel_devices.first() else {
        return Err(Error::invalid(OP, "no devices to run the kernels on"));
    };
    reference.check_available()?;
    let tmp;
    let dir: &Path = match &opts.dir {
        Some(d) => d,
        None => {
            tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
            tmp.path()
        }
    };
    let (mut trained, control) = crate::pairs::shipped()?;
    if let Some(n) = opts.max_pairs {
        trained.truncate(n);
    }
    let load = LoadOptions {
        quantize: opts.nf4.then(QuantizeOptions::default),
        ..LoadOptions::default()
    };
    let t = Instant::now();
    let (mut model, tok) = synthetic::build(opts.seed, &load)?;
    let build_time = t.elapsed();
    if opts.dir.is_some() {
        synthetic::write_dir(dir.join("model"), opts.seed)?;
    }

    let t = Instant::now();
    let scan = crate::tli::scan(
        &model,
        &tok,
        &trained,
        &ScanOptions {
            layers: None,
            pooling: PoolingChoice::Both,
            device: reference,
        },
    )?;
    let scan_time = t.elapsed();

    let adapter = dir.join("adapter");
    let train_opts = crate::tli::TrainOptions {
        seed: opts.seed,
        out: Some(adapter.clone()),
        log: Some(adapter.join("train_log.jsonl")),
        ..opts.train.clone()
    };
    let t = Instant::now();
    let train = crate::tli::train(&mut model, &tok, &trained, &train_opts, &mut |_| {
        std::ops::ControlFlow::Continue(())
    })?;
    let train_time = t.elapsed();
    drop(model);

    let t = Instant::now();
    let (mut fresh, _) = synthetic::build(opts.seed, &load)?;
    let eval_opts = EvalOptions {
        layer: train_opts.layer,
        pooling: Pooling::Words,
        device: reference,
    };
    let sets: [(&str, &[crate::pairs::Pair]); 2] = [("trained", &trained), ("control", &control)];
    let eval = crate::tli::evaluate_adapter(&mut fresh, &tok, &sets, &adapter, &eval_opts)?;
    let eval_time = t.elapsed();

    // The control set's after-training cosines again on every device (the
    // first must reproduce the evaluation exactly, the others agree to
    // rounding).
    let mut kernels = Vec::new();
    for &dev in &opts.kernel_devices {
        if let Err(e) = dev.check_available() {
            kernels.push((dev, KernelOutcome::Skipped(e.to_string())));
            continue;
        }
        let t = Instant::now();
        let mut worst = 0.0f64;
        let o = EvalOptions {
            device: dev,
            ..eval_opts
        };
        let c = crate::tli::eval::measure(&fresh, &tok, &control, &o)?;
        let after = eval
            .sets
            .iter()
            .find(|(name, _)| name == "control")
            .map(|(_, r)| r.after.as_slice())
            .ok_or_else(|| Error::invalid(OP, "internal: no control set in the evaluation"))?;
        for (x, y) in c.iter().zip(after) {
            worst = worst.max((f64::from(*x) - f64::from(*y)).abs());
        }
        kernels.push((
            dev,
            KernelOutcome::Ran {
                time: t.elapsed(),
                max_abs_diff: worst,
            },
        ));
    }
    if opts.dir.is_some() {
        crate::tli::plot::write_text(&dir.join("scan.json"), &scan.to_json()?)?;
        crate::tli::plot::write_text(&dir.join("scan.svg"), &crate::tli::plot::scan_svg(&scan)?)?;
        crate::tli::plot::write_text(&dir.join("eval.json"), &eval.to_json()?)?;
        crate::tli::plot::write_text(&dir.join("eval.svg"), &crate::tli::plot::eval_svg(&eval)?)?;
    }
    Ok(TliDemoReport {
        config: fresh.config.clone(),
        nf4: opts.nf4,
        pairs: (trained.len(), control.len()),
        scan,
        train,
        eval,
        kernels,
        times: [build_time, scan_time, train_time, eval_time],
    })
}
