//! Build script.
//!
//! 1. Generates the Rust NF4 constants from `kernels/common/nf4.cuh`, the one
//!    place they are written down.
//! 2. Feature `sim`: compiles the kernel sources for the host, together with
//!    the simulator runtime in `kernels/sim/`, into a static library.
//! 3. Feature `cuda` or `candle-cuda`: compiles every `kernels/*.cu` to a
//!    cubin for each architecture in `TLI_CUDA_ARCHS` (default
//!    `80,86,89,90`) and to PTX for the lowest of them, with a CUDA 12.x
//!    toolchain so the images load on drivers from CUDA 12.2 on (see
//!    `build/cuda_images.rs`), embeds them, and sets the cfg `tli_cuda`, which gates the CUDA
//!    backend in the crate, its tests and benches. (The two features differ
//!    only in how cudarc reaches the driver, see Cargo.toml, so the code
//!    keys on the cfg rather than on either feature.)

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

#[path = "build/cuda_images.rs"]
mod cuda_images;

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let root =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let kernels_dir = root.join("kernels");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build/cuda_images.rs");
    for f in walk(&kernels_dir) {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    // The directories too: a kernel or export file that is added (or comes
    // back) must rebuild the simulator library and the PTX list.
    println!("cargo:rerun-if-changed={}", kernels_dir.display());
    println!(
        "cargo:rerun-if-changed={}",
        kernels_dir.join("sim").display()
    );

    generate_nf4_tables(
        &kernels_dir.join("common/nf4.cuh"),
        &out_dir.join("nf4_tables.rs"),
    );

    let kernel_sources = kernel_sources(&kernels_dir);

    if env::var_os("CARGO_FEATURE_SIM").is_some() {
        build_simulator(&kernels_dir);
    }

    let images_rs = out_dir.join("cuda_images.rs");
    let cuda = env::var_os("CARGO_FEATURE_CUDA").is_some();
    let candle_cuda = env::var_os("CARGO_FEATURE_CANDLE_CUDA").is_some();
    println!("cargo::rustc-check-cfg=cfg(tli_cuda)");
    if cuda && candle_cuda {
        panic!(
            "\n\nfeatures `cuda` and `candle-cuda` are exclusive: `cuda` loads the CUDA driver at run \
             time (cudarc `dynamic-loading`), `candle-cuda` links it the way candle-core does \
             (cudarc `dynamic-linking`), and cudarc takes only one. `candle-cuda` includes \
             everything `cuda` has; enable one of the two.\n"
        );
    }
    let generated = if cuda || candle_cuda {
        println!("cargo::rustc-cfg=tli_cuda");
        cuda_images::build(&kernels_dir, &kernel_sources, &cuda_archs(), &out_dir)
    } else {
        cuda_images::empty()
    };
    fs::write(&images_rs, generated).expect("write cuda_images.rs");

    let names: Vec<String> = kernel_sources
        .iter()
        .map(|s| format!("{:?}", s.file_stem().unwrap().to_string_lossy()))
        .collect();
    fs::write(
        out_dir.join("kernel_list.rs"),
        format!(
            "/// The kernel source files (`kernels/NAME.cu`) in this build.\n\
             pub const KERNEL_SOURCES: &[&str] = &[{}];\n",
            names.join(", ")
        ),
    )
    .expect("write kernel_list.rs");
}

/// All files below `dir`, sorted, so rerun-if-changed covers every header.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// `kernels/*.cu`, one per op, sorted by name.
fn kernel_sources(kernels_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(kernels_dir)
        .expect("read kernels/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    v.sort();
    v
}

/// Parse one `#define NAME \` block of comma-separated float literals.
fn parse_table(text: &str, name: &str, path: &Path) -> Vec<String> {
    let start = text
        .find(&format!("#define {name}"))
        .unwrap_or_else(|| panic!("{}: no `#define {name}`", path.display()));
    let mut values = Vec::new();
    for line in text[start..].lines().skip(1) {
        let cont = line.trim_end().ends_with('\\');
        let body = line
            .trim()
            .trim_end_matches('\\')
            .trim()
            .trim_end_matches(',');
        if !body.is_empty() {
            let lit = body.trim_end_matches('f');
            lit.parse::<f32>().unwrap_or_else(|e| {
                panic!("{}: {name}: bad literal {body:?}: {e}", path.display())
            });
            values.push(lit.to_string());
        }
        if !cont {
            break;
        }
    }
    values
}

fn generate_nf4_tables(header: &Path, out: &Path) {
    let text = fs::read_to_string(header).expect("read kernels/common/nf4.cuh");
    let code = parse_table(&text, "TLI_NF4_CODE_TABLE", header);
    let mids = parse_table(&text, "TLI_NF4_MIDPOINT_TABLE", header);
    assert_eq!(
        code.len(),
        16,
        "{}: NF4 code table must have 16 entries",
        header.display()
    );
    assert_eq!(
        mids.len(),
        15,
        "{}: NF4 midpoint table must have 15 entries",
        header.display()
    );
    let fmt = |v: &[String]| {
        v.iter()
            .map(|s| format!("{s}_f32"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    fs::write(
        out,
        format!(
            "/// The 16 NF4 code values, indexed by the 4-bit code (generated from\n\
             /// `kernels/common/nf4.cuh`).\n\
             pub const NF4_CODE: [f32; 16] = [{}];\n\
             /// bitsandbytes' 15 CUDA quantizer thresholds, ascending (generated from\n\
             /// `kernels/common/nf4.cuh`).\n\
             pub const NF4_MIDPOINTS: [f32; 15] = [{}];\n",
            fmt(&code),
            fmt(&mids)
        ),
    )
    .expect("write nf4_tables.rs");
}

fn build_simulator(kernels_dir: &Path) {
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        .include(kernels_dir)
        // runtime.cpp plus one `kernels/sim/OP.cpp` per op, each including
        // its `kernels/OP.cu` and exporting the C entry points Rust calls.
        .files(sim_sources(kernels_dir))
        // nvcc contracts `a*b + c` into an FMA by default, g++ on x86-64 does
        // not; so a kernel whose result must match across backends spells
        // every rounding step out (`__fmul_rn`, `__fadd_rn`, `fmaf`), and the
        // host must not contract either, or sim and device would disagree.
        .flag_if_supported("-ffp-contract=off")
        // Kernels carry `#pragma unroll` for nvcc; g++ warns on each one
        // (and before g++ 13 a `#pragma GCC diagnostic` cannot silence it).
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-pthread")
        .warnings(true)
        .opt_level(2);
    b.compile("tli_sim");
    println!("cargo:rustc-link-lib=pthread");
}

fn sim_sources(kernels_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(kernels_dir.join("sim"))
        .expect("read kernels/sim/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cpp"))
        .collect();
    v.sort();
    v
}

fn cuda_archs() -> Vec<u32> {
    println!("cargo:rerun-if-env-changed=TLI_CUDA_ARCHS");
    let spec = env::var("TLI_CUDA_ARCHS").unwrap_or_else(|_| "80,86,89,90".to_string());
    let archs: Vec<u32> = spec
        .split(',')
        .map(|s| s.trim().trim_start_matches("sm_"))
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse().unwrap_or_else(|_| {
                panic!("TLI_CUDA_ARCHS={spec:?}: {s:?} is not an architecture number like 80 or 90")
            })
        })
        .collect();
    assert!(
        !archs.is_empty(),
        "TLI_CUDA_ARCHS={spec:?} names no architecture"
    );
    archs
}
