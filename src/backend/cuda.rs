//! The `cuda` backend: the images that `build.rs` embeds, run on a GPU through
//! the CUDA driver API ([`cudarc`], with the driver library loaded at run
//! time).
//!
//! [`Cuda`] is one device: its primary context, one stream, and the kernel
//! modules, each loaded the first time one of its kernels runs: the cubin
//! `build.rs` assembled for the device's architecture, or else the embedded
//! PTX, which the driver JIT-compiles ([`Cuda::image`] says which). [`Cuda::global`] is device 0,
//! probed once per process.
//!
//! A machine without the driver library, or without a device, gets
//! [`Error::NoCudaDevice`] saying which, never a panic: the driver library is
//! looked for before any driver call is made, because cudarc panics when a
//! call needs a library it cannot load.
//!
//! Every kernel entry point has exactly one typed launcher here. It checks
//! every length, size and alignment the kernel relies on, then pushes the
//! arguments in the order of the `extern "C"` signature. Launchers queue work
//! on the stream and return; a fault inside a kernel surfaces as an
//! [`Error::Driver`] from the next call that waits for the stream
//! ([`Cuda::synchronize`], [`Cuda::to_host`]).

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, DevicePtr, DevicePtrMut, DriverError,
    LaunchConfig, PushKernelArg, sys,
};
use cudarc::nvrtc::Ptx;
use half::{bf16, f16};

pub use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use crate::kernels::{self, CudaImage, ImageKind};
use crate::lora::kernel::{
    AUX_THREADS, Family, ForwardVariant, GEMV_ROWS_PER_BLOCK, GEMV_THREADS, LoraParams,
    TILE_THREADS, WeightKind, entry_name,
};
use crate::lora::{BackwardArgs, BaseWeight, Dropout, ForwardArgs, Grads, LinearDims, LoraFactors};
use crate::nf4::{self, Nf4View, ScalesView};
use crate::{DType, Element, Error, Result};

/// Threads per block of every nf4_dequant and cosine launch (the kernels'
/// `__launch_bounds__`).
const BLOCK_THREADS: u32 = kernels::BLOCK_THREADS;
/// Elements one dequantization thread handles per grid-stride step (the
/// kernel's `kChunk`: one 16-byte load of packed codes).
const DEQUANT_CHUNK: usize = 32;
/// The alignment the kernels' 16-byte vector loads and stores need.
const VECTOR_ALIGN: u64 = 16;

/// The supported element types, for error messages.
const SUPPORTED_DTYPES: &str = "f32, bf16, f16";

/// Whether the CUDA driver library can be loaded on this machine.
///
/// This is the first thing [`Cuda::new`] checks; it makes no driver call.
/// With feature `cuda` the library is opened at run time, so this tries to
/// open it; with `candle-cuda` it was linked at build time and the program
/// could not have started without it, so this is `true`.
pub fn driver_library_present() -> bool {
    #[cfg(feature = "cuda")]
    {
        // SAFETY: `is_culib_present` only tries to open the driver library
        // under its usual names and closes it again. Opening it runs the
        // vendor library's initialisers, which ask nothing of the caller.
        unsafe { sys::is_culib_present() }
    }
    #[cfg(not(feature = "cuda"))]
    {
        true
    }
}

/// One CUDA device: context, stream and lazily loaded kernel modules.
///
/// Shareable between threads; every method binds the context to the calling
/// thread before it touches the driver.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    ordinal: usize,
    name: String,
    /// Compute capability (major, minor).
    cc: (u32, u32),
    sm_count: u32,
    max_threads_per_sm: u32,
    /// `cuDriverGetVersion`: 1000 × major + 10 × minor.
    driver_version: i32,
    /// Loaded modules by kernel source name (`kernels/NAME.cu`).
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Loaded entry points by (module, entry name).
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
}

impl fmt::Debug for Cuda {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cuda")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .field("compute_capability", &self.cc)
            .field("sm_count", &self.sm_count)
            .field("driver_version", &self.driver_version)
            .finish_non_exhaustive()
    }
}

impl Cuda {
    /// Device 0, opened on first use and shared for the life of the process.
    ///
    /// The first call probes the driver; later calls return the same device,
    /// or the same error again.
    ///
    /// # Errors
    /// As [`Cuda::new`]: [`Error::NoCudaDevice`] when the driver library is
    /// missing, reports no device, or the device is older than every embedded
    /// image's architecture; [`Error::Driver`] when a driver call fails.
    pub fn global() -> Result<&'static Cuda> {
        static GLOBAL: OnceLock<Result<Cuda>> = OnceLock::new();
        match GLOBAL.get_or_init(|| Cuda::new(0)) {
            Ok(cuda) => Ok(cuda),
            Err(e) => Err(replay(e)),
        }
    }

    /// Open device `ordinal`: retain its primary context and create a stream.
    ///
    /// # Errors
    /// [`Error::NoCudaDevice`] when the driver library cannot be loaded, the
    /// driver reports no device or fewer than `ordinal + 1`, the library lacks
    /// a function cudarc needs, or the device's compute capability is below
    /// every architecture this build embeds an image for; [`Error::Driver`] naming
    /// the call when a driver call fails.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        if !driver_library_present() {
            return Err(Error::NoCudaDevice {
                reason: "the CUDA driver library (libcuda.so / nvcuda.dll) was not found by the dynamic \
                         loader; install the NVIDIA driver, or add the directory that holds it to \
                         LD_LIBRARY_PATH"
                    .into(),
            });
        }
        // cudarc resolves each driver function on first use and panics if the
        // library lacks it (an old driver). Turn that into an error here, at
        // the one place every session starts, instead of crashing the caller.
        match catch_unwind(AssertUnwindSafe(|| Self::open(ordinal))) {
            Ok(result) => result,
            Err(payload) => Err(Error::NoCudaDevice {
                reason: format!(
                    "the CUDA driver library was found but cannot be used: {}",
                    panic_message(payload.as_ref())
                ),
            }),
        }
    }

    fn open(ordinal: usize) -> Result<Cuda> {
        let count = match CudaContext::device_count() {
            Ok(n) => usize::try_from(n).unwrap_or(0),
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE => 0,
            Err(e) => return Err(driver_error("cuInit / cuDeviceGetCount", e)),
        };
        if count == 0 {
            return Err(Error::NoCudaDevice {
                reason: "the CUDA driver is installed but reports 0 devices (check CUDA_VISIBLE_DEVICES and \
                         that the GPU is visible to this process)"
                    .into(),
            });
        }
        if ordinal >= count {
            return Err(Error::NoCudaDevice {
                reason: format!(
                    "device {ordinal} was requested but the driver reports {count} device(s)"
                ),
            });
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| driver_error(format!("cuDevicePrimaryCtxRetain (device {ordinal})"), e))?;
        let name = ctx.name().map_err(|e| driver_error("cuDeviceGetName", e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| driver_error("cuDeviceGetAttribute (compute capability)", e))?;
        let cc = (non_negative(major), non_negative(minor));
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver_error("cuDeviceGetAttribute (multiprocessor count)", e))?;
        let max_threads_per_sm = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR)
            .map_err(|e| {
                driver_error("cuDeviceGetAttribute (max threads per multiprocessor)", e)
            })?;
        let mut driver_version = 0;
        // SAFETY: cuDriverGetVersion writes one int through the pointer, which
        // points at a live local.
        unsafe { sys::cuDriverGetVersion(&mut driver_version) }
            .result()
            .map_err(|e| driver_error("cuDriverGetVersion", e))?;

        let arch = cc.0 * 10 + cc.1;
        if !kernels::CUDA_IMAGES.iter().any(|m| m.arch <= arch) {
            return Err(Error::NoCudaDevice {
                reason: format!(
                    "device {ordinal} ({name}) has compute capability {}.{}, below every architecture this \
                     build embeds an image for ({}); rebuild with TLI_CUDA_ARCHS={arch}",
                    cc.0,
                    cc.1,
                    arch_list()
                ),
            });
        }
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_error("cuStreamCreate", e))?;
        Ok(Cuda {
            ctx,
            stream,
            ordinal,
            name,
            cc,
            sm_count: non_negative(sm_count).max(1),
            max_threads_per_sm: non_negative(max_threads_per_sm).max(BLOCK_THREADS),
            driver_version,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's name, e.g. `NVIDIA H100 80GB HBM3`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compute capability `(major, minor)`.
    pub fn compute_capability(&self) -> (u32, u32) {
        self.cc
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// The CUDA version the driver supports, `(major, minor)`.
    pub fn driver_version(&self) -> (i32, i32) {
        (self.driver_version / 1000, self.driver_version % 1000 / 10)
    }

    /// The cudarc context, for interoperating with other cudarc code.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every launcher queues work on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Wait until all work queued on [`stream`](Self::stream) has finished.
    ///
    /// # Errors
    /// [`Error::Driver`] when the driver reports an error, including one
    /// raised by a kernel that ran since the last wait.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_error("cuStreamSynchronize", e))
    }

    /// Copy `host` into a new device buffer (queued on the stream).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty slice; [`Error::Driver`] when
    /// allocation or the copy fails.
    pub fn to_device<U: DeviceRepr>(&self, host: &[U]) -> Result<CudaSlice<U>> {
        if host.is_empty() {
            return Err(Error::invalid("copy to device", "the host buffer is empty"));
        }
        self.stream.clone_htod(host).map_err(|e| {
            driver_error(
                format!("cuMemAlloc + cuMemcpyHtoD ({} bytes)", size_of_val(host)),
                e,
            )
        })
    }

    /// A new device buffer of `len` zeros.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for `len == 0`; [`Error::Driver`] when the
    /// allocation fails (e.g. out of memory).
    pub fn alloc_zeros<U: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<U>> {
        if len == 0 {
            return Err(Error::invalid("device allocation", "0 elements requested"));
        }
        self.stream.alloc_zeros(len).map_err(|e| {
            driver_error(
                format!("cuMemAlloc ({len} elements of {} bytes)", size_of::<U>()),
                e,
            )
        })
    }

    /// Copy a device buffer back to the host, waiting for the stream first.
    ///
    /// # Errors
    /// [`Error::Driver`] when the copy fails or queued work failed.
    pub fn to_host<U: DeviceRepr>(&self, dev: &CudaSlice<U>) -> Result<Vec<U>> {
        let v = self
            .stream
            .clone_dtoh(dev)
            .map_err(|e| driver_error(format!("cuMemcpyDtoH ({} bytes)", dev.num_bytes()), e))?;
        self.synchronize()?;
        Ok(v)
    }

    /// Upload an NF4 tensor (packed codes and scales) to the device.
    ///
    /// # Errors
    /// What [`Nf4View::validate`] reports (checked before any copy);
    /// [`Error::Driver`] when allocation or a copy fails.
    pub fn upload_nf4(&self, src: &Nf4View<'_>) -> Result<Nf4Device> {
        const OP: &str = "nf4 upload (cuda)";
        src.validate(OP)?;
        let packed = self.to_device(src.packed)?;
        let scales = match src.scales {
            ScalesView::Plain(absmax) => DeviceScales::Plain(self.to_device(absmax)?),
            ScalesView::Double {
                qabsmax,
                absmax2,
                code2,
                offset,
                nested_blocksize,
            } => DeviceScales::Double {
                qabsmax: self.to_device(qabsmax)?,
                absmax2: self.to_device(absmax2)?,
                code2: self.to_device(code2)?,
                offset,
                nested_blocksize,
            },
        };
        Nf4Device::from_parts(packed, scales, src.blocksize, src.numel)
    }

    /// Dequantize `src` into `out` on the device: the launcher of the
    /// `nf4_dequant_{f32,bf16,f16}` and `nf4_dequant_dq_{f32,bf16,f16}`
    /// kernels (`kernels/nf4_dequant.cu`).
    ///
    /// Queues the kernel and returns; call [`synchronize`](Self::synchronize)
    /// or [`to_host`](Self::to_host) to wait for it. The output is bit for bit
    /// what [`crate::nf4::dequant::dequantize_into`] computes.
    ///
    /// # Errors
    /// Before anything runs: [`Error::ShapeMismatch`] when `out` does not hold
    /// exactly `src.numel()` elements; [`Error::Misaligned`] when the packed
    /// codes or `out` are not 16-byte aligned; [`Error::InvalidArgument`]
    /// when a buffer belongs to another device; [`Error::UnsupportedDtype`]
    /// when `T`'s size disagrees with its dtype. [`Error::NoCudaDevice`] when
    /// no embedded PTX suits the device, and [`Error::Driver`] when loading
    /// the module or the launch fails.
    pub fn nf4_dequant<T: Element + DeviceRepr>(
        &self,
        src: &Nf4Device,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        const OP: &str = "nf4 dequantize (cuda)";
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
        self.check_same_device(OP, "output", out)?;
        self.check_same_device(OP, "packed codes", &src.packed)?;
        match &src.scales {
            DeviceScales::Plain(absmax) => self.check_same_device(OP, "absmax", absmax)?,
            DeviceScales::Double {
                qabsmax,
                absmax2,
                code2,
                ..
            } => {
                self.check_same_device(OP, "quantized absmax", qabsmax)?;
                self.check_same_device(OP, "nested absmax", absmax2)?;
                self.check_same_device(OP, "nested quant map", code2)?;
            }
        }
        self.check_aligned(OP, "packed codes", &src.packed)?;
        self.check_aligned(OP, "output", out)?;

        // Validated above: numel fits in i64, blocksize is a power of two in
        // [32, 4096] and the nested block size a power of two, so the log2
        // values are exact and small.
        let n = i64::try_from(src.numel).map_err(|_| too_many(OP, src.numel))?;
        let log2_bs = log2(src.blocksize);
        let entry = match (&src.scales, T::DTYPE) {
            (DeviceScales::Plain(_), DType::F32) => "nf4_dequant_f32",
            (DeviceScales::Plain(_), DType::BF16) => "nf4_dequant_bf16",
            (DeviceScales::Plain(_), DType::F16) => "nf4_dequant_f16",
            (DeviceScales::Double { .. }, DType::F32) => "nf4_dequant_dq_f32",
            (DeviceScales::Double { .. }, DType::BF16) => "nf4_dequant_dq_bf16",
            (DeviceScales::Double { .. }, DType::F16) => "nf4_dequant_dq_f16",
        };
        let func = self.function("nf4_dequant", entry)?;
        let cfg = self.grid_stride_config(src.numel.div_ceil(DEQUANT_CHUNK));

        let log2_nested = match &src.scales {
            DeviceScales::Plain(_) => 0,
            DeviceScales::Double {
                nested_blocksize, ..
            } => log2(*nested_blocksize),
        };
        let mut launch = self.stream.launch_builder(&func);
        match &src.scales {
            // (const uint8_t* packed, const float* absmax, T* out, int64_t n,
            //  int32_t log2_bs)
            DeviceScales::Plain(absmax) => {
                launch
                    .arg(&src.packed)
                    .arg(absmax)
                    .arg(&mut *out)
                    .arg(&n)
                    .arg(&log2_bs);
            }
            // (const uint8_t* packed, const uint8_t* qabsmax,
            //  const float* absmax2, const float* code2, float offset,
            //  int32_t log2_nested, T* out, int64_t n, int32_t log2_bs)
            DeviceScales::Double {
                qabsmax,
                absmax2,
                code2,
                offset,
                ..
            } => {
                launch
                    .arg(&src.packed)
                    .arg(qabsmax)
                    .arg(absmax2)
                    .arg(code2)
                    .arg(offset)
                    .arg(&log2_nested)
                    .arg(&mut *out)
                    .arg(&n)
                    .arg(&log2_bs);
            }
        }
        // SAFETY: the arguments match the entry point's `extern "C"`
        // signature in number, order and type (device pointers for the
        // buffers, i64 for n, i32 for the log2 sizes, f32 for offset). Every
        // buffer lives in this context and has the length the kernel indexes:
        // packed has ceil(n/2) bytes, absmax / qabsmax one entry per
        // blocksize elements, absmax2 one per nested block, code2 256, out n
        // (all checked above by `validate` and the length check). The
        // kernel's 16-byte accesses touch only whole 32-element chunks inside
        // those lengths, and packed and out are 16-byte aligned (checked
        // above). blockDim is the kernel's 256, and its grid-stride loop
        // accepts any grid size. cudarc's stream events keep the slices
        // alive until the kernel is done with them.
        unsafe { launch.launch(cfg) }
            .map_err(|e| driver_error(format!("cuLaunchKernel ({entry})"), e))?;
        Ok(())
    }

    /// Host-to-host dequantization through the device: upload, run, download,
    /// wait. `src` and `out` have been checked by the caller; they are
    /// checked again here because this is the boundary to unsafe code.
    pub(crate) fn nf4_dequant_host<T: Element>(
        &self,
        src: &Nf4View<'_>,
        out: &mut [T],
    ) -> Result<()> {
        const OP: &str = "nf4 dequantize (cuda)";
        src.validate(OP)?;
        if out.len() != src.numel {
            return Err(Error::shape(OP, "output", src.numel, out.len()));
        }
        match T::DTYPE {
            DType::F32 => self.dequant_round_trip::<f32>(src, cast_out(OP, out)?),
            DType::BF16 => self.dequant_round_trip::<bf16>(src, cast_out(OP, out)?),
            DType::F16 => self.dequant_round_trip::<f16>(src, cast_out(OP, out)?),
        }
    }

    fn dequant_round_trip<U: Element + DeviceRepr + ValidAsZeroBits>(
        &self,
        src: &Nf4View<'_>,
        out: &mut [U],
    ) -> Result<()> {
        let dev = self.upload_nf4(src)?;
        let mut dev_out = self.alloc_zeros::<U>(src.numel)?;
        self.nf4_dequant(&dev, &mut dev_out)?;
        self.stream.memcpy_dtoh(&dev_out, out).map_err(|e| {
            driver_error(format!("cuMemcpyDtoH ({} bytes)", dev_out.num_bytes()), e)
        })?;
        self.synchronize()
    }

    /// A launch of 256-thread blocks for a grid-stride kernel with
    /// `work_items` thread-sized items: enough blocks for every item, capped
    /// at the blocks the device holds resident at once (the stride loop
    /// covers the rest without the cost of retiring and relaunching blocks).
    fn grid_stride_config(&self, work_items: usize) -> LaunchConfig {
        let needed = work_items.div_ceil(BLOCK_THREADS as usize).max(1);
        let blocks_per_sm = (self.max_threads_per_sm / BLOCK_THREADS).max(1);
        let resident = u64::from(self.sm_count) * u64::from(blocks_per_sm);
        let grid = u64::try_from(needed).unwrap_or(u64::MAX).min(resident);
        LaunchConfig {
            grid_dim: (u32::try_from(grid).unwrap_or(u32::MAX).max(1), 1, 1),
            block_dim: (BLOCK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn check_same_device<U>(&self, op: &'static str, what: &str, buf: &CudaSlice<U>) -> Result<()> {
        if **buf.context() == *self.ctx {
            Ok(())
        } else {
            Err(Error::invalid(
                op,
                format!(
                    "{what} was allocated on device {} but this launch runs on device {} ({})",
                    buf.context().ordinal(),
                    self.ordinal,
                    self.name
                ),
            ))
        }
    }

    fn check_aligned<U>(&self, op: &'static str, what: &str, buf: &CudaSlice<U>) -> Result<()> {
        let (ptr, _event) = buf.device_ptr(&self.stream);
        if ptr % VECTOR_ALIGN == 0 {
            Ok(())
        } else {
            Err(Error::Misaligned {
                op,
                what: what.to_string(),
                addr: usize::try_from(ptr).unwrap_or(usize::MAX),
                align: VECTOR_ALIGN as usize,
            })
        }
    }

    /// The entry point `entry` of kernel module `module`, loading the module
    /// on first use.
    fn function(&self, module: &'static str, entry: &'static str) -> Result<CudaFunction> {
        if let Some(f) = lock(&self.functions).get(&(module, entry)) {
            return Ok(f.clone());
        }
        let m = self.module(module)?;
        let f = m
            .load_function(entry)
            .map_err(|e| driver_error(format!("cuModuleGetFunction ({module}::{entry})"), e))?;
        lock(&self.functions).insert((module, entry), f.clone());
        Ok(f)
    }

    /// The embedded image of kernel file `name` (`kernels/NAME.cu`) this
    /// device loads: SASS for its architecture when the build has it, else
    /// PTX for the driver to JIT (see [`kernels::image_for`]).
    pub fn image(&self, name: &str) -> Option<&'static CudaImage> {
        kernels::image_for(name, self.cc.0, self.cc.1)
    }

    fn module(&self, name: &'static str) -> Result<Arc<CudaModule>> {
        // Held across the load so two threads never JIT the same module.
        let mut modules = lock(&self.modules);
        if let Some(m) = modules.get(name) {
            return Ok(m.clone());
        }
        let (major, minor) = self.cc;
        let image = self.image(name).ok_or_else(|| Error::NoCudaDevice {
            reason: format!(
                "no embedded image of kernel {name:?} runs on device {} ({}, compute capability {major}.{minor}); \
                 this build has it for {}",
                self.ordinal,
                self.name,
                archs_of(name)
            ),
        })?;
        let loadable = match image.kind {
            ImageKind::Sass => Ptx::from_binary(image.bytes.to_vec()),
            ImageKind::Ptx => match image.ptx() {
                Some(text) if !text.contains('\0') => Ptx::from_src(text),
                _ => {
                    return Err(Error::Driver {
                        call: format!("cuModuleLoadData ({name}, {})", image.describe()),
                        message: "the embedded PTX is not NUL-free UTF-8 text".into(),
                    });
                }
            },
        };
        let m = self
            .ctx
            .load_module(loadable)
            .map_err(|e| self.module_load_error(image, e))?;
        modules.insert(name, m.clone());
        Ok(m)
    }

    fn module_load_error(&self, image: &CudaImage, e: DriverError) -> Error {
        let call = format!("cuModuleLoadData ({}, {})", image.name, image.describe());
        let mut message = describe(e);
        use sys::CUresult as R;
        let refused = matches!(
            (image.kind, e.0),
            (ImageKind::Ptx, R::CUDA_ERROR_UNSUPPORTED_PTX_VERSION)
                | (
                    ImageKind::Sass,
                    R::CUDA_ERROR_INVALID_IMAGE
                        | R::CUDA_ERROR_NO_BINARY_FOR_GPU
                        | R::CUDA_ERROR_INVALID_SOURCE
                        | R::CUDA_ERROR_UNSUPPORTED_PTX_VERSION
                )
        );
        if refused {
            message.push_str("; ");
            message.push_str(&kernels::load_failure_hint(image, self.driver_version()));
        }
        Error::Driver { call, message }
    }
}

/// Block scales of an NF4 tensor on the device.
#[derive(Debug)]
pub enum DeviceScales {
    /// One f32 absmax per block.
    Plain(CudaSlice<f32>),
    /// Double-quantized absmax (see [`crate::nf4::DoubleQuant`]).
    Double {
        /// 8-bit codes, one per block.
        qabsmax: CudaSlice<u8>,
        /// Nested f32 absmax, one per `nested_blocksize` blocks.
        absmax2: CudaSlice<f32>,
        /// The 256-entry code map.
        code2: CudaSlice<f32>,
        /// Added after the nested dequantization.
        offset: f32,
        /// Blocks per nested block (a power of two).
        nested_blocksize: usize,
    },
}

/// An NF4 tensor resident on a device, ready for [`Cuda::nf4_dequant`].
///
/// Made by [`Cuda::upload_nf4`], or from buffers already on the device by
/// [`Nf4Device::from_parts`]; either way its sizes have been checked.
#[derive(Debug)]
pub struct Nf4Device {
    packed: CudaSlice<u8>,
    scales: DeviceScales,
    blocksize: usize,
    numel: usize,
}

impl Nf4Device {
    /// Assemble a device tensor from device buffers in bitsandbytes layout.
    ///
    /// # Errors
    /// [`Error::InvalidBlockSize`], [`Error::ShapeMismatch`] or
    /// [`Error::InvalidArgument`] naming the buffer and both sizes, as
    /// [`Nf4View::validate`] does for host tensors.
    pub fn from_parts(
        packed: CudaSlice<u8>,
        scales: DeviceScales,
        blocksize: usize,
        numel: usize,
    ) -> Result<Self> {
        let t = Nf4Device {
            packed,
            scales,
            blocksize,
            numel,
        };
        t.validate("nf4 device tensor")?;
        Ok(t)
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// Elements per scale block.
    pub fn blocksize(&self) -> usize {
        self.blocksize
    }

    /// Whether the scales are double-quantized.
    pub fn is_double_quant(&self) -> bool {
        matches!(self.scales, DeviceScales::Double { .. })
    }

    /// The packed 4-bit codes, `ceil(numel / 2)` bytes.
    pub fn packed(&self) -> &CudaSlice<u8> {
        &self.packed
    }

    /// The block scales.
    pub fn scales(&self) -> &DeviceScales {
        &self.scales
    }

    /// Every size against the others (the same rules as
    /// [`Nf4View::validate`]), plus what the kernel's integer types need.
    fn validate(&self, op: &'static str) -> Result<()> {
        let lengths = nf4::Nf4Lengths {
            numel: self.numel,
            blocksize: self.blocksize,
            packed: self.packed.len(),
            scales: match &self.scales {
                DeviceScales::Plain(absmax) => nf4::ScaleLengths::Plain {
                    absmax: absmax.len(),
                },
                DeviceScales::Double {
                    qabsmax,
                    absmax2,
                    code2,
                    nested_blocksize,
                    ..
                } => nf4::ScaleLengths::Double {
                    qabsmax: qabsmax.len(),
                    absmax2: absmax2.len(),
                    code2: code2.len(),
                    nested_blocksize: *nested_blocksize,
                },
            },
        };
        lengths.validate(op)?;
        if i64::try_from(self.numel).is_err() {
            return Err(too_many(op, self.numel));
        }
        Ok(())
    }
}

/// `log2` of a power of two as the kernels' `int32_t` (at most 63, so the
/// conversion is exact).
fn log2(pow2: usize) -> i32 {
    pow2.trailing_zeros() as i32
}

fn too_many(op: &'static str, numel: usize) -> Error {
    Error::invalid(
        op,
        format!("{numel} elements exceed the kernel's int64 count"),
    )
}

fn non_negative(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

/// Reinterpret the caller's output as the concrete element type of its
/// dtype (the same type, so this only fails for a foreign `Element` impl
/// whose size disagrees with its dtype).
fn cast_out<'a, T: Element, U: Element>(op: &'static str, out: &'a mut [T]) -> Result<&'a mut [U]> {
    bytemuck::try_cast_slice_mut(out).map_err(|e| Error::UnsupportedDtype {
        op,
        dtype: format!("{} of {} bytes ({e})", T::DTYPE, size_of::<T>()),
        supported: SUPPORTED_DTYPES,
    })
}

fn lock<K, V>(m: &Mutex<HashMap<K, V>>) -> MutexGuard<'_, HashMap<K, V>> {
    // The maps only ever gain complete entries, so one left behind by a
    // panicking thread is still consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `CUDA_ERROR_X (the driver's sentence)`.
fn describe(e: DriverError) -> String {
    let name = e
        .error_name()
        .ok()
        .and_then(|s| s.to_str().ok().map(str::to_owned))
        .unwrap_or_else(|| format!("{:?}", e.0));
    match e.error_string().ok().and_then(|s| s.to_str().ok()) {
        Some(text) => format!("{name} ({text})"),
        None => name,
    }
}

fn driver_error(call: impl Into<String>, e: DriverError) -> Error {
    Error::Driver {
        call: call.into(),
        message: describe(e),
    }
}

/// The stored probe error, once more (`Error` is not `Clone`: it can hold an
/// `io::Error`, which the probe never produces).
fn replay(e: &Error) -> Error {
    match e {
        Error::NoCudaDevice { reason } => Error::NoCudaDevice {
            reason: reason.clone(),
        },
        Error::Driver { call, message } => Error::Driver {
            call: call.clone(),
            message: message.clone(),
        },
        other => Error::NoCudaDevice {
            reason: other.to_string(),
        },
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

fn arch_list() -> String {
    let v: Vec<String> = kernels::CUDA_ARCHS
        .iter()
        .map(|a| format!("sm_{a}"))
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn archs_of(name: &str) -> String {
    let v: Vec<String> = kernels::CUDA_IMAGES
        .iter()
        .filter(|m| m.name == name)
        .map(|m| m.describe())
        .collect();
    if v.is_empty() {
        "no architecture".into()
    } else {
        v.join(", ")
    }
}

// ---------------------------------------------------------------------------
// Fused NF4 + LoRA linear (kernels/lora_matmul.cu)
// ---------------------------------------------------------------------------

/// The frozen base weight `W` `[N, K]` on the device.
#[derive(Debug, Clone, Copy)]
pub enum DeviceWeight<'a, T> {
    /// NF4 (bitsandbytes layout), `numel = N·K`.
    Nf4(&'a Nf4Device),
    /// Dense `T`, `N·K` values.
    Dense(&'a CudaSlice<T>),
}

/// LoRA factors on the device.
#[derive(Debug, Clone, Copy)]
pub struct DeviceLora<'a, T> {
    /// `A`, `[rank, K]`.
    pub a: &'a CudaSlice<T>,
    /// `B`, `[N, rank]`.
    pub b: &'a CudaSlice<T>,
    /// `r`, in `1..=64`.
    pub rank: usize,
    /// `s = alpha / r`.
    pub scale: f32,
}

/// Forward inputs on the device: [`ForwardArgs`] with device buffers.
#[derive(Debug, Clone, Copy)]
pub struct DeviceForwardArgs<'a, T> {
    /// Problem size.
    pub dims: LinearDims,
    /// `x`, `[M, K]`.
    pub x: &'a CudaSlice<T>,
    /// `W`.
    pub weight: DeviceWeight<'a, T>,
    /// LoRA factors, or `None` for a plain linear.
    pub lora: Option<DeviceLora<'a, T>>,
    /// `bias`, `[N]`.
    pub bias: Option<&'a CudaSlice<T>>,
    /// Dropout on the LoRA input (the mask of [`crate::lora::dropout_keep`]).
    pub dropout: Option<Dropout>,
}

/// Gradient outputs on the device; `None` skips one.
#[derive(Debug)]
pub struct DeviceGrads<'a, T> {
    /// `dx`, `[M, K]`.
    pub dx: Option<&'a mut CudaSlice<T>>,
    /// `dA`, `[rank, K]`.
    pub da: Option<&'a mut CudaSlice<T>>,
    /// `dB`, `[N, rank]`.
    pub db: Option<&'a mut CudaSlice<T>>,
}

fn lora_len_check(
    op: &'static str,
    what: &str,
    dims: String,
    want: usize,
    got: usize,
) -> Result<()> {
    if want == got {
        Ok(())
    } else {
        Err(Error::shape(
            op,
            format!("{what} {dims}"),
            format!("{want} values"),
            format!("{got} values"),
        ))
    }
}

impl Cuda {
    /// Every rule of [`ForwardArgs::validate`] for device buffers, plus the
    /// device, alignment and index-type checks; returns the scalar part of
    /// the kernel parameters and the weight kind.
    fn lora_validate<T: Element>(
        &self,
        op: &'static str,
        args: &DeviceForwardArgs<'_, T>,
    ) -> Result<(LoraParams, WeightKind)> {
        if size_of::<T>() != T::DTYPE.size() {
            return Err(Error::UnsupportedDtype {
                op,
                dtype: format!("{} of {} bytes", T::DTYPE, size_of::<T>()),
                supported: SUPPORTED_DTYPES,
            });
        }
        let LinearDims { m, n, k } = args.dims;
        if m == 0 || n == 0 || k == 0 {
            return Err(Error::invalid(
                op,
                format!("empty problem: M = {m}, N = {n}, K = {k}"),
            ));
        }
        if let Some(d) = &args.dropout
            && !(d.p >= 0.0 && d.p < 1.0)
        {
            return Err(Error::invalid(
                op,
                format!("dropout probability {} is not in [0, 1)", d.p),
            ));
        }
        if let Some(l) = &args.lora
            && !l.scale.is_finite()
        {
            return Err(Error::invalid(
                op,
                format!("LoRA scale {} is not finite", l.scale),
            ));
        }
        if args.lora.is_none() && args.dropout.is_some_and(|d| d.p > 0.0) {
            return Err(Error::invalid(op, "dropout given without LoRA factors"));
        }
        // Sizes and rank against the kernels' index types (this also rules
        // out overflow in the products below).
        let mut p = LoraParams::new(
            op,
            args.dims,
            args.lora.map(|l| (l.rank, l.scale)),
            args.dropout,
        )?;
        lora_len_check(op, "x", format!("[M={m}, K={k}]"), m * k, args.x.len())?;
        self.check_same_device(op, "x", args.x)?;
        let kind = match args.weight {
            DeviceWeight::Dense(w) => {
                lora_len_check(op, "weight", format!("[N={n}, K={k}]"), n * k, w.len())?;
                self.check_same_device(op, "weight", w)?;
                self.check_aligned(op, "weight", w)?;
                WeightKind::Dense
            }
            DeviceWeight::Nf4(w) => {
                w.validate(op)?;
                lora_len_check(op, "NF4 weight", format!("[N={n}, K={k}]"), n * k, w.numel)?;
                self.check_same_device(op, "packed codes", &w.packed)?;
                self.check_aligned(op, "packed codes", &w.packed)?;
                match &w.scales {
                    DeviceScales::Plain(a) => {
                        self.check_same_device(op, "absmax", a)?;
                        p.set_nf4(op, w.blocksize, None)?
                    }
                    DeviceScales::Double {
                        qabsmax,
                        absmax2,
                        code2,
                        offset,
                        nested_blocksize,
                    } => {
                        self.check_same_device(op, "quantized absmax", qabsmax)?;
                        self.check_same_device(op, "nested absmax", absmax2)?;
                        self.check_same_device(op, "nested quant map", code2)?;
                        p.set_nf4(op, w.blocksize, Some((*nested_blocksize, *offset)))?
                    }
                }
            }
        };
        if let Some(l) = &args.lora {
            let r = l.rank;
            lora_len_check(op, "lora_A", format!("[r={r}, K={k}]"), r * k, l.a.len())?;
            lora_len_check(op, "lora_B", format!("[N={n}, r={r}]"), n * r, l.b.len())?;
            self.check_same_device(op, "lora_A", l.a)?;
            self.check_same_device(op, "lora_B", l.b)?;
        }
        if let Some(b) = args.bias {
            lora_len_check(op, "bias", format!("[N={n}]"), n, b.len())?;
            self.check_same_device(op, "bias", b)?;
        }
        Ok((p, kind))
    }

    /// Queue one `lora_matmul` entry point with `p`.
    ///
    /// # Safety
    /// Every address in `p` must point at a live device buffer of this
    /// context with the length the kernel indexes for `p`'s sizes (see
    /// `kernels/lora_matmul.cu`), weight buffers 16-byte aligned, and stay
    /// valid until the kernel has finished (the callers hold cudarc's
    /// stream-ordering guards of every buffer across the launch).
    unsafe fn lora_launch(
        &self,
        entry: &'static str,
        grid: [u32; 3],
        block: u32,
        p: &LoraParams,
    ) -> Result<()> {
        let func = self.function("lora_matmul", entry)?;
        let cfg = LaunchConfig {
            grid_dim: (grid[0], grid[1], grid[2]),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&func);
        launch.arg(p);
        // SAFETY: the one argument is the entry point's `TliLoraParams`,
        // laid out as `LoraParams` (#[repr(C)], size asserted on both
        // sides); buffer validity is this function's contract; block is the
        // kernel's launch bound and the grid the one its indexing expects.
        unsafe { launch.launch(cfg) }
            .map_err(|e| driver_error(format!("cuLaunchKernel ({entry})"), e))?;
        Ok(())
    }

    /// The fused forward `y = x·Wᵀ + s·(x̃·Aᵀ)·Bᵀ (+ bias)` on device
    /// buffers: the launcher of `lora_fwd_tile_*` / `lora_fwd_gemv_*` (and
    /// `lora_proj_*` for the GEMV's `u`). `variant` picks the kernel
    /// ([`ForwardVariant::Auto`]: GEMV for `M ≤ 8`). Queues the work and
    /// returns.
    ///
    /// # Errors
    /// Before anything runs: [`Error::ShapeMismatch`] for a buffer of the
    /// wrong length (naming it); [`Error::InvalidArgument`] for an empty
    /// problem, a rank outside `1..=64`, a non-finite scale, a bad dropout
    /// probability, sizes beyond the kernels' index types, or a buffer of
    /// another device; [`Error::Misaligned`] when the weight is not 16-byte
    /// aligned; [`Error::UnsupportedDtype`]. [`Error::NoCudaDevice`] /
    /// [`Error::Driver`] when loading the module, allocating the GEMV's
    /// scratch or launching fails.
    pub fn lora_forward<T: Element + DeviceRepr>(
        &self,
        args: &DeviceForwardArgs<'_, T>,
        out: &mut CudaSlice<T>,
        variant: ForwardVariant,
    ) -> Result<()> {
        const OP: &str = "lora forward (cuda)";
        let (mut p, kind) = self.lora_validate(OP, args)?;
        let LinearDims { m, n, .. } = args.dims;
        lora_len_check(OP, "output", format!("[M={m}, N={n}]"), m * n, out.len())?;
        self.check_same_device(OP, "output", out)?;
        let s = &self.stream;
        let (x, _gx) = args.x.device_ptr(s);
        p.x = x;
        let (mut _gw, mut _gs1, mut _gs2, mut _gs3) = (None, None, None, None);
        match args.weight {
            DeviceWeight::Dense(w) => {
                let (ptr, g) = w.device_ptr(s);
                p.w_dense = ptr;
                _gw = Some(g);
            }
            DeviceWeight::Nf4(w) => {
                let (ptr, g) = w.packed.device_ptr(s);
                p.w_packed = ptr;
                _gw = Some(g);
                match &w.scales {
                    DeviceScales::Plain(a) => {
                        let (ptr, g) = a.device_ptr(s);
                        p.w_absmax = ptr;
                        _gs1 = Some(g);
                    }
                    DeviceScales::Double {
                        qabsmax,
                        absmax2,
                        code2,
                        ..
                    } => {
                        let (q, g1) = qabsmax.device_ptr(s);
                        let (a2, g2) = absmax2.device_ptr(s);
                        let (c2, g3) = code2.device_ptr(s);
                        (p.w_qabsmax, p.w_absmax2, p.w_code2) = (q, a2, c2);
                        (_gs1, _gs2, _gs3) = (Some(g1), Some(g2), Some(g3));
                    }
                }
            }
        }
        let (mut _ga, mut _gb, mut _gbias) = (None, None, None);
        if let Some(l) = &args.lora {
            let (a, ga) = l.a.device_ptr(s);
            let (b, gb) = l.b.device_ptr(s);
            (p.lora_a, p.lora_b) = (a, b);
            (_ga, _gb) = (Some(ga), Some(gb));
        }
        if let Some(b) = args.bias {
            let (ptr, g) = b.device_ptr(s);
            p.bias = ptr;
            _gbias = Some(g);
        }
        let (o, _go) = out.device_ptr_mut(s);
        p.out = o;
        match variant.resolve(m) {
            ForwardVariant::Gemv => {
                let mut u = None;
                if let Some(l) = &args.lora {
                    u = Some(self.alloc_zeros::<f32>(m * l.rank)?);
                }
                let mut _gu = None;
                if let Some(u) = u.as_mut() {
                    let (ptr, g) = u.device_ptr_mut(s);
                    let mut q = p;
                    q.proj_mode = 0;
                    q.proj_scale = p.scale * p.keep_scale;
                    q.proj_out = ptr;
                    p.u = ptr;
                    _gu = Some(g);
                    let blocks = u32::try_from(m)
                        .map_err(|_| Error::invalid(OP, format!("M = {m} exceeds the grid")))?;
                    // SAFETY: q's buffers were validated above (x [M,K],
                    // A [r,K], u [M,r] just allocated); guards held.
                    unsafe {
                        self.lora_launch(
                            entry_name(Family::Proj, kind, T::DTYPE),
                            [blocks, 1, 1],
                            AUX_THREADS,
                            &q,
                        )?
                    };
                }
                let blocks_per_sm = (self.max_threads_per_sm / GEMV_THREADS).max(1);
                let resident = self.sm_count as usize * blocks_per_sm as usize;
                let blocks = n.div_ceil(GEMV_ROWS_PER_BLOCK).clamp(1, resident.max(1));
                let blocks = u32::try_from(blocks).unwrap_or(u32::MAX);
                // SAFETY: every buffer in p was validated above for the
                // sizes in p (weight 16-byte aligned for the LDG.128s);
                // the guards above live until after this call.
                unsafe {
                    self.lora_launch(
                        entry_name(Family::FwdGemv, kind, T::DTYPE),
                        [blocks, 1, 1],
                        GEMV_THREADS,
                        &p,
                    )
                }
            }
            _ => {
                // SAFETY: as above; the grid covers the output in 64x64 tiles.
                unsafe {
                    self.lora_launch(
                        entry_name(Family::FwdTile, kind, T::DTYPE),
                        p.tile_grid(n),
                        TILE_THREADS,
                        &p,
                    )
                }
            }
        }
    }

    /// The backward pass on device buffers: `dx` with the fused tile kernel
    /// (`lora_bwd_dx_*`), `dA`/`dB` through `lora_proj_*` and one
    /// `lora_bwd_dadb_*` launch. Gradients left `None` are not computed.
    /// Queues the work and returns.
    ///
    /// # Errors
    /// As [`Cuda::lora_forward`], plus [`Error::ShapeMismatch`] for `dy` or
    /// a gradient of the wrong length and [`Error::InvalidArgument`] when
    /// `dA`/`dB` are asked for without LoRA factors.
    pub fn lora_backward<T: Element + DeviceRepr>(
        &self,
        args: &DeviceForwardArgs<'_, T>,
        dy: &CudaSlice<T>,
        grads: DeviceGrads<'_, T>,
    ) -> Result<()> {
        const OP: &str = "lora backward (cuda)";
        let (mut p, kind) = self.lora_validate(OP, args)?;
        let LinearDims { m, n, k } = args.dims;
        lora_len_check(OP, "dy", format!("[M={m}, N={n}]"), m * n, dy.len())?;
        self.check_same_device(OP, "dy", dy)?;
        let DeviceGrads { dx, da, db } = grads;
        if let Some(d) = &dx {
            lora_len_check(OP, "dx", format!("[M={m}, K={k}]"), m * k, d.len())?;
            self.check_same_device(OP, "dx", d)?;
        }
        let rank = args.lora.map(|l| l.rank);
        match rank {
            Some(r) => {
                if let Some(d) = &da {
                    lora_len_check(OP, "dA", format!("[r={r}, K={k}]"), r * k, d.len())?;
                    self.check_same_device(OP, "dA", d)?;
                }
                if let Some(d) = &db {
                    lora_len_check(OP, "dB", format!("[N={n}, r={r}]"), n * r, d.len())?;
                    self.check_same_device(OP, "dB", d)?;
                }
            }
            None if da.is_some() || db.is_some() => {
                return Err(Error::invalid(
                    OP,
                    "gradients of lora_A / lora_B asked for without LoRA factors",
                ));
            }
            None => {}
        }
        let blocks_dadb = p.dadb_blocks(da.is_some(), db.is_some())?;
        let blocks_m = u32::try_from(m)
            .map_err(|_| Error::invalid(OP, format!("M = {m} exceeds the grid")))?;
        let s = &self.stream;
        let (x, _gx) = args.x.device_ptr(s);
        let (dyp, _gdy) = dy.device_ptr(s);
        (p.x, p.dy) = (x, dyp);
        let (mut _gw, mut _gs1, mut _gs2, mut _gs3) = (None, None, None, None);
        match args.weight {
            DeviceWeight::Dense(w) => {
                let (ptr, g) = w.device_ptr(s);
                p.w_dense = ptr;
                _gw = Some(g);
            }
            DeviceWeight::Nf4(w) => {
                let (ptr, g) = w.packed.device_ptr(s);
                p.w_packed = ptr;
                _gw = Some(g);
                match &w.scales {
                    DeviceScales::Plain(a) => {
                        let (ptr, g) = a.device_ptr(s);
                        p.w_absmax = ptr;
                        _gs1 = Some(g);
                    }
                    DeviceScales::Double {
                        qabsmax,
                        absmax2,
                        code2,
                        ..
                    } => {
                        let (q, g1) = qabsmax.device_ptr(s);
                        let (a2, g2) = absmax2.device_ptr(s);
                        let (c2, g3) = code2.device_ptr(s);
                        (p.w_qabsmax, p.w_absmax2, p.w_code2) = (q, a2, c2);
                        (_gs1, _gs2, _gs3) = (Some(g1), Some(g2), Some(g3));
                    }
                }
            }
        }
        let (mut _ga, mut _gb) = (None, None);
        if let Some(l) = &args.lora {
            let (a, ga) = l.a.device_ptr(s);
            let (b, gb) = l.b.device_ptr(s);
            (p.lora_a, p.lora_b) = (a, b);
            (_ga, _gb) = (Some(ga), Some(gb));
        }
        if let Some(dx) = dx {
            let (o, _go) = dx.device_ptr_mut(s);
            let mut q = p;
            q.out = o;
            // SAFETY: x, dy, W, A, B validated above for q's sizes, dx
            // [M,K]; guards held until after the call.
            unsafe {
                self.lora_launch(
                    entry_name(Family::BwdDx, kind, T::DTYPE),
                    p.tile_grid(k),
                    TILE_THREADS,
                    &q,
                )?
            };
        }
        let Some(r) = rank.filter(|_| da.is_some() || db.is_some()) else {
            return Ok(());
        };
        let proj = entry_name(Family::Proj, kind, T::DTYPE);
        let mut u = if db.is_some() {
            Some(self.alloc_zeros::<f32>(m * r)?)
        } else {
            None
        };
        let mut g = if da.is_some() {
            Some(self.alloc_zeros::<f32>(m * r)?)
        } else {
            None
        };
        let (mut _gu, mut _gg) = (None, None);
        if let Some(u) = u.as_mut() {
            let (ptr, gd) = u.device_ptr_mut(s);
            let mut q = p;
            (q.proj_mode, q.proj_scale, q.proj_out) = (0, p.keep_scale, ptr);
            p.u = ptr;
            _gu = Some(gd);
            // SAFETY: x [M,K], A [r,K] validated; u [M,r] allocated above.
            unsafe { self.lora_launch(proj, [blocks_m, 1, 1], AUX_THREADS, &q)? };
        }
        if let Some(g) = g.as_mut() {
            let (ptr, gd) = g.device_ptr_mut(s);
            let mut q = p;
            (q.proj_mode, q.proj_scale, q.proj_out) = (1, 1.0, ptr);
            p.g = ptr;
            _gg = Some(gd);
            // SAFETY: dy [M,N], B [N,r] validated; g [M,r] allocated above.
            unsafe { self.lora_launch(proj, [blocks_m, 1, 1], AUX_THREADS, &q)? };
        }
        let (mut _gda, mut _gdb) = (None, None);
        if let Some(d) = da {
            let (ptr, gd) = d.device_ptr_mut(s);
            p.da = ptr;
            _gda = Some(gd);
        }
        if let Some(d) = db {
            let (ptr, gd) = d.device_ptr_mut(s);
            p.db = ptr;
            _gdb = Some(gd);
        }
        // SAFETY: x, dy validated; u / g [M,r] written above when dB / dA
        // are asked for (the kernel reads only those); dA [r,K], dB [N,r]
        // checked; the grid is dadb_blocks for exactly these outputs.
        unsafe {
            self.lora_launch(
                entry_name(Family::Dadb, kind, T::DTYPE),
                [blocks_dadb, 1, 1],
                AUX_THREADS,
                &p,
            )
        }
    }

    /// The forward on host slices: upload, [`Cuda::lora_forward`] with
    /// [`ForwardVariant::Auto`], download into `out`, wait.
    ///
    /// # Errors
    /// What [`ForwardArgs::validate`] reports, [`Error::ShapeMismatch`] for
    /// `out`, then as [`Cuda::lora_forward`] and [`Error::Driver`] for the
    /// copies.
    pub fn lora_forward_host<T: Element>(
        &self,
        args: &ForwardArgs<'_, T>,
        out: &mut [T],
    ) -> Result<()> {
        const OP: &str = "lora forward (cuda)";
        args.validate(OP)?;
        if out.len() != args.out_len() {
            return Err(Error::shape(OP, "output", args.out_len(), out.len()));
        }
        match T::DTYPE {
            DType::F32 => self.forward_host_typed::<f32>(&recast(OP, args)?, cast_out(OP, out)?),
            DType::BF16 => self.forward_host_typed::<bf16>(&recast(OP, args)?, cast_out(OP, out)?),
            DType::F16 => self.forward_host_typed::<f16>(&recast(OP, args)?, cast_out(OP, out)?),
        }
    }

    /// The backward pass on host slices: upload, [`Cuda::lora_backward`],
    /// download each requested gradient, wait.
    ///
    /// # Errors
    /// What [`BackwardArgs::validate`] reports, then as
    /// [`Cuda::lora_backward`] and [`Error::Driver`] for the copies.
    pub fn lora_backward_host<T: Element>(
        &self,
        args: &BackwardArgs<'_, T>,
        grads: Grads<'_, T>,
    ) -> Result<()> {
        const OP: &str = "lora backward (cuda)";
        args.validate(OP, &grads)?;
        let Grads { dx, da, db } = grads;
        macro_rules! typed {
            ($u:ty) => {{
                let fwd = recast::<T, $u>(OP, &args.fwd)?;
                let dy: &[$u] = cast_in(OP, args.dy)?;
                let dx = dx.map(|d| cast_out::<T, $u>(OP, d)).transpose()?;
                let da = da.map(|d| cast_out::<T, $u>(OP, d)).transpose()?;
                let db = db.map(|d| cast_out::<T, $u>(OP, d)).transpose()?;
                self.backward_host_typed::<$u>(&fwd, dy, Grads { dx, da, db })
            }};
        }
        match T::DTYPE {
            DType::F32 => typed!(f32),
            DType::BF16 => typed!(bf16),
            DType::F16 => typed!(f16),
        }
    }

    /// Upload the forward inputs; `f` runs with their device form.
    fn with_device_args<U: Element + DeviceRepr, R>(
        &self,
        args: &ForwardArgs<'_, U>,
        f: impl FnOnce(&DeviceForwardArgs<'_, U>) -> Result<R>,
    ) -> Result<R> {
        let x = self.to_device(args.x)?;
        let (nf4, dense) = match args.weight {
            BaseWeight::Nf4(v) => (Some(self.upload_nf4(&v)?), None),
            BaseWeight::Dense(w) => (None, Some(self.to_device(w)?)),
        };
        let factors = match &args.lora {
            Some(l) => Some((self.to_device(l.a)?, self.to_device(l.b)?, l.rank, l.scale)),
            None => None,
        };
        let bias = args.bias.map(|b| self.to_device(b)).transpose()?;
        let weight = match (&nf4, &dense) {
            (Some(w), _) => DeviceWeight::Nf4(w),
            (None, Some(w)) => DeviceWeight::Dense(w),
            (None, None) => return Err(Error::invalid("lora (cuda)", "no weight")),
        };
        let dargs = DeviceForwardArgs {
            dims: args.dims,
            x: &x,
            weight,
            lora: factors.as_ref().map(|(a, b, rank, scale)| DeviceLora {
                a,
                b,
                rank: *rank,
                scale: *scale,
            }),
            bias: bias.as_ref(),
            dropout: args.dropout,
        };
        f(&dargs)
    }

    /// Copy `dev` into `host` (equal lengths) and wait for the copy.
    fn download<U: DeviceRepr>(&self, dev: &CudaSlice<U>, host: &mut [U]) -> Result<()> {
        if dev.len() != host.len() {
            return Err(Error::shape(
                "download (cuda)",
                "host buffer",
                dev.len(),
                host.len(),
            ));
        }
        self.stream
            .memcpy_dtoh(dev, host)
            .map_err(|e| driver_error(format!("cuMemcpyDtoH ({} bytes)", dev.num_bytes()), e))?;
        self.synchronize()
    }

    fn forward_host_typed<U: Element + DeviceRepr + ValidAsZeroBits>(
        &self,
        args: &ForwardArgs<'_, U>,
        out: &mut [U],
    ) -> Result<()> {
        self.with_device_args(args, |d| {
            let mut dev_out = self.alloc_zeros::<U>(out.len())?;
            self.lora_forward(d, &mut dev_out, ForwardVariant::Auto)?;
            self.download(&dev_out, out)?;
            self.synchronize()
        })
    }

    fn backward_host_typed<U: Element + DeviceRepr + ValidAsZeroBits>(
        &self,
        args: &ForwardArgs<'_, U>,
        dy: &[U],
        grads: Grads<'_, U>,
    ) -> Result<()> {
        self.with_device_args(args, |d| {
            let dy = self.to_device(dy)?;
            let Grads { dx, da, db } = grads;
            let mut ddx = dx
                .as_ref()
                .map(|h| self.alloc_zeros::<U>(h.len()))
                .transpose()?;
            let mut dda = da
                .as_ref()
                .map(|h| self.alloc_zeros::<U>(h.len()))
                .transpose()?;
            let mut ddb = db
                .as_ref()
                .map(|h| self.alloc_zeros::<U>(h.len()))
                .transpose()?;
            self.lora_backward(
                d,
                &dy,
                DeviceGrads {
                    dx: ddx.as_mut(),
                    da: dda.as_mut(),
                    db: ddb.as_mut(),
                },
            )?;
            for (dev, host) in [(ddx, dx), (dda, da), (ddb, db)] {
                if let (Some(dev), Some(host)) = (dev, host) {
                    self.download(&dev, host)?;
                }
            }
            self.synchronize()
        })
    }
}

/// The caller's forward inputs as the concrete element type of their dtype
/// (the same type; only a foreign `Element` impl of the wrong size fails).
fn recast<'a, T: Element, U: Element>(
    op: &'static str,
    a: &ForwardArgs<'a, T>,
) -> Result<ForwardArgs<'a, U>> {
    Ok(ForwardArgs {
        dims: a.dims,
        x: cast_in(op, a.x)?,
        weight: match a.weight {
            BaseWeight::Nf4(v) => BaseWeight::Nf4(v),
            BaseWeight::Dense(w) => BaseWeight::Dense(cast_in(op, w)?),
        },
        lora: match &a.lora {
            Some(l) => Some(LoraFactors {
                a: cast_in(op, l.a)?,
                b: cast_in(op, l.b)?,
                rank: l.rank,
                scale: l.scale,
            }),
            None => None,
        },
        bias: a.bias.map(|b| cast_in(op, b)).transpose()?,
        dropout: a.dropout,
    })
}

fn cast_in<'a, T: Element, U: Element>(op: &'static str, s: &'a [T]) -> Result<&'a [U]> {
    bytemuck::try_cast_slice(s).map_err(|e| Error::UnsupportedDtype {
        op,
        dtype: format!("{} of {} bytes ({e})", T::DTYPE, size_of::<T>()),
        supported: SUPPORTED_DTYPES,
    })
}

// SAFETY: LoraParams is #[repr(C)] plain data (integers and floats, no
// padding: 208 bytes asserted against the C struct), passed to the kernel
// by value as its `TliLoraParams` argument.
unsafe impl DeviceRepr for LoraParams {}

// ---------------------------------------------------------------------------
// Cosine kernels (`kernels/cosine.cu`)
// ---------------------------------------------------------------------------

/// Output tile of `cosine_matrix` (its `kTileM` × `kTileN`).
const COSINE_TILE: usize = 64;
/// Blocks per SM a pool / pair launch asks for at most (the kernels'
/// `__launch_bounds__(256, 3)` guarantees 3 resident; a few waves more keep
/// every SM busy while rows of unequal mask counts finish).
const COSINE_BLOCKS_PER_SM: usize = 12;

/// Hidden states `[batch, seq, dim]` on the device, with element strides
/// `(stride_b, stride_t, 1)`: the device form of [`crate::cosine::Hidden`].
/// A matrix of vectors is the view with `seq = 1`.
#[derive(Debug)]
pub struct DeviceHidden<'a, T> {
    /// The elements, starting at element `(0, 0, 0)`.
    pub data: cudarc::driver::CudaView<'a, T>,
    /// Rows.
    pub batch: usize,
    /// Positions per row.
    pub seq: usize,
    /// Embedding width.
    pub dim: usize,
    /// Elements between rows.
    pub stride_b: usize,
    /// Elements between positions.
    pub stride_t: usize,
}

impl<T> DeviceHidden<'_, T> {
    fn validate(&self, op: &'static str, what: &str) -> Result<()> {
        crate::cosine::check_layout(
            op,
            what,
            [self.batch, self.seq, self.dim],
            [self.stride_b, self.stride_t],
            cudarc::driver::DeviceSlice::len(&self.data),
        )
    }

    /// `(stride_b, stride_t, batch, seq, dim)` as the kernels' integers
    /// (bounded by `validate`).
    fn params(&self, op: &'static str) -> Result<(i64, i64, i32, i32, i32)> {
        let big = |what: &str, v: usize| {
            Error::invalid(op, format!("{what} {v} exceeds the kernel's integer range"))
        };
        Ok((
            i64::try_from(self.stride_b).map_err(|_| big("stride_b", self.stride_b))?,
            i64::try_from(self.stride_t).map_err(|_| big("stride_t", self.stride_t))?,
            i32::try_from(self.batch).map_err(|_| big("batch", self.batch))?,
            i32::try_from(self.seq).map_err(|_| big("seq", self.seq))?,
            i32::try_from(self.dim).map_err(|_| big("dim", self.dim))?,
        ))
    }
}

/// The entry point of `kind` (`pool`, `pairs`, `matrix`) for `T`.
fn cosine_entry<T: Element>(op: &'static str, kind: &str) -> Result<&'static str> {
    crate::cosine::check_element::<T>(op)?;
    Ok(match (kind, T::DTYPE) {
        ("pool", DType::F32) => "cosine_pool_f32",
        ("pool", DType::BF16) => "cosine_pool_bf16",
        ("pool", DType::F16) => "cosine_pool_f16",
        ("pairs", DType::F32) => "cosine_pairs_f32",
        ("pairs", DType::BF16) => "cosine_pairs_bf16",
        ("pairs", DType::F16) => "cosine_pairs_f16",
        (_, DType::F32) => "cosine_matrix_f32",
        (_, DType::BF16) => "cosine_matrix_bf16",
        (_, DType::F16) => "cosine_matrix_f16",
    })
}

impl Cuda {
    fn same_context<U, S: cudarc::driver::DeviceSlice<U>>(
        &self,
        op: &'static str,
        what: &str,
        buf: &S,
    ) -> Result<()> {
        if **buf.stream().context() == *self.ctx {
            Ok(())
        } else {
            Err(Error::invalid(
                op,
                format!(
                    "{what} was allocated on device {} but this launch runs on device {} ({})",
                    buf.stream().context().ordinal(),
                    self.ordinal,
                    self.name
                ),
            ))
        }
    }

    fn cosine_rows_config(&self, rows: usize) -> LaunchConfig {
        let cap = (self.sm_count as usize).max(1) * COSINE_BLOCKS_PER_SM;
        LaunchConfig {
            grid_dim: (u32::try_from(rows.clamp(1, cap)).unwrap_or(1), 1, 1),
            block_dim: (BLOCK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Masked mean pooling on the device: the launcher of
    /// `cosine_pool_{f32,bf16,f16}`. Writes the `[batch, dim]` means into
    /// `out`, normalised (`x / max(‖x‖, eps)`) when `normalize` is
    /// `Some(eps)`. A row with no set mask position pools to zero.
    ///
    /// Queues the kernel and returns; [`synchronize`](Self::synchronize) or
    /// [`to_host`](Self::to_host) waits for it.
    ///
    /// # Errors
    /// Before anything runs: the layout errors of
    /// [`crate::cosine::check_layout`]; a mask of other than `batch · seq`
    /// bytes or an output of other than `batch · dim` values
    /// ([`Error::ShapeMismatch`]); a bad `eps`; a buffer of another device
    /// ([`Error::InvalidArgument`]). [`Error::Driver`] when the launch fails.
    pub fn cosine_pool<T: Element + DeviceRepr>(
        &self,
        h: &DeviceHidden<'_, T>,
        mask: Option<&cudarc::driver::CudaView<'_, u8>>,
        normalize: Option<f32>,
        out: &mut cudarc::driver::CudaViewMut<'_, f32>,
    ) -> Result<()> {
        const OP: &str = "cosine pool (cuda)";
        use cudarc::driver::DevicePtrMut;
        let entry = cosine_entry::<T>(OP, "pool")?;
        h.validate(OP, "hidden states")?;
        let eps = normalize.unwrap_or(crate::cosine::NORMALIZE_EPS);
        crate::cosine::check_eps(OP, eps)?;
        if let Some(m) = mask
            && m.len() != h.batch * h.seq
        {
            return Err(Error::shape(OP, "mask", h.batch * h.seq, m.len()));
        }
        if out.len() != h.batch * h.dim {
            return Err(Error::shape(OP, "output", h.batch * h.dim, out.len()));
        }
        self.same_context(OP, "hidden states", &h.data)?;
        if let Some(m) = mask {
            self.same_context(OP, "mask", m)?;
        }
        self.same_context(OP, "output", out)?;
        let (sb, st, rows, seq, dim) = h.params(OP)?;
        let func = self.function("cosine", entry)?;
        let cfg = self.cosine_rows_config(h.batch);
        let (hp, _h_guard) = h.data.device_ptr(&self.stream);
        let (mp, _m_guard) = match mask {
            Some(m) => {
                let (p, g) = m.device_ptr(&self.stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (op_ptr, _o_guard) = out.device_ptr_mut(&self.stream);
        let null: u64 = 0;
        let norm = i32::from(normalize.is_some());
        let mut launch = self.stream.launch_builder(&func);
        // (const T* h, int64_t stride_b, int64_t stride_t, const uint8_t*
        //  mask, int32_t rows, int32_t seq, int32_t dim, float eps,
        //  int32_t normalize, float* out, float* row_scale)
        launch
            .arg(&hp)
            .arg(&sb)
            .arg(&st)
            .arg(&mp)
            .arg(&rows)
            .arg(&seq)
            .arg(&dim)
            .arg(&eps)
            .arg(&norm)
            .arg(&op_ptr)
            .arg(&null);
        // SAFETY: the arguments match the entry point's signature in number,
        // order and type (device pointers as u64, i64 strides, i32 sizes,
        // f32 eps). `validate` checked that every element (b, t, d) the
        // kernel reads lies inside `h.data`; the mask (or null) holds
        // batch·seq bytes and out batch·dim f32 (checked above); row_scale is
        // null, which the kernel tests before writing. All buffers are in this
        // context; the kernel checks 16-byte alignment itself before any
        // vector load. blockDim is its 256 and the grid-stride loop accepts
        // any grid. The guards record the launch on each buffer's events
        // when they drop, after the launch is queued.
        unsafe { launch.launch(cfg) }
            .map_err(|e| driver_error(format!("cuLaunchKernel ({entry})"), e))?;
        Ok(())
    }

    /// The fused pair op on the device: the launcher of
    /// `cosine_pairs_{f32,bf16,f16}`. `cos[i]` is the cosine of the masked
    /// mean pools of `a[i]` and `b[i]` (per-norm clamp `eps`, clamped to
    /// [-1, 1]); the pooled vectors are written only into `pooled`, when
    /// given.
    ///
    /// # Errors
    /// As [`cosine_pool`](Self::cosine_pool), plus [`Error::ShapeMismatch`]
    /// for unequal batch or width of `a` and `b`, or a `cos` / `pooled`
    /// output of the wrong length.
    #[allow(clippy::too_many_arguments)]
    pub fn cosine_pairs<T: Element + DeviceRepr>(
        &self,
        a: &DeviceHidden<'_, T>,
        mask_a: Option<&cudarc::driver::CudaView<'_, u8>>,
        b: &DeviceHidden<'_, T>,
        mask_b: Option<&cudarc::driver::CudaView<'_, u8>>,
        eps: f32,
        cos: &mut cudarc::driver::CudaViewMut<'_, f32>,
        pooled: Option<(
            &mut cudarc::driver::CudaViewMut<'_, f32>,
            &mut cudarc::driver::CudaViewMut<'_, f32>,
        )>,
    ) -> Result<()> {
        const OP: &str = "cosine pairs (cuda)";
        use cudarc::driver::DevicePtrMut;
        let entry = cosine_entry::<T>(OP, "pairs")?;
        a.validate(OP, "a")?;
        b.validate(OP, "b")?;
        crate::cosine::check_eps(OP, eps)?;
        if a.batch != b.batch {
            return Err(Error::shape(OP, "rows of b", a.batch, b.batch));
        }
        if a.dim != b.dim {
            return Err(Error::shape(OP, "width of b", a.dim, b.dim));
        }
        for (what, m, h) in [("a mask", mask_a, a), ("b mask", mask_b, b)] {
            if let Some(m) = m {
                if m.len() != h.batch * h.seq {
                    return Err(Error::shape(OP, what, h.batch * h.seq, m.len()));
                }
                self.same_context(OP, what, m)?;
            }
        }
        if cos.len() != a.batch {
            return Err(Error::shape(OP, "cosine output", a.batch, cos.len()));
        }
        self.same_context(OP, "a", &a.data)?;
        self.same_context(OP, "b", &b.data)?;
        self.same_context(OP, "cosine output", cos)?;
        let (pooled_a, pooled_b) = match pooled {
            Some((pa, pb)) => {
                for (what, p) in [("pooled a", &*pa), ("pooled b", &*pb)] {
                    if p.len() != a.batch * a.dim {
                        return Err(Error::shape(OP, what, a.batch * a.dim, p.len()));
                    }
                    self.same_context(OP, what, p)?;
                }
                (Some(pa), Some(pb))
            }
            None => (None, None),
        };
        let (sab, sat, pairs, seq_a, dim) = a.params(OP)?;
        let (sbb, sbt, _, seq_b, _) = b.params(OP)?;
        let func = self.function("cosine", entry)?;
        let cfg = self.cosine_rows_config(a.batch);
        let (ap, _ga) = a.data.device_ptr(&self.stream);
        let (bp, _gb) = b.data.device_ptr(&self.stream);
        let (map, _gma) = match mask_a {
            Some(m) => {
                let (p, g) = m.device_ptr(&self.stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (mbp, _gmb) = match mask_b {
            Some(m) => {
                let (p, g) = m.device_ptr(&self.stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (cp, _gc) = cos.device_ptr_mut(&self.stream);
        let (pap, _gpa) = match pooled_a {
            Some(p) => {
                let (ptr, g) = p.device_ptr_mut(&self.stream);
                (ptr, Some(g))
            }
            None => (0, None),
        };
        let (pbp, _gpb) = match pooled_b {
            Some(p) => {
                let (ptr, g) = p.device_ptr_mut(&self.stream);
                (ptr, Some(g))
            }
            None => (0, None),
        };
        let mut launch = self.stream.launch_builder(&func);
        // (const T* ha, int64_t sab, int64_t sat, const uint8_t* mask_a,
        //  int32_t seq_a, const T* hb, int64_t sbb, int64_t sbt,
        //  const uint8_t* mask_b, int32_t seq_b, int32_t pairs, int32_t dim,
        //  float eps, float* cos, float* pooled_a, float* pooled_b)
        launch
            .arg(&ap)
            .arg(&sab)
            .arg(&sat)
            .arg(&map)
            .arg(&seq_a)
            .arg(&bp)
            .arg(&sbb)
            .arg(&sbt)
            .arg(&mbp)
            .arg(&seq_b)
            .arg(&pairs)
            .arg(&dim)
            .arg(&eps)
            .arg(&cp)
            .arg(&pap)
            .arg(&pbp);
        // SAFETY: arguments match the signature in number, order and type.
        // Both views passed `validate` (every element read is inside its
        // buffer), have equal batch and dim, and their masks (or null) hold
        // batch·seq bytes; cos holds batch f32 and the pooled outputs (or
        // null) batch·dim f32 each. All buffers are in this context; the
        // kernel checks alignment before vector loads; blockDim is its 256
        // and the grid-stride loop accepts any grid. The guards record the
        // launch on each buffer's events after it is queued.
        unsafe { launch.launch(cfg) }
            .map_err(|e| driver_error(format!("cuLaunchKernel ({entry})"), e))?;
        Ok(())
    }

    /// The cosine matrix on the device: `cosine_pool_*` for each side's row
    /// scales (into temporary device buffers), then `cosine_matrix_*` into
    /// `out` (`[a.batch, b.batch]` row-major).
    ///
    /// # Errors
    /// As [`cosine_pool`](Self::cosine_pool), plus [`Error::InvalidArgument`]
    /// for views that are not matrices of vectors (`seq != 1`) or more rows
    /// than the grid can tile, and [`Error::ShapeMismatch`] for unequal
    /// widths or an output of the wrong length.
    pub fn cosine_matrix<T: Element + DeviceRepr>(
        &self,
        a: &DeviceHidden<'_, T>,
        b: &DeviceHidden<'_, T>,
        eps: f32,
        out: &mut cudarc::driver::CudaViewMut<'_, f32>,
    ) -> Result<()> {
        const OP: &str = "cosine matrix (cuda)";
        use cudarc::driver::DevicePtrMut;
        let entry = cosine_entry::<T>(OP, "matrix")?;
        let pool_entry = cosine_entry::<T>(OP, "pool")?;
        a.validate(OP, "a")?;
        b.validate(OP, "b")?;
        crate::cosine::check_eps(OP, eps)?;
        for (what, h) in [("a", a), ("b", b)] {
            if h.seq != 1 {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "{what} must be a matrix of vectors (seq 1), got seq {}",
                        h.seq
                    ),
                ));
            }
            self.same_context(OP, what, &h.data)?;
        }
        if a.dim != b.dim {
            return Err(Error::shape(OP, "width of b", a.dim, b.dim));
        }
        if out.len() != a.batch * b.batch {
            return Err(Error::shape(OP, "output", a.batch * b.batch, out.len()));
        }
        self.same_context(OP, "output", out)?;
        let grid_x = u32::try_from(b.batch.div_ceil(COSINE_TILE))
            .map_err(|_| Error::invalid(OP, format!("{} rows of b exceed the grid", b.batch)))?;
        let grid_y = u32::try_from(a.batch.div_ceil(COSINE_TILE))
            .ok()
            .filter(|&y| y <= 65535)
            .ok_or_else(|| {
                Error::invalid(
                    OP,
                    format!("{} rows of a exceed gridDim.y = 65535 tiles of 64", a.batch),
                )
            })?;
        let mut scales: Vec<CudaSlice<f32>> = Vec::with_capacity(2);
        let pool = self.function("cosine", pool_entry)?;
        for h in [a, b] {
            let mut s = self.alloc_zeros::<f32>(2 * h.batch)?;
            let (sb, st, rows, seq, dim) = h.params(OP)?;
            let (hp, _g) = h.data.device_ptr(&self.stream);
            let (sp, _gs) = s.device_ptr_mut(&self.stream);
            let (null, norm): (u64, i32) = (0, 0);
            let mut launch = self.stream.launch_builder(&pool);
            launch
                .arg(&hp)
                .arg(&sb)
                .arg(&st)
                .arg(&null)
                .arg(&rows)
                .arg(&seq)
                .arg(&dim)
                .arg(&eps)
                .arg(&norm)
                .arg(&null)
                .arg(&sp);
            // SAFETY: as in `cosine_pool`, with no mask and no pooled output
            // (null, tested by the kernel) and row_scale = s, which holds
            // 2·batch f32, the two values the kernel writes per row.
            unsafe { launch.launch(self.cosine_rows_config(h.batch)) }
                .map_err(|e| driver_error(format!("cuLaunchKernel ({pool_entry})"), e))?;
            drop(_gs);
            scales.push(s);
        }
        let (lda, _, n, _, dim) = a.params(OP)?;
        let (ldb, _, m, _, _) = b.params(OP)?;
        let func = self.function("cosine", entry)?;
        let (ap, _ga) = a.data.device_ptr(&self.stream);
        let (bp, _gb) = b.data.device_ptr(&self.stream);
        let (sap, _gsa) = scales[0].device_ptr(&self.stream);
        let (sbp, _gsb) = scales[1].device_ptr(&self.stream);
        let (op_ptr, _go) = out.device_ptr_mut(&self.stream);
        let cfg = LaunchConfig {
            grid_dim: (grid_x, grid_y, 1),
            block_dim: (BLOCK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&func);
        // (const T* a, int64_t lda, const float* scale_a, int32_t n,
        //  const T* b, int64_t ldb, const float* scale_b, int32_t m,
        //  int32_t dim, float* out)
        launch
            .arg(&ap)
            .arg(&lda)
            .arg(&sap)
            .arg(&n)
            .arg(&bp)
            .arg(&ldb)
            .arg(&sbp)
            .arg(&m)
            .arg(&dim)
            .arg(&op_ptr);
        // SAFETY: arguments match the signature. Both views are validated
        // matrices (row·ld + k < len for row < rows, k < dim); the scale
        // buffers hold 2 f32 per row, written by the pool launches queued
        // before on the same stream; out holds n·m f32 and the kernel writes
        // only (row, col) with row < n, col < m. The grid tiles n and m in
        // 64s as the kernel expects, blockDim is its 256.
        unsafe { launch.launch(cfg) }
            .map_err(|e| driver_error(format!("cuLaunchKernel ({entry})"), e))?;
        Ok(())
    }

    /// Host slices through the device: upload, [`cosine_pool`](Self::cosine_pool),
    /// download, wait.
    pub(crate) fn cosine_pool_host<T: Element>(
        &self,
        h: &crate::cosine::Hidden<'_, T>,
        mask: Option<&[u8]>,
        normalize: Option<f32>,
        out: &mut [f32],
    ) -> Result<()> {
        match T::DTYPE {
            DType::F32 => self.pool_round_trip::<f32>(&cast_hidden(h)?, mask, normalize, out),
            DType::BF16 => self.pool_round_trip::<bf16>(&cast_hidden(h)?, mask, normalize, out),
            DType::F16 => self.pool_round_trip::<f16>(&cast_hidden(h)?, mask, normalize, out),
        }
    }

    fn pool_round_trip<U: Element + DeviceRepr>(
        &self,
        h: &crate::cosine::Hidden<'_, U>,
        mask: Option<&[u8]>,
        normalize: Option<f32>,
        out: &mut [f32],
    ) -> Result<()> {
        let data = self.to_device(h.data)?;
        let mask_dev = mask.map(|m| self.to_device(m)).transpose()?;
        let mut dev_out = self.alloc_zeros::<f32>(out.len())?;
        let view = device_view(&data, h);
        self.cosine_pool(
            &view,
            mask_dev.as_ref().map(|m| m.as_view()).as_ref(),
            normalize,
            &mut dev_out.as_view_mut(),
        )?;
        self.download(&dev_out, out)
    }

    /// Host slices through the device for the fused pair op.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn cosine_pairs_host<T: Element>(
        &self,
        a: &crate::cosine::Hidden<'_, T>,
        mask_a: Option<&[u8]>,
        b: &crate::cosine::Hidden<'_, T>,
        mask_b: Option<&[u8]>,
        eps: f32,
        cos: &mut [f32],
        pooled: Option<(&mut [f32], &mut [f32])>,
    ) -> Result<()> {
        match T::DTYPE {
            DType::F32 => self.pairs_round_trip::<f32>(
                &cast_hidden(a)?,
                mask_a,
                &cast_hidden(b)?,
                mask_b,
                eps,
                cos,
                pooled,
            ),
            DType::BF16 => self.pairs_round_trip::<bf16>(
                &cast_hidden(a)?,
                mask_a,
                &cast_hidden(b)?,
                mask_b,
                eps,
                cos,
                pooled,
            ),
            DType::F16 => self.pairs_round_trip::<f16>(
                &cast_hidden(a)?,
                mask_a,
                &cast_hidden(b)?,
                mask_b,
                eps,
                cos,
                pooled,
            ),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn pairs_round_trip<U: Element + DeviceRepr>(
        &self,
        a: &crate::cosine::Hidden<'_, U>,
        mask_a: Option<&[u8]>,
        b: &crate::cosine::Hidden<'_, U>,
        mask_b: Option<&[u8]>,
        eps: f32,
        cos: &mut [f32],
        pooled: Option<(&mut [f32], &mut [f32])>,
    ) -> Result<()> {
        let da = self.to_device(a.data)?;
        let db = self.to_device(b.data)?;
        let ma = mask_a.map(|m| self.to_device(m)).transpose()?;
        let mb = mask_b.map(|m| self.to_device(m)).transpose()?;
        let mut dc = self.alloc_zeros::<f32>(cos.len())?;
        let mut kept = match &pooled {
            Some((pa, pb)) => Some((
                self.alloc_zeros::<f32>(pa.len())?,
                self.alloc_zeros::<f32>(pb.len())?,
            )),
            None => None,
        };
        {
            let mut views = kept
                .as_mut()
                .map(|(x, y)| (x.as_view_mut(), y.as_view_mut()));
            self.cosine_pairs(
                &device_view(&da, a),
                ma.as_ref().map(|m| m.as_view()).as_ref(),
                &device_view(&db, b),
                mb.as_ref().map(|m| m.as_view()).as_ref(),
                eps,
                &mut dc.as_view_mut(),
                views.as_mut().map(|(x, y)| (x, y)),
            )?;
        }
        self.download(&dc, cos)?;
        if let (Some((pa, pb)), Some((ka, kb))) = (pooled, kept) {
            self.download(&ka, pa)?;
            self.download(&kb, pb)?;
        }
        Ok(())
    }

    /// Host slices through the device for the cosine matrix.
    pub(crate) fn cosine_matrix_host<T: Element>(
        &self,
        a: &crate::cosine::Hidden<'_, T>,
        b: &crate::cosine::Hidden<'_, T>,
        eps: f32,
        out: &mut [f32],
    ) -> Result<()> {
        match T::DTYPE {
            DType::F32 => {
                self.matrix_round_trip::<f32>(&cast_hidden(a)?, &cast_hidden(b)?, eps, out)
            }
            DType::BF16 => {
                self.matrix_round_trip::<bf16>(&cast_hidden(a)?, &cast_hidden(b)?, eps, out)
            }
            DType::F16 => {
                self.matrix_round_trip::<f16>(&cast_hidden(a)?, &cast_hidden(b)?, eps, out)
            }
        }
    }

    fn matrix_round_trip<U: Element + DeviceRepr>(
        &self,
        a: &crate::cosine::Hidden<'_, U>,
        b: &crate::cosine::Hidden<'_, U>,
        eps: f32,
        out: &mut [f32],
    ) -> Result<()> {
        let da = self.to_device(a.data)?;
        let db = self.to_device(b.data)?;
        let mut dev_out = self.alloc_zeros::<f32>(out.len())?;
        self.cosine_matrix(
            &device_view(&da, a),
            &device_view(&db, b),
            eps,
            &mut dev_out.as_view_mut(),
        )?;
        self.download(&dev_out, out)
    }
}

/// The device view of an uploaded host view: same shape and strides.
fn device_view<'a, U>(
    data: &'a CudaSlice<U>,
    h: &crate::cosine::Hidden<'_, U>,
) -> DeviceHidden<'a, U> {
    DeviceHidden {
        data: data.as_view(),
        batch: h.batch,
        seq: h.seq,
        dim: h.dim,
        stride_b: h.stride_b,
        stride_t: h.stride_t,
    }
}

/// Reinterpret a view of `T` as its concrete dtype `U` (the same type).
fn cast_hidden<'a, T: Element, U: Element>(
    h: &crate::cosine::Hidden<'a, T>,
) -> Result<crate::cosine::Hidden<'a, U>> {
    let data: &'a [U] = bytemuck::try_cast_slice(h.data).map_err(|e| Error::UnsupportedDtype {
        op: "cosine (cuda)",
        dtype: format!("{} of {} bytes ({e})", T::DTYPE, size_of::<T>()),
        supported: SUPPORTED_DTYPES,
    })?;
    Ok(crate::cosine::Hidden {
        data,
        batch: h.batch,
        seq: h.seq,
        dim: h.dim,
        stride_b: h.stride_b,
        stride_t: h.stride_t,
    })
}
