//! `tli bench` and the library function behind it, on shrunken shapes.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tli_kernels::Device;
use tli_kernels::bench::{BenchOp, BenchOptions, run};
use tli_kernels::roofline::H100_SXM;

#[test]
fn every_case_runs_with_consistent_throughput_and_floors() {
    let r = run(&BenchOptions {
        shrink: 16,
        min_time: Duration::ZERO,
        min_reps: 2,
        ..BenchOptions::default()
    })
    .unwrap();
    assert_eq!(r.device, "cpu");
    // 3 NF4 shapes, 3 LoRA shapes at 2 token counts, 2 cosine cases.
    let ops: Vec<&str> = r.results.iter().map(|c| c.op).collect();
    assert_eq!(ops.iter().filter(|o| **o == "nf4").count(), 3);
    assert_eq!(ops.iter().filter(|o| **o == "lora").count(), 6);
    assert_eq!(ops.iter().filter(|o| **o == "cosine").count(), 2);
    let copy = r.cpu_copy_bytes_per_s.unwrap();
    let gemm = r.cpu_gemm_flop_per_s.unwrap();
    for c in &r.results {
        assert!(c.reps >= 2, "{c:?}");
        assert!(c.best_s > 0.0 && c.best_s <= c.median_s, "{c:?}");
        assert!(
            (c.gb_per_s - c.bytes / c.best_s / 1e9).abs() <= 1e-9 * c.gb_per_s,
            "{c:?}"
        );
        assert!(
            (c.tflop_per_s - c.flops / c.best_s / 1e12).abs() <= 1e-9 * c.tflop_per_s.max(1e-30)
        );
        // Floors are Durations: whole nanoseconds.
        let h100 = (c.bytes / H100_SXM.bytes_per_s).max(c.flops / H100_SXM.bf16_flop_per_s);
        assert!(
            (c.floor_h100_s - h100).abs() <= 1e-9 * h100 + 1.1e-9,
            "{c:?}"
        );
        let here = (c.bytes / copy).max(c.flops / gemm);
        assert!(
            (c.floor_here_s.unwrap() - here).abs() <= 1e-9 * here + 1.1e-9,
            "{c:?}"
        );
    }
    // NF4 at 256x256 (4096 / 16): half a byte per element, an f32 scale per
    // 64, two bytes out.
    let q = &r.results[0];
    assert!(q.case.contains("256x256"), "{}", q.case);
    assert_eq!(q.bytes, (256.0 * 256.0) * (0.5 + 2.0) + 4.0 * 1024.0);
    assert!(r.table().contains("floor H100"));
}

#[test]
fn bad_options_are_errors() {
    let e = run(&BenchOptions {
        device: Device::Sim,
        ..BenchOptions::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("simulator"), "{e}");
    assert!(
        run(&BenchOptions {
            ops: vec![],
            ..BenchOptions::default()
        })
        .is_err()
    );
    assert!(
        run(&BenchOptions {
            ops: vec![BenchOp::Nf4],
            shrink: 0,
            ..BenchOptions::default()
        })
        .is_err()
    );
}

#[test]
fn cli_bench_prints_a_table_and_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_tli"))
        .args([
            "bench", "--op", "cosine", "--shrink", "16", "--min-ms", "0", "--json", "-",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("floor H100") && stdout.contains("cosine matrix"),
        "{stdout}"
    );
    let v: Value = serde_json::from_str(&stdout[stdout.find("{\n").unwrap()..]).unwrap();
    assert_eq!(v["results"].as_array().unwrap().len(), 2);
    let out = Command::new(env!("CARGO_BIN_EXE_tli"))
        .args(["bench", "--device", "cuda"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("CUDA") && !e.contains("panicked"), "{e}");
}
