//! candle custom ops for pooling, normalisation and cosine similarity, with
//! autograd.
//!
//! The forward passes run this crate's kernels: the multi-threaded CPU path
//! on CPU tensors, and (feature `candle-cuda`) the CUDA launchers on CUDA
//! tensors. The backward passes are written with candle tensor ops from the
//! closed-form gradients below, so they run on any device candle supports.
//!
//! Gradients (g = upstream gradient, all in f32; the result is cast back to
//! the input's dtype):
//!
//! * pooling `p_b = (1/c_b) Σ_t m_bt h_bt`:
//!   `∂/∂h_bt = (m_bt / c_b) · g_b` (0 for rows with no set position);
//! * normalisation `y = x / n`, `n = max(‖x‖, eps)`:
//!   `∂/∂x = (g − y ⟨y, g⟩) / n` when `‖x‖ > eps`, else `g / eps` (the clamp
//!   makes n constant);
//! * cosine `c = ⟨â, b̂⟩` with `â`, `b̂` the normalised rows (this *is*
//!   `F.cosine_similarity`'s per-norm clamp): `∂c/∂â = g · b̂`, then the
//!   normalisation rule; the same for `b`. The [-1, 1] clamp of the forward
//!   only removes rounding overshoot and is treated as the identity;
//! * matrix `C = Â B̂ᵀ`: `∂/∂Â = G B̂`, `∂/∂B̂ = Gᵀ Â`, then normalisation.
//!
//! Masks are `u8`/`u32`/`i64`/float tensors, nonzero = pooled; they take no
//! gradient. Hidden states may be strided (a layer slice) as long as the
//! embedding dimension is contiguous.

use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};

use crate::Element;
use crate::cosine::{self, COSINE_EPS, Hidden, NORMALIZE_EPS};

type CResult<T> = candle_core::Result<T>;

fn wrap(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// A `[batch, seq, dim]` (rank 3) or `[n, dim]` (rank 2, `seq = 1`) view of
/// a CPU storage under its layout.
fn hidden<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> CResult<Hidden<'a, T>> {
    let dims = layout.dims();
    let stride = layout.stride();
    let data = data
        .get(layout.start_offset()..)
        .ok_or_else(|| candle_core::Error::msg(format!("{op}: layout offset past the storage")))?;
    match (dims, stride) {
        ([b, t, d], [sb, st, 1]) => Ok(Hidden::strided(data, *b, *t, *d, *sb, *st)),
        ([n, d], [ld, 1]) => Ok(Hidden::rows_strided(data, *n, *d, *ld)),
        _ => Err(candle_core::Error::msg(format!(
            "{op}: expected [batch, seq, dim] or [n, dim] with a contiguous last dimension, got shape {dims:?} strides {stride:?}"
        ))),
    }
}

/// Run `f` on the storage's element type (f32, bf16 or f16).
macro_rules! with_float_storage {
    ($storage:expr, $op:expr, |$v:ident| $body:expr) => {
        match $storage {
            CpuStorage::F32($v) => $body,
            CpuStorage::BF16($v) => $body,
            CpuStorage::F16($v) => $body,
            other => Err(candle_core::Error::msg(format!(
                "{}: unsupported dtype {:?} (supported: f32, bf16, f16)",
                $op,
                other.dtype()
            ))),
        }
    };
}

/// A mask as host bytes, `1` where nonzero.
fn mask_bytes(mask: &Tensor) -> CResult<Vec<u8>> {
    mask.ne(0u32)?.flatten_all()?.to_vec1::<u8>()
}

/// The mask as a contiguous u8 tensor of 0/1 (nonzero = pooled).
fn mask_u8(mask: &Tensor) -> CResult<Tensor> {
    mask.ne(0u32)?.contiguous()
}

// ---- shared backward pieces ------------------------------------------------

/// Gradient of masked mean pooling: `(m_bt / c_b) · g_b`, shape `[B, T, D]`.
fn pool_backward(mask: Option<&Tensor>, h_dims: &[usize], g: &Tensor) -> CResult<Tensor> {
    let (b, t, d) = match h_dims {
        [b, t, d] => (*b, *t, *d),
        [n, d] => (*n, 1, *d),
        _ => return Err(candle_core::Error::msg("pool backward: bad rank")),
    };
    let w = match mask {
        Some(m) => {
            let m = m.ne(0u32)?.to_dtype(DType::F32)?.reshape((b, t))?;
            let c = m.sum_keepdim(1)?;
            // 1/c where c > 0, else 0 (an empty row pooled to the constant 0).
            let inv = c
                .gt(0.0)?
                .where_cond(&c.clamp(1.0, f64::INFINITY)?.recip()?, &c)?;
            m.broadcast_mul(&inv)?
        }
        None => Tensor::full(1.0f32 / t as f32, (b, t), g.device())?,
    };
    let grad = w
        .unsqueeze(2)?
        .broadcast_mul(&g.to_dtype(DType::F32)?.unsqueeze(1)?)?;
    if h_dims.len() == 2 {
        grad.reshape((b, d))
    } else {
        Ok(grad)
    }
}

/// `(x / max(‖x‖, eps), ‖x‖, max(‖x‖, eps))` per row of a `[N, D]` f32 tensor.
fn normalized(x: &Tensor, eps: f64) -> CResult<(Tensor, Tensor, Tensor)> {
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?;
    let n = norm.clamp(eps, f64::INFINITY)?;
    Ok((x.broadcast_div(&n)?, norm, n))
}

/// Gradient of `y = x / max(‖x‖, eps)` given `gy`, for `[N, D]` f32 `x`.
fn normalize_backward(x: &Tensor, gy: &Tensor, eps: f64) -> CResult<Tensor> {
    let (y, norm, n) = normalized(x, eps)?;
    let yg = (&y * gy)?.sum_keepdim(1)?;
    let active = (gy - y.broadcast_mul(&yg)?)?.broadcast_div(&n)?;
    let clamped = gy.broadcast_div(&n)?;
    norm.gt(eps)?
        .broadcast_as(x.shape())?
        .where_cond(&active, &clamped)
}

/// The pooled rows of a `[B, T, D]` (or `[N, D]`) tensor, in f32, as
/// a tensor without autograd (used to recompute inside backward passes).
fn pool_tensor(h: &Tensor, mask: Option<&Tensor>) -> CResult<Tensor> {
    if h.rank() == 2 {
        return h.to_dtype(DType::F32);
    }
    h.apply_op1_no_bwd(&MaskedMeanPool {
        mask: mask.cloned(),
    })
}

// ---- masked mean pooling ------------------------------------------------------

/// Masked mean pooling `[B, T, D] → [B, D]` (f32) as a candle op; see
/// [`masked_mean_pool`].
#[derive(Debug, Clone)]
pub struct MaskedMeanPool {
    /// `[B, T]`, nonzero = pooled; `None` pools every position.
    pub mask: Option<Tensor>,
}

impl CustomOp1 for MaskedMeanPool {
    fn name(&self) -> &'static str {
        "tli-masked-mean-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let mask = self.mask.as_ref().map(mask_bytes).transpose()?;
        with_float_storage!(s, self.name(), |v| {
            let h = hidden(v, l, self.name())?;
            pool_cpu(&h, mask.as_deref(), None)
        })
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda::pool(s, l, self.mask.as_ref(), None)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let g = pool_backward(self.mask.as_ref(), arg.dims(), grad)?;
        Ok(Some(g.to_dtype(arg.dtype())?))
    }
}

fn pool_cpu<T: Element>(
    h: &Hidden<'_, T>,
    mask: Option<&[u8]>,
    normalize: Option<f32>,
) -> CResult<(CpuStorage, Shape)> {
    const OP: &str = "candle pool";
    h.validate(OP, "hidden states").map_err(wrap)?;
    cosine::check_mask(OP, "hidden-state", h, mask).map_err(wrap)?;
    let mut out = vec![0.0f32; h.batch * h.dim];
    cosine::cpu::pool_into(h, mask, normalize, &mut out);
    Ok((CpuStorage::F32(out), Shape::from((h.batch, h.dim))))
}

/// Masked mean pooling of hidden states `[B, T, D]` (f32, bf16 or f16; may be
/// strided) under `mask` `[B, T]` (nonzero = pooled) into `[B, D]` f32, with
/// autograd to `h`. A row with no set position pools to zeros.
///
/// # Errors
/// candle errors for a bad rank, layout, dtype or mask size, with the values.
pub fn masked_mean_pool(h: &Tensor, mask: &Tensor) -> CResult<Tensor> {
    h.apply_op1(MaskedMeanPool {
        mask: Some(mask_u8(mask)?),
    })
}

// ---- L2 normalisation ------------------------------------------------------------

/// Row-wise `v / max(‖v‖, eps)` of `[N, D]` into f32; see [`l2_normalize`].
#[derive(Debug, Clone, Copy)]
pub struct L2Normalize {
    /// The clamp ([`NORMALIZE_EPS`] = 1e-12, PyTorch's default).
    pub eps: f32,
}

impl CustomOp1 for L2Normalize {
    fn name(&self) -> &'static str {
        "tli-l2-normalize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        cosine::check_eps("candle l2 normalize", self.eps).map_err(wrap)?;
        with_float_storage!(s, self.name(), |v| {
            let h = hidden(v, l, self.name())?;
            h.require_rows("candle l2 normalize", "input")
                .map_err(wrap)?;
            pool_cpu(&h, None, Some(self.eps))
        })
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda::pool(s, l, None, Some(self.eps))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let x = arg.to_dtype(DType::F32)?;
        let g = normalize_backward(&x, &grad.to_dtype(DType::F32)?, f64::from(self.eps))?;
        Ok(Some(g.to_dtype(arg.dtype())?))
    }
}

/// `v / max(‖v‖, 1e-12)` per row of `[N, D]` (PyTorch `F.normalize`), f32
/// out, with autograd.
///
/// # Errors
/// candle errors for a bad rank, layout or dtype.
pub fn l2_normalize(v: &Tensor) -> CResult<Tensor> {
    v.apply_op1(L2Normalize { eps: NORMALIZE_EPS })
}

// ---- cosine of pairs (fused with pooling when masks are given) ---------------------

/// The fused pair op: `[N]` f32 cosines of the masked mean pools of two
/// hidden-state batches (`[N, T, D]`), or of two `[N, D]` matrices; see
/// [`pooled_cosine`] and [`cosine_pairs`].
#[derive(Debug, Clone)]
pub struct PooledCosine {
    /// Mask of the first argument (`[N, T]`), if any.
    pub mask_a: Option<Tensor>,
    /// Mask of the second argument, if any.
    pub mask_b: Option<Tensor>,
    /// The per-norm clamp ([`COSINE_EPS`] = 1e-8).
    pub eps: f32,
}

impl CustomOp2 for PooledCosine {
    fn name(&self) -> &'static str {
        "tli-pooled-cosine"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let ma = self.mask_a.as_ref().map(mask_bytes).transpose()?;
        let mb = self.mask_b.as_ref().map(mask_bytes).transpose()?;
        macro_rules! run {
            ($a:expr, $b:expr) => {{
                let a = hidden($a, l1, self.name())?;
                let b = hidden($b, l2, self.name())?;
                pairs_cpu(&a, ma.as_deref(), &b, mb.as_deref(), self.eps)
            }};
        }
        match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => run!(a, b),
            (CpuStorage::BF16(a), CpuStorage::BF16(b)) => run!(a, b),
            (CpuStorage::F16(a), CpuStorage::F16(b)) => run!(a, b),
            (a, b) => Err(candle_core::Error::msg(format!(
                "{}: dtypes {:?} and {:?}: both must be f32, both bf16 or both f16",
                self.name(),
                a.dtype(),
                b.dtype()
            ))),
        }
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda::pairs(
            s1,
            l1,
            self.mask_a.as_ref(),
            s2,
            l2,
            self.mask_b.as_ref(),
            self.eps,
        )
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let eps = f64::from(self.eps);
        let pa = pool_tensor(a, self.mask_a.as_ref())?;
        let pb = pool_tensor(b, self.mask_b.as_ref())?;
        let (ua, _, _) = normalized(&pa, eps)?;
        let (ub, _, _) = normalized(&pb, eps)?;
        let g = grad.to_dtype(DType::F32)?.unsqueeze(1)?;
        let dpa = normalize_backward(&pa, &ub.broadcast_mul(&g)?, eps)?;
        let dpb = normalize_backward(&pb, &ua.broadcast_mul(&g)?, eps)?;
        let da = pool_backward(self.mask_a.as_ref(), a.dims(), &dpa)?;
        let db = pool_backward(self.mask_b.as_ref(), b.dims(), &dpb)?;
        Ok((Some(da.to_dtype(a.dtype())?), Some(db.to_dtype(b.dtype())?)))
    }
}

fn pairs_cpu<T: Element>(
    a: &Hidden<'_, T>,
    ma: Option<&[u8]>,
    b: &Hidden<'_, T>,
    mb: Option<&[u8]>,
    eps: f32,
) -> CResult<(CpuStorage, Shape)> {
    cosine::check_pair_args("candle pooled cosine", a, ma, b, mb, eps).map_err(wrap)?;
    let mut cos = vec![0.0f32; a.batch];
    cosine::cpu::pairs_into(a, ma, b, mb, eps, &mut cos, None);
    Ok((CpuStorage::F32(cos), Shape::from(a.batch)))
}

/// The fused evaluation op with autograd: `[N]` f32 cosines of the masked
/// mean pools of `a` and `b` (`[N, T, D]` each, masks `[N, T]`), pooling,
/// normalising and dotting in one pass in the forward.
///
/// # Errors
/// candle errors for bad ranks, layouts, dtypes or mask sizes.
pub fn pooled_cosine(a: &Tensor, mask_a: &Tensor, b: &Tensor, mask_b: &Tensor) -> CResult<Tensor> {
    a.apply_op2(
        b,
        PooledCosine {
            mask_a: Some(mask_u8(mask_a)?),
            mask_b: Some(mask_u8(mask_b)?),
            eps: COSINE_EPS,
        },
    )
}

/// `cos(a_i, b_i)` for two `[N, D]` tensors (PyTorch's per-norm clamp, 1e-8),
/// `[N]` f32, with autograd.
///
/// # Errors
/// candle errors for bad ranks, layouts or dtypes.
pub fn cosine_pairs(a: &Tensor, b: &Tensor) -> CResult<Tensor> {
    a.apply_op2(
        b,
        PooledCosine {
            mask_a: None,
            mask_b: None,
            eps: COSINE_EPS,
        },
    )
}

// ---- cosine matrix ---------------------------------------------------------------

/// `C[i, j] = cos(a_i, b_j)` of `[N, D]` and `[M, D]` into `[N, M]` f32; see
/// [`cosine_matrix`].
#[derive(Debug, Clone, Copy)]
pub struct CosineMatrix {
    /// The per-norm clamp ([`COSINE_EPS`] = 1e-8).
    pub eps: f32,
}

impl CustomOp2 for CosineMatrix {
    fn name(&self) -> &'static str {
        "tli-cosine-matrix"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        macro_rules! run {
            ($a:expr, $b:expr) => {{
                let a = hidden($a, l1, self.name())?;
                let b = hidden($b, l2, self.name())?;
                cosine::check_matrix_args("candle cosine matrix", &a, &b, self.eps)
                    .map_err(wrap)?;
                let mut out = vec![0.0f32; a.batch * b.batch];
                cosine::cpu::matrix_into(&a, &b, self.eps, &mut out);
                Ok((CpuStorage::F32(out), Shape::from((a.batch, b.batch))))
            }};
        }
        match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => run!(a, b),
            (CpuStorage::BF16(a), CpuStorage::BF16(b)) => run!(a, b),
            (CpuStorage::F16(a), CpuStorage::F16(b)) => run!(a, b),
            (a, b) => Err(candle_core::Error::msg(format!(
                "{}: dtypes {:?} and {:?}: both must be f32, both bf16 or both f16",
                self.name(),
                a.dtype(),
                b.dtype()
            ))),
        }
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda::matrix(s1, l1, s2, l2, self.eps)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let eps = f64::from(self.eps);
        let (a32, b32) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
        let (ua, _, _) = normalized(&a32, eps)?;
        let (ub, _, _) = normalized(&b32, eps)?;
        let g = grad.to_dtype(DType::F32)?;
        let da = normalize_backward(&a32, &g.matmul(&ub)?, eps)?;
        let db = normalize_backward(&b32, &g.t()?.matmul(&ua)?, eps)?;
        Ok((Some(da.to_dtype(a.dtype())?), Some(db.to_dtype(b.dtype())?)))
    }
}

/// The cosine matrix of `a` (`[N, D]`) and `b` (`[M, D]`) with PyTorch's
/// per-norm clamp, `[N, M]` f32, with autograd (for hardest-negative mining
/// inside a loss).
///
/// # Errors
/// candle errors for bad ranks, layouts or dtypes.
pub fn cosine_matrix(a: &Tensor, b: &Tensor) -> CResult<Tensor> {
    a.apply_op2(b, CosineMatrix { eps: COSINE_EPS })
}

// ---- CUDA forward passes (feature `candle-cuda`) ------------------------------------
//
// Written against candle-core 0.11.1's `CudaStorage` (cudarc 0.19, the
// version this crate launches with). Not compiled on the machines that
// build this crate (the feature takes 10-16 minutes to build and needs a
// driver to link); the CI builds `--features cuda` only.

#[cfg(feature = "candle-cuda")]
mod cuda {
    use candle_core::backend::BackendStorage as _;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
    use candle_core::cuda_backend::{CudaDType, CudaStorage, CudaStorageSlice};
    use candle_core::{Layout, Shape, Storage, Tensor};
    use half::{bf16, f16};

    use crate::Element;
    use crate::backend::cuda::{Cuda, DeviceHidden};

    type CResult<T> = candle_core::Result<T>;

    fn wrap(e: crate::Error) -> candle_core::Error {
        candle_core::Error::wrap(e)
    }

    /// Our launcher's device, which must be the tensor's: both use the
    /// primary context of the device, so buffers are interchangeable.
    fn device(s: &CudaStorage) -> CResult<&'static Cuda> {
        let cuda = Cuda::global().map_err(wrap)?;
        let ordinal = s.device.cuda_stream().context().ordinal();
        if ordinal != cuda.ordinal() {
            return Err(candle_core::Error::msg(format!(
                "tli cosine ops run on CUDA device {}; the tensor is on device {ordinal}",
                cuda.ordinal()
            )));
        }
        Ok(cuda)
    }

    /// The `[B, T, D]` / `[N, D]` device view of a storage under its layout.
    fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> CResult<DeviceHidden<'a, T>> {
        let slice: &CudaSlice<T> = s.as_cuda_slice::<T>()?;
        let data: CudaView<'a, T> = slice.slice(l.start_offset()..);
        match (l.dims(), l.stride()) {
            ([b, t, d], [sb, st, 1]) => Ok(DeviceHidden {
                data,
                batch: *b,
                seq: *t,
                dim: *d,
                stride_b: *sb,
                stride_t: *st,
            }),
            ([n, d], [ld, 1]) => Ok(DeviceHidden {
                data,
                batch: *n,
                seq: 1,
                dim: *d,
                stride_b: *ld,
                stride_t: *d,
            }),
            (dims, stride) => Err(candle_core::Error::msg(format!(
                "expected [batch, seq, dim] or [n, dim] with a contiguous last dimension, got {dims:?} / {stride:?}"
            ))),
        }
    }

    /// A contiguous u8 mask tensor's device bytes (kept alive by the guard).
    fn with_mask<R>(
        mask: Option<&Tensor>,
        f: impl FnOnce(Option<&CudaView<'_, u8>>) -> CResult<R>,
    ) -> CResult<R> {
        let Some(m) = mask else { return f(None) };
        let m = m.contiguous()?;
        let (storage, layout) = m.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            return Err(candle_core::Error::msg("mask is not on the CUDA device"));
        };
        let v = cs.as_cuda_slice::<u8>()?.slice(layout.start_offset()..);
        f(Some(&v))
    }

    macro_rules! by_dtype {
        ($s:expr, $t:ident => $body:expr) => {
            match &$s.slice {
                CudaStorageSlice::F32(_) => {
                    type $t = f32;
                    $body
                }
                CudaStorageSlice::BF16(_) => {
                    type $t = bf16;
                    $body
                }
                CudaStorageSlice::F16(_) => {
                    type $t = f16;
                    $body
                }
                _ => Err(candle_core::Error::msg(format!(
                    "unsupported dtype {:?} (supported: f32, bf16, f16)",
                    $s.dtype()
                ))),
            }
        };
    }

    pub(super) fn pool(
        s: &CudaStorage,
        l: &Layout,
        mask: Option<&Tensor>,
        normalize: Option<f32>,
    ) -> CResult<(CudaStorage, Shape)> {
        let cuda = device(s)?;
        by_dtype!(s, T => {
            let h = view::<T>(s, l)?;
            let mut out = s.device.alloc_zeros::<f32>(h.batch * h.dim)?;
            with_mask(mask, |m| {
                cuda.cosine_pool(&h, m, normalize, &mut out.as_view_mut()).map_err(wrap)
            })?;
            let shape = Shape::from((h.batch, h.dim));
            Ok((CudaStorage::wrap_cuda_slice(out, s.device.clone()), shape))
        })
    }

    pub(super) fn pairs(
        s1: &CudaStorage,
        l1: &Layout,
        mask_a: Option<&Tensor>,
        s2: &CudaStorage,
        l2: &Layout,
        mask_b: Option<&Tensor>,
        eps: f32,
    ) -> CResult<(CudaStorage, Shape)> {
        let cuda = device(s1)?;
        if s1.dtype() != s2.dtype() {
            return Err(candle_core::Error::msg(format!(
                "dtypes {:?} and {:?} differ",
                s1.dtype(),
                s2.dtype()
            )));
        }
        by_dtype!(s1, T => {
            let a = view::<T>(s1, l1)?;
            let b = view::<T>(s2, l2)?;
            let mut cos = s1.device.alloc_zeros::<f32>(a.batch)?;
            with_mask(mask_a, |ma| {
                with_mask(mask_b, |mb| {
                    cuda.cosine_pairs(&a, ma, &b, mb, eps, &mut cos.as_view_mut(), None)
                        .map_err(wrap)
                })
            })?;
            let shape = Shape::from(a.batch);
            Ok((CudaStorage::wrap_cuda_slice(cos, s1.device.clone()), shape))
        })
    }

    pub(super) fn matrix(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        eps: f32,
    ) -> CResult<(CudaStorage, Shape)> {
        let cuda = device(s1)?;
        if s1.dtype() != s2.dtype() {
            return Err(candle_core::Error::msg(format!(
                "dtypes {:?} and {:?} differ",
                s1.dtype(),
                s2.dtype()
            )));
        }
        by_dtype!(s1, T => {
            let a = view::<T>(s1, l1)?;
            let b = view::<T>(s2, l2)?;
            let mut out = s1.device.alloc_zeros::<f32>(a.batch * b.batch)?;
            cuda.cosine_matrix(&a, &b, eps, &mut out.as_view_mut()).map_err(wrap)?;
            let shape = Shape::from((a.batch, b.batch));
            Ok((CudaStorage::wrap_cuda_slice(out, s1.device.clone()), shape))
        })
    }

    // The launchers are generic over these; keep the bound visible here.
    #[allow(dead_code)]
    fn _bounds<T: Element + DeviceRepr + CudaDType>() {}
}
