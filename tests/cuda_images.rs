//! What the embedded machine code must look like, read from the embedded
//! cubins with `cuobjdump -sass` (no GPU needed).
//!
//! Every kernel entry point is held to the contract in [`CONTRACTS`]: no
//! local memory (`LDL`/`STL`: spills or a stack array), 128-bit global loads
//! (`LDG.E.128`) inside a loop for the bandwidth-bound kernels (dequant,
//! GEMV, cosine pooling), tensor-core `HMMA` inside a loop for the bf16/f16
//! tile kernels, and a `.maxntid` in the embedded PTX equal to the block
//! size the Rust launcher uses. A loop is the address range of a backward
//! branch. Failures name the entry, the architecture and the counts.
//!
//! `cuobjdump` and `nvdisasm` come from `$CUDA_HOME/bin`, `$CUDA_PATH/bin`
//! or `PATH` (`scripts/cuda-env` puts PyPI's on PATH); without them the
//! SASS test prints why it skipped. The `.maxntid` test needs no tool.
#![cfg(tli_cuda)]

use std::collections::BTreeMap;
use std::env;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;

use regex::Regex;
use tli_kernels::kernels::{CUDA_IMAGES, ImageKind, launch_block_threads};

/// Per entry-point prefix (the first match counts): the least number of
/// 128-bit global loads inside a loop, and of HMMA instructions inside a
/// loop. Every entry must match one, so a new kernel lands with a contract.
/// All entries: no `LDL`/`STL` at all.
///
/// * `nf4_dequant`: the grid-stride loop reads 16 bytes of codes per
///   thread and step (`tli_load_ro_16`).
/// * `lora_fwd_gemv_`: the K loop reads one 16-byte word of weights (8 NF4
///   codes' worth of packed bytes, or 8 dense bf16/f16, 4 f32) per lane.
/// * `cosine_pool`, `cosine_pairs`: 8-float chunks of the rows, 16 bytes
///   per load.
/// * `lora_fwd_tile_*`/`lora_bwd_dx_*` bf16/f16: `mma.sync.m16n8k16`, which
///   is HMMA on sm_80-sm_90. The f32 tiles are SIMT by design.
/// * `cosine_matrix`, `lora_proj`, `lora_bwd_dadb`: compute- or
///   latency-bound small loops; only the no-local-memory rule.
const CONTRACTS: &[(&str, u32, u32)] = &[
    ("nf4_dequant_", 1, 0),
    ("lora_fwd_gemv_", 1, 0),
    ("cosine_pool_", 1, 0),
    ("cosine_pairs_", 1, 0),
    ("cosine_matrix_", 0, 0),
    ("lora_fwd_tile_dense_f32", 0, 0),
    ("lora_fwd_tile_nf4_f32", 0, 0),
    ("lora_fwd_tile_nf4dq_f32", 0, 0),
    ("lora_bwd_dx_dense_f32", 0, 0),
    ("lora_bwd_dx_nf4_f32", 0, 0),
    ("lora_bwd_dx_nf4dq_f32", 0, 0),
    ("lora_fwd_tile_", 0, 1),
    ("lora_bwd_dx_", 0, 1),
    ("lora_proj_", 0, 0),
    ("lora_bwd_dadb_", 0, 0),
];

/// Instruction counts of one function's SASS.
#[derive(Debug, Default, PartialEq)]
struct Counts {
    local_loads: u32,
    local_stores: u32,
    ldg128: u32,
    ldg128_in_loop: u32,
    hmma: u32,
    hmma_in_loop: u32,
    loops: u32,
}

/// Per function, the counts of a `cuobjdump -sass` listing.
fn parse_sass(sass: &str) -> BTreeMap<String, Counts> {
    let function = Regex::new(r"Function : (\S+)").expect("valid regex");
    let insn = Regex::new(r"^\s*/\*([0-9a-f]{4,})\*/\s+([^;]*);").expect("valid regex");
    let branch = Regex::new(r"\bBRA\b[^;]*?0x([0-9a-f]+)").expect("valid regex");
    let mut listing: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in sass.lines() {
        if let Some(c) = function.captures(line) {
            current = Some(c[1].to_string());
            listing.entry(c[1].to_string()).or_default();
            continue;
        }
        if let (Some(f), Some(c)) = (&current, insn.captures(line)) {
            let addr = u64::from_str_radix(&c[1], 16).expect("hex address");
            listing
                .get_mut(f)
                .expect("function inserted when named")
                .push((addr, c[2].trim().to_string()));
        }
    }
    listing
        .into_iter()
        .map(|(name, insns)| {
            let loops: Vec<(u64, u64)> = insns
                .iter()
                .filter_map(|(addr, text)| {
                    let target = u64::from_str_radix(&branch.captures(text)?[1], 16).ok()?;
                    (target <= *addr).then_some((target, *addr))
                })
                .collect();
            let in_loop = |addr: u64| loops.iter().any(|&(s, e)| s <= addr && addr <= e);
            let op = |text: &str| -> String {
                // Drop a predicate guard (`@P0`, `@!PT`).
                let t = text.trim_start();
                let t = if t.starts_with('@') {
                    t.split_once(char::is_whitespace).map_or("", |(_, r)| r)
                } else {
                    t
                };
                t.split_whitespace().next().unwrap_or("").to_string()
            };
            let mut c = Counts {
                loops: loops.len() as u32,
                ..Counts::default()
            };
            for (addr, text) in &insns {
                let o = op(text);
                let base = o.split('.').next().unwrap_or("");
                match base {
                    "LDL" => c.local_loads += 1,
                    "STL" => c.local_stores += 1,
                    "HMMA" => {
                        c.hmma += 1;
                        c.hmma_in_loop += u32::from(in_loop(*addr));
                    }
                    "LDG" if o.split('.').any(|p| p == "128") => {
                        c.ldg128 += 1;
                        c.ldg128_in_loop += u32::from(in_loop(*addr));
                    }
                    _ => {}
                }
            }
            (name, c)
        })
        .collect()
}

/// `.maxntid` of every `.entry` in a PTX text (`None` when it has none).
fn ptx_maxntid(ptx: &str) -> BTreeMap<String, Option<(u32, u32, u32)>> {
    let entry = Regex::new(r"\.entry\s+([A-Za-z_$][\w$]*)\s*\(").expect("valid regex");
    let maxntid = Regex::new(r"\.maxntid\s+(\d+)\s*,\s*(\d+)\s*,\s*(\d+)").expect("valid regex");
    entry
        .captures_iter(ptx)
        .map(|c| {
            let start = c.get(0).expect("whole match").end();
            // The directives sit between the parameter list and the body.
            let head = &ptx[start..start + ptx[start..].find('{').unwrap_or(0)];
            let n = maxntid.captures(head).map(|m| {
                let v = |i: usize| m[i].parse::<u32>().expect("decimal");
                (v(1), v(2), v(3))
            });
            (c[1].to_string(), n)
        })
        .collect()
}

fn find_tool(exe: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(env::var_os)
        .map(|h| PathBuf::from(h).join("bin"))
        .collect();
    if let Some(path) = env::var_os("PATH") {
        dirs.extend(env::split_paths(&path));
    }
    dirs.into_iter().map(|d| d.join(exe)).find(|p| p.is_file())
}

fn report(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

#[test]
fn embedded_sass_keeps_every_kernel_contract() {
    let (Some(cuobjdump), Some(_)) = (find_tool("cuobjdump"), find_tool("nvdisasm")) else {
        report(
            "SASS contracts: skipped: cuobjdump or nvdisasm not in $CUDA_HOME/bin, $CUDA_PATH/bin or PATH \
             (`eval \"$(scripts/cuda-env)\"` puts them on PATH)",
        );
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut failures = Vec::new();
    let mut checked = 0;
    report(&format!(
        "{:<26} {:>6} {:>4} {:>4} {:>7} {:>7} {:>5} {:>5}",
        "entry", "arch", "LDL", "STL", "LDG128", "in-loop", "HMMA", "in-loop"
    ));
    for m in CUDA_IMAGES.iter().filter(|m| m.kind == ImageKind::Sass) {
        let path = dir.path().join(format!("{}.sm_{}.cubin", m.name, m.arch));
        std::fs::write(&path, m.bytes).expect("write cubin");
        let out = Command::new(&cuobjdump)
            .arg("-sass")
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("could not run {}: {e}", cuobjdump.display()));
        assert!(
            out.status.success(),
            "cuobjdump -sass {} sm_{} failed ({}): {}",
            m.name,
            m.arch,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let sass = String::from_utf8_lossy(&out.stdout);
        let functions = parse_sass(&sass);
        let ptx = CUDA_IMAGES
            .iter()
            .find(|p| p.name == m.name && p.kind == ImageKind::Ptx)
            .and_then(|p| p.ptx())
            .expect("a PTX image per kernel");
        let entries = ptx_maxntid(ptx);
        assert_eq!(
            functions.keys().collect::<Vec<_>>(),
            entries.keys().collect::<Vec<_>>(),
            "{} sm_{}: the cubin's functions are not the PTX's entry points",
            m.name,
            m.arch
        );
        for (entry, c) in &functions {
            checked += 1;
            report(&format!(
                "{:<26} {:>6} {:>4} {:>4} {:>7} {:>7} {:>5} {:>5}",
                entry,
                format!("sm_{}", m.arch),
                c.local_loads,
                c.local_stores,
                c.ldg128,
                c.ldg128_in_loop,
                c.hmma,
                c.hmma_in_loop
            ));
            let Some(&(_, min_ldg128, min_hmma)) =
                CONTRACTS.iter().find(|(p, ..)| entry.starts_with(p))
            else {
                failures.push(format!(
                    "{entry}: no entry in CONTRACTS matches it; add one"
                ));
                continue;
            };
            if c.local_loads + c.local_stores > 0 {
                failures.push(format!(
                    "{entry} sm_{}: local memory: {} LDL, {} STL",
                    m.arch, c.local_loads, c.local_stores
                ));
            }
            if c.ldg128_in_loop < min_ldg128 {
                failures.push(format!(
                    "{entry} sm_{}: {} LDG.E.128 inside a loop ({} in all, {} loops), want >= {min_ldg128}",
                    m.arch, c.ldg128_in_loop, c.ldg128, c.loops
                ));
            }
            if c.hmma_in_loop < min_hmma {
                failures.push(format!(
                    "{entry} sm_{}: {} HMMA inside a loop ({} in all), want >= {min_hmma}",
                    m.arch, c.hmma_in_loop, c.hmma
                ));
            }
        }
    }
    assert!(checked > 0, "no function was found in the embedded cubins");
    assert!(
        failures.is_empty(),
        "SASS contracts broken:\n  {}",
        failures.join("\n  ")
    );
}

#[test]
fn every_entry_point_is_bounded_to_its_launchers_block_size() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for m in CUDA_IMAGES.iter().filter(|m| m.kind == ImageKind::Ptx) {
        let ptx = m.ptx().expect("the PTX image is text");
        for (entry, maxntid) in ptx_maxntid(ptx) {
            checked += 1;
            let Some(threads) = launch_block_threads(&entry) else {
                failures.push(format!("{entry}: no launcher block size is known for it"));
                continue;
            };
            if maxntid != Some((threads, 1, 1)) {
                failures.push(format!(
                    "{entry}: PTX .maxntid {maxntid:?}, the launcher uses blocks of ({threads}, 1, 1)"
                ));
            }
        }
    }
    assert!(checked > 0, "no entry point in the embedded PTX");
    assert!(
        failures.is_empty(),
        "__launch_bounds__ and launchers disagree:\n  {}",
        failures.join("\n  ")
    );
}

#[test]
fn sass_parser_counts_loops_and_instructions() {
    // cuobjdump -sass as nvdisasm 13 prints it: a backward branch at 0x40
    // to 0x10 makes one loop holding the first LDG.E.128 and the HMMA.
    let sass = "\t\tFunction : k_a\n\
        \t.headerflags\t@\"EF_CUDA_SM80\"\n\
        /*0000*/  MOV R1, c[0x0][0x28] ;\n\
        /*0010*/  LDG.E.128.CONSTANT R4, [R2.64] ;\n\
        /*0020*/  @P0 HMMA.16816.F32.BF16 R8, R4, R6, R8 ;\n\
        /*0030*/  STL [R1], R4 ;\n\
        /*0040*/  @!P1 BRA 0x10 ;\n\
        /*0050*/  LDG.E.128 R4, [R2.64] ;\n\
        /*0060*/  LDL R4, [R1] ;\n\
        /*0070*/  BRA 0x70;\n\
        \t\tFunction : k_b\n\
        /*0000*/  EXIT ;\n";
    let c = parse_sass(sass);
    assert_eq!(c.len(), 2);
    assert_eq!(
        c["k_a"],
        Counts {
            local_loads: 1,
            local_stores: 1,
            ldg128: 2,
            ldg128_in_loop: 1,
            hmma: 1,
            hmma_in_loop: 1,
            // The self-branch at 0x70 (the end-of-function trap) counts too.
            loops: 2,
        }
    );
    assert_eq!(c["k_b"], Counts::default());
    let ptx = ".visible .entry k_a(\n.param .u32 p\n)\n.maxntid 128, 1, 1\n{\n}\n\
               .visible .entry k_b(\n)\n{\n.maxntid 9, 9, 9\n}\n";
    let n = ptx_maxntid(ptx);
    assert_eq!(n["k_a"], Some((128, 1, 1)));
    assert_eq!(n["k_b"], None);
}
