//! Resource budgets of every embedded kernel, read from `ptxas -v`.
//!
//! The build compiles each `kernels/*.cu` to PTX for every architecture in
//! `CUDA_ARCHS`. Here each of those PTX modules goes through `ptxas` (the
//! assembler the driver's JIT also uses) for its own architecture, and every
//! entry point is held to its budget: no spills, no stack frame beyond its
//! allowance, registers within its cap. The table is printed on every run so
//! a change in register pressure shows up in the log before it becomes a
//! failure.
//!
//! ptxas is found the way `build.rs` finds nvcc: `$CUDA_HOME/bin`,
//! `$CUDA_PATH/bin`, then `PATH`. Without it the test prints why it skipped.
#![cfg(tli_cuda)]

use std::collections::BTreeMap;
use std::env;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;

use regex::Regex;
use tli_kernels::kernels::{CUDA_ARCHS, KERNEL_SOURCES, NVCC_VERSION, PTX_MODULES, PtxModule};

/// Per entry-point prefix: the most registers and stack-frame bytes allowed.
///
/// * `nf4_dequant`: each thread expands one 16-byte load of codes into 32
///   outputs, so 32 values plus addresses and loop state are live; nvcc 13.4
///   gives 32 registers on sm_80 and sm_90, which allows full occupancy
///   (64 Ki registers / 2048 threads per SM). The cap of 64 still leaves 1024
///   resident threads per SM, each with a 16-byte load in flight; beyond that
///   this memory-bound kernel would need a redesign, not a tweak. No stack:
///   the value array must stay fully unrolled in registers.
///
/// * `lora_fwd_tile_*_{bf16,f16}`, `lora_bwd_dx_*_{bf16,f16}` (128-thread
///   tensor-core tiles): each thread holds 2x4 m16n8 accumulators of the
///   base product plus 2x4 of the LoRA projection (64 f32), A/B fragments
///   and 16 decoded weights; nvcc 13.4 gives 122-156. The cap of 168 keeps
///   three blocks (12 warps) per SM resident (168 x 128 x 3 < 64 Ki), the
///   least that hides the barrier-separated load and mma phases of an
///   unpipelined tile; more would cost a block of occupancy.
/// * the same for f32 (SIMT FMAs over the same fragments, 224-238 today):
///   the reference dtype, not the hot path; capped at 255, the most a
///   128-thread launch bound allows, so the f32 tile may never spill.
/// * `lora_fwd_gemv` (256 threads, 8 row accumulators per lane, one decoded
///   word of 8 codes at a time; 64-125 today): 128 keeps two blocks = 16
///   warps per SM for this memory-bound kernel.
/// * `lora_proj`, `lora_bwd_dadb`: scalar loops, about 32 registers; 64.
/// * `cosine_pool`, `cosine_pairs`: `__launch_bounds__(256, 3)` caps them at
///   85 registers (three resident blocks, 768 threads per SM); a thread holds
///   one or two 8-float pooled chunks, three f32 accumulators and the row
///   pointers. nvcc 13.4 uses 64 to 84. Without the minimum-blocks hint it
///   capped cosine_pairs_f32 at 48 and spilled, hence the explicit cap here.
///   No stack: the IEEE div/sqrt subroutines (whose calls cost a stack frame)
///   are kept out of the kernels.
/// * `cosine_matrix`: a 4x4 f32 micro-tile, 4 + 4 operands and tile indices;
///   48 registers on sm_80/sm_90. 64 keeps four 256-thread blocks resident.
///
/// Every entry point must match a prefix (the first match counts), so a new
/// kernel cannot land without a budget.
const BUDGETS: &[(&str, u32, u32)] = &[
    ("nf4_dequant", 64, 0),
    ("cosine_pool", 85, 0),
    ("cosine_pairs", 85, 0),
    ("cosine_matrix", 64, 0),
    ("lora_fwd_tile_dense_f32", 255, 0),
    ("lora_fwd_tile_nf4_f32", 255, 0),
    ("lora_fwd_tile_nf4dq_f32", 255, 0),
    ("lora_bwd_dx_dense_f32", 255, 0),
    ("lora_bwd_dx_nf4_f32", 255, 0),
    ("lora_bwd_dx_nf4dq_f32", 255, 0),
    ("lora_fwd_tile_", 168, 0),
    ("lora_bwd_dx_", 168, 0),
    ("lora_fwd_gemv_", 128, 0),
    ("lora_proj_", 64, 0),
    ("lora_bwd_dadb_", 64, 0),
];

/// What ptxas reported for one entry point.
#[derive(Debug, Default, Clone)]
struct Usage {
    registers: Option<u32>,
    smem: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
}

/// Print past the test harness's output capture, so the line shows in the
/// log of a passing run too.
fn report(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

fn find_ptxas() -> Result<PathBuf, String> {
    let exe = if cfg!(windows) { "ptxas.exe" } else { "ptxas" };
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            let p = PathBuf::from(home).join("bin").join(exe);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join(exe);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(format!(
        "{exe} was not found in $CUDA_HOME/bin, $CUDA_PATH/bin or $PATH (it ships next to nvcc; .ci/run puts \
         the PyPI nvcc on PATH)"
    ))
}

/// Names of the `.entry` functions a PTX module defines.
fn ptx_entries(ptx: &str) -> Vec<String> {
    let re = Regex::new(r"(?m)^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+([A-Za-z_$][\w$]*)")
        .expect("valid regex");
    re.captures_iter(ptx).map(|c| c[1].to_string()).collect()
}

/// Parse `ptxas -v` output into per-entry usage.
fn parse_ptxas(log: &str) -> BTreeMap<String, Usage> {
    let compiling = Regex::new(r"Compiling entry function '([^']+)'").expect("valid regex");
    let frame =
        Regex::new(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
            .expect("valid regex");
    let regs = Regex::new(r"Used (\d+) registers").expect("valid regex");
    let smem = Regex::new(r"(\d+) bytes smem").expect("valid regex");
    let num = |s: &str| s.parse::<u32>().expect("ptxas prints decimal counts");

    let mut out: BTreeMap<String, Usage> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in log.lines() {
        if let Some(c) = compiling.captures(line) {
            let name = c[1].to_string();
            out.entry(name.clone()).or_default();
            current = Some(name);
            continue;
        }
        let Some(name) = &current else { continue };
        let u = out.get_mut(name).expect("entry inserted when it was named");
        if let Some(c) = frame.captures(line) {
            u.stack = num(&c[1]);
            u.spill_stores = num(&c[2]);
            u.spill_loads = num(&c[3]);
        }
        if let Some(c) = regs.captures(line) {
            u.registers = Some(num(&c[1]));
            if let Some(s) = smem.captures(line) {
                u.smem = num(&s[1]);
            }
        }
    }
    out
}

fn run_ptxas(ptxas: &PathBuf, dir: &std::path::Path, m: &PtxModule) -> String {
    let src = dir.join(format!("{}.sm_{}.ptx", m.name, m.arch));
    let cubin = dir.join(format!("{}.sm_{}.cubin", m.name, m.arch));
    std::fs::write(&src, m.ptx).expect("write PTX to the temp dir");
    let out = Command::new(ptxas)
        .arg("-v")
        .arg(format!("-arch=sm_{}", m.arch))
        .arg(&src)
        .arg("-o")
        .arg(&cubin)
        .output()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", ptxas.display()));
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "ptxas rejected {} for sm_{} ({}):\n{log}",
        m.name,
        m.arch,
        out.status
    );
    log
}

#[test]
fn every_kernel_within_its_register_budget_and_spill_free() {
    let ptxas = match find_ptxas() {
        Ok(p) => p,
        Err(reason) => {
            report(&format!("ptxas budgets: skipped: {reason}"));
            return;
        }
    };
    assert!(
        !PTX_MODULES.is_empty(),
        "built with `cuda` but no PTX module is embedded"
    );
    let dir = tempfile::tempdir().expect("temp dir");

    report(&format!(
        "ptxas budgets ({}, nvcc: {NVCC_VERSION})",
        ptxas.display()
    ));
    report(&format!(
        "{:<24} {:>6} {:>5} {:>6} {:>6} {:>8} {:>8}  budget",
        "entry", "arch", "regs", "smem", "stack", "spill-st", "spill-ld"
    ));
    let mut failures = Vec::new();
    for m in PTX_MODULES {
        let declared = ptx_entries(m.ptx);
        assert!(
            !declared.is_empty(),
            "{} sm_{}: the PTX declares no .entry",
            m.name,
            m.arch
        );
        let usage = parse_ptxas(&run_ptxas(&ptxas, dir.path(), m));
        let mut reported: Vec<&String> = usage.keys().collect();
        reported.sort();
        let mut want: Vec<&String> = declared.iter().collect();
        want.sort();
        assert_eq!(
            reported, want,
            "{} sm_{}: ptxas reported other entry points than the PTX declares",
            m.name, m.arch
        );
        for (entry, u) in &usage {
            let Some(regs) = u.registers else {
                failures.push(format!(
                    "{entry} sm_{}: ptxas printed no register count",
                    m.arch
                ));
                continue;
            };
            let budget = BUDGETS
                .iter()
                .find(|(prefix, ..)| entry.starts_with(prefix));
            report(&format!(
                "{:<24} {:>6} {:>5} {:>6} {:>6} {:>8} {:>8}  {}",
                entry,
                format!("sm_{}", m.arch),
                regs,
                u.smem,
                u.stack,
                u.spill_stores,
                u.spill_loads,
                budget.map_or("none".to_string(), |(_, r, s)| format!(
                    "<= {r} regs, <= {s} B stack"
                ))
            ));
            let Some(&(_, max_regs, max_stack)) = budget else {
                failures.push(format!("{entry}: no entry in BUDGETS matches it; add one"));
                continue;
            };
            if u.spill_stores != 0 || u.spill_loads != 0 {
                failures.push(format!(
                    "{entry} sm_{}: spills ({} bytes stored, {} bytes loaded)",
                    m.arch, u.spill_stores, u.spill_loads
                ));
            }
            if regs > max_regs {
                failures.push(format!(
                    "{entry} sm_{}: {regs} registers > budget {max_regs}",
                    m.arch
                ));
            }
            if u.stack > max_stack {
                failures.push(format!(
                    "{entry} sm_{}: {} bytes of stack frame > budget {max_stack}",
                    m.arch, u.stack
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "resource budgets broken:\n  {}",
        failures.join("\n  ")
    );
}

#[test]
fn every_kernel_is_embedded_for_every_architecture() {
    assert!(!KERNEL_SOURCES.is_empty(), "no kernels/*.cu in this build");
    assert!(
        !CUDA_ARCHS.is_empty(),
        "built with `cuda` but no architecture was compiled"
    );
    if option_env!("TLI_CUDA_ARCHS").is_none() {
        assert_eq!(
            CUDA_ARCHS,
            &[80, 90],
            "the default architectures are sm_80 and sm_90"
        );
    }
    let target = Regex::new(r"(?m)^\.target\s+sm_(\d+)").expect("valid regex");
    for name in KERNEL_SOURCES {
        for &arch in CUDA_ARCHS {
            let found: Vec<&PtxModule> = PTX_MODULES
                .iter()
                .filter(|m| m.name == *name && m.arch == arch)
                .collect();
            assert_eq!(
                found.len(),
                1,
                "kernel {name}: expected one PTX module for sm_{arch}, found {}",
                found.len()
            );
            let m = found[0];
            let t = target
                .captures(m.ptx)
                .unwrap_or_else(|| panic!("{name} sm_{arch}: the PTX has no .target line"));
            assert_eq!(
                &t[1],
                arch.to_string(),
                "{name} sm_{arch}: PTX .target is sm_{}",
                &t[1]
            );
            assert!(
                !ptx_entries(m.ptx).is_empty(),
                "{name} sm_{arch}: no entry points"
            );
        }
    }
    for m in PTX_MODULES {
        assert!(
            KERNEL_SOURCES.contains(&m.name) && CUDA_ARCHS.contains(&m.arch),
            "module {} sm_{} is neither a kernel source nor a compiled architecture",
            m.name,
            m.arch
        );
    }
}

#[test]
fn ptxas_log_parser_reads_every_field() {
    // A log in the format ptxas 13.x prints, including an entry without
    // shared memory (ptxas omits the smem field then).
    let log = "ptxas info    : 0 bytes gmem\n\
               ptxas info    : Compiling entry function 'k_a' for 'sm_80'\n\
               ptxas info    : Function properties for k_a\n\
               \x20   8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
               ptxas info    : Used 40 registers, used 1 barriers, 64 bytes smem, 388 bytes cmem[0]\n\
               ptxas info    : Compiling entry function 'k_b' for 'sm_80'\n\
               ptxas info    : Function properties for k_b\n\
               \x20   0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
               ptxas info    : Used 18 registers, 360 bytes cmem[0]\n";
    let u = parse_ptxas(log);
    assert_eq!(u.len(), 2);
    let a = &u["k_a"];
    assert_eq!(
        (a.registers, a.smem, a.stack, a.spill_stores, a.spill_loads),
        (Some(40), 64, 8, 4, 12)
    );
    let b = &u["k_b"];
    assert_eq!(
        (b.registers, b.smem, b.stack, b.spill_stores, b.spill_loads),
        (Some(18), 0, 0, 0, 0)
    );
    assert_eq!(
        ptx_entries(".visible .entry k_a(\n.entry k_b(\n// .entry not_me(\n"),
        vec!["k_a", "k_b"]
    );
}
