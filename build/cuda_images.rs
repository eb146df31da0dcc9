//! The CUDA images `build.rs` embeds (features `cuda`, `candle-cuda`).
//!
//! Per kernel file: NVRTC from CUDA 12.2 compiles the CUDA C++ once to PTX
//! for the lowest architecture in `TLI_CUDA_ARCHS` (PTX ISA 8.2, which every
//! driver from CUDA 12.2 on can JIT), and a CUDA 12.x `ptxas` assembles that
//! very PTX into a cubin for each architecture (the pre-CUDA-13 cubin format,
//! which 12.x drivers load). The cubins and the PTX are embedded as separate
//! images; `src/kernels.rs` picks one per device at run time.
//!
//! The toolchain comes from `scripts/cuda-env` (PyPI wheels) through
//! `TLI_NVRTC`, `TLI_CUDA_INCLUDE` and `TLI_PTXAS`, or from a CUDA 12.x
//! toolkit under `$CUDA_HOME` / `$CUDA_PATH`. Whatever it is, the build
//! checks what it produced: the PTX `.version` is at most `TLI_PTX_ISA_MAX`
//! (default 8.2) and every cubin has the ELF header a 12.x driver accepts.

use std::env;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The newest PTX ISA a CUDA 12.2 driver JIT-compiles.
const DEFAULT_PTX_ISA_MAX: (u32, u32) = (8, 2);
/// ELF OSABI byte of the cubins CUDA 12.x drivers load (CUDA 13's ptxas
/// writes 0x41, which they reject).
pub const CUBIN_OSABI_CUDA12: u8 = 0x33;

const HELP: &str = "run `eval \"$(scripts/cuda-env)\"` first: it installs NVRTC 12.2, the CUDA 12.2 headers and \
                    ptxas 12.9 from PyPI into a cache and exports TLI_NVRTC, TLI_CUDA_INCLUDE and TLI_PTXAS; \
                    or point CUDA_HOME at a CUDA 12.x toolkit";

/// Where the three tools are.
pub struct Toolchain {
    nvrtc: PathBuf,
    include: PathBuf,
    ptxas: PathBuf,
}

fn env_path(var: &str) -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed={var}");
    env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

impl Toolchain {
    /// `TLI_NVRTC` / `TLI_CUDA_INCLUDE` / `TLI_PTXAS`, each falling back to
    /// its place in a toolkit under `$CUDA_HOME` or `$CUDA_PATH`.
    pub fn find() -> Toolchain {
        let homes: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
            .iter()
            .filter_map(|v| env_path(v))
            .collect();
        let pick = |var: &str, rel: &[&str]| -> PathBuf {
            if let Some(p) = env_path(var) {
                assert!(
                    p.exists(),
                    "\n\n{var}={} does not exist; {HELP}\n",
                    p.display()
                );
                return p;
            }
            for h in &homes {
                for r in rel {
                    let p = h.join(r);
                    if p.exists() {
                        return p;
                    }
                }
            }
            panic!(
                "\n\nfeatures `cuda` and `candle-cuda` need {var} (or {} under $CUDA_HOME); {HELP}\n",
                rel.join(" or ")
            )
        };
        Toolchain {
            nvrtc: pick("TLI_NVRTC", &["lib64/libnvrtc.so", "bin/nvrtc64_120_0.dll"]),
            include: pick("TLI_CUDA_INCLUDE", &["include"]),
            ptxas: pick("TLI_PTXAS", &["bin/ptxas", "bin/ptxas.exe"]),
        }
    }
}

// The NVRTC C API, the few calls the build needs, loaded at build time.
type Program = *mut c_void;
type FnVersion = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
type FnCreate = unsafe extern "C" fn(
    *mut Program,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type FnCompile = unsafe extern "C" fn(Program, c_int, *const *const c_char) -> c_int;
type FnSize = unsafe extern "C" fn(Program, *mut usize) -> c_int;
type FnGet = unsafe extern "C" fn(Program, *mut c_char) -> c_int;
type FnDestroy = unsafe extern "C" fn(*mut Program) -> c_int;
type FnErr = unsafe extern "C" fn(c_int) -> *const c_char;

struct Nvrtc {
    lib: libloading::Library,
    path: PathBuf,
}

impl Nvrtc {
    fn open(path: &Path) -> Nvrtc {
        // SAFETY: loading libnvrtc runs its initialisers, which have no
        // preconditions.
        let lib = unsafe { libloading::Library::new(path) }.unwrap_or_else(|e| {
            panic!(
                "\n\ncould not load NVRTC from {}: {e}; {HELP}\n",
                path.display()
            )
        });
        Nvrtc {
            lib,
            path: path.to_path_buf(),
        }
    }

    fn sym<T: Copy>(&self, name: &str) -> T {
        // SAFETY: every `T` used here is the C signature NVRTC documents for
        // `name`.
        unsafe { self.lib.get::<T>(name.as_bytes()) }
            .map(|s| *s)
            .unwrap_or_else(|e| panic!("{}: no symbol {name}: {e}", self.path.display()))
    }

    fn version(&self) -> (i32, i32) {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two out-pointers to live locals.
        let rc = unsafe { self.sym::<FnVersion>("nvrtcVersion")(&mut major, &mut minor) };
        assert_eq!(rc, 0, "nvrtcVersion failed ({rc})");
        (major, minor)
    }

    fn check(&self, rc: c_int, what: &str) {
        if rc != 0 {
            // SAFETY: nvrtcGetErrorString returns a static C string.
            let msg = unsafe { CStr::from_ptr(self.sym::<FnErr>("nvrtcGetErrorString")(rc)) };
            panic!("{what}: {}", msg.to_string_lossy());
        }
    }

    /// Compile `src` to PTX with `options`; panics with NVRTC's log.
    fn compile_ptx(&self, src: &Path, options: &[String]) -> String {
        let text =
            fs::read_to_string(src).unwrap_or_else(|e| panic!("read {}: {e}", src.display()));
        let c_text = CString::new(text).expect("kernel source has no NUL byte");
        let c_name = CString::new(src.to_string_lossy().into_owned()).expect("path has no NUL");
        let c_opts: Vec<CString> = options
            .iter()
            .map(|o| CString::new(o.as_str()).expect("option has no NUL"))
            .collect();
        let opt_ptrs: Vec<*const c_char> = c_opts.iter().map(|o| o.as_ptr()).collect();
        let mut prog: Program = std::ptr::null_mut();
        // SAFETY: the strings outlive the calls; `prog` is created before
        // use and destroyed once at the end.
        unsafe {
            self.check(
                self.sym::<FnCreate>("nvrtcCreateProgram")(
                    &mut prog,
                    c_text.as_ptr(),
                    c_name.as_ptr(),
                    0,
                    std::ptr::null(),
                    std::ptr::null(),
                ),
                "nvrtcCreateProgram",
            );
            let rc = self.sym::<FnCompile>("nvrtcCompileProgram")(
                prog,
                opt_ptrs.len() as c_int,
                opt_ptrs.as_ptr(),
            );
            let mut n = 0usize;
            self.sym::<FnSize>("nvrtcGetProgramLogSize")(prog, &mut n);
            let mut log = vec![0u8; n.max(1)];
            self.sym::<FnGet>("nvrtcGetProgramLog")(prog, log.as_mut_ptr().cast());
            let log = String::from_utf8_lossy(&log[..n.saturating_sub(1)]).into_owned();
            if rc != 0 {
                self.sym::<FnDestroy>("nvrtcDestroyProgram")(&mut prog);
                panic!(
                    "\n\nNVRTC ({}) failed to compile {} with {options:?}:\n{log}\n",
                    self.path.display(),
                    src.display()
                );
            }
            let mut n = 0usize;
            self.check(
                self.sym::<FnSize>("nvrtcGetPTXSize")(prog, &mut n),
                "nvrtcGetPTXSize",
            );
            let mut ptx = vec![0u8; n];
            self.check(
                self.sym::<FnGet>("nvrtcGetPTX")(prog, ptx.as_mut_ptr().cast()),
                "nvrtcGetPTX",
            );
            self.sym::<FnDestroy>("nvrtcDestroyProgram")(&mut prog);
            ptx.truncate(ptx.iter().position(|&b| b == 0).unwrap_or(ptx.len()));
            String::from_utf8(ptx).expect("NVRTC writes ASCII PTX")
        }
    }
}

/// `TLI_PTX_ISA_MAX` as (major, minor), default 8.2.
fn ptx_isa_max() -> (u32, u32) {
    println!("cargo:rerun-if-env-changed=TLI_PTX_ISA_MAX");
    match env::var("TLI_PTX_ISA_MAX") {
        Err(_) => DEFAULT_PTX_ISA_MAX,
        Ok(s) => parse_isa(&s)
            .unwrap_or_else(|| panic!("TLI_PTX_ISA_MAX={s:?} is not a PTX ISA version like 8.2")),
    }
}

fn parse_isa(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The `.version` line of a PTX text.
fn ptx_isa(ptx: &str) -> Option<(u32, u32)> {
    ptx.lines()
        .find_map(|l| l.trim().strip_prefix(".version "))
        .and_then(parse_isa)
}

fn ptxas_version(ptxas: &Path) -> String {
    let out = Command::new(ptxas)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("could not run {}: {e}; {HELP}", ptxas.display()));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("release"))
        .map(|l| {
            l.trim()
                .trim_start_matches("Cuda compilation tools, ")
                .to_string()
        })
        .unwrap_or_else(|| panic!("{} --version printed no release line", ptxas.display()))
}

/// The ELF checks a 12.x driver's loader implies: 64-bit ELF, OSABI 0x33,
/// and the SM architecture in the low byte of `e_flags`.
fn check_cubin(bytes: &[u8], arch: u32, path: &Path, ptxas: &str) {
    assert!(
        bytes.len() > 0x34 && bytes[..4] == *b"\x7fELF" && bytes[4] == 2,
        "{}: ptxas ({ptxas}) did not write a 64-bit ELF cubin",
        path.display()
    );
    assert_eq!(
        bytes[7],
        CUBIN_OSABI_CUDA12,
        "{}: cubin ELF OSABI is {:#x}, not {CUBIN_OSABI_CUDA12:#x}: ptxas ({ptxas}) writes the CUDA 13 cubin \
         format, which drivers before CUDA 13 cannot load; {HELP}",
        path.display(),
        bytes[7]
    );
    let flags = u32::from_le_bytes(bytes[0x30..0x34].try_into().unwrap());
    assert_eq!(
        flags & 0xff,
        arch,
        "{}: cubin e_flags {flags:#x} name sm_{}, not sm_{arch}",
        path.display(),
        flags & 0xff
    );
}

/// Compile every kernel, write the images to `out_dir`, and return the
/// generated Rust (`cuda_images.rs`).
pub fn build(kernels_dir: &Path, sources: &[PathBuf], archs: &[u32], out_dir: &Path) -> String {
    let tc = Toolchain::find();
    let nvrtc = Nvrtc::open(&tc.nvrtc);
    let (nv_major, nv_minor) = nvrtc.version();
    let ptxas_version = ptxas_version(&tc.ptxas);
    let isa_max = ptx_isa_max();
    let ptx_arch = *archs.iter().min().expect("at least one architecture");
    let options = vec![
        format!("--gpu-architecture=compute_{ptx_arch}"),
        "-std=c++17".to_string(),
        "-lineinfo".to_string(),
        format!("--include-path={}", kernels_dir.display()),
        format!("--include-path={}", tc.include.display()),
    ];

    // One thread per kernel file: NVRTC programs are independent, and the
    // big file dominates the build.
    let results: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| {
                let (nvrtc, options, tc, ptxas_version) = (&nvrtc, &options, &tc, &ptxas_version);
                s.spawn(move || {
                    let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
                    let ptx = nvrtc.compile_ptx(src, options);
                    let isa = ptx_isa(&ptx).unwrap_or_else(|| {
                        panic!("{}: NVRTC's PTX has no .version line", src.display())
                    });
                    assert!(
                        isa <= isa_max,
                        "\n\n{}: NVRTC {nv_major}.{nv_minor} wrote PTX ISA {}.{}, above TLI_PTX_ISA_MAX {}.{} \
                         (the newest the oldest supported driver can JIT); {HELP}\n",
                        src.display(),
                        isa.0,
                        isa.1,
                        isa_max.0,
                        isa_max.1
                    );
                    let ptx_path = out_dir.join(format!("{stem}.compute_{ptx_arch}.ptx"));
                    fs::write(&ptx_path, &ptx).expect("write PTX");
                    let mut rows = String::new();
                    for &arch in archs {
                        let cubin = out_dir.join(format!("{stem}.sm_{arch}.cubin"));
                        let out = Command::new(&tc.ptxas)
                            .arg(format!("-arch=sm_{arch}"))
                            .arg(&ptx_path)
                            .arg("-o")
                            .arg(&cubin)
                            .output()
                            .unwrap_or_else(|e| panic!("could not run {}: {e}", tc.ptxas.display()));
                        assert!(
                            out.status.success(),
                            "ptxas ({ptxas_version}) failed on {} for sm_{arch} ({}):\n{}",
                            ptx_path.display(),
                            out.status,
                            String::from_utf8_lossy(&out.stderr)
                        );
                        let bytes = fs::read(&cubin).expect("read cubin");
                        check_cubin(&bytes, arch, &cubin, ptxas_version);
                        writeln!(
                            rows,
                            "    CudaImage {{ name: {stem:?}, arch: {arch}, kind: ImageKind::Sass, bytes: include_bytes!({:?}) }},",
                            cubin.display().to_string()
                        )
                        .unwrap();
                    }
                    writeln!(
                        rows,
                        "    CudaImage {{ name: {stem:?}, arch: {ptx_arch}, kind: ImageKind::Ptx, bytes: include_bytes!({:?}) }},",
                        ptx_path.display().to_string()
                    )
                    .unwrap();
                    rows
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });

    let archs_list = archs
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "/// Every embedded image: per kernel file, a cubin (SASS) for each architecture in\n\
         /// [`CUDA_ARCHS`] and the PTX for [`PTX_ARCH`].\n\
         pub const CUDA_IMAGES: &[CudaImage] = &[\n{}];\n\
         /// The architectures SASS was assembled for (`sm_XX`).\n\
         pub const CUDA_ARCHS: &[u32] = &[{archs_list}];\n\
         /// The architecture the embedded PTX targets (the lowest of [`CUDA_ARCHS`]).\n\
         pub const PTX_ARCH: u32 = {ptx_arch};\n\
         /// The newest PTX ISA the build allowed (`TLI_PTX_ISA_MAX`).\n\
         pub const PTX_ISA_MAX: (u32, u32) = ({}, {});\n\
         /// The NVRTC release that compiled the CUDA C++ to PTX.\n\
         pub const NVRTC_VERSION: &str = \"{nv_major}.{nv_minor}\";\n\
         /// The ptxas that assembled the cubins (`release X.Y, VX.Y.Z`).\n\
         pub const PTXAS_VERSION: &str = {ptxas_version:?};\n\
         /// The ELF OSABI byte of the cubins CUDA 12.x drivers load.\n\
         pub const CUBIN_OSABI: u8 = {CUBIN_OSABI_CUDA12:#x};\n",
        results.concat(),
        isa_max.0,
        isa_max.1
    )
}

/// The generated Rust for a build without the `cuda` feature.
pub fn empty() -> String {
    "/// Empty: built without the `cuda` feature.\n\
     pub const CUDA_IMAGES: &[CudaImage] = &[];\n\
     /// Empty: built without the `cuda` feature.\n\
     pub const CUDA_ARCHS: &[u32] = &[];\n\
     /// 0: built without the `cuda` feature.\n\
     pub const PTX_ARCH: u32 = 0;\n\
     /// The default maximum PTX ISA (nothing was compiled).\n\
     pub const PTX_ISA_MAX: (u32, u32) = (8, 2);\n\
     /// Empty: built without the `cuda` feature.\n\
     pub const NVRTC_VERSION: &str = \"\";\n\
     /// Empty: built without the `cuda` feature.\n\
     pub const PTXAS_VERSION: &str = \"\";\n\
     /// The ELF OSABI byte of the cubins CUDA 12.x drivers load.\n\
     pub const CUBIN_OSABI: u8 = 0x33;\n"
        .to_string()
}
