//! The `sim` backend: the kernel sources in `kernels/*.cu`, compiled for the
//! host by `build.rs` against the simulator in `kernels/sim/`, and launched
//! from here.
//!
//! The simulator runs one launch at a time (a process-wide lock in
//! `kernels/sim/runtime.cpp`), the blocks of a grid one after another, and
//! the threads of a block concurrently as OS threads, with real barriers and
//! warp collectives. A misused barrier, a lane that never reaches a warp
//! collective, or a deadlock becomes an [`Error::Sim`] naming the kernel and
//! describing what every thread was doing, never a hang. What it models and
//! what it does not is written down in `kernels/sim/README.md`.
//!
//! Every entry point has one typed launcher that checks every length, size
//! and alignment the kernel relies on before any `unsafe` call. Host slices
//! carry no 16-byte alignment guarantee, so the launchers copy a misaligned
//! buffer into an aligned scratch buffer (and results back) instead of
//! refusing it.

use std::ffi::{CStr, c_char, c_int, c_void};

use crate::cosine::Hidden;
use crate::lora::kernel::{
    AUX_THREADS, Family, ForwardVariant, GEMV_ROWS_PER_BLOCK, GEMV_THREADS, LoraParams,
    TILE_THREADS, WeightKind, entry_name,
};
use crate::lora::{BackwardArgs, BaseWeight, ForwardArgs, Grads, LinearDims};
use crate::nf4::{Nf4View, ScalesView};
use crate::{DType, Element, Error, Result};

/// Threads per block of the NF4 dequantization kernels (their
/// `__launch_bounds__`).
const DEQUANT_BLOCK: u32 = 256;
/// Elements one dequantization thread handles per grid-stride step (the
/// kernel's `kChunk`).
const DEQUANT_CHUNK: usize = 32;
/// The most blocks a simulated dequantization launches. Every simulated
/// block costs a round of OS-thread wake-ups, so a small grid keeps the
/// simulator quick; 16 blocks of 256 threads make the kernel's grid-stride
/// loop run whenever n > 131072.
const DEQUANT_MAX_GRID: usize = 16;
/// The alignment the kernels' 16-byte vector loads and stores need.
const VECTOR_ALIGN: usize = 16;
/// Size of the buffer the simulator writes its error message into.
const ERR_LEN: usize = 4096;
/// The element types the dequantization kernels write.
const SUPPORTED_DTYPES: &str = "f32, bf16, f16";

/// The configuration of one simulated launch: the C struct `TliSimLaunch` of
/// `kernels/sim/sim.h`, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TliSimLaunch {
    /// `gridDim` (x, y, z); every component at least 1.
    pub grid: [u32; 3],
    /// `blockDim` (x, y, z); every component at least 1, at most 1024
    /// threads in all.
    pub block: [u32; 3],
    /// Bytes of dynamic shared memory (at most 227 KiB), poisoned with 0xFF
    /// before every block.
    pub dynamic_smem: usize,
    /// How long a barrier or warp collective may wait without any thread of
    /// the block making progress before the launch fails, in milliseconds;
    /// 0 means `$TLI_SIM_TIMEOUT_MS`, or 10 seconds.
    pub timeout_ms: u32,
}

impl TliSimLaunch {
    /// A one-dimensional launch of `blocks` blocks of `threads` threads, no
    /// dynamic shared memory, default timeout.
    pub fn linear(blocks: u32, threads: u32) -> Self {
        TliSimLaunch {
            grid: [blocks, 1, 1],
            block: [threads, 1, 1],
            dynamic_smem: 0,
            timeout_ms: 0,
        }
    }

    /// The same launch with a deadlock timeout of `ms` milliseconds.
    pub fn with_timeout_ms(self, ms: u32) -> Self {
        TliSimLaunch {
            timeout_ms: ms,
            ..self
        }
    }

    /// The same launch with `bytes` of dynamic shared memory.
    pub fn with_dynamic_smem(self, bytes: usize) -> Self {
        TliSimLaunch {
            dynamic_smem: bytes,
            ..self
        }
    }

    /// Threads per block (`blockDim.x * y * z`).
    pub fn threads_per_block(&self) -> u64 {
        self.block.iter().map(|&d| u64::from(d)).product()
    }

    /// Blocks in the grid (`gridDim.x * y * z`).
    pub fn blocks(&self) -> u64 {
        self.grid.iter().map(|&d| u64::from(d)).product()
    }

    /// Threads in the whole grid, if that fits in a `usize`.
    pub fn total_threads(&self) -> Option<usize> {
        self.threads_per_block()
            .checked_mul(self.blocks())
            .and_then(|t| usize::try_from(t).ok())
    }
}

unsafe extern "C" {
    fn tli_sim_nf4_dequant_f32(
        cfg: *const TliSimLaunch,
        err: *mut c_char,
        errlen: usize,
        packed: *const u8,
        absmax: *const f32,
        out: *mut f32,
        n: i64,
        log2_bs: i32,
    ) -> c_int;
    fn tli_sim_nf4_dequant_bf16(
        cfg: *const TliSimLaunch,
        err: *mut c_char,
        errlen: usize,
        packed: *const u8,
        absmax: *const f32,
        out: *mut u16,
        n: i64,
        log2_bs: i32,
    ) -> c_int;
    fn tli_sim_nf4_dequant_f16(
        cfg: *const TliSimLaunch,
        err: *mut c_char,
        errlen: usize,
        packed: *const u8,
        absmax: *const f32,
        out: *mut u16,
        n: i64,
        log2_bs: i32,
    ) -> c_int;
    fn tli_sim_nf4_dequant_dq_f32(
        cfg: *const TliSimLaunch,
        err: *mut c_char,
        errlen: usize,
        packed: *const u8,
        qabsmax: *const u8,
        absmax2: *const f32,
        code2: *const f32,
        offset: f32,
        log2_nested: i32,
        out: *mut f32,
        n: i64,
        log2_bs: i32,
    ) -> c_int;
    fn tli_sim_nf4_dequant_dq_bf16(
        cfg: *const TliSimLaunch,
        err: *mut c_char,
        errlen: usize,
        packed: *const u8,
        qabsmax: *const u8,
        absmax2: *const f32,
        code2: *const f32,
        offset: f32,
        log2_nested: i32,
        out: *mut u16,
        n: i64,
        log2_bs: i32,
    ) -> c_int;
    fn tli_sim_nf4_dequant_dq_f16(
        cfg: *const TliSimLaunch,
        err: *mut c_char,
        errlen: usize,
        packed: *const u8,
        qabsmax: *const u8,
        absmax2: *const f32,
        code2: *const f32,
        offset: f32,
        log2_nested: i32,
        out: *mut u16,
        n: i64,
        log2_bs: i32,
    ) -> c_int;
}

/// Call one exported `tli_sim_*` function with a fresh error buffer and turn
/// its return code into a `Result`.
///
/// `call` receives the buffer's pointer and length and must pass them on as
/// the `err`/`errlen` arguments.
fn run(kernel: &str, call: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    let mut err = [0u8; ERR_LEN];
    let rc = call(err.as_mut_ptr().cast::<c_char>(), err.len());
    check(kernel, rc, &err)
}

/// Turn a simulator return code and its NUL-terminated message into
/// [`Error::Sim`].
fn check(kernel: &str, rc: c_int, err: &[u8]) -> Result<()> {
    if rc == 0 {
        return Ok(());
    }
    let text = CStr::from_bytes_until_nul(err)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(err).into_owned());
    let message = if text.is_empty() {
        format!("the simulator returned code {rc} without a message")
    } else {
        text
    };
    Err(Error::Sim {
        kernel: kernel.to_string(),
        message,
    })
}

/// 16 bytes at 16-byte alignment: the unit of the aligned scratch buffers.
#[repr(C, align(16))]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Align16([u8; 16]);

/// A zeroed, 16-byte-aligned buffer of at least `bytes` bytes.
fn aligned_scratch(bytes: usize) -> Vec<Align16> {
    vec![Align16([0; 16]); bytes.div_ceil(16)]
}

fn is_aligned<T>(p: *const T) -> bool {
    p.addr().is_multiple_of(VECTOR_ALIGN)
}

/// `log2` of a power of two, as the `int32_t` the kernels take.
fn log2_i32(op: &'static str, what: &str, v: usize) -> Result<i32> {
    if !v.is_power_of_two() {
        return Err(Error::invalid(
            op,
            format!("{what} {v} is not a power of two"),
        ));
    }
    i32::try_from(v.trailing_zeros())
        .map_err(|_| Error::invalid(op, format!("{what} {v} is too large")))
}

/// Run `nf4_dequant` under the simulator: the launcher of the
/// `nf4_dequant_{f32,bf16,f16}` and `nf4_dequant_dq_{f32,bf16,f16}` kernels
/// (`kernels/nf4_dequant.cu`), with the default grid.
///
/// # Errors
/// As [`nf4_dequant_with_grid`].
pub(crate) fn nf4_dequant<T: Element>(src: &Nf4View<'_>, out: &mut [T]) -> Result<()> {
    nf4_dequant_with_grid(src, out, None)
}

/// The dequantization launcher with an optional explicit grid size (the
/// default is one block per 256 chunks of 32 elements, at most
/// [`DEQUANT_MAX_GRID`] blocks).
///
/// # Errors
/// Before anything runs: [`Error::UnsupportedDtype`] when `T`'s size
/// disagrees with its dtype; what [`Nf4View::validate`] reports;
/// [`Error::ShapeMismatch`] when `out` does not hold `src.numel` elements;
/// [`Error::InvalidArgument`] for a grid of 0 blocks or a size the kernel's
/// integer parameters cannot hold. [`Error::Sim`] when the simulated launch
/// fails.
fn nf4_dequant_with_grid<T: Element>(
    src: &Nf4View<'_>,
    out: &mut [T],
    grid: Option<u32>,
) -> Result<()> {
    const OP: &str = "nf4 dequantize (sim)";
    if size_of::<T>() != T::DTYPE.size() {
        return Err(Error::UnsupportedDtype {
            op: OP,
            dtype: format!("{} of {} bytes", T::DTYPE, size_of::<T>()),
            supported: SUPPORTED_DTYPES,
        });
    }
    src.validate(OP)?;
    if out.len() != src.numel {
        return Err(Error::shape(OP, "output", src.numel, out.len()));
    }
    let n = i64::try_from(src.numel).map_err(|_| {
        Error::invalid(
            OP,
            format!("{} elements do not fit the kernel's int64 count", src.numel),
        )
    })?;
    let log2_bs = log2_i32(OP, "block size", src.blocksize)?;
    let blocks = match grid {
        Some(0) => return Err(Error::invalid(OP, "a grid of 0 blocks was requested")),
        Some(g) => g,
        None => {
            let want = src
                .numel
                .div_ceil(DEQUANT_CHUNK)
                .div_ceil(DEQUANT_BLOCK as usize);
            // At most DEQUANT_MAX_GRID (16), so the conversion cannot fail.
            u32::try_from(want.clamp(1, DEQUANT_MAX_GRID)).unwrap_or(1)
        }
    };
    let cfg = TliSimLaunch::linear(blocks, DEQUANT_BLOCK);

    // The kernel reads `packed` with 16-byte loads and writes `out` with
    // 16-byte stores: stage misaligned buffers through aligned scratch.
    let packed_scratch: Vec<Align16>;
    let packed: &[u8] = if is_aligned(src.packed.as_ptr()) {
        src.packed
    } else {
        let mut staged = aligned_scratch(src.packed.len());
        bytemuck::cast_slice_mut::<Align16, u8>(&mut staged)[..src.packed.len()]
            .copy_from_slice(src.packed);
        packed_scratch = staged;
        &bytemuck::cast_slice::<Align16, u8>(&packed_scratch)[..src.packed.len()]
    };
    if is_aligned(out.as_ptr()) {
        launch_dequant(&cfg, src, packed, n, log2_bs, out)
    } else {
        let mut scratch = aligned_scratch(size_of_val(out));
        let staged: &mut [T] = bytemuck::try_cast_slice_mut(&mut scratch).map_err(|e| {
            Error::invalid(OP, format!("cannot stage the output through scratch: {e}"))
        })?;
        let staged = &mut staged[..out.len()];
        launch_dequant(&cfg, src, packed, n, log2_bs, staged)?;
        out.copy_from_slice(staged);
        Ok(())
    }
}

/// Launch the dequantization entry point matching `T` and the scale mode.
/// The caller has validated `src`, checked `out.len() == n`, and made
/// `packed` and `out` 16-byte aligned.
fn launch_dequant<T: Element>(
    cfg: &TliSimLaunch,
    src: &Nf4View<'_>,
    packed: &[u8],
    n: i64,
    log2_bs: i32,
    out: &mut [T],
) -> Result<()> {
    const OP: &str = "nf4 dequantize (sim)";
    debug_assert!(is_aligned(packed.as_ptr()) && is_aligned(out.as_ptr()));
    let out_ptr = out.as_mut_ptr();
    match src.scales {
        ScalesView::Plain(absmax) => {
            let (name, f): (&str, PlainFn) = match T::DTYPE {
                DType::F32 => ("nf4_dequant_f32", PlainFn::F32(tli_sim_nf4_dequant_f32)),
                DType::BF16 => ("nf4_dequant_bf16", PlainFn::U16(tli_sim_nf4_dequant_bf16)),
                DType::F16 => ("nf4_dequant_f16", PlainFn::U16(tli_sim_nf4_dequant_f16)),
            };
            run(name, |err, errlen| match f {
                // SAFETY: `src.validate` checked packed holds ceil(n/2) bytes
                // and absmax one f32 per block; the caller checked out holds
                // n elements of T, whose size matches its dtype (4 bytes for
                // f32, 2 for the u16 views of bf16/f16); packed and out are
                // 16-byte aligned for the kernel's vector accesses; every
                // pointer stays valid for the call, which returns only after
                // the whole grid has finished.
                PlainFn::F32(f) => unsafe {
                    f(
                        cfg,
                        err,
                        errlen,
                        packed.as_ptr(),
                        absmax.as_ptr(),
                        out_ptr.cast::<f32>(),
                        n,
                        log2_bs,
                    )
                },
                // SAFETY: as above.
                PlainFn::U16(f) => unsafe {
                    f(
                        cfg,
                        err,
                        errlen,
                        packed.as_ptr(),
                        absmax.as_ptr(),
                        out_ptr.cast::<u16>(),
                        n,
                        log2_bs,
                    )
                },
            })
        }
        ScalesView::Double {
            qabsmax,
            absmax2,
            code2,
            offset,
            nested_blocksize,
        } => {
            let log2_nested = log2_i32(OP, "nested block size", nested_blocksize)?;
            let (name, f): (&str, DoubleFn) = match T::DTYPE {
                DType::F32 => (
                    "nf4_dequant_dq_f32",
                    DoubleFn::F32(tli_sim_nf4_dequant_dq_f32),
                ),
                DType::BF16 => (
                    "nf4_dequant_dq_bf16",
                    DoubleFn::U16(tli_sim_nf4_dequant_dq_bf16),
                ),
                DType::F16 => (
                    "nf4_dequant_dq_f16",
                    DoubleFn::U16(tli_sim_nf4_dequant_dq_f16),
                ),
            };
            let (q, a2, c2) = (qabsmax.as_ptr(), absmax2.as_ptr(), code2.as_ptr());
            run(name, |err, errlen| match f {
                // SAFETY: `src.validate` checked packed (ceil(n/2) bytes),
                // qabsmax (one code per block), absmax2 (one value per nested
                // block, so every `block >> log2_nested` is in range) and
                // code2 (256 values, so every u8 code indexes it); the caller
                // checked out holds n elements of T with T's size matching its
                // dtype; packed and out are 16-byte aligned; the pointers stay
                // valid for the call, which returns after the grid finished.
                DoubleFn::F32(f) => unsafe {
                    f(
                        cfg,
                        err,
                        errlen,
                        packed.as_ptr(),
                        q,
                        a2,
                        c2,
                        offset,
                        log2_nested,
                        out_ptr.cast::<f32>(),
                        n,
                        log2_bs,
                    )
                },
                // SAFETY: as above.
                DoubleFn::U16(f) => unsafe {
                    f(
                        cfg,
                        err,
                        errlen,
                        packed.as_ptr(),
                        q,
                        a2,
                        c2,
                        offset,
                        log2_nested,
                        out_ptr.cast::<u16>(),
                        n,
                        log2_bs,
                    )
                },
            })
        }
    }
}

type PlainF32 = unsafe extern "C" fn(
    *const TliSimLaunch,
    *mut c_char,
    usize,
    *const u8,
    *const f32,
    *mut f32,
    i64,
    i32,
) -> c_int;
type PlainU16 = unsafe extern "C" fn(
    *const TliSimLaunch,
    *mut c_char,
    usize,
    *const u8,
    *const f32,
    *mut u16,
    i64,
    i32,
) -> c_int;
type DoubleF32 = unsafe extern "C" fn(
    *const TliSimLaunch,
    *mut c_char,
    usize,
    *const u8,
    *const u8,
    *const f32,
    *const f32,
    f32,
    i32,
    *mut f32,
    i64,
    i32,
) -> c_int;
type DoubleU16 = unsafe extern "C" fn(
    *const TliSimLaunch,
    *mut c_char,
    usize,
    *const u8,
    *const u8,
    *const f32,
    *const f32,
    f32,
    i32,
    *mut u16,
    i64,
    i32,
) -> c_int;

/// A plain-scale entry point, by output element width.
#[derive(Clone, Copy)]
enum PlainFn {
    F32(PlainF32),
    U16(PlainU16),
}

/// A double-quant entry point, by output element width.
#[derive(Clone, Copy)]
enum DoubleFn {
    F32(DoubleF32),
    U16(DoubleU16),
}

// ---------------------------------------------------------------------------
// Fused NF4 + LoRA linear (kernels/lora_matmul.cu)
// ---------------------------------------------------------------------------

/// One `lora_matmul` entry point under the simulator: every one takes the
/// kernel's single `TliLoraParams` argument by value.
type LoraFn = unsafe extern "C" fn(*const TliSimLaunch, *mut c_char, usize, LoraParams) -> c_int;

macro_rules! lora_entries {
    ($($name:ident),* $(,)?) => {
        unsafe extern "C" {
            $(fn $name(cfg: *const TliSimLaunch, err: *mut c_char, errlen: usize, p: LoraParams) -> c_int;)*
        }
        /// Every exported `lora_matmul` entry point by its simulator name.
        const LORA_ENTRIES: &[(&str, LoraFn)] = &[$((stringify!($name), $name as LoraFn)),*];
    };
}

lora_entries!(
    tli_sim_lora_fwd_tile_dense_f32,
    tli_sim_lora_fwd_tile_dense_bf16,
    tli_sim_lora_fwd_tile_dense_f16,
    tli_sim_lora_fwd_tile_nf4_f32,
    tli_sim_lora_fwd_tile_nf4_bf16,
    tli_sim_lora_fwd_tile_nf4_f16,
    tli_sim_lora_fwd_tile_nf4dq_f32,
    tli_sim_lora_fwd_tile_nf4dq_bf16,
    tli_sim_lora_fwd_tile_nf4dq_f16,
    tli_sim_lora_fwd_gemv_dense_f32,
    tli_sim_lora_fwd_gemv_dense_bf16,
    tli_sim_lora_fwd_gemv_dense_f16,
    tli_sim_lora_fwd_gemv_nf4_f32,
    tli_sim_lora_fwd_gemv_nf4_bf16,
    tli_sim_lora_fwd_gemv_nf4_f16,
    tli_sim_lora_fwd_gemv_nf4dq_f32,
    tli_sim_lora_fwd_gemv_nf4dq_bf16,
    tli_sim_lora_fwd_gemv_nf4dq_f16,
    tli_sim_lora_bwd_dx_dense_f32,
    tli_sim_lora_bwd_dx_dense_bf16,
    tli_sim_lora_bwd_dx_dense_f16,
    tli_sim_lora_bwd_dx_nf4_f32,
    tli_sim_lora_bwd_dx_nf4_bf16,
    tli_sim_lora_bwd_dx_nf4_f16,
    tli_sim_lora_bwd_dx_nf4dq_f32,
    tli_sim_lora_bwd_dx_nf4dq_bf16,
    tli_sim_lora_bwd_dx_nf4dq_f16,
    tli_sim_lora_proj_f32,
    tli_sim_lora_proj_bf16,
    tli_sim_lora_proj_f16,
    tli_sim_lora_bwd_dadb_f32,
    tli_sim_lora_bwd_dadb_bf16,
    tli_sim_lora_bwd_dadb_f16,
);

/// The most blocks a simulated GEMV launches (its grid-stride loop covers
/// the remaining rows).
const GEMV_MAX_GRID: usize = 16;

/// The address of a host buffer, as the kernels' pointer fields take it.
fn addr<U>(s: &[U]) -> u64 {
    s.as_ptr().expose_provenance() as u64
}

fn addr_mut<U>(s: &mut [U]) -> u64 {
    s.as_mut_ptr().expose_provenance() as u64
}

/// `src` itself when 16-byte aligned, else a copy in `store` that is.
fn stage16<'a, U: bytemuck::Pod>(src: &'a [U], store: &'a mut Vec<Align16>) -> &'a [U] {
    if is_aligned(src.as_ptr()) {
        return src;
    }
    *store = aligned_scratch(size_of_val(src));
    bytemuck::cast_slice_mut::<Align16, U>(store)[..src.len()].copy_from_slice(src);
    &bytemuck::cast_slice::<Align16, U>(store)[..src.len()]
}

fn check_dtype<T: Element>(op: &'static str) -> Result<()> {
    if size_of::<T>() != T::DTYPE.size() {
        return Err(Error::UnsupportedDtype {
            op,
            dtype: format!("{} of {} bytes", T::DTYPE, size_of::<T>()),
            supported: SUPPORTED_DTYPES,
        });
    }
    Ok(())
}

/// Launch `entry` (a name from [`entry_name`]) with `p`.
///
/// The caller guarantees every address in `p` points at a live buffer of the
/// length the kernel indexes for `p`'s sizes (see `kernels/lora_matmul.cu`),
/// 16-byte aligned where the launch contract says so, for the whole call.
fn launch_lora(entry: &'static str, cfg: &TliSimLaunch, p: LoraParams) -> Result<()> {
    let sim_name = format!("tli_sim_{entry}");
    let f = LORA_ENTRIES
        .iter()
        .find(|(n, _)| *n == sim_name)
        .map(|(_, f)| *f)
        .ok_or_else(|| Error::invalid("lora (sim)", format!("no simulator export {sim_name}")))?;
    run(entry, |err, errlen| {
        // SAFETY: `f` is the export of `entry`, whose C signature is
        // (const TliSimLaunch*, char*, size_t, TliLoraParams) with
        // TliLoraParams laid out as LoraParams (#[repr(C)], same size,
        // asserted on both sides). Buffer validity is the caller's contract
        // above; the call returns only after the whole grid has finished.
        unsafe { f(cfg, err, errlen, p) }
    })
}

/// The weight's addresses and scalars into `p`, staging the packed codes /
/// dense values through aligned scratch (`store`) when they are not 16-byte
/// aligned. Returns the weight kind.
fn set_weight<'a, T: Element>(
    op: &'static str,
    p: &mut LoraParams,
    weight: &BaseWeight<'a, T>,
    store: &'a mut Vec<Align16>,
) -> Result<WeightKind> {
    match weight {
        BaseWeight::Dense(w) => {
            p.w_dense = addr(stage16(w, store));
            Ok(WeightKind::Dense)
        }
        BaseWeight::Nf4(v) => {
            p.w_packed = addr(stage16(v.packed, store));
            match v.scales {
                ScalesView::Plain(absmax) => {
                    p.w_absmax = addr(absmax);
                    p.set_nf4(op, v.blocksize, None)
                }
                ScalesView::Double {
                    qabsmax,
                    absmax2,
                    code2,
                    offset,
                    nested_blocksize,
                } => {
                    p.w_qabsmax = addr(qabsmax);
                    p.w_absmax2 = addr(absmax2);
                    p.w_code2 = addr(code2);
                    p.set_nf4(op, v.blocksize, Some((nested_blocksize, offset)))
                }
            }
        }
    }
}

/// The fused forward `y = x·Wᵀ + s·(x̃·Aᵀ)·Bᵀ (+ bias)` under the simulator,
/// with the variant [`ForwardVariant::Auto`] picks (GEMV for `M ≤ 8`, tiles
/// otherwise).
///
/// # Errors
/// As [`lora_forward_variant`].
pub fn lora_forward<T: Element>(args: &ForwardArgs<'_, T>, out: &mut [T]) -> Result<()> {
    lora_forward_variant(args, out, ForwardVariant::Auto)
}

/// The fused forward under the simulator with an explicit kernel variant
/// (any variant runs any `M`).
///
/// # Errors
/// Before anything runs: what [`ForwardArgs::validate`] reports;
/// [`Error::ShapeMismatch`] when `out` does not hold `M·N` values;
/// [`Error::UnsupportedDtype`] when `T`'s size disagrees with its dtype;
/// [`Error::InvalidArgument`] for sizes beyond the kernels' index types or
/// grids. [`Error::Sim`] when a simulated launch fails.
pub fn lora_forward_variant<T: Element>(
    args: &ForwardArgs<'_, T>,
    out: &mut [T],
    variant: ForwardVariant,
) -> Result<()> {
    const OP: &str = "lora forward (sim)";
    check_dtype::<T>(OP)?;
    args.validate(OP)?;
    if out.len() != args.out_len() {
        return Err(Error::shape(
            OP,
            format!("output [M={}, N={}]", args.dims.m, args.dims.n),
            args.out_len(),
            out.len(),
        ));
    }
    let mut p = LoraParams::new(
        OP,
        args.dims,
        args.lora.map(|l| (l.rank, l.scale)),
        args.dropout,
    )?;
    let mut store = Vec::new();
    let kind = set_weight(OP, &mut p, &args.weight, &mut store)?;
    p.x = addr(args.x);
    if let Some(l) = &args.lora {
        p.lora_a = addr(l.a);
        p.lora_b = addr(l.b);
    }
    if let Some(b) = args.bias {
        p.bias = addr(b);
    }
    p.out = addr_mut(out);
    let LinearDims { m, n, .. } = args.dims;
    match variant.resolve(m) {
        ForwardVariant::Gemv => {
            let mut u = Vec::new();
            if let Some(l) = &args.lora {
                // u = s·ks·x̃·Aᵀ, [M, r] f32, consumed by the GEMV epilogue.
                u = vec![0.0f32; m * l.rank];
                let mut q = p;
                q.proj_mode = 0;
                q.proj_scale = p.scale * p.keep_scale;
                q.proj_out = addr_mut(&mut u);
                launch_lora(
                    entry_name(Family::Proj, kind, T::DTYPE),
                    &proj_launch(m)?,
                    q,
                )?;
            }
            p.u = addr(&u);
            let blocks = n.div_ceil(GEMV_ROWS_PER_BLOCK).clamp(1, GEMV_MAX_GRID);
            // At most GEMV_MAX_GRID (16): the conversion cannot fail.
            let cfg = TliSimLaunch::linear(u32::try_from(blocks).unwrap_or(1), GEMV_THREADS);
            launch_lora(entry_name(Family::FwdGemv, kind, T::DTYPE), &cfg, p)
        }
        _ => {
            let cfg = TliSimLaunch {
                grid: p.tile_grid(n),
                block: [TILE_THREADS, 1, 1],
                dynamic_smem: 0,
                timeout_ms: 0,
            };
            launch_lora(entry_name(Family::FwdTile, kind, T::DTYPE), &cfg, p)
        }
    }
}

/// One `lora_proj` block per row of `x` / `dy`.
fn proj_launch(m: usize) -> Result<TliSimLaunch> {
    let blocks = u32::try_from(m).map_err(|_| {
        Error::invalid("lora (sim)", format!("M = {m} exceeds the projection grid"))
    })?;
    Ok(TliSimLaunch::linear(blocks, AUX_THREADS))
}

/// The backward pass under the simulator: `dx` with the fused tile kernel,
/// `dA`/`dB` from the rank projections `u = x̃·Aᵀ`, `g = dy·B` and one
/// `lora_bwd_dadb` launch. Gradients left `None` are not computed.
///
/// # Errors
/// Before anything runs: what [`BackwardArgs::validate`] reports;
/// [`Error::UnsupportedDtype`] and [`Error::InvalidArgument`] as
/// [`lora_forward_variant`]. [`Error::Sim`] when a simulated launch fails.
pub fn lora_backward<T: Element>(args: &BackwardArgs<'_, T>, grads: Grads<'_, T>) -> Result<()> {
    const OP: &str = "lora backward (sim)";
    check_dtype::<T>(OP)?;
    args.validate(OP, &grads)?;
    let fwd = &args.fwd;
    let mut p = LoraParams::new(
        OP,
        fwd.dims,
        fwd.lora.map(|l| (l.rank, l.scale)),
        fwd.dropout,
    )?;
    let mut store = Vec::new();
    let kind = set_weight(OP, &mut p, &fwd.weight, &mut store)?;
    p.x = addr(fwd.x);
    p.dy = addr(args.dy);
    if let Some(l) = &fwd.lora {
        p.lora_a = addr(l.a);
        p.lora_b = addr(l.b);
    }
    let LinearDims { m, k, .. } = fwd.dims;
    let Grads { dx, da, db } = grads;
    if let Some(dx) = dx {
        let mut q = p;
        q.out = addr_mut(dx);
        let cfg = TliSimLaunch {
            grid: p.tile_grid(k),
            block: [TILE_THREADS, 1, 1],
            dynamic_smem: 0,
            timeout_ms: 0,
        };
        launch_lora(entry_name(Family::BwdDx, kind, T::DTYPE), &cfg, q)?;
    }
    let (Some(l), true) = (&fwd.lora, da.is_some() || db.is_some()) else {
        return Ok(());
    };
    let proj = entry_name(Family::Proj, kind, T::DTYPE);
    let mut u = Vec::new();
    let mut g = Vec::new();
    if db.is_some() {
        // u = x̃·Aᵀ = ks · Σ kept x·A.
        u = vec![0.0f32; m * l.rank];
        let mut q = p;
        q.proj_mode = 0;
        q.proj_scale = p.keep_scale;
        q.proj_out = addr_mut(&mut u);
        launch_lora(proj, &proj_launch(m)?, q)?;
    }
    if da.is_some() {
        // g = dy·B.
        g = vec![0.0f32; m * l.rank];
        let mut q = p;
        q.proj_mode = 1;
        q.proj_scale = 1.0;
        q.proj_out = addr_mut(&mut g);
        launch_lora(proj, &proj_launch(m)?, q)?;
    }
    let blocks = p.dadb_blocks(da.is_some(), db.is_some())?;
    p.u = addr(&u);
    p.g = addr(&g);
    p.da = da.map_or(0, |d| addr_mut(d));
    p.db = db.map_or(0, |d| addr_mut(d));
    launch_lora(
        entry_name(Family::Dadb, kind, T::DTYPE),
        &TliSimLaunch::linear(blocks, AUX_THREADS),
        p,
    )
}

/// Launchers of the simulator's self-test kernels (`kernels/sim/selftest.cuh`)
/// for `tests/sim.rs`. Not part of the crate's API.
///
/// Each function checks that every buffer is long enough for the grid it is
/// given (the kernels index by global thread id) before launching.
#[doc(hidden)]
pub mod selftest {
    use std::ffi::{c_char, c_int};

    use super::{TliSimLaunch, run};
    use crate::nf4::Nf4View;
    use crate::{Element, Error, Result};

    unsafe extern "C" {
        fn tli_sim_tli_selftest_index(
            cfg: *const TliSimLaunch,
            err: *mut c_char,
            errlen: usize,
            out: *mut u32,
        ) -> c_int;
        fn tli_sim_tli_selftest_block_sum(
            cfg: *const TliSimLaunch,
            err: *mut c_char,
            errlen: usize,
            input: *const i32,
            n: i32,
            sums: *mut i64,
            votes: *mut i32,
        ) -> c_int;
        fn tli_sim_tli_selftest_shuffle(
            cfg: *const TliSimLaunch,
            err: *mut c_char,
            errlen: usize,
            input: *const u32,
            out: *mut u32,
            src_lane: i32,
            delta: i32,
            lane_mask: i32,
            width: i32,
        ) -> c_int;
        fn tli_sim_tli_selftest_shuffle_wide(
            cfg: *const TliSimLaunch,
            err: *mut c_char,
            errlen: usize,
            in64: *const u64,
            out64: *mut u64,
            inf: *const f32,
            outf: *mut f32,
        ) -> c_int;
        fn tli_sim_tli_selftest_vote(
            cfg: *const TliSimLaunch,
            err: *mut c_char,
            errlen: usize,
            input: *const i32,
            out: *mut u32,
        ) -> c_int;
        fn tli_sim_tli_selftest_syncwarp(
            cfg: *const TliSimLaunch,
            err: *mut c_char,
            errlen: usize,
            input: *const i32,
            out: *mut i32,
        ) -> c_int;
        fn tli_sim_tli_selftest_atomics(
            cfg: *const TliSimLaunch,
            err: *mut c_char,
            errlen: usize,
            vals: *const i32,
            n: i32,
            ints: *mut i32,
            uints: *mut u32,
            u64s: *mut u64,
            f: *mut f32,
            exch_prev: *mut i32,
        ) -> c_int;
        fn tli_sim_tli_selftest_atomic_subnormal(
            cfg: *const TliSimLaunch,
            err: *mut c_char,
            errlen: usize,
            tiny: f32,
            global_acc: *mut f32,
            out: *mut f32,
        ) -> c_int;
        fn tli_sim_tli_selftest_dynamic_smem(
            cfg: *const TliSimLaunch,
            err: *mut c_char,
            errlen: usize,
            input: *const u32,
            out: *mut u32,
            raw: *mut u32,
            align: *mut u32,
            words: i32,
        ) -> c_int;
        fn tli_sim_tli_selftest_convert(
            cfg: *const TliSimLaunch,
            err: *mut c_char,
            errlen: usize,
            x: *const f32,
            bits16: *const u16,
            n: i32,
            bf: *mut u16,
            h: *mut u16,
            bf_back: *mut f32,
            h_back: *mut f32,
            pairs: *mut u32,
        ) -> c_int;
        fn tli_sim_tli_selftest_math(
            cfg: *const TliSimLaunch,
            err: *mut c_char,
            errlen: usize,
            a: *const f32,
            b: *const f32,
            c: *const f32,
            w: *const u32,
            n: i32,
            f: *mut f32,
            u: *mut u32,
        ) -> c_int;
        fn tli_sim_tli_selftest_broken(
            cfg: *const TliSimLaunch,
            err: *mut c_char,
            errlen: usize,
            misbehaviour: i32,
            who: u32,
            out: *mut u32,
        ) -> c_int;
        fn tli_sim_tli_selftest_mma(
            cfg: *const TliSimLaunch,
            err: *mut c_char,
            errlen: usize,
            f16: i32,
            a: *const u16,
            b: *const u16,
            c: *const f32,
            d: *mut f32,
        ) -> c_int;
    }

    const OP: &str = "simulator self-test";

    /// The ways `tli_selftest_broken` can misbehave (see
    /// `kernels/sim/selftest.cuh`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Misbehaviour {
        /// Thread `who` returns instead of reaching `__syncthreads`.
        SkipBarrier = 0,
        /// Thread `who` waits at a different `__syncthreads` call.
        OtherBarrier = 1,
        /// Thread `who` (an even lane) waits in `__syncwarp` for the next
        /// lane, which waits at `__syncthreads`: only the timeout ends it.
        Deadlock = 2,
        /// Thread `who` calls `__trap()`.
        Trap = 3,
        /// Thread `who` calls `__shfl_sync` with a mask without itself.
        MaskWithoutSelf = 4,
        /// Lane `who` of warp 0 calls a different shuffle than its warp.
        MismatchedShuffle = 5,
        /// Nothing wrong: `out[gid] = gid`.
        None = 6,
    }

    fn total(cfg: &TliSimLaunch) -> Result<usize> {
        cfg.total_threads().ok_or_else(|| {
            Error::invalid(
                OP,
                format!(
                    "grid {:?} x block {:?} overflows usize",
                    cfg.grid, cfg.block
                ),
            )
        })
    }

    fn need(what: &str, len: usize, want: Option<usize>) -> Result<()> {
        let want = want.ok_or_else(|| {
            Error::invalid(OP, format!("{what}: required length overflows usize"))
        })?;
        if len < want {
            return Err(Error::shape(
                OP,
                what.to_string(),
                format!("at least {want} elements"),
                len,
            ));
        }
        Ok(())
    }

    fn as_i32(what: &str, v: usize) -> Result<i32> {
        i32::try_from(v)
            .map_err(|_| Error::invalid(OP, format!("{what} = {v} does not fit an int")))
    }

    fn one_dimensional(cfg: &TliSimLaunch) -> Result<()> {
        if cfg.grid[1] != 1 || cfg.grid[2] != 1 || cfg.block[1] != 1 || cfg.block[2] != 1 {
            return Err(Error::invalid(
                OP,
                format!(
                    "this kernel needs a 1-D launch, got grid {:?} block {:?}",
                    cfg.grid, cfg.block
                ),
            ));
        }
        Ok(())
    }

    /// `tli_selftest_index`: `out[gid * 10 + k]` = threadIdx.xyz,
    /// blockIdx.xyz, threads per block, blocks, lane, warpSize.
    ///
    /// # Errors
    /// A too-short `out`; [`Error::Sim`] from the launch.
    pub fn index(cfg: &TliSimLaunch, out: &mut [u32]) -> Result<()> {
        need("out", out.len(), total(cfg)?.checked_mul(10))?;
        run("tli_selftest_index", |e, l| {
            // SAFETY: out holds 10 u32 per thread of the grid (checked above)
            // and is only written; the call returns after the grid finished.
            unsafe { tli_sim_tli_selftest_index(cfg, e, l, out.as_mut_ptr()) }
        })
    }

    /// `tli_selftest_block_sum`: per block the sum of its slice of `input`
    /// (zero past the end) into `sums[b]`, and `__syncthreads_count/and/or`
    /// of `value != 0` into `votes[3b..3b+3]`. 1-D launches, at most 1024
    /// threads per block.
    ///
    /// # Errors
    /// A 2-D/3-D launch, too-short outputs, an input longer than `i32::MAX`;
    /// [`Error::Sim`] from the launch.
    pub fn block_sum(
        cfg: &TliSimLaunch,
        input: &[i32],
        sums: &mut [i64],
        votes: &mut [i32],
    ) -> Result<()> {
        one_dimensional(cfg)?;
        let blocks = cfg.grid[0] as usize;
        need("sums", sums.len(), Some(blocks))?;
        need("votes", votes.len(), blocks.checked_mul(3))?;
        let n = as_i32("input length", input.len())?;
        run("tli_selftest_block_sum", |e, l| {
            // SAFETY: the kernel reads input[i] only for i < n = input.len(),
            // writes sums[b] and votes[3b..3b+3] for b < gridDim.x (checked
            // above), and indexes its 1024-entry shared buffer by threadIdx.x,
            // which the simulator keeps below blockDim.x <= 1024.
            unsafe {
                tli_sim_tli_selftest_block_sum(
                    cfg,
                    e,
                    l,
                    input.as_ptr(),
                    n,
                    sums.as_mut_ptr(),
                    votes.as_mut_ptr(),
                )
            }
        })
    }

    /// `tli_selftest_shuffle`: the six shuffle results per thread (see the
    /// kernel's comment) into `out[gid * 6..]`.
    ///
    /// # Errors
    /// Too-short buffers; [`Error::Sim`] from the launch (e.g. a width that
    /// is not a power of two).
    pub fn shuffle(
        cfg: &TliSimLaunch,
        input: &[u32],
        out: &mut [u32],
        src_lane: i32,
        delta: i32,
        lane_mask: i32,
        width: i32,
    ) -> Result<()> {
        let t = total(cfg)?;
        need("input", input.len(), Some(t))?;
        need("out", out.len(), t.checked_mul(6))?;
        run("tli_selftest_shuffle", |e, l| {
            // SAFETY: each thread reads input[gid] and writes out[gid*6..gid*6+6]
            // with gid < total threads; both lengths were checked above.
            unsafe {
                tli_sim_tli_selftest_shuffle(
                    cfg,
                    e,
                    l,
                    input.as_ptr(),
                    out.as_mut_ptr(),
                    src_lane,
                    delta,
                    lane_mask,
                    width,
                )
            }
        })
    }

    /// `tli_selftest_shuffle_wide`: `out64[gid] = in64[gid ^ 1]` and
    /// `outf[gid]` = `inf` of the next lane (own value in lane 31).
    ///
    /// # Errors
    /// Too-short buffers; [`Error::Sim`] from the launch.
    pub fn shuffle_wide(
        cfg: &TliSimLaunch,
        in64: &[u64],
        out64: &mut [u64],
        inf: &[f32],
        outf: &mut [f32],
    ) -> Result<()> {
        let t = total(cfg)?;
        need("in64", in64.len(), Some(t))?;
        need("out64", out64.len(), Some(t))?;
        need("inf", inf.len(), Some(t))?;
        need("outf", outf.len(), Some(t))?;
        run("tli_selftest_shuffle_wide", |e, l| {
            // SAFETY: every buffer holds one element per thread of the grid
            // (checked above); each thread touches only index gid.
            unsafe {
                tli_sim_tli_selftest_shuffle_wide(
                    cfg,
                    e,
                    l,
                    in64.as_ptr(),
                    out64.as_mut_ptr(),
                    inf.as_ptr(),
                    outf.as_mut_ptr(),
                )
            }
        })
    }

    /// `tli_selftest_vote`: ballot, any, all and the warp reductions of each
    /// thread's input into `out[gid * 7..]`.
    ///
    /// # Errors
    /// Too-short buffers; [`Error::Sim`] from the launch.
    pub fn vote(cfg: &TliSimLaunch, input: &[i32], out: &mut [u32]) -> Result<()> {
        let t = total(cfg)?;
        need("input", input.len(), Some(t))?;
        need("out", out.len(), t.checked_mul(7))?;
        run("tli_selftest_vote", |e, l| {
            // SAFETY: each thread reads input[gid] and writes out[gid*7..gid*7+7],
            // in bounds by the checks above.
            unsafe { tli_sim_tli_selftest_vote(cfg, e, l, input.as_ptr(), out.as_mut_ptr()) }
        })
    }

    /// `tli_selftest_syncwarp`: neighbour exchange through shared memory
    /// ordered only by `__syncwarp`. Blocks of a multiple of 32 threads.
    ///
    /// # Errors
    /// A block that is not whole warps, too-short buffers; [`Error::Sim`].
    pub fn syncwarp(cfg: &TliSimLaunch, input: &[i32], out: &mut [i32]) -> Result<()> {
        if !cfg.threads_per_block().is_multiple_of(32) {
            return Err(Error::invalid(
                OP,
                format!("syncwarp needs whole warps, got block {:?}", cfg.block),
            ));
        }
        let t = total(cfg)?;
        need("input", input.len(), Some(t))?;
        need("out", out.len(), t.checked_mul(2))?;
        run("tli_selftest_syncwarp", |e, l| {
            // SAFETY: each thread reads input[gid] and writes out[2gid..2gid+2],
            // in bounds by the checks above; shared-memory indices are below
            // the thread count, at most 1024 (the simulator rejects more).
            unsafe { tli_sim_tli_selftest_syncwarp(cfg, e, l, input.as_ptr(), out.as_mut_ptr()) }
        })
    }

    /// The counters `tli_selftest_atomics` updates.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct AtomicCounters {
        /// sum, max, min, CAS-loop count, exchange slot.
        pub ints: [i32; 5],
        /// sum, max, min, or, and, xor.
        pub uints: [u32; 6],
        /// 64-bit sum.
        pub u64s: [u64; 1],
        /// f32 sum.
        pub f: [f32; 1],
    }

    /// `tli_selftest_atomics`: threads `gid < vals.len()` update `counters`
    /// and record the value their `atomicExch` returned in `exch_prev[gid]`.
    ///
    /// # Errors
    /// Too-short `exch_prev`, more than `i32::MAX` values; [`Error::Sim`].
    pub fn atomics(
        cfg: &TliSimLaunch,
        vals: &[i32],
        counters: &mut AtomicCounters,
        exch_prev: &mut [i32],
    ) -> Result<()> {
        let n = as_i32("vals length", vals.len())?;
        need("exch_prev", exch_prev.len(), Some(vals.len()))?;
        run("tli_selftest_atomics", |e, l| {
            // SAFETY: threads with gid >= n return at once; the others read
            // vals[gid] and write exch_prev[gid] (both hold n elements) and
            // update fixed indices of the counter arrays, whose sizes match
            // the kernel's (5, 6, 1, 1).
            unsafe {
                tli_sim_tli_selftest_atomics(
                    cfg,
                    e,
                    l,
                    vals.as_ptr(),
                    n,
                    counters.ints.as_mut_ptr(),
                    counters.uints.as_mut_ptr(),
                    counters.u64s.as_mut_ptr(),
                    counters.f.as_mut_ptr(),
                    exch_prev.as_mut_ptr(),
                )
            }
        })
    }

    /// `tli_selftest_atomic_subnormal`: `*global_acc += tiny` through
    /// atomicAdd on global memory, and `out = [shared 0 + tiny, tiny]` through
    /// atomicAdd on dynamic shared memory. Needs at least 4 bytes of dynamic
    /// shared memory.
    ///
    /// # Errors
    /// Too little dynamic shared memory; [`Error::Sim`].
    pub fn atomic_subnormal(
        cfg: &TliSimLaunch,
        tiny: f32,
        global_acc: &mut f32,
        out: &mut [f32; 2],
    ) -> Result<()> {
        if cfg.dynamic_smem < 4 {
            return Err(Error::invalid(
                OP,
                "atomic_subnormal needs at least 4 bytes of dynamic shared memory",
            ));
        }
        run("tli_selftest_atomic_subnormal", |e, l| {
            // SAFETY: only thread 0 of each block touches global_acc (one f32)
            // and out (two f32); shared memory index 0 is within the >= 4
            // bytes checked above.
            unsafe {
                tli_sim_tli_selftest_atomic_subnormal(cfg, e, l, tiny, global_acc, out.as_mut_ptr())
            }
        })
    }

    /// `tli_selftest_dynamic_smem`: per block, the first `words` words of
    /// dynamic shared memory as found (`raw[b * words..]`), its address
    /// modulo 16 (`align[b]`), and the block's input mirrored through shared
    /// memory (`out`). 1-D launches with
    /// `dynamic_smem >= 4 * max(words, blockDim.x)`.
    ///
    /// # Errors
    /// A 2-D/3-D launch, too little shared memory, too-short buffers;
    /// [`Error::Sim`].
    pub fn dynamic_smem(
        cfg: &TliSimLaunch,
        input: &[u32],
        out: &mut [u32],
        raw: &mut [u32],
        align: &mut [u32],
        words: usize,
    ) -> Result<()> {
        one_dimensional(cfg)?;
        let t = total(cfg)?;
        let blocks = cfg.grid[0] as usize;
        let words_i = as_i32("words", words)?;
        let needed = words.max(cfg.block[0] as usize).checked_mul(4);
        if needed.is_none_or(|b| cfg.dynamic_smem < b) {
            return Err(Error::invalid(
                OP,
                format!(
                    "dynamic_smem test needs 4 * max({words}, {}) bytes of dynamic shared memory, got {}",
                    cfg.block[0], cfg.dynamic_smem
                ),
            ));
        }
        need("input", input.len(), Some(t))?;
        need("out", out.len(), Some(t))?;
        need("raw", raw.len(), blocks.checked_mul(words))?;
        need("align", align.len(), Some(blocks))?;
        run("tli_selftest_dynamic_smem", |e, l| {
            // SAFETY: shared-memory indices stay below max(words, blockDim.x)
            // words, within the dynamic shared memory checked above; input and
            // out are indexed by gid < total threads; raw by b * words + k with
            // k < words; align by b < gridDim.x. All lengths checked above.
            unsafe {
                tli_sim_tli_selftest_dynamic_smem(
                    cfg,
                    e,
                    l,
                    input.as_ptr(),
                    out.as_mut_ptr(),
                    raw.as_mut_ptr(),
                    align.as_mut_ptr(),
                    words_i,
                )
            }
        })
    }

    /// The outputs of [`convert`], one element per input.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Conversions {
        /// `__float2bfloat16_rn(x)` bits.
        pub bf16: Vec<u16>,
        /// `__float2half_rn(x)` bits.
        pub f16: Vec<u16>,
        /// `__bfloat162float` of `bits16` as bf16.
        pub bf16_to_f32: Vec<f32>,
        /// `__half2float` of `bits16` as f16.
        pub f16_to_f32: Vec<f32>,
        /// The 32-bit word of `__floats2bfloat162_rn(x, -x)`.
        pub bf16_pairs: Vec<u32>,
    }

    /// `tli_selftest_convert` over `x` and `bits16` (equal lengths), one
    /// element per thread; the grid must have at least that many threads.
    ///
    /// # Errors
    /// Unequal lengths, too few threads, more than `i32::MAX` elements;
    /// [`Error::Sim`].
    pub fn convert(cfg: &TliSimLaunch, x: &[f32], bits16: &[u16]) -> Result<Conversions> {
        if x.len() != bits16.len() {
            return Err(Error::shape(OP, "bits16", x.len(), bits16.len()));
        }
        let n = as_i32("element count", x.len())?;
        if total(cfg)? < x.len() {
            return Err(Error::invalid(
                OP,
                format!(
                    "convert needs one thread per element: {} elements, {:?} threads",
                    x.len(),
                    cfg.total_threads()
                ),
            ));
        }
        let len = x.len();
        let mut c = Conversions {
            bf16: vec![0; len],
            f16: vec![0; len],
            bf16_to_f32: vec![0.0; len],
            f16_to_f32: vec![0.0; len],
            bf16_pairs: vec![0; len],
        };
        run("tli_selftest_convert", |e, l| {
            // SAFETY: threads with gid >= n return at once; the others read
            // x[gid], bits16[gid] and write index gid of five outputs, all of
            // length n.
            unsafe {
                tli_sim_tli_selftest_convert(
                    cfg,
                    e,
                    l,
                    x.as_ptr(),
                    bits16.as_ptr(),
                    n,
                    c.bf16.as_mut_ptr(),
                    c.f16.as_mut_ptr(),
                    c.bf16_to_f32.as_mut_ptr(),
                    c.f16_to_f32.as_mut_ptr(),
                    c.bf16_pairs.as_mut_ptr(),
                )
            }
        })?;
        Ok(c)
    }

    /// `tli_selftest_math` over equal-length `a`, `b`, `c`, `w`: returns
    /// `(f, u)` with 4 results per element (see the kernel's comment). The
    /// grid must have at least one thread per element.
    ///
    /// # Errors
    /// Unequal lengths, too few threads; [`Error::Sim`].
    pub fn math(
        cfg: &TliSimLaunch,
        a: &[f32],
        b: &[f32],
        c: &[f32],
        w: &[u32],
    ) -> Result<(Vec<f32>, Vec<u32>)> {
        let len = a.len();
        if b.len() != len || c.len() != len || w.len() != len {
            return Err(Error::invalid(
                OP,
                format!(
                    "math inputs differ in length: {len}, {}, {}, {}",
                    b.len(),
                    c.len(),
                    w.len()
                ),
            ));
        }
        let n = as_i32("element count", len)?;
        if total(cfg)? < len {
            return Err(Error::invalid(
                OP,
                format!("math needs one thread per element: {len} elements"),
            ));
        }
        let mut f = vec![0.0f32; len * 4];
        let mut u = vec![0u32; len * 4];
        run("tli_selftest_math", |e, l| {
            // SAFETY: threads with gid >= n return at once; the others read
            // index gid of the four inputs (length n) and write 4 results at
            // 4 * gid of f and u (length 4n).
            unsafe {
                tli_sim_tli_selftest_math(
                    cfg,
                    e,
                    l,
                    a.as_ptr(),
                    b.as_ptr(),
                    c.as_ptr(),
                    w.as_ptr(),
                    n,
                    f.as_mut_ptr(),
                    u.as_mut_ptr(),
                )
            }
        })?;
        Ok((f, u))
    }

    /// `tli_selftest_broken`: misbehave as told; every thread that gets to
    /// the end writes `out[gid] = gid`.
    ///
    /// # Errors
    /// A too-short `out`; [`Error::Sim`] from the launch, which is the point.
    pub fn broken(cfg: &TliSimLaunch, how: Misbehaviour, who: u32, out: &mut [u32]) -> Result<()> {
        need("out", out.len(), Some(total(cfg)?))?;
        run("tli_selftest_broken", |e, l| {
            // SAFETY: each thread writes only out[gid] with gid < total
            // threads, which out holds (checked above).
            unsafe { tli_sim_tli_selftest_broken(cfg, e, l, how as i32, who, out.as_mut_ptr()) }
        })
    }

    /// `tli_selftest_mma`: every warp of the launch computes `D = C + A·B`
    /// for the 16×16 `a` (row-major 16-bit patterns, bf16 or `f16`), the
    /// 16×8 `b` (`[k][n]`) and the 16×8 f32 `c`, building its fragments
    /// element by element from the PTX ISA layout formulas; warp `w` writes
    /// `d[128 w..128 w + 128]` (row-major 16×8).
    ///
    /// # Errors
    /// Wrong operand lengths, a `d` shorter than 128 per warp (a partial warp
    /// counts); [`Error::Sim`] from the launch (a partial warp fails there).
    pub fn mma(
        cfg: &TliSimLaunch,
        f16: bool,
        a: &[u16; 256],
        b: &[u16; 128],
        c: &[f32; 128],
        d: &mut [f32],
    ) -> Result<()> {
        let warps = total(cfg)?.div_ceil(32);
        need("d", d.len(), warps.checked_mul(128))?;
        run("tli_selftest_mma", |e, l| {
            // SAFETY: every thread reads a[0..256], b[0..128], c[0..128]
            // (fixed-size arrays) and writes d[128 w..128 w + 128] for its
            // warp w < warps, within the length checked above.
            unsafe {
                tli_sim_tli_selftest_mma(
                    cfg,
                    e,
                    l,
                    i32::from(f16),
                    a.as_ptr(),
                    b.as_ptr(),
                    c.as_ptr(),
                    d.as_mut_ptr(),
                )
            }
        })
    }

    /// NF4 dequantization under the simulator with an explicit grid of
    /// `blocks` blocks (0 is an error), staging misaligned buffers as the
    /// normal launcher does.
    ///
    /// # Errors
    /// As the `sim` device of `ops::nf4_dequant::dequantize_into`.
    pub fn nf4_dequant_with_grid<T: Element>(
        src: &Nf4View<'_>,
        out: &mut [T],
        blocks: u32,
    ) -> Result<()> {
        super::nf4_dequant_with_grid(src, out, Some(blocks))
    }
}

// ---------------------------------------------------------------------------
// Cosine kernels (`kernels/cosine.cu`)
// ---------------------------------------------------------------------------

/// Threads per block of the cosine kernels (their `kThreads`).
const COSINE_BLOCK: u32 = 256;
/// The most blocks a simulated pool / pair launch uses: small grids keep the
/// simulator quick, and rows beyond it exercise the kernels' grid-stride
/// loops.
const COSINE_MAX_GRID: usize = 8;
/// Output tile of `cosine_matrix` (its `kTileM` × `kTileN`).
const COSINE_TILE: usize = 64;

/// `cosine_pool_*(h, stride_b, stride_t, mask, rows, seq, dim, eps,
/// normalize, out, row_scale)`.
type CosinePoolFn = unsafe extern "C" fn(
    *const TliSimLaunch,
    *mut c_char,
    usize,
    *const c_void,
    i64,
    i64,
    *const u8,
    i32,
    i32,
    i32,
    f32,
    i32,
    *mut f32,
    *mut f32,
) -> c_int;
/// `cosine_pairs_*(ha, sab, sat, mask_a, seq_a, hb, sbb, sbt, mask_b, seq_b,
/// pairs, dim, eps, cos, pooled_a, pooled_b)`.
type CosinePairsFn = unsafe extern "C" fn(
    *const TliSimLaunch,
    *mut c_char,
    usize,
    *const c_void,
    i64,
    i64,
    *const u8,
    i32,
    *const c_void,
    i64,
    i64,
    *const u8,
    i32,
    i32,
    i32,
    f32,
    *mut f32,
    *mut f32,
    *mut f32,
) -> c_int;
/// `cosine_matrix_*(a, lda, scale_a, n, b, ldb, scale_b, m, dim, out)`.
type CosineMatrixFn = unsafe extern "C" fn(
    *const TliSimLaunch,
    *mut c_char,
    usize,
    *const c_void,
    i64,
    *const f32,
    i32,
    *const c_void,
    i64,
    *const f32,
    i32,
    i32,
    *mut f32,
) -> c_int;

/// Declare the simulator exports of the cosine kernels for one dtype suffix,
/// with the parameter lists of the three function types above.
macro_rules! cosine_sim_externs {
    ($pool:ident, $pairs:ident, $matrix:ident) => {
        unsafe extern "C" {
            fn $pool(
                cfg: *const TliSimLaunch,
                err: *mut c_char,
                errlen: usize,
                h: *const c_void,
                stride_b: i64,
                stride_t: i64,
                mask: *const u8,
                rows: i32,
                seq: i32,
                dim: i32,
                eps: f32,
                normalize: i32,
                out: *mut f32,
                row_scale: *mut f32,
            ) -> c_int;
            fn $pairs(
                cfg: *const TliSimLaunch,
                err: *mut c_char,
                errlen: usize,
                ha: *const c_void,
                sab: i64,
                sat: i64,
                mask_a: *const u8,
                seq_a: i32,
                hb: *const c_void,
                sbb: i64,
                sbt: i64,
                mask_b: *const u8,
                seq_b: i32,
                pairs: i32,
                dim: i32,
                eps: f32,
                cos: *mut f32,
                pooled_a: *mut f32,
                pooled_b: *mut f32,
            ) -> c_int;
            fn $matrix(
                cfg: *const TliSimLaunch,
                err: *mut c_char,
                errlen: usize,
                a: *const c_void,
                lda: i64,
                scale_a: *const f32,
                n: i32,
                b: *const c_void,
                ldb: i64,
                scale_b: *const f32,
                m: i32,
                dim: i32,
                out: *mut f32,
            ) -> c_int;
        }
    };
}
cosine_sim_externs!(
    tli_sim_cosine_pool_f32,
    tli_sim_cosine_pairs_f32,
    tli_sim_cosine_matrix_f32
);
cosine_sim_externs!(
    tli_sim_cosine_pool_bf16,
    tli_sim_cosine_pairs_bf16,
    tli_sim_cosine_matrix_bf16
);
cosine_sim_externs!(
    tli_sim_cosine_pool_f16,
    tli_sim_cosine_pairs_f16,
    tli_sim_cosine_matrix_f16
);

/// The pool, pairs and matrix entry points of one dtype, with their names.
type CosineFns = (
    (&'static str, CosinePoolFn),
    (&'static str, CosinePairsFn),
    (&'static str, CosineMatrixFn),
);

/// The three cosine entry points for `T`, with their names.
fn cosine_fns<T: Element>() -> Result<CosineFns> {
    crate::cosine::check_element::<T>("cosine (sim)")?;
    Ok(match T::DTYPE {
        DType::F32 => (
            ("cosine_pool_f32", tli_sim_cosine_pool_f32 as CosinePoolFn),
            (
                "cosine_pairs_f32",
                tli_sim_cosine_pairs_f32 as CosinePairsFn,
            ),
            (
                "cosine_matrix_f32",
                tli_sim_cosine_matrix_f32 as CosineMatrixFn,
            ),
        ),
        DType::BF16 => (
            ("cosine_pool_bf16", tli_sim_cosine_pool_bf16 as CosinePoolFn),
            (
                "cosine_pairs_bf16",
                tli_sim_cosine_pairs_bf16 as CosinePairsFn,
            ),
            (
                "cosine_matrix_bf16",
                tli_sim_cosine_matrix_bf16 as CosineMatrixFn,
            ),
        ),
        DType::F16 => (
            ("cosine_pool_f16", tli_sim_cosine_pool_f16 as CosinePoolFn),
            (
                "cosine_pairs_f16",
                tli_sim_cosine_pairs_f16 as CosinePairsFn,
            ),
            (
                "cosine_matrix_f16",
                tli_sim_cosine_matrix_f16 as CosineMatrixFn,
            ),
        ),
    })
}

/// A view's sizes as the kernels' integer parameters:
/// `(stride_b, stride_t, rows, seq, dim)`. `validate` has bounded them all.
fn cosine_dims<T>(op: &'static str, h: &Hidden<'_, T>) -> Result<(i64, i64, i32, i32, i32)> {
    let big = |what: &str, v: usize| {
        Error::invalid(op, format!("{what} {v} exceeds the kernel's integer range"))
    };
    Ok((
        i64::try_from(h.stride_b).map_err(|_| big("stride_b", h.stride_b))?,
        i64::try_from(h.stride_t).map_err(|_| big("stride_t", h.stride_t))?,
        i32::try_from(h.batch).map_err(|_| big("batch", h.batch))?,
        i32::try_from(h.seq).map_err(|_| big("seq", h.seq))?,
        i32::try_from(h.dim).map_err(|_| big("dim", h.dim))?,
    ))
}

fn cosine_grid(rows: usize) -> TliSimLaunch {
    // At most COSINE_MAX_GRID (8), so the conversion cannot fail.
    let blocks = u32::try_from(rows.clamp(1, COSINE_MAX_GRID)).unwrap_or(1);
    TliSimLaunch::linear(blocks, COSINE_BLOCK)
}

/// Run `cosine_pool_*` under the simulator: masked mean pooling of every
/// row of `h` into `out` (`[batch, dim]`, when given), normalised when
/// `normalize`, and each row's `(scale, 1/max(‖p·scale‖, eps·scale))` into
/// `row_scale` (`[batch, 2]`, when given).
///
/// # Errors
/// Before anything runs: what [`Hidden::validate`] reports; a mask or output
/// of the wrong length ([`Error::ShapeMismatch`]); a bad `eps`, or neither
/// output given ([`Error::InvalidArgument`]). [`Error::Sim`] when the launch
/// fails.
pub(crate) fn cosine_pool<T: Element>(
    h: &Hidden<'_, T>,
    mask: Option<&[u8]>,
    eps: f32,
    normalize: bool,
    out: Option<&mut [f32]>,
    row_scale: Option<&mut [f32]>,
) -> Result<()> {
    const OP: &str = "cosine pool (sim)";
    let ((name, f), _, _) = cosine_fns::<T>()?;
    h.validate(OP, "hidden states")?;
    crate::cosine::check_mask(OP, "hidden-state", h, mask)?;
    crate::cosine::check_eps(OP, eps)?;
    if out.is_none() && row_scale.is_none() {
        return Err(Error::invalid(
            OP,
            "neither pooled output nor row scales requested",
        ));
    }
    if let Some(o) = &out
        && o.len() != h.batch * h.dim
    {
        return Err(Error::shape(OP, "pooled output", h.batch * h.dim, o.len()));
    }
    if let Some(r) = &row_scale
        && r.len() != 2 * h.batch
    {
        return Err(Error::shape(OP, "row scales", 2 * h.batch, r.len()));
    }
    let (sb, st, rows, seq, dim) = cosine_dims(OP, h)?;
    let cfg = cosine_grid(h.batch);
    let mask_ptr = mask.map_or(std::ptr::null(), <[u8]>::as_ptr);
    let out_ptr = out.map_or(std::ptr::null_mut(), <[f32]>::as_mut_ptr);
    let rs_ptr = row_scale.map_or(std::ptr::null_mut(), <[f32]>::as_mut_ptr);
    run(name, |err, errlen| {
        // SAFETY: `validate` checked that every element (b, t, d) the kernel
        // reads, b·stride_b + t·stride_t + d < batch·.. bound, lies inside
        // h.data; the mask (if any) holds batch·seq bytes, out (if any)
        // batch·dim f32 and row_scale (if any) 2·batch f32, checked above;
        // the kernel only uses 16-byte loads after checking the alignment of
        // each row's address and strides itself. T's size matches its dtype
        // (cosine_fns). The call returns after the whole grid finished, while
        // every borrow is still alive.
        unsafe {
            f(
                &cfg,
                err,
                errlen,
                h.data.as_ptr().cast::<c_void>(),
                sb,
                st,
                mask_ptr,
                rows,
                seq,
                dim,
                eps,
                i32::from(normalize),
                out_ptr,
                rs_ptr,
            )
        }
    })
}

/// Run `cosine_pairs_*` under the simulator: `cos[i]` for pair `i` of the
/// masked mean pools of `a` and `b`, and the pooled vectors into `pooled`
/// when given.
///
/// # Errors
/// Before anything runs: what [`Hidden::validate`] reports for either side;
/// unequal batch or dim, wrong mask or output lengths
/// ([`Error::ShapeMismatch`]); a bad `eps`. [`Error::Sim`] when the launch
/// fails.
pub(crate) fn cosine_pairs<T: Element>(
    a: &Hidden<'_, T>,
    mask_a: Option<&[u8]>,
    b: &Hidden<'_, T>,
    mask_b: Option<&[u8]>,
    eps: f32,
    cos: &mut [f32],
    pooled: Option<(&mut [f32], &mut [f32])>,
) -> Result<()> {
    const OP: &str = "cosine pairs (sim)";
    let (_, (name, f), _) = cosine_fns::<T>()?;
    crate::cosine::check_pair_args(OP, a, mask_a, b, mask_b, eps)?;
    if cos.len() != a.batch {
        return Err(Error::shape(OP, "cosine output", a.batch, cos.len()));
    }
    let (sab, sat, pairs, seq_a, dim) = cosine_dims(OP, a)?;
    let (sbb, sbt, _, seq_b, _) = cosine_dims(OP, b)?;
    let (pa, pb) = match pooled {
        Some((pa, pb)) => {
            for (what, p) in [("pooled a", &pa), ("pooled b", &pb)] {
                if p.len() != a.batch * a.dim {
                    return Err(Error::shape(OP, what, a.batch * a.dim, p.len()));
                }
            }
            (pa.as_mut_ptr(), pb.as_mut_ptr())
        }
        None => (std::ptr::null_mut(), std::ptr::null_mut()),
    };
    let cfg = cosine_grid(a.batch);
    run(name, |err, errlen| {
        // SAFETY: `check_pair_args` validated both views (every element the
        // kernel reads lies inside its data), equal batch and dim, and the
        // masks (batch·seq bytes each, if any); cos holds batch f32 and the
        // pooled outputs (if any) batch·dim f32 each, checked above. 16-byte
        // loads happen only where the kernel has checked alignment itself;
        // T's size matches its dtype; the call returns after the grid ran.
        unsafe {
            f(
                &cfg,
                err,
                errlen,
                a.data.as_ptr().cast::<c_void>(),
                sab,
                sat,
                mask_a.map_or(std::ptr::null(), <[u8]>::as_ptr),
                seq_a,
                b.data.as_ptr().cast::<c_void>(),
                sbb,
                sbt,
                mask_b.map_or(std::ptr::null(), <[u8]>::as_ptr),
                seq_b,
                pairs,
                dim,
                eps,
                cos.as_mut_ptr(),
                pa,
                pb,
            )
        }
    })
}

/// Run the cosine matrix under the simulator: `cosine_pool_*` for each
/// side's row scales, then `cosine_matrix_*` into `out` (`[n, m]`).
///
/// # Errors
/// Before anything runs: what [`Hidden::validate`] reports; a view that is
/// not a matrix (`seq != 1`), unequal widths, an output of the wrong length,
/// more rows than the grid can tile; a bad `eps`. [`Error::Sim`] when a
/// launch fails.
pub(crate) fn cosine_matrix<T: Element>(
    a: &Hidden<'_, T>,
    b: &Hidden<'_, T>,
    eps: f32,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "cosine matrix (sim)";
    let (_, _, (name, f)) = cosine_fns::<T>()?;
    crate::cosine::check_matrix_args(OP, a, b, eps)?;
    if out.len() != a.batch * b.batch {
        return Err(Error::shape(OP, "output", a.batch * b.batch, out.len()));
    }
    let grid_x = u32::try_from(b.batch.div_ceil(COSINE_TILE))
        .map_err(|_| Error::invalid(OP, format!("{} rows of b exceed the grid", b.batch)))?;
    let grid_y = u32::try_from(a.batch.div_ceil(COSINE_TILE))
        .ok()
        .filter(|&y| y <= 65535)
        .ok_or_else(|| {
            Error::invalid(
                OP,
                format!("{} rows of a exceed gridDim.y 65535 tiles of 64", a.batch),
            )
        })?;
    let mut scale_a = vec![0.0f32; 2 * a.batch];
    let mut scale_b = vec![0.0f32; 2 * b.batch];
    cosine_pool(a, None, eps, false, None, Some(&mut scale_a))?;
    cosine_pool(b, None, eps, false, None, Some(&mut scale_b))?;
    let (lda, _, n, _, dim) = cosine_dims(OP, a)?;
    let (ldb, _, m, _, _) = cosine_dims(OP, b)?;
    let cfg = TliSimLaunch {
        grid: [grid_x, grid_y, 1],
        block: [COSINE_BLOCK, 1, 1],
        dynamic_smem: 0,
        timeout_ms: 0,
    };
    run(name, |err, errlen| {
        // SAFETY: both views are validated matrices (seq 1: every element
        // row·ld + k with row < rows, k < dim lies inside the data); the
        // scales hold 2 f32 per row; out holds n·m f32 and the kernel writes
        // only (row, col) with row < n, col < m. The grid tiles n and m in
        // 64s as the kernel expects. The call returns after the grid ran.
        unsafe {
            f(
                &cfg,
                err,
                errlen,
                a.data.as_ptr().cast::<c_void>(),
                lda,
                scale_a.as_ptr(),
                n,
                b.data.as_ptr().cast::<c_void>(),
                ldb,
                scale_b.as_ptr(),
                m,
                dim,
                out.as_mut_ptr(),
            )
        }
    })
}
