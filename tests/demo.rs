//! `tli demo` and the library function behind it.

use std::process::Command;

use tli_kernels::Device;
use tli_kernels::demo::{self, DemoOptions, DemoShape, DeviceOutcome};

#[test]
fn cpu_and_sim_agree_and_error_is_nf4_sized() {
    let dir = tempfile::tempdir().unwrap();
    let opts = DemoOptions {
        seed: 7,
        shape: DemoShape {
            hidden: 96,
            kv: 32,
            intermediate: 160,
        },
        devices: vec![Device::Cpu, Device::Sim],
        dir: Some(dir.path().to_path_buf()),
    };
    let r = demo::run(&opts).unwrap();
    assert_eq!(r.quantized_params, 2 * 96 * 96 + 2 * 32 * 96 + 3 * 160 * 96);
    assert_eq!(r.devices.len(), 2);
    for (dev, o) in &r.devices {
        match o {
            DeviceOutcome::Ran { mismatches, .. } => assert_eq!(*mismatches, 0, "{dev}"),
            DeviceOutcome::Skipped(why) => panic!("{dev} skipped: {why}"),
        }
    }
    assert!(r.all_bit_exact());
    // NF4 of Gaussian weights with blocksize 64: the QLoRA paper's
    // construction gives a relative RMS error near 0.09; anything far from it
    // means the wrong codes or scales were used (a zeroed output gives 1.0).
    assert!(
        (0.06..0.13).contains(&r.relative_error),
        "relative error {}",
        r.relative_error
    );
    // Half the widest code gap (0.1519) plus a few percent of absmax for the
    // 8-bit double-quantized scale.
    assert!(
        r.max_block_error < 0.2,
        "worst block error {}",
        r.max_block_error
    );
    // bf16 holds 2 bytes per parameter; NF4 half a byte, plus one scale
    // byte per 64 (double quant) and the per-tensor JSON quant state, which
    // weighs a lot on a layer this small.
    let (bf16_bytes, nf4_bytes) = r.file_bytes;
    let params = r.quantized_params as u64;
    assert!(bf16_bytes >= 2 * params, "{bf16_bytes}");
    assert!(nf4_bytes >= params / 2 + params / 64, "{nf4_bytes}");
    assert!(
        nf4_bytes < bf16_bytes * 2 / 5,
        "{nf4_bytes} vs {bf16_bytes}"
    );
    for f in [
        "model.safetensors",
        "model.nf4.safetensors",
        "model.deq.cpu.safetensors",
        "model.deq.sim.safetensors",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
}

#[test]
fn same_seed_same_weights_other_seed_other_weights() {
    let run = |seed| {
        let dir = tempfile::tempdir().unwrap();
        let opts = DemoOptions {
            seed,
            shape: DemoShape {
                hidden: 64,
                kv: 32,
                intermediate: 96,
            },
            devices: vec![Device::Cpu],
            dir: Some(dir.path().to_path_buf()),
        };
        demo::run(&opts).unwrap();
        std::fs::read(dir.path().join("model.nf4.safetensors")).unwrap()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn bad_options_are_errors() {
    let e = demo::run(&DemoOptions {
        devices: vec![],
        ..DemoOptions::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("no devices"), "{e}");
    let e = demo::run(&DemoOptions {
        shape: DemoShape {
            hidden: 0,
            kv: 8,
            intermediate: 8,
        },
        ..DemoOptions::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("zero dimension"), "{e}");
}

#[test]
fn cli_demo_says_synthetic_and_reports_each_device() {
    let out = Command::new(env!("CARGO_BIN_EXE_tli"))
        .args(["demo", "--devices", "cpu,sim,cuda", "--epochs", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("SYNTHETIC"), "{stdout}");
    assert!(
        stdout.contains("on sim") && stdout.contains("bit-identical to cpu"),
        "{stdout}"
    );
    // cuda either ran (and matched) or says why not; never silent.
    let cuda_line = stdout
        .lines()
        .find(|l| l.contains("on cuda"))
        .unwrap_or_else(|| panic!("no cuda line:\n{stdout}"));
    assert!(
        cuda_line.contains("skipped: ") || cuda_line.contains("bit-identical"),
        "{cuda_line}"
    );
    // The TLI stage: synthetic, said plainly; scan, train, eval; kernels.
    assert!(stdout.contains("TLI on a SYNTHETIC model"), "{stdout}");
    for needle in [
        "1. scan",
        "words mean (sd)",
        "2. train",
        "mean loss per epoch",
        "3. eval",
        "trained    625",
        "control     63",
        "words margin",
        "non-matching",
        "trained: ",
        "control: ",
        "kernel on cpu",
        "kernel on sim",
    ] {
        assert!(stdout.contains(needle), "{needle}:\n{stdout}");
    }
}

#[test]
fn cli_demo_rejects_unknown_device() {
    let out = Command::new(env!("CARGO_BIN_EXE_tli"))
        .args(["demo", "--devices", "cpu,tpu"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tpu"));
}

#[test]
fn tli_stage_scans_trains_and_improves_reproducibly() {
    use tli_kernels::demo::{KernelOutcome, TliDemoOptions, run_tli};
    use tli_kernels::tli::TrainOptions;
    let dir = tempfile::tempdir().unwrap();
    let opts = TliDemoOptions {
        seed: 5,
        train: TrainOptions {
            epochs: 2,
            warmup: 2,
            lr: 5e-3,
            ..TrainOptions::default()
        },
        kernel_devices: vec![Device::Cpu, Device::Sim],
        max_pairs: Some(48),
        dir: Some(dir.path().to_path_buf()),
        ..TliDemoOptions::default()
    };
    let r = run_tli(&opts).unwrap();
    assert!(r.nf4);
    assert_eq!(r.pairs, (48, 63));
    // Indices 0..=4 of the 4-block model, both poolings.
    assert_eq!(r.scan.layers.len(), 10);
    assert_eq!(r.train.steps.len(), 2 * 6);
    let e = r.train.epoch_losses();
    assert!(e[1] < e[0], "{e:?}");
    let (name, t) = &r.eval.sets[0];
    assert_eq!(name, "trained");
    assert_eq!(t.n, 48);
    // The before column is the scan's layer-2 words column.
    let scanned = r
        .scan
        .get(2, tli_kernels::tli::Pooling::Words)
        .unwrap()
        .cosines
        .clone();
    assert_eq!(t.before, scanned);
    assert!(t.after_mean > t.before_mean, "{t:?}");
    assert!(t.t > 0.0 && t.p < 1e-3, "t {} p {}", t.t, t.p);
    assert_eq!(r.eval.sets[1].1.n, 63);
    // Both sets carry the specificity and a verdict.
    for (name, s) in &r.eval.sets {
        let c = s.specificity.as_ref().unwrap();
        assert!(
            c.before.margin.is_finite() && c.after.margin.is_finite(),
            "{name}"
        );
        assert!(!c.verdict.is_empty(), "{name}");
    }
    // The simulator's kernel agrees with the CPU's to f32 rounding, and the
    // CPU reproduces the evaluation exactly.
    match &r.kernels[0] {
        (Device::Cpu, KernelOutcome::Ran { max_abs_diff, .. }) => assert_eq!(*max_abs_diff, 0.0),
        other => panic!("{other:?}"),
    }
    match &r.kernels[1] {
        (Device::Sim, KernelOutcome::Ran { max_abs_diff, .. }) => {
            assert!(*max_abs_diff < 1e-5, "{max_abs_diff}")
        }
        other => panic!("{other:?}"),
    }
    for f in [
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/train_log.jsonl",
        "scan.json",
        "scan.svg",
        "eval.json",
        "eval.svg",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    // The same seed gives the same numbers.
    let again = run_tli(&TliDemoOptions {
        dir: None,
        kernel_devices: vec![Device::Cpu],
        ..opts.clone()
    })
    .unwrap();
    assert_eq!(again.eval.sets[0].1.after, t.after);
    assert_eq!(again.eval.sets[1].1.after, r.eval.sets[1].1.after);
}
