//! Resource budgets of every embedded cubin, read from `ptxas -v`, and the
//! shape of the embedded images.
//!
//! The build compiles each `kernels/*.cu` once to PTX (NVRTC) and assembles
//! that PTX into a cubin for every architecture in `CUDA_ARCHS` (ptxas 12.x),
//! embedding the cubins and the PTX. Here each embedded PTX goes through the
//! same ptxas again, with `-v`, for every architecture; the cubin it writes
//! must equal the embedded one byte for byte, so the budgets checked below
//! (no spills, no stack frame beyond its allowance, registers within the
//! cap) are those of the SASS that runs. The table is printed on every run so
//! a change in register pressure shows up in the log before it becomes a
//! failure.
//!
//! ptxas is `$TLI_PTXAS` (`scripts/cuda-env` sets it), else
//! `$CUDA_HOME/bin` or `$CUDA_PATH/bin`; without one the budget test prints
//! why it skipped. The image-shape test needs no tool: it reads the ELF
//! headers and the PTX text itself.
#![cfg(tli_cuda)]

use std::collections::BTreeMap;
use std::env;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;

use regex::Regex;
use tli_kernels::kernels::{
    CUDA_ARCHS, CUDA_IMAGES, CudaImage, ImageKind, KERNEL_SOURCES, PTX_ARCH, PTX_ISA_MAX,
    PTXAS_VERSION,
};

/// Per entry-point prefix: the most registers and stack-frame bytes allowed.
///
/// The counts quoted are those of the embedded cubins (NVRTC 12.2 PTX,
/// ptxas 12.9) for sm_80/86/89/90; sm_86 and sm_89 (1536 threads per SM)
/// often get other allocations than sm_80 and sm_90.
///
/// * `nf4_dequant`: each thread expands one 16-byte load of codes into 32
///   outputs, so 32 values plus addresses and loop state are live: 32
///   registers on sm_80 and sm_90 (full occupancy: 64 Ki registers / 2048
///   threads per SM), 40-41 on sm_86/89. The cap of 64 still leaves 1024
///   resident threads per SM, each with a 16-byte load in flight; beyond that
///   this memory-bound kernel would need a redesign, not a tweak. No stack:
///   the value array must stay fully unrolled in registers.
///
/// * `lora_fwd_tile_*_{bf16,f16}`, `lora_bwd_dx_*_{bf16,f16}` (128-thread
///   tensor-core tiles): each thread holds 2x4 m16n8 accumulators of the
///   base product plus 2x4 of the LoRA projection (64 f32), A/B fragments
///   and 16 decoded weights: 121-156 registers. The cap of 168 keeps
///   three blocks (12 warps) per SM resident (168 x 128 x 3 < 64 Ki), the
///   least that hides the barrier-separated load and mma phases of an
///   unpipelined tile; more would cost a block of occupancy.
/// * the same for f32 (SIMT FMAs over the same fragments, 212-246): the
///   reference dtype, not the hot path; capped at 255, the most a 128-thread
///   launch bound allows, so the f32 tile may never spill.
/// * `lora_fwd_gemv` (256 threads, 8 row accumulators per lane, one decoded
///   word of 8 codes at a time; 64-127): 128 keeps two blocks = 16 warps per
///   SM for this memory-bound kernel.
/// * `lora_proj`, `lora_bwd_dadb`: scalar loops, 31-43 registers; 64.
/// * `cosine_pool`, `cosine_pairs`: `__launch_bounds__(256, 3)` caps them at
///   85 registers (three resident blocks, 768 threads per SM); a thread holds
///   one or two 8-float pooled chunks, three f32 accumulators and the row
///   pointers: 40-64 registers. Without the minimum-blocks hint nvcc 13.4
///   capped cosine_pairs_f32 at 48 and spilled, hence the explicit cap here.
///   No stack: the IEEE div/sqrt subroutines (whose calls cost a stack frame)
///   are kept out of the kernels.
/// * `cosine_matrix`: a 4x4 f32 micro-tile, 4 + 4 operands and tile indices:
///   80 registers on sm_80, 77 on sm_90, 64 on sm_86/89 (nvcc 13.4 gave 48).
///   85 keeps three 256-thread blocks resident (85 x 256 x 3 < 64 Ki); a
///   fourth would need `__launch_bounds__(256, 4)` and a GPU measurement
///   showing that the forced 64 registers do not cost more than they give.
///
/// Every entry point must match a prefix (the first match counts), so a new
/// kernel cannot land without a budget.
const BUDGETS: &[(&str, u32, u32)] = &[
    ("nf4_dequant", 64, 0),
    ("cosine_pool", 85, 0),
    ("cosine_pairs", 85, 0),
    ("cosine_matrix", 85, 0),
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
    let mut candidates: Vec<PathBuf> = env::var_os("TLI_PTXAS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .into_iter()
        .collect();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            candidates.push(PathBuf::from(home).join("bin").join(exe));
        }
    }
    let Some(ptxas) = candidates.into_iter().find(|p| p.is_file()) else {
        return Err(
            "no ptxas in $TLI_PTXAS, $CUDA_HOME/bin or $CUDA_PATH/bin (`eval \"$(scripts/cuda-env)\"` sets \
             TLI_PTXAS)"
                .to_string(),
        );
    };
    let out = Command::new(&ptxas)
        .arg("--version")
        .output()
        .map_err(|e| format!("could not run {}: {e}", ptxas.display()))?;
    let version = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        version.contains(PTXAS_VERSION),
        "{} is not the ptxas that assembled the embedded cubins ({PTXAS_VERSION}); it says:\n{version}\n\
         point TLI_PTXAS at that one (`eval \"$(scripts/cuda-env)\"`) so the budgets describe the embedded SASS",
        ptxas.display()
    );
    Ok(ptxas)
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

/// Assemble kernel `name`'s embedded PTX for `arch` with `-v`: the log, and
/// the cubin ptxas wrote.
fn run_ptxas(
    ptxas: &PathBuf,
    dir: &std::path::Path,
    ptx: &CudaImage,
    arch: u32,
) -> (String, Vec<u8>) {
    let src = dir.join(format!("{}.compute_{}.ptx", ptx.name, ptx.arch));
    let cubin = dir.join(format!("{}.sm_{arch}.cubin", ptx.name));
    std::fs::write(&src, ptx.bytes).expect("write PTX to the temp dir");
    let out = Command::new(ptxas)
        .arg("-v")
        .arg(format!("-arch=sm_{arch}"))
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
        "ptxas rejected {} for sm_{arch} ({}):\n{log}",
        ptx.name,
        out.status
    );
    (
        log,
        std::fs::read(&cubin).expect("read the cubin ptxas wrote"),
    )
}

fn image(name: &str, kind: ImageKind, arch: u32) -> Vec<&'static CudaImage> {
    CUDA_IMAGES
        .iter()
        .filter(|m| m.name == name && m.kind == kind && m.arch == arch)
        .collect()
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
        CUDA_IMAGES.iter().any(|m| m.kind == ImageKind::Sass),
        "built with `cuda` but no cubin is embedded"
    );
    let dir = tempfile::tempdir().expect("temp dir");

    report(&format!(
        "ptxas budgets of the embedded cubins ({}, {PTXAS_VERSION})",
        ptxas.display()
    ));
    report(&format!(
        "{:<24} {:>6} {:>5} {:>6} {:>6} {:>8} {:>8}  budget",
        "entry", "arch", "regs", "smem", "stack", "spill-st", "spill-ld"
    ));
    let mut failures = Vec::new();
    for m in CUDA_IMAGES.iter().filter(|m| m.kind == ImageKind::Sass) {
        let ptx = image(m.name, ImageKind::Ptx, PTX_ARCH);
        assert_eq!(ptx.len(), 1, "kernel {}: expected one PTX image", m.name);
        let ptx = ptx[0];
        let declared = ptx_entries(ptx.ptx().expect("the PTX image is text"));
        assert!(
            !declared.is_empty(),
            "{} sm_{}: the PTX declares no .entry",
            m.name,
            m.arch
        );
        let (log, cubin) = run_ptxas(&ptxas, dir.path(), ptx, m.arch);
        if cubin != m.bytes {
            failures.push(format!(
                "{} sm_{}: ptxas -v wrote a cubin of {} bytes that differs from the embedded one ({} bytes), \
                 so its budgets would not describe the embedded SASS",
                m.name,
                m.arch,
                cubin.len(),
                m.bytes.len()
            ));
        }
        let usage = parse_ptxas(&log);
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

/// ELF header fields of a cubin: (OSABI, ABI version, e_machine, e_flags).
fn elf_header(bytes: &[u8]) -> Option<(u8, u8, u16, u32)> {
    if bytes.len() < 0x40 || bytes[..4] != *b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return None;
    }
    let machine = u16::from_le_bytes([bytes[0x12], bytes[0x13]]);
    let flags = u32::from_le_bytes(bytes[0x30..0x34].try_into().ok()?);
    Some((bytes[7], bytes[8], machine, flags))
}

#[test]
fn every_kernel_has_sass_for_every_architecture_and_old_enough_ptx() {
    assert!(!KERNEL_SOURCES.is_empty(), "no kernels/*.cu in this build");
    assert!(
        !CUDA_ARCHS.is_empty(),
        "built with `cuda` but no architecture was compiled"
    );
    if option_env!("TLI_CUDA_ARCHS").is_none() {
        assert_eq!(
            CUDA_ARCHS,
            &[80, 86, 89, 90],
            "the default architectures are sm_80, sm_86, sm_89 and sm_90"
        );
    }
    assert_eq!(
        Some(&PTX_ARCH),
        CUDA_ARCHS.iter().min(),
        "the PTX targets the lowest architecture"
    );
    // A CUDA 12.2 driver JITs PTX ISA 8.2 at most (the build may lower the
    // bound with TLI_PTX_ISA_MAX, never raise what this test accepts).
    assert!(PTX_ISA_MAX <= (8, 2), "PTX_ISA_MAX {PTX_ISA_MAX:?} > 8.2");
    let target = Regex::new(r"(?m)^\.target\s+sm_(\d+)").expect("valid regex");
    for name in KERNEL_SOURCES {
        for &arch in CUDA_ARCHS {
            let found = image(name, ImageKind::Sass, arch);
            assert_eq!(
                found.len(),
                1,
                "kernel {name}: expected one cubin for sm_{arch}, found {}",
                found.len()
            );
            let (osabi, abi_version, machine, flags) =
                elf_header(found[0].bytes).unwrap_or_else(|| {
                    panic!("{name} sm_{arch}: the cubin is not a 64-bit little-endian ELF")
                });
            // EM_CUDA.
            assert_eq!(machine, 190, "{name} sm_{arch}: ELF e_machine {machine}");
            // 0x33 (ABI version 7) is the cubin format of CUDA 12.x and
            // before; CUDA 13's ptxas writes 0x41 (ABI version 8), which a
            // 12.x driver refuses.
            assert_eq!(
                (osabi, abi_version),
                (0x33, 7),
                "{name} sm_{arch}: ELF OSABI {osabi:#x} ABI version {abi_version}: not a cubin a CUDA 12.x driver loads"
            );
            assert_eq!(
                flags & 0xff,
                arch,
                "{name} sm_{arch}: e_flags {flags:#x} name another architecture"
            );
        }
        let ptx = image(name, ImageKind::Ptx, PTX_ARCH);
        assert_eq!(
            ptx.len(),
            1,
            "kernel {name}: expected one PTX image for sm_{PTX_ARCH}"
        );
        let text = ptx[0].ptx().expect("the PTX image is UTF-8");
        let isa = ptx[0]
            .ptx_isa()
            .unwrap_or_else(|| panic!("{name}: the PTX has no .version line"));
        assert!(
            isa <= PTX_ISA_MAX,
            "{name}: PTX ISA {}.{} > the maximum {}.{}",
            isa.0,
            isa.1,
            PTX_ISA_MAX.0,
            PTX_ISA_MAX.1
        );
        let t = target
            .captures(text)
            .unwrap_or_else(|| panic!("{name}: the PTX has no .target line"));
        assert_eq!(
            &t[1],
            PTX_ARCH.to_string(),
            "{name}: PTX .target is sm_{}",
            &t[1]
        );
        assert!(!ptx_entries(text).is_empty(), "{name}: no entry points");
    }
    for m in CUDA_IMAGES {
        assert!(
            KERNEL_SOURCES.contains(&m.name) && CUDA_ARCHS.contains(&m.arch),
            "image {} is neither of a kernel source nor of a compiled architecture",
            m.describe()
        );
    }
    assert_eq!(
        CUDA_IMAGES.len(),
        KERNEL_SOURCES.len() * (CUDA_ARCHS.len() + 1),
        "one cubin per architecture and one PTX per kernel"
    );
}

#[test]
fn ptxas_log_parser_reads_every_field() {
    // A log in the format ptxas 12.9 (and 13.x) prints, including an entry without
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
