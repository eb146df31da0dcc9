//! [`Nf4LoraLinear`]: the fused NF4 + LoRA linear as a candle op with
//! autograd.
//!
//! ```text
//!   y = x · deq(W)ᵀ  +  s · (x̃ · Aᵀ) · Bᵀ  (+ bias)        x: [..., K]
//!                                                       y: [..., N]
//!        W  frozen, NF4 (kept packed) or dense        A: [r, K]  trainable
//!        bias frozen                                   B: [N, r]  trainable
//! ```
//!
//! The forward pass is one call of [`crate::ops::lora_matmul::forward`] on
//! CPU tensors (the panel-fused CPU path: `W` is dequantized a panel at a
//! time and never materialised) and, with the `candle-cuda` feature, of the
//! fused CUDA kernels on CUDA tensors. Its numerics are the op's contract
//! ([`crate::lora`]): weights enter as `T(NF4[q]·scale)`, every product
//! accumulates in f32, `x̃·Aᵀ` stays f32, one rounding to `T` at the end.
//!
//! The backward pass is the op's own fused backward
//! ([`crate::ops::lora_matmul::backward`]), not a composition of candle
//! ops, so autograd and the explicit backward agree bit for bit:
//!
//! ```text
//!   dx = dy · deq(W)  +  mask ⊙ (s · (dy · B) · A) / (1 − p)
//!   dA = s · (dy · B)ᵀ · x̃          dB = s · dyᵀ · (x̃ · Aᵀ)
//! ```
//!
//! Dropout masks are a pure function of the seed and the element index
//! ([`crate::lora::dropout_keep`]), so the backward pass redraws the
//! forward's mask instead of storing it. Gradients are computed only for
//! inputs that carry one (`Tensor::track_op`): a frozen input skips `dx`,
//! the costliest of the three.
//!
//! `x`, `A`, `B`, a dense `W` and the bias share one dtype (f32, bf16 or
//! f16; the caller casts, and candle's cast carries the gradient back).

use std::sync::Arc;

use candle_core::backend::BackendStorage as _;
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType as CDType, Device as CDevice, Layout, Shape, Storage,
    Tensor, WithDType,
};

use crate::lora::{BackwardArgs, BaseWeight, Dropout, ForwardArgs, Grads, LinearDims, LoraFactors};
use crate::nf4::Nf4Tensor;
use crate::{Device, Element};

type CResult<T> = candle_core::Result<T>;

const NAME: &str = "tli-nf4-lora-linear";

fn wrap(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

fn msg(m: String) -> candle_core::Error {
    candle_core::Error::msg(format!("{NAME}: {m}"))
}

/// The frozen base weight `W`, `[N, K]` row-major.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// NF4 in bitsandbytes layout, kept packed (never dequantized whole).
    Nf4(Arc<Nf4Tensor>),
    /// Full precision; cast to the input's dtype when they differ.
    Dense(Tensor),
}

/// Device-resident copies of an NF4 base weight, made on the first forward
/// pass over a CUDA tensor (feature `candle-cuda`) and reused after; empty
/// and free otherwise. Clones share the cache. An entry is tied to the
/// `Arc<Nf4Tensor>` it was made from: replacing the weight drops it.
#[derive(Debug, Clone, Default)]
pub struct DeviceWeightCache {
    #[cfg(feature = "candle-cuda")]
    inner: Arc<std::sync::Mutex<Option<cuda::CachedWeight>>>,
}

/// The LoRA branch of one call: the factors and their settings.
#[derive(Debug, Clone, Copy)]
pub struct LoraBranch<'a> {
    /// `A`, `[r, K]` (PEFT `lora_A.weight`), `r` in `1..=64`.
    pub a: &'a Tensor,
    /// `B`, `[N, r]` (PEFT `lora_B.weight`).
    pub b: &'a Tensor,
    /// `s = alpha / r`.
    pub scale: f32,
    /// Dropout on the branch's input; `None` (or `p = 0`) for none.
    pub dropout: Option<Dropout>,
}

/// A linear layer `y = x·Wᵀ + s·(x̃·Aᵀ)·Bᵀ + bias` whose forward pass is the
/// fused NF4 + LoRA op, with autograd to `x`, `A` and `B` (`W` and the
/// bias are frozen).
///
/// Cheap to clone (the weight is shared), so a model may build one per call
/// from its own fields.
#[derive(Debug, Clone)]
pub struct Nf4LoraLinear {
    /// `W`, `[out, in]`.
    pub weight: LinearWeight,
    /// `[out]`, frozen.
    pub bias: Option<Tensor>,
    /// `K`.
    pub in_features: usize,
    /// `N`.
    pub out_features: usize,
    /// Device copies of an NF4 `weight`.
    pub cache: DeviceWeightCache,
}

impl Nf4LoraLinear {
    /// A layer over `weight` (`[out, in]`) and an optional bias (`[out]`).
    ///
    /// # Errors
    /// [`crate::Error::ShapeMismatch`] when the weight or bias does not have
    /// the stated shape.
    pub fn new(
        weight: LinearWeight,
        bias: Option<Tensor>,
        out_features: usize,
        in_features: usize,
    ) -> crate::Result<Self> {
        const OP: &str = "Nf4LoraLinear::new";
        let (n, k) = (out_features, in_features);
        match &weight {
            LinearWeight::Nf4(q) => {
                if q.shape != [n, k] {
                    return Err(crate::Error::shape(
                        OP,
                        "NF4 weight",
                        format!("[{n}, {k}]"),
                        format!("{:?}", q.shape),
                    ));
                }
            }
            LinearWeight::Dense(w) => {
                if w.dims() != [n, k] {
                    return Err(crate::Error::shape(
                        OP,
                        "weight",
                        format!("[{n}, {k}]"),
                        format!("{:?}", w.dims()),
                    ));
                }
            }
        }
        if let Some(b) = &bias
            && b.dims() != [n]
        {
            return Err(crate::Error::shape(
                OP,
                "bias",
                format!("[{n}]"),
                format!("{:?}", b.dims()),
            ));
        }
        Ok(Self {
            weight,
            bias,
            in_features,
            out_features,
            cache: DeviceWeightCache::default(),
        })
    }

    /// `y = x·Wᵀ (+ s·(x̃·Aᵀ)·Bᵀ) (+ bias)` for `x` of shape `[..., in]`;
    /// `y` is `[..., out]` in `x`'s dtype. Differentiable in `x` and, with
    /// `lora`, in `A` and `B`.
    ///
    /// # Errors
    /// candle errors naming the operand for a wrong last dimension, factor
    /// shapes or dtypes that do not match `x`, a rank outside `1..=64`, a bad
    /// dropout probability, or a device the op does not run on.
    pub fn forward(&self, x: &Tensor, lora: Option<&LoraBranch<'_>>) -> CResult<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&k, lead)) = dims.split_last() else {
            return Err(msg("the input is a scalar".into()));
        };
        if k != self.in_features {
            return Err(msg(format!(
                "the input has {k} features; the weight [{}, {}] takes {}",
                self.out_features, self.in_features, self.in_features
            )));
        }
        let m: usize = lead.iter().product();
        let dtype = x.dtype();
        let x2 = x.reshape((m, k))?.contiguous()?;
        let frozen = |t: &Tensor| -> CResult<Tensor> { t.to_dtype(dtype)?.contiguous() };
        let op = FusedLinear {
            weight: match &self.weight {
                LinearWeight::Nf4(q) => OpWeight::Nf4(q.clone()),
                LinearWeight::Dense(w) => OpWeight::Dense(frozen(&w.detach())?),
            },
            bias: self
                .bias
                .as_ref()
                .map(|b| frozen(&b.detach()))
                .transpose()?,
            dims: LinearDims {
                m,
                n: self.out_features,
                k,
            },
            lora: lora.map(|l| LoraSettings {
                rank: l.a.dims().first().copied().unwrap_or(0),
                scale: l.scale,
                dropout: l.dropout.filter(|d| d.p > 0.0),
            }),
            cache: self.cache.clone(),
        };
        let y = match lora {
            None => x2.apply_op1(op)?,
            Some(l) => {
                for (t, what) in [(l.a, "lora_A"), (l.b, "lora_B")] {
                    if t.dtype() != dtype {
                        return Err(msg(format!(
                            "{what} is {:?} and x is {dtype:?}; cast the factors to the input's dtype",
                            t.dtype()
                        )));
                    }
                }
                x2.apply_op3(&l.a.contiguous()?, &l.b.contiguous()?, op)?
            }
        };
        let mut out = lead.to_vec();
        out.push(self.out_features);
        y.reshape(out)
    }
}

/// The weight as the op holds it: a dense weight already in the input's
/// dtype and contiguous.
#[derive(Debug, Clone)]
enum OpWeight {
    Nf4(Arc<Nf4Tensor>),
    Dense(Tensor),
}

#[derive(Debug, Clone, Copy)]
struct LoraSettings {
    rank: usize,
    scale: f32,
    dropout: Option<Dropout>,
}

/// One application of the layer: what [`Nf4LoraLinear::forward`] hands to
/// candle. `CustomOp1` over `x` without LoRA, `CustomOp3` over `(x, A, B)`
/// with it.
#[derive(Debug, Clone)]
struct FusedLinear {
    weight: OpWeight,
    bias: Option<Tensor>,
    dims: LinearDims,
    lora: Option<LoraSettings>,
    // Read by the CUDA forward and backward only.
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    cache: DeviceWeightCache,
}

/// A CPU storage and its layout, as `cpu_fwd` receives them.
type HostOperand<'a> = (&'a CpuStorage, &'a Layout);

/// The contiguous `[start, end)` of a storage slice under `layout`, with its
/// dims checked against `want`.
fn host_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
    want: &[usize],
) -> CResult<&'a [T]> {
    if l.dims() != want {
        return Err(msg(format!(
            "{what} has shape {:?}, expected {want:?}",
            l.dims()
        )));
    }
    let v = T::cpu_storage_as_slice(s).map_err(|_| {
        msg(format!(
            "{what} is {:?}, expected {:?}",
            s.dtype(),
            T::DTYPE
        ))
    })?;
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| msg(format!("{what} is not contiguous")))?;
    v.get(a..b)
        .ok_or_else(|| msg(format!("{what}: layout past the end of its storage")))
}

fn cpu_storage<'a>(s: &'a Storage, what: &str) -> CResult<&'a CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        other => Err(msg(format!(
            "{what} is on {:?}; the other operands are on the CPU",
            other.device().location()
        ))),
    }
}

/// Run `$body` with `$t` the Rust type of the float dtype `$d`.
macro_rules! with_dtype {
    ($d:expr, $t:ident => $body:expr) => {
        match $d {
            CDType::F32 => {
                type $t = f32;
                $body
            }
            CDType::BF16 => {
                type $t = half::bf16;
                $body
            }
            CDType::F16 => {
                type $t = half::f16;
                $body
            }
            other => Err(msg(format!(
                "unsupported dtype {other:?} (supported: f32, bf16, f16)"
            ))),
        }
    };
}

impl FusedLinear {
    fn factor_shapes(&self) -> Option<([usize; 2], [usize; 2])> {
        let LinearDims { n, k, .. } = self.dims;
        self.lora.map(|l| ([l.rank, k], [n, l.rank]))
    }

    /// The forward pass on host slices. `ab` is `(A, B)` with their
    /// layouts.
    fn cpu_forward<T: Element + WithDType>(
        &self,
        x: HostOperand<'_>,
        ab: Option<(HostOperand<'_>, HostOperand<'_>)>,
    ) -> CResult<(CpuStorage, Shape)> {
        let LinearDims { m, n, k } = self.dims;
        let xs = host_slice::<T>(x.0, x.1, "x", &[m, k])?;
        let factors = match (ab, self.factor_shapes()) {
            (Some((a, b)), Some((sa, sb))) => Some((
                host_slice::<T>(a.0, a.1, "lora_A", &sa)?,
                host_slice::<T>(b.0, b.1, "lora_B", &sb)?,
            )),
            _ => None,
        };
        let wg = match &self.weight {
            OpWeight::Dense(w) => Some(w.storage_and_layout()),
            OpWeight::Nf4(_) => None,
        };
        let bg = self.bias.as_ref().map(|b| b.storage_and_layout());
        let weight = match (&self.weight, &wg) {
            (OpWeight::Nf4(q), _) => BaseWeight::Nf4(q.view()),
            (OpWeight::Dense(_), Some((g, l))) => BaseWeight::Dense(host_slice::<T>(
                cpu_storage(g, "weight")?,
                l,
                "weight",
                &[n, k],
            )?),
            (OpWeight::Dense(_), None) => return Err(msg("dense weight not locked".into())),
        };
        let bias = match &bg {
            Some((g, l)) => Some(host_slice::<T>(cpu_storage(g, "bias")?, l, "bias", &[n])?),
            None => None,
        };
        let args = ForwardArgs {
            dims: self.dims,
            x: xs,
            weight,
            lora: self.lora.zip(factors).map(|(l, (a, b))| LoraFactors {
                a,
                b,
                rank: l.rank,
                scale: l.scale,
            }),
            bias,
            dropout: self.lora.and_then(|l| l.dropout),
        };
        let mut out = vec![T::from_f32(0.0); m * n];
        crate::ops::lora_matmul::forward(Device::Cpu, &args, &mut out).map_err(wrap)?;
        Ok((T::to_cpu_storage_owned(out), Shape::from((m, n))))
    }

    /// Gradients `(dx, dA, dB)` on the CPU for the inputs that want one.
    fn cpu_backward<T: Element + WithDType>(
        &self,
        x: &Tensor,
        ab: Option<(&Tensor, &Tensor)>,
        dy: &Tensor,
        want: [bool; 3],
    ) -> CResult<[Option<Tensor>; 3]> {
        let LinearDims { m, n, k } = self.dims;
        let dy = dy.contiguous()?;
        let (xg, xl) = x.storage_and_layout();
        let (dyg, dyl) = dy.storage_and_layout();
        let abg = ab.map(|(a, b)| (a.storage_and_layout(), b.storage_and_layout()));
        let xs = host_slice::<T>(cpu_storage(&xg, "x")?, xl, "x", &[m, k])?;
        let dys = host_slice::<T>(cpu_storage(&dyg, "dy")?, dyl, "dy", &[m, n])?;
        let factors = match (&abg, self.factor_shapes()) {
            (Some(((ag, al), (bg, bl))), Some((sa, sb))) => Some((
                host_slice::<T>(cpu_storage(ag, "lora_A")?, al, "lora_A", &sa)?,
                host_slice::<T>(cpu_storage(bg, "lora_B")?, bl, "lora_B", &sb)?,
            )),
            _ => None,
        };
        let wg = match &self.weight {
            OpWeight::Dense(w) => Some(w.storage_and_layout()),
            OpWeight::Nf4(_) => None,
        };
        let weight = match (&self.weight, &wg) {
            (OpWeight::Nf4(q), _) => BaseWeight::Nf4(q.view()),
            (OpWeight::Dense(_), Some((g, l))) => BaseWeight::Dense(host_slice::<T>(
                cpu_storage(g, "weight")?,
                l,
                "weight",
                &[n, k],
            )?),
            (OpWeight::Dense(_), None) => return Err(msg("dense weight not locked".into())),
        };
        let lora = self.lora.zip(factors).map(|(l, (a, b))| LoraFactors {
            a,
            b,
            rank: l.rank,
            scale: l.scale,
        });
        let r = lora.map_or(0, |l| l.rank);
        let zero = T::from_f32(0.0);
        let mut dx = want[0].then(|| vec![zero; m * k]);
        let mut da = (want[1] && lora.is_some()).then(|| vec![zero; r * k]);
        let mut db = (want[2] && lora.is_some()).then(|| vec![zero; n * r]);
        let args = BackwardArgs {
            fwd: ForwardArgs {
                dims: self.dims,
                x: xs,
                weight,
                lora,
                bias: None,
                dropout: self.lora.and_then(|l| l.dropout),
            },
            dy: dys,
        };
        let grads = Grads {
            dx: dx.as_deref_mut(),
            da: da.as_deref_mut(),
            db: db.as_deref_mut(),
        };
        crate::ops::lora_matmul::backward(Device::Cpu, &args, grads).map_err(wrap)?;
        let cpu = CDevice::Cpu;
        Ok([
            dx.map(|v| Tensor::from_vec(v, (m, k), &cpu)).transpose()?,
            da.map(|v| Tensor::from_vec(v, (r, k), &cpu)).transpose()?,
            db.map(|v| Tensor::from_vec(v, (n, r), &cpu)).transpose()?,
        ])
    }

    /// `(dx, dA, dB)` for the inputs that carry a gradient, on their device.
    fn backward(
        &self,
        x: &Tensor,
        ab: Option<(&Tensor, &Tensor)>,
        dy: &Tensor,
    ) -> CResult<[Option<Tensor>; 3]> {
        let want = [
            x.track_op(),
            ab.is_some_and(|(a, _)| a.track_op()),
            ab.is_some_and(|(_, b)| b.track_op()),
        ];
        if want == [false; 3] {
            return Ok([None, None, None]);
        }
        match x.device() {
            CDevice::Cpu => with_dtype!(x.dtype(), T => self.cpu_backward::<T>(x, ab, dy, want)),
            #[cfg(feature = "candle-cuda")]
            CDevice::Cuda(_) => {
                with_dtype!(x.dtype(), T => cuda::backward::<T>(self, x, ab, dy, want))
            }
            other => Err(msg(format!(
                "no backward pass on {:?} (cpu{})",
                other.location(),
                if cfg!(feature = "candle-cuda") {
                    ", cuda"
                } else {
                    "; cuda needs the `candle-cuda` feature"
                }
            ))),
        }
    }
}

impl CustomOp1 for FusedLinear {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        with_dtype!(s.dtype(), T => self.cpu_forward::<T>((s, l), None))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        with_dtype!(s.dtype(), T => cuda::forward::<T>(self, (s, l), None))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let [dx, _, _] = self.backward(x, None, grad)?;
        Ok(dx)
    }
}

impl CustomOp3 for FusedLinear {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        with_dtype!(s1.dtype(), T => self.cpu_forward::<T>((s1, l1), Some(((s2, l2), (s3, l3)))))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        with_dtype!(s1.dtype(), T => cuda::forward::<T>(self, (s1, l1), Some(((s2, l2), (s3, l3)))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dx, da, db] = self.backward(x, Some((a, b)), grad)?;
        Ok((dx, da, db))
    }
}

// Used by the CUDA half; keeps the import live in CPU-only builds too.
#[allow(dead_code)]
fn from_storage(storage: Storage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

// ---- CUDA (feature `candle-cuda`) -------------------------------------------------
//
// Written against candle-core 0.11's `CudaStorage` (cudarc 0.19, the version
// this crate launches with).
#[cfg(feature = "candle-cuda")]
mod cuda {
    use std::sync::{Arc, Weak};

    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
    use candle_core::cuda_backend::{CudaDType, CudaStorage};
    use candle_core::{Layout, Shape, Storage, Tensor};

    use super::{CResult, FusedLinear, OpWeight, from_storage, msg, wrap};
    use crate::Element;
    use crate::backend::cuda::{
        Cuda, DeviceForwardArgs, DeviceGrads, DeviceLora, DeviceWeight, Nf4Device,
    };
    use crate::lora::LinearDims;
    use crate::lora::kernel::ForwardVariant;
    use crate::nf4::Nf4Tensor;

    /// An NF4 weight uploaded to the launcher's device, and the host tensor
    /// it was made from.
    #[derive(Debug)]
    pub(super) struct CachedWeight {
        host: Weak<Nf4Tensor>,
        device: Arc<Nf4Device>,
    }

    fn launcher(s: &CudaStorage) -> CResult<&'static Cuda> {
        let cuda = Cuda::global().map_err(wrap)?;
        let ordinal = s.device.cuda_stream().context().ordinal();
        if ordinal != cuda.ordinal() {
            return Err(msg(format!(
                "the kernels run on CUDA device {}; the tensor is on device {ordinal}",
                cuda.ordinal()
            )));
        }
        Ok(cuda)
    }

    /// The device copy of `q`, uploading it on first use.
    fn nf4_on_device(op: &FusedLinear, cuda: &Cuda, q: &Arc<Nf4Tensor>) -> CResult<Arc<Nf4Device>> {
        let mut slot = op
            .cache
            .inner
            .lock()
            .map_err(|_| msg("device weight cache poisoned".into()))?;
        if let Some(c) = slot.as_ref()
            && c.host.upgrade().is_some_and(|h| Arc::ptr_eq(&h, q))
        {
            return Ok(c.device.clone());
        }
        let device = Arc::new(cuda.upload_nf4(&q.view()).map_err(wrap)?);
        *slot = Some(CachedWeight {
            host: Arc::downgrade(q),
            device: device.clone(),
        });
        Ok(device)
    }

    /// A buffer holding exactly the `want`-shaped contiguous elements of `s`
    /// under `l`: the storage itself when it is exactly that, else a device
    /// copy of the range.
    fn exact<T: CudaDType + DeviceRepr>(
        s: &CudaStorage,
        l: &Layout,
        what: &str,
        want: &[usize],
    ) -> CResult<Option<CudaSlice<T>>> {
        if l.dims() != want {
            return Err(msg(format!(
                "{what} has shape {:?}, expected {want:?}",
                l.dims()
            )));
        }
        let slice = s.as_cuda_slice::<T>()?;
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| msg(format!("{what} is not contiguous")))?;
        if a == 0 && b == slice.len() {
            return Ok(None);
        }
        let copy = s
            .device
            .cuda_stream()
            .clone_dtod(&slice.slice(a..b))
            .map_err(candle_core::Error::wrap)?;
        Ok(Some(copy))
    }

    /// `exact`, borrowing the storage when it can.
    macro_rules! exact_ref {
        ($tmp:ident, $s:expr, $l:expr, $what:expr, $want:expr) => {{
            $tmp = exact::<T>($s, $l, $what, $want)?;
            match &$tmp {
                Some(c) => c,
                None => $s.as_cuda_slice::<T>()?,
            }
        }};
    }

    fn cuda_storage<'a>(s: &'a Storage, what: &str) -> CResult<&'a CudaStorage> {
        match s {
            Storage::Cuda(c) => Ok(c),
            other => Err(msg(format!(
                "{what} is on {:?}; the other operands are on a CUDA device",
                other.device().location()
            ))),
        }
    }

    type Operand<'a> = (&'a CudaStorage, &'a Layout);

    pub(super) fn forward<T: Element + CudaDType + DeviceRepr + ValidAsZeroBits>(
        op: &FusedLinear,
        x: Operand<'_>,
        ab: Option<(Operand<'_>, Operand<'_>)>,
    ) -> CResult<(CudaStorage, Shape)> {
        let cuda = launcher(x.0)?;
        let LinearDims { m, n, k } = op.dims;
        let (tx, ta, tb, tw, tbias);
        let xs = exact_ref!(tx, x.0, x.1, "x", &[m, k]);
        let factors = match (ab, op.factor_shapes()) {
            (Some((a, b)), Some((sa, sb))) => Some((
                exact_ref!(ta, a.0, a.1, "lora_A", &sa),
                exact_ref!(tb, b.0, b.1, "lora_B", &sb),
            )),
            _ => None,
        };
        let wg = match &op.weight {
            OpWeight::Dense(w) => Some(w.storage_and_layout()),
            OpWeight::Nf4(_) => None,
        };
        let bg = op.bias.as_ref().map(|b| b.storage_and_layout());
        let nf4 = match &op.weight {
            OpWeight::Nf4(q) => Some(nf4_on_device(op, cuda, q)?),
            OpWeight::Dense(_) => None,
        };
        let weight = match (&nf4, &wg) {
            (Some(q), _) => DeviceWeight::Nf4(q),
            (None, Some((g, l))) => DeviceWeight::Dense(exact_ref!(
                tw,
                cuda_storage(g, "weight")?,
                l,
                "weight",
                &[n, k]
            )),
            (None, None) => return Err(msg("dense weight not locked".into())),
        };
        let bias = match &bg {
            Some((g, l)) => Some(exact_ref!(tbias, cuda_storage(g, "bias")?, l, "bias", &[n])),
            None => None,
        };
        let args = DeviceForwardArgs {
            dims: op.dims,
            x: xs,
            weight,
            lora: op.lora.zip(factors).map(|(l, (a, b))| DeviceLora {
                a,
                b,
                rank: l.rank,
                scale: l.scale,
            }),
            bias,
            dropout: op.lora.and_then(|l| l.dropout),
        };
        let mut out = x.0.device.alloc_zeros::<T>(m * n)?;
        cuda.lora_forward(&args, &mut out, ForwardVariant::Auto)
            .map_err(wrap)?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, x.0.device.clone()),
            Shape::from((m, n)),
        ))
    }

    pub(super) fn backward<T: Element + CudaDType + DeviceRepr + ValidAsZeroBits>(
        op: &FusedLinear,
        x: &Tensor,
        ab: Option<(&Tensor, &Tensor)>,
        dy: &Tensor,
        want: [bool; 3],
    ) -> CResult<[Option<Tensor>; 3]> {
        let LinearDims { m, n, k } = op.dims;
        let dy = dy.contiguous()?;
        let (xg, xl) = x.storage_and_layout();
        let (dyg, dyl) = dy.storage_and_layout();
        let abg = ab.map(|(a, b)| (a.storage_and_layout(), b.storage_and_layout()));
        let xstore = cuda_storage(&xg, "x")?;
        let cuda = launcher(xstore)?;
        let (tx, tdy, ta, tb, tw);
        let xs = exact_ref!(tx, xstore, xl, "x", &[m, k]);
        let dys = exact_ref!(tdy, cuda_storage(&dyg, "dy")?, dyl, "dy", &[m, n]);
        let factors = match (&abg, op.factor_shapes()) {
            (Some(((ag, al), (bg, bl))), Some((sa, sb))) => Some((
                exact_ref!(ta, cuda_storage(ag, "lora_A")?, al, "lora_A", &sa),
                exact_ref!(tb, cuda_storage(bg, "lora_B")?, bl, "lora_B", &sb),
            )),
            _ => None,
        };
        let wg = match &op.weight {
            OpWeight::Dense(w) => Some(w.storage_and_layout()),
            OpWeight::Nf4(_) => None,
        };
        let nf4 = match &op.weight {
            OpWeight::Nf4(q) => Some(nf4_on_device(op, cuda, q)?),
            OpWeight::Dense(_) => None,
        };
        let weight = match (&nf4, &wg) {
            (Some(q), _) => DeviceWeight::Nf4(q),
            (None, Some((g, l))) => DeviceWeight::Dense(exact_ref!(
                tw,
                cuda_storage(g, "weight")?,
                l,
                "weight",
                &[n, k]
            )),
            (None, None) => return Err(msg("dense weight not locked".into())),
        };
        let lora = op.lora.zip(factors).map(|(l, (a, b))| DeviceLora {
            a,
            b,
            rank: l.rank,
            scale: l.scale,
        });
        let r = lora.map_or(0, |l| l.rank);
        let dev = &xstore.device;
        let mut dx = want[0].then(|| dev.alloc_zeros::<T>(m * k)).transpose()?;
        let mut da = (want[1] && lora.is_some())
            .then(|| dev.alloc_zeros::<T>(r * k))
            .transpose()?;
        let mut db = (want[2] && lora.is_some())
            .then(|| dev.alloc_zeros::<T>(n * r))
            .transpose()?;
        let args = DeviceForwardArgs {
            dims: op.dims,
            x: xs,
            weight,
            lora,
            bias: None,
            dropout: op.lora.and_then(|l| l.dropout),
        };
        let grads = DeviceGrads {
            dx: dx.as_mut(),
            da: da.as_mut(),
            db: db.as_mut(),
        };
        cuda.lora_backward(&args, dys, grads).map_err(wrap)?;
        let tensor = |s: Option<CudaSlice<T>>, shape: (usize, usize)| {
            s.map(|s| {
                from_storage(
                    Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())),
                    shape,
                )
            })
        };
        Ok([tensor(dx, (m, k)), tensor(da, (r, k)), tensor(db, (n, r))])
    }
}
