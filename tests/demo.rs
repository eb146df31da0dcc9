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
        .args(["demo", "--devices", "cpu,sim,cuda"])
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
